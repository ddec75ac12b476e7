"""Sharded embedding step (lookup + backward + update) and its exchanges vs raw Alltoallv.

Run under MPI: ``mpiexec -n 2 python -m mpi4py -m hpctrain.bench exchange``.

Workload (the table benchmark's): per rank ``--batch`` samples (4096) x ``--features``
(26) one-hot ids drawn Zipf(``--zipf`` 1.05) over ``--vocab`` (10^6) per feature, one
table per feature, for each width in ``--dims`` (16, 64). Measured in one run:

* ``step``: full ``ShardedEmbedding`` forward + backward + update over all ranks, with
  the per-phase breakdown (``ShardedEmbedding.timers``, mean seconds per step, max over
  ranks);
* ``one_rank``: the weak-scaling baseline, in the same run: every rank in turn steps alone
  (a world of one) while the others sleep, interleaved step by step with the sharded step;
  ``weak_ratio_one_rank`` is the median over steps of (mean 1-rank step) / (sharded step),
  i.e. per-rank throughput at N ranks over the 1-rank throughput;
* ``weak``: the same step by every rank alone (a world of one, all ranks at once so the
  machine is as loaded as in the sharded run), interleaved step by step with the sharded
  one: per-rank throughput ratio sharded/alone (p50, and of the fastest steps);
* ``exchange``: the four exchanges of a step (counts, ids, rows, grads), each started after
  a barrier, through hpctrain's MPI communicator vs through raw mpi4py ``Alltoallv``
  (``_RawComm``): the same steps by two ``ShardedEmbedding`` instances, interleaved, so
  both see the same bytes, caches and load: ratio raw/ours (median of pairs, and of the
  fastest). ``replay``: the last step's calls replayed back to back with raw mpi4py.
"""
import time

import numpy as np

from hpctrain.bench.common import parser, print_table, stats, world, write_json

GOAL_EXCHANGE = 0.9
GOAL_WEAK = 0.85


def make_batches(rank, n, batch, features, vocab, zipf, seed):
    """``n`` one-hot JaggedBatches of this rank (ids Zipf over ``[0, vocab)``)."""
    from hpctrain.sparse import JaggedBatch
    rng = np.random.default_rng([seed, rank])
    names = [f"f{i}" for i in range(features)]
    out = []
    for _ in range(n):
        ids = (rng.zipf(zipf, size=(batch, features)) - 1) % vocab
        out.append(JaggedBatch.one_hot(names, ids))
    return out


class _Stepper:
    """forward + backward of one batch after another (gradients: a fixed random tensor)."""

    def __init__(self, emb, batches, dim):
        self.emb, self.batches, self.step = emb, batches, 0
        b = batches[0].batch_size
        g = np.random.default_rng(7).standard_normal((b, dim)).astype(np.float32) * 1e-3
        self.grads = {f: g for f in batches[0].features}

    def __call__(self):
        batch = self.batches[self.step % len(self.batches)]
        _, ticket = self.emb.forward(batch, self.step)
        self.emb.backward(ticket, self.grads, self.step)
        self.step += 1


class _TimedComm:
    """Delegates to a communicator; times each alltoall(v) from a barrier to completion."""

    capabilities = frozenset()   # collectives only: the embedding runs exchange="alltoallv"

    def __init__(self, comm):
        self._c = comm
        self.rank, self.size, self.mpi_comm = comm.rank, comm.size, comm.mpi_comm
        self.record = []       # (kind, dtype, tail elements, send_counts, recv_counts, seconds)

    def _note(self, sendbuf, sc, rc, t0):
        tail = int(np.prod(sendbuf.shape[1:], dtype=np.int64))
        self.record.append((sendbuf.dtype, tail, np.array(sc), np.array(rc),
                            time.perf_counter() - t0))

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        self._c.barrier()
        t0 = time.perf_counter()
        out = self._c.alltoallv(sendbuf, send_counts, recv_counts, recvbuf)
        self._note(sendbuf, send_counts, recv_counts, t0)
        return out

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        self._c.barrier()
        t0 = time.perf_counter()
        handle = self._c.ialltoallv(sendbuf, send_counts, recv_counts, recvbuf)
        outer = self

        class _H:
            def wait(self):
                out = handle.wait()
                outer._note(sendbuf, send_counts, recv_counts, t0)
                return out
        return _H()

    def barrier(self):
        self._c.barrier()


class _RawComm:
    """The least a communicator can do: mpi4py ``Alltoallv`` with counts scaled to elements.

    A ``ShardedEmbedding`` over it runs the very same step with raw MPI exchanges, so the
    two can be compared in the same conditions (caches, load) as they occur in a step.
    """

    capabilities = frozenset()

    def __init__(self, mpi_comm):
        from mpi4py import MPI
        self.mpi_comm, self.rank, self.size = mpi_comm, mpi_comm.rank, mpi_comm.size
        self._types = {np.dtype(np.int64): MPI.INT64_T, np.dtype(np.float32): MPI.FLOAT}

    def _args(self, sendbuf, sc, rc, recvbuf):
        tail = sendbuf.size // sendbuf.shape[0] if sendbuf.shape[0] else 1
        if recvbuf is None:
            recvbuf = np.empty((int(np.sum(rc)), *sendbuf.shape[1:]), sendbuf.dtype)
        sc, rc = np.asarray(sc) * tail, np.asarray(rc) * tail
        sd, rd = np.cumsum(sc) - sc, np.cumsum(rc) - rc
        t = self._types[sendbuf.dtype]
        return [sendbuf, (sc, sd), t], [recvbuf, (rc, rd), t], recvbuf

    def alltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        s, r, out = self._args(sendbuf, send_counts, recv_counts, recvbuf)
        self.mpi_comm.Alltoallv(s, r)
        return out

    def ialltoallv(self, sendbuf, send_counts, recv_counts, recvbuf=None):
        s, r, out = self._args(sendbuf, send_counts, recv_counts, recvbuf)
        req = self.mpi_comm.Ialltoallv(s, r)

        class _H:
            def wait(self):
                req.Wait()
                return out
        return _H()

    def barrier(self):
        self.mpi_comm.Barrier()


def _raw_calls(record):
    """Buffers and arguments of raw mpi4py ``Alltoallv`` calls moving the bytes ``record`` moved."""
    from mpi4py import MPI
    calls = []
    for dtype, tail, sc, rc, _ in record:
        sc, rc = sc * tail, rc * tail
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
        sbuf = np.zeros(max(int(sc.sum()), 1), dtype=dtype)
        rbuf = np.empty(max(int(rc.sum()), 1), dtype=dtype)
        mt = MPI.INT64_T if dtype == np.int64 else MPI.FLOAT
        calls.append(([sbuf, (sc, sd), mt], [rbuf, (rc, rd), mt]))
    return calls


def _raw_exchange(mpi_comm, calls):
    """Seconds of the raw calls, each started after a barrier (as ``_TimedComm`` does)."""
    total = 0.0
    for s, r in calls:
        mpi_comm.Barrier()
        t0 = time.perf_counter()
        mpi_comm.Alltoallv(s, r)
        total += time.perf_counter() - t0
    return total


def _interleaved(mpi, fns, warmup, repeat):
    """Run ``fns`` in turn (each between barriers, max over ranks): one list of seconds each."""
    for _ in range(warmup):
        for f in fns:
            f()
    out = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(repeat):
        # forwards, then backwards (ABBA...), so no function always runs right after another
        for k in (order if i % 2 == 0 else order[::-1]):
            mpi.Barrier()
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(mpi.allreduce(time.perf_counter() - t0, op=_max()))
    return out


class _IdleTurns:
    """Every rank in turn runs ``stepper`` while the others sleep: a 1-rank run on a quiet
    machine, measured in the same run (step by step between the sharded ones).

    ``own`` collects this rank's step seconds (one per call).
    """

    def __init__(self, mpi, stepper):
        self.mpi, self.stepper, self.own = mpi, stepper, []

    def __call__(self):
        for r in range(self.mpi.size):
            if r == self.mpi.rank:
                t0 = time.perf_counter()
                self.stepper()
                self.own.append(time.perf_counter() - t0)
            # sleep instead of a polling barrier: a waiting rank takes no core
            req = self.mpi.Ibarrier()
            while not req.Test():
                time.sleep(2e-4)


def _max():
    from mpi4py import MPI
    return MPI.MAX


def _run_dim(args, comm, dim, batches):
    from hpctrain.comm import create_communicator
    from hpctrain.sparse import PHASES, ShardedEmbedding, TableSpec
    mpi = comm.mpi_comm
    specs = [TableSpec(f"t{i}", dim, [f"f{i}"], optimizer=args.optimizer)
             for i in range(args.features)]

    # 1. the sharded step (phase breakdown) interleaved with every rank stepping alone
    #    (a world of one; all ranks at once, so the machine is as loaded as when sharded)
    #    and with the same step exchanging everything by Alltoallv
    emb = ShardedEmbedding(specs, comm, seed=0, exchange=args.exchange)
    plain = ShardedEmbedding(specs, comm, seed=0, exchange="alltoallv")
    alone = create_communicator("mpi", mpi_comm=mpi.Split(comm.rank, 0))
    solo = ShardedEmbedding(specs, alone, seed=0, exchange=args.exchange)
    step, solo_step = _Stepper(emb, batches, dim), _Stepper(solo, batches, dim)
    plain_step = _Stepper(plain, batches, dim)
    idle = _IdleTurns(mpi, solo_step)
    for _ in range(args.warmup):
        step()
    emb.reset_timers()
    times, solo_times, plain_times, _ = _interleaved(mpi, [step, solo_step, plain_step, idle],
                                                     args.warmup, args.repeat)
    # 1-rank baseline of the same run: every rank's own step while its peers slept
    idle_own = np.array(mpi.allgather(idle.own[args.warmup:]))   # [ranks, repeat]
    idle_times = idle_own.mean(axis=0)
    phases = {k: max(mpi.allgather(v / args.repeat)) for k, v in emb.timers.items()}
    table_rows = mpi.allreduce(sum(len(t) for t in emb.tables.values()))
    mode = emb.exchange
    for e in (emb, plain):
        e.close()
    solo.close()
    del emb, plain, solo, step, solo_step, plain_step

    # 2. the Alltoallv path (what crosses nodes) over our communicator and over raw mpi4py
    #    (_RawComm), interleaved; every exchange starts after a barrier, timed to completion
    timed, timed_raw = _TimedComm(comm), _TimedComm(_RawComm(mpi))
    stepper = _Stepper(ShardedEmbedding(specs, timed, seed=0, exchange="alltoallv"),
                       batches, dim)
    raw_stepper = _Stepper(ShardedEmbedding(specs, timed_raw, seed=0, exchange="alltoallv"),
                           batches, dim)
    for _ in range(args.warmup):
        stepper()
        raw_stepper()
    ours, raw, replay = [], [], []
    for i in range(args.exchange_repeat):
        for t, f in ((timed, stepper), (timed_raw, raw_stepper))[::1 if i % 2 == 0 else -1]:
            t.record = []
            f()
        ours.append(max(mpi.allgather(sum(r[-1] for r in timed.record))))
        raw.append(max(mpi.allgather(sum(r[-1] for r in timed_raw.record))))
    # and the recorded calls replayed back to back (warm caches, no step around them)
    calls = _raw_calls(timed.record)
    for _ in range(args.warmup + args.exchange_repeat):
        replay.append(max(mpi.allgather(_raw_exchange(mpi, calls))))
    moved = sum(int(sc.sum()) * tail * np.dtype(dt).itemsize
                for dt, tail, sc, _, _ in timed.record)
    del stepper, raw_stepper

    st, so, sp, si = stats(times), stats(solo_times), stats(plain_times), stats(idle_times)
    o50, r50 = float(np.median(ours)), float(np.median(raw))
    # pairs ran back to back, so their ratio cancels most of the machine's load swings
    pair_weak = float(np.median(np.array(solo_times) / np.array(times)))
    pair_ex = float(np.median(np.array(raw) / np.array(ours)))
    return {
        "dim": dim, "ranks": comm.size, "exchange": mode, "step": st, "step_alone": so,
        "step_alltoallv": sp,
        "alltoallv_over_step": float(np.median(np.array(plain_times) / np.array(times))),
        "samples_per_s_per_rank": args.batch / st["p50"],
        "alone_samples_per_s": args.batch / so["p50"],
        "step_one_rank": si, "one_rank_samples_per_s": args.batch / si["p50"],
        "weak_ratio_one_rank": float(np.median(idle_times / np.array(times))),
        "weak_ratio": pair_weak, "weak_ratio_p50s": so["p50"] / st["p50"],
        "weak_ratio_min": so["min"] / st["min"],
        "phases": {k: phases[k] for k in PHASES},
        "exchange_ours_s": o50, "exchange_raw_s": r50, "exchange_ratio": pair_ex,
        "exchange_ratio_p50s": r50 / o50,
        "exchange_replay_s": float(np.median(replay[args.warmup:])),
        "exchange_ratio_replay": float(np.median(replay[args.warmup:])) / o50,
        "exchange_ratio_min": min(raw) / min(ours),
        "exchange_bytes_sent_rank0": moved, "table_rows_total": table_rows,
    }


def main(argv=None):
    p = parser("exchange", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096, help="samples per rank")
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--vocab", type=int, default=10**6)
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--dims", default="16,64")
    p.add_argument("--optimizer", default="adagrad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange-repeat", type=int, default=40,
                   help="steps whose exchanges are paired with raw Alltoallv")
    p.add_argument("--exchange", default="auto", choices=["auto", "shm", "alltoallv"],
                   help="how the timed step exchanges rows with ranks of its node")
    args = p.parse_args(argv)
    from hpctrain._kernels import _openmp
    from hpctrain.comm import create_communicator
    if args.threads:
        _openmp.set_num_threads(args.threads)
    comm = create_communicator("mpi", mpi_comm=world())
    batches = make_batches(comm.rank, 8, args.batch, args.features, args.vocab, args.zipf,
                           args.seed)
    results = [_run_dim(args, comm, int(d), batches) for d in args.dims.split(",")]
    if comm.rank == 0:
        print(f"# exchange: {comm.size} rank(s), {args.batch} samples x {args.features} "
              f"features per rank, Zipf({args.zipf}) over {args.vocab}, "
              f"{_openmp.get_num_threads()} thread(s), {args.optimizer}, "
              f"exchange {results[0]['exchange']}")
        print("# 1-rank: each rank's step alone while its peers sleep; weak/1-rank: median "
              "over steps of its mean / the sharded step")
        print("# alone: all ranks step alone at once; weak ratio, raw/ours: median over "
              "back-to-back pairs; (min): of the fastest;")
        print("# a2a step: the same step with every exchange by Alltoallv; a2a ours/raw: its "
              "exchanges")
        print_table(["dim", "step p50 ms", "samples/s/rank", "1-rank ms", "weak/1-rank",
                     "alone ms", "weak ratio", "(min)", "a2a step ms", "a2a ours ms", "a2a raw ms", "raw/ours", "(min)",
                     "replay ms"],
                    [[r["dim"], r["step"]["p50"] * 1e3, r["samples_per_s_per_rank"],
                      r["step_one_rank"]["p50"] * 1e3, r["weak_ratio_one_rank"],
                      r["step_alone"]["p50"] * 1e3, r["weak_ratio"], r["weak_ratio_min"],
                      r["step_alltoallv"]["p50"] * 1e3,
                      r["exchange_ours_s"] * 1e3, r["exchange_raw_s"] * 1e3,
                      r["exchange_ratio"], r["exchange_ratio_min"],
                      r["exchange_replay_s"] * 1e3] for r in results])
        print("# phases, ms per step (max over ranks)")
        names = list(results[0]["phases"])
        print_table(["dim", *names],
                    [[r["dim"], *(r["phases"][k] * 1e3 for k in names)] for r in results])
        print(f"# goals: raw/ours >= {GOAL_EXCHANGE}, weak ratio >= {GOAL_WEAK} (ranks > 1)")
    write_json("exchange", {"config": vars(args), "results": results,
                            "goals": {"exchange_ratio": GOAL_EXCHANGE, "weak_ratio": GOAL_WEAK}},
               path=args.json, comm=world())
    return 0
