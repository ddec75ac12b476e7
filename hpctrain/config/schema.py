"""``[data.schema]``: the column roles of a generic CSV/TSV file (``format = "csv"``)."""
from dataclasses import dataclass, field

from hpctrain.config._node import Node

DENSE_TRANSFORMS = ("none", "log1p", "standardize")


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


def parse_schema(n):
    """Validate ``[data.schema]`` into a ``SchemaConfig``."""
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
        c = Node(d, f"{n.key('dense')}[{i}]", n.source)
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
