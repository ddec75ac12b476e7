"""Type stubs of hpctrain._kernels.data_synth (kernels/data_synth.pyx)."""
import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

def check_tables(vocab: int, s: float, head: F64, guide: I64,
                 tail: I64 | None = None) -> None: ...
def zipf_total(vocab: int, s: float, head: F64) -> float: ...
def zipf_tail_guide(vocab: int, s: float, head: F64, nt: int) -> I64: ...
def zipf_ids(u: F64, vocab: int, s: float, head: F64, guide: I64, out: I64,
             tail: I64 | None = None) -> None: ...
def bags(bag_keys: U64, lengths: I64, vocab: int, s: float, head: F64, guide: I64,
         weight_key: int, ids: I64, score: F64, tail: I64 | None = None,
         checked: bool = False) -> int: ...
