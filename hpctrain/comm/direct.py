"""Binding ``MPI_Allreduce`` and ``MPI_Alltoallv`` for direct calls from C
(``hpctrain._kernels.mpi_direct``).

``direct_allreduce(mpi_comm)`` and ``direct_alltoallv(mpi_comm)`` return a
``DirectAllreduce`` / ``DirectAlltoallv`` for that communicator, or None where it cannot
be bound safely, in which case the caller keeps calling mpi4py:

* ``HPCTRAIN_DIRECT_MPI=0`` (also ``false``/``no``/``off``) turns it off;
* the platform has no ``/proc/self/maps`` or ``dlopen`` (not Linux);
* MPI's handles are neither ``int`` nor pointer sized;
* no library in the process exports the function, or two different ones do.

A function is looked up the way mpi4py's own calls resolve it: first in the process's
global symbol scope (where an ``LD_PRELOAD``-ed profiling library would put its
``MPI_Allreduce`` ahead of the MPI library's), then in the MPI library mpi4py loaded
(the one library named ``libmpi*`` in the process that exports it). Handle values
(communicator, datatypes, ``MPI_SUM``, ``MPI_IN_PLACE``) are mpi4py's.
"""
import ctypes
import functools
import logging
import os

import numpy as np
from mpi4py import MPI

log = logging.getLogger(__name__)

_OFF = ("0", "false", "no", "off")
_addresses = {}             # function name -> address once looked up (0: not found)

# NumPy dtypes with a predefined MPI type that MPI_SUM takes; every NumPy type number
# that names one of them (e.g. both "l" and "q" for int64 on LP64) maps to it.
_SUMMABLE = [("f4", "FLOAT"), ("f8", "DOUBLE"), ("i8", "INT64_T"), ("i4", "INT32_T"),
             ("i2", "INT16_T"), ("i1", "INT8_T"), ("u8", "UINT64_T"), ("u4", "UINT32_T"),
             ("u2", "UINT16_T"), ("u1", "UINT8_T"), ("c8", "C_FLOAT_COMPLEX"),
             ("c16", "C_DOUBLE_COMPLEX")]


def word(value):
    """``value`` (a handle or address as mpi4py gives it: signed, or sign-extended
    unsigned) as an unsigned machine word."""
    return int(value) & ((1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1)


def enabled():
    """False when ``HPCTRAIN_DIRECT_MPI`` turns direct calls off."""
    return os.environ.get("HPCTRAIN_DIRECT_MPI", "1").strip().lower() not in _OFF


def _mapped_mpi_libraries():
    """Paths of the shared libraries named ``libmpi*`` mapped into this process."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.startswith("/") and os.path.basename(path).startswith("libmpi") \
                        and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    return paths


def _symbol(lib, name):
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


def find_function(name):
    """The address of the MPI function ``name`` that mpi4py's calls reach, or 0 (cached)."""
    if name not in _addresses:
        _addresses[name] = _find(name)
    return _addresses[name]


def _find(name):
    if not hasattr(os, "RTLD_NOLOAD"):
        return 0
    try:
        addr = _symbol(ctypes.CDLL(None), name)     # global scope: preloaded tools first
    except OSError:
        addr = 0
    if addr:
        return addr
    found = set()
    for path in _mapped_mpi_libraries():
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        addr = _symbol(lib, name)
        if addr:
            found.add(addr)
    if len(found) != 1:
        log.debug("direct MPI calls off: %d MPI libraries export %s", len(found), name)
        return 0
    return found.pop()


@functools.cache
def type_handles():
    """{NumPy type number: MPI datatype handle} for the summable predefined types (the same
    for every communicator of the process: built once; callers only read it)."""
    by_dtype = {np.dtype(k): getattr(MPI, name).handle for k, name in _SUMMABLE}
    out = {}
    for char in np.typecodes["All"]:
        try:
            dt = np.dtype(char)
        except TypeError:
            continue
        h = by_dtype.get(dt)
        if h is not None and dt.isnative:
            out[dt.num] = word(h)
    return out


def _binding(mpi_comm, name):
    """``(address, handle bytes)`` of MPI function ``name`` for direct calls on
    ``mpi_comm``, or None (see the module docstring)."""
    if not enabled() or mpi_comm == MPI.COMM_NULL:
        return None
    addr = find_function(name)
    try:
        handle_bytes = MPI._sizeof(MPI.Comm)        # mpi4py >= 4: sizeof(MPI_Comm)
    except (AttributeError, TypeError):
        return None
    if not addr or handle_bytes not in (4, ctypes.sizeof(ctypes.c_void_p)):
        return None
    return addr, handle_bytes


def direct_allreduce(mpi_comm):
    """A ``DirectAllreduce`` on ``mpi_comm``, or None where direct calls are off or
    unavailable (the reasons in the module docstring)."""
    bound = _binding(mpi_comm, "MPI_Allreduce")
    if bound is None:
        return None
    from hpctrain._kernels.mpi_direct import DirectAllreduce
    return DirectAllreduce(*bound, word(MPI.IN_PLACE), word(mpi_comm.handle),
                           word(MPI.SUM.handle), type_handles())


def direct_alltoallv(mpi_comm):
    """A ``DirectAlltoallv`` on ``mpi_comm``, or None (as ``direct_allreduce``)."""
    bound = _binding(mpi_comm, "MPI_Alltoallv")
    if bound is None or mpi_comm.Is_inter():    # counts per remote rank: not this call
        return None
    from hpctrain._kernels.mpi_direct import DirectAlltoallv
    return DirectAlltoallv(*bound, word(mpi_comm.handle), mpi_comm.Get_size(), type_handles())
