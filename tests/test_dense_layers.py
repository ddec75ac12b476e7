"""Dense layers, flat parameters and losses: finite-difference gradient checks in float64
and closed-form/NumPy references, on NumPy (and CuPy through the ``xp`` fixture)."""
import numpy as np
import pytest

from hpctrain.dense import (CrossLayer, CrossNet, Concat, DotInteraction, Dropout,
                            FlatParameters, FMInteraction, Linear, MLP, ReLU, Sigmoid,
                            bce_with_logits, mse, to_numpy)
from hpctrain.dense.backend import get_array_module, set_blas_threads
from hpctrain.errors import CheckpointError

set_blas_threads(1)
F64 = np.float64


# --- helpers shared with test_dense_models.py ---------------------------------------------

def rand(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


def numgrad(f, arr, idx, eps=1e-6):
    """Central difference of scalar ``f()`` with respect to ``arr[idx]``."""
    old = float(arr[idx])
    arr[idx] = old + eps
    fp = f()
    arr[idx] = old - eps
    fm = f()
    arr[idx] = old
    return (fp - fm) / (2 * eps)


def sample_indices(shape, rng, k=12):
    """Up to ``k`` random multi-indices of an array of ``shape``."""
    n = int(np.prod(shape))
    flat = rng.choice(n, size=min(k, n), replace=False)
    return [np.unravel_index(int(i), shape) for i in flat]


def assert_grad(f, arr, analytic, rng, what, k=12, rtol=1e-5, atol=1e-7):
    """Compare ``analytic`` (an array like ``arr``) with finite differences at sampled entries."""
    ana = to_numpy(analytic)
    assert ana.shape == tuple(arr.shape), f"{what}: gradient shape {ana.shape} vs {arr.shape}"
    for idx in sample_indices(arr.shape, rng, k):
        num = numgrad(f, arr, idx)
        a = float(ana[idx])
        assert abs(num - a) <= atol + rtol * max(abs(num), abs(a)), \
            f"{what}{list(idx)}: analytic {a:.10g} vs numeric {num:.10g}"


def check_param_grads(f, params, rng, k=8):
    """Finite-difference check of every parameter's gradient (``params.grad`` must be filled)."""
    grads = {p.name: to_numpy(p.grad).copy() for p in params.params}
    for p in params.params:
        assert_grad(f, p.data, grads[p.name], rng, p.name, k=k)


def dot(xp, a, b):
    return float(xp.sum(a * b))


# --- flat parameters ---------------------------------------------------------------------

def test_flat_parameters_are_views_of_one_buffer(xp):
    p = FlatParameters(xp, np.float32)
    a = p.add("a.weight", (3, 5), "he")
    b = p.add("a.bias", (5,))
    c = p.add("c", (7, 2), "xavier")
    p.build(seed=3)
    assert p.data.ndim == 1 and p.data.flags.c_contiguous and p.grad.shape == p.data.shape
    for q in (a, b, c):
        assert q.offset % 16 == 0  # 64-byte aligned starts
        assert q.data.shape == q.shape and q.grad.shape == q.shape
        q.data[...] = q.index + 1
        q.grad[...] = -(q.index + 1)
    host, ghost = to_numpy(p.data), to_numpy(p.grad)
    for q in (a, b, c):
        assert (host[q.offset:q.offset + q.size] == q.index + 1).all()
        assert (ghost[q.offset:q.offset + q.size] == -(q.index + 1)).all()
    # padding stays zero
    used = np.zeros(p.size, bool)
    for q in (a, b, c):
        used[q.offset:q.offset + q.size] = True
    assert (host[~used] == 0).all() and p.num_parameters == 15 + 5 + 14
    p.zero_grad()
    assert not to_numpy(p.grad).any()


def test_init_is_seeded_by_name_and_matches_its_law():
    def build(seed, extra=False):
        p = FlatParameters(np, F64)
        if extra:
            p.add("first", (4, 4), "he")
        p.add("w", (400, 300), "he")
        p.add("x", (300, 200), "xavier")
        p.add("b", (300,), "zeros")
        return p.build(seed)
    p1, p2, p3, p4 = build(1), build(1), build(2), build(1, extra=True)
    assert np.array_equal(p1["w"], p2["w"]) and not np.array_equal(p1["w"], p3["w"])
    assert np.array_equal(p1["w"], p4["w"])  # adding a layer changes no other layer's start
    assert abs(p1["w"].std() - np.sqrt(2 / 400)) < 0.02 * np.sqrt(2 / 400)
    bound = np.sqrt(6 / 500)
    assert np.abs(p1["x"]).max() <= bound and p1["x"].std() > 0.9 * bound / np.sqrt(3)
    assert not p1["b"].any()


def test_state_dict_roundtrip_and_mismatch_errors():
    p = FlatParameters(np, np.float32)
    p.add("w", (3, 4), "he")
    p.add("b", (4,))
    p.build(0)
    sd = p.state_dict()
    q = FlatParameters(np, np.float32)
    q.add("w", (3, 4), "xavier")
    q.add("b", (4,))
    q.build(9)
    q.load_state_dict(sd)
    assert np.array_equal(q.data, p.data)
    with pytest.raises(CheckpointError, match="'w'.*expected shape"):
        q.load_state_dict({"w": np.zeros((4, 3)), "b": np.zeros(4)})
    with pytest.raises(CheckpointError, match="missing \\['b'\\]"):
        q.load_state_dict({"w": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="duplicate"):
        q2 = FlatParameters(np)
        q2.add("w", (1,))
        q2.add("w", (1,))


# --- layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_linear_gradients(xp, activation, blocked):
    rng = np.random.default_rng(1)
    p = FlatParameters(xp, F64)
    lin = Linear(p, "lin", 6, 4, activation=activation)
    if blocked:  # NumPy runs big batches in row blocks; force uneven blocks of 2 rows
        lin.block_rows = 2
    p.build(2)
    p["lin.bias"][...] = xp.asarray(rng.standard_normal(4))
    x, r = rand(xp, rng, 5, 6), rand(xp, rng, 5, 4)
    f = lambda: dot(xp, lin.forward(x), r)  # noqa: E731
    y = to_numpy(lin.forward(x)).copy()
    z = to_numpy(x) @ to_numpy(p["lin.weight"]) + to_numpy(p["lin.bias"])
    ref = {None: z, "relu": np.maximum(z, 0), "sigmoid": 1 / (1 + np.exp(-z))}[activation]
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    dx = to_numpy(lin.backward(r)).copy()
    check_param_grads(f, p, rng)
    assert_grad(f, x, dx, rng, "dx")


def test_linear_without_input_grad_and_shape_errors():
    p = FlatParameters(np, F64)
    lin = Linear(p, "first", 3, 2, input_grad=False)
    p.build()
    lin.forward(np.ones((4, 3)))
    assert lin.backward(np.ones((4, 2))) is None
    np.testing.assert_allclose(p.grad[:6].reshape(3, 2), np.full((3, 2), 4.0))
    with pytest.raises(ValueError, match=r"first: expected input \[B, 3\], got \(4, 5\)"):
        lin.forward(np.ones((4, 5)))


@pytest.mark.parametrize("cls", [ReLU, Sigmoid])
def test_activation_layers(xp, cls):
    rng = np.random.default_rng(2)
    layer = cls(xp, F64)
    x, r = rand(xp, rng, 7, 3) * 3, rand(xp, rng, 7, 3)
    y = to_numpy(layer.forward(x)).copy()
    xn = to_numpy(x)
    ref = np.maximum(xn, 0) if cls is ReLU else 1 / (1 + np.exp(-xn))
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    dx = to_numpy(layer.backward(r)).copy()
    assert_grad(lambda: dot(xp, layer.forward(x), r), x, dx, rng, cls.__name__, k=21)


def test_sigmoid_is_stable_for_huge_inputs():
    y = Sigmoid(np, np.float32).forward(np.array([[-1e4, -80.0, 0.0, 80.0, 1e4]], np.float32))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0], [0, 0, 0.5, 1, 1], atol=1e-30)


def test_dropout_mask_scale_seed_and_gradient(xp):
    rng = np.random.default_rng(3)
    d = Dropout(xp, F64, 0.25, seed=5)
    x = xp.asarray(rng.random((200, 50)) + 1.0)
    y = to_numpy(d.forward(x)).copy()
    keep = y != 0
    assert 0.70 < keep.mean() < 0.80
    np.testing.assert_allclose(y[keep], to_numpy(x)[keep] / 0.75, rtol=1e-12)
    r = rand(xp, rng, 200, 50)
    dx = to_numpy(d.backward(r))
    np.testing.assert_allclose(dx, np.where(keep, to_numpy(r) / 0.75, 0), rtol=1e-12)
    d2 = Dropout(xp, F64, 0.25, seed=5)
    assert np.array_equal(to_numpy(d2.forward(x)), y)  # same seed, same mask
    assert not np.array_equal(to_numpy(d.forward(x)), y)  # next call, new mask
    assert d.forward(x, training=False) is x
    # finite differences with the mask held fixed by reseeding before every forward
    small, rs = rand(xp, rng, 4, 5), rand(xp, rng, 4, 5)

    def f():
        d.reseed(11)
        return dot(xp, d.forward(small), rs)
    f()
    g = to_numpy(d.backward(rs)).copy()
    assert_grad(f, small, g, rng, "dropout dx", k=20)
    with pytest.raises(ValueError, match="rate"):
        Dropout(xp, F64, 1.0)


def test_concat(xp):
    rng = np.random.default_rng(4)
    c = Concat(xp, F64)
    xs = [rand(xp, rng, 3, w) for w in (2, 1, 4)]
    y = to_numpy(c.forward(xs))
    np.testing.assert_array_equal(y, np.concatenate([to_numpy(x) for x in xs], axis=1))
    r = rand(xp, rng, 3, 7)
    grads = c.backward(r)
    for x, g in zip(xs, grads):
        assert_grad(lambda: dot(xp, c.forward(xs), r), x, to_numpy(g).copy(), rng, "concat")


def test_mlp_gradients(xp):
    rng = np.random.default_rng(5)
    p = FlatParameters(xp, F64)
    mlp = MLP(p, "m", [5, 8, 6, 2], last_activation="sigmoid")
    p.build(1)
    x, r = rand(xp, rng, 4, 5), rand(xp, rng, 4, 2)
    f = lambda: dot(xp, mlp.forward(x), r)  # noqa: E731
    f()
    dx = to_numpy(mlp.backward(r)).copy()
    check_param_grads(f, p, rng)
    assert_grad(f, x, dx, rng, "mlp dx")
    assert [q.name for q in p.params] == ["m.0.weight", "m.0.bias", "m.1.weight", "m.1.bias",
                                          "m.2.weight", "m.2.bias"]


def _dot_reference(x, embs, self_interaction):
    t = np.stack([x] + embs, axis=1)
    n = t.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + (1 if self_interaction else 0))]
    z = np.stack([(t[:, i] * t[:, j]).sum(1) for i, j in pairs], axis=1)
    return np.concatenate([x, z], axis=1)


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction(xp, self_interaction, blocked):
    rng = np.random.default_rng(6)
    F, d, B = 4, 3, 5
    layer = DotInteraction(xp, F64, F, d, self_interaction=self_interaction)
    if blocked:  # NumPy runs big batches in row blocks; force uneven blocks of 2 rows
        layer.block_rows = 2
    x = rand(xp, rng, B, d)
    embs = [rand(xp, rng, B, d) for _ in range(F)]
    y = to_numpy(layer.forward(x, embs)).copy()
    ref = _dot_reference(to_numpy(x), [to_numpy(e) for e in embs], self_interaction)
    n = F + 1
    pairs = n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2
    assert layer.out_dim == ref.shape[1] == d + pairs
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    r = rand(xp, rng, B, layer.out_dim)
    dx, dembs = layer.backward(r)
    dx, dembs = to_numpy(dx).copy(), [to_numpy(g).copy() for g in dembs]
    f = lambda: dot(xp, layer.forward(x, embs), r)  # noqa: E731
    assert_grad(f, x, dx, rng, "dot dx")
    for i, (e, g) in enumerate(zip(embs, dembs)):
        assert_grad(f, e, g, rng, f"dot demb{i}", k=6)
    with pytest.raises(ValueError, match="embedding 1 has shape"):
        layer.forward(x, [embs[0], rand(xp, rng, B, d + 1)] + embs[2:])


def test_fm_interaction(xp):
    rng = np.random.default_rng(7)
    F, k, B = 5, 4, 6
    layer = FMInteraction(xp, F64, F, k)
    embs = [rand(xp, rng, B, k) for _ in range(F)]
    y = to_numpy(layer.forward(embs)).copy()
    en = [to_numpy(e) for e in embs]
    ref = sum((en[i] * en[j]).sum(1) for i in range(F) for j in range(i + 1, F))
    np.testing.assert_allclose(y, ref, rtol=1e-10)
    r = rand(xp, rng, B)
    dembs = [to_numpy(g).copy() for g in layer.backward(r)]
    f = lambda: dot(xp, layer.forward(embs), r)  # noqa: E731
    for i, (e, g) in enumerate(zip(embs, dembs)):
        assert_grad(f, e, g, rng, f"fm demb{i}", k=8)


def test_cross_layer_and_net(xp):
    rng = np.random.default_rng(8)
    D, B = 5, 4
    p = FlatParameters(xp, F64)
    layer = CrossLayer(p, "cross", D)
    net = CrossNet(p, "net", D, 3)
    p.build(3)
    for q in p.params:
        if q.name.endswith("bias"):
            q.data[...] = xp.asarray(rng.standard_normal(q.shape))
    x0, xl, r = rand(xp, rng, B, D), rand(xp, rng, B, D), rand(xp, rng, B, D)
    y = to_numpy(layer.forward(x0, xl)).copy()
    w, b = to_numpy(p["cross.weight"]), to_numpy(p["cross.bias"])
    np.testing.assert_allclose(y, to_numpy(x0) * (to_numpy(xl) @ w + b) + to_numpy(xl),
                               rtol=1e-12)
    dx0, dxl = (to_numpy(a).copy() for a in layer.backward(r))
    f = lambda: dot(xp, layer.forward(x0, xl), r)  # noqa: E731
    assert_grad(f, x0, dx0, rng, "cross dx0")
    assert_grad(f, xl, dxl, rng, "cross dxl")
    g = lambda: dot(xp, net.forward(x0), r)  # noqa: E731
    g()
    dnet = to_numpy(net.backward(r)).copy()
    assert_grad(g, x0, dnet, rng, "crossnet dx0")
    grads = {q.name: to_numpy(q.grad).copy() for q in net.params}
    for q in net.params:
        assert_grad(g, q.data, grads[q.name], rng, q.name, k=6)
    f()
    layer.backward(r)
    grads = {q.name: to_numpy(q.grad).copy() for q in layer.params}
    for q in layer.params:
        assert_grad(f, q.data, grads[q.name], rng, q.name, k=6)


def test_grad_ready_announces_every_parameter_once(xp):
    p = FlatParameters(xp, F64)
    mlp = MLP(p, "m", [3, 4, 2])
    p.build()
    seen = []
    p.add_ready_hook(lambda q: seen.append(q.name))
    mlp.forward(xp.ones((2, 3)))
    mlp.backward(xp.ones((2, 2)))
    assert seen == ["m.1.weight", "m.1.bias", "m.0.weight", "m.0.bias"]


# --- losses ------------------------------------------------------------------------------

def test_bce_with_logits_matches_reference_and_gradient(xp):
    rng = np.random.default_rng(9)
    z = xp.asarray(rng.standard_normal(50) * 3)
    y = xp.asarray((rng.random(50) > 0.4).astype(np.float64))
    loss, g = bce_with_logits(z, y, denom=200)
    zn, yn = to_numpy(z), to_numpy(y)
    p = 1 / (1 + np.exp(-zn))
    ref = -(yn * np.log(p) + (1 - yn) * np.log(1 - p)).sum() / 200
    assert abs(loss - ref) < 1e-12
    np.testing.assert_allclose(to_numpy(g), (p - yn) / 200, rtol=1e-12)
    assert_grad(lambda: bce_with_logits(z, y, denom=200)[0], z, g, rng, "bce", k=20)


def test_bce_with_logits_is_stable_for_huge_logits():
    z = np.array([-1e4, -100.0, 100.0, 1e4], np.float32)
    y = np.array([1, 0, 1, 0], np.float32)
    loss, g = bce_with_logits(z, y)
    assert np.isfinite(loss) and np.isfinite(g).all() and g.dtype == np.float32
    np.testing.assert_allclose(loss, (1e4 + 0 + 0 + 1e4) / 4, rtol=1e-6)
    np.testing.assert_allclose(g, [-0.25, 0, 0, 0.25], atol=1e-30)
    with pytest.raises(ValueError, match="shape"):
        bce_with_logits(z, y[:3])
    with pytest.raises(ValueError, match="positive"):
        bce_with_logits(z, y, denom=0)


def test_mse(xp):
    rng = np.random.default_rng(10)
    a, b = rand(xp, rng, 9), rand(xp, rng, 9)
    loss, g = mse(a, b, denom=18)
    an, bn = to_numpy(a), to_numpy(b)
    assert abs(loss - ((an - bn) ** 2).sum() / 18) < 1e-12
    assert_grad(lambda: mse(a, b, denom=18)[0], a, g, rng, "mse", k=9)


def test_get_array_module():
    assert get_array_module("numpy") is np and get_array_module(np) is np
    with pytest.raises(ValueError, match="unknown array backend 'torch'"):
        get_array_module("torch")
