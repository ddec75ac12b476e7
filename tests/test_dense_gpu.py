"""The GPU path of the dense side: CuPy models against NumPy to float32 tolerance, pinned
host<->device transfers, gradient reduction through NCCL or staged MPI. Tests marked gpu
skip without CuPy and a device; the unmarked ones check the NumPy twin of each helper."""
import numpy as np
import pytest

from hpctrain.dense import DLRM, DeepFM, EmbeddingTransfer, WideAndDeep, bce_with_logits
from hpctrain.dense import allreduce_gradients, make_optimizer, to_numpy
from hpctrain.dense.parallel import takes_device_buffers
from hpctrain.dense.transfer import HostStaging, pinned_empty

B = 64


def _models(xp):
    return {
        "dlrm": (DLRM(13, [16] * 8, bottom=[64, 32], top=[64, 32, 1], xp=xp, seed=5), [16] * 8),
        "wdl": (WideAndDeep(13, [1] * 4, [8] * 4, hidden=[64, 32], xp=xp, seed=5),
                [1] * 4 + [8] * 4),
        "deepfm": (DeepFM(13, [8] * 6, hidden=[64, 32], wide_dims=[1, 1], xp=xp, seed=5),
                   [8] * 6 + [1, 1]),
    }


def _batch(dims, step):
    rng = np.random.default_rng([7, step])
    dense = rng.standard_normal((B, 13)).astype(np.float32)
    embs = [(rng.standard_normal((B, d)) * 0.3).astype(np.float32) for d in dims]
    labels = (rng.random(B) > 0.5).astype(np.float32)
    return dense, embs, labels


def _train(model, dims, xp, transfer, steps=3):
    opt = make_optimizer("adam", model.params, lr=1e-3)
    out = []
    for step in range(steps):
        dense, embs, labels = _batch(dims, step)
        logits = model.forward(xp.asarray(dense), transfer.to_device(embs))
        loss, d_logits = bce_with_logits(logits, xp.asarray(labels), denom=B)
        d_embs = [g.copy() for g in transfer.to_host(model.backward(d_logits))]
        opt.step()
        out.append((to_numpy(logits), loss, d_embs))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dlrm", "wdl", "deepfm"])
def test_cupy_training_matches_numpy(name):
    import cupy
    mn, dims = _models(np)[name]
    mc, _ = _models(cupy)[name]
    assert np.array_equal(to_numpy(mc.params.data), mn.params.data)  # same seeded start
    rn = _train(mn, dims, np, EmbeddingTransfer(np))
    rc = _train(mc, dims, cupy, EmbeddingTransfer(cupy))
    for (ln, lossn, dn), (lc, lossc, dc) in zip(rn, rc):
        np.testing.assert_allclose(lc, ln, rtol=1e-4, atol=1e-5)
        assert abs(lossc - lossn) <= 1e-5 * max(1.0, abs(lossn))
        for a, b in zip(dc, dn):
            assert isinstance(a, np.ndarray)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for k, v in mn.params.named().items():
        np.testing.assert_allclose(to_numpy(mc.params[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.gpu
def test_pinned_transfers_round_trip():
    import cupy
    t = EmbeddingTransfer(cupy)
    rng = np.random.default_rng(1)
    for step in range(3):  # buffers are reused: every call must see its own values
        embs = [rng.standard_normal((B, d)).astype(np.float32) for d in (4, 16, 1)]
        dev = t.to_device(embs)
        assert all(isinstance(d, cupy.ndarray) and d.flags.c_contiguous for d in dev)
        back = t.to_host([d * 2 for d in dev])
        for e, b in zip(embs, back):
            np.testing.assert_array_equal(b, e * 2)
    pinned = pinned_empty(10, np.float32)
    assert pinned.size == 10 and pinned.dtype == np.float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mpi", "nccl"])
def test_device_gradients_reduce_through_nccl_or_staged_mpi(backend):
    import cupy
    from hpctrain.comm import create_communicator
    comm = create_communicator(backend)
    assert takes_device_buffers(comm) == (backend == "nccl")
    model, _ = _models(cupy)["dlrm"]
    g = cupy.arange(model.params.size, dtype=cupy.float32)
    for _ in range(2):
        model.params.grad[...] = g
        allreduce_gradients(model.params, comm)
        cupy.cuda.get_current_stream().synchronize()
        np.testing.assert_allclose(to_numpy(model.params.grad), to_numpy(g) * comm.size)


def test_numpy_twins_of_the_gpu_helpers():
    t = EmbeddingTransfer(np)
    embs = [np.ones((3, 2), np.float32), np.zeros((3, 1), np.float32)]
    dev = t.to_device(embs)
    assert all(a is b for a, b in zip(dev, embs))  # no copy on the CPU path
    assert all(a is b for a, b in zip(t.to_host(dev), dev))
    buf = np.arange(5.0)
    assert HostStaging().run(buf, lambda b: b.__imul__(2)) is buf
    np.testing.assert_array_equal(buf, np.arange(5.0) * 2)
    assert pinned_empty(4).shape == (4,)

    # the capability is asked of the communicator, never guessed from its class name
    class NcclCommunicator:
        capabilities = frozenset()

    class CudaAwareMpi:
        capabilities = frozenset({"device_buffers"})

    from hpctrain.comm.debug import DebugCommunicator
    from hpctrain.comm.null import NullCommunicator
    assert not takes_device_buffers(NcclCommunicator())
    assert takes_device_buffers(CudaAwareMpi())
    assert not takes_device_buffers(DebugCommunicator(NullCommunicator()))
    assert not takes_device_buffers(object())
