"""Build hpctrain's Cython kernels (kernels/*.pyx) into hpctrain._kernels.*.

Environment:
    HPCTRAIN_PORTABLE=1   build without -march=native (for wheels that run on other CPUs)
    HPCTRAIN_NO_OPENMP=1  build without OpenMP (kernels then run single-threaded)
    HPCTRAIN_DEBUG_BUILD=1  -O0 -g and Cython bounds checks, for debugging native crashes
"""
import glob
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _flags():
    debug = os.environ.get("HPCTRAIN_DEBUG_BUILD") == "1"
    compile_args = ["-O0", "-g"] if debug else ["-O3"]
    link_args = []
    if os.environ.get("HPCTRAIN_PORTABLE") != "1" and not debug:
        compile_args.append("-march=native")
    if os.environ.get("HPCTRAIN_NO_OPENMP") != "1" and sys.platform != "win32":
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args, debug


def _extensions():
    compile_args, link_args, debug = _flags()
    exts = []
    for path in sorted(glob.glob(os.path.join("kernels", "*.pyx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        exts.append(Extension(
            f"hpctrain._kernels.{name}", [path],
            include_dirs=[numpy.get_include(), "kernels"],
            depends=glob.glob(os.path.join("kernels", "*.h")),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args, extra_link_args=link_args))
    directives = {"language_level": 3, "boundscheck": debug, "wraparound": False,
                  "cdivision": True, "initializedcheck": debug}
    return cythonize(exts, include_path=["kernels"], compiler_directives=directives)


setup(ext_modules=_extensions())
