"""Sparse side: jagged id batches, embedding tables, and their sharded collection.

Public names (the table modules are imported lazily by the collections)::

    JaggedBatch, TableSpec, EmbeddingCollection, ShardedEmbedding, owner_of
"""
from hpctrain.sparse.collection import PHASES, EmbeddingCollection
from hpctrain.sparse.jagged import JaggedBatch, JaggedFeature
from hpctrain.sparse.routing import owner_of
from hpctrain.sparse.sharded import ShardedEmbedding, ShardedLookup
from hpctrain.sparse.spec import TableSpec

__all__ = ["JaggedBatch", "JaggedFeature", "TableSpec", "EmbeddingCollection",
           "ShardedEmbedding", "ShardedLookup", "owner_of", "PHASES"]
