"""``python -m hpctrain.bench NAME [options]``: dispatch to ``hpctrain.bench.NAME``."""
import importlib
import pkgutil
import sys

import hpctrain.bench as _pkg


def _names():
    return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__)
                  if not m.name.startswith("_") and m.name != "common")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = _names()
    if not argv or argv[0] not in names:
        print(f"usage: python -m hpctrain.bench {{{'|'.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # the allocator settings of a training process (HPCTRAIN_MALLOC=default: glibc's own)
    from hpctrain.memory import tune_malloc
    tune_malloc()
    from hpctrain.errors import HpctrainError
    try:
        return importlib.import_module(f"hpctrain.bench.{argv[0]}").main(argv[1:]) or 0
    except HpctrainError as exc:  # e.g. --device gpu without CuPy: one line, no traceback
        print(f"python -m hpctrain.bench {argv[0]}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
