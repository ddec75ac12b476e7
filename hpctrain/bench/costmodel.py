"""Alpha-beta cost model of a collective training step, fitted from the micro-benchmarks.

    python -m hpctrain.bench costmodel --results bench-results/scaling --interconnect ib_hdr

One step on ``p`` ranks (``r`` per node, ``N = p / r`` nodes), local batch ``b``:

    T(p) = T_compute(b) * max(1, r * threads / cores)         (oversubscription)
         + T_allreduce(4 * dense_params, p)                    (one fused allreduce)
         + sum over the exchanges of T_alltoallv(bytes, p)      (counts, ids, rows, grads)

with the hierarchical (SMP-aware) alpha-beta costs, ``a`` = latency, ``B`` = seconds per byte:

    T_allreduce(n) = [r > 1] (2 ceil(log2 r) a_node + 2 (r-1)/r n B_node)
                   + [N > 1] (2 ceil(log2 N) a_net  + 2 (N-1)/N n B_net)
    T_alltoallv(m) = (r-1) a_node + (r-1)/p m B_node              (m bytes sent per rank,
                   + [N > 1] ((p-r) a_net + r (p-r)/p m B_net)      spread evenly over peers)

Allreduce is modelled as a reduce-scatter + allgather (Rabenseifner; recursive halving for
the latency), done inside the node, then between nodes: its bandwidth term is the lower
bound any allreduce meets, 2 (N-1)/N n bytes through each node's link. In an alltoallv each
rank sends one message to every peer (pairwise exchange) and the r ranks of a node share
its link. ``a_node``/``B_node`` are fitted from the allreduce and alltoallv micro-benchmarks
of this machine (separately, so the allreduce's reduction arithmetic is inside its B);
``a_net``/``B_net`` come from :data:`INTERCONNECTS` or the command line. Compute rates
(seconds per dense FLOP, per sparse id, and a fixed per-step cost) are measured by the
train benchmark on one rank. Assumptions and limits are in docs/scaling.md.
"""
import dataclasses
import glob
import json
import math
import os
import sys

import numpy as np


@dataclasses.dataclass(frozen=True)
class Link:
    """One level of the network: latency per message and bandwidth per node (one direction)."""
    latency_s: float
    bandwidth_Bps: float
    description: str = ""

    @property
    def beta(self):
        """Seconds per byte."""
        return 1.0 / self.bandwidth_Bps


#: Defaults for common interconnects: MPI small-message latency and achievable per-node
#: unidirectional bandwidth (one NIC per node), as OSU benchmarks typically report them.
INTERCONNECTS = {
    "shm": Link(0.5e-6, 10e9, "shared memory inside one node (MPI shm transport)"),
    "eth25": Link(25e-6, 2.8e9, "25 Gb/s Ethernet, TCP"),
    "eth100": Link(20e-6, 10e9, "100 Gb/s Ethernet, TCP"),
    "roce100": Link(3e-6, 11.5e9, "100 Gb/s RoCE v2 (RDMA over Ethernet)"),
    "ib_hdr": Link(1.3e-6, 23e9, "HDR InfiniBand, 200 Gb/s"),
    "ib_ndr": Link(1.1e-6, 46e9, "NDR InfiniBand, 400 Gb/s"),
    "slingshot": Link(2.0e-6, 22e9, "HPE Slingshot-11, 200 Gb/s"),
}


# --------------------------------------------------------------------------- collectives

def _log2ceil(n):
    return math.ceil(math.log2(n)) if n > 1 else 0


def allreduce_terms(nbytes, p):
    """(latency coefficient, byte coefficient) of one level: T = c_a * a + c_b * B."""
    if p <= 1:
        return 0.0, 0.0
    return 2.0 * _log2ceil(p), 2.0 * (p - 1) / p * nbytes


def alltoallv_terms(nbytes, p):
    """(latency coefficient, byte coefficient) of one level for ``nbytes`` sent per rank."""
    if p <= 1:
        return 0.0, 0.0
    return float(p - 1), (p - 1) / p * nbytes


@dataclasses.dataclass
class Network:
    """Intra-node links fitted per collective, and the inter-node link.

    Attributes:
        allreduce_node, alltoallv_node: fitted Links inside one node.
        net: the inter-node Link.
    """
    allreduce_node: Link
    alltoallv_node: Link
    net: Link

    def allreduce(self, nbytes, p, ranks_per_node):
        """Seconds of one allreduce of ``nbytes`` over ``p`` ranks."""
        r = min(p, ranks_per_node)
        nodes = math.ceil(p / r)
        ca, cb = allreduce_terms(nbytes, r)
        t = ca * self.allreduce_node.latency_s + cb * self.allreduce_node.beta
        ca, cb = allreduce_terms(nbytes, nodes)
        return t + ca * self.net.latency_s + cb * self.net.beta

    def alltoallv(self, nbytes, p, ranks_per_node):
        """Seconds of one alltoallv where each rank sends ``nbytes`` spread over all ranks."""
        if p <= 1:
            return 0.0
        r = min(p, ranks_per_node)
        link = self.alltoallv_node
        t = (r - 1) * link.latency_s + (r - 1) / p * nbytes * link.beta
        if p > r:
            t += (p - r) * self.net.latency_s + r * (p - r) / p * nbytes * self.net.beta
        return t


# --------------------------------------------------------------------------- fitting

def fit_alpha_beta(coef_a, coef_b, seconds):
    """Least-squares alpha, beta of ``t = coef_a * alpha + coef_b * beta`` in relative error.

    Relative error (each equation divided by its measured time) keeps small messages,
    whose times are orders of magnitude shorter, from being ignored. Both parameters
    are kept >= 0 (a negative one is fixed at 0 and the other refitted).

    Returns:
        (alpha seconds, beta seconds per byte).
    """
    ca, cb, t = (np.asarray(x, dtype=np.float64) for x in (coef_a, coef_b, seconds))
    if not (ca.shape == cb.shape == t.shape) or t.size < 2:
        raise ValueError(f"fit_alpha_beta needs >= 2 points of equal length, got {ca.size}, "
                         f"{cb.size}, {t.size}")
    if (t <= 0).any():
        raise ValueError("fit_alpha_beta: measured times must be > 0")
    a = np.stack([ca / t, cb / t], axis=1)
    alpha, beta = np.linalg.lstsq(a, np.ones_like(t), rcond=None)[0]
    if alpha < 0 or beta < 0:
        candidates = []
        for col in (0, 1):
            x = a[:, col]
            v = float(x @ np.ones_like(t) / (x @ x)) if (x @ x) > 0 else 0.0
            v = max(v, 0.0)
            resid = np.sum((x * v - 1.0) ** 2)
            candidates.append((resid, (v, 0.0) if col == 0 else (0.0, v)))
        alpha, beta = min(candidates)[1]
    return float(alpha), float(beta)


def relative_errors(predicted, measured):
    """(predicted - measured) / measured, elementwise."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    return (p - m) / m


def _load(path):
    with open(path) as f:
        return json.load(f)


def oversubscribed(doc):
    """True when a benchmark ran more rank-threads on a node than the node has cores."""
    v = doc.get("versions") or {}
    cores, threads = v.get("cpu_count"), v.get("threads") or 1
    per_node = doc.get("ranks_per_node", doc.get("world_size", 1))
    return bool(cores) and per_node * threads > cores


def collective_points(docs, kind):
    """Every measured size in allreduce/alltoallv benchmark JSONs, as dicts.

    Keys: ranks, ranks_per_node, bytes (the buffer for allreduce, the bytes one rank
    sends in total for alltoallv), seconds (p50), oversubscribed. One-rank runs carry
    no communication and are left out.
    """
    pts = []
    for doc in docs:
        if doc.get("benchmark") != kind or doc.get("world_size", 1) < 2:
            continue
        for row in doc.get("rows", []):
            stat = row.get("hpctrain")
            if stat is None or "bytes" not in row:
                continue
            # allreduce rows give the buffer size, alltoallv rows the bytes sent to each peer
            nbytes = row["bytes"] * (doc["world_size"] if kind == "alltoallv" else 1)
            pts.append({"ranks": int(doc["world_size"]),
                        "ranks_per_node": int(doc.get("ranks_per_node", doc["world_size"])),
                        "bytes": float(nbytes), "seconds": float(stat["p50"]),
                        "oversubscribed": oversubscribed(doc)})
    return pts


def fit_node_links(docs):
    """Fit the intra-node Links from allreduce and alltoallv benchmark JSONs.

    Runs with more ranks than cores on a node are left out of the fit (busy-polling
    ranks then wait for the scheduler, not the link) but still get a prediction.

    Returns:
        dict "allreduce"/"alltoallv" -> (Link or None, list of point dicts: benchmark,
        ranks, bytes, measured_s, predicted_s, rel_error, oversubscribed).
    """
    out = {}
    for kind, terms in (("allreduce", allreduce_terms), ("alltoallv", alltoallv_terms)):
        pts = collective_points(docs, kind)
        fit = [pt for pt in pts if not pt["oversubscribed"]]
        if len(fit) < 2:
            out[kind] = (None, [])
            continue
        coef = lambda pt: terms(pt["bytes"], min(pt["ranks"], pt["ranks_per_node"]))  # noqa: E731
        ca, cb = np.array([coef(pt) for pt in fit]).T
        alpha, beta = fit_alpha_beta(ca, cb, [pt["seconds"] for pt in fit])
        link = Link(alpha, 1.0 / beta if beta > 0 else float("inf"), f"fitted from {kind}")
        rows = []
        for pt in pts:
            a, b = coef(pt)
            q = a * alpha + b * beta
            rows.append({"benchmark": kind, "ranks": pt["ranks"], "bytes": pt["bytes"],
                         "measured_s": pt["seconds"], "predicted_s": q,
                         "rel_error": (q - pt["seconds"]) / pt["seconds"],
                         "oversubscribed": pt["oversubscribed"]})
        out[kind] = (link, rows)
    return out


# --------------------------------------------------------------------------- workload

@dataclasses.dataclass
class Workload:
    """A DLRM step: sizes that set FLOPs and bytes moved.

    Attributes:
        num_dense: dense input features.
        features: sparse features (one table each), ``ids_per_feature`` ids per sample each.
        dim: embedding width.
        bottom, top: DLRM MLP widths (``top`` ends in 1).
        unique_fraction: unique ids / ids in a rank's batch (deduplication before routing).

    A step has four alltoallv: per-table counts (``features`` int64 per peer), unique
    ids (int64) to their owners, rows back (``dim`` float32 each) and their gradients
    to the owners (``dim`` float32 each; the owner keeps the ids' order).
    """
    num_dense: int = 13
    features: int = 26
    ids_per_feature: float = 1.0
    dim: int = 16
    bottom: tuple = (512, 256, 64)
    top: tuple = (512, 256, 1)
    unique_fraction: float = 1.0

    def mlp_sizes(self):
        """Layer widths of the bottom and top MLPs (as hpctrain.dense.DLRM builds them)."""
        bottom = [self.num_dense, *self.bottom]
        if bottom[-1] != self.dim:
            bottom.append(self.dim)
        n = self.features + 1
        top = [self.dim + n * (n - 1) // 2, *self.top]
        return bottom, top

    @property
    def dense_params(self):
        """Number of dense parameters (weights and biases)."""
        return sum(a * b + b for sizes in self.mlp_sizes() for a, b in zip(sizes, sizes[1:]))

    @property
    def flops_per_sample(self):
        """Forward + backward FLOPs of the dense part per sample (3x the forward)."""
        n = self.features + 1
        mlp = sum(2 * a * b for sizes in self.mlp_sizes() for a, b in zip(sizes, sizes[1:]))
        return 3.0 * (mlp + n * (n - 1) * self.dim)

    @property
    def ids_per_sample(self):
        return self.features * self.ids_per_feature

    def exchange_bytes(self, batch_per_rank):
        """Bytes one rank sends in each alltoallv of a step."""
        u = batch_per_rank * self.ids_per_sample * self.unique_fraction
        return {"ids": 8.0 * u, "rows": 4.0 * self.dim * u, "grads": 4.0 * self.dim * u}


@dataclasses.dataclass
class ComputeRates:
    """Measured compute costs of one rank (at ``threads`` threads, machine not oversubscribed).

    Attributes:
        s_per_flop: seconds per dense FLOP.
        s_per_id: seconds per sparse id (dedup, route, lookup, pool, update).
        s_fixed: per-step cost independent of the batch (Python, small kernels).
    """
    s_per_flop: float = 1.0 / 20e9
    s_per_id: float = 100e-9
    s_fixed: float = 1e-3
    threads: int = 1

    def step(self, workload, batch):
        """Compute seconds of one step with local batch ``batch``."""
        return (self.s_fixed + batch * workload.flops_per_sample * self.s_per_flop
                + batch * workload.ids_per_sample * self.s_per_id)


@dataclasses.dataclass
class CostModel:
    """Predicts step time, throughput and efficiency of a workload at any rank count.

    Attributes:
        data_threads: busy threads per rank besides the compute threads (the reader's
            prefetch thread, 1 when ``data.prefetch > 0``): free while the node has idle
            cores, a share of the cores when it has none.
    """
    network: Network
    compute: ComputeRates
    ranks_per_node: int = 1
    cores_per_node: int = 1
    data_threads: int = 0

    def oversubscription(self, p):
        """Compute slow-down when a node's ranks run more busy threads than it has cores."""
        r = min(p, self.ranks_per_node)
        return max(1.0, r * (self.compute.threads + self.data_threads) / self.cores_per_node)

    def step(self, workload, p, batch_per_rank):
        """Phase times (seconds) of one step on ``p`` ranks."""
        r = min(p, self.ranks_per_node)
        oversub = self.oversubscription(p)
        ex = workload.exchange_bytes(batch_per_rank)
        t = {"compute": self.compute.step(workload, batch_per_rank) * oversub,
             "allreduce": self.network.allreduce(4.0 * workload.dense_params, p, r),
             "alltoallv": self.network.alltoallv(8.0 * workload.features * p, p, r)
             + sum(self.network.alltoallv(b, p, r) for b in ex.values())}
        t["step"] = sum(t.values())
        return t

    def sweep(self, workload, ranks, batch, mode="weak"):
        """Rows (ranks, nodes, batch per rank, phase times, samples/s, efficiency).

        Args:
            batch: samples per rank (weak) or global batch (strong).
            mode: "weak" (fixed batch per rank) or "strong" (fixed global batch).
        """
        if mode not in ("weak", "strong"):
            raise ValueError(f"mode must be 'weak' or 'strong', got {mode!r}")
        rows, base = [], None
        for p in ranks:
            b = batch if mode == "weak" else batch / p
            t = self.step(workload, p, b)
            sps = p * b / t["step"]
            if base is None:
                base = sps / p
            rows.append({"ranks": p, "nodes": math.ceil(p / self.ranks_per_node),
                         "batch_per_rank": b, **{f"{k}_s": v for k, v in t.items()},
                         "samples_per_s": sps, "efficiency": sps / (p * base)})
        return rows


# --------------------------------------------------------------------------- command line

def _oversub(doc):
    """Compute slow-down of a run that put more rank-threads on a node than it has cores."""
    v = doc.get("versions") or {}
    cores, threads = v.get("cpu_count") or 0, v.get("threads") or 1
    per_node = doc.get("ranks_per_node", doc.get("world_size", 1))
    return max(1.0, per_node * threads / cores) if cores else 1.0


def _point(doc, kind, measured, predicted):
    return {"benchmark": kind, "ranks": doc["world_size"], "mode": doc.get("scaling_mode") or "",
            "measured_s": measured, "predicted_s": predicted,
            "rel_error": (predicted - measured) / measured, "oversubscribed": oversubscribed(doc)}


#: The exchanges of a sparse step as the exchange benchmark names its phases.
EXCHANGE_PHASES = ("counts", "ids_a2a", "rows_a2a", "grad_a2a")


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


def sparse_rate_and_points(docs, network):
    """Seconds per id from the 1-rank exchange benchmark runs, and every exchange run predicted.

    A sparse step is compute (ids at the 1-rank rate, times the oversubscription factor)
    plus its four alltoallv: three of latency only and the measured bytes of the step.
    """
    runs = [d for d in docs if d.get("benchmark") == "exchange" and d.get("results")]

    def ids(d):
        return d["config"]["batch"] * d["config"]["features"]
    ones = [d for d in runs if d["world_size"] == 1]
    if not ones:
        return None, []
    rates = []
    for d in ones:
        res = d["results"][0]
        comm = sum(res["phases"].get(k, 0.0) for k in EXCHANGE_PHASES)
        rates.append((res["step"]["p50"] - comm) / ids(d) / _oversub(d))
    s_per_id = float(np.mean(rates))
    points = []
    for d in runs:
        res, p = d["results"][0], d["world_size"]
        r = d.get("ranks_per_node", p)
        comm = (3 * network.alltoallv(0.0, p, r)
                + network.alltoallv(float(res["exchange_bytes_sent_rank0"]), p, r))
        pred = ids(d) * s_per_id * _oversub(d) + comm
        points.append(_point(d, "exchange", res["step"]["p50"], pred))
    return s_per_id, points


def unique_fraction(docs):
    """Unique ids / ids per rank and step, from the bytes the exchange benchmark moved."""
    fr = []
    for d in docs:
        if d.get("benchmark") == "exchange" and d.get("results"):
            res, c = d["results"][0], d["config"]
            # bytes = counts (8 F p) + unique ids (8 u) + rows and grads (2 x 4 dim u)
            u = ((res["exchange_bytes_sent_rank0"] - 8 * c["features"] * d["world_size"])
                 / (8 + 8 * res["dim"]))
            fr.append(u / (c["batch"] * c["features"]))
    return float(np.median(fr)) if fr else None


#: The train benchmark's reader prefetches synthetic batches in one background thread.
TRAIN_DATA_THREADS = 1


def _threads(doc):
    return (doc.get("versions") or {}).get("threads") or 1


def _cores(doc):
    return (doc.get("versions") or {}).get("cpu_count") or doc.get("ranks_per_node", 1)


def _train_workload(res, u):
    """The train benchmark's DLRM (26 one-table features, 13 dense, 512-256-64 / 512-256-1)."""
    return Workload(13, 26, float(res.get("bag", 1)), int(res["dim"]), (512, 256, 64),
                    (512, 256, 1), u)


def train_rates_and_points(docs, network, rates, u):
    """Calibrate ``rates`` on the 1-rank train runs; predict every train run.

    The split between dense FLOPs and sparse ids keeps the ratio the dense and
    exchange benchmarks measured; both are scaled so the 1-rank DLRM step is exact.
    """
    runs = [d for d in docs if d.get("benchmark") == "train" and d.get("results")]
    ones = [d for d in runs if d["world_size"] == 1]
    if not ones:
        return rates, []
    scale = []
    for d in ones:
        res = d["results"][0]
        b = res["global_batch"]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)), 1,
                          _cores(d), TRAIN_DATA_THREADS)
        scale.append(res["median_step_s"] / model.oversubscription(1)
                     / rates.step(_train_workload(res, u), b))
    k = float(np.mean(scale))
    rates = dataclasses.replace(rates, s_per_flop=rates.s_per_flop * k,
                                s_per_id=rates.s_per_id * k, s_fixed=rates.s_fixed * k)
    points = []
    for d in runs:
        res, p = d["results"][0], d["world_size"]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)),
                          d.get("ranks_per_node", p), _cores(d), TRAIN_DATA_THREADS)
        pred = model.step(_train_workload(res, u), p, res["global_batch"] / p)["step"]
        points.append(_point(d, "train", res["median_step_s"], pred))
    return rates, points


def fit_compute(docs, network, args):
    """Compute rates, unique fraction and the predicted-vs-measured step points of ``docs``.

    Rates come from the command line first, else from the 1-rank runs measured here
    (dense: seconds per FLOP; exchange: seconds per sparse id; both calibrated on the
    end-to-end train step), else the defaults of :class:`ComputeRates`.

    Returns:
        (ComputeRates, unique fraction, list of point dicts).
    """
    rates = ComputeRates(threads=args.threads)
    s_per_flop, dense_pts = dense_rate_and_points(docs, network)
    s_per_id, sparse_pts = sparse_rate_and_points(docs, network)
    if s_per_flop is not None:
        rates.s_per_flop = s_per_flop
    if s_per_id is not None:
        rates.s_per_id = s_per_id
    if s_per_flop is not None and s_per_id is not None:
        rates.s_fixed = 0.0      # both measured rates already include their fixed costs
    u = args.unique_fraction if args.unique_fraction is not None else unique_fraction(docs)
    u = 1.0 if u is None else u
    rates, train_pts = train_rates_and_points(docs, network, rates, u)
    if args.gflops is not None:
        rates.s_per_flop = 1e-9 / args.gflops
    if args.ns_per_id is not None:
        rates.s_per_id = args.ns_per_id * 1e-9
    if args.fixed_ms is not None:
        rates.s_fixed = args.fixed_ms * 1e-3
    return rates, u, dense_pts + sparse_pts + train_pts


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


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv):
    import argparse
    p = argparse.ArgumentParser(prog="python -m hpctrain.bench costmodel",
                                description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", default=[os.path.join("bench-results", "scaling")],
                   help="benchmark JSON files or folders (the scaling sweep's output)")
    p.add_argument("--interconnect", default="ib_hdr", choices=sorted(INTERCONNECTS))
    p.add_argument("--latency-us", type=float, default=None, help="override the link latency")
    p.add_argument("--bandwidth-GBps", type=float, default=None,
                   help="override the per-node link bandwidth (GB/s, one direction)")
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--cores-per-node", type=int, default=None,
                   help="default: ranks-per-node x (threads + data threads): no oversubscription")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--data-threads", type=int, default=1,
                   help="reader prefetch threads per rank (0 with data.prefetch = 0)")
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
                   help=f"per-step fixed ms (default: measured, else {r.s_fixed * 1e3:g})")
    p.add_argument("--json", default=None, help="write fit, comparison and prediction here")
    return p.parse_args(argv)


def main(argv=None):
    from hpctrain.bench.common import print_table
    args = parse_args(argv)
    docs = load_results(args.results)
    fitted = fit_node_links(docs)
    shm = INTERCONNECTS["shm"]
    print(f"# cost model fitted from {len(docs)} benchmark result(s) in {', '.join(args.results)}")
    links = {}
    for kind in ("allreduce", "alltoallv"):
        link, _ = fitted[kind]
        links[kind] = link or shm
        src = "fitted" if link else "no measurements; default 'shm'"
        print(f"#   intra-node {kind:<9}: alpha {links[kind].latency_s * 1e6:8.3f} us, "
              f"bandwidth {links[kind].bandwidth_Bps / 1e9:7.3f} GB/s ({src})")
    net = INTERCONNECTS[args.interconnect]
    net = Link(args.latency_us * 1e-6 if args.latency_us is not None else net.latency_s,
               args.bandwidth_GBps * 1e9 if args.bandwidth_GBps is not None else net.bandwidth_Bps,
               net.description)
    print(f"#   inter-node {args.interconnect}: alpha {net.latency_s * 1e6:.2f} us, "
          f"bandwidth {net.bandwidth_Bps / 1e9:.1f} GB/s ({net.description})")
    network = Network(links["allreduce"], links["alltoallv"], net)

    points = fitted["allreduce"][1] + fitted["alltoallv"][1]
    compute, u, train_points = fit_compute(docs, network, args)
    points += train_points
    print(f"#   compute per rank: {1e-9 / compute.s_per_flop:.3g} GFLOP/s dense, "
          f"{compute.s_per_id * 1e9:.4g} ns per sparse id, {compute.s_fixed * 1e3:.3g} ms fixed; "
          f"unique fraction {u:.3f}")
    if points:
        print("# predicted vs measured, every measured point (* = more ranks than cores: "
              "outside the model, not fitted)")
        print_table(["benchmark", "ranks", "bytes/mode", "measured ms", "predicted ms", "error %"],
                    [[pt["benchmark"], f"{pt['ranks']}{'*' if pt.get('oversubscribed') else ''}",
                      pt.get("bytes", pt.get("mode", "")), pt["measured_s"] * 1e3,
                      pt["predicted_s"] * 1e3, f"{pt['rel_error'] * 100:+.1f}"] for pt in points])
        for label, sel in (("cores >= ranks", False), ("oversubscribed", True)):
            errs = np.abs([pt["rel_error"] for pt in points if bool(pt.get("oversubscribed")) == sel])
            if errs.size:
                print(f"# |error| {label}: median {np.median(errs) * 100:.1f}%, max "
                      f"{errs.max() * 100:.1f}%, {(errs <= 0.25).mean() * 100:.0f}% of "
                      f"{errs.size} points within 25%")
    workload = Workload(args.num_dense, args.features, args.ids_per_feature, args.dim,
                        args.bottom, args.top, u)
    model = CostModel(network, compute, args.ranks_per_node,
                      args.cores_per_node or args.ranks_per_node * (args.threads + args.data_threads),
                      args.data_threads)
    ranks = [2 ** k for k in range(int(math.log2(args.max_ranks)) + 1)]
    rows = model.sweep(workload, ranks, args.batch, args.mode)
    print(f"# prediction: DLRM {args.features} features x dim {args.dim}, "
          f"{workload.dense_params:,} dense parameters, {args.mode} scaling, batch {args.batch}"
          f"{' per rank' if args.mode == 'weak' else ' global'}, {args.ranks_per_node} ranks/node, "
          f"{args.threads} thread(s)/rank, {args.interconnect}")
    print_table(["ranks", "nodes", "compute ms", "allreduce ms", "alltoallv ms", "step ms",
                 "samples/s", "efficiency"],
                [[r["ranks"], r["nodes"], r["compute_s"] * 1e3, r["allreduce_s"] * 1e3,
                  r["alltoallv_s"] * 1e3, r["step_s"] * 1e3, r["samples_per_s"],
                  f"{r['efficiency']:.3f}"] for r in rows])
    if args.json:
        out = {"links": {k: dataclasses.asdict(v) for k, v in
                         (("allreduce_node", network.allreduce_node),
                          ("alltoallv_node", network.alltoallv_node), ("net", network.net))},
               "compute": dataclasses.asdict(compute), "workload": dataclasses.asdict(workload),
               "points": points, "prediction": rows, "args": vars(args)}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
