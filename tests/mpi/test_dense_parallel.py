"""Data-parallel dense training at any world size equals one process on the global batch.

Every rank builds the same model, trains on its slice of a global batch with the
loss divided by the global batch size and one allreduce of the flat gradient
buffer, and also trains a single-process reference on the whole batch. After
several steps all ranks must hold bit-identical parameters equal to the reference.
"""
import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.dense import (DLRM, BucketedAllreduce, DeepFM, WideAndDeep, allreduce_gradients,
                            bce_with_logits, broadcast_parameters, check_parameters_identical,
                            make_optimizer)
from hpctrain.dense.backend import set_blas_threads
from hpctrain.errors import CommError, NonFiniteError

pytestmark = pytest.mark.mpi
set_blas_threads(1)

PER_RANK = 6
STEPS = 4


@pytest.fixture(scope="module")
def comm():
    return create_communicator("mpi")


def _build(kind, dtype, seed=0):
    if kind == "dlrm":
        return DLRM(5, [4] * 6, bottom=[16, 8], top=[16, 8, 1], seed=seed, dtype=dtype), [4] * 6
    if kind == "wdl":
        return WideAndDeep(5, [1] * 3, [4] * 3, hidden=[16, 8], seed=seed, dtype=dtype), \
            [1] * 3 + [4] * 3
    return DeepFM(5, [4] * 4, hidden=[16, 8], wide_dims=[1, 1], seed=seed, dtype=dtype), \
        [4] * 4 + [1, 1]


def _global_batch(step, size, dims, dtype):
    """The same global batch on every rank (seeded by step and world size)."""
    rng = np.random.default_rng([1234, step, size])
    g = PER_RANK * size
    dense = rng.standard_normal((g, 5)).astype(dtype)
    embs = [(rng.standard_normal((g, d)) * 0.5).astype(dtype) for d in dims]
    labels = (rng.random(g) > 0.5).astype(dtype)
    return dense, embs, labels


def _train_step(model, opt, dense, embs, labels, denom, sync):
    logits = model.forward(dense, embs)
    loss, d_logits = bce_with_logits(logits, labels, denom=denom)
    d_embs = [g.copy() for g in model.backward(d_logits)]
    sync()
    opt.step()
    return loss, d_embs


CASES = [("dlrm", "adam", np.float64, False), ("dlrm", "adam", np.float64, True),
         ("wdl", "momentum", np.float64, False), ("deepfm", "adagrad", np.float64, True),
         ("dlrm", "sgd", np.float32, False), ("deepfm", "adamw", np.float32, True)]


@pytest.mark.parametrize("kind,opt_kind,dtype,bucketed", CASES,
                         ids=[f"{k}-{o}-{np.dtype(d).name}-{'bucketed' if b else 'fused'}"
                              for k, o, d, b in CASES])
def test_data_parallel_equals_single_process(comm, kind, opt_kind, dtype, bucketed):
    r, n = comm.rank, comm.size
    model, dims = _build(kind, dtype)
    ref, _ = _build(kind, dtype)
    hp = {"lr": 0.05} if opt_kind in ("sgd", "momentum", "adagrad") else {"lr": 0.01}
    opt, ref_opt = make_optimizer(opt_kind, model.params, **hp), \
        make_optimizer(opt_kind, ref.params, **hp)
    if bucketed:
        sync_obj = BucketedAllreduce(model.params, comm, bucket_bytes=512)
        assert len(sync_obj.buckets) > 2
        sync = sync_obj.wait
    else:
        sync = lambda: allreduce_gradients(model.params, comm)  # noqa: E731
    broadcast_parameters(model.params, comm)
    g = PER_RANK * n
    lo, hi = r * PER_RANK, (r + 1) * PER_RANK
    for step in range(STEPS):
        dense, embs, labels = _global_batch(step, n, dims, dtype)
        loss, d_embs = _train_step(model, opt, dense[lo:hi], [e[lo:hi] for e in embs],
                                   labels[lo:hi], g, sync)
        ref_loss, ref_d = _train_step(ref, ref_opt, dense, embs, labels, g, lambda: None)
        total = comm.mpi_comm.allreduce(loss)
        assert abs(total - ref_loss) <= 1e-5 * abs(ref_loss), (step, total, ref_loss)
        for i, (a, b) in enumerate(zip(d_embs, ref_d)):
            np.testing.assert_allclose(a, b[lo:hi], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step} d_emb {i} rank {r}")
    check_parameters_identical(model.params, comm)  # bit-identical on every rank
    got, want = model.params.named(), ref.params.named()
    for name in got:
        err = np.linalg.norm(got[name] - want[name]) / max(np.linalg.norm(want[name]), 1e-30)
        assert err <= 1e-5, f"rank {r}/{n} {name}: relative error {err:.3g} vs single process"
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # parameters really moved away from their start
    start, _ = _build(kind, dtype)
    assert not np.allclose(model.params.data, start.params.data)
    if bucketed:
        sync_obj.close()


def test_allreduce_sums_the_flat_buffer_in_one_call(comm):
    model, _ = _build("dlrm", np.float64)
    for _ in range(2):  # twice: lazy initialisation must not change the result
        model.params.grad[...] = np.arange(model.params.size) * (comm.rank + 1)
        calls = []
        inner = comm.allreduce
        comm.allreduce = lambda buf, op="sum": (calls.append(buf.size), inner(buf, op))[1]
        try:
            allreduce_gradients(model.params, comm)
        finally:
            del comm.allreduce
        assert calls == [model.params.size]
        n = comm.size
        np.testing.assert_array_equal(model.params.grad,
                                      np.arange(model.params.size) * n * (n + 1) / 2)


def test_bucketed_allreduce_starts_buckets_during_backward(comm):
    model, dims = _build("dlrm", np.float64)
    sync = BucketedAllreduce(model.params, comm, bucket_bytes=256)
    started = []
    inner = comm.iallreduce

    def spy(buf, op="sum"):
        started.append(buf.size)
        return inner(buf, op)
    comm.iallreduce = spy
    try:
        dense, embs, labels = _global_batch(0, comm.size, dims, np.float64)
        model.forward(dense, embs)
        model.backward(np.ones(len(labels)))
        during = len(started)
        sync.wait()
    finally:
        del comm.iallreduce
        sync.close()
    assert during == len(sync.buckets) and sum(started) == model.params.size
    lo, hi = zip(*sync.buckets)
    assert hi[0] == model.params.size and lo[-1] == 0 and list(lo[:-1]) == list(hi[1:])


def test_broadcast_makes_ranks_identical_and_check_names_culprits(comm):
    r, n = comm.rank, comm.size
    model, _ = _build("deepfm", np.float32, seed=100 + r)
    root, _ = _build("deepfm", np.float32, seed=100)
    broadcast_parameters(model.params, comm, debug=True)
    np.testing.assert_array_equal(model.params.data, root.params.data)
    check_parameters_identical(model.params, comm)
    if n > 1:
        if r == n - 1:
            model.params["deep.1.weight"][0, 0] += 1.0
        with pytest.raises(CommError, match=f"rank {n - 1}: deep.1.weight"):
            check_parameters_identical(model.params, comm)


def test_debug_mode_reports_non_finite_gradients(comm, monkeypatch):
    model, _ = _build("wdl", np.float64)
    model.params.zero_grad()
    if comm.rank == comm.size - 1:
        model.params["deep.0.weight"][1, 2] = 0.0
        model.params.param("deep.0.weight").grad[1, 2] = np.nan
    monkeypatch.setenv("HPCTRAIN_DEBUG", "1")
    with pytest.raises(NonFiniteError, match="deep.0.weight"):
        allreduce_gradients(model.params, comm)
    monkeypatch.delenv("HPCTRAIN_DEBUG")
    model.params.zero_grad()
    allreduce_gradients(model.params, comm)  # the world is still usable
