"""Synthetic CTR data: Zipf-distributed ids and labels from a planted logistic model.

Every random number is a counter-based hash, so sample ``i`` is the same
whoever generates it: any world size, batch size, resume point or order. With
``mix_add(h, x) = splitmix64_finaliser(h + x * 0x9E3779B97F4A7C15)`` (mod 2^64)
and ``unit(h) = (h >> 11) / 2^53``::

    S        = mix_add(mix_add(K, seed), 0)                 K = 0x243F6A8885A308D3
    base_i   = mix_add(mix_add(S, split), i)                split: train 1, eval 2
    dense[k] = Box-Muller(unit(mix_add(mix_add(base_i, 1), k)),
                          unit(mix_add(mix_add(base_i, 1), k + 2^32)))      ~ N(0, 1)
    len_f    = bag_size_min_f + floor(unit(mix_add(mix_add(mix_add(base_i, 2), f), 0)) * range)
    id j     = Zipf_f(unit(mix_add(mix_add(mix_add(base_i, 3), f), j)))  in [0, vocab_f)
    u_f(id)  = (2 unit(mix_add(mix_add(mix_add(S, 6), f), id)) - 1) sqrt(3)   (unit variance)
    w_k      = normal from mix_add(mix_add(S, 5), k) and (..., k + 2^32), then w /= |w|
    logit    = bias + signal * (z_dense + z_sparse) / sqrt(number of parts present)
      z_dense  = dense . w                                            ~ N(0, 1)
      z_sparse = sum_f (sum_{id in bag_f} u_f(id) / sqrt(max(len_f, 1))) / sqrt(F)
      bias     = logit(positive_rate) * sqrt(1 + pi signal^2 / 8)   (mean label ~ positive_rate)
    label    = 1 if unit(mix_add(mix_add(base_i, 4), 0)) < sigmoid(logit) else 0

Zipf(s) gives id ``k - 1`` probability proportional to ``k^-s`` (id 0 is the hottest).
The planted weights depend on the seed only, so train and eval share one model.
"""
import math

import numpy as np

from hpctrain._kernels import data_synth
from hpctrain.data.batch import Rows

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_K0 = np.uint64(0x243F6A8885A308D3)
_SPLITS = {"train": 1, "eval": 2}
T_DENSE, T_LEN, T_ID, T_LABEL, T_W, T_U = range(1, 7)
ZIPF_HEAD = 1 << 16
ZIPF_TAIL_GUIDE = 1 << 16
_tables = {}
_tails = {}
_HI = 1 << 32


def mix64(z):
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):    # wrapping is intended; 0-d arrays would warn
        z = (z ^ (z >> _S30)) * _C1
        z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def mix_add(h, x):
    """``mix64(h + x * golden)`` element-wise (broadcasting)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(h, dtype=np.uint64) + np.asarray(x, dtype=np.uint64) * _GOLDEN)


def unit(h):
    """A float64 in [0, 1) from the top 53 bits of each uint64."""
    return (np.asarray(h, dtype=np.uint64) >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def normal(h1, h2):
    """Standard normals from two uint64 hash arrays (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-unit(h1))) * np.cos(2.0 * math.pi * unit(h2))


def zipf_tables(vocab, s):
    """The Zipf sampler's tables ``(head, guide)`` (cached per (vocab, s)).

    ``head = H(1..a)``, the exact partial sums of ``k^-s`` up to ``a = min(vocab, 2^16)``;
    ``guide[j]`` is the first index with ``head[i] >= j * H(vocab) / 2^16``, capped at a.
    """
    key = (int(vocab), float(s))
    t = _tables.get(key)
    if t is None:
        head = np.cumsum(np.arange(1, min(vocab, ZIPF_HEAD) + 1, dtype=np.float64) ** -s)
        total = data_synth.zipf_total(vocab, s, head)
        ng = ZIPF_HEAD
        guide = np.searchsorted(head, np.arange(ng + 1) * (total / ng), side="left")
        guide = np.minimum(guide, head.shape[0]).astype(np.int64)
        data_synth.check_tables(vocab, s, head, guide)
        head.setflags(write=False)      # checked once: fetch skips the checks
        guide.setflags(write=False)
        t = _tables[key] = (head, guide)
    return t


def zipf_tail(vocab, s):
    """The Zipf sampler's tail guide (``data_synth.zipf_tail_guide``, cached per (vocab, s)):
    the same ids as without it, drawn with two evaluations of H instead of about eight."""
    key = (int(vocab), float(s))
    t = _tails.get(key)
    if t is None:
        head, guide = zipf_tables(vocab, s)
        t = data_synth.zipf_tail_guide(vocab, s, head, ZIPF_TAIL_GUIDE)
        if t.shape[0]:
            data_synth.check_tables(vocab, s, head, guide, t)
        t.setflags(write=False)         # checked once: fetch skips the checks
        _tails[key] = t
    return t if t.shape[0] else None


class SyntheticDataset:
    """Random-access synthetic samples of one split.

    Args:
        cfg: a ``SyntheticConfig``.
        seed: the data seed.
        split: "train" or "eval".
        num_samples: samples in the split, or None for an endless stream.
    """

    random_access = True

    def __init__(self, cfg, seed, split, num_samples):
        self.cfg = cfg
        self.features = tuple(cfg.features)
        self.num_dense = cfg.num_dense
        self.dense_names = tuple(f"I{k}" for k in range(1, cfg.num_dense + 1))
        self.num_samples = num_samples
        self.S = mix_add(mix_add(_K0, np.uint64(seed)), 0)
        self.split_key = mix_add(self.S, _SPLITS[split])
        p, sig = cfg.positive_rate, cfg.signal
        self.bias = math.log(p / (1.0 - p)) * math.sqrt(1.0 + math.pi * sig ** 2 / 8.0)
        k = np.arange(cfg.num_dense, dtype=np.uint64)
        wk = mix_add(self.S, T_W)
        w = normal(mix_add(wk, k), mix_add(wk, k + np.uint64(_HI)))
        self.w = w / max(float(np.linalg.norm(w)), 1e-12)
        self.zipf = [zipf_tables(v, cfg.zipf) for v in cfg.vocab]
        self.zipf_tail = [zipf_tail(v, cfg.zipf) for v in cfg.vocab]
        self.weight_keys = [int(mix_add(mix_add(self.S, T_U), f)) for f in range(len(cfg.vocab))]

    def planted_weight(self, f, ids):
        """``u_f(id)`` of the planted model for feature index ``f``."""
        ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
        h = mix_add(np.uint64(self.weight_keys[f]), ids)
        return (2.0 * unit(h) - 1.0) * math.sqrt(3.0)

    def planted_logits(self, rows):
        """The planted model's logits of ``rows`` (NumPy, from the rows' dense and ids)."""
        n, nf = len(rows), len(self.features)
        starts = np.concatenate(([0], np.cumsum(rows.lengths.reshape(-1))))
        scores = np.zeros((nf, n))
        for f in range(nf):
            lens = rows.lengths[f]
            contrib = self.planted_weight(f, rows.values[starts[f * n]:starts[(f + 1) * n]])
            sums = np.bincount(np.repeat(np.arange(n), lens), weights=contrib, minlength=n)
            scores[f] = sums / np.sqrt(np.maximum(lens, 1))
        return self._logits(rows.dense.astype(np.float64), scores)

    def _logits(self, dense, scores):
        parts = []
        if self.num_dense:
            parts.append(dense @ self.w)
        if scores.shape[0]:
            parts.append(scores.sum(axis=0) / math.sqrt(scores.shape[0]))
        z = sum(parts) / math.sqrt(len(parts)) if parts else np.zeros(dense.shape[0])
        return self.bias + self.cfg.signal * z

    def fetch(self, positions):
        """The samples at split positions ``positions`` (any order), as ``Rows``."""
        pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
        n, cfg, nf = pos.shape[0], self.cfg, len(self.features)
        base = mix_add(self.split_key, pos)
        if self.num_dense:
            k = np.arange(self.num_dense, dtype=np.uint64)[None, :]
            dk = mix_add(base, T_DENSE)[:, None]
            dense = normal(mix_add(dk, k), mix_add(dk, k + np.uint64(_HI)))
        else:
            dense = np.zeros((n, 0))
        lengths, scores = np.empty((nf, n), dtype=np.int64), np.empty((nf, n))
        len_key, id_key = mix_add(base, T_LEN), mix_add(base, T_ID)
        for f in range(nf):
            lo, hi = cfg.bag_size_min[f], cfg.bag_size[f]
            if lo == hi:
                lengths[f] = hi
            else:
                u = unit(mix_add(mix_add(len_key, f), 0))
                lengths[f] = lo + np.floor(u * (hi - lo + 1)).astype(np.int64)
        # every feature's ids written in place into one array (no concatenation)
        ends = np.cumsum(lengths.sum(axis=1)).tolist()
        values = np.empty(ends[-1] if ends else 0, dtype=np.int64)
        for f, (a, b) in enumerate(zip([0, *ends[:-1]], ends)):
            head, guide = self.zipf[f]
            data_synth.bags(mix_add(id_key, f), lengths[f], cfg.vocab[f], cfg.zipf, head, guide,
                            self.weight_keys[f], values[a:b], scores[f], self.zipf_tail[f],
                            checked=True)
        logits = self._logits(dense.astype(np.float32).astype(np.float64), scores)
        label_u = unit(mix_add(mix_add(base, T_LABEL), 0))
        labels = label_u < 1.0 / (1.0 + np.exp(-logits))
        return Rows(labels, dense, values, lengths)
