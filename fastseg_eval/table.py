"""Plain-text report for people: per-class rows, means below, warnings last (80 columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import EvaluationResult

TABLE_METRICS = ("dice", "iou", "precision", "recall", "specificity")
_SHORT = {"precision": "prec", "recall": "recall", "specificity": "spec", "accuracy": "acc",
          "tversky": "tversky", "balanced_accuracy": "bal_acc"}  # fmt: skip


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _count(n: int) -> str:
    return f"{n:,}"


def format_table(res: EvaluationResult, *, color: bool = False, metrics: Sequence[str] | None = None) -> str:
    cols = [m for m in (metrics or TABLE_METRICS) if m in res.metrics] or list(res.metrics[:5])
    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)
    yellow = (lambda s: f"\033[33m{s}\033[0m") if color else (lambda s: s)
    names = res.label_names or {}
    lines: list[str] = []
    pred = res.inputs.get("pred", {}).get("source", "?")
    gt = res.inputs.get("gt", {}).get("source", "?")
    lines.append(f"prediction:   {pred}")
    lines.append(f"ground truth: {gt}")
    shape = res.inputs.get("gt", {}).get("shape")
    extra = f", ignored {_count(res.n_ignored)}" if res.n_ignored else ""
    extra += f", masked out {_count(res.n_masked)}" if res.n_masked else ""
    lines.append(
        f"voxels:       {_count(res.n_voxels)} counted{extra}" + (f"  shape {tuple(shape)}" if shape else "")
    )
    lines.append("")
    lab_w = max([8, *(len(_label(lab, names)) for lab in res.per_class)])
    lab_w = min(lab_w, 18)
    head = f"{'label':<{lab_w}} {'support':>12} " + " ".join(f"{_SHORT.get(c, c)[:8]:>8}" for c in cols)
    lines.append(bold(head))
    lines.append("-" * len(head))
    for lab, row in res.per_class.items():
        lines.append(
            f"{_label(lab, names)[:lab_w]:<{lab_w}} {_count(row['support']):>12} "
            + " ".join(f"{_fmt(row[c]):>8}" for c in cols)
        )
    lines.append("-" * len(head))
    for title, d in (("mean", res.mean), ("fg mean", res.foreground_mean), ("micro", res.micro),
                     ("weighted", res.weighted)):  # fmt: skip
        lines.append(f"{title:<{lab_w}} {'':>12} " + " ".join(f"{_fmt(d.get(c)):>8}" for c in cols))
    o = res.overall
    lines.append("")
    lines.append(
        "overall: accuracy {}  balanced accuracy {}  MCC {}  kappa {}".format(
            *(_fmt(o[k]) for k in ("accuracy", "balanced_accuracy", "mcc", "cohen_kappa"))
        )
    )
    if res.timing.get("seconds"):
        t = res.timing
        lines.append(
            f"time:    {t['seconds']:.2f} s, {t.get('voxels_per_second', 0) / 1e6:.0f} Mvoxel/s, backend {t.get('backend', '?')}"
        )
    if res.warnings:
        lines.append("")
        for w in res.warnings:
            lines.append(yellow(f"warning: {w}"))
    return "\n".join(lines)


def _label(lab: int, names: dict[int, str]) -> str:
    return f"{lab} {names[lab]}" if lab in names else str(lab)
