"""Build hpctrain's Cython kernels (kernels/*.pyx) into hpctrain._kernels.*.

By default the kernels are compiled for the baseline of the architecture (``-O3``, no
``-march``): a wheel built on a login node runs on every compute node. Environment:
    HPCTRAIN_NATIVE=1       compile for this machine's CPU (-march=native): fastest here,
                            refused at import on a CPU that lacks its instruction set
    HPCTRAIN_MARCH=CPU      compile for a named CPU or level (-march=CPU, e.g. x86-64-v3,
                            skylake-avx512, znver4), e.g. the compute nodes', built anywhere
    HPCTRAIN_PORTABLE=1     the default build (accepted for older build scripts)
    HPCTRAIN_NO_OPENMP=1    build without OpenMP (kernels then run single-threaded)
    HPCTRAIN_DEBUG_BUILD=1  -O0 -g and Cython bounds checks, for debugging native crashes

Floating-point contraction is off (``-ffp-contract=off``) in every build, so a native
build computes the same numbers as the portable one. The flags, and the instruction-set
extensions the compiler says they enable, are compiled into ``hpctrain._kernels._build``,
itself built without ``-march``: ``hpctrain info`` prints them, and importing the kernels
on a CPU without those extensions is a clear error instead of "Illegal instruction".
"""
import glob
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BUILD_INFO = "hpctrain._kernels._build"
FLAGS_HEADER = "hp_build_flags.h"

# Predefined compiler macros -> extension names as __builtin_cpu_supports spells them
# (the ones hpctrain._kernels._build can check on the running CPU, and the Arm ones it reports).
FEATURE_MACROS = [
    ("__SSE3__", "sse3"), ("__SSSE3__", "ssse3"), ("__SSE4_1__", "sse4.1"),
    ("__SSE4_2__", "sse4.2"), ("__POPCNT__", "popcnt"), ("__AVX__", "avx"),
    ("__AVX2__", "avx2"), ("__FMA__", "fma"), ("__BMI__", "bmi"), ("__BMI2__", "bmi2"),
    ("__AVX512F__", "avx512f"), ("__AVX512CD__", "avx512cd"), ("__AVX512DQ__", "avx512dq"),
    ("__AVX512BW__", "avx512bw"), ("__AVX512VL__", "avx512vl"),
    ("__ARM_FEATURE_SVE", "sve"), ("__ARM_FEATURE_SVE2", "sve2"),
]


def _march():
    """The instruction-set flags the environment asks for ([] = the portable baseline)."""
    native = os.environ.get("HPCTRAIN_NATIVE") == "1"
    march = os.environ.get("HPCTRAIN_MARCH", "").strip()
    if native and march:
        sys.exit("setup.py: set HPCTRAIN_NATIVE=1 or HPCTRAIN_MARCH, not both")
    if (native or march) and os.environ.get("HPCTRAIN_PORTABLE") == "1":
        sys.exit("setup.py: HPCTRAIN_PORTABLE=1 contradicts HPCTRAIN_NATIVE/HPCTRAIN_MARCH")
    if native:
        return ["-march=native"]
    return [f"-march={march}"] if march else []


def _flags():
    debug = os.environ.get("HPCTRAIN_DEBUG_BUILD") == "1"
    compile_args = ["-O0", "-g"] if debug else ["-O3"]
    compile_args.append("-ffp-contract=off")
    link_args = []
    if os.environ.get("HPCTRAIN_NO_OPENMP") != "1" and sys.platform != "win32":
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args, debug


# Flags of one kernel only. dense_ops: its square roots are of sums of squares, never
# negative, and without errno (which changes no result) its optimizer loops vectorize.
KERNEL_FLAGS = {"dense_ops": ["-fno-math-errno"]}


def _extensions():
    """One extension per kernels/*.pyx (Cython runs when they are built, not for an sdist)."""
    import numpy
    compile_args, link_args, _ = _flags()
    exts = []
    for path in sorted(glob.glob(os.path.join("kernels", "*.pyx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        exts.append(Extension(
            f"hpctrain._kernels.{name}", [path],
            include_dirs=[numpy.get_include(), "kernels"],
            depends=glob.glob(os.path.join("kernels", "*.h")),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args + KERNEL_FLAGS.get(name, []),
            extra_link_args=link_args))
    return exts


def _cythonize(exts):
    from Cython.Build import cythonize
    debug = _flags()[2]
    directives = {"language_level": 3, "boundscheck": debug, "wraparound": False,
                  "cdivision": True, "initializedcheck": debug}
    return cythonize(exts, include_path=["kernels"], compiler_directives=directives)


def _c_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildKernels(build_ext):
    """build_ext that runs Cython, adds the -march flags and records them in hp_build_flags.h.

    The header is a dependency of every kernel, so changing the flags rebuilds them all.
    The kernels compile in parallel (one job per core) unless ``--parallel`` says otherwise.
    """

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = min(os.cpu_count() or 1, len(self.extensions))

    def build_extensions(self):
        generated = {e.name: e.sources for e in _cythonize(self.extensions)}
        for ext in self.extensions:
            ext.sources = generated[ext.name]
        march = _march()
        compile_args = list(self.extensions[0].extra_compile_args)
        features = self._features(compile_args + march)
        os.makedirs(self.build_temp, exist_ok=True)
        header = os.path.join(self.build_temp, FLAGS_HEADER)
        flags = " ".join(compile_args + march)
        if os.environ.get("CFLAGS", "").strip():
            flags += f" (CFLAGS: {os.environ['CFLAGS'].strip()})"
        text = (f"/* written by setup.py: how the hpctrain kernels were compiled */\n"
                f"#define HP_BUILD_FLAGS {_c_string(flags)}\n"
                f"#define HP_BUILD_ISA {_c_string(' '.join(features))}\n")
        old = open(header).read() if os.path.exists(header) else None
        if old != text:
            with open(header, "w") as f:
                f.write(text)
        for ext in self.extensions:
            ext.include_dirs.append(self.build_temp)
            ext.depends.append(header)
            if ext.name != BUILD_INFO:      # built for the baseline, to check the CPU
                ext.extra_compile_args = ext.extra_compile_args + march
        super().build_extensions()

    def _features(self, args):
        """Extensions the compiler enables with ``args``; ["unknown"] when it cannot say."""
        cmd = list(getattr(self.compiler, "compiler_so", None) or ["cc"])
        try:
            out = subprocess.run(cmd + args + ["-dM", "-E", "-x", "c", os.devnull],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ["unknown"]
        defined = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
        return [name for macro, name in FEATURE_MACROS if macro in defined]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels})
