"""Idle kernel and BLAS threads sleep (OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=20)
unless the environment says otherwise, set by ``import hpctrain`` before the runtimes load."""
import os
import subprocess
import sys

import pytest

from mpirun import ROOT

SHOW = ("import os, hpctrain._kernels as k; from hpctrain._kernels import table; "
        "print(os.environ['OMP_WAIT_POLICY'], k.WAIT_POLICY_SOURCE, sep='|')")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    e.update(env, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=120, check=True).stdout.strip().split("|")


def test_passive_by_default():
    assert _run(SHOW) == ["PASSIVE", "hpctrain"]


def test_the_environment_wins():
    assert _run(SHOW, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "environment"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_runtime_loaded_earlier_is_reported():
    import ctypes.util
    name = ctypes.util.find_library("gomp")
    if name is None:
        pytest.skip("no libgomp to load first")
    assert _run(f"import ctypes; ctypes.CDLL({name!r}); " + SHOW) == ["PASSIVE", "too late"]


BLAS = ("import os, hpctrain; from hpctrain import _idle_threads as i; "
        "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], i.BLAS_TIMEOUT_SOURCE, sep='|')")


def test_blas_threads_spin_briefly_by_default():
    assert _run(BLAS) == ["20", "hpctrain"]
    assert _run(BLAS, OPENBLAS_THREAD_TIMEOUT="28") == ["28", "environment"]


def test_numpy_loaded_first_is_reported():
    assert _run("import numpy; " + BLAS) == ["20", "too late"]
