"""``[eval]``, ``[checkpoint]`` and ``[metrics]``: what a run does besides training steps."""
from dataclasses import dataclass

from hpctrain.config._node import resolve


#: Metrics that can decide the best evaluation, and whether higher is better.
BEST_METRICS = {"auc": True, "logloss": False, "accuracy": True}


@dataclass
class EarlyStoppingConfig:
    """Stop after ``patience`` evaluations in a row that do not improve the best value of
    ``EvalConfig.metric`` by more than ``min_delta``."""
    patience: int
    min_delta: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation on the whole ``data.eval`` split every ``interval`` steps (0: only at the end).

    ``metric`` decides which evaluation is the best (``BEST_METRICS``); ``keep_best`` keeps
    the checkpoint of the best one (``hpctrain.train.best``); ``early_stopping`` (None: off)
    ends the run when the metric stops improving.
    """
    interval: int = 0
    global_batch: int = None
    at_end: bool = True
    metric: str = "auc"
    keep_best: bool = False
    early_stopping: EarlyStoppingConfig = None


@dataclass
class CheckpointConfig:
    """Checkpoints every ``every_steps`` steps and/or ``every_minutes`` minutes; keep the last K."""
    directory: str
    every_steps: int = None
    every_minutes: float = None
    keep_last: int = 3
    resume: bool = False


@dataclass
class MetricsConfig:
    """JSON-lines metrics file (None: none), the live-line/metrics interval in steps, and a
    TensorBoard event-file directory (None: none; needs the ``tensorboard`` extra)."""
    path: str = None
    every_steps: int = 10
    tensorboard: str = None


def parse_eval(e):
    """Validate ``[eval]`` (a ``Node``, or None: the defaults) into an ``EvalConfig``."""
    if e is None:
        return EvalConfig()
    out = EvalConfig(e.integer("interval", 0, lo=0), e.integer("global_batch", None, lo=1, hi=2**31 - 1),
                     e.boolean("at_end", True))
    out.metric = e.string("metric", "auc", choices=tuple(BEST_METRICS))
    out.keep_best = e.boolean("keep_best", False)
    es = e.node("early_stopping")
    if es is not None:
        out.early_stopping = EarlyStoppingConfig(es.integer("patience", lo=1),
                                                 es.number("min_delta", 0.0, lo=0.0))
        es.finish()
    e.finish()
    return out


def parse_checkpoint(c):
    """Validate ``[checkpoint]`` into a ``CheckpointConfig`` (None: no checkpoints)."""
    if c is None:
        return None
    directory = c.string("directory")
    if not directory:
        raise c.error("directory", "must not be empty")
    out = CheckpointConfig(
        resolve(directory), c.integer("every_steps", None, lo=1),
        c.number("every_minutes", None, lo=0.0, lo_incl=False), c.integer("keep_last", 3, lo=1),
        c.boolean("resume", False))
    c.finish()
    return out


def parse_metrics(m):
    """Validate ``[metrics]`` (a ``Node``, or None: the defaults) into a ``MetricsConfig``."""
    if m is None:
        return MetricsConfig()
    path = m.string("path", None)
    out = MetricsConfig(resolve(path) if path else None, m.integer("every_steps", 10, lo=1))
    tb = m.string("tensorboard", None)
    out.tensorboard = resolve(tb) if tb else None
    m.finish()
    return out
