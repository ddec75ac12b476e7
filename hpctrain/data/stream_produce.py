"""``hpctrain stream-produce``: synthetic samples from a drifting planted model, as a stream.

Sample ``k`` is ``hpctrain.data.synthetic``'s train sample ``k`` (dense features,
Zipf ids) with two changes that make the stream drift:

- the ids move: every id of sample ``k`` is shifted by ``floor(k * id_drift)``, so new
  ids keep appearing and old ones go cold (a frozen model meets ids it never saw);
- the planted model turns: with ``A`` and ``B`` the planted models of seeds ``seed``
  and ``seed + 1`` and ``theta_k = (pi / 2) * k / drift_samples``::

      logit_k = bias + cos(theta_k) * (logit_A - bias) + sin(theta_k) * (logit_B - bias)

  (the variance of the logit stays that of one planted model; after ``drift_samples``
  samples the model is ``B``, orthogonal to where it started).

  label_k = 1 if unit(hash(seed, k)) < sigmoid(logit_k)

Every value is a function of ``(seed, k)``, so a producer restarted on the same
directory continues with exactly the samples it would have written.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

from hpctrain.data.stream import (END, end_stream, format_record, read_layout, segment_paths,
                                  write_layout, write_segment)
from hpctrain.data.synthetic import SyntheticDataset, mix_add, unit

_T_LABEL = 0x57AB1E


class DriftingSource:
    """Samples of the drifting stream (see the module doc).

    Args:
        synthetic: a ``hpctrain.config.SyntheticConfig``.
        seed: the stream's seed.
        drift_samples: samples over which the planted model turns by 90 degrees (None or 0:
            no turn).
        id_drift: id shift per sample.
    """

    def __init__(self, synthetic, seed, drift_samples=None, id_drift=0.0):
        self.cfg = synthetic
        self.a = SyntheticDataset(synthetic, seed, "train", None)
        self.b = SyntheticDataset(synthetic, seed + 1, "train", None)
        self.drift_samples, self.id_drift = drift_samples, float(id_drift)
        self.features, self.num_dense = self.a.features, self.a.num_dense
        self._label_key = mix_add(mix_add(self.a.S, _T_LABEL), 0)

    def theta(self, k):
        """The planted model's angle at samples ``k`` (radians)."""
        k = np.asarray(k, dtype=np.float64)
        return (0.5 * math.pi) * k / self.drift_samples if self.drift_samples else 0.0 * k

    def rows(self, start, count):
        """``(sample ids, Rows)`` of samples ``start .. start + count - 1``."""
        k = np.arange(start, start + count, dtype=np.int64)
        rows = self.a.fetch(k)
        if self.id_drift:
            shift = np.floor(k * self.id_drift).astype(np.int64)
            per_sample = np.tile(shift, rows.lengths.shape[0])
            rows.values = rows.values + np.repeat(per_sample, rows.lengths.reshape(-1))
        la, lb = self.a.planted_logits(rows), self.b.planted_logits(rows)
        th = self.theta(k)
        bias = self.a.bias
        logit = bias + np.cos(th) * (la - bias) + np.sin(th) * (lb - bias)
        u = unit(mix_add(self._label_key, k.astype(np.uint64)))
        rows.labels = (u < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return k, rows

    def records(self, start, count):
        """Record lines (str) of samples ``start .. start + count - 1``."""
        k, rows = self.rows(start, count)
        nf, n = rows.lengths.shape
        starts = np.concatenate(([0], np.cumsum(rows.lengths.reshape(-1))))
        out = []
        for i in range(n):
            bags = [rows.values[starts[f * n + i]:starts[f * n + i + 1]] for f in range(nf)]
            out.append(format_record(k[i], rows.labels[i], rows.dense[i], bags))
        return out


def first_unsealed(directory, partitions):
    """The ordinal of the first segment without a DONE marker."""
    o = 0
    while os.path.exists(segment_paths(directory, o, partitions)[1]):
        o += 1
    return o


def produce(directory, source, *, segment_records=1000, partitions=1, segments=None, rate=0.0,
            end=True, bad_every=0, log=None, stop=None):
    """Append sealed segments of ``source`` to the stream at ``directory``.

    Continues after the last sealed segment (sample ``ordinal * segment_records`` starts
    segment ``ordinal``), so a restarted producer writes what it would have written.

    Args:
        segment_records: records per segment.
        partitions: partitions of the stream (fixed when the directory is created).
        segments: stop after this many segments in all (None: endless).
        rate: records per second (0: as fast as possible).
        end: write ``END`` after the last segment (with ``segments``).
        bad_every: make every n-th record malformed (0: none), to exercise the bad-line policy.
        log: a file for one line per segment (None: quiet).
        stop: a ``threading.Event`` that ends production.

    Returns:
        The number of segments in the stream afterwards.
    """
    write_layout(directory, source.features, source.num_dense, partitions)
    partitions = read_layout(directory)["partitions"]
    o = first_unsealed(directory, partitions)
    t0, made = time.monotonic(), 0
    while segments is None or o < segments:
        if stop is not None and stop.is_set():
            break
        start = o * segment_records
        lines = source.records(start, segment_records)
        if bad_every:
            for i in range(len(lines)):
                if (start + i + 1) % bad_every == 0:
                    lines[i] = lines[i].replace("\t", " ", 1)
        write_segment(directory, o, partitions, lines)
        made += segment_records
        if log is not None:
            print(f"stream-produce: sealed segment {o} (records {start}..{start + len(lines) - 1})",
                  file=log, flush=True)
        o += 1
        if rate > 0:
            ahead = made / rate - (time.monotonic() - t0)
            if ahead > 0:
                if stop is not None:
                    stop.wait(ahead)
                else:
                    time.sleep(ahead)
    if end and segments is not None and o >= segments \
            and not os.path.exists(os.path.join(directory, END)):
        end_stream(directory, segments)
    return o


def produce_jetstream(url, stream, subject, source, *, segment_records=1000, segments=None,
                      rate=0.0, end=True, stop=None):
    """Publish ``source``'s records to a JetStream subject (``--nats``), ``segment_records``
    per round; continues after the records already in the stream. Returns the records
    in the stream afterwards."""
    from hpctrain.data.jetstream import publish, published
    start = published(url, stream)
    total = None if segments is None else segments * segment_records
    t0, made = time.monotonic(), 0
    while total is None or start < total:
        if stop is not None and stop.is_set():
            break
        n = segment_records if total is None else min(segment_records, total - start)
        publish(url, stream, subject, source.records(start, n),
                end=end and total is not None and start + n >= total)
        start, made = start + n, made + n
        if rate > 0:
            ahead = made / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    return start


def main(argv=None):
    """``hpctrain stream-produce DIR [options]``."""
    from hpctrain.config.data import SyntheticConfig
    p = argparse.ArgumentParser(prog="hpctrain stream-produce",
                                description="Write synthetic samples from a drifting planted "
                                            "model to a segment stream directory.")
    p.add_argument("directory")
    p.add_argument("--features", type=int, default=4, help="sparse features (C1..Cn)")
    p.add_argument("--num-dense", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000, help="ids per feature")
    p.add_argument("--bag-size", type=int, default=1)
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--signal", type=float, default=2.0)
    p.add_argument("--positive-rate", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--drift-samples", type=int, default=200_000,
                   help="samples over which the planted model turns by 90 degrees (0: none)")
    p.add_argument("--id-drift", type=float, default=0.0, help="id shift per sample")
    p.add_argument("--segment-records", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--segments", type=int, default=None, help="stop after N segments (END)")
    p.add_argument("--rate", type=float, default=0.0, help="records per second (0: no limit)")
    p.add_argument("--bad-every", type=int, default=0, help="make every n-th record malformed")
    p.add_argument("--nats", default=None, metavar="URL",
                   help="publish to NATS JetStream at URL instead of writing segments "
                        "(DIRECTORY is then the JetStream stream name)")
    p.add_argument("--subject", default="train", help="JetStream subject (with --nats)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    feats = [f"C{i}" for i in range(1, a.features + 1)]
    syn = SyntheticConfig(features=feats, num_dense=a.num_dense, vocab=[a.vocab] * a.features,
                          zipf=a.zipf, bag_size=[a.bag_size] * a.features,
                          bag_size_min=[a.bag_size] * a.features,
                          positive_rate=a.positive_rate, signal=a.signal)
    src = DriftingSource(syn, a.seed, a.drift_samples or None, a.id_drift)
    if a.nats:
        n = produce_jetstream(a.nats, a.directory, a.subject, src,
                              segment_records=a.segment_records, segments=a.segments,
                              rate=a.rate)
        print(f"stream-produce: {n} records in JetStream stream {a.directory} "
              f"(subject {a.subject})", flush=True)
        return 0
    try:
        n = produce(a.directory, src, segment_records=a.segment_records,
                    partitions=a.partitions, segments=a.segments, rate=a.rate,
                    bad_every=a.bad_every, log=None if a.quiet else sys.stdout)
    except KeyboardInterrupt:
        return 130
    print(f"stream-produce: {n} segments in {a.directory}", flush=True)
    return 0
