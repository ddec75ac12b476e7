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
import time

import numpy as np

from hpctrain._kernels import sparse_ops
from hpctrain.sparse.spec import resolve_specs

PHASES = ("dedup", "route", "counts", "ids_a2a", "lookup", "rows_a2a", "pool", "grad_a2a",
          "update")


def make_table(spec, seed):
    """The ``EmbeddingTable`` a spec describes (one shard of it when sharded)."""
    from hpctrain.sparse.table import EmbeddingTable
    return EmbeddingTable(spec.name, spec.dim, optimizer=spec.optimizer, table_id=spec.table_id,
                          seed=seed, init=spec.init, init_scale=spec.init_scale,
                          admission=spec.admission, eviction=spec.eviction)


class TableBatch:
    """The ids one table sees in one batch, deduplicated, with what pooling needs.

    Attributes:
        spec: the table's ``TableSpec``.
        names: the table's features, in spec order.
        batch_size: samples in the batch.
        counts: ids per feature (int list).
        keys: int64[n] the features' ids concatenated in ``names`` order.
        uniq, inverse: ``unique_inverse(keys)`` (first-occurrence order).
        bag_offsets: int64[len(names) * B + 1] bags of the concatenated ids.
    """

    def __init__(self, spec, batch):
        self.spec = spec
        self.names = spec.features
        self.batch_size = batch.batch_size
        parts = [batch.feature(n) for n in self.names]
        self.counts = [p.values.shape[0] for p in parts]
        self.keys = (parts[0].values if len(parts) == 1
                     else np.concatenate([p.values for p in parts]))
        lengths = (parts[0].lengths if len(parts) == 1
                   else np.concatenate([p.lengths for p in parts]))
        self.bag_offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.bag_offsets[1:])
        self.uniq, self.inverse = sparse_ops.unique_inverse(self.keys)

    def pool(self, src, unique_off):
        """Outputs per feature from rows of the unique ids.

        Args:
            src: flat float32 buffer holding the rows.
            unique_off: int64[u] where unique id ``i``'s row starts in ``src``.

        Returns:
            dict feature -> float32 ``[B, dim]`` (or ``[n_ids, dim]`` for "none").
        """
        dim, names = self.spec.dim, self.names
        row_off = unique_off[self.inverse]
        if self.spec.pooling == "none":
            rows = sparse_ops.gather_rows(src, row_off, dim)
            bounds = np.cumsum([0] + self.counts)
            return {n: rows[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}
        pooled = sparse_ops.pool(src, row_off, dim, self.bag_offsets,
                                 self.spec.pooling == "mean")
        pooled = pooled.reshape(len(names), self.batch_size, dim)
        return {n: pooled[i] for i, n in enumerate(names)}

    def unique_grads(self, grads, out=None, out_off=None):
        """float32[u, dim]: the gradient of every unique id, summed over its occurrences.

        With ``out`` (flat float32) and ``out_off`` (int64[u]) unique id ``i``'s
        gradient is written to ``out[out_off[i]:][:dim]`` instead (an exchange buffer).
        """
        dim, b = self.spec.dim, self.batch_size
        if self.spec.pooling == "none":
            expect = self.counts
        else:
            expect = [b] * len(self.names)
        parts = []
        for name, n in zip(self.names, expect):
            g = grads[name]
            if not isinstance(g, np.ndarray) or g.shape != (n, dim):
                got = f"{g.dtype}{list(g.shape)}" if isinstance(g, np.ndarray) else type(g).__name__
                raise ValueError(f"gradient of feature {name!r} (table {self.spec.name!r}) must "
                                 f"be float32[{n}, {dim}], got {got}")
            parts.append(g)
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
        if self.spec.pooling == "none":
            src_off = np.arange(self.keys.shape[0], dtype=np.int64) * dim
            scale = None
        else:
            src_off = sparse_ops.bag_of_rows(self.bag_offsets) * dim
            scale = sparse_ops.bag_scales(self.bag_offsets) if self.spec.pooling == "mean" else None
        return sparse_ops.segment_sum(flat, src_off, dim, self.inverse, self.uniq.shape[0], scale,
                                      out=out, out_off=out_off)


def split_batch(batch, specs, feature_to_table):
    """One ``TableBatch`` per spec; ``ValueError`` naming missing or unclaimed features."""
    wanted = [f for s in specs for f in s.features]
    batch.check_features(wanted)
    extra = [f for f in batch.features if f not in feature_to_table]
    if extra:
        raise ValueError(f"batch features {extra} belong to no table; tables take {wanted}")
    return [TableBatch(s, batch) for s in specs]


def check_grads(grads, plans):
    """``ValueError`` naming gradient features that are missing or unknown."""
    wanted = [n for p in plans for n in p.names]
    missing = [n for n in wanted if n not in grads]
    extra = [n for n in grads if n not in wanted]
    if missing or extra:
        raise ValueError(f"backward: gradients missing for features {missing}, unknown "
                         f"features {extra}; the last forward produced {wanted}")


class PhaseTimer:
    """Accumulated seconds per phase of the lookup / update path."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def start(self):
        self._t = time.perf_counter()

    def lap(self, phase):
        """Add the time since the last ``start``/``lap`` to ``phase``."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now

    def reset(self):
        for k in self.seconds:
            self.seconds[k] = 0.0


class _Lookup:
    """A lookup of the twin: ids deduplicated at start, rows read at wait."""

    def __init__(self, plans, step, train):
        self.plans, self.step, self.train = plans, step, train
        self.indices = []
        self.done = False


class EmbeddingCollection:
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
        self._timer = PhaseTimer()
        self._last = None

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

    def wait_lookup(self, handle):
        """Find(-or-insert), gather and pool a started lookup.

        A training lookup becomes the one ``backward`` differentiates; an eval
        lookup (``train=False``) inserts nothing and leaves that alone.
        """
        if handle.done:
            raise RuntimeError("wait_lookup: this lookup was already waited for")
        handle.done = True
        t = self._timer
        t.start()
        rows = []
        for p in handle.plans:
            table = self.tables[p.spec.name]
            idx = (table.find_or_insert(p.uniq, handle.step) if handle.train
                   else table.find(p.uniq))
            handle.indices.append(idx)
            rows.append(np.ascontiguousarray(table.gather(idx), dtype=np.float32))
        t.lap("lookup")
        outputs = {}
        for p, r in zip(handle.plans, rows):
            off = np.arange(p.uniq.shape[0], dtype=np.int64) * p.spec.dim
            outputs.update(p.pool(r.reshape(-1), off))
        t.lap("pool")
        if handle.train:
            self._last = handle
        return outputs

    def forward(self, batch, step, train=True):
        """Pooled embeddings of ``batch``: dict feature -> float32 ``[B, dim]`` (or jagged rows).

        With ``train=False`` unknown ids read as the default row and nothing is inserted.
        """
        return self.wait_lookup(self.start_lookup(batch, step, train))

    def backward(self, grads, step):
        """Apply the gradients of the last forward's outputs (optimizer once per unique id).

        Args:
            grads: dict feature -> float32 array shaped like that feature's output.
            step: the training step (for admission/eviction bookkeeping and Adam/FTRL).
        """
        last = self._last
        if last is None:
            raise RuntimeError("backward called before any forward/wait_lookup")
        check_grads(grads, last.plans)
        t = self._timer
        t.start()
        per_table = [p.unique_grads(grads) for p in last.plans]
        t.lap("pool")
        for p, idx, g in zip(last.plans, last.indices, per_table):
            self.tables[p.spec.name].apply_gradients(idx, g, step)
        t.lap("update")
        self._last = None

    def evict(self, step):
        """Evict stale/rare rows of every table; returns dict table -> rows evicted."""
        return {name: int(t.evict(step)) for name, t in self.tables.items()}
