"""bench hybrid: its stragglers, configs and goals; one short run of every section under MPI
(3 ranks: 1 server + 2 workers) whose JSON the hybrid cost model reads."""
import json

import numpy as np
import pytest

from mpirun import mpiexec, run_mpi

from hpctrain.bench import hybrid as bh
from hpctrain.config import config_from_dict

needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")


def test_transient_straggler_is_one_group_with_probability_p_the_same_every_run():
    st = bh.Straggler("transient", 0.05, groups=2)
    again = bh.Straggler("transient", 0.05, groups=2)
    delays = np.array([[st.delay(c, g) for g in range(2)] for c in range(1, 4001)])
    assert np.array_equal(delays, [[again.delay(c, g) for g in range(2)] for c in range(1, 4001)])
    assert set(np.unique(delays)) <= {0.0, 0.05}
    assert (np.count_nonzero(delays, axis=1) <= 1).all()           # at most one group a clock
    share = np.count_nonzero(delays.any(axis=1)) / len(delays)
    assert share == pytest.approx(bh.TRANSIENT_P, abs=0.03)
    per_group = np.count_nonzero(delays, axis=0) / len(delays)
    assert per_group == pytest.approx([bh.TRANSIENT_P / 2] * 2, abs=0.03)


def test_persistent_straggler_is_always_the_last_group():
    st = bh.Straggler("persistent", 0.02, groups=3)
    assert [st.delay(c, g) for c in (1, 7) for g in range(3)] == [0, 0, 0.02] * 2
    with pytest.raises(ValueError):
        bh.Straggler("sometimes", 0.1, groups=2)


def test_schedule_bound_meets_the_bsp_and_unbounded_limits_counted_directly():
    st = bh.Straggler("transient", 0.05, groups=2)
    clocks, warmup = 200, 10
    delayed = np.array([[bool(st.delay(c, g)) for g in range(2)]
                        for c in range(warmup + 1, clocks + 1)])
    timed = clocks - warmup
    # s = 0: every clock waits for the slowest group, one unit more when any group sleeps
    assert st.schedule_bound(0, clocks, warmup) == pytest.approx(
        timed / (timed + delayed.any(axis=1).sum()))
    # unbounded staleness over the whole run: each group pays only its own sleeps
    whole = np.array([[bool(st.delay(c, g)) for g in range(2)] for c in range(1, clocks + 1)])
    assert st.schedule_bound(clocks, clocks) == pytest.approx(
        clocks / (clocks + whole.sum(axis=0).max()))
    bounds = [st.schedule_bound(s, clocks, warmup) for s in (0, 1, 2, 4)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    # a persistent straggler half a step slower caps every s at 1 / 1.5
    slow = bh.Straggler("persistent", 0.05, groups=2)
    assert slow.schedule_bound(4, clocks) == pytest.approx(1 / bh.PERSISTENT_FACTOR, rel=0.02)


def test_configs_are_the_benchmark_workload_in_hybrid_mode():
    base = bh.workload(batch=256, vocab=5000, steps=12, threads=1, seed=3)
    col = config_from_dict(base, source="t")
    assert col.mode == "collective" and col.steps == 12 and col.batch_per_rank == 256
    assert col.data.synthetic.vocab == [5000] * 26 and len(col.tables) == 26
    hyb = config_from_dict(bh.hybrid_dict(base, 1, 2, "ssp", 2), source="t")
    assert hyb.mode == "hybrid" and hyb.ps.groups == 2 and hyb.ps.staleness == 2
    assert hyb.ps.dense_on_servers is True and hyb.model == col.model
    asp = config_from_dict(bh.hybrid_dict(base, 1, 1, "asp", None, dense_on_servers=False),
                           source="t")
    assert asp.ps.consistency == "asp" and asp.ps.dense_on_servers is False
    conv = config_from_dict(bh.hybrid_dict(bh.convergence_dict(seed=2, steps=30), 1, 2, "bsp", 0),
                            source="t")
    assert conv.seed == 2 and conv.steps == 30 and conv.metrics.path is None
    assert conv.eval.at_end and not conv.eval.interval


def _case(case, step_s, gb=100, **kw):
    return dict({"case": case, "median_step_s": step_s, "samples_per_s": gb / step_s,
                 "groups": 2, "straggler": None}, **kw)


def test_goals_judge_the_issue_targets_and_name_the_best_possible_gain():
    res = {"throughput": [_case("collective-W", 0.100), _case("G1-bsp", 0.140),
                          _case("G1-ssp1", 0.115)],
           "stragglers": [_case("none-ssp2", 0.100), _case("transient-bsp", 0.130),
                          _case("transient-ssp2", 0.112, groups=2),
                          _case("none-bsp", 0.105), _case("persistent-bsp", 0.155,
                                                          group_clocks_per_s={0: 6.5, 1: 6.4})],
           "convergence": {"summary": {"dense_allreduce": {
               "bsp": {"auc_gap_mean": 0.0}, "ssp1": {"auc_gap_mean": -0.0004},
               "ssp4": {"auc_gap_mean": 0.0008}, "asp": {"auc_gap_mean": -0.01}}}}}
    g = bh.goals(res)
    assert g["s0_vs_collective"]["value"] == pytest.approx(1.4) and g["s0_vs_collective"]["met"]
    assert g["s1_recovers"]["value"] == pytest.approx(25 / 40) and g["s1_recovers"]["met"]
    assert g["transient_keep"]["value"] == pytest.approx(100 / 112)
    assert g["transient_vs_bsp"]["value"] == pytest.approx(130 / 112)
    # G = 2: (1 + p) / (1 + p / 2) = 1.130, times SSP's lead without a straggler (prefetch)
    assert g["transient_vs_bsp"]["ideal"] == pytest.approx(1.3 / 1.15 * 0.105 / 0.100)
    assert g["persistent_cap (bsp)"]["met"] is None
    gap = g["auc_gap (dense_allreduce)"]          # the AUC lost; ASP is not judged
    assert gap["value"] == pytest.approx(0.0004) and gap["met"]
    assert gap["largest_difference"] == pytest.approx(0.0008)


@needs_mpi
def test_bench_hybrid_runs_every_section_and_its_json_feeds_the_cost_model(tmp_path, capsys):
    out = tmp_path / "hybrid.json"
    proc = run_mpi(3, ["-m", "hpctrain.bench", "hybrid", "--steps", "4", "--warmup", "1",
                       "--straggler-steps", "12", "--batch", "64", "--vocab", "5000",
                       "--trials", "2", "--seeds", "1", "--convergence-steps", "8",
                       "--convergence-layouts",
                       "dense_allreduce", "--rtt-sizes", "260,1040", "--repeat", "3",
                       "--json", str(out)], timeout=400)
    assert "# goals" in proc.stdout, proc.stdout[-3000:]
    doc = json.loads(out.read_text())
    assert doc["layout"] == dict(doc["layout"], ranks=3, servers=1, workers=2)
    cases = {r["case"]: r for r in doc["throughput"]}
    assert {"collective-W", "collective-N", "G1-bsp", "G1-ssp1", "G1-ssp2", "G1-ssp4", "G1-asp",
            "G2-bsp", "G2-ssp4", "G2-asp"} <= set(cases)
    assert cases["collective-W"]["ranks"] == 2 and cases["collective-N"]["ranks"] == 3
    for r in doc["throughput"] + doc["stragglers"]:
        if r["mode"] != "hybrid":
            continue
        assert r["steps"] == (4 if r in doc["throughput"] else 12) and r["samples_per_s"] > 0
        bound = 0 if r["consistency"] == "bsp" else r["staleness"]
        if bound is not None:                   # the server never served staler than s
            assert max(map(int, r["server_staleness_hist"])) <= bound, r["case"]
            assert max(map(int, r["staleness_hist"])) <= bound, r["case"]
        assert r["apply_ms_per_clock"] > 0 and r["ids_per_pull"] > 0
    st = {r["case"]: r for r in doc["stragglers"]}
    assert st["transient-bsp"]["straggler"]["kind"] == "transient"
    # a consistency's own no-straggler step (its best trial) is its delay in every trial;
    # -bspdelay: SSP with BSP's delays
    steps = doc["straggler_step_s"]
    assert set(steps) == {"bsp", "ssp2", "ssp4"}
    assert st["transient-ssp2"]["straggler"]["delay_s"] == steps["ssp2"]
    assert st["transient-bsp"]["straggler"]["delay_s"] == steps["bsp"]
    assert st["transient-ssp2-bspdelay"]["straggler"]["delay_s"] == steps["bsp"]
    assert st["persistent-ssp2"]["straggler"]["delay_s"] == pytest.approx(0.5 * steps["ssp2"])
    assert all(len(r["trials_samples_per_s"]) == 2 for r in doc["throughput"] + doc["stragglers"])
    slept = [w["slept_s"] for w in st["persistent-bsp"]["per_worker"]]
    assert slept[0] == 0 and slept[1] > 0                 # only the last group sleeps
    assert [x["ids"] for x in doc["pull_rtt"]["sparse"]] == [260, 1040]
    conv = doc["convergence"]["summary"]["dense_allreduce"]
    assert set(conv) == {"bsp", "ssp1", "ssp2", "ssp4", "asp", "collective"}
    assert conv["bsp"]["auc_gap_mean"] == 0.0
    # the synchronous reference: the collective trainer on the worker ranks, same batches
    coll = [r for r in doc["convergence"]["runs"] if r["label"] == "collective"]
    assert len(coll) == 1 and 0.5 < coll[0]["auc"] <= 1.0
    assert "collective_vs_bsp" in doc["goals"]["auc_gap (dense_allreduce)"]
    assert {"s0_vs_collective", "s1_recovers", "transient_keep", "transient_vs_bsp",
            "transient_vs_bsp (BSP's delays)", "persistent_cap (ssp2)",
            "auc_gap (dense_allreduce)"} <= set(doc["goals"])

    from hpctrain.bench.costmodel.report import main as costmodel
    capsys.readouterr()
    assert costmodel(["--results", str(tmp_path / "none"), "--hybrid", str(out),
                      "--json", str(tmp_path / "cm.json")]) == 0
    text = capsys.readouterr().out
    assert "# hybrid step" in text and "transient-ssp2" in text
    cm = json.loads((tmp_path / "cm.json").read_text())["hybrid"]
    assert cm["rates"]["rtt_fixed_s"] >= 0 and len(cm["points"]) >= 10
