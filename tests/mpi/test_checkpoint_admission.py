"""Pending admission counts in checkpoints over a real MPI world: saved with the rows and
resharded by key onto other world sizes, so training resumes exactly with min_count > 1."""
import numpy as np
import pytest

from checkpoint_worlds import (admission_stream, admission_table, pending_of, rows_by_key,
                               run_world, train_owned)
from hpctrain.checkpoint import CheckpointManager
from hpctrain.comm import create_communicator
from hpctrain.sparse.routing import owner_of

pytestmark = pytest.mark.mpi

K = 4  # steps before the checkpoint


@pytest.fixture
def comm():
    return create_communicator("mpi", debug=False)


def owner(size):
    return lambda name, keys: owner_of(3, keys, size)


def resume_and_check(comm, path, batches, saved):
    """Load onto ``comm``'s world, check the pending counts per key, train on and compare with
    a table of this world that trained through (per-key state does not depend on sharding)."""
    _, _, tables, _ = CheckpointManager(path.rsplit("/", 1)[0], comm).load(
        path, owner=owner(comm.size))
    t = admission_table("user", "exact")
    t.import_(tables["user"])
    mine = pending_of(t.export())
    keys = np.fromiter(mine, np.int64, len(mine))
    assert (owner_of(3, keys, comm.size) == comm.rank).all()
    union = {}
    for part in comm.allgather_object(mine):
        union.update(part)
    assert union == saved, (comm.rank, comm.size)
    train_owned(t, batches[K:], comm.rank, comm.size, start=K)
    through = admission_table("user", "exact")
    train_owned(through, batches, comm.rank, comm.size)
    got, want = t.export(), through.export()
    assert rows_by_key(got) == rows_by_key(want)
    assert pending_of(got) == pending_of(want)


def test_pending_counts_reshard_onto_other_world_sizes(comm, shared_dir):
    batches = admission_stream(31)
    t = admission_table("user", "exact")
    train_owned(t, batches[:K], comm.rank, comm.size)
    export = t.export()
    path = CheckpointManager(shared_dir, comm).save(K, {}, {"user": export}, {})
    saved = {}
    for part in comm.allgather_object(pending_of(export)):
        saved.update(part)
    assert len(saved) > 100
    # the same world, a smaller one (size - 1 ranks; size 1: the same world again) ...
    resume_and_check(comm, path, batches, saved)
    sub = comm.split(0 if comm.size == 1 or comm.rank < comm.size - 1 else None, comm.rank)
    if sub is not None:
        resume_and_check(sub, path, batches, saved)
    comm.barrier()
    # ... and a bigger one, simulated on rank 0
    if comm.rank == 0:
        _, errors = run_world(comm.size + 1, lambda sim: resume_and_check(sim, path, batches,
                                                                          saved))
        assert errors == [None] * (comm.size + 1), errors
    comm.barrier()
