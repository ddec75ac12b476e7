"""MpiCommunicator collectives against closed forms and NumPy, at any world size."""
import numpy as np
import pytest
from mpi4py import MPI

from hpctrain.comm import create_communicator
from hpctrain.comm.debug import NonFiniteCollectiveError
from hpctrain.comm.mpi import MpiCommunicator
from hpctrain.errors import CommError

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    return create_communicator("mpi", debug=False)


def count_matrix(size, seed, high=6):
    """Random rows[i, p] sent by rank i to p, with zero-length peers on purpose."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, high, size=(size, size))
    c[:, size // 2] = 0               # nobody sends to this rank
    c[size - 1, :] = 0 if size > 1 else c[size - 1, :]   # the last rank sends nothing
    c[0, 0] = max(c[0, 0], 1)        # and some rank keeps rows for itself
    return c


def rows_for(src, dst, n, tail, dtype):
    """Closed form of the rows src sends to dst: value = src*1e4 + dst*100 + row + col/10."""
    row = np.arange(n, dtype=np.float64).reshape(-1, *([1] * len(tail)))
    col = np.arange(int(np.prod(tail)), dtype=np.float64).reshape(tail) / 10 if tail else 0.0
    out = src * 1e4 + dst * 100 + row + col
    return np.ascontiguousarray(np.broadcast_to(out, (n, *tail)), dtype=dtype)


def exchange(comm, counts, tail, dtype, nonblocking=False, recvbuf=None):
    r = comm.rank
    send = np.concatenate([rows_for(r, p, counts[r, p], tail, dtype) for p in range(comm.size)])
    recv_counts = comm.alltoall(counts[r])
    assert recv_counts.tolist() == counts[:, r].tolist()
    if nonblocking:
        out = comm.ialltoallv(send, counts[r], recv_counts, recvbuf).wait()
    else:
        out = comm.alltoallv(send, counts[r], recv_counts, recvbuf)
    expected = np.concatenate([rows_for(p, r, counts[p, r], tail, dtype)
                               for p in range(comm.size)])
    return out, expected


def test_rank_size_and_local_rank(comm):
    assert (comm.rank, comm.size) == (MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size)
    layout = comm.allgather_object((MPI.Get_processor_name(), comm.local_rank, comm.local_size))
    for host in {h for h, _, _ in layout}:
        local = [(lr, ls) for h, lr, ls in layout if h == host]
        assert sorted(lr for lr, _ in local) == list(range(len(local)))
        assert all(ls == len(local) for _, ls in local)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_sum_closed_form_twice(comm, dtype):
    for _ in range(2):  # twice: catches lazy-initialisation bugs
        buf = np.full(7, comm.rank + 1, dtype=dtype)
        assert comm.allreduce(buf) is buf
        assert (buf == comm.size * (comm.size + 1) // 2).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("chunk_limit", [None, 3])
def test_allreduce_random_matches_numpy(dtype, chunk_limit):
    comm = MpiCommunicator(chunk_limit=chunk_limit)
    rng = np.random.default_rng(100 + comm.rank)
    buf = (rng.standard_normal((5, 11)) * 100).astype(dtype)
    everyone = comm.allgather_object(buf.copy())
    expected = np.sum(np.stack(everyone).astype(np.float64), axis=0)
    comm.allreduce(buf, op="sum")
    np.testing.assert_allclose(buf, expected.astype(dtype), rtol=1e-5, atol=1e-3)


def test_allreduce_mean(comm):
    f = np.full(4, float(comm.rank), dtype=np.float64)
    comm.allreduce(f, op="mean")
    np.testing.assert_allclose(f, (comm.size - 1) / 2)
    i = np.full(4, comm.rank, dtype=np.int64)
    comm.allreduce(i, op="mean")
    assert (i == (comm.size * (comm.size - 1) // 2) // comm.size).all()


def test_iallreduce_two_outstanding(comm):
    a = np.full(1000, comm.rank + 1.0)
    b = np.full(10, 2 * comm.rank, dtype=np.int64)
    ha, hb = comm.iallreduce(a), comm.iallreduce(b, op="mean")
    assert hb.wait() is b and ha.wait() is a
    assert ha.wait() is a  # wait twice is harmless
    assert (a == comm.size * (comm.size + 1) / 2).all()
    assert (b == comm.size - 1).all()


def test_alltoall_counts(comm):
    send = np.array([comm.rank * 1000 + p for p in range(comm.size)], dtype=np.int64)
    for _ in range(2):
        assert comm.alltoall(send).tolist() == [p * 1000 + comm.rank for p in range(comm.size)]


@pytest.mark.parametrize("tail,dtype", [((), np.int64), ((3,), np.float32), ((2, 2), np.float64)])
def test_alltoallv_uneven_with_zero_peers(comm, tail, dtype):
    for seed in (1, 2):  # twice, with different counts
        counts = count_matrix(comm.size, seed)
        out, expected = exchange(comm, counts, tail, dtype)
        assert out.shape == expected.shape and out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("chunk_limit", [1, 2, 5, 7, 40, 1000])
def test_alltoallv_chunked_path(chunk_limit):
    """Small limits: all point-to-point (1, 2), heads plus tails with packed heads (5, 7),
    tails without packing (40), one plain Alltoallv (1000)."""
    comm = MpiCommunicator(chunk_limit=chunk_limit)
    counts = count_matrix(comm.size, 3, high=9)
    for tail in [(), (3,)]:  # 3 elements per row: chunks cut rows in the middle
        out, expected = exchange(comm, counts, tail, np.float64)
        np.testing.assert_array_equal(out, expected)
        out, expected = exchange(comm, counts, tail, np.float64, nonblocking=True)
        np.testing.assert_array_equal(out, expected)


def test_alltoallv_chunked_when_only_one_rank_is_large():
    """Ranks with small messages take the plain path while rank 0 splits its own."""
    comm = MpiCommunicator(chunk_limit=10)
    counts = np.ones((comm.size, comm.size), dtype=np.int64)
    counts[0, :] = 11
    out, expected = exchange(comm, counts, (), np.int64)
    np.testing.assert_array_equal(out, expected)


def test_alltoallv_into_larger_preallocated_buffer(comm):
    counts = count_matrix(comm.size, 4)
    total = int(counts[:, comm.rank].sum())
    recvbuf = np.full((total + 3, 2), -1.0, dtype=np.float32)
    out, expected = exchange(comm, counts, (2,), np.float32, nonblocking=True, recvbuf=recvbuf)
    assert out is recvbuf
    np.testing.assert_array_equal(out[:total], expected)
    assert (out[total:] == -1).all()


def test_alltoallv_matches_single_rank_permutation(comm):
    """Random ids routed to owners and back arrive in their original order."""
    rng = np.random.default_rng(7 + comm.rank)
    ids = rng.integers(0, 1 << 40, size=50 + comm.rank)
    owner = ids % comm.size
    order = np.argsort(owner, kind="stable")
    send_counts = np.bincount(owner, minlength=comm.size)
    recv_counts = comm.alltoall(send_counts)
    got = comm.alltoallv(ids[order], send_counts, recv_counts)
    assert (got % comm.size == comm.rank).all()
    back = comm.alltoallv(got * 2, recv_counts, send_counts)
    restored = np.empty_like(back)
    restored[order] = back
    np.testing.assert_array_equal(restored, ids * 2)


def test_bcast_array_and_object(comm):
    root = comm.size - 1
    arr = np.arange(10.0) if comm.rank == root else np.zeros(10)
    assert comm.bcast(arr, root=root) is arr
    np.testing.assert_array_equal(arr, np.arange(10.0))
    obj = {"step": 3, "rank": comm.rank}
    assert comm.bcast(obj, root=root) == {"step": 3, "rank": root}
    chunked = MpiCommunicator(chunk_limit=3)
    big = np.arange(11, dtype=np.int64) * (comm.rank == 0)
    np.testing.assert_array_equal(chunked.bcast(big), np.arange(11))


def test_split_and_barrier(comm):
    sub = comm.split(comm.rank % 2, key=-comm.rank)
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    assert sub.size == len(members)
    assert sub.rank == sorted(members, reverse=True).index(comm.rank)
    buf = np.array([comm.rank], dtype=np.int64)
    sub.allreduce(buf)
    assert buf[0] == sum(members)
    sub.barrier()
    comm.barrier()
    none = comm.split(None if comm.rank == 0 else 1)
    assert (none is None) == (comm.rank == 0)


def test_debug_mode_names_rank_with_other_shape():
    comm = create_communicator("mpi", debug=True)
    odd = comm.size - 1
    buf = np.ones(5 if comm.rank != odd or comm.size == 1 else 6, dtype=np.float32)
    if comm.size == 1:
        buf = buf.astype(np.float64)  # nobody to disagree with: the call just works
        assert (comm.allreduce(buf) == 1).all()
        return
    with pytest.raises(CommError, match=rf"rank {odd}: shape=\(6,\)"):
        comm.allreduce(buf)
    comm.barrier()  # everyone raised, nobody is stuck in the collective


def test_debug_mode_names_alltoallv_count_mismatch():
    comm = create_communicator("mpi", debug=True)
    counts = np.ones((comm.size, comm.size), dtype=np.int64)
    recv_counts = counts[:, comm.rank].copy()
    peer = comm.size - 1
    if comm.rank == peer:
        recv_counts[0] = 2  # expects 2 rows from rank 0, which sends 1
    send = np.zeros(comm.size, dtype=np.float64)
    with pytest.raises(CommError, match=f"rank 0 sends 1 rows to rank {peer}, which expects 2"):
        comm.alltoallv(send, counts[comm.rank], recv_counts)
    comm.barrier()


def test_debug_mode_names_rank_with_nan_and_passes_good_calls():
    comm = create_communicator("mpi", debug=True)
    buf = np.ones(3)
    if comm.rank == comm.size - 1:
        buf[1] = np.nan
    with pytest.raises(NonFiniteCollectiveError, match=f"rank {comm.size - 1} contribute"):
        comm.allreduce(buf)
    good = np.full(3, 1.0)
    for _ in range(2):
        good[:] = 1.0
        assert (comm.iallreduce(good).wait() == comm.size).all()
    counts = np.ones(comm.size, dtype=np.int64)
    out = comm.ialltoallv(np.full(comm.size, float(comm.rank)), counts, comm.alltoall(counts))
    np.testing.assert_array_equal(out.wait(), np.arange(comm.size, dtype=np.float64))


def test_nccl_bootstrap_broadcasts_id_or_error_marker(comm):
    """The id bootstrap of the NCCL backend, with stand-in id makers (no GPU needed)."""
    from hpctrain.comm.nccl import bootstrap_unique_id

    made = []
    uid = bootstrap_unique_id(comm.mpi_comm, lambda: made.append(1) or tuple(range(8)))
    assert uid == tuple(range(8)) and len(made) == (comm.rank == 0)

    def broken():
        raise RuntimeError("ncclGetUniqueId failed: no network interface")
    with pytest.raises(CommError, match=rf"rank 0 could not create.*no network.*rank {comm.rank}"):
        bootstrap_unique_id(comm.mpi_comm, broken)
    comm.barrier()  # nobody hangs in the broadcast
