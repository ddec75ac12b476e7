# Admission counters (included by table.pyx): a counting Bloom filter and an exact
# open-addressing counter map. Both are updated serially in batch order, so admission
# decisions do not depend on the thread count.

cdef enum:
    ADM_NONE = 0
    ADM_EXACT = 1
    ADM_BLOOM = 2


cdef inline int64_t bloom_add(uint8_t* bloom, int64_t size, int k, int64_t key) noexcept nogil:
    """Count one occurrence of key in the counting Bloom filter; return its new estimate.

    Counters are 8-bit and saturate at 255. Positions come from double hashing,
    p_i = fastrange(h1 + i * h2, size), with h1 and h2 two mixes of the key. The estimate
    is the minimum of the key's k counters, which never undercounts.
    """
    cdef uint64_t h1 = ht_bloom_hash(key)
    cdef uint64_t h2 = hp_mix64(h1) | 1
    cdef int64_t p, est = 255
    cdef int i
    cdef uint8_t c
    for i in range(k):
        p = ht_fastrange(h1 + <uint64_t>i * h2, size)
        c = bloom[p]
        if c < 255:
            c = c + 1
            bloom[p] = c
        if c < est:
            est = c
    return est


cdef inline int64_t cmap_probe(const ht_cslot* t, int64_t cap, int64_t key) noexcept nogil:
    """Slot of key in the counter map, or of the empty slot where it would go (count 0 = empty)."""
    cdef int64_t p = ht_fastrange(ht_index_hash(key), cap)
    while t[p].count != 0 and t[p].key != key:
        p += 1
        if p == cap:
            p = 0
    return p


cdef inline void cmap_delete(ht_cslot* t, int64_t cap, int64_t p) noexcept nogil:
    """Remove slot p by backward shifting the rest of its cluster (no tombstones)."""
    cdef int64_t i = p, j = p, home
    cdef bint stays
    while True:
        j += 1
        if j == cap:
            j = 0
        if t[j].count == 0:
            break
        home = ht_fastrange(ht_index_hash(t[j].key), cap)
        # the entry at j may move to i only if its home is not cyclically inside (i, j]
        if i <= j:
            stays = i < home and home <= j
        else:
            stays = i < home or home <= j
        if not stays:
            t[i] = t[j]
            i = j
    t[i].count = 0
