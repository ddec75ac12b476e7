"""Type stubs of hpctrain._kernels.data_parse (kernels/data_parse.pyx)."""
import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]

def count_lines(buf: U8, start: int, stop: int, ends: I64) -> int: ...
def parse_lines(buf: U8, starts: I64, ends: I64, roles: I32, slots: I32, seeds: U64,
                seps: U8, delim: int, strip: bool, missing_id: int, labels: F64,
                label_hash: U64, dense: F64, ids: I64, lengths: I64, status: I32,
                err_col: I32) -> int: ...
def to_feature_major(ids: I64, lengths: I64, order: I32, values: I64,
                     fm_lengths: I64) -> int: ...
