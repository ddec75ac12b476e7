"""Early stopping and keep-the-best bookkeeping of ``Trainer.fit`` (``Trainer`` mixin).

The tracker itself (``self.best``) counts evaluations; these methods decide when an
evaluation may end the run, which state goes into a checkpoint, and what ``fit`` reports.
"""
import os


class BestTracking:
    """Early stopping and keep-the-best decisions of ``Trainer.fit``."""

    def _may_stop_at(self, step):
        """Whether the evaluation after ``step`` may end the run (early stopping)."""
        ev = self.cfg.eval
        return bool(self.best is not None and ev.early_stopping is not None and ev.interval
                    and step % ev.interval == 0)

    def _missed_eval(self, step):
        """Whether a resumed run starts at an evaluation step whose evaluation the
        checkpoint does not count (the run stopped right after training the step)."""
        ev = self.cfg.eval
        return bool(self.best is not None and step and ev.interval and step % ev.interval == 0
                    and self.best.last_step != step and not self._done(step))

    def _final_eval_follows(self, nxt, streaming, preempted):
        """The last step of a keep_best run with a final evaluation: its checkpoint waits
        for that evaluation (written once, counting it; ``fit``'s end writes it)."""
        ev = self.cfg.eval
        return bool(self.best is not None and self.best.keep_best and nxt is None
                    and not streaming and not preempted and ev.at_end
                    and self.cfg.data.eval is not None)

    def _count_eval(self, metrics):
        """Count an evaluation of the current step; True when it is a new best whose
        checkpoint is to be kept (``keep_best``)."""
        if self.best is None:
            return False
        return self.best.update(self.step, metrics) and self.best.keep_best

    def _best_state(self):
        """The tracker's part of a checkpoint's run state: ``early_stopping`` (the counts) and
        ``best`` (with ``keep_best``; the checkpoint manager points best.json at the
        checkpoint whose step it names)."""
        if self.best is None:
            return {}
        out = {"early_stopping": self.best.state()}
        if self.best.keep_best and self.best.summary() is not None:
            out["best"] = self.best.summary()
        return out

    def _best_result(self):
        """``fit``'s ``best``: metric, value, step (and checkpoint with keep_best), or None."""
        out = self.best.summary() if self.best is not None else None
        if out is not None and self.best.keep_best and self.ckpt is not None:
            from hpctrain.checkpoint.manager import step_dir
            out["checkpoint"] = os.path.join(self.ckpt.directory, step_dir(out["step"]))
        return out
