"""Versions of everything that shapes a figure or a checkpoint, as one dict.

Benchmarks write it into every JSON result and the trainer into every checkpoint, so a
number or a saved state can be traced to the software and machine that produced it.
"""
import os
import platform


def versions():
    """hpctrain, Python, NumPy, mpi4py and MPI library versions, OpenMP, threads, machine."""
    import numpy

    import hpctrain
    from hpctrain._kernels import _openmp
    from hpctrain.comm.world import library_facts
    mpi = library_facts()
    return {
        "hpctrain": hpctrain.__version__, "python": platform.python_version(),
        "numpy": numpy.__version__, "mpi4py": mpi["mpi4py"], "mpi": mpi["mpi_library_line"],
        "openmp": _openmp.openmp_enabled(), "threads": _openmp.get_num_threads(),
        "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
    }


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
