"""Scoring a split and its exact metrics (``Trainer`` mixin).

Evaluation lookups insert nothing (unknown ids read the default row). ``evaluate``
never gathers the scores (``hpctrain.train.evaluation.evaluate_distributed``);
``predict`` gathers them in data order for callers that want them.
"""
import numpy as np

from hpctrain.dense.backend import to_numpy
from hpctrain.train.evaluation import evaluate_distributed, gather_eval


class Predicting:
    """``predict``, ``evaluate`` and the per-rank scoring they share."""

    def predict(self, split="eval", global_batch=None):
        """``(labels, logits)`` of a whole split, gathered in sample order on every rank.

        Embedding lookups do not insert ids (unknown ids read as the default row).
        """
        labels, logits = self._predict_local(split, self._eval_batch(global_batch))
        # Gather per global batch so the order is the data order for any world size.
        out_y, out_z = [], []
        for y, z in zip(labels, logits):
            gy, gz = gather_eval(self.comm, y, z)
            out_y.append(gy)
            out_z.append(gz)
        cat = (lambda a: np.concatenate(a) if a else np.zeros(0))
        return cat(out_y), cat(out_z)

    def _eval_batch(self, global_batch=None):
        """The evaluation's global batch: the argument, ``eval.global_batch`` or the
        training one, rounded up to a multiple of the ranks."""
        gb = global_batch or self.cfg.eval.global_batch or self.global_batch
        return -(-gb // self.comm.size) * self.comm.size

    def _predict_local(self, split, gb):
        """This rank's ``(labels, logits)`` per global batch of ``split`` (lists)."""
        reader = self._reader(split, gb, evaluation=True)
        labels, logits = [], []
        for batch in reader:
            pooled, _ = self.emb.forward(self.jagged(batch), self.step, train=False)
            z = self.model.forward(batch.dense, [pooled[f] for f in self.features],
                                   training=False)
            labels.append(np.asarray(batch.labels, dtype=np.float64))
            logits.append(np.asarray(to_numpy(z), dtype=np.float64))
        return labels, logits

    def evaluate(self, split="eval", global_batch=None):
        """Exact AUC, logloss and accuracy over the whole split (same on every rank).

        Scores are never gathered: memory per rank is its share of the split
        (``hpctrain.train.evaluation.evaluate_distributed``).
        """
        labels, logits = self._predict_local(split, self._eval_batch(global_batch))
        cat = (lambda a: np.concatenate(a) if a else np.zeros(0))
        return evaluate_distributed(self.comm, cat(labels), cat(logits))
