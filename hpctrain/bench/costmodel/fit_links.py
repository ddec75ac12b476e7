"""Fitting the network: alpha-beta pairs and message-size regimes from the collective benchmarks.

The intra-node allreduce and alltoallv and the alltoallv's local copy (its 1-rank runs)
are fitted from the one-node ``allreduce`` / ``alltoallv`` benchmark JSONs; the
inter-node link, when asked for (``fit_net_links``), from the multi-node ones (real nodes
or the emulated hosts of benchmarks/multihost/). The fits are in relative error so that
small messages count as much as large ones.
"""
import itertools
import math

import numpy as np

from hpctrain.bench.costmodel.model import (ByNodes, Link, Network, Regimes, copy_cost,
                                            allreduce_terms, alltoallv_net_terms,
                                            alltoallv_terms)


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
    one regime, each count of regimes up to ``max_regimes`` is tried in turn while the
    chosen fit leaves some point off by more than ``tolerance`` (relative); it replaces
    the chosen one when the best placement of its boundaries (all are tried) at least
    halves the sum of squared relative errors: a protocol switch (eager to rendezvous,
    shared-memory cells to single copy) is taken where one alpha-beta pair clearly
    fails, not to chase the noise of single sizes. A count that does not halve it does
    not end the search: two switches can need two boundaries before the error falls. A
    boundary lies half-way (geometric mean) between the largest size of one regime and the
    smallest of the next.

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
        if cand is not None and cand[0] <= 0.5 * chosen[0]:
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


def ranks_per_machine(doc):
    """Ranks of a benchmark run that shared one machine's cores: those of a node, or of
    every emulated node on the machine (``ranks_per_machine``, recorded since emulated
    hosts exist)."""
    per_node = doc.get("ranks_per_node", doc.get("world_size", 1))
    return max(per_node, doc.get("ranks_per_machine") or per_node)


def oversubscribed(doc):
    """True when a benchmark ran more rank-threads on a machine than it has cores."""
    v = doc.get("versions") or {}
    cores, threads = v.get("cpu_count"), v.get("threads") or 1
    return bool(cores) and ranks_per_machine(doc) * threads > cores


def collective_points(docs, kind, min_ranks=2):
    """Every measured size in allreduce/alltoallv benchmark JSONs, as dicts.

    Keys: ranks, ranks_per_node, nodes, bytes (the benchmark's size: the buffer for
    allreduce, the bytes sent to each peer for alltoallv), sent (bytes one rank sends in
    all), seconds (p50), oversubscribed. Runs with fewer than ``min_ranks`` ranks are left
    out.
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
                        "nodes": int(doc.get("nodes", 1)),
                        "bytes": float(row["bytes"]),
                        "sent": float(row["bytes"]) * (p if kind == "alltoallv" else 1),
                        "seconds": float(stat["p50"]), "oversubscribed": oversubscribed(doc)})
    return pts


def _row(kind, pt, predicted):
    return {"benchmark": kind, "ranks": pt["ranks"], "nodes": pt.get("nodes", 1),
            "bytes": pt["bytes"],
            "measured_s": pt["seconds"], "predicted_s": predicted,
            "rel_error": (predicted - pt["seconds"]) / pt["seconds"],
            "oversubscribed": pt["oversubscribed"]}


def fit_node_links(docs, max_regimes=3):
    """Fit the intra-node costs from the one-node allreduce and alltoallv benchmark JSONs.

    The local copy comes from the 1-rank alltoallv (a rank sending to itself only); the
    alltoallv's per-peer cost is fitted on what the local copy leaves of the multi-rank
    times, regimes keyed by the bytes per peer; the allreduce's by the buffer size.
    Runs with more ranks than cores on a node are left out of the fit (busy-polling
    ranks then wait for the scheduler, not the link) but still get a prediction.
    Runs over several nodes are left to :func:`fit_net_links` / :func:`net_points`.

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
        pts = [pt for pt in collective_points(docs, kind) if pt["nodes"] == 1]
        fit = [pt for pt in pts if not pt["oversubscribed"]]
        if len({pt["bytes"] for pt in fit}) < 2:
            out[kind] = (None, [])
            continue
        coef = np.array([terms(pt["sent"], min(pt["ranks"], pt["ranks_per_node"])) for pt in fit])
        own = copy if kind == "alltoallv" else None
        offset = [copy_cost(own, pt["bytes"]) for pt in fit] if own is not None else None
        regimes = fit_regimes([pt["bytes"] for pt in fit], coef[:, 0], coef[:, 1],
                              [pt["seconds"] for pt in fit], offset, max_regimes,
                              description=f"fitted from {kind}")
        net = Network(regimes, regimes, dummy, own)
        cost = net.allreduce if kind == "allreduce" else net.alltoallv
        out[kind] = (regimes, [_row(kind, pt, cost(pt["sent"], pt["ranks"], pt["ranks_per_node"]))
                               for pt in pts])
    return out


def _node_part(network, kind, pt):
    """Seconds of a multi-node collective point that happen inside its node (copy, peers)."""
    r = min(pt["ranks"], pt["ranks_per_node"])
    if kind == "allreduce":
        if r <= 1:
            return 0.0
        ln = network.allreduce_node.at(pt["bytes"])
        ca, cb = allreduce_terms(pt["sent"], r)
        return ca * ln.latency_s + cb * ln.beta
    t = copy_cost(network.local_copy, pt["bytes"]) if network.local_copy is not None else 0.0
    if r > 1:
        ln = network.alltoallv_node.at(pt["bytes"])
        t += (r - 1) * (ln.latency_s + pt["bytes"] * ln.beta)
    return t


def _net_terms(kind, pt):
    r = min(pt["ranks"], pt["ranks_per_node"])
    if kind == "allreduce":
        return allreduce_terms(pt["sent"], pt["nodes"])
    return alltoallv_net_terms(pt["sent"], pt["ranks"], r)


def fit_net_links(docs, network, max_regimes=3):
    """Fit the inter-node link from the multi-node allreduce and alltoallv benchmark JSONs.

    Each collective gets its own regimes, fitted (as inside a node) on what the node's own
    part leaves of the measured time: for the allreduce the Rabenseifner terms over the
    ``N`` nodes, ``t - node(n) = 2 ceil(log2 N) a + 2 (N-1)/N n B``; for the alltoallv
    ``t - copy(s) - (r-1)(a_node + s B_node) = (p-r) a + r (p-r) s B``.

    Every measured node count gets its own fit (:class:`~.model.ByNodes`): the flows that
    share a node's link, the switch or, with emulated nodes, the machine's cores and the
    token buckets change with ``N``. At a node count where some runs have no more
    rank-threads than cores, only those are fitted (busy-polling ranks that wait for the
    scheduler are not the link); where every run oversubscribes (emulated nodes beyond
    the machine's cores), the link is fitted in that state, as the steps there run.

    Args:
        network: the intra-node :class:`Network` (``fit_node_links``); its ``net`` unused.

    Returns:
        dict "allreduce"/"alltoallv" -> Regimes (one node count measured), ByNodes
        (several), or None (fewer than 2 sizes measured at every node count).
    """
    out = {}
    for kind in ("allreduce", "alltoallv"):
        pts = [pt for pt in collective_points(docs, kind) if pt["nodes"] > 1]
        fits = []
        for nodes in sorted({pt["nodes"] for pt in pts}):
            at = [pt for pt in pts if pt["nodes"] == nodes]
            fit = [pt for pt in at if not pt["oversubscribed"]] or at
            if len({pt["bytes"] for pt in fit}) < 2:
                continue
            state = ", ranks > cores" if fit[0]["oversubscribed"] else ""
            coef = np.array([_net_terms(kind, pt) for pt in fit])
            fits.append((nodes, fit_regimes(
                [pt["bytes"] for pt in fit], coef[:, 0], coef[:, 1],
                [pt["seconds"] for pt in fit], [_node_part(network, kind, pt) for pt in fit],
                max_regimes, description=f"inter-node, fitted from {kind} over {nodes} "
                                         f"nodes{state}")))
        out[kind] = (None if not fits else fits[0][1] if len(fits) == 1
                     else ByNodes(tuple(fits)))
    return out


def net_points(docs, network):
    """Every measured size of the multi-node allreduce/alltoallv runs against ``network``."""
    rows = []
    for kind in ("allreduce", "alltoallv"):
        cost = network.allreduce if kind == "allreduce" else network.alltoallv
        rows += [_row(kind, pt, cost(pt["sent"], pt["ranks"], pt["ranks_per_node"]))
                 for pt in collective_points(docs, kind) if pt["nodes"] > 1]
    return rows
