"""Benchmarks: ``python -m hpctrain.bench NAME [options]`` (under mpiexec for multi-rank).

Each benchmark is a module ``hpctrain.bench.NAME`` with a ``main(argv)``; all
print an OSU-style table on rank 0, write JSON, and measure their baseline in
the same run. Shared helpers live in ``hpctrain.bench.common``.
"""
