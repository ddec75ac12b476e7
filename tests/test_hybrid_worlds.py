"""The hybrid MPI tests on a world the 2- and 4-rank suites do not cover: 5 ranks, i.e.
1 server and 4 workers, so that two groups of two workers reduce inside their group."""
from mpirun import run_mpi


def test_hybrid_suite_with_groups_of_two_workers():
    out = run_mpi(5, ["-m", "pytest", "tests/mpi/test_hybrid.py", "-q", "-x",
                      "-p", "no:cacheprovider", "-p", "no:randomly"], timeout=600).stdout
    assert " passed" in out and "skipped" not in out, out[-3000:]
