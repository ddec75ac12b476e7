"""Run configuration: a TOML file validated into dataclasses.

``load_config(path)`` reads a TOML file and ``config_from_dict(d)`` validates an
already-parsed dict. Anything wrong -- an unknown key, a wrong type, an
impossible value -- raises ``ConfigError`` naming the file and the key path::

    run.toml: tables[2].optimizer.lr: expected a number > 0, got -0.1

Every key is described in docs/configuration.md. The layout::

    seed, mode, overlap, exchange, node_group_size, threads,
    global_batch | batch_per_rank, steps, epochs
    [model]            kind = "dlrm" | "wide_deep" | "deepfm", layer sizes
    [[tables]]         name, features, dim, optimizer, admission, eviction, pooling, init
    [dense_optimizer]  kind, lr, hyper-parameters
    [data]             format, prefetch, shuffle, seed, bad_lines,
                       [data.train] [data.eval] [data.schema] (csv) [data.synthetic]
    [eval] [checkpoint] [metrics]
    [ps]               servers, groups, consistency, staleness, ... (mode = "hybrid" only)

Checkpoints keep ``Config.text`` (the original TOML) and rebuild the config
with ``loads_config(text)``; no TOML writer is involved.

Relative paths (data files, checkpoint directory, metrics file) are resolved
against the current working directory when the config is loaded, after ``~``
and ``$VAR`` expansion, and stored absolute.
"""
import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field

from hpctrain.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODEL_KINDS = ("dlrm", "wide_deep", "deepfm")
DATA_FORMATS = ("criteo", "csv", "hdf5", "synthetic")
POOLINGS = ("sum", "mean", "none")
INITS = ("uniform", "normal")
DENSE_TRANSFORMS = ("none", "log1p", "standardize")
EXCHANGES = ("auto", "shm", "alltoallv")
MODES = ("collective", "hybrid")
PS_CONSISTENCIES = ("bsp", "ssp", "asp")
PS_PLACEMENTS = ("first", "per_node")

# Names and defaults are those of hpctrain.sparse.optimizers.SparseOptimizer.
SPARSE_OPTIMIZER_DEFAULTS = {
    "kind": "adagrad", "lr": 0.01, "momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
    "initial_accumulator": 0.0, "l1": 0.0, "l2": 0.0, "lr_power": -0.5, "weight_decay": 0.0}
# Which hyper-parameters each kind reads; setting another one is a mistake worth reporting.
SPARSE_OPTIMIZER_KEYS = {
    "sgd": ("lr", "weight_decay"),
    "momentum": ("lr", "momentum", "weight_decay"),
    "nesterov": ("lr", "momentum", "weight_decay"),
    "adagrad": ("lr", "eps", "initial_accumulator", "weight_decay"),
    "rowwise_adagrad": ("lr", "eps", "initial_accumulator", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "ftrl": ("lr", "l1", "l2", "lr_power", "initial_accumulator"),
}
# hpctrain.dense.optim.make_optimizer's kinds and their hyper-parameters.
DENSE_OPTIMIZER_KEYS = dict({k: SPARSE_OPTIMIZER_KEYS[k]
                             for k in ("sgd", "momentum", "nesterov", "adagrad", "adam")},
                            adamw=SPARSE_OPTIMIZER_KEYS["adam"])
# (type, lower bound, lower bound inclusive, upper bound, upper inclusive) of each hyper-parameter
_HYPER = {
    "lr": (0.0, False, None, False), "momentum": (0.0, True, 1.0, False),
    "beta1": (0.0, True, 1.0, False), "beta2": (0.0, True, 1.0, False),
    "eps": (0.0, False, None, False), "initial_accumulator": (0.0, True, None, False),
    "l1": (0.0, True, None, False), "l2": (0.0, True, None, False),
    "lr_power": (None, False, 0.0, True), "weight_decay": (0.0, True, None, False),
}

_MISSING = object()


# --------------------------------------------------------------------------- dataclasses

@dataclass
class ModelConfig:
    """The dense model (hpctrain.dense.models).

    ``bottom``/``top``/``self_interaction`` are DLRM's; ``hidden`` (deep MLP widths) and
    ``dropout`` are Wide&Deep's and DeepFM's; ``wide_tables`` names the dim-1 tables of
    Wide&Deep's wide part or DeepFM's first-order terms (every other table is deep/FM).
    """
    kind: str
    bottom: list = None
    top: list = None
    self_interaction: bool = False
    hidden: list = None
    dropout: float = 0.0
    wide_tables: list = field(default_factory=list)


@dataclass
class TableConfig:
    """One embedding table; ``optimizer`` holds every ``SparseOptimizer`` field, ``admission``
    and ``eviction`` the ``Admission``/``Eviction`` fields (None: admit all / never evict)."""
    name: str
    features: list
    dim: int
    optimizer: dict
    admission: dict = None
    eviction: dict = None
    pooling: str = "sum"
    init: str = "uniform"
    init_scale: float = None


@dataclass
class SplitConfig:
    """One split of the data: files (text/HDF5), a row range, or a synthetic sample count."""
    paths: list = field(default_factory=list)
    rows: tuple = None
    num_samples: int = None


@dataclass
class DenseColumn:
    """A dense CSV column: transform "none" | "log1p" | "standardize" (mean/std None: train's)."""
    name: str
    transform: str = "none"
    mean: float = None
    std: float = None


@dataclass
class MultiValuedColumn:
    """A CSV column holding several categorical values separated by ``separator``."""
    name: str
    separator: str = "|"


@dataclass
class CrossedColumn:
    """A sparse feature whose id hashes the ids of several categorical columns."""
    name: str
    columns: list


@dataclass
class SchemaConfig:
    """Column roles of a generic CSV/TSV file."""
    label: str
    delimiter: str = ","
    header: bool = True
    columns: list = None
    label_positive: list = None
    label_negative: list = None
    dense: list = field(default_factory=list)
    categorical: list = field(default_factory=list)
    multi_valued: list = field(default_factory=list)
    crossed: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    strip: bool = True

    def feature_names(self):
        """Sparse feature names in batch order: categorical, multi-valued, then crossed."""
        return list(self.categorical) + [c.name for c in self.multi_valued] + \
            [c.name for c in self.crossed]


@dataclass
class SyntheticConfig:
    """Zipf-distributed ids with labels from a planted logistic model."""
    features: list
    num_dense: int = 13
    vocab: list = None
    zipf: float = 1.05
    bag_size: list = None
    bag_size_min: list = None
    positive_rate: float = 0.25
    signal: float = 2.0


@dataclass
class BadLinesConfig:
    """A bad line raises unless bad <= max_count or bad <= max_ratio * lines parsed (per rank)."""
    max_count: int = 0
    max_ratio: float = 0.0


@dataclass
class DataConfig:
    """Where samples come from and how they are read."""
    format: str
    train: SplitConfig = None
    eval: SplitConfig = None
    schema: SchemaConfig = None
    synthetic: SyntheticConfig = None
    bad_lines: BadLinesConfig = field(default_factory=BadLinesConfig)
    prefetch: int = 2
    shuffle: bool = False
    shuffle_block: int = 1
    seed: int = None

    def feature_names(self):
        """Sparse feature names the reader yields, or None when only the files know (hdf5)."""
        if self.format == "criteo":
            return [f"C{i}" for i in range(1, 27)]
        if self.format == "csv":
            return self.schema.feature_names()
        if self.format == "synthetic":
            return list(self.synthetic.features)
        return None

    def num_dense(self):
        """Number of dense features the reader yields, or None when only the files know."""
        if self.format == "criteo":
            return 13
        if self.format == "csv":
            return len(self.schema.dense)
        if self.format == "synthetic":
            return self.synthetic.num_dense
        return None

    def split(self, name):
        """The ``SplitConfig`` for "train" or "eval" (ValueError if unknown or not configured)."""
        if name not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {name!r}")
        s = getattr(self, name)
        if s is None:
            raise ConfigError(f"data.{name}: this split is not configured")
        return s


@dataclass
class EvalConfig:
    """Evaluation on the whole ``data.eval`` split every ``interval`` steps (0: only at the end)."""
    interval: int = 0
    global_batch: int = None
    at_end: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoints every ``every_steps`` steps and/or ``every_minutes`` minutes; keep the last K."""
    directory: str
    every_steps: int = None
    every_minutes: float = None
    keep_last: int = 3
    resume: bool = False


@dataclass
class MetricsConfig:
    """JSON-lines metrics file (None: none) and the live-line/metrics interval in steps."""
    path: str = None
    every_steps: int = 10


@dataclass
class PsConfig:
    """Parameter servers of mode = "hybrid" (``[ps]``); see ``Config.ps_layout``.

    ``consistency``: "bsp" (every worker waits for all others each clock), "ssp" (a worker
    may run ``staleness`` clocks ahead of the slowest) or "asp" (no waiting; ``staleness`` is
    None). ``placement``: servers are the first ranks ("first") or spread one per node
    ("per_node"). ``dense_on_servers``: dense parameters live on the servers too (else they
    are allreduced among workers). ``timeout_s``: how long a worker waits for a server
    reply before raising. ``every_clocks_log``: servers log their state every this many clocks.
    """
    servers: int = 1
    groups: int = 1
    consistency: str = "bsp"
    staleness: int = 0
    placement: str = "first"
    dense_on_servers: bool = True
    timeout_s: float = 300.0
    every_clocks_log: int = 100


@dataclass
class Config:
    """A validated run configuration.

    Attributes:
        model, tables, dense_optimizer, data, eval, checkpoint, metrics: the sections
            (``checkpoint`` is None when not configured).
        global_batch, batch_per_rank: exactly one is set; see ``batch_sizes``.
        steps, epochs: at least one is set; training stops at whichever comes first.
        seed: the run's seed (initialisation, shuffling; synthetic data unless ``data.seed``).
        threads: OpenMP threads per rank (None: the environment's default).
        malloc: "tuned" (fixed glibc mmap/trim thresholds, ``hpctrain.memory``) or
            "default" (the allocator as the process found it).
        mode: "collective" or "hybrid" (parameter servers and worker groups, see ``ps``).
        overlap: overlap next batch's exchange with this batch's dense work.
        ps: the ``PsConfig`` of mode "hybrid"; None in collective mode.
        exchange, node_group_size: how embedding rows reach ranks of the same node
            (``ShardedEmbedding``'s arguments of those names).
        source: the file the config came from ("<dict>"/"<string>" otherwise).
        text: the original TOML text (None for ``config_from_dict``), for checkpoints.
        raw: the parsed dict before validation (plain TOML types).
    """
    model: ModelConfig
    tables: list
    dense_optimizer: dict
    data: DataConfig
    global_batch: int = None
    batch_per_rank: int = None
    steps: int = None
    epochs: int = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    seed: int = 0
    threads: int = None
    malloc: str = "tuned"
    mode: str = "collective"
    overlap: bool = False
    exchange: str = "auto"
    node_group_size: int = None
    ps: PsConfig = None
    source: str = "<dict>"
    text: str = None
    raw: dict = field(default_factory=dict, repr=False)

    def batch_sizes(self, world_size):
        """``(global_batch, batch_per_rank)`` on ``world_size`` ranks.

        In mode "hybrid" only workers take batches: pass the worker count
        (``ps_layout(world)[1]``), not the world size.

        Raises:
            ConfigError: ``global_batch`` is not divisible by ``world_size``.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_per_rank is not None:
            return self.batch_per_rank * world_size, self.batch_per_rank
        if self.global_batch % world_size:
            raise ConfigError(f"{self.source}: global_batch: {self.global_batch} is not divisible "
                              f"by the world size {world_size}")
        return self.global_batch, self.global_batch // world_size

    def ps_layout(self, world_size):
        """``(servers, workers, workers_per_group)`` of mode "hybrid" on ``world_size`` ranks.

        Raises:
            ConfigError: not mode "hybrid"; no rank left for workers (``ps.servers``); the
                workers do not split evenly into ``ps.groups``.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.ps is None:
            raise ConfigError(f"{self.source}: mode: parameter servers need mode = \"hybrid\", "
                              f"got {self.mode!r}")
        servers, groups = self.ps.servers, self.ps.groups
        workers = world_size - servers
        if workers < 1:
            raise ConfigError(f"{self.source}: ps.servers: {servers} servers leave no worker "
                              f"on a world of {world_size} ranks (servers must be < world size)")
        if workers % groups:
            raise ConfigError(f"{self.source}: ps.groups: world {world_size} - servers {servers} "
                              f"= {workers} workers do not split into {groups} equal groups")
        return servers, workers, workers // groups

    def table(self, name):
        """The ``TableConfig`` called ``name`` (KeyError if there is none)."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r}; tables are {[t.name for t in self.tables]}")

    def replace(self, **changes):
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- validation helper

def _kind(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


class _Node:
    """One TOML table being validated; ``finish()`` rejects the keys nobody asked for."""

    def __init__(self, data, path, source):
        self.data, self.path, self.source, self.used = data, path, source, set()

    def key(self, key):
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key, msg):
        where = self.key(key) if key is not None else (self.path or "<top level>")
        return ConfigError(f"{self.source}: {where}: {msg}")

    def has(self, key):
        return key in self.data

    def raw(self, key, default=_MISSING):
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "required key is missing")
            return default
        return self.data[key]

    def integer(self, key, default=_MISSING, lo=None, hi=None):
        if key not in self.data:
            return self.raw(key, default)
        return _check_int(self, key, self.raw(key), lo, hi)

    def number(self, key, default=_MISSING, lo=None, lo_incl=True, hi=None, hi_incl=True):
        if key not in self.data:
            return self.raw(key, default)
        return _check_float(self, key, self.raw(key), lo, lo_incl, hi, hi_incl)

    def boolean(self, key, default=_MISSING):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {_kind(v)} {v!r}")
        return v

    def string(self, key, default=_MISSING, choices=None):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_kind(v)} {v!r}")
        if choices is not None and v not in choices:
            raise self.error(key, f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    def strings(self, key, default=_MISSING, nonempty=False, unique=True):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(key, f"expected an array of strings, got {_kind(v)} {v!r}")
        if nonempty and not v:
            raise self.error(key, "must not be empty")
        if unique and len(set(v)) != len(v):
            dup = sorted({x for x in v if v.count(x) > 1})
            raise self.error(key, f"duplicate entries {dup}")
        return list(v)

    def integers(self, key, default=_MISSING, lo=None, nonempty=True):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if not isinstance(v, list):
            raise self.error(key, f"expected an array of integers, got {_kind(v)} {v!r}")
        if nonempty and not v:
            raise self.error(key, "must not be empty")
        return [_check_int(self, key, x, lo, None, idx=i) for i, x in enumerate(v)]

    def paths(self, key, default=_MISSING):
        if key not in self.data:
            return self.raw(key, default)
        v = self.raw(key)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise self.error(key, f"expected a path or a non-empty array of paths, got {v!r}")
        return [_resolve(x) for x in v]

    def node(self, key, required=False):
        v = self.raw(key, _MISSING if required else None)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"expected a table, got {_kind(v)} {v!r}")
        return _Node(v, self.key(key), self.source)

    def nodes(self, key, required=False):
        v = self.raw(key, _MISSING if required else [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.error(key, f"expected an array of tables ([[{self.key(key)}]]), got {v!r}")
        return [_Node(x, f"{self.key(key)}[{i}]", self.source) for i, x in enumerate(v)]

    def finish(self):
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, sorted(self.used), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(sorted(self.used))}"
            raise self.error(k, f"unknown key{hint}")


def _check_int(node, key, v, lo, hi, idx=None):
    name = node.key(key) + (f"[{idx}]" if idx is not None else "")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{node.source}: {name}: expected an integer, got {_kind(v)} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
        raise ConfigError(f"{node.source}: {name}: expected an integer {rng}, got {v}")
    return v


def _check_float(node, key, v, lo, lo_incl, hi, hi_incl):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise node.error(key, f"expected a number, got {_kind(v)} {v!r}")
    v = float(v)
    bad = v != v or v in (float("inf"), float("-inf"))
    bad |= lo is not None and (v < lo or (v == lo and not lo_incl))
    bad |= hi is not None and (v > hi or (v == hi and not hi_incl))
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>=' if lo_incl else '>'} {lo:g}")
        if hi is not None:
            parts.append(f"{'<=' if hi_incl else '<'} {hi:g}")
        raise node.error(key, f"expected a finite number {' and '.join(parts)}, got {v!r}")
    return v


def _resolve(p):
    return os.path.abspath(os.path.expandvars(os.path.expanduser(p)))


# --------------------------------------------------------------------------- sections

def _optimizer(node, key, kinds, fill_all):
    v = node.raw(key, {"kind": "adagrad"})
    if isinstance(v, str):
        v = {"kind": v}
    if not isinstance(v, dict):
        raise node.error(key, f"expected an optimizer name or table, got {_kind(v)} {v!r}")
    n = _Node(v, node.key(key), node.source)
    kind = n.string("kind", choices=tuple(kinds))
    allowed = kinds[kind]
    for k in v:
        if k != "kind" and k in _HYPER and k not in allowed:
            raise n.error(k, f"not a hyper-parameter of optimizer {kind!r} "
                             f"(it takes {', '.join(allowed)})")
    # Sparse: every SparseOptimizer field. Dense: lr plus what the file sets, so the dense
    # optimizer's own defaults (e.g. Adagrad's eps) apply to the rest.
    out = dict(SPARSE_OPTIMIZER_DEFAULTS) if fill_all else {}
    out["kind"] = kind
    for k in allowed:
        lo, lo_incl, hi, hi_incl = _HYPER[k]
        if fill_all or k == "lr" or k in v:
            out[k] = n.number(k, SPARSE_OPTIMIZER_DEFAULTS[k], lo, lo_incl, hi, hi_incl)
    n.finish()
    return out


def _table(n):
    name = n.string("name")
    if not name:
        raise n.error("name", "must not be empty")
    features = n.strings("features", nonempty=True)
    dim = n.integer("dim", lo=1)
    optimizer = _optimizer(n, "optimizer", SPARSE_OPTIMIZER_KEYS, fill_all=True)
    admission = eviction = None
    a = n.node("admission")
    if a is not None:
        admission = {"min_count": a.integer("min_count", 1, lo=1),
                     "counter": a.string("counter", "exact", choices=("exact", "bloom")),
                     "bloom_size": a.integer("bloom_size", 1 << 20, lo=1),
                     "bloom_hashes": a.integer("bloom_hashes", 4, lo=1, hi=16)}
        a.finish()
    e = n.node("eviction")
    if e is not None:
        eviction = {"ttl": e.integer("ttl", None, lo=1),
                    "max_rows": e.integer("max_rows", None, lo=1)}
        e.finish()
    t = TableConfig(name=name, features=features, dim=dim, optimizer=optimizer,
                    admission=admission, eviction=eviction,
                    pooling=n.string("pooling", "sum", choices=POOLINGS),
                    init=n.string("init", "uniform", choices=INITS),
                    init_scale=n.number("init_scale", None, lo=0.0, lo_incl=False))
    n.finish()
    return t


def _model(n):
    kind = n.string("kind", choices=MODEL_KINDS)
    own = {"dlrm": ("bottom", "top", "self_interaction"),
           "wide_deep": ("hidden", "wide_tables", "dropout"),
           "deepfm": ("hidden", "wide_tables", "dropout")}[kind]
    for k in ("bottom", "top", "self_interaction", "hidden", "wide_tables", "dropout"):
        if k in n.data and k not in own:
            raise n.error(k, f"not a parameter of model {kind!r} (it takes {', '.join(own)})")
    m = ModelConfig(kind=kind)
    if kind == "dlrm":
        m.bottom = n.integers("bottom", [512, 256, 64], lo=1)
        m.top = n.integers("top", [512, 256, 1], lo=1)
        if m.top[-1] != 1:
            raise n.error("top", f"the last layer must have 1 output (the logit), got {m.top}")
        m.self_interaction = n.boolean("self_interaction", False)
    else:
        m.hidden = n.integers("hidden", [1024, 512, 256] if kind == "wide_deep"
                              else [400, 400, 400], lo=1, nonempty=False)
        m.wide_tables = n.strings("wide_tables", [])
        m.dropout = n.number("dropout", 0.0, lo=0.0, hi=1.0, hi_incl=False)
    n.finish()
    return m


def _split(n, fmt):
    s = SplitConfig()
    if fmt == "synthetic":
        if n.has("paths"):
            raise n.error("paths", "synthetic data has no files; set num_samples")
        s.num_samples = n.integer("num_samples", None, lo=1)
    else:
        s.paths = n.paths("paths")
        if n.has("num_samples"):
            raise n.error("num_samples", f"only synthetic data takes num_samples; select rows "
                                         f"of {fmt} files with rows = [start, end]")
    rows = n.raw("rows", None)
    if rows is not None and fmt == "synthetic":
        raise n.error("rows", "synthetic splits are sized by num_samples, not rows")
    if rows is not None:
        if (not isinstance(rows, list) or len(rows) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in rows)
                or rows[0] < 0 or rows[1] <= rows[0]):
            raise n.error("rows", f"expected [start, end] with 0 <= start < end, got {rows!r}")
        s.rows = (rows[0], rows[1])
    n.finish()
    return s


def _schema(n):
    s = SchemaConfig(label=n.string("label"))
    s.delimiter = n.string("delimiter", ",")
    if len(s.delimiter) != 1 or s.delimiter in "\n\r" or ord(s.delimiter) > 127:
        raise n.error("delimiter", f"expected one ASCII character (\"\\t\" for TSV), "
                                   f"got {s.delimiter!r}")
    s.header = n.boolean("header", True)
    s.strip = n.boolean("strip", True)
    s.columns = n.strings("columns", None, nonempty=True)
    if not s.header and s.columns is None:
        raise n.error("columns", "required when header = false (the column names, in order)")
    s.label_positive = n.strings("label_positive", None, nonempty=True)
    s.label_negative = n.strings("label_negative", None, nonempty=True)
    if s.label_negative is not None and s.label_positive is None:
        raise n.error("label_negative", "needs label_positive")
    if s.label_positive and s.label_negative and set(s.label_positive) & set(s.label_negative):
        raise n.error("label_negative", "shares values with label_positive")
    default_tf = n.string("dense_transform", "none", choices=DENSE_TRANSFORMS)
    dense = n.raw("dense", [])
    if not isinstance(dense, list):
        raise n.error("dense", f"expected an array of column names or tables, got {dense!r}")
    for i, d in enumerate(dense):
        if isinstance(d, str):
            s.dense.append(DenseColumn(d, default_tf))
            continue
        if not isinstance(d, dict):
            raise n.error("dense", f"entry {i}: expected a column name or a table "
                                   f"{{name, transform, mean, std}}, got {d!r}")
        c = _Node(d, f"{n.key('dense')}[{i}]", n.source)
        col = DenseColumn(c.string("name"),
                          c.string("transform", default_tf, choices=DENSE_TRANSFORMS),
                          c.number("mean", None), c.number("std", None, lo=0.0, lo_incl=False))
        if (col.mean is not None or col.std is not None) and col.transform != "standardize":
            raise c.error("mean" if col.mean is not None else "std",
                          "only used with transform = \"standardize\"")
        if (col.mean is None) != (col.std is None):
            raise c.error("std" if col.std is None else "mean",
                          "give both mean and std, or neither (computed from the train split)")
        c.finish()
        s.dense.append(col)
    s.categorical = n.strings("categorical", [])
    for i, m in enumerate(n.nodes("multi_valued")):
        col = MultiValuedColumn(m.string("name"), m.string("separator", "|"))
        if len(col.separator) != 1 or col.separator == s.delimiter:
            raise m.error("separator", f"expected one character other than the delimiter, "
                                       f"got {col.separator!r}")
        m.finish()
        s.multi_valued.append(col)
    for i, c in enumerate(n.nodes("crossed")):
        col = CrossedColumn(c.string("name"), c.strings("columns", nonempty=True))
        if len(col.columns) < 2:
            raise c.error("columns", f"a cross needs at least 2 columns, got {col.columns}")
        for j, x in enumerate(col.columns):
            if x not in s.categorical:
                raise c.error(f"columns[{j}]",
                              f"{x!r} is not a categorical column (crosses combine the ids "
                              f"of categorical columns)")
        c.finish()
        s.crossed.append(col)
    s.ignore = n.strings("ignore", [])
    roles = [("label", s.label)] + [("dense", c.name) for c in s.dense] + \
        [("categorical", c) for c in s.categorical] + \
        [("multi_valued", c.name) for c in s.multi_valued] + [("ignore", c) for c in s.ignore]
    seen = {}
    for role, col in roles:
        if col in seen:
            raise n.error(role, f"column {col!r} is already listed under {seen[col]}")
        seen[col] = role
    for c in s.crossed:
        if c.name in seen or [x.name for x in s.crossed].count(c.name) > 1:
            raise n.error("crossed", f"feature name {c.name!r} is already a column or a cross")
    if s.columns is not None:
        for role, col in roles:
            if col not in s.columns:
                raise n.error(role, f"column {col!r} is not in columns {s.columns}")
        missing = [c for c in s.columns if c not in seen]
        if missing:
            raise n.error("columns", f"columns {missing} have no role; list them under dense, "
                                     f"categorical, multi_valued or ignore")
    if not s.feature_names() and not s.dense:
        raise n.error(None, "no dense, categorical or multi_valued columns")
    n.finish()
    return s


def _per_feature(n, key, nf, default, lo):
    v = n.raw(key, default)
    if isinstance(v, list):
        if len(v) != nf:
            raise n.error(key, f"expected {nf} entries (one per feature), got {len(v)}")
        return n.integers(key, lo=lo)
    return [_check_int(n, key, v, lo, None)] * nf


def _synthetic(n):
    if n.has("features") and n.has("num_features"):
        raise n.error("num_features", "give features or num_features, not both")
    if n.has("features"):
        features = n.strings("features", nonempty=True)
    else:
        features = [f"C{i}" for i in range(1, n.integer("num_features", 26, lo=1) + 1)]
    nf = len(features)
    s = SyntheticConfig(features=features, num_dense=n.integer("num_dense", 13, lo=0))
    s.vocab = _per_feature(n, "vocab", nf, 1000, 1)
    s.zipf = n.number("zipf", 1.05, lo=0.0)
    s.bag_size = _per_feature(n, "bag_size", nf, 1, 0)
    s.bag_size_min = _per_feature(n, "bag_size_min", nf, None, 0) if n.has("bag_size_min") \
        else list(s.bag_size)
    for i, (lo, hi) in enumerate(zip(s.bag_size_min, s.bag_size)):
        if lo > hi:
            raise n.error("bag_size_min", f"feature {features[i]!r}: {lo} > bag_size {hi}")
    s.positive_rate = n.number("positive_rate", 0.25, lo=0.0, lo_incl=False, hi=1.0, hi_incl=False)
    s.signal = n.number("signal", 2.0, lo=0.0)
    n.finish()
    return s


def _data(n):
    fmt = n.string("format", choices=DATA_FORMATS)
    d = DataConfig(format=fmt)
    for name in ("train", "eval"):
        sn = n.node(name)
        if sn is not None:
            setattr(d, name, _split(sn, fmt))
    if d.train is None and d.eval is None:
        raise n.error("train", "configure at least one split ([data.train] and/or [data.eval])")
    if fmt == "synthetic" and d.eval is not None and d.eval.num_samples is None:
        raise n.error("eval", "synthetic eval data needs num_samples (evaluation is one pass)")
    schema = n.node("schema")
    if (schema is None) == (fmt == "csv"):
        raise n.error("schema", "required for format = \"csv\"" if fmt == "csv"
                      else f"only format = \"csv\" takes a schema, not {fmt!r}")
    if schema is not None:
        d.schema = _schema(schema)
    syn = n.node("synthetic")
    if syn is not None and fmt != "synthetic":
        raise n.error("synthetic", f"only format = \"synthetic\" takes this table, not {fmt!r}")
    if fmt == "synthetic":
        d.synthetic = _synthetic(syn if syn is not None else _Node({}, n.key("synthetic"),
                                                                   n.source))
    b = n.node("bad_lines")
    if b is not None:
        d.bad_lines = BadLinesConfig(b.integer("max_count", 0, lo=0),
                                     b.number("max_ratio", 0.0, lo=0.0, hi=1.0))
        b.finish()
    d.prefetch = n.integer("prefetch", 2, lo=0)
    d.shuffle = n.boolean("shuffle", False)
    d.shuffle_block = n.integer("shuffle_block", 1, lo=1)
    d.seed = n.integer("seed", None, lo=0)
    n.finish()
    return d


def _ps(n):
    p = PsConfig(servers=n.integer("servers", 1, lo=1), groups=n.integer("groups", 1, lo=1))
    p.consistency = n.string("consistency", "bsp", choices=PS_CONSISTENCIES)
    p.staleness = n.integer("staleness", 1 if p.consistency == "ssp" else 0, lo=0)
    if p.consistency == "bsp" and p.staleness != 0:
        raise n.error("staleness", f"consistency \"bsp\" waits every clock (staleness 0), got "
                                   f"{p.staleness}; use consistency = \"ssp\"")
    if p.consistency == "asp":
        p.staleness = None      # asp never waits: any staleness is ignored
    p.placement = n.string("placement", "first", choices=PS_PLACEMENTS)
    p.dense_on_servers = n.boolean("dense_on_servers", True)
    p.timeout_s = n.number("timeout_s", 300.0, lo=0.0, lo_incl=False)
    p.every_clocks_log = n.integer("every_clocks_log", 100, lo=1)
    n.finish()
    return p


def _check_model_tables(root, cfg):
    m, tables = cfg.model, cfg.tables
    names = [t.name for t in tables]
    for i, t in enumerate(tables):
        if names.index(t.name) != i:
            raise root.error(f"tables[{i}].name", f"duplicate table name {t.name!r}")
        if t.pooling == "none":
            raise root.error(f"tables[{i}].pooling",
                             f"model {m.kind!r} needs pooled [batch, dim] embeddings; "
                             f"use \"sum\" or \"mean\"")
    wide = set(m.wide_tables)
    for w in m.wide_tables:
        if w not in names:
            raise root.error("model.wide_tables", f"no table named {w!r} (tables: {names})")
        if tables[names.index(w)].dim != 1:
            raise root.error(f"tables[{names.index(w)}].dim",
                             f"wide table {w!r} must have dim = 1")
    # A feature feeds at most one table per model part (wide/deep for Wide&Deep).
    owner = {}
    known = cfg.data.feature_names()
    for i, t in enumerate(tables):
        part = "wide" if t.name in wide else "deep"
        for j, f in enumerate(t.features):
            if known is not None and f not in known:
                raise root.error(f"tables[{i}].features[{j}]",
                                 f"the {cfg.data.format} data has no feature {f!r} "
                                 f"(it has {known})")
            if (part, f) in owner:
                raise root.error(f"tables[{i}].features[{j}]",
                                 f"feature {f!r} is already in table {owner[(part, f)]!r}")
            owner[(part, f)] = t.name
    # DLRM's dot interaction and DeepFM's FM need one width for the (non-wide) embeddings.
    if m.kind in ("dlrm", "deepfm"):
        deep = [(i, t) for i, t in enumerate(tables) if t.name not in wide]
        if not deep:
            raise root.error("tables", f"model {m.kind!r} needs at least one table that is "
                                       f"not in model.wide_tables")
        i0, t0 = deep[0]
        for i, t in deep:
            if t.dim != t0.dim:
                raise root.error(f"tables[{i}].dim",
                                 f"model {m.kind!r} needs one dim for all its embeddings "
                                 f"(tables[{i0}].dim = {t0.dim}), got {t.dim}")
    num_dense = cfg.data.num_dense()
    if m.kind == "dlrm" and num_dense == 0:
        raise root.error("model.kind", "DLRM needs dense features for its bottom MLP; the data "
                                       "has none")


def parse_config_dict(d, source):
    """Validate ``d`` into the keyword arguments of ``Config`` (without source/text/raw)."""
    root = _Node(d, "", source)
    out = {"seed": root.integer("seed", 0, lo=0)}
    mode = out["mode"] = root.string("mode", "collective", choices=MODES)
    ps = root.node("ps")
    if (ps is None) == (mode == "hybrid"):
        raise root.error("ps", "required with mode = \"hybrid\" (the parameter servers)"
                         if mode == "hybrid" else
                         f"only mode = \"hybrid\" takes parameter servers, not {mode!r}")
    out["ps"] = _ps(ps) if ps is not None else None
    out["overlap"] = root.boolean("overlap", False)
    out["exchange"] = root.string("exchange", "auto", choices=EXCHANGES)
    out["node_group_size"] = root.integer("node_group_size", None, lo=1)
    out["threads"] = root.integer("threads", None, lo=1)
    out["malloc"] = root.string("malloc", "tuned", choices=("tuned", "default"))
    gb, bpr = root.integer("global_batch", None, lo=1), root.integer("batch_per_rank", None, lo=1)
    if (gb is None) == (bpr is None):
        raise root.error("global_batch" if gb is not None else None,
                         "set exactly one of global_batch and batch_per_rank" +
                         (", not both" if gb is not None else " (the batch size)"))
    out["global_batch"], out["batch_per_rank"] = gb, bpr
    out["steps"] = root.integer("steps", None, lo=1)
    out["epochs"] = root.integer("epochs", None, lo=1)
    if out["steps"] is None and out["epochs"] is None:
        raise root.error(None, "set steps and/or epochs (the length of training)")
    out["model"] = _model(root.node("model", required=True))
    out["tables"] = [_table(t) for t in root.nodes("tables")]
    if not out["tables"]:
        raise root.error("tables", "at least one [[tables]] entry is required")
    out["dense_optimizer"] = _optimizer(root, "dense_optimizer", DENSE_OPTIMIZER_KEYS,
                                        fill_all=False)
    data = out["data"] = _data(root.node("data", required=True))
    if data.train is None:
        raise root.error("data.train", "training needs a train split")
    if out["epochs"] is not None and data.format == "synthetic" and data.train.num_samples is None:
        raise root.error("data.train.num_samples", "epochs need a finite synthetic train split")
    e = root.node("eval")
    out["eval"] = EvalConfig()
    if e is not None:
        out["eval"] = EvalConfig(e.integer("interval", 0, lo=0),
                                 e.integer("global_batch", None, lo=1),
                                 e.boolean("at_end", True))
        e.finish()
        if data.eval is None:
            raise root.error("eval", "evaluation needs an eval split ([data.eval])")
    c = root.node("checkpoint")
    out["checkpoint"] = None
    if c is not None:
        directory = c.string("directory")
        if not directory:
            raise c.error("directory", "must not be empty")
        out["checkpoint"] = CheckpointConfig(
            _resolve(directory), c.integer("every_steps", None, lo=1),
            c.number("every_minutes", None, lo=0.0, lo_incl=False), c.integer("keep_last", 3, lo=1),
            c.boolean("resume", False))
        c.finish()
    mt = root.node("metrics")
    out["metrics"] = MetricsConfig()
    if mt is not None:
        path = mt.string("path", None)
        out["metrics"] = MetricsConfig(_resolve(path) if path else None,
                                       mt.integer("every_steps", 10, lo=1))
        mt.finish()
    root.finish()
    cfg = Config(**out)
    _check_model_tables(root, cfg)
    return out


# --------------------------------------------------------------------------- entry points

def config_from_dict(d, source="<dict>", text=None):
    """Validate a parsed config dict into a ``Config``.

    Args:
        d: the dict, as ``tomllib.load`` returns it; it is not modified.
        source: the name used in error messages (a file name, or "<dict>").
        text: the original TOML text, kept as ``Config.text``.

    Raises:
        ConfigError: naming ``source`` and the key path of the first problem found.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the configuration must be a table, got {_kind(d)}")
    return Config(**parse_config_dict(d, source), source=source, text=text, raw=copy.deepcopy(d))


def loads_config(text, source="<string>"):
    """Parse and validate TOML ``text`` (e.g. ``Config.text`` stored in a checkpoint)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return config_from_dict(d, source=source, text=text)


def load_config(path):
    """Read and validate the TOML configuration file at ``path``.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not TOML, or invalid.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    return loads_config(text, source=path)
