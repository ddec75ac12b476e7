"""Nothing leaks: an aborted job leaves no segment in /dev/shm; stale ones are found and removed."""
import os
import textwrap
import time

import pytest

from hpctrain.comm import shmclean
from mpirun import run_mpi

pytestmark = pytest.mark.skipif(not os.path.isdir(shmclean.SHM_DIR), reason="no /dev/shm")

FAIL = textwrap.dedent("""
    import numpy as np
    from hpctrain.comm import create_communicator
    from hpctrain.sparse import JaggedBatch, ShardedEmbedding, TableSpec

    comm = create_communicator("mpi")
    emb = ShardedEmbedding([TableSpec("t", 4, ["f"])], comm, exchange="shm")
    batch = JaggedBatch(["f"], np.arange(8) + 8 * comm.rank, np.ones(8, np.int64))
    out, ticket = emb.forward(batch, 0)          # the exchange window is mapped now
    comm.barrier()
    if comm.rank == comm.size - 1:
        raise RuntimeError("deliberate failure after the window was mapped")
    comm.barrier()
""")


def _mpi_files():
    return {n for n in os.listdir(shmclean.SHM_DIR) if n.startswith(shmclean.PREFIXES)}


@pytest.mark.parametrize("how", ["exception", "hpctrain_error"])
def test_aborted_job_leaves_no_segment(tmp_path, how):
    before = _mpi_files()
    if how == "exception":
        script = tmp_path / "fail.py"
        script.write_text(FAIL)
        res = run_mpi(2, [str(script)], timeout=90, check=False)
        assert "deliberate failure" in res.stdout
    else:   # a named error through the CLI (_fail_job), after MPI started
        res = run_mpi(2, ["-m", "hpctrain", "train", str(tmp_path / "missing.toml")],
                      timeout=90, check=False)
        assert "ConfigError" in res.stdout
    assert res.returncode != 0
    time.sleep(0.5)
    # segments other jobs on this machine still map are theirs; ours must all be gone
    mapped = {os.path.basename(p) for p in shmclean._live_mappings()}
    left = _mpi_files() - before - mapped
    assert not left, f"segments left in /dev/shm by the aborted job: {sorted(left)}"


def test_stale_segments_are_found_and_removed(tmp_path):
    stale = tmp_path / "mpich_shm_deadbeef_0"
    stale.write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    young = tmp_path / "mpich_shm_cafe_0"
    young.write_bytes(b"\0" * 10)
    other = tmp_path / "not_mpi"
    other.write_bytes(b"\0")
    os.utime(other, (old, old))
    found = shmclean.stale_segments(directory=str(tmp_path))
    assert found == [(str(stale), 4096)]
    assert shmclean.remove_stale(directory=str(tmp_path)) == (1, 4096)
    assert sorted(os.listdir(tmp_path)) == ["mpich_shm_cafe_0", "not_mpi"]
