"""The hybrid MPI tests on worlds the 2- and 4-rank suites do not cover: 5 ranks, i.e.
1 server and 4 workers, so that two groups of two workers reduce inside their group; and
the GPU path's twin on 3 ranks, the smallest layout with two workers on one server."""
from mpirun import run_mpi


def test_hybrid_suite_with_groups_of_two_workers():
    out = run_mpi(5, ["-m", "pytest", "tests/mpi/test_hybrid.py", "-q", "-x",
                      "-p", "no:cacheprovider", "-p", "no:randomly"], timeout=600).stdout
    assert " passed" in out and "skipped" not in out, out[-3000:]


def test_gpu_path_twin_on_one_server_and_two_workers():
    """The GPU path's NumPy twin against the CPU run on 3 ranks (1 server + 2 workers: two
    groups of one, or one group of two); the 2-, 4- and 5-rank runs are the suites'."""
    out = run_mpi(3, ["-m", "pytest", "tests/mpi/test_hybrid.py", "-q", "-x", "-k", "twin",
                      "-p", "no:cacheprovider", "-p", "no:randomly"], timeout=300).stdout
    assert " passed" in out and "skipped" not in out, out[-3000:]
