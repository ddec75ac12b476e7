"""``[ps]``: the parameter servers of mode = "hybrid" (``hpctrain.ps``).

A world of ``W`` ranks is split into ``servers`` parameter-server ranks and
``W - servers`` workers, and the workers into ``groups`` equal groups (``ps_layout``)::

    W = servers + workers,   workers = groups * workers_per_group
    W = 7, servers = 1, groups = 2  ->  (1, 6, 3)

Only workers take batches: ``Config.batch_sizes(workers)`` splits the batch over them.
"""
from dataclasses import dataclass

from hpctrain.errors import ConfigError

PS_CONSISTENCIES = ("bsp", "ssp", "asp")
PS_PLACEMENTS = ("first", "per_node")


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


def parse_ps(n):
    """Validate ``[ps]`` into a ``PsConfig``."""
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


def ps_layout(ps, world_size, source):
    """``(servers, workers, workers_per_group)`` of ``ps`` on ``world_size`` ranks.

    Raises:
        ConfigError: no rank left for workers (``ps.servers``), or the workers do not split
            into ``ps.groups`` equal groups (``ps.groups``); ``source`` names the file.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    servers, groups = ps.servers, ps.groups
    workers = world_size - servers
    if workers < 1:
        raise ConfigError(f"{source}: ps.servers: {servers} servers leave no worker on a world "
                          f"of {world_size} ranks (servers must be < world size)")
    if workers % groups:
        raise ConfigError(f"{source}: ps.groups: world {world_size} - servers {servers} = "
                          f"{workers} workers do not split into {groups} equal groups")
    return servers, workers, workers // groups
