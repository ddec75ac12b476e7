"""The collectives' fast paths give what the checked paths give, at any world size:
allreduce straight to MPI, alltoallv reusing the previous call's checked arguments."""
import numpy as np
import pytest

from hpctrain.comm import mpi as mpi_backend
from hpctrain.comm.mpi import MpiCommunicator

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    return MpiCommunicator()


def _rows(src, dst, n, dim, salt=0.0):
    return (src * 1e4 + dst * 100 + np.arange(n)[:, None] + np.arange(dim) / 10 + salt
            ).astype(np.float32)


def _send(comm, counts, dim, salt=0.0):
    return np.ascontiguousarray(np.concatenate(
        [_rows(comm.rank, p, counts[p], dim, salt) for p in range(comm.size)]))


def _expected(comm, recv_counts, dim, salt=0.0):
    return np.concatenate([_rows(p, comm.rank, recv_counts[p], dim, salt)
                           for p in range(comm.size)])


def _counts(comm, seed):
    rng = np.random.default_rng([seed, comm.rank])
    return rng.integers(0, 5, comm.size).astype(np.int64)


def test_alltoallv_repeated_calls_follow_counts_and_buffers(comm):
    dim = 3
    counts = np.full(comm.size, 4, dtype=np.int64)
    recv_counts = comm.alltoall(counts)
    send = _send(comm, counts, dim)
    recv = np.zeros((int(recv_counts.sum()), dim), np.float32)
    for _ in range(3):      # the second and third calls reuse the first call's arguments
        recv[...] = -1
        assert comm.alltoallv(send, counts, recv_counts, recv) is recv
        np.testing.assert_array_equal(recv, _expected(comm, recv_counts, dim))
    # new values in the same send buffer travel
    send[...] = _send(comm, counts, dim, salt=0.5)
    comm.alltoallv(send, counts, recv_counts, recv)
    np.testing.assert_array_equal(recv, _expected(comm, recv_counts, dim, salt=0.5))
    # the same count arrays refilled in place with other counts
    new = _counts(comm, 7)
    counts[...] = new
    recv_counts[...] = comm.alltoall(new)
    send2 = _send(comm, counts, dim)
    recv2 = np.zeros((int(recv_counts.sum()) + 2, dim), np.float32)
    for _ in range(2):
        comm.alltoallv(send2, counts, recv_counts, recv2)
        np.testing.assert_array_equal(recv2[:int(recv_counts.sum())],
                                      _expected(comm, recv_counts, dim))
    # another receive buffer with the same counts
    recv3 = np.zeros_like(recv2)
    comm.alltoallv(send2, counts, recv_counts, recv3)
    np.testing.assert_array_equal(recv3, recv2)
    # counts as int32 with the same values: the checked path again, same result
    comm.alltoallv(send2, counts.astype(np.int32), recv_counts.astype(np.int32), recv3)
    np.testing.assert_array_equal(recv3, recv2)


def test_alltoallv_reused_arguments_respect_a_lowered_chunk_limit(comm, monkeypatch):
    dim = 2
    counts = np.full(comm.size, 3, dtype=np.int64)
    recv_counts = comm.alltoall(counts)
    send = _send(comm, counts, dim)
    recv = np.zeros((int(recv_counts.sum()), dim), np.float32)
    comm.alltoallv(send, counts, recv_counts, recv)
    monkeypatch.setattr(mpi_backend, "CHUNK_LIMIT", 5)   # now every message splits
    recv[...] = 0
    comm.alltoallv(send, counts, recv_counts, recv)
    np.testing.assert_array_equal(recv, _expected(comm, recv_counts, dim))


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_fast_path_sums_any_contiguous_array(comm, dtype, order):
    a = np.asarray(np.arange(12).reshape(3, 4) * (comm.rank + 1), dtype=dtype, order=order)
    for _ in range(2):
        b = a.copy(order=order)
        assert comm.allreduce(b) is b
        np.testing.assert_array_equal(b, np.arange(12).reshape(3, 4)
                                      * (comm.size * (comm.size + 1) // 2))
    m = np.ascontiguousarray(a)     # the checked path (mean) takes C order
    comm.allreduce(m, op="mean")
    expected = np.arange(12).reshape(3, 4) * (comm.size + 1) / 2
    if np.dtype(dtype).kind == "i":
        expected = np.arange(12).reshape(3, 4) * (comm.size * (comm.size + 1) // 2) // comm.size
    np.testing.assert_allclose(m, expected)


def test_allreduce_refused_buffers_still_name_the_problem(comm):
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(np.ones((4, 4))[:, 1])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        comm.allreduce([1.0, 2.0])


# -- direct MPI_Allreduce (hpctrain.comm.direct) ----------------------------------------

_DIRECT_DTYPES = ["f4", "f8", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "c8", "c16",
                  "l", "q", "L", "Q", "h", "B"]


def _direct_or_skip(comm):
    if comm._direct is None:
        pytest.skip("direct MPI calls unavailable here (hpctrain.comm.direct)")
    return comm._direct


@pytest.mark.parametrize("dtype", _DIRECT_DTYPES)
def test_direct_allreduce_sums_every_mapped_type_like_numpy(comm, dtype):
    direct = _direct_or_skip(comm)
    rng = np.random.default_rng([7, comm.rank])
    dt = np.dtype(dtype)
    a = rng.integers(0, 50, (3, 5))
    if dt.kind == "c":
        a = a + 1j * rng.integers(0, 50, (3, 5))
    a = a.astype(dt)
    everyone = comm.allgather_object(a.copy())
    expected = np.sum(np.stack(everyone), axis=0, dtype=dt)
    b = a.copy()
    assert direct(b) == 0           # MPI summed it: no fallback hid a refusal
    np.testing.assert_array_equal(b, expected)
    c = a.copy()
    assert comm.allreduce(c) is c
    np.testing.assert_array_equal(c, expected)


def test_direct_allreduce_refuses_what_it_cannot_pass_and_the_fallback_sums_it(comm):
    direct = _direct_or_skip(comm)
    frozen = np.ones(4, dtype=np.float32)
    frozen.flags.writeable = False
    swapped = np.ones(4, dtype=">f4" if np.little_endian else "<f4")
    for refused in (np.ones((4, 4))[:, 1], frozen, swapped, np.ones(4, dtype=bool),
                    np.ones(4, dtype=np.float16), [1.0, 2.0], np.float32(1.0)):
        assert direct(refused) == -1
    fortran = np.asfortranarray(np.ones((3, 4)))   # not C order: mpi4py's path takes it
    assert comm.allreduce(fortran) is fortran and (fortran == comm.size).all()
    empty = np.zeros(0, dtype=np.float32)
    assert direct(empty) == 0 and comm.allreduce(empty) is empty


def test_direct_allreduce_is_bound_to_its_own_communicator(comm):
    sub = comm.split(comm.rank % 2)
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    if comm._direct is not None:
        assert sub._direct is not None and sub._direct is not comm._direct
    buf = np.array([comm.rank + 1], dtype=np.int64)
    assert sub.allreduce(buf) is buf
    assert buf[0] == sum(r + 1 for r in members)
    whole = np.array([comm.rank + 1], dtype=np.int64)
    assert comm.allreduce(whole)[0] == comm.size * (comm.size + 1) // 2


def test_direct_calls_off_by_environment_give_the_same_sums(comm, monkeypatch):
    monkeypatch.setenv("HPCTRAIN_DIRECT_MPI", "0")
    off = MpiCommunicator()
    assert off._direct is None
    assert MpiCommunicator(chunk_limit=5)._direct is None     # a caller's limit: checked path
    rng = np.random.default_rng([11, comm.rank])
    a = rng.standard_normal(1000).astype(np.float32)
    b, c = a.copy(), a.copy()
    off.allreduce(b)
    comm.allreduce(c)
    np.testing.assert_array_equal(b, c)   # same MPI call, same order of sums
