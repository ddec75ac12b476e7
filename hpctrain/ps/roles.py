"""Who does what in a hybrid job: S server ranks, W worker ranks in G groups.

One MPI world, one program; the role of a rank follows from its world rank::

    world (S + W ranks)
     ├─ servers   server index i = position in ``servers`` (sparse shard i, dense slice i)
     │            server_comm = world.split(0)
     └─ workers   worker index w = position in ``workers`` (reads data slice w of W)
                  worker_comm = world.split(1)
                  group g = w // (W / G), group_comm = worker_comm.split(g)
     p2p between any worker and any server: ``hpctrain.comm.p2p`` over the world

Placement "first": servers are world ranks 0..S-1. Placement "per_node": servers
are spread over the nodes, the first rank of each node first (local rank 0 of
node 0, of node 1, ..., then local rank 1 of node 0, ...), so that with S equal
to the node count every node has one server beside its workers.
"""
import socket
from dataclasses import dataclass

from hpctrain.comm.topology import ranks_per_host
from hpctrain.errors import ConfigError


def server_ranks(placement, world_size, servers, hosts=None):
    """World ranks of the servers, in server-index order.

    Args:
        placement: "first" or "per_node".
        world_size: ranks in the world.
        servers: S.
        hosts: processor name of every world rank (needed for "per_node").
    """
    if placement == "first":
        return list(range(servers))
    if placement == "per_node":
        per_host = list(ranks_per_host(hosts).values())
        order = [v[i] for i in range(max(len(v) for v in per_host))
                 for v in per_host if i < len(v)]
        return order[:servers]
    raise ConfigError(f"ps.placement: unknown placement {placement!r} "
                      f"(valid: \"first\", \"per_node\")")


@dataclass
class Roles:
    """This rank's place in a hybrid job (``split_roles``).

    Attributes:
        world: the world communicator.
        servers, workers: world ranks of the servers / workers, in index order.
        groups: G; workers_per_group: W / G.
        server_index: this rank's server index (None on workers).
        worker_index: this rank's worker index (None on servers).
        group: this worker's group (None on servers).
        role_comm: server_comm on servers, worker_comm on workers.
        group_comm: the worker's group (None on servers).
    """
    world: object
    servers: list
    workers: list
    groups: int
    workers_per_group: int
    server_index: int = None
    worker_index: int = None
    group: int = None
    role_comm: object = None
    group_comm: object = None

    @property
    def is_server(self):
        return self.server_index is not None

    @property
    def num_servers(self):
        return len(self.servers)

    @property
    def num_workers(self):
        return len(self.workers)

    def group_of(self, worker):
        """The group of worker index ``worker``."""
        return worker // self.workers_per_group

    def group_workers(self, group):
        """Worker indices of ``group``, in order."""
        k = self.workers_per_group
        return list(range(group * k, (group + 1) * k))

    def leader(self, group):
        """Worker index of ``group``'s leader (its first worker)."""
        return group * self.workers_per_group

    def describe(self):
        if self.is_server:
            return f"server {self.server_index} (world rank {self.servers[self.server_index]})"
        return (f"worker {self.worker_index} of group {self.group} "
                f"(world rank {self.workers[self.worker_index]})")


def split_roles(world, servers, groups, placement="first"):
    """Split ``world`` into ``servers`` servers and ``groups`` worker groups (collective).

    ``Config.ps_layout`` checks the same numbers against the config and names the
    key; this function only refuses a layout that cannot exist.

    Raises:
        ValueError: no rank left for workers, or workers that do not split into groups.
    """
    workers = world.size - servers
    if servers < 1 or workers < 1 or groups < 1 or workers % groups:
        raise ValueError(f"cannot split a world of {world.size} ranks into {servers} servers "
                         f"and {groups} equal worker groups")
    per_group = workers // groups
    hosts = getattr(world, "hosts", None)
    if placement == "per_node" and hosts is None:
        hosts = world.allgather_object(socket.gethostname())
    srv = server_ranks(placement, world.size, servers, hosts)
    taken = set(srv)
    wrk = [r for r in range(world.size) if r not in taken]
    roles = Roles(world, srv, wrk, groups, per_group)
    me = world.rank
    if me in taken:
        roles.server_index = srv.index(me)
        roles.role_comm = world.split(0, roles.server_index)
        return roles
    roles.worker_index = wrk.index(me)
    roles.group = roles.worker_index // per_group
    roles.role_comm = world.split(1, roles.worker_index)
    roles.group_comm = roles.role_comm.split(roles.group, roles.worker_index)
    return roles
