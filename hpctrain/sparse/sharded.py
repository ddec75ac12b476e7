"""ShardedEmbedding: embedding rows sharded over the ranks of a communicator.

Every row lives on exactly one rank, its owner (``routing.owner_of``); a step
moves only the rows its batch touches. The store is three parts::

    plan      (hpctrain.sparse.plan)   dedup per table, route ids to owners, pool
                                       rows per bag, per-id gradient sums
    exchange  (one per method, chosen  moves requests, rows and gradients:
               at construction)        exchange_alltoallv  MPI collectives
                                       exchange_shm        node-local shared window,
                                                           Alltoallv between nodes
    owner     (hpctrain.sparse.owner)  serves rows of received ids, applies their
                                       gradients in source-rank order

so a lookup reads top to bottom in its exchange's file. The arithmetic, and so
every result, is the same whatever the exchange (see docs/sharded-embedding.md).
"""
import numpy as np

from hpctrain.sparse.collection import PHASES
from hpctrain.sparse.owner import OwnerSide
from hpctrain.sparse.plan import Buffers, check_grads, make_table, route, split_batch
from hpctrain.sparse.routing import owner_of
from hpctrain.sparse.spec import resolve_specs
from hpctrain.sparse.store import EmbeddingStore, LocalShards, Ticket
from hpctrain.workpool import parallel_map
from hpctrain.timing import PhaseTimer

EXCHANGES = ("auto", "alltoallv", "shm")


class ShardedLookup(Ticket):
    """A started lookup of a ``ShardedEmbedding`` (its fields belong to the exchange).

    Attributes:
        plans: ``TableBatch`` per table (requester side).
        route: the ``plan.Route`` of this rank's unique ids.
        from_peer_table: int64[P, T] ids received from each source per table.
        serve_elems: int64[P] floats of rows served to / gradients from each source.
        parts: ``OwnerPart`` per table (owner side, set when rows are served).
    """

    def __init__(self, step, train, plans):
        super().__init__(step, train)
        self.plans, self.prefix = plans, "" if train else "eval_"
        self.route = self.from_peer_table = self.serve_elems = self.parts = None
        self.ids = self.id_start = None
        # shared-window exchange only
        self.board, self.request, self.layout = False, None, None
        self.ask_start = self.serve_start = None
        self.grad_base = self.grad_shift = self.rgrads_base = None


class ShardedEmbedding(LocalShards, EmbeddingStore):
    """Embedding tables whose rows are sharded over the ranks of ``comm``.

    Same semantics as ``EmbeddingCollection`` applied to the global batch (the
    concatenation of every rank's slice). Every method is collective: all ranks
    call it in the same order.

    Args:
        specs: list of ``TableSpec`` (``table_id`` defaults to the list index).
        comm: a ``hpctrain.comm`` communicator (NumPy buffers).
        seed: initialisation seed shared by every table.
        exchange: how rows and gradients reach ranks of the same node: "shm" (an
            MPI-3 shared window, no copies), "alltoallv" (always ``Alltoallv``), or
            "auto" (shm when ``comm`` has the "shared_window" capability).
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
        self.tables = {s.name: make_table(s, seed, self.size) for s in self.specs}
        self._dims = np.array([s.dim for s in self.specs], dtype=np.int64)
        self._timer = PhaseTimer(PHASES)
        self._in_flight = None
        self._owner = OwnerSide(self.specs, self.tables)
        self._buf = Buffers()
        self._exchange = self._make_exchange(exchange, node_group_size)

    def _make_exchange(self, exchange, node_group_size):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        window = "shared_window" in self.comm.capabilities
        args = (self.comm, self._owner, self._timer, self._buf)
        if exchange == "alltoallv" or (exchange == "auto" and not window):
            from hpctrain.sparse.exchange_alltoallv import AlltoallvExchange
            return AlltoallvExchange(*args)
        if not window:
            raise ValueError(f"exchange='shm' needs an MPI communicator (capability "
                             f"'shared_window'), got {type(self.comm).__name__}")
        from hpctrain.sparse.exchange_shm import SharedWindowExchange
        return SharedWindowExchange(*args, node_group_size=node_group_size)

    @property
    def exchange(self):
        """"shm" while rows and gradients of node-local peers go through shared memory."""
        return self._exchange.name

    def close(self):
        """Free the shared window (collective; the object stays usable, it makes a new one)."""
        self._exchange.close()

    @property
    def timers(self):
        return dict(self._timer.seconds)

    def reset_timers(self):
        self._timer.reset()

    def buffer_bytes(self):
        """Bytes held by the reusable exchange buffers of this rank (shared window included)."""
        return self._buf.nbytes() + self._exchange.nbytes()

    # -- the store interface ---------------------------------------------------------------
    def start_lookup(self, batch, step, train=True):
        """Route this rank's ids to their owners and start moving them (non-blocking).

        No table is read here: ``wait_lookup`` finds the rows. So a trainer may
        start the next batch's lookup before this step's backward and still read
        the updated rows (identical results with overlap). At most one training
        lookup may be in flight (started, not waited); an evaluation lookup
        (``train=False``: nothing inserted, unknown ids read zeros) has buffers of
        its own and may run while one is.
        """
        return self._start(batch, step, train, blocking=False)

    def _start(self, batch, step, train, blocking):
        if train and self._in_flight is not None:
            raise RuntimeError("start_lookup: the previous lookup was not waited for "
                               "(call wait_lookup first; one lookup may be in flight)")
        t = self._timer
        t.start()
        look = ShardedLookup(step, train, split_batch(batch, self.specs, self.feature_to_table))
        t.lap("dedup")
        look.route = route(look.plans, self._dims, self.size)
        self._exchange.start(look, blocking)
        if train:
            self._in_flight = look
        return look

    def wait_lookup(self, ticket):
        """Finish a started lookup: owners serve rows, rows arrive, bags are pooled.

        Returns dict feature -> float32 ``[B, dim]`` (or jagged rows).
        """
        if ticket.train and ticket is not self._in_flight:
            raise RuntimeError("wait_lookup: this handle is not the lookup in flight")
        ticket._mark_waited("ShardedEmbedding")
        t = self._timer
        t.start()
        rows, unique_off = self._exchange.rows(ticket)
        outputs = {}
        for out in parallel_map(lambda a: a[0].pool(rows, a[1]), zip(ticket.plans, unique_off)):
            outputs.update(out)
        t.lap("pool")
        if ticket.train:
            self._in_flight = None
        return outputs

    def forward(self, batch, step, train=True):
        """``wait_lookup(start_lookup(...))`` with a blocking ids exchange: ``(outputs, ticket)``."""
        look = self._start(batch, step, train, blocking=True)
        return self.wait_lookup(look), look

    def backward(self, ticket, grads, step):
        """Send per-id gradients of ``ticket`` to their owners, who apply them.

        Owners add the gradients of an id from all ranks in source-rank order and
        run the table's optimizer once per id (ids not admitted are skipped).
        """
        check_grads(grads, ticket.plans)
        ticket._mark_applied("ShardedEmbedding")
        self._timer.start()
        self._exchange.backward(ticket, grads, step)

    def owner_of(self, table, keys):
        """Rank of this store's communicator that owns each key of ``table``."""
        return owner_of(self._table_id(table), keys, self.size)

    def _table_id(self, table):
        for s in self.specs:
            if s.name == table:
                return s.table_id
        raise ValueError(f"no table {table!r}; tables: {[s.name for s in self.specs]}")

    def stats(self):
        """Rows per table held here, the exchange in use, its buffer bytes, the ranks that
        share this rank's window, and the bytes this rank sent to other ranks since
        construction per path (``alltoallv``: counts, ids, rows, grads by MPI;
        ``window``: requests, rows, grads through shared memory; training lookups)."""
        return {"rows": {n: len(t) for n, t in self.tables.items()},
                "exchange": self.exchange, "buffer_bytes": self.buffer_bytes(),
                "window_ranks": self._exchange.window_ranks(),
                "bytes_sent": {p: dict(v) for p, v in self._exchange.sent.items()}}
