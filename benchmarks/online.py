#!/usr/bin/env python3
"""Freshness vs AUC on a drifting stream: serving copies synced every 10/50/200 steps vs frozen.

Usage (from the repository root, one process)::

    python benchmarks/online.py [--warmup-steps 200] [--online-steps 2000] [--batch 256]
                                [--json bench-results/online.json] [--workdir DIR]

What runs:

1. ``hpctrain stream-produce``'s drifting source writes the whole stream first (so that
   producing does not compete with training for the cores): the planted model turns by
   90 degrees over ``--drift-samples`` samples and ids shift by ``--id-drift`` per sample.
2. One trainer reads the stream (``data.format = "stream"``) with ``[online]`` deltas every
   10 steps. After ``--warmup-steps`` it checkpoints; that checkpoint is exported and loaded
   into four serving copies (``ServingModel``).
3. For every later batch, before the trainer trains on it, each serving copy scores it
   (its progressive validation): the copies synced every 10, 50 and 200 steps apply the
   committed deltas at their interval (``DeltaApplier.poll``), the frozen copy never does.
   The trainer's own progressive validation is the "every step" line.

Reported per copy: AUC and log loss over the online phase, AUC per window of 200 steps,
the mean steps and seconds between a delta's commit and its application (export lag); per
10-step delta: rows, tombstones, bytes on disk, and the distinct ids the 10 steps touched.
"""
import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hpctrain.checkpoint import export_model  # noqa: E402
from hpctrain.checkpoint.delta import list_deltas, read_done  # noqa: E402
from hpctrain.comm import create_communicator  # noqa: E402
from hpctrain.config import loads_config  # noqa: E402
from hpctrain.config.data import SyntheticConfig  # noqa: E402
from hpctrain.data.stream_produce import DriftingSource, produce  # noqa: E402
from hpctrain.train.evaluation import logloss, roc_auc  # noqa: E402
from hpctrain.train.loop import Trainer  # noqa: E402
from hpctrain.train.serving import DeltaApplier, Predictor, ServingModel  # noqa: E402
from hpctrain.versions import cpu_model  # noqa: E402

CONFIG = """
seed = 7
global_batch = {batch}
steps = {steps}
threads = {threads}

[model]
kind = "dlrm"
bottom = [32, 16]
top = [32, 1]

{tables}

[dense_optimizer]
kind = "adam"
lr = 0.002

[data]
format = "stream"
prefetch = 2
[data.train]
paths = "{stream}"

[checkpoint]
directory = "{work}/ckpt"
every_steps = {warmup}
keep_last = 100

[metrics]
path = "{work}/metrics.jsonl"
every_steps = 100

[online]
directory = "{work}/deltas"
delta_every_steps = 10
progressive = false     # this script scores every copy itself, the trainer included
"""

TABLE = """
[[tables]]
name = "{f}"
features = ["{f}"]
dim = 16
optimizer = {{ kind = "adagrad", lr = 0.05 }}
eviction = {{ ttl = {ttl} }}
"""

INTERVALS = (10, 50, 200)


class Replica:
    """A serving copy synced every ``interval`` steps (None: frozen)."""

    def __init__(self, name, model_path, deltas, interval):
        self.name, self.interval = name, interval
        self.applier = DeltaApplier(ServingModel.load(model_path), deltas)
        self.pred = Predictor(self.applier.model)
        self.z, self.lag_steps, self.lag_s = [], [], []

    def sync(self, step):
        if self.interval is None or step % self.interval:
            return
        for d in self.applier.poll():
            self.lag_steps.append(step - d["step"])
            self.lag_s.append(d["lag_s"])


class OnlineBench(Trainer):
    """The trainer, with serving copies scoring every batch before it trains on it."""

    def setup(self, work, warmup):
        self.work, self.warmup, self.replicas = work, warmup, []
        self.y, self.z_train, self.touched = [], [], []

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.warmup and not self.replicas:
            model = export_model(path, os.path.join(self.work, "base.h5"))
            deltas = os.path.join(self.work, "deltas")
            self.replicas = [Replica(f"every {i}", model, deltas, i) for i in INTERVALS]
            self.replicas.append(Replica("frozen", model, deltas, None))
        return path

    def _dense_step(self, batch, pooled, step, flags):
        if self.replicas:
            for r in self.replicas:
                r.sync(step - 1)
                r.z.append(r.pred.logits(batch))
            self.y.append(np.asarray(batch.labels, dtype=np.float64))
            z = self.model.forward(batch.dense, [pooled[f] for f in self.features],
                                   training=False)
            self.z_train.append(np.asarray(z, dtype=np.float64).ravel())
            nf, b = len(batch.features), batch.size
            feature = np.repeat(np.arange(nf), batch.lengths.reshape(nf, b).sum(axis=1))
            self.touched.append((step, np.unique(feature * (1 << 40) + batch.values)))
        return super()._dense_step(batch, pooled, step, flags)


def _windows(y, z, per, size):
    out = []
    for a in range(0, len(y), per):
        yy, zz = np.concatenate(y[a:a + per]), np.concatenate(z[a:a + per])
        out.append(round(roc_auc(yy, zz), 4))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--online-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--vocab", type=int, default=20000)
    p.add_argument("--drift-samples", type=int, default=400_000)
    p.add_argument("--id-drift", type=float, default=0.01)
    p.add_argument("--ttl", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=200, help="steps per AUC window")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=os.path.join("bench-results", "online.json"))
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="hpctrain-online-")
    steps = a.warmup_steps + a.online_steps
    feats = [f"C{i}" for i in range(1, a.features + 1)]
    syn = SyntheticConfig(features=feats, num_dense=4, vocab=[a.vocab] * a.features,
                          zipf=1.05, bag_size=[1] * a.features, bag_size_min=[1] * a.features,
                          positive_rate=0.25, signal=2.0)
    stream = os.path.join(work, "stream")
    records = 1024
    t0 = time.perf_counter()
    produce(stream, DriftingSource(syn, 1, a.drift_samples, a.id_drift),
            segment_records=records, segments=-(-steps * a.batch // records))
    produce_s = time.perf_counter() - t0
    tables = "".join(TABLE.format(f=f, ttl=a.ttl) for f in feats)
    cfg = loads_config(CONFIG.format(batch=a.batch, steps=steps, threads=a.threads,
                                     tables=tables, stream=stream, work=work,
                                     warmup=a.warmup_steps), source="online.toml")
    tr = OnlineBench(cfg, create_communicator("null"), stream=io.StringIO())
    tr.setup(work, a.warmup_steps)
    t0 = time.perf_counter()
    tr.fit()
    train_s = time.perf_counter() - t0

    per = a.window
    y = np.concatenate(tr.y)
    lines = [("every step (trainer)", tr.z_train, 0, 0.0)]
    for r in tr.replicas:
        lines.append((r.name, r.z, float(np.mean(r.lag_steps)) if r.lag_steps else None,
                      float(np.mean(r.lag_s)) if r.lag_s else None))
    result = {"cpu": cpu_model(), "python": platform.python_version(),
              "batch": a.batch, "warmup_steps": a.warmup_steps, "online_steps": a.online_steps,
              "drift_samples": a.drift_samples, "id_drift": a.id_drift, "vocab": a.vocab,
              "features": a.features, "ttl": a.ttl, "produce_s": produce_s, "train_s": train_s,
              "copies": []}
    print(f"{'serving copy':<22} {'AUC':>7} {'logloss':>8} {'lag steps':>9} {'lag s':>7}  "
          f"AUC per {per} steps")
    for name, z, lag_steps, lag_s in lines:
        zz = np.concatenate(z)
        rec = {"name": name, "auc": roc_auc(y, zz), "logloss": logloss(y, zz),
               "lag_steps": lag_steps, "lag_s": lag_s,
               "auc_windows": _windows(tr.y, z, per, a.batch)}
        result["copies"].append(rec)
        print(f"{name:<22} {rec['auc']:7.4f} {rec['logloss']:8.4f} "
              f"{'' if lag_steps is None else f'{lag_steps:.1f}':>9} "
              f"{'' if lag_s is None else f'{lag_s:.3f}':>7}  {rec['auc_windows']}")

    # delta size vs rows touched (the 10-step deltas of the online phase)
    touched = dict((s, ids) for s, ids in tr.touched)
    sizes = []
    for step, path in list_deltas(os.path.join(work, "deltas"), after=a.warmup_steps):
        done = read_done(path)
        if done["since"] != step - 10:
            continue
        ids = [touched[s] for s in range(step - 9, step + 1) if s in touched]
        if len(ids) < 10:
            continue
        rows = sum(sum(t["rows"]) for t in done["tables"].values())
        gone = sum(sum(t["tombstones"]) for t in done["tables"].values())
        nbytes = sum(f["size"] for f in done["files"].values())
        sizes.append((rows, gone, nbytes, np.unique(np.concatenate(ids)).size, done["dense"]))
    s = np.array([x[:4] for x in sizes], dtype=np.float64)
    result["delta"] = {"count": len(sizes), "rows": s[:, 0].mean(), "tombstones": s[:, 1].mean(),
                       "bytes": s[:, 2].mean(), "ids_touched": s[:, 3].mean(),
                       "bytes_per_row": (s[:, 2] / np.maximum(s[:, 0], 1)).mean()}
    d = result["delta"]
    print(f"10-step deltas ({d['count']}): {d['rows']:.0f} rows, {d['tombstones']:.0f} tombstones, "
          f"{d['bytes'] / 1024:.1f} KiB ({d['bytes_per_row']:.0f} B/row); "
          f"{d['ids_touched']:.0f} distinct ids touched in those 10 steps")
    print(f"stream written in {produce_s:.1f} s; {steps} steps trained in {train_s:.1f} s "
          f"({cpu_model()})")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
