"""hpctrain: CTR and recommendation training on MPI/Slurm clusters.

Dense layers train data-parallel (MPI allreduce on CPUs, NCCL on GPUs); sparse
embeddings live in Cython hash tables sharded across ranks and exchanged with
MPI Alltoallv. See DESIGN in the docs for one training step.
"""
__version__ = "0.1.0"

# First, before NumPy's BLAS or the kernels' OpenMP runtime loads: idle threads sleep.
from hpctrain import _idle_threads  # noqa: E402,F401

from hpctrain.errors import (  # noqa: F401
    CheckpointError, CommError, ConfigError, DataError, HpctrainError, NonFiniteError)
