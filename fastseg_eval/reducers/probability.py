"""Probability maps: how predictions become labels (the options a confusion reducer runs with).

The curves computed from a sweep's counts live in :mod:`fastseg_eval.metrics.curves`.


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

from fastseg_eval.errors import OptionError, option

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
