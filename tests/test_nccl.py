"""NCCL communicator on CuPy arrays (a world of one rank is still a real NCCL communicator)."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def comm():
    from hpctrain.comm import create_communicator
    return create_communicator("nccl", debug=False)


@pytest.fixture(scope="module")
def cp():
    import cupy
    return cupy


def test_device_chosen_from_local_rank(comm, cp):
    assert comm.device == comm.local_rank % cp.cuda.runtime.getDeviceCount()
    assert cp.cuda.Device().id == comm.device


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_matches_numpy_twice(comm, cp, dtype, op):
    rng = np.random.default_rng(3)
    for _ in range(2):
        host = (rng.standard_normal(1001) * 10).astype(dtype)
        buf = cp.asarray(host)
        out = comm.allreduce(buf, op=op)
        assert out is buf
        expected = host * comm.size if op == "sum" else host
        np.testing.assert_allclose(cp.asnumpy(buf).astype(np.float64),
                                   expected.astype(np.float64), rtol=1e-2)


def test_allreduce_bfloat16_where_supported(comm, cp):
    try:
        buf = cp.ones(64, dtype="bfloat16")
    except TypeError:
        pytest.skip("this CuPy has no bfloat16 arrays")
    comm.allreduce(buf)
    assert float(buf.astype(cp.float32).sum()) == 64 * comm.size


def test_iallreduce_and_alltoallv(comm, cp):
    buf = cp.arange(10, dtype=cp.float32)
    h = comm.iallreduce(buf)
    assert h.wait() is buf
    np.testing.assert_array_equal(cp.asnumpy(buf), np.arange(10) * comm.size)
    rows = cp.asarray(np.random.default_rng(0).standard_normal((5 * comm.size, 3)),
                      dtype=cp.float32)
    counts = np.full(comm.size, 5, dtype=np.int64)
    for _ in range(2):
        out = comm.ialltoallv(rows, counts, comm.alltoall(counts)).wait()
        assert out.shape == rows.shape
        if comm.size == 1:
            np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(rows))


def test_bcast_split_barrier(comm, cp):
    arr = cp.full(7, comm.rank + 1.0)
    comm.bcast(arr, root=0)
    np.testing.assert_array_equal(cp.asnumpy(arr), np.ones(7))
    assert comm.bcast({"k": 1}) == {"k": 1}
    sub = comm.split(0)
    buf = cp.ones(3, dtype=cp.float32)
    sub.allreduce(buf)
    assert float(buf[0]) == sub.size
    comm.barrier()


def test_rejects_host_arrays(comm):
    with pytest.raises(TypeError, match="cupy.ndarray"):
        comm.allreduce(np.ones(3, dtype=np.float32))
