"""The array backend of the dense side: NumPy on CPUs, CuPy on NVIDIA GPUs.

The module is chosen once (``get_array_module("numpy"|"cupy")``) and handed to
every layer and model as ``xp``; the rest of ``hpctrain.dense`` is written once
against the common NumPy/CuPy API. Nothing here imports CuPy unless asked to.
"""
import ctypes
import os

import numpy as np

BACKENDS = ("numpy", "cupy")


def get_array_module(name="numpy"):
    """The array module for ``name``.

    Args:
        name: "numpy" or "cupy" (an array module itself is passed through).

    Returns:
        The module (``numpy`` or ``cupy``).

    Raises:
        ValueError: ``name`` is not a known backend.
        ImportError: "cupy" was asked for but CuPy is not installed or sees no device.
    """
    if name is np or getattr(name, "__name__", None) == "cupy":
        return name
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise ImportError("backend 'cupy' needs CuPy: pip install -e '.[gpu]'") from e
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("backend 'cupy': CuPy is installed but sees no CUDA device")
        return cupy
    raise ValueError(f"unknown array backend {name!r}; expected one of {BACKENDS}")


# --- fused kernels of the NumPy path ------------------------------------------------------

#: Whether NumPy layers, losses and optimizers use the fused kernels of
#: ``hpctrain._kernels.dense_ops``. False: they run the generic array code, the code the CuPy
#: path runs, which is the reference the kernels are tested against.
FUSED_KERNELS = True
_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def fused_kernels(xp, dtype):
    """``hpctrain._kernels.dense_ops`` for NumPy float32/float64 data, else None (CuPy, other
    dtypes, or ``FUSED_KERNELS`` off)."""
    if not FUSED_KERNELS or xp is not np or np.dtype(dtype) not in _FUSED_DTYPES:
        return None
    from hpctrain._kernels import dense_ops
    return dense_ops


def is_device_array(a):
    """True for a CuPy array (memory on the GPU)."""
    return type(a).__module__.split(".")[0] == "cupy"


def array_module_of(a):
    """The module that owns array ``a`` (numpy for anything that is not CuPy)."""
    if is_device_array(a):
        import cupy
        return cupy
    return np


def to_numpy(a):
    """A NumPy array with the values of ``a`` (copied from the device for CuPy)."""
    return a.get() if is_device_array(a) else np.asarray(a)


def uniform(xp, rng, out):
    """Fill float32/float64 ``out`` with U[0, 1) draws from ``rng`` (made by ``make_rng``)."""
    if xp is np:
        rng.random(out=out, dtype=out.dtype)
    else:
        out[...] = rng.random_sample(out.shape, dtype=out.dtype)
    return out


def make_rng(xp, seed):
    """A seeded generator living where ``xp`` computes (host for NumPy, device for CuPy).

    Args:
        seed: an int or a tuple of ints (e.g. ``(seed, layer)``).
    """
    entropy = list(seed) if isinstance(seed, (tuple, list)) else int(seed)
    if xp is np:
        return np.random.default_rng(np.random.SeedSequence(entropy))
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0]
    return xp.random.RandomState(int(state))


# --- BLAS threads --------------------------------------------------------------------------

_BLAS_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads",
             "MKL_Set_Num_Threads", "bli_thread_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
             "openblas_get_num_threads64_", "openblas_get_num_threads", "MKL_Get_Max_Threads")


def _blas_libraries():
    """Shared libraries loaded in this process that look like a BLAS."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                base = os.path.basename(p).lower()
                if ("blas" in base or "mkl_rt" in base or "blis" in base) and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    return paths


def set_blas_threads(n):
    """Set the thread count of the BLAS NumPy uses (OpenBLAS, MKL or BLIS).

    Environment variables such as ``OPENBLAS_NUM_THREADS`` act only before NumPy
    is imported; benchmarks need to change the count afterwards.

    Returns:
        True when a BLAS library accepted the setting.
    """
    global _THREADS
    _THREADS = None
    done = False
    for path in _blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _BLAS_SET:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                done = True
                break
    return done


_THREADS = None


def blas_threads():
    """The BLAS thread count (at least 1), cached: cheap enough to ask on every layer call."""
    global _THREADS
    if _THREADS is None:
        _THREADS = max(1, get_blas_threads() or 1)
    return _THREADS


def get_blas_threads():
    """The BLAS thread count, or None when it cannot be queried."""
    for path in _blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _BLAS_GET:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                return int(fn())
    return None
