"""EmbeddingCollection: the single-process twin that defines sharded embedding semantics.

One step on the global batch, per table (features sharing a table are looked
up together)::

    ids of the table's features ──dedup──> unique ids + inverse
    unique ids ──find_or_insert(step)──> rows (default zeros when not admitted)
    rows[inverse] ──pool per bag (sum | mean | none)──> outputs per feature

    backward: d outputs ──scatter to ids, segment sum by inverse──> one gradient
              per unique id ──apply_gradients(step)──> optimizer once per id

``ShardedEmbedding`` must give the same outputs and the same tables (up to
float rounding in the order gradients from different ranks are added).
"""
import numpy as np

from hpctrain.sparse.plan import (TableBatch, check_grads, make_table,  # noqa: F401
                                  split_batch)
from hpctrain.sparse.spec import resolve_specs
from hpctrain.sparse.store import EmbeddingStore, LocalShards, Ticket
from hpctrain.timing import PhaseTimer

PHASES = ("dedup", "route", "counts", "ids_a2a", "lookup", "rows_a2a", "pool", "grad_a2a",
          "update")


class _Lookup(Ticket):
    """A lookup of the twin: ids deduplicated at start, rows read at wait."""

    __slots__ = ("plans", "indices")

    def __init__(self, plans, step, train):
        super().__init__(step, train)
        self.plans, self.indices = plans, []


class EmbeddingCollection(LocalShards, EmbeddingStore):
    """Embedding tables trained in one process: the reference ``ShardedEmbedding`` matches.

    Args:
        specs: list of ``TableSpec`` (``table_id`` defaults to the list index).
        seed: initialisation seed shared by every table.

    Attributes:
        tables: dict table name -> ``EmbeddingTable``.
        specs: the resolved specs.
        timers: dict phase -> accumulated seconds (see ``PHASES``; ``reset_timers()``).
    """

    def __init__(self, specs, seed=0):
        self.specs, self.feature_to_table = resolve_specs(specs)
        self.seed = seed
        self.tables = {s.name: make_table(s, seed) for s in self.specs}
        self._timer = PhaseTimer(PHASES)

    @property
    def timers(self):
        return dict(self._timer.seconds)

    def reset_timers(self):
        self._timer.reset()

    def start_lookup(self, batch, step, train=True):
        """Dedup ``batch``; rows are read by ``wait_lookup`` (as they are then).

        Reading no rows here is what lets a trainer start the next batch's lookup
        before this step's update and still see the updated rows.
        """
        t = self._timer
        t.start()
        plans = split_batch(batch, self.specs, self.feature_to_table)
        t.lap("dedup")
        return _Lookup(plans, step, train)

    def wait_lookup(self, ticket):
        """Find(-or-insert), gather and pool a started lookup.

        An eval lookup (``train=False``) inserts nothing.
        """
        ticket._mark_waited("EmbeddingCollection")
        t = self._timer
        t.start()
        rows = []
        for p in ticket.plans:
            table = self.tables[p.spec.name]
            idx = (table.find_or_insert(p.uniq, ticket.step) if ticket.train
                   else table.find(p.uniq))
            ticket.indices.append(idx)
            rows.append(np.ascontiguousarray(table.gather(idx), dtype=np.float32))
        t.lap("lookup")
        outputs = {}
        for p, r in zip(ticket.plans, rows):
            off = np.arange(p.uniq.shape[0], dtype=np.int64) * p.spec.dim
            outputs.update(p.pool(r.reshape(-1), off))
        t.lap("pool")
        return outputs

    def backward(self, ticket, grads, step):
        """Apply the gradients of ``ticket``'s outputs (optimizer once per unique id).

        Args:
            ticket: a waited training lookup.
            grads: dict feature -> float32 array shaped like that feature's output.
            step: the training step (for admission/eviction bookkeeping and Adam/FTRL).
        """
        check_grads(grads, ticket.plans)
        ticket._mark_applied("EmbeddingCollection")
        t = self._timer
        t.start()
        per_table = [p.unique_grads(grads) for p in ticket.plans]
        t.lap("pool")
        for p, idx, g in zip(ticket.plans, ticket.indices, per_table):
            self.tables[p.spec.name].apply_gradients(idx, g, step, keys=p.uniq)
        t.lap("update")

    def owner_of(self, table, keys):
        """Every key is here: zeros."""
        return np.zeros(np.asarray(keys).shape[0], dtype=np.int64)

    def stats(self):
        """Rows per table; the twin exchanges nothing."""
        return {"rows": {n: len(t) for n, t in self.tables.items()}, "exchange": "local",
                "buffer_bytes": 0}
