"""The corpus of bad data files (tests/data/bad/bad_data.py) through the reader and convert.

Every case must end in one ``DataError`` line naming the file (and, where there is one,
the dataset and row or the line), when a rank's reader reads the split and when
``hpctrain convert`` converts it; convert must leave no output file behind.
"""
import os
import re
import subprocess
import sys

import pytest

from data_helpers import data_config
from hpctrain.data import CRITEO_FEATURES, make_reader
from hpctrain.data.convert import main as convert_main
from hpctrain.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "data", "bad"))
import bad_data as bad  # noqa: E402


def _data_section(case, path):
    data = {"format": case.fmt, "train": {"paths": [path]}}
    if case.fmt == "csv":
        data["schema"] = dict(bad.CSV_SCHEMA, header=True)
    if case.bad_lines:
        data["bad_lines"] = case.bad_lines
    return data


def _features(case):
    return bad.CSV_FEATURES if case.fmt == "csv" else list(CRITEO_FEATURES)


def _toml(case, path, tmp_path):
    """A run config of the case's data, as ``hpctrain convert --config`` reads it."""
    lines = ["global_batch = 16", "steps = 4", "[model]", 'kind = "dlrm"', "bottom = [8]",
             "[[tables]]", 'name = "t"', f"features = {_features(case)!r}".replace("'", '"'),
             "dim = 8", "[data]", f'format = "{case.fmt}"', "[data.train]",
             f'paths = ["{path}"]']
    if case.fmt == "csv":
        lines += ["[data.schema]", 'label = "click"', 'dense = ["price"]',
                  'categorical = ["city"]', "header = true"]
    if case.bad_lines:
        lines += ["[data.bad_lines]"] + [f"{k} = {v}" for k, v in case.bad_lines.items()]
    out = tmp_path / "run.toml"
    out.write_text("\n".join(lines) + "\n")
    return str(out)


@pytest.mark.parametrize("case", bad.CASES, ids=[c.name for c in bad.CASES])
def test_reader_names_the_problem(case, tmp_path):
    path = case.build(str(tmp_path))
    cfg = data_config(_data_section(case, path), _features(case))
    with pytest.raises(DataError) as info:
        with make_reader(cfg, "train", 0, 1, case.batch, 0, epochs=2) as reader:
            for _ in reader:
                pass
    text = str(info.value)
    assert "\n" not in text, text
    assert re.search(case.match, text), f"{case.match!r} not in {text!r}"


@pytest.mark.parametrize("case", bad.CASES, ids=[c.name for c in bad.CASES])
def test_convert_names_the_problem(case, tmp_path, capsys):
    path = case.build(str(tmp_path))
    config = _toml(case, path, tmp_path)
    before = set(os.listdir(tmp_path))
    capsys.readouterr()
    assert convert_main(["--config", config, "-o", str(tmp_path / "out.h5")]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpctrain convert: "), err
    assert re.search(case.match, lines[0]), f"{case.match!r} not in {lines[0]!r}"
    assert set(os.listdir(tmp_path)) == before, "convert left a file behind"


@pytest.mark.parametrize("name", ["criteo_gzip", "hdf5_label_2"])
def test_train_command_prints_one_error_line(name, tmp_path):
    """``python -m hpctrain train``: non-zero exit, the error line, no traceback."""
    case = next(c for c in bad.CASES if c.name == name)
    config = _toml(case, case.build(str(tmp_path)), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "hpctrain", "train", config],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode != 0, proc
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if "DataError" in ln]
    assert len(errors) == 1 and re.search(case.match, errors[0]), out


def test_file_truncated_while_read_is_a_data_error(tmp_path):
    """A text file cut short under a running reader: DataError naming it, not SIGBUS."""
    from data_helpers import write_criteo
    path = tmp_path / "day.tsv"
    write_criteo(path, 3000, seed=2)
    cfg = data_config({"format": "criteo", "train": {"paths": [str(path)]}},
                      list(CRITEO_FEATURES))
    with make_reader(cfg, "train", 0, 1, 256, 0, epochs=1, prefetch=0) as reader:
        next(reader)
        os.truncate(path, os.path.getsize(path) // 3)
        with pytest.raises(DataError, match=r"day.tsv: the file ends at byte \d+ but had \d+ "
                                             r"bytes when opened: it was truncated"):
            for _ in reader:
                pass


def test_file_truncated_under_a_shuffling_reader(tmp_path):
    from data_helpers import write_criteo
    path = tmp_path / "day.tsv"
    write_criteo(path, 2000, seed=3)
    cfg = data_config({"format": "criteo", "train": {"paths": [str(path)]}},
                      list(CRITEO_FEATURES))
    with make_reader(cfg, "train", 0, 1, 128, 0, epochs=1, shuffle=True, prefetch=0) as reader:
        next(reader)
        os.truncate(path, 1000)
        with pytest.raises(DataError, match=r"day.tsv: the file ends at byte"):
            for _ in reader:
                pass


def test_hdf5_file_truncated_while_read_is_named(tmp_path):
    """HDF5 reads past the end of a file as zeros; the reader names the shrunken file."""
    path = bad.write_good_hdf5(str(tmp_path / "day.h5"), n=5000)
    cfg = data_config({"format": "hdf5", "train": {"paths": [path]}}, list(CRITEO_FEATURES))
    with make_reader(cfg, "train", 0, 1, 256, 0, epochs=1, prefetch=0) as reader:
        next(reader)
        os.truncate(path, os.path.getsize(path) // 3)
        with pytest.raises(DataError, match=r"day.h5: the file has \d+ bytes but had \d+ when "
                                             r"opened: it was truncated"):
            for _ in reader:
                pass
