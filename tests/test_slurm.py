"""The sbatch scripts on a real one-node Slurm (slurm/testing/single_node.sh).

A session fixture starts a private Slurm (own state directory, munge socket and ports),
installing Debian's packages when missing; tests submit with ``sbatch``, poll ``squeue``
with bounded timeouts, and check outputs, exit states and checkpoints. Everything skips
with the reason when Slurm cannot be had (not root, no apt-get, daemons that do not come
up in time); the daemons are always stopped at the end.
"""
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


def _free_ports(nodes=1):
    """A port p with p .. p + nodes free (slurmctld, one slurmd per node)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        socks = []
        try:
            for i in range(nodes + 1):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for x in socks:
                x.close()
    raise RuntimeError(f"no {nodes + 1} consecutive free TCP ports")


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
        """The job's state; of a heterogeneous job, the first component's that is not
        terminal (else the first's)."""
        out = self.run("squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T", check=False).stdout
        states = out.split()
        return next((s for s in states if s not in TERMINAL), states[0] if states else "GONE")

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


def _private_slurm(nodes=1):
    """Start a private Slurm of ``nodes`` emulated nodes; yields its client; stops it after."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (slurmd starts jobs; packages come from apt-get)")
    if shutil.which("bash") is None:
        pytest.skip("Slurm tests need bash")
    state_dir = tempfile.mkdtemp(prefix="hpctrain-slurm-")
    env = dict(os.environ, HPCTRAIN_SLURM_DIR=state_dir, HPCTRAIN_SLURM_NODES=str(nodes),
               HPCTRAIN_SLURM_PORT=str(_free_ports(nodes)))
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
        # One node: shared memory is all UCX (the mpich wheel's transport) needs. Probing
        # network interfaces as well made MPI_Init fail now and then under srun here
        # ("UCX ERROR failed to unpack address, invalid bandwidth 0.00").
        client.setdefault("UCX_TLS", "self,sm")
        for k in [k for k in client if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "HPCTRAIN_PS_"))]:
            if k != "SLURM_CONF":          # a pytest run inside a job must not leak its job
                del client[k]
        yield Slurm(state_dir, client)
    finally:
        subprocess.run(stop, env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    yield from _private_slurm()


@pytest.fixture(scope="module")
def slurm_two_nodes():
    """A second private Slurm with two nodes emulated on this machine (heterogeneous jobs:
    Slurm's backfill places each component on a node of its own)."""
    yield from _private_slurm(nodes=2)


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


TRAIN_SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")


def _train_config(path, steps, eval_at_end=True):
    """A small synthetic DLRM run writing checkpoints and metrics beside ``path``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trainer_configs
    extra = ('\n[checkpoint]\ndirectory = "ckpt"\nkeep_last = 3\n'
             '\n[metrics]\npath = "metrics.jsonl"\nevery_steps = 10\n')
    text = trainer_configs.SMALL_DLRM.format(steps=steps, overlap="false", sparse_opt="adam",
                                             eval_at_end=str(eval_at_end).lower(), extra=extra)
    path.write_text(text)
    return path


def _final_line(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("hpctrain: done at step")]
    return lines[-1] if lines else None


def _metrics(path):
    """(last training record, last eval record or None) of a metrics JSON-lines file."""
    import json
    with open(path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    return train[-1], (evals[-1] if evals else None)


def test_train_sbatch_runs_to_completion(slurm, tmp_path):
    _train_config(tmp_path / "run.toml", steps=40)
    out = tmp_path / "train.out"
    job = slurm.sbatch("-n", "2", "-c", "1", "-t", "5", "-o", str(out), TRAIN_SBATCH, "run.toml",
                       cwd=tmp_path)
    info = slurm.wait(job, output=str(out))
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert f"--mpi={mpi_plugin()}" in text and "2 tasks x 1 threads" in text, text
    assert re.search(r"world size\s+2 on 1 host", text), text           # the pre-flight
    assert "hpctrain: done at step 40" in _final_line(text), text
    assert (tmp_path / "ckpt" / "step-00000040").is_dir(), os.listdir(tmp_path / "ckpt")
    last, ev = _metrics(tmp_path / "metrics.jsonl")
    assert last["world_size"] == 2 and last["step"] == 40
    assert ev is not None and 0.0 <= ev["eval"]["auc"] <= 1.0
    assert info["Restarts"] == "0"


PREEMPT_STEPS = 4000


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The preemption tests' run, never interrupted: (stdout, metrics path)."""
    from mpirun import run_mpi
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    _train_config(ref_dir / "run.toml", PREEMPT_STEPS)
    out = run_mpi(2, ["-m", "hpctrain", "train", "run.toml"], timeout=300, cwd=str(ref_dir)).stdout
    return out, ref_dir / "metrics.jsonl"


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_preempted_job_requeues_and_resumes_to_same_result(slurm, tmp_path, launcher,
                                                            uninterrupted):
    """USR1 to the batch shell: checkpoint, requeue, resume; final metrics as uninterrupted."""
    steps = PREEMPT_STEPS
    _train_config(tmp_path / "run.toml", steps)
    out = tmp_path / "train.out"
    env = {"HPCTRAIN_LAUNCHER": launcher,
           "HPCTRAIN_MPIEXEC": os.path.join(os.path.dirname(sys.executable), "mpiexec")}
    job = slurm.sbatch("-n", "2", "-c", "1", "-t", "10", "-o", str(out), TRAIN_SBATCH, "run.toml",
                       cwd=tmp_path, env=env)
    # Signal once training is under way (metrics written), as Slurm does before the time limit.
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert time.monotonic() < deadline and slurm.state(job) in ("PENDING", "RUNNING"), \
            out.read_text() if out.exists() else slurm.state(job)
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm.wait(job, timeout=3 * JOB_TIMEOUT, output=str(out))
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert int(info["Restarts"]) == 1, text
    assert "got SIGUSR1, forwarding" in text and "requeueing job" in text, text
    stop = re.search(r"stopping at step (\d+)", text)
    assert stop and 0 < int(stop.group(1)) < steps, text
    # the stop's checkpoint is kept (keep_last = 3; the resumed run only adds the final one)
    kept = sorted(os.listdir(tmp_path / "ckpt"))
    assert f"step-{int(stop.group(1)):08d}" in kept and f"step-{steps:08d}" in kept, kept
    assert "restart 1 on" in text and text.count("hpctrain train run.toml --resume") == 2, text
    assert f"hpctrain: done at step {steps}" in _final_line(text), text

    ref, ref_metrics = uninterrupted
    assert _final_line(ref) == _final_line(text), (ref[-2000:], text[-2000:])
    (got, got_ev), (want, want_ev) = _metrics(metrics), _metrics(ref_metrics)
    assert got["step"] == want["step"] == steps
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-9)
    assert got_ev["eval"] == pytest.approx(want_ev["eval"], rel=1e-6, abs=1e-9)


HYBRID_SBATCH = os.path.join(ROOT, "slurm", "hybrid.sbatch")
HETJOB_SBATCH = os.path.join(ROOT, "slurm", "hybrid-hetjob.sbatch")


def _hybrid_config(path, steps, groups):
    """The small synthetic DLRM in hybrid mode: 1 server, ``groups`` groups, SSP s = 1."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trainer_configs
    extra = (f'\n[ps]\nservers = 1\ngroups = {groups}\nconsistency = "ssp"\nstaleness = 1\n'
             f'timeout_s = 60\nevery_clocks_log = 10\n'
             '\n[metrics]\npath = "metrics.jsonl"\nevery_steps = 10\n')
    path.write_text('mode = "hybrid"\n' + trainer_configs.SMALL_DLRM.format(
        steps=steps, overlap="false", sparse_opt="adam", eval_at_end="true", extra=extra))
    return path


def test_hybrid_sbatch_checks_the_layout_then_trains(slurm, tmp_path):
    """Servers and workers as one job: a [ps] layout that does not fit the tasks fails
    before any rank starts, naming the key; with the groups overridden it trains."""
    _hybrid_config(tmp_path / "run.toml", steps=20, groups=2)
    bad_out, good_out = tmp_path / "bad.out", tmp_path / "good.out"
    bad = slurm.sbatch("-n", "2", "-c", "1", "-t", "10", "-o", str(bad_out), HYBRID_SBATCH,
                       "run.toml", cwd=tmp_path)
    good = slurm.sbatch("-n", "2", "-c", "1", "-t", "10", "-o", str(good_out), HYBRID_SBATCH,
                        "run.toml", cwd=tmp_path, env={"HPCTRAIN_PS_GROUPS": "1"})
    info = slurm.wait(bad, output=str(bad_out))
    text = bad_out.read_text()
    assert info["JobState"] == "FAILED", text
    assert "ps.groups" in text and "1 workers do not split into 2" in text, text
    assert "hpctrain info" not in text and "mpi4py" not in text, text        # nothing launched
    info = slurm.wait(good, output=str(good_out))
    text = good_out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "1 server(s) + 1 workers in 1 group(s) of 1, ssp s=1" in text, text
    assert re.search(r"world size\s+2 on 1 host", text), text             # the pre-flight
    assert "--resume" not in text, text             # no [checkpoint]: nothing to resume from
    assert "hpctrain: done at step 20" in _final_line(text), text
    assert "[ps server 0] clock 20" in text, text
    last, ev = _metrics(tmp_path / "metrics.jsonl")
    assert last["step"] == 20 and last["groups"] == 1
    assert ev is not None and 0.0 <= ev["eval"]["auc"] <= 1.0
    assert (tmp_path / "metrics.server0.jsonl").exists()


def test_hybrid_hetjob_servers_and_workers_in_two_components(slurm_two_nodes, tmp_path):
    """Servers in hetjob component 0, workers in component 1, one MPI world over both
    (servers first); ps.servers follows component 0's task count."""
    _hybrid_config(tmp_path / "run.toml", steps=20, groups=2)
    out = tmp_path / "het.out"
    # options before ":" go to component 0 (the servers), after it to component 1
    job = slurm_two_nodes.sbatch("-o", str(out), "-t", "10", ":", "-n", "2", "-c", "1",
                                 "-t", "10", HETJOB_SBATCH, "run.toml", cwd=tmp_path)
    info = slurm_two_nodes.wait(job, output=str(out))
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    m = re.search(r"servers 1 task\(s\) x 1 thread\(s\) on \[(\S+)\], workers 2 task\(s\) x 1 "
                  r"thread\(s\) on \[(\S+)\]: 1 server\(s\) \+ 2 workers in 2 group\(s\) of 1", text)
    assert m and m.group(1) != m.group(2), text          # the components on their own nodes
    assert re.search(r"world size\s+3 on 1 host", text), text     # one world over both
    assert "--het-group=0 -n 1" in text and "--het-group=1 -n 2" in text, text
    assert "--set ps.servers=1 --set ps.placement=first" in text, text
    assert "hpctrain: done at step 20" in _final_line(text), text
    assert "[ps server 0] clock 20: group clocks [20, 20]" in text, text
    last, _ = _metrics(tmp_path / "metrics.jsonl")
    assert last["step"] == 20 and last["groups"] == 2 and last["workers"] == 2


SWEEP_SBATCH = os.path.join(ROOT, "slurm", "sweep.sbatch")


def test_sweep_sbatch_job_array_trains_one_value_per_task(slurm, tmp_path):
    """A job array over the dense lr: each task trains its value through train.sbatch into a
    run directory of its own, and its saved config records the override."""
    _train_config(tmp_path / "run.toml", steps=20)
    (tmp_path / "slurm").mkdir()
    shutil.copy(TRAIN_SBATCH, tmp_path / "slurm" / "train.sbatch")   # as in a checkout
    out = tmp_path / "sweep-%a.out"
    job = slurm.sbatch("--array=0-1", "-n", "1", "-c", "1", "-t", "5", "-o", str(out),
                       SWEEP_SBATCH, "run.toml", cwd=tmp_path,
                       env={"HPCTRAIN_SWEEP_VALUES": "0.001 0.02"})
    for task, lr in ((0, "0.001"), (1, "0.02")):
        log = tmp_path / f"sweep-{task}.out"
        info = slurm.wait(f"{job}_{task}", output=str(log))
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
        assert f"task {task} of array job {job}: dense_optimizer.lr = {lr}" in text, text
        assert "hpctrain: done at step 20" in _final_line(text), text
        run = tmp_path / "runs" / "run-sweep" / f"lr-{lr}"
        last, _ = _metrics(run / "metrics.jsonl")
        assert last["step"] == 20
        from hpctrain.checkpoint import CheckpointManager
        step, _, _, state = CheckpointManager(str(run / "ckpt")).load()
        assert step == 20 and f"--set dense_optimizer.lr={lr}" in state["config"]
