"""The trainer's GPU path (``device = "gpu"``) on every machine, and on CuPy where there is one.

Unmarked tests run the device step with its NumPy twin (``HostOps``: streams, events and
copies performed at once and logged), so the wiring -- pinned reused buffers, the order of
copies, waits and records, the gradients' and the loss's way back -- is checked without a
GPU against the plain CPU step, bit for bit. Tests marked ``gpu`` compare real CuPy runs
with CPU runs and skip cleanly without CuPy and a device.
"""
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.config import MetricsConfig, load_config
from hpctrain.dense import DLRM, make_optimizer
from hpctrain.dense.backend import is_device_array, to_numpy
from hpctrain.dense.device import Device, gpu_unavailable, select_device, tf32_enabled
from hpctrain.dense.streams import DevicePhases, HostOps, hidden_fraction
from hpctrain.errors import ConfigError
from hpctrain.train.loop import Trainer
from mpirun import ROOT, mpi_env
from trainer_configs import SMALL_DLRM, small_config

NO_GPU = gpu_unavailable() is not None
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="a usable GPU is present here")


class TwinTrainer(Trainer):
    """The GPU code path with xp = numpy: the device step on ``HostOps``."""

    def _make_device(self):
        return Device("gpu", np, ops=HostOps(), source=self.cfg.source)


def _fit(cls, cfg, comm=None, **kw):
    t = cls(cfg, comm or create_communicator("null"), stream=io.StringIO())
    t.fit(**kw)
    return t


def _deepfm(steps):
    cfg = load_config(os.path.join(ROOT, "hpctrain", "configs", "deepfm_synthetic.toml"))
    return cfg.replace(steps=steps, global_batch=64, metrics=MetricsConfig())


# ----------------------------------------------------------------------------- the twin

@pytest.mark.parametrize("model", ["dlrm", "deepfm"])
def test_twin_of_the_gpu_path_gives_the_cpu_losses_bit_for_bit(model):
    cfg = small_config(steps=5, overlap=True) if model == "dlrm" else _deepfm(4)
    cpu = _fit(Trainer, cfg)
    twin = _fit(TwinTrainer, cfg.replace(device="gpu"))
    assert twin._device_step is not None and cpu._device_step is None
    assert twin.losses == cpu.losses
    np.testing.assert_array_equal(twin.model.params.data, cpu.model.params.data)
    for k, v in cpu.opt.state_dict().items():
        np.testing.assert_array_equal(twin.opt.state_dict()[k], v)
    # device phases were timed from events and reach the metrics' phase totals
    assert {"gpu.h2d", "gpu.forward", "gpu.backward", "gpu.d2h"} <= set(twin.phase_totals)


def _steps(log):
    """The log cut after each host wait for the gradients (one piece per step)."""
    out, cur = [], []
    for entry in log:
        cur.append(entry)
        if entry == ("sync", "down"):
            out.append(cur)
            cur = []
    return out


def test_twin_stream_order_buffers_and_gradient_return():
    cfg = small_config(steps=3)
    trainer = TwinTrainer(cfg.replace(device="gpu"), create_communicator("null"),
                          stream=io.StringIO())
    ops = trainer.device.ops
    model = trainer.model
    for part in ("bottom", "top"):  # mark where the compute stream runs these layers
        layer = getattr(model, part)
        for fn in ("forward", "backward"):
            def logged(*a, _f=getattr(layer, fn), _n=f"{part}.{fn}", **k):
                ops.log.append(("kernel", _n))
                return _f(*a, **k)
            setattr(layer, fn, logged)
    seen = []
    backward = trainer.emb.backward

    def sparse_backward(ticket, grads, step):
        tx = trainer._device_step.transfer
        last = [e for e in ops.log if e[0] != "mark"][-1]
        seen.append((last, [np.shares_memory(g, tx.down_host) for g in grads.values()],
                     id(tx.up_host), id(tx.down_host)))
        return backward(ticket, grads, step)

    trainer.emb.backward = sparse_backward
    trainer.fit()
    steps = _steps([e for e in ops.log if e[0] != "mark"])
    assert len(steps) == 3
    b, head, embs = 64, 64 * (5 + 1) * 4, 4 * 8 * 64 * 4   # dense 5 + label; 4 x dim 8
    body = [("h2d", "h2d", head), ("record", "h2d", "inputs"),
            ("h2d", "h2d", embs), ("record", "h2d", "embs"),
            ("wait", "compute", "inputs"), ("kernel", "bottom.forward"),
            ("wait", "compute", "embs"),            # the bottom MLP ran before this wait
            ("kernel", "top.forward"), ("kernel", "top.backward"),
            ("record", "compute", "grads"),         # DLRM: embedding grads final here ...
            ("wait", "d2h", "grads"), ("on", "d2h"), ("d2h", "d2h", embs + 4),
            ("record", "d2h", "down"),
            ("kernel", "bottom.backward"),          # ... so their copy overlaps this
            ("record", "compute", "released"), ("sync", "down")]
    first = [e for e in steps[0] if e[0] not in ("pinned", "alloc")]
    assert first == body
    assert sorted(e for e in steps[0] if e[0] in ("pinned", "alloc")) == sorted([
        ("alloc", (head + embs) // 4), ("alloc", embs // 4 + 1),
        ("pinned", (head + embs) // 4), ("pinned", embs // 4 + 1)])
    for later in steps[1:]:  # buffers reused; the pinned buffer and device inputs wait
        assert later == [("sync", "embs"), ("wait", "h2d", "released")] + body
    # the sparse update runs after the host waited, on views of the one pinned buffer
    assert [s[0] for s in seen] == [("sync", "down")] * 3
    assert all(all(shared) for _, shared, _, _ in seen)
    assert len({(up, down) for _, _, up, down in seen}) == 1
    assert b == trainer.local_batch


def test_twin_without_split_points_waits_for_everything_first():
    cfg = _deepfm(2).replace(device="gpu")
    trainer = _fit(TwinTrainer, cfg)
    steps = _steps([e for e in trainer.device.ops.log if e[0] in ("wait", "record", "sync")])
    for step in steps:
        i = step.index(("wait", "compute", "inputs"))
        assert step[i + 1] == ("wait", "compute", "embs")
        assert step.index(("record", "compute", "grads")) < step.index(("record", "d2h", "down"))
        assert step.index(("record", "d2h", "down")) < step.index(("record", "compute",
                                                                   "released"))


def test_host_ops_refuse_waits_on_events_never_recorded():
    ops = HostOps()
    with pytest.raises(RuntimeError, match="never recorded"):
        ops.wait("compute", ops.event("inputs"))
    with pytest.raises(RuntimeError, match="never recorded"):
        ops.sync(ops.event("down"))


def test_device_phases_and_the_hidden_share_of_copies():
    ops = HostOps()
    ph = DevicePhases(ops)
    ph.intervals = []
    with ph.span("forward"):
        pass
    ph.start("h2d", "h2d")
    ph.stop("h2d", "h2d")
    got = ph.take()
    assert set(got) == {"forward", "h2d"} and all(v >= 0 for v in got.values())
    assert ph.take() == {} and [n for n, _, _ in ph.intervals] == ["forward", "h2d"]
    ivs = [("forward", 0.0, 2.0), ("backward", 3.0, 5.0), ("h2d", 1.0, 3.0), ("d2h", 4.0, 6.0),
           ("allreduce", 4.5, 5.5)]
    assert hidden_fraction(ivs) == (1.5 + 1.0, 4.0, 2.5 / 4.0)
    assert hidden_fraction([("forward", 0.0, 1.0)])[2] == 1.0


# ----------------------------------------------------------------------------- config, errors

def test_device_key():
    assert small_config().device == "cpu"
    text = SMALL_DLRM.format(steps=2, overlap="false", sparse_opt="adam", eval_at_end="false",
                             extra="")
    from hpctrain.config import loads_config
    assert loads_config('device = "gpu"\n' + text).device == "gpu"
    with pytest.raises(ConfigError, match=r"device: expected one of 'cpu', 'gpu', got 'tpu'"):
        loads_config('device = "tpu"\n' + text, source="run.toml")
    assert select_device("cpu").xp is np and not select_device("cpu").pipelined
    assert tf32_enabled({}) is False and tf32_enabled({"CUPY_TF32": "1"}) is True


def _one_line_config_error(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__  # no chained traceback
    return msg


@needs_no_gpu
def test_gpu_without_cupy_or_gpu_is_one_config_error_line(monkeypatch):
    msg = _one_line_config_error(lambda: select_device("gpu", 0, "run.toml"))
    assert msg.startswith('run.toml: device: "gpu"')
    cfg = small_config(steps=2).replace(device="gpu")
    msg = _one_line_config_error(
        lambda: Trainer(cfg, create_communicator("null"), stream=io.StringIO()))
    assert "device" in msg and "small_config.toml" in msg

    def fake_cupy(count):
        def get_count():
            if isinstance(count, Exception):
                raise count
            return count
        runtime = types.SimpleNamespace(getDeviceCount=get_count)
        return types.SimpleNamespace(__version__="13.9.9",
                                     cuda=types.SimpleNamespace(runtime=runtime))

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected\nat line 3")))
    msg = _one_line_config_error(lambda: select_device("gpu", 1, "run.toml"))
    assert "finds no usable CUDA device (RuntimeError: cudaErrorNoDevice" in msg
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(0))
    assert "sees no CUDA device" in _one_line_config_error(lambda: select_device("gpu"))


@needs_no_gpu
@pytest.mark.parametrize("cmd", [["hpctrain", "train", "RUN"],
                                 ["hpctrain.bench", "train", "--device", "gpu", "--steps", "1"],
                                 ["hpctrain.bench", "dense", "--device", "gpu"]])
def test_command_lines_fail_with_one_line(tmp_path, cmd):
    run = tmp_path / "run.toml"
    run.write_text('device = "gpu"\n' + SMALL_DLRM.format(
        steps=2, overlap="false", sparse_opt="adam", eval_at_end="false", extra=""))
    argv = [sys.executable, "-m", *[str(run) if c == "RUN" else c for c in cmd]]
    proc = subprocess.run(argv, cwd=tmp_path, env=mpi_env(), capture_output=True, text=True,
                          timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ConfigError" in lines[0]
    assert 'device: "gpu" needs CuPy' in lines[0] or "CUDA device" in lines[0], lines[0]


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("first,then", [(TwinTrainer, Trainer), (Trainer, TwinTrainer)])
def test_checkpoint_resumes_across_devices(tmp_path, first, then):
    ref = _fit(Trainer, small_config(str(tmp_path / "ref"), steps=8))
    cfg = small_config(str(tmp_path / "run"), steps=8, checkpoint_every=4)
    dev = {TwinTrainer: "gpu", Trainer: "cpu"}
    a = _fit(first, cfg.replace(device=dev[first]), max_steps=4)
    assert a.step == 4
    b = then(cfg.replace(device=dev[then]), create_communicator("null"), stream=io.StringIO())
    b.fit(resume=True)
    assert b.step == 8 and a.losses + b.losses == ref.losses
    np.testing.assert_array_equal(b.model.params.data, ref.model.params.data)


class FakeDeviceArray(np.ndarray):
    """Stands for a CuPy array: module ``cupy.*`` and ``get()`` to the host."""

    def get(self):
        return np.array(self.view(np.ndarray))


FakeDeviceArray.__module__ = "cupy._fake"


def test_dense_state_leaves_the_device_as_host_numpy():
    model = DLRM(3, [4, 4], bottom=[8], top=[8, 1], seed=1)
    opt = make_optimizer("adam", model.params, lr=0.1)
    for g in model.params.named_grads().values():
        g[...] = 0.5
    opt.step()
    want_p, want_o = model.state_dict(), opt.state_dict()
    for p in model.params.params:  # as if every buffer lived on a device
        p.data = p.data.view(FakeDeviceArray)
    for k in opt.state:
        opt.state[k] = opt.state[k].view(FakeDeviceArray)
    assert is_device_array(model.params.params[0].data)
    assert type(to_numpy(model.params.params[0].data)) is np.ndarray
    for got, want in ((model.state_dict(), want_p), (opt.state_dict(), want_o)):
        assert set(got) == set(want)
        for k, v in got.items():
            assert type(v) is np.ndarray and v.dtype == want[k].dtype, k
            np.testing.assert_array_equal(v, want[k])
    fresh = DLRM(3, [4, 4], bottom=[8], top=[8, 1], seed=2)
    fresh_opt = make_optimizer("adam", fresh.params, lr=0.1)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(fresh.params.data, to_numpy(model.params.data))
    assert fresh_opt.step_count == 1


# ----------------------------------------------------------------------------- on a GPU

def _mpi_self():
    from hpctrain.comm.world import mpi_world
    return create_communicator("mpi", mpi_world().Split(mpi_world().rank, 0))


@pytest.mark.gpu
def test_gpu_losses_follow_cpu_within_1e4_over_50_steps():
    cfg = small_config(steps=50, overlap=True)
    cpu = _fit(Trainer, cfg, _mpi_self())
    gpu = _fit(Trainer, cfg.replace(device="gpu"), _mpi_self())
    assert gpu.device.kind == "gpu" and is_device_array(gpu.model.params.data)
    assert "device_buffers" in gpu.dense_comm.capabilities  # the allreduce is NCCL
    assert not tf32_enabled()
    a, b = np.array(cpu.losses), np.array(gpu.losses)
    assert a.shape == b.shape == (50,)
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-12)
    assert rel.max() <= 1e-4, (rel.argmax(), rel.max())
    assert gpu.phase_totals.get("gpu.h2d", 0) > 0 and gpu.phase_totals.get("gpu.d2h", 0) > 0


@pytest.mark.gpu
def test_gpu_checkpoint_resumes_on_cpu(tmp_path):
    cfg = small_config(str(tmp_path), steps=8, checkpoint_every=4)
    gpu = _fit(Trainer, cfg.replace(device="gpu"), _mpi_self(), max_steps=4)
    cpu = Trainer(cfg, _mpi_self(), stream=io.StringIO())
    assert cpu.restore() == 4
    np.testing.assert_allclose(cpu.model.params.data, to_numpy(gpu.model.params.data))
    cpu.fit(resume=True)
    assert cpu.step == 8 and all(np.isfinite(cpu.losses))


def test_info_reports_cuda_tf32_and_each_rank_gpu():
    from hpctrain.info import _gpu_facts, format_summary
    facts = _gpu_facts()
    for key in ("cupy", "gpus", "gpu_bus_ids", "nccl", "cuda_runtime", "cuda_driver", "tf32"):
        assert key in facts, key
    f = {"hpctrain": "x", "python": "3", "python_executable": "py", "numpy": "2", "mpi4py": "4",
         "mpi_library": "MPICH", "mpi_standard": "4.1", "thread_level": "MPI_THREAD_MULTIPLE",
         "thread_level_requested": "multiple", "h5py": "3", "kernels": [], "openmp": None,
         "cupy": "13.3.0", "gpus": ["NVIDIA H100", "NVIDIA H100"],
         "gpu_bus_ids": ["0000:1B:00.0", "0000:2C:00.0"], "nccl": 21903, "cuda_runtime": "12.4",
         "cuda_driver": "12.6", "tf32": False, "world_size": 2, "hosts": {"n1": 2},
         "ranks": [{"rank": r, "host": "n1", "pid": 1, "local_rank": r, "local_size": 2,
                    "threads": 4, "threads_from": "config", "gpu": r, "gpu_name": "NVIDIA H100",
                    "gpu_bus_id": ["0000:1B:00.0", "0000:2C:00.0"][r]} for r in (0, 1)]}
    text = format_summary({**facts, **f})
    assert "NCCL          2.19.3" in text
    assert "CUDA          runtime 12.4, driver 12.6; TF32 off (CUPY_TF32)" in text
    assert "gpu 1 (NVIDIA H100, 0000:2C:00.0)" in text
