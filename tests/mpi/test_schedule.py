"""Dense lr schedules, gradient clipping and early stopping at any world size, and in hybrid
mode (one group, BSP: bit for bit the collective trainer on the same workers)."""
import io
import os

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.checkpoint.manager import read_best
from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.train.hybrid import HybridTrainer, run_server, setup_hybrid
from hpctrain.train.loop import Trainer
from hybrid_configs import small
from test_schedule import SCHEDULED, scheduled_config

pytestmark = pytest.mark.mpi

SIZE = MPI.COMM_WORLD.size
WORKERS = 1 << max(SIZE - 1, 1).bit_length() - 1     # as tests/mpi/test_hybrid.py
SERVERS = SIZE - WORKERS
needs_two = pytest.mark.skipif(SIZE < 2, reason="hybrid mode needs a server and a worker")


@pytest.fixture(scope="module")
def comm():
    return create_communicator("mpi")


def _single():
    return create_communicator("mpi", mpi_comm=MPI.COMM_SELF)


def test_schedule_and_clipping_keep_the_losses_of_one_rank(comm):
    cfg = scheduled_config(steps=8)
    dist = Trainer(cfg, comm, stream=io.StringIO())
    dist.fit()
    ref = Trainer(cfg, _single(), stream=io.StringIO())
    ref.fit()
    assert ref._grad_norm is not None and dist._grad_norm == pytest.approx(ref._grad_norm,
                                                                           rel=1e-4)
    np.testing.assert_allclose(dist.losses, ref.losses, rtol=1e-5)
    np.testing.assert_allclose(dist.model.params.data, ref.model.params.data, rtol=1e-4,
                               atol=1e-6)
    # every rank clipped alike: the dense parameters are the same bits everywhere
    from hpctrain.dense.parallel import check_parameters_identical
    check_parameters_identical(dist.model.params, comm)


def test_resume_with_a_schedule_is_exact(comm, shared_dir):
    full = Trainer(scheduled_config(os.path.join(shared_dir, "full"), steps=8), comm,
                   stream=io.StringIO())
    full.fit()
    cfg = scheduled_config(os.path.join(shared_dir, "cut"), steps=8)
    first = Trainer(cfg, comm, stream=io.StringIO())
    first.fit(max_steps=3)
    second = Trainer(cfg, comm, stream=io.StringIO())
    second.fit(resume=True)
    assert first.losses + second.losses == full.losses
    assert np.array_equal(second.model.params.data, full.model.params.data)


def _with(cfg, dense=SCHEDULED, eval_extra="", ckpt=None):
    text = cfg.text.replace('[dense_optimizer]\nkind = "adam"\nlr = 0.01\n', dense)
    text = text.replace("[eval]\nat_end = true\n", f"[eval]\nat_end = true\n{eval_extra}\n")
    if ckpt:
        text += f'\n[checkpoint]\ndirectory = "{ckpt}"\nkeep_last = 1\n'
    return loads_config(text, source="schedule_hybrid.toml")


def _collective(world, cfg):
    """The collective trainer on the workers' number of ranks (the servers sit it out)."""
    sub = world.split(0 if world.rank >= SERVERS else None, world.rank)
    mine = None
    if sub is not None:
        tr = Trainer(cfg, sub, stream=io.StringIO())
        res = tr.fit()
        mine = (tr.losses, np.array(tr.model.params.data), res)
    return [p for p in world.allgather_object(mine) if p is not None][0]


def _hybrid(world, cfg):
    """Worker 0's (losses, dense parameters, fit result) of a hybrid run."""
    roles, p2p = setup_hybrid(cfg, world)
    mine = None
    if roles.is_server:
        run_server(cfg, roles, p2p, stream=io.StringIO())
    else:
        tr = HybridTrainer(cfg, roles, p2p, stream=io.StringIO())
        res = tr.fit()
        tr.close()
        if roles.worker_index == 0:
            mine = (tr.losses, np.array(tr.model.params.data), res)
    p2p.close()
    return [p for p in world.allgather_object(mine) if p is not None][0]


@needs_two
@pytest.mark.parametrize("dense_on_servers", [True, False])
def test_hybrid_schedule_and_clipping_are_the_collective_run(comm, dense_on_servers):
    """Through the servers the group's gradient is clipped before the push and the
    servers' optimizers take the lr of each clock; else the workers do as collective."""
    ref = _collective(comm, _with(small()))
    run = _hybrid(comm, _with(small("hybrid", servers=SERVERS, groups=1,
                                    dense_on_servers=dense_on_servers)))
    assert run[0] == ref[0]
    assert np.array_equal(run[1], ref[1])
    assert run[2]["eval"] == ref[2]["eval"]


@needs_two
def test_hybrid_early_stopping_and_keep_best_are_the_collective_run(comm, shared_dir):
    extra = "interval = 2\nkeep_best = true\nearly_stopping = { patience = 1, min_delta = 1.0 }"
    ref = _collective(comm, _with(small(steps=12), eval_extra=extra,
                                  ckpt=os.path.join(shared_dir, "coll")))
    ck = os.path.join(shared_dir, "hyb")
    run = _hybrid(comm, _with(small("hybrid", steps=12, servers=SERVERS, groups=1),
                              eval_extra=extra, ckpt=ck))
    assert ref[2]["stopped"] == run[2]["stopped"] == "early_stopped"
    assert ref[2]["step"] == run[2]["step"] == 4
    assert run[0] == ref[0]
    best = {k: v for k, v in run[2]["best"].items() if k != "checkpoint"}
    assert best == {k: v for k, v in ref[2]["best"].items() if k != "checkpoint"}
    assert best["step"] == 2
    if comm.rank == 0:       # the servers committed the checkpoints and the pointer
        assert read_best(ck)["step"] == 2
        assert sorted(n for n in os.listdir(ck) if not n.startswith(".")) == \
            ["best.json", "step-00000002", "step-00000004"]
    comm.barrier()
