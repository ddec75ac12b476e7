"""Hybrid mode (parameter servers + worker groups) against the collective trainer.

One MPI job of N ranks, every case run in it one after the other: the hybrid cases on S
server ranks and W = N - S workers, the collective trainer on the W worker ranks (same
worker count) and on all N ranks (same total rank count). Ranks a case does not use wait
in a sleeping barrier, so they take no core from it::

    mpiexec -n 3 python -m mpi4py -m hpctrain.bench hybrid         # S = 1, W = 2
    mpiexec -n 3 python -m mpi4py -m hpctrain.bench hybrid --batch 4096 --vocab 1000000

Workload: the DLRM benchmark config (``bench_dlrm_dim16.toml``: 26 one-hot features of one
table each, Zipf(1.05) ids, 13 dense features, bottom 13-512-256-64-16, top 512-256-1,
Adagrad) with the batch per worker, the vocabulary and the thread count set from the command
line (the collective trainer gets the same batch per rank). Sections:

* **throughput**: samples/s and step time for ``s`` in {0, 1, 2, 4} and ASP, with G = 1 and
  G = 2 groups; the collective trainer at W and at N ranks. A job's throughput is the global
  batch times the clock rate of its slowest worker over the timed steps (a clock covers one
  global batch); the step time is the median interval between a worker's pushes (max over
  workers). The pipelining gain of ``s = 1`` is step(s = 0) / step(s = 1) at G = 1.
* **stragglers** (G = ``--straggler-groups``): a *transient* straggler (each clock, with
  probability 0.3, one group chosen at random sleeps one step time) and a *persistent* one
  (the last group sleeps half a step every clock: 1.5x slower), each for BSP and SSP
  ``s = 2`` and ``s = 4`` beside the same consistencies without a straggler, measured in the
  same section. "A step" is the consistency's own no-straggler median step (its best trial);
  ``transient-ssp2-bspdelay`` gives SSP s = 2 BSP's delays (one BSP step, longer than SSP's
  own), the same absolute delays as BSP. The draws depend only on the clock, so every run
  sees the same straggler clocks. Per group clock rates show who runs at whose speed.
* **staleness**: the histogram of the staleness every worker read (rows and dense),
  per case.
* **pull round trip**: p50/p99 of one PULL (start_lookup to wait_lookup: dedup, route,
  send, the server's read, the reply, pooling) against the ids it carries, on a server
  whose rows exist, with the other workers idle; and the dense DPULL (all parameters).
* **server**: apply time per clock (sparse apply of every worker's push, dense optimizer
  on the slice), CPU seconds per clock, reads deferred, per case.
* **convergence**: final AUC of the shipped hybrid example's model
  (``hybrid_synthetic.toml``: the quick start's DLRM on a planted synthetic model, dense
  Adagrad lr 0.02) for BSP, SSP ``s`` in {1, 2, 4} and ASP at G = 2, three seeds each
  (``--convergence-steps``: longer runs, a fresh global batch every step); the gap is the
  per-seed difference to BSP, with its standard error over the seeds (SSP's staleness
  pattern follows the timing, so an SSP run's AUC varies between runs of one seed: the
  standard error covers that too). The collective trainer on the same workers runs each
  seed as well: BSP's update sequence in another summation order, the synchronous
  reference the gaps are meant against.

Goals (issue 13), judged in the printed summary and in the JSON: G = 1, s = 0 step <= 1.5x
the collective step at equal worker count; s = 1 recovers at least half of that gap; under
the transient straggler SSP s = 2 keeps >= 0.85x its no-straggler throughput and beats BSP
by >= 15%; for s <= 4 the AUC lost against BSP (mean over the seeds, each dense layout
apart) <= 0.001. With G groups the transient straggler costs SSP at best a factor 1 + p / G
per clock (each group sleeps with probability p / G) and BSP 1 + p: SSP keeps at most
1 / (1 + p / G) (0.870 with G = 2, p = 0.3) and gains over BSP at most its no-straggler lead
(prefetch) times (1 + p) / (1 + p / G) (1.13 with G = 2); the summary prints both bounds,
and the bound of the ideal s = 2 schedule of the run's own delays
(``Straggler.schedule_bound``: zero apply and transport time).
"""
import copy
import io
import time

import numpy as np

from hpctrain.bench import common

GOALS = {"s0_vs_collective": 1.5, "s1_recovers": 0.5, "transient_keep": 0.85,
         "transient_vs_bsp": 1.15, "auc_gap": 0.001}
#: consistency name and staleness of the throughput sweep, in order
SWEEP = [("bsp", 0), ("ssp", 1), ("ssp", 2), ("ssp", 4), ("asp", None)]
TRANSIENT_P = 0.3
#: clocks left out at the end of a run for the per-group (steady-state) clock rates
STEADY_TAIL = 5
#: convergence layouts: name -> ps.dense_on_servers
LAYOUTS = {"dense_on_servers": True, "dense_allreduce": False}
PERSISTENT_FACTOR = 1.5


def _label(consistency, s):
    return "asp" if consistency == "asp" else "bsp" if consistency == "bsp" else f"ssp{s}"


# ----------------------------------------------------------------------------- configs
def workload(batch, vocab, steps, threads=1, seed=0):
    """The DLRM benchmark config as a dict: batch per rank, vocabulary, steps, threads."""
    from hpctrain.bench.train import workload as dlrm
    d = dlrm(16, batch_per_rank=batch, bag=1, steps=steps, threads=threads)
    d["data"]["synthetic"]["vocab"] = int(vocab)
    d["seed"] = seed
    d.setdefault("metrics", {})["every_steps"] = max(steps, 1)
    return d


def hybrid_dict(base, servers, groups, consistency, s, dense_on_servers=True, timeout_s=120.0):
    """``base`` in hybrid mode: S servers, G groups, the consistency, where dense lives."""
    d = copy.deepcopy(base)
    d["mode"] = "hybrid"
    ps = {"servers": servers, "groups": groups, "consistency": consistency,
          "dense_on_servers": dense_on_servers, "timeout_s": timeout_s,
          "every_clocks_log": 1_000_000}
    if consistency != "asp":
        ps["staleness"] = int(s or 0)
    d["ps"] = ps
    return d


def convergence_dict(seed, steps=None, eval_samples=None):
    """The shipped hybrid example (``hybrid_synthetic.toml``) as a dict, no files written;
    ``steps`` and ``eval_samples`` override the example's (200 steps, 8,192 samples)."""
    from importlib import resources

    from hpctrain.config.root import tomllib
    text = (resources.files("hpctrain") / "configs" / "hybrid_synthetic.toml").read_text(
        encoding="utf-8")
    d = tomllib.loads(text)
    d["seed"] = seed
    if steps:
        # every step a fresh global batch, as in the example's 200 steps (one pass)
        d["steps"] = steps
        d["data"]["train"]["num_samples"] = steps * d["global_batch"]
    if eval_samples:
        d["data"]["eval"]["num_samples"] = eval_samples
    d["metrics"].pop("path", None)
    d["metrics"]["every_steps"] = d["steps"]
    d["eval"] = {"interval": 0, "at_end": True}
    return d


def collective_dict(d):
    """A hybrid config dict as the collective trainer's: no [ps], ``mode = "collective"``."""
    d = copy.deepcopy(d)
    d.pop("ps", None)
    d["mode"] = "collective"
    return d


def _config(d, name):
    from hpctrain.config import config_from_dict
    return config_from_dict(d, source=f"bench-hybrid-{name}")


# ----------------------------------------------------------------------------- plumbing
def idle_barrier(mpi_comm, poll_s=0.005):
    """A barrier that sleeps while it waits (MPICH's blocking barrier spins a core)."""
    req = mpi_comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


def _share(world, mine):
    """Every rank's ``mine`` on every rank, after a sleeping barrier."""
    idle_barrier(world.mpi_comm)
    return world.mpi_comm.allgather(mine)


class Straggler:
    """Delays injected into a group's step (the benchmark's, not the trainer's).

    ``transient``: each clock, with probability ``p``, one group drawn at random sleeps
    ``delay_s`` (the draw depends only on the clock, so every run gets the same delays).
    ``persistent``: group ``groups - 1`` sleeps ``delay_s`` every clock.
    """

    def __init__(self, kind, delay_s, groups, p=TRANSIENT_P, seed=12345):
        if kind not in ("transient", "persistent"):
            raise ValueError(f"straggler kind {kind!r}")
        self.kind, self.delay_s, self.groups, self.p, self.seed = kind, delay_s, groups, p, seed

    def delay(self, clock, group):
        if self.kind == "persistent":
            return self.delay_s if group == self.groups - 1 else 0.0
        rng = np.random.default_rng([self.seed, clock])
        if rng.random() < self.p and int(rng.integers(self.groups)) == group:
            return self.delay_s
        return 0.0

    def schedule_bound(self, s, clocks, warmup=0):
        """Throughput under these delays relative to none, on the ideal SSP schedule.

        Every group computes a clock in one unit of time, a delayed clock takes
        ``1 + delay / step`` (the delay is one step here); group g starts clock c when it
        has finished c - 1 and every group has finished c - 1 - s (the server's read
        bound, with zero apply and transport time). The clocks after ``warmup`` are
        timed, as in the benchmark. What no implementation can beat with these delays.
        """
        G = self.groups
        unit = 1.0 if self.kind == "transient" else PERSISTENT_FACTOR - 1.0
        fin = np.zeros((clocks + 1, G))
        for c in range(1, clocks + 1):
            for g in range(G):
                start = fin[c - 1, g]
                if c - 1 - s >= 1:
                    start = max(start, fin[c - 1 - s].max())
                fin[c, g] = start + 1.0 + (unit if self.delay(c, g) else 0.0)
        return (clocks - warmup) / (fin[clocks].max() - fin[warmup].max())

    def as_dict(self):
        return {"kind": self.kind, "delay_s": self.delay_s, "groups": self.groups,
                "p": self.p if self.kind == "transient" else None}


def _trainer_class():
    from hpctrain.train.hybrid import HybridTrainer

    class BenchHybridTrainer(HybridTrainer):
        """A worker that records when each step ends and how long it blocked on reads,
        and sleeps where a ``Straggler`` says so (before its dense step)."""

        def __init__(self, *args, straggler=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.straggler = straggler
            self.slept = 0.0
            self.ends, self.dense_wait, self.pull_ids = [], [], []
            self._dwait = 0.0
            inner_push, inner_install = self.emb.backward, self._install_dense
            inner_pull = self.emb.start_lookup

            def pull(batch, step, train=True):
                ticket = inner_pull(batch, step, train)
                if train:
                    self.pull_ids.append(int(ticket.ids.shape[0]))
                return ticket

            def push(*a, **k):
                out = inner_push(*a, **k)
                self.ends.append(time.perf_counter())
                self.dense_wait.append(self._dwait)
                self._dwait = 0.0
                return out

            def install(*a, **k):
                t0 = time.perf_counter()
                out = inner_install(*a, **k)
                self._dwait += time.perf_counter() - t0
                return out
            self.emb.backward, self._install_dense = push, install
            self.emb.start_lookup = pull

        def _dense_step(self, batch, pooled, step, flags):
            d = self.straggler.delay(step, self.group) if self.straggler else 0.0
            if d:
                time.sleep(d)
                self.slept += d
            return super()._dense_step(batch, pooled, step, flags)

    return BenchHybridTrainer


def _server_class():
    from hpctrain.ps.server import Server

    class TimedServer(Server):
        """The server with the apply time of every clock kept (``clock_apply_s``)."""

        def _advance(self):
            a0, c0 = self.stats.apply_s, self.applied
            super()._advance()
            if self.applied > c0:
                per = (self.stats.apply_s - a0) / (self.applied - c0)
                self.__dict__.setdefault("clock_apply_s", []).extend([per] * (self.applied - c0))

    return TimedServer


def _serve(cfg, roles, p2p, prefill=None):
    """``run_server`` with a ``TimedServer``; returns the server after its loop ended."""
    from hpctrain.train.build import dense_optimizer, table_specs
    make_opt = ((lambda params: dense_optimizer(cfg, params)) if cfg.ps.dense_on_servers
                else None)
    server = _server_class()(table_specs(cfg), p2p, roles, seed=cfg.seed,
                             consistency=cfg.ps.consistency, staleness=cfg.ps.staleness,
                             timeout_s=cfg.ps.timeout_s, make_dense_optimizer=make_opt,
                             every_clocks_log=0, log=io.StringIO())
    if prefill is not None:
        prefill(server)
    server.run()
    return server


def _hist(values):
    a = np.asarray(values, dtype=np.int64)
    return {int(i): int(n) for i, n in enumerate(np.bincount(a)) if n} if a.size else {}


def _merge_hists(hists):
    out = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- runs
def run_hybrid(world, d, name, warmup, straggler=None):
    """One hybrid case on the world; the merged record on every rank."""
    from hpctrain.train.hybrid import setup_hybrid
    cfg = _config(d, name)
    roles, p2p = setup_hybrid(cfg, world)
    if roles.is_server:
        cpu0, t0 = time.process_time(), time.perf_counter()
        server = _serve(cfg, roles, p2p)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        st = server.stats.as_dict()
        clocks = max(server.applied, 1)
        per = np.asarray(server.__dict__.get("clock_apply_s", []), dtype=np.float64)
        mine = {"role": "server", "index": roles.server_index, "clocks": server.applied,
                "apply_ms_per_clock": 1e3 * st["apply_s"] / clocks,
                "apply_ms_p50": 1e3 * float(np.median(per)) if per.size else None,
                "apply_ms_p99": 1e3 * float(np.percentile(per, 99)) if per.size else None,
                "cpu_ms_per_clock": 1e3 * cpu / clocks, "wall_s": wall,
                "rows_touched_per_clock": st["rows_touched"] / clocks,
                "staleness_hist": st["staleness_hist"], "spread_hist": st["spread_hist"],
                "max_spread": st["max_spread"], "pulls": st["pulls"],
                "deferred": st["deferred"], "max_waiting": st["max_waiting"]}
    else:
        tr = _trainer_class()(cfg, roles, p2p, stream=io.StringIO(), straggler=straggler)
        roles.role_comm.barrier()
        t0 = time.perf_counter()
        res = tr.fit()
        tr.close()
        tr.reader.close()
        ends = np.asarray([t0, *tr.ends])
        steps = np.diff(ends)[warmup:]
        timed = ends[-1] - ends[warmup]
        # steady state: without the last clocks, where a group ahead only waits for the
        # others to finish (up to s + 1 clocks)
        tail = STEADY_TAIL if len(steps) > 2 * STEADY_TAIL else 0
        steady = (len(steps) - tail) / max(ends[len(ends) - 1 - tail] - ends[warmup], 1e-12)
        waits = (np.asarray(tr.emb.wait_s) + np.asarray(tr.dense_wait))[warmup:]
        ps = tr.emb.stats()
        mine = {"role": "worker", "worker": roles.worker_index, "group": roles.group,
                "median_step_s": float(np.median(steps)),
                "clocks_per_s": len(steps) / max(timed, 1e-12), "timed_s": float(timed),
                "steady_clocks_per_s": float(steady),
                "blocked_s_per_step": float(np.mean(waits)),
                "rows_wait_s_per_step": float(np.mean(tr.emb.wait_s[warmup:])),
                "dense_wait_s_per_step": float(np.mean(tr.dense_wait[warmup:])),
                "compute_s_per_step": float(np.mean(steps - waits)),
                "compute_std_s": float(np.std(steps - waits)),
                "slept_s": tr.slept, "staleness_hist": ps["staleness_hist"],
                "dense_staleness_hist": _hist(tr.dense.staleness if tr.dense else []),
                "bytes_per_step": (ps["sent_bytes"] + ps["recv_bytes"]) / max(ps["steps"], 1),
                "ids_per_pull": float(np.mean(tr.pull_ids)) if tr.pull_ids else 0.0,
                "phases_s": {k: v for k, v in tr.phase_totals.items()},
                "losses": [float(x) for x in tr.losses], "loss_parts": tr.loss_parts,
                "global_batch": tr.global_batch, "eval": res.get("eval"),
                "steps": len(steps)}
    p2p.close()
    parts = _share(world, mine)
    workers = sorted((p for p in parts if p["role"] == "worker"), key=lambda p: p["worker"])
    servers = sorted((p for p in parts if p["role"] == "server"), key=lambda p: p["index"])
    rate = min(w["clocks_per_s"] for w in workers)
    gb = workers[0]["global_batch"]
    groups = sorted({w["group"] for w in workers})
    ps = d["ps"]
    return {"case": name, "mode": "hybrid", "servers": len(servers), "workers": len(workers),
            "groups": len(groups), "consistency": ps["consistency"],
            "staleness": ps.get("staleness"), "global_batch": gb,
            "steps": workers[0]["steps"], "warmup": warmup,
            "median_step_s": max(w["median_step_s"] for w in workers),
            "samples_per_s": gb * rate,
            "group_clocks_per_s": {g: min(w["steady_clocks_per_s"] for w in workers
                                          if w["group"] == g) for g in groups},
            "ids_per_pull": float(np.mean([w["ids_per_pull"] for w in workers])),
            "blocked_s_per_step": max(w["blocked_s_per_step"] for w in workers),
            "compute_s_per_step": max(w["compute_s_per_step"] for w in workers),
            "compute_std_s": float(np.mean([w["compute_std_s"] for w in workers])),
            "staleness_hist": _merge_hists(w["staleness_hist"] for w in workers),
            "dense_staleness_hist": _merge_hists(w["dense_staleness_hist"] for w in workers),
            "server_staleness_hist": _merge_hists(s["staleness_hist"] for s in servers),
            "straggler": straggler.as_dict() if straggler else None,
            "per_worker": workers, "per_server": servers,
            "apply_ms_per_clock": max(s["apply_ms_per_clock"] for s in servers),
            "apply_ms_p50": max(s["apply_ms_p50"] or 0.0 for s in servers),
            "server_cpu_ms_per_clock": max(s["cpu_ms_per_clock"] for s in servers),
            "max_spread": max(s["max_spread"] for s in servers)}


def run_collective(world, d, name, ranks, warmup):
    """The collective trainer on world ranks ``ranks`` (the others sleep); its record."""
    from hpctrain.train.loop import Trainer
    ranks = list(ranks)
    member = world.rank in ranks
    sub = world.split(0 if member else None, world.rank)
    mine = None
    if member:
        cfg = _config(d, name)
        tr = Trainer(cfg, sub, stream=io.StringIO())
        ends = []
        inner = tr.emb.backward

        def push(*a, **k):
            out = inner(*a, **k)
            ends.append(time.perf_counter())
            return out
        tr.emb.backward = push
        sub.barrier()
        t0 = time.perf_counter()
        res = tr.fit()
        tr.reader.close()
        e = np.asarray([t0, *ends])
        steps = np.diff(e)[warmup:]
        mine = {"median_step_s": float(np.median(steps)),
                "clocks_per_s": len(steps) / max(e[-1] - e[warmup], 1e-12),
                "global_batch": tr.global_batch, "steps": len(steps),
                "eval": res.get("eval"), "losses": [float(x) for x in tr.losses],
                "phases_s": dict(tr.phase_totals)}
    parts = [p for p in _share(world, mine) if p is not None]
    gb = parts[0]["global_batch"]
    return {"case": name, "mode": "collective", "ranks": len(ranks), "workers": len(ranks),
            "global_batch": gb, "steps": parts[0]["steps"], "warmup": warmup,
            "median_step_s": max(p["median_step_s"] for p in parts),
            "samples_per_s": gb * min(p["clocks_per_s"] for p in parts),
            "eval": parts[0]["eval"], "losses": parts[0]["losses"]}


class _Solo:
    """A group of one (the round-trip measurement's dense pulls are not broadcast)."""
    size = 1


def run_pull_rtt(world, d, servers, sizes, repeat, warmup=3, seed=7):
    """p50/p99 seconds of one PULL per size (ids per pull), and of the dense DPULL.

    The servers hold every pulled row (inserted before their loop starts); worker 0 pulls,
    the other workers only tell the servers they are done.
    """
    from hpctrain._kernels import sparse_ops
    from hpctrain.ps.client import PSClient
    from hpctrain.ps.dense import DenseClient
    from hpctrain.sparse.jagged import JaggedBatch
    from hpctrain.train.build import build_model, table_specs
    from hpctrain.train.hybrid import setup_hybrid
    cfg = _config(hybrid_dict(d, servers, 1, "bsp", 0), "pull-rtt")
    specs = table_specs(cfg)
    features = [f for s in specs for f in s.features]
    vocab = int(d["data"]["synthetic"]["vocab"])
    T = len(features)

    def ids_for(n):
        rng = np.random.default_rng([seed, n])
        per = max(n // T, 1)
        return per, np.concatenate([rng.choice(vocab, per, replace=False) for _ in range(T)])

    roles, p2p = setup_hybrid(cfg, world)
    mine = None
    if roles.is_server:
        def prefill(server):
            for n in sizes:
                per, keys = ids_for(n)
                for t, spec in enumerate(server.specs):
                    k = np.ascontiguousarray(keys[t * per:(t + 1) * per])
                    own = sparse_ops.route(k, spec.table_id, roles.num_servers) == roles.server_index
                    server.tables[spec.name].find_or_insert(k[own], 0)
        _serve(cfg, roles, p2p, prefill)
    else:
        store = PSClient(specs, p2p, roles.servers, roles.worker_index, roles.group,
                         timeout_s=cfg.ps.timeout_s)
        if roles.worker_index == 0:
            model = build_model(cfg, cfg.data.num_dense() or 13)
            dense = DenseClient(p2p, roles.servers, _Solo(), True, 0, 0,
                                model.params.size, cfg.ps.timeout_s)
            dense.init_servers(np.asarray(model.params.data))
            mine = {"sparse": [], "dense": None}
            for n in sizes:
                per, keys = ids_for(n)
                batch = JaggedBatch(features, keys, np.ones(T * per, dtype=np.int64))
                times = []
                for i in range(warmup + repeat):
                    t0 = time.perf_counter()
                    store.wait_lookup(store.start_lookup(batch, 1))
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                mine["sparse"].append({"ids": T * per, "rows_bytes": 4 * 16 * T * per,
                                       "p50_s": float(np.median(times)),
                                       "p99_s": float(np.percentile(times, 99)),
                                       "mean_s": float(np.mean(times))})
            out = np.empty(model.params.size, dtype=np.float32)
            times = []
            for i in range(warmup + repeat):
                t0 = time.perf_counter()
                dense.start_pull(1)
                dense.wait_pull(1, out)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            mine["dense"] = {"floats": int(model.params.size),
                             "p50_s": float(np.median(times)),
                             "p99_s": float(np.percentile(times, 99))}
            dense.finish()
        store.close()
    p2p.close()
    parts = [p for p in _share(world, mine) if p is not None]
    return parts[0]


# ----------------------------------------------------------------------------- analysis
def goals(results):
    """The issue's goals judged on the results (values, thresholds, met)."""
    thr = {r["case"]: r for r in results.get("throughput", [])}
    out = {}
    coll = thr.get("collective-W")
    s0, s1 = thr.get("G1-bsp"), thr.get("G1-ssp1")
    if coll and s0:
        ratio = s0["median_step_s"] / coll["median_step_s"]
        out["s0_vs_collective"] = {"value": ratio, "goal": f"<= {GOALS['s0_vs_collective']}",
                                   "met": ratio <= GOALS["s0_vs_collective"]}
        if s1:
            gap = s0["median_step_s"] - coll["median_step_s"]
            rec = 1.0 if gap <= 0 else (s0["median_step_s"] - s1["median_step_s"]) / gap
            out["s1_recovers"] = {"value": rec, "goal": f">= {GOALS['s1_recovers']}",
                                  "met": rec >= GOALS["s1_recovers"],
                                  "pipelining_gain": s0["median_step_s"] / s1["median_step_s"]}
    st = {r["case"]: r for r in results.get("stragglers", [])}
    if "transient-ssp2" in st and "none-ssp2" in st and "transient-bsp" in st:
        keep = st["transient-ssp2"]["samples_per_s"] / st["none-ssp2"]["samples_per_s"]
        vs = st["transient-ssp2"]["samples_per_s"] / st["transient-bsp"]["samples_per_s"]
        G, p = st["transient-ssp2"]["groups"], TRANSIENT_P
        # with no straggler, SSP's clock is shorter than BSP's (prefetch): the best SSP can
        # do against BSP is that ratio times (1 + p) / (1 + p / G)
        pipe = st["none-ssp2"]["samples_per_s"] / st["none-bsp"]["samples_per_s"] \
            if "none-bsp" in st else 1.0
        r = st["transient-ssp2"]
        out["transient_keep"] = {"value": keep, "goal": f">= {GOALS['transient_keep']}",
                                 "met": keep >= GOALS["transient_keep"],
                                 "ideal": 1.0 / (1.0 + p / G)}
        if "steps" in r:
            out["transient_keep"]["schedule_bound"] = Straggler(
                "transient", 1.0, G).schedule_bound(2, r["steps"] + r["warmup"], r["warmup"])
        out["transient_vs_bsp"] = {"value": vs, "goal": f">= {GOALS['transient_vs_bsp']}",
                                   "met": vs >= GOALS["transient_vs_bsp"],
                                   "ideal": pipe * (1.0 + p) / (1.0 + p / G),
                                   "without_straggler": pipe}
        if "transient-ssp2-bspdelay" in st:
            same = st["transient-ssp2-bspdelay"]["samples_per_s"] / \
                st["transient-bsp"]["samples_per_s"]
            out["transient_vs_bsp (BSP's delays)"] = {
                "value": same, "goal": f">= {GOALS['transient_vs_bsp']}",
                "met": same >= GOALS["transient_vs_bsp"], "without_straggler": pipe}
    for cons in ("bsp", "ssp2", "ssp4"):
        if f"persistent-{cons}" in st and f"none-{cons}" in st:
            r = st[f"persistent-{cons}"]
            rates = r["group_clocks_per_s"]
            out[f"persistent_cap ({cons})"] = {
                "value": r["samples_per_s"] / st[f"none-{cons}"]["samples_per_s"],
                "goal": f"shown (1/{PERSISTENT_FACTOR} = {1 / PERSISTENT_FACTOR:.3f})",
                "met": None, "group_rate_ratio": max(rates.values()) / min(rates.values())}
    conv = results.get("convergence")
    for layout, summary in (conv or {}).get("summary", {}).items():
        gaps = [v["auc_gap_mean"] for k, v in summary.items()
                if k.startswith("ssp") and v["auc_gap_mean"] is not None]
        if gaps:
            # the AUC SSP loses against BSP (mean over the seeds; a gain is no gap)
            worst = max(0.0, -min(gaps))
            out[f"auc_gap ({layout})"] = {"value": worst, "goal": f"<= {GOALS['auc_gap']}",
                                          "met": worst <= GOALS["auc_gap"],
                                          "largest_difference": max(abs(g) for g in gaps)}
            floor = summary.get("collective")
            if floor and floor["auc_gap_mean"] is not None:
                # BSP's update sequence in another summation order: BSP is the
                # synchronous baseline when this is ~0
                out[f"auc_gap ({layout})"]["collective_vs_bsp"] = {
                    "mean": floor["auc_gap_mean"], "se": floor.get("auc_gap_se")}
    return out


def _convergence_summary(runs):
    by = {}
    for r in runs:
        by.setdefault(r["label"], {})[r["seed"]] = r
    base = by.get("bsp", {})
    out = {}
    for label, seeds in by.items():
        aucs = [seeds[s]["auc"] for s in sorted(seeds)]
        gaps = [seeds[s]["auc"] - base[s]["auc"] for s in sorted(seeds) if s in base]
        out[label] = {"auc_mean": float(np.mean(aucs)), "auc_min": float(np.min(aucs)),
                      "auc_max": float(np.max(aucs)),
                      "auc_gap_mean": float(np.mean(gaps)) if gaps else None,
                      "auc_gap_min": float(np.min(gaps)) if gaps else None,
                      # standard error of the mean gap over the seeds
                      "auc_gap_se": float(np.std(gaps, ddof=1) / np.sqrt(len(gaps)))
                      if len(gaps) > 1 else None,
                      "staleness_mean": float(np.mean([seeds[s]["staleness_mean"]
                                                       for s in seeds]))}
    return out


def _hist_mean(h):
    n = sum(h.values())
    return sum(int(k) * v for k, v in h.items()) / n if n else 0.0


def _fmt_hist(h, most=6):
    """``staleness:share`` pairs; a longer histogram (ASP) as its mean, p99 and max."""
    n = sum(h.values()) or 1
    items = sorted(((int(k), v) for k, v in h.items()), key=lambda kv: kv[0])
    if len(items) <= most:
        return " ".join(f"{k}:{v / n:.0%}" for k, v in items)
    keys = np.repeat([k for k, _ in items], [v for _, v in items])
    return (f"mean {keys.mean():.1f}, p99 {int(np.percentile(keys, 99))}, max {keys.max()}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = common.parser("hybrid", __doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=1, help="server ranks S (workers: the rest)")
    p.add_argument("--batch", type=int, default=1024, help="samples per worker and step")
    p.add_argument("--vocab", type=int, default=1_000_000, help="ids per feature")
    p.add_argument("--steps", type=int, default=30, help="timed steps per throughput case")
    p.add_argument("--straggler-steps", type=int, default=60,
                   help="timed steps per straggler case")
    p.add_argument("--straggler-groups", type=int, default=2, help="G of the straggler cases")
    p.add_argument("--sections", default="throughput,stragglers,rtt,convergence",
                   help="comma-separated subset of throughput,stragglers,rtt,convergence")
    p.add_argument("--rtt-sizes", default="1024,4096,16384,65536",
                   help="ids per pull of the round-trip measurement")
    p.add_argument("--trials", type=int, default=3,
                   help="run the throughput and straggler sections this many times over and "
                        "keep each case's fastest run (other jobs only ever slow a run down)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per convergence point")
    p.add_argument("--convergence-steps", type=int, default=None,
                   help="steps of the convergence runs (default: the example's 200); "
                        "every step reads a fresh global batch")
    p.add_argument("--convergence-eval-samples", type=int, default=None,
                   help="evaluation samples of the convergence runs (default: the "
                        "example's 8,192)")
    p.add_argument("--convergence-layouts", default="dense_on_servers,dense_allreduce",
                   help="where the dense parameters live in the convergence runs: "
                        "dense_on_servers (the example as shipped), dense_allreduce "
                        "(ps.dense_on_servers = false: synchronous dense, stale embeddings)")
    p.set_defaults(warmup=5, repeat=30)
    args = p.parse_args(argv)
    from hpctrain.comm import create_communicator
    from hpctrain.train.loop import _set_threads
    world = create_communicator("mpi")
    threads = args.threads or 1
    _set_threads(threads, world.local_size, world.rank)
    S, N = args.servers, world.size
    W = N - S
    if S < 1 or W < 1:
        raise SystemExit(f"bench hybrid: {N} ranks cannot hold {S} server(s) and a worker")
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    workers = list(range(S, N))
    cores = _cores()
    results = {"layout": {"ranks": N, "servers": S, "workers": W, "cores": cores,
                          "threads_per_rank": threads,
                          "cores_per_rank_hybrid": cores / N if cores else None,
                          "cores_per_rank_collective_W": cores / W if cores else None},
               "batch_per_worker": args.batch, "vocab": args.vocab, "steps": args.steps,
               "warmup": args.warmup, "goals_def": GOALS, "load_before": _load()}
    t_start = time.perf_counter()
    say = _printer(world)
    base = workload(args.batch, args.vocab, args.steps + args.warmup, threads)
    if "throughput" in sections:
        cases = [("collective-W", None, None, None), ("collective-N", None, None, None)]
        cases += [(f"G{G}-{_label(cons, s)}", G, cons, s) for G in (1, 2) if W % G == 0
                  for cons, s in SWEEP]

        def run_throughput(name, G, cons, s):
            if G is None:
                ranks = workers if name == "collective-W" else range(N)
                r = run_collective(world, base, name, ranks, args.warmup)
                say(f"{name}: {r['median_step_s'] * 1e3:.1f} ms/step, "
                    f"{r['samples_per_s']:,.0f} samples/s")
                return r
            r = run_hybrid(world, hybrid_dict(base, S, G, cons, s), name, args.warmup)
            say(f"{name}: {r['median_step_s'] * 1e3:.1f} ms/step, {r['samples_per_s']:,.0f} "
                f"samples/s, staleness {_fmt_hist(r['staleness_hist'])}")
            return r
        results["throughput"] = _best_of(args.trials, cases, run_throughput, say)
    if "stragglers" in sections:
        G = args.straggler_groups
        if W % G or G < 2:
            say(f"stragglers: skipped (G = {G} does not split {W} workers into >= 2 groups)")
        else:
            sd = workload(args.batch, args.vocab, args.straggler_steps + args.warmup, threads)
            consistencies = (("bsp", 0), ("ssp", 2), ("ssp", 4))

            def run_straggler(name, kind, cons, s, step):
                st = None
                if kind == "transient":
                    st = Straggler(kind, step, G)
                elif kind == "persistent":
                    st = Straggler(kind, (PERSISTENT_FACTOR - 1.0) * step, G)
                r = run_hybrid(world, hybrid_dict(sd, S, G, cons, s), name, args.warmup,
                               straggler=st)
                say(f"{name}: {r['samples_per_s']:,.0f} samples/s, group clocks/s "
                    f"{_fmt_rates(r)}")
                return r
            # the no-straggler runs first (best of the trials): their median steps are the
            # delays of the straggler runs
            base_cases = [(f"none-{_label(c, s)}", None, c, s, None) for c, s in consistencies]
            base_runs = _best_of(args.trials, base_cases, run_straggler, say)
            steps = {_label(c, s): r["median_step_s"]
                     for (c, s), r in zip(consistencies, base_runs)}
            cases = [(f"{kind}-{_label(c, s)}", kind, c, s, steps[_label(c, s)])
                     for kind in ("transient", "persistent") for c, s in consistencies]
            cases.append(("transient-ssp2-bspdelay", "transient", "ssp", 2, steps["bsp"]))
            results["stragglers"] = base_runs + _best_of(args.trials, cases, run_straggler, say)
            results["straggler_step_s"] = steps
    if "rtt" in sections:
        sizes = [int(x) for x in args.rtt_sizes.split(",") if x]
        results["pull_rtt"] = run_pull_rtt(world, base, S, sizes, args.repeat)
        for x in results["pull_rtt"]["sparse"]:
            say(f"pull {x['ids']} ids: p50 {x['p50_s'] * 1e3:.2f} ms, "
                f"p99 {x['p99_s'] * 1e3:.2f} ms")
    if "convergence" in sections:
        runs = []
        G = 2 if W % 2 == 0 else 1
        layouts = [x.strip() for x in args.convergence_layouts.split(",") if x.strip()]
        for layout in layouts:
            if layout not in LAYOUTS:
                raise SystemExit(f"bench hybrid: --convergence-layouts: unknown {layout!r} "
                                 f"(valid: {', '.join(LAYOUTS)})")
            for seed in range(args.seeds):
                cd = convergence_dict(seed, args.convergence_steps,
                                      args.convergence_eval_samples)
                for cons, s in SWEEP:
                    label = _label(cons, s)
                    r = run_hybrid(world, hybrid_dict(cd, S, G, cons, s,
                                                      dense_on_servers=LAYOUTS[layout]),
                                   f"conv-{layout}-{label}-{seed}", 0)
                    w0 = r["per_worker"][0]
                    runs.append({"layout": layout, "label": label, "seed": seed, "groups": G,
                                 "auc": w0["eval"]["auc"], "logloss": w0["eval"]["logloss"],
                                 "staleness_hist": r["staleness_hist"],
                                 "dense_staleness_hist": r["dense_staleness_hist"],
                                 "staleness_mean": _hist_mean(r["staleness_hist"]),
                                 "samples_per_s": r["samples_per_s"]})
                    say(f"convergence {layout} {label} seed {seed}: auc {runs[-1]['auc']:.5f}, "
                        f"staleness {_fmt_hist(r['staleness_hist'])}")
                if layout == layouts[0]:
                    # the synchronous reference: the collective trainer on the same workers
                    # computes BSP's update sequence in another summation order
                    r = run_collective(world, collective_dict(cd), f"conv-collective-{seed}",
                                       workers, 0)
                    runs.append({"layout": "collective", "label": "collective", "seed": seed,
                                 "groups": 0, "auc": r["eval"]["auc"],
                                 "logloss": r["eval"]["logloss"], "staleness_hist": {0: 1},
                                 "dense_staleness_hist": {}, "staleness_mean": 0.0,
                                 "samples_per_s": r["samples_per_s"]})
                    say(f"convergence collective seed {seed}: auc {runs[-1]['auc']:.5f}")
        results["convergence"] = {
            "runs": runs, "groups": G, "config": "hybrid_synthetic.toml",
            "steps": args.convergence_steps, "eval_samples": args.convergence_eval_samples,
            "summary": {layout: _convergence_summary(
                [r for r in runs if r["layout"] in (layout, "collective")])
                for layout in layouts}}
    results["goals"] = goals(results)
    results["wall_s"] = time.perf_counter() - t_start
    results["load_after"] = _load()
    if world.rank == 0:
        report(results)
    common.write_json("hybrid", results, args.json, world.mpi_comm)
    return 0


def _best_of(trials, cases, run, say):
    """Every case ``trials`` times over (all cases, then all again: the runs of one case
    minutes apart); each case's run with the most samples/s, with every trial's samples/s
    recorded (``trials_samples_per_s``)."""
    best, runs = {}, {}
    for trial in range(max(trials, 1)):
        if trials > 1:
            say(f"trial {trial + 1} of {trials}")
        for case in cases:
            name = case[0]
            r = run(*case)
            runs.setdefault(name, []).append(r["samples_per_s"])
            if name not in best or r["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = r
    out = []
    for case in cases:
        r = best[case[0]]
        r["trials_samples_per_s"] = runs[case[0]]
        out.append(r)
    return out


def _fmt_rates(r):
    return " ".join(f"g{g}:{v:.2f}" for g, v in sorted(r["group_clocks_per_s"].items()))


def _printer(world):
    def say(msg):
        if world.rank == 0:
            print(f"# {msg}", flush=True)
    return say


def _cores():
    import os
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _load():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def report(results):
    """The tables (rank 0)."""
    lay = results["layout"]
    print(f"# hpctrain hybrid benchmark: {lay['ranks']} ranks on {lay['cores']} cores "
          f"({lay['servers']} server(s) + {lay['workers']} workers; collective at "
          f"{lay['workers']} and {lay['ranks']} ranks), {lay['threads_per_rank']} thread(s) "
          f"per rank, batch {results['batch_per_worker']} per worker, vocab "
          f"{results['vocab']:,}; load {results['load_before']} -> {results['load_after']}")
    thr = results.get("throughput")
    if thr:
        coll = next(r for r in thr if r["case"] == "collective-W")
        print("# throughput (samples/s: global batch x the slowest worker's clock rate; step: "
              "median interval between pushes, max over workers)")
        common.print_table(
            ["case", "ranks", "G", "step ms", "samples/s", "vs coll-W", "blocked ms",
             "apply ms/clock", "server CPU ms/clock", "staleness"],
            [[r["case"], r.get("ranks", r["workers"] + r.get("servers", 0)),
              r.get("groups", "-"), 1e3 * r["median_step_s"], r["samples_per_s"],
              r["samples_per_s"] / coll["samples_per_s"],
              1e3 * r["blocked_s_per_step"] if "blocked_s_per_step" in r else "-",
              r.get("apply_ms_per_clock", "-"), r.get("server_cpu_ms_per_clock", "-"),
              _fmt_hist(r["staleness_hist"]) if "staleness_hist" in r else "-"]
             for r in thr])
    st = results.get("stragglers")
    if st:
        by = {r["case"]: r for r in st}
        steps = results.get("straggler_step_s", {})
        print(f"# stragglers (G = {st[0]['groups']}): transient = each clock with p = "
              f"{TRANSIENT_P} one group sleeps one step; persistent = the last group "
              f"{PERSISTENT_FACTOR}x slower; a step = the consistency's own no-straggler median "
              f"step (" + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in steps.items())
              + "); -bspdelay: BSP's delays")

        def kind(r):
            return r["straggler"]["kind"] if r["straggler"] else "none"
        common.print_table(
            ["case", "delay ms", "samples/s", "vs no straggler", "vs BSP same kind",
             "group clocks/s", "max spread", "staleness"],
            [[r["case"], 1e3 * r["straggler"]["delay_s"] if r["straggler"] else 0.0,
              r["samples_per_s"],
              r["samples_per_s"] / by[f"none-{_label(r['consistency'], r['staleness'])}"][
                  "samples_per_s"],
              r["samples_per_s"] / by[f"{kind(r)}-bsp"]["samples_per_s"],
              _fmt_rates(r), r["max_spread"], _fmt_hist(r["staleness_hist"])] for r in st])
    rtt = results.get("pull_rtt")
    if rtt:
        print("# pull round trip (worker 0, rows present on the server, other workers idle)")
        common.print_table(["ids per pull", "row bytes", "p50 ms", "p99 ms"],
                           [[x["ids"], x["rows_bytes"], 1e3 * x["p50_s"], 1e3 * x["p99_s"]]
                            for x in rtt["sparse"]]
                           + [[f"dense {rtt['dense']['floats']} floats",
                               4 * rtt["dense"]["floats"], 1e3 * rtt["dense"]["p50_s"],
                               1e3 * rtt["dense"]["p99_s"]]])
    conv = results.get("convergence")
    if conv:
        print(f"# convergence: {conv['config']} at G = {conv['groups']}, "
              f"{len({r['seed'] for r in conv['runs']})} seeds; gap = AUC - BSP's AUC, same seed; "
              f"staleness: mean rows staleness read")
        common.print_table(["dense", "consistency", "AUC mean", "AUC min", "AUC max",
                            "gap mean", "gap s.e.", "gap min", "staleness mean"],
                           [[layout, k, v["auc_mean"], v["auc_min"], v["auc_max"],
                             v["auc_gap_mean"], v.get("auc_gap_se"), v["auc_gap_min"],
                             v["staleness_mean"]]
                            for layout, summary in conv["summary"].items()
                            for k, v in summary.items()])
    g = results.get("goals", {})
    if g:
        print("# goals")
        common.print_table(["goal", "value", "target", "met", "note"],
                           [[k, v["value"], v["goal"],
                             "-" if v["met"] is None else "yes" if v["met"] else "NO",
                             _goal_note(v)] for k, v in g.items()])


def _goal_note(v):
    if "schedule_bound" in v:
        return (f"best possible {v['ideal']:.3f} with unbounded staleness, "
                f"{v['schedule_bound']:.3f} on the ideal s = 2 schedule of these delays")
    if "ideal" in v and "without_straggler" in v:
        return (f"best possible {v['ideal']:.3f} (no straggler: SSP/BSP "
                f"{v['without_straggler']:.3f})")
    if "without_straggler" in v:
        return f"no straggler: SSP/BSP {v['without_straggler']:.3f}"
    if "ideal" in v:
        return f"best possible {v['ideal']:.3f}"
    if "pipelining_gain" in v:
        return f"pipelining gain of s = 1: {v['pipelining_gain']:.3f}"
    if "largest_difference" in v:
        note = f"AUC lost vs BSP; largest |difference| {v['largest_difference']:.4f}"
        if v.get("collective_vs_bsp") and v["collective_vs_bsp"]["se"] is not None:
            note += (f"; collective - BSP {v['collective_vs_bsp']['mean']:+.5f} "
                     f"+- {v['collective_vs_bsp']['se']:.5f}")
        return note
    if "group_rate_ratio" in v:
        return f"fastest / slowest group clock rate {v['group_rate_ratio']:.3f}"
    return ""
