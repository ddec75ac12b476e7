"""Rank slices: 1, 2 and 4 ranks read identical global batches; state/restore resumes exactly."""
import numpy as np
import pytest

from data_helpers import criteo_line, data_config, global_batches, same_samples, samples, \
    write_criteo
from hpctrain.data import CRITEO_FEATURES, make_reader
from hpctrain.data.convert import main as convert_main
from hpctrain.errors import ConfigError

FEATURES = list(CRITEO_FEATURES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-file Criteo set (with a tolerated bad line) and its HDF5 conversion."""
    d = tmp_path_factory.mktemp("shard")
    write_criteo(d / "a.tsv", 130, seed=11)
    rng = np.random.default_rng(12)
    lines = [criteo_line(rng) for _ in range(95)]
    lines[40] = "1\t2\t3"                                   # bad: kept out, slot left empty
    (d / "b.tsv").write_text("\n".join(lines) + "\n")
    assert convert_main(["--criteo", str(d / "a.tsv"), str(d / "b.tsv"), "-o", str(d / "c.h5"),
                         "--max-bad-lines", "1", "--chunk-rows", "16"]) == 0
    return d


def cfg_for(kind, d, shuffle=False):
    if kind == "synthetic":
        data = {"format": "synthetic", "shuffle": shuffle, "shuffle_block": 3,
                "synthetic": {"num_features": 3, "num_dense": 2, "vocab": [50, 1000, 7],
                              "bag_size": [1, 4, 2], "bag_size_min": [1, 0, 2]},
                "train": {"num_samples": 223}, "eval": {"num_samples": 101}}
        return data_config(data, ["C1", "C2", "C3"])
    paths = [str(d / "a.tsv"), str(d / "b.tsv")] if kind == "criteo" else [str(d / "c.h5")]
    data = {"format": kind, "shuffle": shuffle, "shuffle_block": 5,
            "bad_lines": {"max_count": 1}, "train": {"paths": paths},
            "eval": {"paths": paths, "rows": [7, 200]}}
    return data_config(data, FEATURES)


KINDS = ["synthetic", "criteo", "hdf5"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_world_sizes_read_identical_global_batches(files, kind, shuffle):
    cfg = cfg_for(kind, files, shuffle)
    ref = global_batches(cfg, "train", 1, 24, seed=3, epochs=2)
    assert len(ref) == 2 * (224 // 24)     # 225 lines - 1 bad = 224 or 223 samples
    for world in (2, 4):
        got = global_batches(cfg, "train", world, 24, seed=3, epochs=2)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            same_samples(a, b)
    if shuffle:   # each epoch has its own order, and it is not the file order
        plain = global_batches(cfg_for(kind, files), "train", 1, 24, seed=3, epochs=1)
        assert ref[0] != plain[0] and ref[0] != ref[len(ref) // 2]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_keeps_the_partial_last_batch(files, kind):
    cfg = cfg_for(kind, files)
    ref = global_batches(cfg, "eval", 1, 20)
    n = sum(len(b) for b in ref)
    # rows [7, 200): text lines (one of them bad) or HDF5 samples (the bad line was skipped)
    assert n == {"synthetic": 101, "criteo": 192, "hdf5": 193}[kind]
    for world in (2, 4):
        got = global_batches(cfg, "eval", world, 20)
        assert [len(b) for b in got] == [len(b) for b in ref]
        for a, b in zip(got, ref):
            same_samples(a, b)


def test_rank_slices_are_contiguous_pieces(files):
    cfg = cfg_for("synthetic", files)
    whole = next(make_reader(cfg, "eval", 0, 1, 40, 0))
    for r in range(4):
        b = next(make_reader(cfg, "eval", r, 4, 40, 0))
        assert (b.offset, b.size, b.global_size) == (10 * r, 10, 40)
        same_samples(samples(b), samples(whole)[10 * r:10 * r + 10])


def test_global_batch_must_divide(files):
    with pytest.raises(ConfigError, match="global batch 10 is not divisible by the world size 4"):
        make_reader(cfg_for("synthetic", files), "train", 0, 4, 10, 0)


def resume_run(cfg, world, G, stop, world2, prefetch, epochs=3):
    """Global batches of a run stopped after ``stop`` batches and resumed on ``world2`` ranks."""
    readers = [make_reader(cfg, "train", r, world, G, 5, epochs=epochs, prefetch=prefetch)
               for r in range(world)]
    out = []
    for _ in range(stop):
        out.append([s for r in readers for s in samples(next(r))])
    states = [r.state() for r in readers]
    assert all(s == states[0] for s in states), "the state depends on the rank"
    for r in readers:
        r.close()
    readers = [make_reader(cfg, "train", r, world2, G, 5, epochs=epochs, prefetch=prefetch)
               for r in range(world2)]
    for r in readers:
        next(r)                                      # read past the point, then rewind
        r.restore(states[0])
    while True:
        parts = [next(r, None) for r in readers]
        if parts[0] is None:
            break
        out.append([s for p in parts for s in samples(p)])
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_state_restore_resumes_exactly_on_any_world_size(files, kind, shuffle):
    cfg = cfg_for(kind, files, shuffle)
    ref = global_batches(cfg, "train", 1, 32, seed=5, epochs=3)
    for stop, world, world2, prefetch in [(3, 2, 4, 0), (9, 4, 1, 2), (7, 1, 2, 3)]:
        got = resume_run(cfg, world, 32, stop, world2, prefetch)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            same_samples(a, b)


def test_stream_state_without_seek_hint_resumes(files):
    """A state whose byte offset is unknown (-1) is resumed by skipping lines."""
    cfg = cfg_for("criteo", files)
    ref = global_batches(cfg, "train", 1, 16, epochs=1)
    with make_reader(cfg, "train", 0, 1, 16, 0, epochs=1) as r:
        for _ in range(9):
            next(r)
        st = dict(r.state(), offset=-1)
        assert st["row"] == 144
        r.restore(st)
        same_samples(samples(next(r)), ref[9])
        r.reset()
        same_samples(samples(next(r)), ref[0])


def test_restore_rejects_foreign_state(files):
    from hpctrain.errors import DataError
    with make_reader(cfg_for("synthetic", files), "train", 0, 1, 8, 0) as r:
        with pytest.raises(DataError, match="not a data reader state"):
            r.restore({"step": 3})
        with pytest.raises(DataError, match="state version 7"):
            r.restore(dict(r.state(), version=7))
