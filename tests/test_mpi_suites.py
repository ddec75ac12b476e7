"""Run every multi-rank test file in tests/mpi under ``mpiexec -n 2`` and ``-n 4``."""
import glob
import os

import pytest

from mpirun import ROOT, run_mpi

SUITES = sorted(os.path.relpath(p, ROOT)
                for p in glob.glob(os.path.join(ROOT, "tests", "mpi", "test_*.py")))


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("suite", SUITES)
def test_suite_under_mpiexec(suite, nranks):
    out = run_mpi(nranks, ["-m", "pytest", suite, "-q", "-x", "-p", "no:cacheprovider",
                           "-p", "no:randomly"], timeout=600).stdout
    assert " passed" in out, out[-3000:]
