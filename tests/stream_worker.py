"""One rank of a stream training run for tests/test_stream_restart.py.

``python -m mpi4py tests/stream_worker.py CONFIG OUTDIR TAG``: writes its pid
(``pid-TAG-RANK``), resumes from the latest checkpoint, logs the sample ids of every
step it trains (``consumed-TAG-RANK``: "step id id ...", flushed before the step) and
the step it resumed from (``resumed-TAG``).
"""
import io
import os
import sys

from hpctrain.config import load_config
from hpctrain.train.loop import Trainer


class LoggedTrainer(Trainer):
    def _dense_step(self, batch, pooled, step, flags):
        self.consumed.write(f"{step} {' '.join(map(str, batch.sample_ids.tolist()))}\n")
        self.consumed.flush()
        return super()._dense_step(batch, pooled, step, flags)


def main():
    config, out, tag = sys.argv[1:4]
    tr = LoggedTrainer(load_config(config), stream=io.StringIO())
    rank = tr.comm.rank
    with open(os.path.join(out, f"pid-{tag}-{rank}"), "w") as fh:
        fh.write(str(os.getpid()))
    start = tr.restore(missing_ok=True) or 0
    if rank == 0:
        with open(os.path.join(out, f"resumed-{tag}"), "w") as fh:
            fh.write(str(start))
    tr.consumed = open(os.path.join(out, f"consumed-{tag}-{rank}"), "w")
    res = tr.fit()
    if rank == 0:
        with open(os.path.join(out, f"result-{tag}"), "w") as fh:
            fh.write(f"{res['stopped']} {res['step']}\n")


if __name__ == "__main__":
    main()
