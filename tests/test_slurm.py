"""The sbatch scripts on a real one-node Slurm (slurm/testing/single_node.sh).

A session fixture starts a private Slurm (own state directory, munge socket and ports),
installing Debian's packages when missing; tests submit with ``sbatch``, poll ``squeue``
with bounded timeouts, and check outputs, exit states and checkpoints. Everything skips
with the reason when Slurm cannot be had (not root, no apt-get, daemons that do not come
up in time); the daemons are always stopped at the end.
"""
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from mpirun import ROOT, mpi_env

pytestmark = pytest.mark.slurm

SINGLE_NODE = os.path.join(ROOT, "slurm", "testing", "single_node.sh")
START_TIMEOUT = 300          # includes apt-get install on a fresh machine
JOB_TIMEOUT = 120
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _free_port_pair():
    """A port p with p and p+1 free (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free TCP ports")


def mpi_plugin():
    """srun's --mpi plugin for the MPI mpi4py uses (the rule train.sbatch applies)."""
    from mpi4py import MPI
    v = MPI.Get_library_version()
    return "pmix" if "Open MPI" in v else "pmi2"


class Slurm:
    """Client side of the private Slurm: submit, poll, inspect."""

    def __init__(self, state_dir, env):
        self.state_dir = state_dir
        self.env = env

    def run(self, *cmd, timeout=30, check=True):
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def sbatch(self, *args, cwd, env=None):
        """Submit; returns the job id."""
        e = dict(self.env, **(env or {}))
        p = subprocess.run(["sbatch", "--parsable", *args], env=e, cwd=cwd,
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            pytest.fail(f"sbatch {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p.stdout.strip().split(";")[0]

    def job(self, jobid):
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", jobid, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self, jobid):
        out = self.run("squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T", check=False).stdout
        return out.strip() or "GONE"

    def wait(self, jobid, timeout=JOB_TIMEOUT, until=None, output=None):
        """Poll squeue until the job is terminal (or ``until(state)``); returns scontrol's dict."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state(jobid)
            if (until(state) if until else state in TERMINAL or state == "GONE"):
                return self.job(jobid)
            time.sleep(0.3)
        self.run("scancel", jobid, check=False)
        log = open(output).read()[-4000:] if output and os.path.exists(output) else ""
        pytest.fail(f"job {jobid} still {state} after {timeout}s; cancelled\n{log}")


@pytest.fixture(scope="session")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (slurmd starts jobs; packages come from apt-get)")
    if shutil.which("bash") is None:
        pytest.skip("Slurm tests need bash")
    state_dir = tempfile.mkdtemp(prefix="hpctrain-slurm-")
    env = dict(os.environ, HPCTRAIN_SLURM_DIR=state_dir, HPCTRAIN_SLURM_PORT=str(_free_port_pair()))
    stop = [SINGLE_NODE, "stop"]
    try:
        try:
            p = subprocess.run([SINGLE_NODE, "start"], env=env, capture_output=True, text=True,
                               timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.skip(f"single-node Slurm did not come up within {START_TIMEOUT}s")
        if p.returncode != 0:
            pytest.skip(f"single-node Slurm unavailable (exit {p.returncode}): "
                        f"{(p.stderr or p.stdout).strip()[-1500:]}")
        client = mpi_env({"SLURM_CONF": os.path.join(state_dir, "slurm.conf"),
                          "HPCTRAIN_PYTHON": sys.executable})
        for k in [k for k in client if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if k != "SLURM_CONF":          # a pytest run inside a job must not leak its job
                del client[k]
        yield Slurm(state_dir, client)
    finally:
        subprocess.run(stop, env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


WORLD = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(f'WORLD rank={c.rank} size={c.size}')"


def test_srun_mpi_plugin_gives_one_world(slurm, tmp_path):
    """The detected --mpi plugin makes one 2-rank world; --mpi=none makes two 1-rank worlds."""
    script = tmp_path / "world.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun --mpi={mpi_plugin()} {sys.executable} -m mpi4py -c \"{WORLD}\" | sed s/^/GOOD:/\n"
        f"srun --mpi=none {sys.executable} -m mpi4py -c \"{WORLD}\" | sed s/^/BAD:/\n")
    out = tmp_path / "world.out"
    job = slurm.sbatch("-n", "2", "-t", "2", "-o", str(out), str(script), cwd=tmp_path)
    info = slurm.wait(job, output=str(out))
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    good = sorted(line for line in text.splitlines() if line.startswith("GOOD:"))
    bad = sorted(line for line in text.splitlines() if line.startswith("BAD:"))
    assert good == ["GOOD:WORLD rank=0 size=2", "GOOD:WORLD rank=1 size=2"], text
    assert bad == ["BAD:WORLD rank=0 size=1"] * 2, text


@pytest.mark.skipif(importlib.util.find_spec("hpctrain.info") is None,
                    reason="hpctrain info not available")
def test_hpctrain_info_under_srun_and_mpiexec(slurm, tmp_path):
    """`hpctrain info` sees a 2-rank world via srun and mpiexec; a wrong --mpi is an error."""
    py = f"{sys.executable} -m mpi4py -m hpctrain info"
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    script = tmp_path / "info.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun --mpi={mpi_plugin()} {py} > good.txt 2>&1; echo \"good rc=$?\"\n"
        f"srun --mpi=none {py} > bad.txt 2>&1; echo \"bad rc=$?\"\n"
        + (f"{mpiexec} -n $SLURM_NTASKS {py} > mpiexec.txt 2>&1; echo \"mpiexec rc=$?\"\n"
           if os.access(mpiexec, os.X_OK) else ""))
    out = tmp_path / "info.out"
    job = slurm.sbatch("-n", "2", "-t", "2", "-o", str(out), str(script), cwd=tmp_path)
    info = slurm.wait(job, output=str(out))
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    good = (tmp_path / "good.txt").read_text()
    assert "good rc=0" in text and re.search(r"world size\s+2 on 1 host", good), good
    bad = (tmp_path / "bad.txt").read_text()
    assert "bad rc=0" not in text, text
    assert "SLURM_STEP_NUM_TASKS=2" in bad and "world has size 1" in bad, bad
    if os.access(mpiexec, os.X_OK):
        assert "mpiexec rc=0" in text, (tmp_path / "mpiexec.txt").read_text()
        assert re.search(r"world size\s+2 on 1 host", (tmp_path / "mpiexec.txt").read_text())
