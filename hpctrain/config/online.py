"""``[online]``: delta exports for serving and progressive validation (docs/online.md).

    [online]   directory, delta_every_steps, dense_every, keep_last, progressive
"""
from dataclasses import dataclass

from hpctrain.config._node import resolve


@dataclass
class OnlineConfig:
    """Deltas every ``delta_every_steps`` steps into ``directory``; dense weights in every
    ``dense_every``-th of them; ``keep_last`` newest deltas kept (None: all);
    ``progressive``: evaluate each batch before training on it (a metric of online runs)."""
    directory: str
    delta_every_steps: int
    dense_every: int = 1
    keep_last: int = None
    progressive: bool = True


def parse_online(n):
    """Validate ``[online]`` into an ``OnlineConfig`` (None: no delta export)."""
    if n is None:
        return None
    directory = n.string("directory")
    if not directory:
        raise n.error("directory", "must not be empty")
    out = OnlineConfig(resolve(directory), n.integer("delta_every_steps", lo=1),
                       n.integer("dense_every", 1, lo=1), n.integer("keep_last", None, lo=1),
                       n.boolean("progressive", True))
    n.finish()
    return out
