"""Losses that return their value and the gradient with respect to their input.

Data-parallel ranks each hold a slice of the global batch; passing
``denom=global_batch`` makes every rank's loss and gradient its share of the
global mean, so that summing over ranks (one allreduce with op "sum") gives
exactly the single-process result on the whole batch.
"""
import numpy as np

from hpctrain.dense.backend import array_module_of, fused_kernels


def _denom(n, denom):
    d = n if denom is None else denom
    if d <= 0:
        raise ValueError(f"loss denominator must be positive, got {d}")
    return float(d)


def _check(name, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{name}: predictions have shape {tuple(a.shape)} but targets have "
                         f"shape {tuple(b.shape)}")


def sigmoid(x):
    """Numerically stable logistic function (a new array)."""
    xp = array_module_of(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0, e) / (1.0 + e)


def bce_with_logits(logits, labels, denom=None):
    """Binary cross-entropy on logits, summed and divided by ``denom``.

    Per sample, ``max(z, 0) - z * y + log(1 + exp(-|z|))``: no overflow for any
    finite logit, and exact for large ``|z|``. NumPy float32/float64 logits go through one
    fused kernel (``dense_ops.bce_with_logits``: the sum in float64 over fixed chunks,
    rounded to the logits' dtype, and the gradient in the same pass).

    Args:
        logits: ``[B]`` raw scores.
        labels: ``[B]`` targets in [0, 1] (same dtype or castable).
        denom: the number of samples in the global batch (default ``B``).

    Returns:
        ``(loss, d_logits)``: the loss as a Python float (this rank's share of the global
        mean) and ``d loss / d logits`` as a ``[B]`` array of the logits' dtype.
    """
    _check("bce_with_logits", logits, labels)
    d = _denom(logits.shape[0], denom)
    fused = _fused(logits)
    if fused is not None:
        grad = np.empty_like(logits)
        total = fused.bce_with_logits(logits, _labels(labels, logits), grad, 1.0 / d)
        return float(total) / d, grad
    per, grad = _bce_terms(logits, labels)
    loss = float(per.sum()) / d
    grad *= 1.0 / d
    return loss, grad


def bce_with_logits_sum(logits, labels, out):
    """``bce_with_logits(logits, labels, denom=1)`` without bringing the loss to the host.

    The summed loss is written into ``out`` (a 0-d array where the logits live), so on a
    GPU the call only enqueues kernels; the caller reads ``out`` when it synchronises
    anyway. The values are those of ``bce_with_logits`` with ``denom=1``, bit for bit.

    Returns:
        ``d_logits`` as a ``[B]`` array of the logits' dtype.
    """
    _check("bce_with_logits_sum", logits, labels)
    fused = _fused(logits)
    if fused is not None:
        grad = np.empty_like(logits)
        out[...] = fused.bce_with_logits(logits, _labels(labels, logits), grad, 1.0)
        return grad
    per, grad = _bce_terms(logits, labels)
    per.sum(out=out)
    return grad


def _fused(z):
    """The fused kernels for 1-D C-ordered NumPy logits (None: the generic code)."""
    if not isinstance(z, np.ndarray) or z.ndim != 1 or not z.flags.c_contiguous:
        return None
    return fused_kernels(np, z.dtype)


def _labels(labels, z):
    return np.ascontiguousarray(labels, dtype=z.dtype)


def _bce_terms(z, labels):
    """Per-sample losses and ``sigmoid(z) - y`` (not yet divided by any denominator)."""
    xp = array_module_of(z)
    y = xp.asarray(labels, dtype=z.dtype)
    e = xp.exp(-xp.abs(z))
    per = xp.log1p(e)
    per += xp.maximum(z, 0)
    per -= z * y
    # sigmoid(z) = 1/(1+e) for z >= 0 and e/(1+e) for z < 0, with e = exp(-|z|) <= 1.
    grad = xp.where(z >= 0, 1.0, e).astype(z.dtype, copy=False)
    grad /= 1.0 + e
    grad -= y
    return per, grad


def mse(pred, target, denom=None):
    """Mean squared error ``sum((pred - target)^2) / denom``.

    Returns:
        ``(loss, d_pred)`` as in ``bce_with_logits``.
    """
    _check("mse", pred, target)
    xp = array_module_of(pred)
    d = _denom(pred.shape[0], denom)
    diff = pred - xp.asarray(target, dtype=pred.dtype)
    loss = float((diff * diff).sum()) / d
    diff *= 2.0 / d
    return loss, diff
