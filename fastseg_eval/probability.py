"""Probability maps: how predictions become labels, and threshold-sweep curves.

* Binary maps (``threshold``): a voxel is predicted positive (label 1) iff ``p > threshold``.
* Per-class maps (``channel_axis``): the predicted label is the channel of the largest
  probability (the first one on ties, as ``numpy.argmax``).
* Integer maps holding scaled probabilities (e.g. uint8 0..255) are read as ``value / prob_scale``.

With ``thresholds=B`` the same pass fills, per class, a histogram of predicted probability
split by ground truth positive / negative (``B + 1`` bins, memory independent of the volume).
Cumulative sums give TP / FP / FN / TN for the rule "p > t" at every ``t = (i + 0.5) / B``
(``i = 0 .. B-1``), exactly. These thresholds lie halfway between the levels ``k / B``, so for a map
quantised to those levels the curves equal the exact ones;
from them the ROC and PR curves, ROC AUC, average precision (scikit-learn's step-wise
definition) and the thresholds that maximise Dice and IoU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import OptionError, option

DEFAULT_THRESHOLD = 0.5
DEFAULT_BINS = 1000
MAX_BINS = 1 << 20
_EXACT_RANKS = 32  # AP bound: ranks inside a bin summed exactly, beyond by an integral


@dataclass(frozen=True)
class ProbabilitySpec:
    """How the prediction's values turn into labels (and whether to sweep thresholds)."""

    mode: str  # "threshold" | "argmax"
    threshold: float = DEFAULT_THRESHOLD
    scale: float = 1.0
    bins: int = 0  # 0: no sweep
    channels: int = 2  # classes: 2 for a binary map, the channel count for argmax

    @property
    def curve_classes(self) -> int:
        """Histograms kept: one (class 1) for a binary map, one per channel for argmax."""
        return 1 if self.mode == "threshold" else self.channels

    def edges(self) -> np.ndarray:
        """The sweep thresholds ``(i + 0.5) / bins`` (float64), ``bins`` of them."""
        if not self.bins:
            return np.zeros(1)
        return (np.arange(self.bins, dtype=np.float64) + 0.5) / self.bins


def check_bins(thresholds: Any) -> int:
    if thresholds is None or thresholds is False:
        return 0
    if thresholds is True:
        return DEFAULT_BINS
    if (
        isinstance(thresholds, bool)
        or not isinstance(thresholds, (int, np.integer))
        or not 1 <= thresholds <= MAX_BINS
    ):
        raise OptionError(
            f"{option('thresholds')} must be a number of bins between 1 and {MAX_BINS}, got {thresholds!r}"
        )
    return int(thresholds)


def make_spec(
    pred_dtype: np.dtype,
    pred_ndim: int,
    gt_ndim: int,
    pred_shape: tuple[int, ...],
    *,
    threshold: Any,
    channel_axis: Any,
    thresholds: Any,
    prob_scale: Any,
    num_classes: Any,
    labels: Any,
) -> tuple[ProbabilitySpec | None, int | None]:
    """The spec for a prediction (None: integer labels), and the normalised channel axis."""
    bins = check_bins(thresholds)
    wants = threshold is not None or channel_axis is not None or bins > 0 or prob_scale is not None
    if not wants:
        return None, None
    if prob_scale is not None:
        if (
            isinstance(prob_scale, bool)
            or not isinstance(prob_scale, (int, float, np.number))
            or not (math.isfinite(prob_scale) and prob_scale > 0)
        ):
            raise OptionError(
                f"{option('prob_scale')} must be a positive number (e.g. 255 for uint8 maps), got {prob_scale!r}"
            )
    if pred_dtype.kind in "iub" and prob_scale is None:
        raise OptionError(
            f"pred holds {pred_dtype} values: for a probability map stored as integers pass "
            f"{option('prob_scale')} (e.g. 255 when 0..255 means 0..1); for label volumes drop {option('threshold')}/"
            f"{option('channel_axis')}/{option('thresholds')}"
        )
    if pred_dtype.kind not in "iubf":
        raise OptionError(
            f"pred has dtype {pred_dtype}: a probability map must be floating point or scaled integers"
        )
    if labels is not None:
        raise OptionError(
            f"{option('labels')} cannot be combined with a probability map: its labels are 0/1 or the channel "
            "indices"
        )
    if channel_axis is not None:
        if threshold is not None:
            raise OptionError(
                f"{option('threshold')} applies to binary maps; with {option('channel_axis')} the label is the "
                "argmax"
            )
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise OptionError(f"{option('channel_axis')} must be an integer axis, got {channel_axis!r}")
        if pred_ndim != gt_ndim + 1:
            raise OptionError(
                f"with {option('channel_axis')} the prediction needs one axis more than the ground truth "
                f"(pred has {pred_ndim} axes, gt {gt_ndim})"
            )
        ax = int(channel_axis)
        if not -pred_ndim <= ax < pred_ndim:
            raise OptionError(
                f"{option('channel_axis', channel_axis)} is out of range for a {pred_ndim}-d prediction"
            )
        ax %= pred_ndim
        channels = int(pred_shape[ax])
        if channels < 1:
            raise OptionError("the channel axis of the prediction is empty")
        if num_classes is not None and num_classes != channels:
            raise OptionError(
                f"{option('num_classes', num_classes)} but the prediction has {channels} channels on axis {ax}"
            )
        spec = ProbabilitySpec("argmax", scale=float(prob_scale or 1.0), bins=bins, channels=channels)
        return spec, ax
    t = DEFAULT_THRESHOLD if threshold is None else threshold
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not 0.0 <= float(t) < 1.0:
        raise OptionError(f"{option('threshold')} must be a number in [0, 1), got {threshold!r}")
    if num_classes is not None and num_classes != 2:
        raise OptionError(
            f"a thresholded binary map has 2 classes (0 and 1), not {option('num_classes', num_classes)}"
        )
    return ProbabilitySpec("threshold", threshold=float(t), scale=float(prob_scale or 1.0), bins=bins), None


def scale_mistake(spec: ProbabilitySpec | None, float_max: float) -> str | None:
    """Why ``prob_scale`` cannot fit a float map whose largest value is ``float_max``; None if it can.

    A float map whose values all lie in [0, 1] holds probabilities already: dividing them by a
    scale above 1 leaves every voxel near 0 (Dice 0 at every threshold). A map of zeros tells nothing.
    """
    if spec is None or spec.scale <= 1.0 or not 0.0 < float_max <= 1.0:
        return None
    return (
        f"{option('prob_scale', f'{spec.scale:g}')} divides pred's values by {spec.scale:g}, but they already "
        f"lie in [0, 1] (the largest is {float_max:.6g}): they are probabilities as they are; drop "
        f"{option('prob_scale')} (it is meant for maps stored as scaled integers, e.g. uint8 0..255)"
    )


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
