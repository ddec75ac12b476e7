"""Configuration: examples load; every error names the file and the key path."""
import copy
import dataclasses
import glob
import os

import pytest

from hpctrain.config import Config, PsConfig, config_from_dict, load_config, loads_config
from hpctrain.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = sorted(glob.glob(os.path.join(HERE, "..", "hpctrain", "configs", "*.toml")))
DELETE = object()

BASE = {
    "seed": 1, "global_batch": 64, "steps": 10,
    "model": {"kind": "dlrm", "bottom": [32, 16], "top": [16, 1]},
    "tables": [{"name": "a", "features": ["C1", "C2"], "dim": 8,
                "optimizer": {"kind": "adagrad", "lr": 0.05},
                "admission": {"min_count": 2}, "eviction": {"ttl": 100}},
               {"name": "b", "features": ["C3"], "dim": 8, "optimizer": "sgd"}],
    "dense_optimizer": {"kind": "adam", "lr": 0.001},
    "data": {"format": "synthetic", "synthetic": {"num_features": 3, "num_dense": 2},
             "train": {"num_samples": 1000}, "eval": {"num_samples": 100}},
    "eval": {"interval": 5},
    "checkpoint": {"directory": "ckpt", "every_steps": 5},
    "metrics": {"path": "m.jsonl"},
}

CSV_DATA = {"format": "csv", "train": {"paths": ["x.csv"]},
            "schema": {"label": "y", "dense": ["d"], "categorical": ["C1", "C2", "C3"]}}


def csv_base():
    d = dict(BASE, data=copy.deepcopy(CSV_DATA))
    del d["eval"]
    return d


def mutate(d, path, value):
    d = copy.deepcopy(d)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = d
    for k in keys[:-1]:
        node = node[k]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


ERRORS = [
    ("stepz", 3, "stepz: unknown key; did you mean 'steps'?"),
    ("seed", -1, "seed: expected an integer >= 0, got -1"),
    ("tables.1.optimizer", {"kind": "adagrad", "lr": -0.1},
     "tables[1].optimizer.lr: expected a finite number > 0, got -0.1"),
    ("tables.0.optimizer.kind", "adamax", "tables[0].optimizer.kind: expected one of 'sgd'"),
    ("tables.0.optimizer.beta1", 0.9,
     "tables[0].optimizer.beta1: not a hyper-parameter of optimizer 'adagrad'"),
    ("tables.0.optimizer.lr", "0.1", "tables[0].optimizer.lr: expected a number, got a string"),
    ("tables.0.optimizer.momentum", 0.5, "tables[0].optimizer.momentum: not a hyper-parameter"),
    ("tables.0.optimizer.lrr", 0.5, "tables[0].optimizer.lrr: unknown key; did you mean 'lr'?"),
    ("tables.0.dim", "16", "tables[0].dim: expected an integer, got a string '16'"),
    ("tables.0.dim", True, "tables[0].dim: expected an integer, got a boolean"),
    ("tables.0.dim", 0, "tables[0].dim: expected an integer in [1, 65536], got 0"),
    ("tables.0.features", [], "tables[0].features: must not be empty"),
    ("tables.0.features", ["C1", "C1"], "tables[0].features: duplicate entries ['C1']"),
    ("tables.0.name", DELETE, "tables[0].name: required key is missing"),
    ("tables.0.admission.counter", "cms", "tables[0].admission.counter: expected one of"),
    ("tables.0.admission.bloom_hashes", 40,
     "tables[0].admission.bloom_hashes: expected an integer in [1, 16], got 40"),
    ("tables.0.admission.min_count", 300,      # the Bloom filter's counters are 8-bit
     "tables[0].admission.min_count: expected an integer in [1, 255], got 300"),
    ("tables.0.admission.bloom_size", 4,
     "tables[0].admission.bloom_size: expected an integer in [8, 1099511627776], got 4"),
    ("tables.0.eviction.ttl", 0, "tables[0].eviction.ttl: expected an integer in [1, 2147483647]"),
    ("tables.0.eviction.lru", 5, "tables[0].eviction.lru: unknown key"),
    ("tables.0.pooling", "max", "tables[0].pooling: expected one of 'sum', 'mean', 'none'"),
    ("tables.0.pooling", "none", "tables[0].pooling: model 'dlrm' needs pooled"),
    ("tables.0.init_scale", 0, "tables[0].init_scale: expected a finite number > 0"),
    ("tables.0.init", "xavier", "tables[0].init: expected one of 'uniform', 'normal'"),
    ("tables.1.name", "a", "tables[1].name: duplicate table name 'a'"),
    ("tables.0.features", ["C1", "C99"],
     "tables[0].features[1]: the synthetic data has no feature 'C99'"),
    ("tables.1.features", ["C1"], "tables[1].features[0]: feature 'C1' is already in table 'a'"),
    ("tables.1.dim", 4, "tables[1].dim: model 'dlrm' needs one dim for all its embeddings"),
    ("tables", {"name": "a"}, "tables: expected an array of tables"),
    ("tables", [], "tables: at least one [[tables]] entry is required"),
    ("model.kind", "xgboost", "model.kind: expected one of 'dlrm', 'wide_deep', 'deepfm'"),
    ("model.hidden", [8], "model.hidden: not a parameter of model 'dlrm'"),
    ("model.top", [64, 2], "model.top: the last layer must have 1 output"),
    ("model.bottom", [32, -1], "model.bottom[1]: expected an integer in [1, 1048576], got -1"),
    ("model", DELETE, "model: required key is missing"),
    ("batch_per_rank", 32, "global_batch: set exactly one of global_batch and batch_per_rank"),
    ("global_batch", DELETE, "<top level>: set exactly one of global_batch and batch_per_rank"),
    ("steps", DELETE, "<top level>: set steps and/or epochs"),
    ("mode", "hybrid", "ps: required with mode = \"hybrid\""),
    ("mode", "async", "mode: expected one of 'collective', 'hybrid', got 'async'"),
    ("ps", {"servers": 1}, "ps: only mode = \"hybrid\" takes parameter servers"),
    ("overlap", "yes", "overlap: expected true or false, got a string 'yes'"),
    ("exchange", "nvlink", "exchange: expected one of 'auto', 'alltoallv', 'shm', got 'nvlink'"),
    ("node_group_size", 0, "node_group_size: expected an integer in [1, 1048576], got 0"),
    ("exchange", "alltoallv", None),
    ("threads", 0, "threads: expected an integer in [1, 4096], got 0"),
    ("malloc", "jemalloc", "malloc: expected one of 'tuned', 'default', got 'jemalloc'"),
    ("malloc", "default", None),
    ("epochs", 2, None),      # valid: a finite synthetic split
    ("data.train.num_samples", DELETE, None),
    ("data.format", "parquet", "data.format: expected one of 'criteo', 'csv', 'hdf5', 'synthetic'"),
    ("data.synthetic.vocab", [10, 20], "data.synthetic.vocab: expected 3 entries (one per "
                                       "feature), got 2"),
    ("data.synthetic.bag_size_min", 4, "data.synthetic.bag_size_min: feature 'C1': 4 > bag_size 1"),
    ("data.synthetic.positive_rate", 1.0, "data.synthetic.positive_rate: expected a finite number "
                                          "> 0 and < 1, got 1.0"),
    ("data.synthetic.zipf", "1.05", "data.synthetic.zipf: expected a number, got a string"),
    ("data.synthetic.num_dense", 0, "model.kind: DLRM needs dense features"),
    ("data.synthetic.features", ["C1"], "data.synthetic.num_features: give features or "
                                        "num_features, not both"),
    ("data.schema", {"label": "y"}, "data.schema: only format = \"csv\" takes a schema"),
    ("data.train.paths", ["x"], "data.train.paths: synthetic data has no files"),
    ("data.train.rows", [0, 5], "data.train.rows: synthetic splits are sized by num_samples"),
    ("data.eval.num_samples", DELETE, "data.eval: synthetic eval data needs num_samples"),
    ("data.train", DELETE, "data.train: training needs a train split"),
    ("data.bad_lines", {"max_ratio": 2}, "data.bad_lines.max_ratio: expected a finite number "
                                         ">= 0 and <= 1, got 2.0"),
    ("data.prefetch", -1, "data.prefetch: expected an integer in [0, 1024], got -1"),
    ("data.shuffle_block", 0, "data.shuffle_block: expected an integer >= 1"),
    ("data.colour", 1, "data.colour: unknown key"),
    ("eval.interval", -5, "eval.interval: expected an integer >= 0, got -5"),
    ("eval.every", 5, "eval.every: unknown key"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last: expected an integer >= 1, got 0"),
    ("checkpoint.every_minutes", 0, "checkpoint.every_minutes: expected a finite number > 0"),
    ("checkpoint.directory", DELETE, "checkpoint.directory: required key is missing"),
    ("checkpoint.resume", 1, "checkpoint.resume: expected true or false, got an integer 1"),
    ("metrics.every_steps", 0, "metrics.every_steps: expected an integer >= 1, got 0"),
    ("dense_optimizer.kind", "ftrl", "dense_optimizer.kind: expected one of 'sgd'"),
    ("dense_optimizer.l1", 0.1, "dense_optimizer.l1: not a hyper-parameter of optimizer 'adam'"),
]


@pytest.mark.parametrize("path,value,message", ERRORS, ids=[f"{p}={v!r}" for p, v, _ in ERRORS])
def test_errors_name_file_and_key(path, value, message):
    d = mutate(BASE, path, value)
    if message is None:
        assert isinstance(config_from_dict(d, source="run.toml"), Config)
        return
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, source="/some/dir/run.toml")
    assert str(e.value).startswith("/some/dir/run.toml: ")
    assert message in str(e.value)


HYBRID = dict(BASE, mode="hybrid", ps={})

PS_ERRORS = [
    ("ps.servers", 0, "ps.servers: expected an integer >= 1, got 0"),
    ("ps.groups", 0, "ps.groups: expected an integer >= 1, got 0"),
    ("ps.consistency", "eventual",
     "ps.consistency: expected one of 'bsp', 'ssp', 'asp', got 'eventual'"),
    ("ps.staleness", -1, "ps.staleness: expected an integer >= 0, got -1"),
    ("ps.staleness", 2, "ps.staleness: consistency \"bsp\" waits every clock"),
    ("ps.placement", "last", "ps.placement: expected one of 'first', 'per_node', got 'last'"),
    ("ps.dense_on_servers", 1, "ps.dense_on_servers: expected true or false"),
    ("ps.timeout_s", 0, "ps.timeout_s: expected a finite number > 0, got 0.0"),
    ("ps.every_clocks_log", 0, "ps.every_clocks_log: expected an integer >= 1, got 0"),
    ("ps.sever", 2, "ps.sever: unknown key; did you mean 'servers'?"),
    ("ps", 3, "ps: expected a table, got an integer 3"),
]


@pytest.mark.parametrize("path,value,message", PS_ERRORS,
                         ids=[f"{p}={v!r}" for p, v, _ in PS_ERRORS])
def test_ps_errors_name_the_key(path, value, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(mutate(HYBRID, path, value), source="ps.toml")
    assert str(e.value).startswith("ps.toml: ") and message in str(e.value)


def test_ps_values_and_defaults():
    assert config_from_dict(BASE).ps is None
    ps = config_from_dict(HYBRID).ps
    assert ps == PsConfig(servers=1, groups=1, consistency="bsp", staleness=0, placement="first",
                          dense_on_servers=True, timeout_s=300.0, every_clocks_log=100)
    assert config_from_dict(mutate(HYBRID, "ps", {"consistency": "ssp"})).ps.staleness == 1
    ssp = config_from_dict(mutate(HYBRID, "ps", {"consistency": "ssp", "staleness": 3,
                                                 "servers": 2, "groups": 3,
                                                 "placement": "per_node", "timeout_s": 5,
                                                 "dense_on_servers": False,
                                                 "every_clocks_log": 7})).ps
    assert (ssp.consistency, ssp.staleness, ssp.servers, ssp.groups, ssp.placement) == \
        ("ssp", 3, 2, 3, "per_node")
    assert (ssp.timeout_s, ssp.dense_on_servers, ssp.every_clocks_log) == (5.0, False, 7)
    asp = config_from_dict(mutate(HYBRID, "ps", {"consistency": "asp", "staleness": 4})).ps
    assert asp.staleness is None


def test_ps_layout():
    cfg = config_from_dict(mutate(HYBRID, "ps", {"servers": 2, "groups": 3}))
    assert cfg.ps_layout(8) == (2, 6, 2)
    servers, workers, per_group = cfg.ps_layout(5)
    assert (servers, workers, per_group) == (2, 3, 1)
    two = config_from_dict(mutate(HYBRID, "ps", {"servers": 2, "groups": 2}))
    assert two.batch_sizes(two.ps_layout(6)[1]) == (64, 16)    # workers take the batches
    with pytest.raises(ConfigError, match=r"run.toml: ps.servers: 2 servers leave no worker on "
                                          r"a world of 2 ranks"):
        config_from_dict(mutate(HYBRID, "ps", {"servers": 2}), source="run.toml").ps_layout(2)
    with pytest.raises(ConfigError, match=r"ps.groups: world 7 - servers 2 = 5 workers do not "
                                          r"split into 3 equal groups"):
        cfg.ps_layout(7)
    with pytest.raises(ConfigError, match=r"mode: parameter servers need mode = \"hybrid\""):
        config_from_dict(BASE).ps_layout(4)


def test_endless_synthetic_split_cannot_have_epochs():
    d = mutate(mutate(BASE, "epochs", 1), "data.train.num_samples", DELETE)
    with pytest.raises(ConfigError, match=r"data.train.num_samples: epochs need a finite"):
        config_from_dict(d)


CSV_ERRORS = [
    ("data.schema", DELETE, "data.schema: required for format = \"csv\""),
    ("data.train.paths", DELETE, "data.train.paths: required key is missing"),
    ("data.train.paths", [], "data.train.paths: expected a path or a non-empty array of paths"),
    ("data.train.num_samples", 5, "data.train.num_samples: only synthetic data takes num_samples"),
    ("data.train.rows", [5, 2], "data.train.rows: expected [start, end] with 0 <= start < end"),
    ("data.schema.delimiter", ",,", "data.schema.delimiter: expected one ASCII character"),
    ("data.schema.header", False, "data.schema.columns: required when header = false"),
    ("data.schema.dense", [{"name": "d", "transform": "standardize", "mean": 1.0}],
     "data.schema.dense[0].std: give both mean and std, or neither"),
    ("data.schema.dense", [{"name": "d", "mean": 1.0, "std": 2.0}],
     "data.schema.dense[0].mean: only used with transform = \"standardize\""),
    ("data.schema.dense", [{"name": "d", "transform": "sqrt"}],
     "data.schema.dense[0].transform: expected one of 'none', 'log1p', 'standardize'"),
    ("data.schema.dense", "d", "data.schema.dense: expected an array of column names or tables"),
    ("data.schema.label_negative", ["no"], "data.schema.label_negative: needs label_positive"),
    ("data.schema.categorical", ["C1", "C2", "C3", "d"],
     "data.schema.categorical: column 'd' is already listed under dense"),
    ("data.schema.columns", ["y", "d", "C1", "C2", "C3", "extra"],
     "data.schema.columns: columns ['extra'] have no role"),
    ("data.schema.columns", ["y", "d", "C1", "C2"],
     "data.schema.categorical: column 'C3' is not in columns"),
    ("data.schema.multi_valued", [{"name": "m", "separator": ","}],
     "data.schema.multi_valued[0].separator: expected one character other than the delimiter"),
    ("data.schema.lable", "y", "data.schema.lable: unknown key; did you mean 'label'?"),
    ("data.schema.crossed", [{"name": "x", "columns": ["C1"]}],
     "data.schema.crossed[0].columns: a cross needs at least 2 columns"),
    ("data.schema.crossed", [{"name": "x", "columns": ["C1", "d"]}],
     "data.schema.crossed[0].columns[1]: 'd' is not a categorical column"),
    ("data.schema.crossed", [{"name": "d", "columns": ["C1", "C2"]}],
     "data.schema.crossed: feature name 'd' is already a column or a cross"),
]


@pytest.mark.parametrize("path,value,message", CSV_ERRORS,
                         ids=[f"{p}={v!r}" for p, v, _ in CSV_ERRORS])
def test_csv_schema_errors(path, value, message):
    d = mutate(csv_base(), path, value)
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, source="csv.toml")
    assert str(e.value).startswith("csv.toml: ") and message in str(e.value)


def test_wide_deep_tables():
    d = dict(BASE, model={"kind": "wide_deep", "hidden": [8], "wide_tables": ["w"]})
    d["tables"] = [{"name": "w", "features": ["C1", "C2"], "dim": 1},
                   {"name": "d", "features": ["C1", "C2", "C3"], "dim": 4}]
    cfg = config_from_dict(d)          # a feature may feed one wide and one deep table
    assert cfg.model.wide_tables == ["w"] and cfg.table("d").dim == 4
    with pytest.raises(ConfigError, match=r"tables\[0\].dim: wide table 'w' must have dim = 1"):
        config_from_dict(mutate(d, "tables.0.dim", 2))
    with pytest.raises(ConfigError, match=r"model.wide_tables: no table named 'x'"):
        config_from_dict(mutate(d, "model.wide_tables", ["x"]))
    two_deep = dict(d, tables=[{"name": "w", "features": ["C1"], "dim": 1},
                               {"name": "d", "features": ["C1", "C2"], "dim": 4},
                               {"name": "e", "features": ["C3", "C1"], "dim": 4}])
    with pytest.raises(ConfigError, match=r"tables\[2\].features\[1\]: feature 'C1' is "
                                          r"already in table 'd'"):
        config_from_dict(two_deep)


def test_values_and_defaults():
    cfg = config_from_dict(BASE)
    a, b = cfg.tables
    assert a.optimizer == {"kind": "adagrad", "lr": 0.05, "momentum": 0.9, "beta1": 0.9,
                           "beta2": 0.999, "eps": 1e-8, "initial_accumulator": 0.0, "l1": 0.0,
                           "l2": 0.0, "lr_power": -0.5, "weight_decay": 0.0}
    assert b.optimizer["kind"] == "sgd" and b.admission is None and b.eviction is None
    assert a.admission == {"min_count": 2, "counter": "exact", "bloom_size": 1 << 20,
                           "bloom_hashes": 4}
    assert a.eviction == {"ttl": 100, "max_rows": None}
    assert cfg.dense_optimizer == {"kind": "adam", "lr": 0.001}
    assert (cfg.mode, cfg.overlap, cfg.threads, cfg.seed) == ("collective", False, None, 1)
    assert (cfg.exchange, cfg.node_group_size, cfg.malloc) == ("auto", None, "tuned")
    assert cfg.checkpoint.keep_last == 3 and cfg.checkpoint.every_minutes is None
    assert os.path.isabs(cfg.checkpoint.directory) and os.path.isabs(cfg.metrics.path)
    assert cfg.data.synthetic.vocab == [1000] * 3 and cfg.data.prefetch == 2
    assert cfg.data.feature_names() == ["C1", "C2", "C3"] and cfg.data.num_dense() == 2
    assert cfg.batch_sizes(4) == (64, 16)
    with pytest.raises(ConfigError, match="global_batch: 64 is not divisible by the world size 3"):
        cfg.batch_sizes(3)
    per_rank = config_from_dict(mutate(mutate(BASE, "global_batch", DELETE), "batch_per_rank", 8))
    assert per_rank.batch_sizes(3) == (24, 8)


def test_what_the_config_accepts_the_sparse_side_accepts():
    from hpctrain.sparse.optimizers import SparseOptimizer
    from hpctrain.sparse.policies import Admission, Eviction
    edge = mutate(mutate(BASE, "tables.0.admission", {"min_count": 255, "counter": "bloom",
                                                      "bloom_size": 8, "bloom_hashes": 16}),
                  "tables.0.optimizer", {"kind": "ftrl", "lr_power": 0.0, "l1": 0.0})
    for cfg in [config_from_dict(edge)] + [load_config(p) for p in EXAMPLES]:
        for t in cfg.tables:
            SparseOptimizer(**t.optimizer)
            Admission.from_any(t.admission)
            Eviction.from_any(t.eviction)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCTRAIN_TEST_DATA", "/data/set")
    d = mutate(csv_base(), "data.train.paths", ["in/x.csv", "$HPCTRAIN_TEST_DATA/y.csv"])
    cfg = config_from_dict(d)
    assert cfg.data.train.paths == [str(tmp_path / "in" / "x.csv"), "/data/set/y.csv"]
    assert cfg.checkpoint.directory == str(tmp_path / "ckpt")


def test_data_paths_of_a_file_are_relative_to_it_outputs_to_the_working_directory(
        tmp_path, monkeypatch):
    from hpctrain.config.overrides import dumps
    conf = tmp_path / "exp" / "run.toml"
    conf.parent.mkdir()
    d = mutate(csv_base(), "data.train.paths", ["data/x.csv", "/abs/y.csv"])
    d = mutate(d, "data.eval", {"paths": "../shared/z.csv"})
    d = mutate(d, "metrics", {"path": "runs/m.jsonl"})
    conf.write_text(dumps(d))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for cfg in (load_config(conf), load_config(os.path.relpath(conf))):
        assert cfg.data.train.paths == [str(tmp_path / "exp" / "data" / "x.csv"), "/abs/y.csv"]
        assert cfg.data.eval.paths == [str(tmp_path / "shared" / "z.csv")]
        assert cfg.checkpoint.directory == str(work / "ckpt")
        assert cfg.metrics.path == str(work / "runs" / "m.jsonl")
    # without its file (the text a checkpoint stores) the working directory is the base
    assert loads_config(conf.read_text()).data.train.paths[0] == str(work / "data" / "x.csv")


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_examples_load_and_round_trip_through_their_text(path, monkeypatch):
    # the stored text has no file: its relative data paths resolve against the working
    # directory, made the config's folder here
    monkeypatch.chdir(os.path.dirname(path))
    cfg = load_config(path)
    assert cfg.source == path and cfg.text == open(path, encoding="utf-8").read()
    again = loads_config(cfg.text, source="checkpoint")
    strip = {"source", "text", "raw"}
    assert {k: v for k, v in dataclasses.asdict(again).items() if k not in strip} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k not in strip}


def test_examples_cover_models_and_benchmarks():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"dlrm_synthetic.toml", "wide_deep_adult.toml", "deepfm_synthetic.toml",
            "bench_dlrm_dim16.toml", "bench_dlrm_dim64.toml", "bench_dlrm_multihot.toml",
            "bench_dlrm_multihot_dim64.toml"} <= names
    bench = load_config(os.path.join(os.path.dirname(EXAMPLES[0]), "bench_dlrm_multihot.toml"))
    syn = bench.data.synthetic
    assert len(bench.tables) == 26 and bench.batch_per_rank == 4096
    assert syn.vocab == [10 ** 6] * 26 and syn.zipf == 1.05 and syn.bag_size == [20] * 26
    assert bench.model.bottom == [512, 256, 64] and bench.model.top == [512, 256, 1]
    assert all(t.optimizer["kind"] == "adagrad" for t in bench.tables)
    assert bench.dense_optimizer["kind"] == "adagrad"
    # bags of 20: the tables' accumulators start above zero (the loss spike of step 3)
    for name in ("bench_dlrm_multihot.toml", "bench_dlrm_multihot_dim64.toml"):
        mh = load_config(os.path.join(os.path.dirname(EXAMPLES[0]), name))
        assert all(t.optimizer["initial_accumulator"] == 0.01 for t in mh.tables)
        assert mh.data.synthetic.bag_size == [20] * 26


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read the configuration file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 1\nsteps = = 3\nthreads = 1\n")
    with pytest.raises(ConfigError, match=rf"{bad}: invalid TOML: .*line 2"):
        load_config(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\nseed = 1\n")
    with pytest.raises(ConfigError, match=rf"{latin}: not UTF-8"):
        load_config(latin)
    typo = tmp_path / "typo.toml"
    typo.write_text('global_batch = 8\nsteps = 1\n[model]\nkind = "dlrm"\nbotom = [4]\n')
    with pytest.raises(ConfigError, match=rf"{typo}: model.botom: unknown key; did you mean "
                                          rf"'bottom'\?"):
        load_config(typo)



@pytest.mark.parametrize("typo,meant", [("stesp", "steps"), ("global_bach", "global_batch"),
                                        ("modell", "model"), ("dat", "data")])
def test_misspelt_key_is_named_before_what_it_leaves_missing(typo, meant):
    d = copy.deepcopy(BASE)
    d[typo] = d.pop(meant)
    with pytest.raises(ConfigError, match=rf"{typo}: unknown key; did you mean '{meant}'\?"):
        config_from_dict(d)


def test_dense_optimizer_defaults_are_the_optimizers_own():
    d = mutate(BASE, "dense_optimizer", {"kind": "adam"})
    assert config_from_dict(d).dense_optimizer["lr"] == 1e-3
    d = mutate(BASE, "dense_optimizer", {"kind": "sgd"})
    assert config_from_dict(d).dense_optimizer["lr"] == 0.01


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_overrides_text_round_trips_every_example(path):
    """The TOML written for a run with --set overrides parses back to the same dict."""
    import tomllib

    from hpctrain.config.overrides import apply_overrides, dumps
    d = tomllib.load(open(path, "rb"))
    assert tomllib.loads(dumps(d)) == d
    changed = apply_overrides(d, ["steps=7", "seed=3", "data.prefetch=0"])
    assert tomllib.loads(dumps(changed))["steps"] == 7 and changed is not d
    with pytest.raises(ConfigError, match=r"--set tables\[99\].dim=1: .*no such array element"):
        apply_overrides(d, ["tables[99].dim=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(d, ["steps"])


@pytest.mark.parametrize("path,value,msg", [
    ("global_batch", 2**40, r"global_batch: expected an integer in \[1, 2147483647\]"),
    ("steps", 2**64, r"steps: expected an integer in \[1, 4611686018427387904\]"),
    ("seed", 2**70, r"seed: 1180591620717411303424 does not fit a 64-bit integer"),
    ("tables.0.dim", 10**9, r"tables\[0\].dim: expected an integer in \[1, 65536\]"),
    ("tables.0.eviction.max_rows", 2**40,
     r"tables\[0\].eviction.max_rows: expected an integer in \[1, 2147483647\]"),
    ("model.bottom", [32, 2**40], r"model.bottom\[1\]: expected an integer in \[1, 1048576\]"),
    ("data.train.num_samples", 2**63, r"data.train.num_samples: expected an integer"),
])
def test_huge_numbers_are_named_errors(path, value, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(mutate(BASE, path, value))


def test_threads_beyond_the_limit_is_named():
    with pytest.raises(ConfigError, match=r"threads: expected an integer in \[1, 4096\]"):
        config_from_dict(dict(BASE, threads=10**6))
