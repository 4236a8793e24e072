"""Plain-text report for people: inputs, per-class rows, means below, warnings last.

Fits an 80-column terminal: the label column takes what the support and metric columns leave,
long label names are shortened with ``..``, and metric columns that do not fit are left out
(and the table says so). Colour (ANSI) only when asked for.
"""

from __future__ import annotations

import math
import textwrap
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastseg_eval.report.result import EvaluationResult

TABLE_METRICS = ("dice", "iou", "precision", "recall", "specificity")
"""Metric columns shown by default (when the user selected no metrics)."""

SHORT_NAMES = {
    "accuracy": "acc", "precision": "prec", "recall": "recall", "specificity": "spec", "dice": "dice",
    "iou": "iou", "tversky": "tvrsky", "npv": "npv", "fpr": "fpr", "fnr": "fnr", "fdr": "fdr", "for": "for",
    "balanced_accuracy": "bal_acc", "informedness": "inform", "markedness": "marked", "mcc": "mcc",
    "fowlkes_mallows": "fm", "prevalence_threshold": "prev_t", "volume_similarity": "vol_sim",
    "hd": "hd", "hd95": "hd95", "assd": "assd", "masd": "masd", "nsd": "nsd",
}  # fmt: skip
"""Column headings (at most 7 characters)."""

_COL = 8  # one metric column: a space and "0.1234" right-aligned in 7
_MIN_LABEL = 12


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isfinite(x) and abs(x) >= 100:  # distances: keep 7 characters
        return f"{x:.{max(0, 5 - len(str(int(abs(x)))))}f}"
    return f"{x:.4f}"


def _count(n: int) -> str:
    return f"{int(n):,}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} "


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 2, 1)] + ".."


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    Label names and paths come from users and files: a newline or an escape sequence in one
    must not break the table's rows or drive the terminal.
    """
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")
        else ch
        for ch in text
    )


def label_text(lab: int, names: dict[int, str] | None) -> str:
    """``"1 liver"`` when label 1 has a name, else ``"1"`` (the name made :func:`printable`)."""
    names = names or {}
    return f"{lab} {printable(str(names[lab]))}" if lab in names else str(lab)


def table_columns(res: EvaluationResult, metrics: Sequence[str] | None) -> list[str]:
    """The metric columns wanted: ``metrics`` if given, else the default core metrics present."""
    if metrics:
        return [m for m in metrics if m in res.metrics]
    cols = [m for m in TABLE_METRICS if m in res.metrics]
    return cols or list(res.metrics)


def _shown_rows(res: EvaluationResult, max_rows: int) -> tuple[list[int], int]:
    labels = res.reported_labels()
    total = len(res.per_class)
    if max_rows <= 0 or len(labels) <= max_rows:
        return labels, total - len(labels)
    size = {lab: res.per_class[lab]["support"] + res.per_class[lab]["predicted"] for lab in labels}
    keep = set(sorted(labels, key=lambda lab: (-size[lab], lab))[:max_rows])
    return [lab for lab in labels if lab in keep], total - len(keep)


def _n_label(title: str, d: dict[str, Any], cols: Sequence[str]) -> str:
    n = d.get("n_averaged")
    if not isinstance(n, dict):
        return title
    counts = sorted({int(n[c]) for c in cols if c in n})
    if not counts:
        return title
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{title} ({span})"


def format_table(
    res: EvaluationResult,
    *,
    color: bool = False,
    metrics: Sequence[str] | None = None,
    width: int = 80,
    max_rows: int = 50,
    max_warnings: int = 20,
) -> str:
    """The report as text for a terminal.

    Parameters
    ----------
    res : EvaluationResult
    color : bool
        ANSI bold headings and yellow warnings.
    metrics : sequence of str, optional
        Canonical metric names for the columns (default :data:`TABLE_METRICS`); columns that
        do not fit in ``width`` are left out, with a note.
    width : int
        Line width to fit (the input paths and warnings wrap; the table itself fits).
    max_rows : int
        Show at most this many per-class rows (those with the most voxels, in label order);
        0 shows every row. Means always cover every class.
    max_warnings : int
        Show at most this many warnings (the JSON report has them all).
    """
    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)
    yellow = (lambda s: f"\033[33m{s}\033[0m") if color else (lambda s: s)
    names = res.label_names or {}
    opts = res.options or {}
    lines: list[str] = []

    # ---------------------------------------------------------------- inputs
    def describe(role: str) -> str:
        d = res.inputs.get(role) or {}
        src = printable(str(d.get("source", "?")))
        extra = []
        if d.get("dtype"):
            extra.append(str(d["dtype"]))
        if d.get("shape") is not None:
            extra.append("x".join(str(s) for s in d["shape"]))
        if not extra or str(d.get("dtype")) in str(src):  # numpy / dask sources describe themselves
            return str(src)
        missing = d.get("chunks_missing")
        note = f"; {missing:,} chunks not stored, read as fill value {d.get('fill_value')}" if missing else ""
        return f"{src}  [{' '.join(extra)}{note}]"

    lines.append(f"prediction   (PRED): {describe('pred')}")
    lines.append(f"ground truth (GT):   {describe('gt')}")
    if res.inputs.get("mask"):
        lines.append(f"mask:                {describe('mask')}")
    counted = f"{_count(res.n_voxels)} voxels counted"
    if res.n_ignored:
        counted += f", {_count(res.n_ignored)} ignored (gt label {opts.get('ignore_label')})"
    if res.n_masked:
        counted += f", {_count(res.n_masked)} masked out"
    lines.append(counted)
    labels_from = opts.get("labels_from")
    nlab = len(res.labels)
    desc = {"discovered": "found in the data", "num_classes": "from --num-classes", "labels": "as given"}
    mode = opts.get("prediction")
    if mode == "threshold":
        desc["num_classes"] = f"from the probability map: 1 where p > {opts.get('threshold'):g}"
    elif mode == "argmax":
        desc["num_classes"] = f"from the probability map: argmax over axis {opts.get('channel_axis')}"
    lines.append(
        f"{nlab} label{'s' if nlab != 1 else ''}" + (f" {desc[labels_from]}" if labels_from in desc else "")
        + f"; empty classes -> {opts.get('empty', 'nan')}"
        + (f"; smooth {opts['smooth']:g}" if opts.get("smooth") else "")
        + ("; matrix: diagonal + marginals only" if opts.get("matrix") == "diagonal+marginals" else "")
    )  # fmt: skip
    if opts.get("surface"):  # boundary metrics: the convention and the spacing they used
        sp = "x".join(f"{v:g}" for v in opts.get("spacing") or ())
        lines.extend(
            textwrap.wrap(
                f"boundary metrics: surface {opts['surface']}, spacing {sp} ({opts.get('spacing_from')}), "
                f"nsd tolerance {opts.get('nsd_tolerance'):g}, labels: {opts.get('boundary_labels')}",
                width,
            )
        )
    lines.append("")

    # ---------------------------------------------------------------- per-class table
    cols = table_columns(res, metrics)
    shown, hidden = _shown_rows(res, max_rows)
    sup_w = max([len("support"), *(len(_count(res.per_class[lab]["support"])) for lab in shown)])
    fit = max((width - _MIN_LABEL - 1 - sup_w) // _COL, 1)
    dropped = cols[fit:]
    cols = cols[:fit]
    bg = opts.get("background_label")
    mean_rows: list[tuple[str, dict[str, Any]]] = [(_n_label("mean", res.mean, cols), res.mean)]
    bg_present = bg is not None and any(int(x) == bg for x in res.labels)
    if bg_present:
        mean_rows.append((_n_label("fg mean", res.foreground_mean, cols), res.foreground_mean))
    mean_rows.append(("fg micro" if bg_present else "micro", res.micro))
    mean_rows.append(("weighted", res.weighted))
    texts = [label_text(lab, names) for lab in shown]
    want = max([len("label"), *(len(t) for t in texts), *(len(t) for t, _ in mean_rows)])
    lab_w = max(min(want, width - 1 - sup_w - _COL * len(cols)), _MIN_LABEL)
    pct = opts.get("hd_percentile")
    heads = {**SHORT_NAMES, "hd95": f"hd{pct:g}"[:7] if isinstance(pct, (int, float)) else "hd95"}
    head = f"{'label':<{lab_w}} {'support':>{sup_w}}" + "".join(
        f"{heads.get(c, c[:7]):>{_COL}}" for c in cols
    )
    rule = "-" * len(head)
    lines.append(bold(head))
    lines.append(rule)
    for lab, text in zip(shown, texts):
        row = res.per_class[lab]
        lines.append(
            f"{_shorten(text, lab_w):<{lab_w}} {_count(row['support']):>{sup_w}}"
            + "".join(f"{_fmt(row.get(c)):>{_COL}}" for c in cols)
        )
    if hidden:
        lines.extend(
            textwrap.wrap(
                f"... {_count(hidden)} more labels not shown (the smallest); "
                + (
                    "--max-rows 0 shows all, --format json/csv lists every label"
                    if len(res.reported_labels()) == len(res.per_class)
                    else "--max-rows 0 --per-class-limit 0 shows all"
                ),
                width,
            )
        )
    lines.append(rule)
    for title, d in mean_rows:
        lines.append(
            f"{_shorten(title, lab_w):<{lab_w}} {'':>{sup_w}}"
            + "".join(f"{_fmt(d.get(c)):>{_COL}}" for c in cols)
        )
    if dropped:
        lines.extend(
            textwrap.wrap(f"(not shown for width: {', '.join(dropped)}; see --format json or csv)", width)
        )
    lines.append("")

    # ---------------------------------------------------------------- headline and overall
    lines.extend(bold(x) for x in textwrap.wrap(headline(res, cols), width))
    o = res.overall
    lines.append(
        "overall: accuracy {}  balanced accuracy {}  MCC {}  kappa {}".format(
            *(_fmt(o.get(k)) for k in ("accuracy", "balanced_accuracy", "mcc", "cohen_kappa"))
        )
    )
    t = res.timing or {}
    if t.get("seconds"):
        rate = t.get("voxels_per_second")
        parts = [f"{t['seconds']:.2f} s"]
        if rate:
            parts.append(f"{_si(rate)}voxel/s")
        if t.get("backend"):
            parts.append(f"backend {t['backend']}")
        if t.get("workers"):
            parts.append(f"{t['workers']} worker{'s' if t['workers'] != 1 else ''}")
        lines.append("time:    " + ", ".join(parts))

    # ---------------------------------------------------------------- instances
    if res.instances is not None:
        lines.append("")
        lines.extend(instance_lines(res.instances, width))

    # ---------------------------------------------------------------- threshold sweep
    if res.curves:
        lines.append("")
        lines.extend(curve_lines(res, width))

    # ---------------------------------------------------------------- warnings
    if res.warnings:
        lines.append("")
        for w in res.warnings[: max(max_warnings, 0) or None]:
            for piece in textwrap.wrap(f"warning: {w}", width, subsequent_indent="  ", break_on_hyphens=False):
                lines.append(yellow(piece))
        extra = len(res.warnings) - max_warnings
        if max_warnings > 0 and extra > 0:
            lines.append(yellow(f"... and {extra} more warnings (all in --format json)"))
    return "\n".join(lines)


def instance_lines(inst: dict[str, Any], width: int = 80) -> list[str]:
    """The instance metrics in a few lines (``evaluate(..., instances=True)``)."""
    bg = inst.get("background")
    how = f"IoU > {inst.get('iou_threshold', 0.5):g}" + (
        "" if inst.get("matching") != "greedy" else ", greedy (highest IoU first)"
    )
    where = "every id an instance" if bg is None else f"background {bg} left out"
    comps = f"; connected components, {inst['connectivity']}-connectivity" if inst.get("connectivity") else ""
    text = [
        f"instances: {_count(inst['n_gt'])} in gt, {_count(inst['n_pred'])} predicted ({how}; {where}{comps})",
        f"  matched {_count(inst['tp'])}, fp {_count(inst['fp'])}, fn {_count(inst['fn'])}: precision "
        f"{_fmt(inst['precision'])}  recall {_fmt(inst['recall'])}  F1 {_fmt(inst['f1'])}",
        f"  PQ {_fmt(inst['pq'])} = SQ {_fmt(inst['sq'])} x RQ {_fmt(inst['rq'])}",
        f"  VOI split {_fmt(inst['voi_split'])}  merge {_fmt(inst['voi_merge'])} bits;  adapted Rand error "
        f"{_fmt(inst['adapted_rand_error'])} (precision {_fmt(inst['rand_precision'])}, recall "
        f"{_fmt(inst['rand_recall'])})",
    ]
    out: list[str] = []
    for line in text:
        out.extend(textwrap.wrap(line, width, subsequent_indent="    ") or [""])
    return out


def headline(res: EvaluationResult, cols: Sequence[str] = ("dice", "iou")) -> str:
    """One sentence with the mean people quote: foreground mean unless background is included."""
    picks = [m for m in ("dice", "iou") if m in res.metrics] or list(cols[:2]) or list(res.metrics[:2])
    bg = (res.options or {}).get("background_label")
    bg_present = bg is not None and any(int(x) == bg for x in res.labels)
    d = res.foreground_mean if bg_present else res.mean
    n = d.get("n_averaged", {})
    counts = sorted({int(n[m]) for m in picks if isinstance(n, dict) and m in n})
    what = ", ".join(f"{m if m != 'iou' else 'IoU'} {_fmt(d.get(m))}" for m in picks)
    what = what[0].upper() + what[1:] if what else what
    over = f"{counts[0]} label{'s' if counts[0] != 1 else ''}" if len(counts) == 1 else "labels"
    if bg_present:
        return f"mean over foreground: {what} ({over}; background {bg} left out)"
    why = "background included" if bg is None else f"no label {bg} present"
    return f"mean over all labels: {what} ({over}; {why})"


def curve_lines(res: EvaluationResult, width: int = 80, max_labels: int = 20) -> list[str]:
    """One line per swept label: ROC AUC, average precision, best Dice and IoU thresholds."""
    names = res.label_names or {}
    curves = res.curves or {}
    out = [f"threshold sweep ({_sweep_size(curves)} thresholds, 'p > t'):"]
    for key, c in list(curves.items())[:max_labels]:
        try:
            lab_text = label_text(int(key), names)
        except ValueError:
            lab_text = str(key)
        parts = [f"ROC AUC {_fmt(c.get('roc_auc'))}", f"AP {_fmt(c.get('average_precision'))}"]
        for m, title in (("dice", "Dice"), ("iou", "IoU")):
            best = c.get(f"best_{m}") or {}
            if best.get(m) is not None and best.get("threshold") is not None:
                parts.append(f"best {title} {_fmt(best[m])} (t={best['threshold']:.4g})")
        out.extend(textwrap.wrap(f"  {lab_text}: " + ", ".join(parts), width, subsequent_indent="    "))
    if len(curves) > max_labels:
        out.append(f"  ... {len(curves) - max_labels} more (all in --format json)")
    return out


def _sweep_size(curves: dict[str, Any]) -> str:
    for c in curves.values():
        t = c.get("thresholds")
        if isinstance(t, (list, tuple)):
            return f"{len(t):,}"
    return "?"
