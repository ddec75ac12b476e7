"""Exactly once under kill -9: a 2-rank stream run killed at random moments and resumed
consumes every produced record once past the checkpoints it resumed from, and ends with
the model (rows, dense weights, deltas) of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hpctrain.checkpoint import export_model
from hpctrain.checkpoint.delta import list_deltas, read_delta
from hpctrain.checkpoint.model_file import read_model
from hpctrain.config.data import SyntheticConfig
from hpctrain.data.stream_produce import DriftingSource, produce
from mpirun import ROOT, mpi_env, mpiexec

SEGMENTS, RECORDS, BATCH = 30, 64, 32          # 1920 records, 60 steps
STEPS = SEGMENTS * RECORDS // BATCH

CONFIG = """
seed = 3
global_batch = {batch}
[model]
kind = "dlrm"
bottom = [8]
top = [8, 1]
[[tables]]
name = "t"
features = ["C1", "C2", "C3"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.1 }}
eviction = {{ ttl = 20 }}
[data]
format = "stream"
[data.train]
paths = "{stream}"
[data.stream]
poll_seconds = 0.02
[checkpoint]
directory = "{run}/ckpt"
every_steps = 10
keep_last = 20
[online]
directory = "{run}/deltas"
delta_every_steps = 5
"""


def _source():
    syn = SyntheticConfig(features=["C1", "C2", "C3"], num_dense=3, vocab=[50, 300, 3000],
                          bag_size=[1, 1, 2], bag_size_min=[1, 1, 0])
    return DriftingSource(syn, 11, drift_samples=1000, id_drift=0.05)


def _start(run, tag):
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
           os.path.join(ROOT, "tests", "stream_worker.py"), os.path.join(run, "run.toml"),
           run, tag]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpi_env(), cwd=ROOT, start_new_session=True)


def _last_step(path):
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return 0
    return max((int(x.split()[0]) for x in lines if x), default=0)


def _finish(proc, timeout=90):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"stream run timed out:\n{out[-4000:]}")
    return proc.returncode, out


def _run_until(run, tag, step, rng):
    """Start a run, kill -9 one of its ranks once rank 0 has trained past ``step``."""
    proc = _start(run, tag)
    deadline = time.monotonic() + 90
    while _last_step(os.path.join(run, f"consumed-{tag}-0")) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            rc, out = _finish(proc)
            pytest.fail(f"run {tag} ended (rc {rc}) before step {step}:\n{out[-4000:]}")
        time.sleep(0.01)
    rank = rng.randrange(2)
    with open(os.path.join(run, f"pid-{tag}-{rank}")) as fh:
        os.kill(int(fh.read()), signal.SIGKILL)
    rc, _ = _finish(proc)
    assert rc != 0


def _prepare(tmp, name):
    run = os.path.join(tmp, name)
    os.makedirs(run)
    with open(os.path.join(run, "run.toml"), "w") as fh:
        fh.write(CONFIG.format(batch=BATCH, stream=os.path.join(tmp, "stream"), run=run))
    return run


def _consumed(run, tag, lo, hi):
    """Sample ids both ranks trained at steps lo < step <= hi in run ``tag``."""
    ids = []
    for rank in range(2):
        with open(os.path.join(run, f"consumed-{tag}-{rank}")) as fh:
            for line in fh:
                if not line.endswith("\n"):
                    continue                    # cut by the kill: that step never completed
                step, *rest = line.split()
                if lo < int(step) <= hi:
                    ids.extend(int(x) for x in rest)
    return ids


def _same_rows(a, b):
    """The same keys with the same values (row order is storage order, history-dependent)."""
    ia, ib = np.argsort(a["keys"]), np.argsort(b["keys"])
    np.testing.assert_array_equal(a["keys"][ia], b["keys"][ib])
    np.testing.assert_array_equal(a["values"][ia], b["values"][ib])


def _final_model(run, tmp, name):
    return read_model(export_model(os.path.join(run, "ckpt", f"step-{STEPS:08d}"),
                                   os.path.join(tmp, f"{name}.h5")))


def test_kill9_a_rank_at_random_moments_and_resume(tmp_path):
    if mpiexec() is None:
        pytest.skip("no mpiexec found (install with: pip install -e '.[mpich]')")
    tmp = str(tmp_path)
    rng = random.Random(os.environ.get("HPCTRAIN_TEST_SEED") or None)
    stream = os.path.join(tmp, "stream")
    src = _source()
    produce(stream, src, segment_records=RECORDS, segments=8, end=False)
    # the rest arrives while the first run trains (it waits when the stream is idle)
    producer = threading.Thread(target=produce, args=(stream, src),
                                kwargs=dict(segment_records=RECORDS, segments=SEGMENTS,
                                            rate=1500.0))
    run = _prepare(tmp, "killed")
    producer.start()
    tags, first = ["k1", "k2", "k3"], rng.randrange(3, 25)
    _run_until(run, "k1", first, rng)
    resumed = int(open(os.path.join(run, "resumed-k1")).read())
    producer.join()
    _run_until(run, "k2", rng.randrange(first + 3, STEPS - 5), rng)
    rc, out = _finish(_start(run, "k3"))
    assert rc == 0, out[-4000:]
    assert resumed == 0
    assert open(os.path.join(run, "result-k3")).read().split() == ["done", str(STEPS)]

    # every record exactly once with respect to model state
    starts = [int(open(os.path.join(run, f"resumed-{t}")).read()) for t in tags] + [STEPS]
    ids = []
    for i, tag in enumerate(tags):
        ids += _consumed(run, tag, starts[i], starts[i + 1])
    assert sorted(ids) == list(range(SEGMENTS * RECORDS)), starts

    ref = _prepare(tmp, "reference")
    rc, out = _finish(_start(ref, "r"))
    assert rc == 0, out[-4000:]
    a, b = _final_model(run, tmp, "a"), _final_model(ref, tmp, "b")
    for name in b["tables"]:
        _same_rows(a["tables"][name], b["tables"][name])
    for name, value in b["dense"]["params"].items():
        np.testing.assert_array_equal(a["dense"]["params"][name], value)
    # the deltas the killed runs rewrote are those of the uninterrupted run
    da, db = list_deltas(os.path.join(run, "deltas")), list_deltas(os.path.join(ref, "deltas"))
    assert [s for s, _ in da] == [s for s, _ in db] and db[-1][0] == STEPS
    for (_, pa), (_, pb) in zip(da, db):
        xa, xb = read_delta(pa), read_delta(pb)
        for name in xb["tables"]:
            _same_rows(xa["tables"][name], xb["tables"][name])
            np.testing.assert_array_equal(xa["tables"][name]["tombstones"],
                                          xb["tables"][name]["tombstones"])
