"""Checkpoints in one process: exact round trip, atomicity, corruption, keep_last, layout,
and resharding between simulated worlds of different sizes."""
import json
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest

from checkpoint_worlds import (admission_stream, admission_table, assert_tree_equal, concat,
                               global_tables, owner_fn, pending_of, rows_by_key, run_world,
                               shard, take_sorted, train_owned)
from hpctrain.checkpoint import (CheckpointError, CheckpointManager, CheckpointWarning,
                                 export_model, verify)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"bottom.0.weight": rng.standard_normal((13, 8)).astype(np.float32),
                   "bottom.0.bias": np.zeros(8, np.float32),
                   "top/1.w": rng.standard_normal((4, 1)),        # '/' in a name
                   "": np.arange(3, dtype=np.int16), ".": np.float16(2.5),
                   "100%": np.array(7, dtype=np.uint8)},            # 0-d array
        "optimizer": {"kind": "adagrad", "step": 12, "lr": 0.01, "nesterov": False,
                      "big": 2**70, "none": None, "raw": b"\x00\xff",
                      "moments": [np.ones(3, np.float64), (np.int64(4), np.complex64(1 + 2j))],
                      "accum": {"bottom.0.weight": np.full((13, 8), 0.1, np.float32)},
                      "flags": np.array([True, False]), "names": np.array([b"a", b"bc"]),
                      "empty": np.zeros((0, 5), np.float32), "nan": np.array([np.nan, np.inf])},
    }


def state_dict():
    return {"reader": {"version": 1, "epoch": 1, "row": 4096, "file": 0, "offset": -1,
                       "line": 0},
            "files": ["a.tsv", "b.tsv"],
            "rng": {"bit_generator": "PCG64",
                    "state": {"state": 2**127 + 12345, "inc": 2**64 + 1}},
            "config": "[model]\nkind = \"dlrm\"\n# ünïcode\n", "versions": {"hpctrain": "0.1"},
            "loss": 0.6931471805599453}


def save_world(directory, size, step, tables, dense=None, state=None, keep_last=3):
    """Save ``tables`` sharded by ``owner_fn(size)`` from a simulated world of ``size`` ranks."""
    owner = owner_fn(size)

    def body(comm):
        mgr = CheckpointManager(directory, comm, keep_last=keep_last)
        return mgr.save(step, dense, shard(tables, owner, size, comm.rank), state)

    results, errors = run_world(size, body)
    assert errors == [None] * size, errors
    return results[0]


def simple(directory, step, keep_last=3, seed=0):
    tables = global_tables(seed)
    mgr = CheckpointManager(directory, keep_last=keep_last)
    return mgr, mgr.save(step, dense_tree(seed), tables, state_dict()), tables


def test_round_trip_exact(tmp_path):
    mgr, path, tables = simple(tmp_path, 7)
    assert os.path.basename(path) == "step-00000007"
    step, dense, got, state = mgr.load()
    assert step == 7
    assert_tree_equal(dense, dense_tree(0), "dense")
    assert_tree_equal(got, tables, "tables")
    assert state == state_dict()
    step2, dense2, got2, _ = mgr.load(path, owner=lambda name, keys: np.zeros(len(keys), int))
    assert_tree_equal((step2, dense2, got2), (7, dense, got))


def test_readable_with_plain_h5py_at_documented_paths(tmp_path):
    _, path, tables = simple(tmp_path, 3)
    manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
    assert manifest["format"] == "hpctrain-checkpoint" and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"dense.h5", "tables-00000-of-00001.h5"}
    assert manifest["tables"]["user"] == {"table_id": 2, "dim": 4, "rows": [500],
                                          "levels": {"admission/": [100]}}
    with h5py.File(os.path.join(path, "dense.h5"), "r") as f:
        assert f.attrs["step"] == 3 and f.attrs["kind"] == "dense"
        w = f["dense/params/bottom.0.weight"][...]
        assert np.array_equal(w, dense_tree(0)["params"]["bottom.0.weight"])
        assert np.array_equal(f["dense/params/top%2F1.w"][...], dense_tree(0)["params"]["top/1.w"])
        assert f["dense/optimizer/step"][()] == 12
        assert f["dense/optimizer/kind"].asstr()[()] == "adagrad"
        assert json.loads(f["state/reader"][()]) == state_dict()["reader"]
        assert f["state/config"].asstr()[()] == json.dumps(state_dict()["config"])
    with h5py.File(os.path.join(path, "tables-00000-of-00001.h5"), "r") as f:
        assert f.attrs["rank"] == 0 and f.attrs["world_size"] == 1
        assert json.loads(f.attrs["tables"]) == ["user", "item/id", "empty"]
        t = f["tables/item%2Fid"]
        assert t.attrs["dim"] == 8 and t.attrs["num_rows"] == 300
        assert np.array_equal(t["keys"][...], tables["item/id"]["keys"])
        assert np.array_equal(t["values"][...], tables["item/id"]["values"])
        assert np.array_equal(t["slots/accumulator"][...], tables["item/id"]["slots"]["accumulator"])
        assert np.array_equal(t["admission/keys"][...], tables["item/id"]["admission"]["keys"])
        assert t["values"].dtype == np.float32 and t["keys"].dtype == np.int64


def test_no_pickle_on_load(tmp_path, monkeypatch):
    mgr, path, _ = simple(tmp_path, 1)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a checkpoint unpickled something")

    for mod, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                      (np, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    mgr.load()
    export_model(path, tmp_path / "model.h5")
    for dirpath, _, files in os.walk(os.path.join(ROOT, "hpctrain", "checkpoint")):
        for name in files:
            if name.endswith(".py"):
                src = open(os.path.join(dirpath, name)).read()
                assert not re.search(r"import pickle|pickle\.load|allow_pickle|np\.load\b", src), name
    # Arrays of Python objects cannot go in at all.
    with pytest.raises(CheckpointError, match="object"):
        mgr.save(2, {"bad": np.array([{}], dtype=object)}, {}, {})


def test_crash_before_manifest_keeps_previous(tmp_path):
    simple(tmp_path, 10)
    # A writer process that dies (no cleanup at all) right before the manifest.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from checkpoint_worlds import global_tables
        from hpctrain.checkpoint import CheckpointManager, _files
        _files.write_manifest = lambda *a, **k: os._exit(3)
        CheckpointManager({str(tmp_path)!r}).save(20, {{}}, global_tables(1), {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".step-00000020.tmp-")]
    assert leftovers, os.listdir(tmp_path)
    mgr = CheckpointManager(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a save in progress is not a corrupt checkpoint
        assert mgr.latest() == os.path.join(tmp_path, "step-00000010")
    # A step directory without its manifest (e.g. a partial copy) is skipped, with a warning.
    os.mkdir(tmp_path / "step-00000030")
    with pytest.warns(CheckpointWarning, match=r"step-00000030.*no MANIFEST.json"):
        assert mgr.load()[0] == 10
    mgr.save(31, {}, global_tables(0), {})
    assert sorted(os.listdir(tmp_path)) == ["step-00000010", "step-00000031"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "delete"])
def test_corrupt_checkpoint_falls_back(tmp_path, damage):
    simple(tmp_path, 1)
    _, path, _ = simple(tmp_path, 2, seed=1)
    target = os.path.join(path, "tables-00000-of-00001.h5")
    if damage == "flip":
        with open(target, "r+b") as fh:
            fh.seek(os.path.getsize(target) // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0x01]))
        problem = r"tables-00000-of-00001.h5: sha256 mismatch"
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) - 100)
        problem = r"tables-00000-of-00001.h5: size \d+ bytes, manifest says \d+ \(truncated\)"
    elif damage == "manifest":
        manifest = os.path.join(path, "MANIFEST.json")
        text = open(manifest).read().replace('"step": 2', '"step": 3')
        open(manifest, "w").write(text)
        problem = r"MANIFEST.json: checksum mismatch"
    else:
        os.unlink(target)
        problem = r"tables-00000-of-00001.h5: missing"
    mgr = CheckpointManager(tmp_path)
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint .*step-00000002: {problem}"):
        assert mgr.latest() == os.path.join(tmp_path, "step-00000001")
    with pytest.warns(CheckpointWarning):
        step, dense, _, _ = mgr.load()
    assert step == 1
    assert_tree_equal(dense, dense_tree(0))
    with pytest.raises(CheckpointError, match=rf"step-00000002: {problem}"):
        mgr.load(path)
    if damage != "flip":  # without hashing, only what sizes and the manifest reveal
        with pytest.raises(CheckpointError, match=rf"step-00000002: {problem}"):
            mgr.load(path, verify_files=False)
    with pytest.raises(CheckpointError, match=problem):
        export_model(path, tmp_path / "model.h5")


def test_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    tables = global_tables(0, specs=(("t", 2, 10),))
    for step in (5, 10, 15, 20):
        mgr.save(step, {}, tables, {})
        assert len(mgr.checkpoints()) == min(2, step // 5)
    assert [os.path.basename(p) for p in mgr.checkpoints()] == ["step-00000015", "step-00000020"]
    assert sorted(os.listdir(tmp_path)) == ["step-00000015", "step-00000020"]
    # Re-saving a step replaces it; keep_last=None keeps everything.
    mgr.save(20, {"x": np.ones(1)}, tables, {})
    assert mgr.load()[1]["x"].tolist() == [1.0]
    everything = CheckpointManager(tmp_path, keep_last=None)
    for step in (21, 22, 23):
        everything.save(step, {}, tables, {})
    assert len(everything.checkpoints()) == 5
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_bad_arguments_publish_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path)
    tables = global_tables(0, specs=(("t", 2, 10),))
    ragged = {"t": dict(tables["t"], access_count=np.zeros(9, np.int64))}
    with pytest.raises(CheckpointError, match=r"table 't': access_count has 9 rows, its keys have 10"):
        mgr.save(1, {}, ragged, {})
    with pytest.raises(CheckpointError, match=r"state\['f'\] is not JSON-able"):
        mgr.save(1, {}, tables, {"f": object()})
    with pytest.raises(CheckpointError, match=r"writing dense.h5: TypeError: dense/w: keys must be str, got int 3"):
        mgr.save(1, {"w": {3: np.ones(1)}}, tables, {})
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        mgr.load()


def test_table_mismatch_and_bad_owner(tmp_path):
    mgr, path, _ = simple(tmp_path, 4)
    dims = {"user": 4, "item/id": 8, "empty": 2}
    mgr.load(table_dims=dims)
    with pytest.raises(CheckpointError, match=r"table 'user' has dim 4, expected 16"):
        mgr.load(table_dims=dict(dims, user=16))
    with pytest.raises(CheckpointError, match=r"has no table 'clicks'"):
        mgr.load(table_dims=dict(dims, clicks=4))
    with pytest.raises(CheckpointError, match=r"holds table 'empty', which the caller"):
        mgr.load(table_dims={"user": 4, "item/id": 8})
    with pytest.raises(CheckpointError, match=r"owner\('user', keys\) returned rank 1, outside \[0, 1\)"):
        mgr.load(owner=lambda name, keys: np.ones(len(keys), int))
    with pytest.raises(CheckpointError, match=r"expected integer ranks of shape"):
        mgr.load(owner=lambda name, keys: np.zeros(3))


@pytest.mark.parametrize("old,new", [(3, 2), (2, 3), (1, 4), (4, 1)])
def test_reshard_between_world_sizes(tmp_path, old, new):
    tables = global_tables(5)
    save_world(tmp_path, old, 9, tables, dense_tree(1), state_dict())
    manager_chunk = 64 * 8  # a few rows per chunk: exercises the chunked reader
    owner = owner_fn(new)

    def body(comm):
        mgr = CheckpointManager(tmp_path, comm, chunk_bytes=manager_chunk)
        return mgr.load(owner=owner, table_dims={"user": 4, "item/id": 8, "empty": 2})

    results, errors = run_world(new, body)
    assert errors == [None] * new, errors
    old_owner = owner_fn(old)
    for rank, (step, dense, got, state) in enumerate(results):
        assert step == 9 and state == state_dict()
        assert_tree_equal(dense, dense_tree(1))
        for name, full in tables.items():
            # Deterministic order: old rank, then row within the old shard.
            want = concat([shard({name: full}, old_owner, old, r)[name] for r in range(old)])
            want = shard({name: want}, owner, new, rank)[name]
            assert_tree_equal(got[name], want, f"rank {rank} table {name}")
            assert (owner(name, got[name]["keys"]) == rank).all()
    for name, full in tables.items():
        union = concat([res[2][name] for res in results])
        assert_tree_equal(take_sorted(union), take_sorted(full), f"union of {name}")


def test_owner_none_needs_same_world(tmp_path):
    tables = global_tables(2)
    save_world(tmp_path, 2, 1, tables)

    def same(comm):
        return CheckpointManager(tmp_path, comm).load()

    results, errors = run_world(2, same)
    assert errors == [None, None]
    for rank, res in enumerate(results):
        assert_tree_equal(res[2], shard(tables, owner_fn(2), 2, rank))
    results, errors = run_world(3, same)
    assert all(isinstance(e, CheckpointError) and "written by 2 ranks" in str(e) for e in errors)


def test_collective_errors_raise_on_every_rank(tmp_path):
    tables = global_tables(0)

    def mismatched(comm):  # rank 1 forgets a table
        mine = shard(tables, owner_fn(2), 2, comm.rank)
        if comm.rank == 1:
            del mine["user"]
        return CheckpointManager(tmp_path, comm).save(1, {}, mine, {})

    _, errors = run_world(2, mismatched)
    assert all(isinstance(e, CheckpointError) and "'user'" in str(e) for e in errors), errors

    def bad_owner(comm):  # owners that disagree across ranks lose rows
        return CheckpointManager(tmp_path, comm).load(
            owner=lambda name, keys: np.full(len(keys), 0 if comm.rank else 1))

    save_world(tmp_path, 2, 2, tables)
    _, errors = run_world(2, bad_owner)
    assert all(isinstance(e, CheckpointError) and "kept 0 rows" in str(e) for e in errors), errors
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_export_model(tmp_path):
    tables = global_tables(3)
    path = save_world(tmp_path, 3, 42, tables, dense_tree(2), state_dict())
    out = export_model(path, tmp_path / "model.h5", chunk_bytes=100)
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "hpctrain-model" and f.attrs["step"] == 42
        assert list(f["dense"]) == ["params"]  # no optimizer state
        assert np.array_equal(f["dense/params/bottom.0.weight"][...],
                              dense_tree(2)["params"]["bottom.0.weight"])
        assert json.loads(f["state/config"][()]) == state_dict()["config"]
        for name, full in tables.items():
            t = f["tables"][name.replace("/", "%2F")]
            assert set(t) == {"keys", "values"} and t.attrs["dim"] == full["values"].shape[1]
            keys, values = t["keys"][...], t["values"][...]
            order = np.argsort(keys)
            want = take_sorted(full)
            assert np.array_equal(keys[order], want["keys"])
            assert np.array_equal(values[order], want["values"])
    assert verify(path)[1] is None
    # A directory of checkpoints exports its newest valid one.
    save_world(tmp_path, 1, 43, tables, dense_tree(3), {})
    with h5py.File(export_model(tmp_path, tmp_path / "latest.h5"), "r") as f:
        assert f.attrs["step"] == 43 and list(f["state"]) == []


def test_same_world_same_routing_reads_one_file_per_rank(tmp_path, monkeypatch):
    from hpctrain.checkpoint import _tables

    tables = global_tables(4)
    save_world(tmp_path, 2, 1, tables)
    reads = []
    add = _tables.TableReader.add
    monkeypatch.setattr(_tables.TableReader, "add",
                        lambda self, h5, *a: reads.append(h5.filename) or add(self, h5, *a))
    moved = owner_fn(2)
    for owner, files_per_rank in [(owner_fn(2), 1), (lambda n, k: 1 - moved(n, k), 2)]:
        reads.clear()
        results, errors = run_world(2, lambda comm: CheckpointManager(tmp_path, comm).load(
            owner=owner))
        assert errors == [None, None]
        assert len(reads) == 2 * files_per_rank * len(tables)
        for rank, res in enumerate(results):
            for name, want in shard(tables, owner, 2, rank).items():
                assert_tree_equal(take_sorted(res[2][name]), take_sorted(want), name)


@pytest.mark.parametrize("counter", ["exact", "bloom"])
def test_pending_admission_counts_survive_checkpoints(tmp_path, counter):
    """Pending admission counts (exact) and the Bloom filter are saved with the rows; the same
    world restores both, another world size reshards exact counts by key and drops the filter
    with a warning naming the table; training on after the restore equals training through."""
    from hpctrain.sparse.routing import owner_of
    batches = admission_stream(21)
    k = 4

    def owner(size):
        return lambda name, keys: owner_of(3, keys, size)

    def write(comm):
        t = admission_table("user", counter)
        train_owned(t, batches[:k], comm.rank, comm.size)
        export = t.export()
        CheckpointManager(str(tmp_path), comm).save(k, {}, {"user": export}, {})
        return export

    saved, errors = run_world(2, write)
    assert errors == [None, None], errors
    if counter == "exact":
        assert all(len(e["admission"]["keys"]) > 50 for e in saved)
    else:
        assert all(e["shard_state"]["bloom_counters"].sum() > 0 for e in saved)

    def resume(comm):
        _, _, tables, _ = CheckpointManager(str(tmp_path), comm).load(owner=owner(comm.size))
        t = admission_table("user", counter)
        t.import_(tables["user"])
        restored = t.export()
        train_owned(t, batches[k:], comm.rank, comm.size, start=k)
        return tables["user"], restored, t.export()

    def run_resume(size):
        with warnings.catch_warnings(record=True) as caught:  # rank threads warn here
            warnings.simplefilter("always")
            results, errors = run_world(size, resume)
        assert errors == [None] * size, errors
        return results, [str(w.message) for w in caught
                         if issubclass(w.category, CheckpointWarning)]

    def through(comm):
        t = admission_table("user", counter)
        train_owned(t, batches, comm.rank, comm.size)
        return t.export()

    same, msgs = run_resume(2)
    assert msgs == []
    for rank, (loaded, restored, _) in enumerate(same):
        assert_tree_equal(loaded, saved[rank], f"rank {rank}")
        assert_tree_equal(take_sorted(restored), take_sorted(saved[rank]), f"rank {rank}")
    want, _ = run_world(2, through)
    for rank in range(2):
        assert_tree_equal(take_sorted(same[rank][2]), take_sorted(want[rank]), f"rank {rank}")

    other, msgs = run_resume(3)
    want3, _ = run_world(3, through)
    if counter == "bloom":  # one warning (rank 0's), naming the table
        assert len(msgs) == 1 and "table(s) 'user'" in msgs[0] and "Bloom" in msgs[0], msgs
    else:
        assert msgs == []
    union = {}
    for rank, (loaded, restored, trained) in enumerate(other):
        pending = pending_of(loaded)
        assert all(owner_of(3, np.array(list(pending), np.int64), 3) == rank)
        union.update(pending)
        assert "shard_state" not in loaded
        if counter == "exact":
            assert rows_by_key(trained) == rows_by_key(want3[rank])
            assert pending_of(trained) == pending_of(want3[rank])
    saved_pending = {key: c for e in saved for key, c in pending_of(e).items()}
    assert union == (saved_pending if counter == "exact" else {})
    manifest = json.load(open(os.path.join(tmp_path, "step-00000004", "MANIFEST.json")))
    assert manifest["tables"]["user"]["levels"] == {
        "admission/": [len(e["admission"]["keys"]) for e in saved]}


def test_latest_strict_names_every_rejected_checkpoint(tmp_path):
    """--resume must not start afresh over a run whose checkpoints all fail to verify."""
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest(strict=True) is None  # no checkpoint at all: a fresh start is right
    _, first, _ = simple(tmp_path, 1)
    _, second, _ = simple(tmp_path, 2, seed=1)
    os.truncate(os.path.join(second, "dense.h5"), 100)
    os.unlink(os.path.join(first, "MANIFEST.json"))
    os.mkdir(tmp_path / ".step-00000003.tmp-0123abcd")  # a save in progress is not one
    with pytest.warns(CheckpointWarning):
        assert mgr.latest() is None  # the lenient form keeps its meaning
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as info:
        mgr.latest(strict=True)
    text = str(info.value)
    assert "none of the 2 checkpoint(s)" in text and "\n" not in text
    assert re.search(r"step-00000002: dense.h5: size 100 bytes, manifest says \d+ \(truncated\); "
                     r"step-00000001: no MANIFEST.json", text), text
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the 2"):
        mgr.load()


def test_directory_writable_by_others_is_refused(tmp_path):
    """Anyone who can write to the directory could plant a checkpoint that resume loads."""
    directory = tmp_path / "ckpt"
    mgr, path, _ = simple(directory, 1)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700  # created private
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o022 == 0
    os.chmod(directory, 0o777)
    for call in (mgr.latest, mgr.load, lambda: mgr.save(2, {}, global_tables(0), {})):
        with pytest.raises(CheckpointError, match=r"ckpt is writable by every user \(mode 777\)"
                                                  r".*chmod go-w"):
            call()
    os.chmod(directory, 0o770)
    with pytest.warns(CheckpointWarning, match=r"ckpt is writable by its group"):
        assert mgr.latest() == path
    os.chmod(directory, 0o755)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.latest() == path


def test_manifest_is_never_written_through_a_symlink(tmp_path):
    from hpctrain.checkpoint import _files
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_path / "d").mkdir()
    os.symlink(victim, tmp_path / "d" / "MANIFEST.json")
    with pytest.raises(OSError):
        _files.write_manifest(str(tmp_path / "d"), {"format": "x"})
    assert victim.read_text() == "mine"


def test_counter_ranges_are_the_tables():
    """What a checkpoint may hold is what EmbeddingTable stores (hpctrain/sparse/table.py)."""
    from hpctrain.checkpoint._validate import COUNTER_RANGES
    from hpctrain.sparse import table
    for name, (hi, _) in table._META_MAX.items():
        assert COUNTER_RANGES[name] == (0, hi), name
    assert COUNTER_RANGES["admission/counts"] == (1, table._MAX_COUNT)


def test_dense_like_and_read_dense(tmp_path):
    """load(dense_like=...) compares names, shapes and dtypes; read_dense checks by itself."""
    from hpctrain.checkpoint import read_dense
    mgr = CheckpointManager(tmp_path)
    dense = {"params": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)},
             "optimizer": {"step": np.asarray(4, np.int64), "sum": np.ones(9, np.float32)}}
    path = mgr.save(4, dense, global_tables(0, specs=(("t", 2, 10),)), {"step": 4})
    like = {"params": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
            "optimizer": {"step": np.asarray(0, np.int64), "sum": np.zeros(9, np.float32)}}
    assert mgr.load(dense_like=like)[0] == 4
    got, state = read_dense(path)
    assert_tree_equal(got, dense)
    assert state == {"step": 4}
    for change, problem in [
            (lambda d: d["params"].update(w=np.zeros((3, 2), np.float32)),
             r"/dense/params/w: shape \[2, 3\], the model expects \[3, 2\]"),
            (lambda d: d["params"].update(w=np.zeros((2, 3), np.float16)),
             r"/dense/params/w: dtype float32, the model expects float16"),
            (lambda d: d["params"].update(extra=np.zeros(1, np.float32)),
             r"/dense/params: names differ from the model's: missing \['extra'\]"),
            (lambda d: d.update(ema={}), r"/dense/ema: missing \(the model has it\)")]:
        want = {k: dict(v) for k, v in like.items()}
        change(want)
        with pytest.raises(CheckpointError, match=problem):
            mgr.load(dense_like=want)
