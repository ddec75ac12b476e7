"""Dense optimizers that update the whole flat parameter buffer in a few array operations.

Each optimizer keeps its state (momentum, squared-gradient sums, ...) as flat
buffers of the same layout as ``FlatParameters.data``, plus one scratch buffer,
so a step allocates nothing. On NumPy, Adam(W) and Adagrad run as one fused pass over
the buffers (``hpctrain._kernels.dense_ops``, over the rank's threads) that does the
float operations below in the same order: the same bits as the array code. Alignment padding holds zeros in parameters,
gradients and state, and stays zero under every rule below.

=============  ===========================================================================
kind           update (g = grad + weight_decay * p, except AdamW)
=============  ===========================================================================
sgd            p -= lr * g
momentum       b = mu * b + g;  p -= lr * b
nesterov       b = mu * b + g;  p -= lr * (g + mu * b)
adagrad        s += g^2;  p -= lr * g / (sqrt(s) + eps)
adam           m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
               p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
adamw          p *= 1 - lr * weight_decay, then adam with g = grad
=============  ===========================================================================
"""
import inspect
import math

import numpy as np

from hpctrain.dense.backend import fused_kernels, to_numpy
from hpctrain.errors import CheckpointError


class Optimizer:
    """Base class: ``step()``, ``state_dict()``, ``load_state_dict()``.

    Args:
        params: the model's ``FlatParameters`` (built).
        lr: learning rate (may be changed between steps; a ``schedule`` sets it every step).
        weight_decay: L2 coefficient.
    """

    kind = None
    slots = ()
    #: ``step -> lr`` (``hpctrain.dense.schedule.LrSchedule``), or None: ``lr`` stays as set.
    schedule = None

    def __init__(self, params, lr, weight_decay=0.0):
        if params.data is None:
            raise ValueError("optimizer needs built FlatParameters (call params.build first)")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"{self.kind}: lr and weight_decay must be >= 0, "
                             f"got lr={lr}, weight_decay={weight_decay}")
        self.params = params
        self.xp = params.xp
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.state = {name: self.xp.zeros_like(params.data) for name in self.slots}
        self._tmp = self.xp.empty_like(params.data)
        self._g = None

    def _grad(self):
        """The gradient with L2 decay folded in (the grad buffer itself when there is none).

        The decayed gradient goes to its own buffer, so ``_tmp`` stays free for the rule.
        """
        g = self.params.grad
        if self.weight_decay == 0.0:
            return g
        if self._g is None:
            self._g = self.xp.empty_like(g)
        t = self.xp.multiply(self.params.data, self.weight_decay, out=self._g)
        t += g
        return t

    def step(self, at=None):
        """Apply one update from ``params.grad`` to ``params.data``.

        Args:
            at: the training step (1-based) this update belongs to; with a ``schedule`` the
                update takes ``lr = schedule(at)`` (default: this optimizer's step count + 1).
        """
        if self.schedule is not None:
            self.lr = float(self.schedule(self.step_count + 1 if at is None else at))
        self.step_count += 1
        self._update()

    def _update(self):
        raise NotImplementedError

    def state_dict(self):
        """``{"step": int64 0-d array, SLOT: float NumPy array, ...}`` (for checkpoints)."""
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for name, buf in self.state.items():
            out[name] = np.array(to_numpy(buf))
        return out

    def load_state_dict(self, state):
        """Restore from ``state_dict()`` output.

        Raises:
            CheckpointError: keys or buffer sizes do not match this optimizer.
        """
        want = {"step", *self.slots}
        if set(state) != want:
            raise CheckpointError(f"{self.kind} optimizer state: expected keys {sorted(want)}, "
                                  f"got {sorted(state)}")
        for name in self.slots:
            v = np.asarray(state[name])
            if v.shape != self.state[name].shape:
                raise CheckpointError(f"{self.kind} optimizer state {name!r}: expected shape "
                                      f"{tuple(self.state[name].shape)}, got {v.shape}")
        for name in self.slots:
            self.state[name][...] = self.xp.asarray(np.asarray(state[name],
                                                               dtype=self.params.dtype))
        self.step_count = int(np.asarray(state["step"]))


class SGD(Optimizer):
    """Plain stochastic gradient descent."""

    kind = "sgd"

    def _update(self):
        g = self._grad()
        t = self.xp.multiply(g, self.lr, out=self._tmp)
        self.params.data -= t


class Momentum(Optimizer):
    """Heavy-ball momentum (``nesterov=True`` for Nesterov's variant)."""

    kind = "momentum"
    slots = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _update(self):
        xp, b, mu = self.xp, self.state["momentum_buffer"], self.momentum
        g = self._grad()
        b *= mu
        b += g
        if self.nesterov:
            t = xp.multiply(b, mu, out=self._tmp)
            t += g
            t *= self.lr
        else:
            t = xp.multiply(b, self.lr, out=self._tmp)
        self.params.data -= t


class Adagrad(Optimizer):
    """Adagrad: per-coordinate step sizes from the sum of squared gradients."""

    kind = "adagrad"
    slots = ("sum",)

    def __init__(self, params, lr, eps=1e-10, initial_accumulator=0.0, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.eps = float(eps)
        if initial_accumulator:
            self.state["sum"].fill(initial_accumulator)

    def _update(self):
        xp, acc = self.xp, self.state["sum"]
        fused = fused_kernels(xp, self.params.dtype)
        if fused is not None:
            fused.adagrad(self.params.data, self.params.grad, acc, self.lr, self.eps,
                          self.weight_decay)
            return
        g = self._grad()
        t = xp.multiply(g, g, out=self._tmp)
        acc += t
        xp.sqrt(acc, out=t)
        t += self.eps
        xp.divide(g, t, out=t)
        t *= self.lr
        self.params.data -= t


class Adam(Optimizer):
    """Adam with bias correction; ``decoupled=True`` (AdamW) decays weights directly."""

    kind = "adam"
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=False):
        super().__init__(params, lr, weight_decay)
        for n, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{n} must be in [0, 1), got {b}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.decoupled = bool(decoupled)
        if self.decoupled:
            self.kind = "adamw"

    def _update(self):
        xp, m, v, p = self.xp, self.state["exp_avg"], self.state["exp_avg_sq"], self.params.data
        b1, b2, t = self.beta1, self.beta2, self.step_count
        # lr/bc1 * m / (sqrt(v/bc2) + eps) == (lr sqrt(bc2)/bc1) * m / (sqrt(v) + eps sqrt(bc2)):
        # one pass fewer over the buffer.
        rbc2 = math.sqrt(1.0 - b2 ** t)
        eps, step_size = self.eps * rbc2, self.lr * rbc2 / (1.0 - b1 ** t)
        fused = fused_kernels(xp, p.dtype)
        if fused is not None:
            decay = 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0
            fused.adam(p, self.params.grad, m, v, b1, b2, eps, step_size,
                       0.0 if self.decoupled else self.weight_decay, decay)
            return
        if self.decoupled:
            if self.weight_decay:
                p *= 1.0 - self.lr * self.weight_decay
            g = self.params.grad
        else:
            g = self._grad()
        s = self._tmp
        m *= b1
        xp.multiply(g, 1.0 - b1, out=s)
        m += s
        v *= b2
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s
        xp.sqrt(v, out=s)
        s += eps
        xp.divide(m, s, out=s)
        s *= step_size
        p -= s


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    kind = "adamw"

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, beta1, beta2, eps, weight_decay, decoupled=True)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Momentum, "adagrad": Adagrad,
              "adam": Adam, "adamw": AdamW}
# The hyper-parameters (keyword arguments) each kind takes, read off the constructors.
HYPERPARAMETERS = {kind: tuple(p for p in inspect.signature(cls).parameters
                               if p not in ("params", "nesterov", "decoupled"))
                   for kind, cls in OPTIMIZERS.items()}
# The defaults the constructors declare (Adam and AdamW: lr = 1e-3), read off them too.
DEFAULTS = {kind: {p.name: p.default for p in inspect.signature(cls).parameters.values()
                   if p.name in HYPERPARAMETERS[kind] and p.default is not p.empty}
            for kind, cls in OPTIMIZERS.items()}


def make_optimizer(kind, params, **kwargs):
    """Build a dense optimizer over ``params`` by name.

    Args:
        kind: one of sgd, momentum, nesterov, adagrad, adam, adamw.
        params: the model's ``FlatParameters``.
        **kwargs: the optimizer's hyperparameters (lr, momentum, beta1, beta2, eps,
            weight_decay, initial_accumulator, ...).

    Raises:
        ValueError: unknown kind. TypeError: a hyperparameter the kind does not take.
    """
    try:
        cls = OPTIMIZERS[kind]
    except KeyError:
        raise ValueError(f"unknown dense optimizer {kind!r}; expected one of "
                         f"{sorted(OPTIMIZERS)}") from None
    if kind == "nesterov":
        kwargs["nesterov"] = True
    try:
        return cls(params, **kwargs)
    except TypeError as e:
        raise TypeError(f"dense optimizer {kind!r}: {e}") from None


def dense_state_dict(params, optimizer=None):
    """Everything dense a checkpoint needs, as one flat dict of NumPy arrays.

    Keys are ``"params/<parameter name>"`` and ``"optimizer/<slot>"`` (``step``
    included), ready for ``CheckpointManager.save(dense=...)``.
    """
    out = {f"params/{k}": v for k, v in params.state_dict().items()}
    if optimizer is not None:
        out.update({f"optimizer/{k}": v for k, v in optimizer.state_dict().items()})
    return out


def load_dense_state_dict(params, optimizer, state):
    """Restore what ``dense_state_dict`` saved (``optimizer`` may be None to skip its state).

    Raises:
        CheckpointError: names, shapes or optimizer slots do not match.
    """
    unknown = sorted(k for k in state if not k.startswith(("params/", "optimizer/")))
    if unknown:
        raise CheckpointError(f"dense state has keys outside params/ and optimizer/: {unknown}")
    params.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("params/")})
    if optimizer is not None:
        optimizer.load_state_dict({k[10:]: v for k, v in state.items()
                                   if k.startswith("optimizer/")})
