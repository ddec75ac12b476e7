"""Sparse optimizers of embedding tables: configuration and NumPy reference updates.

The table applies these updates fused, one pass per row, in Cython
(kernels/table_optim.pxi). The functions here are the plain NumPy definitions the
kernels are tested against. Both compute in float64 from the float32 state and round
once to float32 on store. In every update ``g`` is the row's gradient plus weight decay,
``g = grad + weight_decay * w`` (coupled L2, as in ``torch.optim`` with ``weight_decay``).

==================  ====================  ================================================
kind                state (slots)         update of one row (element-wise unless noted)
==================  ====================  ================================================
``sgd``             none                  w -= lr * g
``momentum``        momentum[dim]         m = momentum * m + g;  w -= lr * m
``nesterov``        momentum[dim]         m = momentum * m + g;
                                          w -= lr * (g + momentum * m)
``adagrad``         accumulator[dim]      a += g^2;  w -= lr * g / (sqrt(a) + eps)
``rowwise_adagrad`` accumulator[1]        a += mean(g^2) (one per row);
                                          w -= lr * g / (sqrt(a) + eps)
``adam``            exp_avg[dim],         t = the row's own update count (lazy Adam);
                    exp_avg_sq[dim]       m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
                                          w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
``ftrl``            linear[dim] (z),      p = -lr_power;  n' = n + g^2;
                    accumulator[dim] (n)  z += g - (n'^p - n^p) / lr * w;  n = n';
                                          w = 0 if |z| <= l1
                                          else -(z - sign(z) l1) / (n'^p / lr + l2)
==================  ====================  ================================================

Accumulators (``adagrad``, ``rowwise_adagrad``, FTRL's ``n``) start at
``initial_accumulator``; every other slot starts at zero.
"""
import dataclasses
import math

import numpy as np

from hpctrain.errors import ConfigError
from hpctrain.sparse.policies import from_fields

KINDS = ("sgd", "momentum", "nesterov", "adagrad", "rowwise_adagrad", "adam", "ftrl")

# The hyper-parameters each kind's update reads (the table above); the others are ignored.
HYPERPARAMETERS = {
    "sgd": ("lr", "weight_decay"),
    "momentum": ("lr", "momentum", "weight_decay"),
    "nesterov": ("lr", "momentum", "weight_decay"),
    "adagrad": ("lr", "eps", "initial_accumulator", "weight_decay"),
    "rowwise_adagrad": ("lr", "eps", "initial_accumulator", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "ftrl": ("lr", "l1", "l2", "lr_power", "initial_accumulator"),
}
# Valid values of each hyper-parameter: (low, low included, high, high included); None: unbounded.
RANGES = {
    "lr": (0.0, False, None, False), "momentum": (0.0, True, 1.0, False),
    "beta1": (0.0, True, 1.0, False), "beta2": (0.0, True, 1.0, False),
    "eps": (0.0, False, None, False), "initial_accumulator": (0.0, True, None, False),
    "l1": (0.0, True, None, False), "l2": (0.0, True, None, False),
    "lr_power": (None, False, 0.0, True), "weight_decay": (0.0, True, None, False),
}

# slot names per kind, in storage order (slot0, slot1); "row" marks a one-float-per-row slot
_SLOTS = {
    "sgd": (),
    "momentum": (("momentum", "dim"),),
    "nesterov": (("momentum", "dim"),),
    "adagrad": (("accumulator", "dim"),),
    "rowwise_adagrad": (("accumulator", "row"),),
    "adam": (("exp_avg", "dim"), ("exp_avg_sq", "dim")),
    "ftrl": (("linear", "dim"), ("accumulator", "dim")),
}


@dataclasses.dataclass(frozen=True)
class SparseOptimizer:
    """Hyper-parameters of a table's sparse optimizer (see the module docstring for equations).

    Args:
        kind: one of ``KINDS``.
        lr: learning rate (> 0).
        momentum: momentum factor of ``momentum``/``nesterov`` in [0, 1).
        beta1, beta2: Adam's moment decay rates in [0, 1).
        eps: denominator guard of Adagrad and Adam (> 0).
        initial_accumulator: start value of Adagrad/FTRL accumulators (>= 0).
        l1, l2: FTRL's L1 and L2 regularisation strengths (>= 0).
        lr_power: FTRL's learning-rate power (<= 0; -0.5 is the classic FTRL-Proximal).
        weight_decay: coupled L2 weight decay added to every gradient (>= 0).

    Raises:
        ConfigError: naming the field when a value is out of range.
    """

    kind: str = "adagrad"
    lr: float = 0.01
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    initial_accumulator: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    lr_power: float = -0.5
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"optimizer kind must be one of {', '.join(KINDS)}; "
                              f"got {self.kind!r}")
        for name, (lo, lo_incl, hi, hi_incl) in RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise ConfigError(f"optimizer {name} must be a number; got {v!r}")
            if not math.isfinite(float(v)):
                raise ConfigError(f"optimizer {name} must be finite; got {v!r}")
            v = float(v)
            object.__setattr__(self, name, v)
            ok = (lo is None or v > lo or (lo_incl and v == lo)) and \
                (hi is None or v < hi or (hi_incl and v == hi))
            _check(ok, name, v, range_text(lo, lo_incl, hi, hi_incl))

    @classmethod
    def from_any(cls, spec):
        """A SparseOptimizer from an instance, a kind name, or a dict of fields.

        Raises:
            ConfigError: on an unknown kind or field, or a bad value.
        """
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)
        if isinstance(spec, dict):
            return from_fields(cls, spec, "optimizer")
        raise ConfigError(f"optimizer must be a SparseOptimizer, a kind name or a dict; "
                          f"got {type(spec).__name__}")

    def slot_specs(self, dim):
        """``[(name, width, initial value)]`` of this optimizer's per-row state."""
        out = []
        for name, width in _SLOTS[self.kind]:
            init = self.initial_accumulator if name == "accumulator" else 0.0
            out.append((name, dim if width == "dim" else 1, init))
        return out

    def slot_floats(self, dim):
        """Optimizer state floats per row (the ``slots * dim`` term of the memory bound)."""
        return sum(w for _, w, _ in self.slot_specs(dim))


def range_text(lo, lo_incl, hi, hi_incl):
    """A ``RANGES`` entry in words: "> 0", "in [0, 1)", "<= 0"."""
    if lo is not None and hi is not None:
        return f"in {'[' if lo_incl else '('}{lo:g}, {hi:g}{']' if hi_incl else ')'}"
    if lo is not None:
        return f"{'>=' if lo_incl else '>'} {lo:g}"
    return f"{'<=' if hi_incl else '<'} {hi:g}"


def _check(ok, name, value, want):
    if not ok:
        raise ConfigError(f"optimizer {name} must be {want}; got {value!r}")


# ----------------------------------------------------------------------------- references

def reference_update(opt, values, slots, grads, opt_step=None):
    """Textbook update of rows ``values`` (float32[n, dim]) by ``grads``; NumPy reference.

    Args:
        opt: a SparseOptimizer.
        values: float32[n, dim] current weights of the updated rows.
        slots: dict slot name -> float32[n, width] state of those rows.
        grads: float32[n, dim] one gradient per row (rows are distinct).
        opt_step: int64[n] per-row update counts before this update (Adam only).

    Returns:
        ``(new_values, new_slots, new_opt_step)``, float32 like the table stores them.
    """
    w = np.asarray(values, np.float64)
    g = np.asarray(grads, np.float64) + opt.weight_decay * w
    s = {k: np.asarray(v, np.float64) for k, v in slots.items()}
    t = None if opt_step is None else np.asarray(opt_step, np.int64) + (opt.kind == "adam")
    w = _REFERENCES[opt.kind](opt, w, g, s, t)
    return w.astype(np.float32), {k: v.astype(np.float32) for k, v in s.items()}, t


def sgd_reference(opt, w, g, s, t):
    """w -= lr * g."""
    return w - opt.lr * g


def momentum_reference(opt, w, g, s, t):
    """Heavy-ball momentum (PyTorch's form): m = mu m + g; w -= lr m."""
    s["momentum"] = opt.momentum * s["momentum"] + g
    return w - opt.lr * s["momentum"]


def nesterov_reference(opt, w, g, s, t):
    """Nesterov momentum (PyTorch's form): m = mu m + g; w -= lr (g + mu m)."""
    s["momentum"] = opt.momentum * s["momentum"] + g
    return w - opt.lr * (g + opt.momentum * s["momentum"])


def adagrad_reference(opt, w, g, s, t):
    """Adagrad (Duchi et al. 2011): a += g^2; w -= lr g / (sqrt(a) + eps)."""
    s["accumulator"] = s["accumulator"] + g * g
    return w - opt.lr * g / (np.sqrt(s["accumulator"]) + opt.eps)


def rowwise_adagrad_reference(opt, w, g, s, t):
    """Row-wise Adagrad (FBGEMM): one accumulator per row, a += mean(g^2)."""
    s["accumulator"] = s["accumulator"] + np.mean(g * g, axis=1, keepdims=True)
    return w - opt.lr * g / (np.sqrt(s["accumulator"]) + opt.eps)


def adam_reference(opt, w, g, s, t):
    """Adam (Kingma & Ba 2015) with lazy, per-row step counts ``t`` (already incremented)."""
    b1, b2 = opt.beta1, opt.beta2
    s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
    s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
    tt = t.astype(np.float64)[:, None]
    m_hat = s["exp_avg"] / (1 - b1 ** tt)
    v_hat = s["exp_avg_sq"] / (1 - b2 ** tt)
    return w - opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps)


def ftrl_reference(opt, w, g, s, t):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate, with p = -lr_power."""
    p, lr = -opt.lr_power, opt.lr
    n_old = s["accumulator"]
    n_new = n_old + g * g
    z = s["linear"] + g - (n_new ** p - n_old ** p) / lr * w
    s["linear"], s["accumulator"] = z, n_new
    return np.where(np.abs(z) <= opt.l1, 0.0,
                    -(z - np.sign(z) * opt.l1) / (n_new ** p / lr + opt.l2))


_REFERENCES = {
    "sgd": sgd_reference, "momentum": momentum_reference, "nesterov": nesterov_reference,
    "adagrad": adagrad_reference, "rowwise_adagrad": rowwise_adagrad_reference,
    "adam": adam_reference, "ftrl": ftrl_reference,
}
