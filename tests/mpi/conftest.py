"""Multi-rank test bodies.

Tests here run at any world size: plain ``pytest`` runs them as one rank, and
``tests/test_mpi_suites.py`` runs each file under ``mpiexec -n 2`` and ``-n 4``.
A failing test on any rank aborts the whole world so the others do not hang in
their next collective.
"""
import sys

import pytest

from mpi4py import MPI


def pytest_runtest_logreport(report):
    comm = MPI.COMM_WORLD
    if report.failed and comm.size > 1:
        sys.stderr.write(f"\n[rank {comm.rank}/{comm.size}] {report.nodeid} failed:\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        comm.Abort(1)


@pytest.fixture
def shared_dir(comm, tmp_path):
    """One directory for every rank (rank 0's tmp_path); ``comm`` is the test module's."""
    return comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0)
