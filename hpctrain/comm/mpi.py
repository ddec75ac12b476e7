"""MPI communicator on NumPy buffers (mpi4py).

Every ``Alltoallv`` uses one buffer form, ``[buf, (counts, displs), MPI.TYPE]``,
with element counts from ``element_counts`` and displacements from
``displacements``. MPI's classic interfaces take ``int`` counts and
displacements, so no MPI call here sees more than ``CHUNK_LIMIT`` elements:

* allreduce/bcast: the flat buffer is processed in consecutive slices;
* alltoallv: when a rank's totals exceed ``CHUNK_LIMIT // size``, each peer block
  is split into a head of at most ``CHUNK_LIMIT // size`` elements, which goes
  through the one ``Alltoallv`` every rank calls, and a tail sent as
  point-to-point pieces of at most ``CHUNK_LIMIT`` elements on a private
  duplicate communicator. Sender and receiver derive the split from the same
  count, so ranks need no extra agreement (no extra synchronisation on the
  common path); pieces land at their own offsets, so per-peer order is kept.
"""
import functools
import math
import operator
from itertools import accumulate

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from hpctrain.comm.base import Communicator, Handle
from hpctrain.comm.direct import direct_allreduce, direct_alltoallv
from hpctrain.comm.topology import node_local

#: Largest element count (and displacement) passed to one MPI call: C ``int`` max.
CHUNK_LIMIT = 2**31 - 1

_TAG = 7
_OPS = ("sum", "mean")
_TYPES = {}
_IN_PLACE, _SUM = MPI.IN_PLACE, MPI.SUM
_ndarray = np.ndarray


def mpi_type(dtype):
    """The MPI datatype of a NumPy dtype: a predefined one (so reductions work) when
    there is one, else a derived type from ``mpi4py.util.dtlib`` (moves only). Cached."""
    t = _TYPES.get(dtype)
    if t is None:
        key, dtype = dtype, np.dtype(dtype)
        t = _PREDEFINED.get(dtype) if dtype.isnative else None
        if t is None:
            t = from_numpy_dtype(dtype).Commit()
        _TYPES[key] = _TYPES[dtype] = t
    return t


_PREDEFINED = {np.dtype(k): v for k, v in [
    ("f4", MPI.FLOAT), ("f8", MPI.DOUBLE), ("i8", MPI.INT64_T), ("i4", MPI.INT32_T),
    ("i2", MPI.INT16_T), ("i1", MPI.INT8_T), ("u8", MPI.UINT64_T), ("u4", MPI.UINT32_T),
    ("u2", MPI.UINT16_T), ("u1", MPI.UINT8_T), ("?", MPI.C_BOOL),
    ("c8", MPI.C_FLOAT_COMPLEX), ("c16", MPI.C_DOUBLE_COMPLEX)]}


def displacements(counts):
    """Exclusive prefix sum of ``counts``: where each peer's block starts (list of ints).

    The one place ``Alltoallv`` displacements come from. Plain Python ints on
    purpose: for the counts of one call they cost less than NumPy's per-call
    dispatch, which dominates right after a large transfer has flushed the caches.
    """
    return [0, *accumulate(counts)][:-1]


def element_counts(row_counts, row_elems):
    """Counts in rows -> ``(counts, displs)`` in elements, the ``Alltoallv`` form."""
    counts = [int(c) * row_elems for c in row_counts] if row_elems != 1 else \
        [int(c) for c in row_counts]
    return counts, displacements(counts)


def split_ranges(start, stop, limit):
    """Consecutive ``(a, b)`` ranges covering ``[start, stop)``, each at most ``limit`` long."""
    if limit < 1:
        raise ValueError(f"chunk limit must be >= 1, got {limit}")
    return [(a, min(a + limit, stop)) for a in range(start, stop, limit)]


def _gather(flat, displs, counts):
    """The ``counts[p]`` elements at ``displs[p]`` of ``flat``, packed in peer order."""
    out = np.empty(sum(counts), dtype=flat.dtype)
    for a, b, n in zip(displs, displacements(counts), counts):
        out[b:b + n] = flat[a:a + n]
    return out


class MpiHandle(Handle):
    """Pending MPI requests plus what to do when they are done."""

    def __init__(self, requests, result, finish=None):
        self._requests = list(requests)
        self._result = result
        self._finish = finish
        self._done = False

    def wait(self):
        """Complete every request (once); return the output buffer."""
        if not self._done:
            MPI.Request.Waitall(self._requests)
            if self._finish is not None:
                self._finish()
            self._done = True
        return self._result

    def test(self):
        """True when every request has completed (``wait()`` would not block)."""
        return self._done or MPI.Request.Testall(self._requests)


def _contiguous(buf, name):
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    return buf.reshape(-1)


class MpiCommunicator(Communicator):
    """Collectives over an ``mpi4py`` communicator on NumPy buffers.

    Args:
        mpi_comm: the ``mpi4py`` communicator (default ``MPI.COMM_WORLD``).
        chunk_limit: largest element count per MPI call (default: module ``CHUNK_LIMIT``,
            read at each call so tests can lower it; the allreduce fast path, one call
            whatever the module limit, changes no result).

    Construction is collective (it gathers host names for ``local_rank``).
    """

    def __init__(self, mpi_comm=None, chunk_limit=None):
        self.mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.mpi_comm.rank, self.mpi_comm.size
        self.local_rank, self.local_size, self.hosts = node_local(self.mpi_comm)
        self._chunk_limit = chunk_limit
        if self.size > 1:   # an aborted job leaves no /dev/shm segment (comm.shmclean)
            from hpctrain.comm.shmclean import install_exit_cleanup
            install_exit_cleanup()
        # Large alltoallv messages go partly point-to-point; a private communicator
        # keeps those apart from anything the caller sends on mpi_comm.
        self._p2p = self.mpi_comm.Dup()
        # Fast paths (see allreduce, alltoallv): the bound MPI calls, and the arguments
        # of the last plain alltoallv with what they were built from.
        self._Allreduce, self._Alltoallv = self.mpi_comm.Allreduce, self.mpi_comm.Alltoallv
        self._fast = chunk_limit is None       # a caller's own limit: always the checked path
        # MPI_Allreduce / MPI_Alltoallv called from C with arguments read off the arrays'
        # headers (hpctrain.comm.direct), or None: then mpi4py's calls
        self._direct = direct_allreduce(self.mpi_comm) if self._fast else None
        self._direct_a2av = direct_alltoallv(self.mpi_comm) if self._fast else None
        self._a2av = None

    @property
    def chunk_limit(self):
        """Largest element count per MPI call."""
        return CHUNK_LIMIT if self._chunk_limit is None else self._chunk_limit

    def __repr__(self):
        return (f"MpiCommunicator(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")

    # -- allreduce -----------------------------------------------------------------------
    def allreduce(self, buf, op="sum"):
        """In-place sum or mean over ranks of ``buf`` (float32/float64/int64; int mean floors)."""
        # The common case costs less than raw mpi4py's call: a sum of one contiguous
        # array of a predefined type that fits one call goes straight to MPI_Allreduce
        # from C (hpctrain.comm.direct), or where that is off to mpi4py's Allreduce,
        # which takes the type from the buffer; anything else (or a buffer MPI refuses)
        # takes the checked path below.
        # Beyond INT_MAX elements mpi4py uses MPI-4's large-count call, or refuses the
        # count (OverflowError) and the checked path splits the buffer.
        if op == "sum" and self._fast and type(buf) is _ndarray:
            if self._direct is not None:
                rc = self._direct(buf)
                if rc == 0:
                    return buf
                if rc > 0:
                    raise MPI.Exception(rc)
            try:
                self._Allreduce(_IN_PLACE, buf, _SUM)
                return buf
            except (BufferError, KeyError, ValueError, TypeError, OverflowError):
                pass    # refused before any communication: the checked path says why
        return self._allreduce_checked(buf, op)

    def _allreduce_checked(self, buf, op):
        if op != "sum" and op != "mean":
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        if type(buf) is not np.ndarray or not buf.flags.c_contiguous:
            _contiguous(buf, "buf")  # raises with the reason
        limit = self.chunk_limit
        # Blocking MPI_Allreduce, not Iallreduce+Wait: MPI libraries tune the
        # blocking algorithms far more than the non-blocking schedules. The common
        # case is one call on the array itself, nothing more than raw mpi4py does.
        if buf.size <= limit:
            self.mpi_comm.Allreduce(MPI.IN_PLACE, [buf, mpi_type(buf.dtype)], MPI.SUM)
        else:
            flat, t = buf.reshape(-1), mpi_type(buf.dtype)
            for a, b in split_ranges(0, flat.size, limit):
                self.mpi_comm.Allreduce(MPI.IN_PLACE, [flat[a:b], t], MPI.SUM)
        if op == "mean" and self.size > 1:
            (np.floor_divide if buf.dtype.kind in "iu" else np.divide)(buf, self.size, out=buf)
        return buf

    def iallreduce(self, buf, op="sum"):
        """Start an in-place allreduce; the handle's ``wait()`` returns ``buf``."""
        flat, t, finish = self._reduce_args(buf, op)
        reqs = [self.mpi_comm.Iallreduce(MPI.IN_PLACE, [flat[a:b], t], MPI.SUM)
                for a, b in split_ranges(0, flat.size, self.chunk_limit)]
        return MpiHandle(reqs, buf, finish)

    def _reduce_args(self, buf, op):
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        flat = _contiguous(buf, "buf")
        finish = None
        if op == "mean" and self.size > 1:
            divide = np.floor_divide if flat.dtype.kind in "iu" else np.divide
            finish = lambda: divide(flat, self.size, out=flat)  # noqa: E731
        return flat, mpi_type(flat.dtype), finish

    # -- alltoall / alltoallv ------------------------------------------------------------
    def alltoall(self, send_counts):
        """Exchange one int64 per peer; ``recv_counts[p]`` is what peer ``p`` sends here."""
        send = np.ascontiguousarray(send_counts, dtype=np.int64)
        if send.shape != (self.size,):
            raise ValueError(f"send_counts must have shape ({self.size},), got {send.shape}")
        recv = np.empty(self.size, dtype=np.int64)
        self.mpi_comm.Alltoall([send, MPI.INT64_T], [recv, MPI.INT64_T])
        return recv

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Send ``send_counts[p]`` rows to peer ``p``; receive ``recv_counts[p]`` rows from ``p``.

        With a receive buffer, C-contiguous arrays of a predefined type and int64 count
        arrays whose element counts fit one call, ``MPI_Alltoallv`` is called from C with
        counts and displacements computed there (``hpctrain.comm.direct``). Where direct
        calls are off, a call with the same send and receive arrays (the same objects) and
        count arrays of the same bytes as the previous plain call reuses that call's
        checked arguments (element counts, displacements, buffer specs): the per-call cost
        is then that of raw mpi4py's ``Alltoallv`` plus two comparisons of the counts'
        bytes. Anything else takes the checked path, whose errors name what is wrong.
        Cross-rank checks are the debug communicator's (``HPCTRAIN_DEBUG=1``).
        """
        if self._direct_a2av is not None and recvbuf is not None:
            rc = self._direct_a2av.call(sendbuf, send_counts, recv_counts, recvbuf,
                                        CHUNK_LIMIT // self.size)
            if rc == 0:
                return recvbuf
            if rc > 0:
                raise MPI.Exception(rc)
        c = self._a2av
        if c is not None and sendbuf is c[0] and recvbuf is c[1]:
            try:    # (tobytes is the cheapest look at an array's values)
                hit = send_counts.tobytes() == c[2] and recv_counts.tobytes() == c[3] \
                    and c[4] == CHUNK_LIMIT
            except AttributeError:      # counts in a list: the checked path
                hit = False
            if hit:
                c[5]()
                return recvbuf
        out, args, split = self._alltoallv_args(sendbuf, send_counts, recv_counts, recvbuf)
        # Blocking everywhere: blocking and non-blocking collectives never match each other.
        self._Alltoallv(*args)
        if split is not None:
            reqs, finish = split
            MpiHandle(reqs, out, finish).wait()
            self._a2av = None
        elif recvbuf is not None and self._chunk_limit is None \
                and type(send_counts) is np.ndarray and type(recv_counts) is np.ndarray:
            # Only for a caller's own receive buffer (one allocated here is new each call),
            # and only while the split threshold stays what it was (tests lower it).
            self._a2av = (sendbuf, recvbuf, send_counts.tobytes(), recv_counts.tobytes(),
                          CHUNK_LIMIT, functools.partial(self._Alltoallv, *args))
        else:
            self._a2av = None
        return out

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Start an ``alltoallv``; the handle's ``wait()`` returns ``recvbuf``."""
        recvbuf, args, split = self._alltoallv_args(sendbuf, send_counts, recv_counts, recvbuf)
        reqs, finish = split if split is not None else ([], None)
        return MpiHandle([self.mpi_comm.Ialltoallv(*args), *reqs], recvbuf, finish)

    def _alltoallv_args(self, sendbuf, send_counts, recv_counts, recvbuf):
        """``(recvbuf, Alltoallv arguments, None)``, or with ``(requests, finish)`` of the
        point-to-point part already posted when messages are too large for one call."""
        sc, rc = self._counts(send_counts, "send_counts"), self._counts(recv_counts, "recv_counts")
        if not (isinstance(sendbuf, np.ndarray) and sendbuf.flags.c_contiguous and sendbuf.ndim):
            _contiguous(sendbuf, "sendbuf")
            raise ValueError("sendbuf must have at least one dimension (rows)")
        tail = sendbuf.shape[1:]
        row = math.prod(tail)
        if recvbuf is None:
            recvbuf = np.empty((sum(rc), *tail), dtype=sendbuf.dtype)
        elif not (isinstance(recvbuf, np.ndarray) and recvbuf.flags.c_contiguous
                  and recvbuf.dtype == sendbuf.dtype and recvbuf.shape[1:] == tail):
            _contiguous(recvbuf, "recvbuf")
            raise ValueError(f"recvbuf is {recvbuf.dtype}{list(recvbuf.shape)}, expected "
                             f"{sendbuf.dtype}[rows, {', '.join(map(str, tail))}]")
        scount, sdispl = element_counts(sc, row)
        rcount, rdispl = element_counts(rc, row)
        stotal, rtotal = sdispl[-1] + scount[-1], rdispl[-1] + rcount[-1]
        if stotal > sendbuf.size:
            raise ValueError(f"send_counts sum to {sum(sc)} rows but sendbuf has {len(sendbuf)}")
        if rtotal > recvbuf.size:
            raise ValueError(f"recv_counts sum to {sum(rc)} rows but recvbuf has {len(recvbuf)}")
        sflat, rflat, t = sendbuf.reshape(-1), recvbuf.reshape(-1), mpi_type(sendbuf.dtype)
        if max(stotal, rtotal) <= self.chunk_limit // self.size:
            # The common case: every count and displacement fits, one plain Alltoallv.
            return recvbuf, ([sflat, (scount, sdispl), t], [rflat, (rcount, rdispl), t]), None
        return (recvbuf, *self._split(sflat, scount, sdispl, stotal, rflat, rcount, rdispl,
                                      rtotal, t))

    def _split(self, sflat, scount, sdispl, stotal, rflat, rcount, rdispl, rtotal, t):
        """Messages too large for one call: the first ``chunk_limit // size`` elements
        of each peer block go through the collective, the rest as point-to-point pieces
        of at most ``chunk_limit`` elements. Both ends derive the split from the same
        count, so ranks need not agree on anything and one collective is always called."""
        limit = self.chunk_limit
        cap = limit // self.size
        shead, rhead = [min(c, cap) for c in scount], [min(c, cap) for c in rcount]
        reqs = []
        for p in range(self.size):
            sa, se = sdispl[p] + shead[p], sdispl[p] + scount[p]
            ra, re = rdispl[p] + rhead[p], rdispl[p] + rcount[p]
            if p == self.rank:
                rflat[ra:re] = sflat[sa:se]
                continue
            # Same tag, same order on both ends: MPI's non-overtaking rule pairs the pieces.
            reqs += [self._p2p.Irecv(rflat[x:y], p, _TAG) for x, y in split_ranges(ra, re, limit)]
            reqs += [self._p2p.Isend(sflat[x:y], p, _TAG) for x, y in split_ranges(sa, se, limit)]
        # Heads at their own offsets when those fit an int, else through a packed buffer
        # (at most size * cap <= limit elements, so its offsets fit).
        send = [sflat, (shead, sdispl), t]
        if stotal > limit:
            packed = _gather(sflat, sdispl, shead)
            send = [packed, (shead, displacements(shead)), t]
        recv, finish = [rflat, (rhead, rdispl), t], None
        if rtotal > limit:
            packed_displ = displacements(rhead)
            packed = np.empty(sum(rhead), dtype=rflat.dtype)
            recv = [packed, (rhead, packed_displ), t]

            def finish():
                for p in range(self.size):
                    n, a, b = rhead[p], rdispl[p], packed_displ[p]
                    rflat[a:a + n] = packed[b:b + n]
        return (send, recv), (reqs, finish)

    def _counts(self, counts, name):
        """``counts`` as a list of ``size`` non-negative Python ints, or a clear error."""
        if isinstance(counts, np.ndarray):
            if counts.ndim != 1 or counts.dtype.kind not in "iu":
                raise ValueError(f"{name} must be {self.size} integers, got {counts.dtype} "
                                 f"array of shape {counts.shape}")
            out = counts.tolist()
        else:
            out = [operator.index(c) for c in counts]
        if len(out) != self.size:
            raise ValueError(f"{name} must have {self.size} entries (one per rank), got {len(out)}")
        if min(out) < 0:
            raise ValueError(f"{name} has negative entries: {out}")
        return out

    # -- the rest ------------------------------------------------------------------------
    def bcast(self, obj, root=0):
        """Broadcast a NumPy array in place (every rank passes one of the same shape/dtype)
        or any picklable object (returned)."""
        if not isinstance(obj, np.ndarray):
            return self.mpi_comm.bcast(obj, root=root)
        flat = _contiguous(obj, "array")
        t = mpi_type(flat.dtype)
        for a, b in split_ranges(0, flat.size, self.chunk_limit):
            self.mpi_comm.Bcast([flat[a:b], t], root=root)
        return obj

    def barrier(self):
        """Block until every rank of the group has entered."""
        self.mpi_comm.Barrier()

    def split(self, color, key=0):
        """Communicator over the ranks with the same ``color`` (None: this rank joins none)."""
        sub = self.mpi_comm.Split(MPI.UNDEFINED if color is None else color, key)
        if sub == MPI.COMM_NULL:
            return None
        return type(self)(sub, chunk_limit=self._chunk_limit)

    # -- capabilities ----------------------------------------------------------------------
    capabilities = frozenset({"shared_window"})

    def shared_arena(self, group_size=None):
        """A ``hpctrain.comm.shm.SharedArena`` over the ranks of this node (collective)."""
        from hpctrain.comm.shm import SharedArena
        return SharedArena(self.mpi_comm, group_size)

    def allgatherv(self, local):
        """Every rank's 1-D ``local`` concatenated in rank order (typed ``Allgatherv``)."""
        local = np.ascontiguousarray(local).reshape(-1)
        counts = np.asarray(self.mpi_comm.allgather(local.size), dtype=np.int64)
        if counts.sum() > self.chunk_limit:
            return np.concatenate(self.mpi_comm.allgather(local))
        full = np.empty(int(counts.sum()), dtype=local.dtype)
        self.mpi_comm.Allgatherv([local, mpi_type(local.dtype)],
                                 [full, (counts, displacements(counts)), mpi_type(local.dtype)])
        return full
