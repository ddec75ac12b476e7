# cython: language_level=3
"""Text parsing kernels of the data readers: line splitting and field parsing.

One kernel, ``parse_lines``, parses Criteo TSV and schema-driven CSV/TSV: every
column has a role (label, dense float, dense integer, categorical hashed,
categorical hex, multi-valued hashed, ignored). It runs without the GIL, so the
reader's prefetch thread parses while the training thread computes.

A bad line (wrong field count, non-numeric, bad hex, bad label) writes nothing:
its ``status`` is set, its ``lengths`` row stays zero and the ids written so far
for it are rolled back, so the good lines' ids are contiguous.

Hash of a categorical string (documented in docs/data.md, reference in
hpctrain/data/hashing.py): 64-bit FNV-1a over ``column name bytes, 0xFF, value
bytes``, masked to 63 bits so ids are non-negative int64. ``seeds[c]`` holds the
FNV state after the column name and the 0xFF byte.
"""
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport strtod
from libc.string cimport memchr, memcpy

import numpy as np

cdef extern from *:
    """
    /* Column roles (hpctrain/data/parse.py mirrors these numbers). */
    #define R_IGNORE 0
    #define R_LABEL 1         /* number in [0, 1] */
    #define R_LABEL_HASH 2    /* string; its hash goes to label_hash, Python maps it to 0/1 */
    #define R_DENSE_FLOAT 3   /* empty -> 0 */
    #define R_DENSE_INT 4     /* empty -> 0 */
    #define R_CAT_HASH 5      /* one id, FNV-1a of the (stripped) string */
    #define R_CAT_HEX 6       /* 1-8 hex digits; empty -> missing_id */
    #define R_MULTI_HASH 7    /* ids separated by seps[c]; empty elements skipped */
    /* Line status codes. */
    #define S_OK 0
    #define S_FIELDS 1
    #define S_NUMBER 2
    #define S_HEX 3
    #define S_LABEL 4
    #define HP_FNV_PRIME 0x100000001B3ULL
    #define HP_MASK63 0x7FFFFFFFFFFFFFFFULL
    """
    int R_IGNORE, R_LABEL, R_LABEL_HASH, R_DENSE_FLOAT, R_DENSE_INT
    int R_CAT_HASH, R_CAT_HEX, R_MULTI_HASH
    int S_OK, S_FIELDS, S_NUMBER, S_HEX, S_LABEL
    uint64_t HP_FNV_PRIME, HP_MASK63


def count_lines(const unsigned char[::1] buf, int64_t start, int64_t stop, int64_t[::1] ends):
    """Positions of the newline bytes in ``buf[start:stop]``, at most ``len(ends)`` of them.

    Returns:
        the number found (``ends[:n]`` holds their absolute positions).
    """
    cdef int64_t n = 0, cap = ends.shape[0], pos = start
    cdef const unsigned char* base = &buf[0] if buf.shape[0] else NULL
    cdef const void* hit
    if start < 0 or stop > buf.shape[0] or start > stop:
        raise ValueError(f"count_lines: bad range [{start}, {stop}) of {buf.shape[0]} bytes")
    with nogil:
        while pos < stop and n < cap:
            hit = memchr(base + pos, 10, <size_t>(stop - pos))
            if hit == NULL:
                break
            ends[n] = <const unsigned char*>hit - base
            n += 1
            pos = ends[n - 1] + 1
    return n


cdef inline bint _is_space(unsigned char c, unsigned char delim) noexcept nogil:
    return c == 32 or (c == 9 and delim != 9)


cdef int _parse_double(const unsigned char* p, int64_t n, double* out) noexcept nogil:
    # strtod needs a NUL-terminated string and must not read past the field.
    cdef char tmp[64]
    cdef char* endp
    if n <= 0 or n >= 64:
        return -1
    memcpy(tmp, p, <size_t>n)
    tmp[n] = 0
    out[0] = strtod(tmp, &endp)
    if endp != tmp + n or not isfinite(out[0]):
        return -1
    return 0


cdef int _parse_int(const unsigned char* p, int64_t n, double* out) noexcept nogil:
    cdef int64_t i = 0
    cdef bint neg = False
    cdef uint64_t v = 0
    if n > 0 and (p[0] == 45 or p[0] == 43):
        neg = p[0] == 45
        i = 1
    if i >= n or n - i > 18:
        return -1
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return -1
        v = v * 10 + (p[i] - 48)
        i += 1
    out[0] = -<double>v if neg else <double>v
    return 0


cdef int _parse_hex(const unsigned char* p, int64_t n, int64_t* out) noexcept nogil:
    cdef int64_t i
    cdef int64_t v = 0
    cdef unsigned char c
    if n < 1 or n > 8:
        return -1
    for i in range(n):
        c = p[i]
        if 48 <= c <= 57:
            v = v * 16 + (c - 48)
        elif 97 <= c <= 102:
            v = v * 16 + (c - 87)
        elif 65 <= c <= 70:
            v = v * 16 + (c - 55)
        else:
            return -1
    out[0] = v
    return 0


cdef inline int64_t _fnv(uint64_t h, const unsigned char* p, int64_t n) noexcept nogil:
    cdef int64_t i
    for i in range(n):
        h = (h ^ p[i]) * HP_FNV_PRIME
    return <int64_t>(h & HP_MASK63)


def parse_lines(const unsigned char[::1] buf, const int64_t[::1] starts,
                const int64_t[::1] ends, const int32_t[::1] roles, const int32_t[::1] slots,
                const uint64_t[::1] seeds, const unsigned char[::1] seps,
                unsigned char delim, bint strip, int64_t missing_id,
                double[::1] labels, uint64_t[::1] label_hash, double[:, ::1] dense,
                int64_t[::1] ids, int64_t[:, ::1] lengths, int32_t[::1] status,
                int32_t[::1] err_col):
    """Parse lines ``buf[starts[i]:ends[i]]`` (no newline; a trailing CR is dropped).

    Args:
        roles, slots, seeds, seps: per column: role code, output slot (dense column or
            feature index), FNV seed for hashed roles, separator for multi-valued ones.
        delim: field delimiter byte. strip: drop spaces around fields.
        missing_id: the id of an empty hex categorical field.
        labels, label_hash: [n] outputs for R_LABEL / R_LABEL_HASH.
        dense: [n, num_dense] output. ids: output buffer, sample-major (a line's bags in
            column order).
        lengths: [n, num_features] output, zero on entry.
        status, err_col: [n] outputs: S_* code and the 0-based column at fault
            (for S_FIELDS, the number of fields found).

    Returns:
        the number of ids written, or -1 if ``ids`` is too small.
    """
    cdef int64_t n = starts.shape[0], ncols = roles.shape[0], cap = ids.shape[0]
    cdef int64_t i, p, e, fs, fe, pos, col, nfields, w = 0, w0, k, es
    cdef int32_t role, slot, st
    cdef double dv
    cdef int64_t hv
    cdef unsigned char sep
    cdef int64_t c
    cdef bint overflow = False
    cdef const unsigned char* b = &buf[0] if buf.shape[0] else NULL
    if ends.shape[0] != n or labels.shape[0] < n or label_hash.shape[0] < n \
            or dense.shape[0] < n or lengths.shape[0] < n or status.shape[0] < n \
            or err_col.shape[0] < n or slots.shape[0] != ncols or seeds.shape[0] != ncols \
            or seps.shape[0] != ncols:
        raise ValueError("parse_lines: inconsistent array sizes")
    for i in range(n):
        if starts[i] < 0 or ends[i] < starts[i] or ends[i] > buf.shape[0]:
            raise ValueError(f"parse_lines: line {i} range [{starts[i]}, {ends[i]}) outside "
                             f"the {buf.shape[0]}-byte buffer")
    with nogil:
        for i in range(n):
            p = starts[i]
            e = ends[i]
            if e > p and b[e - 1] == 13:
                e -= 1
            st = S_OK
            status[i] = S_OK
            err_col[i] = -1
            nfields = 1
            for pos in range(p, e):
                if b[pos] == delim:
                    nfields += 1
            if nfields != ncols:
                status[i] = S_FIELDS
                err_col[i] = <int32_t>nfields
                continue
            w0 = w
            fs = p
            col = 0
            while col < ncols and st == S_OK:
                fe = fs
                while fe < e and b[fe] != delim:
                    fe += 1
                pos = fe + 1            # start of the next field
                if strip:
                    while fs < fe and _is_space(b[fs], delim):
                        fs += 1
                    while fe > fs and _is_space(b[fe - 1], delim):
                        fe -= 1
                role = roles[col]
                slot = slots[col]
                if role == R_LABEL:
                    if _parse_double(b + fs, fe - fs, &dv) != 0 or dv < 0.0 or dv > 1.0:
                        st = S_LABEL
                    else:
                        labels[i] = dv
                elif role == R_LABEL_HASH:
                    label_hash[i] = <uint64_t>_fnv(seeds[col], b + fs, fe - fs)
                elif role == R_DENSE_FLOAT:
                    if fe == fs:
                        dense[i, slot] = 0.0
                    elif _parse_double(b + fs, fe - fs, &dv) != 0:
                        st = S_NUMBER
                    else:
                        dense[i, slot] = dv
                elif role == R_DENSE_INT:
                    if fe == fs:
                        dense[i, slot] = 0.0
                    elif _parse_int(b + fs, fe - fs, &dv) != 0:
                        st = S_NUMBER
                    else:
                        dense[i, slot] = dv
                elif role == R_CAT_HASH or role == R_CAT_HEX:
                    if w >= cap:
                        overflow = True
                        break
                    if role == R_CAT_HASH:
                        ids[w] = _fnv(seeds[col], b + fs, fe - fs)
                    elif fe == fs:
                        ids[w] = missing_id
                    elif _parse_hex(b + fs, fe - fs, &hv) != 0:
                        st = S_HEX
                    else:
                        ids[w] = hv
                    w += 1
                    lengths[i, slot] = 1
                elif role == R_MULTI_HASH:
                    sep = seps[col]
                    k = fs
                    while k <= fe:
                        es = k
                        while es < fe and b[es] != sep:
                            es += 1
                        fs = k
                        while fs < es and strip and _is_space(b[fs], delim):
                            fs += 1
                        c = es
                        while c > fs and strip and _is_space(b[c - 1], delim):
                            c -= 1
                        if c > fs:
                            if w >= cap:
                                overflow = True
                                break
                            ids[w] = _fnv(seeds[col], b + fs, c - fs)
                            w += 1
                            lengths[i, slot] += 1
                        k = es + 1
                if overflow:
                    break
                if st != S_OK:
                    err_col[i] = <int32_t>col
                col += 1
                fs = pos
            if overflow:
                break
            if st != S_OK:
                status[i] = st
                w = w0
                for k in range(lengths.shape[1]):
                    lengths[i, k] = 0
    return -1 if overflow else w


def to_feature_major(const int64_t[::1] ids, const int64_t[:, ::1] lengths,
                     const int32_t[::1] order, int64_t[::1] values, int64_t[::1] fm_lengths):
    """Reorder sample-major bags into the feature-major jagged layout.

    Sample ``s``'s ids come one bag after another, feature ``order[0]``'s bag first,
    then ``order[1]``'s, ... (the order of the columns in the file); ``lengths[s, f]``
    is the length of feature ``f``'s bag. ``values`` gets feature 0's bags for samples
    0..n-1, then feature 1's, ...; ``fm_lengths[f * n + s] = lengths[s, f]``.
    """
    cdef int64_t n = lengths.shape[0], nf = lengths.shape[1], s, f, k, w = 0, ln, total = 0
    cdef int64_t[:, ::1] start = np.empty((n, nf), dtype=np.int64)
    if order.shape[0] != nf:
        raise ValueError(f"to_feature_major: order has {order.shape[0]} entries for {nf} features")
    for k in range(nf):
        if order[k] < 0 or order[k] >= nf:
            raise ValueError(f"to_feature_major: order[{k}] = {order[k]} is not a feature index")
    for s in range(n):
        for k in range(nf):
            f = order[k]
            if lengths[s, f] < 0:
                raise ValueError(f"to_feature_major: negative length at sample {s}, feature {f}")
            start[s, f] = total
            total += lengths[s, f]
    if total != ids.shape[0] or values.shape[0] != total or fm_lengths.shape[0] != n * nf:
        raise ValueError(f"to_feature_major: {ids.shape[0]} ids, lengths sum to {total}, "
                         f"{values.shape[0]} values, {fm_lengths.shape[0]} output lengths")
    with nogil:
        for f in range(nf):
            for s in range(n):
                ln = lengths[s, f]
                fm_lengths[f * n + s] = ln
                if ln:
                    memcpy(&values[w], &ids[start[s, f]], <size_t>(ln * 8))
                    w += ln
    return total
