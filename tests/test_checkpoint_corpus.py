"""The corpus of bad checkpoints (tests/data/bad/bad_checkpoints.py) on every load path.

Each case is a checkpoint whose content was edited and whose checksums were then
recomputed. Every path that reads a checkpoint -- resume (``load()`` of the latest,
onto another world size and onto the writer's), eval (``load(path)``), export
(``export_model`` and the ``hpctrain export`` command) -- must stop with one
``CheckpointError`` line naming the file, the dataset and the problem, and export must
leave no file behind.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from checkpoint_worlds import run_world
from hpctrain.checkpoint import CheckpointError, CheckpointManager, export_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "data", "bad"))
import bad_checkpoints as bad  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(directory holding the good checkpoint, what the trainer expects: dense, table dims)."""
    directory = tmp_path_factory.mktemp("good")
    bad.write_good(str(directory))
    trainer = bad.make_trainer()
    expect = {"dense_like": {"params": trainer.model.state_dict(),
                             "optimizer": trainer.opt.state_dict()},
              "table_dims": {s.name: s.dim for s in trainer.specs},
              "tables_like": trainer.emb.export()}
    return directory, expect


def _copy(good, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(good, directory)
    return directory, str(directory / f"step-{bad.STEP:08d}")


def _load(path_kind, directory, ckpt, expect):
    """Run one load path; returns the CheckpointError text (raises if there is none)."""
    from hpctrain.sparse.routing import owner_of
    ids = {"user": 0, "item": 1}
    if path_kind == "resume":  # the latest checkpoint, onto one rank (rows resharded)
        CheckpointManager(directory).load(owner=lambda n, k: np.zeros(len(k), np.int64),
                                          **expect)
    elif path_kind == "resume_same_world":  # onto the writer's 2 ranks, same routing
        def body(comm):
            return CheckpointManager(directory, comm).load(
                owner=lambda n, k: owner_of(ids[n], k, comm.size), **expect)
        _, errors = run_world(bad.WORLD, body)
        bad_ranks = [e for e in errors if e is not None]
        assert bad_ranks and all(isinstance(e, CheckpointError) for e in bad_ranks), errors
        assert len(bad_ranks) == bad.WORLD, f"raised on some ranks only: {errors}"
        raise bad_ranks[0]
    elif path_kind == "eval":
        CheckpointManager(directory).load(ckpt, owner=lambda n, k: np.zeros(len(k), np.int64),
                                          **expect)
    elif path_kind == "export":
        export_model(ckpt, os.path.join(directory, "..", "model.h5"))


@pytest.mark.parametrize("case", bad.CASES, ids=[c.name for c in bad.CASES])
@pytest.mark.parametrize("path_kind", bad.PATHS)
def test_bad_checkpoint(good, tmp_path, case, path_kind, capsys):
    if path_kind not in case.paths:
        pytest.skip(f"{case.name} is not an error on the {path_kind} path")
    directory, ckpt = _copy(good[0], tmp_path)
    case.edit(ckpt)
    bad.reseal(ckpt)
    out = tmp_path / "model.h5"
    if path_kind == "export_cli":
        from hpctrain.train.cli import export_main
        capsys.readouterr()
        assert export_main([ckpt, str(out)]) == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("hpctrain: rank 0/1: CheckpointError: "), err
        text = lines[0]
    else:
        with pytest.raises(CheckpointError) as info:
            _load(path_kind, str(directory), ckpt, good[1])
        text = str(info.value)
        assert "\n" not in text, text
    assert __import__("re").search(case.match, text), f"{case.match!r} not in {text!r}"
    assert os.listdir(tmp_path) == ["ckpt"], "export left a file behind"


def test_good_checkpoint_loads_on_every_path(good, tmp_path, capsys):
    directory, ckpt = _copy(good[0], tmp_path)
    for path_kind in ("resume", "eval", "export"):
        _load(path_kind, str(directory), ckpt, good[1])
    from hpctrain.train.cli import export_main
    assert export_main([ckpt, str(tmp_path / "cli.h5")]) == 0


@pytest.mark.parametrize("name", ["dense_nan", "manifest_world_size_1e8"])
def test_export_command_prints_one_line(good, tmp_path, name):
    """``python -m hpctrain export`` itself: exit 1, one error line, no traceback, no file."""
    directory, ckpt = _copy(good[0], tmp_path)
    case = next(c for c in bad.CASES if c.name == name)
    case.edit(ckpt)
    bad.reseal(ckpt)
    proc = subprocess.run([sys.executable, "-m", "hpctrain", "export", ckpt,
                           str(tmp_path / "model.h5")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert __import__("re").search(case.match, lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
