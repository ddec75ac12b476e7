"""Dense optimizers on the flat buffer against per-tensor NumPy references; checkpoint state."""
import numpy as np
import pytest

from hpctrain.dense import FlatParameters, make_optimizer, to_numpy
from hpctrain.errors import CheckpointError

SHAPES = {"a.weight": (5, 3), "a.bias": (3,), "b.weight": (3, 7), "b.bias": (1,)}

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.01)),
    ("momentum", dict(lr=0.05, momentum=0.9)),
    ("momentum", dict(lr=0.05, momentum=0.8, weight_decay=0.02)),
    ("nesterov", dict(lr=0.05, momentum=0.9)),
    ("adagrad", dict(lr=0.1, eps=1e-10)),
    ("adagrad", dict(lr=0.1, initial_accumulator=0.1, weight_decay=0.01)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01)),
    ("adamw", dict(lr=0.01, weight_decay=0.1)),
]


class Reference:
    """The textbook rule for one tensor, written independently of the flat buffer."""

    def __init__(self, kind, hp, p):
        self.kind, self.hp, self.t = kind, hp, 0
        self.m = np.zeros_like(p)
        self.v = np.full_like(p, hp.get("initial_accumulator", 0.0)) if kind == "adagrad" \
            else np.zeros_like(p)

    def step(self, p, g):
        hp, k = self.hp, self.kind
        lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
        self.t += 1
        if k != "adamw":
            g = g + wd * p
        if k == "sgd":
            return p - lr * g
        if k in ("momentum", "nesterov"):
            mu = hp["momentum"]
            self.m = mu * self.m + g
            return p - lr * (g + mu * self.m if k == "nesterov" else self.m)
        if k == "adagrad":
            self.v = self.v + g * g
            return p - lr * g / (np.sqrt(self.v) + hp.get("eps", 1e-10))
        b1, b2, eps = hp.get("beta1", 0.9), hp.get("beta2", 0.999), hp.get("eps", 1e-8)
        if k == "adamw":
            p = p * (1 - lr * wd)
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        mhat, vhat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        return p - lr * mhat / (np.sqrt(vhat) + eps)


def _params(xp, dtype, seed=0):
    p = FlatParameters(xp, dtype)
    for name, shape in SHAPES.items():
        p.add(name, shape, "normal:1.0")
    return p.build(seed)


def _grads(rng, step):
    return {n: rng.standard_normal(s) * (1 + step) for n, s in SHAPES.items()}


def _set_grads(params, grads):
    for n, g in grads.items():
        params.param(n).grad[...] = params.xp.asarray(g)


@pytest.mark.parametrize("kind,hp", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_optimizer_matches_reference(xp, kind, hp):
    rng = np.random.default_rng(30)
    params = _params(xp, np.float64)
    ref_p = {n: to_numpy(v).copy() for n, v in params.named().items()}
    refs = {n: Reference(kind, hp, v) for n, v in ref_p.items()}
    opt = make_optimizer(kind, params, **hp)
    for step in range(5):
        grads = _grads(rng, step)
        _set_grads(params, grads)
        opt.step()
        for n in SHAPES:
            ref_p[n] = refs[n].step(ref_p[n], grads[n])
    for n in SHAPES:
        np.testing.assert_allclose(to_numpy(params[n]), ref_p[n], rtol=1e-12, atol=1e-14,
                                   err_msg=f"{kind} {n}")
    # alignment padding is inert under every rule
    mask = np.ones(params.size, bool)
    for q in params.params:
        mask[q.offset:q.offset + q.size] = False
    assert mask.any() and not to_numpy(params.data)[mask].any()


@pytest.mark.parametrize("kind,hp", [CASES[3], CASES[6], CASES[8]], ids=["mom", "adagrad", "adam"])
def test_float32_tracks_float64(kind, hp):
    rng = np.random.default_rng(31)
    p32, p64 = _params(np, np.float32), _params(np, np.float64)
    o32, o64 = make_optimizer(kind, p32, **hp), make_optimizer(kind, p64, **hp)
    for step in range(5):
        g = _grads(rng, step)
        _set_grads(p32, g)
        _set_grads(p64, g)
        o32.step()
        o64.step()
    for n in SHAPES:  # layouts differ: 64-byte alignment is 16 float32 but 8 float64
        np.testing.assert_allclose(p32[n], p64[n], rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("kind,hp", [CASES[0], CASES[2], CASES[5], CASES[8], CASES[9]],
                         ids=["sgd", "momentum", "adagrad", "adam", "adamw"])
def test_state_dict_resume_equals_uninterrupted(kind, hp):
    rng = np.random.default_rng(32)
    grads = [_grads(rng, s) for s in range(6)]
    a = _params(np, np.float64)
    oa = make_optimizer(kind, a, **hp)
    for g in grads:
        _set_grads(a, g)
        oa.step()
    b = _params(np, np.float64)
    ob = make_optimizer(kind, b, **hp)
    for g in grads[:3]:
        _set_grads(b, g)
        ob.step()
    saved_params, saved_opt = b.state_dict(), ob.state_dict()
    assert all(isinstance(v, np.ndarray) for v in saved_opt.values())
    c = _params(np, np.float64, seed=99)
    c.load_state_dict(saved_params)
    oc = make_optimizer(kind, c, **hp)
    oc.load_state_dict(saved_opt)
    assert oc.step_count == 3
    for g in grads[3:]:
        _set_grads(c, g)
        oc.step()
    np.testing.assert_array_equal(c.data, a.data)


def test_errors():
    p = _params(np, np.float64)
    with pytest.raises(ValueError, match="unknown dense optimizer 'rmsprop'"):
        make_optimizer("rmsprop", p, lr=0.1)
    with pytest.raises(TypeError, match="'sgd'"):
        make_optimizer("sgd", p, lr=0.1, beta1=0.9)
    adam = make_optimizer("adam", p, lr=0.1)
    with pytest.raises(CheckpointError, match="expected keys"):
        adam.load_state_dict(make_optimizer("momentum", p, lr=0.1).state_dict())
    bad = adam.state_dict()
    bad["exp_avg"] = bad["exp_avg"][:-1]
    with pytest.raises(CheckpointError, match="'exp_avg'.*expected shape"):
        adam.load_state_dict(bad)
    with pytest.raises(ValueError, match="built"):
        make_optimizer("sgd", FlatParameters(np), lr=0.1)


def test_dense_state_dict_for_checkpoints():
    from hpctrain.dense import dense_state_dict, load_dense_state_dict
    rng = np.random.default_rng(33)
    a = _params(np, np.float32)
    oa = make_optimizer("adam", a, lr=0.01)
    _set_grads(a, _grads(rng, 0))
    oa.step()
    state = dense_state_dict(a, oa)
    assert set(state) == {f"params/{n}" for n in SHAPES} | {"optimizer/step", "optimizer/exp_avg",
                                                            "optimizer/exp_avg_sq"}
    b = _params(np, np.float32, seed=5)
    ob = make_optimizer("adam", b, lr=0.01)
    load_dense_state_dict(b, ob, state)
    g = _grads(rng, 1)
    for p, o in ((a, oa), (b, ob)):
        _set_grads(p, g)
        o.step()
    np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(CheckpointError, match="outside params/"):
        load_dense_state_dict(b, ob, {**state, "junk": np.zeros(1)})
