"""Initial values of embedding rows: a pure function of (seed, table_id, key, column).

Every table computes a new row's values with a counter-based generator, so a key gets the
same initial row whatever shard owns it, how many ranks run, or in which order keys
arrive. This module is the NumPy definition (the table's Cython code,
kernels/table_init.pxi, computes the same numbers)::

    G        = 0x9E3779B97F4A7C15                       (golden-ratio increment of splitmix64)
    mix(z)   = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
               z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)       (splitmix64 output)
    t        = mix(mix(seed + G) ^ (table_id + 2G))     one constant per table
    r        = mix(t ^ (key + 3G))                      one stream per row
    x_i      = mix(r + i*G),  i = 1, 2, ...             the splitmix64 stream seeded at r

    uniform: u_c = (x_{c+1} >> 40) * 2^-24              24-bit uniform in [0, 1)
             w_c = float32(a * (2 u_c - 1))             in [-a, a)
    normal:  u1 = ((x_{2c+1} >> 11) + 1) * 2^-53        in (0, 1]
             u2 = (x_{2c+2} >> 11) * 2^-53              in [0, 1)
             w_c = float32(s * sqrt(-2 ln u1) * cos(2 pi u2))   (Box-Muller)

Integers are the 64-bit two's-complement bits of seed, table_id and key, with arithmetic
modulo 2^64; everything after the shifts is float64, rounded once to float32. The default
scale is ``a = s = 1 / sqrt(dim)``. Uniform values are bit-exact between the two
implementations; normal values agree to float32 rounding (the libm ``log``/``cos`` used by
NumPy and C may differ in the last bit of a float64).
"""
import math

import numpy as np

INITS = ("uniform", "normal")

_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15


def default_scale(dim):
    """Default init scale: ``1 / sqrt(dim)`` (half-width for uniform, std for normal)."""
    return 1.0 / math.sqrt(dim)


def mix64(z):
    """splitmix64's output function on a uint64 array (modulo 2^64)."""
    z = np.asarray(z, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def table_constant(seed, table_id):
    """The per-table constant ``t = mix(mix(seed + G) ^ (table_id + 2G))`` as a Python int."""
    s = np.uint64((int(seed) + _G) & _M64)
    tid = np.uint64((int(table_id) + 2 * _G) & _M64)
    return int(mix64(mix64(s) ^ tid))


def reference_init(keys, dim, *, seed=0, table_id=0, init="uniform", scale=None):
    """Initial rows of ``keys`` (float32[n, dim]) by the formula in this module's docstring.

    Args:
        keys: int64[n] feature ids.
        dim: row width.
        seed: model seed (any integer; its low 64 bits are used).
        table_id: table id (any integer; its low 64 bits are used).
        init: ``"uniform"`` or ``"normal"``.
        scale: half-width a (uniform) or standard deviation s (normal); default 1/sqrt(dim).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    scale = default_scale(dim) if scale is None else float(scale)
    k = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64)
    t = np.uint64(table_constant(seed, table_id))
    r = mix64(t ^ (k + np.uint64(3 * _G & _M64)))[:, None]
    g = np.uint64(_G)
    c = np.arange(dim, dtype=np.uint64)[None, :]
    if init == "uniform":
        x = mix64(r + (c + np.uint64(1)) * g)
        u = (x >> np.uint64(40)).astype(np.float64) * 2.0 ** -24
        return (scale * (2.0 * u - 1.0)).astype(np.float32)
    x1 = mix64(r + (np.uint64(2) * c + np.uint64(1)) * g)
    x2 = mix64(r + (np.uint64(2) * c + np.uint64(2)) * g)
    u1 = ((x1 >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53
    u2 = (x2 >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return (scale * (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))).astype(np.float32)
