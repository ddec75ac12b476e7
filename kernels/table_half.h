/* Reduced-precision embedding rows: fp16 (IEEE binary16) and bf16 (the top half of a
   float32), converted to and from float32 (included by table_core.pxd).

   Reads widen exactly. Writes narrow one of two ways:
     - round to nearest even (RNE): initial rows, imports, checkpoints restored into another
       precision. A finite value past the format's largest finite one (fp16: 65504, bf16:
       3.3895e38) rounds to Inf, and the caller counts it (ht_*_rne_rows return how many):
       the Python side refuses such data instead of storing it.
     - stochastic rounding (SR): the optimizer's write-back. Of the two neighbours in the
       format, the one away from zero is taken with probability (distance to the lower
       one) / (their spacing), from 16 random bits per element: exact wherever at most 16
       bits are dropped (every fp16 normal value, every bf16 value); for fp16 subnormals
       (|x| < 2^-14) the probability is quantised to 2^-16 of a step. SR saturates: a result
       past the largest finite value (Inf included) is stored as the largest finite value of
       its sign, so training never writes Inf. NaN stays NaN.

   fp16 <-> float32 uses F16C (vcvtph2ps / vcvtps2ph) when the CPU has it and the portable
   bit manipulations below otherwise; both give the same bits (tests compare them).
   ht_half_init() chooses, like ht_optim_init() in table_optim.h: the F16C functions are
   compiled for that instruction set (function target attributes) whatever -march the
   kernels are built with. bf16 is pure bit manipulation. */
#ifndef HT_HALF_H
#define HT_HALF_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HT_HALF_X86 1
#include <immintrin.h>
#else
#define HT_HALF_X86 0
#endif

enum { HT_F32 = 0, HT_F16 = 1, HT_BF16 = 2 };
#define HT_F16_MAX_BITS 0x7BFFu      /* 65504 */
#define HT_BF16_MAX_BITS 0x7F7Fu     /* 3.3895314e38 */

static int ht_use_f16c = 0;
static int ht_half_avx2;

/* Use F16C (and AVX2 for the stochastic rounding's loops) when this CPU has it and `allow`
   (0: the portable code); returns whether F16C is used. */
static int ht_half_init(int allow) {
    int ok = 0, avx2 = 0;
#if HT_HALF_X86
    __builtin_cpu_init();
    ok = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    avx2 = __builtin_cpu_supports("avx2");
#endif
    ht_use_f16c = ok && allow;
    ht_half_avx2 = avx2 && allow;
    return ht_use_f16c;
}

static inline uint32_t ht_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ht_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---------------------------------------------------------------- scalar conversions */

static inline float ht_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return ht_u2f(sign | 0x7F800000u | (m << 13));      /* Inf, NaN */
    if (e == 0) {                                                      /* 0, subnormal */
        float v = (float)m * 5.9604644775390625e-08f;                  /* m * 2^-24, exact */
        return ht_u2f(sign | ht_f2u(v));
    }
    return ht_u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* Round to nearest even (F. Giesen's float_to_half_fast3_rtne); finite values >= 65520
   become Inf, NaN stays NaN (quiet). */
static inline uint16_t ht_f32_to_f16_rne(float f) {
    uint32_t x = ht_f2u(f), sgn = x & 0x80000000u;
    uint16_t o;
    x ^= sgn;
    if (x >= 0x47800000u) {                        /* >= 65536, Inf or NaN */
        o = (uint16_t)(x > 0x7F800000u ? 0x7E00u : 0x7C00u);
    } else if (x < 0x38800000u) {                  /* below 2^-14: subnormal or zero */
        /* adding 0.5 puts the value's 2^-24 units in the low mantissa bits, rounded by the
           FPU's round-to-nearest-even */
        o = (uint16_t)(ht_f2u(ht_u2f(x) + 0.5f) - 0x3F000000u);
    } else {
        uint32_t odd = (x >> 13) & 1u;
        x += 0xC8000FFFu + odd;                    /* rebias the exponent (-112 << 23), round */
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)((sgn >> 16) | o);
}

static inline float ht_bf16_to_f32(uint16_t h) { return ht_u2f((uint32_t)h << 16); }

static inline uint16_t ht_f32_to_bf16_rne(float f) {
    uint32_t x = ht_f2u(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);  /* quiet NaN */
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Stochastic rounding of f with the 16 random bits r (uniform in [0, 2^16)). */
static inline uint16_t ht_f32_to_f16_sr(float f, uint32_t r) {
    uint32_t x = ht_f2u(f), sgn = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu, e, d;
    if (ax > 0x7F800000u) return (uint16_t)(sgn | 0x7E00u);
    if (ax > 0x477FE000u) return (uint16_t)(sgn | HT_F16_MAX_BITS);    /* past 65504 */
    if (ax >= 0x38800000u) {                                          /* normal: 13 bits */
        ax = (ax + (r >> 3)) & ~0x1FFFu;
        if (ax > 0x477FE000u) return (uint16_t)(sgn | HT_F16_MAX_BITS);
        return (uint16_t)(sgn | ht_f32_to_f16_rne(ht_u2f(ax)));      /* exact: no rounding */
    }
    e = ax >> 23;                                 /* biased exponent, < 113 */
    if (e >= 103) {                               /* fp16 subnormal: 14..23 bits dropped */
        d = 126u - e;
        ax = (ax + (d <= 16 ? r >> (16 - d) : r << (d - 16))) & ~((1u << d) - 1u);
        return (uint16_t)(sgn | ht_f32_to_f16_rne(ht_u2f(ax)));
    }
    /* |f| < 2^-24: 0 or the smallest subnormal, the latter with probability |f| / 2^-24 */
    return (uint16_t)(sgn | ((double)r < (double)ht_u2f(ax) * 1099511627776.0 ? 1u : 0u));
}

static inline uint16_t ht_f32_to_bf16_sr(float f, uint32_t r) {
    uint32_t x = ht_f2u(f), sgn = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sgn | 0x7FC0u);
    ax += r;
    if (ax >= 0x7F800000u) return (uint16_t)(sgn | HT_BF16_MAX_BITS);
    return (uint16_t)(sgn | (ax >> 16));
}

/* ---------------------------------------------------------------- whole rows */

#if HT_HALF_X86
__attribute__((target("avx,f16c")))
static void ht_f16_load_f16c(const uint16_t* src, float* dst, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + j))));
    for (; j < n; j++) dst[j] = ht_f16_to_f32(src[j]);
}

__attribute__((target("avx,f16c")))
static void ht_f16_store_rne_f16c(const float* src, uint16_t* dst, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i*)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; j++) dst[j] = ht_f32_to_f16_rne(src[j]);
}
#endif

/* dst[0:n] = float32 of the stored row src (dtype HT_F16 or HT_BF16) */
static inline void ht_load_row(int dtype, const uint16_t* src, float* dst, int64_t n) {
    int64_t j;
    if (dtype == HT_BF16) {
        uint32_t* d = (uint32_t*)dst;
        for (j = 0; j < n; j++) d[j] = (uint32_t)src[j] << 16;
        return;
    }
#if HT_HALF_X86
    if (ht_use_f16c) { ht_f16_load_f16c(src, dst, n); return; }
#endif
    for (j = 0; j < n; j++) dst[j] = ht_f16_to_f32(src[j]);
}

/* Narrow a row with round to nearest even; returns how many finite values became Inf. */
static inline int64_t ht_store_row_rne(int dtype, const float* src, uint16_t* dst, int64_t n) {
    int64_t j, over = 0;
    uint16_t inf = dtype == HT_BF16 ? 0x7F80u : 0x7C00u;
    if (dtype == HT_BF16) {
        for (j = 0; j < n; j++) dst[j] = ht_f32_to_bf16_rne(src[j]);
    } else {
#if HT_HALF_X86
        if (ht_use_f16c) ht_f16_store_rne_f16c(src, dst, n);
        else
#endif
        for (j = 0; j < n; j++) dst[j] = ht_f32_to_f16_rne(src[j]);
    }
    for (j = 0; j < n; j++)
        over += (dst[j] & 0x7FFFu) == inf && (ht_f2u(src[j]) & 0x7FFFFFFFu) < 0x7F800000u;
    return over;
}

/* The random bits of stochastic rounding: a pure function of (table, key, step, column).
   Per row and step one 64-bit key from splitmix64's mix,
       h = mix(mix(tkey ^ (key + 3G)) + (step + 1) G),
   and per column c of the row, 16 bits of a 32-bit integer hash (C. Wellons' lowbias32, a
   bijection with full avalanche) of the column mixed with h:
       r_c = lowbias32(((uint32) h + c * 0x9E3779B9) ^ (uint32)(h >> 32)) >> 16.
   tkey is the table's init key (seed and table id) mixed with a constant of its own, so
   SR bits and initial values are unrelated streams. */
static inline uint64_t ht_sr_row_key(uint64_t tkey, int64_t key, int64_t step) {
    return hp_mix64(hp_mix64(tkey ^ ((uint64_t)key + 3 * HT_GAMMA))
                    + ((uint64_t)step + 1) * HT_GAMMA);
}

static inline uint32_t ht_lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* Both passes of a row are written once, as always-inlined bodies, and compiled twice: for
   the baseline and for AVX2 (function target attributes), chosen at run time like
   table_optim.h's variants. Integer arithmetic only: both give the same bits. */

/* r[0:n] = the random values of columns c0 .. c0 + n - 1 of the row with key h. */
static inline __attribute__((always_inline)) void ht_sr_bits_body(uint64_t h, int64_t c0,
                                                                   uint16_t* r, int64_t n) {
    uint32_t a = (uint32_t)h, b = (uint32_t)(h >> 32);
    int64_t j;
    for (j = 0; j < n; j++)
        r[j] = (uint16_t)(ht_lowbias32((a + (uint32_t)(c0 + j) * 0x9E3779B9u) ^ b) >> 16);
}

/* Narrow a row with stochastic rounding, r[j]: the 16 random bits of value j. One
   branch-free pass (vectorised) handles every value but the rare ones (fp16: below 2^-14,
   Inf, NaN; bf16: Inf, NaN), which a second pass rounds one by one with the scalar
   functions above: the same bits as those for every value. */
static inline __attribute__((always_inline)) void ht_round_row_sr_body(
        int dtype, const float* src, uint16_t* dst, int64_t n, const uint16_t* r) {
    const uint32_t* u = (const uint32_t*)src;
    uint32_t special = 0;
    int64_t j;
    if (dtype == HT_BF16) {
        for (j = 0; j < n; j++) {
            uint32_t ax = u[j] & 0x7FFFFFFFu, y = ax + r[j];
            uint32_t h = y >= 0x7F800000u ? HT_BF16_MAX_BITS : y >> 16;
            special |= ax >= 0x7F800000u;
            dst[j] = (uint16_t)(h | ((u[j] >> 16) & 0x8000u));
        }
        if (special)
            for (j = 0; j < n; j++)
                if ((u[j] & 0x7FFFFFFFu) >= 0x7F800000u) dst[j] = ht_f32_to_bf16_sr(src[j], r[j]);
        return;
    }
    for (j = 0; j < n; j++) {
        uint32_t ax = u[j] & 0x7FFFFFFFu;
        uint32_t y = (ax + ((uint32_t)r[j] >> 3)) & ~0x1FFFu;       /* fp16 normal: 13 bits */
        uint32_t h = y > 0x477FE000u ? HT_F16_MAX_BITS : (y - 0x38000000u) >> 13;
        special |= (ax < 0x38800000u) | (ax >= 0x7F800000u);
        dst[j] = (uint16_t)(h | ((u[j] >> 16) & 0x8000u));
    }
    if (special)
        for (j = 0; j < n; j++) {
            uint32_t ax = u[j] & 0x7FFFFFFFu;
            if (ax < 0x38800000u || ax >= 0x7F800000u) dst[j] = ht_f32_to_f16_sr(src[j], r[j]);
        }
}

static void ht_sr_bits_base(uint64_t h, int64_t c0, uint16_t* r, int64_t n) {
    ht_sr_bits_body(h, c0, r, n);
}
static void ht_round_row_sr_base(int dtype, const float* src, uint16_t* dst, int64_t n,
                                 const uint16_t* r) {
    ht_round_row_sr_body(dtype, src, dst, n, r);
}
#if HT_HALF_X86
__attribute__((target("avx2")))
static void ht_sr_bits_avx2(uint64_t h, int64_t c0, uint16_t* r, int64_t n) {
    ht_sr_bits_body(h, c0, r, n);
}
__attribute__((target("avx2")))
static void ht_round_row_sr_avx2(int dtype, const float* src, uint16_t* dst, int64_t n,
                                 const uint16_t* r) {
    ht_round_row_sr_body(dtype, src, dst, n, r);
}
#endif

static inline void ht_sr_bits(uint64_t h, int64_t c0, uint16_t* r, int64_t n) {
#if HT_HALF_X86
    if (ht_half_avx2) { ht_sr_bits_avx2(h, c0, r, n); return; }
#endif
    ht_sr_bits_base(h, c0, r, n);
}

static inline void ht_round_row_sr(int dtype, const float* src, uint16_t* dst, int64_t n,
                                   const uint16_t* r) {
#if HT_HALF_X86
    if (ht_half_avx2) { ht_round_row_sr_avx2(dtype, src, dst, n, r); return; }
#endif
    ht_round_row_sr_base(dtype, src, dst, n, r);
}

/* Narrow a row with stochastic rounding from the row key h (ht_sr_row_key), 64 values at
   a time. */
static inline void ht_store_row_sr(int dtype, const float* src, uint16_t* dst, int64_t n,
                                   uint64_t h) {
    uint16_t r[64];
    int64_t c0, m;
    for (c0 = 0; c0 < n; c0 += 64) {
        m = n - c0 < 64 ? n - c0 : 64;
        ht_sr_bits(h, c0, r, m);
        ht_round_row_sr(dtype, src + c0, dst + c0, m, r);
    }
}

#endif  /* HT_HALF_H */
