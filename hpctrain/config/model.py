"""``[model]``: the dense model (``hpctrain.dense.models``), and how it must fit the tables.

``check_model_tables`` runs once every section is parsed: the model decides which tables
it can use (wide/deep parts, one embedding width for DLRM's and DeepFM's interactions).
"""
from dataclasses import dataclass, field

MODEL_KINDS = ("dlrm", "wide_deep", "deepfm")


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


def parse_model(n):
    """Validate ``[model]`` into a ``ModelConfig``."""
    kind = n.string("kind", choices=MODEL_KINDS)
    own = {"dlrm": ("bottom", "top", "self_interaction"),
           "wide_deep": ("hidden", "wide_tables", "dropout"),
           "deepfm": ("hidden", "wide_tables", "dropout")}[kind]
    for k in ("bottom", "top", "self_interaction", "hidden", "wide_tables", "dropout"):
        if k in n.data and k not in own:
            raise n.error(k, f"not a parameter of model {kind!r} (it takes {', '.join(own)})")
    m = ModelConfig(kind=kind)
    if kind == "dlrm":
        m.bottom = n.integers("bottom", [512, 256, 64], lo=1, hi=1 << 20)
        m.top = n.integers("top", [512, 256, 1], lo=1, hi=1 << 20)
        if m.top[-1] != 1:
            raise n.error("top", f"the last layer must have 1 output (the logit), got {m.top}")
        m.self_interaction = n.boolean("self_interaction", False)
    else:
        m.hidden = n.integers("hidden", [1024, 512, 256] if kind == "wide_deep"
                              else [400, 400, 400], lo=1, nonempty=False, hi=1 << 20)
        m.wide_tables = n.strings("wide_tables", [])
        m.dropout = n.number("dropout", 0.0, lo=0.0, hi=1.0, hi_incl=False)
    n.finish()
    return m


def check_model_tables(root, cfg):
    """Check that ``cfg``'s tables fit its model and its data; errors name keys of ``root``."""
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
