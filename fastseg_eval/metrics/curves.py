"""Threshold-sweep curves from binned probability counts: ROC / PR, ROC AUC, average precision.

The counts come from a probability-map run with ``thresholds=B`` (see
:mod:`fastseg_eval.reducers.probability`): per class, positives and negatives by probability bin.
Everything here is pure numpy over those counts, including the proven bounds on how far the
binned ROC AUC and average precision can lie from the exact (unbinned) values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastseg_eval.reducers.probability import ProbabilitySpec

_EXACT_RANKS = 32  # AP bound: ranks inside a bin summed exactly, beyond by an integral


def curves(hist: np.ndarray, spec: ProbabilitySpec, labels: list[int]) -> dict[int, Any]:
    """Per-class curves from sweep histograms ``hist`` of shape ``(classes, 2, bins + 1)``, by label."""
    edges = spec.edges()
    out: dict[int, Any] = {}
    for c, lab in enumerate(labels):
        out[int(lab)] = class_curve(hist[c, 1], hist[c, 0], edges)
    return out


def class_curve(pos: np.ndarray, neg: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """Counts at every threshold ("p > t"), ROC AUC, average precision and best Dice / IoU."""
    pos = np.asarray(pos, dtype=np.int64)
    neg = np.asarray(neg, dtype=np.int64)
    npos, nneg = int(pos.sum()), int(neg.sum())
    nb = len(edges)
    tp = (npos - np.cumsum(pos))[:nb]  # voxels with p > edges[i]
    fp = (nneg - np.cumsum(neg))[:nb]
    fn = npos - tp
    tn = nneg - fp
    # the curve from "nothing positive" through the thresholds downwards to "everything positive"
    tp_d = np.concatenate([[0], tp[::-1], [npos]]).astype(np.float64)
    fp_d = np.concatenate([[0], fp[::-1], [nneg]]).astype(np.float64)
    if npos > 0 and nneg > 0:
        tpr, fpr = tp_d / npos, fp_d / nneg
        roc_auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    else:
        roc_auc = float("nan")
    if npos > 0:
        recall = tp_d / npos
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp_d + fp_d > 0, tp_d / (tp_d + fp_d), 1.0)
        ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    else:
        ap = float("nan")
    auc_err, ap_err = _binning_errors(pos, neg)
    tpf, fpf, fnf = tp.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tpf + fpf + fnf > 0, 2 * tpf / (2 * tpf + fpf + fnf), np.nan)
        iou = np.where(tpf + fpf + fnf > 0, tpf / (tpf + fpf + fnf), np.nan)
    return {
        "thresholds": edges.tolist(),
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        "tn": tn.tolist(),
        "roc_auc": roc_auc,
        "roc_auc_max_error": auc_err,
        "average_precision": ap,
        "average_precision_max_error": ap_err,
        "best_dice": _best(dice, edges, "dice"),
        "best_iou": _best(iou, edges, "iou"),
    }


def _binning_errors(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Largest possible difference between the binned and the exact ROC AUC / average precision.

    The bounds hold for every set of scores that puts ``pos[b]`` positives and ``neg[b]``
    negatives in bin ``b`` (ties, bins of one class, values on an edge included), against
    scikit-learn's ``roc_auc_score`` and ``average_precision_score`` (up to floating-point
    rounding, ~1e-15). They are the largest differences such scores can produce (the AP bound
    exceeds it by under 5e-5 in all, from bins of over ``_EXACT_RANKS`` positives, below), so
    they are 0 only where binning cannot move the value.

    Derivation. Bins are disjoint score intervals, so binning loses only the order of voxels
    that share a bin, and what a bin contributes depends on its own order alone (the counts
    above it are fixed). The worst cases of the bins can be chosen independently, so the largest
    error is ``max(sum_b up_b, sum_b down_b)``, ``up_b`` / ``down_b`` the most bin ``b`` can move
    the exact value above / below the binned one.

    * ROC AUC (Mann-Whitney: a positive-negative pair counts 1 when ordered, 1/2 when tied):
      binning scores each of the ``p_b n_b`` pairs inside a bin 1/2, the exact value 0, 1/2 or
      1, so ``up_b = down_b = p_b n_b / (2 P N)`` (all positives of every bin above, or below,
      its negatives).
    * Average precision is ``(1/P) sum_i prec_i`` over positives ``i``, ``prec_i = t_i / (t_i +
      f_i)`` counting the voxels scored at least as high as ``i``. For a positive of bin ``b``
      ``t_i = T + j``, ``f_i = F + f`` (``T``, ``F``: positives, negatives in higher bins;
      ``1 <= j <= p_b``, ``0 <= f <= n_b`` within the bin, and the ``r``-th positive of the bin
      in score order has ``j >= r``). The binned value gives every positive of the bin
      ``g(p_b) = (T + p_b) / (T + p_b + G)``, ``G = F + n_b``.
      Highest exact value: all positives tied above the bin's negatives, each ``(T + p_b) / (T +
      p_b + F)``: ``up_b = p_b (T + p_b) n_b / ((T + p_b + F)(T + p_b + G)) / P``. Lowest: the
      negatives above distinct positives, ``g(r)`` for ``r = 1 .. p_b``: ``down_b = sum_r (g(p_b)
      - g(r)) / P`` (nonzero for ``p_b >= 2`` with ``G > 0``: two positives of different scores
      below a negative, even in a bin without negatives). The sum is exact for ``r <=
      _EXACT_RANKS`` (``R``); beyond, ``g`` is concave, so ``g(r) >= integral of g over [r - 1/2,
      r + 1/2]``, which bounds the rest of the sum in closed form (a log). That integral falls
      short of ``g(r)`` by ``G / (12 x^3)`` at most (``x >= T + G + r - 1/2``): under ``1 / (24 (R -
      1/2))`` per such bin, which holds over ``R`` positives, hence under ``5e-5`` once divided by ``P``.
    """
    npos, nneg = float(pos.sum()), float(neg.sum())
    p, n = pos.astype(np.float64), neg.astype(np.float64)
    auc_err = float(np.sum(p * n) / (2 * npos * nneg)) if npos > 0 and nneg > 0 else float("nan")
    if npos == 0:
        return auc_err, float("nan")
    above_t = np.concatenate([np.cumsum(p[::-1])[::-1][1:], [0.0]])  # positives in higher bins
    above_f = np.concatenate([np.cumsum(n[::-1])[::-1][1:], [0.0]])
    g_all = above_f + n  # negatives at or above the bin
    with np.errstate(invalid="ignore", divide="ignore"):
        up_den = (above_t + p + above_f) * (above_t + p + g_all)
        up = np.where((p > 0) & (n > 0), p * (above_t + p) * n / up_den, 0.0)
        gm = np.where(p > 0, (above_t + p) / (above_t + p + g_all), 0.0)  # g(p_b), the binned precision
        down = np.zeros_like(p)
        for r in range(1, _EXACT_RANKS + 1):  # exact terms g(p_b) - g(r), r = 1 .. min(p_b, _EXACT_RANKS)
            down += np.where(p >= r, gm - (above_t + r) / (above_t + r + g_all), 0.0)
        # r > _EXACT_RANKS: sum of g(p_b) - g(r) <= (p_b - R) g(p_b) - integral of g over [R + 1/2, p_b + 1/2]
        rest = np.maximum(p - _EXACT_RANKS, 0.0)
        base = above_t + g_all + _EXACT_RANKS + 0.5
        tail = g_all * (np.log1p(rest / base) - rest / (above_t + p + g_all))
        down += np.where((rest > 0) & (g_all > 0), np.maximum(tail, 0.0), 0.0)
    ap_err = float(max(np.sum(up), np.sum(np.maximum(down, 0.0))) / npos)
    return auc_err, ap_err


def _best(values: np.ndarray, edges: np.ndarray, name: str) -> dict[str, Any]:
    if np.all(np.isnan(values)):
        return {"threshold": None, name: None}
    i = int(np.nanargmax(values))
    return {"threshold": float(edges[i]), name: float(values[i])}
