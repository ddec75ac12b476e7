"""Compiled Cython kernels (built by setup.py from the top-level kernels/ folder).

The kernels' OpenMP threads sleep when idle: ``import hpctrain`` sets
``OMP_WAIT_POLICY=PASSIVE`` (unless exported) before any kernel starts the OpenMP runtime
(``hpctrain._idle_threads``; ``WAIT_POLICY_SOURCE`` says where this process's policy came
from).

Importing this package checks that every kernel was built, and that this CPU has the
instruction-set extensions they were compiled for (``_build.ISA``); otherwise it raises
``hpctrain.errors.InstallError`` (an ``ImportError``) saying what to do, instead of a later
``cannot import name 'sparse_ops'`` or "Illegal instruction".
"""
import importlib.util

from hpctrain._idle_threads import (  # noqa: F401
    DEFAULTS, WAIT_POLICY_SOURCE, openmp_runtime_loaded)
from hpctrain.errors import InstallError

#: The wait policy set when the environment sets none.
WAIT_POLICY = DEFAULTS["OMP_WAIT_POLICY"]

#: Every compiled module, one per kernels/*.pyx.
KERNELS = ("_build", "_openmp", "data_parse", "data_synth", "dense_ops", "mpi_direct",
           "sparse_ops", "table")

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
