"""Node-local exchange arena: one MPI-3 shared-memory window per group of ranks on a node.

Ranks of a node can read each other's memory, so the two large exchanges of a
sharded embedding step (rows back to requesters, gradients to owners) need no
copy between them: an owner writes its reply rows into its own segment of the
window and the requesters of the node pool straight from it; a requester writes
its per-id gradients into its segment and the owners of the node sum them from
there. Only peers on other nodes still go through ``Alltoallv``.

A second window, the request board (int64), carries what each member asks of the
group's owners (counts, layout, ids) when the group is the whole world, so a step
needs no collective at all for its requests (``post`` / ``settle``).

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

    Construction is collective over ``mpi_comm``; outside ``hpctrain.comm`` an arena
    is had from a communicator with the "shared_window" capability
    (``comm.shared_arena(group_size)``).

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
        board: int64 view of the request board (None before the first ``settle``),
            where each member posts the ids it asks of the group's owners.
        enabled: False once the group fell back to plain ``Alltoallv`` (no room).
    """

    def __init__(self, mpi_comm, group_size=None):
        from mpi4py import MPI
        self._MPI = MPI
        self._world = mpi_comm
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
        self._board_win = None
        self.board = None
        self.board_seg = None
        self._rcap = 0
        self._request = None

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
            self._close_rows()
            return False
        self._close_rows()
        self._allocate(fcap + bcap)
        self._fcap, self._bcap = fcap, bcap
        return True

    def alltoallv_remote(self, send_at, send_counts, send_displ, recv_at, recv_counts,
                         recv_displ):
        """``Alltoallv`` over the whole communicator of the blocks for ranks of *other*
        groups, window to window: ``flat[send_at + send_displ[p]:]`` to peer ``p``,
        received at ``flat[recv_at + recv_displ[p]:]`` (float32 elements). Blocks for
        members of this group are left out (count 0): they are read in place.
        """
        MPI = self._MPI
        local = self.local_index >= 0
        sc = np.where(local, 0, send_counts)
        rc = np.where(local, 0, recv_counts)
        self._world.Alltoallv([self.flat[send_at:], (sc, send_displ), MPI.FLOAT],
                              [self.flat[recv_at:], (rc, recv_displ), MPI.FLOAT])

    def base(self, k):
        """Element offset in ``flat`` of member ``k``'s forward part."""
        return int(self.seg[k])

    def bwd_base(self, k):
        """Element offset in ``flat`` of member ``k``'s backward part."""
        return int(self.seg[k] + self._fcap[k])

    def _allocate(self, caps):
        self._win, self.flat, self.seg = self._map(int(caps[self.index]), np.float32)

    def _map(self, count, dtype):
        """Allocate ``count`` items of this member (collective): (window, flat view, offsets)."""
        MPI = self._MPI
        size = np.dtype(dtype).itemsize
        try:
            win = MPI.Win.Allocate_shared(count * size, size, comm=self.group)
        except MPI.Exception as e:
            raise CommError(f"rank {self.members[self.index]}: cannot allocate a "
                            f"{count * size} byte shared window: {e}") from e
        spans = []
        for k in range(self.group.size):
            buf, _ = win.Shared_query(k)
            spans.append((buf.address, len(buf)))
        if any(a % size for a, _ in spans):
            raise CommError(f"shared window segments are not {size}-byte aligned")
        base = min(a for a, _ in spans)
        end = max(a + n for a, n in spans)
        ctype = np.ctypeslib.as_ctypes_type(dtype)
        flat = np.ctypeslib.as_array((ctype * ((end - base) // size)).from_address(base))
        win.Lock_all(MPI.MODE_NOCHECK)
        return win, flat, np.array([(a - base) // size for a, _ in spans], dtype=np.int64)

    def sync(self):
        """Make every member's writes visible to every member (fence, barrier, fence)."""
        self._sync(self._win)

    def _sync(self, win):
        win.Sync()
        self.group.Barrier()
        win.Sync()

    def nbytes(self):
        """Bytes of this rank's segment (and of its part of the request board)."""
        return int(self._fcap[self.index] + self._bcap[self.index]) * 4 + self._rcap * 8

    # -- request board: what every member asks of the group's owners ----------------------
    # Member k's part (int64, in ``board``, from ``board_base(k)``): a status word, then
    # the caller's request (header and ids). Status n > 0: the request of n words is
    # there; -n: it did not fit the part (``settle`` grows the board and it is written
    # again). The board is a window of its own: growing the row window (``reserve``)
    # between reading requests and serving them must not lose them.

    def post(self, request):
        """Write this rank's request (an int64 array) into its part of the board.

        Nothing is synchronised: peers may read it after ``settle``. ``request`` must
        stay unchanged until then (it is written again if the board grows).
        """
        self._request = request
        self._write_request()

    def _write_request(self):
        n = self._request.shape[0]
        if self._board_win is None:
            return
        b = int(self.board_seg[self.index])
        if n + 1 <= self._rcap:
            self.board[b + 1:b + 1 + n] = self._request
            self.board[b] = n
        else:
            self.board[b] = -n

    def settle(self):
        """Make every member's posted request readable (collective over the group).

        Grows the board when a request did not fit (every member sees the same
        statuses, so all grow together) and has it written again.

        Returns:
            False when the board cannot be had (too little shared memory; decided
            alike by every member): the exchange is off, the caller exchanges the
            requests by MPI collectives.
        """
        if self._board_win is not None:
            self._sync(self._board_win)
            st = self.board[self.board_seg]
            if np.all(st >= 0):
                return True
        need = self._request.shape[0] + 1
        cap = max(self._rcap, need + need // 2, _MIN_FLOATS)
        free = shm_available_bytes()
        fits = free is None or cap * 8 * self.group.size <= 0.2 * free
        if not self.group.allreduce(fits, op=self._MPI.LAND):
            log.warning("node exchange: a request board of %.1f MB per rank does not fit "
                        "/dev/shm; rows and gradients go through Alltoallv", cap * 8 / 2**20)
            self.enabled = False
            self.close()
            return False
        self._close_board()
        self._board_win, self.board, self.board_seg = self._map(cap, np.int64)
        self._rcap = cap
        self._write_request()
        self._sync(self._board_win)
        return True

    def board_base(self, k):
        """Index in ``board`` of member ``k``'s request (after its status word)."""
        return int(self.board_seg[k]) + 1

    def _close_board(self):
        if self._board_win is not None:
            self.board = None
            _free(self._board_win)
            self._board_win = None
            self._rcap = 0

    def close(self):
        """Free the windows (collective over the group); ``reserve`` / ``settle`` make new
        ones."""
        self._close_board()
        self._close_rows()

    def _close_rows(self):
        if self._win is not None:
            self.flat = None
            _free(self._win)
            self._win = None
            self._fcap = np.zeros(self.group.size, dtype=np.int64)
            self._bcap = np.zeros(self.group.size, dtype=np.int64)


def _free(win):
    """End the passive epoch ``_map`` opened and free the window (collective)."""
    win.Unlock_all()
    win.Free()


class _Gathering:
    """An ``Iallgather`` in flight (keeps its send buffer alive until done)."""

    def __init__(self, req, out, send):
        self._req, self._out, self._send = req, out, send

    def wait(self):
        self._req.Wait()
        self._send = None
        return self._out
