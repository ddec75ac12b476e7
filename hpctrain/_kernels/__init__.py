"""Compiled Cython kernels (built by setup.py from the top-level kernels/ folder).

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` when the environment does not
set it, before any kernel module starts the OpenMP runtime (which reads the variable once,
when it loads). With the runtime's default, a kernel thread that finishes a parallel
region spins for a while waiting for the next one; a rank's Python code, BLAS threads and
data reader then run beside spinning threads, and on a busy node one rank with 2 threads
was slower than with 1. Passive threads sleep at once (benchmarks/README.md, threads).
Export ``OMP_WAIT_POLICY=ACTIVE`` (or any value) to keep your own.

It then checks that every kernel was built, and that this CPU has the instruction-set
extensions they were compiled for (``_build.ISA``); otherwise it raises
``hpctrain.errors.InstallError`` (an ``ImportError``) saying what to do, instead of a later
``cannot import name 'sparse_ops'`` or "Illegal instruction".
"""
import importlib.util
import os

from hpctrain.errors import InstallError

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

#: Every compiled module, one per kernels/*.pyx.
KERNELS = ("_build", "_openmp", "data_parse", "data_synth", "sparse_ops", "table")

BUILD_HINT = ("build them (needs a C compiler) with `pip install .` in a source checkout or "
              "from the sdist, or `python setup.py build_ext --inplace` in an editable checkout")


def missing_kernels():
    """The names in ``KERNELS`` with no compiled module for this Python."""
    return [k for k in KERNELS if importlib.util.find_spec(f"{__name__}.{k}") is None]


def check_cpu(build):
    """Raise ``InstallError`` when this CPU lacks an extension the kernels were compiled for
    (``build``: the ``_build`` module, or a stand-in with ``FLAGS`` and ``missing()``)."""
    lacking = build.missing()
    if lacking:
        raise InstallError(
            f"hpctrain's kernels were compiled for {', '.join(lacking)} ({build.FLAGS}), which "
            f"this CPU lacks: rebuild them on this machine, or without HPCTRAIN_NATIVE and "
            f"HPCTRAIN_MARCH for every CPU (docs/install.md)")


def _check():
    missing = missing_kernels()
    if missing:
        raise InstallError(f"hpctrain's compiled kernels are missing ({', '.join(missing)} not "
                           f"in {__path__[0]}): {BUILD_HINT}")
    from hpctrain._kernels import _build       # after the wait policy: it loads OpenMP
    check_cpu(_build)


_check()
