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
from hpctrain.train import errorfile

def _fail_job(exc):
    """Report ``exc`` and end the job; returns the exit code for a 1-rank run."""
    from hpctrain.comm.world import rank_and_size
    rank, size = rank_and_size()
    errorfile.end_job(f"hpctrain: rank {rank}/{size}: {type(exc).__name__}: {exc}", 1, size)
    return 1


def _entry(fn):
    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(sys.argv[1:] if argv is None else argv)
        except HpctrainError as exc:
            return _fail_job(exc)
    return wrapper


def _load(path, overrides, changes=None):
    from hpctrain.config import load_config
    cfg = load_config(path, overrides or ())
    errorfile.set_from_config(cfg)
    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


def quickstart_config():
    """Path of the packaged quick-start config (a small DLRM on synthetic data)."""
    from importlib import resources
    return str(resources.files("hpctrain") / "configs" / "dlrm_synthetic.toml")


def _output_options(p):
    p.add_argument("--quiet", action="store_true",
                   help="no live line; only warnings and errors (rank 0's messages included)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="level of rank 0's messages and of every rank's log records "
                        "(stderr, with time and rank)")


def _configure_output(args):
    from hpctrain.comm.world import rank_and_size
    from hpctrain.train.metrics import configure
    configure(quiet=args.quiet, level=args.log_level, rank=rank_and_size()[0])


def _set_option(p):
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set steps=300 --set "
                        "dense_optimizer.lr=0.01 --set tables[0].dim=32 (repeatable; "
                        "recorded in the run's saved config)")


@_entry
def train_main(argv):
    """``hpctrain train [CONFIG] [--resume [CHECKPOINT]] [--steps N] [--max-steps N]
    [--set KEY=VALUE ...]``."""
    p = argparse.ArgumentParser(prog="hpctrain train", description="Train from a TOML config.")
    p.add_argument("config", nargs="?", default=None,
                   help="TOML configuration file (docs/configuration.md); without one, the "
                        "built-in quick start (a small DLRM on synthetic data) trains into "
                        "runs/dlrm_synthetic, continuing it when it is there")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (a directory, or \"best\": the [eval] "
                        "keep_best one, in either mode), or from the latest complete "
                        "checkpoint in the configured directory (starting fresh when there "
                        "is none)")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint when configured) after N steps of this run; "
                        "0 writes the checkpoint of the current (initial) model")
    _set_option(p)
    _output_options(p)
    args = p.parse_args(argv)
    _configure_output(args)
    if args.max_steps is not None and args.max_steps < 0:
        p.error(f"--max-steps must be >= 0, got {args.max_steps}")
    path = args.config or quickstart_config()
    sets = list(args.set) + ([f"steps={args.steps}"] if args.steps is not None else [])
    cfg = _load(path, sets)
    resume = args.resume if args.resume is not None else (
        args.config is None or (cfg.checkpoint is not None and cfg.checkpoint.resume))
    if cfg.mode == "hybrid":
        from hpctrain.train.hybrid import run_hybrid
        result = run_hybrid(cfg, max_steps=args.max_steps, resume=resume)
        rank0 = result is not None and result["worker_index"] == 0
    else:
        from hpctrain.train.loop import Trainer
        trainer = Trainer(cfg)
        result = trainer.fit(resume=resume, max_steps=args.max_steps)
        rank0 = trainer.comm.rank == 0
    if rank0:
        ev = result["eval"]
        tail = "" if not ev else "  " + "  ".join(
            f"eval_{k} {v:.5f}" if isinstance(v, float) else f"eval_{k} {v}"
            for k, v in ev.items())
        best = result.get("best")
        print(f"hpctrain: {result['stopped']} at step {result['step']}  loss "
              f"{result['loss']:.6f}{tail}"
              + (f"\nhpctrain: checkpoint {result['checkpoint']}" if result["checkpoint"] else "")
              + (f"\nhpctrain: best {best['metric']} {best['value']:.6f} at step {best['step']}"
                 + (f" (checkpoint {best['checkpoint']})" if best.get("checkpoint") else "")
                 if best else "")
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
                   help="checkpoint directory, or \"best\" (the [eval] keep_best one) (default: "
                        "the latest in the configured directory)")
    p.add_argument("--split", default="eval", choices=("eval", "train"))
    _set_option(p)
    _output_options(p)
    args = p.parse_args(argv)
    _configure_output(args)
    cfg = _load(args.config, args.set)
    if cfg.mode == "hybrid":
        # a hybrid checkpoint has the collective layout (the servers as ranks): the
        # collective trainer evaluates it on however many ranks this job has
        cfg = cfg.replace(mode="collective", ps=None)
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
