"""Optimizer tables: ``tables[i].optimizer`` (sparse) and ``[dense_optimizer]``.

Kinds, hyper-parameters, defaults and ranges are those of the optimizers themselves, so
the config cannot accept what they reject or reject what they accept:

    kinds, which hyper-parameters each reads   hpctrain.sparse.optimizers.HYPERPARAMETERS
                                               hpctrain.dense.optim.HYPERPARAMETERS
    defaults                                   SparseOptimizer's fields (sparse);
                                               hpctrain.dense.optim.DEFAULTS, else
                                               SparseOptimizer's (dense: Adam lr 1e-3)
    ranges (both sides)                        hpctrain.sparse.optimizers.RANGES
"""
import dataclasses

from hpctrain.config._node import Node, kind_of
from hpctrain.dense.optim import DEFAULTS as DENSE_DEFAULTS
from hpctrain.dense.optim import HYPERPARAMETERS as DENSE_OPTIMIZER_KEYS
from hpctrain.sparse.optimizers import HYPERPARAMETERS as SPARSE_OPTIMIZER_KEYS
from hpctrain.sparse.optimizers import RANGES, SparseOptimizer

SPARSE_OPTIMIZER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SparseOptimizer)}


def parse_optimizer(node, key, kinds, fill_all):
    """Validate ``node[key]``, a kind name or a table ``{kind, hyper-parameters}``.

    Args:
        node: the ``Node`` holding the key.
        key: "optimizer" or "dense_optimizer".
        kinds: kind -> the hyper-parameters it reads (``SPARSE_OPTIMIZER_KEYS`` or
            ``DENSE_OPTIMIZER_KEYS``).
        fill_all: return every ``SparseOptimizer`` field (sparse) rather than ``kind``,
            ``lr`` and what the file sets (dense: its own defaults apply to the rest).

    Returns:
        A dict ``{"kind": ..., name: float, ...}``.
    """
    v = node.raw(key, {"kind": "adagrad"})
    if isinstance(v, str):
        v = {"kind": v}
    if not isinstance(v, dict):
        raise node.error(key, f"expected an optimizer name or table, got {kind_of(v)} {v!r}")
    n = Node(v, node.key(key), node.source)
    kind = n.string("kind", choices=tuple(kinds))
    allowed = kinds[kind]
    for k in v:
        if k != "kind" and k in RANGES and k not in allowed:
            raise n.error(k, f"not a hyper-parameter of optimizer {kind!r} "
                             f"(it takes {', '.join(allowed)})")
    out = dict(SPARSE_OPTIMIZER_DEFAULTS) if fill_all else {}
    out["kind"] = kind
    for k in allowed:
        lo, lo_incl, hi, hi_incl = RANGES[k]
        if fill_all or k == "lr" or k in v:
            default = SPARSE_OPTIMIZER_DEFAULTS[k]
            if not fill_all:   # dense: the optimizer's own default where it declares one
                default = DENSE_DEFAULTS.get(kind, {}).get(k, default)
            out[k] = n.number(k, default, lo, lo_incl, hi, hi_incl)
    n.finish()
    return out
