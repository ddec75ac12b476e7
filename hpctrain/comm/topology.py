"""Where ranks sit: node-local rank/size, the GPU of a rank, launcher sanity checks.

Node-local ranks come from gathering ``MPI.Get_processor_name()`` and splitting
the communicator by host, never from launcher variables, so the same code gives
the same answer under ``mpiexec``, ``mpirun`` and ``srun``.
"""
import os

from hpctrain.errors import CommError


def node_local(mpi_comm):
    """This rank's rank and size among the ranks of ``mpi_comm`` on the same host.

    Collective over ``mpi_comm``.

    Args:
        mpi_comm: an ``mpi4py`` intracommunicator.

    Returns:
        ``(local_rank, local_size, hosts)`` with ``hosts`` the processor name of every rank.
    """
    from mpi4py import MPI
    hosts = mpi_comm.allgather(MPI.Get_processor_name())
    if mpi_comm.size == 1:
        return 0, 1, hosts
    color = sorted(set(hosts)).index(hosts[mpi_comm.rank])
    local = mpi_comm.Split(color, mpi_comm.rank)
    try:
        return local.rank, local.size, hosts
    finally:
        local.Free()


def ranks_per_host(hosts):
    """``{host: [ranks]}`` in rank order, from the list ``node_local`` returns."""
    out = {}
    for rank, host in enumerate(hosts):
        out.setdefault(host, []).append(rank)
    return out


def device_for_local_rank(local_rank, num_devices):
    """The GPU index a rank drives: its node-local rank modulo the visible devices.

    Raises:
        CommError: when no device is visible.
    """
    if num_devices < 1:
        raise CommError(f"local rank {local_rank}: no CUDA device visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return local_rank % num_devices


def check_launch(mpi_comm, environ=None):
    """Raise when Slurm started several tasks but each one became its own MPI world.

    This is what ``srun`` without a matching ``--mpi=`` plugin does: every task
    initialises MPI as a singleton and silently trains alone.

    Raises:
        CommError: ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``) > 1 while the MPI
            world has size 1.
    """
    env = os.environ if environ is None else environ
    # The step's task count when srun set it, else the allocation's.
    var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    try:
        ntasks = int(env.get(var, "1") or 1)
    except ValueError:
        ntasks = 1
    if ntasks > 1 and mpi_comm.size == 1:
        raise CommError(
            f"Slurm started {var}={ntasks} tasks but this MPI world has size 1 "
            f"(SLURM_PROCID={env.get('SLURM_PROCID', '?')}): each task initialised MPI on its own. "
            "srun must launch with the PMI plugin your MPI library was built for, e.g. "
            "`srun --mpi=pmix ...` (Open MPI, recent MPICH) or `srun --mpi=pmi2 ...` "
            "(MPICH wheels); `srun --mpi=list` shows what this cluster offers. "
            "Alternatively start the job with `mpiexec -n N` inside the allocation.")
