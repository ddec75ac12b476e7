"""``hpctrain train|eval|export``: the trainer's command-line entry points.

Run them under MPI as ``mpiexec -n N python -m mpi4py -m hpctrain train run.toml``.
An ``HpctrainError`` (bad config, bad data, corrupt checkpoint, NaN loss) prints
one line naming the rank and the culprit and ends the whole job: with several
ranks through ``MPI_Abort``, so no rank is left waiting in a collective.
"""
import argparse
import functools
import sys

from hpctrain.errors import HpctrainError


def _fail_job(exc):
    """Report ``exc`` and end the job; returns the exit code for a 1-rank run."""
    from hpctrain.comm.world import abort_world, rank_and_size
    rank, size = rank_and_size()
    sys.stdout.flush()
    sys.stderr.write(f"hpctrain: rank {rank}/{size}: {type(exc).__name__}: {exc}\n")
    sys.stderr.flush()
    abort_world(1)
    return 1


def _entry(fn):
    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(sys.argv[1:] if argv is None else argv)
        except HpctrainError as exc:
            return _fail_job(exc)
    return wrapper


def _load(path, overrides):
    from hpctrain.config import load_config
    cfg = load_config(path)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


@_entry
def train_main(argv):
    """``hpctrain train CONFIG [--resume [CHECKPOINT]] [--steps N] [--max-steps N]``."""
    p = argparse.ArgumentParser(prog="hpctrain train", description="Train from a TOML config.")
    p.add_argument("config", help="TOML configuration file (docs/configuration.md)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or from the latest complete checkpoint in "
                        "the configured directory (starting fresh when there is none)")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint when configured) after N steps of this run")
    args = p.parse_args(argv)
    cfg = _load(args.config, {"steps": args.steps})
    from hpctrain.train.loop import Trainer
    trainer = Trainer(cfg)
    resume = args.resume if args.resume is not None else (
        cfg.checkpoint is not None and cfg.checkpoint.resume)
    result = trainer.fit(resume=resume, max_steps=args.max_steps)
    if trainer.comm.rank == 0:
        ev = result["eval"]
        tail = "" if not ev else "  " + "  ".join(
            f"eval_{k} {v:.5f}" if isinstance(v, float) else f"eval_{k} {v}"
            for k, v in ev.items())
        print(f"hpctrain: {result['stopped']} at step {result['step']}  loss "
              f"{result['loss']:.6f}{tail}"
              + (f"\nhpctrain: checkpoint {result['checkpoint']}" if result["checkpoint"] else "")
              + (f"\nhpctrain: metrics {cfg.metrics.path}" if cfg.metrics.path else ""),
              flush=True)
    return 0


@_entry
def eval_main(argv):
    """``hpctrain eval CONFIG [--checkpoint PATH] [--split eval|train]``."""
    p = argparse.ArgumentParser(prog="hpctrain eval",
                                description="Evaluate a checkpoint: exact AUC and logloss.")
    p.add_argument("config")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (default: the latest in the configured directory)")
    p.add_argument("--split", default="eval", choices=("eval", "train"))
    args = p.parse_args(argv)
    cfg = _load(args.config, {})
    from hpctrain.train.loop import Trainer
    trainer = Trainer(cfg)
    step = trainer.restore(args.checkpoint)
    metrics = trainer.evaluate(args.split)
    if trainer.comm.rank == 0:
        print(f"hpctrain: step {step} {args.split}: " + "  ".join(
            f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
            flush=True)
    return 0


@_entry
def export_main(argv):
    """``hpctrain export CHECKPOINT OUT.h5``: one HDF5 model file for inference."""
    p = argparse.ArgumentParser(prog="hpctrain export",
                                description="Write a single HDF5 model file from a checkpoint "
                                            "(dense parameters and every table's rows, no "
                                            "optimizer state).")
    p.add_argument("checkpoint", help="checkpoint directory (step-XXXXXXXX)")
    p.add_argument("out", help="output HDF5 file")
    args = p.parse_args(argv)
    from hpctrain.checkpoint import export_model
    from hpctrain.comm.world import mpi_world
    world = mpi_world()
    if world.rank == 0:
        export_model(args.checkpoint, args.out)
        print(f"hpctrain: wrote {args.out}", flush=True)
    world.Barrier()
    return 0
