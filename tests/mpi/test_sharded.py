"""ShardedEmbedding against its single-process twin, at any world size.

Every rank builds the same random global batches; the twin trains on the whole
batch, ``ShardedEmbedding`` on each rank's slice. Pooled outputs and the union
of all shards must equal the twin's.
"""
import dataclasses

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.sparse import EmbeddingCollection, JaggedBatch, ShardedEmbedding, TableSpec
from hpctrain.sparse.optimizers import SparseOptimizer
from hpctrain.sparse.policies import Admission

pytestmark = pytest.mark.mpi

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "rowwise_adagrad", "adam", "ftrl"]
FEATURES = ["u", "i", "s"]
PER_RANK = 5


@pytest.fixture(scope="module")
def comm():
    return create_communicator("mpi")


def _specs(opt, pooling, admission=None):
    # initial_accumulator 0.1 (TensorFlow's FTRL/Adagrad default) keeps FTRL's first steps
    # well conditioned: with n ~ g^2 tiny, w = -(z - l1) / (sqrt(n) / lr + l2) turns a
    # 1-ulp difference in a gradient sum into a 1e-5 relative one.
    o = SparseOptimizer(kind=opt, lr=0.05, l1=0.001, l2=0.01, initial_accumulator=0.1)
    return [TableSpec("ui", 4, ["u", "i"], optimizer=o, pooling=pooling, admission=admission),
            TableSpec("seq", 3, ["s"], optimizer=o, pooling=pooling, admission=admission)]


def _all_optimizers(pooling):
    """Every optimizer at once (two tables each), so one exchange covers them all."""
    specs = []
    for opt in OPTIMIZERS:
        for s in _specs(opt, pooling):
            specs.append(TableSpec(f"{opt}.{s.name}", s.dim, [f"{opt}.{f}" for f in s.features],
                                   optimizer=s.optimizer, pooling=pooling))
    return specs


def _global_batch(rng, size, vocab=30, maxlen=4, features=FEATURES):
    lengths = rng.integers(0, maxlen, size=len(features) * PER_RANK * size)
    values = rng.integers(0, vocab, size=int(lengths.sum())) * 1000003 - 7
    return JaggedBatch(features, values, lengths)


def _rank_slice(gbatch, comm):
    return gbatch.slice_samples(comm.rank * PER_RANK, (comm.rank + 1) * PER_RANK)


def _local_part(gbatch, outputs, comm, pooling):
    """This rank's part of the twin's outputs (or of gradients shaped like them)."""
    lo, hi = comm.rank * PER_RANK, (comm.rank + 1) * PER_RANK
    if pooling != "none":
        return {f: outputs[f][lo:hi] for f in outputs}
    out = {}
    for f in outputs:
        off = gbatch[f].offsets
        out[f] = outputs[f][off[lo]:off[hi]]
    return out


def _grads(rng, outputs):
    return {f: rng.standard_normal(o.shape).astype(np.float32) for f, o in outputs.items()}


def _assert_tables_equal(comm, twin, sharded, rtol=1e-6):
    shards = comm.allgather_object({n: t.export() for n, t in sharded.tables.items()})
    for name, t in twin.tables.items():
        ref = t.export()
        parts = [s[name] for s in shards]
        keys = np.concatenate([p["keys"] for p in parts])
        assert len(np.unique(keys)) == keys.size, f"{name}: a key lives on two ranks"
        o_ref, o_got = np.argsort(ref["keys"]), np.argsort(keys)
        assert np.array_equal(ref["keys"][o_ref], keys[o_got]), name
        values = np.concatenate([p["values"] for p in parts])
        np.testing.assert_allclose(values[o_got], ref["values"][o_ref], rtol=rtol,
                                   atol=_atol(ref["values"], rtol), err_msg=name)
        for slot, arr in ref["slots"].items():
            got = np.concatenate([p["slots"][slot] for p in parts])
            np.testing.assert_allclose(got[o_got], arr[o_ref], rtol=rtol, atol=_atol(arr, rtol),
                                       err_msg=f"{name}.{slot}")
        for field in ("access_count", "last_step"):
            if field in ref:
                got = np.concatenate([p[field] for p in parts])
                assert np.array_equal(got[o_got], ref[field][o_ref]), f"{name}.{field}"


def _atol(ref, rtol=1e-6):
    """Absolute slack for entries near zero: ``rtol`` of the array's largest magnitude
    (a pooled sum or an update can cancel to far below its terms)."""
    return rtol * float(np.abs(ref).max()) if ref.size else 0.0


def _assert_outputs_equal(got, ref, exact=True):
    """Equal outputs: bit for bit while the tables are (same rows pooled in the same
    order), else to 1e-6 relative (gradient sums met in another order)."""
    assert sorted(got) == sorted(ref)
    for f in ref:
        assert got[f].shape == ref[f].shape, f
        if exact:
            assert np.array_equal(got[f], ref[f]), f
        else:
            np.testing.assert_allclose(got[f], ref[f], rtol=1e-6, atol=_atol(ref[f]), err_msg=f)


def _train(comm, specs, steps=3, seed=0, overlap=False):
    """Train the twin (sequential forward/backward) and ShardedEmbedding side by side.

    With ``overlap`` the sharded side starts each next lookup before the current
    backward (the trainer's pipelined schedule); its results must not change.
    """
    rng = np.random.default_rng(seed)
    twin = EmbeddingCollection(specs, seed=11)
    sharded = ShardedEmbedding(specs, comm, seed=11)
    pooling = specs[0].pooling
    features = [f for s in specs for f in s.features]
    batches = [_global_batch(rng, comm.size, features=features) for _ in range(steps)]
    pending = sharded.start_lookup(_rank_slice(batches[0], comm), 0) if overlap else None
    for step, gb in enumerate(batches):
        ref, ref_t = twin.forward(gb, step)
        if overlap:
            ticket = pending
            out = sharded.wait_lookup(ticket)
            if step + 1 < steps:
                pending = sharded.start_lookup(_rank_slice(batches[step + 1], comm), step + 1)
        else:
            out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        _assert_outputs_equal(out, _local_part(gb, ref, comm, pooling), exact=step == 0)
        grads = _grads(rng, ref)
        twin.backward(ref_t, grads, step)
        sharded.backward(ticket, _local_part(gb, grads, comm, pooling), step)
    return twin, sharded


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_matches_twin_for_every_optimizer(comm, pooling):
    specs = _all_optimizers(pooling)
    twin, sharded = _train(comm, specs)
    _assert_tables_equal(comm, twin, sharded)
    # a final lookup sees the trained rows identically
    gb = _global_batch(np.random.default_rng(99), comm.size,
                       features=[f for s in specs for f in s.features])
    _assert_outputs_equal(sharded.forward(_rank_slice(gb, comm), 9)[0],
                          _local_part(gb, twin.forward(gb, 9)[0], comm, pooling), exact=False)


def test_dyadic_gradients_give_identical_bits(comm):
    """Gradients that add exactly in any order: tables equal bit for bit."""
    specs = _specs("adagrad", "mean")
    rng = np.random.default_rng(5)
    twin, sharded = EmbeddingCollection(specs, seed=3), ShardedEmbedding(specs, comm, seed=3)
    for step in range(3):
        lengths = rng.choice([0, 1, 2, 4], size=len(FEATURES) * PER_RANK * comm.size)
        values = rng.integers(0, 20, size=int(lengths.sum()))
        gb = JaggedBatch(FEATURES, values, lengths)
        ref, ref_t = twin.forward(gb, step)
        out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        _assert_outputs_equal(out, _local_part(gb, ref, comm, "mean"))
        grads = {f: (rng.integers(-64, 64, size=o.shape) / 1024).astype(np.float32)
                 for f, o in ref.items()}
        twin.backward(ref_t, grads, step)
        sharded.backward(ticket, _local_part(gb, grads, comm, "mean"), step)
    _assert_tables_equal(comm, twin, sharded, rtol=0)


@pytest.mark.parametrize("row_dtype,overlap", [("fp16", False), ("bf16", False),
                                               ("fp16", True)])
def test_reduced_rows_give_identical_bits(comm, row_dtype, overlap):
    """fp16 / bf16 rows, every optimizer, gradients that add exactly in any order: the
    shards equal the single-process twin bit for bit (the stochastic rounding of each
    update depends on the key and step, not on the rank, thread or row position), also
    with the next lookup started before each backward (``overlap``: the receive buffers
    hold the next batch's ids by then)."""
    specs = [dataclasses.replace(s, row_dtype=row_dtype) for s in _all_optimizers("mean")]
    features = [f for s in specs for f in s.features]
    rng = np.random.default_rng(6)
    twin, sharded = EmbeddingCollection(specs, seed=3), ShardedEmbedding(specs, comm, seed=3)
    batches = []
    for _ in range(3):
        lengths = rng.choice([0, 1, 2, 4], size=len(features) * PER_RANK * comm.size)
        batches.append(JaggedBatch(features, rng.integers(0, 20, size=int(lengths.sum())),
                                   lengths))
    pending = sharded.start_lookup(_rank_slice(batches[0], comm), 0) if overlap else None
    for step, gb in enumerate(batches):
        ref, ref_t = twin.forward(gb, step)
        if overlap:
            ticket = pending
            out = sharded.wait_lookup(ticket)
            if step + 1 < len(batches):
                pending = sharded.start_lookup(_rank_slice(batches[step + 1], comm), step + 1)
        else:
            out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        _assert_outputs_equal(out, _local_part(gb, ref, comm, "mean"))
        grads = {f: (rng.integers(-64, 64, size=o.shape) / 1024).astype(np.float32)
                 for f, o in ref.items()}
        twin.backward(ref_t, grads, step)
        sharded.backward(ticket, _local_part(gb, grads, comm, "mean"), step)
    _assert_tables_equal(comm, twin, sharded, rtol=0)
    assert all(t.export()["values"].dtype.itemsize == 2 for t in twin.tables.values())


def test_overlap_path_equals_forward(comm):
    """start_lookup(next) before backward(current), wait after: same as sequential forward."""
    twin, sharded = _train(comm, _specs("adam", "sum"), steps=4, seed=1, overlap=True)
    _assert_tables_equal(comm, twin, sharded)


def test_eval_lookup_inserts_nothing(comm):
    specs = _specs("sgd", "sum")
    twin, sharded = EmbeddingCollection(specs), ShardedEmbedding(specs, comm)
    gb = _global_batch(np.random.default_rng(4), comm.size)
    # an eval lookup may run while a training lookup is in flight
    pending = sharded.start_lookup(_rank_slice(gb, comm), 0)
    out, _ = sharded.forward(_rank_slice(gb, comm), 0, train=False)
    assert all((o == 0).all() for o in out.values())
    assert comm.mpi_comm.allreduce(sum(len(t) for t in sharded.tables.values())) == 0
    got = sharded.wait_lookup(pending)
    _assert_outputs_equal(got, _local_part(gb, twin.forward(gb, 0)[0], comm, "sum"))
    again, _ = sharded.forward(_rank_slice(gb, comm), 1, train=False)
    _assert_outputs_equal(again, got)


def test_shards_partition_rows_and_memory(comm):
    # big enough that every shard is far past the tables' initial capacity
    o = SparseOptimizer(kind="adagrad", lr=0.05)
    specs = [TableSpec("ui", 16, ["u", "i"], optimizer=o), TableSpec("seq", 8, ["s"], optimizer=o)]
    rng = np.random.default_rng(2)
    twin, sharded = EmbeddingCollection(specs), ShardedEmbedding(specs, comm)
    per_rank = 16000 // comm.size
    for step in range(2):
        lengths = np.full(len(FEATURES) * per_rank * comm.size, 2)
        gb = JaggedBatch(FEATURES, rng.integers(0, 10**6, size=lengths.sum()), lengths)
        lo, hi = comm.rank * per_rank, (comm.rank + 1) * per_rank
        ref, ref_t = twin.forward(gb, step)
        _, ticket = sharded.forward(gb.slice_samples(lo, hi), step)
        g = _grads(rng, ref)
        twin.backward(ref_t, g, step)
        sharded.backward(ticket, {f: g[f][lo:hi] for f in g}, step)
    for name, t in twin.tables.items():
        rows = comm.mpi_comm.allreduce(len(sharded.tables[name]))
        assert rows == len(t)
        got = comm.mpi_comm.allreduce(_table_bytes(sharded.tables[name]))
        want = _table_bytes(t)
        print(f"table {name}: {got} bytes over {comm.size} ranks, twin {want}")
        assert abs(got - want) <= 0.05 * want, (name, got, want)


def _table_bytes(table):
    """Bytes the table holds (index, rows, optimizer state, metadata; not admission counters)."""
    stats = table.memory_stats()
    return int(stats["bytes_total"] - stats["bytes_admission"])


def test_mean_pooling_of_empty_bags_is_zero(comm):
    specs = _specs("sgd", "mean")
    sharded = ShardedEmbedding(specs, comm)
    lengths = np.zeros(len(FEATURES) * PER_RANK, dtype=np.int64)
    lengths[1] = 2                                   # feature "u", sample 1
    batch = JaggedBatch(FEATURES, [4, 5], lengths)
    out, ticket = sharded.forward(batch, 0)
    assert out["u"].shape == (PER_RANK, 4) and out["s"].shape == (PER_RANK, 3)
    empty = [0, 2, 3, 4]
    assert (out["u"][empty] == 0).all() and (out["i"] == 0).all() and (out["s"] == 0).all()
    assert np.abs(out["u"][1]).sum() > 0
    sharded.backward(ticket, {f: np.ones_like(o) for f, o in out.items()}, 0)


def test_not_admitted_ids_give_default_and_no_update(comm):
    specs = _specs("sgd", "sum", admission=Admission(min_count=2))
    twin, sharded = EmbeddingCollection(specs), ShardedEmbedding(specs, comm)
    lengths = np.ones(len(FEATURES) * PER_RANK * comm.size, dtype=np.int64)
    # every rank sends id 7 in feature "u" at step 0: one global sighting per step
    values = np.full(lengths.size, 7, dtype=np.int64)
    gb = JaggedBatch(FEATURES, values, lengths)
    for step in range(2):
        ref, ref_t = twin.forward(gb, step)
        out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        _assert_outputs_equal(out, _local_part(gb, ref, comm, "sum"))
        if step == 0:       # first sighting: not admitted, default (zero) rows
            assert all((o == 0).all() for o in out.values())
        else:               # second sighting: admitted, initialised rows
            assert all(np.abs(o).sum() > 0 for o in out.values())
        g = {f: np.ones_like(o) for f, o in ref.items()}
        twin.backward(ref_t, g, step)
        sharded.backward(ticket, _local_part(gb, g, comm, "sum"), step)
        if step == 0:
            assert comm.mpi_comm.allreduce(sum(len(t) for t in sharded.tables.values())) == 0
    _assert_tables_equal(comm, twin, sharded)


def test_evict_runs_on_every_shard(comm):
    specs = _specs("sgd", "sum")
    sharded = ShardedEmbedding(specs, comm)
    res = sharded.evict(0)
    assert set(res) == {"ui", "seq"} and all(v == 0 for v in res.values())


def test_errors_name_features(comm):
    sharded = ShardedEmbedding(_specs("sgd", "sum"), comm)
    bad = JaggedBatch(["u", "i"], [1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"unknown feature names \['s'\]"):
        sharded.forward(bad, 0)
    out, ticket = sharded.forward(_rank_slice(_global_batch(np.random.default_rng(0),
                                                            comm.size), comm), 0)
    with pytest.raises(ValueError, match=r"missing for features \['s'\]"):
        sharded.backward(ticket, {"u": out["u"], "i": out["i"]}, 0)
    with pytest.raises(ValueError, match="must be float32"):
        sharded.backward(ticket, {**out, "u": out["u"][:1]}, 0)


def _run_mode(comm, specs, exchange, group, steps=4, overlap=False):
    """Train one ShardedEmbedding on growing batches; outputs per step and the export."""
    rng = np.random.default_rng(21)
    sharded = ShardedEmbedding(specs, comm, seed=5, exchange=exchange, node_group_size=group)
    pooling = specs[0].pooling
    features = [f for s in specs for f in s.features]
    # the batch grows step by step, so the shared window has to grow too
    batches = [_global_batch(rng, comm.size, vocab=30 * (k + 1), maxlen=2 + 3 * k,
                             features=features) for k in range(steps)]
    outs = []
    pending = sharded.start_lookup(_rank_slice(batches[0], comm), 0) if overlap else None
    for step, gb in enumerate(batches):
        if overlap:
            ticket = pending
            out = sharded.wait_lookup(ticket)
            if step + 1 < steps:
                pending = sharded.start_lookup(_rank_slice(batches[step + 1], comm), step + 1)
        else:
            if step == 1:
                # a training lookup nobody differentiates: the next one must wait for
                # peers still pooling from this rank's reply
                sharded.forward(_rank_slice(batches[0], comm), step)
            out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        outs.append(out)
        # an eval lookup between training steps takes the plain path and changes nothing
        sharded.forward(_rank_slice(gb, comm), step, train=False)
        sharded.backward(ticket, {f: (np.cos(o * 7 + step) * 0.1).astype(np.float32)
                                  for f, o in out.items()}, step)
    state = sharded.export()
    mode = sharded.exchange
    sharded.close()
    return outs, state, mode


@pytest.mark.parametrize("exchange,group,pooling,opt,overlap", [
    ("shm", None, "sum", "adagrad", False), ("shm", 1, "none", "adam", True),
    ("shm", 2, "mean", "ftrl", False), ("shm", 2, "sum", "rowwise_adagrad", True)])
def test_exchange_modes_give_identical_bits(comm, exchange, group, pooling, opt, overlap):
    """Shared-memory exchange gives the plain Alltoallv path's outputs and tables bit for
    bit (same rows, same order of sums): one window per node; windows of one rank (every
    peer remote); windows of two (shared memory and Alltoallv mixed at 4 ranks)."""
    specs = _specs(opt, pooling)
    ref_outs, ref_state, ref_mode = _run_mode(comm, specs, "alltoallv", None, overlap=overlap)
    outs, state, mode = _run_mode(comm, specs, exchange, group, overlap=overlap)
    assert ref_mode == "alltoallv" and mode == "shm"
    for got, ref in zip(outs, ref_outs):
        _assert_outputs_equal(got, ref, exact=True)
    for name, ref in ref_state.items():
        got = state[name]
        for field in ("keys", "values", "access_count", "last_step"):
            assert np.array_equal(got[field], ref[field]), f"{name}.{field}"
        for slot, arr in ref["slots"].items():
            assert np.array_equal(got["slots"][slot], arr), f"{name}.{slot}"


def test_exchange_argument_is_checked(comm):
    with pytest.raises(ValueError, match="exchange must be one of"):
        ShardedEmbedding(_specs("sgd", "sum"), comm, exchange="nvlink")
    from hpctrain.comm.null import NullCommunicator
    with pytest.raises(ValueError, match="needs an MPI communicator"):
        ShardedEmbedding(_specs("sgd", "sum"), NullCommunicator(), exchange="shm")
    assert ShardedEmbedding(_specs("sgd", "sum"), NullCommunicator()).exchange == "alltoallv"


@pytest.mark.parametrize("short_of", ["requests", "rows"])
def test_exchange_falls_back_to_alltoallv_without_shared_memory(comm, monkeypatch, caplog,
                                                               short_of):
    """With too little /dev/shm for the request board (or, the board placed, for the row
    window) every rank of the node falls back to Alltoallv in the same step, with one
    warning, and the results stay those of the plain path."""
    import inspect

    from hpctrain.comm import shm

    def free_bytes(path="/dev/shm"):
        asking = inspect.stack()[1].function       # "settle" (board) or "reserve" (rows)
        return 1 << 10 if asking == {"requests": "settle", "rows": "reserve"}[short_of] \
            else 1 << 40

    specs = _specs("adagrad", "sum")
    ref_outs, ref_state, _ = _run_mode(comm, specs, "alltoallv", None)
    monkeypatch.setattr(shm, "shm_available_bytes", free_bytes)
    with caplog.at_level("WARNING", logger="hpctrain.comm.shm"):
        outs, state, mode = _run_mode(comm, specs, "shm", None)
    assert mode == "alltoallv"
    assert len([r for r in caplog.records if "Alltoallv" in r.getMessage()]) == 1
    for got, ref in zip(outs, ref_outs):
        _assert_outputs_equal(got, ref, exact=True)
    for name, ref in ref_state.items():
        for field in ("keys", "values", "access_count", "last_step"):
            assert np.array_equal(state[name][field], ref[field]), f"{name}.{field}"


@pytest.mark.parametrize("group", [None, 1, 2])
def test_stats_say_which_path_the_bytes_took(comm, group):
    """Window members' rows and gradients go through shared memory, other ranks' by
    Alltoallv, and the statistics count each (what a multi-node run is checked with)."""
    sharded = ShardedEmbedding(_specs("sgd", "sum"), comm, exchange="shm", node_group_size=group)
    rng = np.random.default_rng(8)
    for step in range(2):
        gb = _global_batch(rng, comm.size, vocab=400)
        out, ticket = sharded.forward(_rank_slice(gb, comm), step)
        sharded.backward(ticket, {f: np.ones_like(o) for f, o in out.items()}, step)
    st = sharded.stats()
    members = st["window_ranks"]
    size = comm.size if group is None else min(group, comm.size)
    assert comm.rank in members and len(members) == size
    a2a, win = st["bytes_sent"]["alltoallv"], st["bytes_sent"]["window"]
    others_outside = comm.size - size
    assert (a2a["rows"] > 0) == (others_outside > 0) and (a2a["grads"] > 0) == (others_outside > 0)
    assert (win["rows"] > 0) == (size > 1) and (win["grads"] > 0) == (size > 1)
    plain = ShardedEmbedding(_specs("sgd", "sum"), comm, exchange="alltoallv")
    out, ticket = plain.forward(_rank_slice(gb, comm), 0)
    plain.backward(ticket, {f: np.ones_like(o) for f, o in out.items()}, 0)
    pst = plain.stats()
    assert pst["window_ranks"] == [comm.rank] and not any(pst["bytes_sent"]["window"].values())
    assert (pst["bytes_sent"]["alltoallv"]["rows"] > 0) == (comm.size > 1)
    sharded.close()
