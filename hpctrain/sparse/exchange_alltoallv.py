"""Exchange by MPI collectives: counts ``Alltoall``, ids, rows and gradients ``Alltoallv``.

One lookup, top to bottom (every rank is a requester and an owner)::

    requester                                               owner
    ids in (owner, table) order (plan.route)
    counts [P, T] ──────── Alltoall ────────────────────>  from_peer_table [P, T]
    ids ──────────────── Alltoallv (started) ───────────>  recv ids          (start)
                                                           serve: dedup per table in
                                                           source order, find_or_insert,
                                                           gather into the reply
    rows <─────────────── Alltoallv ───────────────────── reply              (rows)
    backward: per-id gradient sums in the rows' layout
    grads ─────────────── Alltoallv ────────────────────>  segment sum in source order,
                                                           optimizer once per id (backward)

The row buffers are flat float32 with each row at its own element offset, so
tables of different widths share each message.
"""
import numpy as np

from hpctrain.workpool import parallel_map


class Done:
    """A completed exchange posing as a communicator handle."""

    def __init__(self, result):
        self._result = result

    def wait(self):
        return self._result


class AlltoallvExchange:
    """Moves requests, rows and gradients of a ``ShardedEmbedding`` by collectives.

    Args:
        comm: the store's communicator.
        owner: the store's ``OwnerSide``.
        timer: the store's phase timer (laps: counts, ids_a2a, lookup, rows_a2a,
            pool, grad_a2a, update).
        buffers: the store's ``plan.Buffers``.
    """

    name = "alltoallv"

    def __init__(self, comm, owner, timer, buffers):
        self.comm, self.owner, self._t, self._buf = comm, owner, timer, buffers
        self._ones = np.ones(comm.size, dtype=np.int64)
        # bytes this rank sent to other ranks since construction, per path and part
        self.sent = {"alltoallv": dict.fromkeys(("counts", "ids", "rows", "grads"), 0),
                     "window": dict.fromkeys(("requests", "rows", "grads"), 0)}
        self._others = np.ones(comm.size, dtype=bool)
        self._others[comm.rank] = False

    def _count(self, path, part, per_peer, itemsize, peers=None):
        """Add the bytes of ``per_peer`` elements sent to ``peers`` (default: every other
        rank) to ``sent[path][part]``."""
        mask = self._others if peers is None else peers
        self.sent[path][part] += int(np.asarray(per_peer)[mask].sum()) * itemsize

    def start(self, look, blocking=False):
        """Pack the ids, exchange counts and start the ids ``Alltoallv`` (``look.ids``)."""
        send_ids = look.route.fill_ids(
            self._buf.get(look.prefix + "send_ids", look.route.total, np.int64))
        self._t.lap("route")
        self.exchange_requests(look, send_ids, blocking)
        self._t.lap("ids_a2a")

    def exchange_requests(self, look, send_ids, blocking):
        """Counts by ``Alltoall``, then the ids ``Alltoallv`` (started unless ``blocking``)."""
        r = look.route
        # a receive buffer of its own: the call can go to MPI from C (comm.direct)
        look.from_peer_table = self.comm.alltoallv(r.per_table, self._ones, self._ones,
                                                   recvbuf=np.empty_like(r.per_table))
        self.sent["alltoallv"]["counts"] += 8 * r.per_table.shape[1] * (self.comm.size - 1)
        self._count("alltoallv", "ids", r.to_peer, 8)
        look.serve_elems = look.from_peer_table @ self.owner.dims
        self._t.lap("counts")
        serve_ids = look.from_peer_table.sum(axis=1)
        recv = self._buf.get(look.prefix + "recv_ids", int(serve_ids.sum()), np.int64)
        if blocking:
            # forward() waits at once: the blocking collective avoids the progress
            # engine's polling (and yielding) of a non-blocking one
            look.ids = Done(self.comm.alltoallv(send_ids, r.to_peer, serve_ids, recvbuf=recv))
        else:
            look.ids = self.comm.ialltoallv(send_ids, r.to_peer, serve_ids, recvbuf=recv)

    def rows(self, look):
        """Owners serve the received ids; rows come back. Returns ``(rows, unique_off)``."""
        recv_ids = look.ids.wait()
        look.ids = None
        self._t.lap("ids_a2a")
        return self.serve_and_return(look, recv_ids)

    def serve_and_return(self, look, recv_ids):
        """Owner side into a packed reply, then the rows ``Alltoallv``."""
        pre = look.prefix
        reply = self._buf.get(pre + "reply", int(look.serve_elems.sum()), np.float32)
        look.parts = self.owner.serve(recv_ids, look.from_peer_table, look.step, look.train,
                                      reply, look.id_start)
        self._t.lap("lookup")
        rows = self._buf.get(pre + "rows", int(look.route.ask_elems.sum()), np.float32)
        self.comm.alltoallv(reply, look.serve_elems, look.route.ask_elems, recvbuf=rows)
        self._count("alltoallv", "rows", look.serve_elems, 4)
        self._t.lap("rows_a2a")
        return rows, look.route.unique_off

    def backward(self, look, grads, step):
        """Per-id gradients to their owners, who apply them."""
        t, r = self._t, look.route
        send = self._buf.get("grad_send", int(r.ask_elems.sum()), np.float32)
        parallel_map(lambda a: a[0].unique_grads(grads, out=send, out_off=a[1]),
                   zip(look.plans, r.unique_off))
        t.lap("pool")
        recv = self._buf.get("grad_recv", int(look.serve_elems.sum()), np.float32)
        self.comm.alltoallv(send, r.ask_elems, look.serve_elems, recvbuf=recv)
        self._count("alltoallv", "grads", r.ask_elems, 4)
        t.lap("grad_a2a")
        self.owner.apply(look.parts, recv, step)
        t.lap("update")

    def nbytes(self):
        return 0

    def window_ranks(self):
        """World ranks sharing this rank's window (none: just this rank)."""
        return [self.comm.rank]

    def close(self):
        pass
