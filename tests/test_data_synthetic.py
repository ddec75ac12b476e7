"""Synthetic data: determinism, NumPy references of the kernels, Zipf shape, learnable labels."""
import math

import numpy as np
import pytest

from data_helpers import data_config, samples
from hpctrain.data import make_reader
from hpctrain.data.sources import open_dataset
from hpctrain.data.synthetic import T_ID, T_LABEL, T_LEN, mix_add, unit, zipf_tables
from hpctrain._kernels import data_synth


def syn_cfg(seed=None, **syn):
    s = {"num_features": 3, "num_dense": 4, "vocab": [100, 5000, 10 ** 7], "zipf": 1.05,
         "bag_size": [1, 5, 3], "bag_size_min": [1, 0, 3], "positive_rate": 0.3, "signal": 3.0}
    s.update(syn)
    data = {"format": "synthetic", "synthetic": s, "train": {"num_samples": 100000},
            "eval": {"num_samples": 5000}}
    if seed is not None:
        data["seed"] = seed
    nf = len(s["features"]) if "features" in s else s["num_features"]
    return data_config(data, [f"C{i}" for i in range(1, nf + 1)] if "features" not in s
                       else s["features"])


def as_list(rows, features=("C1", "C2", "C3")):
    return samples(rows.to_batch(features))


def test_deterministic_by_seed_and_split():
    cfg = syn_cfg()
    a = open_dataset(cfg, "train", seed=1).fetch(np.arange(50))
    b = open_dataset(cfg, "train", seed=1).fetch(np.arange(50))
    assert as_list(a) == as_list(b)
    assert as_list(open_dataset(cfg, "train", seed=2).fetch(np.arange(50))) != as_list(a)
    assert as_list(open_dataset(cfg, "eval", seed=1).fetch(np.arange(50))) != as_list(a)
    # data.seed overrides the run seed
    c = open_dataset(syn_cfg(seed=1), "train", seed=99).fetch(np.arange(50))
    assert as_list(c) == as_list(a)


def test_a_sample_does_not_depend_on_who_reads_it():
    ds = open_dataset(syn_cfg(), "train", seed=0)
    whole = as_list(ds.fetch(np.arange(200)))
    pos = np.array([150, 3, 77, 199, 0])
    assert as_list(ds.fetch(pos)) == [whole[i] for i in pos]


def zipf_reference(u, vocab, s):
    """Exact inverse CDF of Zipf(s) over ranks 1..vocab (id = rank - 1)."""
    h = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -s)
    return np.searchsorted(h, u * h[-1], side="left")


@pytest.mark.parametrize("vocab,s", [(1, 1.0), (100, 1.05), (70000, 1.05), (200000, 1.0),
                                     (300000, 0.5), (5000, 0.0), (100000, 2.5)])
def test_zipf_kernel_matches_exact_inverse_cdf(vocab, s):
    u = np.random.default_rng(vocab).random(100000)
    head, guide = zipf_tables(vocab, s)
    out = np.empty(u.shape[0], dtype=np.int64)
    data_synth.zipf_ids(u, vocab, s, head, guide, out)
    np.testing.assert_array_equal(out, zipf_reference(u, vocab, s))


def test_ids_lengths_and_labels_match_numpy_reference():
    cfg = syn_cfg()
    ds = open_dataset(cfg, "train", seed=5)
    pos = np.arange(1000, 1400)
    rows = ds.fetch(pos)
    syn = cfg.synthetic
    base = mix_add(ds.split_key, pos.astype(np.uint64))
    start = 0
    for f in range(3):
        lo, hi = syn.bag_size_min[f], syn.bag_size[f]
        lens = (np.full(400, hi) if lo == hi else
                lo + np.floor(unit(mix_add(mix_add(mix_add(base, T_LEN), f), 0)) * (hi - lo + 1)))
        np.testing.assert_array_equal(rows.lengths[f], lens)
        key = mix_add(mix_add(base, T_ID), f)
        owner = np.repeat(np.arange(400), rows.lengths[f])
        slot = np.arange(owner.shape[0]) - np.repeat(np.cumsum(rows.lengths[f]) - rows.lengths[f],
                                                     rows.lengths[f])
        u = unit(mix_add(key[owner], slot.astype(np.uint64)))
        ref = zipf_reference(u, syn.vocab[f], syn.zipf) if syn.vocab[f] < 10 ** 6 else None
        got = rows.values[start:start + owner.shape[0]]
        if ref is not None:
            np.testing.assert_array_equal(got, ref)
        assert got.min() >= 0 and got.max() < syn.vocab[f]
        start += owner.shape[0]
    p = 1 / (1 + np.exp(-ds.planted_logits(rows)))
    ref_labels = unit(mix_add(mix_add(base, T_LABEL), 0)) < p
    np.testing.assert_array_equal(rows.labels, ref_labels)


def test_bag_sizes():
    ds = open_dataset(syn_cfg(), "train", seed=0)
    rows = ds.fetch(np.arange(3000))
    assert (rows.lengths[0] == 1).all() and (rows.lengths[2] == 3).all()
    assert set(np.unique(rows.lengths[1])) == {0, 1, 2, 3, 4, 5}
    assert abs(rows.lengths[1].mean() - 2.5) < 0.15


def test_zipf_shape():
    cfg = syn_cfg(num_features=1, vocab=1000, bag_size=20, bag_size_min=20, zipf=1.05)
    ds = open_dataset(cfg, "train", seed=0)
    ids = ds.fetch(np.arange(20000)).values            # 400,000 draws
    counts = np.bincount(ids, minlength=1000)
    expected = np.arange(1, 1001) ** -1.05
    expected *= ids.shape[0] / expected.sum()
    np.testing.assert_allclose(counts[:10], expected[:10], rtol=0.03)
    # log-log slope over ranks 1..100 is -s
    slope = np.polyfit(np.log(np.arange(1, 101)), np.log(counts[:100]), 1)[0]
    assert abs(slope + 1.05) < 0.05


def auc(scores, labels):
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def logloss(p, y):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_labels_follow_the_planted_model_so_loss_can_fall():
    cfg = syn_cfg()
    ds = open_dataset(cfg, "train", seed=0)
    rows = ds.fetch(np.arange(20000))
    y = rows.labels.astype(np.float64)
    assert abs(y.mean() - 0.3) < 0.03                 # close to positive_rate
    logits = ds.planted_logits(rows)
    assert auc(logits, y) > 0.8
    base = logloss(np.full_like(y, y.mean()), y)
    assert logloss(1 / (1 + np.exp(-logits)), y) < base - 0.1
    # a model fitted on train (logistic regression on dense + per-id weights of the
    # one-hot feature C1, whose ids come first in values) beats the base rate on eval
    ev = open_dataset(cfg, "eval", seed=0).fetch(np.arange(5000))
    wd, wid, bias = np.zeros(4), np.zeros(100), 0.0

    def predict(r):
        z = (r.dense * wd).sum(axis=1) + wid[r.values[:len(r)]] + bias
        return 1 / (1 + np.exp(-z))
    for _ in range(200):      # plain gradient descent, no BLAS (fast on a busy machine)
        g = predict(rows) - y
        wd -= (rows.dense * g[:, None]).mean(axis=0)
        wid -= 20 * np.bincount(rows.values[:len(rows)], weights=g, minlength=100) / len(y)
        bias -= g.mean()
    ye = ev.labels.astype(np.float64)
    assert logloss(predict(ev), ye) < logloss(np.full_like(ye, y.mean()), ye) - 0.03


def test_reader_over_endless_split():
    cfg = data_config({"format": "synthetic", "synthetic": {"num_features": 2, "num_dense": 0},
                       "train": {}}, ["C1", "C2"], model={"kind": "deepfm"})
    with make_reader(cfg, "train", 1, 2, 10, 0) as r:
        batches = [next(r) for _ in range(3)]
    assert [b.offset for b in batches] == [5, 5, 5] and batches[2].index == 2
    assert r.num_samples is None and r.batches_per_epoch is None
    assert batches[0].dense.shape == (5, 0) and math.isclose(batches[0].global_size, 10)
