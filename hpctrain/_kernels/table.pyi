"""Type stubs of hpctrain._kernels.table (kernels/table.pyx)."""
import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

def set_parallel_threshold(n: int) -> None: ...
def parallel_threshold() -> int: ...

SIMD_LEVELS: tuple[str, ...]

def simd_level() -> str: ...
def init_rows_reference(keys: I64, dim: int, seed: int, table_id: int, normal: bool,
                        scale: float) -> F32: ...

class TableParams:
    dim: int
    capacity: int
    opt_kind: int
    lr: float
    momentum: float
    beta1: float
    beta2: float
    eps: float
    l1: float
    l2: float
    lr_power: float
    weight_decay: float
    slot0_width: int
    slot1_width: int
    slot0_init: float
    slot1_init: float
    has_opt_step: bool
    seed: int
    table_id: int
    init_normal: bool
    init_scale: float
    min_count: int
    adm_kind: int
    bloom_size: int
    bloom_hashes: int
    def __init__(self, *, dim: int, capacity: int, opt_kind: int, lr: float,
                 momentum: float = ..., beta1: float = ..., beta2: float = ...,
                 eps: float = ..., l1: float = ..., l2: float = ..., lr_power: float = ...,
                 weight_decay: float = ..., slot0_width: int = ..., slot1_width: int = ...,
                 slot0_init: float = ..., slot1_init: float = ..., has_opt_step: bool = ...,
                 seed: int = ..., table_id: int = ..., init_normal: bool = ...,
                 init_scale: float, min_count: int = ..., adm_kind: int = ...,
                 bloom_size: int = ..., bloom_hashes: int = ...) -> None: ...
    def as_dict(self) -> dict[str, int | float | bool]: ...

class TableCore:
    dim: int
    opt_kind: int
    w0: int
    w1: int
    init_key: int
    init_normal: bool
    init_scale: float
    index_cap: int
    index_used: int
    row_cap: int
    row_high: int
    n_live: int
    n_free: int
    has_opt_step: bool
    min_count: int
    adm_kind: int
    bloom_size: int
    bloom_hashes: int
    counter_cap: int
    counter_used: int
    params: TableParams
    def __init__(self, params: TableParams) -> None: ...
    def find(self, keys: I64, out: I64, nt: int) -> None: ...
    def find_or_insert(self, keys: I64, out: I64, step: int, nt: int) -> int: ...
    def gather(self, rows: I64, out: F32, nt: int, check_alive: bool) -> int: ...
    def first_bad_row(self, rows: I64, check_alive: bool) -> int: ...
    def first_nonfinite(self, grads: F32) -> int: ...
    def apply(self, rows: I64, grads: F32, step: int, nt: int) -> tuple[int, int]: ...

def live_rows(t: TableCore) -> I64: ...
def keys_by_row(t: TableCore) -> I64: ...
def ttl_rows(t: TableCore, step: int, ttl: int) -> I64: ...
def meta_of(t: TableCore, rows: I64) -> tuple[I64, I64, I64]: ...
def copy_rows(t: TableCore, rows: I64, which: int) -> F32: ...
def remove_rows(t: TableCore, rows: I64) -> int: ...
def import_keys(t: TableCore, keys: I64) -> I64: ...
def write_rows(t: TableCore, rows: I64, values: F32, slot0: F32 | None, slot1: F32 | None,
               access: I64, last_step: I64, opt_step: I64) -> None: ...
def nbytes(t: TableCore) -> dict[str, int]: ...
def pending_admission(t: TableCore) -> int: ...
def pending_counts(t: TableCore) -> tuple[I64, I64]: ...
def set_pending(t: TableCore, keys: I64, counts: I64) -> int: ...
def bloom_counters(t: TableCore) -> npt.NDArray[np.uint8]: ...
def set_bloom_counters(t: TableCore, counters: npt.NDArray[np.uint8]) -> None: ...
def check_invariants(t: TableCore) -> None: ...
