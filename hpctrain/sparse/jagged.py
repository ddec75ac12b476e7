"""The jagged batch of sparse ids: many features, a variable-length bag per sample.

A batch of ``B`` samples with ``F`` sparse features is a grid of bags; each
cell holds the ids of one feature in one sample (possibly none)::

                 sample 0     sample 1    sample 2
    "user"     [ 11        ] [ 12      ] [ 11      ]      one-hot: every length 1
    "items"    [ 7, 8, 9   ] [         ] [ 7       ]      multi-hot: any length >= 0

It is encoded feature-major, like TorchRec's KeyedJaggedTensor::

    features = ["user", "items"]
    values   = [11, 12, 11,   7, 8, 9,   7]     feature 0's bags, then feature 1's
    lengths  = [ 1,  1,  1,   3, 0, 1]          lengths[f * B + b]
    offsets  = [ 0,  1,  2,  3,  6, 6, 7]      derived: cumsum with a leading 0

so bag ``(f, b)`` is ``values[offsets[f*B + b] : offsets[f*B + b + 1]]``.
"""
import numpy as np


class JaggedFeature:
    """The bags of one feature: ``values`` and ``offsets`` (B + 1 entries, from 0).

    Attributes:
        name: feature name.
        values: int64[n] ids of this feature, bag after bag.
        lengths: int64[B] bag lengths.
        offsets: int64[B + 1] bag boundaries into ``values`` (starting at 0).
    """

    __slots__ = ("name", "values", "lengths", "offsets")

    def __init__(self, name, values, lengths, offsets):
        self.name, self.values, self.lengths, self.offsets = name, values, lengths, offsets

    def __len__(self):
        return self.lengths.shape[0]

    def __repr__(self):
        return f"JaggedFeature({self.name!r}, batch={len(self)}, ids={self.values.shape[0]})"


def _int64_1d(name, a):
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"JaggedBatch: {name} must be 1-D, got shape {list(a.shape)}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"JaggedBatch: {name} must hold integers, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


class JaggedBatch:
    """Sparse ids of a batch for several features (see the module docstring for the layout).

    Args:
        features: distinct feature names, in the order their bags appear in ``values``.
        values: int64[total] ids.
        lengths: int64[F * B] bag lengths, feature-major (``lengths[f * B + b]``).

    Raises:
        ValueError: duplicate feature names, negative lengths, ``lengths`` not a
            multiple of the number of features, or lengths not summing to ``len(values)``.
    """

    def __init__(self, features, values, lengths):
        features = [str(f) for f in features]
        dup = sorted({f for f in features if features.count(f) > 1})
        if dup:
            raise ValueError(f"JaggedBatch: duplicate feature names {dup}")
        values = _int64_1d("values", values)
        lengths = _int64_1d("lengths", lengths)
        nf = len(features)
        if nf == 0:
            if lengths.size or values.size:
                raise ValueError(f"JaggedBatch: no features but {lengths.size} lengths and "
                                 f"{values.size} values")
            batch = 0
        elif lengths.size % nf:
            raise ValueError(f"JaggedBatch: {lengths.size} lengths is not a multiple of the "
                             f"{nf} features {features}")
        else:
            batch = lengths.size // nf
        neg = np.flatnonzero(lengths < 0)
        if neg.size:
            i = int(neg[0])
            raise ValueError(f"JaggedBatch: negative length {int(lengths[i])} for feature "
                             f"{features[i // batch]!r}, sample {i % batch} "
                             f"({neg.size} negative lengths in all)")
        total = int(lengths.sum())
        if total != values.size:
            raise ValueError(f"JaggedBatch: lengths sum to {total} but there are "
                             f"{values.size} values")
        self._features = features
        self._index = {f: i for i, f in enumerate(features)}
        self.values = values
        self.lengths = lengths
        self.batch_size = batch
        self._offsets = None
        self._feature_offsets = None

    @classmethod
    def from_dict(cls, bags):
        """Build from ``{feature: list of per-sample id lists}`` (all features the same length)."""
        features = list(bags)
        sizes = {f: len(bags[f]) for f in features}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"JaggedBatch.from_dict: features disagree on the batch size {sizes}")
        lengths = [len(bag) for f in features for bag in bags[f]]
        values = [v for f in features for bag in bags[f] for v in bag]
        return cls(features, np.asarray(values, dtype=np.int64),
                   np.asarray(lengths, dtype=np.int64))

    @classmethod
    def one_hot(cls, features, ids):
        """Build from ``ids`` int64[B, F] (one id per feature and sample)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != len(features):
            raise ValueError(f"JaggedBatch.one_hot: ids must be [B, {len(features)}], got "
                             f"shape {list(ids.shape)}")
        return cls(features, np.ascontiguousarray(ids.T).ravel(),
                   np.ones(ids.size, dtype=np.int64))

    @property
    def features(self):
        """Feature names, in layout order."""
        return list(self._features)

    @property
    def num_features(self):
        return len(self._features)

    @property
    def offsets(self):
        """int64[F * B + 1] bag boundaries into ``values`` (derived once, cached)."""
        if self._offsets is None:
            off = np.zeros(self.lengths.size + 1, dtype=np.int64)
            np.cumsum(self.lengths, out=off[1:])
            self._offsets = off
        return self._offsets

    @property
    def feature_offsets(self):
        """int64[F + 1]: feature f's ids are ``values[feature_offsets[f]:feature_offsets[f+1]]``."""
        if self._feature_offsets is None:
            self._feature_offsets = np.ascontiguousarray(self.offsets[::max(self.batch_size, 1)]
                                                         if self.batch_size else
                                                         np.zeros(self.num_features + 1,
                                                                  dtype=np.int64))
        return self._feature_offsets

    def check_features(self, names):
        """Raise ``ValueError`` naming every name in ``names`` that is not a feature here."""
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise ValueError(f"JaggedBatch: unknown feature names {unknown}; the batch has "
                             f"{self._features}")

    def feature(self, name):
        """The bags of feature ``name`` as a ``JaggedFeature`` (views, no copies)."""
        self.check_features([name])
        f, b = self._index[name], self.batch_size
        lo, hi = self.feature_offsets[f], self.feature_offsets[f + 1]
        offsets = self.offsets[f * b:(f + 1) * b + 1] - lo
        return JaggedFeature(name, self.values[lo:hi], self.lengths[f * b:(f + 1) * b], offsets)

    __getitem__ = feature

    def select(self, names):
        """A new batch with only the features ``names``, in that order."""
        names = [str(n) for n in names]
        self.check_features(names)
        parts = [self.feature(n) for n in names]
        values = np.concatenate([p.values for p in parts]) if parts else np.zeros(0, np.int64)
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        out = JaggedBatch(names, values, lengths)
        if not parts:
            out.batch_size = self.batch_size
        return out

    def slice_samples(self, start, stop):
        """A new batch with samples ``[start, stop)`` of every feature."""
        b = self.batch_size
        if not 0 <= start <= stop <= b:
            raise ValueError(f"JaggedBatch.slice_samples: [{start}, {stop}) is not inside "
                             f"[0, {b}]")
        lengths, values = [], []
        for f in range(self.num_features):
            lo, hi = self.offsets[f * b + start], self.offsets[f * b + stop]
            values.append(self.values[lo:hi])
            lengths.append(self.lengths[f * b + start:f * b + stop])
        if not self._features:
            return JaggedBatch([], [], [])
        return JaggedBatch(self._features, np.concatenate(values), np.concatenate(lengths))

    def to_dict(self):
        """``{feature: list of per-sample id lists}`` (the inverse of ``from_dict``)."""
        out = {}
        for name in self._features:
            f = self.feature(name)
            out[name] = [f.values[f.offsets[i]:f.offsets[i + 1]].tolist() for i in range(len(f))]
        return out

    def __len__(self):
        return self.batch_size

    def __repr__(self):
        return (f"JaggedBatch(features={self._features}, batch={self.batch_size}, "
                f"ids={self.values.size})")
