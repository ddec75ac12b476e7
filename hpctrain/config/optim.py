"""Optimizer tables: ``tables[i].optimizer`` (sparse) and ``[dense_optimizer]``.

Kinds, hyper-parameters, defaults and ranges are those of the optimizers themselves, so
the config cannot accept what they reject or reject what they accept:

    kinds, which hyper-parameters each reads   hpctrain.sparse.optimizers.HYPERPARAMETERS
                                               hpctrain.dense.optim.HYPERPARAMETERS
    defaults                                   SparseOptimizer's fields (sparse);
                                               hpctrain.dense.optim.DEFAULTS, else
                                               SparseOptimizer's (dense: Adam lr 1e-3)
    ranges (both sides)                        hpctrain.sparse.optimizers.RANGES
    decays of [dense_optimizer.schedule]       hpctrain.dense.schedule.DECAYS

``[dense_optimizer]`` also takes ``clip_norm`` and a ``schedule`` table
(``parse_dense_optimizer``); tables' optimizers take neither.
"""
import dataclasses

from hpctrain.config._node import Node, kind_of
from hpctrain.dense.optim import DEFAULTS as DENSE_DEFAULTS
from hpctrain.dense.optim import HYPERPARAMETERS as DENSE_OPTIMIZER_KEYS
from hpctrain.dense.schedule import DECAYS
from hpctrain.sparse.optimizers import HYPERPARAMETERS as SPARSE_OPTIMIZER_KEYS
from hpctrain.sparse.optimizers import RANGES, SparseOptimizer

SPARSE_OPTIMIZER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SparseOptimizer)}


def parse_optimizer(node, key, kinds, fill_all, extra=None):
    """Validate ``node[key]``, a kind name or a table ``{kind, hyper-parameters}``.

    Args:
        node: the ``Node`` holding the key.
        key: "optimizer" or "dense_optimizer".
        kinds: kind -> the hyper-parameters it reads (``SPARSE_OPTIMIZER_KEYS`` or
            ``DENSE_OPTIMIZER_KEYS``).
        fill_all: return every ``SparseOptimizer`` field (sparse) rather than ``kind``,
            ``lr`` and what the file sets (dense: its own defaults apply to the rest).
        extra: ``(node, out) -> None`` reading further keys of the table into ``out``
            before unknown keys are rejected (``parse_dense_optimizer``).

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
    if extra is not None:
        extra(n, out)
    n.finish()
    return out


#: The keys of each ``[dense_optimizer.schedule]`` decay besides warmup_steps and decay.
SCHEDULE_KEYS = {"none": (), "linear": ("decay_steps", "min_lr"),
                 "cosine": ("decay_steps", "min_lr"), "step": ("step_size", "gamma")}


def parse_dense_optimizer(root, steps):
    """Validate ``[dense_optimizer]``: ``parse_optimizer``'s dict, plus ``clip_norm``
    (a float) and ``schedule`` (``parse_schedule``'s dict) when the file sets them.

    Args:
        root: the top-level ``Node``.
        steps: the run's ``steps`` (None: not set), the default length of a decay.
    """
    def extra(n, out):
        clip = n.number("clip_norm", None, lo=0.0, lo_incl=False)
        if clip is not None:
            out["clip_norm"] = clip
        s = n.node("schedule")
        if s is not None:
            out["schedule"] = parse_schedule(s, out["lr"], steps)
    return parse_optimizer(root, "dense_optimizer", DENSE_OPTIMIZER_KEYS, fill_all=False,
                           extra=extra)


def parse_schedule(s, lr, steps):
    """Validate ``[dense_optimizer.schedule]`` into the keyword arguments of
    ``hpctrain.dense.schedule.LrSchedule`` (without ``lr``).

    ``decay_steps`` of a linear or cosine decay defaults to ``steps - warmup_steps``.
    """
    out = {"warmup_steps": s.integer("warmup_steps", 0, lo=0),
           "decay": s.string("decay", "none", choices=DECAYS)}
    decay, takes = out["decay"], SCHEDULE_KEYS[out["decay"]]
    for k in sorted({k for ks in SCHEDULE_KEYS.values() for k in ks}):
        if s.has(k) and k not in takes:
            raise s.error(k, f"not a key of decay {decay!r} (it takes "
                             f"{', '.join(takes) if takes else 'none besides warmup_steps'})")
    if decay in ("linear", "cosine"):
        ds = s.integer("decay_steps", None, lo=1)
        if ds is None:
            if steps is None:
                raise s.error("decay_steps", "required: the run sets no steps to decay over")
            ds = steps - out["warmup_steps"]
            if ds < 1:
                raise s.error("warmup_steps", f"{out['warmup_steps']} warm-up steps leave none "
                                              f"of the {steps} steps to decay over; set "
                                              f"decay_steps")
        out["decay_steps"] = ds
        out["min_lr"] = s.number("min_lr", 0.0, lo=0.0, hi=lr)
    elif decay == "step":
        out["step_size"] = s.integer("step_size", lo=1)
        out["gamma"] = s.number("gamma", 0.1, lo=0.0, lo_incl=False, hi=1.0)
    s.finish()
    return out
