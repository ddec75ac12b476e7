"""``python -m hpctrain.bench costmodel``: fit the model to benchmark results, predict, report.

    python -m hpctrain.bench costmodel --results bench-results/scaling --interconnect ib_hdr

Reads benchmark JSONs (files or folders, the scaling sweep's records unwrapped), prints the
fitted regimes and rates, every measured point against its prediction, and the predicted
scaling of a DLRM workload as tables; ``--json`` writes all of it.
"""
import argparse
import dataclasses
import glob
import json
import math
import os

import numpy as np

from hpctrain.bench.costmodel.fit_links import fit_net_links, fit_node_links, net_points
from hpctrain.bench.costmodel.fit_rates import TRAIN_DATA_THREADS, fit_compute
from hpctrain.bench.costmodel.model import (INTERCONNECTS, ComputeRates, CostModel, Link, Network,
                                            Regimes, Workload)

DESCRIPTION = ("Alpha-beta cost model of a collective training step, fitted from the "
               "micro-benchmarks.")


def _load(path):
    with open(path) as f:
        return json.load(f)


def load_results(paths):
    """Benchmark JSON documents from files and folders (scaling records are unwrapped)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise SystemExit(f"costmodel: no such file or folder: {path}")
    docs = []
    for f in files:
        doc = _load(f)
        if doc.get("benchmark") == "scaling" and isinstance(doc.get("result"), dict):
            docs.append(dict(doc["result"], scaling_mode=doc.get("mode")))
        elif "benchmark" in doc and "world_size" in doc:
            docs.append(doc)
    return docs


def parse_net_regimes(text):
    """``"FROM:LATENCY_US:GBPS,..."`` (FROM in bytes, K/M suffixes, the first 0) as Regimes."""
    parts = []
    for i, item in enumerate(x for x in text.split(",") if x.strip()):
        try:
            lo, lat, bw = item.split(":")
            lo = int(float(lo[:-1]) * {"K": 1 << 10, "M": 1 << 20}[lo[-1].upper()]) \
                if lo[-1:].upper() in ("K", "M") else int(lo)
            parts.append((lo, Link(float(lat) * 1e-6, float(bw) * 1e9, "--net-regimes")))
        except (ValueError, KeyError):
            raise ValueError(f"--net-regimes item {i + 1} {item!r}: expected "
                             f"FROM_BYTES:LATENCY_US:GBPS, e.g. 0:1.3:12,64K:1.5:23") from None
    if not parts or parts[0][0] != 0:
        raise ValueError(f"--net-regimes {text!r}: the first regime must start at 0 bytes")
    return Regimes(tuple(ln for _, ln in parts), tuple(lo for lo, _ in parts[1:]))


def _share(text):
    """A share of one core in [0, 1] (``--data-threads``)."""
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of a core in [0, 1], got {text!r}")
    return v


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv):
    """The command line's options (``argv`` without the program name)."""
    p = argparse.ArgumentParser(prog="python -m hpctrain.bench costmodel",
                                description=DESCRIPTION)
    p.add_argument("--results", nargs="+", default=None,
                   help="benchmark JSON files or folders (the scaling sweep's output; default "
                        "bench-results/scaling, none with --hybrid)")
    p.add_argument("--interconnect", default="ib_hdr", choices=sorted(INTERCONNECTS))
    p.add_argument("--latency-us", type=float, default=None, help="override the link latency")
    p.add_argument("--bandwidth-GBps", type=float, default=None,
                   help="override the per-node link bandwidth (GB/s, one direction)")
    p.add_argument("--net-regimes", type=parse_net_regimes, default=None,
                   help="inter-node link per message-size regime, FROM_BYTES:LATENCY_US:GBPS,"
                        "... (e.g. 0:1.3:12,64K:1.5:23); replaces --interconnect")
    p.add_argument("--net-fit", action="store_true",
                   help="fit the inter-node link from the multi-node allreduce/alltoallv "
                        "results (a sweep over several nodes, or emulated hosts: "
                        "benchmarks/multihost/); replaces --interconnect")
    p.add_argument("--max-regimes", type=int, default=3,
                   help="most message-size regimes fitted per intra-node collective")
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--cores-per-node", type=int, default=None,
                   help="default: ranks-per-node x (threads + data threads), rounded up: no "
                        "oversubscription")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--data-threads", type=_share, default=None,
                   help="share of a core the reader's prefetch thread keeps busy per rank, "
                        "0..1 (0 with data.prefetch = 0; default: the 1-rank train run's "
                        f"reader_busy_share, else {TRAIN_DATA_THREADS:g})")
    p.add_argument("--node-exchange", choices=["shm", "alltoallv"], default="shm",
                   help="how rows and gradients reach ranks of the same node (the sparse "
                        "exchange config; shm = shared window, hpctrain's default with MPI)")
    p.add_argument("--max-ranks", type=int, default=1024)
    p.add_argument("--mode", choices=["weak", "strong"], default="weak")
    p.add_argument("--batch", type=int, default=4096,
                   help="samples per rank (weak) or global batch (strong)")
    w = Workload()
    p.add_argument("--num-dense", type=int, default=w.num_dense)
    p.add_argument("--features", type=int, default=w.features)
    p.add_argument("--ids-per-feature", type=float, default=w.ids_per_feature)
    p.add_argument("--dim", type=int, default=w.dim)
    p.add_argument("--bottom", type=_ints, default=w.bottom)
    p.add_argument("--top", type=_ints, default=w.top)
    p.add_argument("--unique-fraction", type=float, default=None,
                   help="unique ids / ids after per-rank dedup (default: measured by the "
                        "exchange benchmark, else 1)")
    r = ComputeRates()
    p.add_argument("--gflops", type=float, default=None,
                   help=f"dense GFLOP/s per rank (default: measured, else {1e-9 / r.s_per_flop:g})")
    p.add_argument("--ns-per-id", type=float, default=None,
                   help=f"sparse ns per id (default: measured, else {r.s_per_id * 1e9:g})")
    p.add_argument("--fixed-ms", type=float, default=None,
                   help=f"sparse per-step fixed ms (default: measured, else {r.s_fixed * 1e3:g})")
    p.add_argument("--contention", type=float, default=None,
                   help="kappa of the sparse slow-down 1 + kappa (busy ranks per node - 1) "
                        "(default: measured by the exchange benchmark, else 0)")
    p.add_argument("--json", default=None, help="write fit, comparison and prediction here")
    p.add_argument("--hybrid", default=None, metavar="JSON",
                   help="also the hybrid step (hpctrain.bench.costmodel.hybrid) fitted from "
                        "this `bench hybrid` result, predicted vs measured; alone without "
                        "--results (or when no --results path exists)")
    args = p.parse_args(argv)
    if args.results is None:
        args.results = [] if args.hybrid else [os.path.join("bench-results", "scaling")]
    return args


_COLLECTIVES = ("allreduce", "alltoallv")


def _summary(points):
    """Lines of |error| statistics: ranks <= cores (with and without calibration points),
    oversubscribed, and the steps and collective sizes apart (calibration points left out)."""
    out = []
    for label, sel in (("cores >= ranks", lambda pt: not pt.get("oversubscribed")),
                       ("cores >= ranks, calibration points left out",
                        lambda pt: not pt.get("oversubscribed") and not pt.get("calibration")),
                       ("oversubscribed", lambda pt: pt.get("oversubscribed")),
                       ("steps, calibration points left out",
                        lambda pt: pt["benchmark"] not in _COLLECTIVES
                        and not pt.get("calibration")),
                       ("collective sizes", lambda pt: pt["benchmark"] in _COLLECTIVES)):
        errs = np.abs([pt["rel_error"] for pt in points if sel(pt)])
        if errs.size:
            out.append(f"# |error| {label}: median {np.median(errs) * 100:.1f}%, max "
                       f"{errs.max() * 100:.1f}%, {int((errs <= 0.25).sum())} of {errs.size} "
                       f"points within 25%")
    return out


def main(argv=None):
    """Fit, compare and predict; print the tables on stdout. Returns the exit code."""
    from hpctrain.bench.common import print_table
    args = parse_args(argv)
    if args.hybrid and not any(os.path.exists(r) for r in args.results):
        _hybrid_section(args, print_table)
        return 0
    docs = load_results(args.results)
    fitted = fit_node_links(docs, args.max_regimes)
    shm = Regimes.of(INTERCONNECTS["shm"])
    print(f"# cost model fitted from {len(docs)} benchmark result(s) in {', '.join(args.results)}")
    regimes = {}
    for kind in ("allreduce", "alltoallv", "local_copy"):
        reg, _ = fitted[kind]
        regimes[kind] = reg if reg is not None or kind == "local_copy" else shm
        src = "fitted" if reg is not None else ("no measurements: free" if kind == "local_copy"
                                                else "no measurements; default 'shm'")
        name = "alltoallv local copy" if kind == "local_copy" else f"intra-node {kind}"
        print(f"#   {name} ({src}, key: "
              f"{'buffer' if kind == 'allreduce' else 'bytes per peer'}):")
        for line in (regimes[kind].describe() if regimes[kind] is not None else []):
            print(f"#     {line}")
    allreduce_net = None
    if args.net_fit:
        node = Network(regimes["allreduce"], regimes["alltoallv"], None, regimes["local_copy"])
        nets = fit_net_links(docs, node, args.max_regimes)
        if nets["alltoallv"] is None and nets["allreduce"] is None:
            raise SystemExit(f"costmodel: --net-fit: no allreduce or alltoallv run over several "
                             f"nodes (with ranks <= cores) in {', '.join(args.results)}")
        net, allreduce_net = nets["alltoallv"] or nets["allreduce"], nets["allreduce"]
        for kind in ("alltoallv", "allreduce"):
            if nets[kind] is not None:
                print(f"#   inter-node {kind} (fitted from its multi-node runs, key: "
                      f"{'buffer' if kind == 'allreduce' else 'bytes per peer'}):")
                for line in nets[kind].describe():
                    print(f"#     {line}")
        print("#   inter-node link used for the steps: the alltoallv's (allreduce: its own)")
    elif args.net_regimes is not None:
        net = args.net_regimes
        print("#   inter-node (--net-regimes):")
    else:
        base = INTERCONNECTS[args.interconnect]
        net = Regimes.of(Link(args.latency_us * 1e-6 if args.latency_us is not None
                              else base.latency_s,
                              args.bandwidth_GBps * 1e9 if args.bandwidth_GBps is not None
                              else base.bandwidth_Bps, base.description))
        print(f"#   inter-node {args.interconnect} ({base.description}):")
    if not args.net_fit:
        for line in net.describe():
            print(f"#     {line}")
    network = Network(regimes["allreduce"], regimes["alltoallv"], net, regimes["local_copy"],
                      allreduce_net)

    points = (fitted["local_copy"][1] + fitted["allreduce"][1] + fitted["alltoallv"][1]
              + net_points(docs, network))
    compute, u, step_points, (data_threads, data_src) = fit_compute(docs, network, args)
    points += step_points
    print(f"#   compute per rank: {1e-9 / compute.s_per_flop:.3g} GFLOP/s dense, "
          f"{compute.s_per_id * 1e9:.4g} ns per sparse id + {compute.s_fixed * 1e3:.3g} ms "
          f"per step; sparse contention kappa {compute.contention_per_rank:.3f} per busy rank; "
          f"dense contention kappa_d {compute.dense_contention_per_rank:.3f} per busy rank "
          f"(the slowest rank's); unique fraction {u:.3f}")
    print(f"#   reader load: {data_threads:.3f} of a core per rank ({data_src})")
    if points:
        print("# predicted vs measured, every measured point (size: allreduce buffer, alltoallv "
              "bytes per peer; * = more rank-threads than cores: compute shares the cores, "
              "and the intra-node fits leave it out; c = calibration point)")
        print_table(["benchmark", "ranks", "nodes", "size/mode", "measured ms", "predicted ms",
                     "error %"],
                    [[pt["benchmark"], f"{pt['ranks']}{'*' if pt.get('oversubscribed') else ''}",
                      pt.get("nodes", 1), pt.get("bytes", pt.get("mode", "")),
                      pt["measured_s"] * 1e3,
                      pt["predicted_s"] * 1e3,
                      f"{pt['rel_error'] * 100:+.1f}{' c' if pt.get('calibration') else ''}"]
                     for pt in points])
        for line in _summary(points):
            print(line)
    workload = Workload(args.num_dense, args.features, args.ids_per_feature, args.dim,
                        args.bottom, args.top, u)
    cores = args.cores_per_node or math.ceil(args.ranks_per_node * (args.threads + data_threads))
    model = CostModel(network, compute, args.ranks_per_node, cores, data_threads,
                      args.node_exchange)
    ranks = [2 ** k for k in range(int(math.log2(args.max_ranks)) + 1)]
    rows = model.sweep(workload, ranks, args.batch, args.mode)
    link = ("--net-fit" if args.net_fit else "--net-regimes" if args.net_regimes is not None
            else args.interconnect)
    print(f"# prediction: DLRM {args.features} features x dim {args.dim}, "
          f"{workload.dense_params:,} dense parameters, {args.mode} scaling, batch {args.batch}"
          f"{' per rank' if args.mode == 'weak' else ' global'}, {args.ranks_per_node} ranks/node, "
          f"{args.threads} thread(s)/rank, "
          f"{link}")
    print_table(["ranks", "nodes", "compute ms", "allreduce ms", "alltoallv ms", "step ms",
                 "samples/s", "efficiency"],
                [[r["ranks"], r["nodes"], r["compute_s"] * 1e3, r["allreduce_s"] * 1e3,
                  r["alltoallv_s"] * 1e3, r["step_s"] * 1e3, r["samples_per_s"],
                  f"{r['efficiency']:.3f}"] for r in rows])
    hybrid = _hybrid_section(args, print_table) if args.hybrid else None
    if args.json:
        links = {"allreduce_node": network.allreduce_node.as_dicts(),
                 "alltoallv_node": network.alltoallv_node.as_dicts(),
                 "local_copy": network.local_copy.as_dicts() if network.local_copy else None,
                 "net": network.net.as_dicts(),
                 "allreduce_net": (network.allreduce_net.as_dicts()
                                   if network.allreduce_net is not None else None)}
        out = {"links": links, "compute": dataclasses.asdict(compute),
               "workload": dataclasses.asdict(workload), "points": points, "prediction": rows,
               "data_threads": {"share": data_threads, "source": data_src},
               "hybrid": hybrid,
               "args": {k: (v.as_dicts() if isinstance(v, Regimes) else v)
                        for k, v in vars(args).items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _hybrid_section(args, print_table):
    """The hybrid step's rates and points (``--hybrid``); written to ``--json`` alone when
    there is no collective part."""
    from hpctrain.bench.costmodel.hybrid import report as hybrid_report
    rates, pts = hybrid_report(_load(args.hybrid), print_table)
    out = {"rates": dataclasses.asdict(rates), "points": pts, "source": args.hybrid}
    if args.json and not any(os.path.exists(r) for r in args.results):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"hybrid": out}, f, indent=1)
        print(f"wrote {args.json}")
    return out
