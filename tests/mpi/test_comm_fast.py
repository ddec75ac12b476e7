"""The collectives' fast paths give what the checked paths give, at any world size:
allreduce and alltoallv called from C (hpctrain.comm.direct), and with those off, allreduce
straight to mpi4py's call and alltoallv reusing the previous call's checked arguments."""
import os

import numpy as np
import pytest

from hpctrain.comm import mpi as mpi_backend
from hpctrain.comm.mpi import MpiCommunicator

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    return MpiCommunicator()


@pytest.fixture(scope="module")
def comm_mpi4py():
    """A communicator whose calls all go through mpi4py (direct MPI calls off)."""
    old = os.environ.get("HPCTRAIN_DIRECT_MPI")
    os.environ["HPCTRAIN_DIRECT_MPI"] = "0"
    try:
        c = MpiCommunicator()
    finally:
        if old is None:
            del os.environ["HPCTRAIN_DIRECT_MPI"]
        else:
            os.environ["HPCTRAIN_DIRECT_MPI"] = old
    assert c._direct is None and c._direct_a2av is None
    return c


@pytest.fixture(params=["direct", "mpi4py"])
def either(request, comm, comm_mpi4py):
    """Each communicator in turn: direct MPI calls where available, and mpi4py's."""
    return comm if request.param == "direct" else comm_mpi4py


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


def test_alltoallv_repeated_calls_follow_counts_and_buffers(either):
    comm = either
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


def test_alltoallv_reused_arguments_respect_a_lowered_chunk_limit(either, monkeypatch):
    comm = either
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


@pytest.mark.parametrize("dtype", ["f4", "f8", "i8", "i4", "u1", "c8"])
@pytest.mark.parametrize("tail", [(), (3,), (2, 2)])
def test_direct_alltoallv_moves_rows_as_mpi4py_does(comm, comm_mpi4py, dtype, tail):
    direct = comm._direct_a2av
    if direct is None:
        pytest.skip("direct MPI calls unavailable here (hpctrain.comm.direct)")
    rng = np.random.default_rng([5, comm.rank])
    counts = rng.integers(0, 4, comm.size).astype(np.int64)
    counts[comm.rank % comm.size] = 0                   # an empty block, too
    recv_counts = comm.alltoall(counts)
    send = rng.integers(0, 100, (int(counts.sum()), *tail)).astype(dtype)
    a = np.full((int(recv_counts.sum()) + 1, *tail), 7, dtype=dtype)   # one row spare
    b = a.copy()
    assert direct.call(send, counts, recv_counts, a, mpi_backend.CHUNK_LIMIT) == 0
    assert comm_mpi4py.alltoallv(send, counts, recv_counts, b) is b
    np.testing.assert_array_equal(a, b)
    assert (a[-1] == 7).all()                           # nothing past the counts written
    everyone = comm.allgather_object((send, counts))    # and what each peer sent here
    expected = [s[int(c[:comm.rank].sum()):int(c[:comm.rank + 1].sum())] for s, c in everyone]
    np.testing.assert_array_equal(a[:-1], np.concatenate(expected))


def test_direct_alltoallv_refusals_fall_back_to_the_checked_path(comm):
    direct = comm._direct_a2av
    if direct is None:
        pytest.skip("direct MPI calls unavailable here (hpctrain.comm.direct)")
    P, lim = comm.size, mpi_backend.CHUNK_LIMIT
    ones = np.ones(P, dtype=np.int64)
    send, recv = np.ones((P, 2), np.float32), np.zeros((P, 2), np.float32)
    frozen = recv.copy()
    frozen.flags.writeable = False
    refused = [
        (send, list(ones), ones, recv),                         # counts not arrays
        (send, ones[:-1] if P > 1 else ones[:0], ones, recv),   # wrong length
        (send, ones.astype(np.int32), ones, recv),              # not int64
        (send, ones.astype(np.uint64), ones, recv),             # not signed
        (send, ones * -1, ones, recv),                          # negative
        (send, ones * 2, ones, recv),                           # more rows than sendbuf
        (send, ones, ones * 2, recv),                           # more rows than recvbuf
        (np.ones((P, 2), np.float64), ones, ones, recv),        # dtypes differ
        (np.ones((P, 3), np.float32), ones, ones, recv),        # rows differ
        (np.ones((P, 2), np.float16), ones, ones, np.zeros((P, 2), np.float16)),  # no type
        (np.ones((2, P))[:, :1].T, ones, ones, recv),           # not contiguous
        (send, ones, ones, frozen),                             # not writeable
        (send, ones, ones, None),
    ]
    for args in refused:
        assert direct.call(*args, lim) == -1
    assert direct.call(send, ones, ones, recv, 1) == -1         # past the element limit
    assert direct.call(send, ones, ones, recv, 2 * P) == 0 and (recv == 1).all()
    # what the checked path then says, on every rank alike
    with pytest.raises(ValueError, match="send_counts sum to"):
        comm.alltoallv(send, ones * 2, ones, recv)
    with pytest.raises(ValueError, match="recvbuf is float64"):
        comm.alltoallv(send, ones, ones, np.zeros((P, 2)))
    comm.barrier()
