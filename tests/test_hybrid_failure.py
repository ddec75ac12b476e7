"""Hybrid mode fails fast: a rank that raises or stops answering ends the whole job.

Each case runs a 3-rank hybrid job (1 server, 2 groups of 1 worker) under
``mpiexec`` with one rank sabotaged at clock 3, and checks that the job ends
with a non-zero status well within 30 s and that the output names the culprit.
"""
import os
import re
import textwrap
import time

import pytest

from mpirun import ROOT, run_mpi

SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from hybrid_configs import small
    from hpctrain.comm import create_communicator
    from hpctrain.ps.client import PSClient
    from hpctrain.ps.server import Server
    from hpctrain.train.hybrid import run_hybrid

    case, timeout = sys.argv[1], float(sys.argv[2])
    world = create_communicator("mpi")

    def at_clock_3(original, action):
        def patched(self, *args):
            clock = args[-1] if args else self.applied + 1
            if clock == 3:
                print(f"sabotage {{case}} on rank {{world.rank}} at {{time.time():.3f}}",
                      flush=True)
                action()
            return original(self, *args)
        return patched

    def boom():
        raise RuntimeError(f"deliberate failure in {{case}}")

    def hang():
        time.sleep(600)

    if case == "server_raises" and world.rank == 0:
        Server._apply_table = at_clock_3(Server._apply_table, boom)
    if case == "server_hangs" and world.rank == 0:
        Server._advance = at_clock_3(Server._advance, hang)
    if case == "worker_raises" and world.rank == 2:
        PSClient.backward = at_clock_3(PSClient.backward, boom)
    if case == "worker_hangs" and world.rank == 2:
        PSClient.backward = at_clock_3(PSClient.backward, hang)
    cfg = small("hybrid", steps=30, servers=1, groups=2, timeout_s=timeout)
    run_hybrid(cfg, world)
""")


def _run(tmp_path, case, timeout_s):
    script = tmp_path / "sabotage.py"
    script.write_text(SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    proc = run_mpi(3, [str(script), case, str(timeout_s)], timeout=120, check=False)
    ended = time.time()
    out = proc.stdout
    assert proc.returncode != 0, out
    started = float(re.search(r"sabotage \w+ on rank \d at (\d+\.\d+)", out).group(1))
    return out, ended - started


@pytest.mark.parametrize("case", ["server_raises", "worker_raises"])
def test_a_rank_that_raises_ends_the_job(tmp_path, case):
    out, took = _run(tmp_path, case, timeout_s=300)
    assert f"deliberate failure in {case}" in out, out
    assert took < 30, f"the job took {took:.1f}s to end after the failure\n{out}"


def test_a_worker_that_hangs_is_named_by_the_server(tmp_path):
    out, took = _run(tmp_path, "worker_hangs", timeout_s=3)
    assert "CommError" in out, out
    # the server names the silent worker's rank and the clock it waits for
    assert re.search(r"clock 3 still waits for the PUSH of worker ranks \[2\]", out), out
    assert took < 30, f"the job took {took:.1f}s to end after the hang\n{out}"


def test_a_server_that_hangs_is_named_by_the_workers(tmp_path):
    out, took = _run(tmp_path, "server_hangs", timeout_s=3)
    assert "CommError" in out, out
    assert re.search(r"nothing from rank 0 within 3\.3 s while waiting for the rows of PULL "
                     r"of clock 4", out), out
    assert took < 30, f"the job took {took:.1f}s to end after the hang\n{out}"
