"""Sparse side: jagged id batches, embedding tables, and the embedding stores.

Public names (the table modules are imported lazily by the stores)::

    JaggedBatch, TableSpec, EmbeddingStore, Ticket, EmbeddingCollection,
    ShardedEmbedding, owner_of

``EmbeddingStore`` (hpctrain/sparse/store.py) is what a trainer uses; the
collection is its single-process twin, the sharded embedding its collective
implementation, and ``hpctrain.ps.client`` its parameter-server one.
"""
from hpctrain.sparse.collection import PHASES, EmbeddingCollection
from hpctrain.sparse.jagged import JaggedBatch, JaggedFeature
from hpctrain.sparse.routing import owner_of
from hpctrain.sparse.sharded import ShardedEmbedding, ShardedLookup
from hpctrain.sparse.spec import TableSpec
from hpctrain.sparse.store import EmbeddingStore, Ticket

__all__ = ["JaggedBatch", "JaggedFeature", "TableSpec", "EmbeddingStore", "Ticket",
           "EmbeddingCollection", "ShardedEmbedding", "ShardedLookup", "owner_of", "PHASES"]
