"""The owner side of a sharded store: serve rows of received ids, apply their gradients.

An owner receives ids as (table, source) blocks, each block already unique (the
source deduplicated before routing)::

    recv ids  [src 0: t0 t1 ...][src 1: t0 t1 ...] ...     (or any layout, via id_start)
    per table: unique_blocks(blocks in source order) -> uniq + inverse
    find_or_insert(uniq) (find for eval) -> rows copied from the table into the reply
        at each source's element offset (``block_offsets``), one pass
    backward: gradients in the same layout -> segment_sum in source order -> one
        gradient per id -> apply_gradients (optimizer once per id)

Summing in source-rank order is what makes every exchange method, and every
world size with the same global batch, give the same bits. Exchanges
(``hpctrain.sparse.exchange_*``) move the bytes; parameter-server ranks reuse
the same arithmetic.
"""
import numpy as np

from hpctrain._kernels import sparse_ops
from hpctrain.sparse.plan import exclusive_cumsum
from hpctrain.workpool import parallel_map


class OwnerPart:
    """What an owner keeps of one table between serving a lookup and its backward."""

    __slots__ = ("table", "elem_off", "elem_start", "counts", "inverse", "indices",
                 "num_unique", "dim", "keys")

    def __init__(self, table, elem_off, elem_start, counts, inverse, indices, dim, keys):
        self.table, self.elem_off, self.inverse, self.indices = table, elem_off, inverse, indices
        self.keys = keys               # int64[num_unique] the ids of ``indices`` (reduced rows)
        self.elem_start = elem_start   # int64[P] where source s's block of rows starts
        self.counts = counts           # int64[P] ids received from source s
        self.num_unique, self.dim = indices.shape[0], dim


class OwnerSide:
    """This rank's shards of every table, served and updated block by block.

    Args:
        specs: resolved ``TableSpec`` list (table order of every message).
        tables: dict table name -> ``EmbeddingTable`` (this rank's shards).
    """

    def __init__(self, specs, tables):
        self.specs, self.tables = specs, tables
        self.dims = np.array([s.dim for s in specs], dtype=np.int64)

    def serve(self, recv_ids, from_peer_table, step, train, reply, id_start=None):
        """Dedup received ids per table, find(-or-insert), gather rows into ``reply``.

        Args:
            recv_ids: int64 buffer holding every source's ids.
            from_peer_table: int64[P, T] ids received from each source per table.
            step: training step (admission and last-update bookkeeping).
            train: False: find only (nothing inserted; unknown ids read zeros).
            reply: float32 buffer; source ``s``'s rows of table ``i`` go at
                ``elem_start[i, s]`` (the packed ``Alltoallv`` layout).
            id_start: int64[T, P] where source ``s``'s ids of table ``i`` start in
                ``recv_ids`` (default: the packed ``Alltoallv`` layout).

        Returns:
            One ``OwnerPart`` per table, for ``apply``.
        """
        counts = np.ascontiguousarray(from_peer_table.T)               # [T, P]
        if id_start is None:
            id_start = exclusive_cumsum(from_peer_table.ravel()).reshape(
                from_peer_table.shape).T.copy()                        # [T, P]
        elem_start = exclusive_cumsum((from_peer_table * self.dims).ravel()).reshape(
            from_peer_table.shape).T.copy()
        def one(i):
            spec, c = self.specs[i], counts[i]
            if np.count_nonzero(c) <= 1:
                # one source: its ids are already unique (deduplicated before routing)
                s = int(id_start[i][c > 0][0]) if c.any() else 0
                uniq = recv_ids[s:s + int(c.sum())]
                inverse = np.arange(uniq.shape[0], dtype=np.int64)
                identity = True
            else:
                uniq, inverse = sparse_ops.unique_blocks(recv_ids, id_start[i], c)
                identity = False
            table = self.tables[spec.name]
            idx = table.find_or_insert(uniq, step) if train else table.find(uniq)
            off = sparse_ops.block_offsets(elem_start[i], c, spec.dim)
            # from the table straight into each source's block of the reply (disjoint
            # per table); an id two sources asked for is read twice
            table.gather_into(idx, reply, off, select=None if identity else inverse)
            # the ids for the update's stochastic rounding (reduced-precision rows only): a
            # copy, since uniq may be a view of the receive buffer, which the next lookup
            # overwrites before this one's backward when they overlap
            keys = None if table.row_dtype == "fp32" else np.array(uniq, copy=True)
            return OwnerPart(table, off, elem_start[i], c, inverse, idx, spec.dim, keys)
        return parallel_map(one, range(len(self.specs)))

    def apply(self, parts, grads, step, shift=None):
        """Sum each id's gradients in source order and run the optimizer once per id.

        Args:
            parts: what ``serve`` returned for the lookup being differentiated.
            grads: float32 buffer with the gradients in the reply's layout.
            step: training step.
            shift: int64[P] optional per-source shift of the blocks' element
                offsets (gradients that sit elsewhere than the reply layout, e.g. in
                the senders' shared-memory segments).
        """
        def one(part):
            off = part.elem_off
            if shift is not None:
                off = sparse_ops.block_offsets(part.elem_start + shift, part.counts, part.dim)
            g = sparse_ops.segment_sum(grads, off, part.dim, part.inverse, part.num_unique)
            part.table.apply_gradients(part.indices, g, step, keys=part.keys)
        parallel_map(one, parts)
