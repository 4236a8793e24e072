"""Evaluation results: metrics from an accumulator, diagnostics, and the JSON / CSV / table reports."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import metrics as M
from ._version import __version__
from .probability import curves

if TYPE_CHECKING:
    from .confusion import ConfusionMatrix

COUNT_KEYS = ("tp", "fp", "fn", "tn", "support", "predicted")


@dataclass
class EvaluationResult:
    """Everything one evaluation produced.

    ``confusion_matrix[i, j]`` counts voxels with ground-truth label ``labels[i]`` predicted as
    ``labels[j]`` (rows = ground truth, columns = prediction). It is ``None`` when the label space
    was too large for a dense table (diagonal + marginals mode); every metric is exact either way.
    """

    labels: np.ndarray
    confusion_matrix: np.ndarray | None
    per_class: dict[int, dict[str, Any]]
    mean: dict[str, Any]
    foreground_mean: dict[str, Any]
    micro: dict[str, float]
    weighted: dict[str, float]
    overall: dict[str, float]
    n_voxels: int
    n_ignored: int
    n_masked: int
    metrics: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    label_names: dict[int, str] | None = None
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] | None = None

    # -------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python types, in the JSON layout of DESIGN.md (NaN -> None)."""
        d: dict[str, Any] = {
            "fastseg_eval_version": __version__,
            "inputs": self.inputs,
            "options": self.options,
            "labels": [int(x) for x in self.labels],
        }
        if self.label_names:
            d["label_names"] = {str(k): v for k, v in self.label_names.items()}
        d.update(
            {
                "n_voxels": self.n_voxels,
                "n_ignored": self.n_ignored,
                "n_masked": self.n_masked,
                "confusion_matrix": None if self.confusion_matrix is None else self.confusion_matrix.tolist(),
                "per_class": {str(k): v for k, v in self.per_class.items()},
                "mean": self.mean,
                "foreground_mean": self.foreground_mean,
                "micro": self.micro,
                "weighted": self.weighted,
                "overall": self.overall,
            }
        )
        if self.curves is not None:
            d["curves"] = self.curves
        d["warnings"] = list(self.warnings)
        d["timing"] = self.timing
        return _jsonable(d)

    def to_json(self, path: str | None = None, *, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (``null`` for undefined values); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def to_csv(self, path: str | None = None) -> str:
        """CSV text, one row per class: label, name, counts, then every selected metric."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "name", *COUNT_KEYS, *self.metrics])
        for lab, row in self.per_class.items():
            name = (self.label_names or {}).get(lab, "")
            w.writerow([lab, name, *(row[k] for k in COUNT_KEYS), *(_csv_num(row[m]) for m in self.metrics)])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        return text

    def to_table(self, *, color: bool = False, metrics: Sequence[str] | None = None) -> str:
        """A plain-text table for people (fits 80 columns with the default metrics)."""
        from .table import format_table

        return format_table(self, color=color, metrics=metrics)

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        fg = self.foreground_mean.get("dice")
        return (
            f"EvaluationResult(labels={[int(x) for x in self.labels][:8]}{'...' if len(self.labels) > 8 else ''}, "
            f"n_voxels={self.n_voxels}, foreground_mean_dice={fg})"
        )


def _csv_num(x: Any) -> Any:
    return "" if isinstance(x, float) and math.isnan(x) else x


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def result_from_counts(
    acc: ConfusionMatrix,
    *,
    metrics: Sequence[str] | str | None = None,
    tversky_alpha: float = 0.5,
    tversky_beta: float = 0.5,
    smooth: float = 0.0,
    empty: str = "nan",
    background_label: int | None = 0,
    label_names: Mapping[int, str] | None = None,
    inputs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    timing: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> EvaluationResult:
    """Derive every metric from an accumulator's counts."""
    M.check_empty(empty)
    check_metric_options(tversky_alpha, tversky_beta, smooth)
    names = M.resolve_metrics(metrics)
    labels = acc.labels
    n = acc.n_voxels
    diag, gtc, prc = acc.diagonal, acc.gt_counts, acc.pred_counts
    counts = M.class_counts(diag, gtc, prc, n)
    opts = {"tversky_alpha": tversky_alpha, "tversky_beta": tversky_beta, "smooth": smooth, "empty": empty}
    values = M.compute(names, counts["tp"], counts["fp"], counts["fn"], counts["tn"], **opts)

    per_class: dict[int, dict[str, Any]] = {}
    for i, lab in enumerate(labels.tolist()):
        row: dict[str, Any] = {k: int(counts[k][i]) for k in COUNT_KEYS}
        row.update({name: float(values[name][i]) for name in names})
        per_class[int(lab)] = row

    all_classes = np.ones(len(labels), dtype=bool)
    fg = labels != background_label if background_label is not None else all_classes
    mean, mean_n = M.macro(values, all_classes)
    fg_mean, fg_n = M.macro(values, fg)
    pooled = {k: np.array([counts[k][fg].sum()], dtype=np.int64) for k in ("tp", "fp", "fn", "tn")}
    micro = {k: float(v[0]) for k, v in M.compute(names, **pooled, **opts).items()}
    overall = {
        k: float(M.apply_empty(np.array([v]), empty)[0]) for k, v in M.overall(diag, gtc, prc, n).items()
    }

    res = EvaluationResult(
        labels=labels,
        confusion_matrix=acc.counts if acc.is_dense else None,
        per_class=per_class,
        mean={**mean, "n_averaged": mean_n},
        foreground_mean={**fg_mean, "n_averaged": fg_n},
        micro=micro,
        weighted=M.weighted(values, counts["support"]),
        overall=overall,
        n_voxels=n,
        n_ignored=acc.n_ignored,
        n_masked=acc.n_masked,
        metrics=names,
        options={
            "labels_from": _labels_from(acc),
            "ignore_label": acc.ignore_label,
            "background_label": background_label,
            **opts,
            "metrics": names,
            "matrix": "dense" if acc.is_dense else "diagonal+marginals",
            **(options or {}),
        },
        inputs=dict(inputs or {}),
        label_names={int(k): str(v) for k, v in label_names.items()} if label_names else None,
        timing=dict(timing or {}),
    )
    spec = acc._prob
    if spec is not None and spec.bins:
        curve_labels = [1] if spec.mode == "threshold" else list(range(spec.channels))
        res.curves = curves(acc._hist, spec, curve_labels)
    res.warnings = [*warnings, *diagnose(res, counts, background_label)]
    if not acc.is_dense:
        res.warnings.append(
            f"{len(labels)} labels: kept the diagonal and marginals only (no full matrix); "
            "every per-class and overall metric is exact"
        )
    return res


def check_metric_options(tversky_alpha: float, tversky_beta: float, smooth: float) -> None:
    from .errors import OptionError

    for name, v in (("tversky_alpha", tversky_alpha), ("tversky_beta", tversky_beta), ("smooth", smooth)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) or v < 0:
            raise OptionError(f"{name} must be a finite number >= 0, got {v!r}")


def _labels_from(acc: ConfusionMatrix) -> str:
    num_classes, labels = acc._config
    if labels is not None:
        return "labels"
    if num_classes is not None:
        return "num_classes"
    return "discovered"


def diagnose(res: EvaluationResult, counts: dict[str, np.ndarray], background_label: int | None) -> list[str]:
    """Plain-language warnings that help read the numbers."""
    out: list[str] = []
    labels = [int(x) for x in res.labels]
    n = res.n_voxels
    if n == 0:
        out.append("no voxel was counted (everything ignored or masked out): every metric is undefined")
        return out
    support, predicted = counts["support"], counts["predicted"]
    for i, lab in enumerate(labels):
        if support[i] == 0 and predicted[i] > 0:
            out.append(
                f"label {lab} is absent from the ground truth but predicted in {int(predicted[i])} voxels "
                "(precision 0, recall undefined)"
            )
        elif support[i] > 0 and predicted[i] == 0:
            out.append(
                f"label {lab} is in the ground truth ({int(support[i])} voxels) but never predicted (recall 0)"
            )
    ignore = res.options.get("ignore_label")
    if ignore is not None and ignore in labels:
        i = labels.index(ignore)
        out.append(
            f"the prediction holds the ignore label {ignore} in {int(predicted[i])} counted voxels; "
            "ignore_label only skips ground-truth voxels, so it is counted as a predicted label there"
        )
    absent = [lab for i, lab in enumerate(labels) if support[i] == 0 and predicted[i] == 0]
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        out.append(
            f"{len(absent)} label(s) appear in neither volume ({shown}): their metrics follow empty={res.options['empty']!r}"
        )
    acc_all = res.overall.get("accuracy", float("nan"))
    fg_iou = res.foreground_mean.get("iou")
    if background_label in labels and fg_iou is not None and not math.isnan(fg_iou):
        bg = labels.index(background_label)
        share = support[bg] / n
        if acc_all >= 0.9 and fg_iou < 0.5 and share >= 0.5:
            out.append(
                f"class imbalance: overall accuracy {acc_all:.3f} is dominated by label {background_label} "
                f"({100 * share:.0f}% of voxels) while the mean foreground IoU is {fg_iou:.3f}; "
                "read the per-class and foreground means"
            )
    if len(labels) == 1:
        out.append(f"only one label ({labels[0]}) occurs: per-class metrics are trivial")
    return out
