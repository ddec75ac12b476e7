"""The plan of a lookup, shared by every embedding store: dedup, routing, pooling, gradient sums.

Per table, for one batch (``TableBatch``)::

    ids of the table's features ──unique_inverse──> uniq (first-occurrence order) + inverse
    rows of uniq (from wherever the store keeps them) ──pool per bag──> outputs per feature
        (item j's row is the one at unique_off[inverse[j]]: pool_unique)
    d outputs ──to each item's unique id, summed in item order──> one gradient per
        unique id (unpool_unique)

(the dedup of every table in one call, ``unique_inverse_many``) and, for a store whose
rows live on other ranks (``route``, every table in one call, ``route_many``)::

    uniq of every table ──owner_of(table, id)──> owner per id, counts per (owner, table)
    each id placed in its (owner, table) block ──> ids in (owner, table, first
    occurrence) order: the layout of every request and reply message; ``unique_off``
    says where each unique id's row sits in the owner-major packed row buffer.

The twin (``EmbeddingCollection``), the sharded store and the parameter-server
client all use these, so their arithmetic cannot drift apart.
"""
import math

import numpy as np

from hpctrain._kernels import sparse_ops


def shard_reserve(rows, shards):
    """Rows one of ``shards`` shards reserves for ``rows`` rows of the whole table: its
    share plus five standard deviations of a uniform hash's share (binomial), so that
    even the fullest of a thousand shards grows past its reservation only rarely (it
    then grows as an unreserved table does)."""
    if rows <= 0:
        return 0
    share = rows / shards
    return min(int(math.ceil(share + 5.0 * math.sqrt(share * (1.0 - 1.0 / shards)))), rows)


def make_table(spec, seed, shards=1):
    """The ``EmbeddingTable`` a spec describes (one of ``shards`` shards of it when
    sharded), with its share of ``spec.reserve_rows`` reserved."""
    from hpctrain.sparse.table import EmbeddingTable
    table = EmbeddingTable(spec.name, spec.dim, optimizer=spec.optimizer,
                           table_id=spec.table_id, seed=seed, init=spec.init,
                           init_scale=spec.init_scale, admission=spec.admission,
                           eviction=spec.eviction, row_dtype=spec.row_dtype)
    rows = shard_reserve(spec.reserve_rows, shards)
    if rows:
        table.reserve(min(rows, (1 << 31) - 1))
    return table


class TableBatch:
    """The ids one table sees in one batch, deduplicated, with what pooling needs.

    Attributes:
        spec: the table's ``TableSpec``.
        names: the table's features, in spec order.
        batch_size: samples in the batch.
        counts: ids per feature (int list).
        keys: int64[n] the features' ids concatenated in ``names`` order.
        uniq, inverse: ``unique_inverse(keys)`` (first-occurrence order), set by
            ``split_batch``, which deduplicates every table in one kernel call.
        bag_offsets: int64[len(names) * B + 1] bags of the concatenated ids.
    """

    def __init__(self, spec, batch):
        self.spec = spec
        self.names = spec.features
        self.batch_size = batch.batch_size
        parts = [batch.feature(n) for n in self.names]
        self.counts = [p.values.shape[0] for p in parts]
        if len(parts) == 1:     # the common case: the feature's own views and offsets
            self.keys, self.bag_offsets = parts[0].values, parts[0].offsets
        else:
            self.keys = np.concatenate([p.values for p in parts])
            lengths = np.concatenate([p.lengths for p in parts])
            self.bag_offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
            np.cumsum(lengths, out=self.bag_offsets[1:])
        self.uniq = self.inverse = None     # split_batch: every table's at once

    def pool(self, src, unique_off):
        """Outputs per feature from rows of the unique ids.

        Args:
            src: flat float32 buffer holding the rows.
            unique_off: int64[u] where unique id ``i``'s row starts in ``src``.

        Returns:
            dict feature -> float32 ``[B, dim]`` (or ``[n_ids, dim]`` for "none").
        """
        dim, names = self.spec.dim, self.names
        if self.spec.pooling == "none":
            rows = sparse_ops.gather_rows(src, unique_off[self.inverse], dim)
            bounds = np.cumsum([0] + self.counts)
            return {n: rows[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}
        pooled = sparse_ops.pool_unique(src, unique_off, self.inverse, dim, self.bag_offsets,
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
            return sparse_ops.segment_sum(flat, src_off, dim, self.inverse, self.uniq.shape[0],
                                          out=out, out_off=out_off)
        return sparse_ops.unpool_unique(flat, self.bag_offsets, self.inverse, self.uniq.shape[0],
                                        dim, self.spec.pooling == "mean", out=out,
                                        out_off=out_off)


def split_batch(batch, specs, feature_to_table):
    """One ``TableBatch`` per spec; ``ValueError`` naming missing or unclaimed features."""
    wanted = [f for s in specs for f in s.features]
    batch.check_features(wanted)
    extra = [f for f in batch.features if f not in feature_to_table]
    if extra:
        raise ValueError(f"batch features {extra} belong to no table; tables take {wanted}")
    plans = [TableBatch(s, batch) for s in specs]
    # every table's dedup in one kernel call, the tables over the threads
    for p, (uniq, inverse) in zip(plans, sparse_ops.unique_inverse_many([p.keys for p in plans])):
        p.uniq, p.inverse = uniq, inverse
    return plans


def check_grads(grads, plans):
    """``ValueError`` naming gradient features that are missing or unknown."""
    wanted = [n for p in plans for n in p.names]
    missing = [n for n in wanted if n not in grads]
    extra = [n for n in grads if n not in wanted]
    if missing or extra:
        raise ValueError(f"backward: gradients missing for features {missing}, unknown "
                         f"features {extra}; the last forward produced {wanted}")



def exclusive_cumsum(a):
    """int64 exclusive prefix sum of a 1-D array."""
    out = np.zeros(a.shape[0], dtype=np.int64)
    if a.shape[0] > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


class Route:
    """Where a batch's unique ids go: one owner per id, requests packed owner-major.

    Attributes:
        owners: per table, int32[u] owner of each unique id.
        per_table: int64[P, T] ids asked of each owner per table.
        to_peer: int64[P] ids asked of each owner.
        ask_elems: int64[P] floats of rows coming back from each owner.
        unique_off: per table, int64[u] element offset of each unique id's row in the
            owner-major packed row buffer (also where its gradient goes back).
        total: number of ids sent.
    """

    __slots__ = ("owners", "per_table", "to_peer", "ask_elems", "unique_off", "total",
                 "_keys", "_id_start")

    def fill_ids(self, out):
        """Write the ids in (owner, table, first occurrence) order into ``out`` (int64[total])."""
        sparse_ops.scatter_many(self._keys, self.owners, self._id_start, out)
        return out


def route(plans, dims, num_owners):
    """``Route`` of the unique ids of ``plans`` (one ``TableBatch`` per table) to
    ``num_owners`` owners by ``sparse_ops.route`` (hash of table id and id).

    The packed layout is owner after owner, within an owner table after table, within
    a table in first-occurrence order; each id's place in it is computed per table from
    the block starts (no sort of the whole batch), every table in one kernel call
    (``sparse_ops.route_many``, the tables over the threads).

    Args:
        plans: list of ``TableBatch`` in table order.
        dims: int64[T] row width of each table.
        num_owners: number of owners (ranks of the store, or servers).
    """
    P, T = num_owners, len(plans)
    dims = np.asarray(dims, dtype=np.int64)
    r = Route()
    r._keys = [p.uniq for p in plans]
    table_ids = np.array([p.spec.table_id for p in plans], dtype=np.int64)
    r.owners, r.per_table, r.unique_off = sparse_ops.route_many(r._keys, table_ids, dims, P)
    r.to_peer = r.per_table.sum(axis=1)
    r.total = int(r.to_peer.sum())
    r.ask_elems = r.per_table @ dims
    # [T, P]: where table i's ids for owner p start
    r._id_start = exclusive_cumsum(r.per_table.ravel()).reshape(P, T).T.copy()
    return r


class Buffers:
    """Named buffers reused across steps and grown geometrically when too small."""

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
