# cython: language_level=3
"""OpenMP facts and thread control shared by every kernel.

All batched kernels run ``prange`` loops with ``num_threads=get_num_threads()``
so that one setting (``set_num_threads`` or ``HPCTRAIN_NUM_THREADS``) governs them.
"""
import os

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int hp_openmp_enabled(void) { return 1; }
    static int hp_omp_max_threads(void) { return omp_get_max_threads(); }
    static int hp_openmp_version(void) { return _OPENMP; }
    #else
    static int hp_openmp_enabled(void) { return 0; }
    static int hp_omp_max_threads(void) { return 1; }
    static int hp_openmp_version(void) { return 0; }
    #endif
    """
    int hp_openmp_enabled()
    int hp_omp_max_threads()
    int hp_openmp_version()

cdef int _num_threads = 0


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(hp_openmp_enabled())


def openmp_version():
    """The ``_OPENMP`` date macro (e.g. 201511), 0 without OpenMP."""
    return hp_openmp_version()


def get_num_threads():
    """Threads batched kernels use: set_num_threads(), else HPCTRAIN_NUM_THREADS, else OpenMP's default."""
    global _num_threads
    if _num_threads <= 0:
        env = os.environ.get("HPCTRAIN_NUM_THREADS")
        _num_threads = int(env) if env else hp_omp_max_threads()
    return max(1, _num_threads) if hp_openmp_enabled() else 1


def set_num_threads(int n):
    """Set the number of threads every batched kernel uses (n >= 1)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    _num_threads = n
