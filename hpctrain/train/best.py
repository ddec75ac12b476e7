"""The best evaluation so far: keep-the-best checkpoints and early stopping (``[eval]``).

Every evaluation during training (every ``eval.interval`` steps, and the final one) is
compared with the best value of ``eval.metric`` so far: it improves on it when it is
better by more than ``early_stopping.min_delta`` (0 without early stopping; higher is
better for auc and accuracy, lower for logloss; a non-finite value never improves).

* ``keep_best``: the checkpoint of the best evaluation's step is written (if that step has
  none yet) with ``state["best"]`` naming it, so the checkpoint manager points
  ``best.json`` at it and never rotates it away (``hpctrain.checkpoint.manager``).
* ``early_stopping``: after ``patience`` evaluations in a row that do not improve, the run
  stops with ``stopped = "early_stopped"``.

The tracker's state travels in every checkpoint (``state["early_stopping"]``), so a
resumed run counts on where the interrupted one was.
"""
import math

from hpctrain.config.run import BEST_METRICS


class BestTracker:
    """Which evaluation is the best so far, and whether patience has run out.

    Args:
        eval_cfg: the run's ``EvalConfig``.

    Attributes:
        best, best_step: the best value of ``metric`` and the step it was measured at
            (None before the first finite evaluation).
        bad: evaluations since the last improvement.
        last_step: the step of the last evaluation counted.
        stopped: patience ran out (early stopping only).
    """

    def __init__(self, eval_cfg):
        self.metric = eval_cfg.metric
        self.higher = BEST_METRICS[self.metric]
        self.early = eval_cfg.early_stopping
        self.keep_best = eval_cfg.keep_best
        self.min_delta = self.early.min_delta if self.early is not None else 0.0
        self.best = self.best_step = self.last_step = None
        self.bad = 0
        self.stopped = False

    def update(self, step, metrics):
        """Count the evaluation of ``step``; returns whether it is the new best.

        An evaluation of a step already counted (a resumed run's first) is ignored.
        """
        if self.last_step is not None and step <= self.last_step:
            return False
        self.last_step = step
        v = metrics.get(self.metric)
        better = v is not None and math.isfinite(v) and (
            self.best is None or (v - self.best if self.higher else self.best - v)
            > self.min_delta)
        if better:
            self.best, self.best_step, self.bad = float(v), int(step), 0
        else:
            self.bad += 1
        if self.early is not None and self.bad >= self.early.patience:
            self.stopped = True
        return better

    def summary(self):
        """``{"metric", "value", "step"}`` of the best evaluation, or None before one."""
        if self.best_step is None:
            return None
        return {"metric": self.metric, "value": self.best, "step": self.best_step}

    def state(self):
        """JSON-able state for a checkpoint."""
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad": self.bad, "last_step": self.last_step, "stopped": self.stopped}

    def restore(self, state):
        """Continue from ``state()`` of a checkpoint (None or another metric: start afresh,
        e.g. a run that had no early stopping, or whose metric changed). Whether patience
        has run out is decided by this run's ``early_stopping.patience``."""
        if not isinstance(state, dict) or state.get("metric") != self.metric:
            return
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad, self.last_step = int(state.get("bad") or 0), state.get("last_step")
        self.stopped = self.early is not None and self.bad >= self.early.patience
