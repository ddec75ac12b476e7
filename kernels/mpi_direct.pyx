# cython: language_level=3
"""``MPI_Allreduce`` and ``MPI_Alltoallv`` called straight from C.

mpi4py's ``Comm.Allreduce`` spends about 0.3 us per call turning its Python arguments
into MPI's (buffer parsing, datatype lookup, count checks), which is 5-8% of a 4 us
allreduce of a few bytes between ranks of one node; an ``Alltoallv`` also needs its
counts and displacements in elements, built in Python per call. ``DirectAllreduce`` and
``DirectAlltoallv`` make the same calls with the arguments read off the NumPy arrays'
headers (counts and displacements computed in C), on the same communicator, through the
same symbols mpi4py resolves, with the GIL released as mpi4py releases it.

It is built without ``mpi.h``: the MPI library's own function addresses, its handle
width and its handle values (communicator, datatypes, ``MPI_SUM``, ``MPI_IN_PLACE``)
come from mpi4py at run time (``hpctrain.comm.direct``). MPI implementations pass
handles either as ``int`` (MPICH, Intel MPI, MVAPICH) or as a pointer (Open MPI, the MPI-5
standard ABI); both are supported, anything else is not bound and the caller keeps using
mpi4py.
"""
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport free, malloc

cimport numpy as cnp

cnp.import_array()

ctypedef int (*allreduce_int_handles)(const void*, void*, int, int32_t, int32_t,
                                      int32_t) noexcept nogil
ctypedef int (*allreduce_ptr_handles)(const void*, void*, int, void*, void*,
                                      void*) noexcept nogil
ctypedef int (*alltoallv_int_handles)(const void*, const int*, const int*, int32_t, void*,
                                      const int*, const int*, int32_t, int32_t) noexcept nogil
ctypedef int (*alltoallv_ptr_handles)(const void*, const int*, const int*, void*, void*,
                                      const int*, const int*, void*, void*) noexcept nogil

cdef enum:
    MAX_TYPENUM = 64        # NumPy's builtin type numbers are below this
    INT_MAX_COUNT = 2147483647


cdef _fill_types(uintptr_t* handles, bint* has, dict types, str who):
    """``handles[num]``/``has[num]`` from {NumPy type number: handle value}."""
    cdef int num
    for num in range(MAX_TYPENUM):
        has[num] = False
    for key, value in types.items():
        num = key
        if num < 0 or num >= MAX_TYPENUM:
            raise ValueError(f"{who}: NumPy type number {num} out of range")
        handles[num], has[num] = value, True


cdef bint _handles(uintptr_t address, int handle_bytes, str who) except -1:
    """True for int handles, False for pointer handles; ValueError otherwise."""
    if address == 0:
        raise ValueError(f"{who}: no function address")
    if handle_bytes == sizeof(int32_t):
        return True
    if handle_bytes == sizeof(void*):
        return False
    raise ValueError(f"{who}: MPI handles of {handle_bytes} bytes are neither int nor "
                     f"pointer sized")


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
        self.f_int, self.f_ptr = NULL, NULL
        if _handles(address, handle_bytes, "DirectAllreduce"):
            self.f_int = <allreduce_int_handles><void*>address
        else:
            self.f_ptr = <allreduce_ptr_handles><void*>address
        self.in_place, self.comm, self.op = in_place, comm, op
        _fill_types(self.types, self.has_type, types, "DirectAllreduce")

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


cdef bint _elements(cnp.ndarray counts, int64_t row, int P, int* out_counts,
                    int* out_displs, int64_t limit, int64_t* total) noexcept:
    """Row counts (int64[P]) -> element counts and displacements in ``out_*``; False when
    ``counts`` is not a C-contiguous int64[P] of non-negative values, or when a count, a
    displacement or the total passes ``limit`` elements."""
    cdef const int64_t* c
    cdef int64_t e, d = 0
    cdef int p
    if cnp.PyArray_NDIM(counts) != 1 or cnp.PyArray_DIM(counts, 0) != P \
            or cnp.PyArray_ITEMSIZE(counts) != 8 or not cnp.PyArray_ISINTEGER(counts) \
            or not cnp.PyArray_ISSIGNED(counts) \
            or (cnp.PyArray_FLAGS(counts) & cnp.NPY_ARRAY_CARRAY_RO) != cnp.NPY_ARRAY_CARRAY_RO \
            or not cnp.PyArray_ISNOTSWAPPED(counts):
        return False
    c = <const int64_t*>cnp.PyArray_DATA(counts)
    for p in range(P):
        if c[p] < 0 or (row > 0 and c[p] > limit // row):
            return False
        e = c[p] * row
        if d > limit - e:
            return False
        out_counts[p], out_displs[p] = <int>e, <int>d
        d += e
    total[0] = d
    return True


cdef class DirectAlltoallv:
    """``MPI_Alltoallv`` of rows between NumPy arrays, counts given in rows.

    Args:
        address: the address of the MPI library's ``MPI_Alltoallv``.
        handle_bytes: ``sizeof(MPI_Comm)``: 4 (int handles) or ``sizeof(void*)``.
        comm: the communicator's handle value; size: its number of ranks.
        types: {NumPy type number: datatype handle value}.

    ``call(send, send_counts, recv_counts, recv, limit)`` returns 0 when MPI moved the
    rows, MPI's error code when MPI failed, and -1 without calling MPI when the arguments
    are not ones it takes: arrays that are not C-contiguous and aligned (``recv``
    writeable) of one mapped type with the same row shape, counts that are not int64[size]
    of non-negative values, totals beyond either array, or any count, displacement or
    total beyond ``limit`` elements (int counts; larger messages are split by the
    caller). The caller then takes its checked path, which names what is wrong.

    The element counts live in one buffer per object, reused by every call: like the
    collective itself (MPI forbids two threads' collectives on one communicator at once),
    calls on one object must not overlap.
    """
    cdef alltoallv_int_handles f_int
    cdef alltoallv_ptr_handles f_ptr
    cdef uintptr_t comm
    cdef uintptr_t types[MAX_TYPENUM]
    cdef bint has_type[MAX_TYPENUM]
    cdef int P
    cdef int* scratch       # send counts, send displs, recv counts, recv displs: 4 x P

    def __cinit__(self):
        self.scratch = NULL

    def __init__(self, uintptr_t address, int handle_bytes, uintptr_t comm, int size,
                 dict types):
        if size < 1:
            raise ValueError(f"DirectAlltoallv: communicator size {size}")
        self.f_int, self.f_ptr = NULL, NULL
        if _handles(address, handle_bytes, "DirectAlltoallv"):
            self.f_int = <alltoallv_int_handles><void*>address
        else:
            self.f_ptr = <alltoallv_ptr_handles><void*>address
        self.comm, self.P = comm, size
        _fill_types(self.types, self.has_type, types, "DirectAlltoallv")
        free(self.scratch)
        self.scratch = <int*>malloc(4 * size * sizeof(int))
        if self.scratch == NULL:
            raise MemoryError("DirectAlltoallv: no memory for counts")

    def __dealloc__(self):
        free(self.scratch)

    def call(self, send, send_counts, recv_counts, recv, int64_t limit):
        cdef cnp.ndarray s, r
        cdef int num, rc, k, P = self.P
        cdef int64_t row = 1, stotal, rtotal
        cdef uintptr_t t
        cdef int* sc = self.scratch
        cdef const void* sp
        cdef void* rp
        if type(send) is not cnp.ndarray or type(recv) is not cnp.ndarray \
                or type(send_counts) is not cnp.ndarray or type(recv_counts) is not cnp.ndarray:
            return -1
        s, r = <cnp.ndarray>send, <cnp.ndarray>recv
        if (cnp.PyArray_FLAGS(s) & cnp.NPY_ARRAY_CARRAY_RO) != cnp.NPY_ARRAY_CARRAY_RO \
                or (cnp.PyArray_FLAGS(r) & cnp.NPY_ARRAY_CARRAY) != cnp.NPY_ARRAY_CARRAY:
            return -1
        num = cnp.PyArray_TYPE(s)
        if num != cnp.PyArray_TYPE(r) or num < 0 or num >= MAX_TYPENUM \
                or not self.has_type[num] or not cnp.PyArray_ISNOTSWAPPED(s) \
                or not cnp.PyArray_ISNOTSWAPPED(r):
            return -1
        if cnp.PyArray_NDIM(s) < 1 or cnp.PyArray_NDIM(s) != cnp.PyArray_NDIM(r):
            return -1
        for k in range(1, cnp.PyArray_NDIM(s)):
            if cnp.PyArray_DIM(s, k) != cnp.PyArray_DIM(r, k):
                return -1
            row *= cnp.PyArray_DIM(s, k)
        if not _elements(<cnp.ndarray>send_counts, row, P, sc, sc + P, limit, &stotal) \
                or not _elements(<cnp.ndarray>recv_counts, row, P, sc + 2 * P, sc + 3 * P,
                                 limit, &rtotal):
            return -1
        if stotal > cnp.PyArray_SIZE(s) or rtotal > cnp.PyArray_SIZE(r):
            return -1
        sp, rp, t = cnp.PyArray_DATA(s), cnp.PyArray_DATA(r), self.types[num]
        with nogil:
            if self.f_int != NULL:
                rc = self.f_int(sp, sc, sc + P, <int32_t>t, rp, sc + 2 * P, sc + 3 * P,
                                <int32_t>t, <int32_t>self.comm)
            else:
                rc = self.f_ptr(sp, sc, sc + P, <void*>t, rp, sc + 2 * P, sc + 3 * P,
                                <void*>t, <void*>self.comm)
        return rc
