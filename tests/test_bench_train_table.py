"""The train and table benchmarks measure what they say: the shipped configs as shipped,
exactly N timed steps, fresh batches beside warm ones, the fastest np.take as the ceiling."""
import dataclasses
import json
import os
import re

import numpy as np
import pytest

from mpirun import mpiexec, run_mpi

import hpctrain
from hpctrain.bench.table import TakeCeiling, ZipfIds, fresh_times
from hpctrain.bench.train import SHIPPED, _StepClock, shipped_config, workload
from hpctrain.config import config_from_dict, load_config

CONFIGS = os.path.join(os.path.dirname(hpctrain.__file__), "configs")
needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")


@pytest.mark.parametrize("dim,bag", sorted(SHIPPED))
def test_train_workload_is_the_shipped_config(dim, bag):
    shipped = load_config(os.path.join(CONFIGS, SHIPPED[(dim, bag)]))
    cfg = config_from_dict(workload(dim, 4096, bag=bag, steps=shipped.steps), source="bench")
    skip = {"source", "text", "raw"}
    assert {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip} == \
        {k: v for k, v in dataclasses.asdict(shipped).items() if k not in skip}
    assert cfg.overlap is True
    assert all(t.dim == dim for t in cfg.tables)
    assert cfg.data.synthetic.bag_size == [bag] * 26


def test_train_workload_sets_only_what_the_command_line_says():
    d = workload(64, 512, bag=5, steps=7, threads=2)
    name, shipped, derived = shipped_config(64, 5)
    assert name == "bench_dlrm_dim64.toml" and derived == "data.synthetic.bag_size = 5"
    assert d["steps"] == 7 and d["batch_per_rank"] == 512 and d["threads"] == 2
    assert d["data"]["synthetic"]["bag_size"] == 5 and d["overlap"] is True
    assert {k: v for k, v in d.items() if k not in ("steps", "batch_per_rank", "threads",
                                                    "device", "data")} == \
        {k: v for k, v in shipped.items() if k not in ("steps", "batch_per_rank", "data")}


@pytest.mark.parametrize("dim,layers", [(16, [13, 512, 256, 64, 16]), (64, [13, 512, 256, 64])])
def test_bench_configs_bottom_mlp_is_what_their_comment_says(dim, layers):
    from hpctrain.dense.models import DLRM
    cfg = load_config(os.path.join(CONFIGS, f"bench_dlrm_dim{dim}.toml"))
    model = DLRM(13, [dim] * 26, cfg.model.bottom, cfg.model.top)
    assert model.bottom.sizes == layers
    header = " ".join(line[1:] for line in cfg.text.splitlines() if line.startswith("#"))
    assert re.search(r"bottom MLP ([\d-]+)", header).group(1) == "-".join(map(str, layers))


class _FakeEmb:
    def __init__(self):
        self.calls = 0

    def backward(self, *args):
        self.calls += 1

    def stats(self):
        return {"rows": {"t": 10 * self.calls}}


class _FakeTrainer:
    def __init__(self):
        self.emb = _FakeEmb()


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_step_clock_times_exactly_the_steps_after_warmup(warmup):
    tr = _FakeTrainer()
    clock = _StepClock(tr, trace_every=2)
    clock.start()
    for _ in range(warmup + 5):
        tr.emb.backward(None, None, 0)
    assert tr.emb.calls == warmup + 5
    assert len(clock.step_times(warmup)) == 5
    assert [t[0] for t in clock.trace] == [1, 2, 4, 6, 8][:1 + (warmup + 5) // 2]
    assert clock.trace[-1][3] == 10 * clock.trace[-1][0]


def test_take_ceiling_matches_np_take_on_any_thread_count():
    rng = np.random.default_rng(0)
    values = rng.random((1000, 8), dtype=np.float32)
    rows = rng.integers(0, 1000, 777)
    for threads in (1, 2, 3):
        buf = np.empty((777, 8), dtype=np.float32)
        take = TakeCeiling(threads)
        take(values, rows, buf)
        take.close()
        np.testing.assert_array_equal(buf, values[rows])


def test_fresh_times_use_each_batch_once():
    seen = []
    times = fresh_times([1, 2, 3, 4, 5], seen.append, warmup=2, repeat=3)
    assert seen == [1, 2, 3, 4, 5] and len(times) == 3
    with pytest.raises(ValueError, match="fresh batches"):
        fresh_times([1], seen.append, 1, 1)


def test_zipf_ids_draw_new_ids_from_each_vocabulary():
    z = ZipfIds(np.random.default_rng(0), 64, 3, 1000, 1.05)
    a, b = z.draw(1)[0], z.draw(1)[0]
    assert a.shape == (192,) and not np.array_equal(a, b)
    assert ((a // 1000) == np.repeat(np.arange(3), 64)).all()


@needs_mpi
def test_table_benchmark_reports_warm_fresh_and_the_take_ceiling(tmp_path):
    out = tmp_path / "table.json"
    run_mpi(1, ["-m", "hpctrain.bench", "table", "--batch", "64", "--features", "3",
                "--vocab", "2000", "--dims", "4", "--optimizers", "sgd,adagrad", "--warmup",
                "1", "--repeat", "3", "--warm-batches", "2", "--batches", "2", "--threads", "2",
                "--json", str(out)], timeout=240)
    doc = json.loads(out.read_text())
    ops = {r["op"]: r for r in doc["results"]}
    assert {"np.take clip, 1 thread", "np.take clip, 2 threads", "find_or_insert fresh",
            "step sgd warm", "step sgd fresh", "step adagrad warm",
            "step adagrad fresh"} <= set(ops)
    takes = [ops["np.take clip, 1 thread"], ops["np.take clip, 2 threads"]]
    ceiling = max(t["ids_per_s"] for t in takes)
    assert sum(t["ceiling"] for t in takes) == 1
    assert ops["lookup+gather"]["ratio"] == pytest.approx(
        ops["lookup+gather"]["ids_per_s"] / ceiling)


@needs_mpi
def test_train_benchmark_times_exactly_the_steps_asked(tmp_path):
    out = tmp_path / "train.json"
    run_mpi(1, ["-m", "hpctrain.bench", "train", "--dim", "16", "--bag", "1", "--batch", "64",
                "--steps", "3", "--warmup", "1", "--trace-every", "2", "--json", str(out)],
            timeout=300)
    (r,) = json.loads(out.read_text())["results"]
    assert r["steps"] == 3 and r["warmup"] == 1 and len(r["losses"]) == 4
    assert r["config"] == "bench_dlrm_dim16.toml" and r["overlap"] is True
    assert r["bottom"] == [13, 512, 256, 64, 16]
    assert r["samples_per_s_all_steps"] == pytest.approx(64 * 3 / r["timed_s"])
    assert [t["step"] for t in r["trace"]] == [1, 2, 4]
    assert r["trace"][-1]["rows"] == r["table_rows"][0] and r["trace"][-1]["rss_sum_bytes"] > 0
    assert r["max_loss_vs_first"] == pytest.approx(max(r["losses"]) / r["losses"][0])
