"""Metrics records and the live line of ``Trainer.fit`` (``Trainer`` mixin).

A report reduces every rank's phase times (max over ranks: the slowest rank sets the
step time), table rows and peak memory, and writes one JSON-lines record on rank 0.
"""
import time

import numpy as np


class Reporting:
    """Metrics records, the live line and evaluation lines."""

    def _optimizer_metrics(self, step):
        """The dense learning rate of ``step`` (with a schedule) and the gradient norm before
        clipping (with clip_norm), for the metrics record."""
        out = {}
        if getattr(self.opt, "schedule", None) is not None:
            out["lr"] = self.opt.schedule(step)
        if self._grad_norm is not None:
            out["grad_norm"] = self._grad_norm
        return out

    def _take_phases(self):
        """This rank's seconds per phase since the last report (the store's as ``sparse.*``),
        added to ``phase_totals``; the timers start over."""
        phases = self.timer.take()
        phases.update({f"sparse.{k}": v for k, v in self.emb.timers.items()})
        self.emb.reset_timers()
        for k, v in phases.items():
            self.phase_totals[k] = self.phase_totals.get(k, 0.0) + v
        return phases

    def _report(self, log, step, window_loss, samples_per_s):
        """Live line and one JSON-lines record (phase times: max over ranks)."""
        from hpctrain.memory import peak_rss_bytes
        phases = self._take_phases()
        with self.timer("report"):
            per_rank = self.comm.allgather_object(
                (phases, self.emb.stats()["rows"], peak_rss_bytes()))
        names = sorted({k for p, _, _ in per_rank for k in p})
        loss = float(np.mean(window_loss))
        log.live(step, loss, samples_per_s)
        log.write({
            "step": step, "loss": loss, "samples_per_s": samples_per_s,
            "time": time.time(), "world_size": self.comm.size,
            "phases_s": {k: max(p.get(k, 0.0) for p, _, _ in per_rank) for k in names},
            "table_rows": [rows for _, rows, _ in per_rank],
            "peak_rss_bytes": [rss for _, _, rss in per_rank],
            **self._optimizer_metrics(step),
        })

    def _log_eval(self, log, metrics):
        log.message(f"eval at step {self.step}: " + "  ".join(
            f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        log.write({"step": self.step, "eval": metrics, "time": time.time()})
