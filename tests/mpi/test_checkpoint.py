"""Checkpoints over a real MPI world of any size: collective save, reshard onto other sizes."""
import json
import os
import warnings

import numpy as np
import pytest

from checkpoint_worlds import (assert_tree_equal, concat, global_tables, owner_fn, run_world,
                               shard, take_sorted)
from hpctrain.checkpoint import CheckpointError, CheckpointManager, CheckpointWarning
from hpctrain.comm import create_communicator

pytestmark = pytest.mark.mpi

DIMS = {"user": 4, "item/id": 8, "empty": 2}


@pytest.fixture
def comm():
    return create_communicator("mpi", debug=False)


def dense(step):
    return {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * step},
            "optimizer": {"step": step, "accum": np.full(3, 0.5)}}


def gather_union(comm, tables):
    """Every rank's loaded rows, concatenated in rank order, per table."""
    parts = comm.allgather_object(tables)
    return {name: concat([p[name] for p in parts]) for name in tables}


def check_loaded(comm, got, full, old_size):
    """Rows land on their owner, in (old rank, row) order, and their union is the original."""
    owner, old_owner = owner_fn(comm.size), owner_fn(old_size)
    for name, table in full.items():
        want = concat([shard({name: table}, old_owner, old_size, r)[name] for r in range(old_size)])
        assert_tree_equal(got[name], shard({name: want}, owner, comm.size, comm.rank)[name],
                          f"rank {comm.rank}: {name}")
    for name, union in gather_union(comm, got).items():
        assert_tree_equal(take_sorted(union), take_sorted(full[name]), f"union of {name}")


def test_save_and_load_this_world(comm, shared_dir):
    full = global_tables(11)
    mgr = CheckpointManager(shared_dir, comm, keep_last=2)
    mine = shard(full, owner_fn(comm.size), comm.size, comm.rank)
    for step in (1, 2, 3):  # repeated collectives catch lazy set-up bugs; keep_last prunes
        path = mgr.save(step, dense(step), mine, {"position": {"pos": step * 10}, "rank0": True})
    assert path == os.path.join(shared_dir, "step-00000003")
    assert sorted(os.listdir(shared_dir)) == ["step-00000002", "step-00000003"]
    assert sorted(os.listdir(path)) == sorted(
        ["MANIFEST.json", "dense.h5"] + [f"tables-{r:05d}-of-{comm.size:05d}.h5"
                                         for r in range(comm.size)])
    assert mgr.latest() == path
    step, d, tables, state = mgr.load(owner=owner_fn(comm.size), table_dims=DIMS)
    assert step == 3 and state == {"position": {"pos": 30}, "rank0": True}
    assert_tree_equal(d, dense(3))
    check_loaded(comm, tables, full, comm.size)
    _, _, same, _ = mgr.load(path)  # owner=None: each rank gets exactly its old shard
    assert_tree_equal(same, mine)


def test_reshard_onto_a_smaller_world(comm, shared_dir):
    """Write with every rank, reload on a sub-world of size-1 ranks (size 1: the same world)."""
    full = global_tables(12)
    CheckpointManager(shared_dir, comm).save(
        5, dense(5), shard(full, owner_fn(comm.size), comm.size, comm.rank), {})
    color = 0 if comm.size == 1 or comm.rank < comm.size - 1 else None
    sub = comm.split(color, comm.rank)
    if sub is not None:
        assert sub.size == max(1, comm.size - 1)
        step, d, tables, _ = CheckpointManager(shared_dir, sub).load(owner=owner_fn(sub.size))
        assert step == 5
        assert_tree_equal(d, dense(5))
        check_loaded(sub, tables, full, comm.size)
    comm.barrier()


@pytest.mark.parametrize("offset", [1, 2])
def test_load_files_of_a_simulated_world(comm, shared_dir, offset):
    """A checkpoint written by a world of size+offset ranks (simulated on rank 0) loads here."""
    full = global_tables(13)
    old_size = comm.size + offset
    if comm.rank == 0:
        def writer(sim):
            mine = shard(full, owner_fn(old_size), old_size, sim.rank)
            return CheckpointManager(shared_dir, sim).save(8, dense(8), mine, {"old": old_size})

        _, errors = run_world(old_size, writer)
        assert errors == [None] * old_size, errors
    comm.barrier()
    mgr = CheckpointManager(shared_dir, comm, chunk_bytes=1024)
    step, d, tables, state = mgr.load(owner=owner_fn(comm.size), table_dims=DIMS)
    assert (step, state) == (8, {"old": old_size})
    check_loaded(comm, tables, full, old_size)
    # ... and this world's checkpoint loads onto a simulated bigger world.
    path = mgr.save(9, dense(9), tables, {})
    if comm.rank == 0:
        results, errors = run_world(old_size, lambda sim: CheckpointManager(shared_dir, sim).load(
            path, owner=owner_fn(old_size)))
        assert errors == [None] * old_size, errors
        for rank, res in enumerate(results):
            for name, want in shard(full, owner_fn(old_size), old_size, rank).items():
                assert_tree_equal(take_sorted(res[2][name]), take_sorted(want))
        union = concat([res[2]["user"] for res in results])
        assert_tree_equal(take_sorted(union), take_sorted(full["user"]))
    comm.barrier()


def test_corrupt_shard_raises_together_and_falls_back(comm, shared_dir):
    full = global_tables(14)
    mgr = CheckpointManager(shared_dir, comm)
    mine = shard(full, owner_fn(comm.size), comm.size, comm.rank)
    mgr.save(1, dense(1), mine, {})
    path = mgr.save(2, dense(2), mine, {})
    last = f"tables-{comm.size - 1:05d}-of-{comm.size:05d}.h5"
    if comm.rank == 0:
        with open(os.path.join(path, last), "r+b") as fh:
            fh.seek(-10, os.SEEK_END)
            fh.write(b"\x00" * 3 + b"\xff" * 7)
    comm.barrier()
    with pytest.raises(CheckpointError, match=rf"step-00000002: {last}: sha256 mismatch"):
        mgr.load(path, owner=owner_fn(comm.size))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, d, tables, _ = mgr.load(owner=owner_fn(comm.size))
    assert step == 1
    assert_tree_equal(d, dense(1))
    check_loaded(comm, tables, full, comm.size)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    if comm.rank == 0:
        assert len(msgs) == 1 and "step-00000002" in msgs[0] and last in msgs[0], msgs
    else:
        assert msgs == []  # one warning per job, not one per rank


def test_disagreeing_ranks_raise_together(comm, shared_dir):
    full = global_tables(15)
    mine = shard(full, owner_fn(comm.size), comm.size, comm.rank)
    last = comm.rank == comm.size - 1
    if comm.size > 1:
        with pytest.raises(CheckpointError, match=rf"rank {comm.size - 1} saves step 4, rank 0 "
                                                  rf"saves step 3"):
            CheckpointManager(shared_dir, comm).save(3 + last, {}, mine, {})
        narrow = {**mine, "user": dict(mine["user"])}
        if last:
            narrow["user"]["values"] = mine["user"]["values"][:, :3].copy()
        with pytest.raises(CheckpointError, match=rf"table 'user': dim 3 on rank {comm.size - 1}"):
            CheckpointManager(shared_dir, comm).save(3, {}, narrow, {})
        # rank 0 fails to write dense.h5 after the others wrote their shards
        with pytest.raises(CheckpointError, match=r"rank 0: writing dense.h5: TypeError: "
                                                  r"dense/bad: cannot store a value of type object"):
            CheckpointManager(shared_dir, comm).save(3, {"bad": object()}, mine, {})
    if last:
        mine["user"]["slots"]["accumulator"] = mine["user"]["slots"]["accumulator"].astype("U8")
    with pytest.raises(CheckpointError, match=r"slots/accumulator: arrays of dtype <U8 cannot"):
        CheckpointManager(shared_dir, comm).save(3, {}, mine, {})
    assert CheckpointManager(shared_dir, comm).checkpoints() == []
    comm.barrier()


def test_reshard_with_the_sparse_routing(comm, shared_dir):
    """The trainer's pattern: shards routed by ``owner_of(table_id, ...)``, ids in the checkpoint."""
    routing = pytest.importorskip("hpctrain.sparse.routing")
    full = global_tables(16)
    ids = {name: i + 3 for i, name in enumerate(full)}

    def owner(size):
        return lambda name, keys: routing.owner_of(ids[name], keys, size)

    mine = shard(full, owner(comm.size), comm.size, comm.rank)
    path = CheckpointManager(shared_dir, comm).save(1, {}, mine, {}, table_ids=ids)
    new_size = comm.size + 1
    if comm.rank == 0:
        def reader(sim):
            mgr = CheckpointManager(shared_dir, sim)
            return mgr.load(path, owner=owner(new_size), table_dims=DIMS)

        results, errors = run_world(new_size, reader)
        assert errors == [None] * new_size, errors
        for rank, (_, _, tables, _) in enumerate(results):
            for name, want in shard(full, owner(new_size), new_size, rank).items():
                assert_tree_equal(take_sorted(tables[name]), take_sorted(want), name)
        manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
        assert {n: t["table_id"] for n, t in manifest["tables"].items()} == ids
    comm.barrier()


def test_resealed_bad_content_raises_on_every_rank(comm, shared_dir):
    """Content the checksums vouch for is still checked: a NaN row in the last rank's shard
    and a repeated key across shards stop every rank with the same named error, and resuming
    from a directory whose only checkpoint is bad names it instead of starting afresh."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "data", "bad"))
    import h5py
    from bad_checkpoints import reseal
    full = global_tables(17)
    mgr = CheckpointManager(shared_dir, comm)
    path = mgr.save(6, dense(6), shard(full, owner_fn(comm.size), comm.size, comm.rank), {})
    last = f"tables-{comm.size - 1:05d}-of-{comm.size:05d}.h5"
    if comm.rank == 0:
        with h5py.File(os.path.join(path, last), "r+") as f:
            values = f["tables/user/values"][...]
            values[1, 2] = np.nan
            f["tables/user/values"][...] = values
        reseal(path)
    comm.barrier()
    problem = rf"{last}:/tables/user/values\[1\]: non-finite value nan"
    moved = owner_fn(comm.size)
    for owner in (owner_fn(comm.size), lambda n, k: (moved(n, k) + 1) % comm.size):
        with pytest.raises(CheckpointError, match=problem):
            mgr.load(path, owner=owner)
    if comm.rank == 0:
        with open(os.path.join(path, "MANIFEST.json"), "a") as fh:
            fh.write(" ")
        os.truncate(os.path.join(path, "dense.h5"), 64)
    comm.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=r"none of the 1 checkpoint\(s\) .* verifies: "
                                                  r"step-00000006: dense.h5: size 64 bytes"):
            mgr.latest(strict=True)
    comm.barrier()
