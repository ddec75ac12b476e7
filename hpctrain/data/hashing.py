"""The stable hash of categorical strings: 64-bit FNV-1a, salted by the column name.

``hash_string(column, value)`` is the id a CSV/TSV categorical value gets::

    h = 0xCBF29CE484222325                       # FNV-1a 64-bit offset basis
    for byte in column.encode() + b"\\xff" + value.encode():
        h = ((h ^ byte) * 0x100000001B3) mod 2**64   # FNV prime
    id = h & 0x7FFFFFFFFFFFFFFF                   # non-negative int64

The column name makes equal strings in different columns different ids, and the
0xFF byte (never part of UTF-8) separates name and value unambiguously. The
value is the field's bytes as they appear in the file (after stripping
surrounding spaces when the schema says ``strip = true``). This module is the
reference; the parser (kernels/data_parse.pyx) computes the same ids in C.
"""
import numpy as np

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1


def fnv1a64(data, h=FNV_OFFSET):
    """FNV-1a 64 of ``data`` (bytes) continuing from state ``h``; returns the full 64-bit state."""
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def column_seed(column):
    """The FNV state after the column name and the 0xFF separator (the parser's per-column seed)."""
    return fnv1a64(column.encode("utf-8") + b"\xff")


def hash_string(column, value):
    """The int64 id of categorical ``value`` (str or bytes) in column ``column``."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return fnv1a64(value, column_seed(column)) & MASK63


def hash_strings(column, values):
    """``hash_string`` of every value, as an int64 array."""
    return np.array([hash_string(column, v) for v in values], dtype=np.int64)
