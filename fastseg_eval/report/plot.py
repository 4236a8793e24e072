"""Figures of a result: confusion-matrix heatmap and per-class bars; ROC / PR curves.

matplotlib is optional (``pip install 'fastseg-eval[plot]'``) and imported only here, when a
figure is made. Figures are built with the object-oriented API on an Agg canvas, so making
one never changes the pyplot backend of the calling program.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fastseg_eval.errors import FastSegError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fastseg_eval.report.result import EvaluationResult

MISSING_MATPLOTLIB = "plots need matplotlib, which is not installed: pip install 'fastseg-eval[plot]'"
MAX_BARS = 30
"""At most this many classes get bars (the largest by ground-truth support)."""
MAX_TICK_LABELS = 40
"""Heatmaps with more labels than this get no per-label tick labels."""
MAX_CELL_TEXT = 12
"""Heatmaps with at most this many labels print each cell's value."""


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise FastSegError(MISSING_MATPLOTLIB) from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """``cm`` divided by its row sums (rows = ground truth); NaN for rows with no voxel."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    out = np.full(cm.shape, np.nan)
    np.divide(cm, rows, out=out, where=rows > 0)
    return out


def _display(metric: str) -> str:
    return {"dice": "Dice", "iou": "IoU"}.get(metric, metric)


def _label_text(lab: int, names: Mapping[int, str] | None) -> str:
    return f"{lab} {names[lab]}" if names and lab in names else str(lab)


def bar_classes(res: EvaluationResult, max_bars: int = MAX_BARS) -> list[int]:
    """Labels that get bars: all, or the ``max_bars`` largest by gt support (ties: label order)."""
    labels = [int(x) for x in res.labels]
    if len(labels) <= max_bars:
        return labels
    support = {lab: res.per_class[lab]["support"] for lab in labels}
    keep = set(sorted(labels, key=lambda lab: (-support[lab], lab))[:max_bars])
    return [lab for lab in labels if lab in keep]


def make_figure(res: EvaluationResult, *, max_bars: int = MAX_BARS) -> tuple[Figure, str | None]:
    """The result figure and a note on what was left out (None if nothing was).

    Left: the confusion matrix normalised by ground-truth row (rows = ground truth, columns =
    prediction; each row sums to 1). Right: per-class Dice and IoU bars. Without a full matrix
    (diagonal + marginals mode) only the bars are drawn.
    """
    names = res.label_names or {}
    labels = [int(x) for x in res.labels]
    cm = res.confusion_matrix
    shown = bar_classes(res, max_bars)
    metrics = [m for m in ("dice", "iou") if m in res.metrics] or list(res.metrics[:2])
    notes = []
    if cm is None:
        notes.append(f"{len(labels)} labels: no full confusion matrix was kept, so only bars are drawn")
    if len(shown) < len(labels):
        notes.append(f"bars show the {len(shown)} largest of {len(labels)} classes by ground-truth support")

    k = len(labels)
    heat_w = 0.0 if cm is None else min(max(4.5, 0.35 * k + 2.5), 12.0)
    bars_w = min(max(4.5, 0.3 * len(shown) * max(len(metrics), 1) + 2.0), 14.0)
    fig = _figure(figsize=(heat_w + bars_w, 5.0 if k <= 20 else 7.0), layout="constrained")
    if cm is not None:
        ax_heat, ax_bars = fig.subplots(1, 2, width_ratios=[heat_w, bars_w])
        frac = row_normalised(cm)
        img = ax_heat.imshow(frac, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(img, ax=ax_heat, shrink=0.8, label="share of the ground-truth row")
        ax_heat.set_xlabel("prediction")
        ax_heat.set_ylabel("ground truth")
        ax_heat.set_title("confusion matrix, normalised by ground-truth row", fontsize=10)
        if k <= MAX_TICK_LABELS:
            texts = [_label_text(lab, names) for lab in labels]
            ax_heat.set_xticks(range(k), texts, rotation=90 if k > 6 else 0, fontsize=8)
            ax_heat.set_yticks(range(k), texts, fontsize=8)
        if k <= MAX_CELL_TEXT:
            for i in range(k):
                for j in range(k):
                    if not math.isnan(frac[i, j]):
                        ax_heat.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                     color="black" if frac[i, j] > 0.6 else "white")  # fmt: skip
    else:
        ax_bars = fig.subplots(1, 1)
    x = np.arange(len(shown))
    width = 0.8 / max(len(metrics), 1)
    for i, m in enumerate(metrics):
        heights = [res.per_class[lab][m] for lab in shown]
        heights = [0.0 if h is None or math.isnan(h) else h for h in heights]
        ax_bars.bar(x + (i - (len(metrics) - 1) / 2) * width, heights, width, label=_display(m))
    ax_bars.set_xticks(x, [_label_text(lab, names) for lab in shown], rotation=90 if len(shown) > 6 else 0,
                       fontsize=8)  # fmt: skip
    ax_bars.set_ylabel("score")
    ax_bars.set_ylim(0, 1.15)
    ax_bars.set_title("per-class " + " / ".join(_display(m) for m in metrics), fontsize=10)
    ax_bars.legend(loc="upper center", ncols=max(len(metrics), 1), fontsize=8)
    pred = (res.inputs.get("pred") or {}).get("source", "?")
    gt = (res.inputs.get("gt") or {}).get("source", "?")
    title = f"prediction: {pred}\nground truth: {gt}"
    if notes:
        title += "\n" + "; ".join(notes)
    fig.suptitle(title, fontsize=9)
    return fig, "; ".join(notes) or None


def plot_result(res: EvaluationResult, path: str, *, max_bars: int = MAX_BARS, dpi: int = 120) -> str | None:
    """Save :func:`make_figure` to ``path`` (format from the extension); returns its note."""
    fig, note = make_figure(res, max_bars=max_bars)
    fig.savefig(path, dpi=dpi)
    return note


def _curve_arrays(c: Mapping[str, Any]) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = (np.asarray(c[k], dtype=np.float64) for k in ("tp", "fp", "fn", "tn"))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        fpr = np.where(fp + tn > 0, fp / (fp + tn), np.nan)
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
    return {"fpr": fpr, "tpr": tpr, "recall": tpr, "precision": precision}


def make_curves_figure(curves: Mapping[str, Any] | EvaluationResult, *, max_curves: int = 12) -> Figure:
    """ROC (TPR against FPR) and precision-recall curves per label from a threshold sweep.

    ``curves`` is ``res.curves`` (or a result): ``{"<label>": {"thresholds", "tp", "fp", "fn",
    "tn", "roc_auc", "average_precision", ...}}``; rates are derived from the counts here.
    """
    data = getattr(curves, "curves", curves)
    if not data:
        raise FastSegError("no curves to plot: evaluate with thresholds=B (--sweep) on a probability map")
    fig = _figure(figsize=(10.0, 4.5), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    for lab, c in list(data.items())[:max_curves]:
        r = _curve_arrays(c)
        auc, ap = c.get("roc_auc"), c.get("average_precision")
        ax_roc.plot(r["fpr"], r["tpr"], label=f"{lab}" + (f" (AUC {auc:.3f})" if auc is not None else ""))
        ax_pr.plot(
            r["recall"], r["precision"], label=f"{lab}" + (f" (AP {ap:.3f})" if ap is not None else "")
        )
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set(
        xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02)
    )
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=8, title="label")
    return fig


def plot_curves(curves: Mapping[str, Any] | EvaluationResult, path: str, *, dpi: int = 120) -> None:
    """Save :func:`make_curves_figure` to ``path``."""
    make_curves_figure(curves).savefig(path, dpi=dpi)
