"""PSClient: the embedding store of a worker whose rows live on parameter servers.

Same interface as ``ShardedEmbedding`` (``hpctrain.sparse.store``), same plan
(``TableBatch``: dedup, pooling, per-unique-id gradient sums); only where rows
come from differs::

    start_lookup(batch, c)  dedup per table ─> route(uniq, table, S) ─> PULL(c) to
                            every server (ids in (server, table, first occurrence) order)
    wait_lookup(t)          ROWS(c) from every server ─> rows in one flat buffer ─> pool
    backward(t, grads, c)   per-unique-id gradient sums ─> PUSH(c) to every server
                            (an empty PUSH where no id goes: the server counts clocks)

A server answers the PULL of clock c once it has applied clock c - 1 - s, so a
trainer that starts the next lookup before this step's backward (overlap) lets
the pull travel while the dense step runs: with s = 0 the server holds it until
this clock is applied (BSP, same numbers); with s >= 1 it is answered at once
when the slowest group is close enough (prefetch).

Per step the client records the staleness it was served (``c - 1 - applied``,
the number of earlier clocks whose updates the rows miss), the seconds it
blocked waiting for rows, and bytes moved.
"""
import time

import numpy as np

from hpctrain.ps import protocol as P
from hpctrain.sparse.collection import check_grads, split_batch
from hpctrain.sparse.plan import exclusive_cumsum, route
from hpctrain.sparse.routing import owner_of
from hpctrain.sparse.spec import resolve_specs
from hpctrain.sparse.store import EmbeddingStore, Ticket

PHASES = ("dedup", "route", "pull", "wait", "pool", "push")


class PSTicket(Ticket):
    """A started lookup of a ``PSClient``."""

    __slots__ = ("plans", "unique_off", "ids", "id_start", "to_server", "per_table",
                 "elems", "elem_start")


class PSClient(EmbeddingStore):
    """Embedding tables held by parameter servers, seen from one worker.

    Args:
        specs: list of ``TableSpec`` (the servers hold the same list).
        p2p: ``hpctrain.comm.p2p.PointToPoint`` over the world.
        servers: world ranks of the servers, in server-index order.
        worker, group: this worker's index and group.
        timeout_s: ``ps.timeout_s``; a worker waits ``WORKER_WAIT`` times that for a
            server's answer before ``CommError``.

    Attributes:
        staleness: per training step, the staleness of the rows it read.
        wait_s: per training step, seconds blocked waiting for rows.
        stop_clock: the clock every worker stops at after a stop signal, as server 0's
            replies announce it (0: none).
    """

    def __init__(self, specs, p2p, servers, worker, group, timeout_s=300.0):
        self.specs, self.feature_to_table = resolve_specs(specs)
        self.p2p, self.servers = p2p, list(servers)
        self.worker, self.group = worker, group
        self.timeout_s = float(timeout_s) * P.WORKER_WAIT
        self._dims = np.array([s.dim for s in self.specs], dtype=np.int64)
        self._sends = []
        self._timers = dict.fromkeys(PHASES, 0.0)
        self.staleness, self.wait_s = [], []
        self.stop_clock = 0
        self._closed = False

    # ------------------------------------------------------------------ interface
    @property
    def timers(self):
        return dict(self._timers)

    def reset_timers(self):
        for k in self._timers:
            self._timers[k] = 0.0

    def start_lookup(self, batch, step, train=True):
        """Dedup and route this worker's ids; send a PULL (EVAL) to every server."""
        S = len(self.servers)
        t0 = time.perf_counter()
        t = PSTicket(step, train)
        t.plans = split_batch(batch, self.specs, self.feature_to_table)
        t1 = time.perf_counter()
        r = route(t.plans, self._dims, S)      # the sharded store's layout, S owners
        t.ids = r.fill_ids(np.empty(r.total, dtype=np.int64))
        t.unique_off = r.unique_off
        t.to_server, t.per_table = r.to_peer, r.per_table
        t.id_start = exclusive_cumsum(r.to_peer)
        t.elems = r.ask_elems
        t.elem_start = exclusive_cumsum(t.elems)
        t2 = time.perf_counter()
        tag = P.PULL if train else P.EVAL
        for k, rank in enumerate(self.servers):
            a = int(t.id_start[k])
            h = P.header(step, self.worker, self.group, counts=t.per_table[k])
            self._sends.append(self.p2p.send(rank, tag, h, [t.ids[a:a + int(t.to_server[k])]]))
        t3 = time.perf_counter()
        self._timers["dedup"] += t1 - t0
        self._timers["route"] += t2 - t1
        self._timers["pull"] += t3 - t2
        return t

    def wait_lookup(self, ticket):
        """Receive the rows of a started lookup from every server and pool them."""
        ticket._mark_waited("PSClient")
        t0 = time.perf_counter()
        tag, step = (P.ROWS if ticket.train else P.EROWS), ticket.step
        rows = np.empty(int(ticket.elems.sum()), dtype=np.float32)
        oldest = None
        for k, rank in enumerate(self.servers):
            what = (f"the rows of {'PULL' if ticket.train else 'EVAL'} of clock {step} "
                    f"(worker {self.worker}, group {self.group})")
            msg = self.p2p.recv(rank, tag, self.timeout_s, what=what, idle=self._progress)
            got = int(msg.header[P.H_CLOCK])
            if got != step:
                raise RuntimeError(f"worker {self.worker}: server rank {rank} answered clock "
                                   f"{got}, expected {step} (lookups must be waited in order)")
            a, n = int(ticket.elem_start[k]), int(ticket.elems[k])
            if msg.arrays[0].shape[0] != n:
                raise RuntimeError(f"worker {self.worker}: server rank {rank} sent "
                                   f"{msg.arrays[0].shape[0]} floats for clock {step}, "
                                   f"expected {n}")
            rows[a:a + n] = msg.arrays[0]
            applied = int(msg.header[P.H_AUX])
            oldest = applied if oldest is None else min(oldest, applied)
            self._note_stop(int(msg.header[P.H_STOP]), rank)
        t1 = time.perf_counter()
        if ticket.train:
            self.staleness.append(step - 1 - oldest)
            self.wait_s.append(t1 - t0)
        outputs = {}
        for p, off in zip(ticket.plans, ticket.unique_off):
            outputs.update(p.pool(rows, off))
        self._timers["wait"] += t1 - t0
        self._timers["pool"] += time.perf_counter() - t1
        return outputs

    def backward(self, ticket, grads, step):
        """Send each server the per-unique-id gradient sums of its ids (PUSH of ``step``)."""
        check_grads(grads, ticket.plans)
        ticket._mark_applied("PSClient")
        t0 = time.perf_counter()
        send = np.empty(int(ticket.elems.sum()), dtype=np.float32)
        for p, off in zip(ticket.plans, ticket.unique_off):
            p.unique_grads(grads, out=send, out_off=off)
        t1 = time.perf_counter()
        for k, rank in enumerate(self.servers):
            a, n = int(ticket.id_start[k]), int(ticket.to_server[k])
            e, m = int(ticket.elem_start[k]), int(ticket.elems[k])
            h = P.header(step, self.worker, self.group, counts=ticket.per_table[k])
            self._sends.append(self.p2p.send(rank, P.PUSH, h,
                                             [ticket.ids[a:a + n], send[e:e + m]]))
        self._progress()
        self._timers["pool"] += t1 - t0
        self._timers["push"] += time.perf_counter() - t1

    def evict(self, step):
        """Nothing here: servers evict when they apply a clock. Returns {}."""
        return {}

    def export(self):
        """Rows live on the servers; a worker holds none. Returns {}."""
        return {}

    def import_(self, tables):
        raise NotImplementedError("PSClient.import_: rows live on the servers; restore them "
                                  "there (hybrid checkpoints)")

    def owner_of(self, table, keys):
        """Server index (not world rank) of every key of ``table``."""
        tid = next(s.table_id for s in self.specs if s.name == table)
        return owner_of(tid, keys, len(self.servers))

    def stats(self):
        st = np.asarray(self.staleness, dtype=np.int64)
        hist = np.bincount(st) if st.size else np.zeros(0, dtype=np.int64)
        return {"rows": {}, "exchange": "ps", "buffer_bytes": 0,
                "steps": int(st.size),
                "staleness_mean": float(st.mean()) if st.size else 0.0,
                "staleness_max": int(st.max()) if st.size else 0,
                "staleness_hist": {int(i): int(n) for i, n in enumerate(hist) if n},
                "pull_wait_s": float(np.sum(self.wait_s)),
                "sent_bytes": int(self.p2p.sent_bytes), "recv_bytes": int(self.p2p.recv_bytes)}

    def close(self):
        """Tell every server this worker has finished (DONE), then complete all sends."""
        if self._closed:
            return
        self._closed = True
        for rank in self.servers:
            self._sends.append(self.p2p.send(rank, P.DONE, P.header(-1, self.worker,
                                                                     self.group)))
        for s in self._sends:
            s.wait()
        self._sends = []

    def request_stop(self, clock, signum):
        """Tell server 0 that a stop signal arrived here (it decides the stop clock)."""
        self._sends.append(self.p2p.send(self.servers[0], P.STOP,
                                         P.header(clock, self.worker, self.group,
                                                  aux=int(signum))))

    # ------------------------------------------------------------------ helpers
    def _note_stop(self, stop, rank):
        if not stop or stop == self.stop_clock:
            return
        if self.stop_clock:
            raise RuntimeError(f"worker {self.worker}: server rank {rank} announces stop clock "
                               f"{stop}, another announced {self.stop_clock}")
        self.stop_clock = stop

    def _progress(self):
        self._sends = [s for s in self._sends if not s.test()]
