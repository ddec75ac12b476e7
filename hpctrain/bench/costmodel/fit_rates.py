"""Fitting compute: rates of the dense and sparse work from the step benchmarks.

The dense benchmark gives seconds per FLOP, the exchange benchmark the sparse fixed cost,
seconds per id and the memory contention of busy ranks, the 1-rank train run calibrates
both on the end-to-end step and measures the reader's load. Every run is also predicted,
so that the report can show the model against each measured point.
"""
import dataclasses

import numpy as np

from hpctrain.bench.costmodel.fit_links import fit_alpha_beta, oversubscribed, ranks_per_machine
from hpctrain.bench.costmodel.model import (ComputeRates, CostModel, Workload,
                                            sparse_exchange_bytes, sparse_exchange_time)


def _oversub(doc):
    """Compute slow-down of a run that put more rank-threads on a machine than it has cores."""
    v = doc.get("versions") or {}
    cores, threads = v.get("cpu_count") or 0, v.get("threads") or 1
    return max(1.0, ranks_per_machine(doc) * threads / cores) if cores else 1.0


def _point(doc, kind, measured, predicted, calibration=False):
    return {"benchmark": kind, "ranks": doc["world_size"], "nodes": doc.get("nodes", 1),
            "mode": doc.get("scaling_mode") or "",
            "measured_s": measured, "predicted_s": predicted,
            "rel_error": (predicted - measured) / measured, "oversubscribed": oversubscribed(doc),
            "calibration": calibration}


def dense_rate_and_points(docs, network):
    """Seconds per FLOP from the 1-rank dense benchmark runs, and every dense run predicted.

    A dense step is compute (its FLOPs at the 1-rank rate, times the oversubscription
    factor) plus one allreduce of the gradient buffer.
    """
    runs = [d for d in docs if d.get("benchmark") == "dense" and d.get("rows")]
    ones = [d for d in runs if d["world_size"] == 1]
    if not ones:
        return None, []
    rates = [(d["rows"][0]["step"]["p50"] - d["rows"][0]["phases_mean"].get("allreduce", 0.0))
             / d["rows"][0]["flops"] / _oversub(d) for d in ones]
    s_per_flop = float(np.mean(rates))
    points = []
    for d in runs:
        row = d["rows"][0]
        r = d.get("ranks_per_node", d["world_size"])
        pred = (row["flops"] * s_per_flop * _oversub(d)
                + network.allreduce(row["grad_bytes"], d["world_size"], r))
        points.append(_point(d, "dense", row["step"]["p50"], pred))
    return s_per_flop, points


def exchange_runs(docs):
    """One dict per (exchange benchmark run, width, step kind): ranks, ids, unique ids, times.

    ``node_exchange`` is the mode of the timed step ("alltoallv" or "shm"); a result that
    also timed the same step with every exchange by Alltoallv (``step_alltoallv``) gives a
    second run. The unique ids per rank and step come from the bytes rank 0 sent in the
    all-Alltoallv step: ``8 F p + (8 + 8 dim) u`` (counts, ids, rows and gradients).
    """
    runs = []
    for d in docs:
        if d.get("benchmark") != "exchange":
            continue
        c, p = d["config"], int(d["world_size"])
        for res in d.get("results") or []:
            dim, f = int(res["dim"]), int(c["features"])
            base = {"doc": d, "ranks": p, "ranks_per_node": int(d.get("ranks_per_node", p)),
                    "busy": min(p, ranks_per_machine(d)),
                    "dim": dim, "features": f, "ids": float(c["batch"] * f),
                    "unique": (res["exchange_bytes_sent_rank0"] - 8.0 * f * p) / (8 + 8 * dim),
                    "alone": (res.get("step_alone") or {}).get("p50"),
                    "oversubscribed": oversubscribed(d)}
            runs.append(dict(base, step=float(res["step"]["p50"]), primary=True,
                             node_exchange=res.get("exchange") or "alltoallv"))
            if res.get("step_alltoallv") and res.get("exchange") not in (None, "alltoallv"):
                runs.append(dict(base, step=float(res["step_alltoallv"]["p50"]), primary=False,
                                 node_exchange="alltoallv"))
    return runs


def exchange_comm(network, run):
    """Modelled seconds of the four exchanges of one exchange-benchmark step."""
    nbytes = sparse_exchange_bytes(run["features"], run["dim"], run["ranks"], run["unique"])
    return sparse_exchange_time(network, nbytes, run["ranks"], run["ranks_per_node"],
                                run.get("node_exchange", "alltoallv"))


def _fixed_and_per_id(runs, seconds):
    """(fixed seconds, seconds per id) of ``seconds[i]`` over ``runs`` (least squares)."""
    ids = [r["ids"] for r in runs]
    if len(set(ids)) >= 2:
        return fit_alpha_beta(np.ones(len(runs)), ids, seconds)
    return 0.0, float(np.mean(np.asarray(seconds) / np.asarray(ids)))


def sparse_rates_and_points(docs, network):
    """Sparse compute rates and contention from the exchange runs; every run predicted.

    A sparse step on ``p`` ranks is ``T1(b) c + exchanges``:

    * ``T1(b) = fixed + ids x s_per_id`` is the compute of one rank alone on the node,
      fitted on the 1-rank steps less their modelled exchanges (local copies): these are
      calibration points, like the 1-rank train step;
    * ``c = alone(r) / A1(b)`` is the memory contention measured by the benchmark's
      ``alone`` column (every rank stepping in a world of one, all ranks at once), against
      ``A1``, the same fixed + per-id form fitted on the 1-rank alone times; without an
      ``alone`` column, the oversubscription factor;
    * the exchanges are the four alltoallv of :func:`sparse_exchange_bytes`.

    Each exchange mode (Alltoallv, shared window) is fitted on its own 1-rank steps.

    Returns:
        (dict dim -> (fixed s, s per id) of the shared-window mode where measured, else of
        Alltoallv; kappa of ComputeRates.contention; points).
    """
    runs = exchange_runs(docs)
    rates, points, kappas = {}, [], []
    for dim, mode in sorted({(r["dim"], r["node_exchange"]) for r in runs}):
        # each exchange mode has its own compute (packing, copies): its own 1-rank rates
        group = [r for r in runs if r["dim"] == dim and r["node_exchange"] == mode]
        ones = [r for r in group if r["ranks"] == 1 and not r["oversubscribed"]]
        if not ones:
            continue
        rate = _fixed_and_per_id(ones, [r["step"] - exchange_comm(network, r) for r in ones])
        if mode == "shm" or dim not in rates:
            rates[dim] = rate
        alone1 = None
        if all(r["alone"] for r in ones):
            alone1 = _fixed_and_per_id(ones, [r["alone"] for r in ones])
        for r in group:
            fixed, per_id = rate
            if alone1 is not None and r["alone"]:
                c = r["alone"] / (alone1[0] + alone1[1] * r["ids"])
            else:
                c = _oversub(r["doc"])
            r["contention"] = c
            if r["busy"] > 1 and not r["oversubscribed"] and r["primary"]:
                # busy ranks: those sharing the machine's memory (emulated nodes too)
                kappas.append((c - 1.0) / (r["busy"] - 1))
            pred = (fixed + per_id * r["ids"]) * c + exchange_comm(network, r)
            kind = "exchange" if r["node_exchange"] == "alltoallv" else "exchange-shm"
            pt = _point(r["doc"], kind, r["step"], pred, calibration=r["ranks"] == 1)
            pt.update(dim=dim, contention=c, node_exchange=r["node_exchange"])
            points.append(pt)
    kappa = max(float(np.mean(kappas)), 0.0) if kappas else 0.0
    return rates, kappa, points


def unique_fraction(docs):
    """Unique ids / ids per rank and step, from the bytes the exchange benchmark moved."""
    fr = [r["unique"] / r["ids"] for r in exchange_runs(docs)]
    return float(np.median(fr)) if fr else None


#: The reader's load when no train run measured it: its prefetch thread fully busy.
TRAIN_DATA_THREADS = 1.0


def train_data_threads(docs):
    """The reader's busy share of a core per rank, from the 1-rank (calibration) train runs.

    The mean ``reader_busy_share`` of the 1-rank train runs (CPU seconds of the prefetch
    thread over the wall seconds of the fit); :data:`TRAIN_DATA_THREADS` when none
    recorded it (train results from before the reader measured its load).

    Returns:
        (share, where it comes from: a line for the report).
    """
    shares = [float(d["results"][0]["reader_busy_share"]) for d in docs
              if d.get("benchmark") == "train" and d.get("world_size") == 1 and d.get("results")
              and d["results"][0].get("reader_busy_share") is not None]
    if not shares:
        return TRAIN_DATA_THREADS, (f"not measured (no 1-rank train run with "
                                    f"reader_busy_share): {TRAIN_DATA_THREADS:g}, a fully busy "
                                    f"prefetch thread")
    return float(np.mean(shares)), (f"measured by {len(shares)} 1-rank train run(s), "
                                    f"reader_busy_share")


def _threads(doc):
    return (doc.get("versions") or {}).get("threads") or 1


def _cores(doc):
    return (doc.get("versions") or {}).get("cpu_count") or doc.get("ranks_per_node", 1)


def train_workload(res, u):
    """The train benchmark's DLRM (26 one-table features, 13 dense, 512-256-64 / 512-256-1)."""
    return Workload(13, 26, float(res.get("bag", 1)), int(res["dim"]), (512, 256, 64),
                    (512, 256, 1), u)


def dense_contention(runs):
    """Measured dense contention of each train run, and ``kappa_d`` of ComputeRates.

    The train benchmark times the dense step's bare matrix products in the same run, on
    every rank at once between barriers, the slowest rank's time per repetition
    (``bare_gemm_s``). Per sample against the 1-rank runs' mean, that is a run's ``c_d``:
    the contention of its busy ranks on the dense work and the wait for the slowest of
    them, as the exchange benchmark's ``alone`` column is for the sparse work. A 1-rank
    run has ``c_d = 1`` (their spread is the calibration's to average); an oversubscribed
    run's is divided by its rank-threads over cores, which the model applies on its own.
    ``kappa_d`` is the mean ``(c_d - 1) / (r - 1)`` of the runs with ``r > 1`` busy ranks
    and no more rank-threads than cores (0 without them).

    Returns:
        (dict id(run) -> c_d, or None where not measured; kappa_d).
    """
    def per_sample(d):
        res = d["results"][0]
        g = res.get("bare_gemm_s")
        return g / (res["global_batch"] / d["world_size"]) if g else None

    ref = [per_sample(d) for d in runs if d["world_size"] == 1 and per_sample(d)]
    if not ref:
        return {id(d): None for d in runs}, 0.0
    ref = float(np.mean(ref))
    c = {id(d): (None if d["world_size"] == 1 or not per_sample(d)
                 else per_sample(d) / ref / _oversub(d)) for d in runs}
    kappas = [(c[id(d)] - 1.0) / (min(d["world_size"], ranks_per_machine(d)) - 1)
              for d in runs if c[id(d)] is not None and not oversubscribed(d)
              and min(d["world_size"], ranks_per_machine(d)) > 1]
    return c, max(float(np.mean(kappas)), 0.0) if kappas else 0.0


def train_rates_and_points(docs, network, rates, u, node_exchange="shm", data_threads=None):
    """Calibrate ``rates`` on the 1-rank train runs; predict every train run.

    The split between dense FLOPs and sparse ids keeps the ratio the dense and
    exchange benchmarks measured; both are scaled so the 1-rank DLRM step is exact.
    ``data_threads`` is the reader's load per rank (default: :func:`train_data_threads`).
    The dense work of each run is slowed by its measured contention ``c_d``
    (:func:`dense_contention`; 1 on the 1-rank runs the calibration solves with), and
    ``rates.dense_contention_per_rank`` becomes
    ``kappa_d`` for predictions of runs not measured.
    """
    if data_threads is None:
        data_threads = train_data_threads(docs)[0]
    runs = [d for d in docs if d.get("benchmark") == "train" and d.get("results")]
    ones = [d for d in runs if d["world_size"] == 1]
    if not ones:
        return rates, []
    c_d, kappa_d = dense_contention(runs)
    scale = []
    for d in ones:
        res = d["results"][0]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)), 1,
                          _cores(d), data_threads, node_exchange)
        t = model.step(train_workload(res, u), 1, res["global_batch"], c_d[id(d)])
        scale.append((res["median_step_s"] - t["allreduce"] - t["alltoallv"]) / t["compute"])
    k = float(np.mean(scale))
    rates = dataclasses.replace(rates, s_per_flop=rates.s_per_flop * k,
                                s_per_id=rates.s_per_id * k, s_fixed=rates.s_fixed * k,
                                dense_contention_per_rank=kappa_d)
    points = []
    for d in runs:
        res, p = d["results"][0], d["world_size"]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)),
                          d.get("ranks_per_node", p), _cores(d), data_threads,
                          node_exchange, ranks_per_machine(d))
        pred = model.step(train_workload(res, u), p, res["global_batch"] / p, c_d[id(d)])["step"]
        pt = _point(d, "train", res["median_step_s"], pred, calibration=p == 1)
        pt["dense_contention"] = c_d[id(d)]
        points.append(pt)
    return rates, points


def fit_compute(docs, network, args):
    """Compute rates, unique fraction, reader load and the predicted-vs-measured step points.

    Rates come from the command line first, else from the runs measured here (dense:
    seconds per FLOP; exchange: sparse fixed cost, seconds per id and contention; both
    calibrated on the end-to-end train step), else the defaults of :class:`ComputeRates`.
    The reader's load comes from the 1-rank train runs (:func:`train_data_threads`); the
    train points always use that, ``--data-threads`` replaces it for the prediction only.

    Returns:
        (ComputeRates, unique fraction, list of point dicts, (reader load, its source)).
    """
    rates = ComputeRates(threads=args.threads)
    s_per_flop, dense_pts = dense_rate_and_points(docs, network)
    sparse, kappa, sparse_pts = sparse_rates_and_points(docs, network)
    if s_per_flop is not None:
        rates.s_per_flop = s_per_flop
    if sparse:
        fixed, per_id = sparse.get(args.dim) or sparse[min(sparse)]
        rates.s_fixed, rates.s_per_id = fixed, per_id
        rates.contention_per_rank = kappa
    u = args.unique_fraction if args.unique_fraction is not None else unique_fraction(docs)
    u = 1.0 if u is None else u
    data = train_data_threads(docs)
    rates, train_pts = train_rates_and_points(docs, network, rates, u, args.node_exchange,
                                              data[0])
    if args.data_threads is not None:
        data = (args.data_threads, "--data-threads")
    if args.gflops is not None:
        rates.s_per_flop = 1e-9 / args.gflops
    if args.ns_per_id is not None:
        rates.s_per_id = args.ns_per_id * 1e-9
    if args.fixed_ms is not None:
        rates.s_fixed = args.fixed_ms * 1e-3
    if args.contention is not None:
        rates.contention_per_rank = args.contention
    return rates, u, dense_pts + sparse_pts + train_pts, data

