"""The one error hierarchy of hpctrain.

Every error a user can provoke is an ``HpctrainError`` (or a plain
``TypeError``/``ValueError`` for wrong arguments to a Python API), and its
message names the culprit: file and line, config key, table, or rank.

    HpctrainError
    ├── ConfigError      invalid or unknown configuration keys/values
    ├── DataError        malformed input data (file, line number), missing files
    ├── CommError        collectives that disagree across ranks, launcher problems
    ├── CheckpointError  missing, partial or corrupt checkpoints
    ├── NonFiniteError   NaN/Inf losses or gradients
    └── InstallError     the installation cannot run here: kernels missing or built for
                         another CPU, no MPI library
"""


class HpctrainError(Exception):
    """Base class of every hpctrain error."""


class ConfigError(HpctrainError, ValueError):
    """A configuration file or dict is invalid; the message names file and key."""


class DataError(HpctrainError, ValueError):
    """Input data is malformed or missing; the message names file and line."""


class CommError(HpctrainError, RuntimeError):
    """A collective cannot proceed (mismatched ranks, world size, launcher)."""


class CheckpointError(HpctrainError, RuntimeError):
    """A checkpoint is missing, partial, corrupt or incompatible."""


class NonFiniteError(HpctrainError, FloatingPointError):
    """A loss or gradient became NaN or infinite."""


class InstallError(HpctrainError, ImportError):
    """hpctrain as installed cannot run here; the message says what to install or build."""
