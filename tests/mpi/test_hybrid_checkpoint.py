"""Hybrid checkpoints: save at a clock, resume on the same or another layout, stop on a signal.

Runs at any world size of at least 2 ranks (another layout needs 3). Layout A uses every
rank (workers: the largest power of two below the world, the rest servers, two groups
when there are two workers or more); layout B uses one rank fewer, so its server count,
worker count or group count differs from A's:

    3 ranks: A = 1 server + 2 workers in 2 groups    B = 1 server + 1 worker
    4 ranks: A = 2 servers + 2 workers in 2 groups   B = 1 server + 2 workers in 1 group
    5 ranks: A = 1 server + 4 workers in 2 groups    B = 2 servers + 2 workers in 1 group
    6 ranks: A = 2 servers + 4 workers in 2 groups   B = 1 server + 4 workers in 1 group

Consistency is BSP (s = 0) throughout, so a resumed run must give the losses of the
uninterrupted one: bit for bit on the same layout and on one server fewer (4 and 6 ranks),
within rtol 1e-5 where the number of groups or workers changes the order in which
gradients are summed.
"""
import io
import json
import os
import signal

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.ps.server import Server
from hpctrain.train.hybrid import HybridTrainer, run_server, setup_hybrid
from hpctrain.train.loop import Trainer
from trainer_configs import SMALL_DLRM

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(MPI.COMM_WORLD.size < 2, reason="needs a server and a worker")]

SIZE = MPI.COMM_WORLD.size
STEPS, K = 6, 3


def _layout(n):
    """(servers, workers, groups) on n ranks: workers the largest power of two below n."""
    workers = 1 << max(n - 1, 1).bit_length() - 1
    return n - workers, workers, 2 if workers >= 2 else 1


A = _layout(SIZE)
B_SERVERS, B_WORKERS, _ = _layout(SIZE - 1)
B = (B_SERVERS, B_WORKERS, 1 if A[2] == 2 else 2)


def config(directory, layout=None, every=None, steps=STEPS, dense_on_servers=True):
    """The trainer tests' small DLRM; hybrid on ``layout`` (None: collective)."""
    extra = f'\n[checkpoint]\ndirectory = "{directory}"\nkeep_last = 10\n' + (
        f"every_steps = {every}\n" if every else "")
    text = SMALL_DLRM.format(steps=steps, overlap="true", sparse_opt="adam",
                             eval_at_end="false", extra=extra)
    if layout is not None:
        servers, _, groups = layout
        text = (f'mode = "hybrid"\n{text}\n[ps]\nservers = {servers}\ngroups = {groups}\n'
                f'dense_on_servers = {str(dense_on_servers).lower()}\ntimeout_s = 60\n')
    return loads_config(text, source="hybrid_checkpoint.toml")


@pytest.fixture(scope="module")
def world():
    return create_communicator("mpi")


@pytest.fixture(scope="module")
def root(world, tmp_path_factory):
    return world.bcast(str(tmp_path_factory.mktemp("hybrid_ckpt")) if world.rank == 0
                       else None, root=0)


def _rows(tables):
    """(table, key) -> (values, slots, counts, last step, optimizer step) as bytes/ints."""
    out = {}
    for name, st in tables.items():
        for j, k in enumerate(st["keys"]):
            out[name, int(k)] = (st["values"][j].tobytes(),
                                 tuple(st["slots"][s][j].tobytes() for s in sorted(st["slots"])),
                                 int(st["access_count"][j]), int(st["last_step"][j]),
                                 int(st["opt_step"][j]))
    return out


def _sub(world, n):
    """The communicator of world ranks 0..n-1 (None on the others)."""
    return world.split(0 if world.rank < n else None, world.rank)


def hybrid(world, cfg, n=SIZE, resume=False, max_steps=None, before=None):
    """One hybrid run on world ranks 0..n-1; on every world rank: its workers' results
    (sorted by worker), the servers' rows and the run's result of worker 0."""
    comm, mine = _sub(world, n), None
    if comm is not None:
        roles, p2p = setup_hybrid(cfg, comm)
        if before is not None:
            before(roles)
        if roles.is_server:
            _, server = run_server(cfg, roles, p2p, stream=io.StringIO(), resume=resume)
            mine = ("server", _rows({n_: t.export() for n_, t in server.tables.items()}))
        else:
            tr = HybridTrainer(cfg, roles, p2p, stream=io.StringIO())
            res = tr.fit(resume=resume, max_steps=max_steps)
            tr.close()
            mine = ("worker", roles.worker_index, roles.group, tr.losses, tr.loss_parts,
                    np.array(tr.model.params.data), res, tr.model.state_dict())
        p2p.close()
    parts = [p for p in world.allgather_object(mine) if p is not None]
    rows = {}
    for p in parts:
        if p[0] == "server":
            rows.update(p[1])
    workers = sorted((p[1:] for p in parts if p[0] == "worker"), key=lambda w: w[0])
    return {"rows": rows, "workers": workers, "result": workers[0][5]}


def collective(world, cfg, n, resume=False):
    """The collective trainer on world ranks 0..n-1: losses, rows, dense."""
    comm, mine = _sub(world, n), None
    if comm is not None:
        tr = Trainer(cfg, comm, stream=io.StringIO())
        tr.fit(resume=resume)
        mine = (_rows(tr.emb.export()), tr.losses, np.array(tr.model.params.data))
    parts = [p for p in world.allgather_object(mine) if p is not None]
    rows = {}
    for p in parts:
        rows.update(p[0])
    return {"rows": rows, "losses": parts[0][1], "dense": parts[0][2]}


def global_losses(run):
    """Per step, the global mean loss from every group's (loss sum, samples)."""
    per_group = {group: np.array(parts) for _, group, _, parts, *_ in run["workers"]}
    total = sum(per_group.values())
    return total[:, 0] / total[:, 1]


@pytest.fixture(scope="module")
def uninterrupted(world, root):
    """Layout A, 6 steps, a checkpoint every 3 (written at clocks 3 and 6 without stopping)."""
    run = hybrid(world, config(os.path.join(root, "a"), A, every=K))
    run["ckpt"] = os.path.join(root, "a", f"step-{K:08d}")
    return run


def test_checkpoint_layout_is_the_collective_one_with_servers_as_ranks(world, uninterrupted):
    path = uninterrupted["ckpt"]
    if world.rank == 0:
        manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
        servers = A[0]
        assert manifest["step"] == K and manifest["world_size"] == servers
        assert sorted(manifest["files"]) == ["dense.h5"] + [
            f"tables-{i:05d}-of-{servers:05d}.h5" for i in range(servers)]
        assert sorted(os.listdir(os.path.dirname(path))) == [f"step-{K:08d}",
                                                             f"step-{STEPS:08d}"]
        from hpctrain.checkpoint import read_dense
        _, state = read_dense(path)
        assert state["mode"] == "hybrid" and state["step"] == K
        assert state["ps"]["groups"] == A[2] and state["ps"]["workers"] == A[1]
    assert uninterrupted["result"]["checkpoint"] == os.path.join(
        os.path.dirname(path), f"step-{STEPS:08d}")


def test_resume_on_the_same_layout_is_bitwise_the_uninterrupted_run(world, root,
                                                                     uninterrupted):
    run = hybrid(world, config(os.path.join(root, "same"), A), resume=uninterrupted["ckpt"])
    assert run["rows"] == uninterrupted["rows"]          # values, slots, counts, steps
    for got, want in zip(run["workers"], uninterrupted["workers"]):
        assert got[2] == want[2][K:]                     # this run's steps: K+1 .. STEPS
        assert got[3] == want[3][K:]                     # (loss sum, samples) per step
        assert np.array_equal(got[4], want[4])           # dense parameters
    assert run["result"]["step"] == STEPS and run["result"]["stopped"] == "done"


@pytest.mark.skipif(SIZE < 3, reason="another layout needs 3 ranks")
def test_resume_on_other_servers_and_groups(world, root, uninterrupted):
    # layout B, and the dense model on the workers this time (it comes from dense.h5)
    run = hybrid(world, config(os.path.join(root, "other"), B, dense_on_servers=False),
                 n=SIZE - 1, resume=uninterrupted["ckpt"])
    np.testing.assert_allclose(global_losses(run), global_losses(uninterrupted)[K:],
                               rtol=1e-5)
    assert run["rows"].keys() == uninterrupted["rows"].keys()
    # the final checkpoint of a run with the dense model on the workers holds worker 0's
    if world.rank == 0:
        from hpctrain.checkpoint import read_dense
        dense, state = read_dense(os.path.join(root, "other", f"step-{STEPS:08d}"))
        assert state["ps"]["servers"] == B[0] and state["world_size"] == B[0]
        named = run["workers"][0][6]
        assert list(dense["params"]) == list(named)
        assert all(np.array_equal(dense["params"][k], v) for k, v in named.items())
        assert int(dense["optimizer"]["step"]) == STEPS


def test_hybrid_checkpoint_resumes_in_collective_mode_and_back(world, root, uninterrupted):
    workers = A[1]
    coll = collective(world, config(os.path.join(root, "coll"), every=K), workers,
                      resume=uninterrupted["ckpt"])
    np.testing.assert_allclose(coll["losses"], global_losses(uninterrupted)[K:], rtol=1e-5)
    # a collective checkpoint of step K (written by `workers` ranks) into hybrid, G = 1:
    # hybrid with one group and s = 0 is bitwise the collective trainer
    ref = collective(world, config(os.path.join(root, "coll2"), every=K), workers)
    one_group = (A[0], A[1], 1)
    run = hybrid(world, config(os.path.join(root, "back"), one_group),
                 resume=os.path.join(root, "coll2", f"step-{K:08d}"))
    assert run["rows"] == ref["rows"]
    for _, _, losses, _, dense, *_ in run["workers"]:
        assert losses == ref["losses"][K:]
        assert np.array_equal(dense, ref["dense"])


def _signal_server_at_clock_2(index):
    """``before`` hook: server ``index`` (-1: the last) gets SIGUSR1 when it has applied 2."""
    def before(roles):
        if roles.server_index == index % roles.num_servers:
            def advance(self):
                if self.applied == 2 and not self.__dict__.get("signalled_once"):
                    self.signalled_once = True
                    os.kill(os.getpid(), signal.SIGUSR1)
                _ADVANCE(self)
            Server._advance = advance
    return before


def _preempted(world, directory, server):
    """A 40-step run on layout A whose server ``server`` is signalled; its stop clock."""
    try:
        first = hybrid(world, config(directory, A, steps=40),
                       before=_signal_server_at_clock_2(server))
    finally:
        Server._advance = _ADVANCE
    stops = {w[5]["step"] for w in first["workers"]}
    assert len(stops) == 1, stops                        # every worker stops at one clock
    stop = stops.pop()
    assert stop >= 3, stop
    for w in first["workers"]:
        assert w[5]["stopped"] == "preempted"
        assert w[5]["checkpoint"] == os.path.join(directory, f"step-{stop:08d}")
    assert os.listdir(directory) == [f"step-{stop:08d}"]
    assert os.path.isfile(os.path.join(directory, f"step-{stop:08d}", "MANIFEST.json"))
    return stop


def test_a_signal_on_server_0_stops_every_worker_at_one_clock_and_resumes(world, root,
                                                                          uninterrupted):
    directory = os.path.join(root, "preempt")
    stop = _preempted(world, directory, 0)
    # server 0 settles on 1 + the highest clock it answered: 3 <= K <= 5 at applied 2 or 3
    assert stop <= 5, stop
    # resuming continues from the stop clock: the uninterrupted run's losses and model, bit
    # for bit also on one server fewer (rows resharded, dense slices re-split) when A has 2
    fewer = A[0] >= 2
    rest = hybrid(world, config(directory, (A[0] - 1, A[1], A[2]) if fewer else A),
                  n=SIZE - 1 if fewer else SIZE, resume=True)
    for got, want in zip(rest["workers"], uninterrupted["workers"]):
        assert got[2] == want[2][stop:]
        assert np.array_equal(got[4], want[4])
    assert rest["rows"] == uninterrupted["rows"]


@pytest.mark.skipif(A[0] < 2, reason="one server only")
def test_a_signal_on_another_server_goes_to_server_0(world, root):
    _preempted(world, os.path.join(root, "preempt_last"), -1)


_ADVANCE = Server._advance
