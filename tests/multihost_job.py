"""Rank side of tests/test_multihost.py: train across emulated hosts, record what crossed them.

    mpiexec -n N python -m mpi4py tests/multihost_job.py OUT.json

started with the hosts of benchmarks/multihost/hosts.sh (``hosts.sh env R`` exported). Every
rank trains the small synthetic DLRM of ``trainer_configs`` (4096 samples a step) on the
world; rank 0 then trains it alone (COMM_SELF, the single-host reference) and writes OUT.json:

    losses, reference_losses      per step
    ranks: one dict per rank      host, local_rank, local_size, stats() of the store,
                                  window_members (world ranks sharing its shared window),
                                  payload: per peer, bytes its lookups sent (counts, ids,
                                  gradients) and rows they received,
                                  eth0: bytes its host's link sent / received during the fit
                                  (read by local rank 0 only)
"""
import io
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hpctrain.comm import create_communicator  # noqa: E402
from hpctrain.train.loop import Trainer  # noqa: E402
from hpctrain.config import loads_config  # noqa: E402
from trainer_configs import SMALL_DLRM  # noqa: E402

STEPS = 6
#: samples per step: large enough that the rows crossing hosts outweigh what MPI itself
#: sends between them (connection set-up, barriers, the dense allreduce)
GLOBAL_BATCH = 4096


def config():
    """trainer_configs' small DLRM with a larger global batch."""
    text = SMALL_DLRM.replace("global_batch = 64", f"global_batch = {GLOBAL_BATCH}")
    assert text != SMALL_DLRM, "trainer_configs.SMALL_DLRM no longer says global_batch = 64"
    return loads_config(text.format(steps=STEPS, overlap="false", sparse_opt="adam",
                                    eval_at_end="false", extra=""), source="multihost.toml")


def link_bytes(dev="eth0"):
    """(tx, rx) bytes of this host's link (None outside a network namespace with ``dev``)."""
    try:
        return tuple(int(open(f"/sys/class/net/{dev}/statistics/{k}_bytes").read())
                     for k in ("tx", "rx"))
    except OSError:
        return None


def count_payload(store, size):
    """Wrap ``store.start_lookup`` to add up, per peer, what each training lookup moves.

    From the ticket's route (requester side): ``sent[p]``, bytes sent to owner ``p``
    (per-table counts, ids, and later the rows' gradients), and ``rows[p]``, bytes of rows
    owner ``p`` sends back. The same counts reach an owner on the same host through the
    shared window, one on another host by Alltoallv.
    """
    payload = {"sent": np.zeros(size, dtype=np.int64), "rows": np.zeros(size, dtype=np.int64)}
    start = store.start_lookup

    def start_lookup(batch, step, train=True):
        ticket = start(batch, step, train)
        if train:
            r = ticket.route
            payload["sent"] += 8 * r.per_table.shape[1] + 8 * r.to_peer + 4 * r.ask_elems
            payload["rows"] += 4 * r.ask_elems
        return ticket

    store.start_lookup = start_lookup
    return payload


def window_members(store):
    """World ranks sharing this rank's shared window (``stats()["window_ranks"]``)."""
    return store.stats()["window_ranks"]


def main(out):
    world = MPI.COMM_WORLD
    comm = create_communicator("mpi")
    cfg = config()
    trainer = Trainer(cfg, comm, stream=io.StringIO())
    payload = count_payload(trainer.emb, comm.size)
    world.Barrier()
    before = link_bytes() if comm.local_rank == 0 else None
    trainer.fit()
    world.Barrier()
    after = link_bytes() if comm.local_rank == 0 else None
    eth0 = None
    if before is not None and after is not None:
        eth0 = {"tx": after[0] - before[0], "rx": after[1] - before[1]}
    mine = {"rank": comm.rank, "host": comm.hosts[comm.rank], "local_rank": comm.local_rank,
            "local_size": comm.local_size, "stats": trainer.emb.stats(),
            "window_members": window_members(trainer.emb),
            "payload": {k: v.tolist() for k, v in payload.items()}, "eth0": eth0}
    ranks = world.gather(mine, root=0)
    if world.rank == 0:
        ref = Trainer(cfg, create_communicator("mpi", mpi_comm=MPI.COMM_SELF),
                      stream=io.StringIO())
        ref.fit()
        with open(out, "w") as f:
            json.dump({"world_size": world.size, "losses": [float(x) for x in trainer.losses],
                       "reference_losses": [float(x) for x in ref.losses], "ranks": ranks},
                      f, indent=1)
    world.Barrier()


if __name__ == "__main__":
    main(sys.argv[1])
