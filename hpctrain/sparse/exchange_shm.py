"""Exchange through a node-local shared window; ``Alltoallv`` only between nodes.

Ranks of a node read each other's memory (``hpctrain.comm.shm.SharedArena``), so
an owner writes its reply rows into its own segment and the node's requesters
pool straight from there; gradients go the other way the same way. One
training lookup, top to bottom::

    start   whole world on one node: post counts, layout and ids on the request
            board (no collective);
            else: counts Alltoall + ids Alltoallv (started) and an Iallgather of
            every member's segment layout
    rows    board: one synchronisation, then read what I serve and everyone's layout
            reserve the window for this step's layout (grows when too small)
            serve into my segment's forward part; rows of other nodes by Alltoallv
            sync; unique_off shifted to point into the owners' segments
    backward  per-id gradients into my segment's backward part; other nodes by
            Alltoallv; sync; owners sum from the senders' segments in source order

Segment of every group member (floats), two parts at fixed places::

    forward  [reply S | remote rows A']     at base(k)
    backward [grads A | remote grads S']    at bwd_base(k)

S: rows this rank serves (source-major, as the Alltoallv reply), A: rows it asked
for (owner-major); A' = A and S' = S only when some peer is on another node.
The parts never overlap: after a step's gradient sync an owner writes its next
reply while peers may still read its gradients. The remote parts receive the
Alltoallv of other nodes' blocks at the plain exchange's displacements, so one
shift per peer maps a plain-layout offset into the window.

Evaluation lookups take the plain path. When /dev/shm has no room for the
board or the window, every member of the node switches to the plain path in
the same step (``arena.enabled`` turns False), with one warning, and stays there.
"""
import numpy as np

from hpctrain.sparse.exchange_alltoallv import AlltoallvExchange, Done
from hpctrain.sparse.plan import exclusive_cumsum
from hpctrain.workpool import parallel_map

_LAY = 5   # layout vector: [forward need, backward need, S, A', A] + ask_start + serve_start


class SharedWindowExchange(AlltoallvExchange):
    """Rows and gradients of node-local peers through shared memory (see module doc).

    Args:
        comm: the store's communicator (capability "shared_window").
        owner, timer, buffers: as for ``AlltoallvExchange``.
        node_group_size: split each node into groups of this many ranks sharing a
            window (default: the whole node).
    """

    def __init__(self, comm, owner, timer, buffers, node_group_size=None):
        super().__init__(comm, owner, timer, buffers)
        self.arena = comm.shared_arena(node_group_size)
        self._reply_unsynced = False   # a served reply that no gradient sync covered yet

    @property
    def name(self):
        return "shm" if self.arena.enabled else "alltoallv"

    def nbytes(self):
        return self.arena.nbytes()

    def window_ranks(self):
        return [int(r) for r in self.arena.members] if self.arena.enabled else \
            [self.comm.rank]

    def close(self):
        self.arena.close()

    # -- requests --------------------------------------------------------------------------
    def start(self, look, blocking=False):
        if not (look.train and self.arena.enabled):
            return super().start(look, blocking)
        arena, r, P = self.arena, look.route, self.comm.size
        T = r.per_table.shape[1]
        if arena.all_local:
            # the request posted on the node's board: [ask_elems P | id start per
            # owner P | per_table P*T | ids]; owners read it there (no collective)
            head = 2 * P + P * T
            request = self._buf.get("request", head + r.total, np.int64)
            r.fill_ids(request[head:])
            self._t.lap("route")
            request[:P] = r.ask_elems
            request[P:2 * P] = exclusive_cumsum(r.to_peer)
            request[2 * P:head] = r.per_table.ravel()
            arena.post(request)
            self.sent["window"]["requests"] += int(request.shape[0]) * 8
            look.request, look.board, look.ids = request, True, Done(None)
        else:
            super().start(look, blocking)
            self._post_layout(look)
        self._t.lap("ids_a2a")

    def _post_layout(self, look):
        """Start gathering every member's segment layout (known once counts are in)."""
        arena = self.arena
        S, A = int(look.serve_elems.sum()), int(look.route.ask_elems.sum())
        rA, rS = (0, 0) if arena.all_local else (A, S)
        look.ask_start = exclusive_cumsum(look.route.ask_elems)
        look.serve_start = exclusive_cumsum(look.serve_elems)
        m = arena.members
        mine = np.concatenate([[S + rA, A + rS, S, rA, A], look.ask_start[m],
                               look.serve_start[m]])
        look.layout = arena.iallgather(mine)

    def _read_board(self, look):
        """Read the node's requests from the board: what this rank serves and every
        member's layout, after one synchronisation (replaces counts, ids and layout
        collectives). Without room for the board: the collectives, for good."""
        arena, P = self.arena, self.comm.size
        T = look.route.per_table.shape[1]
        head, me = 2 * P + P * T, self.comm.rank
        if not arena.settle():
            self.exchange_requests(look, look.request[head:], blocking=True)
            look.board = False
            return
        board = arena.board
        at = np.array([arena.board_base(k) for k in range(P)], dtype=np.int64)[:, None]
        elems = board[at + np.arange(P)]                              # [source, owner]
        id_at = board[at[:, 0] + P + me]                               # [source]
        fpt = board[at + (2 * P + me * T) + np.arange(T)]              # [source, table]
        look.from_peer_table = fpt
        look.serve_elems = elems[:, me].copy()
        look.ask_start = exclusive_cumsum(look.route.ask_elems)
        look.serve_start = exclusive_cumsum(look.serve_elems)
        # table i of source s: after s's request head, at s's start for this owner
        within = np.zeros((P, T), dtype=np.int64)
        np.cumsum(fpt[:, :-1], axis=1, out=within[:, 1:])
        look.id_start = (at + head + id_at[:, None] + within).T.copy()   # [T, P]
        # every member's layout, as _post_layout would have gathered it
        ask_start = np.zeros((P, P), dtype=np.int64)                   # [member, owner]
        np.cumsum(elems[:, :-1], axis=1, out=ask_start[:, 1:])
        serve_start = np.zeros((P, P), dtype=np.int64)                 # [source, member]
        np.cumsum(elems[:-1], axis=0, out=serve_start[1:])
        S, A = elems.sum(axis=0), elems.sum(axis=1)
        zero = np.zeros(P, dtype=np.int64)
        look.layout = Done(np.column_stack([S, A, S, zero, A, ask_start, serve_start.T]))
        look.ids = Done(board)

    # -- rows ------------------------------------------------------------------------------
    def rows(self, look):
        if getattr(look, "board", False):
            self._read_board(look)
        if getattr(look, "layout", None) is None:
            return super().rows(look)
        recv_ids = look.ids.wait()
        look.ids = None
        self._t.lap("ids_a2a")
        look.layout = look.layout.wait()
        if self.arena.reserve(look.layout[:, 0], look.layout[:, 1]):
            return self._window_rows(look, recv_ids)
        look.layout = None
        out = self.serve_and_return(look, recv_ids)
        if look.id_start is not None:
            # requests came by the board but the row window found no room: the
            # exchange is off from now on, give the board back
            self.arena.close()
        return out

    def _window_rows(self, look, recv_ids):
        """Owners serve into the window; rows of other nodes come by Alltoallv."""
        arena, P, L = self.arena, self.comm.size, _LAY
        g, me, lay = arena.size, arena.index, look.layout
        S, A = int(lay[me, 2]), int(lay[me, 4])
        base = arena.base(me)
        if self._reply_unsynced:
            # the previous lookup had no backward (whose gradient sync would have told
            # this rank that every peer is done pooling its reply): wait for them here
            arena.sync()
        reply = arena.flat[base:base + S]
        look.parts = self.owner.serve(recv_ids, look.from_peer_table, look.step, True, reply,
                                      look.id_start)
        self._t.lap("lookup")
        local = arena.local_index >= 0
        self._count("window", "rows", look.serve_elems, 4, local & self._others)
        if not arena.all_local:
            self._count("alltoallv", "rows", look.serve_elems, 4, ~local)
            arena.alltoallv_remote(base, look.serve_elems, look.serve_start,
                                   base + S, look.route.ask_elems, look.ask_start)
        arena.sync()
        self._reply_unsynced = True
        # requester: my block of owner o starts at o's serve_start[me] in o's reply
        shift = np.full(P, base + S, dtype=np.int64)        # other nodes: my remote rows
        for j, o in enumerate(arena.members):
            shift[o] = arena.base(j) + lay[j, L + g + me] - look.ask_start[o]
        unique_off = [u + shift[o] for u, o in zip(look.route.unique_off, look.route.owners)]
        # owner: source s's gradients for me start at s's ask_start[me] in s's grads
        look.grad_base = arena.bwd_base(me)
        look.rgrads_base = look.grad_base + A
        gshift = np.full(P, look.rgrads_base, dtype=np.int64)  # other nodes: remote grads
        for j, s in enumerate(arena.members):
            gshift[s] = arena.bwd_base(j) + lay[j, L + me] - look.serve_start[s]
        look.grad_shift = gshift
        self._t.lap("rows_a2a")
        return arena.flat, unique_off

    # -- backward --------------------------------------------------------------------------
    def backward(self, look, grads, step):
        if getattr(look, "grad_base", None) is None:
            return super().backward(look, grads, step)
        # gradients go straight into this rank's segment
        t, arena = self._t, self.arena
        flat = arena.flat
        parallel_map(lambda a: a[0].unique_grads(grads, out=flat, out_off=a[1] + look.grad_base),
                   zip(look.plans, look.route.unique_off))
        t.lap("pool")
        local = arena.local_index >= 0
        self._count("window", "grads", look.route.ask_elems, 4, local & self._others)
        if not arena.all_local:
            self._count("alltoallv", "grads", look.route.ask_elems, 4, ~local)
            arena.alltoallv_remote(look.grad_base, look.route.ask_elems, look.ask_start,
                                   look.rgrads_base, look.serve_elems, look.serve_start)
        arena.sync()
        self._reply_unsynced = False
        t.lap("grad_a2a")
        self.owner.apply(look.parts, flat, step, shift=look.grad_shift)
        t.lap("update")
