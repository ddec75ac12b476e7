"""Reduced-precision embedding rows: the row dtypes, and NumPy twins of the table's conversions.

A table stores its rows as ``row_dtype``; every read widens to float32 (exact), so
everything after a lookup sees float32::

    row_dtype  stored as            bytes/value  largest finite   exported ("values")
    fp32       float32              4            3.4028235e38     float32[n, dim]
    fp16       IEEE binary16        2            65504            float16[n, dim]
    bf16       top 16 bits of fp32  2            3.3895314e38     uint16[n, dim] (the bits)

Narrowing happens two ways (kernels/table_half.h is the C side, this module the definition):

* round to nearest even (``round_nearest``): initial rows, imports, restored checkpoints of
  another precision. A finite value that rounds past the largest finite value is refused
  by ``EmbeddingTable.import_`` (it would become Inf).
* stochastic rounding (``stochastic_round``): the optimizer's write-back. x between the
  neighbours lo < x < hi (toward zero, away from zero) becomes hi with probability
  (|x| - |lo|) / (|hi| - |lo|), from 16 random bits per value (``sr_bits``), a pure function
  of (seed, table_id, key, step, column); it saturates at the largest finite value (Inf
  included), NaN stays NaN.

Random bits (G and mix as in ``hpctrain.sparse.init``, t its per-table constant)::

    k      = mix(t ^ 0xD1B54A32D192ED03)                     per table (unrelated to the init)
    h      = mix(mix(k ^ (key + 3G)) + (step + 1) G)         per row and step, 64 bits
    lowbias32(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^ (x >> 16)
    bits_c = lowbias32(((h mod 2^32) + c * 0x9E3779B9) ^ (h >> 32)) >> 16   per column c
                                                             (32-bit arithmetic modulo 2^32)
"""
import numpy as np

from hpctrain.sparse.init import mix64, table_constant

ROW_DTYPES = ("fp32", "fp16", "bf16")
CODES = {name: code for code, name in enumerate(ROW_DTYPES)}  # table_half.h's HT_F32, ...
STORED = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
          "bf16": np.dtype(np.uint16)}
ITEMSIZE = {name: STORED[name].itemsize for name in ROW_DTYPES}
MAX_FINITE = {"fp32": float(np.finfo(np.float32).max), "fp16": 65504.0,
              "bf16": float(np.uint32(0x7F7F0000).view(np.float32))}

_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15
_SALT = 0xD1B54A32D192ED03


def check(row_dtype, where="row_dtype"):
    """``row_dtype`` if it names a row dtype, else ValueError naming ``where``."""
    if row_dtype not in ROW_DTYPES:
        raise ValueError(f"{where} must be one of {', '.join(ROW_DTYPES)}; got {row_dtype!r}")
    return row_dtype


def to_float32(values, row_dtype):
    """float32 copy of ``values`` stored as ``row_dtype`` (exact)."""
    v = np.asarray(values)
    if row_dtype == "bf16":
        return (v.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return v.astype(np.float32)


def round_nearest(x, row_dtype):
    """float32 ``x`` rounded to nearest even in ``row_dtype``, as stored (``STORED``).

    Finite values past the format's range become Inf (callers check ``overflowed``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if row_dtype == "fp32":
        return x.copy()
    if row_dtype == "fp16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    with np.errstate(over="ignore"):
        r = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    out = (r >> np.uint32(16)).astype(np.uint16)
    out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def overflowed(x, stored, row_dtype):
    """Mask of the finite float32 ``x`` that became Inf in ``stored`` (``round_nearest``)."""
    return np.isfinite(x) & ~np.isfinite(to_float32(stored, row_dtype))


def lowbias32(x):
    """C. Wellons' lowbias32 integer hash on a uint32 array."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def sr_bits(seed, table_id, keys, step, dim):
    """uint16[n, dim]: the random bits of the stochastic rounding of ``keys``' rows at
    ``step`` (this module's docstring)."""
    k = mix64(np.uint64(table_constant(seed, table_id) ^ _SALT))
    key = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(mix64(k ^ (key + np.uint64(3 * _G & _M64)))
                  + np.uint64((int(step) + 1) * _G & _M64))
        lo = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
        hi = (h >> np.uint64(32)).astype(np.uint32)[:, None]
        c = np.arange(dim, dtype=np.uint32)[None, :] * np.uint32(0x9E3779B9)
        return (lowbias32((lo + c) ^ hi) >> np.uint32(16)).astype(np.uint16)


def stochastic_round(x, bits, row_dtype):
    """float32 ``x`` stochastically rounded to ``row_dtype`` with the random ``bits``
    (uint16, same shape), as stored (``STORED``); the definition the table's update follows.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    r = np.asarray(bits, dtype=np.uint64)
    if row_dtype == "fp32":
        return x.copy()
    ax = x.view(np.uint32).astype(np.uint64) & np.uint64(0x7FFFFFFF)
    sign = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    nan = ax > 0x7F800000
    if row_dtype == "bf16":
        y = ax + r
        out = np.where(y >= 0x7F800000, np.uint64(0x7F7F), y >> np.uint64(16)).astype(np.uint16)
        out[nan] = 0x7FC0
        return out | sign
    # fp16, in float64 (x, its neighbours and the thresholds are exact there): below 2^-14
    # the spacing is 2^-24 (subnormals); d bits of x's float32 significand are dropped
    with np.errstate(invalid="ignore"):
        a = np.abs(x.astype(np.float64))
    a[nan] = 0.0
    e = np.frexp(a)[1] - 1                       # floor(log2 a) for a > 0
    normal = e >= -14
    ulp = np.where(normal, np.exp2(np.maximum(e, -14) - 10), 2.0 ** -24)
    d = np.where(normal, 13, -1 - e)
    q = a / ulp
    lo = np.floor(q)
    rf = r.astype(np.float64)
    dd = np.clip(d, 0, 16)
    thresh = np.where(d <= 16, np.floor(rf / np.exp2(16 - dd)) / np.exp2(dd), rf / 65536.0)
    with np.errstate(invalid="ignore"):
        y = (lo + (q - lo + thresh >= 1.0)) * ulp
    tiny = a < 2.0 ** -24                        # 0 or 2^-24, the latter w.p. a / 2^-24
    y = np.where(tiny, np.where(rf < a * 2.0 ** 40, 2.0 ** -24, 0.0), y)
    y = np.where(np.isinf(a), 65504.0, np.minimum(y, 65504.0))
    out = np.where(nan, 0.0, y).astype(np.float16).view(np.uint16)
    out[nan] = 0x7E00
    return out | sign
