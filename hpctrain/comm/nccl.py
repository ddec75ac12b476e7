"""NCCL communicator on CuPy arrays (``cupy.cuda.nccl``), bootstrapped over MPI.

One GPU per rank: the device is chosen from the node-local rank at construction
(``local_rank % device_count`` unless given) and made current. The NCCL
communicator itself is created lazily, at the first collective, because NCCL
binds to the device that is current when it is created. Its unique id is made
on rank 0 and broadcast over MPI; if rank 0 cannot make one it broadcasts an
error marker, so every rank raises ``CommError`` instead of waiting forever.

Operations are enqueued on CuPy's current stream; non-blocking variants return
a handle that waits on a CUDA event recorded after the operation. Counts of
``alltoall`` stay on the host (MPI); values move with grouped NCCL send/recv.
"""
import numpy as np

from hpctrain.comm.base import Communicator, Handle
from hpctrain.comm.mpi import MpiCommunicator, element_counts
from hpctrain.comm.topology import device_for_local_rank
from hpctrain.errors import CommError

# NCCL enum values (stable across NCCL 2.x); bfloat16 and average need NCCL >= 2.10.
_NCCL_TYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
               "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_SUM, _NCCL_AVG = 0, 4
_V2_10 = 21000


def bootstrap_unique_id(mpi_comm, make_id):
    """Make an id on rank 0 with ``make_id()`` and broadcast it; collective.

    Rank 0 broadcasts ``("error", message)`` instead of an id when ``make_id``
    fails, so no rank is left blocked in the broadcast.

    Raises:
        CommError: on every rank when rank 0 could not make the id.
    """
    msg = None
    if mpi_comm.rank == 0:
        try:
            msg = ("ok", make_id())
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
            msg = ("error", f"{type(exc).__name__}: {exc}")
    msg = mpi_comm.bcast(msg, root=0)
    if msg[0] != "ok":
        raise CommError(f"rank 0 could not create the NCCL unique id ({msg[1]}); "
                        f"rank {mpi_comm.rank} of {mpi_comm.size} gives up")
    return msg[1]


class NcclHandle(Handle):
    """A collective enqueued on a stream; ``wait()`` synchronises on its event."""

    def __init__(self, event, result, finish=None):
        self._event, self._result, self._finish = event, result, finish

    def wait(self):
        """Block the host until the operation is done on the device; return the buffer."""
        self._event.synchronize()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return self._result

    def test(self):
        """True when the device has finished the operation."""
        return self._event.done


class NcclCommunicator(Communicator):
    """Collectives on CuPy arrays through NCCL, one GPU per rank.

    Args:
        mpi_comm: ``mpi4py`` communicator used to bootstrap (default ``COMM_WORLD``).
        device: CUDA device index; default ``local_rank % device_count``.

    Raises:
        CommError: CuPy/NCCL unavailable, or no visible device.
    """

    capabilities = frozenset({"device_buffers"})

    def __init__(self, mpi_comm=None, device=None):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise CommError(f"the nccl communicator needs CuPy with NCCL "
                            f"(pip install 'hpctrain[gpu]'): {exc}") from exc
        self._cp, self._nccl = cupy, nccl
        self._host = MpiCommunicator(mpi_comm)
        self.mpi_comm = self._host.mpi_comm
        self.rank, self.size = self._host.rank, self._host.size
        self.local_rank, self.local_size = self._host.local_rank, self._host.local_size
        if device is None:
            device = device_for_local_rank(self.local_rank, cupy.cuda.runtime.getDeviceCount())
        self.device = int(device)
        cupy.cuda.Device(self.device).use()
        self.nccl_version = nccl.get_version()
        self._comm = None

    def __repr__(self):
        return (f"NcclCommunicator(rank={self.rank}, size={self.size}, device={self.device}, "
                f"nccl={self.nccl_version})")

    @property
    def nccl_comm(self):
        """The ``cupy.cuda.nccl.NcclCommunicator``, created on first use (collective)."""
        if self._comm is None:
            with self._cp.cuda.Device(self.device):
                uid = bootstrap_unique_id(self.mpi_comm, self._nccl.get_unique_id)
                self._comm = self._nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._comm

    def _check(self, buf, name):
        if not isinstance(buf, self._cp.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray on device {self.device}, "
                            f"got {type(buf).__name__}")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use cupy.ascontiguousarray)")
        if buf.device.id != self.device:
            raise ValueError(f"{name} is on device {buf.device.id}, this rank uses {self.device}")

    def _nccl_type(self, dtype):
        name = np.dtype(dtype).name
        if name not in _NCCL_TYPES or (name == "bfloat16" and self.nccl_version < _V2_10):
            raise TypeError(f"NCCL {self.nccl_version} cannot reduce dtype {name}")
        return _NCCL_TYPES[name]

    def _enqueued(self, result, finish=None):
        event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record()
        return NcclHandle(event, result, finish)

    def allreduce(self, buf, op="sum"):
        """In-place sum or mean of ``buf`` (float32/float16/bfloat16/float64/int) over ranks."""
        return self.iallreduce(buf, op).wait()

    def iallreduce(self, buf, op="sum"):
        """Enqueue an in-place allreduce on the current stream; returns a handle."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be one of ('sum', 'mean'), got {op!r}")
        self._check(buf, "buf")
        dtype = self._nccl_type(buf.dtype)
        avg = op == "mean" and self.nccl_version >= _V2_10 and buf.dtype.kind == "f"
        stream = self._cp.cuda.get_current_stream().ptr
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype,
                                 _NCCL_AVG if avg else _NCCL_SUM, stream)
        if op == "mean" and not avg and self.size > 1:
            if buf.dtype.kind == "f":
                buf /= self.size
            else:
                buf //= self.size
        return self._enqueued(buf)

    def alltoall(self, send_counts):
        """Exchange host-side int64 counts over MPI."""
        return self._host.alltoall(self._cp.asnumpy(send_counts)
                                   if isinstance(send_counts, self._cp.ndarray) else send_counts)

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Rows to and from every peer with grouped NCCL send/recv."""
        return self.ialltoallv(sendbuf, send_counts, recv_counts, recvbuf).wait()

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        """Enqueue an ``alltoallv`` (counts in rows, host arrays); returns a handle."""
        self._check(sendbuf, "sendbuf")
        sc = np.asarray(send_counts, dtype=np.int64)
        rc = np.asarray(recv_counts, dtype=np.int64)
        if sc.shape != (self.size,) or rc.shape != (self.size,):
            raise ValueError(f"send/recv counts must have shape ({self.size},), "
                             f"got {sc.shape} and {rc.shape}")
        tail = sendbuf.shape[1:]
        if recvbuf is None:
            recvbuf = self._cp.empty((int(rc.sum()), *tail), dtype=sendbuf.dtype)
        self._check(recvbuf, "recvbuf")
        if recvbuf.shape[1:] != tail or recvbuf.shape[0] < rc.sum() or sc.sum() > sendbuf.shape[0]:
            raise ValueError(f"buffers {sendbuf.shape}/{recvbuf.shape} do not fit counts "
                             f"{sc.tolist()}/{rc.tolist()}")
        row = int(np.prod(tail, dtype=np.int64)) * sendbuf.dtype.itemsize  # bytes per row
        (_, sd), (_, rd) = element_counts(sc, row), element_counts(rc, row)  # byte offsets
        comm, stream = self.nccl_comm, self._cp.cuda.get_current_stream().ptr
        s0, r0 = sendbuf.data.ptr, recvbuf.data.ptr
        self._nccl.groupStart()
        try:
            for p in range(self.size):
                if sc[p]:
                    comm.send(s0 + sd[p], int(sc[p]) * row, _NCCL_TYPES["uint8"], p, stream)
                if rc[p]:
                    comm.recv(r0 + rd[p], int(rc[p]) * row, _NCCL_TYPES["uint8"], p, stream)
        finally:
            self._nccl.groupEnd()
        return self._enqueued(recvbuf)

    def bcast(self, obj, root=0):
        """CuPy arrays in place through NCCL; anything else over MPI."""
        if not isinstance(obj, self._cp.ndarray):
            return self._host.bcast(obj, root)
        self._check(obj, "array")
        stream = self._cp.cuda.get_current_stream().ptr
        self.nccl_comm.bcast(obj.data.ptr, obj.nbytes, _NCCL_TYPES["uint8"], root, stream)
        return self._enqueued(obj).wait()

    def barrier(self):
        """Finish this rank's queued device work, then an MPI barrier."""
        self._cp.cuda.get_current_stream().synchronize()
        self._host.barrier()

    def split(self, color, key=0):
        """An NCCL communicator (same device) over the ranks with the same ``color``."""
        from mpi4py import MPI
        sub = self.mpi_comm.Split(MPI.UNDEFINED if color is None else color, key)
        if sub == MPI.COMM_NULL:
            return None
        return NcclCommunicator(sub, device=self.device)

    def allgather_object(self, obj):
        """Small Python objects over MPI."""
        return self.mpi_comm.allgather(obj)
