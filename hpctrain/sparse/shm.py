"""Node-local exchange arena: one MPI-3 shared-memory window per group of ranks on a node.

Ranks of a node can read each other's memory, so the two large exchanges of a
sharded embedding step (rows back to requesters, gradients to owners) need no
copy between them: an owner writes its reply rows into its own segment of the
window and the requesters of the node pool straight from it; a requester writes
its per-id gradients into its segment and the owners of the node sum them from
there. Only peers on other nodes still go through ``Alltoallv``.

Every member's segment is addressed through one flat float32 view of the whole
window (``flat``, with ``seg[k]`` the element offset of member ``k``), so the
pooling and segment-sum kernels read rows of any member by element offset, as
they read a packed ``Alltoallv`` buffer.

Synchronisation is the caller's: ``sync()`` (memory fence + group barrier +
fence) between writing a segment and peers reading it. ``reserve`` grows the
window (collective over the group, every member in the same order).
"""
import ctypes
import logging
import os

import numpy as np

from hpctrain.errors import CommError

log = logging.getLogger(__name__)

_MIN_FLOATS = 1 << 12


def shm_available_bytes(path="/dev/shm"):
    """Free bytes of the shared-memory file system MPI maps windows from (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SharedArena:
    """Growable MPI-3 shared window over the ranks of one node (or a group within it).

    Construction is collective over ``mpi_comm``.

    Args:
        mpi_comm: the ``mpi4py`` communicator of the sharded embedding.
        group_size: split each node into consecutive groups of this many ranks
            (None: one group per node). Smaller groups keep the window inside a
            NUMA domain, and let tests run the mixed shared-memory + ``Alltoallv``
            path on one machine.

    Attributes:
        group: the ``mpi4py`` communicator of this rank's group.
        members: int64[g] world ranks of the group, in group order.
        index: this rank's position in ``members``.
        local_index: int64[world] group position of every world rank (-1: elsewhere).
        all_local: True when the group is the whole world (no ``Alltoallv`` needed).
        flat: float32 view of the whole window (None before the first ``reserve``).
        seg: int64[g] element offset of every member's segment in ``flat``.
        enabled: False once the group fell back to plain ``Alltoallv`` (no room).
    """

    def __init__(self, mpi_comm, group_size=None):
        from mpi4py import MPI
        self._MPI = MPI
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=mpi_comm.rank)
        if group_size is not None:
            if int(group_size) < 1:
                node.Free()
                raise ValueError(f"node_group_size must be >= 1, got {group_size}")
            sub = node.Split(node.rank // int(group_size), node.rank)
            node.Free()
            node = sub
        self.group = node
        self.members = np.array(node.allgather(mpi_comm.rank), dtype=np.int64)
        self.index = node.rank
        self.local_index = np.full(mpi_comm.size, -1, dtype=np.int64)
        self.local_index[self.members] = np.arange(node.size)
        self.all_local = node.size == mpi_comm.size
        self.enabled = True
        self.flat = None
        self.seg = None
        self._win = None
        self._fcap = np.zeros(node.size, dtype=np.int64)
        self._bcap = np.zeros(node.size, dtype=np.int64)

    @property
    def size(self):
        return self.group.size

    def iallgather(self, vec):
        """Start gathering every member's int64 ``vec``; ``wait()`` returns int64[g, len(vec)]."""
        send = np.ascontiguousarray(vec, dtype=np.int64)
        out = np.empty((self.group.size, send.shape[0]), dtype=np.int64)
        req = self.group.Iallgather([send, self._MPI.INT64_T], [out, self._MPI.INT64_T])
        return _Gathering(req, out, send)

    def reserve(self, fwd, bwd):
        """Make member ``k``'s segment hold ``fwd[k]`` + ``bwd[k]`` floats (collective).

        A segment has two parts at fixed places: the forward part (``base(k)``) and
        the backward part (``bwd_base(k)``, after the forward part's capacity). Each
        step sizes them anew, and a part must never spill into the other, since
        peers may still read the other part of the previous step (see
        docs/sharded-embedding.md). ``fwd`` and ``bwd`` must be the same on every
        member (from ``iallgather``). Grows by half again what is needed so that
        growth is rare; a grown window is a new window, and views of the old one
        must not be used after this call.

        Returns:
            False when the group cannot have the window (too little shared memory):
            the caller then uses plain ``Alltoallv`` for good (decided alike by every
            member, so the group stays consistent).
        """
        fwd, bwd = np.asarray(fwd, dtype=np.int64), np.asarray(bwd, dtype=np.int64)
        if self._win is not None and np.all(fwd <= self._fcap) and np.all(bwd <= self._bcap):
            return True
        fcap = np.maximum(np.maximum(self._fcap, fwd + fwd // 2), _MIN_FLOATS)
        bcap = np.maximum(np.maximum(self._bcap, bwd + bwd // 2), _MIN_FLOATS)
        free = shm_available_bytes()
        total = int(fcap.sum() + bcap.sum()) * 4
        if free is not None and total > 0.8 * free:
            # every member sees the same file system, so every member decides alike
            log.warning("node exchange: a %.1f MB shared window does not fit the %.1f MB "
                        "free in /dev/shm; rows and gradients go through Alltoallv",
                        total / 2**20, free / 2**20)
            self.enabled = False
            self.close()
            return False
        self.close()
        self._allocate(fcap + bcap)
        self._fcap, self._bcap = fcap, bcap
        return True

    def base(self, k):
        """Element offset in ``flat`` of member ``k``'s forward part."""
        return int(self.seg[k])

    def bwd_base(self, k):
        """Element offset in ``flat`` of member ``k``'s backward part."""
        return int(self.seg[k] + self._fcap[k])

    def _allocate(self, caps):
        MPI = self._MPI
        try:
            win = MPI.Win.Allocate_shared(int(caps[self.index]) * 4, 4, comm=self.group)
        except MPI.Exception as e:
            raise CommError(f"rank {self.members[self.index]}: cannot allocate a "
                            f"{int(caps[self.index]) * 4} byte shared window: {e}") from e
        addrs = []
        for k in range(self.group.size):
            buf, unit = win.Shared_query(k)
            addrs.append(buf.address)
        if any(a % 4 for a in addrs):
            raise CommError("shared window segments are not float aligned")
        base = min(addrs)
        end = max(a + int(c) * 4 for a, c in zip(addrs, caps))
        self.flat = np.ctypeslib.as_array((ctypes.c_float * ((end - base) // 4)).from_address(base))
        self.seg = np.array([(a - base) // 4 for a in addrs], dtype=np.int64)
        win.Lock_all(MPI.MODE_NOCHECK)
        self._win = win

    def sync(self):
        """Make every member's writes visible to every member (fence, barrier, fence)."""
        self._win.Sync()
        self.group.Barrier()
        self._win.Sync()

    def nbytes(self):
        """Bytes of this rank's segment."""
        return int(self._fcap[self.index] + self._bcap[self.index]) * 4

    def close(self):
        """Free the window (collective over the group); ``reserve`` makes a new one."""
        if self._win is not None:
            self.flat = None
            self._win.Unlock_all()
            self._win.Free()
            self._win = None
            self._fcap = np.zeros(self.group.size, dtype=np.int64)
            self._bcap = np.zeros(self.group.size, dtype=np.int64)


class _Gathering:
    """An ``Iallgather`` in flight (keeps its send buffer alive until done)."""

    def __init__(self, req, out, send):
        self._req, self._out, self._send = req, out, send

    def wait(self):
        self._req.Wait()
        self._send = None
        return self._out
