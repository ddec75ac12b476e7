"""Fused sparse optimizers of EmbeddingTable against their NumPy textbook references."""
import dataclasses

import numpy as np
import pytest

from hpctrain._kernels import _openmp
from hpctrain.errors import ConfigError
from hpctrain.sparse.optimizers import KINDS, SparseOptimizer, reference_update
from hpctrain.sparse.table import EmbeddingTable

@pytest.fixture
def threads():
    """Set the OpenMP thread count for the test; restore it afterwards."""
    saved = _openmp.get_num_threads()
    yield _openmp.set_num_threads
    _openmp.set_num_threads(saved)


CASES = [
    SparseOptimizer("sgd", lr=0.1),
    SparseOptimizer("sgd", lr=0.1, weight_decay=0.01),
    SparseOptimizer("momentum", lr=0.05, momentum=0.9),
    SparseOptimizer("nesterov", lr=0.05, momentum=0.8, weight_decay=0.001),
    SparseOptimizer("adagrad", lr=0.1, initial_accumulator=0.1),
    SparseOptimizer("adagrad", lr=0.1, eps=1e-6, weight_decay=0.01),
    SparseOptimizer("rowwise_adagrad", lr=0.1),
    SparseOptimizer("rowwise_adagrad", lr=0.1, initial_accumulator=0.5, weight_decay=0.01),
    SparseOptimizer("adam", lr=0.01),
    SparseOptimizer("adam", lr=0.01, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.01),
    SparseOptimizer("ftrl", lr=0.1, l1=0.0, l2=0.0, initial_accumulator=0.1),
    SparseOptimizer("ftrl", lr=0.05, l1=0.5, l2=0.1, initial_accumulator=0.1),
    SparseOptimizer("ftrl", lr=0.05, l1=0.1, l2=1.0, lr_power=-0.7),
]


def _check_close(got, want):
    # <= 1e-6 relative; the absolute floor covers entries that cancel to ~0
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize("opt", CASES, ids=lambda o: f"{o.kind}-wd{o.weight_decay}-l1{o.l1}")
def test_fused_update_matches_reference_over_steps(opt):
    rng = np.random.default_rng(abs(hash(repr(opt))) % 2**32)
    dim = 24
    t = EmbeddingTable("t", dim, opt, seed=1)
    keys = rng.permutation(np.arange(-2000, 2000, dtype=np.int64))
    rows = t.find_or_insert(keys, 0)
    state = t.export()
    ref_w = state["values"].copy()
    ref_s = {k: v.copy() for k, v in state["slots"].items()}
    ref_t = state["opt_step"].copy()
    for step in range(1, 6):
        # a different random subset each step, so Adam rows have different step counts
        sel = np.sort(rng.choice(len(keys), size=int(rng.integers(500, 3000)), replace=False))
        grads = (rng.standard_normal((sel.size, dim)) * rng.uniform(0.1, 3)).astype(np.float32)
        t.apply_gradients(rows[sel], grads, step)
        w, s, tt = reference_update(opt, ref_w[sel], {k: v[sel] for k, v in ref_s.items()},
                                    grads, ref_t[sel])
        ref_w[sel] = w
        for k in s:
            ref_s[k][sel] = s[k]
        if opt.kind == "adam":
            ref_t[sel] = tt
        got = t.export()
        _check_close(got["values"], ref_w)
        for k in ref_s:
            _check_close(got["slots"][k], ref_s[k])
        np.testing.assert_array_equal(got["opt_step"], ref_t)
    if opt.kind == "adam":
        assert len(set(ref_t.tolist())) > 2  # rows really had different step counts
    if opt.kind == "ftrl" and opt.l1 > 0:
        assert (got["values"] == 0).any()  # L1 produced exact zeros


def test_lazy_adam_uses_each_rows_own_step_count():
    # a row updated for the first time at global step 10 gets the bias correction of t=1
    opt = SparseOptimizer("adam", lr=0.1)
    t = EmbeddingTable("t", 4, opt)
    rows = t.find_or_insert(np.array([1, 2], dtype=np.int64), 0)
    w0 = t.gather(rows)
    g = np.ones((1, 4), np.float32)
    for step in range(1, 10):
        t.apply_gradients(rows[:1], g, step)
    t.apply_gradients(rows[1:], g, 10)
    # first Adam step moves every coordinate by lr * g / (|g| + eps) = lr
    np.testing.assert_allclose(t.gather(rows[1:]), w0[1:] - 0.1, rtol=1e-5)
    np.testing.assert_array_equal(t.export()["opt_step"], [9, 1])


def test_sgd_by_hand():
    t = EmbeddingTable("t", 3, SparseOptimizer("sgd", lr=0.5))
    r = t.find_or_insert(np.array([7], dtype=np.int64), 0)
    w = t.gather(r)
    t.apply_gradients(r, np.array([[1, -2, 4]], np.float32), 1)
    np.testing.assert_allclose(t.gather(r), w - 0.5 * np.array([[1, -2, 4]]), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_update_is_thread_count_invariant(kind, threads):
    rng = np.random.default_rng(11)
    keys = rng.permutation(np.arange(6000, dtype=np.int64))
    grads = rng.standard_normal((6000, 16)).astype(np.float32)
    states = []
    for nt in (1, 2, 3):
        threads(nt)
        t = EmbeddingTable("t", 16, kind)
        rows = t.find_or_insert(keys, 0)
        for step in range(1, 3):
            t.apply_gradients(rows, grads, step)
        states.append(t.export())
    for s in states[1:]:
        for k in ("values", "access_count", "last_step", "opt_step"):
            np.testing.assert_array_equal(s[k], states[0][k])
        for k in s["slots"]:
            np.testing.assert_array_equal(s["slots"][k], states[0]["slots"][k])


def test_slots_and_initial_accumulator():
    assert SparseOptimizer("sgd").slot_specs(8) == []
    assert SparseOptimizer("adam").slot_specs(8) == [("exp_avg", 8, 0.0), ("exp_avg_sq", 8, 0.0)]
    assert SparseOptimizer("rowwise_adagrad", initial_accumulator=0.5).slot_specs(8) == \
        [("accumulator", 1, 0.5)]
    t = EmbeddingTable("t", 8, SparseOptimizer("ftrl", initial_accumulator=0.25))
    t.find_or_insert(np.arange(3, dtype=np.int64), 0)
    s = t.export()["slots"]
    assert (s["accumulator"] == 0.25).all() and (s["linear"] == 0).all()


@pytest.mark.parametrize("field,value", [
    ("kind", "rmsprop"), ("lr", 0.0), ("lr", float("nan")), ("momentum", 1.0), ("beta1", -0.1),
    ("beta2", 1.0), ("eps", 0.0), ("initial_accumulator", -1.0), ("l1", -1.0), ("l2", -0.5),
    ("lr_power", 0.5), ("weight_decay", -1e-3), ("lr", "0.1"), ("lr", True),
])
def test_optimizer_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "kind" else "kind"):
        dataclasses.replace(SparseOptimizer(), **{field: value})


def test_optimizer_from_any():
    assert SparseOptimizer.from_any("adam").kind == "adam"
    assert SparseOptimizer.from_any({"kind": "sgd", "lr": 1}).lr == 1.0
    o = SparseOptimizer("ftrl")
    assert SparseOptimizer.from_any(o) is o
    with pytest.raises(ConfigError):
        SparseOptimizer.from_any(3)
