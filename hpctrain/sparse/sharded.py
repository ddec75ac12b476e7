"""ShardedEmbedding: embedding rows sharded over ranks, exchanged with Alltoallv.

Every row lives on exactly one rank, its owner (``routing.owner_of``); a step
moves only the rows its batch touches. All tables share each exchange: one
counts exchange, one ids ``Alltoallv`` and one rows ``Alltoallv`` per lookup,
one gradient ``Alltoallv`` per backward (see docs/sharded-embedding.md)::

    requester (every rank, its slice of the batch)          owner (every rank)
    dedup per table ─> route ─> bucket by owner
    counts [P, T] ── Alltoall ──────────────────────────>  counts [P, T]
    ids (peer, table, id) ── Alltoallv (async) ─────────>  ids          start_lookup ends here
                                                           dedup per table across
                                                           sources; find_or_insert; gather
    rows (same layout) <──────────────────── Alltoallv ──  rows
    pool per bag ─> outputs
    backward: grads per unique id ── Alltoallv ─────────>  segment sum per id in source-rank
                                                           order; optimizer once per id

The packed row buffers are flat float32 with each row at its own element
offset, so tables of different widths travel in the same message.

Ranks on one node skip the two large exchanges (``exchange="auto"``): owners
write reply rows into an MPI-3 shared window and requesters of the node pool
straight from it; gradients go the other way the same way (``hpctrain.sparse.shm``).
When the whole world is one node, counts and ids skip their collectives too: each
rank posts them on a shared request board that owners read after one barrier.
Only peers on other nodes get rows and gradients by ``Alltoallv``. The arithmetic,
and so every result, is the same in both modes.
"""
import numpy as np

from hpctrain._kernels import sparse_ops
from hpctrain.sparse.collection import PhaseTimer, check_grads, make_table, split_batch
from hpctrain.sparse.spec import resolve_specs

EXCHANGES = ("auto", "alltoallv", "shm")


class _Buffers:
    """Named exchange buffers, reused across steps and grown geometrically when too small."""

    def __init__(self):
        self._bufs = {}

    def get(self, name, n, dtype):
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < n:
            old = 0 if buf is None else buf.shape[0]
            buf = np.empty(max(n, old + old // 2, 1024), dtype=dtype)
            self._bufs[name] = buf
        return buf[:n]

    def nbytes(self):
        return sum(b.nbytes for b in self._bufs.values())


def _exclusive_cumsum(a):
    out = np.zeros(a.shape[0], dtype=np.int64)
    if a.shape[0] > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


class _Done:
    """A completed exchange posing as a communicator handle."""

    def __init__(self, result):
        self._result = result

    def wait(self):
        return self._result


class _OwnerPart:
    """What an owner keeps of one table between lookup and backward."""

    __slots__ = ("table", "elem_off", "elem_start", "counts", "inverse", "indices",
                 "num_unique", "dim")

    def __init__(self, table, elem_off, elem_start, counts, inverse, indices, dim):
        self.table, self.elem_off, self.inverse, self.indices = table, elem_off, inverse, indices
        self.elem_start = elem_start   # int64[P] where source s's block of rows starts
        self.counts = counts           # int64[P] ids received from source s
        self.num_unique, self.dim = indices.shape[0], dim


class ShardedLookup:
    """A started lookup (``start_lookup``); pass it to ``wait_lookup``."""

    def __init__(self, step):
        self.step = step
        self.plans = None          # TableBatch per table (requester side)
        self.unique_off = None     # per table: int64[u] element offset of each unique row
        self.ask_ids = None        # ids this rank sends to each peer
        self.serve_ids = None      # ids this rank receives from each peer
        self.ask_elems = None      # floats this rank receives from / sends grads to each peer
        self.serve_elems = None    # floats this rank sends rows to / receives grads from each peer
        self.owner = None          # _OwnerPart per table (owner side)
        self.ids_handle = None     # the in-flight ids Alltoallv
        self.from_peer_table = None
        self.owners = None         # per table: int32[u] owner rank of each unique id
        self.grad_base = None      # shared window: where this rank's gradient rows start
        self.grad_shift = None     # shared window: per source rank, shift of its gradients
        self.rgrads_base = None    # shared window: where gradients from other nodes land
        self.layout = None         # shared window: every member's segment layout (gathering)
        self.train = True
        self.prefix = ""
        self.board = False         # requests posted on the node's board (no collectives)
        self.request = None        # board: what this rank posted
        self.per_table = None      # int64[P, T] ids this rank asks of each owner per table
        self.id_start = None       # board: int64[T, P] where table i's ids from s start


class ShardedEmbedding:
    """Embedding tables whose rows are sharded over the ranks of ``comm``.

    Same API and semantics as ``EmbeddingCollection`` applied to the global batch
    (the concatenation of every rank's slice). Every method is collective: all
    ranks call it in the same order.

    Args:
        specs: list of ``TableSpec`` (``table_id`` defaults to the list index).
        comm: a ``hpctrain.comm`` communicator (NumPy buffers).
        seed: initialisation seed shared by every table.
        exchange: how rows and gradients reach ranks of the same node: "shm" (an
            MPI-3 shared window, no copies), "alltoallv" (always ``Alltoallv``), or
            "auto" (shm when ``comm`` is an MPI communicator).
        node_group_size: with shm, split each node into groups of this many ranks
            sharing a window (default: the whole node).

    Attributes:
        tables: dict table name -> ``EmbeddingTable`` holding this rank's shard.
        timers: dict phase -> accumulated seconds (dedup, route, counts, ids_a2a,
            lookup, rows_a2a, pool, grad_a2a, update); ``reset_timers()`` zeroes them.
    """

    def __init__(self, specs, comm, seed=0, exchange="auto", node_group_size=None):
        self.specs, self.feature_to_table = resolve_specs(specs)
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.seed = seed
        self.tables = {s.name: make_table(s, seed) for s in self.specs}
        self._dims = np.array([s.dim for s in self.specs], dtype=np.int64)
        self._buf = _Buffers()
        self._timer = PhaseTimer()
        self._pending = None
        self._last = None
        self._ones = np.ones(self.size, dtype=np.int64)
        self._arena = self._make_arena(exchange, node_group_size)

    def _make_arena(self, exchange, node_group_size):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        mpi_comm = getattr(self.comm, "mpi_comm", None)
        if exchange == "alltoallv" or (exchange == "auto" and mpi_comm is None):
            return None
        if mpi_comm is None:
            raise ValueError(f"exchange='shm' needs an MPI communicator, got "
                             f"{type(self.comm).__name__}")
        from hpctrain.sparse.shm import SharedArena
        return SharedArena(mpi_comm, node_group_size)

    @property
    def exchange(self):
        """"shm" while rows and gradients of node-local peers go through shared memory."""
        return "shm" if self._arena is not None and self._arena.enabled else "alltoallv"

    def close(self):
        """Free the shared window (collective; the object stays usable, it makes a new one)."""
        if self._arena is not None:
            self._arena.close()

    @property
    def timers(self):
        return dict(self._timer.seconds)

    def reset_timers(self):
        self._timer.reset()

    def buffer_bytes(self):
        """Bytes held by the reusable exchange buffers of this rank (shared window included)."""
        return self._buf.nbytes() + (self._arena.nbytes() if self._arena is not None else 0)

    # -- forward -------------------------------------------------------------------------
    def start_lookup(self, batch, step, train=True):
        """Route this rank's ids to their owners and start the ids exchange (non-blocking).

        No table is read here: ``wait_lookup`` finds the rows and exchanges them.
        So a trainer may start the next batch's lookup before this step's sparse
        update and still read the updated rows (identical results with overlap).
        At most one training lookup may be in flight; an eval lookup
        (``train=False``: nothing inserted, unknown ids read the default row) uses
        buffers of its own and may run while one is.

        Args:
            batch: this rank's ``JaggedBatch`` (every rank the same features).
            step: the training step (admission / eviction bookkeeping).
            train: False for evaluation lookups.

        Returns:
            A ``ShardedLookup`` handle.
        """
        return self._start(batch, step, train, blocking=False)

    def _start(self, batch, step, train, blocking):
        if train and self._pending is not None:
            raise RuntimeError("start_lookup: the previous lookup was not waited for "
                               "(call wait_lookup first; one lookup may be in flight)")
        pre = "" if train else "eval_"
        t, P, T = self._timer, self.size, len(self.specs)
        look = ShardedLookup(step)
        t.start()
        plans = split_batch(batch, self.specs, self.feature_to_table)
        look.plans = plans
        t.lap("dedup")

        # Route: global unique list is table-major; a stable bucket sort puts it in
        # (peer, table, first occurrence) order, the layout of every message.
        n_unique = np.array([p.uniq.shape[0] for p in plans], dtype=np.int64)
        per_table = np.empty((P, T), dtype=np.int64)
        owners = []
        for i, p in enumerate(plans):
            o = sparse_ops.route(p.uniq, p.spec.table_id, P)
            per_table[:, i] = np.bincount(o, minlength=P)
            owners.append(o)
        look.owners = owners
        owners = np.concatenate(owners) if T > 1 else owners[0]
        to_peer, perm = sparse_ops.bucket_by_owner(owners, P)
        keys = np.concatenate([p.uniq for p in plans]) if T > 1 else plans[0].uniq
        total = keys.shape[0]
        board = train and self.exchange == "shm" and self._arena.all_local
        if board:
            # the request posted on the node's board: [ask_elems P | id start per
            # owner P | per_table P*T | ids]; owners read it there (no collective)
            head = 2 * P + P * T
            request = self._buf.get("request", head + total, np.int64)
            send_ids = request[head:]
        else:
            send_ids = self._buf.get(pre + "send_ids", total, np.int64)
        np.take(keys, perm, out=send_ids)
        widths = np.repeat(self._dims, n_unique)[perm]
        unique_off = np.empty(total, dtype=np.int64)
        unique_off[perm] = _exclusive_cumsum(widths)
        bounds = np.concatenate([[0], np.cumsum(n_unique)])
        look.unique_off = [unique_off[bounds[i]:bounds[i + 1]] for i in range(T)]
        look.ask_elems = per_table @ self._dims
        t.lap("route")

        look.ask_ids, look.per_table, look.train, look.prefix = to_peer, per_table, train, pre
        if board:
            request[:P] = look.ask_elems
            request[P:2 * P] = _exclusive_cumsum(to_peer)
            request[2 * P:head] = per_table.ravel()
            self._arena.post(request)
            look.request = request
            look.ids_handle = _Done(None)
            look.board = True
        else:
            self._exchange_requests(look, send_ids, blocking)
            if train and self.exchange == "shm":
                self._shm_post_layout(look)
        t.lap("ids_a2a")
        if train:
            self._pending = look
        return look

    def _exchange_requests(self, look, send_ids, blocking):
        """Counts by ``Alltoall``, then start the ids ``Alltoallv`` (``look.ids_handle``)."""
        look.from_peer_table = self.comm.alltoallv(look.per_table, self._ones, self._ones)
        look.serve_ids = look.from_peer_table.sum(axis=1)
        look.serve_elems = look.from_peer_table @ self._dims
        self._timer.lap("counts")
        recv_ids = self._buf.get(look.prefix + "recv_ids", int(look.serve_ids.sum()), np.int64)
        if blocking:
            # forward() waits at once: the blocking collective avoids the progress
            # engine's polling (and yielding) of a non-blocking one
            look.ids_handle = _Done(self.comm.alltoallv(send_ids, look.ask_ids, look.serve_ids,
                                                        recvbuf=recv_ids))
        else:
            look.ids_handle = self.comm.ialltoallv(send_ids, look.ask_ids, look.serve_ids,
                                                   recvbuf=recv_ids)

    def _serve(self, recv_ids, from_peer_table, step, train, reply, id_start=None):
        """Owner side: dedup received ids per table, find(-or-insert), gather into ``reply``.

        ``id_start[i, s]``: where source ``s``'s ids of table ``i`` start in
        ``recv_ids`` (default: the packed ``Alltoallv`` layout). Returns one
        ``_OwnerPart`` per table.
        """
        # Received ids are (source, table) blocks: table i's ids are one block per
        # source, deduplicated (and later their gradients summed) in source-rank order.
        counts = np.ascontiguousarray(from_peer_table.T)               # [T, P]
        if id_start is None:
            id_start = _exclusive_cumsum(from_peer_table.ravel()).reshape(
                from_peer_table.shape).T.copy()                        # [T, P]
        elem_start = _exclusive_cumsum((from_peer_table * self._dims).ravel()).reshape(
            from_peer_table.shape).T.copy()
        parts = []
        for i, spec in enumerate(self.specs):
            c = counts[i]
            if np.count_nonzero(c) <= 1:
                # one source: its ids are already unique (deduplicated before routing)
                s = int(id_start[i][c > 0][0]) if c.any() else 0
                uniq = recv_ids[s:s + int(c.sum())]
                inverse = np.arange(uniq.shape[0], dtype=np.int64)
            else:
                uniq, inverse = sparse_ops.unique_blocks(recv_ids, id_start[i], c)
            table = self.tables[spec.name]
            idx = table.find_or_insert(uniq, step) if train else table.find(uniq)
            rows = np.ascontiguousarray(table.gather(idx), dtype=np.float32)
            off = sparse_ops.block_offsets(elem_start[i], c, spec.dim)
            sparse_ops.scatter_rows(rows, inverse, reply, off)
            parts.append(_OwnerPart(table, off, elem_start[i], c, inverse, idx, spec.dim))
        return parts

    def wait_lookup(self, handle):
        """Finish a started lookup: owners read rows, rows come back, bags are pooled.

        Returns dict feature -> float32 ``[B, dim]`` (or jagged rows). A training
        lookup becomes the one the next ``backward`` differentiates.
        """
        if handle.train and handle is not self._pending:
            raise RuntimeError("wait_lookup: this handle is not the lookup in flight")
        if handle.ids_handle is None:
            raise RuntimeError("wait_lookup: this lookup was already waited for")
        t, pre = self._timer, handle.prefix
        t.start()
        if handle.board:
            self._board_requests(handle)
        recv_ids = handle.ids_handle.wait()
        handle.ids_handle = None
        t.lap("ids_a2a")
        if handle.layout is not None and self._shm_layout(handle):
            rows, unique_off = self._shm_rows(handle, recv_ids)
        else:
            reply = self._buf.get(pre + "reply", int(handle.serve_elems.sum()), np.float32)
            handle.owner = self._serve(recv_ids, handle.from_peer_table, handle.step,
                                       handle.train, reply, handle.id_start)
            if handle.id_start is not None:
                # requests came by the board but the row window found no room: the
                # exchange is off from now on, give the board back
                self._arena.close()
            t.lap("lookup")
            rows = self._buf.get(pre + "rows", int(handle.ask_elems.sum()), np.float32)
            self.comm.alltoallv(reply, handle.serve_elems, handle.ask_elems, recvbuf=rows)
            unique_off = handle.unique_off
        t.lap("rows_a2a")
        outputs = {}
        for p, off in zip(handle.plans, unique_off):
            outputs.update(p.pool(rows, off))
        t.lap("pool")
        if handle.train:
            self._pending = None
            self._last = handle
        return outputs

    # -- shared-memory exchange ------------------------------------------------------------
    # Segment of every group member (floats), two parts at fixed places:
    #   forward  [reply S | remote rows A']     at base(k)
    #   backward [grads A | remote grads S']    at bwd_base(k)
    # S: rows this rank serves (source-major, like the Alltoallv reply), A: rows it
    # asked for (owner-major); A' = A and S' = S only when some peer is on another node.
    # The parts never overlap: after a step's gradient sync an owner writes its next
    # reply while peers may still read its gradients. The remote parts receive the
    # Alltoallv of other nodes' blocks at the plain exchange's displacements, so one
    # shift per peer maps a plain-layout offset into the window.
    _LAY = 5   # layout vector: [forward need, backward need, S, A', A] + ask_start + serve_start

    def _board_requests(self, look):
        """Read the node's requests from the board (node-local world, training lookups).

        Every member posted ``[ask_elems | id start per owner | per_table | ids]`` in
        ``start_lookup``; after one synchronisation each rank reads what it serves and
        every member's layout, which replaces the counts, ids and layout collectives.
        Falls back to those collectives when the board finds no room.
        """
        arena, P, T = self._arena, self.size, len(self.specs)
        head, me = 2 * P + P * T, self.rank
        if not arena.settle():
            self._exchange_requests(look, look.request[head:], blocking=True)
            look.board = False
            return
        board = arena.board
        at = np.array([arena.board_base(k) for k in range(P)], dtype=np.int64)[:, None]
        elems = board[at + np.arange(P)]                              # [source, owner]
        id_at = board[at[:, 0] + P + me]                               # [source]
        fpt = board[at + (2 * P + me * T) + np.arange(T)]              # [source, table]
        look.from_peer_table, look.serve_ids = fpt, fpt.sum(axis=1)
        look.serve_elems = elems[:, me].copy()
        look.ask_start = _exclusive_cumsum(look.ask_elems)
        look.serve_start = _exclusive_cumsum(look.serve_elems)
        # table i of source s: after s's request head, at s's start for this owner
        within = np.zeros((P, T), dtype=np.int64)
        np.cumsum(fpt[:, :-1], axis=1, out=within[:, 1:])
        look.id_start = (at + head + id_at[:, None] + within).T.copy()   # [T, P]
        # every member's layout, as _shm_post_layout would have gathered it
        ask_start = np.zeros((P, P), dtype=np.int64)                   # [member, owner]
        np.cumsum(elems[:, :-1], axis=1, out=ask_start[:, 1:])
        serve_start = np.zeros((P, P), dtype=np.int64)                 # [source, member]
        np.cumsum(elems[:-1], axis=0, out=serve_start[1:])
        S, A = elems.sum(axis=0), elems.sum(axis=1)
        zero = np.zeros(P, dtype=np.int64)
        look.layout = _Done(np.column_stack([S, A, S, zero, A, ask_start, serve_start.T]))
        look.ids_handle = _Done(board)

    def _shm_post_layout(self, look):
        """Start gathering every member's segment layout (known once counts are in)."""
        arena = self._arena
        S, A = int(look.serve_elems.sum()), int(look.ask_elems.sum())
        rA, rS = (0, 0) if arena.all_local else (A, S)
        look.ask_start = _exclusive_cumsum(look.ask_elems)
        look.serve_start = _exclusive_cumsum(look.serve_elems)
        m = arena.members
        mine = np.concatenate([[S + rA, A + rS, S, rA, A], look.ask_start[m],
                               look.serve_start[m]])
        look.layout = arena.iallgather(mine)

    def _shm_layout(self, look):
        """Finish the layout exchange and make the window hold every member's segment."""
        look.layout = look.layout.wait()
        return self._arena.reserve(look.layout[:, 0], look.layout[:, 1])

    def _shm_rows(self, look, recv_ids):
        """Owners serve into the window; rows of other nodes come by Alltoallv."""
        arena, t, P, L = self._arena, self._timer, self.size, self._LAY
        g, me, lay = arena.size, arena.index, look.layout
        S, A = int(lay[me, 2]), int(lay[me, 4])
        base = arena.base(me)
        if self._last is not None:
            # the previous lookup had no backward (whose gradient sync would have told
            # this rank that every peer is done pooling its reply): wait for them here
            arena.sync()
        reply = arena.flat[base:base + S]
        look.owner = self._serve(recv_ids, look.from_peer_table, look.step, True, reply,
                                 look.id_start)
        t.lap("lookup")
        if not arena.all_local:
            self._remote_alltoallv(arena.flat, base, look.serve_elems, look.serve_start,
                                   base + S, look.ask_elems, look.ask_start)
        arena.sync()
        # requester: my block of owner o starts at o's serve_start[me] in o's reply
        shift = np.full(P, base + S, dtype=np.int64)        # other nodes: my remote rows
        for j, o in enumerate(arena.members):
            shift[o] = arena.base(j) + lay[j, L + g + me] - look.ask_start[o]
        unique_off = [u + shift[o] for u, o in zip(look.unique_off, look.owners)]
        # owner: source s's gradients for me start at s's ask_start[me] in s's grads
        look.grad_base = arena.bwd_base(me)
        look.rgrads_base = look.grad_base + A
        gshift = np.full(P, look.rgrads_base, dtype=np.int64)  # other nodes: remote grads
        for j, s in enumerate(arena.members):
            gshift[s] = arena.bwd_base(j) + lay[j, L + me] - look.serve_start[s]
        look.grad_shift = gshift
        return arena.flat, unique_off

    def _remote_alltoallv(self, flat, send_at, send_counts, send_displ, recv_at, recv_counts,
                          recv_displ):
        """``Alltoallv`` of the blocks for other nodes, window to window (local blocks: 0)."""
        from mpi4py import MPI
        local = self._arena.local_index >= 0
        sc = np.where(local, 0, send_counts)
        rc = np.where(local, 0, recv_counts)
        self.comm.mpi_comm.Alltoallv(
            [flat[send_at:], (sc, send_displ), MPI.FLOAT],
            [flat[recv_at:], (rc, recv_displ), MPI.FLOAT])

    def forward(self, batch, step, train=True):
        """``wait_lookup(start_lookup(batch, step, train))``, with a blocking ids exchange."""
        return self.wait_lookup(self._start(batch, step, train, blocking=True))

    # -- backward ------------------------------------------------------------------------
    def backward(self, grads, step):
        """Send per-id gradients of the last lookup to their owners and apply them.

        Owners add the gradients of an id from all ranks in source-rank order and
        run the table's optimizer once per id (ids not admitted are skipped).

        Args:
            grads: dict feature -> float32 array shaped like that feature's output.
            step: the training step.
        """
        look = self._last
        if look is None:
            raise RuntimeError("backward called before any forward/wait_lookup")
        check_grads(grads, look.plans)
        t = self._timer
        t.start()
        if look.grad_base is not None:
            # shared window: gradients go straight into this rank's segment
            arena = self._arena
            flat = arena.flat
            for p, off in zip(look.plans, look.unique_off):
                p.unique_grads(grads, out=flat, out_off=off + look.grad_base)
            t.lap("pool")
            if not arena.all_local:
                self._remote_alltoallv(flat, look.grad_base, look.ask_elems, look.ask_start,
                                       look.rgrads_base, look.serve_elems, look.serve_start)
            arena.sync()
            recv = flat
            t.lap("grad_a2a")
        else:
            send = self._buf.get("grad_send", int(look.ask_elems.sum()), np.float32)
            for p, off in zip(look.plans, look.unique_off):
                p.unique_grads(grads, out=send, out_off=off)
            t.lap("pool")
            recv = self._buf.get("grad_recv", int(look.serve_elems.sum()), np.float32)
            self.comm.alltoallv(send, look.ask_elems, look.serve_elems, recvbuf=recv)
            t.lap("grad_a2a")
        for part in look.owner:
            src_off = part.elem_off
            if look.grad_shift is not None:
                src_off = sparse_ops.block_offsets(part.elem_start + look.grad_shift,
                                                   part.counts, part.dim)
            g = sparse_ops.segment_sum(recv, src_off, part.dim, part.inverse, part.num_unique)
            part.table.apply_gradients(part.indices, g, step)
        t.lap("update")
        self._last = None

    def evict(self, step):
        """Evict stale/rare rows of this rank's shards; dict table -> rows evicted here."""
        return {name: int(t.evict(step)) for name, t in self.tables.items()}
