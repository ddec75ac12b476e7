"""``hpctrain info`` at 1 and 2 ranks, and the srun-without-MPI-plugin error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hpctrain
from mpirun import ROOT, mpi_env, run_mpi


def clean_env(extra=None):
    """Environment without the Slurm variables of any surrounding job."""
    env = {k: v for k, v in mpi_env().items() if not k.startswith("SLURM_")}
    env.update(extra or {})
    return env


def run_info(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hpctrain", "info", *args], cwd=ROOT,
                          env=clean_env(env), capture_output=True, text=True, timeout=120)


def test_info_one_rank_prints_versions_and_layout():
    proc = run_info()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("hpctrain", "Python", "NumPy", "mpi4py", "MPI", "h5py", "kernels", "CuPy",
                  "GPUs", "NCCL", "world size"):
        assert any(line.startswith(label) for line in out.splitlines()), (label, out)
    assert f"hpctrain      {hpctrain.__version__}" in out
    assert f"NumPy         {np.__version__}" in out
    assert "thread level MPI_THREAD_" in out and "; direct calls: " in out
    assert "world size    1 on 1 host(s)" in out and "rank 0 " in out


def test_info_says_which_mpi_calls_are_made_from_c():
    off = json.loads(run_info("--json", env={"HPCTRAIN_DIRECT_MPI": "0"}).stdout)
    assert off["direct_mpi"] == "off (HPCTRAIN_DIRECT_MPI), every call through mpi4py"
    on = json.loads(run_info("--json").stdout)
    assert on["direct_mpi"] in ("MPI_Allreduce, MPI_Alltoallv called from C",
                                "none found to call, every call through mpi4py")
    if sys.platform.startswith("linux"):     # the MPI wheels' libmpi is found there
        assert on["direct_mpi"] == "MPI_Allreduce, MPI_Alltoallv called from C"


def test_info_json_reports_kernels_and_threads():
    proc = run_info("--json", env={"HPCTRAIN_NUM_THREADS": "1"})
    facts = json.loads(proc.stdout)
    assert "_openmp" in facts["kernels"] and facts["world_size"] == 1
    assert isinstance(facts["openmp"], bool)
    assert facts["threads"] == 1 and facts["ranks"][0]["threads"] == 1


def test_info_two_ranks_one_summary_with_rank_lines():
    out = run_mpi(2, ["-m", "hpctrain", "info"], timeout=120).stdout
    assert out.count("hpctrain      ") == 1, out  # one summary, from rank 0
    assert "world size    2 on 1 host(s)" in out and "(2 ranks)" in out
    assert "rank 0 " in out and "rank 1 " in out
    assert "local 0/2" in out and "local 1/2" in out


def test_info_fails_when_slurm_tasks_are_separate_worlds():
    proc = run_info(env={"SLURM_NTASKS": "4", "SLURM_PROCID": "3"})
    assert proc.returncode != 0
    assert "SLURM_NTASKS=4" in proc.stderr and "--mpi=" in proc.stderr
    assert "world has size 1" in proc.stderr


def test_info_accepts_slurm_single_task():
    proc = run_info(env={"SLURM_NTASKS": "1"})
    assert proc.returncode == 0, proc.stderr


def test_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "hpctrain")
    if not os.path.exists(script):
        script = None
    cmd = [script, "info"] if script else [sys.executable, "-m", "hpctrain", "info"]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "world size" in proc.stdout, proc.stderr


def test_one_threads_rule():
    from hpctrain.threads import threads_per_rank
    env = {"HPCTRAIN_NUM_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads_per_rank(2, 1, env) == (2, "config threads")
    assert threads_per_rank(None, 1, env) == (3, "HPCTRAIN_NUM_THREADS")
    assert threads_per_rank(None, 1, {"OMP_NUM_THREADS": "5,2"}) == (5, "OMP_NUM_THREADS")
    n, why = threads_per_rank(None, 2, {}, cpu_count=2)
    assert n == 1 and "2 cores / 2 rank(s)" in why
    assert threads_per_rank(None, 8, {}, cpu_count=2)[0] == 1
    with pytest.raises(ValueError, match="HPCTRAIN_NUM_THREADS='x'"):
        threads_per_rank(None, 1, {"HPCTRAIN_NUM_THREADS": "x"})
