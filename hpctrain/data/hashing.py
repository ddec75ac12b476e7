"""The stable hash of categorical strings: 64-bit FNV-1a, salted by the column name.

``hash_string(column, value)`` is the id a CSV/TSV categorical value gets::

    h = 0xCBF29CE484222325                       # FNV-1a 64-bit offset basis
    for byte in column.encode() + b"\\xff" + value.encode():
        h = ((h ^ byte) * 0x100000001B3) mod 2**64   # FNV prime
    id = h & 0x7FFFFFFFFFFFFFFF                   # non-negative int64

A crossed feature (``data.schema.crossed``) hashes the ids of its columns::

    h = FNV-1a state after cross_name.encode() + b"\\xff"
    for id in (ids of the crossed columns, in the order listed):
        for byte in id.to_bytes(8, "little"): h = ((h ^ byte) * FNV_PRIME) mod 2**64
    cross id = h & 0x7FFFFFFFFFFFFFFF

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


def hash_cross(name, ids):
    """The id of crossed feature ``name`` for one row whose component ids are ``ids``."""
    h = column_seed(name)
    for i in ids:
        h = fnv1a64(int(i).to_bytes(8, "little"), h)
    return h & MASK63


def hash_cross_arrays(name, id_arrays):
    """``hash_cross`` for many rows at once: ``id_arrays`` holds one int64 array per column."""
    h = np.full(id_arrays[0].shape[0], column_seed(name), dtype=np.uint64)
    prime, ff = np.uint64(FNV_PRIME), np.uint64(0xFF)
    with np.errstate(over="ignore"):
        for ids in id_arrays:
            x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
            for k in range(8):
                h = (h ^ ((x >> np.uint64(8 * k)) & ff)) * prime
    return (h & np.uint64(MASK63)).astype(np.int64)
