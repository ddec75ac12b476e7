"""An exception on one rank ends the whole ``python -m mpi4py`` job quickly instead of hanging."""
import re
import textwrap
import time

import pytest

from mpirun import run_mpi

SCRIPT = textwrap.dedent("""
    import time
    import numpy as np
    from hpctrain.comm import create_communicator

    comm = create_communicator("mpi")
    fail = comm.size - 1
    comm.barrier()
    if comm.rank == fail:
        print(f"raising at {time.time():.3f}", flush=True)
        raise RuntimeError(f"deliberate failure on rank {comm.rank} of {comm.size}")
    # The other ranks wait in a collective the failing rank never joins.
    comm.allreduce(np.ones(4))
    time.sleep(120)
""")


@pytest.mark.parametrize("nranks", [2, 4])
def test_exception_on_one_rank_aborts_the_job(tmp_path, nranks):
    script = tmp_path / "fail_one_rank.py"
    script.write_text(SCRIPT)
    proc = run_mpi(nranks, [str(script)], timeout=90, check=False)
    ended = time.time()
    out = proc.stdout
    assert proc.returncode != 0, out
    assert f"deliberate failure on rank {nranks - 1} of {nranks}" in out, out
    assert "RuntimeError" in out, out
    raised = float(re.search(r"raising at (\d+\.\d+)", out).group(1))
    assert ended - raised < 10, f"job took {ended - raised:.1f}s to end after the exception"
