"""Smoke test of the harness itself: a collective against its closed form."""
import numpy as np
import pytest
from mpi4py import MPI

pytestmark = pytest.mark.mpi


def test_allreduce_closed_form():
    comm = MPI.COMM_WORLD
    buf = np.full(5, comm.rank + 1, dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf)
    assert (buf == comm.size * (comm.size + 1) // 2).all()
