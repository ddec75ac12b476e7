"""The alpha-beta cost model: fitting recovers known parameters; costs have their closed forms."""
import math

import numpy as np
import pytest

from hpctrain.bench import costmodel as cm


def _synthetic(kind, alpha, beta, ranks, sizes, noise, seed=0):
    terms = cm.allreduce_terms if kind == "allreduce" else cm.alltoallv_terms
    rng = np.random.default_rng(seed)
    rows = []
    for p in ranks:
        for n in sizes:
            ca, cb = terms(n, p)
            t = (ca * alpha + cb * beta) * (1 + noise * rng.standard_normal())
            rows.append((p, n, ca, cb, t))
    return rows


@pytest.mark.parametrize("kind", ["allreduce", "alltoallv"])
@pytest.mark.parametrize("alpha,beta", [(2e-6, 1 / 10e9), (30e-6, 1 / 1e9), (0.4e-6, 1 / 40e9)])
def test_fit_recovers_alpha_beta(kind, alpha, beta):
    rows = _synthetic(kind, alpha, beta, [2, 3, 4, 8], [2 ** k for k in range(3, 25, 2)], 0.0)
    a, b = cm.fit_alpha_beta([r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows])
    assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(beta, rel=1e-9)


def test_fit_with_noise_is_close():
    rows = _synthetic("allreduce", 5e-6, 1 / 8e9, [2, 4], [2 ** k for k in range(3, 25)], 0.05)
    a, b = cm.fit_alpha_beta([r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows])
    assert a == pytest.approx(5e-6, rel=0.1) and b == pytest.approx(1 / 8e9, rel=0.1)


def test_fit_keeps_parameters_non_negative():
    # pure bandwidth data with a latency the model cannot explain as negative
    ca, cb = [2.0, 2.0, 2.0], [1e3, 1e6, 1e9]
    t = [0.9e-7, 1e-4, 1e-1]
    a, b = cm.fit_alpha_beta(ca, cb, t)
    assert a >= 0 and b > 0
    assert b == pytest.approx(1e-10, rel=0.2)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 2 points"):
        cm.fit_alpha_beta([1.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        cm.fit_alpha_beta([1.0, 1.0], [1.0, 2.0], [1.0, 0.0])


def test_collective_closed_forms():
    assert cm.allreduce_terms(1000, 1) == (0.0, 0.0)
    assert cm.allreduce_terms(1000, 4) == (4.0, 1500.0)      # 2 log2 4, 2 * 3/4 * n
    assert cm.allreduce_terms(1000, 5) == (6.0, 1600.0)      # ceil(log2 5) = 3
    assert cm.alltoallv_terms(800, 4) == (3.0, 600.0)


def _network(a_node=1e-6, b_node=10e9, a_net=2e-6, b_net=20e9):
    node = cm.Link(a_node, b_node)
    return cm.Network(node, node, cm.Link(a_net, b_net))


def test_hierarchical_allreduce_and_alltoallv():
    net = _network()
    n = 1 << 20
    # one node of 8: intra level only
    assert net.allreduce(n, 8, 8) == pytest.approx(6 * 1e-6 + 2 * 7 / 8 * n / 10e9)
    # 4 nodes x 8: plus the inter-node level over 4 node leaders
    expect = 6e-6 + 2 * 7 / 8 * n / 10e9 + 4 * 2e-6 + 2 * 3 / 4 * n / 20e9
    assert net.allreduce(n, 32, 8) == pytest.approx(expect)
    # alltoallv: 7 local peers, 24 remote ones sharing the node's link
    m = 32e6
    expect = 7e-6 + 7 / 32 * m / 10e9 + 24 * 2e-6 + 8 * 24 / 32 * m / 20e9
    assert net.alltoallv(m, 32, 8) == pytest.approx(expect)
    assert net.alltoallv(m, 1, 8) == 0.0 and net.allreduce(n, 1, 8) == 0.0


def test_workload_counts_match_dlrm():
    w = cm.Workload(num_dense=13, features=26, dim=16, bottom=(512, 256, 64), top=(512, 256, 1))
    bottom, top = w.mlp_sizes()
    assert bottom == [13, 512, 256, 64, 16] and top[0] == 16 + 27 * 26 // 2
    expect = sum(a * b + b for s in (bottom, top) for a, b in zip(s, s[1:]))
    assert w.dense_params == expect
    try:
        from hpctrain.dense.models import DLRM
    except ImportError:
        return
    model = DLRM(13, [16] * 26, bottom=[512, 256, 64], top=[512, 256, 1])
    assert model.params.num_parameters == w.dense_params


def test_sweep_weak_and_strong():
    w = cm.Workload()
    model = cm.CostModel(_network(), cm.ComputeRates(threads=1), ranks_per_node=8,
                         cores_per_node=8)
    ranks = [1, 2, 4, 8, 16, 64, 1024]
    weak = model.sweep(w, ranks, 4096, "weak")
    assert weak[0]["efficiency"] == pytest.approx(1.0)
    assert weak[0]["allreduce_s"] == 0 and weak[0]["alltoallv_s"] == 0
    eff = [r["efficiency"] for r in weak]
    assert all(a >= b for a, b in zip(eff, eff[1:])) and eff[-1] < 1
    assert [r["nodes"] for r in weak] == [1, 1, 1, 1, 2, 8, 128]
    strong = model.sweep(w, ranks, 65536, "strong")
    assert strong[3]["batch_per_rank"] == 65536 / 8
    # strong scaling loses efficiency faster than weak scaling at the same rank count
    assert strong[-1]["efficiency"] < weak[-1]["efficiency"]
    for r in weak + strong:
        assert r["step_s"] == pytest.approx(r["compute_s"] + r["allreduce_s"] + r["alltoallv_s"])
        assert r["samples_per_s"] == pytest.approx(r["ranks"] * r["batch_per_rank"] / r["step_s"])
    with pytest.raises(ValueError, match="weak"):
        model.sweep(w, ranks, 1, "both")


def test_oversubscription_slows_compute():
    w = cm.Workload()
    model = cm.CostModel(_network(), cm.ComputeRates(threads=1), ranks_per_node=4,
                         cores_per_node=2)
    one = model.step(w, 1, 1024)["compute"]
    four = model.step(w, 4, 1024)["compute"]
    assert four == pytest.approx(2 * one)


def test_fit_node_links_from_benchmark_json():
    alpha, beta = 3e-6, 1 / 5e9
    docs = []
    for p in (1, 2, 4):
        rows = []
        for n in (8, 1024, 1 << 16, 1 << 22):
            ca, cb = cm.allreduce_terms(n, p)
            t = ca * alpha + cb * beta if p > 1 else 1e-7
            rows.append({"bytes": n, "hpctrain": {"p50": t}})
        docs.append({"benchmark": "allreduce", "world_size": p, "ranks_per_node": p,
                     "rows": rows})
    fitted = cm.fit_node_links(docs)
    link, points = fitted["allreduce"]
    assert link.latency_s == pytest.approx(alpha) and link.beta == pytest.approx(beta)
    assert len(points) == 8 and max(abs(pt["rel_error"]) for pt in points) < 1e-9
    assert fitted["alltoallv"] == (None, [])


def test_interconnect_presets_are_sane():
    for name, link in cm.INTERCONNECTS.items():
        assert 0 < link.latency_s < 1e-4 and 1e9 <= link.bandwidth_Bps <= 1e11, name
        assert link.description
    assert math.isclose(cm.INTERCONNECTS["ib_hdr"].beta, 1 / 23e9)


def test_oversubscribed_runs_are_reported_not_fitted():
    alpha, beta = 4e-6, 1 / 6e9
    docs = []
    for p, cores in ((2, 2), (3, 4), (4, 2)):
        rows = []
        for n in (64, 4096, 1 << 18, 1 << 21):
            ca, cb = cm.alltoallv_terms(n * p, p)
            t = ca * alpha + cb * beta
            rows.append({"bytes": n, "hpctrain": {"p50": t * (50 if p == 4 else 1)}})
        docs.append({"benchmark": "alltoallv", "world_size": p, "ranks_per_node": p,
                     "versions": {"cpu_count": cores, "threads": 1}, "rows": rows})
    link, points = cm.fit_node_links(docs)["alltoallv"]
    assert link.latency_s == pytest.approx(alpha) and link.beta == pytest.approx(beta)
    over = [pt for pt in points if pt["oversubscribed"]]
    assert len(over) == 4 and all(pt["ranks"] == 4 for pt in over)
    assert all(pt["rel_error"] == pytest.approx(1 / 50 - 1) for pt in over)
    assert all(abs(pt["rel_error"]) < 1e-9 for pt in points if not pt["oversubscribed"])


def test_scaling_sweep_and_costmodel_command(tmp_path, capsys):
    """A tiny real sweep (allreduce, alltoallv at 1 and 2 ranks) and the model fitted from it."""
    import json
    import os

    from hpctrain.bench import scaling
    from mpirun import mpiexec
    if mpiexec() is None:
        pytest.skip("no mpiexec")
    out = tmp_path / "scaling"
    rc = scaling.main(["--ranks", "1,2", "--benchmarks", "allreduce,alltoallv", "--out", str(out),
                       "--allreduce-args", "--max-bytes 64K --repeat 3 --warmup 1",
                       "--alltoallv-args", "--max-bytes 64K --repeat 3 --warmup 1",
                       "--trials", "2", "--timeout", "120"])
    assert rc == 0, capsys.readouterr()
    for name in ("allreduce", "alltoallv"):
        for p in (1, 2):
            rec = json.loads((out / f"{name}-weak-{p}.json").read_text())
            assert rec["world_size"] == p and rec["nodes"] == 1 and rec["ranks_per_node"] == p
            assert rec["threads"] == 1 and rec["versions"]["mpi4py"] and rec["trials"] == 2
            assert rec["result"]["benchmark"] == name and rec["phases"]
        rec2 = json.loads((out / f"{name}-weak-2.json").read_text())
        assert rec2["busbw_GBps"] > 0 and rec2["efficiency"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and not any(r["error"] for r in summary["runs"])
    text = capsys.readouterr().out
    assert (out / "scaling.png").exists() or "matplotlib not installed" in text

    pred = tmp_path / "model.json"
    assert cm.main(["--results", str(out), "--interconnect", "ib_ndr", "--max-ranks", "64",
                    "--json", str(pred)]) == 0
    model = json.loads(pred.read_text())
    assert model["links"]["allreduce_node"]["description"] == "fitted from allreduce"
    assert model["links"]["net"]["bandwidth_Bps"] == cm.INTERCONNECTS["ib_ndr"].bandwidth_Bps
    assert [r["ranks"] for r in model["prediction"]] == [1, 2, 4, 8, 16, 32, 64]
    kinds = {(pt["benchmark"], pt["ranks"]) for pt in model["points"]}
    assert kinds == {("allreduce", 2), ("alltoallv", 2)}
    assert "predicted vs measured" in capsys.readouterr().out
    assert os.path.getsize(pred) > 0


def test_scaling_dry_run_lists_every_point(capsys):
    from hpctrain.bench import scaling
    assert scaling.main(["--dry-run", "--ranks", "1,2,4", "--benchmarks", "exchange,allreduce",
                         "--batch", "100"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 * 2 + 3          # exchange weak+strong, allreduce weak only
    strong = [ln for ln in lines if "exchange" in ln][3:]
    assert ["--batch 400" in strong[0], "--batch 200" in strong[1], "--batch 100" in strong[2]] \
        == [True] * 3


def test_data_thread_counts_once_cores_are_busy():
    # a prefetch thread is free while a core is idle, a share of the cores once none is
    rates = cm.ComputeRates(threads=1)
    model = cm.CostModel(_network(), rates, ranks_per_node=4, cores_per_node=2, data_threads=1)
    assert [model.oversubscription(p) for p in (1, 2, 4)] == [1.0, 2.0, 4.0]
    wide = cm.CostModel(_network(), rates, ranks_per_node=4, cores_per_node=8, data_threads=1)
    assert [wide.oversubscription(p) for p in (1, 2, 4)] == [1.0, 1.0, 1.0]
