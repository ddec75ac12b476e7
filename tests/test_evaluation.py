import itertools

import numpy as np
import pytest

from hpctrain.train.evaluation import accuracy, evaluate_arrays, logloss, roc_auc


def _pairwise_auc(y, s):
    pos = s[y > 0.5]
    neg = s[y <= 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300).astype(np.float32)
    s = np.round(rng.normal(size=300) + y, 1)      # rounding creates many ties
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))


def test_logloss_and_accuracy_match_naive_formulas():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 1000).astype(np.float64)
    z = rng.normal(scale=3, size=1000)
    p = 1 / (1 + np.exp(-z))
    naive = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, z) == pytest.approx(naive, rel=1e-9)
    assert accuracy(y, z) == pytest.approx(np.mean((p > 0.5) == (y > 0.5)))


def test_distributed_metrics_on_one_rank_equal_the_array_ones():
    from hpctrain.comm import create_communicator
    from hpctrain.train.evaluation import evaluate_distributed
    rng = np.random.default_rng(3)
    z = np.round(rng.normal(size=1000) * 4) / 4
    y = (rng.random(1000) < 0.3).astype(float)
    got = evaluate_distributed(create_communicator("null"), y, z)
    ref = evaluate_arrays(y, z)
    assert got["auc"] == ref["auc"] and got["count"] == 1000
    assert got["logloss"] == pytest.approx(ref["logloss"], rel=1e-12)
    assert np.isnan(evaluate_distributed(create_communicator("null"), y[:0], z[:0])["auc"])
