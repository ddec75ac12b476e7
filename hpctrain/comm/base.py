"""The communicator interface every backend implements.

Buffers are NumPy arrays for the MPI backend and CuPy arrays for NCCL. Counts
for ``alltoall``/``alltoallv`` are in *rows*: a buffer of shape ``[n, *tail]``
moves ``counts[p]`` rows of ``prod(tail)`` elements to peer ``p``; this lets the
sparse side send ids (1-D) and embedding rows (2-D) through one call.
"""
from abc import ABC, abstractmethod


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
