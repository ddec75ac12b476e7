"""Segment streams: sealing, offsets on any world size, idle waits, bad records, the producer."""
import io
import os
import threading

import numpy as np
import pytest

from hpctrain.comm import create_communicator
from hpctrain.config import loads_config
from hpctrain.config.data import BadLinesConfig, SyntheticConfig
from hpctrain.data.stream import StreamReader, end_stream, format_record, write_layout, \
    write_segment
from hpctrain.data.stream_produce import DriftingSource, produce
from hpctrain.data.text import BadLines
from hpctrain.errors import DataError
from hpctrain.train.loop import Trainer
from hpctrain.train.preemption import PreemptionWatcher

FEATS = ["C1", "C2"]


def _source(drift=None, id_drift=0.0):
    syn = SyntheticConfig(features=FEATS, num_dense=3, vocab=[100, 500], bag_size=[1, 2],
                          bag_size_min=[1, 0])
    return DriftingSource(syn, 5, drift, id_drift)


def _reader(d, rank=0, world=1, gb=8, max_bad=0):
    return StreamReader(str(d), rank, world, gb, BadLines(BadLinesConfig(max_bad, 0.0)),
                        poll_seconds=0.01, prefetch=1)


def test_only_sealed_segments_are_read_and_idle_is_not_an_error(tmp_path):
    write_layout(tmp_path, FEATS, 3, partitions=2)
    src = _source()
    write_segment(tmp_path, 0, 2, src.records(0, 5))
    r = _reader(tmp_path)
    assert r.poll(0.1) is None and not r.ended               # 5 records < one batch: idle
    assert r.waiting_for[0].endswith(os.path.join("part-00001", "seg-00000000.tsv"))
    data = os.path.join(tmp_path, "part-00001", "seg-00000000.tsv")
    os.makedirs(os.path.dirname(data))
    with open(data, "w") as fh:                                # written, not sealed yet
        fh.write("\n".join(src.records(5, 5)) + "\n")
    assert r.poll(0.1) is None
    write_segment(tmp_path, 1, 2, src.records(5, 5))           # sealed
    b = r.poll(2.0)
    assert b.sample_ids.tolist() == list(range(8)) and r.state()["file"] == 1
    end_stream(tmp_path, 2)
    assert r.poll(2.0) is None and r.ended                     # 2 left: a partial batch
    r.close()


def test_slices_of_any_world_size_make_the_one_rank_batch_and_offsets_resume(tmp_path):
    produce(str(tmp_path), _source(), segment_records=7, partitions=3, segments=9)
    whole = list(_reader(tmp_path, gb=12))
    assert len(whole) == 63 // 12
    for world in (2, 3, 4):
        parts = [list(_reader(tmp_path, r, world, gb=12)) for r in range(world)]
        for k, b in enumerate(whole):
            ids = np.concatenate([p[k].sample_ids for p in parts])
            np.testing.assert_array_equal(ids, b.sample_ids)
            np.testing.assert_array_equal(np.concatenate([p[k].labels for p in parts]), b.labels)
    r = _reader(tmp_path, gb=12)
    next(r), next(r)
    state = r.state()
    assert state["row"] == 24 and (state["file"], state["line"]) == (3, 3)
    for world in (1, 2):
        rest = []
        for rank in range(world):
            q = _reader(tmp_path, rank, world, gb=12)
            q.restore(state)
            rest.append(np.concatenate([b.sample_ids for b in q]))
        np.testing.assert_array_equal(np.sort(np.concatenate(rest)), np.arange(24, 60))


def test_bad_record_names_segment_and_record_and_the_policy_decides(tmp_path):
    write_layout(tmp_path, FEATS, 3, 1)
    lines = _source().records(0, 8)
    lines[5] = lines[5].replace("\t", "\tx", 1)
    write_segment(tmp_path, 0, 1, lines)
    end_stream(tmp_path, 1)
    with pytest.raises(DataError, match=r"part-00000/seg-00000000\.tsv:6: label b'x0' is not 0"):
        next(_reader(tmp_path))
    b = next(_reader(tmp_path, max_bad=1))                    # tolerated: the slot stays empty
    assert b.size == 7 and 5 not in b.sample_ids.tolist()


def test_record_format_round_trip(tmp_path):
    write_layout(tmp_path, FEATS, 3, 1)
    write_segment(tmp_path, 0, 1, [format_record(41, 1, [0.5, -1, 2], [[7], []])])
    end_stream(tmp_path, 1)
    b = next(_reader(tmp_path, gb=1))
    assert b.sample_ids.tolist() == [41] and b.labels.tolist() == [1.0]
    assert b.dense.tolist() == [[0.5, -1.0, 2.0]] and b.values.tolist() == [7]
    assert b.lengths.tolist() == [1, 0]


def test_drifting_source_turns_and_shifts():
    src = _source(drift=1000, id_drift=0.01)
    k, rows = src.rows(2000, 50)
    assert src.theta(1000) == pytest.approx(np.pi / 2)
    base = src.a.fetch(k)
    shift = np.floor(k * 0.01).astype(np.int64)
    np.testing.assert_array_equal(rows.values[:50], base.values[:50] + shift)   # C1: 1 id each
    again = src.records(2000, 50)
    assert again == src.records(2000, 50)                        # a function of k only


STREAM_RUN = """
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
format = "stream"
[data.train]
paths = "{stream}"
[data.stream]
poll_seconds = 0.02
idle_report_seconds = 0.1
[checkpoint]
directory = "{tmp}/ckpt"
[online]
directory = "{tmp}/deltas"
delta_every_steps = 4
"""


def test_trainer_waits_on_an_idle_stream_and_stops_on_a_signal_with_a_checkpoint(tmp_path):
    stream = tmp_path / "s"
    produce(str(stream), _source(), segment_records=20, segments=2, end=False)
    cfg = loads_config(STREAM_RUN.format(steps="", stream=stream, tmp=tmp_path))
    out = io.StringIO()
    tr = Trainer(cfg, create_communicator("null"), stream=out)
    watcher = PreemptionWatcher(install=False)
    timer = threading.Timer(1.0, watcher.trigger)
    timer.start()
    res = tr.fit(watcher=watcher)
    timer.join()
    assert res["stopped"] == "preempted" and res["step"] == 2           # 40 records: 2 batches
    assert "stream idle" in out.getvalue() and os.path.isdir(tmp_path / "ckpt" / "step-00000002")
    assert os.path.isdir(tmp_path / "deltas" / "delta-00000002")
    produce(str(stream), _source(), segment_records=20, segments=5)     # 100 records, END
    tr2 = Trainer(cfg, create_communicator("null"), stream=io.StringIO())
    res = tr2.fit(resume=True)
    assert res["stopped"] == "done" and res["step"] == 6
