"""Idle threads sleep: the wait settings of the OpenMP runtime and of OpenBLAS.

Both runtimes read their setting once, when they load, and by default park a thread that
has finished its part of a job in a spin loop (OpenBLAS for about 2^28 cycles, a tenth
of a second, after every matrix product). A rank runs kernel threads, BLAS threads, its
Python code and a data reader on the same cores, one phase after another: the sparse
phases right after the dense GEMMs shared the cores with a spinning BLAS thread, and one
rank with 2 threads was slower than with 1 (benchmarks/README.md, threads).

``import hpctrain`` therefore sets, when the environment does not:

* ``OMP_WAIT_POLICY=PASSIVE``: idle kernel threads sleep at once;
* ``OPENBLAS_THREAD_TIMEOUT=20``: an idle BLAS thread spins 2^20 cycles (well under a
  millisecond, enough to bridge the row blocks of one layer) and then sleeps.

Exported values are kept. A runtime already loaded (NumPy imported before hpctrain, or
another OpenMP library first) does not see the value: the ``*_SOURCE`` names say so. A
trainer with several threads per rank then makes OpenBLAS re-read its timeout
(``reapply_blas_timeout``) and warns about what it cannot fix (``late_warning``).
"""
import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "20"}

_OPENMP_RUNTIMES = ("libgomp", "libomp.", "libiomp")


def openmp_runtime_loaded():
    """True when an OpenMP runtime is already mapped into this process (Linux; else False)."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in _OPENMP_RUNTIMES)
    except OSError:
        return False


def _set(var, loaded):
    if var in os.environ:
        return "environment"
    os.environ[var] = DEFAULTS[var]
    return "too late" if loaded() else "hpctrain"


#: Where each setting of this process comes from: "environment", "hpctrain", or "too late"
#: (set here, but the runtime had been loaded before and kept its default).
WAIT_POLICY_SOURCE = _set("OMP_WAIT_POLICY", openmp_runtime_loaded)
BLAS_TIMEOUT_SOURCE = _set("OPENBLAS_THREAD_TIMEOUT", lambda: "numpy" in sys.modules)


def _openblas_path():
    """The file of the OpenBLAS loaded in this process (threadpoolctl's view), or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for d in threadpool_info():
        if d.get("internal_api") == "openblas" and d.get("filepath"):
            return d["filepath"]
    return None


def reapply_blas_timeout():
    """Give a running OpenBLAS the thread timeout it missed; True when this call did.

    OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` when it loads and when its thread pool
    starts. When NumPy was imported before hpctrain (``BLAS_TIMEOUT_SOURCE == "too
    late"``) this re-reads the environment (``openblas_read_env``) and stops the pool
    (``blas_thread_shutdown_``, what OpenBLAS itself does before a fork); the next product
    starts it again with the timeout. Call it when no other thread is inside BLAS (the
    trainer does, while it sets its thread counts, before its reader starts).
    """
    global BLAS_TIMEOUT_SOURCE
    if BLAS_TIMEOUT_SOURCE != "too late":
        return False                    # OpenBLAS saw the setting when it loaded
    path = _openblas_path()
    if path is None:
        return False
    import ctypes
    try:
        lib = ctypes.CDLL(path)
        read_env, shutdown = lib.openblas_read_env, lib.blas_thread_shutdown_
        timeout = lib.openblas_thread_timeout
    except (OSError, AttributeError):
        return False
    read_env()
    if timeout() != int(os.environ["OPENBLAS_THREAD_TIMEOUT"]):
        return False
    shutdown()
    BLAS_TIMEOUT_SOURCE = "hpctrain (re-read)"
    return True


def late_warning():
    """What came too late for a runtime that now spins idle threads beside the kernels, as
    one message for the run's log; None when nothing did.

    Only matters with several threads per rank: the sparse phases follow the dense GEMMs
    and a spinning BLAS thread holds a core they need (one-hot DLRM, one rank at 2 threads,
    NumPy imported before hpctrain: sparse phases 1.6-2.0x slower, the step 1.1-1.25x;
    benchmarks/README.md, *Threads inside a rank*).
    """
    late = []
    if BLAS_TIMEOUT_SOURCE == "too late" and _openblas_path() is not None:
        late.append("NumPy was imported before hpctrain, so its OpenBLAS threads spin about "
                    "0.1 s after every matrix product (OPENBLAS_THREAD_TIMEOUT=20 came too "
                    "late)")
    if WAIT_POLICY_SOURCE == "too late":
        late.append("an OpenMP runtime was loaded before hpctrain, so idle kernel threads "
                    "spin before they sleep (OMP_WAIT_POLICY=PASSIVE came too late)")
    if not late:
        return None
    return ("; ".join(late) + ": with several threads per rank the spinning threads take "
            "cores from the sparse kernels (sparse phases up to 2x slower measured). Import "
            "hpctrain before NumPy and other OpenMP libraries, run the hpctrain commands, or "
            "export the variables before Python starts (docs/environment.md).")
