"""Exact evaluation metrics over the whole eval set, across ranks.

AUC is exact (Mann-Whitney U with average ranks for tied scores), never a mini-batch
average. ``evaluate_distributed`` computes it without gathering the scores anywhere:
a sample sort by score (splitters from every rank's sample, one ``alltoallv``), so each
rank holds O(n / P) scores, and equal scores never span two ranks, so ties are ranked
where they are whole::

    rank r: its scores sorted -> splitters s_1 < ... < s_{P-1} (from everyone's sample)
    alltoallv: scores in [s_r, s_{r+1}) to rank r; sort; average ranks of ties
    + offset (samples on ranks < r); AUC from the positives' rank sum (allreduce)

Rank sums are sums of half-integers, exact in float64 below 2^52 samples, so the AUC
is the same bits on any number of ranks; logloss and accuracy are allreduced sums.
"""
import numpy as np


def roc_auc(labels, scores):
    """Exact ROC AUC of ``scores`` for binary ``labels`` (ties count one half).

    Returns NaN when only one class is present.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels shape {labels.shape} != scores shape {scores.shape}")
    pos = labels > 0.5
    n_pos = int(pos.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank (1-based) over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _bce(y, z):
    """Per-sample binary cross-entropy of logits ``z`` (stable form), float64 arrays."""
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def _correct(y, z):
    """Per-sample: does the logit's sign match the label."""
    return (np.asarray(z).ravel() > 0) == (np.asarray(y).ravel() > 0.5)


def logloss(labels, logits):
    """Mean binary cross-entropy of ``logits`` (stable form), as float64."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    return float(np.mean(_bce(y, z)))


def accuracy(labels, logits):
    """Share of samples whose logit sign matches the label."""
    return float(np.mean(_correct(labels, logits)))


def gather_eval(comm, labels, logits):
    """Concatenate every rank's labels and logits on all ranks (rank order).

    Args:
        comm: an hpctrain Communicator (any backend, the null one included).
        labels, logits: this rank's float arrays of equal length.
    """
    labels = np.ascontiguousarray(labels, dtype=np.float64).ravel()
    logits = np.ascontiguousarray(logits, dtype=np.float64).ravel()
    return comm.allgatherv(labels), comm.allgatherv(logits)


def evaluate_arrays(labels, logits):
    """Dict of AUC, logloss, accuracy and count for gathered arrays."""
    return {"auc": roc_auc(labels, logits), "logloss": logloss(labels, logits),
            "accuracy": accuracy(labels, logits), "count": int(np.asarray(labels).size)}


def _local_rank_sum(sorted_scores, labels_sorted, offset):
    """Sum of the average (1-based, global) ranks of the positives in a sorted block."""
    n = sorted_scores.size
    if n == 0:
        return 0.0
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0 + offset
    pos_per_run = np.add.reduceat((labels_sorted > 0.5).astype(np.float64), starts)
    return float(np.dot(avg, pos_per_run))


def evaluate_distributed(comm, labels, logits):
    """``evaluate_arrays`` of the concatenation of every rank's arrays, with O(n / P)
    memory per rank (see the module doc). Collective; the same dict on every rank."""
    y = np.ascontiguousarray(labels, dtype=np.float64).ravel()
    z = np.ascontiguousarray(logits, dtype=np.float64).ravel()
    if y.shape != z.shape:
        raise ValueError(f"labels shape {y.shape} != logits shape {z.shape}")
    P = comm.size
    sums = np.array([y.size, float((y > 0.5).sum()),
                     float(np.sum(_bce(y, z))), float(np.sum(_correct(y, z)))],
                    dtype=np.float64)
    comm.allreduce(sums, op="sum")
    n, n_pos = int(sums[0]), int(sums[1])
    out = {"auc": float("nan"), "logloss": float(sums[2] / max(n, 1)),
           "accuracy": float(sums[3] / max(n, 1)), "count": n}
    if n == 0:
        out["logloss"] = out["accuracy"] = float("nan")
        return out
    order = np.argsort(z, kind="mergesort")
    z, y = z[order], y[order]
    offset = 0
    if P > 1:
        # splitters: P-1 quantiles of a regular sample of every rank's sorted scores
        k = min(z.size, 4 * P)
        sample = z[np.linspace(0, z.size - 1, k).astype(np.int64)] if k else z[:0]
        every = np.sort(comm.allgatherv(sample))
        cut = every[(np.arange(1, P) * every.size) // P] if every.size else np.zeros(P - 1)
        # a score goes to the range whose lower splitter it reaches: equal scores together
        starts = np.searchsorted(z, cut, side="left")
        counts = np.diff(np.r_[0, starts, z.size]).astype(np.int64)
        ones = np.ones(P, dtype=np.int64)
        recv = comm.alltoallv(counts, ones, ones)
        z = comm.alltoallv(z, counts, recv)
        y = comm.alltoallv(y, counts, recv)
        order = np.argsort(z, kind="mergesort")
        z, y = z[order], y[order]
        sizes = comm.allgatherv(np.array([z.size], dtype=np.int64))
        offset = int(sizes[:comm.rank].sum())
    rank_sum = np.array([_local_rank_sum(z, y, offset)], dtype=np.float64)
    comm.allreduce(rank_sum, op="sum")
    n_neg = n - n_pos
    if n_pos and n_neg:
        out["auc"] = float((rank_sum[0] - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return out
