"""Argument checks of ``EmbeddingTable``'s batched calls: keys, rows and steps as the kernels
take them (C-contiguous int64 / float32, steps in the int32 range of the row metadata),
with errors that name the argument and the first offending element.
"""
import numpy as np

_MAX_STEP = (1 << 31) - 1    # last update steps are int32 in the row metadata


def as_int64(x, argname, *, uint64_bits=False):
    """``x`` as a contiguous int64[n] array, converting only losslessly.

    Args:
        x: array-like of integers.
        argname: argument name for error messages.
        uint64_bits: accept uint64 input as the same 64 bits (keys are bit patterns).

    Raises:
        TypeError: naming ``argname`` when the dtype cannot be converted without loss.
        ValueError: naming ``argname`` and its shape when it is not 1-D.
    """
    try:
        a = np.asarray(x)
    except (OverflowError, ValueError) as e:
        raise TypeError(f"{argname} must be integers that fit int64: {e}") from None
    if a.ndim != 1:
        raise ValueError(f"{argname} must be 1-D int64[n]; got shape {a.shape}")
    if a.dtype == np.int64:
        return np.ascontiguousarray(a)
    if a.size == 0 and a.dtype.kind in "iuf":  # [] arrives as float64
        return np.empty(0, dtype=np.int64)
    if a.dtype == np.uint64 and uint64_bits:
        return np.ascontiguousarray(a).view(np.int64)
    if a.dtype.kind in "iu" and np.can_cast(a.dtype, np.int64, "safe"):
        return np.ascontiguousarray(a, dtype=np.int64)
    raise TypeError(f"{argname} must be an integer array convertible to int64 without loss; "
                    f"got dtype {a.dtype}")


def as_float32_2d(x, argname, shape):
    """``x`` as a contiguous float32 array of ``shape``, converting only losslessly.

    Raises:
        TypeError: naming ``argname`` when the dtype cannot be converted without loss.
        ValueError: naming ``argname`` with the expected and actual shapes.
    """
    a = np.asarray(x)
    if a.dtype != np.float32:
        if not (a.dtype.kind in "iuf" and np.can_cast(a.dtype, np.float32, "safe")) and a.size:
            raise TypeError(f"{argname} must be float32 (or convertible without loss, e.g. "
                            f"float16); got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{argname} has shape {a.shape}; expected {tuple(shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def check_out_float32(out, argname, shape=None):
    """Raise unless ``out`` can take float32 results in place: a writeable C-contiguous
    float32 ndarray of ``shape``, or with ``shape=None`` a flat (1-D) buffer of any length.

    Raises:
        TypeError: naming ``argname`` when it is not a float32 ndarray (or not 1-D).
        ValueError: naming ``argname`` for a wrong shape, a non-contiguous or a read-only
            array.
    """
    flat = shape is None
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or (flat and out.ndim != 1):
        got = getattr(out, "dtype", type(out).__name__)
        if flat:
            got = f"{got}{list(getattr(out, 'shape', []))}"
        raise TypeError(f"{argname} must be a {'1-D ' if flat else ''}float32 ndarray; "
                        f"got {got}")
    if not flat and out.shape != shape:
        raise ValueError(f"{argname} has shape {out.shape}; expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{argname} must be C-contiguous and writeable")


def as_step(step):
    """A training step as a Python int in [0, 2^31 - 1].

    Raises:
        TypeError: when ``step`` is not an integer.
        ValueError: when it is outside [0, 2^31 - 1] (rows store their last update step as
            int32; a larger step is refused rather than wrapped to a negative one, which
            would mark the row as free).
    """
    if isinstance(step, (bool, np.bool_)) or not hasattr(step, "__index__"):
        raise TypeError(f"step must be an integer; got {type(step).__name__} {step!r}")
    s = int(step)
    if not 0 <= s <= _MAX_STEP:
        raise ValueError(f"step must be in [0, 2^31 - 1] (rows store int32 steps); got {s}")
    return s


def _as_u64(v, argname):
    if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__"):
        raise TypeError(f"{argname} must be an integer; got {type(v).__name__} {v!r}")
    v = int(v)
    if not -(1 << 63) <= v < (1 << 64):
        raise ValueError(f"{argname} must fit in 64 bits; got {v}")
    return v & ((1 << 64) - 1)
