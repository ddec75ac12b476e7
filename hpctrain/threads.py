"""How many threads a rank uses: one rule, used by the trainer and reported by ``info``.

Threads per rank, for the OpenMP kernels and for BLAS, are the first of:

1. the config's ``threads`` key;
2. ``HPCTRAIN_NUM_THREADS``;
3. ``OMP_NUM_THREADS``;
4. this host's cores divided among the ranks on this host (at least 1).

BLAS libraries default to one thread per core *per process*; with several ranks per
host their spinning threads oversubscribe the cores and dense layers run tens of times
slower, so the trainer always sets the limit explicitly.
"""
import os


def threads_per_rank(configured=None, ranks_on_host=1, environ=None, cpu_count=None):
    """The rule above: ``(threads, where the number came from)``."""
    env = os.environ if environ is None else environ
    if configured:
        return int(configured), "config threads"
    for var in ("HPCTRAIN_NUM_THREADS", "OMP_NUM_THREADS"):
        v = env.get(var, "").strip()
        if v:
            try:
                n = int(v.split(",")[0])
            except ValueError:
                raise ValueError(f"{var}={v!r} is not a number of threads") from None
            if n >= 1:
                return n, var
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(ranks_on_host))), \
        f"{cores} cores / {ranks_on_host} rank(s) on this host"
