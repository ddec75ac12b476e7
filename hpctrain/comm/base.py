"""The communicator interface every backend implements.

Buffers are NumPy arrays for the MPI backend and CuPy arrays for NCCL. Counts
for ``alltoall``/``alltoallv`` are in *rows*: a buffer of shape ``[n, *tail]``
moves ``counts[p]`` rows of ``prod(tail)`` elements to peer ``p``; this lets the
sparse side send ids (1-D) and embedding rows (2-D) through one call.
"""
from abc import ABC, abstractmethod

import numpy as np


class Handle(ABC):
    """A started non-blocking collective; ``wait()`` completes it and returns its result."""

    @abstractmethod
    def wait(self):
        """Block until the operation is complete; return the output buffer."""

    def test(self):
        """True when ``wait()`` would not block (default: unknown, so False)."""
        return False


class Communicator(ABC):
    """Collectives over a group of ranks.

    Attributes:
        rank, size: this rank and the number of ranks in the group.
        local_rank, local_size: rank and size among the ranks on this host.
        mpi_comm: the underlying ``mpi4py`` communicator (every backend has one,
            for bootstrapping and for small Python-object collectives).
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    mpi_comm: object

    #: What the backend can do beyond the collectives, asked by callers instead of
    #: guessing from class names: "device_buffers" (collectives on CuPy arrays),
    #: "shared_window" (``shared_arena``: node-local MPI-3 shared memory).
    capabilities = frozenset()

    @abstractmethod
    def allreduce(self, buf, op="sum"):
        """In-place allreduce of ``buf`` with ``op`` in {"sum", "mean"}; returns ``buf``."""

    @abstractmethod
    def iallreduce(self, buf, op="sum"):
        """Non-blocking ``allreduce``; returns a ``Handle`` whose ``wait()`` returns ``buf``."""

    @abstractmethod
    def alltoall(self, send_counts):
        """Exchange one int64 per peer: returns ``recv_counts[p] = send_counts_of_p[self.rank]``."""

    @abstractmethod
    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Send ``send_counts[p]`` rows of ``sendbuf`` to peer ``p`` (in peer order).

        Returns ``recvbuf`` (allocated when None) holding ``recv_counts[p]`` rows
        from each peer ``p``, in peer order.
        """

    @abstractmethod
    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Non-blocking ``alltoallv``; returns a ``Handle`` whose ``wait()`` returns recvbuf."""

    @abstractmethod
    def bcast(self, obj, root=0):
        """Broadcast an array (in place, returned) or a picklable object (returned)."""

    @abstractmethod
    def barrier(self):
        """Block until every rank has entered."""

    @abstractmethod
    def split(self, color, key=0):
        """A communicator of the same backend over the ranks that passed the same ``color``."""

    def allgather_object(self, obj):
        """List of ``obj`` from every rank (small Python objects only)."""
        return self.mpi_comm.allgather(obj)

    def allgatherv(self, local):
        """1-D NumPy array: every rank's ``local`` (1-D, same dtype) concatenated in rank order.

        The default goes through ``allgather_object``; backends with a typed
        ``Allgatherv`` override it.
        """
        parts = self.allgather_object(_host_1d(local))
        return np.concatenate(parts) if parts else _host_1d(local)[:0]

    def any_true(self, flag):
        """True on every rank when ``flag`` is true on any rank (collective)."""
        buf = np.array([1 if flag else 0], dtype=np.int64)
        return bool(self.allreduce(buf, op="sum")[0] > 0)

    def shared_arena(self, group_size=None):
        """A node-local shared-memory arena over this communicator (collective).

        Only backends with the "shared_window" capability have one.
        """
        raise NotImplementedError(f"{type(self).__name__} has no shared window "
                                  f"(capabilities: {sorted(self.capabilities) or 'none'})")


def _host_1d(a):
    return np.ascontiguousarray(a).reshape(-1)
