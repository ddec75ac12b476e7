/* splitmix64's finaliser (Steele, Lea, Flood 2014): a bijection of 2^64.

   The one mix behind the routing and dedup hashes (sparse_ops), row initialisation
   and Bloom filter hashes (table) and synthetic data (data_synth). */
#ifndef HP_MIX64_H
#define HP_MIX64_H
#include <stdint.h>

static inline uint64_t hp_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#endif
