"""The parameter server: one thread, one loop, clocked aggregation, SSP on reads.

A server holds shard i of every embedding table (the ids ``route(id, table, S)``
sends to it) and, with dense parameters on the servers, slice i of the flat
dense buffer with its optimizer state. Its loop::

    msg = probe (back-off while idle; ps.timeout_s without a message while
          something is awaited -> CommError naming the ranks and the clock)
    PULL  clock c   answered when applied >= c - 1 - s (else deferred): the rows
                    as they are, a missing row read as its initial value; nothing
                    is inserted. Answers carry ``applied``.
    PUSH  clock c   buffered per clock (ASP: applied on arrival)
    DPUSH clock c   buffered per clock (ASP: applied on arrival)
    DPULL clock c   answered like PULL, with this server's dense slice
    EVAL  clock c   answered when applied >= c (an evaluation sees every clock it follows);
                    a missing row reads as zeros, as collective evaluation lookups do
    DONE            the worker has finished; the loop ends when every worker has
    CKPT    clock K worker 0 asks for the checkpoint of clock K: written (every server
                    its shard, server 0 the dense state and the manifest) as soon as
                    applied == K, before clock K + 1 is applied (``hpctrain.ps.checkpoint``)
    DELTA   clock K worker 0 asks for the delta of clock K (online runs): written the same
                    way, every server its shard's rows updated since the previous delta and
                    its tombstones, server 0 the dense weights and DONE (``hpctrain.ps.delta``);
                    the CKPT and DELTA of one clock are acted on in the order they arrived
    STOP            (server 0) a stop signal arrived somewhere: every worker stops after
                    clock K = 1 + the highest clock whose PULL was answered, announced in
                    every reply from then on (``protocol``, "Stopping")
    then, while clock applied + 1 has every worker's PUSH (and every group's DPUSH):
        apply it (below), applied += 1, evict, answer the deferred pulls it unblocks,
        write the checkpoint / delta of that clock when one was asked for

Applying clock c is the owner side of ``ShardedEmbedding.backward`` with the
workers as the sources, so the arithmetic is the collective trainer's: per table,
the workers' id blocks deduplicated in worker order (``unique_blocks``), missing
rows inserted (``find_or_insert(uniq, c)``), gradients summed per id in worker order
(``segment_sum``), the optimizer run once per id with step c. Dense: the group
slices summed in group order, one optimizer step. The update sequence is therefore
the BSP sequence whatever the staleness; staleness only changes what workers read.
"""
import json
import os
import sys
import time

import numpy as np

from hpctrain._kernels import sparse_ops
from hpctrain.errors import CommError
from hpctrain.ps import protocol as P
from hpctrain.ps.dense import DenseShard
from hpctrain.ps.requests import Requests
from hpctrain.sparse.collection import make_table
from hpctrain.sparse.plan import exclusive_cumsum
from hpctrain.sparse.spec import resolve_specs


def read_rows(table, keys):
    """float32[n, dim]: rows of ``keys``, a missing row read as its initial value.

    Read-only: nothing is inserted, no count or step changes. The initial value is
    the table's own formula (``hpctrain.sparse.init``), computed by the same kernel and
    rounded to the table's row dtype (``EmbeddingTable.initial_rows``).
    """
    idx = table.find(keys)
    rows = table.gather(idx)
    missing = np.flatnonzero(idx < 0)
    if missing.size:
        rows[missing] = table.initial_rows(np.ascontiguousarray(keys[missing]))
    return rows


class _Push:
    """One worker's PUSH of one clock, split per table."""

    __slots__ = ("ids", "grads")

    def __init__(self, msg, num_tables, dims):
        counts = P.counts_of(msg.header, num_tables)
        ib, eb = P.table_splits(counts, dims)
        ids, grads = msg.arrays
        self.ids = [ids[ib[t]:ib[t + 1]] for t in range(num_tables)]
        self.grads = [grads[eb[t]:eb[t + 1]] for t in range(num_tables)]


class ServerStats:
    """What a server measures (plain numbers; ``as_dict``)."""

    def __init__(self):
        self.pulls = self.deferred = self.evals = self.pushes = 0
        self.staleness_hist = {}     # staleness served -> pulls
        self.spread_hist = {}        # group clock spread -> clocks
        self.max_spread = 0
        self.apply_s = 0.0
        self.rows_touched = 0
        self.max_waiting = 0

    def as_dict(self):
        return {"pulls": self.pulls, "deferred": self.deferred, "evals": self.evals,
                "pushes": self.pushes, "staleness_hist": dict(sorted(self.staleness_hist.items())),
                "spread_hist": dict(sorted(self.spread_hist.items())),
                "max_spread": self.max_spread, "apply_s": self.apply_s,
                "rows_touched": self.rows_touched, "max_waiting": self.max_waiting}


class Server(Requests):
    """One parameter-server rank (see the module docstring).

    Args:
        specs: resolved ``TableSpec`` list (every server holds a shard of each).
        p2p: ``hpctrain.comm.p2p.PointToPoint`` over the world.
        roles: the job's ``hpctrain.ps.roles.Roles`` (this rank a server).
        seed: the initialisation seed of the tables.
        consistency: "bsp", "ssp" or "asp".
        staleness: s (ignored for "asp").
        timeout_s: seconds without any message, while something is awaited, before
            ``CommError``.
        make_dense_optimizer: ``params -> Optimizer`` when dense parameters live on
            the servers, else None.
        every_clocks_log: a log line every this many applied clocks (0: none).
        log: a text stream for those lines (default stderr); ``metrics_path``: also
            write them as JSON lines there.
        start_clock: clocks already applied (a restored run).
        checkpoints: a ``CheckpointManager`` over the servers' communicator (CKPT
            messages are refused without one).
        watcher: a ``PreemptionWatcher`` of this rank (a signal here stops the job at
            an agreed clock), or None.
        online: the run's ``OnlineConfig`` (deltas are written into its directory and the
            tables remember evicted keys), or None (DELTA messages are refused).

    Attributes:
        tables: dict table name -> ``EmbeddingTable`` (this server's shard).
        applied: clocks applied so far.
        group_clock: per group, the last clock every one of its workers (and its
            leader's dense push) has pushed.
        stats: a ``ServerStats``.
        stop_clock: (server 0) the clock every worker stops at after a stop signal, 0
            while none is decided.
        checkpoints_written: paths of the checkpoints this server took part in.
        deltas_written: ``(path, rows, tombstones, seconds)`` of this server's part of
            every delta it took part in.
    """

    def __init__(self, specs, p2p, roles, seed=0, consistency="bsp", staleness=0,
                 timeout_s=300.0, make_dense_optimizer=None, every_clocks_log=100, log=None,
                 metrics_path=None, start_clock=0, checkpoints=None, watcher=None,
                 online=None):
        self.specs, _ = resolve_specs(specs)
        self.p2p, self.roles = p2p, roles
        self.index = roles.server_index
        self.tables = {s.name: make_table(s, seed, roles.num_servers) for s in self.specs}
        self._tables = [self.tables[s.name] for s in self.specs]
        self._dims = np.array([s.dim for s in self.specs], dtype=np.int64)
        self._evicts = any(s.eviction is not None for s in self.specs)
        self.asp = consistency == "asp"
        self.s = 0 if staleness is None else int(staleness)
        self.timeout_s = float(timeout_s)
        self.dense = DenseShard(make_dense_optimizer) if make_dense_optimizer else None
        self.W, self.G = roles.num_workers, roles.groups
        self._set_clock(start_clock)
        self._pushes = {}           # clock -> [_Push or None] * W
        self._npush = {}            # clock -> pushes received
        self._dpushes = {}          # clock -> [array or None] * G
        self._ndpush = {}
        self._waiting = []          # deferred reads (messages), in arrival order
        self._done = set()
        self._sends = []
        self.stats = ServerStats()
        self.every_clocks_log = int(every_clocks_log or 0)
        self._log = log if log is not None else sys.stderr
        self._metrics_path, self._metrics = metrics_path, None
        self.checkpoints = checkpoints
        self.checkpoints_written = []
        self._requests = {}         # clock -> worker 0's CKPT / DELTA messages, arrival order
        self.online = online
        self.deltas_written = []
        if online is not None:
            for t in self._tables:
                t.track_evictions()
        self._dense_restored = False
        self.watcher = watcher
        self.stop_clock = 0
        self._stop_sent = False

    def _set_clock(self, clock):
        """Start from ``clock`` applied clocks (a fresh run: 0; a restored one: its step)."""
        self.applied = int(clock)
        self.worker_clock = [self.applied] * self.W
        self.dense_clock = [self.applied] * self.G
        self.group_clock = [self.applied] * self.G
        self._answered = self.applied   # highest clock whose PULL this server answered
        self._last_log = (time.perf_counter(), self.applied)

    # ------------------------------------------------------------------ resuming
    def restore(self):
        """Wait for worker 0's RESTORE (the first message of a resumed run) and load it.

        Collective over the servers. Returns the checkpoint's path, or None when there
        was nothing to resume (a fresh start).
        """
        from hpctrain.ps.checkpoint import restore_server
        msg = self.p2p.recv(self.roles.workers[0], P.RESTORE, self.timeout_s,
                            what="worker 0's RESTORE (which checkpoint to resume from)")
        path = restore_server(self, msg)
        self._dense_restored = path is not None and self.dense is not None
        return path

    # ------------------------------------------------------------------ loop
    def run(self):
        """Serve until every worker has sent DONE; returns ``stats.as_dict()``."""
        p2p = self.p2p
        backoff = p2p.backoff()
        last = time.monotonic()
        handlers = {P.PULL: self._on_pull, P.PUSH: self._on_push, P.EVAL: self._on_eval,
                    P.DINIT: self._on_dinit, P.DPUSH: self._on_dpush, P.DPULL: self._on_dpull,
                    P.DONE: self._on_done, P.CKPT: self._on_ckpt, P.STOP: self._on_stop,
                    P.DELTA: self._on_delta}
        try:
            while len(self._done) < self.W:
                if self.watcher is not None and self.watcher.signalled and not self._stop_sent:
                    self._signalled()
                msg = p2p.poll()
                if msg is None:
                    self._sends = [s for s in self._sends if not s.test()]
                    if time.monotonic() - last > self.timeout_s:
                        raise CommError(self._timeout_message())
                    backoff.sleep()
                    continue
                backoff.reset()
                last = time.monotonic()
                handler = handlers.get(msg.tag)
                if handler is None:
                    raise CommError(f"server {self.index}: unexpected message tag {msg.tag} "
                                    f"from rank {msg.source}")
                handler(msg)
                last = time.monotonic()     # time spent handling (a checkpoint) is not silence
            self._check_finished()
            for s in self._sends:
                s.wait()
            self._sends = []
        finally:
            if self._metrics is not None:
                self._metrics.close()
        return self.stats.as_dict()

    def _timeout_message(self):
        c = self.applied + 1
        missing = [w for w in range(self.W) if self.worker_clock[w] < c and w not in self._done]
        dense = [g for g in range(self.G) if self.dense is not None and self.dense_clock[g] < c]
        ranks = [self.roles.workers[w] for w in missing]
        parts = [f"server {self.index} (rank {self.roles.servers[self.index]}): no message "
                 f"for {self.timeout_s:g} s (ps.timeout_s); clock {c} still waits for"]
        if missing:
            parts.append(f"the PUSH of worker ranks {ranks} (workers {missing})")
        if dense:
            parts.append(f"{'and ' if missing else ''}the DPUSH of group leaders "
                         f"{[self.roles.workers[self.roles.leader(g)] for g in dense]}")
        if not missing and not dense:
            parts.append(f"the DONE of worker ranks "
                         f"{[self.roles.workers[w] for w in range(self.W) if w not in self._done]}")
        return " ".join(parts) + ". The peer hung or died; the job is stopped."

    def _check_finished(self):
        left = sorted(c for c in self._npush if c > self.applied)
        if left:
            raise CommError(f"server {self.index}: every worker finished but clocks {left} were "
                            f"pushed only partly (workers stopped at different clocks: "
                            f"{self.worker_clock})")
        if self._requests:
            raise CommError(f"server {self.index}: every worker finished but the checkpoint or "
                            f"delta of clock(s) {sorted(self._requests)} was never due (applied "
                            f"{self.applied})")

    # ------------------------------------------------------------------ reads
    def _servable(self, msg):
        tag, clock = msg.tag, int(msg.header[P.H_CLOCK])
        if tag == P.DPULL and not self.dense.ready:
            return False
        if tag == P.EVAL or (tag == P.DPULL and msg.header[P.H_AUX] == P.FRESH):
            return self.applied >= clock
        return self.asp or self.applied >= clock - 1 - self.s

    def _on_pull(self, msg):
        self._read(msg)

    def _on_eval(self, msg):
        self._read(msg)

    def _on_dpull(self, msg):
        if self.dense is None:
            raise CommError(f"server {self.index}: DPULL from rank {msg.source} but dense "
                            f"parameters do not live on the servers (ps.dense_on_servers)")
        self._read(msg)

    def _read(self, msg):
        if self._servable(msg):
            self._answer(msg)
        else:
            self.stats.deferred += 1
            self._waiting.append(msg)
            self.stats.max_waiting = max(self.stats.max_waiting, len(self._waiting))

    def _answer(self, msg):
        h, tag = msg.header, msg.tag
        clock = int(h[P.H_CLOCK])
        reply = P.header(clock, aux=self.applied, stop=self.stop_clock)
        if tag == P.DPULL:
            if h[P.H_AUX] != P.FRESH:
                self._check_staleness(clock, msg)
            self._sends.append(self.p2p.send(msg.source, P.DROWS, reply,
                                             [self.dense.params.data]))
            return
        counts = P.counts_of(h, len(self.specs))
        ib, _ = P.table_splits(counts, self._dims)
        ids = msg.arrays[0]
        # training reads see a missing row as its initial value (what find_or_insert
        # would give it); evaluation reads see the default row (zeros), as in
        # collective mode, where they insert nothing either
        read = read_rows if tag == P.PULL else (lambda t, k: t.gather(t.find(k)))
        parts = [read(t, ids[ib[i]:ib[i + 1]]).reshape(-1)
                 for i, t in enumerate(self._tables) if counts[i]]
        rows = np.concatenate(parts) if len(parts) > 1 else (
            parts[0] if parts else np.empty(0, dtype=np.float32))
        if tag == P.EVAL:
            self.stats.evals += 1
            self._sends.append(self.p2p.send(msg.source, P.EROWS, reply, [rows]))
            return
        self._check_staleness(clock, msg)
        self._answered = max(self._answered, clock)
        self._sends.append(self.p2p.send(msg.source, P.ROWS, reply, [rows]))

    def _check_staleness(self, clock, msg):
        stale = clock - 1 - self.applied
        if not self.asp and stale > self.s:
            raise AssertionError(f"server {self.index}: would serve "
                                 f"{P.describe(msg.tag, msg.header)} with staleness {stale} > "
                                 f"s = {self.s}")
        self.stats.pulls += 1
        self.stats.staleness_hist[stale] = self.stats.staleness_hist.get(stale, 0) + 1

    def _serve_waiting(self):
        if not self._waiting:
            return
        keep = []
        for msg in self._waiting:
            if self._servable(msg):
                self._answer(msg)
            else:
                keep.append(msg)
        self._waiting = keep

    # ------------------------------------------------------------------ writes
    def _expect(self, clocks, who, clock, kind, source):
        if clock != clocks[who] + 1:
            raise CommError(f"server {self.index}: {kind} of clock {clock} from rank {source}, "
                            f"expected clock {clocks[who] + 1} (clocks must arrive in order)")
        clocks[who] = clock

    def _on_push(self, msg):
        h = msg.header
        clock, w = int(h[P.H_CLOCK]), int(h[P.H_WORKER])
        self._expect(self.worker_clock, w, clock, "PUSH", msg.source)
        self.stats.pushes += 1
        push = _Push(msg, len(self.specs), self._dims)
        if self.asp:
            self._apply_push(push, clock)
        else:
            self._pushes.setdefault(clock, [None] * self.W)[w] = push
        self._npush[clock] = self._npush.get(clock, 0) + 1
        self._group_progress(self.roles.group_of(w), clock)
        self._advance()

    def _on_dpush(self, msg):
        h = msg.header
        clock, g = int(h[P.H_CLOCK]), int(h[P.H_GROUP])
        if self.dense is None or not self.dense.ready:
            raise CommError(f"server {self.index}: DPUSH of clock {clock} from rank "
                            f"{msg.source} before the dense parameters were initialised")
        self._expect(self.dense_clock, g, clock, "DPUSH", msg.source)
        grad = msg.arrays[0]
        if self.asp:
            self.dense.apply([grad], clock)
        else:
            self._dpushes.setdefault(clock, [None] * self.G)[g] = grad
        self._ndpush[clock] = self._ndpush.get(clock, 0) + 1
        self._group_progress(g, clock)
        self._advance()

    def _on_dinit(self, msg):
        if self.dense is None:
            raise CommError(f"server {self.index}: DINIT from rank {msg.source} but dense "
                            f"parameters do not live on the servers (ps.dense_on_servers)")
        if self._dense_restored:
            return      # the initial values of a resumed run: the checkpoint's replace them
        self.dense.init(msg.arrays[0])
        self._serve_waiting()


    def _on_done(self, msg):
        self._done.add(int(msg.header[P.H_WORKER]))

    def _group_progress(self, g, clock):
        ws = self.roles.group_workers(g)
        if all(self.worker_clock[w] >= clock for w in ws) and \
                (self.dense is None or self.dense_clock[g] >= clock):
            self.group_clock[g] = max(self.group_clock[g], clock)
            spread = max(self.group_clock) - min(self.group_clock)
            self.stats.max_spread = max(self.stats.max_spread, spread)

    def _complete(self, clock):
        return self._npush.get(clock, 0) == self.W and (
            self.dense is None or self._ndpush.get(clock, 0) == self.G)

    def _advance(self):
        while self._complete(self.applied + 1):
            c = self.applied + 1
            t0 = time.perf_counter()
            if not self.asp:
                pushes = self._pushes.pop(c)
                for i in range(len(self.specs)):
                    self._apply_table(i, pushes, c)
                if self.dense is not None:
                    self.dense.apply(self._dpushes.pop(c), c)
            del self._npush[c]
            self._ndpush.pop(c, None)
            if self._evicts:
                for t in self._tables:
                    t.evict(c)
            self.applied = c
            self.stats.apply_s += time.perf_counter() - t0
            spread = max(self.group_clock) - min(self.group_clock)
            self.stats.spread_hist[spread] = self.stats.spread_hist.get(spread, 0) + 1
            if self.every_clocks_log and c % self.every_clocks_log == 0:
                self._log_line()
            self._serve_waiting()
            self._requests_due()

    def _apply_table(self, i, pushes, clock):
        """Clock ``clock`` of table i: the owner side of ``ShardedEmbedding.backward``."""
        dim, table = int(self._dims[i]), self._tables[i]
        counts = np.array([p.ids[i].shape[0] for p in pushes], dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return
        recv_ids = np.concatenate([p.ids[i] for p in pushes])
        grads = np.concatenate([p.grads[i] for p in pushes])
        id_start = exclusive_cumsum(counts)
        if np.count_nonzero(counts) <= 1:
            # one worker: its ids are already unique (deduplicated before routing)
            uniq, inverse = recv_ids, np.arange(total, dtype=np.int64)
        else:
            uniq, inverse = sparse_ops.unique_blocks(recv_ids, id_start, counts)
        idx = table.find_or_insert(uniq, clock)
        off = sparse_ops.block_offsets(id_start * dim, counts, dim)
        g = sparse_ops.segment_sum(grads, off, dim, inverse, uniq.shape[0])
        table.apply_gradients(idx, g, clock, keys=uniq)
        self.stats.rows_touched += uniq.shape[0]

    def _apply_push(self, push, clock):
        """ASP: one worker's gradients applied at once (its ids are unique per table)."""
        for i, table in enumerate(self._tables):
            ids = push.ids[i]
            if ids.shape[0] == 0:
                continue
            idx = table.find_or_insert(ids, clock)
            table.apply_gradients(idx, push.grads[i].reshape(-1, int(self._dims[i])), clock,
                                  keys=ids)
            self.stats.rows_touched += ids.shape[0]

    # ------------------------------------------------------------------ logging
    def _log_line(self):
        now = time.perf_counter()
        t0, c0 = self._last_log
        self._last_log = (now, self.applied)
        rec = {"server": self.index, "applied": self.applied, "group_clock": list(self.group_clock),
               "spread": max(self.group_clock) - min(self.group_clock),
               "clocks_per_s": (self.applied - c0) / max(now - t0, 1e-9),
               "waiting": len(self._waiting), "apply_s": round(self.stats.apply_s, 6),
               "rows": {n: len(t) for n, t in self.tables.items()}, "time": time.time()}
        self._log.write(f"[ps server {self.index}] clock {self.applied}: group clocks "
                        f"{rec['group_clock']} (spread {rec['spread']}), "
                        f"{rec['clocks_per_s']:.1f} clocks/s, {rec['waiting']} reads waiting\n")
        self._log.flush()
        self._metrics_record(rec)

    def _metrics_record(self, rec):
        """One JSON line in this server's metrics file (when there is one)."""
        if self._metrics_path:
            if self._metrics is None:
                os.makedirs(os.path.dirname(os.path.abspath(self._metrics_path)), exist_ok=True)
                self._metrics = open(self._metrics_path, "a")
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
