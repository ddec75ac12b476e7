"""Turn a validated ``Config`` into the pieces a trainer composes.

Only this module (with ``loop``) knows both the sparse and the dense side: the
feature order that links a pooled embedding to a model input is decided here.
"""
from collections import Counter

import numpy as np

from hpctrain.errors import ConfigError


def qualified_names(cfg):
    """Dict ``(table, feature) -> name`` on the embedding side.

    A data feature looked up in several tables (e.g. Wide&Deep's wide and deep
    parts) is ``table.feature`` there; any other keeps its own name.
    """
    counts = Counter(f for t in cfg.tables for f in t.features)
    return {(t.name, f): f"{t.name}.{f}" if counts[f] > 1 else f
            for t in cfg.tables for f in t.features}


class BatchFeatures:
    """Turns a reader ``Batch`` into the ``JaggedBatch`` the embedding collection expects.

    A feature read by several tables is repeated under each qualified name, so
    every table sees its own copy of the ids (a feature belongs to one table on
    the sparse side).
    """

    def __init__(self, cfg):
        self.pairs = [(name, f) for (_, f), name in qualified_names(cfg).items()]
        self.shared = any(name != f for name, f in self.pairs)

    def __call__(self, batch):
        if not self.shared:
            return batch.jagged()
        from hpctrain.sparse.jagged import JaggedBatch
        b, names = batch.size, list(batch.features)
        lengths = np.asarray(batch.lengths, dtype=np.int64).reshape(len(names), b)
        starts = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1), out=starts[1:])
        vals, lens = [], []
        for _, f in self.pairs:
            i = names.index(f)
            vals.append(batch.values[starts[i]:starts[i + 1]])
            lens.append(lengths[i])
        return JaggedBatch([q for q, _ in self.pairs], np.concatenate(vals),
                           np.concatenate(lens))


def table_specs(cfg):
    """``TableSpec`` list for ``cfg.tables`` (table ids are the list positions)."""
    from hpctrain.sparse.optimizers import SparseOptimizer
    from hpctrain.sparse.policies import Admission, Eviction
    from hpctrain.sparse.spec import TableSpec
    names = qualified_names(cfg)
    specs = []
    for i, t in enumerate(cfg.tables):
        specs.append(TableSpec(
            name=t.name, dim=t.dim, features=[names[t.name, f] for f in t.features],
            optimizer=SparseOptimizer(**t.optimizer),
            admission=Admission(**t.admission) if t.admission else None,
            eviction=Eviction(**t.eviction) if t.eviction else None,
            pooling=t.pooling, init=t.init, init_scale=t.init_scale, table_id=i,
            row_dtype=t.row_dtype, reserve_rows=t.reserve_rows))
    return specs


def feature_order(cfg):
    """``(features, dims)``: the order in which pooled embeddings enter the model.

    DLRM: every feature in table order. Wide&Deep: the wide tables' features, then
    the deep ones. DeepFM: the FM features, then the first-order (wide) ones.
    """
    wide = set(cfg.model.wide_tables or ())
    unknown = wide - {t.name for t in cfg.tables}
    if unknown:
        raise ConfigError(f"{cfg.source}: model.wide_tables: no table named {sorted(unknown)}")
    for t in cfg.tables:
        if t.pooling == "none":
            raise ConfigError(f"{cfg.source}: tables: table {t.name!r} has pooling = \"none\"; "
                              f"the {cfg.model.kind} model takes one pooled vector per feature "
                              f"(use \"sum\" or \"mean\")")
    names = qualified_names(cfg)
    wide_feats = [(names[t.name, f], t.dim) for t in cfg.tables if t.name in wide
                  for f in t.features]
    deep_feats = [(names[t.name, f], t.dim) for t in cfg.tables if t.name not in wide
                  for f in t.features]
    if cfg.model.kind == "wide_deep":
        order = wide_feats + deep_feats
    else:
        order = deep_feats + wide_feats
    return [f for f, _ in order], [d for _, d in order], len(wide_feats)


def build_model(cfg, num_dense, xp="numpy"):
    """The dense model of ``cfg.model`` for ``num_dense`` dense features."""
    from hpctrain.dense.models import DLRM, DeepFM, WideAndDeep
    m = cfg.model
    _, dims, n_wide = feature_order(cfg)
    try:
        if m.kind == "dlrm":
            return DLRM(num_dense, dims, bottom=m.bottom, top=m.top, xp=xp, seed=cfg.seed,
                        self_interaction=m.self_interaction)
        if m.kind == "wide_deep":
            return WideAndDeep(num_dense, dims[:n_wide], dims[n_wide:], hidden=m.hidden, xp=xp,
                               seed=cfg.seed, dropout=m.dropout)
        n_fm = len(dims) - n_wide
        return DeepFM(num_dense, dims[:n_fm], hidden=m.hidden, wide_dims=dims[n_fm:], xp=xp,
                      seed=cfg.seed, dropout=m.dropout)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: model: {e}") from None


def dense_optimizer(cfg, params):
    """The dense optimizer of ``cfg.dense_optimizer`` over ``params``, with its learning-rate
    ``schedule`` attached when one is configured (``clip_norm`` is the trainer's)."""
    from hpctrain.dense.optim import make_optimizer
    from hpctrain.dense.schedule import LrSchedule
    hyper = dict(cfg.dense_optimizer)
    kind = hyper.pop("kind")
    schedule = hyper.pop("schedule", None)
    hyper.pop("clip_norm", None)
    try:
        opt = make_optimizer(kind, params, **hyper)
        if schedule is not None:
            opt.schedule = LrSchedule(opt.lr, **schedule)
        return opt
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg.source}: dense_optimizer: {e}") from None
