"""Compiled Cython kernels (built by setup.py from the top-level kernels/ folder).

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` when the environment does not
set it, before any kernel module starts the OpenMP runtime (which reads the variable once,
when it loads). With the runtime's default, a kernel thread that finishes a parallel
region spins for a while waiting for the next one; a rank's Python code, BLAS threads and
data reader then run beside spinning threads, and on a busy node one rank with 2 threads
was slower than with 1. Passive threads sleep at once (benchmarks/README.md, threads).
Export ``OMP_WAIT_POLICY=ACTIVE`` (or any value) to keep your own.
"""
import os

#: The wait policy set when the environment sets none.
WAIT_POLICY = "PASSIVE"

_RUNTIMES = ("libgomp", "libomp.", "libiomp")


def openmp_runtime_loaded():
    """True when an OpenMP runtime is already mapped into this process (Linux; else False)."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in _RUNTIMES)
    except OSError:
        return False


#: Where this process's wait policy comes from: "environment", "hpctrain", or "too late"
#: (the runtime was loaded by an earlier import, e.g. another OpenMP library, so
#: the value set here could not reach it).
WAIT_POLICY_SOURCE = "environment"
if "OMP_WAIT_POLICY" not in os.environ:
    WAIT_POLICY_SOURCE = "too late" if openmp_runtime_loaded() else "hpctrain"
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
