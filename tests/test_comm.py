"""Single-process communicator tests: factory, chunking helpers, null and debug communicators."""
import numpy as np
import pytest

import hpctrain.comm.mpi as mpi_backend
from hpctrain.comm import backend_names, create_communicator, debug_enabled
from hpctrain.comm.debug import DebugCommunicator, NonFiniteCollectiveError, disagreement
from hpctrain.comm.null import NullCommunicator
from hpctrain.comm.topology import check_launch, device_for_local_rank, ranks_per_host
from hpctrain.errors import CommError, NonFiniteError


def test_factory_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError) as err:
        create_communicator("gloo")
    for name in ("'gloo'", "mpi", "nccl", "null"):
        assert name in str(err.value)
    assert backend_names() == ["mpi", "nccl", "null"]


def test_factory_builds_each_cpu_backend():
    mpi = create_communicator("mpi", debug=False)
    assert isinstance(mpi, mpi_backend.MpiCommunicator) and mpi.size == 1
    assert isinstance(create_communicator("null", debug=False), NullCommunicator)
    assert isinstance(create_communicator("null", debug=True), DebugCommunicator)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_debug_switch_reads_environment(monkeypatch, value, expected):
    monkeypatch.setenv("HPCTRAIN_DEBUG", value)
    assert debug_enabled() is expected
    assert isinstance(create_communicator("null"), DebugCommunicator) is expected


def test_displacements_and_element_counts():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 10, size=17)
    np.testing.assert_array_equal(mpi_backend.displacements(counts),
                                  np.concatenate([[0], np.cumsum(counts)[:-1]]))
    c, d = mpi_backend.element_counts(counts, 4)
    np.testing.assert_array_equal(c, counts * 4)
    np.testing.assert_array_equal(d, np.concatenate([[0], np.cumsum(counts * 4)[:-1]]))
    assert mpi_backend.displacements([]) == []
    assert mpi_backend.displacements(np.array([3, 0, 2])) == [0, 3, 3]


@pytest.mark.parametrize("start,stop,limit", [(0, 0, 3), (0, 10, 3), (5, 9, 4), (2, 3, 1), (7, 100, 13)])
def test_split_ranges_cover_in_order(start, stop, limit):
    ranges = mpi_backend.split_ranges(start, stop, limit)
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(start, stop))
    assert all(0 < b - a <= limit for a, b in ranges)


def test_split_ranges_rejects_bad_limit():
    with pytest.raises(ValueError, match="chunk limit"):
        mpi_backend.split_ranges(0, 5, 0)


def test_default_chunk_limit_is_int_max_and_overridable(monkeypatch):
    comm = mpi_backend.MpiCommunicator()
    assert comm.chunk_limit == 2**31 - 1
    monkeypatch.setattr(mpi_backend, "CHUNK_LIMIT", 4)
    assert comm.chunk_limit == 4
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    np.testing.assert_array_equal(comm.alltoallv(x, [10], [10]), x)


def test_mpi_one_rank_argument_errors():
    comm = mpi_backend.MpiCommunicator()
    with pytest.raises(ValueError, match="op must be"):
        comm.allreduce(np.ones(3), op="max")
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(np.ones((4, 4))[:, 1])
    with pytest.raises(ValueError, match=r"send_counts must have 1 entries \(one per rank\), got 2"):
        comm.alltoallv(np.ones(3), [1, 2], [3])
    with pytest.raises(ValueError, match="recv_counts must be 1 integers, got float64"):
        comm.alltoallv(np.ones(3), [3], np.array([3.0]))
    with pytest.raises(TypeError):
        comm.alltoallv(np.ones(3), [1.5], [3])
    with pytest.raises(ValueError, match="send_counts has negative entries"):
        comm.alltoallv(np.ones(3), [-1], [3])
    with pytest.raises(ValueError, match="sendbuf has 3"):
        comm.alltoallv(np.ones(3), [4], [4])
    with pytest.raises(ValueError, match="recvbuf has 2"):
        comm.alltoallv(np.ones(3), [3], [3], recvbuf=np.empty(2))


def test_null_communicator_is_a_world_of_one():
    comm = NullCommunicator()
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    rng = np.random.default_rng(1)
    buf = rng.standard_normal(8)
    ref = buf.copy()
    assert comm.allreduce(buf, "mean") is buf and comm.iallreduce(buf).wait() is buf
    np.testing.assert_array_equal(buf, ref)
    rows = rng.standard_normal((6, 4)).astype(np.float32)
    recv = comm.alltoall([5])
    assert recv.tolist() == [5]
    out = comm.ialltoallv(rows, [5], recv).wait()
    np.testing.assert_array_equal(out, rows[:5])
    assert comm.bcast({"a": 1}) == {"a": 1} and comm.allgather_object(3) == [3]
    assert isinstance(comm.split(0), NullCommunicator) and comm.split(None) is None
    comm.barrier()


def test_null_communicator_matches_mpi_at_one_rank():
    mpi, null = mpi_backend.MpiCommunicator(), NullCommunicator()
    rows = np.random.default_rng(2).integers(0, 100, size=(9, 2))
    np.testing.assert_array_equal(null.alltoallv(rows, [7], [7]), mpi.alltoallv(rows, [7], [7]))
    with pytest.raises(ValueError, match="sends 7 rows to itself but expects 6"):
        null.alltoallv(rows, [7], [6])


def test_disagreement_names_minority_ranks():
    assert disagreement("x", ["a", "a", "a"]) is None
    msg = disagreement("shape", ["(5,)", "(5,)", "(6,)", "(5,)"])
    assert msg == "ranks disagree on shape: ranks 0, 1, 3: (5,); rank 2: (6,)"


def test_debug_mode_single_rank_checks():
    comm = create_communicator("mpi", debug=True)
    with pytest.raises(CommError, match="rank 0 sends 3 rows to rank 0, which expects 2"):
        comm.alltoallv(np.zeros(3), [3], [2])
    with pytest.raises(CommError, match=r"rank 0 passed \[2\] counts, expected 1"):
        comm.alltoall([1, 1])
    bad = np.array([1.0, np.inf])
    with pytest.raises(NonFiniteError, match="rank 0 contribute NaN or Inf"):
        comm.allreduce(bad)
    with pytest.raises(NonFiniteCollectiveError, match="rank 0 send NaN or Inf"):
        comm.ialltoallv(bad, [2], [2])
    ok = np.arange(4.0)
    np.testing.assert_array_equal(comm.alltoallv(ok, [4], [4]), ok)
    assert comm.bcast(np.ones(2)).sum() == 2 and comm.split(1).size == 1


def test_topology_helpers():
    assert device_for_local_rank(5, 4) == 1
    with pytest.raises(CommError, match="local rank 3: no CUDA device"):
        device_for_local_rank(3, 0)
    assert ranks_per_host(["a", "b", "a"]) == {"a": [0, 2], "b": [1]}


def test_check_launch_detects_srun_without_mpi_plugin():
    comm = NullCommunicator()
    check_launch(comm, {"SLURM_NTASKS": "1"})
    check_launch(comm, {})
    with pytest.raises(CommError, match="SLURM_NTASKS=4.*--mpi="):
        check_launch(comm, {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"})


def test_nccl_without_cupy_is_a_clear_error():
    import importlib.util
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed; tests/test_nccl.py covers the backend")
    with pytest.raises(CommError, match=r"needs CuPy with NCCL \(pip install 'hpctrain\[gpu\]'\)"):
        create_communicator("nccl")


def test_debug_mode_ignores_unwritten_rows_of_a_preallocated_recvbuf():
    comm = create_communicator("mpi", debug=True)
    recvbuf = np.full((5, 2), np.nan)
    out = comm.alltoallv(np.ones((3, 2)), [3], [3], recvbuf=recvbuf)
    assert (out[:3] == 1).all() and np.isnan(out[3:]).all()
    assert (comm.ialltoallv(np.ones((3, 2)), [3], [3], recvbuf=recvbuf).wait()[:3] == 1).all()


def test_direct_calls_binding_and_argument_errors(monkeypatch):
    from mpi4py import MPI

    from hpctrain._kernels.mpi_direct import DirectAllreduce
    from hpctrain.comm import direct

    types = direct.type_handles()
    for char in "fdlqhb":         # every type number of a summable dtype maps to its type
        assert types[np.dtype(char).num] == direct.word(
            mpi_backend.mpi_type(np.dtype(char)).handle)
    assert direct.word(-1) == direct.word((1 << 64) - 1) > 0
    assert np.dtype(bool).num not in types and np.dtype(np.float16).num not in types
    with pytest.raises(ValueError, match="no function address"):
        DirectAllreduce(0, 4, 1, 0, 0, {})
    with pytest.raises(ValueError, match="3 bytes"):
        DirectAllreduce(1, 3, 1, 0, 0, {})
    with pytest.raises(ValueError, match="type number 99"):
        DirectAllreduce(1, 4, 1, 0, 0, {99: 1})
    from hpctrain._kernels.mpi_direct import DirectAlltoallv
    with pytest.raises(ValueError, match="communicator size 0"):
        DirectAlltoallv(1, 4, 0, 0, {})
    with pytest.raises(ValueError, match="DirectAlltoallv: MPI handles of 2 bytes"):
        DirectAlltoallv(1, 2, 0, 1, {})
    assert direct.direct_alltoallv(MPI.COMM_NULL) is None
    monkeypatch.setenv("HPCTRAIN_DIRECT_MPI", "off")
    assert not direct.enabled() and direct.direct_allreduce(MPI.COMM_SELF) is None
    monkeypatch.delenv("HPCTRAIN_DIRECT_MPI")
    assert direct.enabled() and direct.direct_allreduce(MPI.COMM_NULL) is None
    call = direct.direct_allreduce(MPI.COMM_SELF)
    if call is None:
        pytest.skip("direct MPI calls unavailable here")
    buf = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert call(buf) == 0      # one rank: the sum is the array itself
    np.testing.assert_array_equal(buf, np.arange(6).reshape(2, 3))
    a2av = direct.direct_alltoallv(MPI.COMM_SELF)
    recv = np.zeros((3, 2), dtype=np.int64)
    send = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert a2av.call(send, np.array([2]), np.array([2]), recv, 2**31 - 1) == 0
    np.testing.assert_array_equal(recv, [[0, 1], [2, 3], [0, 0]])


def test_direct_call_errors_are_mpi4py_exceptions():
    """An error code from a direct call raises mpi4py's exception for it, as mpi4py's own
    call would (here: calls bound to MPI_COMM_NULL, which MPI refuses with ERR_COMM)."""
    from mpi4py import MPI

    from hpctrain._kernels.mpi_direct import DirectAllreduce, DirectAlltoallv
    from hpctrain.comm import direct
    if direct.direct_allreduce(MPI.COMM_SELF) is None:
        pytest.skip("direct MPI calls unavailable here")
    comm = mpi_backend.MpiCommunicator(MPI.COMM_SELF)
    null, width = direct.word(MPI.COMM_NULL.handle), MPI._sizeof(MPI.Comm)
    comm._direct = DirectAllreduce(direct.find_function("MPI_Allreduce"), width,
                                   direct.word(MPI.IN_PLACE), null, direct.word(MPI.SUM.handle),
                                   direct.type_handles())
    comm._direct_a2av = DirectAlltoallv(direct.find_function("MPI_Alltoallv"), width, null, 1,
                                        direct.type_handles())
    with pytest.raises(MPI.Exception) as err:
        comm.allreduce(np.ones(3))
    assert err.value.Get_error_class() == MPI.ERR_COMM
    with pytest.raises(MPI.Exception) as err:
        comm.alltoallv(np.ones(2), np.array([2]), np.array([2]), np.zeros(2))
    assert err.value.Get_error_class() == MPI.ERR_COMM
