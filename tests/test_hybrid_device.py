"""Hybrid mode with ``device = "gpu"``: the dense staging of a worker, the error without a
GPU, and, marked ``gpu``, a real CuPy run against the CPU run under mpiexec.

The bit-for-bit comparison of the whole hybrid GPU path (its NumPy twin) with the CPU run
is ``test_twin_of_the_gpu_path_is_bitwise_the_cpu_run`` in tests/mpi/test_hybrid.py, run on
2, 4 and 5 ranks (one and two groups, dense on the servers and allreduced).
"""
import io
import json
import types

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.dense.device import Device, gpu_unavailable
from hpctrain.dense.streams import HostOps
from hpctrain.errors import ConfigError
from hpctrain.train.hybrid import HybridTrainer
from hpctrain.train.hybrid_device import DenseStaging
from hybrid_configs import small
from mpirun import run_mpi

needs_no_gpu = pytest.mark.skipif(gpu_unavailable() is None, reason="a usable GPU is present")


def _copies(log):
    return [e for e in log if e[0] in ("pinned", "alloc", "h2d", "d2h", "record", "wait",
                                       "sync")]


def test_dense_staging_orders_copies_on_the_compute_stream_and_reuses_its_buffers():
    ops = HostOps()
    staging = DenseStaging(Device("gpu", np, ops=ops), 10, np.float32, leader=True)
    params = np.zeros(10, np.float32)
    with pytest.raises(RuntimeError, match="without a download"):
        staging.gradient()
    rng = np.random.default_rng(0)
    for clock in range(3):
        pulled = rng.standard_normal(10).astype(np.float32)
        staging.buffer()[...] = pulled         # what DenseClient.wait_pull writes
        staging.install(params)
        assert np.array_equal(params, pulled)
        grad = rng.standard_normal(10).astype(np.float32)
        staging.start_download(grad)
        got = staging.gradient()
        assert got is staging.grad and np.array_equal(got, grad)
    step = [("h2d", "compute", 40), ("record", "compute", "params"),
            ("d2h", "compute", 40), ("record", "compute", "grad"), ("sync", "grad")]
    # two pinned buffers, once; the next pull waits until the last upload left the buffer
    assert _copies(ops.log) == [("pinned", 10), ("pinned", 10)] + step + \
        2 * ([("sync", "params")] + step)


def test_dense_staging_of_a_worker_that_does_not_push():
    ops = HostOps()
    staging = DenseStaging(Device("gpu", np, ops=ops), 6, np.float32, leader=False)
    staging.start_download(np.ones(6, np.float32))
    assert staging.grad is None and staging.gradient() is None
    assert _copies(ops.log) == [("pinned", 6)]


@needs_no_gpu
def test_a_hybrid_worker_without_a_gpu_stops_with_a_config_error_naming_device():
    null = create_communicator("null")
    roles = types.SimpleNamespace(is_server=False, group=0, worker_index=0, group_comm=null,
                                  role_comm=null, groups=1)
    cfg = small("hybrid").replace(device="gpu")
    # before any message to the servers (no transport given) and before any collective
    with pytest.raises(ConfigError, match=r'small_hybrid\.toml: device: "gpu"') as e:
        HybridTrainer(cfg, roles, None, stream=io.StringIO())
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- on GPUs
CONFIG = """
mode = "hybrid"
seed = 5
global_batch = 128
steps = 20
threads = 1
device = "{device}"

[ps]
servers = 1
groups = {groups}
dense_on_servers = {dense_on_servers}
timeout_s = 120

[model]
kind = "dlrm"
bottom = [32, 8]
top = [32, 1]

[[tables]]
name = "t"
features = ["C1", "C2", "C3"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.05 }}

[dense_optimizer]
kind = "adam"
lr = 0.01

[data]
format = "synthetic"
[data.synthetic]
num_features = 3
num_dense = 4
vocab = 1000
[data.train]
num_samples = 100000

[metrics]
path = "{path}"
every_steps = 1
"""


def _losses(tmp_path, device, groups, dense_on_servers):
    path = tmp_path / f"{device}.jsonl"
    cfg = tmp_path / f"{device}.toml"
    cfg.write_text(CONFIG.format(device=device, groups=groups, path=path,
                                 dense_on_servers=str(dense_on_servers).lower()))
    run_mpi(3, ["-m", "hpctrain", "train", str(cfg)], timeout=300)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return np.array([r["loss"] for r in recs if "loss" in r and "step" in r])


@pytest.mark.gpu
@pytest.mark.parametrize("groups,dense_on_servers", [(2, True), (1, False)])
def test_gpu_workers_follow_the_cpu_run(tmp_path, groups, dense_on_servers):
    """1 server + 2 GPU workers: dense on the servers in 2 groups (an NCCL communicator of
    one rank per group, so one GPU serves), or allreduced over both workers (NCCL over
    two ranks: two GPUs)."""
    import cupy
    if groups == 1 and cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL over two workers needs two GPUs")
    cpu = _losses(tmp_path, "cpu", groups, dense_on_servers)
    gpu = _losses(tmp_path, "gpu", groups, dense_on_servers)
    assert cpu.shape == gpu.shape == (20,)
    rel = np.abs(gpu - cpu) / np.maximum(np.abs(cpu), 1e-12)
    assert rel.max() <= 1e-4, (rel.argmax(), rel.max())
