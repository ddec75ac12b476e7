"""Reduced-precision (fp16, bf16) embedding rows: conversions against NumPy, stochastic
rounding, every optimizer's step against its NumPy reference with the same rounding,
export/import and checkpoints across row dtypes, bytes per row, and the config key."""
import numpy as np
import pytest

from hpctrain._kernels import _openmp
from hpctrain._kernels import table as kernel
from hpctrain.checkpoint import CheckpointError, CheckpointManager, export_model
from hpctrain.checkpoint import _validate
from hpctrain.checkpoint.model_file import read_model
from hpctrain.sparse import rowdtype
from hpctrain.sparse.optimizers import KINDS, SparseOptimizer, reference_update
from hpctrain.sparse.table import EmbeddingTable

REDUCED = ("fp16", "bf16")


@pytest.fixture(params=["f16c", "portable"])
def half_path(request):
    """Run with F16C (where the CPU has it) and with the portable conversions."""
    before = kernel.half_path() == "f16c"
    got = kernel.set_half_path(request.param == "f16c")
    if got != request.param:
        kernel.set_half_path(before)
        pytest.skip("this CPU has no F16C")
    yield got
    kernel.set_half_path(before)


@pytest.fixture
def one_thread():
    before = _openmp.get_num_threads()
    _openmp.set_num_threads(1)
    yield
    _openmp.set_num_threads(before)


def _bits_f32(rng, n):
    """float32 values from random bit patterns (every exponent) plus edge cases."""
    x = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edge = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 1e-8, 2**-24, 2**-25,
                     3 * 2**-26, 2**-14, 2**-14 - 2**-24, 1 + 2**-11, 1 + 3 * 2**-11,
                     np.inf, -np.inf, 3.3895314e38, 3.39e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8],
                    dtype=np.float32)
    return np.concatenate([x, edge])


# ---------------------------------------------------------------- conversions

def test_fp16_conversions_match_numpy(half_path):
    # every fp16 bit pattern widens like NumPy's float16
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    got = kernel.decode_rows(h, 1)
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    # narrowing rounds to nearest even like NumPy's float16, overflow counted
    x = _bits_f32(np.random.default_rng(0), 1 << 16)
    x = x[~np.isnan(x)]
    x = x[: x.size // 16 * 16].reshape(-1, 16)
    bits, over = kernel.encode_rows(x, 1)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    assert np.array_equal(bits, ref.view(np.uint16))
    assert over == int((np.isfinite(x) & np.isinf(ref)).sum()) > 0
    np.testing.assert_array_equal(rowdtype.round_nearest(x, "fp16").view(np.uint16), bits)


def test_bf16_conversions_are_exact_bit_operations():
    rng = np.random.default_rng(1)
    x = _bits_f32(rng, 1 << 16)
    x = x[~np.isnan(x)]
    x = x[: x.size // 16 * 16].reshape(-1, 16)
    bits, over = kernel.encode_rows(x, 2)
    np.testing.assert_array_equal(bits, rowdtype.round_nearest(x, "bf16"))
    # independent check in float64: the nearer of the two bf16 neighbours, ties to even
    fin = np.isfinite(x) & (np.abs(x) < 3.3e38)
    u = x.view(np.uint32)
    lo = (u >> 16).astype(np.uint32)
    a, b = (lo << 16).view(np.float32), ((lo + 1) << 16).view(np.float32)
    da = np.abs(x.astype(np.float64) - a)
    db = np.abs(b.astype(np.float64) - x)
    want = np.where((db < da) | ((db == da) & (lo & 1 == 1)), lo + 1, lo).astype(np.uint16)
    assert np.array_equal(bits[fin], want[fin])
    assert over == int((np.isfinite(x) & ~np.isfinite(rowdtype.to_float32(bits, "bf16"))).sum())
    np.testing.assert_array_equal(kernel.decode_rows(bits, 2), rowdtype.to_float32(bits, "bf16"))


@pytest.mark.parametrize("dt", REDUCED)
def test_stochastic_rounding_kernel_equals_numpy_twin(dt):
    rng = np.random.default_rng(2)
    x = np.concatenate([
        _bits_f32(rng, 4000),
        (rng.standard_normal(4000) * np.exp2(rng.integers(-30, 17, 4000))).astype(np.float32)])
    x = x[: x.size // 8 * 8].reshape(-1, 8)
    r = rng.integers(0, 2**16, size=x.shape).astype(np.uint16)
    r.ravel()[:64] = np.array([0, 65535] * 32, dtype=np.uint16)
    got = kernel.stochastic_round_rows(x, r, rowdtype.CODES[dt])
    np.testing.assert_array_equal(got, rowdtype.stochastic_round(x, r, dt).view(np.uint16))
    # saturates: never Inf; NaN stays NaN; else one of the two neighbours
    y = rowdtype.to_float32(got.view(np.float16) if dt == "fp16" else got, dt)
    assert not np.isinf(y).any()
    assert np.array_equal(np.isnan(y), np.isnan(x))
    big = np.isfinite(x) & (np.abs(x) > rowdtype.MAX_FINITE[dt])
    assert np.array_equal(np.abs(y[big]), np.full(big.sum(), rowdtype.MAX_FINITE[dt], np.float32))


@pytest.mark.parametrize("dt,values", [
    ("fp16", [1.0 + 2**-12, -3.0 - 5 * 2**-13, 1000.3, 3e-6, 1e-8, 0.1]),
    ("bf16", [1.0 + 2**-10, -0.3, 123.456, 1e-30])])
def test_stochastic_rounding_is_unbiased(dt, values):
    """Mean of many SR results (the bits of 4096 keys x 8 columns) ~ the exact value; only
    the two neighbours ever occur."""
    n_keys, dim = 4096, 8
    keys = np.arange(n_keys, dtype=np.int64) * 7919 - 5
    for x in values:
        target = np.full((n_keys, dim), x, dtype=np.float32)
        bits = rowdtype.sr_bits(3, 1, keys, 5, dim)
        got = kernel.stochastic_round_rows(target, bits, rowdtype.CODES[dt])
        y = rowdtype.to_float32(got.view(np.float16) if dt == "fp16" else got, dt).ravel()
        nb = np.unique(y)
        # the two neighbours of x: they bracket it, and no stored value lies between them
        stored = np.unique(got)
        assert nb.size == 2 and nb[0] < np.float32(x) < nb[1], (x, nb)
        assert abs(int(stored[1]) - int(stored[0])) == 1, (x, stored)
        spread = float(nb.max() - nb.min()) if nb.size == 2 else 0.0
        # standard error of the mean of Bernoulli(p) steps of size `spread`: <= spread / (2 sqrt n)
        assert abs(y.astype(np.float64).mean() - float(np.float32(x))) <= 5 * spread / (
            2 * np.sqrt(y.size)) + 1e-12 * abs(x), (dt, x, y.mean())


@pytest.mark.parametrize("dt", REDUCED)
def test_update_rounding_uses_key_and_step_only(dt, one_thread):
    """A row's SR bits follow its key and step: the same rows, inserted in another order and
    at other positions (and on more threads), end with the same bits."""
    opt = SparseOptimizer("sgd", lr=0.37)
    keys = np.arange(3000, dtype=np.int64) * 13 + 1
    rng = np.random.default_rng(4)
    grads = rng.standard_normal((keys.size, 16)).astype(np.float32)
    a = EmbeddingTable("t", 16, opt, seed=9, row_dtype=dt)
    b = EmbeddingTable("t", 16, opt, seed=9, row_dtype=dt)
    ra = a.find_or_insert(keys, 0)
    perm = rng.permutation(keys.size)
    b.find_or_insert(np.arange(5000, 5100), 0)           # other rows first: other positions
    rb = b.find_or_insert(keys[perm], 0)
    a.apply_gradients(ra, grads, 3, keys=keys)
    _openmp.set_num_threads(2)
    b.apply_gradients(rb, grads[perm], 3, keys=keys[perm])
    assert np.array_equal(a.gather(ra).view(np.uint32), b.gather(b.find(keys)).view(np.uint32))
    c = EmbeddingTable("t", 16, opt, seed=9, row_dtype=dt)
    rc = c.find_or_insert(keys, 0)
    c.apply_gradients(rc, grads, 4, keys=keys)            # another step: other bits
    assert not np.array_equal(a.gather(ra), c.gather(rc))


# ---------------------------------------------------------------- optimizers

CASES = [SparseOptimizer("sgd", lr=0.1, weight_decay=0.01),
         SparseOptimizer("momentum", lr=0.05, momentum=0.9),
         SparseOptimizer("nesterov", lr=0.05, momentum=0.8),
         SparseOptimizer("adagrad", lr=0.1, initial_accumulator=0.1),
         SparseOptimizer("rowwise_adagrad", lr=0.1, weight_decay=0.01),
         SparseOptimizer("adam", lr=0.01),
         SparseOptimizer("ftrl", lr=0.05, l1=0.01, l2=0.1, initial_accumulator=0.1)]
assert sorted(o.kind for o in CASES) == sorted(KINDS)


@pytest.mark.parametrize("dt", REDUCED)
@pytest.mark.parametrize("opt", CASES, ids=lambda o: o.kind)
def test_every_optimizer_matches_reference_with_same_rounding(opt, dt):
    """Table step == NumPy reference on the widened rows, then ``stochastic_round`` with the
    table's bits. The reference's float32 agrees to ~1e-7, which can move a value across an
    SR threshold: such values (rare) must be the adjacent stored value; state is float32."""
    rng = np.random.default_rng(7)
    dim, n = 20, 600
    t = EmbeddingTable("t", dim, opt, seed=3, table_id=2, row_dtype=dt)
    keys = rng.permutation(np.arange(-n, n, dtype=np.int64))[:n]
    rows = t.find_or_insert(keys, 0)
    before = t.export()
    assert before["values"].dtype == rowdtype.STORED[dt] and before["row_dtype"] == dt
    w = rowdtype.to_float32(before["values"], dt)
    np.testing.assert_array_equal(w, rowdtype.to_float32(rowdtype.round_nearest(
        t.initial_rows(keys), dt), dt))
    slots, ost = before["slots"], before["opt_step"]
    mismatched = 0
    for step in (1, 2, 3):
        sel = np.sort(rng.choice(n, size=400, replace=False))
        g = (rng.standard_normal((sel.size, dim)) * 0.5).astype(np.float32)
        t.apply_gradients(rows[sel], g, step, keys=keys[sel])
        w_ref, s_ref, t_ref = reference_update(opt, w[sel], {k: v[sel] for k, v in slots.items()},
                                               g, ost[sel])
        want = rowdtype.stochastic_round(w_ref, rowdtype.sr_bits(3, 2, keys[sel], step, dim), dt)
        got = t.export()
        got_bits = got["values"][sel].view(np.uint16)
        diff = got_bits != want.view(np.uint16)
        mismatched += int(diff.sum())
        if diff.any():   # adjacent stored values only
            step_size = np.abs(got_bits.astype(np.int32) - want.view(np.uint16).astype(np.int32))
            assert step_size[diff].max() == 1, (opt.kind, dt)
        for k in slots:
            np.testing.assert_allclose(got["slots"][k][sel], s_ref[k], rtol=1e-6, atol=1e-7)
        w = rowdtype.to_float32(got["values"], dt)
        slots = got["slots"]
        ost = got["opt_step"]
        if opt.kind == "adam":
            np.testing.assert_array_equal(ost[sel], t_ref)
    assert mismatched <= 3 * 400 * dim * 1e-3, (opt.kind, dt, mismatched)
    if opt.kind == "sgd":
        assert mismatched == 0


def test_reduced_rows_need_keys_and_debug_checks_them():
    t = EmbeddingTable("emb", 4, "sgd", row_dtype="fp16", debug=True)
    rows = t.find_or_insert(np.array([10, 20, 30]), 0)
    g = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="'emb': fp16 rows need the keys"):
        t.apply_gradients(rows, g, 1)
    with pytest.raises(ValueError, match=r"keys\[1\] = 30 is stored at row 2, not at "):
        t.apply_gradients(rows, g, 1, keys=np.array([10, 30, 20]))
    t.apply_gradients(np.array([rows[0], -1, rows[2]]), g, 1, keys=np.array([10, 99, 30]))
    # fp32 tables take keys and ignore them
    EmbeddingTable("f", 4, "sgd").apply_gradients(np.array([-1]), g[:1], 1, keys=np.array([5]))


def test_training_saturates_at_largest_finite_value():
    t = EmbeddingTable("t", 8, SparseOptimizer("sgd", lr=1.0), row_dtype="fp16")
    rows = t.find_or_insert(np.arange(4), 0)
    t.apply_gradients(rows, np.full((4, 8), -1e5, np.float32), 1, keys=np.arange(4))
    assert (t.gather(rows) == 65504).all()
    with pytest.raises(ValueError, match="init_scale 70000 gives initial values past fp16"):
        EmbeddingTable("t", 8, "sgd", row_dtype="fp16", init_scale=70000)


# ---------------------------------------------------------------- export, import, checkpoints

def _trained(dt, opt="adagrad", n=300, dim=6, seed=0):
    t = EmbeddingTable("t", dim, opt, seed=seed, row_dtype=dt)
    keys = np.arange(n, dtype=np.int64) * 3
    rows = t.find_or_insert(keys, 0)
    g = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    t.apply_gradients(rows, g, 1, keys=keys)
    return t


@pytest.mark.parametrize("src", rowdtype.ROW_DTYPES)
@pytest.mark.parametrize("dst", rowdtype.ROW_DTYPES)
def test_import_converts_between_row_dtypes(src, dst):
    t = _trained(src)
    state = t.export()
    u = EmbeddingTable("u", 6, "adagrad", row_dtype=dst)
    u.import_(state)
    f32 = rowdtype.to_float32(state["values"], src)
    got = u.export()
    want = f32 if dst == "fp32" else rowdtype.round_nearest(f32, dst)
    assert np.array_equal(got["values"].view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    np.testing.assert_array_equal(got["slots"]["accumulator"], state["slots"]["accumulator"])
    assert got.get("row_dtype") == (None if dst == "fp32" else dst)
    if src == dst:
        for k in ("keys", "access_count", "last_step"):
            np.testing.assert_array_equal(got[k], state[k])
    # reads are float32 and agree with the exported values
    np.testing.assert_array_equal(u.gather(u.find(state["keys"])),
                                  rowdtype.to_float32(got["values"], dst))


def test_import_refuses_overflow_and_bad_dtypes():
    t = EmbeddingTable("emb", 2, "sgd", row_dtype="fp16")
    state = {"keys": np.array([4, 5]), "values": np.array([[1, 2], [3, 70000]], np.float32)}
    with pytest.raises(ValueError, match=r"'emb': state\['values'\]\[1, 1\] = 70000.0 \(key 5\) "
                                         r"is past the largest finite fp16 value 65504"):
        t.import_(state)
    assert len(t) == 0
    with pytest.raises(ValueError, match=r"'emb': state\['row_dtype'\] = 'fp8' is not one of"):
        t.import_({**state, "row_dtype": "fp8"})
    with pytest.raises(ValueError, match=r"'emb': state\['values'\] is float32, but "
                                         r"state\['row_dtype'\] = 'bf16' is stored as uint16"):
        t.import_({**state, "row_dtype": "bf16"})
    # bf16 holds 70000 (rounded to nearest even)
    b = EmbeddingTable("b", 2, "sgd", row_dtype="bf16")
    b.import_(state)
    assert b.gather(b.find([5]))[0, 1] == 70144.0


def test_delta_and_initial_rows_are_float32():
    t = _trained("bf16")
    d = t.export_delta(0)
    assert d["values"].dtype == np.float32
    np.testing.assert_array_equal(d["values"], rowdtype.to_float32(t.export()["values"], "bf16"))
    fresh = EmbeddingTable("t", 6, "adagrad", row_dtype="bf16")
    want = fresh.initial_rows(np.array([7, 8]))
    np.testing.assert_array_equal(fresh.gather(fresh.find_or_insert(np.array([7, 8]), 0)), want)


@pytest.mark.parametrize("src,dst", [("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp16"),
                                     ("bf16", "fp16")])
def test_checkpoint_round_trip_across_row_dtypes(tmp_path, src, dst):
    t = _trained(src, opt="rowwise_adagrad")
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, {}, {"t": t.export()})
    u = EmbeddingTable("t", 6, "rowwise_adagrad", row_dtype=dst)
    _, _, tables, _ = mgr.load(path, tables_like={"t": u.export()})
    assert tables["t"]["values"].dtype == rowdtype.STORED[src]     # stored precision on disk
    u.import_(tables["t"])
    f32 = rowdtype.to_float32(t.export()["values"], src)
    want = f32 if dst == "fp32" else rowdtype.to_float32(rowdtype.round_nearest(f32, dst), dst)
    np.testing.assert_array_equal(u.gather(u.find(t.export()["keys"])), want)
    # the model file keeps the stored precision and reads back as float32
    model = export_model(path, tmp_path / "model.h5", check_model=False)
    m = read_model(model)["tables"]["t"]
    assert m["row_dtype"] == src and m["values"].dtype == np.float32
    np.testing.assert_array_equal(m["values"], f32)


@pytest.mark.parametrize("row_dtype,problem", [
    ("bf16", r"values: float16, but row_dtype 'bf16' is stored as uint16"),
    ("fp8", r"row_dtype = 'fp8': not one of fp32, fp16, bf16")])
def test_checkpoint_with_wrong_row_dtype_names_the_table(tmp_path, row_dtype, problem):
    """A checkpoint whose recorded row dtype does not describe its values (written by
    another program, checksums intact) is refused on load, naming file and table."""
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, {}, {"emb": {**_trained("fp16").export(), "row_dtype": row_dtype}})
    with pytest.raises(CheckpointError, match=r"tables-00000-of-00001.h5:/tables/emb/" + problem):
        mgr.load(path)
    assert _validate.VALUES_DTYPES == rowdtype.STORED


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("batch,steps", [(1500, 40), (150, 400)])
def test_fp16_rowwise_adagrad_dim64_bytes_per_row(batch, steps, one_thread):
    """fp16 rows + row-wise Adagrad at dim 64: <= 0.6 x the 260 bytes of an fp32 row-wise
    Adagrad row (128 + 4 + 8 bytes of row, state, metadata; index and slack within 16),
    checked after every batch once growth has settled, big batches and small ones."""
    rng = np.random.default_rng(7)
    t = EmbeddingTable("t", 64, "rowwise_adagrad", row_dtype="fp16")
    worst = 0.0
    for step in range(steps):
        t.find_or_insert(np.unique(rng.integers(0, 2**62, size=batch)), step)
        m = t.memory_stats()
        if m["rows"] >= 16384:
            worst = max(worst, m["bytes_per_row"])
    assert m["rows"] >= 55000 and 0 < worst <= 0.6 * 260, worst
    assert m["bytes_rows"] == m["row_capacity"] * (128 + 4)
    assert 0.76 <= m["index_load"] <= 0.82


# ---------------------------------------------------------------- config

def test_config_row_dtype_reaches_the_tables():
    import copy

    from hpctrain.config import config_from_dict
    from hpctrain.errors import ConfigError
    from hpctrain.train.build import table_specs
    from test_config import BASE
    d = copy.deepcopy(BASE)
    d["tables"][0]["row_dtype"] = "fp16"
    cfg = config_from_dict(d, source="run.toml")
    assert [t.row_dtype for t in cfg.tables] == ["fp16", "fp32"]
    specs = table_specs(cfg)
    assert [s.row_dtype for s in specs] == ["fp16", "fp32"]
    from hpctrain.sparse.plan import make_table
    assert make_table(specs[0], 0).row_dtype == "fp16"
    d["tables"][1]["row_dtype"] = "half"
    with pytest.raises(ConfigError, match=r"run.toml: tables\[1\].row_dtype: table 'b': expected "
                                          r"one of 'fp32', 'fp16', 'bf16', got 'half'"):
        config_from_dict(d, source="run.toml")
    d["tables"][1].update(row_dtype="fp16", init="normal", init_scale=10000.0)
    with pytest.raises(ConfigError, match=r"tables\[1\].init_scale: table 'b': initial values up "
                                          r"to 85800 do not fit row_dtype = 'fp16'"):
        config_from_dict(d, source="run.toml")
    d["tables"][1]["row_dtype"] = "bf16"
    assert config_from_dict(d, source="run.toml").tables[1].row_dtype == "bf16"


# ---------------------------------------------------------------- training quality

def _auc(config, row_dtype, **run):
    import dataclasses
    import io
    import os

    from hpctrain.config import load_config
    from hpctrain.train.loop import Trainer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "hpctrain", "configs", config))
    cfg = cfg.replace(checkpoint=None, metrics=type(cfg.metrics)(None, 1000),
                      tables=[dataclasses.replace(t, row_dtype=row_dtype) for t in cfg.tables],
                      **run)
    cfg.eval.interval = 0
    return Trainer(cfg, stream=io.StringIO()).fit()["eval"]["auc"]


def test_fp16_rows_train_wide_deep_on_adult_as_well_as_fp32(monkeypatch):
    """One epoch of the shipped Wide & Deep on UCI Adult (AUC ~0.90): fp16 rows within
    0.002 AUC of fp32 rows."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "..", "shared", "data", "adult", "adult.csv")):
        pytest.skip("UCI Adult data not found (../shared/data is not in a user's clone)")
    monkeypatch.chdir(root)
    a32, a16 = (_auc("wide_deep_adult.toml", dt, epochs=1) for dt in ("fp32", "fp16"))
    assert a32 > 0.89 and abs(a16 - a32) <= 0.002, (a32, a16)


def test_fp16_rows_learn_the_planted_model_as_well_as_fp32():
    """The quick start's DLRM on its synthetic planted model, 120 steps (AUC ~0.84): fp16
    rows within 0.002 AUC of fp32 rows."""
    a32, a16 = (_auc("dlrm_synthetic.toml", dt, steps=120) for dt in ("fp32", "fp16"))
    assert a32 > 0.8 and abs(a16 - a32) <= 0.002, (a32, a16)
