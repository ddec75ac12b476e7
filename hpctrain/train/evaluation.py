"""Exact evaluation metrics over the whole eval set, across ranks.

AUC is computed exactly (Mann–Whitney U with average ranks for tied scores) on
rank 0 after gathering every rank's scores; it is not a mini-batch average.
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


def logloss(labels, logits):
    """Mean binary cross-entropy of ``logits`` (stable form), as float64."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def accuracy(labels, logits):
    """Share of samples whose logit sign matches the label."""
    y = np.asarray(labels).ravel() > 0.5
    return float(np.mean((np.asarray(logits).ravel() > 0) == y))


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
