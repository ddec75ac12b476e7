"""Hybrid mode (parameter servers + worker groups) against the collective trainer.

Runs at any world size of at least 2 ranks (workers: the largest power of two
below it; servers: the rest). Each test builds its own roles, so servers and workers run
the same test function on different paths and meet at the end to compare.
"""
import dataclasses
import io
import time

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.comm import create_communicator
from hpctrain.comm.p2p import PointToPoint
from hpctrain.dense.device import Device
from hpctrain.dense.streams import HostOps
from hpctrain.ps.client import PSClient
from hpctrain.ps.roles import split_roles
from hpctrain.ps.server import Server, read_rows
from hpctrain.sparse.jagged import JaggedBatch
from hpctrain.sparse.plan import make_table
from hpctrain.sparse.spec import TableSpec, resolve_specs
from hpctrain.train.hybrid import HybridTrainer, run_server, setup_hybrid
from hpctrain.train.loop import Trainer
from hybrid_configs import planted, small

pytestmark = pytest.mark.mpi

SIZE = MPI.COMM_WORLD.size
# workers: the largest power of two below the world (the global batch divides), the
# rest servers: 2 ranks -> 1 + 1, 3 -> 1 + 2, 4 -> 2 + 2, 5 -> 1 + 4, 6 -> 2 + 4
WORKERS = 1 << max(SIZE - 1, 1).bit_length() - 1
SERVERS = SIZE - WORKERS
needs_two = pytest.mark.skipif(SIZE < 2, reason="hybrid mode needs a server and a worker")
needs_groups = pytest.mark.skipif(WORKERS < 2 or WORKERS % 2,
                                  reason="two groups need an even number of workers")


@pytest.fixture(scope="module")
def world():
    return create_communicator("mpi")


def _rows(tables):
    """dict (table, key) -> (values, slots, access count, last step, opt step) bytes/ints."""
    out = {}
    for name, st in tables.items():
        slots = sorted(st["slots"])
        for j, k in enumerate(st["keys"]):
            out[name, int(k)] = (st["values"][j].tobytes(),
                                 tuple(st["slots"][s][j].tobytes() for s in slots),
                                 int(st["access_count"][j]), int(st["last_step"][j]),
                                 int(st["opt_step"][j]))
    return out


def _hybrid(world, cfg, trainer=HybridTrainer):
    """One hybrid run: dict with the rows of every server, and per worker its results."""
    roles, p2p = setup_hybrid(cfg, world)
    if roles.is_server:
        stats, server = run_server(cfg, roles, p2p, stream=io.StringIO())
        mine = ("server", {n: t.export() for n, t in server.tables.items()}, stats)
    else:
        tr = trainer(cfg, roles, p2p, stream=io.StringIO())
        res = tr.fit()
        tr.close()
        mine = ("worker", roles.worker_index, roles.group, tr.losses, tr.loss_parts,
                np.array(tr.model.params.data), res["eval"], tr.emb.stats(),
                sorted(k for k in tr.phase_totals if k.startswith("gpu.")))
    p2p.close()
    parts = world.allgather_object(mine)
    rows = {}
    for p in parts:
        if p[0] == "server":
            rows.update(_rows(p[1]))
    return {"rows": rows, "servers": [p[2] for p in parts if p[0] == "server"],
            "workers": sorted((p[1:] for p in parts if p[0] == "worker"), key=lambda w: w[0])}


def _collective(world, cfg):
    """The collective trainer on the same number of workers (the servers sit it out)."""
    sub = world.split(0 if world.rank >= SERVERS else None, world.rank)
    mine = None
    if sub is not None:
        tr = Trainer(cfg, sub, stream=io.StringIO())
        res = tr.fit()
        mine = (_rows(tr.emb.export()), tr.losses, np.array(tr.model.params.data), res["eval"])
    parts = [p for p in world.allgather_object(mine) if p is not None]
    rows = {}
    for p in parts:
        rows.update(p[0])
    return {"rows": rows, "losses": parts[0][1], "dense": parts[0][2], "eval": parts[0][3]}


def _global_losses(run, groups):
    """Per step, the global mean loss from every group's (loss sum, samples)."""
    per_group = {}
    for _, g, _, parts, *_ in run["workers"]:
        per_group[g] = np.array(parts)
    tot = sum(per_group[g] for g in range(groups))
    return tot[:, 0] / tot[:, 1]


@needs_two
@pytest.mark.parametrize("dense_on_servers", [True, False])
def test_one_group_bsp_is_bitwise_the_collective_trainer(world, dense_on_servers):
    ref = _collective(world, small())
    run = _hybrid(world, small("hybrid", servers=SERVERS, groups=1,
                               dense_on_servers=dense_on_servers))
    assert len(ref["rows"]) > 100
    assert run["rows"] == ref["rows"]          # values, optimizer slots, counts, steps
    for _, _, losses, _, dense, ev, stats, _ in run["workers"]:
        assert losses == ref["losses"]
        assert np.array_equal(dense, ref["dense"])
        assert ev == ref["eval"]
        assert stats["staleness_max"] == 0 and stats["steps"] == 6
    for st in run["servers"]:
        assert set(st["staleness_hist"]) == {0}


@needs_two
def test_one_group_bsp_with_fp16_rows_is_bitwise_the_collective_trainer(world):
    """fp16 rows on the servers: a pull of an unseen row reads its initial value rounded
    to fp16, as the collective trainer's insert stores it, and every update rounds
    stochastically by (key, clock), as the collective trainer's does by (key, step)."""
    def fp16(cfg):
        return cfg.replace(tables=[dataclasses.replace(t, row_dtype="fp16")
                                   for t in cfg.tables])
    ref = _collective(world, fp16(small()))
    run = _hybrid(world, fp16(small("hybrid", servers=SERVERS, groups=1)))
    assert len(ref["rows"]) > 100 and run["rows"] == ref["rows"]
    for _, _, losses, _, dense, ev, _, _ in run["workers"]:
        assert losses == ref["losses"] and ev == ref["eval"]
        assert np.array_equal(dense, ref["dense"])


@needs_groups
def test_two_groups_bsp_match_collective_and_repeat_bitwise(world):
    ref = _collective(world, small())
    cfg = small("hybrid", servers=SERVERS, groups=2)
    first, second = _hybrid(world, cfg), _hybrid(world, cfg)
    np.testing.assert_allclose(_global_losses(first, 2), ref["losses"], rtol=1e-5)
    assert first["rows"].keys() == ref["rows"].keys()
    assert second["rows"] == first["rows"]
    for a, b in zip(first["workers"], second["workers"]):
        assert a[2] == b[2] and a[3] == b[3]                 # losses, loss parts
        assert np.array_equal(a[4], b[4])                    # dense parameters
        assert a[5]["auc"] == pytest.approx(ref["eval"]["auc"], abs=1e-4)


# -------------------------------------------------------------------- the GPU path
class TwinHybridTrainer(HybridTrainer):
    """The hybrid worker's GPU path with xp = numpy: the device step on ``HostOps``."""

    def _make_device(self):
        return Device("gpu", np, ops=HostOps(), source=self.cfg.source)


@needs_two
@pytest.mark.parametrize("groups,dense_on_servers,staleness", [
    (1, True, 0), (2, True, 0), (1, False, 0), (2, False, 0), (1, False, 1), (2, False, 1)])
def test_twin_of_the_gpu_path_is_bitwise_the_cpu_run(world, groups, dense_on_servers,
                                                     staleness):
    """``device = "gpu"`` through its NumPy twin: the device step reduced in the group,
    the group's gradient copied down through pinned memory and pushed, the pulled
    parameters copied up; the same losses, rows and dense parameters as the CPU run.

    With ``s = 1`` and the dense model allreduced the run is still deterministic: a worker's
    PULL of clock c + 1 leaves before its PUSH of c, and a server answers deferred pulls
    as each clock is applied, so every row read is exactly one clock stale. (A dense pull
    leaves after the leader's DPUSH of c, so with the dense model on the servers it may
    or may not see clock c: timing, no bitwise reference.)"""
    if groups > WORKERS or WORKERS % groups:
        pytest.skip(f"{WORKERS} workers do not split into {groups} groups")
    ps = dict(servers=SERVERS, groups=groups, dense_on_servers=dense_on_servers,
              consistency="ssp" if staleness else "bsp", staleness=staleness)
    cpu = _hybrid(world, small("hybrid", **ps))
    twin = _hybrid(world, small("hybrid", **ps).replace(device="gpu"), TwinHybridTrainer)
    assert len(cpu["rows"]) > 100 and twin["rows"] == cpu["rows"]
    for a, b in zip(cpu["workers"], twin["workers"]):
        assert a[6]["staleness_max"] == b[6]["staleness_max"] == staleness
        assert a[2] == b[2] and len(a[2]) == 6                # losses, per step
        assert a[3] == b[3]                                   # (loss sum, samples) of the group
        assert np.array_equal(a[4], b[4])                     # dense parameters
        assert a[5] == b[5]                                   # final evaluation
        # the twin took the device path: timed device phases, the dense copies included
        assert a[7] == [] and {"gpu.h2d", "gpu.forward", "gpu.d2h"} <= set(b[7])
        leader = b[0] % (WORKERS // groups) == 0
        assert ("gpu.dense_h2d" in b[7]) == dense_on_servers
        assert ("gpu.dense_d2h" in b[7]) == (dense_on_servers and leader)


# -------------------------------------------------------------------- SSP clock table
def _clock_table(world, staleness, clocks, delay):
    """Bösen's SSP demo: every worker adds 1 to its own counter each clock and reads all.

    Group ``G - 1`` sleeps a random time each clock. Returns every server's stats (on
    every rank) after asserting the read bound on every worker.
    """
    groups = 2 if WORKERS % 2 == 0 else 1
    roles = split_roles(world, SERVERS, groups)
    p2p = PointToPoint(world)
    specs = [TableSpec("clock", 1, ["f"], optimizer={"kind": "sgd", "lr": 1.0},
                       pooling="none")]
    W = roles.num_workers
    mine = None
    if roles.is_server:
        server = Server(specs, p2p, roles, seed=3, consistency="ssp", staleness=staleness,
                        timeout_s=60, every_clocks_log=0)
        mine = server.run()
    else:
        w = roles.worker_index
        store = PSClient(specs, p2p, roles.servers, w, roles.group, timeout_s=60)
        init = read_rows(make_table(resolve_specs(specs)[0][0], 3),
                         np.arange(W, dtype=np.int64))[:, 0]
        batch = JaggedBatch(["f"], np.arange(W, dtype=np.int64), np.ones(W, dtype=np.int64))
        rng = np.random.default_rng(w)
        grads = np.zeros((W, 1), np.float32)
        grads[w] = -1.0
        ticket = store.start_lookup(batch, 1)
        for c in range(1, clocks + 1):
            counts = np.rint(store.wait_lookup(ticket)["f"][:, 0] - init).astype(np.int64)
            # every update of clocks <= c - 1 - s is visible, none of clock c (not
            # pushed yet)
            assert (counts >= c - 1 - staleness).all(), (w, c, counts.tolist())
            assert (counts <= c - 1).all(), (w, c, counts.tolist())
            nxt = store.start_lookup(batch, c + 1) if c < clocks else None
            if roles.group == groups - 1:
                time.sleep(rng.uniform(0, delay))
            store.backward(ticket, {"f": grads}, c)
            ticket = nxt
        final = store.wait_lookup(store.start_lookup(batch, clocks, train=False))["f"][:, 0]
        assert (np.rint(final - init) == clocks).all(), final - init
        mine = store.stats()
        store.close()
    p2p.close()
    return [m for m in world.allgather_object(mine)[:SERVERS]]


@needs_two
@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_clock_table_bound(world, staleness):
    for stats in _clock_table(world, staleness, clocks=25, delay=0.01):
        assert max(stats["staleness_hist"]) <= staleness
        assert stats["max_spread"] <= staleness + 1
        assert stats["pulls"] == 25 * WORKERS


# -------------------------------------------------------------------- convergence
@needs_groups
def test_stale_reads_converge_like_bsp(world):
    auc = {}
    for name, ps in [("bsp", {}), ("ssp2", dict(consistency="ssp", staleness=2)),
                     ("ssp4", dict(consistency="ssp", staleness=4)),
                     ("asp", dict(consistency="asp"))]:
        run = _hybrid(world, planted("hybrid", steps=100, servers=SERVERS, groups=2, **ps))
        auc[name] = run["workers"][0][5]["auc"]
        assert all(np.isfinite(w[2]).all() for w in run["workers"])
    assert auc["bsp"] > 0.7, auc
    for name in ("ssp2", "ssp4", "asp"):
        assert auc[name] >= auc["bsp"] - 0.005, auc
