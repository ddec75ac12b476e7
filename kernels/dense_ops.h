/* Inner loops of kernels/dense_ops.pyx, written once for float (f32) and double (f64).

   Each is compiled for AVX-512F, AVX2 and the build's baseline, the CPU picking one at load
   time (target_clones), whatever -march the kernels are built with: the element-wise passes
   run at NumPy's vector width. Only IEEE add, multiply, divide and sqrt are used, and
   contraction is off (-ffp-contract=off), so every variant gives the same bits. setup.py
   compiles this kernel with -fno-math-errno: the square roots here are of sums of squares,
   never negative, and a sqrt that may set errno keeps a loop from vectorizing. */
#ifndef HP_DENSE_OPS_H
#define HP_DENSE_OPS_H

#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef HP_CLONES
#define HP_CLONES
#endif

#define HP_DENSE_LOOPS(T, S, SQRT)                                                           \
/* y = y + b (b may be NULL), then y * (y > 0) when relu: NumPy's multiply by the mask. */    \
HP_CLONES static void hp_bias_act_##S(T* restrict y, const T* restrict b, int64_t rows,      \
                                      int64_t cols, int relu) {                              \
    for (int64_t r = 0; r < rows; r++, y += cols) {                                          \
        if (b && relu) {                                                                      \
            for (int64_t j = 0; j < cols; j++) {                                             \
                T v = y[j] + b[j];                                                            \
                y[j] = v * (T)(v > 0);                                                        \
            }                                                                                 \
        } else if (b) {                                                                       \
            for (int64_t j = 0; j < cols; j++) y[j] = y[j] + b[j];                           \
        } else if (relu) {                                                                    \
            for (int64_t j = 0; j < cols; j++) y[j] = y[j] * (T)(y[j] > 0);                  \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* dz = dy * (y > 0) (y NULL: no ReLU, dz not written); acc[j] += dz[j], row after row       \
   (acc NULL: no sums). */                                                                    \
HP_CLONES static void hp_grad_rows_##S(const T* restrict dy, const T* restrict y,            \
                                       T* restrict dz, double* restrict acc, int64_t rows,   \
                                       int64_t cols) {                                        \
    for (int64_t r = 0; r < rows; r++, dy += cols) {                                         \
        if (y && acc) {                                                                       \
            for (int64_t j = 0; j < cols; j++) {                                             \
                T g = dy[j] * (T)(y[j] > 0);                                                  \
                dz[j] = g;                                                                    \
                acc[j] += (double)g;                                                          \
            }                                                                                 \
        } else if (y) {                                                                       \
            for (int64_t j = 0; j < cols; j++) dz[j] = dy[j] * (T)(y[j] > 0);                \
        } else {                                                                              \
            for (int64_t j = 0; j < cols; j++) acc[j] += (double)dy[j];                      \
        }                                                                                     \
        if (y) { y += cols; dz += cols; }                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Adam on [0, n): p *= dec (has_dec); g' = p * wd + g (has_wd); m = m b1 + g' c1;           \
   v = v b2 + (g' g') c2; p -= m / (sqrt(v) + eps) * lr. */                                   \
HP_CLONES static void hp_adam_##S(T* restrict p, const T* restrict g, T* restrict m,        \
                                  T* restrict v, int64_t n, T b1, T c1, T b2, T c2, T eps,   \
                                  T lr, T wd, T dec, int has_wd, int has_dec) {              \
    if (!has_wd && !has_dec) {                                                                \
        for (int64_t i = 0; i < n; i++) {                                                     \
            T gv = g[i];                                                                      \
            T mv = m[i] * b1 + gv * c1;                                                       \
            T vv = v[i] * b2 + (gv * gv) * c2;                                                \
            m[i] = mv;                                                                        \
            v[i] = vv;                                                                        \
            p[i] = p[i] - mv / (SQRT(vv) + eps) * lr;                                         \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t i = 0; i < n; i++) {                                                         \
        T pv = has_dec ? p[i] * dec : p[i];                                                   \
        T gv = has_wd ? pv * wd + g[i] : g[i];                                                \
        T mv = m[i] * b1 + gv * c1;                                                           \
        T vv = v[i] * b2 + (gv * gv) * c2;                                                    \
        m[i] = mv;                                                                            \
        v[i] = vv;                                                                            \
        p[i] = pv - mv / (SQRT(vv) + eps) * lr;                                               \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Adagrad on [0, n): g' = p * wd + g (has_wd); acc += g' g'; p -= g' / (sqrt(acc) + eps) lr */ \
HP_CLONES static void hp_adagrad_##S(T* restrict p, const T* restrict g, T* restrict acc,   \
                                     int64_t n, T lr, T eps, T wd, int has_wd) {             \
    if (!has_wd) {                                                                            \
        for (int64_t i = 0; i < n; i++) {                                                     \
            T gv = g[i];                                                                      \
            T a = acc[i] + gv * gv;                                                           \
            acc[i] = a;                                                                       \
            p[i] = p[i] - gv / (SQRT(a) + eps) * lr;                                          \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    for (int64_t i = 0; i < n; i++) {                                                         \
        T pv = p[i];                                                                          \
        T gv = pv * wd + g[i];                                                                \
        T a = acc[i] + gv * gv;                                                               \
        acc[i] = a;                                                                           \
        p[i] = pv - gv / (SQRT(a) + eps) * lr;                                                \
    }                                                                                         \
}

HP_DENSE_LOOPS(float, f32, sqrtf)
HP_DENSE_LOOPS(double, f64, sqrt)

#undef HP_DENSE_LOOPS
#endif
