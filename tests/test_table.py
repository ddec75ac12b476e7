"""EmbeddingTable: lookups, init formula, gather, export/import, growth, memory, bad input."""
import numpy as np
import pytest

from hpctrain._kernels import table as kernel
from hpctrain.errors import ConfigError, NonFiniteError
from hpctrain.sparse.init import reference_init
from hpctrain.sparse.optimizers import SparseOptimizer
from hpctrain.sparse.table import EmbeddingTable

EXTREME = np.array([0, -1, 1, 2**63 - 1, -2**63, 12345, -98765], dtype=np.int64)


def rand_keys(rng, n):
    return rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64, endpoint=True)


def unique_keys(rng, n):
    k = np.unique(rand_keys(rng, n + 16))
    return rng.permutation(k)[:n]


def test_every_int64_is_a_key():
    t = EmbeddingTable("t", 4, "sgd")
    assert (t.find(EXTREME) == -1).all()
    rows = t.find_or_insert(EXTREME, step=0)
    assert sorted(rows.tolist()) == list(range(len(EXTREME)))
    assert (t.find(EXTREME) == rows).all()
    assert len(t) == len(EXTREME)
    np.testing.assert_array_equal(t.export()["keys"], EXTREME)


def test_find_matches_dict_after_growth():
    rng = np.random.default_rng(1)
    t = EmbeddingTable("t", 8, "adagrad", capacity=4)
    model = {}
    for step in range(6):
        keys = unique_keys(rng, 3000)
        keys[:500] = list(model)[:500] if model else keys[:500]
        keys = np.unique(keys)
        rows = t.find_or_insert(keys, step)
        for k, r in zip(keys.tolist(), rows.tolist()):
            assert model.setdefault(k, r) == r
    assert len(t) == len(model)
    probe = np.concatenate([np.fromiter(model, np.int64), rand_keys(rng, 1000)])
    want = np.array([model.get(k, -1) for k in probe.tolist()])
    np.testing.assert_array_equal(t.find(probe), want)
    kernel.check_invariants(t._core)


def test_initial_rows_follow_reference_formula():
    rng = np.random.default_rng(2)
    keys = np.concatenate([EXTREME, unique_keys(rng, 200)])
    for init, scale in (("uniform", None), ("uniform", 0.05), ("normal", 0.3)):
        t = EmbeddingTable("t", 24, "sgd", table_id=7, seed=99, init=init, init_scale=scale)
        got = t.gather(t.find_or_insert(keys, 0))
        want = reference_init(keys, 24, seed=99, table_id=7, init=init, scale=scale)
        if init == "uniform":
            np.testing.assert_array_equal(got, want)
            bound = scale if scale else 1 / np.sqrt(24)
            assert np.abs(got).max() <= bound
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_init_is_independent_of_order_shard_and_table():
    keys = np.arange(-50, 50, dtype=np.int64)
    a = EmbeddingTable("a", 8, "sgd", seed=5, table_id=3)
    b = EmbeddingTable("b", 8, "adam", seed=5, table_id=3)
    ra = a.gather(a.find_or_insert(keys, 0))
    rb = b.gather(b.find_or_insert(keys[::-1], 0))[::-1]
    np.testing.assert_array_equal(ra, rb)
    c = EmbeddingTable("c", 8, "sgd", seed=5, table_id=4)
    d = EmbeddingTable("d", 8, "sgd", seed=6, table_id=3)
    for other in (c, d):
        assert not np.array_equal(ra, other.gather(other.find_or_insert(keys, 0)))
    u = reference_init(np.arange(20000, dtype=np.int64), 16, init="normal", scale=1.0)
    assert abs(u.mean()) < 0.01 and abs(u.std() - 1) < 0.01


def test_kernel_init_matches_reference_uniform_bits():
    keys = np.array([3, -3, 2**62], dtype=np.int64)
    got = kernel.init_rows_reference(keys, 5, 2**64 - 1, 17, False, 0.5)
    np.testing.assert_array_equal(got, reference_init(keys, 5, seed=-1, table_id=17, scale=0.5))


def test_gather_and_out():
    t = EmbeddingTable("t", 16, "sgd")
    rows = t.find_or_insert(np.array([10, 20, 30], dtype=np.int64), 0)
    idx = np.array([rows[2], -1, rows[0], rows[2]])
    g = t.gather(idx)
    full = t.export()["values"]
    np.testing.assert_array_equal(g[0], full[2])
    np.testing.assert_array_equal(g[1], 0)
    np.testing.assert_array_equal(g[3], full[2])
    out = np.full((4, 16), 7, dtype=np.float32)
    assert t.gather(idx, out=out) is out
    np.testing.assert_array_equal(out, g)
    assert t.gather(np.empty(0, dtype=np.int64)).shape == (0, 16)


def test_gather_large_batch_parallel_matches_numpy_take():
    rng = np.random.default_rng(3)
    t = EmbeddingTable("t", 32, "adagrad")
    keys = unique_keys(rng, 5000)
    rows = t.find_or_insert(keys, 0)
    idx = rng.choice(rows, size=20000)
    idx[::7] = -1
    vals = t.export()["values"]
    want = np.where((idx >= 0)[:, None], vals[np.maximum(idx, 0)], 0)
    np.testing.assert_array_equal(t.gather(idx), want)


@pytest.mark.parametrize("row_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_gather_into_flat_buffer_equals_gather_then_scatter(row_dtype, n_threads):
    """gather_into writes row i (of indices[select[i]]) at out[out_off[i]:][:dim], every
    other float untouched: the bits of gather() placed there, any row dtype, any threads."""
    from hpctrain._kernels import _openmp
    rng = np.random.default_rng(9)
    dim = 12
    t = EmbeddingTable("t", dim, "adagrad", row_dtype=row_dtype)
    rows = t.find_or_insert(unique_keys(rng, 3000), 0)
    idx = rng.choice(rows, size=2500)
    idx[::11] = -1
    select = rng.integers(0, idx.shape[0], size=4000)
    out_off = (rng.permutation(5000)[:4000] * dim + 3).astype(np.int64)
    old_n, old_min = _openmp.get_num_threads(), kernel.parallel_threshold()
    try:
        _openmp.set_num_threads(n_threads)
        kernel.set_parallel_threshold(1)
        for sel in (select, None):
            offs = out_off if sel is not None else out_off[:idx.shape[0]]
            want_rows = t.gather(idx if sel is None else idx[sel])
            out = np.full(5000 * dim + 3, -7.0, np.float32)
            assert t.gather_into(idx, out, offs, select=sel) is out
            want = np.full_like(out, -7.0)
            want[offs[:, None] + np.arange(dim)] = want_rows
            np.testing.assert_array_equal(out, want)
    finally:
        _openmp.set_num_threads(old_n)
        kernel.set_parallel_threshold(old_min)


def test_gather_into_names_bad_input():
    t = EmbeddingTable("t", 4, "sgd")
    rows = t.find_or_insert(np.array([1, 2], dtype=np.int64), 0)
    out = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match=r"out_off\[1\] = 13 with dim 4 is outside a buffer of 16"):
        t.gather_into(rows, out, np.array([0, 13]))
    with pytest.raises(ValueError, match=r"select\[1\] = 2 is outside \[0, 2\)"):
        t.gather_into(rows, out, np.array([0, 4]), select=np.array([0, 2]))
    with pytest.raises(ValueError, match="out_off has 1 entries, indices 2"):
        t.gather_into(rows, out, np.array([0]))
    with pytest.raises(TypeError, match="1-D float32"):
        t.gather_into(rows, np.zeros((4, 4), np.float32), np.array([0, 4]))
    with pytest.raises(IndexError, match=r"indices\[1\] = 99"):
        t.gather_into(np.array([rows[0], 99]), out, np.array([0, 4]))


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_apply_gradients_matches_reference(kind):
    from hpctrain.sparse.optimizers import reference_update
    rng = np.random.default_rng(4)
    opt = SparseOptimizer(kind=kind, lr=0.05, initial_accumulator=0.1)
    t = EmbeddingTable("t", 16, opt)
    rows = t.find_or_insert(unique_keys(rng, 3000), 0)
    for step in range(1, 4):
        sel = rng.choice(rows, size=1500, replace=False)
        grads = rng.standard_normal((1500, 16)).astype(np.float32)
        before = t.export()
        w0, s0 = before["values"][sel], {k: v[sel] for k, v in before["slots"].items()}
        t.apply_gradients(sel, grads, step)
        w1, s1, _ = reference_update(opt, w0, s0, grads)
        after = t.export()
        np.testing.assert_allclose(after["values"][sel], w1, rtol=1e-6, atol=1e-7)
        for k in s1:
            np.testing.assert_allclose(after["slots"][k][sel], s1[k], rtol=1e-6, atol=1e-7)
        assert (after["last_step"][sel] == step).all()
        untouched = np.setdiff1d(rows, sel)
        np.testing.assert_array_equal(after["values"][untouched], before["values"][untouched])


def test_apply_skips_minus_one_and_counts_access():
    t = EmbeddingTable("t", 4, "sgd")
    keys = np.array([1, 2, 3], dtype=np.int64)
    rows = t.find_or_insert(keys, 0)
    t.find_or_insert(keys[:2], 1)
    t.find_or_insert(np.array([1, 1], dtype=np.int64), 2)
    before = t.export()
    t.apply_gradients(np.array([-1, rows[1]]), np.ones((2, 4), np.float32), 5)
    after = t.export()
    np.testing.assert_array_equal(after["access_count"], [4, 2, 1])
    np.testing.assert_array_equal(after["last_step"], [0, 5, 0])
    np.testing.assert_allclose(after["values"][1], before["values"][1] - 0.01, rtol=1e-6)
    np.testing.assert_array_equal(after["values"][[0, 2]], before["values"][[0, 2]])


def test_export_import_round_trip_exact():
    rng = np.random.default_rng(5)
    for kind in ("adagrad", "adam", "ftrl", "rowwise_adagrad", "sgd"):
        t = EmbeddingTable("t", 8, kind, seed=3)
        rows = t.find_or_insert(unique_keys(rng, 2000), 0)
        t.apply_gradients(rows[:1000], rng.standard_normal((1000, 8)).astype(np.float32), 3)
        state = t.export()
        u = EmbeddingTable("u", 8, kind, seed=3)
        u.import_(state)
        back = u.export()
        _assert_state_equal(state, back)
        # continuing training gives the same rows in both tables
        g = rng.standard_normal((500, 8)).astype(np.float32)
        t.apply_gradients(t.find(state["keys"][:500]), g, 4)
        u.apply_gradients(u.find(state["keys"][:500]), g, 4)
        _assert_state_equal(t.export(), u.export())


def test_import_filtered_concatenated_and_overwrite():
    rng = np.random.default_rng(6)
    a = EmbeddingTable("a", 4, "adagrad")
    b = EmbeddingTable("b", 4, "adagrad", seed=1)
    a.find_or_insert(np.arange(0, 100, dtype=np.int64), 0)
    b.find_or_insert(np.arange(100, 150, dtype=np.int64), 0)
    sa, sb = a.export(), b.export()
    keep = sa["keys"] % 2 == 0
    merged = _concat([_take(sa, keep), sb])
    c = EmbeddingTable("c", 4, "adagrad")
    c.import_(merged)
    assert len(c) == 100
    _assert_state_equal(c.export(), merged)
    newer = _take(sb, np.arange(10))
    newer["values"] = rng.standard_normal((10, 4)).astype(np.float32)
    c.import_(newer)
    assert len(c) == 100
    np.testing.assert_array_equal(c.gather(c.find(newer["keys"])), newer["values"])


@pytest.fixture
def one_thread():
    """Single-threaded kernels (for tests where threads do not matter, fast on a busy host)."""
    from hpctrain._kernels import _openmp
    before = _openmp.get_num_threads()
    _openmp.set_num_threads(1)
    yield
    _openmp.set_num_threads(before)


@pytest.mark.parametrize("dim", [16, 64])
def test_memory_per_row_within_bound_after_growth(dim, one_thread):
    """bytes per stored row <= 1.25 x (8 + 4 * floats per row) for every optimizer, checked
    after every batch once growth has settled (from 16384 rows on), across several growth
    steps of both the index and the row store."""
    from hpctrain.sparse.optimizers import KINDS
    rng = np.random.default_rng(7)
    for kind in KINDS:
        t = EmbeddingTable("t", dim, kind)
        worst = 0.0
        for step in range(40):
            t.find_or_insert(unique_keys(rng, 1500), step)
            m = t.memory_stats()
            if m["rows"] >= 16384:
                worst = max(worst, m["bytes_per_row"])
                assert m["bytes_per_row"] <= m["bound_bytes_per_row"], (dim, kind, m)
        assert m["rows"] == len(t) == 60000 and worst > 0
        assert m["bound_bytes_per_row"] == 1.25 * (8 + 4 * (dim + t.optimizer.slot_floats(dim)))
        assert m["bytes_meta"] == m["row_capacity"] * (8 + 8 * (kind == "adam"))
        assert m["row_capacity"] <= 1.02 * m["rows"] and 0.7 <= m["index_load"] <= 0.8


def test_duplicate_indices_rejected_in_debug_mode():
    t = EmbeddingTable("t", 4, "sgd", debug=True)
    rows = t.find_or_insert(np.arange(5, dtype=np.int64), 0)
    with pytest.raises(ValueError, match="unique.*index 2"):
        t.apply_gradients(np.array([rows[2], rows[1], rows[2]]), np.zeros((3, 4), np.float32), 1)
    t.apply_gradients(np.array([-1, -1, rows[0]]), np.zeros((3, 4), np.float32), 1)


def test_import_rejects_bad_state():
    t = EmbeddingTable("t", 4, "adagrad")
    t.find_or_insert(np.arange(4, dtype=np.int64), 0)
    s = t.export()
    u = EmbeddingTable("u", 4, "adagrad")
    with pytest.raises(ValueError, match="repeats key 1"):
        u.import_(_concat([s, _take(s, np.array([1]))]))
    with pytest.raises(ValueError, match="accumulator"):
        u.import_({k: v for k, v in s.items() if k != "slots"})
    with pytest.raises(ValueError, match="momentum"):
        EmbeddingTable("m", 4, "sgd").import_(EmbeddingTable("n", 4, "momentum").export()
                                                | {"slots": {"momentum": np.zeros((0, 4))}})
    with pytest.raises(ValueError, match=r"values.*\(4, 3\)"):
        u.import_(s | {"values": s["values"][:, :3]})
    assert len(u) == 0


def _take(state, sel):
    """Rows ``sel`` of an export; the pending admission group is kept whole."""
    out = {k: v[sel] for k, v in state.items() if isinstance(v, np.ndarray)}
    out["slots"] = {k: v[sel] for k, v in state["slots"].items()}
    out["admission"] = state["admission"]
    return out


def _concat(states):
    """Row-wise concatenation of exports (pending admission groups concatenated too)."""
    out = {k: np.concatenate([s[k] for s in states]) for k, v in states[0].items()
           if isinstance(v, np.ndarray)}
    for group in ("slots", "admission"):
        out[group] = {k: np.concatenate([s[group][k] for s in states])
                      for k in states[0][group]}
    return out


def _assert_state_equal(a, b, where="state"):
    assert set(a) == set(b), where
    for k in a:
        if isinstance(a[k], dict):
            _assert_state_equal(a[k], b[k], f"{where}[{k!r}]")
        elif isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{where}[{k!r}]")
            assert a[k].dtype == b[k].dtype, f"{where}[{k!r}]"
        else:
            assert a[k] == b[k], f"{where}[{k!r}]"


def test_core_is_built_from_named_parameters():
    t = EmbeddingTable("t", 8, {"kind": "adam", "lr": 0.01}, table_id=3, seed=-1,
                       init="normal", capacity=100,
                       admission={"min_count": 2, "counter": "bloom", "bloom_size": 64})
    p = t._core.params
    assert (p.dim, p.capacity, p.slot0_width, p.slot1_width, p.has_opt_step) == (8, 100, 8, 8, True)
    assert p.seed == 2**64 - 1 and p.table_id == 3 and p.init_normal and p.lr == 0.01
    assert (p.min_count, p.adm_kind, p.bloom_size) == (2, 2, 64)
    again = kernel.TableParams(**p.as_dict())
    assert again.as_dict() == p.as_dict() and "bloom_hashes=4" in repr(again)
    core = kernel.TableCore(again)
    assert (core.dim, core.w0, core.w1, core.adm_kind) == (8, 8, 8, 2)
    with pytest.raises(AttributeError):
        p.dim = 4                                   # read-only once made
    with pytest.raises(TypeError):
        kernel.TableParams(8, 100, 0, 0.1, init_scale=0.1)  # keywords only
    for bad in ({"dim": 0}, {"capacity": 2**31}, {"opt_kind": 7}, {"adm_kind": 3},
                {"slot0_width": -1}, {"min_count": 2, "adm_kind": 2, "bloom_size": 0}):
        with pytest.raises(ValueError):
            kernel.TableParams(**{"dim": 4, "capacity": 10, "opt_kind": 0, "lr": 0.1,
                                  "init_scale": 0.5, **bad})
    with pytest.raises(ValueError):                 # parameters that skipped their checks
        kernel.TableCore(kernel.TableParams.__new__(kernel.TableParams))
    with pytest.raises(TypeError):
        kernel.TableCore(None)
