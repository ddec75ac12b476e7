# cython: language_level=3
"""How the kernels were compiled, and whether this CPU has what they were compiled for.

setup.py writes ``hp_build_flags.h``: the compile flags and the instruction-set
extensions the compiler said those flags enable. This module itself is compiled
without ``-march``, so it imports on every CPU of the architecture and can name the
missing extensions before a kernel would die with "Illegal instruction".
"""

cdef extern from "hp_build_flags.h":
    const char *HP_BUILD_FLAGS
    const char *HP_BUILD_ISA

cdef extern from *:
    """
    #include <string.h>
    /* 1: this CPU has extension `name`, 0: it has not, -1: cannot tell (not x86, not GCC/Clang) */
    static int hp_cpu_has(const char *name) {
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
    #define HP_CHECK(s) if (strcmp(name, s) == 0) return __builtin_cpu_supports(s) != 0
        HP_CHECK("sse3"); HP_CHECK("ssse3"); HP_CHECK("sse4.1"); HP_CHECK("sse4.2");
        HP_CHECK("popcnt"); HP_CHECK("avx"); HP_CHECK("avx2"); HP_CHECK("fma");
        HP_CHECK("bmi"); HP_CHECK("bmi2"); HP_CHECK("avx512f"); HP_CHECK("avx512cd");
        HP_CHECK("avx512dq"); HP_CHECK("avx512bw"); HP_CHECK("avx512vl");
    #undef HP_CHECK
    #endif
        (void)name;
        return -1;
    }
    """
    int hp_cpu_has(const char *name)

#: The compiler flags of the kernels (from setup.py), e.g. "-O3 -ffp-contract=off -fopenmp".
FLAGS = HP_BUILD_FLAGS.decode()
#: Instruction-set extensions beyond the architecture's baseline the kernels may use
#: (empty: the portable baseline; ("unknown",) when the compiler could not say).
ISA = tuple(HP_BUILD_ISA.decode().split())


def cpu_has(str name):
    """Whether this CPU has extension ``name`` (e.g. "avx2"); None when it cannot be told."""
    r = hp_cpu_has(name.encode())
    return None if r < 0 else bool(r)


def missing():
    """The extensions of ``ISA`` this CPU lacks (empty when the kernels can run here)."""
    return [name for name in ISA if cpu_has(name) is False]
