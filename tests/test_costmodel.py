"""The alpha-beta cost model: fitting recovers known parameters; costs have their closed forms."""
import dataclasses
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
    regimes, points = fitted["allreduce"]
    assert len(regimes.links) == 1          # one regime explains exact alpha-beta data
    link = regimes.links[0]
    assert link.latency_s == pytest.approx(alpha) and link.beta == pytest.approx(beta)
    assert len(points) == 8 and max(abs(pt["rel_error"]) for pt in points) < 1e-9
    assert fitted["alltoallv"] == (None, []) and fitted["local_copy"] == (None, [])


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
    regimes, points = cm.fit_node_links(docs)["alltoallv"]
    link = regimes.links[0]
    assert len(regimes.links) == 1
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
    assert model["links"]["allreduce_node"][0]["description"] == "fitted from allreduce"
    assert model["links"]["local_copy"][0]["from_bytes"] == 0
    ndr = cm.INTERCONNECTS["ib_ndr"]
    assert model["links"]["net"] == [{"from_bytes": 0, "latency_s": ndr.latency_s,
                                      "bandwidth_Bps": ndr.bandwidth_Bps,
                                      "description": ndr.description}]
    assert [r["ranks"] for r in model["prediction"]] == [1, 2, 4, 8, 16, 32, 64]
    kinds = {(pt["benchmark"], pt["ranks"]) for pt in model["points"]}
    assert kinds == {("allreduce", 2), ("alltoallv", 1), ("alltoallv", 2)}
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


# --------------------------------------------------------------------------- message-size regimes

def _piecewise(sizes, regimes, bounds, p=2, noise=0.0, seed=0):
    """Allreduce times at ``p`` ranks from known (alpha, beta) regimes split at ``bounds``."""
    rng = np.random.default_rng(seed)
    ca, cb, t = [], [], []
    for n in sizes:
        a, b = regimes[sum(n >= x for x in bounds)]
        c = cm.allreduce_terms(n, p)
        ca.append(c[0])
        cb.append(c[1])
        t.append((c[0] * a + c[1] * b) * (1 + noise * rng.standard_normal()))
    return ca, cb, t


SIZES = [2 ** k for k in range(3, 25)]     # 8 B .. 16 MiB, as the sweep measures


def test_fit_regimes_finds_the_protocol_switch():
    eager, rendezvous = (2e-6, 1 / 5e9), (10e-6, 1 / 9e9)
    ca, cb, t = _piecewise(SIZES, [eager, rendezvous], [16384])
    reg = cm.fit_regimes(SIZES, ca, cb, t)
    assert len(reg.links) == 2
    assert reg.bounds[0] == pytest.approx(math.sqrt(8192 * 16384))   # between 8 and 16 KiB
    for link, (a, b) in zip(reg.links, [eager, rendezvous]):
        assert link.latency_s == pytest.approx(a, rel=1e-6) and link.beta == pytest.approx(b)
    # every measured point is reproduced by its own regime
    pred = [2 * reg.at(n).latency_s + n * reg.at(n).beta for n in SIZES]
    assert np.allclose(pred, t, rtol=1e-9)


def test_fit_regimes_three_and_the_criterion():
    regs = [(1e-6, 1 / 2e9), (5e-6, 1 / 6e9), (40e-6, 1 / 12e9)]
    ca, cb, t = _piecewise(SIZES, regs, [4096, 1 << 20])
    reg = cm.fit_regimes(SIZES, ca, cb, t)
    assert len(reg.links) == 3
    assert reg.at(2048) is reg.links[0] and reg.at(8192) is reg.links[1]
    assert reg.at(1 << 21) is reg.links[2]
    assert [ln.latency_s for ln in reg.links] == pytest.approx([r[0] for r in regs])
    # capped at two regimes, the best split still separates small from large messages
    two = cm.fit_regimes(SIZES, ca, cb, t, max_regimes=2)
    assert len(two.links) == 2
    # one true regime with 3% noise: no point is off by 10%, it stays whole
    ca, cb, t = _piecewise(SIZES, [(3e-6, 1 / 7e9)], [], noise=0.03)
    one = cm.fit_regimes(SIZES, ca, cb, t)
    assert len(one.links) == 1 and one.bounds == ()
    assert one.links[0].latency_s == pytest.approx(3e-6, rel=0.1)


def test_fit_regimes_a_bump_needs_two_boundaries():
    # a latency bump between 64 B and 4 KiB: no single boundary improves on one regime,
    # two boundaries fit it exactly; the search goes on past the count that did not help
    regs = [(10e-6, 1 / 2e9), (25e-6, 1 / 2e9), (10e-6, 1 / 2e9)]
    ca, cb, t = _piecewise(SIZES, regs, [64, 4096])
    assert len(cm.fit_regimes(SIZES, ca, cb, t, max_regimes=2).links) == 1
    reg = cm.fit_regimes(SIZES, ca, cb, t)
    assert len(reg.links) == 3
    assert [ln.latency_s for ln in reg.links] == pytest.approx([r[0] for r in regs])
    assert reg.bounds == pytest.approx((math.sqrt(32 * 64), math.sqrt(2048 * 4096)))


def test_regimes_lookup_and_validation():
    a, b, c = cm.Link(1e-6, 1e9), cm.Link(2e-6, 2e9), cm.Link(3e-6, 3e9)
    reg = cm.Regimes((a, b, c), (100.0, 1000.0))
    assert [reg.at(x) for x in (0, 99, 100, 999, 1000, 1e9)] == [a, a, b, b, c, c]
    assert cm.Regimes.of(a).links == (a,) and cm.Regimes.of(reg) is reg
    assert reg.as_dicts()[1]["from_bytes"] == 100.0
    with pytest.raises(ValueError, match="bounds"):
        cm.Regimes((a, b), ())
    with pytest.raises(ValueError, match="increase"):
        cm.Regimes((a, b, c), (10.0, 5.0))
    with pytest.raises(ValueError, match="distinct sizes"):
        cm.fit_regimes([8, 8], [1, 1], [1, 1], [1e-6, 1e-6])


def test_network_uses_the_regime_of_each_message():
    small, large = cm.Link(2e-6, 4e9), cm.Link(10e-6, 8e9)
    node = cm.Regimes((small, large), (65536.0,))
    net = cm.Network(node, node, cm.Link(1e-6, 20e9))
    # allreduce: regime by buffer size
    assert net.allreduce(1024, 2, 2) == pytest.approx(2 * 2e-6 + 1024 / 4e9)
    assert net.allreduce(1 << 20, 2, 2) == pytest.approx(2 * 10e-6 + (1 << 20) / 8e9)
    # alltoallv: regime by bytes per peer (m / p): 4 x 32 KiB -> small, 4 x 128 KiB -> large
    assert net.alltoallv(4 * 32768, 4, 4) == pytest.approx(3 * (2e-6 + 32768 / 4e9))
    assert net.alltoallv(4 * 131072, 4, 4) == pytest.approx(3 * (10e-6 + 131072 / 8e9))


def test_parse_net_regimes():
    reg = cm.parse_net_regimes("0:1.3:12,64K:1.5:23")
    assert reg.bounds == (65536,)
    assert reg.links[0].latency_s == pytest.approx(1.3e-6)
    assert reg.links[1].bandwidth_Bps == pytest.approx(23e9)
    with pytest.raises(ValueError, match="start at 0"):
        cm.parse_net_regimes("1K:1:1")
    with pytest.raises(ValueError, match="item 2"):
        cm.parse_net_regimes("0:1:1,oops")


# --------------------------------------------------------------------------- local copy

def test_alltoallv_local_copy_term():
    copy = cm.Link(4e-6, 40e9)
    node = cm.Link(3e-6, 6e9)
    net = cm.Network(node, node, cm.Link(1e-6, 20e9), local_copy=copy)
    m = 8e6
    # one rank: the whole buffer is the block it keeps
    assert net.alltoallv(m, 1, 8) == pytest.approx(4e-6 + m / 40e9)
    # two ranks: half kept (copied), half to the peer
    assert net.alltoallv(m, 2, 8) == pytest.approx(4e-6 + m / 2 / 40e9 + 3e-6 + m / 2 / 6e9)
    # 16 ranks on 2 nodes: 1/16 copied, 7 local peers, 8 remote ones over the node's link
    s = m / 16
    expect = 4e-6 + s / 40e9 + 7 * (3e-6 + s / 6e9) + 8 * 1e-6 + 8 * 8 * s / 20e9
    assert net.alltoallv(m, 16, 8) == pytest.approx(expect)


def test_fit_alpha_beta_with_known_offset():
    ca, cb = [1.0] * 6, [1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    off = [2e-6 + x / 50e9 for x in cb]
    t = [o + 5e-6 + x / 8e9 for o, x in zip(off, cb)]
    a, b = cm.fit_alpha_beta(ca, cb, t, off)
    assert a == pytest.approx(5e-6) and b == pytest.approx(1 / 8e9)


def _alltoallv_doc(p, fn, sizes, cores=2):
    rows = [{"bytes": s, "hpctrain": {"p50": fn(s)}} for s in sizes]
    return {"benchmark": "alltoallv", "world_size": p, "ranks_per_node": p,
            "versions": {"cpu_count": cores, "threads": 1}, "rows": rows}


def test_fit_node_links_separates_local_copy_and_peer_cost():
    a0, bc = 4e-6, 1 / 50e9          # per call, local copy
    a, b = 6e-6, 1 / 6e9             # per peer
    docs = [_alltoallv_doc(1, lambda s: a0 + s * bc, SIZES[:20]),
            _alltoallv_doc(2, lambda s: a0 + s * bc + a + s * b, SIZES[:20])]
    fitted = cm.fit_node_links(docs)
    copy, copy_pts = fitted["local_copy"]
    assert len(copy.links) == 1 and copy.links[0].latency_s == pytest.approx(a0)
    assert copy.links[0].beta == pytest.approx(bc)
    node, pts = fitted["alltoallv"]
    assert len(node.links) == 1 and node.links[0].latency_s == pytest.approx(a)
    assert node.links[0].beta == pytest.approx(b)
    assert len(copy_pts) == 20 and len(pts) == 20
    assert max(abs(pt["rel_error"]) for pt in copy_pts + pts) < 1e-9


# --------------------------------------------------------------------------- sparse compute

def _exchange_doc(p, batch, step_s, alone_s, features=26, dim=16, unique=0.75, cores=2,
                  mode="weak"):
    u = batch * features * unique
    return {"benchmark": "exchange", "world_size": p, "ranks_per_node": p, "scaling_mode": mode,
            "versions": {"cpu_count": cores, "threads": 1},
            "config": {"batch": batch, "features": features},
            "results": [{"dim": dim, "step": {"p50": step_s}, "step_alone": {"p50": alone_s},
                         "exchange_bytes_sent_rank0": 8 * features * p + (8 + 8 * dim) * u}]}


def test_sparse_rates_contention_and_predictions():
    fixed, per_id = 2e-3, 140e-9          # compute of one rank alone on the node
    a_fixed, a_id = 3e-3, 230e-9          # the benchmark's alone column at 1 rank (colder)
    c2 = 1.3                              # two busy ranks slow sparse work by 30%
    node = cm.Link(5e-6, 6e9)
    network = cm.Network(node, node, cm.Link(1e-6, 20e9), local_copy=cm.Link(4e-6, 40e9))

    def comm(p, batch):
        run = {"ranks": p, "ranks_per_node": p, "features": 26, "dim": 16,
               "unique": batch * 26 * 0.75}
        return cm.exchange_comm(network, run)

    def doc(p, batch, c, mode):
        ids = batch * 26
        return _exchange_doc(p, batch, (fixed + per_id * ids) * c + comm(p, batch),
                             (a_fixed + a_id * ids) * c, mode=mode)
    docs = [doc(1, 2048, 1.0, "weak"), doc(1, 8192, 1.0, "strong"), doc(2, 2048, c2, "weak"),
            doc(2, 4096, c2, "strong")]
    rates, kappa, points = cm.sparse_rates_and_points(docs, network)
    assert rates[16] == pytest.approx((fixed, per_id))
    assert kappa == pytest.approx(c2 - 1)
    assert len(points) == 4 and max(abs(pt["rel_error"]) for pt in points) < 1e-9
    assert [pt["calibration"] for pt in points] == [True, True, False, False]
    assert [pt["contention"] for pt in points] == pytest.approx([1, 1, c2, c2])
    # the unique fraction is read back from the bytes sent
    assert cm.unique_fraction(docs) == pytest.approx(0.75)


def test_contention_factor_in_the_step():
    rates = cm.ComputeRates(s_per_flop=1e-10, s_per_id=100e-9, s_fixed=1e-3, threads=1,
                            contention_per_rank=0.2)
    assert [rates.contention(r) for r in (0, 1, 2, 5)] == pytest.approx([1, 1, 1.2, 1.8])
    w = cm.Workload()
    dense = 1000 * w.flops_per_sample * 1e-10
    sparse = 1e-3 + 1000 * w.ids_per_sample * 100e-9
    assert rates.step(w, 1000, 4) == pytest.approx(dense + 1.6 * sparse)
    model = cm.CostModel(_network(), rates, ranks_per_node=4, cores_per_node=4)
    # the node's sparse throughput r / c(r) saturates at 1 / kappa = 5 ranks' worth
    assert model.step(w, 8, 1000)["compute"] == pytest.approx(dense + 1.6 * sparse)
    assert model.step(w, 1, 1000)["compute"] == pytest.approx(dense + sparse)


def test_shared_window_exchange_inside_the_node():
    copy, node, remote = cm.Link(4e-6, 40e9), cm.Link(5e-6, 6e9), cm.Link(1e-6, 20e9)
    net = cm.Network(node, node, remote, local_copy=copy)
    nb = cm.sparse_exchange_bytes(26, 16, 2, 1000)
    assert nb == {"counts": 416.0, "ids": 8000.0, "rows": 64000.0, "grads": 64000.0}

    def a2a(m, p, r):
        s = m / p
        return 4e-6 + s / 40e9 + (r - 1) * (5e-6 + s / 6e9)
    plain = sum(a2a(m, 2, 2) for m in nb.values())
    assert cm.sparse_exchange_time(net, nb, 2, 2) == pytest.approx(plain)
    # shm on one node: counts and ids posted on the board (one synchronisation), rows and
    # grads only synchronise
    assert cm.sparse_exchange_time(net, nb, 2, 2, "shm") == pytest.approx(3 * 5e-6)
    # shm over two nodes: counts and ids by Alltoallv, rows and grads cross the network only
    nb4 = cm.sparse_exchange_bytes(26, 16, 4, 1000)
    a2a4 = sum(4e-6 + m / 4 / 40e9 + (5e-6 + m / 4 / 6e9) + 2 * 1e-6 + 2 * 2 * m / 4 / 20e9
               for k, m in nb4.items() if k in ("counts", "ids"))
    rows4 = sum(5e-6 + 2 * 1e-6 + 2 * 2 * m / 4 / 20e9
                for k, m in nb4.items() if k in ("rows", "grads"))
    assert cm.sparse_exchange_time(net, nb4, 4, 2, "shm") == pytest.approx(a2a4 + rows4)
    # across nodes the rows still travel: 16 ranks, 8 per node
    s = 64000 / 16
    assert net.alltoallv(64000, 16, 8, node_shm=True) == pytest.approx(
        7 * 5e-6 + 8 * 1e-6 + 8 * 8 * s / 20e9)
    with pytest.raises(ValueError, match="node_exchange"):
        cm.sparse_exchange_time(net, nb, 2, 2, "rdma")


def test_exchange_runs_in_both_modes():
    doc = _exchange_doc(2, 2048, 0.010, 0.012)
    doc["results"][0].update(exchange="shm", step_alltoallv={"p50": 0.011})
    runs = cm.exchange_runs([doc])
    assert [(r["node_exchange"], r["step"], r["primary"]) for r in runs] == [
        ("shm", 0.010, True), ("alltoallv", 0.011, False)]
    assert runs[0]["unique"] == pytest.approx(2048 * 26 * 0.75)


# --------------------------------------------------------------------------- reader load

def _train_doc(p, step_s, share=None, batch=2048):
    res = {"dim": 16, "bag": 1, "global_batch": batch, "median_step_s": step_s}
    if share is not None:
        res["reader_busy_share"] = share
    return {"benchmark": "train", "world_size": p, "ranks_per_node": p,
            "versions": {"threads": 1, "cpu_count": 2}, "results": [res]}


def test_reader_load_is_read_from_the_calibration_run():
    docs = [_train_doc(1, 0.080, 0.08), _train_doc(1, 0.082, 0.12), _train_doc(2, 0.090, 0.9)]
    share, src = cm.train_data_threads(docs)
    assert share == pytest.approx(0.10) and "2 1-rank train run(s)" in src   # 2-rank run unused
    share, src = cm.train_data_threads([_train_doc(1, 0.080), _train_doc(2, 0.090)])
    assert share == cm.TRAIN_DATA_THREADS and "not measured" in src


def test_reader_load_sets_the_oversubscription_of_the_train_step():
    net, rates = _network(), cm.ComputeRates(s_per_flop=1e-10, s_per_id=100e-9, s_fixed=1e-3)
    docs = [_train_doc(1, 0.080, 0.1), _train_doc(2, 0.090, 0.3)]
    _, pts = cm.train_rates_and_points(docs, net, rates, 1.0)
    assert pts[0]["calibration"] and pts[0]["predicted_s"] == pytest.approx(0.080)
    # 2 ranks on 2 cores, 1 compute thread + 0.1 of a core reading: 2 (1 + 0.1) / 2 = 1.1
    fitted, _ = cm.train_rates_and_points(docs, net, rates, 1.0, data_threads=0.1)
    w = cm.train_workload(docs[1]["results"][0], 1.0)
    model = cm.CostModel(net, fitted, 2, 2, 0.1, "shm")
    assert model.oversubscription(2) == pytest.approx(1.1)
    t = model.step(w, 2, 1024)
    assert t["compute"] == pytest.approx(fitted.step(w, 1024, 2) * 1.1)
    assert pts[1]["predicted_s"] == pytest.approx(t["step"])
    # the old constant (a fully busy thread) doubles the compute instead
    old = [dict(d, results=[{k: v for k, v in d["results"][0].items()
                             if k != "reader_busy_share"}]) for d in docs]
    _, pts_old = cm.train_rates_and_points(old, net, rates, 1.0)
    comm = t["allreduce"] + t["alltoallv"]
    assert (pts_old[1]["predicted_s"] - comm) == pytest.approx(
        (pts[1]["predicted_s"] - comm) * 2.0 / 1.1)


def test_dense_contention_factor_in_the_step():
    rates = cm.ComputeRates(s_per_flop=1e-10, s_per_id=100e-9, s_fixed=1e-3, threads=1,
                            contention_per_rank=0.2, dense_contention_per_rank=0.5)
    assert [rates.dense_contention(r) for r in (1, 2, 3)] == pytest.approx([1, 1.5, 2.0])
    w = cm.Workload()
    dense = 1000 * w.flops_per_sample * 1e-10
    sparse = 1e-3 + 1000 * w.ids_per_sample * 100e-9
    assert rates.step(w, 1000, 1) == pytest.approx(dense + sparse)
    assert rates.step(w, 1000, 2) == pytest.approx(1.5 * dense + 1.2 * sparse)
    # a run's measured factor replaces kappa_d's
    assert rates.step(w, 1000, 2, dense_contention=1.8) == pytest.approx(1.8 * dense + 1.2 * sparse)
    model = cm.CostModel(_network(), rates, ranks_per_node=2, cores_per_node=2)
    assert model.step(w, 2, 1000)["compute"] == pytest.approx(1.5 * dense + 1.2 * sparse)
    assert model.step(w, 2, 1000, 1.8)["compute"] == pytest.approx(1.8 * dense + 1.2 * sparse)


def test_dense_contention_is_measured_by_the_bare_products_of_each_train_run():
    def doc(p, step_s, gemm_s, batch, machine=None):
        d = _train_doc(p, step_s, 0.0, batch)
        d["results"][0]["bare_gemm_s"] = gemm_s
        d["ranks_per_node"] = 1
        d["ranks_per_machine"] = machine or p
        return d
    # 1 rank: 10 us per sample of bare products (the mean of 9 and 11); 2 emulated nodes on
    # one 2-core machine, weak (2048 per rank) and strong (1024 per rank), their slowest
    # rank's products 1.6x and 1.4x slower per sample; 4 ranks on 2 cores: 2 x 1.5
    docs = [doc(1, 0.080, 9e-6 * 2048, 2048), doc(1, 0.080, 11e-6 * 2048, 2048),
            doc(2, 0.150, 1.6e-5 * 2048, 4096), doc(2, 0.100, 1.4e-5 * 1024, 2048),
            doc(4, 0.300, 3e-5 * 2048, 8192)]
    c, kappa = cm.dense_contention(docs)
    assert [c[id(d)] for d in docs] == pytest.approx([None, None, 1.6, 1.4, 1.5])
    assert kappa == pytest.approx(0.5)                     # the 2-rank runs only
    net, rates = _network(), cm.ComputeRates(s_per_flop=1e-10, s_per_id=100e-9, s_fixed=1e-3)
    fitted, pts = cm.train_rates_and_points(docs, net, rates, 1.0, data_threads=0.0)
    assert fitted.dense_contention_per_rank == pytest.approx(0.5)
    for d, pt, cd in zip(docs[2:], pts[2:], (1.6, 1.4, 1.5)):
        p, res = d["world_size"], d["results"][0]
        model = cm.CostModel(net, fitted, 1, 2, 0.0, "shm", p)
        w = cm.train_workload(res, 1.0)
        assert pt["predicted_s"] == pytest.approx(model.step(w, p, res["global_batch"] / p,
                                                             cd)["step"])
        assert pt["dense_contention"] == pytest.approx(cd)
        # the dense work is slowed by the run's own factor, the sparse work by kappa's
        flat = model.step(w, p, res["global_batch"] / p, 1.0)["compute"]
        dense = res["global_batch"] / p * w.flops_per_sample * fitted.s_per_flop
        assert model.step(w, p, res["global_batch"] / p, cd)["compute"] == pytest.approx(
            flat + (cd - 1) * dense * model.oversubscription(p))
    # runs without the bare products: no dense contention, as before
    plain = [_train_doc(1, 0.080, 0.0), _train_doc(2, 0.090, 0.0)]
    fitted, pts = cm.train_rates_and_points(plain, net, rates, 1.0)
    assert fitted.dense_contention_per_rank == 0.0 and pts[1]["dense_contention"] is None


def test_data_threads_option_takes_a_share(tmp_path, capsys):
    import json
    for i, d in enumerate([_train_doc(1, 0.080, 0.25), _train_doc(2, 0.090, 0.3)]):
        (tmp_path / f"train-{i}.json").write_text(json.dumps(d))
    out = tmp_path / "model.json"
    args = ["--results", str(tmp_path), "--ranks-per-node", "8", "--cores-per-node", "8",
            "--max-ranks", "8", "--json", str(out)]
    assert cm.main(args) == 0
    model = json.loads(out.read_text())
    assert model["data_threads"]["share"] == pytest.approx(0.25)
    assert "reader load: 0.250 of a core per rank (measured" in capsys.readouterr().out
    # 8 ranks on 8 cores, each 1 + 0.25 busy: compute x 1.25 against 4 ranks (factor 1)
    c = {r["ranks"]: r["compute_s"] for r in model["prediction"]}
    assert c[8] / c[4] == pytest.approx(1.25)
    assert cm.main(args + ["--data-threads", "0.5"]) == 0
    c = {r["ranks"]: r["compute_s"] for r in json.loads(out.read_text())["prediction"]}
    assert c[8] / c[4] == pytest.approx(1.5)
    with pytest.raises(SystemExit):
        cm.parse_args(["--data-threads", "1.5"])
    assert "share of a core in [0, 1]" in capsys.readouterr().err


def _multinode_doc(kind, p, r, sizes, seconds, machine=None, cores=64):
    doc = {"benchmark": kind, "world_size": p, "nodes": p // r, "ranks_per_node": r,
           "versions": {"cpu_count": cores, "threads": 1},
           "rows": [{"bytes": s, "hpctrain": {"p50": t}} for s, t in zip(sizes, seconds)]}
    if machine is not None:
        doc["ranks_per_machine"] = machine
    return doc


def test_alltoallv_net_terms_closed_form():
    # 4 nodes x 8: 24 messages off the node, the node's link carries 8 * 24 blocks of m / 32
    assert cm.alltoallv_net_terms(3200, 32, 8) == (24.0, 8 * 24 * 100.0)
    assert cm.alltoallv_net_terms(3200, 8, 8) == (0.0, 0.0)


@pytest.mark.parametrize("per_node", [1, 2])
def test_fit_net_links_recovers_the_inter_node_link(per_node):
    node = cm.Link(1e-6, 10e9)
    copy = cm.Regimes.of(cm.Link(3e-6, 50e9))
    truth = cm.Network(node, node, cm.Link(40e-6, 0.12e9), copy, cm.Link(60e-6, 0.1e9))
    sizes = [2 ** k for k in range(6, 21)]
    docs = []
    for nodes in (2, 4):
        p = nodes * per_node
        for kind, cost in (("alltoallv", truth.alltoallv), ("allreduce", truth.allreduce)):
            sent = [s * p if kind == "alltoallv" else s for s in sizes]
            docs.append(_multinode_doc(kind, p, per_node, sizes,
                                       [cost(m, p, per_node) for m in sent]))
    intra = cm.Network(node, node, None, copy)
    nets = cm.fit_net_links(docs, intra)
    for kind, link in (("alltoallv", truth.net.links[0]),
                       ("allreduce", truth.allreduce_net.links[0])):
        assert isinstance(nets[kind], cm.ByNodes)       # fitted at each node count
        assert [n for n, _ in nets[kind].regimes] == [2, 4]
        for _, reg in nets[kind].regimes:
            assert len(reg.links) == 1
            got = reg.links[0]
            assert got.latency_s == pytest.approx(link.latency_s, rel=1e-6)
            assert got.bandwidth_Bps == pytest.approx(link.bandwidth_Bps, rel=1e-6)
    network = cm.Network(node, node, nets["alltoallv"], copy, nets["allreduce"])
    pts = cm.net_points(docs, network)
    assert len(pts) == 2 * 2 * len(sizes) and all(pt["nodes"] > 1 for pt in pts)
    assert max(abs(pt["rel_error"]) for pt in pts) < 1e-6
    # one-node fits leave multi-node runs alone
    assert cm.fit_node_links(docs)["alltoallv"] == (None, [])


def test_fit_net_links_per_node_count():
    """The link over 4 nodes is fitted from the 4-node runs, even oversubscribed ones when
    there is nothing else; a count with runs of ranks <= cores fits only those."""
    node = cm.Link(1e-6, 10e9)
    copy = cm.Regimes.of(cm.Link(3e-6, 50e9))
    two = cm.Network(node, node, cm.Link(12e-6, 1.3e9), copy, cm.Link(10e-6, 1.5e9))
    four = cm.Network(node, node, cm.Link(30e-6, 0.5e9), copy, cm.Link(28e-6, 0.7e9))
    sizes = [2 ** k for k in range(6, 21)]
    docs = []
    for nodes, truth, machine in ((2, two, 2), (4, four, 4)):
        for kind in ("alltoallv", "allreduce"):
            cost = truth.alltoallv if kind == "alltoallv" else truth.allreduce
            sent = [s * nodes if kind == "alltoallv" else s for s in sizes]
            docs.append(_multinode_doc(kind, nodes, 1, sizes, [cost(m, nodes, 1) for m in sent],
                                       machine=machine, cores=2))
    # 2 nodes x 2 ranks on the same 2 cores, far off the link: left out of the 2-node fit
    docs.append(_multinode_doc("alltoallv", 4, 2, sizes, [1.0] * len(sizes), machine=4, cores=2))
    nets = cm.fit_net_links(docs, cm.Network(node, node, None, copy))
    for kind, want in (("alltoallv", (two.net, four.net)),
                       ("allreduce", (two.allreduce_net, four.allreduce_net))):
        by = nets[kind]
        assert [n for n, _ in by.regimes] == [2, 4]
        for (_, reg), truth in zip(by.regimes, want):
            assert reg.links[0].latency_s == pytest.approx(truth.links[0].latency_s, rel=1e-6)
            assert reg.links[0].bandwidth_Bps == pytest.approx(truth.links[0].bandwidth_Bps,
                                                               rel=1e-6)
        assert "ranks > cores" in by.regimes[1][1].links[0].description
        assert "ranks > cores" not in by.regimes[0][1].links[0].description
        # unmeasured counts: the largest measured below, else the smallest
        assert by.at_nodes(3) is by.regimes[0][1] and by.at_nodes(8) is by.regimes[1][1]
        assert by.at_nodes(1) is by.regimes[0][1]
        assert set(by.as_dicts()) == {"2", "4"}
    network = cm.Network(node, node, nets["alltoallv"], copy, nets["allreduce"])
    pts = [pt for pt in cm.net_points(docs, network) if pt["ranks"] == pt["nodes"]]
    assert len(pts) == 2 * 2 * len(sizes)
    assert max(abs(pt["rel_error"]) for pt in pts) < 1e-6
    with pytest.raises(ValueError, match="increase"):
        cm.ByNodes(((4, two.net), (2, four.net)))


def test_emulated_nodes_share_the_machine():
    """Nodes emulated on one machine (ranks_per_machine) oversubscribe its cores together."""
    one_per_node = _multinode_doc("alltoallv", 4, 1, [64], [1e-5], machine=4, cores=2)
    assert cm.ranks_per_machine(one_per_node) == 4 and cm.oversubscribed(one_per_node)
    two = _multinode_doc("alltoallv", 2, 1, [64], [1e-5], machine=2, cores=2)
    assert not cm.oversubscribed(two)
    real = _multinode_doc("alltoallv", 4, 1, [64], [1e-5], cores=2)   # one machine per node
    assert cm.ranks_per_machine(real) == 1 and not cm.oversubscribed(real)
    rates = cm.ComputeRates(s_per_flop=1e-10, s_per_id=1e-7, s_fixed=1e-3,
                            contention_per_rank=0.1)
    link = cm.Link(1e-6, 10e9)
    model = cm.CostModel(cm.Network(link, link, link), rates, ranks_per_node=1, cores_per_node=2,
                         ranks_per_machine=4)
    alone = cm.CostModel(cm.Network(link, link, link), rates, ranks_per_node=1, cores_per_node=2)
    w = cm.Workload()
    # 4 ranks on one 2-core machine: contention of 4 busy ranks and a factor 2
    assert model.step(w, 4, 1024)["compute"] == pytest.approx(
        rates.step(w, 1024, 4) * 2.0)
    assert alone.step(w, 4, 1024)["compute"] == pytest.approx(rates.step(w, 1024, 1))


# ----------------------------------------------------------------------------- hybrid step
def _rates():
    return cm.HybridRates(rtt_fixed_s=2e-3, rtt_per_id_s=100e-9, dense_rtt_s=3e-3,
                          apply_s=8e-3, server_cpu_s=12e-3)


def test_hybrid_step_bsp_waits_for_the_apply_and_the_round_trip():
    r = _rates()
    t = cm.hybrid_step(r, 0.050, ids=20_000, staleness=0)
    # R(20k) = 2 ms + 2 ms = 4 ms > D = 3 ms
    assert t["blocked"] == pytest.approx(8e-3 + 4e-3)
    assert t["step"] == pytest.approx(0.062)


def test_hybrid_bsp_clock_waits_for_the_slowest_worker():
    r = _rates()
    from hpctrain.bench.costmodel.hybrid import expected_max_normal
    assert expected_max_normal(1) == 0 and expected_max_normal(2) == pytest.approx(0.5642)
    rng = np.random.default_rng(0)
    for n in (4, 16, 100):
        sim = rng.standard_normal((50_000, n)).max(axis=1).mean()
        assert expected_max_normal(n) == pytest.approx(sim, rel=0.1)
    t = cm.hybrid_step(r, 0.050, 20_000, 0, workers=4, compute_std_s=0.004)
    assert t["imbalance"] == pytest.approx(1.0294 * 0.004)
    assert t["step"] == pytest.approx(0.062 + 1.0294 * 0.004)
    assert cm.hybrid_step(r, 0.050, 20_000, 1, workers=4, compute_std_s=0.004)["imbalance"] == 0


def test_hybrid_step_prefetch_hides_the_round_trip_behind_compute():
    r = _rates()
    for s in (1, 2, None):                                     # SSP and ASP
        t = cm.hybrid_step(r, 0.050, ids=20_000, staleness=s)
        assert t["blocked"] == 0 and t["step"] == pytest.approx(0.050)
    # compute shorter than the round trip: the rest of it shows; a slow server bounds it
    assert cm.hybrid_step(r, 0.001, ids=20_000, staleness=1)["step"] == pytest.approx(12e-3)
    assert cm.hybrid_step(r, 0.003, ids=100_000, staleness=1)["step"] == pytest.approx(12e-3)
    slow = dataclasses.replace(r, server_cpu_s=0.080)
    assert cm.hybrid_step(slow, 0.050, ids=20_000, staleness=2)["step"] == pytest.approx(0.080)


def test_hybrid_step_shares_cores_when_ranks_outnumber_them():
    r = _rates()
    t = cm.hybrid_step(r, 0.050, ids=20_000, staleness=2, workers=2, servers=1, cores=2)
    assert t["shared"] == pytest.approx((2 * 0.050 + 0.012) / 2)
    assert t["step"] == pytest.approx(0.056)
    assert cm.hybrid_step(r, 0.050, 20_000, 2, workers=2, servers=1, cores=3)["shared"] == 0


def test_hybrid_step_stragglers():
    r = _rates()
    base = {s: cm.hybrid_step(r, 0.050, 20_000, s)["step"] for s in (0, 2)}
    tr = ("transient", 0.050, 0.3)
    assert cm.hybrid_step(r, 0.050, 20_000, 0, groups=2, straggler=tr)["step"] == \
        pytest.approx(base[0] + 0.3 * 0.050)                      # BSP: every delay waits
    assert cm.hybrid_step(r, 0.050, 20_000, 2, groups=2, straggler=tr)["step"] == \
        pytest.approx(base[2] + 0.3 * 0.050 / 2)                  # SSP: a group's own share
    pers = ("persistent", 0.025, None)
    for s in (0, 2):
        assert cm.hybrid_step(r, 0.050, 20_000, s, groups=2, straggler=pers)["step"] == \
            pytest.approx(base[s] + 0.025)                         # capped whatever s
    with pytest.raises(ValueError, match="straggler kind"):
        cm.hybrid_step(r, 0.05, 1, 0, straggler=("often", 0.1, 0.5))


def test_pull_round_trip_over_a_network():
    r, link = _rates(), cm.INTERCONNECTS["ib_hdr"]
    got = cm.pull_rtt_over(link, 10_000, 16, r)
    assert got == pytest.approx(r.pull_rtt(10_000) + 2 * link.latency_s
                                + 10_000 * 72 / link.bandwidth_Bps)


def _hybrid_doc():
    r = _rates()
    sizes = [1000, 4000, 16000, 64000]
    rtt = {"sparse": [{"ids": n, "p50_s": r.pull_rtt(n)} for n in sizes],
           "dense": {"p50_s": r.dense_rtt_s}}

    def case(name, cons, s, step, compute, straggler=None, g=2):
        return {"case": name, "mode": "hybrid", "groups": g, "workers": 2, "servers": 1,
                "consistency": cons, "staleness": s, "global_batch": 1000,
                "samples_per_s": 1000 / step, "compute_s_per_step": compute,
                "ids_per_pull": 20_000, "apply_ms_p50": 8.0, "apply_ms_per_clock": 9.0,
                "server_cpu_ms_per_clock": 12.0, "straggler": straggler}
    thr = [case("G2-bsp", "bsp", 0, 0.062, 0.050), case("G2-ssp2", "ssp", 2, 0.050, 0.049),
           {"case": "collective-W", "mode": "collective"}]
    st = [case("none-bsp", "bsp", 0, 0.062, 0.050),
          case("transient-bsp", "bsp", 0, 0.062 + 0.3 * 0.062, 0.06,
               {"kind": "transient", "delay_s": 0.062, "p": 0.3})]
    return {"layout": {"ranks": 3, "cores": 8}, "pull_rtt": rtt, "throughput": thr,
            "stragglers": st}


def test_fit_hybrid_and_points_from_a_bench_hybrid_document():
    doc = _hybrid_doc()
    r = cm.fit_hybrid(doc)
    assert r.rtt_fixed_s == pytest.approx(2e-3, rel=1e-6)
    assert r.rtt_per_id_s == pytest.approx(100e-9, rel=1e-6)
    assert (r.dense_rtt_s, r.apply_s, r.server_cpu_s) == pytest.approx((3e-3, 8e-3, 12e-3))
    pts = {p["case"]: p for p in cm.hybrid_points(doc, r)}
    assert set(pts) == {"G2-bsp", "G2-ssp2", "none-bsp", "transient-bsp"}
    assert pts["G2-bsp"]["calibration"] and not pts["G2-ssp2"]["calibration"]
    for name in ("G2-bsp", "G2-ssp2", "none-bsp", "transient-bsp"):
        assert abs(pts[name]["rel_error"]) < 1e-6, (name, pts[name])
    with pytest.raises(ValueError, match="round trip"):
        cm.fit_hybrid({"pull_rtt": {"sparse": []}})
