"""What a reader yields (``Batch``) and the columnar rows readers assemble it from.

A ``Batch`` is this rank's slice of one global batch. Its sparse part uses the
feature-major jagged layout of ``hpctrain.sparse.jagged.JaggedBatch``::

    features = ("C1", "C2")          b = 3 samples
    values   = [5, 9, 5,   7, 8, 2]  C1's bags for samples 0..2, then C2's
    lengths  = [1, 1, 1,   2, 0, 1]  lengths[f * b + s]
"""
from dataclasses import dataclass

import numpy as np

from hpctrain._kernels.data_parse import to_feature_major


@dataclass
class Batch:
    """One rank's slice of a global batch.

    Attributes:
        labels: float32[b] click labels in [0, 1].
        dense: float32[b, num_dense] dense features (already transformed).
        features: tuple of sparse feature names.
        values: int64[total] ids, feature-major.
        lengths: int64[F * b] bag lengths, ``lengths[f * b + s]``.
        epoch: the epoch this batch belongs to (0-based).
        index: the number of this global batch within its epoch (0-based).
        global_size: sample slots of the whole global batch: the global batch size, or
            fewer for an epoch's final partial batch. Tolerated bad lines leave their
            slot empty, so the ranks' sizes may add up to less.
        offset: where this rank's slice starts within the global batch.
    """

    labels: np.ndarray
    dense: np.ndarray
    features: tuple
    values: np.ndarray
    lengths: np.ndarray
    epoch: int = 0
    index: int = 0
    global_size: int = 0
    offset: int = 0

    @property
    def size(self):
        """Number of samples in this slice."""
        return int(self.labels.shape[0])

    def __len__(self):
        return self.size

    @property
    def sparse(self):
        """``(features, values, lengths)``, the arguments of ``JaggedBatch``."""
        return self.features, self.values, self.lengths

    def jagged(self):
        """The sparse ids as a ``hpctrain.sparse.jagged.JaggedBatch``."""
        from hpctrain.sparse.jagged import JaggedBatch
        return JaggedBatch(list(self.features), self.values, self.lengths)

    def bags(self, name):
        """``(values, lengths)`` of feature ``name``: its ids and its b bag lengths."""
        f = self.features.index(name)
        b = self.size
        lengths = self.lengths.reshape(len(self.features), b)
        start = int(lengths[:f].sum())
        return self.values[start:start + int(lengths[f].sum())], self.lengths[f * b:(f + 1) * b]


class Rows:
    """Columnar samples in the making: labels, dense, and jagged ids with ``lengths[F, n]``.

    ``values`` is feature-major like ``Batch.values``; ``lengths`` is 2-D so that
    rows can be concatenated and reordered before they become a ``Batch``.
    """

    __slots__ = ("labels", "dense", "values", "lengths")

    def __init__(self, labels, dense, values, lengths):
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        self.dense = np.ascontiguousarray(dense, dtype=np.float32)
        self.values = np.ascontiguousarray(values, dtype=np.int64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)

    def __len__(self):
        return self.labels.shape[0]

    @classmethod
    def empty(cls, num_dense, num_features):
        return cls(np.zeros(0), np.zeros((0, num_dense)), np.zeros(0), np.zeros((num_features, 0)))

    @classmethod
    def from_sample_major(cls, labels, dense, ids, lengths_sm, order=None):
        """Rows from parser output: ids sample by sample, ``lengths_sm[n, F]``; within a
        sample the bags come in feature order ``order`` (default 0, 1, ..., F-1)."""
        n, nf = lengths_sm.shape
        order = np.arange(nf, dtype=np.int32) if order is None else order
        values = np.empty(ids.shape[0], dtype=np.int64)
        fm = np.empty(n * nf, dtype=np.int64)
        to_feature_major(np.ascontiguousarray(ids, dtype=np.int64),
                         np.ascontiguousarray(lengths_sm, dtype=np.int64),
                         np.ascontiguousarray(order, dtype=np.int32), values, fm)
        return cls(labels, dense, values, fm.reshape(nf, n))

    @staticmethod
    def concat(parts, num_dense, num_features):
        """Concatenate row blocks in order (samples of ``parts[0]`` first)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty(num_dense, num_features)
        if len(parts) == 1:
            return parts[0]
        pieces = []
        splits = [np.split(p.values, np.cumsum(p.lengths.sum(axis=1))[:-1]) for p in parts]
        for f in range(num_features):
            pieces.extend(s[f] for s in splits)
        return Rows(np.concatenate([p.labels for p in parts]),
                    np.concatenate([p.dense for p in parts]),
                    np.concatenate(pieces) if pieces else np.zeros(0, np.int64),
                    np.concatenate([p.lengths for p in parts], axis=1))

    def take(self, order):
        """Rows ``order[0], order[1], ...`` (a permutation or selection of row indices)."""
        order = np.asarray(order, dtype=np.int64)
        nf, n = self.lengths.shape
        flat = self.lengths.reshape(-1)
        starts = np.zeros(flat.shape[0] + 1, dtype=np.int64)
        np.cumsum(flat, out=starts[1:])
        cells = (np.arange(nf, dtype=np.int64)[:, None] * n + order[None, :]).reshape(-1)
        lens = flat[cells]
        total = int(lens.sum())
        out_start = np.cumsum(lens) - lens
        idx = np.repeat(starts[cells] - out_start, lens) + np.arange(total, dtype=np.int64)
        return Rows(self.labels[order], self.dense[order], self.values[idx],
                    lens.reshape(nf, order.shape[0]))

    def to_batch(self, features, **meta):
        """The ``Batch`` of these rows; ``meta`` sets epoch/index/global_size/offset."""
        return Batch(self.labels, self.dense, tuple(features), self.values,
                     self.lengths.reshape(-1), **meta)
