"""The hybrid step: parameter servers and worker groups, a term on top of a worker's compute.

One clock of a worker (docs/scaling.md, "The hybrid step"), from the worker's compute ``C``
(its step less the time blocked on reads: dense forward and backward, the group allreduce,
deduplication, pooling, packing the push), the pull round trip ``R(u) = r0 + r1 u`` of ``u``
ids, the dense pull round trip ``D``, the server's apply time per clock ``A`` and its CPU
time per clock ``K`` (applies and reads), with staleness bound ``s``::

    s = 0 (BSP):  T = C + I + A + max(R(u), D)  the next clock's reads are answered only
                                                after this clock is applied, which waits
                                                for the slowest of the W workers: I =
                                                E[max of W] - mean = e_W sigma_C
    s >= 1:       T = max(C + max(0, max(R(u), D) - C), K)
                                                prefetch: the next reads travel during the
                                                dense step; the server is a pipeline stage
    ranks > cores (servers and workers share the cores):
                  T >= (W_c C + S_c K) / cores  W_c workers and S_c servers on ``cores``

Stragglers, a delay ``d`` (the benchmark's transient one: each clock, with probability ``p``,
one of the ``G`` groups sleeps ``d``; the persistent one: one group sleeps ``d`` every clock):

    transient:   BSP  T + p d          (every clock waits for whichever group slept)
                 SSP  T + p d / G      (each group's own expected delay; the bound s lets the
                                        others run on, so the job moves at the mean rate)
    persistent:  T + d for every s     (SSP bounds the lead; it cannot make up throughput)

Fitted from ``python -m hpctrain.bench hybrid``'s JSON (``fit_hybrid``): ``r0, r1`` by least
squares on the pull round trip p50 against the ids per pull, ``D`` its dense pull p50, ``A``
the median apply time of a BSP clock (the workers idle while the server applies), ``K`` the
median server CPU per clock over the cases; ``C`` of every case is the worker compute measured
in the BSP case of the same layout, ``sigma_C`` the spread of its per-step compute (``e_W``:
the expected maximum of W standard normals, 0.56 for 2, 1.03 for 4). ``pull_rtt_over`` adds a
network between workers and servers for predictions beyond one machine.
"""
import dataclasses
import math

import numpy as np

from hpctrain.bench.costmodel.fit_links import fit_alpha_beta


@dataclasses.dataclass(frozen=True)
class HybridRates:
    """Measured costs of the hybrid step (seconds).

    Attributes:
        rtt_fixed_s, rtt_per_id_s: the pull round trip ``R(u) = rtt_fixed_s + u rtt_per_id_s``.
        dense_rtt_s: the dense pull round trip ``D`` (all parameters).
        apply_s: the server's apply time per clock ``A`` (every worker's push, the dense
            optimizer on its slice).
        server_cpu_s: the server's CPU time per clock ``K`` (applies, reads, messages).
    """
    rtt_fixed_s: float
    rtt_per_id_s: float
    dense_rtt_s: float
    apply_s: float
    server_cpu_s: float

    def pull_rtt(self, ids):
        """Seconds of one pull of ``ids`` ids."""
        return self.rtt_fixed_s + ids * self.rtt_per_id_s


def expected_max_normal(n):
    """E[max of n independent standard normals] (to 4 digits up to 8; beyond, the Gumbel
    approximation, within 10%)."""
    table = {1: 0.0, 2: 0.5642, 3: 0.8463, 4: 1.0294, 5: 1.1630, 6: 1.2672, 7: 1.3522,
             8: 1.4236}
    if n in table:
        return table[n]
    a = math.sqrt(2.0 * math.log(n))
    return a - (math.log(math.log(n)) + math.log(4.0 * math.pi) - 2.0 * 0.5772) / (2.0 * a)


def pull_rtt_over(link, ids, dim, rates):
    """The pull round trip of ``ids`` ids with a network ``link`` (a ``model.Link``) between
    worker and server: the measured one plus a latency each way, the ids (8 B) out and their
    rows (4 ``dim`` B) back."""
    return (rates.pull_rtt(ids) + 2.0 * link.latency_s
            + ids * (8.0 + 4.0 * dim) * link.beta)


def hybrid_step(rates, compute_s, ids, staleness, groups=1, straggler=None, workers=1,
                servers=1, cores=None, pull_rtt_s=None, compute_std_s=0.0):
    """Phase times (seconds) of one hybrid clock.

    Args:
        rates: ``HybridRates``.
        compute_s: the worker's compute per clock ``C``.
        ids: ids per pull ``u``.
        staleness: ``s`` (0: BSP; None: ASP, which never waits for a clock).
        groups: ``G``.
        straggler: None, or ``(kind, delay_s, p)`` with kind "transient" / "persistent".
        workers, servers, cores: ranks sharing ``cores`` cores (None: not oversubscribed).
        pull_rtt_s: ``R(u)`` if not ``rates.pull_rtt(ids)`` (e.g. ``pull_rtt_over``).
        compute_std_s: ``sigma_C``, the spread of a worker's compute from step to step: a
            BSP clock waits for the slowest of the ``workers`` (an SSP one does not).

    Returns:
        dict: compute, blocked (imbalance included), imbalance, server, shared (the cores'
        bound), straggler, step.
    """
    c = float(compute_s)
    rtt = max(rates.pull_rtt(ids) if pull_rtt_s is None else pull_rtt_s, rates.dense_rtt_s)
    bsp = staleness == 0
    imbalance = 0.0
    if bsp:
        imbalance = expected_max_normal(max(int(workers), 1)) * float(compute_std_s)
        blocked = imbalance + rates.apply_s + rtt
        step = c + blocked
    else:
        blocked = max(0.0, rtt - c)
        step = max(c + blocked, rates.server_cpu_s)
    shared = 0.0
    if cores and workers + servers > cores:
        shared = (workers * c + servers * rates.server_cpu_s) / cores
        step = max(step, shared)
    extra = 0.0
    if straggler is not None:
        kind, delay, p = straggler
        if kind == "persistent":
            extra = delay
        elif kind == "transient":
            extra = p * delay if bsp else p * delay / max(groups, 1)
        else:
            raise ValueError(f"straggler kind {kind!r}: expected 'transient' or 'persistent'")
    return {"compute": c, "blocked": blocked, "imbalance": imbalance,
            "server": rates.server_cpu_s, "shared": shared, "straggler": extra,
            "step": step + extra}


def fit_hybrid(doc):
    """``HybridRates`` from a ``bench hybrid`` JSON document (``doc``: the parsed dict).

    Raises:
        ValueError: the document has no pull round trips or no BSP throughput case.
    """
    rtt = doc.get("pull_rtt") or {}
    pts = rtt.get("sparse") or []
    if len(pts) < 2:
        raise ValueError("bench hybrid JSON: the pull round trip needs >= 2 sizes (section rtt)")
    r0, r1 = fit_alpha_beta([1.0] * len(pts), [p["ids"] for p in pts], [p["p50_s"] for p in pts])
    cases = [r for r in doc.get("throughput", []) + doc.get("stragglers", [])
             if r.get("mode") == "hybrid"]
    bsp = [r for r in cases if r["consistency"] == "bsp" and r.get("straggler") is None]
    if not bsp:
        raise ValueError("bench hybrid JSON: no BSP case (section throughput)")
    apply_s = float(np.median([1e-3 * (r.get("apply_ms_p50") or r["apply_ms_per_clock"])
                               for r in bsp]))
    cpu_s = float(np.median([1e-3 * r["server_cpu_ms_per_clock"] for r in cases]))
    return HybridRates(r0, r1, float(rtt["dense"]["p50_s"]), apply_s, cpu_s)


def hybrid_points(doc, rates):
    """Predicted vs measured seconds per clock of every hybrid case of ``doc``.

    A case's measured clock is its global batch over its samples/s (the slowest worker's
    mean clock, stragglers included); its ``C`` is the BSP case's of the same layout and
    section (the no-straggler BSP run for the straggler cases).
    """
    lay = doc.get("layout", {})
    cores = lay.get("cores")
    out = []
    for section in ("throughput", "stragglers"):
        cases = [r for r in doc.get(section, []) if r.get("mode") == "hybrid"]
        base = {r["groups"]: r for r in cases
                if r["consistency"] == "bsp" and r.get("straggler") is None}
        for r in cases:
            b = base.get(r["groups"])
            if b is None:
                continue
            st = r.get("straggler")
            s = None if r["consistency"] == "asp" else int(r.get("staleness") or 0)
            t = hybrid_step(rates, b["compute_s_per_step"], r.get("ids_per_pull", 0.0), s,
                            r["groups"], straggler=(st["kind"], st["delay_s"], st["p"] or 0.0)
                            if st else None, workers=r["workers"], servers=r["servers"],
                            cores=cores, compute_std_s=b.get("compute_std_s", 0.0))
            measured = r["global_batch"] / r["samples_per_s"]
            out.append({"case": r["case"], "section": section, "groups": r["groups"],
                        "staleness": s, "measured_s": measured, "predicted_s": t["step"],
                        "rel_error": t["step"] / measured - 1.0,
                        "calibration": r is b, "phases": t})
    return out


def report(doc, print_table, out=print):
    """Print the fitted rates and every case predicted vs measured; returns the points."""
    rates = fit_hybrid(doc)
    out(f"# hybrid step (bench hybrid: {doc.get('layout', {}).get('ranks')} ranks on "
        f"{doc.get('layout', {}).get('cores')} cores): pull round trip "
        f"{rates.rtt_fixed_s * 1e3:.3g} ms + {rates.rtt_per_id_s * 1e9:.3g} ns per id, dense "
        f"pull {rates.dense_rtt_s * 1e3:.3g} ms, server apply {rates.apply_s * 1e3:.3g} ms "
        f"and CPU {rates.server_cpu_s * 1e3:.3g} ms per clock")
    pts = hybrid_points(doc, rates)
    print_table(["case", "G", "s", "compute ms", "blocked ms", "of it imbalance",
                 "straggler ms", "measured ms", "predicted ms", "error %"],
                [[p["case"], p["groups"], "asp" if p["staleness"] is None else p["staleness"],
                  p["phases"]["compute"] * 1e3, p["phases"]["blocked"] * 1e3,
                  p["phases"]["imbalance"] * 1e3,
                  p["phases"]["straggler"] * 1e3, p["measured_s"] * 1e3,
                  p["predicted_s"] * 1e3,
                  f"{p['rel_error'] * 100:+.1f}{' c' if p['calibration'] else ''}"]
                 for p in pts])
    errs = np.abs([p["rel_error"] for p in pts if not p["calibration"]])
    if errs.size:
        out(f"# hybrid |error| without the BSP cases C comes from: median "
            f"{np.median(errs) * 100:.1f}%, max {errs.max() * 100:.1f}%, "
            f"{int((errs <= 0.25).sum())} of {errs.size} within 25%")
    return rates, pts
