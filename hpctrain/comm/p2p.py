"""Point-to-point messages: an int64 header plus a few arrays, with deadlines.

The parameter-server mode (``hpctrain.ps``) talks through this interface only,
so another transport (between separate jobs, say) can replace it without
touching the server or client logic. One message is one MPI message::

    bytes  [ prefix int64[2 + 2 * n]  | header int64[h] | array 0 | array 1 | ... ]
    prefix  h, n, then per array: dtype code, element count
            (each part starts at a multiple of 8 bytes)

Sends are non-blocking (``send`` returns a handle; the packed copy lives until
it completes). Receives probe with a matched probe (``improbe``, so a later
second thread cannot steal the message) and sleep with an exponential back-off
between empty probes, from ``tmax / 1024`` doubling to ``tmax`` (mpi4py.futures'
``Backoff``): an idle rank does not spin a core, which matters when ranks
outnumber cores. Every wait has a deadline and raises ``CommError`` naming the
peer and what was awaited, so nothing hangs for ever.

All calls come from one thread per process.
"""
import time

import numpy as np
from mpi4py import MPI

from hpctrain.errors import CommError

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG

#: Longest back-off sleep between empty probes (seconds); mpi4py.futures' default.
BACKOFF_MAX = 0.001

_DTYPES = [np.dtype(t) for t in ("i8", "f4", "f8", "i4", "u8", "u1")]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


class Backoff:
    """Sleeps that double from ``tmax / 1024`` to ``tmax`` while nothing happens."""

    def __init__(self, tmax=BACKOFF_MAX):
        self.tmax = max(float(tmax), 0.0)
        self.tmin = self.tmax / 1024
        self.tval = 0.0

    def reset(self):
        self.tval = 0.0

    def sleep(self):
        time.sleep(self.tval)
        self.tval = min(self.tmax, max(self.tmin, self.tval * 2))


class Message:
    """A received message: ``source`` (rank), ``tag``, ``header`` (int64), ``arrays``."""

    __slots__ = ("source", "tag", "header", "arrays", "nbytes")

    def __init__(self, source, tag, header, arrays, nbytes):
        self.source, self.tag, self.header, self.arrays = source, tag, header, arrays
        self.nbytes = nbytes

    def __repr__(self):
        return (f"Message(source={self.source}, tag={self.tag}, header={self.header.tolist()}, "
                f"arrays={[f'{a.dtype}[{a.size}]' for a in self.arrays]})")


class SendHandle:
    """A started send; ``test()`` / ``wait()`` complete it."""

    __slots__ = ("_req", "_buf", "dest", "nbytes")

    def __init__(self, req, buf, dest):
        self._req, self._buf, self.dest, self.nbytes = req, buf, dest, buf.nbytes

    def test(self):
        if self._req is None:
            return True
        if self._req.Test():
            self._req, self._buf = None, None
            return True
        return False

    def wait(self):
        if self._req is not None:
            self._req.Wait()
            self._req, self._buf = None, None


def _pad8(n):
    return -(-n // 8) * 8


def pack(header, arrays):
    """One uint8 buffer holding ``header`` (int64) and ``arrays`` (see module docstring)."""
    header = np.ascontiguousarray(header, dtype=np.int64).reshape(-1)
    arrays = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    prefix = np.empty(2 + 2 * len(arrays), dtype=np.int64)
    prefix[0], prefix[1] = header.size, len(arrays)
    sizes = [prefix.nbytes, header.nbytes]
    for i, a in enumerate(arrays):
        code = _CODE.get(a.dtype)
        if code is None:
            raise TypeError(f"p2p: cannot send dtype {a.dtype} (supported: "
                            f"{', '.join(map(str, _DTYPES))})")
        prefix[2 + 2 * i], prefix[3 + 2 * i] = code, a.size
        sizes.append(_pad8(a.nbytes))
    buf = np.empty(sum(sizes), dtype=np.uint8)
    at = 0
    for part, size in zip([prefix, header, *arrays], sizes):
        buf[at:at + part.nbytes] = part.view(np.uint8)
        at += size
    return buf


def unpack(buf):
    """``(header, arrays)`` of a buffer made by ``pack`` (views into ``buf``)."""
    nh, na = (int(x) for x in buf[:16].view(np.int64))
    prefix = buf[:16 + 16 * na].view(np.int64)
    at = prefix.nbytes
    header = buf[at:at + 8 * nh].view(np.int64)
    at += 8 * nh
    arrays = []
    for i in range(na):
        dt, n = _DTYPES[int(prefix[2 + 2 * i])], int(prefix[3 + 2 * i])
        arrays.append(buf[at:at + n * dt.itemsize].view(dt))
        at += _pad8(n * dt.itemsize)
    return header, arrays


class PointToPoint:
    """Header + arrays messages between the ranks of a communicator.

    Args:
        comm: a ``hpctrain.comm`` communicator; messages travel on a private
            duplicate of its MPI communicator (creation is collective over it).
        backoff: longest sleep between empty probes (seconds; 0 spins).

    Attributes:
        rank, size: this rank and the number of ranks (of ``comm``).
        sent_bytes, recv_bytes: bytes moved so far (packed messages).
    """

    def __init__(self, comm, backoff=BACKOFF_MAX):
        self._comm = comm.mpi_comm.Dup()
        self.rank, self.size = self._comm.rank, self._comm.size
        self.backoff_max = backoff
        self.sent_bytes = self.recv_bytes = 0
        self._status = MPI.Status()

    def send(self, dest, tag, header, arrays=()):
        """Start sending ``header`` and ``arrays`` to rank ``dest``; returns a ``SendHandle``.

        The arrays are copied into the message, so the caller may reuse them at once.
        """
        buf = pack(header, arrays)
        self.sent_bytes += buf.nbytes
        return SendHandle(self._comm.Isend([buf, MPI.BYTE], dest, tag), buf, dest)

    def poll(self, source=ANY_SOURCE, tag=ANY_TAG):
        """The next matching message if one has arrived, else None (never blocks on others)."""
        st = self._status
        msg = self._comm.improbe(source, tag, st)
        if msg is None:
            return None
        n = st.Get_count(MPI.BYTE)
        src, tg = st.Get_source(), st.Get_tag()
        buf = np.empty(n, dtype=np.uint8)
        msg.Recv([buf, MPI.BYTE])
        self.recv_bytes += n
        header, arrays = unpack(buf)
        return Message(src, tg, header, arrays, n)

    def recv(self, source=ANY_SOURCE, tag=ANY_TAG, timeout=None, what=None, idle=None):
        """Wait for a matching message, probing with back-off.

        Args:
            source, tag: what to match (``ANY_SOURCE`` / ``ANY_TAG``).
            timeout: seconds before ``CommError`` (None: wait for ever).
            what: a phrase for the error, e.g. "the rows of clock 7" (the peer
                rank is named by this method).
            idle: optional callable run between empty probes (e.g. completing sends).

        Raises:
            CommError: no message within ``timeout``; names this rank, the peer and ``what``.
        """
        msg = self.poll(source, tag)
        if msg is not None:
            return msg
        backoff = Backoff(self.backoff_max)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if idle is not None:
                idle()
            backoff.sleep()
            msg = self.poll(source, tag)
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() > deadline:
                peer = "any rank" if source == ANY_SOURCE else f"rank {source}"
                raise CommError(f"rank {self.rank}: nothing from {peer} within {timeout:g} s "
                                f"while waiting for {what or f'a message with tag {tag}'}; the "
                                f"peer stopped answering (hung or too slow: raise ps.timeout_s "
                                f"if it is only slow)")

    def backoff(self):
        """A fresh ``Backoff`` with this transport's longest sleep (for callers' own loops)."""
        return Backoff(self.backoff_max)

    def close(self):
        """Free the duplicate communicator (after every send completed)."""
        if self._comm != MPI.COMM_NULL:
            self._comm.Free()
