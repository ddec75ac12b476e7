"""The fused kernels of the NumPy dense path (hpctrain._kernels.dense_ops) against plain
NumPy references, and the layers, model and optimizers with them against the generic array
code (``backend.FUSED_KERNELS = False``, the code the CuPy path runs)."""
import numpy as np
import pytest

from hpctrain._kernels import _openmp, dense_ops
from hpctrain.dense import DLRM, bce_with_logits, make_optimizer
from hpctrain.dense import backend
from hpctrain.dense.loss import bce_with_logits_sum

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Kernels on 1 and 2 threads, every job split (no single-thread cut-off)."""
    old_n, old_cut = _openmp.get_num_threads(), dense_ops.parallel_threshold()
    _openmp.set_num_threads(request.param)
    dense_ops.set_parallel_threshold(0)
    yield request.param
    _openmp.set_num_threads(old_n)
    dense_ops.set_parallel_threshold(old_cut)


@pytest.fixture
def generic():
    """A context switch: ``with generic(): ...`` runs the generic array code."""
    class Switch:
        def __enter__(self):
            backend.FUSED_KERNELS = False

        def __exit__(self, *exc):
            backend.FUSED_KERNELS = True
    yield Switch
    backend.FUSED_KERNELS = True


def _with_signs(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[::7] = 0  # exact zeros: ReLU's boundary
    return a


# --- kernels against NumPy ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_act_is_numpy_bit_for_bit(threads, dtype):
    rng = np.random.default_rng(1)
    y, b = _with_signs(rng, (203, 37), dtype), rng.standard_normal(37).astype(dtype)
    for bias, relu in [(b, True), (b, False), (None, True)]:
        ref = y + bias if bias is not None else y.copy()
        if relu:
            ref = ref * (ref > 0)
        got = y.copy()
        dense_ops.bias_act(got, bias, relu)
        assert np.array_equal(got, ref), (bias is None, relu)
    with pytest.raises(ValueError, match="bias_act bias"):
        dense_ops.bias_act(y, b[:5], True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_grad_and_bias_sums_any_blocks_any_threads(threads, dtype):
    rng = np.random.default_rng(2)
    rows, cols = 300, 19
    y = _with_signs(rng, (rows, cols), dtype)
    y *= y > 0
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    chunks = -(-rows // dense_ops.SUM_ROWS)
    outs = []
    for cuts in ([0, rows], [0, 100, 101, 237, rows], [0, 64, 128, rows]):
        dz, part = np.empty_like(dy), np.empty((chunks, cols))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            dense_ops.act_grad_colsum(dy[lo:hi], y[lo:hi], dz[lo:hi], part, lo)
        assert np.array_equal(dz, dy * (y > 0))
        out = np.empty(cols, dtype)
        dense_ops.colsum_finish(part, rows, out)
        outs.append(out)
        # without ReLU: the column sums of dy, dz untouched
        dense_ops.act_grad_colsum(dy, None, None, part, 0)
        plain = np.empty(cols, dtype)
        dense_ops.colsum_finish(part, rows, plain)
        np.testing.assert_allclose(plain, dy.astype(np.float64).sum(0), rtol=1e-6, atol=1e-5)
    ref = (dy * (y > 0)).astype(np.float64).sum(0)
    np.testing.assert_allclose(outs[0], ref, rtol=1e-6, atol=1e-5)
    for out in outs[1:]:  # the same bits whatever the blocks
        assert np.array_equal(out, outs[0])
    with pytest.raises(ValueError, match="act_grad_colsum partial"):
        dense_ops.act_grad_colsum(dy, y, dz, np.empty((2, cols)), 0)


def test_bias_sums_are_the_same_bits_for_any_thread_count():
    rng = np.random.default_rng(3)
    dy = rng.standard_normal((1000, 33)).astype(np.float32)
    old_n, old_cut = _openmp.get_num_threads(), dense_ops.parallel_threshold()
    dense_ops.set_parallel_threshold(0)
    got = []
    try:
        for n in (1, 2, 3):
            _openmp.set_num_threads(n)
            part, out = np.empty((16, 33)), np.empty(33, np.float32)
            dense_ops.act_grad_colsum(dy, None, None, part, 0)
            dense_ops.colsum_finish(part, 1000, out)
            got.append(out)
    finally:
        _openmp.set_num_threads(old_n)
        dense_ops.set_parallel_threshold(old_cut)
    assert all(np.array_equal(g, got[0]) for g in got)


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interaction_pack_gather_scatter(threads, dtype, self_interaction):
    rng = np.random.default_rng(4)
    b, n, d = 57, 6, 5
    big = rng.standard_normal((b, 3 * d)).astype(dtype)
    arrays = [big[:, :d]] + [rng.standard_normal((b, d)).astype(dtype) for _ in range(n - 1)]
    lo, hi = 11, 50
    t, t2 = np.empty((hi - lo, n, d), dtype), np.empty((hi - lo, n, d), dtype)
    dense_ops.pack_rows(arrays, t, t2, lo)  # a row-strided view among them
    assert np.array_equal(t, np.stack([a[lo:hi] for a in arrays], axis=1))
    assert np.array_equal(t2, t)
    t2 = np.empty_like(t)
    dense_ops.pack_rows(arrays, t2, None, lo)
    assert np.array_equal(t2, t)

    z = rng.standard_normal((hi - lo, n, n)).astype(dtype)
    k = 1 if self_interaction else 0
    ii, jj = np.tril_indices(n, -1 + k)
    width = d + len(ii)
    y = np.empty((hi - lo, width), dtype)
    dense_ops.tri_gather(z, t, y, self_interaction)
    assert np.array_equal(y, np.concatenate([t[:, 0], z[:, ii, jj]], axis=1))

    g = rng.standard_normal((hi - lo, width)).astype(dtype)
    dz = np.full((hi - lo, n, n), np.nan, dtype)
    dense_ops.tri_scatter(g, dz, self_interaction)
    ref = np.zeros_like(dz)
    ref[:, ii, jj] = g[:, d:]
    ref[:, jj, ii] = g[:, d:]
    if self_interaction:
        ref[:, np.arange(n), np.arange(n)] *= 2
    assert np.array_equal(dz, ref)

    with pytest.raises(ValueError, match="pack_rows array 2"):
        dense_ops.pack_rows(arrays[:2] + [arrays[2][:, :2]] + arrays[3:], t, None, lo)
    with pytest.raises(ValueError, match="tri_gather y"):
        dense_ops.tri_gather(z, t, np.empty((hi - lo, width + 1), dtype),
                             self_interaction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_kernel_against_numpy(threads, dtype):
    rng = np.random.default_rng(5)
    z = (rng.standard_normal(777) * 6).astype(dtype)
    z[:3] = [0.0, 80.0, -80.0]
    y = (rng.random(777) > 0.4).astype(dtype)
    grad = np.empty_like(z)
    total = dense_ops.bce_with_logits(z, y, grad, 0.25)
    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    per = np.maximum(z64, 0) - z64 * y64 + np.log1p(np.exp(-np.abs(z64)))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert total == pytest.approx(per.sum(), rel=tol)
    np.testing.assert_allclose(grad, (1 / (1 + np.exp(-z64)) - y64) * 0.25, rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("kind", ["adam", "adamw", "adagrad"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_optimizers_equal_the_array_code_bit_for_bit(threads, generic, kind, wd,
                                                           dtype):
    from hpctrain.dense import FlatParameters
    rng = np.random.default_rng(6)
    opts = []
    for fused in (True, False):
        p = FlatParameters(np, dtype)
        p.add("a", (37, 11), "he")
        p.add("b", (5,), "normal:0.3")
        p.build(7)
        hp = {"lr": 0.01, "weight_decay": wd}
        opts.append((p, make_optimizer(kind, p, **hp)))
    for _ in range(4):
        g = rng.standard_normal(opts[0][0].size).astype(dtype)
        for fused, (p, opt) in zip((True, False), opts):
            p.grad[...] = g
            if fused:
                opt.step()
            else:
                with generic():
                    opt.step()
    (pa, oa), (pb, ob) = opts
    assert np.array_equal(pa.data, pb.data)
    for slot in oa.state:
        assert np.array_equal(oa.state[slot], ob.state[slot]), slot


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interaction_row_blocks_over_threads_same_bits(dtype, self_interaction, monkeypatch):
    """With 2 kernel threads the row blocks run side by side (workpool): the output and
    every gradient are the bits of the 1-thread run, and match a NumPy reference."""
    from hpctrain.dense import DotInteraction
    from hpctrain.dense import interactions
    rng = np.random.default_rng(12)
    b, n_f, d = 301, 6, 8
    x = rng.standard_normal((b, d)).astype(dtype)
    embs = [rng.standard_normal((b, d)).astype(dtype) for _ in range(n_f)]
    dy = None
    maps = []
    real_map = interactions._parallel_map
    monkeypatch.setattr(interactions, "_parallel_map",
                        lambda fn, items: maps.append(len(items)) or real_map(fn, items))
    out = {}
    old_n = _openmp.get_num_threads()
    try:
        for n in (1, 2):
            _openmp.set_num_threads(n)
            layer = DotInteraction(np, dtype, n_f, d, self_interaction=self_interaction)
            layer.block_rows = 77       # 4 blocks, the last one short
            y = layer.forward(x, embs).copy()
            if dy is None:
                dy = rng.standard_normal(y.shape).astype(dtype)
            dx, de = layer.backward(dy)
            out[n] = (y, dx.copy(), [np.array(g) for g in de])
    finally:
        _openmp.set_num_threads(old_n)
    assert maps == [4, 4]               # forward and backward of the 2-thread run only
    (y1, dx1, de1), (y2, dx2, de2) = out[1], out[2]
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2)
    assert all(np.array_equal(a, c) for a, c in zip(de1, de2))
    t = np.stack([x, *embs], axis=1).astype(np.float64)
    k = 1 if self_interaction else 0
    pairs = [(i, j) for i in range(n_f + 1) for j in range(i + k)]
    ref = np.concatenate([t[:, 0], np.stack([(t[:, i] * t[:, j]).sum(1) for i, j in pairs], 1)], 1)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y2, ref, rtol=rtol, atol=rtol)
    dt = np.zeros_like(t)
    dt[:, 0] += dy[:, :d]
    for c, (i, j) in enumerate(pairs):
        g = dy[:, d + c][:, None].astype(np.float64)
        dt[:, i] += g * t[:, j]
        dt[:, j] += g * t[:, i]
    np.testing.assert_allclose(dx2, dt[:, 0], rtol=rtol, atol=rtol * 10)
    for f in range(n_f):
        np.testing.assert_allclose(de2[f], dt[:, f + 1], rtol=rtol, atol=rtol * 10)


# --- the model with and without the kernels ----------------------------------------------

def _dlrm_step(dtype, blocks=None):
    rng = np.random.default_rng(7)
    b, d = 300, 8
    m = DLRM(13, [d] * 6, bottom=[32, 16], top=[24, 12, 1], seed=3, dtype=dtype)
    if blocks:
        for layer in m.bottom.layers + m.top.layers:
            layer.block_rows = blocks
        m.interaction.block_rows = blocks
    dense = rng.standard_normal((b, 13))
    embs = [rng.standard_normal((b, d)) * 0.3 for _ in range(6)]
    labels = (rng.random(b) > 0.5).astype(dtype)
    logits = m.forward(dense, embs)
    loss, dl = bce_with_logits(logits, labels)
    d_embs = [np.array(g) for g in m.backward(dl)]
    return logits, loss, dl, d_embs, m.params.grad.copy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dlrm_step_with_kernels_equals_the_array_code(threads, generic, dtype):
    with generic():
        ref = _dlrm_step(dtype)
    rtol = 2e-6 if dtype == np.float32 else 1e-12
    for blocks in (None, 77):
        got = _dlrm_step(dtype, blocks)
        np.testing.assert_allclose(got[0], ref[0], rtol=rtol, atol=rtol)
        assert got[1] == pytest.approx(ref[1], rel=rtol)
        np.testing.assert_allclose(got[2], ref[2], rtol=rtol, atol=rtol * 1e-2)
        for a, b in zip(got[3], ref[3]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
        np.testing.assert_allclose(got[4], ref[4], rtol=rtol, atol=rtol * np.abs(ref[4]).max())
    # blocks change nothing, not even a bit
    a, b = _dlrm_step(dtype), _dlrm_step(dtype, 77)
    assert np.array_equal(a[4], b[4]) and a[1] == b[1]


def test_bce_sum_is_bce_with_denominator_one_bit_for_bit():
    rng = np.random.default_rng(8)
    z = rng.standard_normal(500).astype(np.float32)
    y = (rng.random(500) > 0.5).astype(np.float32)
    loss, g1 = bce_with_logits(z, y, denom=1)
    out = np.zeros((), np.float32)
    g2 = bce_with_logits_sum(z, y, out)
    assert float(out) == loss and np.array_equal(g1, g2)
