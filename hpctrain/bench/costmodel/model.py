"""The cost formulas: alpha-beta collectives, a DLRM workload and the step it costs.

One step on ``p`` ranks (``r`` per node, ``N = p / r`` nodes), local batch ``b``:

    T(p) = [T_dense(b) * c_d(r) + T_sparse(b) * c(r)] * max(1, r * (threads + d) / cores)
         + T_allreduce(4 * dense_params, p)                 (one fused allreduce)
         + sum over the exchanges of T_alltoallv(bytes, p)   (counts, ids, rows, grads)

``c(r)`` is the memory contention of ``r`` busy ranks on a node, measured by the exchange
benchmark, ``c_d(r)`` that of their dense work (the slowest rank's), measured by the train
benchmark's bare matrix products; ``d`` is the reader's load, the share of a core its prefetch thread keeps busy
per rank (measured by the 1-rank train run as ``reader_busy_share``). The collectives are
piecewise alpha-beta: every message-size regime (eager, rendezvous, ...) has its own
latency ``a`` and seconds per byte ``B``, with ``s`` the bytes per peer of an alltoallv
(``m`` bytes sent per rank in all):

    T_allreduce(n) = [r > 1] (2 ceil(log2 r) a_node(n) + 2 (r-1)/r n B_node(n))
                   + [N > 1] (2 ceil(log2 N) a_net(n)  + 2 (N-1)/N n B_net(n))
    T_alltoallv(m) = a_copy(s) + s B_copy(s)                 (the block a rank keeps)
                   + (r-1) (a_node(s) + s B_node(s))
                   + [N > 1] ((p-r) a_net(s) + r (p-r) s B_net(s))

Nothing here reads a measurement: the regimes and their parameters are fitted by
``fit_links`` (the intra-node collectives and the local copy), the compute rates by
``fit_rates``; the inter-node link comes from :data:`INTERCONNECTS`, the command line or
``fit_links.fit_net_links`` (one per measured node count, :class:`ByNodes`).
The formulas, what is fitted from what, and the assumptions are in docs/scaling.md.
"""
import bisect
import dataclasses
import math


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


@dataclasses.dataclass(frozen=True)
class ByNodes:
    """Inter-node :class:`Regimes` fitted at several node counts.

    The link a collective over ``N`` nodes sees is the one fitted from the collectives
    measured over ``N`` nodes: how many flows share each node's link, the switch (or the
    emulated hosts' token buckets and the one machine's cores) changes with ``N``, and an
    alpha-beta pair fitted at 2 nodes need not hold at 4. A node count that was not
    measured takes the link of the largest measured count below it (the smallest
    measured one below all of them).

    Attributes:
        regimes: ``((nodes, Regimes), ...)``, node counts increasing.
    """
    regimes: tuple

    def __post_init__(self):
        if not self.regimes:
            raise ValueError("ByNodes needs at least one (nodes, Regimes) pair")
        counts = [n for n, _ in self.regimes]
        if counts != sorted(set(counts)):
            raise ValueError(f"ByNodes: node counts must increase, got {counts}")

    def at_nodes(self, nodes):
        """The Regimes of a collective over ``nodes`` nodes."""
        counts = [n for n, _ in self.regimes]
        i = bisect.bisect_right(counts, nodes) - 1
        return self.regimes[max(i, 0)][1]

    def as_dicts(self):
        """JSON form: ``{"<nodes>": Regimes.as_dicts(), ...}``."""
        return {str(n): r.as_dicts() for n, r in self.regimes}

    def describe(self):
        """The header lines of every node count's Regimes."""
        out = []
        for n, r in self.regimes:
            out.append(f"over {n} nodes:")
            out += [f"  {line}" for line in r.describe()]
        return out


def _net_regimes(x):
    """``x`` (a Link, Regimes, ByNodes or None) as Regimes or ByNodes."""
    return x if isinstance(x, ByNodes) else Regimes.of(x)


def _at_nodes(x, nodes):
    """The Regimes of ``x`` (Regimes or ByNodes) for a collective over ``nodes`` nodes."""
    return x.at_nodes(nodes) if isinstance(x, ByNodes) else x


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


def alltoallv_net_terms(nbytes, p, r):
    """(latency, byte) coefficients of an alltoallv's inter-node part, ``r`` ranks per node.

    A rank sends ``p - r`` messages off its node; the node's ``r`` ranks share its link,
    which carries ``r (p - r) s`` bytes (``s = nbytes / p`` per peer).
    """
    if p <= r:
        return 0.0, 0.0
    return float(p - r), r * (p - r) * nbytes / p


@dataclasses.dataclass
class Network:
    """Intra-node costs fitted per collective, the local copy, and the inter-node link.

    Attributes:
        allreduce_node, alltoallv_node: Regimes (or one Link) inside one node.
        net: the inter-node Regimes (or Link), or :class:`ByNodes` (one per node count).
        local_copy: Regimes of the block an alltoallv rank sends to itself (latency =
            the per-call cost, bandwidth = the copy's); None: free.
        allreduce_net: the inter-node Regimes of the allreduce when fitted apart from the
            alltoallv's (its reduction arithmetic is inside ``B``), or ByNodes;
            None: ``net``.
    """
    allreduce_node: Regimes
    alltoallv_node: Regimes
    net: Regimes
    local_copy: Regimes = None
    allreduce_net: Regimes = None

    def __post_init__(self):
        for name in ("allreduce_node", "alltoallv_node", "local_copy"):
            setattr(self, name, Regimes.of(getattr(self, name)))
        for name in ("net", "allreduce_net"):
            setattr(self, name, _net_regimes(getattr(self, name)))

    def allreduce(self, nbytes, p, ranks_per_node):
        """Seconds of one allreduce of ``nbytes`` over ``p`` ranks."""
        r = min(p, ranks_per_node)
        nodes = math.ceil(p / r)
        ln = self.allreduce_node.at(nbytes)
        ca, cb = allreduce_terms(nbytes, r)
        t = ca * ln.latency_s + cb * ln.beta
        ln = _at_nodes(self.allreduce_net or self.net, nodes).at(nbytes)
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
            t += copy_cost(self.local_copy, s)
        if p <= 1:
            return t
        r = min(p, ranks_per_node)
        if r > 1:
            ln = self.alltoallv_node.at(0.0 if node_shm else s)
            t += (r - 1) * (ln.latency_s + (0.0 if node_shm else s * ln.beta))
        if p > r:
            ca, cb = alltoallv_net_terms(nbytes, p, r)
            ln = _at_nodes(self.net, math.ceil(p / r)).at(s)
            t += ca * ln.latency_s + cb * ln.beta
        return t


def copy_cost(copy, s):
    """Seconds of the block of ``s`` bytes an alltoallv rank sends to itself (Regimes ``copy``)."""
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
        dense_contention_per_rank: ``kappa_d`` of the same form for the dense work,
            ``c_d(r) = 1 + kappa_d (r-1)``: the slowest of ``r`` busy ranks' matrix
            products against one rank's alone (measured by the train benchmark's bare
            products, timed on every rank at once; 0: dense work free of contention).
    """
    s_per_flop: float = 1.0 / 20e9
    s_per_id: float = 100e-9
    s_fixed: float = 1e-3
    threads: int = 1
    contention_per_rank: float = 0.0
    dense_contention_per_rank: float = 0.0

    def contention(self, busy_ranks):
        """Slow-down of sparse work with ``busy_ranks`` ranks busy on one node.

        ``1 + kappa (r - 1)``: every further busy rank takes the same share of the
        node's memory bandwidth, so a node's sparse throughput ``r / c(r)`` saturates
        at ``1 / kappa`` ranks' worth (Gunther's contention term).
        """
        return 1.0 + self.contention_per_rank * max(busy_ranks - 1, 0)

    def dense_contention(self, busy_ranks):
        """Slow-down of the slowest rank's dense work with ``busy_ranks`` ranks busy at once.

        ``1 + kappa_d (r - 1)``. Measured as the slowest rank's (a synchronous step waits
        for it at the allreduce), so it holds both the cores' and memory's contention and
        the wait for the slowest rank's dense work.
        """
        return 1.0 + self.dense_contention_per_rank * max(busy_ranks - 1, 0)

    def step(self, workload, batch, busy_ranks=1, dense_contention=None):
        """Compute seconds of one step with local batch ``batch``.

        ``dense_contention``: a measured ``c_d`` for this run in place of ``c_d(r)``.
        """
        sparse = self.s_fixed + batch * workload.ids_per_sample * self.s_per_id
        c_d = self.dense_contention(busy_ranks) if dense_contention is None else dense_contention
        return (batch * workload.flops_per_sample * self.s_per_flop * c_d
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
        ranks_per_machine: ranks sharing one machine's cores and memory when nodes are
            emulated on it (benchmarks/multihost/): they, not a node's ranks, contend and
            oversubscribe, and ``cores_per_node`` is then the machine's. None: a node is
            a machine.
    """
    network: Network
    compute: ComputeRates
    ranks_per_node: int = 1
    cores_per_node: int = 1
    data_threads: float = 0.0
    node_exchange: str = "alltoallv"
    ranks_per_machine: int = None

    def busy_ranks(self, p):
        """Ranks sharing the cores and memory of one machine on ``p`` ranks."""
        return min(p, self.ranks_per_machine or self.ranks_per_node)

    def oversubscription(self, p):
        """Compute slow-down when a node's ranks run more busy threads than it has cores."""
        busy = self.busy_ranks(p)
        return max(1.0, busy * (self.compute.threads + self.data_threads) / self.cores_per_node)

    def step(self, workload, p, batch_per_rank, dense_contention=None):
        """Phase times (seconds) of one step on ``p`` ranks.

        ``dense_contention``: a run's measured ``c_d`` (:meth:`ComputeRates.step`).
        """
        r = min(p, self.ranks_per_node)
        t = {"compute": self.compute.step(workload, batch_per_rank, self.busy_ranks(p),
                                          dense_contention) * self.oversubscription(p),
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

