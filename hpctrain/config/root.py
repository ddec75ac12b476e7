"""The whole run: top-level keys, ``Config``, and the entry points that parse a file.

``parse_config_dict`` reads the top-level keys itself and hands every section to the
parser of its module (``model``, ``tables``, ``optim``, ``data``, ``run``, ``ps``,
``online``), then
checks what spans sections (``model.check_model_tables``).
"""
import dataclasses
import difflib
import os
from dataclasses import dataclass, field

from hpctrain.config._node import INT32_MAX, Node, kind_of
from hpctrain.config.data import DataConfig, parse_data
from hpctrain.config.model import ModelConfig, check_model_tables, parse_model
from hpctrain.config.online import OnlineConfig, parse_online
from hpctrain.config.optim import parse_dense_optimizer
from hpctrain.config.ps import PsConfig, parse_ps, ps_layout
from hpctrain.config.run import (CheckpointConfig, EvalConfig, MetricsConfig, parse_checkpoint,
                                 parse_eval, parse_metrics)
from hpctrain.config.tables import parse_table
from hpctrain.dense.device import DEVICES
from hpctrain.errors import ConfigError
from hpctrain.sparse.sharded import EXCHANGES

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("collective", "hybrid")
MALLOCS = ("tuned", "default")


@dataclass
class Config:
    """A validated run configuration.

    Attributes:
        model, tables, dense_optimizer, data, eval, checkpoint, metrics, online: the
            sections (``checkpoint`` and ``online`` are None when not configured).
        global_batch, batch_per_rank: exactly one is set; see ``batch_sizes``.
        steps, epochs: at least one is set; training stops at whichever comes first.
        seed: the run's seed (initialisation, shuffling; synthetic data unless ``data.seed``).
        threads: OpenMP threads per rank (None: the environment's default).
        stall_timeout_s: a rank stuck this long in one phase of a step ends the job
            (``hpctrain.train.watchdog``).
        malloc: "tuned" (fixed glibc mmap/trim thresholds, ``hpctrain.memory``) or
            "default" (the allocator as the process found it).
        mode: "collective" or "hybrid" (parameter servers and worker groups, see ``ps``).
        device: where the dense model trains: "cpu" (NumPy) or "gpu" (CuPy, one GPU per
            rank, NCCL allreduce); embedding tables stay in host memory either way.
        overlap: overlap next batch's exchange with this batch's dense work.
        ps: the ``PsConfig`` of mode "hybrid"; None in collective mode.
        exchange, node_group_size: how embedding rows reach ranks of the same node
            (``ShardedEmbedding``'s arguments of those names).
        source: the file the config came from ("<dict>"/"<string>" otherwise).
        text: the original TOML text (None for ``config_from_dict``), for checkpoints.
    """
    model: ModelConfig
    tables: list
    dense_optimizer: dict
    data: DataConfig
    global_batch: int = None
    batch_per_rank: int = None
    steps: int = None
    epochs: int = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    online: OnlineConfig = None
    seed: int = 0
    threads: int = None
    malloc: str = "tuned"
    stall_timeout_s: float = 1800.0
    mode: str = "collective"
    device: str = "cpu"
    overlap: bool = False
    exchange: str = "auto"
    node_group_size: int = None
    ps: PsConfig = None
    source: str = "<dict>"
    text: str = None

    def batch_sizes(self, world_size):
        """``(global_batch, batch_per_rank)`` on ``world_size`` ranks.

        In mode "hybrid" only workers take batches: pass the worker count
        (``ps_layout(world)[1]``), not the world size.

        Raises:
            ConfigError: ``global_batch`` is not divisible by ``world_size``.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_per_rank is not None:
            return self.batch_per_rank * world_size, self.batch_per_rank
        if self.global_batch % world_size:
            raise ConfigError(f"{self.source}: global_batch: {self.global_batch} is not divisible "
                              f"by the world size {world_size}")
        return self.global_batch, self.global_batch // world_size

    def ps_layout(self, world_size):
        """``(servers, workers, workers_per_group)`` of mode "hybrid" on ``world_size`` ranks.

        Raises:
            ConfigError: not mode "hybrid"; no rank left for workers (``ps.servers``); the
                workers do not split evenly into ``ps.groups``.
        """
        if self.ps is None:
            raise ConfigError(f"{self.source}: mode: parameter servers need mode = \"hybrid\", "
                              f"got {self.mode!r}")
        return ps_layout(self.ps, world_size, self.source)

    def table(self, name):
        """The ``TableConfig`` called ``name`` (KeyError if there is none)."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r}; tables are {[t.name for t in self.tables]}")

    def replace(self, **changes):
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


TOP_LEVEL_KEYS = ("seed", "mode", "ps", "device", "overlap", "exchange", "node_group_size",
                  "threads", "malloc", "global_batch", "batch_per_rank", "steps", "epochs",
                  "model", "tables", "dense_optimizer", "data", "eval", "checkpoint", "metrics",
                  "online", "stall_timeout_s")


def _check_top_level_keys(root, d):
    """A misspelt top-level key is named first (with a did-you-mean), before the error
    its absence would cause elsewhere (``stesp = 200`` is not "set steps")."""
    for k in d:
        if k not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(k, TOP_LEVEL_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(sorted(TOP_LEVEL_KEYS))}"
            raise root.error(k, f"unknown key{hint}")


def parse_config_dict(d, source):
    """Validate ``d`` into the keyword arguments of ``Config`` (without source/text)."""
    root = Node(d, "", source)
    _check_top_level_keys(root, d)
    out = {"seed": root.integer("seed", 0, lo=0)}
    mode = out["mode"] = root.string("mode", "collective", choices=MODES)
    ps = root.node("ps")
    if (ps is None) == (mode == "hybrid"):
        raise root.error("ps", "required with mode = \"hybrid\" (the parameter servers)"
                         if mode == "hybrid" else
                         f"only mode = \"hybrid\" takes parameter servers, not {mode!r}")
    out["ps"] = parse_ps(ps) if ps is not None else None
    out["device"] = root.string("device", "cpu", choices=DEVICES)
    out["overlap"] = root.boolean("overlap", False)
    out["exchange"] = root.string("exchange", "auto", choices=EXCHANGES)
    out["node_group_size"] = root.integer("node_group_size", None, lo=1, hi=1 << 20)
    out["threads"] = root.integer("threads", None, lo=1, hi=4096)
    out["stall_timeout_s"] = root.number("stall_timeout_s", 1800.0, lo=0.0, lo_incl=False)
    out["malloc"] = root.string("malloc", "tuned", choices=MALLOCS)
    gb = root.integer("global_batch", None, lo=1, hi=INT32_MAX)
    bpr = root.integer("batch_per_rank", None, lo=1, hi=INT32_MAX)
    if (gb is None) == (bpr is None):
        raise root.error("global_batch" if gb is not None else None,
                         "set exactly one of global_batch and batch_per_rank" +
                         (", not both" if gb is not None else " (the batch size)"))
    out["global_batch"], out["batch_per_rank"] = gb, bpr
    out["steps"] = root.integer("steps", None, lo=1, hi=1 << 62)
    out["epochs"] = root.integer("epochs", None, lo=1, hi=1 << 62)
    endless = out["steps"] is None and out["epochs"] is None
    if endless and _data_format(d) not in ("stream", "jetstream"):
        raise root.error(None, "set steps and/or epochs (the length of training)")
    out["model"] = parse_model(root.node("model", required=True))
    out["tables"] = [parse_table(t) for t in root.nodes("tables")]
    if not out["tables"]:
        raise root.error("tables", "at least one [[tables]] entry is required")
    out["dense_optimizer"] = parse_dense_optimizer(root, out["steps"])
    if "clip_norm" in out["dense_optimizer"] and out["ps"] is not None \
            and out["ps"].dense_on_servers and out["ps"].groups > 1:
        raise root.error("dense_optimizer.clip_norm", "the servers sum the gradients of "
                         f"{out['ps'].groups} worker groups in slices, so no rank sees the "
                         "norm of the whole gradient: use ps.groups = 1 (the group's reduced "
                         "gradient is clipped before it is pushed) or ps.dense_on_servers = "
                         "false")
    data = out["data"] = parse_data(root.node("data", required=True))
    if data.train is None:
        raise root.error("data.train", "training needs a train split")
    if out["epochs"] is not None and data.format in ("stream", "jetstream"):
        raise root.error("epochs", "a stream has no epochs: set steps, or none to train "
                                   "until the stream's END")
    if out["epochs"] is not None and data.format == "synthetic" and data.train.num_samples is None:
        raise root.error("data.train.num_samples", "epochs need a finite synthetic train split")
    out["eval"] = parse_eval(root.node("eval"))
    if root.has("eval") and data.eval is None:
        raise root.error("eval", "evaluation needs an eval split ([data.eval])")
    out["checkpoint"] = parse_checkpoint(root.node("checkpoint"))
    ev = out["eval"]
    uses = [k for k, on in (("early_stopping", ev.early_stopping is not None),
                            ("keep_best", ev.keep_best)) if on]
    if uses and not ev.interval:
        raise root.error("eval.interval", f"{' and '.join(uses)} compare(s) evaluations during "
                                          f"training: set interval (the steps between them)")
    if ev.keep_best and out["checkpoint"] is None:
        raise root.error("eval.keep_best", "keeping the best checkpoint needs a [checkpoint] "
                                           "section (its directory)")
    out["metrics"] = parse_metrics(root.node("metrics"))
    out["online"] = parse_online(root.node("online"))
    root.finish()
    check_model_tables(root, Config(**out))
    return out


def _data_format(d):
    """``data.format`` as written (validated later by ``parse_data``), or None."""
    data = d.get("data")
    return data.get("format") if isinstance(data, dict) else None


# --------------------------------------------------------------------------- entry points

def config_from_dict(d, source="<dict>", text=None):
    """Validate a parsed config dict into a ``Config``.

    Args:
        d: the dict, as ``tomllib.load`` returns it; it is not modified.
        source: the name used in error messages (a file name, or "<dict>").
        text: the original TOML text, kept as ``Config.text``.

    Raises:
        ConfigError: naming ``source`` and the key path of the first problem found.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the configuration must be a table, got {kind_of(d)}")
    return Config(**parse_config_dict(d, source), source=source, text=text)


def loads_config(text, source="<string>"):
    """Parse and validate TOML ``text`` (e.g. ``Config.text`` stored in a checkpoint)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return config_from_dict(d, source=source, text=text)


def load_config(path, overrides=()):
    """Read and validate the TOML configuration file at ``path``.

    Args:
        path: the file.
        overrides: ``KEY=VALUE`` strings applied before validation
            (``hpctrain.config.overrides``); the saved ``Config.text`` records them.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not TOML, or invalid.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if not overrides:
        return loads_config(text, source=path)
    from hpctrain.config.overrides import apply_overrides, dumps
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    d = apply_overrides(d, overrides, source=path)
    text = (f"# {os.path.basename(path)} with --set " + " --set ".join(overrides).replace(
        "\n", " ") + "\n" + dumps(d))
    return config_from_dict(d, source=path, text=text)
