"""tune_malloc: large per-step arrays stop being page-faulted in again on every step."""
import os
import subprocess
import sys
import textwrap

import pytest

from hpctrain.memory import _libc

pytestmark = pytest.mark.skipif(_libc() is None, reason="not glibc")

# Allocate, touch and free 26 arrays of 256 KiB ten times (a step's pooled outputs) and
# count the minor page faults of the last nine rounds.
_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from hpctrain.memory import tune_malloc, malloc_tuned
    if sys.argv[1] == "tune":
        tune_malloc()
    def rounds(n):
        for _ in range(n):
            arrs = [np.ones((4096, 16), np.float32) for _ in range(26)]
            del arrs
    rounds(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(9)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, malloc_tuned())
""")


def _probe(mode, **env):
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("HPCTRAIN_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=run_env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return int(out[0]), out[1]


def test_tuned_process_reuses_freed_arrays_without_page_faults():
    faults_default, state = _probe("plain")
    assert state == "None"
    # glibc's default: each 256 KiB array is a fresh mmap, 64 pages faulted in per array
    assert faults_default >= 9 * 26 * 64 // 2
    faults_tuned, state = _probe("tune")
    assert state == "True"
    assert faults_tuned < 9 * 26 // 2          # heap reuse: (almost) no new pages


def test_opt_outs_leave_the_allocator_alone():
    _, state = _probe("tune", HPCTRAIN_MALLOC="default")
    assert state == "False"
    _, state = _probe("tune", MALLOC_MMAP_THRESHOLD_="1048576")
    assert state == "False"
    with pytest.raises(subprocess.CalledProcessError) as err:
        _probe("tune", HPCTRAIN_MALLOC="jemalloc")
    assert "HPCTRAIN_MALLOC must be" in err.value.stderr
