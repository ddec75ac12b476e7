"""``[[tables]]``: one embedding table each (``hpctrain.sparse``'s ``TableSpec``).

Names and limits come from the sparse side: ``POOLINGS`` (``hpctrain.sparse.spec``),
``INITS`` (``hpctrain.sparse.init``), the admission counters, limits and defaults
(``hpctrain.sparse.policies``), the optimizers (``hpctrain.config.optim``), the row dtypes
(``hpctrain.sparse.rowdtype``).
"""
import dataclasses
from dataclasses import dataclass

from hpctrain.config._node import INT32_MAX
from hpctrain.config.optim import SPARSE_OPTIMIZER_KEYS, parse_optimizer
from hpctrain.sparse.init import INITS
from hpctrain.sparse.policies import ADMISSION_LIMITS, COUNTERS, EVICTION_LIMITS, Admission
from hpctrain.sparse.rowdtype import MAX_FINITE, ROW_DTYPES
from hpctrain.sparse.spec import POOLINGS

_ADMISSION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Admission)}


@dataclass
class TableConfig:
    """One embedding table; ``optimizer`` holds every ``SparseOptimizer`` field, ``admission``
    and ``eviction`` the ``Admission``/``Eviction`` fields (None: admit all / never evict);
    ``row_dtype`` how rows are stored ("fp32", "fp16", "bf16"); ``reserve_rows`` rows of the
    whole table preallocated and faulted in at start (0: none)."""
    name: str
    features: list
    dim: int
    optimizer: dict
    admission: dict = None
    eviction: dict = None
    pooling: str = "sum"
    init: str = "uniform"
    init_scale: float = None
    row_dtype: str = "fp32"
    reserve_rows: int = 0


def _admission(a):
    out = {k: a.integer(k, _ADMISSION_DEFAULTS[k], *ADMISSION_LIMITS[k]) for k in ADMISSION_LIMITS}
    out["counter"] = a.string("counter", _ADMISSION_DEFAULTS["counter"], choices=COUNTERS)
    a.finish()
    return out


def _eviction(e):
    # The policy takes 0 (ttl = 0: evict every row not updated this very step; max_rows = 0:
    # evict everything); in a config file that is a mistake, so ask for >= 1.
    # max_rows: row ids are int32 in a shard's index
    out = {k: e.integer(k, None, lo=max(1, lo), hi=min(hi or INT32_MAX, INT32_MAX))
           for k, (lo, hi) in EVICTION_LIMITS.items()}
    e.finish()
    return out


def parse_table(n):
    """Validate one ``[[tables]]`` entry into a ``TableConfig``."""
    name = n.string("name")
    if not name:
        raise n.error("name", "must not be empty")
    features = n.strings("features", nonempty=True)
    dim = n.integer("dim", lo=1, hi=1 << 16)
    optimizer = parse_optimizer(n, "optimizer", SPARSE_OPTIMIZER_KEYS, fill_all=True)
    a, e = n.node("admission"), n.node("eviction")
    t = TableConfig(name=name, features=features, dim=dim, optimizer=optimizer,
                    admission=_admission(a) if a is not None else None,
                    eviction=_eviction(e) if e is not None else None,
                    pooling=n.string("pooling", "sum", choices=POOLINGS),
                    init=n.string("init", "uniform", choices=INITS),
                    init_scale=n.number("init_scale", None, lo=0.0, lo_incl=False),
                    row_dtype=n.string("row_dtype", "fp32"),
                    reserve_rows=n.integer("reserve_rows", 0, lo=0, hi=1 << 40))
    if t.row_dtype not in ROW_DTYPES:
        raise n.error("row_dtype", f"table {name!r}: expected one of "
                                   f"{', '.join(map(repr, ROW_DTYPES))}, got {t.row_dtype!r}")
    if t.row_dtype != "fp32" and t.init_scale is not None:
        # the largest initial value: a (uniform), about 8.6 s (normal, Box-Muller)
        top = t.init_scale * (1.0 if t.init == "uniform" else 8.58)
        if top > MAX_FINITE[t.row_dtype]:
            raise n.error("init_scale", f"table {name!r}: initial values up to {top:g} do not "
                                        f"fit row_dtype = {t.row_dtype!r} (largest finite value "
                                        f"{MAX_FINITE[t.row_dtype]:g}); lower init_scale or "
                                        f"store the rows as \"fp32\"")
    n.finish()
    return t
