"""Debug mode (``HPCTRAIN_DEBUG=1``): cross-rank checks around every collective.

``DebugCommunicator`` wraps any backend. Before a collective every rank gathers a
small description of its arguments (shapes, dtypes, counts, op, root, whether
its input is finite) from every rank; if they do not fit together, *every* rank
raises the same ``CommError`` naming the ranks that disagree, instead of one
rank crashing inside MPI while the others hang. After a float collective it
checks the result is finite on every rank. The checks cost one small
``allgather`` per collective: use them to find a bug, not in production.
"""
import numpy as np

from hpctrain.comm.base import Communicator, Handle
from hpctrain.errors import CommError, NonFiniteError


class NonFiniteCollectiveError(NonFiniteError, CommError):
    """NaN/Inf went into or came out of a collective (debug mode)."""


def _xp_all_finite(buf):
    """True when a NumPy/CuPy buffer holds no NaN/Inf (always True for integers)."""
    if buf.size == 0 or (buf.dtype.kind not in "fc" and buf.dtype.name != "bfloat16"):
        return True
    if buf.dtype.name == "bfloat16":  # an ml_dtypes extension type: test it as float32
        buf = buf.astype(np.float32)
    if type(buf).__module__.split(".")[0] == "cupy":
        import cupy
        return bool(cupy.isfinite(buf).all())
    return bool(np.isfinite(buf).all())


def _total(counts):
    return int(sum(int(c) for c in np.asarray(counts).reshape(-1)))


def _ranks(ranks):
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def disagreement(what, values):
    """Message naming which ranks passed which value, or None when all agree.

    Args:
        what: name of the compared property (e.g. "shape/dtype/op").
        values: one (hashable, printable) value per rank.
    """
    groups = {}
    for rank, v in enumerate(values):
        groups.setdefault(v, []).append(rank)
    if len(groups) < 2:
        return None
    # Largest group first: the odd ones out are the likely culprits.
    parts = [f"{_ranks(r)}: {v}" for v, r in sorted(groups.items(), key=lambda g: -len(g[1]))]
    return f"ranks disagree on {what}: " + "; ".join(parts)


class DebugHandle(Handle):
    """Wraps a backend handle; checks finiteness of the result on ``wait()``."""

    def __init__(self, inner, after):
        self._inner, self._after, self._result = inner, after, None

    def wait(self):
        """Complete the operation, then run the post-collective check (once)."""
        if self._after is not None:
            self._result = self._inner.wait()
            after, self._after = self._after, None
            after(self._result)
            return self._result
        return self._result if self._result is not None else self._inner.wait()

    def test(self):
        """Whether the wrapped operation has completed."""
        return self._inner.test()


class DebugCommunicator(Communicator):
    """A backend communicator with cross-rank argument checks (see module doc)."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.local_rank, self.local_size = inner.local_rank, inner.local_size
        self.mpi_comm = inner.mpi_comm
        self.capabilities = inner.capabilities

    def __repr__(self):
        return f"DebugCommunicator({self.inner!r})"

    def shared_arena(self, group_size=None):
        """The backend's shared arena (windows are not collectives: nothing to check)."""
        return self.inner.shared_arena(group_size)

    def allgatherv(self, local):
        """The backend's ``allgatherv``."""
        return self.inner.allgatherv(local)

    def __getattr__(self, name):  # backend extras (hosts, chunk_limit, ...)
        if name == "inner":  # not yet set: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _fail(self, op, message, cls=CommError):
        raise cls(f"HPCTRAIN_DEBUG: {op} over {self.size} ranks: {message}")

    def _check_finite(self, op, ok, stage):
        flags = self.inner.allgather_object(bool(ok))
        if not all(flags):
            bad = [r for r, f in enumerate(flags) if not f]
            self._fail(op, f"{_ranks(bad)} {stage} NaN or Inf", NonFiniteCollectiveError)

    # -- allreduce -----------------------------------------------------------------------
    def _before_allreduce(self, buf, op):
        desc = (f"shape={tuple(buf.shape)} dtype={buf.dtype} op={op!r}", _xp_all_finite(buf))
        descs = self.inner.allgather_object(desc)
        msg = disagreement("shape/dtype/op", [d[0] for d in descs])
        if msg:
            self._fail("allreduce", msg)
        bad = [r for r, d in enumerate(descs) if not d[1]]
        if bad:
            self._fail("allreduce", f"{_ranks(bad)} contribute NaN or Inf",
                       NonFiniteCollectiveError)

    def _after_float(self, op, stage="hold after it", rows=None):
        # Only the rows a collective wrote: a preallocated recvbuf may hold garbage beyond.
        return lambda out: self._check_finite(
            op, _xp_all_finite(out if rows is None else out[:rows]), stage)

    def allreduce(self, buf, op="sum"):
        """Checked ``allreduce``."""
        self._before_allreduce(buf, op)
        out = self.inner.allreduce(buf, op)
        self._after_float("allreduce")(out)
        return out

    def iallreduce(self, buf, op="sum"):
        """Checked ``iallreduce`` (the finiteness check runs in ``wait()``)."""
        self._before_allreduce(buf, op)
        return DebugHandle(self.inner.iallreduce(buf, op), self._after_float("iallreduce"))

    # -- alltoall / alltoallv ------------------------------------------------------------
    def alltoall(self, send_counts):
        """Checked ``alltoall`` of counts (every rank passes ``size`` non-negative ints)."""
        counts = np.asarray(send_counts).reshape(-1).tolist()
        lens = self.inner.allgather_object(len(counts))
        bad = [r for r, n in enumerate(lens) if n != self.size]
        if bad:
            self._fail("alltoall", f"{_ranks(bad)} passed {[lens[r] for r in bad]} counts, "
                       f"expected {self.size} (one per rank)")
        return self.inner.alltoall(send_counts)

    def _before_alltoallv(self, op, sendbuf, send_counts, recv_counts, recvbuf):
        sc = [int(c) for c in np.asarray(send_counts).reshape(-1)]
        rc = [int(c) for c in np.asarray(recv_counts).reshape(-1)]
        n = min(sum(sc), sendbuf.shape[0])
        desc = (f"dtype={sendbuf.dtype} row shape={tuple(sendbuf.shape[1:])}", sc, rc,
                sendbuf.shape[0], None if recvbuf is None else recvbuf.shape[0],
                _xp_all_finite(sendbuf[:n]))
        descs = self.inner.allgather_object(desc)
        msg = disagreement("dtype/row shape", [d[0] for d in descs])
        if msg:
            self._fail(op, msg)
        problems = []
        for r, (_, s, rv, rows, rrows, _) in enumerate(descs):
            if len(s) != self.size or len(rv) != self.size:
                problems.append(f"rank {r} passed {len(s)} send and {len(rv)} recv counts, "
                                f"expected {self.size}")
            elif sum(s) > rows:
                problems.append(f"rank {r} sends {sum(s)} rows from a buffer of {rows}")
            elif rrows is not None and sum(rv) > rrows:
                problems.append(f"rank {r} receives {sum(rv)} rows into a buffer of {rrows}")
        if not problems:
            problems = [f"rank {i} sends {descs[i][1][p]} rows to rank {p}, which expects "
                        f"{descs[p][2][i]} from rank {i}"
                        for i in range(self.size) for p in range(self.size)
                        if descs[i][1][p] != descs[p][2][i]]
        if problems:
            self._fail(op, "; ".join(problems))
        bad = [r for r, d in enumerate(descs) if not d[5]]
        if bad:
            self._fail(op, f"{_ranks(bad)} send NaN or Inf", NonFiniteCollectiveError)

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Checked ``alltoallv``: counts must match pairwise (sent by i to p == expected by p)."""
        self._before_alltoallv("alltoallv", sendbuf, send_counts, recv_counts, recvbuf)
        out = self.inner.alltoallv(sendbuf, send_counts, recv_counts, recvbuf)
        self._after_float("alltoallv", "received", _total(recv_counts))(out)
        return out

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Checked ``ialltoallv`` (the finiteness check runs in ``wait()``)."""
        self._before_alltoallv("ialltoallv", sendbuf, send_counts, recv_counts, recvbuf)
        return DebugHandle(self.inner.ialltoallv(sendbuf, send_counts, recv_counts, recvbuf),
                           self._after_float("ialltoallv", "received", _total(recv_counts)))

    # -- the rest ------------------------------------------------------------------------
    def bcast(self, obj, root=0):
        """Checked ``bcast``: same root everywhere; arrays agree in shape and dtype."""
        is_array = hasattr(obj, "shape") and hasattr(obj, "dtype")
        desc = f"root={root} " + (f"array shape={tuple(obj.shape)} dtype={obj.dtype}"
                                  if is_array else "object")
        descs = self.inner.allgather_object(desc)
        msg = disagreement("root/argument", descs)
        if msg:
            self._fail("bcast", msg)
        return self.inner.bcast(obj, root)

    def barrier(self):
        """Plain barrier."""
        self.inner.barrier()

    def split(self, color, key=0):
        """Checked ``split``: the new communicator is checked too."""
        sub = self.inner.split(color, key)
        return None if sub is None else DebugCommunicator(sub)

    def allgather_object(self, obj):
        """Plain ``allgather_object``."""
        return self.inner.allgather_object(obj)
