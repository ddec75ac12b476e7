"""``python -m hpctrain ...`` (run under ``python -m mpi4py -m hpctrain`` with MPI).

An exception that escapes a command is about to end the job through ``MPI_Abort``
(``python -m mpi4py``), which skips ``MPI_Finalize``: this rank first unlinks the
/dev/shm segments its process maps, so the aborted job leaves none behind.
"""
import sys

from hpctrain.cli import main

try:
    code = main()
except BaseException as exc:
    if not isinstance(exc, SystemExit):
        from hpctrain.comm.shmclean import unlink_own_segments
        unlink_own_segments()
    raise
sys.exit(code)
