"""Metric definitions: a registry of formulas over per-class TP / FP / FN / TN count arrays.

Per class ``k`` of a confusion matrix ``cm`` (rows = ground truth, columns = prediction)::

    TP = cm[k, k]    FN = row_k - TP    FP = col_k - TP    TN = N - TP - FP - FN

Every formula returns NaN where it is undefined (a zero denominator); :func:`apply_empty` then
applies the one policy chosen for all metrics (``empty="nan" | "zero" | "one"``). ``smooth``
adds ``eps`` to numerator and denominator of the overlap metrics (dice, iou, tversky) only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fastseg_eval.errors import OptionError
from fastseg_eval.metrics.boundary import BOUNDARY_METRICS, boundary_name

EMPTY_POLICIES = ("nan", "zero", "one")


@dataclass(frozen=True)
class Metric:
    """One metric: canonical name, aliases, formula, and whether ``smooth`` applies."""

    name: str
    formula: Callable[..., np.ndarray]
    aliases: tuple[str, ...] = ()
    smoothable: bool = False
    description: str = ""


def _ratio(num: np.ndarray, den: np.ndarray, smooth: float = 0.0) -> np.ndarray:
    """``num / den`` in float64, NaN where the (smoothed) denominator is zero."""
    num = np.asarray(num, dtype=np.float64) + smooth
    den = np.asarray(den, dtype=np.float64) + smooth
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _f(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _tpr(tp, fp, fn, tn, **_):
    return _ratio(tp, tp + fn)


def _tnr(tp, fp, fn, tn, **_):
    return _ratio(tn, tn + fp)


def _ppv(tp, fp, fn, tn, **_):
    return _ratio(tp, tp + fp)


def _npv(tp, fp, fn, tn, **_):
    return _ratio(tn, tn + fn)


def _fpr(tp, fp, fn, tn, **_):
    return _ratio(fp, fp + tn)


def _prevalence_threshold(tp, fp, fn, tn, **_):
    tpr, fpr = _tpr(tp, fp, fn, tn), _fpr(tp, fp, fn, tn)
    with np.errstate(invalid="ignore"):
        return _ratio(np.sqrt(tpr * fpr) - fpr, tpr - fpr)


def _mcc(tp, fp, fn, tn, **_):
    tp, fp, fn, tn = _f(tp), _f(fp), _f(fn), _f(tn)
    den = np.sqrt((tp + fp) * (tp + fn)) * np.sqrt((tn + fp) * (tn + fn))
    return _ratio(tp * tn - fp * fn, den)


def _fowlkes_mallows(tp, fp, fn, tn, **_):
    tp, fp, fn = _f(tp), _f(fp), _f(fn)
    return _ratio(tp, np.sqrt((tp + fp) * (tp + fn)))


def _tversky(tp, fp, fn, tn, *, alpha=0.5, beta=0.5, smooth=0.0, **_):
    return _ratio(_f(tp), _f(tp) + alpha * _f(fp) + beta * _f(fn), smooth)


_REGISTRY: tuple[Metric, ...] = (
    Metric("accuracy", lambda tp, fp, fn, tn, **_: _ratio(_f(tp) + tn, _f(tp) + fp + fn + tn),
           description="(TP + TN) / N"),
    Metric("precision", _ppv, ("ppv", "positive_predictive_value"), description="TP / (TP + FP)"),
    Metric("recall", _tpr, ("sensitivity", "tpr", "hit_rate", "true_positive_rate"),
           description="TP / (TP + FN)"),
    Metric("specificity", _tnr, ("tnr", "selectivity", "true_negative_rate"), description="TN / (TN + FP)"),
    Metric("dice", lambda tp, fp, fn, tn, smooth=0.0, **_: _ratio(2 * _f(tp), 2 * _f(tp) + fp + fn, smooth),
           ("f1", "f1_score", "dsc"), True, "2TP / (2TP + FP + FN)"),
    Metric("iou", lambda tp, fp, fn, tn, smooth=0.0, **_: _ratio(_f(tp), _f(tp) + fp + fn, smooth),
           ("jaccard", "threat_score", "csi"), True, "TP / (TP + FP + FN)"),
    Metric("tversky", _tversky, (), True, "TP / (TP + alpha FP + beta FN); alpha weights FP, beta FN"),
    Metric("npv", _npv, ("negative_predictive_value",), description="TN / (TN + FN)"),
    Metric("fpr", _fpr, ("fall_out", "false_positive_rate"), description="FP / (FP + TN)"),
    Metric("fnr", lambda tp, fp, fn, tn, **_: _ratio(fn, _f(fn) + tp), ("miss_rate", "false_negative_rate"),
           description="FN / (FN + TP)"),
    Metric("fdr", lambda tp, fp, fn, tn, **_: _ratio(fp, _f(fp) + tp), ("false_discovery_rate",),
           description="FP / (FP + TP)"),
    Metric("for", lambda tp, fp, fn, tn, **_: _ratio(fn, _f(fn) + tn), ("false_omission_rate",),
           description="FN / (FN + TN)"),
    Metric("balanced_accuracy", lambda tp, fp, fn, tn, **_: (_tpr(tp, fp, fn, tn) + _tnr(tp, fp, fn, tn)) / 2,
           description="(TPR + TNR) / 2"),
    Metric("informedness", lambda tp, fp, fn, tn, **_: _tpr(tp, fp, fn, tn) + _tnr(tp, fp, fn, tn) - 1,
           ("bookmaker_informedness", "youden_j"), description="TPR + TNR - 1"),
    Metric("markedness", lambda tp, fp, fn, tn, **_: _ppv(tp, fp, fn, tn) + _npv(tp, fp, fn, tn) - 1,
           description="PPV + NPV - 1"),
    Metric("mcc", _mcc, ("matthews_corrcoef",),
           description="(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))"),
    Metric("fowlkes_mallows", _fowlkes_mallows, ("fmi",), description="sqrt(PPV TPR)"),
    Metric("prevalence_threshold", _prevalence_threshold, ("pt",),
           description="(sqrt(TPR FPR) - FPR) / (TPR - FPR)"),
    Metric("volume_similarity",
           lambda tp, fp, fn, tn, **_: 1 - _ratio(np.abs(_f(fn) - fp), 2 * _f(tp) + fp + fn),
           ("vs",), description="1 - |FN - FP| / (2TP + FP + FN)"),
)  # fmt: skip

METRICS: dict[str, Metric] = {m.name: m for m in _REGISTRY}
ALIASES: dict[str, str] = {a: m.name for m in _REGISTRY for a in (m.name, *m.aliases)}
CORE_METRICS = ("accuracy", "precision", "recall", "specificity", "dice", "iou", "tversky")


def resolve_metric(name: str) -> str:
    """Canonical name of a metric or alias (case-insensitive, '-' and ' ' read as '_')."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return ALIASES[key]
    except KeyError:
        boundary = boundary_name(key)  # hd, hd95, assd, masd, nsd: not formulas over counts
        if boundary is not None:
            return boundary
        raise OptionError(
            f"unknown metric {name!r}; choose from {', '.join(METRICS)}, or the boundary metrics "
            f"{', '.join(BOUNDARY_METRICS)} (aliases: {', '.join(sorted(a for a in ALIASES if a not in METRICS))})"
        ) from None


def resolve_metrics(names: Iterable[str] | str | None) -> list[str]:
    """Canonical names for a selection (``None`` or ``"all"``: every metric over counts; boundary
    metrics, which cost a surface pass, only when named), duplicates dropped."""
    if names is None or names == "all":
        return list(METRICS)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        if n.strip().lower() == "all":
            out.extend(m for m in METRICS if m not in out)
            continue
        c = resolve_metric(n)
        if c not in out:
            out.append(c)
    if not out:
        raise OptionError("no metric selected; name at least one, or 'all'")
    return out


def check_empty(empty: str) -> str:
    if empty not in EMPTY_POLICIES:
        raise OptionError(f"empty={empty!r} is not a policy; choose one of {', '.join(EMPTY_POLICIES)}")
    return empty


def apply_empty(values: np.ndarray, empty: str) -> np.ndarray:
    """Replace undefined (NaN) values following the policy ``empty``."""
    check_empty(empty)
    if empty == "nan":
        return values
    return np.where(np.isnan(values), 0.0 if empty == "zero" else 1.0, values)


def class_counts(
    diagonal: np.ndarray, gt_counts: np.ndarray, pred_counts: np.ndarray, n: int
) -> dict[str, np.ndarray]:
    """TP, FP, FN, TN, support and predicted per class (int64) from the diagonal and marginals."""
    tp = np.asarray(diagonal, dtype=np.int64)
    fn = np.asarray(gt_counts, dtype=np.int64) - tp
    fp = np.asarray(pred_counts, dtype=np.int64) - tp
    tn = np.int64(n) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "support": tp + fn, "predicted": tp + fp}


def compute(
    names: Sequence[str],
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    tn: np.ndarray,
    *,
    tversky_alpha: float = 0.5,
    tversky_beta: float = 0.5,
    smooth: float = 0.0,
    empty: str = "nan",
) -> dict[str, np.ndarray]:
    """Metrics ``names`` (canonical) for count arrays, with the empty policy applied."""
    out = {}
    for name in names:
        m = METRICS[name]
        v = m.formula(
            tp, fp, fn, tn, alpha=tversky_alpha, beta=tversky_beta, smooth=smooth if m.smoothable else 0.0
        )
        out[name] = apply_empty(np.asarray(v, dtype=np.float64), empty)
    return out


def macro(values: dict[str, np.ndarray], select: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
    """NaN-skipping mean over the selected classes, and how many classes each mean averaged."""
    means, counts = {}, {}
    for name, v in values.items():
        v = v[select]
        ok = ~np.isnan(v)
        counts[name] = int(ok.sum())
        means[name] = float(v[ok].mean()) if ok.any() else float("nan")
    return means, counts


def weighted(values: dict[str, np.ndarray], support: np.ndarray) -> dict[str, float]:
    """Support-weighted mean (classes with gt support and a defined value)."""
    out = {}
    for name, v in values.items():
        ok = ~np.isnan(v) & (support > 0)
        w = support[ok].astype(np.float64)
        out[name] = float((v[ok] * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return out


def overall(diagonal: np.ndarray, gt_counts: np.ndarray, pred_counts: np.ndarray, n: int) -> dict[str, float]:
    """Multi-class accuracy, balanced accuracy, MCC and Cohen's kappa (as scikit-learn defines them).

    All four need only the diagonal and the marginals.
    """
    d, t, p = (np.asarray(x, dtype=np.float64) for x in (diagonal, gt_counts, pred_counts))
    s = float(n)
    if s == 0:
        nan = float("nan")
        return {"accuracy": nan, "balanced_accuracy": nan, "mcc": nan, "cohen_kappa": nan}
    c = d.sum()
    present = t > 0
    recall = d[present] / t[present]
    tp_sum = float((t * p).sum())
    cov_ytyp = c * s - tp_sum
    cov_ypyp = s * s - float((p * p).sum())
    cov_ytyt = s * s - float((t * t).sum())
    mcc = cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp) if cov_ytyt * cov_ypyp != 0 else float("nan")
    pe = tp_sum / (s * s)
    po = c / s
    kappa = (po - pe) / (1 - pe) if pe != 1 else float("nan")
    return {
        "accuracy": float(po),
        "balanced_accuracy": float(recall.mean()) if recall.size else float("nan"),
        "mcc": float(mcc),
        "cohen_kappa": float(kappa),
    }
