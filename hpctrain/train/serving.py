"""The serving side: a model in memory, kept current by deltas, and a predictor.

::

    hpctrain export CKPT model.h5        a full model (checkpoint -> model file)
    ServingModel.load("model.h5")        dense model + one hash table per embedding table
    DeltaApplier(model, "deltas/")       applies delta-XXXXXXXX/ in step order (tombstones,
        .poll()                          then rows, then dense weights when the delta has them)
    Predictor(model).predict(batch)      click probabilities, batched lookups

A delta continues from step ``since``; it applies to a model at a step ``>= since``
(rows and tombstones are absolute, so applying a delta that overlaps what the model
already holds is harmless) and brings it to ``step``. A model older than ``since`` is a
gap (deltas were pruned or lost): ``CheckpointError`` says so and names the steps.

The serving copy looks rows up like the trainer's evaluation does: an id the model
does not hold reads a row of zeros (the documented default), nothing is inserted.
So ``Predictor`` scores equal ``Trainer.predict``'s on the same rows.
"""
import json
import sys
import time

import numpy as np

from hpctrain.errors import CheckpointError, ConfigError


def _serving_specs(cfg):
    """The run's table specs for lookups only: no optimizer state, admission or eviction."""
    import dataclasses

    from hpctrain.train.build import table_specs
    return [dataclasses.replace(s, optimizer="sgd", admission=None, eviction=None)
            for s in table_specs(cfg)]


class ServingModel:
    """A trained model held for inference and brought up to date by deltas.

    Args:
        cfg: the run's ``Config``.
        dense: the dense tree (``{"params": {name: array}}``).
        tables: dict table -> ``{"keys": int64[n], "values": float32[n, dim]}``.
        step: the training step the model holds.
        state: JSON-able entries kept in the model file (the config text at least).

    Attributes:
        step: the training step of the model (``model_step``).
        cfg, model (the dense model), store (an ``EmbeddingCollection``), features.
    """

    def __init__(self, cfg, dense, tables, step, state=None):
        from hpctrain.checkpoint._model import _infer_num_dense
        from hpctrain.sparse.collection import EmbeddingCollection
        from hpctrain.train.build import BatchFeatures, build_model, feature_order
        self.cfg, self.step = cfg, int(step)
        self.state = dict(state or {"config": cfg.text})
        self.specs = _serving_specs(cfg)
        self.store = EmbeddingCollection(self.specs, seed=cfg.seed)
        for name, t in tables.items():
            if name not in self.store.tables:
                raise CheckpointError(f"model table {name!r} is not in the config's tables "
                                      f"{sorted(self.store.tables)}")
            self.store.tables[name].import_({"keys": t["keys"], "values": t["values"]})
        num_dense = cfg.data.num_dense()
        if num_dense is None:
            num_dense = _infer_num_dense(cfg, build_model, dense.get("params"))
        self.model = build_model(cfg, num_dense)
        self.model.load_state_dict(dense["params"])
        self.features, _, _ = feature_order(cfg)
        self.jagged = BatchFeatures(cfg)
        self.num_dense = num_dense

    @classmethod
    def load(cls, path):
        """The model in the model file at ``path`` (``hpctrain export``'s layout).

        Raises:
            CheckpointError: not a model file, or no config stored in it.
        """
        from hpctrain.checkpoint.model_file import read_model
        from hpctrain.config import loads_config
        m = read_model(path)
        text = m["state"].get("config")
        if not isinstance(text, str):
            raise CheckpointError(f"{path}: the model file stores no config (state/config); "
                                  f"the model cannot be rebuilt")
        cfg = loads_config(text, source=f"{path}:/state/config")
        return cls(cfg, m["dense"], m["tables"], m["step"], m["state"])

    def save(self, path):
        """Write the model file (``hpctrain export``'s layout) atomically; returns ``path``."""
        from hpctrain.checkpoint.model_file import write_model
        tables = {}
        for s in self.specs:
            e = self.store.tables[s.name].export()
            tables[s.name] = {"keys": e["keys"], "values": e["values"], "dim": s.dim,
                              "row_dtype": e.get("row_dtype", "fp32"),
                              "table_id": s.table_id}
        return write_model(path, self.step, {"params": self.model.state_dict()}, self.state,
                           tables, source="serve-sync")

    def rows(self, table):
        """``(keys, values)`` of ``table``, sorted by key; values as float32."""
        from hpctrain.sparse.rowdtype import to_float32
        e = self.store.tables[table].export()
        order = np.argsort(e["keys"], kind="stable")
        return e["keys"][order], to_float32(e["values"][order], e.get("row_dtype", "fp32"))

    def apply(self, delta):
        """Apply one delta (``hpctrain.checkpoint.delta.read_delta``'s dict).

        Returns:
            False when the model already holds the delta's step (nothing applied), else True.

        Raises:
            CheckpointError: the delta continues from a step after this model's (a gap),
                or names a table the model does not have.
        """
        if delta["step"] <= self.step:
            return False
        if delta["since"] > self.step:
            raise CheckpointError(
                f"delta {delta['step']} continues from step {delta['since']} but the model is "
                f"at step {self.step}: the deltas in between are missing (pruned or lost); "
                f"export a newer checkpoint and sync from there")
        for name, d in delta["tables"].items():
            table = self.store.tables.get(name)
            if table is None:
                raise CheckpointError(f"delta {delta['step']}: table {name!r} is not in the "
                                      f"model ({sorted(self.store.tables)})")
            if d["tombstones"].shape[0]:
                table.remove(d["tombstones"])
            if d["keys"].shape[0]:
                table.import_({"keys": d["keys"], "values": d["values"]})
        if delta.get("dense") is not None:
            self.model.load_state_dict(delta["dense"]["params"])
        self.step = int(delta["step"])
        return True


class DeltaApplier:
    """Keeps a ``ServingModel`` current with the deltas a trainer writes to ``directory``.

    Args:
        model: a ``ServingModel`` (or the path of a model file).
        directory: the trainer's ``[online] directory``.
        verify: check every delta file's size and sha256 against its ``DONE`` first.

    Attributes:
        model: the ``ServingModel``.
        model_step: the step the model holds.
        export_lag_s: seconds from the last applied delta being committed to it being
            applied (None before the first).
        applied: number of deltas applied.
    """

    def __init__(self, model, directory, verify=True):
        self.model = model if isinstance(model, ServingModel) else ServingModel.load(model)
        self.directory, self.verify = directory, verify
        self.export_lag_s, self.applied = None, 0

    @property
    def model_step(self):
        return self.model.step

    def pending(self):
        """Committed deltas newer than the model: ``[(step, path)]`` in step order."""
        from hpctrain.checkpoint.delta import list_deltas
        return list_deltas(self.directory, after=self.model.step)

    def poll(self):
        """Apply every pending delta in order; returns one dict per delta applied (step,
        rows, tombstones, dense, lag_s)."""
        from hpctrain.checkpoint.delta import read_delta
        out = []
        for _, path in self.pending():
            d = read_delta(path, verify=self.verify)
            self.model.apply(d)
            lag = time.time() - d["created"]
            self.export_lag_s, self.applied = lag, self.applied + 1
            out.append({"step": d["step"], "since": d["since"], "lag_s": lag,
                        "dense": d["dense"] is not None,
                        "rows": sum(int(t["keys"].shape[0]) for t in d["tables"].values()),
                        "tombstones": sum(int(t["tombstones"].shape[0])
                                          for t in d["tables"].values())})
        return out

    def run(self, interval=10.0, out_path=None, stop=None, rounds=None, report=None):
        """Poll every ``interval`` seconds; after applying, write ``out_path`` (if given).

        Args:
            stop: a ``threading.Event`` that ends the loop.
            rounds: stop after this many polls (None: until ``stop``).
            report: called with a dict per poll that applied something (model_step,
                export_lag_s, applied deltas).
        """
        n = 0
        while rounds is None or n < rounds:
            done = self.poll()
            if done:
                if out_path is not None:
                    self.model.save(out_path)
                if report is not None:
                    report({"model_step": self.model_step, "export_lag_s": self.export_lag_s,
                            "deltas": done, "time": time.time()})
            n += 1
            if rounds is not None and n >= rounds:
                break
            if stop is not None:
                if stop.wait(interval):
                    break
            else:
                time.sleep(interval)


def make_batch(features, dense, bags, labels=None):
    """A ``hpctrain.data.Batch`` from Python data, to score samples held in memory.

    Args:
        features: the sparse feature names (``Predictor.data_features``).
        dense: float array ``[b, num_dense]``.
        bags: dict feature -> list of b id lists (one bag per sample).
        labels: optional ``[b]`` labels.
    """
    from hpctrain.data.batch import Batch
    dense = np.asarray(dense, dtype=np.float32)
    b = dense.shape[0]
    values, lengths = [], []
    for f in features:
        if f not in bags:
            raise ValueError(f"bags has no feature {f!r} (features: {list(features)})")
        if len(bags[f]) != b:
            raise ValueError(f"feature {f!r}: {len(bags[f])} bags for {b} samples")
        for bag in bags[f]:
            values.extend(int(x) for x in bag)
            lengths.append(len(bag))
    y = np.zeros(b, np.float32) if labels is None else np.asarray(labels, dtype=np.float32)
    return Batch(y, dense, tuple(features), np.asarray(values, dtype=np.int64),
                 np.asarray(lengths, dtype=np.int64), global_size=b)


class Predictor:
    """Scores samples with an exported model: batched lookups, then the dense model.

    Args:
        model: a ``ServingModel`` or the path of a model file (``hpctrain export``).

    Unknown ids read a row of zeros, as in the trainer's evaluation.
    """

    def __init__(self, model):
        self.model = model if isinstance(model, ServingModel) else ServingModel.load(model)

    @property
    def data_features(self):
        """The sparse features a batch must carry (the data's names)."""
        return tuple(dict.fromkeys(f for _, f in self.model.jagged.pairs))

    def logits(self, batch):
        """float64 ``[b]`` logits of a ``Batch`` (what readers yield, or ``make_batch``)."""
        m = self.model
        if batch.size == 0:
            return np.zeros(0)
        pooled, _ = m.store.forward(m.jagged(batch), m.step, train=False)
        z = m.model.forward(batch.dense, [pooled[f] for f in m.features], training=False)
        return np.asarray(z, dtype=np.float64).ravel()

    def predict(self, batch):
        """Click probabilities ``[b]`` (sigmoid of ``logits``)."""
        return 1.0 / (1.0 + np.exp(-self.logits(batch)))

    def score(self, batches):
        """``(labels, logits)`` over an iterable of batches, concatenated."""
        ys, zs = [], []
        for b in batches:
            ys.append(np.asarray(b.labels, dtype=np.float64))
            zs.append(self.logits(b))
        cat = (lambda a: np.concatenate(a) if a else np.zeros(0))
        return cat(ys), cat(zs)

    def reader(self, paths=None, split="eval", batch_size=4096):
        """A one-rank reader of the run's data format: ``paths`` (files, or a stream
        directory read up to its END or until it is idle), else the config's ``split``."""
        import dataclasses

        from hpctrain.config.data import SplitConfig
        from hpctrain.data import make_reader
        cfg = self.model.cfg
        data = cfg.data
        if data.format == "jetstream":
            raise ConfigError("predict: a JetStream model scores files of a segment stream "
                              "(hpctrain.data.stream) or batches given in memory")
        if data.format == "stream":
            if not paths:
                raise ConfigError("predict: a stream model needs the data to score (paths)")
            from hpctrain.data.stream import StreamReader
            from hpctrain.data.text import BadLines
            return _UntilIdle(StreamReader(paths[0], 0, 1, batch_size, BadLines(data.bad_lines),
                                           prefetch=1))
        if paths:
            if data.format == "synthetic":
                raise ConfigError("predict: synthetic data has no files; score a split "
                                  "(--split) instead")
            data = dataclasses.replace(data, eval=SplitConfig(paths=list(paths)))
            split = "eval"
        return make_reader(data, split, 0, 1, batch_size, seed=cfg.seed, epochs=1,
                           drop_last=False, shuffle=False, prefetch=0)


class _UntilIdle:
    """Iterates a stream reader up to its END, or until nothing new comes for 2 s."""

    def __init__(self, reader):
        self.reader = reader

    def __iter__(self):
        while True:
            b = self.reader.poll(2.0)
            if b is None:
                self.reader.close()
                return
            yield b


def _cli(fn):
    """Report an ``HpctrainError`` on one line and exit 1 (these commands run alone)."""
    import functools

    @functools.wraps(fn)
    def wrapper(argv=None):
        from hpctrain.errors import HpctrainError
        try:
            return fn(sys.argv[1:] if argv is None else argv)
        except HpctrainError as exc:
            sys.stderr.write(f"hpctrain: {type(exc).__name__}: {exc}\n")
            return 1
    return wrapper


@_cli
def predict_main(argv):
    """``hpctrain predict MODEL.h5 [DATA ...] [--split eval] [--out FILE]``."""
    import argparse
    p = argparse.ArgumentParser(prog="hpctrain predict",
                                description="Score data with an exported model: one click "
                                            "probability per sample.")
    p.add_argument("model", help="model file (hpctrain export, or serve-sync's output)")
    p.add_argument("data", nargs="*", help="files of the run's data format (a stream "
                                           "directory for stream runs); default: --split")
    p.add_argument("--split", default="eval", choices=("eval", "train"),
                   help="the config's split to score when no DATA is given")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default="-", help="where scores go, one per line (default stdout)")
    p.add_argument("--logits", action="store_true", help="write logits, not probabilities")
    a = p.parse_args(argv)
    pred = Predictor(a.model)
    y, z = pred.score(pred.reader(a.data, a.split, a.batch_size))
    s = z if a.logits else 1.0 / (1.0 + np.exp(-z))
    out = sys.stdout if a.out == "-" else open(a.out, "w", encoding="utf-8")
    try:
        np.savetxt(out, s, fmt="%.9g")
    finally:
        if out is not sys.stdout:
            out.close()
    from hpctrain.train.evaluation import evaluate_arrays
    m = evaluate_arrays(y, z) if y.size else {"count": 0}
    print(f"hpctrain: scored {y.size} samples with the model of step {pred.model.step}"
          + ("".join(f"  {k} {v:.6f}" for k, v in m.items() if isinstance(v, float))),
          file=sys.stderr if a.out == "-" else sys.stdout, flush=True)
    return 0


@_cli
def serve_sync_main(argv):
    """``hpctrain serve-sync MODEL.h5 DELTAS [--out FILE] [--interval S] [--once]``."""
    import argparse
    p = argparse.ArgumentParser(prog="hpctrain serve-sync",
                                description="Keep a serving model current: apply the deltas of "
                                            "an online run in step order.")
    p.add_argument("model", help="the model to start from (hpctrain export's model file)")
    p.add_argument("deltas", help="the run's [online] directory")
    p.add_argument("--out", default=None, help="model file to write after each round "
                                               "(default: MODEL itself)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between scans")
    p.add_argument("--once", action="store_true", help="apply what is there, write, exit")
    p.add_argument("--rounds", type=int, default=None, help="stop after N scans")
    a = p.parse_args(argv)
    applier = DeltaApplier(a.model, a.deltas)
    out = a.out or a.model

    def report(rec):
        print(json.dumps({"model_step": rec["model_step"],
                          "export_lag_s": round(rec["export_lag_s"], 3),
                          "applied": [d["step"] for d in rec["deltas"]],
                          "rows": sum(d["rows"] for d in rec["deltas"]),
                          "tombstones": sum(d["tombstones"] for d in rec["deltas"])}),
              flush=True)

    print(f"hpctrain: serving model at step {applier.model_step}; "
          f"{len(applier.pending())} delta(s) pending in {a.deltas}", flush=True)
    try:
        applier.run(a.interval, out_path=out, rounds=1 if a.once else a.rounds, report=report)
    except KeyboardInterrupt:
        pass
    print(f"hpctrain: model_step {applier.model_step}  {out}", flush=True)
    return 0
