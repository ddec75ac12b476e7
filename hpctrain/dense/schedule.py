"""Learning-rate schedules of the dense optimizer and clipping of the dense gradient.

The learning rate of step ``s`` (1-based, the step being trained) is a pure function of
``s``, so a resumed run takes exactly the learning rates of an uninterrupted one. With
``t = s - 1`` (the steps already taken), base rate ``lr``, warm-up ``W`` and decay length
``D``::

    t <  W       lr * (t + 1) / W                              linear warm-up
    t >= W       k = t - W (steps since the warm-up ended)
      none       lr
      linear     min_lr + (lr - min_lr) * (1 - min(k, D) / D)
      cosine     min_lr + (lr - min_lr) * (1 + cos(pi * min(k, D) / D)) / 2
      step       lr * gamma ** floor(k / step_size)

Clipping (``clip_norm``) scales the whole flat gradient by ``clip_norm / (norm + 1e-6)``
when its L2 norm exceeds ``clip_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule). The
trainer clips the reduced gradient, which is the same on every rank, so every rank clips
identically and the world-size invariance of the losses holds.
"""
import math

from hpctrain.dense.backend import array_module_of

DECAYS = ("none", "linear", "cosine", "step")

#: Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


class LrSchedule:
    """``schedule(step) -> lr``: warm-up, then one decay (see the module docstring).

    Args:
        lr: the base (peak) learning rate, the optimizer's ``lr``.
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr`` (0: none).
        decay: "none", "linear", "cosine" or "step".
        decay_steps: steps of the linear/cosine decay after the warm-up.
        min_lr: the rate at the end of a linear/cosine decay (and after it).
        step_size, gamma: "step" multiplies the rate by ``gamma`` every ``step_size`` steps.
    """

    def __init__(self, lr, warmup_steps=0, decay="none", decay_steps=None, min_lr=0.0,
                 step_size=None, gamma=0.1):
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if decay in ("linear", "cosine") and not (decay_steps and decay_steps >= 1):
            raise ValueError(f"decay {decay!r} needs decay_steps >= 1, got {decay_steps}")
        if decay == "step" and not (step_size and step_size >= 1):
            raise ValueError(f"decay 'step' needs step_size >= 1, got {step_size}")
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"min_lr must be in [0, lr = {lr}], got {min_lr}")
        self.lr, self.warmup_steps, self.decay = float(lr), int(warmup_steps), decay
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        self.min_lr, self.gamma = float(min_lr), float(gamma)
        self.step_size = None if step_size is None else int(step_size)

    def __call__(self, step):
        """The learning rate of (1-based) ``step``."""
        t = max(int(step), 1) - 1
        if t < self.warmup_steps:
            return self.lr * (t + 1) / self.warmup_steps
        k = t - self.warmup_steps
        if self.decay == "none":
            return self.lr
        if self.decay == "step":
            return self.lr * self.gamma ** (k // self.step_size)
        frac = min(k, self.decay_steps) / self.decay_steps
        if self.decay == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - frac)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def __repr__(self):
        return (f"LrSchedule(lr={self.lr}, warmup_steps={self.warmup_steps}, "
                f"decay={self.decay!r}, decay_steps={self.decay_steps}, min_lr={self.min_lr}, "
                f"step_size={self.step_size}, gamma={self.gamma})")


def grad_norm(grad, scratch=None):
    """The L2 norm of a flat gradient (NumPy or CuPy), summed in float64.

    ``scratch``: a buffer like ``grad`` for the squares (else one is allocated). The sum is
    NumPy's (CuPy's) pairwise reduction, not BLAS, so it does not depend on thread counts.
    """
    xp = array_module_of(grad)
    sq = xp.multiply(grad, grad, out=scratch) if scratch is not None else grad * grad
    return math.sqrt(float(sq.sum(dtype=xp.float64)))


def clip_gradient(grad, max_norm, scratch=None):
    """Scale ``grad`` in place so that its L2 norm is at most ``max_norm``.

    Returns:
        The norm before clipping (``grad`` is unchanged when it is <= ``max_norm`` or not
        finite: a non-finite gradient is left for the non-finite checks to report).
    """
    norm = grad_norm(grad, scratch)
    if math.isfinite(norm) and norm > max_norm:
        grad *= grad.dtype.type(max_norm / (norm + CLIP_EPS))
    return norm
