"""slurm/sweep.sbatch without Slurm: which value an array task takes, the run directory and
the overrides it hands to train.sbatch, and that the trainer's config accepts them. (On a
real Slurm: tests/test_slurm.py.)"""
import os
import shlex
import shutil
import subprocess

import pytest

from hpctrain.config import load_config
from mpirun import ROOT

SWEEP = os.path.join(ROOT, "slurm", "sweep.sbatch")
CONFIG = os.path.join(ROOT, "hpctrain", "configs", "dlrm_synthetic.toml")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _sweep(tmp_path, task, values=None, key=None, args=(), env=None):
    """Run sweep.sbatch as array task ``task`` with a train.sbatch that prints its arguments."""
    fake = tmp_path / "slurm"
    fake.mkdir(exist_ok=True)
    (fake / "train.sbatch").write_text('printf "%q " "$@"\n')
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCTRAIN_"))}
    env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_JOB_ID="77",
               SLURM_SUBMIT_DIR=str(tmp_path), **extra)
    if values is not None:
        env["HPCTRAIN_SWEEP_VALUES"] = values
    if key is not None:
        env["HPCTRAIN_SWEEP_KEY"] = key
    return subprocess.run(["bash", SWEEP, CONFIG, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_each_task_trains_its_value_in_a_directory_of_its_own(tmp_path):
    p = _sweep(tmp_path, 2, args=("--max-steps", "3"))
    assert p.returncode == 0, p.stderr
    assert "task 2 of array job 77: dense_optimizer.lr = 0.003" in p.stdout
    argv = shlex.split(p.stdout.splitlines()[-1])
    run = "runs/dlrm_synthetic-sweep/lr-0.003"
    assert argv == [CONFIG, "--set", "dense_optimizer.lr=0.003",
                    "--set", f"checkpoint.directory={run}/ckpt",
                    "--set", f"metrics.path={run}/metrics.jsonl", "--max-steps", "3"]
    assert (tmp_path / run).is_dir()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        cfg = load_config(CONFIG, [a for a in argv[1:7] if a != "--set"])
    finally:
        os.chdir(cwd)
    assert cfg.dense_optimizer["lr"] == 0.003
    assert cfg.checkpoint.directory == str(tmp_path / run / "ckpt")
    assert "--set dense_optimizer.lr=0.003" in cfg.text      # recorded in the saved config


def test_any_key_and_a_task_without_a_value(tmp_path):
    p = _sweep(tmp_path, 1, values="16 32", key="tables[0].dim")
    assert p.returncode == 0, p.stderr
    assert "--set tables\\[0\\].dim=32" in p.stdout and "dim-32/ckpt" in p.stdout
    p = _sweep(tmp_path, 2, values="16 32")
    assert p.returncode == 2
    assert "array task 2 has no value: HPCTRAIN_SWEEP_VALUES holds 2 (16 32); submit with " \
           "--array=0-1" in p.stderr


def test_tensorboard_per_task_on_request(tmp_path):
    p = _sweep(tmp_path, 0, env={"HPCTRAIN_SWEEP_TENSORBOARD": "1"})
    assert p.returncode == 0, p.stderr
    assert "--set metrics.tensorboard=runs/dlrm_synthetic-sweep/lr-0.0003/tb" in p.stdout
