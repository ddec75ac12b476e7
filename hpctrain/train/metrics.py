"""Metrics: one live line on rank 0's terminal and a JSON-lines file per run.

Per-phase times are accumulated on every rank by a ``PhaseTimer`` (``hpctrain.timing``,
re-exported here); the trainer reduces them (max over ranks: the slowest rank sets the
step time) and only rank 0 writes.
"""
import json
import os
import sys
import time

from hpctrain.errors import ConfigError
from hpctrain.timing import PhaseTimer

__all__ = ["MetricsLogger", "PhaseTimer"]


LEVELS = ("debug", "info", "warning", "error")
#: Process-wide output settings (``hpctrain train --quiet / --log-level``).
SETTINGS = {"quiet": False, "level": "info"}


def configure(quiet=False, level="info", rank=0):
    """Set the live line (off with ``quiet``) and the level of rank 0's messages, and send
    Python logging and warnings of every rank to stderr with time, rank and level."""
    import logging
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    SETTINGS["quiet"], SETTINGS["level"] = bool(quiet), "warning" if quiet else level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, SETTINGS["level"].upper()))
    logging.captureWarnings(True)


def _fmt_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricsLogger:
    """Writes one JSON object per report to ``path`` and a live line to stdout (rank 0).

    Args:
        path: JSON-lines file (appended; directories created), or None for none.
        comm: hpctrain Communicator (for rank and reductions).
        total_steps: for the ETA and the progress bar.
        stream: where the live line goes (default stdout); a progress bar when it is a TTY.
        start_step: the step a resumed run starts from (0: a fresh run).
        tensorboard: a directory for TensorBoard event files of the same records
            (``hpctrain.train.tensorboard``), or None.

    Raises:
        ConfigError: (every rank) ``tensorboard`` is set but its extra is not installed.
    """

    def __init__(self, path, comm, total_steps, stream=None, start_step=0, tensorboard=None,
                 epochs=None, steps_per_epoch=None):
        self.comm = comm
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.start_step = int(start_step)
        self.path = path
        self.total_steps = None if total_steps is None else max(1, int(total_steps))
        self.stream = stream or sys.stdout
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t_start = time.perf_counter()
        self._file = None
        self._events = None
        if tensorboard:
            from hpctrain.train import tensorboard as tb
            tb.require()        # every rank, before any opens a file
            if comm.rank == 0:
                self._events = tb.EventWriter(tensorboard, self.start_step)
        if comm.rank == 0 and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.islink(path):
                raise ConfigError(f"metrics.path: {path} is a symbolic link; a run appends only "
                                  f"to a file it owns (remove the link or choose another path)")
            if self.start_step and os.path.exists(path):
                _drop_after(path, self.start_step)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            self._file = os.fdopen(os.open(path, flags, 0o644), "a", buffering=1)

    def write(self, record):
        """Append ``record`` (JSON-able dict) on rank 0."""
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._events is not None:
            self._events.write(record)

    def live(self, step, loss, samples_per_s):
        """Print the live line (or redraw the bar) on rank 0."""
        if self.comm.rank != 0 or SETTINGS["quiet"]:
            return
        elapsed = time.perf_counter() - self._t_start
        epoch = ""
        if self.epochs and self.steps_per_epoch:
            epoch = f"  epoch {min(self.epochs, -(-step // self.steps_per_epoch))}/{self.epochs}"
        if self.total_steps is None:   # length unknown up front (an endless or unsized split)
            text = f"step {step}{epoch}  loss {loss:.5f}  {samples_per_s:,.0f} samples/s"
        else:
            eta = elapsed / max(step - self.start_step, 1) * (self.total_steps - step)
            text = (f"step {step}/{self.total_steps}{epoch}  loss {loss:.5f}  "
                    f"{samples_per_s:,.0f} samples/s  ETA {_fmt_eta(eta)}")
        if self.interactive and self.total_steps is not None:
            width = 24
            done = int(width * step / self.total_steps)
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}")
            if step >= self.total_steps:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text, level="info"):
        """A line on rank 0 with its time (ends any progress bar line first); lines below
        the log level (``configure``) are left out."""
        if self.comm.rank == 0 and LEVELS.index(level) >= LEVELS.index(SETTINGS["level"]):
            stamp = time.strftime("%H:%M:%S")
            self.stream.write(("\n" if self.interactive else "") + f"{stamp} {text}\n")
            self.stream.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None


def _drop_after(path, step):
    """Rewrite ``path`` without the records of steps after ``step`` (atomically).

    A run resumed from the checkpoint of ``step`` trains the later steps again; their
    old records were rolled back with the model, so a reader sees one record per step.
    """
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec_step = json.loads(line).get("step")
            except ValueError:
                rec_step = None
            if isinstance(rec_step, int) and rec_step > step:
                dropped += 1
            else:
                keep.append(line)
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
