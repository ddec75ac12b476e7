"""A communicator that packs buffers like the MPI one but sends nothing.

It behaves as a world of exactly one rank (``rank == 0``, ``size == 1``,
``local_rank == 0``, ``local_size == 1``), so its results are those a 1-rank
``MpiCommunicator`` gives:

* ``allreduce``: sum and mean over one rank leave the buffer unchanged;
* ``alltoall``: the counts come back (this rank is its only peer);
* ``alltoallv``: the ``send_counts[0]`` rows are copied into ``recvbuf``, i.e.
  the packing a real exchange does, without any MPI call;
* ``bcast``/``barrier``/``split``: no-ops returning the object / a new null world.

Run a pipeline on it and on ``MpiCommunicator`` at one rank and the difference
is MPI's own cost; run it alone to see routing/packing overhead.
"""
import numpy as np

from hpctrain.comm.base import Communicator, Handle


class NullHandle(Handle):
    """An already-completed operation."""

    def __init__(self, result):
        self._result = result

    def wait(self):
        """Return the result (nothing to wait for)."""
        return self._result

    def test(self):
        """Always True."""
        return True


class NullCommunicator(Communicator):
    """World of one rank; collectives validate and copy, never communicate.

    Args:
        mpi_comm: accepted for factory symmetry and ignored; ``mpi_comm`` is None.
    """

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def __init__(self, mpi_comm=None):
        self.mpi_comm = None

    def __repr__(self):
        return "NullCommunicator(rank=0, size=1)"

    def allreduce(self, buf, op="sum"):
        """Identity (the reduction of one rank's buffer); validates ``op``."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be one of ('sum', 'mean'), got {op!r}")
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"buf must be a numpy.ndarray, got {type(buf).__name__}")
        return buf

    def iallreduce(self, buf, op="sum"):
        """``allreduce`` as a completed handle."""
        return NullHandle(self.allreduce(buf, op))

    def alltoall(self, send_counts):
        """``send_counts`` as int64 (this rank is its own only peer)."""
        counts = np.array(send_counts, dtype=np.int64)
        if counts.shape != (1,):
            raise ValueError(f"send_counts must have shape (1,), got {counts.shape}")
        return counts

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Copy the ``send_counts[0]`` rows of ``sendbuf`` into ``recvbuf``."""
        sc, rc = self.alltoall(send_counts), self.alltoall(recv_counts)
        if sc[0] != rc[0]:
            raise ValueError(f"rank 0 sends {sc[0]} rows to itself but expects {rc[0]}")
        if sc[0] > sendbuf.shape[0]:
            raise ValueError(f"send_counts sum to {sc[0]} rows but sendbuf has {sendbuf.shape[0]}")
        n = int(sc[0])
        if recvbuf is None:
            recvbuf = np.empty((n, *sendbuf.shape[1:]), dtype=sendbuf.dtype)
        elif recvbuf.shape[0] < n or recvbuf.shape[1:] != sendbuf.shape[1:]:
            raise ValueError(f"recvbuf has shape {recvbuf.shape}, need at least "
                             f"({n}, {', '.join(map(str, sendbuf.shape[1:]))})")
        recvbuf[:n] = sendbuf[:n]
        return recvbuf

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """``alltoallv`` as a completed handle."""
        return NullHandle(self.alltoallv(sendbuf, send_counts, recv_counts, recvbuf))

    def bcast(self, obj, root=0):
        """Return ``obj`` (root must be 0)."""
        if root != 0:
            raise ValueError(f"root {root} out of range for a world of 1")
        return obj

    def barrier(self):
        """Nothing to wait for."""

    def split(self, color, key=0):
        """A new null world (None when ``color`` is None)."""
        return None if color is None else NullCommunicator()

    def allgather_object(self, obj):
        """``[obj]``."""
        return [obj]

    def allgatherv(self, local):
        """A copy of ``local`` as a 1-D array (the only rank's part)."""
        return np.array(local).reshape(-1)
