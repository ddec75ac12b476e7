"""Hybrid delta export: the servers write the deltas the collective trainer writes.

Runs at any world size of at least 2 ranks: S servers and W workers in one group, W the
largest power of two below the world (2 ranks: 1 + 1; 3: 1 + 2; 4: 2 + 2; 5: 1 + 4), BSP
(s = 0), TTL eviction on one table, a delta every 3 clocks, a checkpoint every 5. Hybrid
with one group and s = 0 is bitwise the collective trainer on W ranks, so every delta
(rows, tombstones, dense weights) equals the collective run's delta of the same step, and
the hybrid run's first checkpoint exported plus its deltas applied in order give the
servers' final rows exactly.
"""
import dataclasses
import io
import json
import os

import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.checkpoint import export_model
from hpctrain.checkpoint.delta import list_deltas, read_delta, read_done
from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.train.hybrid import HybridTrainer, run_server, setup_hybrid
from hpctrain.train.loop import Trainer
from hpctrain.train.serving import DeltaApplier
from test_online import online_config

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(MPI.COMM_WORLD.size < 2, reason="needs a server and a worker")]

SIZE = MPI.COMM_WORLD.size
WORKERS = 1 << max(SIZE - 1, 1).bit_length() - 1
SERVERS = SIZE - WORKERS
STEPS = 14
DELTAS = [3, 5, 6, 9, 10, 12, 14]       # every 3, the checkpoints (5, 10) and the end


def config(root, hybrid=False, dense_on_servers=True, row_dtype="fp32"):
    text = online_config(root, steps=STEPS, ckpt_every=5, overlap=True).text
    if hybrid:
        text = (f'mode = "hybrid"\n{text}\n[ps]\nservers = {SERVERS}\ngroups = 1\n'
                f'consistency = "bsp"\ndense_on_servers = {str(dense_on_servers).lower()}\n'
                f'timeout_s = 60\n')
    cfg = loads_config(text, source="hybrid_online.toml")
    return cfg.replace(tables=[dataclasses.replace(t, row_dtype=row_dtype) for t in cfg.tables])


@pytest.fixture(scope="module")
def world():
    return create_communicator("mpi")


@pytest.fixture(scope="module")
def root(world, tmp_path_factory):
    return world.bcast(str(tmp_path_factory.mktemp("hybrid_online")) if world.rank == 0
                       else None, root=0)


def _rows(tables):
    """table -> (keys, values), sorted by key."""
    out = {}
    for name, t in tables.items():
        order = np.argsort(t["keys"], kind="stable")
        out[name] = (t["keys"][order], t["values"][order])
    return out


def _merge(parts):
    """table -> (keys, values) over every rank's part, sorted by key."""
    keys = {n: np.concatenate([p[n][0] for p in parts]) for n in parts[0]}
    values = {n: np.concatenate([p[n][1] for p in parts]) for n in parts[0]}
    return _rows({n: {"keys": keys[n], "values": values[n]} for n in keys})


def hybrid(world, cfg):
    """A hybrid run on every world rank; returns the servers' final rows (merged)."""
    roles, p2p = setup_hybrid(cfg, world)
    mine = None
    if roles.is_server:
        _, server = run_server(cfg, roles, p2p, stream=io.StringIO())
        mine = _rows({n: t.export() for n, t in server.tables.items()})
        assert [p for p, *_ in server.deltas_written] == [
            os.path.join(cfg.online.directory, f"delta-{s:08d}") for s in DELTAS]
    else:
        tr = HybridTrainer(cfg, roles, p2p, stream=io.StringIO())
        res = tr.fit()
        tr.close()
        assert res["stopped"] == "done" and res["step"] == STEPS
    p2p.close()
    return _merge([p for p in world.allgather_object(mine) if p is not None])


def collective(world, cfg):
    """The collective trainer on world ranks 0..W-1."""
    comm = world.split(0 if world.rank < WORKERS else None, world.rank)
    if comm is not None:
        Trainer(cfg, comm, stream=io.StringIO()).fit()
    world.barrier()


def _delta(path):
    d = read_delta(path)
    tables = {}
    for name, t in d["tables"].items():
        order = np.argsort(t["keys"], kind="stable")
        tables[name] = (t["keys"][order], t["values"][order], np.sort(t["tombstones"]))
    return d["since"], tables, d["dense"]


def _progressive(path):
    return [(r["step"], r["progressive"]) for r in map(json.loads, open(path))
            if "progressive" in r]


def _applied(root):
    """The first checkpoint exported, then every later delta applied: the serving model."""
    model = export_model(os.path.join(root, "ckpt", "step-00000005"),
                         os.path.join(root, "model.h5"))
    applier = DeltaApplier(model, os.path.join(root, "deltas"))
    assert [s for s, _ in applier.pending()] == DELTAS[2:]
    applier.poll()
    assert applier.model_step == STEPS
    return applier.model


@pytest.mark.parametrize("dense_on_servers,row_dtype", [(True, "fp32"), (False, "fp32"),
                                                        (True, "fp16")])
def test_server_deltas_equal_the_collective_ones_and_rebuild_the_servers_rows(
        world, root, dense_on_servers, row_dtype):
    """Also with fp16 rows: the servers' deltas (float32) are the collective run's, bit for
    bit, so the servers round every update as the collective trainer does."""
    where = ("servers" if dense_on_servers else "workers") + f"-{row_dtype}"
    h_root, c_root = os.path.join(root, f"h-{where}"), os.path.join(root, f"c-{where}")
    rows = hybrid(world, config(h_root, hybrid=True, dense_on_servers=dense_on_servers,
                                row_dtype=row_dtype))
    collective(world, config(c_root, row_dtype=row_dtype))
    if world.rank == 0:
        h_deltas = list_deltas(os.path.join(h_root, "deltas"))
        c_deltas = list_deltas(os.path.join(c_root, "deltas"))
        assert [s for s, _ in h_deltas] == [s for s, _ in c_deltas] == DELTAS
        gone = 0
        for (step, hp), (_, cp) in zip(h_deltas, c_deltas):
            done = read_done(hp)
            assert done["world_size"] == SERVERS and done["dense"] == read_done(cp)["dense"]
            assert sorted(done["files"]) == (["dense.h5"] if done["dense"] else []) + [
                f"sparse-{i:05d}-of-{SERVERS:05d}.h5" for i in range(SERVERS)]
            assert ("config" in done) == done["dense"]
            h_since, h_tables, h_dense = _delta(hp)
            c_since, c_tables, c_dense = _delta(cp)
            assert h_since == c_since, step
            for name, (keys, values, tomb) in c_tables.items():
                np.testing.assert_array_equal(h_tables[name][0], keys, err_msg=f"{step} {name}")
                np.testing.assert_array_equal(h_tables[name][1], values)
                np.testing.assert_array_equal(h_tables[name][2], tomb)
                gone += tomb.size
            assert (h_dense is None) == (c_dense is None)
            if c_dense is not None:
                assert list(h_dense["params"]) == list(c_dense["params"])
                for k, v in c_dense["params"].items():
                    np.testing.assert_array_equal(h_dense["params"][k], v, err_msg=k)
        assert gone > 0                                    # evictions were exported
        served = _applied(h_root)
        for name, (keys, values) in rows.items():
            k, v = served.rows(name)
            np.testing.assert_array_equal(k, keys)           # evicted keys are gone
            np.testing.assert_array_equal(v, values)
        ref = _applied(c_root)
        for name in rows:
            for a, b in zip(served.rows(name), ref.rows(name)):
                np.testing.assert_array_equal(a, b)
        for k, v in ref.model.state_dict().items():
            np.testing.assert_array_equal(served.model.state_dict()[k], v)
        # progressive validation (G = 1: the whole batch) scores as the collective run does
        h_prog = _progressive(os.path.join(h_root, "metrics.jsonl"))
        c_prog = _progressive(os.path.join(c_root, "metrics.jsonl"))
        assert [s for s, _ in h_prog] == [s for s, _ in c_prog] == list(range(2, STEPS + 1, 2))
        for (_, a), (_, b) in zip(h_prog, c_prog):
            assert a["count"] == b["count"]
            assert a["auc"] == pytest.approx(b["auc"], rel=1e-12)
            assert a["logloss"] == pytest.approx(b["logloss"], rel=1e-12)
    world.barrier()
