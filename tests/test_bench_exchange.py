"""The exchange benchmark runs under MPI and writes what benchmarks/README.md reports."""
import json

import pytest

from mpirun import mpiexec, run_mpi

pytestmark = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")


def test_exchange_benchmark_smoke(tmp_path):
    out = tmp_path / "exchange.json"
    run_mpi(2, ["-m", "hpctrain.bench", "exchange", "--batch", "32", "--features", "3",
                "--vocab", "500", "--dims", "4", "--warmup", "1", "--repeat", "2",
                "--exchange-repeat", "2", "--json", str(out)], timeout=240)
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["ranks"] == 2 and r["dim"] == 4 and r["exchange"] == "shm"
    for key in ("step", "step_alone", "step_alltoallv", "step_one_rank"):
        assert r[key]["p50"] > 0, key
    # the 1-rank baseline is each rank's own step time while its peer slept
    assert r["weak_ratio_one_rank"] > 0
    assert r["one_rank_samples_per_s"] == pytest.approx(32 / r["step_one_rank"]["p50"])
    assert set(r["phases"]) >= {"dedup", "route", "lookup", "pool", "update"}
    assert r["exchange_ours_s"] > 0 and r["exchange_raw_s"] > 0
    assert r["exchange_bytes_sent_rank0"] > 0
