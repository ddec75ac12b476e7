"""The kernels' OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE) unless the
environment says otherwise, set before the OpenMP runtime loads."""
import os
import subprocess
import sys

import pytest

from mpirun import ROOT

SHOW = ("import os, hpctrain._kernels as k; from hpctrain._kernels import table; "
        "print(os.environ['OMP_WAIT_POLICY'], k.WAIT_POLICY_SOURCE, sep='|')")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
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
