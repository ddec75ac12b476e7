# cython: language_level=3
"""``MPI_Allreduce`` called straight from C for small in-place sums.

mpi4py's ``Comm.Allreduce`` spends about 0.3 us per call turning its Python arguments
into MPI's (buffer parsing, datatype lookup, count checks), which is 5-8% of a 4 us
allreduce of a few bytes between ranks of one node. ``DirectAllreduce`` makes the same
call with the arguments read off the NumPy array's header, on the same communicator,
through the same ``MPI_Allreduce`` symbol mpi4py resolves, with the GIL released as
mpi4py releases it.

It is built without ``mpi.h``: the MPI library's own ``MPI_Allreduce`` address, its
handle width and its handle values (communicator, datatypes, ``MPI_SUM``,
``MPI_IN_PLACE``) come from mpi4py at run time (``hpctrain.comm.direct``). MPI
implementations pass handles either as ``int`` (MPICH, Intel MPI, MVAPICH) or as a
pointer (Open MPI, the MPI-5 standard ABI); both are supported, anything else is not
bound and the caller keeps using mpi4py.
"""
from libc.stdint cimport int32_t, uintptr_t

cimport numpy as cnp

cnp.import_array()

ctypedef int (*allreduce_int_handles)(const void*, void*, int, int32_t, int32_t,
                                      int32_t) noexcept nogil
ctypedef int (*allreduce_ptr_handles)(const void*, void*, int, void*, void*,
                                      void*) noexcept nogil

cdef enum:
    MAX_TYPENUM = 64        # NumPy's builtin type numbers are below this
    INT_MAX_COUNT = 2147483647


cdef class DirectAllreduce:
    """``MPI_Allreduce(MPI_IN_PLACE, buf, n, type, MPI_SUM, comm)`` on a NumPy array.

    Args:
        address: the address of the MPI library's ``MPI_Allreduce``.
        handle_bytes: ``sizeof(MPI_Comm)``: 4 (int handles) or ``sizeof(void*)``.
        in_place: the value of ``MPI_IN_PLACE`` (an address, e.g. -1 for MPICH), and
        comm, op: the communicator's and ``MPI_SUM``'s handle values, and
        types: {NumPy type number: datatype handle value} of the predefined types, each
            as an unsigned machine word (``hpctrain.comm.direct.word``); int handles are
            their low 32 bits.

    Calling it with an array returns 0 when MPI summed it, MPI's error code when MPI
    failed, and -1 without calling MPI when the array is not one it takes (not a
    C-contiguous, aligned, writeable ndarray of a mapped type with at most 2^31 - 1
    elements): the caller then takes its general path.
    """
    cdef allreduce_int_handles f_int
    cdef allreduce_ptr_handles f_ptr
    cdef uintptr_t in_place, comm, op
    cdef uintptr_t types[MAX_TYPENUM]
    cdef bint has_type[MAX_TYPENUM]

    def __init__(self, uintptr_t address, int handle_bytes, uintptr_t in_place,
                 uintptr_t comm, uintptr_t op, dict types):
        cdef int num
        if address == 0:
            raise ValueError("DirectAllreduce: no MPI_Allreduce address")
        self.f_int, self.f_ptr = NULL, NULL
        if handle_bytes == sizeof(int32_t):
            self.f_int = <allreduce_int_handles><void*>address
        elif handle_bytes == sizeof(void*):
            self.f_ptr = <allreduce_ptr_handles><void*>address
        else:
            raise ValueError(f"DirectAllreduce: MPI handles of {handle_bytes} bytes are "
                             f"neither int nor pointer sized")
        self.in_place, self.comm, self.op = in_place, comm, op
        for num in range(MAX_TYPENUM):
            self.has_type[num] = False
        for key, value in types.items():
            num = key
            if num < 0 or num >= MAX_TYPENUM:
                raise ValueError(f"DirectAllreduce: NumPy type number {num} out of range")
            self.types[num], self.has_type[num] = value, True

    def __call__(self, buf):
        cdef cnp.ndarray a
        cdef int flags, num, rc
        cdef cnp.npy_intp n
        cdef void* data
        cdef uintptr_t t
        if type(buf) is not cnp.ndarray:
            return -1
        a = <cnp.ndarray>buf
        flags = cnp.PyArray_FLAGS(a)
        if (flags & cnp.NPY_ARRAY_CARRAY) != cnp.NPY_ARRAY_CARRAY:
            return -1       # not C-contiguous, aligned and writeable
        num = cnp.PyArray_TYPE(a)
        if num < 0 or num >= MAX_TYPENUM or not self.has_type[num] \
                or not cnp.PyArray_ISNOTSWAPPED(a):
            return -1
        n = cnp.PyArray_SIZE(a)
        if n > INT_MAX_COUNT:
            return -1
        data, t = cnp.PyArray_DATA(a), self.types[num]
        with nogil:
            if self.f_int != NULL:
                rc = self.f_int(<const void*>self.in_place, data, <int>n, <int32_t>t,
                                <int32_t>self.op, <int32_t>self.comm)
            else:
                rc = self.f_ptr(<const void*>self.in_place, data, <int>n, <void*>t,
                                <void*>self.op, <void*>self.comm)
        return rc
