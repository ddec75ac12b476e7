"""``[data]``: where samples come from and how they are read (``hpctrain.data``).

    [data]             format, prefetch, shuffle, shuffle_block, seed
    [data.train]       paths | num_samples, rows      (also [data.eval])
    [data.schema]      csv only, see hpctrain.config.schema
    [data.synthetic]   synthetic only
    [data.bad_lines]   max_count, max_ratio
    [data.stream]      stream and jetstream: poll_seconds, idle_report_seconds
    [data.jetstream]   jetstream only: url, stream, subject, durable, features, num_dense
"""
from dataclasses import dataclass, field

from hpctrain.config._node import Node, check_int
from hpctrain.config.schema import SchemaConfig, parse_schema
from hpctrain.data.parse import CRITEO_DENSE, CRITEO_FEATURES
from hpctrain.errors import ConfigError

DATA_FORMATS = ("criteo", "csv", "hdf5", "synthetic", "stream", "jetstream")
STREAM_FORMATS = ("stream", "jetstream")


@dataclass
class SplitConfig:
    """One split of the data: files (text/HDF5), a row range, or a synthetic sample count."""
    paths: list = field(default_factory=list)
    rows: tuple = None
    num_samples: int = None


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
class StreamConfig:
    """A segment stream (``hpctrain.data.stream``): how often an idle stream is looked at
    again, and how often the trainer reports that it waits."""
    poll_seconds: float = 0.2
    idle_report_seconds: float = 10.0


@dataclass
class JetStreamConfig:
    """A NATS JetStream subject as a stream (``hpctrain.data.jetstream``)."""
    stream: str
    subject: str
    features: list
    num_dense: int = 0
    url: str = "nats://127.0.0.1:4222"
    durable: str = "hpctrain"


@dataclass
class DataConfig:
    """Where samples come from and how they are read."""
    format: str
    train: SplitConfig = None
    eval: SplitConfig = None
    schema: SchemaConfig = None
    synthetic: SyntheticConfig = None
    bad_lines: BadLinesConfig = field(default_factory=BadLinesConfig)
    stream: StreamConfig = None
    jetstream: JetStreamConfig = None
    prefetch: int = 2
    shuffle: bool = False
    shuffle_block: int = 1
    seed: int = None

    def feature_names(self):
        """Sparse feature names the reader yields, or None when only the files know (hdf5)."""
        if self.format == "criteo":
            return list(CRITEO_FEATURES)
        if self.format == "csv":
            return self.schema.feature_names()
        if self.format == "synthetic":
            return list(self.synthetic.features)
        if self.format == "jetstream":
            return list(self.jetstream.features)
        return None

    def num_dense(self):
        """Number of dense features the reader yields, or None when only the files know."""
        if self.format == "criteo":
            return len(CRITEO_DENSE)
        if self.format == "csv":
            return len(self.schema.dense)
        if self.format == "synthetic":
            return self.synthetic.num_dense
        if self.format == "jetstream":
            return self.jetstream.num_dense
        return None

    def split(self, name):
        """The ``SplitConfig`` for "train" or "eval" (ValueError if unknown or not configured)."""
        if name not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {name!r}")
        s = getattr(self, name)
        if s is None:
            raise ConfigError(f"data.{name}: this split is not configured")
        return s


def _split(n, fmt):
    s = SplitConfig()
    if fmt == "synthetic":
        if n.has("paths"):
            raise n.error("paths", "synthetic data has no files; set num_samples")
        s.num_samples = n.integer("num_samples", None, lo=1, hi=1 << 62)
    elif fmt == "jetstream":
        if n.has("paths") or n.has("rows") or n.has("num_samples"):
            raise n.error(next(k for k in ("paths", "rows", "num_samples") if n.has(k)),
                          "a JetStream source is described by [data.jetstream]")
    elif fmt == "stream":
        s.paths = n.paths("paths")
        if len(s.paths) != 1:
            raise n.error("paths", f"a stream is one directory, got {len(s.paths)} paths")
        if n.has("rows") or n.has("num_samples"):
            raise n.error("rows" if n.has("rows") else "num_samples",
                          "a stream is read from its offset on; it has no rows or num_samples")
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


def _per_feature(n, key, nf, default, lo):
    v = n.raw(key, default)
    if isinstance(v, list):
        if len(v) != nf:
            raise n.error(key, f"expected {nf} entries (one per feature), got {len(v)}")
        return n.integers(key, lo=lo)
    return [check_int(n, key, v, lo, None)] * nf


def _synthetic(n):
    if n.has("features") and n.has("num_features"):
        raise n.error("num_features", "give features or num_features, not both")
    if n.has("features"):
        features = n.strings("features", nonempty=True)
    else:
        features = [f"C{i}" for i in range(1, n.integer("num_features", 26, lo=1, hi=1 << 16) + 1)]
    nf = len(features)
    s = SyntheticConfig(features=features, num_dense=n.integer("num_dense", 13, lo=0, hi=1 << 16))
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


def parse_data(n):
    """Validate ``[data]`` into a ``DataConfig``."""
    fmt = n.string("format", choices=DATA_FORMATS)
    d = DataConfig(format=fmt)
    for name in ("train", "eval"):
        sn = n.node(name)
        if sn is not None:
            setattr(d, name, _split(sn, fmt))
    if d.train is None and d.eval is None and fmt != "jetstream":
        raise n.error("train", "configure at least one split ([data.train] and/or [data.eval])")
    if fmt == "synthetic" and d.eval is not None and d.eval.num_samples is None:
        raise n.error("eval", "synthetic eval data needs num_samples (evaluation is one pass)")
    schema = n.node("schema")
    if (schema is None) == (fmt == "csv"):
        raise n.error("schema", "required for format = \"csv\"" if fmt == "csv"
                      else f"only format = \"csv\" takes a schema, not {fmt!r}")
    if schema is not None:
        d.schema = parse_schema(schema)
    syn = n.node("synthetic")
    if syn is not None and fmt != "synthetic":
        raise n.error("synthetic", f"only format = \"synthetic\" takes this table, not {fmt!r}")
    if fmt == "synthetic":
        d.synthetic = _synthetic(syn if syn is not None
                                 else Node({}, n.key("synthetic"), n.source))
    st = n.node("stream")
    if st is not None and fmt not in STREAM_FORMATS:
        raise n.error("stream", f"only format = \"stream\" or \"jetstream\" takes this table, "
                                f"not {fmt!r}")
    js = n.node("jetstream")
    if (js is None) == (fmt == "jetstream"):
        raise n.error("jetstream", "required for format = \"jetstream\"" if fmt == "jetstream"
                      else f"only format = \"jetstream\" takes this table, not {fmt!r}")
    if js is not None:
        d.jetstream = JetStreamConfig(
            js.string("stream"), js.string("subject"), js.strings("features", nonempty=True),
            js.integer("num_dense", 0, lo=0), js.string("url", "nats://127.0.0.1:4222"),
            js.string("durable", "hpctrain"))
        js.finish()
        if d.train is None:
            d.train = SplitConfig()
    if fmt in STREAM_FORMATS:
        if d.eval is not None:
            raise n.error("eval", "a stream has no eval split; online runs are measured by "
                                  "progressive validation ([online] progressive)")
        d.stream = StreamConfig()
        if st is not None:
            d.stream = StreamConfig(st.number("poll_seconds", 0.2, lo=0.0, lo_incl=False),
                                    st.number("idle_report_seconds", 10.0, lo=0.0,
                                              lo_incl=False))
            st.finish()
    b = n.node("bad_lines")
    if b is not None:
        d.bad_lines = BadLinesConfig(b.integer("max_count", 0, lo=0),
                                     b.number("max_ratio", 0.0, lo=0.0, hi=1.0))
        b.finish()
    d.prefetch = n.integer("prefetch", 2, lo=0, hi=1024)
    d.shuffle = n.boolean("shuffle", False)
    d.shuffle_block = n.integer("shuffle_block", 1, lo=1)
    d.seed = n.integer("seed", None, lo=0)
    n.finish()
    return d
