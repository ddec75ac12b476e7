"""HDF5 data files: hpctrain convert round trip, layout readable by plain h5py, errors."""
import h5py
import numpy as np
import pytest

from data_helpers import criteo_line, data_config, global_batches, ref_criteo, same_samples, \
    samples, write_criteo
from hpctrain.data import CRITEO_FEATURES, make_reader
from hpctrain.data.batch import Rows
from hpctrain.data.convert import main as convert_main
from hpctrain.data.hdf5 import HDF5Writer
from hpctrain.errors import DataError

FEATURES = list(CRITEO_FEATURES)


def h5_cfg(paths, **split):
    return data_config({"format": "hdf5", "train": {"paths": [str(p) for p in paths], **split}},
                       FEATURES)


def test_convert_criteo_round_trip(tmp_path, capsys):
    a = write_criteo(tmp_path / "a.tsv", 90, seed=1, empty=0.3)
    b = write_criteo(tmp_path / "b.tsv", 41, seed=2)
    out = tmp_path / "c.h5"
    assert convert_main(["--criteo", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"),
                         "-o", str(out), "--chunk-rows", "32", "--compression", "gzip"]) == 0
    assert "wrote 131 samples" in capsys.readouterr().out
    with make_reader(h5_cfg([out]), "train", 0, 1, 25, 0, epochs=1, drop_last=False) as r:
        got = [s for batch in r for s in samples(batch)]
    same_samples(got, ref_criteo(a + b))


def test_layout_is_plain_h5py(tmp_path):
    lines = write_criteo(tmp_path / "a.tsv", 20, seed=3)
    assert convert_main(["--criteo", str(tmp_path / "a.tsv"), "-o", str(tmp_path / "c.h5")]) == 0
    ref = ref_criteo(lines)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["format"] == "hpctrain-data" and f.attrs["version"] == 1
        assert f.attrs["num_samples"] == 20
        assert list(f.attrs["features"]) == FEATURES
        assert f["labels"].dtype == np.float32 and f["dense"].shape == (20, 13)
        assert f["labels"].chunks is not None
        off = f["sparse/C7/offsets"][:]
        vals = f["sparse/C7/values"][:]
        assert off.tolist() == list(range(21))
        assert vals.tolist() == [r[2][6][0] for r in ref]


def test_convert_from_config_with_rows_and_bad_lines(tmp_path):
    rng = np.random.default_rng(4)
    lines = [criteo_line(rng) for _ in range(60)]
    lines[33] = "0\tnot-a-line"
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n")
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
global_batch = 8
steps = 1
[model]
kind = "dlrm"
[[tables]]
name = "t"
features = {FEATURES!r}
dim = 64
[data]
format = "criteo"
bad_lines = {{ max_count = 1 }}
[data.train]
paths = ["{tmp_path / 'a.tsv'}"]
rows = [10, 50]
""".replace("'", '"'))
    assert convert_main(["--config", str(toml), "-o", str(tmp_path / "c.h5")]) == 0
    with make_reader(h5_cfg([tmp_path / "c.h5"]), "train", 0, 1, 8, 0, epochs=1,
                     drop_last=False) as r:
        got = [s for b in r for s in samples(b)]
    same_samples(got, ref_criteo(lines[10:33] + lines[34:50]))
    # without the tolerance the bad line stops the conversion, naming file and line
    assert convert_main(["--config", str(toml), "-o", str(tmp_path / "d.h5"),
                         "--max-bad-lines", "0"]) == 1


def test_convert_reports_errors(tmp_path, capsys):
    assert convert_main(["--criteo", str(tmp_path / "missing.tsv"), "-o",
                         str(tmp_path / "x.h5")]) == 1
    assert "missing.tsv: no such file" in capsys.readouterr().err


def test_several_files_and_row_range_match_text(tmp_path):
    write_criteo(tmp_path / "a.tsv", 50, seed=5)
    write_criteo(tmp_path / "b.tsv", 30, seed=6)
    for name in "ab":
        convert_main(["--criteo", str(tmp_path / f"{name}.tsv"), "-o",
                      str(tmp_path / f"{name}.h5"), "--chunk-rows", "7"])
    text = data_config({"format": "criteo", "shuffle": True, "train": {
        "paths": [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")], "rows": [5, 75]}}, FEATURES)
    h5 = data_config({"format": "hdf5", "shuffle": True, "train": {
        "paths": [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], "rows": [5, 75]}}, FEATURES)
    for shuffle in (False, True):
        ref = global_batches(text, "train", 1, 16, seed=9, epochs=2, shuffle=shuffle)
        got = global_batches(h5, "train", 2, 16, seed=9, epochs=2, shuffle=shuffle)
        assert len(got) == len(ref) == 8
        for x, y in zip(got, ref):
            same_samples(x, y)


def test_writer_appends_multi_hot_blocks(tmp_path):
    rng = np.random.default_rng(7)
    blocks = []
    w = HDF5Writer(str(tmp_path / "m.h5"), ["u", "v"], ["d0"], chunk_rows=4)
    for n in (5, 0, 9):
        lengths = rng.integers(0, 4, size=(2, n))
        rows = Rows(rng.integers(0, 2, n), rng.random((n, 1)),
                    rng.integers(0, 1 << 50, size=int(lengths.sum())), lengths)
        w.append(rows)
        blocks.append(rows)
    w.close()
    cfg = data_config({"format": "hdf5", "train": {"paths": [str(tmp_path / "m.h5")]}},
                      ["u", "v"], model={"kind": "deepfm"})
    with make_reader(cfg, "train", 0, 1, 3, 0, epochs=1, drop_last=False) as r:
        got = [s for b in r for s in samples(b)]
    ref = [s for rows in blocks for s in samples(rows.to_batch(("u", "v")))]
    same_samples(got, ref)


def test_bad_hdf5_files(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match=r"other.h5: not an hpctrain data file"):
        make_reader(h5_cfg([tmp_path / "other.h5"]), "train", 0, 1, 4, 0)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match=r"junk.h5: not a readable HDF5 file"):
        make_reader(h5_cfg([tmp_path / "junk.h5"]), "train", 0, 1, 4, 0)
    HDF5Writer(str(tmp_path / "empty.h5"), FEATURES, ["I1"]).close()
    with pytest.raises(DataError, match=r"empty.h5: empty data file"):
        make_reader(h5_cfg([tmp_path / "empty.h5"]), "train", 0, 1, 4, 0)
    with pytest.raises(DataError, match=r"nope.h5: no such file"):
        make_reader(h5_cfg([tmp_path / "nope.h5"]), "train", 0, 1, 4, 0)
