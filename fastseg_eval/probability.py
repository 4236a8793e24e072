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

from .errors import OptionError

DEFAULT_THRESHOLD = 0.5
DEFAULT_BINS = 1000
MAX_BINS = 1 << 20


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
        raise OptionError(f"thresholds must be a number of bins between 1 and {MAX_BINS}, got {thresholds!r}")
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
                f"prob_scale must be a positive number (e.g. 255 for uint8 maps), got {prob_scale!r}"
            )
    if pred_dtype.kind in "iub" and prob_scale is None:
        raise OptionError(
            f"pred holds {pred_dtype} values: for a probability map stored as integers pass prob_scale "
            "(e.g. 255 when 0..255 means 0..1); for label volumes drop threshold/channel_axis/thresholds"
        )
    if pred_dtype.kind not in "iubf":
        raise OptionError(
            f"pred has dtype {pred_dtype}: a probability map must be floating point or scaled integers"
        )
    if labels is not None:
        raise OptionError(
            "labels cannot be combined with a probability map: its labels are 0/1 or the channel indices"
        )
    if channel_axis is not None:
        if threshold is not None:
            raise OptionError("threshold applies to binary maps; with channel_axis the label is the argmax")
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise OptionError(f"channel_axis must be an integer axis, got {channel_axis!r}")
        if pred_ndim != gt_ndim + 1:
            raise OptionError(
                f"with channel_axis the prediction needs one axis more than the ground truth "
                f"(pred has {pred_ndim} axes, gt {gt_ndim})"
            )
        ax = int(channel_axis)
        if not -pred_ndim <= ax < pred_ndim:
            raise OptionError(f"channel_axis={channel_axis} is out of range for a {pred_ndim}-d prediction")
        ax %= pred_ndim
        channels = int(pred_shape[ax])
        if channels < 1:
            raise OptionError("the channel axis of the prediction is empty")
        if num_classes is not None and num_classes != channels:
            raise OptionError(
                f"num_classes={num_classes} but the prediction has {channels} channels on axis {ax}"
            )
        spec = ProbabilitySpec("argmax", scale=float(prob_scale or 1.0), bins=bins, channels=channels)
        return spec, ax
    t = DEFAULT_THRESHOLD if threshold is None else threshold
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not 0.0 <= float(t) < 1.0:
        raise OptionError(f"threshold must be a number in [0, 1), got {threshold!r}")
    if num_classes is not None and num_classes != 2:
        raise OptionError(f"a thresholded binary map has 2 classes (0 and 1), not num_classes={num_classes}")
    return ProbabilitySpec("threshold", threshold=float(t), scale=float(prob_scale or 1.0), bins=bins), None


def curves(hist: np.ndarray, spec: ProbabilitySpec, labels: list[int]) -> dict[str, Any]:
    """Per-class curves from sweep histograms ``hist`` of shape ``(classes, 2, bins + 1)``."""
    edges = spec.edges()
    out: dict[str, Any] = {}
    for c, lab in enumerate(labels):
        out[str(lab)] = class_curve(hist[c, 1], hist[c, 0], edges)
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

    Binning only loses the order of voxels that share a bin. ROC AUC counts a positive-negative
    pair in one bin as a tie (1/2) where the exact value is 0 or 1: the error is at most
    ``sum_b pos_b neg_b / (2 P N)``. For average precision, each positive of bin ``b`` adds
    ``1/P`` times a precision that, in any order inside the bin, lies between
    ``(T + 1) / (T + 1 + F + neg_b)`` and ``(T + pos_b) / (T + pos_b + F)`` (``T``, ``F``: positives
    and negatives in higher bins); the binned value lies in the same interval.
    Both bounds are 0 when no bin holds positives and negatives together.
    """
    npos, nneg = float(pos.sum()), float(neg.sum())
    p, n = pos.astype(np.float64), neg.astype(np.float64)
    auc_err = float(np.sum(p * n) / (2 * npos * nneg)) if npos > 0 and nneg > 0 else float("nan")
    if npos == 0:
        return auc_err, float("nan")
    above_t = np.concatenate([np.cumsum(p[::-1])[::-1][1:], [0.0]])  # positives in higher bins
    above_f = np.concatenate([np.cumsum(n[::-1])[::-1][1:], [0.0]])
    mixed = (p > 0) & (n > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = (above_t + p) / (above_t + p + above_f)
        lo = (above_t + 1) / (above_t + 1 + above_f + n)
    ap_err = float(np.sum(np.where(mixed, p / npos * (hi - lo), 0.0)))
    return auc_err, ap_err


def _best(values: np.ndarray, edges: np.ndarray, name: str) -> dict[str, Any]:
    if np.all(np.isnan(values)):
        return {"threshold": None, name: None}
    i = int(np.nanargmax(values))
    return {"threshold": float(edges[i]), name: float(values[i])}
