"""Where the dense side computes: the config's ``device`` as an array module, a GPU and
the communicator of the gradient allreduce.

=========  ======  ======================================  ================================
device     xp      GPU of a rank                           dense gradient allreduce
=========  ======  ======================================  ================================
``cpu``    NumPy   none                                    the trainer's communicator (MPI)
``gpu``    CuPy    ``local_rank % visible devices``        NCCL over the same ranks
=========  ======  ======================================  ================================

Embedding tables stay in host memory either way; on a GPU only pooled rows and their
gradients cross, through pinned buffers and copy streams (``transfer.StepTransfer``).
``select_device`` is the one place that decides, and the one place where "no CuPy" or
"no GPU" becomes a ``ConfigError`` naming ``device`` (one line, before any collective).

The local rank comes from the communicator (processor names, not launcher variables),
so under ``srun --gpus-per-task=1`` every rank sees one device and takes device 0 of its
own view, and under ``mpiexec`` with all GPUs visible rank ``i`` of a node takes GPU ``i``.

TF32: CuPy computes float32 matrix products in full float32 unless ``CUPY_TF32=1`` is in
the environment when CuPy is imported. hpctrain leaves it off, so GPU losses follow the
CPU's to float32 rounding; ``tf32_enabled()`` reports the setting (``hpctrain info``,
benchmark JSON).
"""
import contextlib
import os

import numpy as np

from hpctrain.comm.topology import device_for_local_rank
from hpctrain.dense.streams import CudaOps, DevicePhases
from hpctrain.errors import CommError, ConfigError

#: The values of the config key ``device``.
DEVICES = ("cpu", "gpu")


def tf32_enabled(environ=None):
    """Whether CuPy was asked for TF32 matrix products (``CUPY_TF32`` set and not 0)."""
    env = os.environ if environ is None else environ
    return env.get("CUPY_TF32", "0").strip() not in ("", "0")


class Device:
    """The dense side's array module, its GPU, and the device-side plumbing.

    Args:
        kind: "cpu" or "gpu".
        xp: the array module (numpy or cupy).
        index: the CUDA device of this rank (None on CPU).
        name: the device's name, for reports.
        ops: ``CudaOps`` on a GPU, ``HostOps`` for the NumPy twin of the GPU path,
            None on CPU. With ops, the trainer runs its device step (pinned transfers,
            copy streams, events) instead of the plain NumPy step.
        source: the config's file name, for error messages.

    Attributes:
        phases: a ``DevicePhases`` (None on CPU) recording device-side phase times.
    """

    def __init__(self, kind, xp, index=None, name=None, ops=None, source="<config>"):
        self.kind, self.xp, self.index, self.ops, self.source = kind, xp, index, ops, source
        self.name = name or ("cpu" if index is None else f"cuda:{index}")
        self.phases = DevicePhases(ops) if ops is not None else None

    def __repr__(self):
        return f"Device({self.kind!r}, {self.name!r}, xp={self.xp.__name__})"

    @property
    def pipelined(self):
        """True when steps go through the device path (transfers on streams)."""
        return self.ops is not None

    def collective(self, comm):
        """The communicator of the dense allreduce over the ranks of ``comm``.

        Host arrays: ``comm`` itself. Device arrays: an NCCL communicator over the same
        ranks, bound to this rank's GPU (created collectively; NCCL's own communicator
        follows lazily at the first allreduce).

        Raises:
            ConfigError: CuPy has no usable NCCL (naming ``device``).
        """
        if self.xp is np:
            return comm
        from hpctrain.comm import create_communicator
        try:
            nccl = create_communicator("nccl", mpi_comm=comm.mpi_comm, device=self.index)
        except CommError as exc:
            raise ConfigError(f"{self.source}: device: \"gpu\" allreduces dense gradients with "
                              f"NCCL: {exc}") from None
        if nccl.size != comm.size:
            raise ConfigError(f"{self.source}: device: \"gpu\" needs an MPI communicator under "
                              f"the trainer's ({comm.size} ranks), got one of {nccl.size}")
        return nccl

    def phase(self, name):
        """A context manager timing ``name`` on the current stream (nothing on CPU)."""
        return self.phases.span(name) if self.phases is not None else contextlib.nullcontext()

    def take_phases(self, wait=False):
        """Device seconds per phase completed so far (``DevicePhases.take``); {} on CPU."""
        return self.phases.take(wait) if self.phases is not None else {}

    def synchronize(self):
        """Wait until this device has finished everything queued (benchmarks, tests)."""
        if self.xp is not np:
            self.xp.cuda.Device(self.index).synchronize()


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def gpu_unavailable(source="<config>"):
    """Why ``device = "gpu"`` cannot run in this process, as one line; None when it can."""
    try:
        select_device("gpu", 0, source, use=False)
    except ConfigError as exc:
        return str(exc)
    return None


def select_device(kind, local_rank=0, source="<config>", use=True):
    """The ``Device`` for the config's ``device`` on a rank with node-local rank ``local_rank``.

    Args:
        kind: "cpu" or "gpu".
        local_rank: this rank's rank among the ranks of its host.
        source: the config's name, for the error message.
        use: make the chosen GPU current (``cupy.cuda.Device(i).use()``).

    Raises:
        ConfigError: an unknown kind; "gpu" without CuPy or without a visible CUDA device.
    """
    if kind == "cpu":
        return Device("cpu", np, source=source)
    if kind != "gpu":
        raise ConfigError(f"{source}: device: expected one of {', '.join(map(repr, DEVICES))}, "
                          f"got {kind!r}")
    where = f"{source}: device: \"gpu\""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuPy that fails to load CUDA
        raise ConfigError(f"{where} needs CuPy, which cannot be imported here ({_one_line(exc)});"
                          f" install it with pip install -e '.[gpu]', or set device = \"cpu\"") \
            from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device: CUDA runtime errors
        raise ConfigError(f"{where}: CuPy {cupy.__version__} finds no usable CUDA device "
                          f"({_one_line(exc)}); set device = \"cpu\" on this machine") from None
    if count < 1:
        raise ConfigError(f"{where}: CuPy {cupy.__version__} sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          f"set device = \"cpu\" on this machine")
    index = device_for_local_rank(local_rank, count)
    try:
        name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if use:
            cupy.cuda.Device(index).use()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{where}: CUDA device {index} of this rank (local rank "
                          f"{local_rank}) cannot be used ({_one_line(exc)})") from None
    return Device("gpu", cupy, index, name=f"cuda:{index} {name}", ops=CudaOps(cupy),
                  source=source)
