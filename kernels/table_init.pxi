# Counter-based initial values of embedding rows (included by table.pyx).
#
# The value of column c of the row of `key` in table `table_id` under `seed` is a pure
# function of those four numbers (the NumPy twin is hpctrain.sparse.init.reference_init):
#
#   mix(z)  = splitmix64's output function
#   t       = mix(mix(seed + G) ^ (table_id + 2G))         per table  (G = 0x9E3779B97F4A7C15)
#   r       = mix(t ^ (key + 3G))                           per row
#   x_i     = mix(r + i*G)                                  the splitmix64 stream seeded at r
#   uniform : u = (x_{c+1} >> 40) * 2^-24,  value = float32(a * (2u - 1))         in [-a, a)
#   normal  : u1 = ((x_{2c+1} >> 11) + 1) * 2^-53,  u2 = (x_{2c+2} >> 11) * 2^-53,
#             value = float32(s * sqrt(-2 ln u1) * cos(2 pi u2))                  (Box-Muller)
#
# All arithmetic is modulo 2^64 on the two's-complement bits of seed, table_id and key, and
# float64 afterwards, rounded once to float32.

from libc.math cimport cos, log, sqrt

cdef double _TWO_M24 = 1.0 / 16777216.0
cdef double _TWO_M53 = 1.0 / 9007199254740992.0
cdef double _TWO_PI = 6.283185307179586


cdef inline uint64_t init_table_key(uint64_t seed, uint64_t table_id) noexcept nogil:
    """The per-table constant t of the init formula."""
    return hp_mix64(hp_mix64(seed + HT_GAMMA) ^ (table_id + 2 * HT_GAMMA))


cdef inline void init_values_from(float* w, int64_t c0, int64_t n, uint64_t tkey, int64_t key,
                                  bint normal, double scale) noexcept nogil:
    """Write the initial values of columns c0 .. c0 + n - 1 of `key`'s row into w[0:n]."""
    cdef uint64_t r = hp_mix64(tkey ^ (<uint64_t>key + 3 * HT_GAMMA))
    cdef int64_t c
    cdef double u, u1, u2
    if not normal:
        for c in range(c0, c0 + n):
            u = <double>(hp_mix64(r + <uint64_t>(c + 1) * HT_GAMMA) >> 40) * _TWO_M24
            w[c - c0] = <float>(scale * (2.0 * u - 1.0))
    else:
        for c in range(c0, c0 + n):
            u1 = (<double>(hp_mix64(r + <uint64_t>(2 * c + 1) * HT_GAMMA) >> 11) + 1.0) * _TWO_M53
            u2 = <double>(hp_mix64(r + <uint64_t>(2 * c + 2) * HT_GAMMA) >> 11) * _TWO_M53
            w[c - c0] = <float>(scale * (sqrt(-2.0 * log(u1)) * cos(_TWO_PI * u2)))


cdef inline void init_values(float* w, int64_t dim, uint64_t tkey, int64_t key,
                             bint normal, double scale) noexcept nogil:
    """Write the initial values of `key`'s row into w[0:dim]."""
    init_values_from(w, 0, dim, tkey, key, normal, scale)


cdef inline void init_values_reduced(int dtype, uint16_t* h, int64_t dim, uint64_t tkey,
                                     int64_t key, bint normal, double scale) noexcept nogil:
    """The initial row of `key` in fp16 / bf16: the float32 values rounded to nearest even
    (64 columns at a time, so any width needs no more than this stack buffer)."""
    cdef float buf[64]
    cdef int64_t c0, n
    for c0 in range(0, dim, 64):
        n = min(64, dim - c0)
        init_values_from(buf, c0, n, tkey, key, normal, scale)
        ht_store_row_rne(dtype, buf, h + c0, n)


cdef inline void fill_floats(float* p, int64_t n, float v) noexcept nogil:
    cdef int64_t j
    for j in range(n):
        p[j] = v
