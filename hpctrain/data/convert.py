"""``hpctrain convert``: write hpctrain HDF5 data files from TSV/CSV (or synthetic) data.

    hpctrain convert --criteo day_0.tsv day_1.tsv -o train.h5
    hpctrain convert --config run.toml --split train -o train.h5

With ``--config`` the split's files, row range, CSV schema, dense transforms
(standardisation statistics from the train split) and bad-line policy come from
the config, so the HDF5 file holds exactly the samples the text reader yields.
Bad lines are skipped and counted under the same policy as in training.
"""
import argparse
import os
import secrets
import sys
import time

from hpctrain.config import BadLinesConfig, DataConfig, SplitConfig, load_config
from hpctrain.data.hdf5 import HDF5Writer
from hpctrain.data.sources import open_dataset
from hpctrain.data.text import BadLines
from hpctrain.errors import DataError, HpctrainError

BLOCK = 1 << 16


def _rows(text):
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if a < 0 or b <= a:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return a, b


def _parser():
    p = argparse.ArgumentParser(prog="hpctrain convert", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--criteo", nargs="+", metavar="TSV", help="Criteo TSV files, in order")
    src.add_argument("--config", metavar="TOML", help="a run config whose data section to use")
    p.add_argument("--split", choices=("train", "eval"), default="train",
                   help="with --config: which split (default train)")
    p.add_argument("--rows", type=_rows, metavar="START:END",
                   help="with --criteo: convert data lines [START, END) only")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (overwritten)")
    p.add_argument("--chunk-rows", type=int, default=BLOCK, help="HDF5 chunk length in samples")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none")
    p.add_argument("--max-bad-lines", type=int, default=None,
                   help="bad lines tolerated (default: the config's, or 0)")
    p.add_argument("--max-bad-ratio", type=float, default=None,
                   help="bad lines tolerated as a fraction of lines parsed")
    return p


def convert(data_cfg, split, output, chunk_rows=BLOCK, compression=None, log=print):
    """Write ``split`` of ``data_cfg`` to the HDF5 file ``output``; returns (samples, bad lines)."""
    bad = BadLines(data_cfg.bad_lines)
    ds = open_dataset(data_cfg, split, seed=0, bad_lines=bad)
    # written under a temporary name and renamed at the end: an error leaves no half file
    tmp = f"{output}.tmp-{secrets.token_hex(4)}"
    try:
        writer = HDF5Writer(tmp, ds.features, ds.dense_names, chunk_rows, compression)
    except BaseException:
        ds.close()
        raise
    done = False
    try:
        if ds.random_access:
            if ds.num_samples is None:
                raise HpctrainError(f"data.{split}: an endless split cannot be converted; "
                                    f"set num_samples")
            for a in range(0, ds.num_samples, BLOCK):
                writer.append(ds.fetch(range(a, min(a + BLOCK, ds.num_samples))))
        else:
            pos, row = ds.start(), 0
            while True:
                pieces, pos, n = ds.window(pos, row, BLOCK)
                if n == 0:
                    break
                writer.append(ds.parse_window(pieces, 0, n))
                row += n
        n = writer.n
        if n == 0:
            raise DataError(f"data.{split}: no good sample to write ({bad.bad} bad lines; "
                            f"{bad.last()})")
        writer.close()
        os.replace(tmp, output)
        done = True
    finally:
        writer.close()
        ds.close()
        if not done and os.path.lexists(tmp):
            os.unlink(tmp)
    return n, bad.bad


def main(argv=None):
    """Entry point of ``hpctrain convert``; returns the exit code."""
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.config:
            if args.rows:
                raise HpctrainError("--rows is for --criteo; with --config set data.SPLIT.rows")
            data = load_config(args.config).data
        else:
            data = DataConfig(format="criteo", train=SplitConfig(paths=args.criteo,
                                                                 rows=args.rows))
        if args.max_bad_lines is not None or args.max_bad_ratio is not None:
            data.bad_lines = BadLinesConfig(
                args.max_bad_lines if args.max_bad_lines is not None else data.bad_lines.max_count,
                args.max_bad_ratio if args.max_bad_ratio is not None else data.bad_lines.max_ratio)
        comp = None if args.compression == "none" else args.compression
        n, bad = convert(data, args.split, args.output, args.chunk_rows, comp)
    except HpctrainError as e:
        print(f"hpctrain convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} samples to {args.output} ({bad} bad lines skipped) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
