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


WARN = ("import hpctrain; from hpctrain._idle_threads import late_warning; "
        "print(late_warning() or 'none', sep='|')")


def _numpy_uses_openblas():
    import numpy  # noqa: F401 -- loads the BLAS threadpoolctl looks for
    from threadpoolctl import threadpool_info
    return any(d.get("internal_api") == "openblas" for d in threadpool_info())


needs_openblas = pytest.mark.skipif(not _numpy_uses_openblas(),
                                    reason="NumPy's BLAS is not OpenBLAS here")


@needs_openblas
def test_numpy_loaded_first_is_warned_about_when_it_spins():
    # NumPy (OpenBLAS) before hpctrain: the run is told what spins and what to do
    msg = _run("import numpy; " + WARN)[0]
    assert "OpenBLAS threads spin" in msg and "Import hpctrain before NumPy" in msg
    assert _run(WARN) == ["none"]
    assert _run("import numpy; " + WARN, OPENBLAS_THREAD_TIMEOUT="20") == ["none"]


@needs_openblas
def test_the_trainer_gives_a_late_openblas_its_timeout():
    # NumPy first, then a trainer with 2 threads: OpenBLAS re-reads its timeout and
    # restarts its pool (no warning left to give), products still right afterwards
    code = ("import numpy as np, logging, sys, ctypes; logging.basicConfig(stream=sys.stdout); "
            "from hpctrain import _idle_threads as i; from hpctrain.train.loop import _set_threads; "
            "lib = ctypes.CDLL(i._openblas_path()); before = lib.openblas_thread_timeout(); "
            "a = np.arange(40000, dtype=np.float64).reshape(200, 200) / 4e4; ref = a @ a; "
            "n = _set_threads(2, 1, 0); "
            "print('before', before, 'after', lib.openblas_thread_timeout(), i.BLAS_TIMEOUT_SOURCE, "
            "n, bool(np.array_equal(a @ a, ref)), i.late_warning())")
    out = _run(code)[0]
    assert out == "before 0 after 20 hpctrain (re-read) 2 True None"
    # one thread: nothing spins beside the kernels, nothing is touched
    code1 = code.replace("_set_threads(2, 1, 0)", "_set_threads(1, 1, 0)")
    assert _run(code1)[0].startswith("before 0 after 0 too late 1 True")


@needs_openblas
def test_rank_0_warns_about_what_stays_late():
    # an OpenMP runtime loaded before hpctrain cannot be given its wait policy: rank 0 says so
    import ctypes.util
    name = ctypes.util.find_library("gomp")
    if name is None:
        pytest.skip("no libgomp to load first")
    code = (f"import ctypes; ctypes.CDLL({name!r}); import logging, sys; "
            "logging.basicConfig(stream=sys.stdout); "
            "from hpctrain.train.loop import _set_threads; "
            "_set_threads(2, 1, 0); _set_threads(2, 1, 1); _set_threads(1, 1, 0)")
    out = _run(code)[0]
    assert out.count("2 threads per rank: an OpenMP runtime was loaded before hpctrain") == 1
