"""Alpha-beta cost model of a collective training step, fitted from the micro-benchmarks.

    python -m hpctrain.bench costmodel --results bench-results/scaling --interconnect ib_hdr

One step on ``p`` ranks (``r`` per node, ``N = p / r`` nodes), local batch ``b``:

    T(p) = [T_dense(b) + T_sparse(b) * c(r)] * max(1, r * (threads + d) / cores)
         + T_allreduce(4 * dense_params, p)                 (one fused allreduce)
         + sum over the exchanges of T_alltoallv(bytes, p)   (counts, ids, rows, grads)

``c(r)`` is the memory contention of ``r`` busy ranks on a node, measured by the exchange
benchmark; ``d`` is the reader's load, the share of a core its prefetch thread keeps busy
per rank (measured by the 1-rank train run as ``reader_busy_share``). The collectives are
piecewise alpha-beta: every message-size regime (eager, rendezvous, ...) has its own
latency ``a`` and seconds per byte ``B``, with ``s`` the bytes per peer of an alltoallv
(``m`` bytes sent per rank in all):

    T_allreduce(n) = [r > 1] (2 ceil(log2 r) a_node(n) + 2 (r-1)/r n B_node(n))
                   + [N > 1] (2 ceil(log2 N) a_net(n)  + 2 (N-1)/N n B_net(n))
    T_alltoallv(m) = a_copy(s) + s B_copy(s)                 (the block a rank keeps)
                   + (r-1) (a_node(s) + s B_node(s))
                   + [N > 1] ((p-r) a_net(s) + r (p-r) s B_net(s))

The regimes and their parameters are fitted from the allreduce and alltoallv
micro-benchmarks of this machine (the local copy from the 1-rank alltoallv); the
inter-node link comes from :data:`INTERCONNECTS` or the command line (one pair unless
``--net-regimes`` gives more). Compute rates are measured by the sweep's dense and
exchange benchmarks. The formulas, what is fitted from what, and the assumptions are in
docs/scaling.md.
"""
import bisect
import dataclasses
import glob
import itertools
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


@dataclasses.dataclass(frozen=True)
class Regimes:
    """Piecewise alpha-beta: one :class:`Link` per message-size regime.

    ``links[0]`` holds below ``bounds[0]`` bytes, ``links[i]`` from ``bounds[i-1]``
    (inclusive) to ``bounds[i]``, the last one above::

        size:   0 ........ bounds[0) ........ bounds[1) ........ inf
        link:     links[0]           links[1]           links[2]
    """
    links: tuple
    bounds: tuple = ()

    def __post_init__(self):
        if len(self.links) != len(self.bounds) + 1:
            raise ValueError(f"Regimes: {len(self.links)} links need {len(self.links) - 1} "
                             f"bounds, got {len(self.bounds)}")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"Regimes: bounds must increase, got {self.bounds}")

    @classmethod
    def of(cls, x):
        """``x`` as Regimes (a single :class:`Link` is one regime)."""
        return x if isinstance(x, Regimes) or x is None else cls((x,))

    def at(self, nbytes):
        """The Link of messages of ``nbytes`` bytes."""
        return self.links[bisect.bisect_right(self.bounds, nbytes)]

    def as_dicts(self):
        """JSON form: one dict per regime (from_bytes, latency_s, bandwidth_Bps)."""
        return [{"from_bytes": lo, "latency_s": ln.latency_s, "bandwidth_Bps": ln.bandwidth_Bps,
                 "description": ln.description}
                for lo, ln in zip((0, *self.bounds), self.links)]

    def describe(self):
        """One line per regime, for the command's header."""
        out = []
        for lo, hi, ln in zip((0, *self.bounds), (*self.bounds, math.inf), self.links):
            rng = f"{_size(lo)}-{_size(hi)}" if hi < math.inf else f">= {_size(lo)}"
            out.append(f"{rng:>15}: alpha {ln.latency_s * 1e6:8.3f} us, "
                       f"bandwidth {ln.bandwidth_Bps / 1e9:8.3f} GB/s")
        return out


def _size(n):
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.4g} {unit}"
    return f"{n:.4g} B"


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
    """Intra-node costs fitted per collective, the local copy, and the inter-node link.

    Attributes:
        allreduce_node, alltoallv_node: Regimes (or one Link) inside one node.
        net: the inter-node Regimes (or Link).
        local_copy: Regimes of the block an alltoallv rank sends to itself (latency =
            the per-call cost, bandwidth = the copy's); None: free.
    """
    allreduce_node: Regimes
    alltoallv_node: Regimes
    net: Regimes
    local_copy: Regimes = None

    def __post_init__(self):
        for name in ("allreduce_node", "alltoallv_node", "net", "local_copy"):
            setattr(self, name, Regimes.of(getattr(self, name)))

    def allreduce(self, nbytes, p, ranks_per_node):
        """Seconds of one allreduce of ``nbytes`` over ``p`` ranks."""
        r = min(p, ranks_per_node)
        nodes = math.ceil(p / r)
        ln = self.allreduce_node.at(nbytes)
        ca, cb = allreduce_terms(nbytes, r)
        t = ca * ln.latency_s + cb * ln.beta
        ln = self.net.at(nbytes)
        ca, cb = allreduce_terms(nbytes, nodes)
        return t + ca * ln.latency_s + cb * ln.beta

    def alltoallv(self, nbytes, p, ranks_per_node, node_shm=False):
        """Seconds of one alltoallv where each rank sends ``nbytes`` spread over all ranks.

        ``node_shm``: the node's ranks exchange through a shared window instead (owners
        write rows where the requesters read them): no copy and no bytes inside the node,
        only one synchronisation, costed as a zero-byte exchange.
        """
        s = nbytes / p
        t = 0.0
        if self.local_copy is not None and not node_shm:
            t += _copy_cost(self.local_copy, s)
        if p <= 1:
            return t
        r = min(p, ranks_per_node)
        ln = self.alltoallv_node.at(0.0 if node_shm else s)
        t += (r - 1) * (ln.latency_s + (0.0 if node_shm else s * ln.beta))
        if p > r:
            ln = self.net.at(s)
            t += (p - r) * ln.latency_s + r * (p - r) * s * ln.beta
        return t


# --------------------------------------------------------------------------- fitting

def fit_alpha_beta(coef_a, coef_b, seconds, offset=None):
    """Least-squares alpha, beta of ``t = offset + coef_a * alpha + coef_b * beta``.

    In relative error (each equation divided by its measured time), so that small
    messages, whose times are orders of magnitude shorter, are not ignored. Both
    parameters are kept >= 0 (a negative one is fixed at 0 and the other refitted).
    ``offset`` is a known part of each time (the local copy of an alltoallv).

    Returns:
        (alpha seconds, beta seconds per byte).
    """
    ca, cb, t = (np.asarray(x, dtype=np.float64) for x in (coef_a, coef_b, seconds))
    off = np.zeros_like(t) if offset is None else np.asarray(offset, dtype=np.float64)
    if not (ca.shape == cb.shape == t.shape == off.shape) or t.size < 2:
        raise ValueError(f"fit_alpha_beta needs >= 2 points of equal length, got {ca.size}, "
                         f"{cb.size}, {t.size}, offset {off.size}")
    if (t <= 0).any():
        raise ValueError("fit_alpha_beta: measured times must be > 0")
    a = np.stack([ca / t, cb / t], axis=1)
    rhs = 1.0 - off / t
    alpha, beta = np.linalg.lstsq(a, rhs, rcond=None)[0]
    if alpha < 0 or beta < 0:
        candidates = []
        for col in (0, 1):
            x = a[:, col]
            v = max(float(x @ rhs / (x @ x)) if (x @ x) > 0 else 0.0, 0.0)
            sse = float(np.sum((x * v - rhs) ** 2))
            candidates.append((sse, (v, 0.0) if col == 0 else (0.0, v)))
        alpha, beta = min(candidates)[1]
    return float(alpha), float(beta)


def fit_regimes(sizes, coef_a, coef_b, seconds, offset=None, max_regimes=3, min_sizes=3,
                tolerance=0.1, description=""):
    """Piecewise alpha-beta over message size, with the regime boundaries found in the data.

    Points are grouped by distinct size; a regime is a run of at least ``min_sizes``
    consecutive sizes fitted by :func:`fit_alpha_beta` (relative error). Starting from
    one regime, a regime is added while the current fit leaves some point off by more
    than ``tolerance`` (relative) and the best placement of the boundaries (all are
    tried) at least halves the sum of squared relative errors: a protocol switch (eager
    to rendezvous, shared-memory cells to single copy) is taken where one alpha-beta pair
    clearly fails, not to chase the noise of single sizes. A boundary lies half-way
    (geometric mean) between the largest size of one regime and the smallest of the next.

    Returns:
        :class:`Regimes`.
    """
    s, ca, cb, t = (np.asarray(x, dtype=np.float64) for x in (sizes, coef_a, coef_b, seconds))
    off = np.zeros_like(t) if offset is None else np.asarray(offset, dtype=np.float64)
    distinct = np.unique(s)
    d = distinct.size
    if d < 2:
        raise ValueError(f"fit_regimes needs >= 2 distinct sizes, got {d}")
    group = np.searchsorted(distinct, s)
    cache = {}

    def fit(i, j):          # sizes distinct[i:j]: ((alpha, beta), SSE, max |error|)
        if (i, j) not in cache:
            sel = (group >= i) & (group < j)
            ab = fit_alpha_beta(ca[sel], cb[sel], t[sel], off[sel])
            err = (off[sel] + ca[sel] * ab[0] + cb[sel] * ab[1] - t[sel]) / t[sel]
            cache[i, j] = (ab, float(np.sum(err ** 2)), float(np.max(np.abs(err))))
        return cache[i, j]

    def best(k):            # (SSE, max |error|, edges) of the best k-regime split
        out = None
        for cuts in itertools.combinations(range(1, d), k - 1):
            edges = (0, *cuts, d)
            if k > 1 and any(b - a < min_sizes for a, b in zip(edges, edges[1:])):
                continue
            parts = [fit(a, b) for a, b in zip(edges, edges[1:])]
            cand = (sum(x[1] for x in parts), max(x[2] for x in parts), edges)
            if out is None or cand[0] < out[0]:
                out = cand
        return out

    chosen = best(1)
    for k in range(2, max_regimes + 1):
        if chosen[1] <= tolerance:
            break
        cand = best(k)
        if cand is None or cand[0] > 0.5 * chosen[0]:
            break
        chosen = cand
    edges = chosen[2]
    links = []
    for a, b in zip(edges, edges[1:]):
        alpha, beta = fit(a, b)[0]
        links.append(Link(alpha, 1.0 / beta if beta > 0 else math.inf, description))
    bounds = tuple(float(math.sqrt(distinct[c - 1] * distinct[c])) for c in edges[1:-1])
    return Regimes(tuple(links), bounds)


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


def collective_points(docs, kind, min_ranks=2):
    """Every measured size in allreduce/alltoallv benchmark JSONs, as dicts.

    Keys: ranks, ranks_per_node, bytes (the benchmark's size: the buffer for allreduce,
    the bytes sent to each peer for alltoallv), sent (bytes one rank sends in all),
    seconds (p50), oversubscribed. Runs with fewer than ``min_ranks`` ranks are left out.
    """
    pts = []
    for doc in docs:
        if doc.get("benchmark") != kind or doc.get("world_size", 1) < min_ranks:
            continue
        p = int(doc["world_size"])
        for row in doc.get("rows", []):
            stat = row.get("hpctrain")
            if stat is None or "bytes" not in row:
                continue
            pts.append({"ranks": p, "ranks_per_node": int(doc.get("ranks_per_node", p)),
                        "bytes": float(row["bytes"]),
                        "sent": float(row["bytes"]) * (p if kind == "alltoallv" else 1),
                        "seconds": float(stat["p50"]), "oversubscribed": oversubscribed(doc)})
    return pts


def _row(kind, pt, predicted):
    return {"benchmark": kind, "ranks": pt["ranks"], "bytes": pt["bytes"],
            "measured_s": pt["seconds"], "predicted_s": predicted,
            "rel_error": (predicted - pt["seconds"]) / pt["seconds"],
            "oversubscribed": pt["oversubscribed"]}


def fit_node_links(docs, max_regimes=3):
    """Fit the intra-node costs from allreduce and alltoallv benchmark JSONs.

    The local copy comes from the 1-rank alltoallv (a rank sending to itself only); the
    alltoallv's per-peer cost is fitted on what the local copy leaves of the multi-rank
    times, regimes keyed by the bytes per peer; the allreduce's by the buffer size.
    Runs with more ranks than cores on a node are left out of the fit (busy-polling
    ranks then wait for the scheduler, not the link) but still get a prediction.

    Returns:
        dict "allreduce"/"alltoallv"/"local_copy" -> (Regimes or None, list of point
        dicts: benchmark, ranks, bytes, measured_s, predicted_s, rel_error, oversubscribed).
    """
    out = {}
    ones = [pt for pt in collective_points(docs, "alltoallv", 1)
            if pt["ranks"] == 1 and not pt["oversubscribed"]]
    copy = None
    if len({pt["bytes"] for pt in ones}) >= 2:
        copy = fit_regimes([pt["bytes"] for pt in ones], np.ones(len(ones)),
                           [pt["bytes"] for pt in ones], [pt["seconds"] for pt in ones],
                           max_regimes=max_regimes, description="local copy, fitted from "
                           "alltoallv at 1 rank")
        out["local_copy"] = (copy, [_row("alltoallv", pt, Network(None, None, None, copy)
                                         .alltoallv(pt["sent"], 1, 1)) for pt in ones])
    else:
        out["local_copy"] = (None, [])
    dummy = Link(0.0, math.inf)
    for kind, terms in (("allreduce", allreduce_terms), ("alltoallv", alltoallv_terms)):
        pts = collective_points(docs, kind)
        fit = [pt for pt in pts if not pt["oversubscribed"]]
        if len({pt["bytes"] for pt in fit}) < 2:
            out[kind] = (None, [])
            continue
        coef = np.array([terms(pt["sent"], min(pt["ranks"], pt["ranks_per_node"])) for pt in fit])
        own = copy if kind == "alltoallv" else None
        offset = [_copy_cost(own, pt["bytes"]) for pt in fit] if own is not None else None
        regimes = fit_regimes([pt["bytes"] for pt in fit], coef[:, 0], coef[:, 1],
                              [pt["seconds"] for pt in fit], offset, max_regimes,
                              description=f"fitted from {kind}")
        net = Network(regimes, regimes, dummy, own)
        cost = net.allreduce if kind == "allreduce" else net.alltoallv
        out[kind] = (regimes, [_row(kind, pt, cost(pt["sent"], pt["ranks"], pt["ranks_per_node"]))
                               for pt in pts])
    return out


def _copy_cost(copy, s):
    ln = copy.at(s)
    return ln.latency_s + s * ln.beta


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

    def exchange_bytes(self, batch_per_rank, p):
        """Bytes one rank sends in each alltoallv of a step on ``p`` ranks."""
        return sparse_exchange_bytes(self.features, self.dim, p,
                                     batch_per_rank * self.ids_per_sample * self.unique_fraction)


def sparse_exchange_bytes(features, dim, p, unique):
    """Bytes one rank sends in each of the four exchanges of a sparse step.

    ``unique`` ids after deduplication: counts (``features`` int64 per peer), the ids
    (8 B each), their rows back (``4 dim`` B each) and the rows' gradients (``4 dim`` B).
    """
    return {"counts": 8.0 * features * p, "ids": 8.0 * unique, "rows": 4.0 * dim * unique,
            "grads": 4.0 * dim * unique}


def sparse_exchange_time(network, nbytes, p, ranks_per_node, node_exchange="alltoallv"):
    """Seconds of the four exchanges of a sparse step (``nbytes``: sparse_exchange_bytes).

    With ``node_exchange="shm"`` rows and gradients cross only the network by Alltoallv;
    inside the node they go through a shared window (:meth:`Network.alltoallv`). When the
    world is one node, counts and ids go through the request board too: one
    synchronisation for both, no bytes by MPI.
    """
    if node_exchange not in ("alltoallv", "shm"):
        raise ValueError(f"node_exchange must be 'alltoallv' or 'shm', got {node_exchange!r}")
    shm = node_exchange == "shm"
    board = shm and p <= ranks_per_node
    t = 0.0
    for k, b in nbytes.items():
        if board and k == "ids":
            continue                     # posted with the counts, read after their sync
        t += network.alltoallv(b, p, ranks_per_node, shm and (board or k in ("rows", "grads")))
    return t


@dataclasses.dataclass
class ComputeRates:
    """Measured compute costs of one rank (at ``threads`` threads, machine not oversubscribed).

    Attributes:
        s_per_flop: seconds per dense FLOP.
        s_per_id: seconds per sparse id (dedup, route, lookup, pool, update).
        s_fixed: sparse per-step cost independent of the batch (per-table calls).
        contention_per_rank: ``kappa`` of the memory contention ``c(r) = 1 + kappa (r-1)``
            that slows sparse work when ``r`` ranks of a node are busy at once.
    """
    s_per_flop: float = 1.0 / 20e9
    s_per_id: float = 100e-9
    s_fixed: float = 1e-3
    threads: int = 1
    contention_per_rank: float = 0.0

    def contention(self, busy_ranks):
        """Slow-down of sparse work with ``busy_ranks`` ranks busy on one node.

        ``1 + kappa (r - 1)``: every further busy rank takes the same share of the
        node's memory bandwidth, so a node's sparse throughput ``r / c(r)`` saturates
        at ``1 / kappa`` ranks' worth (Gunther's contention term).
        """
        return 1.0 + self.contention_per_rank * max(busy_ranks - 1, 0)

    def step(self, workload, batch, busy_ranks=1):
        """Compute seconds of one step with local batch ``batch``."""
        sparse = self.s_fixed + batch * workload.ids_per_sample * self.s_per_id
        return (batch * workload.flops_per_sample * self.s_per_flop
                + sparse * self.contention(busy_ranks))


@dataclasses.dataclass
class CostModel:
    """Predicts step time, throughput and efficiency of a workload at any rank count.

    Attributes:
        data_threads: busy thread-share per rank besides the compute threads: the share
            of a core the reader's prefetch thread keeps busy (0 with ``data.prefetch = 0``,
            at most 1; measured as the train benchmark's ``reader_busy_share``). Free while
            the node has idle cores, a share of the cores when it has none.
        node_exchange: how rows and gradients reach ranks of the same node: "alltoallv"
            or "shm" (a shared window; ``ShardedEmbedding(exchange=...)``).
    """
    network: Network
    compute: ComputeRates
    ranks_per_node: int = 1
    cores_per_node: int = 1
    data_threads: float = 0.0
    node_exchange: str = "alltoallv"

    def oversubscription(self, p):
        """Compute slow-down when a node's ranks run more busy threads than it has cores."""
        r = min(p, self.ranks_per_node)
        return max(1.0, r * (self.compute.threads + self.data_threads) / self.cores_per_node)

    def step(self, workload, p, batch_per_rank):
        """Phase times (seconds) of one step on ``p`` ranks."""
        r = min(p, self.ranks_per_node)
        t = {"compute": self.compute.step(workload, batch_per_rank, r) * self.oversubscription(p),
             "allreduce": self.network.allreduce(4.0 * workload.dense_params, p, r),
             "alltoallv": sparse_exchange_time(self.network, workload.exchange_bytes(
                 batch_per_rank, p), p, r, self.node_exchange)}
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


# --------------------------------------------------------------------------- step benchmarks

def _oversub(doc):
    """Compute slow-down of a run that put more rank-threads on a node than it has cores."""
    v = doc.get("versions") or {}
    cores, threads = v.get("cpu_count") or 0, v.get("threads") or 1
    per_node = doc.get("ranks_per_node", doc.get("world_size", 1))
    return max(1.0, per_node * threads / cores) if cores else 1.0


def _point(doc, kind, measured, predicted, calibration=False):
    return {"benchmark": kind, "ranks": doc["world_size"], "mode": doc.get("scaling_mode") or "",
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
            if r["ranks"] > 1 and not r["oversubscribed"] and r["primary"]:
                kappas.append((c - 1.0) / (min(r["ranks"], r["ranks_per_node"]) - 1))
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


def _train_workload(res, u):
    """The train benchmark's DLRM (26 one-table features, 13 dense, 512-256-64 / 512-256-1)."""
    return Workload(13, 26, float(res.get("bag", 1)), int(res["dim"]), (512, 256, 64),
                    (512, 256, 1), u)


def train_rates_and_points(docs, network, rates, u, node_exchange="shm", data_threads=None):
    """Calibrate ``rates`` on the 1-rank train runs; predict every train run.

    The split between dense FLOPs and sparse ids keeps the ratio the dense and
    exchange benchmarks measured; both are scaled so the 1-rank DLRM step is exact.
    ``data_threads`` is the reader's load per rank (default: :func:`train_data_threads`).
    """
    if data_threads is None:
        data_threads = train_data_threads(docs)[0]
    runs = [d for d in docs if d.get("benchmark") == "train" and d.get("results")]
    ones = [d for d in runs if d["world_size"] == 1]
    if not ones:
        return rates, []
    scale = []
    for d in ones:
        res = d["results"][0]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)), 1,
                          _cores(d), data_threads, node_exchange)
        t = model.step(_train_workload(res, u), 1, res["global_batch"])
        scale.append((res["median_step_s"] - t["allreduce"] - t["alltoallv"]) / t["compute"])
    k = float(np.mean(scale))
    rates = dataclasses.replace(rates, s_per_flop=rates.s_per_flop * k,
                                s_per_id=rates.s_per_id * k, s_fixed=rates.s_fixed * k)
    points = []
    for d in runs:
        res, p = d["results"][0], d["world_size"]
        model = CostModel(network, dataclasses.replace(rates, threads=_threads(d)),
                          d.get("ranks_per_node", p), _cores(d), data_threads,
                          node_exchange)
        pred = model.step(_train_workload(res, u), p, res["global_batch"] / p)["step"]
        points.append(_point(d, "train", res["median_step_s"], pred, calibration=p == 1))
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


# --------------------------------------------------------------------------- command line

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
    import argparse
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
    import argparse
    p = argparse.ArgumentParser(prog="python -m hpctrain.bench costmodel",
                                description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", default=[os.path.join("bench-results", "scaling")],
                   help="benchmark JSON files or folders (the scaling sweep's output)")
    p.add_argument("--interconnect", default="ib_hdr", choices=sorted(INTERCONNECTS))
    p.add_argument("--latency-us", type=float, default=None, help="override the link latency")
    p.add_argument("--bandwidth-GBps", type=float, default=None,
                   help="override the per-node link bandwidth (GB/s, one direction)")
    p.add_argument("--net-regimes", type=parse_net_regimes, default=None,
                   help="inter-node link per message-size regime, FROM_BYTES:LATENCY_US:GBPS,"
                        "... (e.g. 0:1.3:12,64K:1.5:23); replaces --interconnect")
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
    return p.parse_args(argv)


def _summary(points):
    """Lines of |error| statistics: ranks <= cores (with and without calibration points)."""
    out = []
    for label, sel in (("cores >= ranks", lambda pt: not pt.get("oversubscribed")),
                       ("cores >= ranks, calibration points left out",
                        lambda pt: not pt.get("oversubscribed") and not pt.get("calibration")),
                       ("oversubscribed", lambda pt: pt.get("oversubscribed"))):
        errs = np.abs([pt["rel_error"] for pt in points if sel(pt)])
        if errs.size:
            out.append(f"# |error| {label}: median {np.median(errs) * 100:.1f}%, max "
                       f"{errs.max() * 100:.1f}%, {int((errs <= 0.25).sum())} of {errs.size} "
                       f"points within 25%")
    return out


def main(argv=None):
    from hpctrain.bench.common import print_table
    args = parse_args(argv)
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
    if args.net_regimes is not None:
        net = args.net_regimes
        print("#   inter-node (--net-regimes):")
    else:
        base = INTERCONNECTS[args.interconnect]
        net = Regimes.of(Link(args.latency_us * 1e-6 if args.latency_us is not None
                              else base.latency_s,
                              args.bandwidth_GBps * 1e9 if args.bandwidth_GBps is not None
                              else base.bandwidth_Bps, base.description))
        print(f"#   inter-node {args.interconnect} ({base.description}):")
    for line in net.describe():
        print(f"#     {line}")
    network = Network(regimes["allreduce"], regimes["alltoallv"], net, regimes["local_copy"])

    points = fitted["local_copy"][1] + fitted["allreduce"][1] + fitted["alltoallv"][1]
    compute, u, step_points, (data_threads, data_src) = fit_compute(docs, network, args)
    points += step_points
    print(f"#   compute per rank: {1e-9 / compute.s_per_flop:.3g} GFLOP/s dense, "
          f"{compute.s_per_id * 1e9:.4g} ns per sparse id + {compute.s_fixed * 1e3:.3g} ms "
          f"per step; sparse contention kappa {compute.contention_per_rank:.3f} per busy rank; "
          f"unique fraction {u:.3f}")
    print(f"#   reader load: {data_threads:.3f} of a core per rank ({data_src})")
    if points:
        print("# predicted vs measured, every measured point (size: allreduce buffer, alltoallv "
              "bytes per peer; * = more ranks than cores: outside the model, not fitted; "
              "c = calibration point)")
        print_table(["benchmark", "ranks", "size/mode", "measured ms", "predicted ms", "error %"],
                    [[pt["benchmark"], f"{pt['ranks']}{'*' if pt.get('oversubscribed') else ''}",
                      pt.get("bytes", pt.get("mode", "")), pt["measured_s"] * 1e3,
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
    print(f"# prediction: DLRM {args.features} features x dim {args.dim}, "
          f"{workload.dense_params:,} dense parameters, {args.mode} scaling, batch {args.batch}"
          f"{' per rank' if args.mode == 'weak' else ' global'}, {args.ranks_per_node} ranks/node, "
          f"{args.threads} thread(s)/rank, "
          f"{'--net-regimes' if args.net_regimes is not None else args.interconnect}")
    print_table(["ranks", "nodes", "compute ms", "allreduce ms", "alltoallv ms", "step ms",
                 "samples/s", "efficiency"],
                [[r["ranks"], r["nodes"], r["compute_s"] * 1e3, r["allreduce_s"] * 1e3,
                  r["alltoallv_s"] * 1e3, r["step_s"] * 1e3, r["samples_per_s"],
                  f"{r['efficiency']:.3f}"] for r in rows])
    if args.json:
        links = {"allreduce_node": network.allreduce_node.as_dicts(),
                 "alltoallv_node": network.alltoallv_node.as_dicts(),
                 "local_copy": network.local_copy.as_dicts() if network.local_copy else None,
                 "net": network.net.as_dicts()}
        out = {"links": links, "compute": dataclasses.asdict(compute),
               "workload": dataclasses.asdict(workload), "points": points, "prediction": rows,
               "data_threads": {"share": data_threads, "source": data_src},
               "args": {k: (v.as_dicts() if isinstance(v, Regimes) else v)
                        for k, v in vars(args).items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
