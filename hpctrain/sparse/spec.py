"""TableSpec: what one embedding table is (name, width, features, optimizer, policies, pooling)."""
from dataclasses import dataclass, field

from hpctrain.sparse.rowdtype import ROW_DTYPES

POOLINGS = ("sum", "mean", "none")


@dataclass
class TableSpec:
    """One embedding table of an ``EmbeddingCollection`` / ``ShardedEmbedding``.

    Args:
        name: table name (unique within a collection).
        dim: embedding width (>= 1).
        features: names of the batch features looked up in this table (each feature
            belongs to exactly one table; several features may share a table).
        optimizer: a ``SparseOptimizer``, a dict of its fields, or a kind name.
        admission: an ``Admission`` policy or None (admit every id at first sight).
        eviction: an ``Eviction`` policy or None (never evict).
        pooling: "sum" or "mean" per bag (output ``[B, dim]``), or "none" (one row per
            id, output ``[n_ids_of_feature, dim]``; for sequence features).
        init: "uniform" or "normal" initial rows (see docs/embedding-table.md).
        init_scale: scale of the initial rows (None: the table's default).
        table_id: integer id used by initialisation and routing; None means the
            index of this spec in the list given to the collection.
        row_dtype: how the table stores rows: "fp32", "fp16" or "bf16"
            (``hpctrain.sparse.rowdtype``; lookups return float32 either way).
        reserve_rows: rows of the whole table to preallocate and fault in at start
            (``EmbeddingTable.reserve``), split over the shards; 0: grow as rows come.
    """

    name: str
    dim: int
    features: list = field(default_factory=list)
    optimizer: object = "adagrad"
    admission: object = None
    eviction: object = None
    pooling: str = "sum"
    init: str = "uniform"
    init_scale: object = None
    table_id: object = None
    row_dtype: str = "fp32"
    reserve_rows: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableSpec: name must be a non-empty string, got {self.name!r}")
        if isinstance(self.dim, bool) or int(self.dim) != self.dim or int(self.dim) < 1:
            raise ValueError(f"TableSpec {self.name!r}: dim must be a positive integer, "
                             f"got {self.dim!r}")
        self.dim = int(self.dim)
        if isinstance(self.features, str):
            self.features = [self.features]
        self.features = [str(f) for f in self.features]
        if not self.features:
            raise ValueError(f"TableSpec {self.name!r}: needs at least one feature")
        dup = sorted({f for f in self.features if self.features.count(f) > 1})
        if dup:
            raise ValueError(f"TableSpec {self.name!r}: features listed twice: {dup}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"TableSpec {self.name!r}: pooling must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        if self.table_id is not None:
            self.table_id = int(self.table_id)
        if isinstance(self.reserve_rows, bool) or not hasattr(self.reserve_rows, "__index__") \
                or int(self.reserve_rows) < 0:
            raise ValueError(f"TableSpec {self.name!r}: reserve_rows must be an integer >= 0, "
                             f"got {self.reserve_rows!r}")
        self.reserve_rows = int(self.reserve_rows)
        if self.row_dtype not in ROW_DTYPES:
            raise ValueError(f"TableSpec {self.name!r}: row_dtype must be one of {ROW_DTYPES}, "
                             f"got {self.row_dtype!r}")


def resolve_specs(specs):
    """Validate a list of specs as one collection and fill in default table ids.

    Returns:
        ``(specs, feature_to_table)``: copies of the specs with ``table_id`` set
        (its list index unless given) and a dict feature name -> table name.

    Raises:
        ValueError: no specs, duplicate table names or ids, or a feature in two tables.
    """
    specs = list(specs)
    if not specs:
        raise ValueError("an embedding collection needs at least one TableSpec")
    out, names, ids, owner = [], set(), {}, {}
    for i, s in enumerate(specs):
        if not isinstance(s, TableSpec):
            raise TypeError(f"specs[{i}] must be a TableSpec, got {type(s).__name__}")
        if s.name in names:
            raise ValueError(f"duplicate table name {s.name!r}")
        names.add(s.name)
        tid = i if s.table_id is None else s.table_id
        if tid in ids:
            raise ValueError(f"tables {ids[tid]!r} and {s.name!r} share table_id {tid}")
        ids[tid] = s.name
        for f in s.features:
            if f in owner:
                raise ValueError(f"feature {f!r} is in tables {owner[f]!r} and {s.name!r}")
            owner[f] = s.name
        out.append(TableSpec(s.name, s.dim, list(s.features), s.optimizer, s.admission,
                             s.eviction, s.pooling, s.init, s.init_scale, tid, s.row_dtype,
                             s.reserve_rows))
    return out, owner
