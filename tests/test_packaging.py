"""What an installation needs: kernels present and runnable on this CPU, an MPI library,
the example configs; and the whole way from the sdist to a 2-rank run in a fresh venv."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from mpirun import ROOT

from hpctrain import examples
from hpctrain.comm.world import NO_MPI
from hpctrain.errors import InstallError


def clean_env(extra=None):
    """This environment without the checkout on the path or a surrounding Slurm job."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SLURM_")}
    env.update({"HPCTRAIN_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, **(extra or {}))
    return env


def run(cmd, cwd, env=None, timeout=120):
    return subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- kernels

def test_kernel_list_matches_the_sources():
    from hpctrain._kernels import KERNELS, missing_kernels
    sources = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{ROOT}/kernels/*.pyx"))
    assert sorted(KERNELS) == sources
    assert missing_kernels() == []


@pytest.fixture(scope="module")
def package_without_kernels(tmp_path_factory):
    """A copy of the hpctrain package with no compiled kernels."""
    top = tmp_path_factory.mktemp("nokernels")
    shutil.copytree(os.path.join(ROOT, "hpctrain"), top / "hpctrain",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return top


def test_missing_kernels_are_one_clear_error_at_import(package_without_kernels):
    top = str(package_without_kernels)
    env = clean_env({"PYTHONPATH": top})
    proc = run([sys.executable, "-c", "import hpctrain, hpctrain._kernels.sparse_ops"], top, env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "hpctrain.errors.InstallError: hpctrain's compiled kernels are missing (_build, "
        "_openmp, data_parse, data_synth, dense_ops, mpi_direct, sparse_ops, table not in "), proc.stderr
    assert "build_ext --inplace" in proc.stderr and "pip install ." in proc.stderr

    info = run([sys.executable, "-m", "hpctrain", "info"], top, env)
    assert info.returncode == 1, info.stdout + info.stderr
    assert "kernels       ERROR: hpctrain's compiled kernels are missing" in info.stdout
    assert info.stderr.strip().splitlines() == [info.stderr.strip()]     # one line
    assert info.stderr.startswith("hpctrain info: error: hpctrain's compiled kernels are missing")

    train = run([sys.executable, "-m", "hpctrain", "train", "--steps", "1"], top, env)
    assert train.returncode != 0
    assert "Traceback" not in train.stderr, train.stderr
    assert "hpctrain's compiled kernels are missing" in train.stderr


def test_kernels_built_for_an_absent_extension_are_refused_by_name():
    from hpctrain._kernels import _build, check_cpu

    class BuiltElsewhere:
        FLAGS = "-O3 -march=sapphirerapids"

        @staticmethod
        def missing():
            return ["avx512f", "avx512bw"]

    with pytest.raises(InstallError, match=r"compiled for avx512f, avx512bw \(-O3 "
                                           r"-march=sapphirerapids\), which this CPU lacks"):
        check_cpu(BuiltElsewhere)
    assert isinstance(InstallError("x"), ImportError)
    assert _build.missing() == []                  # the kernels of this build run here
    assert all(isinstance(x, str) for x in _build.ISA) and isinstance(_build.FLAGS, str)
    assert _build.cpu_has("no-such-extension") is None
    if _build.cpu_has("avx2") is not None:         # x86-64 with GCC/Clang
        assert _build.cpu_has("sse3") is True


def test_info_reports_the_instruction_set_of_the_kernels():
    proc = run([sys.executable, "-m", "hpctrain", "info"], ROOT,
               clean_env({"PYTHONPATH": ROOT}))
    assert proc.returncode == 0, proc.stderr
    from hpctrain._kernels import _build, table
    line = next(x for x in proc.stdout.splitlines() if x.startswith("kernel ISA"))
    assert f"(flags: {_build.FLAGS}); optimizer row updates {table.simd_level()}" in line
    assert ("baseline" in line) == (not _build.ISA), line


SIMD_SCRIPT = r"""
import hashlib, sys
import numpy as np
from hpctrain._kernels import table
from hpctrain.sparse.optimizers import SparseOptimizer
from hpctrain.sparse.table import EmbeddingTable

opts = [SparseOptimizer("adagrad", lr=0.1, weight_decay=0.01),
        SparseOptimizer("adam", lr=0.01, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.01),
        SparseOptimizer("ftrl", lr=0.05, l1=0.5, l2=0.1, initial_accumulator=0.1),
        SparseOptimizer("ftrl", lr=0.05, l1=0.1, l2=1.0, lr_power=-0.7)]
h = hashlib.sha256()
rng = np.random.default_rng(7)
for opt in opts:
    for dim in (1, 3, 4, 5, 8, 9, 16, 17, 64, 67):
        t = EmbeddingTable("t", dim, opt, seed=3)
        rows = t.find_or_insert(np.arange(300, dtype=np.int64), 0)
        for step in range(1, 4):
            g = (rng.standard_normal((300, dim)) * 2).astype(np.float32)
            t.apply_gradients(rows, g, step)
        s = t.export()
        h.update(s["values"].tobytes())
        for k in sorted(s["slots"]):
            h.update(s["slots"][k].tobytes())
print(table.simd_level(), h.hexdigest())
"""


def test_every_simd_variant_of_the_optimizer_updates_computes_the_same_numbers(tmp_path):
    out = {}
    for cap in ("scalar", "avx2", "avx512f"):
        proc = run([sys.executable, "-c", SIMD_SCRIPT], tmp_path,
                   clean_env({"PYTHONPATH": ROOT, "HPCTRAIN_SIMD": cap}))
        assert proc.returncode == 0, proc.stderr
        level, digest = proc.stdout.split()
        out[cap] = (level, digest)
    assert out["scalar"][0] == "scalar"
    assert len({d for _, d in out.values()}) == 1, out
    bad = run([sys.executable, "-c", "import hpctrain._kernels.table"], tmp_path,
              clean_env({"PYTHONPATH": ROOT, "HPCTRAIN_SIMD": "sse9"}))
    assert "HPCTRAIN_SIMD='sse9': expected one of scalar, avx2, avx512f" in bad.stderr


# --------------------------------------------------------------------------- MPI

@pytest.mark.parametrize("command", [["info"], ["train", "--steps", "1"]])
def test_no_mpi_library_is_one_line_saying_what_to_install(tmp_path, command):
    env = clean_env({"PYTHONPATH": ROOT, "MPI4PY_LIBMPI": str(tmp_path / "libmpi.so")})
    proc = run([sys.executable, "-m", "hpctrain", *command], tmp_path, env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"hpctrain {command[0]}: error: {NO_MPI}", proc.stderr
    assert "pip install 'hpctrain[mpich]'" in NO_MPI


# --------------------------------------------------------------------------- configs

def configs(*args, cwd=ROOT):
    return run([sys.executable, "-m", "hpctrain", "configs", *args], cwd,
               clean_env({"PYTHONPATH": ROOT}))


def test_configs_lists_prints_and_copies_the_packaged_examples(tmp_path):
    names = examples.names()
    assert {"dlrm_synthetic", "deepfm_synthetic", "wide_deep_adult"} <= set(names)
    listing = configs()
    assert listing.returncode == 0 and f"example configs in {examples.folder()}:" in listing.stdout
    for n in names:
        assert f"  {n} " in listing.stdout
    assert "A small DLRM on synthetic data" in listing.stdout

    shown = configs("dlrm_synthetic.toml")
    assert shown.returncode == 0
    assert shown.stdout == open(examples.path("dlrm_synthetic"), encoding="utf-8").read()

    dest = tmp_path / "exp"
    dest.mkdir()
    copied = configs("dlrm_synthetic", "-o", str(dest))
    assert copied.returncode == 0 and copied.stdout == f"wrote {dest / 'dlrm_synthetic.toml'}\n"
    assert (dest / "dlrm_synthetic.toml").read_text() == shown.stdout
    again = configs("dlrm_synthetic", "-o", str(dest))
    assert again.returncode == 1 and "exists (--force overwrites it)" in again.stderr
    assert configs("dlrm_synthetic", "-o", str(dest), "--force").returncode == 0
    renamed = configs("deepfm_synthetic", "-o", str(tmp_path / "mine.toml"))
    assert renamed.returncode == 0 and (tmp_path / "mine.toml").exists()

    adult = configs("wide_deep_adult", "-o", str(dest))
    assert adult.returncode == 0
    assert "reads data from ../../../shared/data/adult/adult.csv relative to its own folder" \
        in adult.stdout

    unknown = configs("dlrm")
    assert unknown.returncode == 2 and "no example config 'dlrm'; there are: " in unknown.stderr


def test_example_data_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from hpctrain.config import load_config
    monkeypatch.chdir(tmp_path)
    cfg = load_config(examples.path("wide_deep_adult"))
    want = os.path.normpath(os.path.join(examples.folder(), "../../../shared/data/adult/adult.csv"))
    assert cfg.data.train.paths == cfg.data.eval.paths == [want]
    assert cfg.checkpoint.directory == str(tmp_path / "runs/wide_deep_adult/checkpoints")
    assert examples.unresolved_data_paths(examples.path("dlrm_synthetic")) == []


# --------------------------------------------------------------------------- sdist to run

def _copy_source(dest):
    """The checkout without what builds and runs leave in it."""
    skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "*.so",
                                  "__pycache__", ".pytest_cache", ".hypothesis", "runs",
                                  "bench-results")

    def ignore(folder, names):
        out = skip(folder, names)
        if os.path.basename(folder) == "kernels":
            out |= {n for n in names if n.endswith(".c")}
        return out

    shutil.copytree(ROOT, dest, ignore=ignore)


@pytest.mark.slow
def test_sdist_wheel_fresh_venv_info_and_a_two_rank_run(tmp_path):
    """sdist -> wheel -> fresh venv -> ``hpctrain info`` and 2 ranks of a packaged config."""
    if os.environ.get("HPCTRAIN_TEST_PACKAGING") != "1":
        pytest.skip("builds the sdist and a wheel in isolated environments and installs it in "
                    "a fresh venv (about 4 minutes, needs the package index): "
                    "HPCTRAIN_TEST_PACKAGING=1 runs it")
    times, t0 = {}, time.monotonic()

    def lap(name):
        nonlocal t0
        times[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()

    tools = tmp_path / "tools"
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True, timeout=300)
    pip = run([str(tools / "bin" / "python"), "-m", "pip", "install", "-q", "build"], tmp_path,
              timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"no access to the package index (pip install build failed: "
                    f"{pip.stderr.strip().splitlines()[-1:]})")
    lap("tools venv")

    src = tmp_path / "src"
    _copy_source(src)
    dist = tmp_path / "dist"
    built = run([str(tools / "bin" / "python"), "-m", "build", "-o", str(dist), str(src)],
                tmp_path, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    lap("sdist + wheel")

    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/kernels/*.p*")
               + glob.glob(f"{ROOT}/kernels/*.h")}
    assert sources and sources <= files, sources - files
    assert "LICENSE" in files and not any(f.startswith("kernels/") and f.endswith(".c")
                                          for f in files)
    (wheel,) = glob.glob(str(dist / "*.whl"))
    assert not wheel.endswith("-none-any.whl"), wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    from hpctrain._kernels import KERNELS
    for k in KERNELS:
        assert any(n.startswith(f"hpctrain/_kernels/{k}.") and n.endswith((".so", ".pyd"))
                   for n in names), k
    assert "hpctrain/configs/dlrm_synthetic.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    inst = run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[mpich]"],
               tmp_path, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    lap("fresh venv + install")

    work = tmp_path / "work"
    work.mkdir()
    info = run([str(venv / "bin" / "hpctrain"), "info"], work)
    assert info.returncode == 0, info.stderr
    assert f"({venv / 'bin' / 'python'})" in info.stdout
    isa = next(x for x in info.stdout.splitlines() if x.startswith("kernel ISA"))
    assert "-march" not in isa, isa                  # the portable default
    copied = run([str(venv / "bin" / "hpctrain"), "configs", "dlrm_synthetic", "-o", "."], work)
    assert copied.returncode == 0, copied.stderr
    train = run([str(venv / "bin" / "mpiexec"), "-n", "2", str(venv / "bin" / "python"),
                 "-m", "mpi4py", "-m", "hpctrain", "train", "dlrm_synthetic.toml",
                 "--steps", "3"], work, timeout=300)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "done at step 3" in train.stdout, train.stdout
    assert glob.glob(str(work / "runs" / "dlrm_synthetic" / "checkpoints" / "step-*"))
    lap("info + 2-rank run")
    print(f"\npackaging phases (s): {times}")
