"""DLRM, Wide & Deep and DeepFM: finite-difference gradient checks of the loss in float64
(every parameter tensor and every embedding), plain-NumPy forward references, and API checks."""
import numpy as np
import pytest

from hpctrain.dense import DLRM, DeepFM, WideAndDeep, bce_with_logits, to_numpy
from hpctrain.errors import CheckpointError

from test_dense_layers import assert_grad, check_param_grads

F64 = np.float64
B = 6


def _inputs(xp, rng, num_dense, dims):
    dense = xp.asarray(rng.standard_normal((B, num_dense)))
    embs = [xp.asarray(rng.standard_normal((B, d)) * 0.5) for d in dims]
    labels = xp.asarray((rng.random(B) > 0.5).astype(np.float64))
    return dense, embs, labels


def _nonzero_biases(model, rng):
    # Biases start at zero; random ones make the checks cover their effect on the output.
    for p in model.params.params:
        if p.name.endswith("bias"):
            p.data[...] = model.xp.asarray(rng.standard_normal(p.shape) * 0.1)


def _check_model(model, dense, embs, labels, rng, denom=10):
    def loss():
        return bce_with_logits(model.forward(dense, embs), labels, denom=denom)[0]

    _, d_logits = bce_with_logits(model.forward(dense, embs), labels, denom=denom)
    d_embs = [to_numpy(g).copy() for g in model.backward(d_logits)]
    assert len(d_embs) == len(embs)
    for i, (e, g) in enumerate(zip(embs, d_embs)):
        assert g.shape == tuple(e.shape)
        assert_grad(loss, e, g, rng, f"d_emb{i}", k=4)
    check_param_grads(loss, model.params, rng, k=5)


def _mlp_ref(x, params, prefix, n, last_relu):
    for i in range(n):
        x = x @ params[f"{prefix}.{i}.weight"] + params[f"{prefix}.{i}.bias"]
        if i < n - 1 or last_relu:
            x = np.maximum(x, 0)
    return x


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dlrm_gradients_and_reference(xp, self_interaction):
    rng = np.random.default_rng(20)
    model = DLRM(4, [3] * 5, bottom=[8, 5], top=[7, 4, 1], xp=xp, seed=1, dtype=F64,
                 self_interaction=self_interaction)
    _nonzero_biases(model, rng)
    dense, embs, labels = _inputs(xp, rng, 4, [3] * 5)
    # reference forward written independently with plain NumPy
    P = {k: to_numpy(v) for k, v in model.params.named().items()}
    x = _mlp_ref(to_numpy(dense), P, "bottom", 3, True)  # 4-8-5-3 (width d appended)
    t = np.stack([x] + [to_numpy(e) for e in embs], axis=1)
    n = t.shape[1]
    z = np.einsum("bid,bjd->bij", t, t)
    pairs = [z[:, i, j] for i in range(n) for j in range(i + (1 if self_interaction else 0))]
    top_in = np.concatenate([x, np.stack(pairs, axis=1)], axis=1)
    ref = _mlp_ref(top_in, P, "top", 3, False)[:, 0]
    np.testing.assert_allclose(to_numpy(model.forward(dense, embs)), ref, rtol=1e-10)
    _check_model(model, dense, embs, labels, rng)


def test_wide_and_deep_gradients_and_reference(xp):
    rng = np.random.default_rng(21)
    model = WideAndDeep(3, [1, 1, 1], [4, 2], hidden=[6, 5], xp=xp, seed=2, dtype=F64)
    _nonzero_biases(model, rng)
    model.params["wide.weight"][...] = xp.asarray(rng.standard_normal((3, 1)))
    dense, embs, labels = _inputs(xp, rng, 3, [1, 1, 1, 4, 2])
    P = {k: to_numpy(v) for k, v in model.params.named().items()}
    e = [to_numpy(a) for a in embs]
    deep = _mlp_ref(np.concatenate([to_numpy(dense), e[3], e[4]], axis=1), P, "deep", 3, False)
    wide = (to_numpy(dense) @ P["wide.weight"])[:, 0] + e[0][:, 0] + e[1][:, 0] + e[2][:, 0]
    ref = deep[:, 0] + wide
    np.testing.assert_allclose(to_numpy(model.forward(dense, embs)), ref, rtol=1e-10)
    _check_model(model, dense, embs, labels, rng)


def test_wide_and_deep_without_dense_features(xp):
    rng = np.random.default_rng(22)
    model = WideAndDeep(0, [1], [3, 3], hidden=[4], xp=xp, dtype=F64)
    dense, embs, labels = _inputs(xp, rng, 0, [1, 3, 3])
    _check_model(model, dense, embs, labels, rng)


def test_deepfm_gradients_and_reference(xp):
    rng = np.random.default_rng(23)
    model = DeepFM(2, [3] * 4, hidden=[5, 4], wide_dims=[1, 1], xp=xp, seed=3, dtype=F64)
    _nonzero_biases(model, rng)
    model.params["linear.weight"][...] = xp.asarray(rng.standard_normal((2, 1)))
    dense, embs, labels = _inputs(xp, rng, 2, [3, 3, 3, 3, 1, 1])
    P = {k: to_numpy(v) for k, v in model.params.named().items()}
    e = [to_numpy(a) for a in embs]
    fm = sum((e[i] * e[j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    deep = _mlp_ref(np.concatenate([to_numpy(dense)] + e[:4], axis=1), P, "deep", 3, False)
    ref = deep[:, 0] + fm + (to_numpy(dense) @ P["linear.weight"])[:, 0] + e[4][:, 0] + e[5][:, 0]
    np.testing.assert_allclose(to_numpy(model.forward(dense, embs)), ref, rtol=1e-10)
    _check_model(model, dense, embs, labels, rng)


def test_models_with_dropout_train_and_eval(xp):
    rng = np.random.default_rng(24)
    model = DeepFM(2, [3] * 3, hidden=[16, 16], xp=xp, seed=3, dtype=F64, dropout=0.5)
    dense, embs, _ = _inputs(xp, rng, 2, [3] * 3)
    a = to_numpy(model.forward(dense, embs, training=False))
    b = to_numpy(model.forward(dense, embs, training=False))
    c = to_numpy(model.forward(dense, embs, training=True))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    model.reseed_dropout(7)
    c1 = to_numpy(model.forward(dense, embs))
    model.reseed_dropout(7)
    assert np.array_equal(c1, to_numpy(model.forward(dense, embs)))


def test_logits_are_fresh_arrays_and_float32_works():
    rng = np.random.default_rng(25)
    model = DLRM(3, [4] * 2, bottom=[8], top=[8, 1])
    dense = rng.standard_normal((5, 3)).astype(np.float32)
    embs = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(2)]
    y1 = model.forward(dense, embs)
    y2 = model.forward(dense * 2, embs)
    assert y1.dtype == np.float32 and y1.shape == (5,) and not np.array_equal(y1, y2)
    d = model.backward(np.ones(5, np.float32))
    assert all(g.dtype == np.float32 and g.shape == (5, 4) for g in d)
    assert model.params.grad.dtype == np.float32 and np.abs(model.params.grad).sum() > 0


def test_model_argument_and_input_errors():
    with pytest.raises(ValueError, match="one width"):
        DLRM(3, [4, 8])
    with pytest.raises(ValueError, match="end in 1"):
        DLRM(3, [4, 4], top=[8, 2])
    with pytest.raises(ValueError, match="dim 1"):
        WideAndDeep(3, [1, 2], [4])
    m = DLRM(3, [4] * 2, bottom=[8], top=[8, 1])
    with pytest.raises(ValueError, match=r"dense features have shape \(5, 2\), expected \(B, 3\)"):
        m.forward(np.zeros((5, 2)), [np.zeros((5, 4))] * 2)
    with pytest.raises(ValueError, match="expected 2 embeddings, got 1"):
        m.forward(np.zeros((5, 3)), [np.zeros((5, 4))])
    with pytest.raises(ValueError, match=r"embedding 1 has shape \(5, 3\), expected \(5, 4\)"):
        m.forward(np.zeros((5, 3)), [np.zeros((5, 4)), np.zeros((5, 3))])


def test_model_state_dict_roundtrip():
    a = DLRM(3, [4] * 2, bottom=[8], top=[8, 1], seed=1)
    b = DLRM(3, [4] * 2, bottom=[8], top=[8, 1], seed=2)
    assert not np.array_equal(a.params.data, b.params.data)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.params.data, b.params.data)
    c = DLRM(3, [4] * 2, bottom=[16], top=[8, 1])
    with pytest.raises(CheckpointError, match="bottom.0.weight"):
        c.load_state_dict(a.state_dict())


def test_row_blocked_linears_give_the_same_step():
    from hpctrain.dense.layers import Linear
    rng = np.random.default_rng(26)
    a = DLRM(4, [3] * 5, bottom=[8, 5], top=[7, 4, 1], seed=1, dtype=F64)
    b = DLRM(4, [3] * 5, bottom=[8, 5], top=[7, 4, 1], seed=1, dtype=F64)
    for layer in b.bottom.layers + b.top.layers:
        if isinstance(layer, Linear):
            layer.block_rows = 3  # NumPy splits big batches into row blocks; force it at B=10
    b.interaction.block_rows = 4
    dense = rng.standard_normal((10, 4))
    embs = [rng.standard_normal((10, 3)) for _ in range(5)]
    ya, yb = a.forward(dense, embs), b.forward(dense, embs)
    np.testing.assert_allclose(yb, ya, rtol=1e-13)
    g = rng.standard_normal(10)
    for da, db in zip(a.backward(g), b.backward(g)):
        np.testing.assert_allclose(db, da, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.params.grad, a.params.grad, rtol=1e-12, atol=1e-15)
