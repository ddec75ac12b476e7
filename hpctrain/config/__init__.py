"""Run configuration: a TOML file validated into dataclasses.

``load_config(path)`` reads a TOML file and ``config_from_dict(d)`` validates an
already-parsed dict. Anything wrong -- an unknown key, a wrong type, an
impossible value -- raises ``ConfigError`` naming the file and the key path::

    run.toml: tables[2].optimizer.lr: expected a finite number > 0, got -0.1

Every key is described in docs/configuration.md. One module per section::

    root.py     seed, mode, device, overlap, exchange, node_group_size, threads, malloc,
                global_batch | batch_per_rank, steps, epochs; Config; load_config & co.
    model.py    [model]            kind = "dlrm" | "wide_deep" | "deepfm", layer sizes
    tables.py   [[tables]]         name, features, dim, optimizer, admission, eviction,
                                   pooling, init
    optim.py    tables[i].optimizer and [dense_optimizer]: kind, lr, hyper-parameters;
                the dense side's clip_norm and [dense_optimizer.schedule]
    data.py     [data]             format, prefetch, shuffle, seed, bad_lines,
                                   [data.train] [data.eval] [data.synthetic]
    schema.py   [data.schema]      column roles of csv files
    run.py      [eval] (keep_best, early_stopping) [checkpoint] [metrics] (tensorboard)
    ps.py       [ps]               parameter servers of mode = "hybrid"
    online.py   [online]           delta exports for serving, progressive validation
    _node.py    the validating reader the section parsers share

Names, defaults and limits that a package enforces are imported from it, not copied:
optimizer kinds, hyper-parameters and ranges (``hpctrain.sparse.optimizers``,
``hpctrain.dense.optim``), admission/eviction limits (``hpctrain.sparse.policies``),
poolings, inits and exchanges (``hpctrain.sparse``), Criteo's columns (``hpctrain.data``).

Checkpoints keep ``Config.text`` (the original TOML) and rebuild the config
with ``loads_config(text)``; no TOML writer is involved.

Relative paths (data files, checkpoint directory, metrics file) are resolved
against the current working directory when the config is loaded, after ``~``
and ``$VAR`` expansion, and stored absolute.
"""
from hpctrain.config.data import (DATA_FORMATS, BadLinesConfig, DataConfig, SplitConfig,
                                  SyntheticConfig)
from hpctrain.config.model import MODEL_KINDS, ModelConfig
from hpctrain.config.optim import (DENSE_OPTIMIZER_KEYS, SPARSE_OPTIMIZER_DEFAULTS,
                                   SPARSE_OPTIMIZER_KEYS)
from hpctrain.config.online import OnlineConfig
from hpctrain.config.ps import PS_CONSISTENCIES, PS_PLACEMENTS, PsConfig
from hpctrain.config.root import (EXCHANGES, MODES, Config, config_from_dict, load_config,
                                  loads_config, parse_config_dict)
from hpctrain.config.run import CheckpointConfig, EvalConfig, MetricsConfig
from hpctrain.config.schema import (DENSE_TRANSFORMS, CrossedColumn, DenseColumn,
                                    MultiValuedColumn, SchemaConfig)
from hpctrain.config.tables import INITS, POOLINGS, TableConfig

__all__ = ["load_config", "loads_config", "config_from_dict", "parse_config_dict", "Config",
           "ModelConfig", "TableConfig", "DataConfig", "SplitConfig", "SchemaConfig",
           "DenseColumn", "MultiValuedColumn", "CrossedColumn", "SyntheticConfig",
           "BadLinesConfig", "EvalConfig", "CheckpointConfig", "MetricsConfig", "PsConfig",
           "OnlineConfig",
           "MODES", "MODEL_KINDS", "DATA_FORMATS", "POOLINGS", "INITS", "DENSE_TRANSFORMS",
           "EXCHANGES", "PS_CONSISTENCIES", "PS_PLACEMENTS", "SPARSE_OPTIMIZER_DEFAULTS",
           "SPARSE_OPTIMIZER_KEYS", "DENSE_OPTIMIZER_KEYS"]
