"""Command line: ``hpctrain train|eval|convert|export|info|configs|predict|serve-sync|...``.

Each sub-command lives in the module that owns it; this file only dispatches,
so ``hpctrain info`` does not import the trainer. Run distributed commands as
``mpiexec -n N python -m mpi4py -m hpctrain train run.toml`` so that an
uncaught exception on any rank aborts the whole job.
"""
import importlib
import sys

# sub-command -> (module, function, one-line help)
COMMANDS = {
    "info": ("hpctrain.info", "main", "versions, MPI/OpenMP/GPU environment, world layout"),
    "train": ("hpctrain.train.cli", "train_main", "train a model from a TOML config"),
    "eval": ("hpctrain.train.cli", "eval_main", "evaluate a checkpoint on the eval data"),
    "export": ("hpctrain.train.cli", "export_main", "write a single HDF5 model file from a checkpoint"),
    "convert": ("hpctrain.data.convert", "main", "convert TSV/CSV data into hpctrain HDF5"),
    "plot": ("hpctrain.train.plot", "main", "PNG loss/AUC/throughput curves from a run's metrics"),
    "configs": ("hpctrain.examples", "main", "list the example configs, print or copy one"),
    "predict": ("hpctrain.train.serving", "predict_main",
                "score files or a split with an exported model"),
    "serve-sync": ("hpctrain.train.serving", "serve_sync_main",
                   "keep a serving model current with an online run's deltas"),
    "stream-produce": ("hpctrain.data.stream_produce", "main",
                       "write a drifting synthetic stream of sealed segments"),
    "clean": ("hpctrain.comm.shmclean", "main",
              "remove shared-memory segments that aborted MPI jobs left in /dev/shm"),
}


def _usage():
    lines = ["usage: hpctrain COMMAND [ARGS...]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    """Dispatch ``argv[0]`` to its sub-command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from hpctrain import __version__
        print(f"hpctrain {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"hpctrain: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    try:
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    except (ImportError, RuntimeError) as exc:
        err = _install_error(exc)
        if err is None:
            raise
        print(f"hpctrain {argv[0]}: error: {err}", file=sys.stderr, flush=True)
        return 1


def _install_error(exc):
    """The ``InstallError`` behind ``exc`` (kernels missing or built for another CPU, no MPI
    library, including mpi4py's own error when a module imported it first), or None."""
    from hpctrain.comm.world import no_mpi_error
    from hpctrain.errors import InstallError
    while exc is not None:
        if isinstance(exc, InstallError):
            return exc
        if no_mpi_error(exc) is not None:
            return no_mpi_error(exc)
        exc = exc.__cause__ or exc.__context__
    return None
