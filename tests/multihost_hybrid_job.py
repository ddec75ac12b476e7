"""Rank side of tests/test_multihost.py's hybrid layouts: servers and workers on emulated hosts.

    mpiexec -n N python -m mpi4py tests/multihost_hybrid_job.py OUT.json SERVERS GROUPS PLACEMENT

Every rank runs the hybrid job of ``hybrid_configs.small`` (BSP, ``s = 0``) with ``[ps]``
servers, groups and placement from the arguments. With one group the workers then train the
collective trainer on their own communicator (the run the hybrid one is bitwise equal to).
Rank 0 writes OUT.json:

    ranks: one dict per world rank   rank, host, role ("server" / "worker"), worker index,
                                     group, losses, loss_parts (workers), p2p_sent: bytes
                                     this rank's hybrid messages sent to each world rank,
                                     eth0: bytes its host's link sent / received during the
                                     hybrid run (read by the host's first rank only)
    collective_losses               the workers' collective run (one group only, else null)
"""
import io
import json
import os
import socket
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hpctrain.comm import create_communicator  # noqa: E402
from hpctrain.train.hybrid import HybridTrainer, run_server, setup_hybrid  # noqa: E402
from hpctrain.train.loop import Trainer  # noqa: E402
from hybrid_configs import small  # noqa: E402
from multihost_job import link_bytes  # noqa: E402

STEPS = 6


def count_sends(p2p, size):
    """Wrap ``p2p.send`` to add up the packed bytes sent to each world rank."""
    sent = np.zeros(size, dtype=np.int64)
    send = p2p.send

    def counted(dest, tag, header, arrays=()):
        handle = send(dest, tag, header, arrays)
        sent[dest] += handle.nbytes
        return handle

    p2p.send = counted
    return sent


def main(out, servers, groups, placement):
    world = MPI.COMM_WORLD
    comm = create_communicator("mpi")
    cfg = small("hybrid", steps=STEPS, servers=servers, groups=groups)
    cfg.ps.placement = placement
    roles, p2p = setup_hybrid(cfg, comm)
    sent = count_sends(p2p, world.size)
    first_on_host = comm.local_rank == 0
    world.Barrier()
    before = link_bytes() if first_on_host else None
    mine = {"rank": world.rank, "host": socket.gethostname()}
    if roles.is_server:
        run_server(cfg, roles, p2p, stream=io.StringIO())
        mine.update(role="server", index=roles.server_index)
    else:
        tr = HybridTrainer(cfg, roles, p2p, stream=io.StringIO())
        tr.fit()
        tr.close()
        mine.update(role="worker", index=roles.worker_index, group=roles.group,
                    losses=[float(x) for x in tr.losses],
                    loss_parts=np.asarray(tr.loss_parts, dtype=np.float64).tolist())
    p2p.close()
    world.Barrier()
    after = link_bytes() if first_on_host else None
    mine["eth0"] = None
    if before is not None and after is not None:
        mine["eth0"] = {"tx": after[0] - before[0], "rx": after[1] - before[1]}
    mine["p2p_sent"] = sent.tolist()
    collective = None
    if groups == 1:
        sub = world.Split(1 if not roles.is_server else MPI.UNDEFINED, world.rank)
        if sub != MPI.COMM_NULL:
            ref = Trainer(small(steps=STEPS), create_communicator("mpi", mpi_comm=sub),
                          stream=io.StringIO())
            ref.fit()
            collective = [float(x) for x in ref.losses]
    ranks = world.gather(mine, root=0)
    collective = [c for c in world.gather(collective, root=0) or [] if c is not None]
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": world.size, "ranks": ranks,
                       "collective_losses": collective[0] if collective else None}, f, indent=1)
    world.Barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
