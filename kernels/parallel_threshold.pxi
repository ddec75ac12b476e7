# The single-thread cut-off of a kernel module, included by sparse_ops.pyx and
# dense_ops.pyx (each module keeps its own threshold). Needs ``int64_t`` cimported and
# ``get_num_threads`` (hpctrain._kernels._openmp) imported by the including module.
#
# Smallest job, in bytes it touches, that a kernel splits over threads. Each parallel
# region wakes the other threads (with OMP_WAIT_POLICY=PASSIVE, hpctrain's default, a
# futex wake-up of some microseconds); a step runs a few regions per table, and splitting
# a job of a few microseconds costs more than it saves.
cdef int64_t _par_min_bytes = 256 * 1024


def set_parallel_threshold(int64_t nbytes):
    """Jobs touching fewer than ``nbytes`` bytes run on one thread (default 256 KiB);
    results are the same bits for any thread count."""
    global _par_min_bytes
    if nbytes < 0:
        raise ValueError(f"parallel threshold must be >= 0 bytes, got {nbytes}")
    _par_min_bytes = nbytes


def parallel_threshold():
    """The current single-thread cut-off of the kernels here, in bytes."""
    return _par_min_bytes


cdef int _threads(int64_t nbytes) except -1:
    return 1 if nbytes < _par_min_bytes else get_num_threads()
