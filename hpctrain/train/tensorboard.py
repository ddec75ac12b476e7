"""TensorBoard event files from the metrics records (``[metrics] tensorboard = "DIR"``).

Rank 0 writes every record it appends to the JSON-lines metrics file as scalars of the
record's step too, through ``tensorboardX`` (the optional extra ``tensorboard``:
``pip install 'hpctrain[tensorboard]'``)::

    training record   train/loss, train/samples_per_s, train/lr, train/grad_norm, ...
                      phases_s/<phase>   (nested tables: <table>/<key>)
    evaluation        eval/auc, eval/logloss, eval/accuracy
    online record     progressive/auc, progressive/logloss, ..., train/stream_idle_s

``step``, ``time`` (the event's wall time), counts of ranks and lists (per-rank rows and
memory) are not scalars. A resumed run purges the events after the step it resumed at,
as the metrics file drops their records.
"""
import importlib.util
import math

from hpctrain.errors import ConfigError

#: What to install for event files.
INSTALL_HINT = "pip install 'hpctrain[tensorboard]'"

#: Record keys that are no scalar of the run.
_NOT_SCALARS = {"step", "time", "world_size", "workers", "groups", "group", "count",
                "cumulative_count", "server"}


def available():
    """Whether the event-file writer (``tensorboardX``) is installed."""
    return importlib.util.find_spec("tensorboardX") is not None


def require(key="metrics.tensorboard"):
    """Raise ``ConfigError`` (one line: what to install) unless ``available()``."""
    if not available():
        raise ConfigError(f"{key}: TensorBoard event files need the tensorboard extra: "
                          f"{INSTALL_HINT}")


def scalars(record):
    """``[(tag, value)]`` of one metrics record (see the module docstring)."""
    out = []
    for key, value in record.items():
        if key in _NOT_SCALARS:
            continue
        if isinstance(value, dict):
            out += [(f"{key}/{k}", float(v)) for k, v in value.items()
                    if k not in _NOT_SCALARS and _is_number(v)]
        elif _is_number(value):
            out.append((f"train/{key}", float(value)))
    return out


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class EventWriter:
    """Writes metrics records as TensorBoard scalars into ``logdir``.

    Args:
        logdir: the event-file directory (created).
        start_step: a resumed run's first step - 1: events of later steps that an earlier
            run wrote are purged (0: a fresh run).
    """

    def __init__(self, logdir, start_step=0):
        require()
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)

    def write(self, record):
        step = record.get("step")
        if not isinstance(step, int):
            return
        wall = record.get("time")
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def close(self):
        self.writer.close()
