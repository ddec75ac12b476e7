"""Hybrid delta export through the command line, under mpiexec; streams refused in hybrid mode.

``hpctrain train`` on 3 ranks (1 server, 2 groups of 1 worker, SSP s = 1, TTL eviction):
the servers write a delta every 4 clocks, at the checkpoints and at the end, and ``hpctrain
export`` of the first checkpoint brought forward by ``hpctrain serve-sync`` equals the final
checkpoint (the servers' rows and dense parameters at the last clock) exactly. The BSP
comparison with the collective trainer's deltas is tests/mpi/test_hybrid_online.py (run
under mpiexec -n 2 and -n 4 by tests/test_mpi_suites.py).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from hpctrain.config import loads_config
from hpctrain.errors import ConfigError
from mpirun import ROOT, mpi_env, run_mpi
from test_stream import STREAM_RUN

CONFIG = """
mode = "hybrid"
seed = 5
global_batch = 64
steps = 20
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
eviction = {{ ttl = 2 }}
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

[checkpoint]
directory = "{root}/ckpt"
every_steps = 10

[metrics]
path = "{root}/metrics.jsonl"
every_steps = 5

[online]
directory = "{root}/deltas"
delta_every_steps = 4
dense_every = 2
"""


def _cli(*args):
    """``python -m hpctrain ARGS`` in one process (a singleton MPI world)."""
    proc = subprocess.run([sys.executable, "-m", "hpctrain", *args], capture_output=True,
                          text=True, env=mpi_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cli_hybrid_deltas_bring_an_export_to_the_final_checkpoint(tmp_path):
    from hpctrain.checkpoint.delta import list_deltas, read_delta
    from hpctrain.train.serving import ServingModel
    cfg = tmp_path / "hybrid.toml"
    cfg.write_text(CONFIG.format(root=tmp_path))
    out = run_mpi(3, ["-m", "hpctrain", "train", str(cfg)], timeout=120).stdout
    assert "hpctrain: done at step 20" in out, out[-3000:]
    deltas = list_deltas(tmp_path / "deltas")
    assert [s for s, _ in deltas] == [4, 8, 10, 12, 16, 20]
    done = [json.loads((tmp_path / "deltas" / f"delta-{s:08d}" / "DONE").read_text())
            for s, _ in deltas]
    assert [d["dense"] for d in done] == [False, True, True, False, True, True]
    assert [d["since"] for d in done] == [0, 4, 8, 10, 12, 16]
    assert all(d["world_size"] == 1 for d in done)
    assert sum(read_delta(p)["tables"]["items"]["tombstones"].size for _, p in deltas) > 0
    # the server's metrics file has a record per delta; worker 0's records list them
    server = [json.loads(x) for x in open(tmp_path / "metrics.server0.jsonl")]
    assert [r["delta"] for r in server if "delta" in r] == [4, 8, 10, 12, 16, 20]
    worker = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [d["step"] for r in worker for d in r.get("deltas", [])] == [4, 8, 10, 12, 16, 20]
    assert any("progressive" in r for r in worker)

    _cli("export", str(tmp_path / "ckpt" / "step-00000010"), str(tmp_path / "model.h5"))
    line = _cli("serve-sync", str(tmp_path / "model.h5"), str(tmp_path / "deltas"), "--once",
                "--out", str(tmp_path / "served.h5")).splitlines()[1]
    assert json.loads(line)["model_step"] == 20 and json.loads(line)["applied"] == [12, 16, 20]
    _cli("export", str(tmp_path / "ckpt" / "step-00000020"), str(tmp_path / "final.h5"))
    served, final = (ServingModel.load(str(tmp_path / n)) for n in ("served.h5", "final.h5"))
    assert served.step == final.step == 20
    for name in ("users", "items"):
        for a, b in zip(served.rows(name), final.rows(name)):
            np.testing.assert_array_equal(a, b)
    for k, v in final.model.state_dict().items():
        np.testing.assert_array_equal(served.model.state_dict()[k], v)


@pytest.mark.parametrize("fmt", ["stream", "jetstream"])
def test_hybrid_mode_refuses_stream_sources_naming_the_key(tmp_path, fmt):
    from hpctrain.train.hybrid import setup_hybrid
    text = 'mode = "hybrid"\n' + STREAM_RUN.format(steps="steps = 4", stream=tmp_path / "s",
                                                  tmp=tmp_path) + "[ps]\nservers = 1\n"
    if fmt == "jetstream":
        text = text.replace('format = "stream"', 'format = "jetstream"').replace(
            f'[data.train]\npaths = "{tmp_path / "s"}"\n', "").replace(
            "[data.stream]\npoll_seconds = 0.02\nidle_report_seconds = 0.1\n",
            '[data.jetstream]\nurl = "nats://127.0.0.1:4222"\nstream = "s"\nsubject = "t"\n'
            'features = ["C1", "C2"]\nnum_dense = 2\n')
    cfg = loads_config(text, source="hybrid_stream.toml")
    with pytest.raises(ConfigError, match=rf"hybrid_stream.toml: data.format: hybrid mode "
                                          rf"does not read streams \('{fmt}'\)"):
        setup_hybrid(cfg)
