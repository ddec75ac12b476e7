"""Hybrid checkpoints through the command line, under mpiexec.

SIGTERM on one worker of a 3-rank job (1 server, 2 groups of 1 worker, SSP s = 1) stops
every worker at the clock server 0 settles on, with a checkpoint of that clock and exit
status 0; ``hpctrain train CONFIG --resume`` continues it to the end on 2 servers; and
``hpctrain export`` and ``hpctrain eval`` read the hybrid checkpoint. The in-process
cases (bitwise resume, other layouts, collective <-> hybrid, a signal on a server) are
tests/mpi/test_hybrid_checkpoint.py, which this also runs on 6 ranks.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

from mpirun import ROOT, mpi_env, run_mpi

CONFIG = """
mode = "hybrid"
seed = 3
global_batch = 64
steps = 30
threads = 1

[ps]
servers = 1
groups = 2
consistency = "ssp"
staleness = 1
timeout_s = 60

[model]
kind = "dlrm"
bottom = [16, 8]
top = [16, 1]

[[tables]]
name = "users"
features = ["C1", "C2"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.05 }}

[[tables]]
name = "items"
features = ["C3", "C4"]
dim = 8
optimizer = {{ kind = "adam", lr = 0.01 }}

[dense_optimizer]
kind = "adagrad"
lr = 0.01

[data]
format = "synthetic"
[data.synthetic]
num_features = 4
num_dense = 4
vocab = 2000
[data.train]
num_samples = 100000
[data.eval]
num_samples = 512

[checkpoint]
directory = "{root}/ckpt"

[metrics]
path = "{root}/metrics.jsonl"
every_steps = 5
"""

# world rank 2 (worker 1) gets SIGTERM while it pushes clock 4, as Slurm would send it
SIGNAL_WORKER = textwrap.dedent("""
    import os, signal, sys
    from mpi4py import MPI
    from hpctrain.ps.client import PSClient
    from hpctrain.train.cli import train_main

    if MPI.COMM_WORLD.rank == 2:
        original = PSClient.backward

        def backward(self, ticket, grads, step):
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, ticket, grads, step)
        PSClient.backward = backward
    sys.exit(train_main(sys.argv[1:]))
""")


def _cli(*args):
    """``python -m hpctrain ARGS`` in one process (a singleton MPI world)."""
    proc = subprocess.run([sys.executable, "-m", "hpctrain", *args], capture_output=True,
                          text=True, env=mpi_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_sigterm_checkpoints_at_the_agreed_clock_and_the_cli_resumes(tmp_path):
    cfg = tmp_path / "hybrid.toml"
    cfg.write_text(CONFIG.format(root=tmp_path))
    script = tmp_path / "signal_worker.py"
    script.write_text(SIGNAL_WORKER)

    out = run_mpi(3, [str(script), str(cfg)], timeout=120).stdout   # exit status 0
    m = re.search(r"hpctrain: preempted at step (\d+)", out)
    assert m, out[-3000:]
    stop = int(m.group(1))
    assert re.search(rf"stop signal \(SIGTERM on worker 1\): every worker stops after clock "
                     rf"{stop}\b", out), out[-3000:]
    assert 5 <= stop < 30, stop
    ckpt = tmp_path / "ckpt" / f"step-{stop:08d}"
    assert f"hpctrain: checkpoint {ckpt}" in out
    assert os.listdir(tmp_path / "ckpt") == [ckpt.name]
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert manifest["step"] == stop and manifest["world_size"] == 1

    # resume on 2 servers (2 + 2 ranks): rows resharded by key, dense slices re-split
    out = run_mpi(4, ["-m", "hpctrain", "train", str(cfg), "--resume", "--set",
                      "ps.servers=2"], timeout=120).stdout
    assert f"resumed at step {stop} from {ckpt}" in out, out[-3000:]
    m = re.search(r"hpctrain: done at step 30 .*eval_auc (\d\.\d+)", out)
    assert m, out[-3000:]
    final = tmp_path / "ckpt" / f"step-{30:08d}"
    assert json.loads((final / "MANIFEST.json").read_text())["world_size"] == 2

    # the hybrid checkpoint exports and evaluates like a collective one
    _cli("export", str(final), str(tmp_path / "model.h5"))
    import h5py
    with h5py.File(tmp_path / "model.h5", "r") as f:
        assert set(f["tables"]) == {"users", "items"} and f.attrs["step"] == 30
    out = _cli("eval", str(cfg))
    auc = float(re.search(r"hpctrain: step 30 eval: auc (\d\.\d+)", out).group(1))
    assert abs(auc - float(m.group(1))) < 1e-5, (auc, m.group(1))


# BSP with two groups (bitwise repeatable); accuracy reaches the majority-class rate by step 10
# and stays there, so step 10 is the best evaluation and step 16 the latest checkpoint
BEST = CONFIG.replace('consistency = "ssp"\nstaleness = 1', 'consistency = "bsp"').replace(
    "steps = 30", "steps = 16").replace("every_steps = 5", "every_steps = 1") + """
[eval]
interval = 2
keep_best = true
metric = "accuracy"
"""


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())
            if "loss" in r}


def _arrays(ckpt):
    """Every dataset of a checkpoint's HDF5 files but the run state: file/name -> bytes."""
    import h5py
    out = {}
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".h5"):
            with h5py.File(ckpt / name, "r") as f:
                f.visititems(lambda key, obj, name=name: out.__setitem__(
                    f"{name}/{key}", obj[()].tobytes()) if hasattr(obj, "dtype")
                    and not key.startswith("state") else None)
    return out


def test_resume_best_continues_from_the_kept_best_checkpoint(tmp_path):
    """``hpctrain train CONFIG --resume best`` on 1 server + 2 workers: it starts from the
    checkpoint best.json names (not the latest), and training on from it repeats what the
    first run trained after that step bit for bit: losses, final rows, dense parameters and
    optimizer state."""
    cfg = tmp_path / "hybrid.toml"
    cfg.write_text(BEST.format(root=tmp_path).replace(
        "[checkpoint]", "[checkpoint]\nevery_steps = 4\nkeep_last = 1"))
    out = run_mpi(3, ["-m", "hpctrain", "train", str(cfg)], timeout=120).stdout
    m = re.search(r"hpctrain: best accuracy \S+ at step (\d+) \(checkpoint (\S+)\)", out)
    assert m, out[-3000:]
    best, ckpt = int(m.group(1)), tmp_path / "ckpt"
    assert best == 10 and m.group(2) == str(ckpt / "step-00000010")
    assert json.loads((ckpt / "best.json").read_text())["step"] == best
    assert sorted(os.listdir(ckpt)) == ["best.json", "step-00000010", "step-00000016"]
    first, final = _losses(tmp_path / "metrics.jsonl"), _arrays(ckpt / "step-00000016")
    assert sorted(first) == list(range(1, 17))

    out = run_mpi(3, ["-m", "hpctrain", "train", str(cfg), "--resume", "best"],
                  timeout=120).stdout
    assert f"resumed at step {best} from {ckpt / 'step-00000010'}" in out, out[-3000:]
    assert "hpctrain: done at step 16" in out, out[-3000:]
    again = _losses(tmp_path / "metrics.jsonl")    # a resumed run rewrites the later records
    assert sorted(again) == list(range(1, 17))
    assert [again[k] for k in range(best + 1, 17)] == [first[k] for k in range(best + 1, 17)]
    got = _arrays(ckpt / "step-00000016")
    assert got.keys() == final.keys() and any(k.startswith("tables") for k in got)
    assert [k for k in got if got[k] != final[k]] == []


def test_checkpoint_suite_on_six_ranks():
    """2 servers + 2 groups of 2 workers, resumed on 1 server + 1 group of 4 (the mpiexec -n 2
    and -n 4 runs of every tests/mpi file are tests/test_mpi_suites.py)."""
    out = run_mpi(6, ["-m", "pytest", "tests/mpi/test_hybrid_checkpoint.py", "-q", "-x",
                      "-p", "no:cacheprovider", "-p", "no:randomly"], timeout=300).stdout
    assert " passed" in out and "skipped" not in out, out[-3000:]
