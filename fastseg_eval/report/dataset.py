"""Datasets: per-case results, statistics over cases, the voxel-pooled result, and their reports.

A dataset result is built from each case's counts only (:class:`CaseCounts`: the confusion
matrix, or its diagonal and marginals, in the case's label space). Everything else is derived
here, so a run resumed from a journal of counts gives the same bytes as one that never stopped:

* every case is re-expressed over the dataset's labels (the union of the cases' labels, or the
  fixed ``num_classes`` / ``labels``): a label absent from a case has TP = FP = FN = 0 there,
  so its Dice is undefined (NaN) and means over cases skip it;
* **regions** (BraTS-style merged labels, ``(1, 2, 3)``) are exact from each case's matrix:
  TP = the sum of ``cm[i, j]`` over i, j in the region, FN = the region's rows minus TP,
  FP = its columns minus TP, TN = the rest;
* :attr:`DatasetResult.aggregate`: per label (and region) and metric, ``mean`` (NaN-skipping,
  over cases), ``std`` (population, ddof 0), ``median``, ``min``, ``max`` and ``n`` (cases where
  the value is defined);
* :attr:`DatasetResult.pooled`: the metrics of the summed counts (voxel-pooled). Large cases
  weigh more there; it is **not** the mean over cases that challenge tables and nnU-Net report;
* :meth:`DatasetResult.to_nnunet_summary`: nnU-Net v2's ``summary.json``, with nnU-Net's own
  definitions (see the method);
* :attr:`DatasetResult.instances` (``instances=True``): each case's instance figures travel in
  its record (journal form, :func:`instance_record`); over cases, the same statistics per
  figure, and a detection summary pooled over the dataset as panoptic evaluation pools one
  (:func:`instance_summary`). The JSON report has them (``instances``, and per case); the CSV,
  one row per case x label, has no place for them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fastseg_eval._version import __version__
from fastseg_eval.metrics import formulas as M
from fastseg_eval.metrics.instances import SUMMARY_KEYS as INSTANCE_KEYS
from fastseg_eval.report.result import (
    COUNT_KEYS,
    EvaluationResult,
    LabelDict,
    csv_number,
    jsonable,
    result_from_counts,
)

STATS = ("mean", "std", "median", "min", "max", "n")
NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
"""The per-case entries of nnU-Net v2's summary.json, in the order its code makes them."""
WORST_CASES = 5


# ------------------------------------------------------------------------------ counts of a case
class CaseCounts:
    """The counts of one case (or their sum): what a journal line keeps, and all a report needs.

    Quacks like :class:`~fastseg_eval.reducers.confusion.ConfusionCounts` for
    :func:`~fastseg_eval.report.result.result_from_counts`: ``labels``, ``diagonal``,
    ``gt_counts``, ``pred_counts``, ``counts`` (dense only), ``n_voxels``, ``n_ignored``,
    ``n_masked``. Rows = ground truth, columns = prediction.
    """

    probability = None
    sweep_histogram = None
    largest_probability = float("-inf")

    def __init__(
        self,
        labels: Sequence[int],
        *,
        table: np.ndarray | None = None,
        diagonal: Any = None,
        gt_counts: Any = None,
        pred_counts: Any = None,
        n_ignored: int = 0,
        n_masked: int = 0,
        ignore_label: int | None = None,
        label_source: str = "discovered",
    ):
        self._labels = [int(x) for x in labels]
        self.table = None if table is None else np.asarray(table, dtype=np.int64).reshape(len(self._labels), -1)
        if self.table is not None:
            diagonal, gt_counts, pred_counts = np.diagonal(self.table), self.table.sum(axis=1), self.table.sum(axis=0)
        self._diag = np.asarray(diagonal, dtype=np.int64).copy()
        self._gt = np.asarray(gt_counts, dtype=np.int64).copy()
        self._pred = np.asarray(pred_counts, dtype=np.int64).copy()
        self.n_ignored, self.n_masked = int(n_ignored), int(n_masked)
        self.ignore_label = ignore_label
        self.label_source = label_source

    # the accumulator interface result_from_counts reads
    @property
    def labels(self) -> np.ndarray:
        big = bool(self._labels) and max(self._labels) >= 1 << 63
        return np.asarray(self._labels, dtype=np.uint64 if big else np.int64)

    @property
    def is_dense(self) -> bool:
        return self.table is not None

    @property
    def counts(self) -> np.ndarray:
        if self.table is None:
            raise ValueError("only the diagonal and marginals were kept for this case")
        return self.table.copy()

    @property
    def diagonal(self) -> np.ndarray:
        return self._diag

    @property
    def gt_counts(self) -> np.ndarray:
        return self._gt

    @property
    def pred_counts(self) -> np.ndarray:
        return self._pred

    @property
    def n_voxels(self) -> int:
        return int(self._gt.sum())

    @classmethod
    def from_result(cls, res: EvaluationResult) -> CaseCounts:
        """The counts behind an :class:`EvaluationResult` (its matrix, or diagonal and marginals)."""
        opts = res.options or {}
        common = {
            "n_ignored": res.n_ignored, "n_masked": res.n_masked, "ignore_label": opts.get("ignore_label"),
            "label_source": opts.get("labels_from", "discovered"),
        }  # fmt: skip
        if res.confusion_matrix is not None:
            return cls(res.labels, table=res.confusion_matrix, **common)
        table = res.class_table
        if table is not None:
            tp, sup, pre = table.column("tp"), table.column("support"), table.column("predicted")
        else:
            rows = [res.per_class[lab] for lab in res.labels.tolist()]
            tp, sup, pre = ([r[k] for r in rows] for k in ("tp", "support", "predicted"))
        return cls(res.labels, diagonal=tp, gt_counts=sup, pred_counts=pre, **common)

    def embed(self, labels: Sequence[int]) -> CaseCounts:
        """The same counts over ``labels`` (a superset of this case's labels, in report order)."""
        labels = [int(x) for x in labels]
        where = {lab: i for i, lab in enumerate(labels)}
        missing = [lab for lab in self._labels if lab not in where]
        if missing:
            raise ValueError(f"labels {missing[:5]} are not in the target label space")
        idx = np.asarray([where[lab] for lab in self._labels], dtype=np.intp)
        k = len(labels)
        common = {
            "n_ignored": self.n_ignored, "n_masked": self.n_masked, "ignore_label": self.ignore_label,
            "label_source": self.label_source,
        }  # fmt: skip
        if self.table is not None:
            t = np.zeros((k, k), dtype=np.int64)
            t[np.ix_(idx, idx)] = self.table
            return CaseCounts(labels, table=t, **common)
        out = [np.zeros(k, dtype=np.int64) for _ in range(3)]
        for arr, src in zip(out, (self._diag, self._gt, self._pred)):
            arr[idx] = src
        return CaseCounts(labels, diagonal=out[0], gt_counts=out[1], pred_counts=out[2], **common)

    @staticmethod
    def total(parts: Sequence[CaseCounts], labels: Sequence[int]) -> CaseCounts:
        """The sum of ``parts`` (voxel-pooled), over ``labels``."""
        embedded = [p.embed(labels) for p in parts]
        k = len(labels)
        common = {
            "n_ignored": sum(p.n_ignored for p in parts), "n_masked": sum(p.n_masked for p in parts),
            "ignore_label": parts[0].ignore_label if parts else None,
            "label_source": parts[0].label_source if parts else "discovered",
        }  # fmt: skip
        if all(p.table is not None for p in embedded):
            t = np.zeros((k, k), dtype=np.int64)
            for p in embedded:
                t += p.table  # type: ignore[operator]
            return CaseCounts(labels, table=t, **common)
        sums = [np.zeros(k, dtype=np.int64) for _ in range(3)]
        for p in embedded:
            for s, a in zip(sums, (p._diag, p._gt, p._pred)):
                s += a
        return CaseCounts(labels, diagonal=sums[0], gt_counts=sums[1], pred_counts=sums[2], **common)

    def region_counts(self, members: Sequence[int]) -> dict[str, int]:
        """TP, FP, FN, TN of the region made of labels ``members`` (exact, from the matrix)."""
        where = {lab: i for i, lab in enumerate(self._labels)}
        idx = np.asarray(sorted({where[m] for m in members if m in where}), dtype=np.intp)
        n = self.n_voxels
        if len(idx) == 0:
            return {"tp": 0, "fp": 0, "fn": 0, "tn": n}
        if len(idx) == 1:
            tp, rows, cols = self._diag[idx[0]], self._gt[idx[0]], self._pred[idx[0]]
        else:
            if self.table is None:
                raise ValueError("a region of several labels needs the full confusion matrix")
            tp = self.table[np.ix_(idx, idx)].sum()
            rows, cols = self.table[idx].sum(), self.table[:, idx].sum()
        tp, fn, fp = int(tp), int(rows - tp), int(cols - tp)
        return {"tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}

    # the journal form: plain JSON
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"labels": list(self._labels)}
        if self.table is not None:
            d["matrix"] = self.table.tolist()
        else:
            d.update(tp=self._diag.tolist(), support=self._gt.tolist(), predicted=self._pred.tolist())
        d.update(
            n_ignored=self.n_ignored, n_masked=self.n_masked, ignore_label=self.ignore_label,
            labels_from=self.label_source,
        )  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaseCounts:
        common = {
            "n_ignored": int(d.get("n_ignored", 0)), "n_masked": int(d.get("n_masked", 0)),
            "ignore_label": d.get("ignore_label"), "label_source": d.get("labels_from", "discovered"),
        }  # fmt: skip
        labels = [int(x) for x in d["labels"]]
        if d.get("matrix") is not None:
            return cls(labels, table=np.asarray(d["matrix"], dtype=np.int64).reshape(len(labels), len(labels)), **common)
        return cls(labels, diagonal=d["tp"], gt_counts=d["support"], pred_counts=d["predicted"], **common)


# ------------------------------------------------------------------------------------ regions
def region_key(members: Sequence[int]) -> str:
    """nnU-Net's key of a region: ``str(tuple)``, e.g. ``"(1, 2, 3)"``, ``"(3,)"``."""
    return str(tuple(int(x) for x in members))


def parse_regions(regions: Any) -> list[tuple[int, ...]]:
    """``"1,2,3;2,3;3"`` or a sequence of label sequences (a bare int is a one-label region)."""
    from fastseg_eval.errors import OptionError

    if regions is None:
        return []
    if isinstance(regions, str):
        parts = [p.strip() for p in regions.split(";") if p.strip()]
        out = []
        for p in parts:
            try:
                out.append(tuple(int(x) for x in p.strip("()[] ").split(",") if x.strip()))
            except ValueError:
                raise OptionError(
                    f"regions={regions!r}: {p!r} is not a list of labels (expected e.g. '1,2,3;2,3;3')"
                ) from None
    else:
        out = []
        for r in regions:
            if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
                out.append((int(r),))
            elif isinstance(r, (list, tuple, set, frozenset, np.ndarray)) and all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in r
            ):
                out.append(tuple(int(x) for x in (sorted(r) if isinstance(r, (set, frozenset)) else r)))
            else:
                raise OptionError(f"regions: {r!r} is not a label or a list of labels")
    if any(not r for r in out):
        raise OptionError(f"regions={regions!r}: a region needs at least one label")
    keys = [region_key(r) for r in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise OptionError(f"regions={regions!r}: region {dup[0]} is given twice")
    return out


# ------------------------------------------------------------------------------------ results
@dataclass(repr=False)
class CaseResult(EvaluationResult):
    """The result of one case: an :class:`EvaluationResult` over the dataset's labels, plus
    ``case`` (its id), ``pred_source`` and ``gt_source`` (the files or stores), and ``regions``
    (``{"(1, 2, 3)": {"tp", "fp", "fn", "tn", "support", "predicted", <metrics>}}``)."""

    case: str = ""
    pred_source: str = ""
    gt_source: str = ""
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: CaseCounts | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        fg = self.foreground_mean.get("dice")
        return f"CaseResult(case={self.case!r}, labels={[int(x) for x in self.labels][:8]}, foreground_mean_dice={fg})"


def case_result(
    counts: CaseCounts,
    labels: Sequence[int],
    regions: Sequence[tuple[int, ...]],
    *,
    case: str,
    pred_source: str,
    gt_source: str,
    metric_options: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
    warnings_: Sequence[str] = (),
    boundary: Mapping[str, Sequence[Any]] | None = None,
    region_boundary: Mapping[str, Mapping[str, Any]] | None = None,
) -> CaseResult:
    """One case's result over the dataset's ``labels`` (and ``regions``).

    ``boundary``: per metric (hd95, ...), the case's values in the order of ``counts.labels``
    (journal form: None for NaN, ``"inf"`` for infinity); a label the case lacks gets NaN (both
    sides empty). ``region_boundary``: per region key, the distance metrics of the region's own
    surfaces (journal form). The pooled result has count metrics only.
    """
    embedded = counts.embed(labels)
    extra: dict[str, Any] = {}
    if boundary:
        where = {lab: i for i, lab in enumerate(labels)}
        for m, vals in boundary.items():
            col = np.full(len(labels), np.nan)
            for lab, v in zip(counts.labels.tolist(), vals):
                col[where[int(lab)]] = decode_float(v)
            extra[m] = col
        extra = {"boundary": extra}
    names = list(metric_options.get("metrics") or [])
    if not boundary:  # count metrics only (the pooled result, or no boundary metric asked)
        metric_options = {**metric_options, "metrics": [m for m in names if m in M.METRICS] or None}
    res = result_from_counts(embedded, inputs=dict(inputs or {}), **metric_options, **extra)  # type: ignore[arg-type]
    base = {f.name: getattr(res, f.name) for f in fields(EvaluationResult)}
    base["warnings"] = list(warnings_)
    out = CaseResult(**base, case=case, pred_source=pred_source, gt_source=gt_source, counts=embedded)
    out.regions = region_rows(embedded, regions, [m for m in out.metrics if m in M.METRICS], metric_options)
    for key, vals in (region_boundary or {}).items():
        if key in out.regions:
            out.regions[key].update({m: decode_float(v) for m, v in vals.items()})
    return out


def encode_float(x: float) -> Any:
    """A float as journal JSON: itself, None for NaN, ``"inf"`` / ``"-inf"`` for infinities."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def region_rows(
    counts: CaseCounts, regions: Sequence[tuple[int, ...]], metrics: Sequence[str], metric_options: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    if not regions:
        return {}
    rows = [counts.region_counts(r) for r in regions]
    arr = {k: np.asarray([r[k] for r in rows], dtype=np.int64) for k in ("tp", "fp", "fn", "tn")}
    opts = {k: metric_options[k] for k in ("tversky_alpha", "tversky_beta", "smooth", "empty") if k in metric_options}
    values = M.compute(list(metrics), arr["tp"], arr["fp"], arr["fn"], arr["tn"], **opts)
    out = {}
    for i, r in enumerate(regions):
        row: dict[str, Any] = {k: int(arr[k][i]) for k in ("tp", "fp", "fn", "tn")}
        row["support"], row["predicted"] = row["tp"] + row["fn"], row["tp"] + row["fp"]
        row.update({m: float(values[m][i]) for m in metrics})
        out[region_key(r)] = row
    return out


def _stats(values: np.ndarray) -> dict[str, Any]:
    ok = values[~np.isnan(values)]
    if not ok.size:
        nan = float("nan")
        return {"mean": nan, "std": nan, "median": nan, "min": nan, "max": nan, "n": 0}
    with np.errstate(invalid="ignore"):  # an infinite distance (a label on one side only): mean inf, std NaN
        return {
            "mean": float(ok.mean()), "std": float(ok.std()), "median": float(np.median(ok)),
            "min": float(ok.min()), "max": float(ok.max()), "n": int(ok.size),
        }  # fmt: skip


def aggregate(per_case: Sequence[CaseResult], labels: Sequence[int], region_keys: Sequence[str], metrics: Sequence[str]) -> LabelDict:
    """``{label or region: {metric or count: {"mean", "std", "median", "min", "max", "n"}}}`` over cases."""
    out = LabelDict()
    names = [*metrics, *COUNT_KEYS]
    for lab in labels:
        out[int(lab)] = {
            m: _stats(np.asarray([float(c.per_class[lab][m]) for c in per_case], dtype=np.float64)) for m in names
        }
    for key in region_keys:  # regions: count metrics only
        out[key] = {
            m: _stats(np.asarray([float(c.regions[key][m]) for c in per_case], dtype=np.float64))
            for m in names if not per_case or m in per_case[0].regions[key]
        }
    return out


def _mean_of_means(agg: Mapping[Any, Any], keys: Sequence[Any], metrics: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n_avg = {}
    for m in metrics:
        vals = np.asarray([agg[k][m]["mean"] for k in keys], dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        out[m] = float(ok.mean()) if ok.size else float("nan")
        n_avg[m] = int(ok.size)
    out["n_averaged"] = n_avg
    return out


# ------------------------------------------------------------------------------------ instances
INSTANCE_COUNTS = ("n_gt", "n_pred", "tp", "fp", "fn")
INSTANCE_SETTINGS = ("iou_threshold", "matching", "n_pairs", "background", "connectivity")


def instance_record(inst: Mapping[str, Any], per_gt: bool = False) -> dict[str, Any]:
    """One case's ``instances`` (from :func:`fastseg_eval.evaluate`) in journal form: the figures
    (None for NaN), ``iou_sum`` (the IoUs of the matched pairs summed, for the pooled SQ), the
    matching's settings, and the per-instance rows when ``per_gt``."""
    rec: dict[str, Any] = {
        k: int(inst[k]) if k in INSTANCE_COUNTS else encode_float(inst[k]) for k in INSTANCE_KEYS
    }
    rows = inst.get("per_gt") or []
    ious = rows.column("iou").tolist() if hasattr(rows, "column") else [r["iou"] for r in rows]
    rec["iou_sum"] = math.fsum(ious)  # unmatched instances have IoU 0
    for k in INSTANCE_SETTINGS:
        if k in inst:
            rec[k] = inst[k]
    if per_gt:
        rec["per_gt"] = [dict(r) for r in rows]
    return rec


def case_instances(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A journal record's instance figures back as ``EvaluationResult.instances`` has them."""
    out: dict[str, Any] = {
        k: int(rec[k]) if k in INSTANCE_COUNTS else decode_float(rec[k]) for k in INSTANCE_KEYS
    }
    out.update({k: rec[k] for k in INSTANCE_SETTINGS if k in rec})
    if "per_gt" in rec:
        out["per_gt"] = [dict(r) for r in rec["per_gt"]]
    return out


def instance_summary(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Instance metrics over the cases that have them.

    ``aggregate``: per figure, ``{"mean", "std", "median", "min", "max", "n"}`` over cases (NaN
    skipped, as for labels). ``pooled``: one detection summary for the dataset, as panoptic
    evaluation pools one (COCO panoptic, Kirillov et al.): TP, FP, FN (and ``n_gt``,
    ``n_pred``) summed over cases; precision = TP / (TP + FP), recall = TP / (TP + FN),
    F1 = RQ = TP / (TP + FP/2 + FN/2); SQ = the IoUs of every matched pair of every case,
    summed, / TP; PQ = SQ x RQ. No match anywhere: SQ = PQ = 0 (NaN when no case has an instance).
    """
    agg = {
        k: _stats(np.asarray([decode_float(r[k]) if r[k] is not None else math.nan for r in recs], dtype=np.float64))
        for k in INSTANCE_KEYS
    }
    tot = {k: sum(int(r[k]) for r in recs) for k in INSTANCE_COUNTS}
    tp, fp, fn = tot["tp"], tot["fp"], tot["fn"]
    nan = math.nan
    iou_sum = math.fsum(float(r["iou_sum"]) for r in recs)
    pooled: dict[str, Any] = dict(tot)
    pooled["precision"] = tp / (tp + fp) if tp + fp else nan
    pooled["recall"] = tp / (tp + fn) if tp + fn else nan
    f1 = tp / (tp + fp / 2 + fn / 2) if tp + fp + fn else nan
    pooled["f1"] = f1
    if tot["n_gt"] + tot["n_pred"] == 0:
        sq = rq = pq = nan
    elif tp == 0:
        sq, rq, pq = 0.0, 0.0, 0.0
    else:
        sq, rq = iou_sum / tp, f1
        pq = sq * rq
    pooled.update(pq=pq, sq=sq, rq=rq, iou_sum=iou_sum)
    return {"n_cases": len(recs), "aggregate": agg, "pooled": pooled}


@dataclass
class FailedCase:
    """A case that could not be evaluated (``on_error="skip"``): its id, inputs and the message."""

    case: str
    pred: str
    gt: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"case": self.case, "pred": self.pred, "gt": self.gt, "error": self.error}


@dataclass
class DatasetResult:
    """Everything a dataset evaluation produced (see the module docstring for the definitions).

    ``per_case`` is ordered by case id. ``aggregate`` is keyed by label (int; ``"1"`` works too)
    and by region key (``"(1, 2, 3)"``). ``mean`` / ``foreground_mean``: per metric, the mean of
    the label means (NaN-skipping; ``foreground_mean`` without the background label), with the
    number of labels averaged. ``pooled``: the voxel-pooled result (summed counts).
    """

    per_case: list[CaseResult]
    aggregate: LabelDict
    pooled: CaseResult
    labels: list[int]
    regions: dict[str, tuple[int, ...]]
    metrics: list[str]
    mean: dict[str, Any]
    foreground_mean: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    label_names: dict[int, str] | None = None
    failed_cases: list[FailedCase] = field(default_factory=list)
    missing_cases: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    instances: dict[str, Any] | None = None
    """With ``instances=True``: ``{"n_cases", "aggregate": {figure: stats over cases}, "pooled":
    {...}}`` (see :func:`instance_summary`); None otherwise."""
    timing: dict[str, Any] = field(default_factory=dict)
    """Wall time, cases resumed from the journal, workers: shown on stderr, never in the reports
    (reports are byte-identical between an interrupted-and-resumed run and an uninterrupted one)."""

    @property
    def background_label(self) -> int | None:
        return self.options.get("background_label")

    @property
    def cases(self) -> list[str]:
        return [c.case for c in self.per_case]

    def case(self, case_id: str) -> CaseResult:
        for c in self.per_case:
            if c.case == case_id:
                return c
        raise KeyError(f"no case {case_id!r} (cases: {', '.join(self.cases[:10])}{', ...' if len(self.cases) > 10 else ''})")

    def worst_cases(self, n: int = WORST_CASES, metric: str = "dice") -> list[tuple[str, float]]:
        """The ``n`` cases with the lowest foreground mean of ``metric`` (undefined ones left out)."""
        vals = [(c.case, c.foreground_mean.get(metric, float("nan"))) for c in self.per_case]
        vals = [(k, float(v)) for k, v in vals if v is not None and not math.isnan(v)]
        return sorted(vals, key=lambda kv: (kv[1], kv[0]))[:n]

    # -------------------------------------------------------------- own JSON
    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python types: options, labels, aggregate, pooled, per case (NaN -> None)."""
        d: dict[str, Any] = {
            "fastseg_eval_version": __version__,
            "kind": "dataset",
            "inputs": self.inputs,
            "options": self.options,
            "labels": list(self.labels),
        }
        if self.label_names:
            d["label_names"] = {str(k): v for k, v in self.label_names.items()}
        d.update(
            {
                "regions": {k: list(v) for k, v in self.regions.items()},
                "metrics": list(self.metrics),
                "n_cases": len(self.per_case),
                "aggregate": {str(k): v for k, v in self.aggregate.items()},
                "mean": self.mean,
                "foreground_mean": self.foreground_mean,
                "pooled": _case_dict(self.pooled, pooled=True),
                **({"instances": self.instances} if self.instances is not None else {}),
                "per_case": [_case_dict(c) for c in self.per_case],
                "failed_cases": [f.to_dict() for f in self.failed_cases],
                "missing_cases": self.missing_cases,
                "warnings": [str(w) for w in self.warnings],
            }
        )
        return jsonable(d)

    def to_json(self, path: str | None = None, *, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (``null`` for undefined values); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _write_atomic(path, text + "\n")
        return text

    # -------------------------------------------------------------- tidy CSV
    def to_csv(self, path: str | None = None) -> str:
        """One row per case x label (then per case x region): ids, sources, counts, every metric.

        Reads straight into pandas (``pd.read_csv``); undefined values are empty cells (NaN).
        """
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["case", "kind", "label", "name", "pred", "gt", *COUNT_KEYS, *self.metrics])
        names = self.label_names or {}
        for c in self.per_case:
            for lab in self.labels:
                row = c.per_class[lab]
                w.writerow(
                    [c.case, "label", lab, names.get(lab, ""), c.pred_source, c.gt_source,
                     *(row[k] for k in COUNT_KEYS), *(csv_number(row[m]) for m in self.metrics)]
                )  # fmt: skip
            for key in self.regions:
                row = c.regions[key]
                w.writerow(
                    [c.case, "region", key, "", c.pred_source, c.gt_source,
                     *(row[k] for k in COUNT_KEYS), *(csv_number(row.get(m, math.nan)) for m in self.metrics)]
                )  # fmt: skip
        text = buf.getvalue()
        if path is not None:
            _write_atomic(path, text)
        return text

    def instances_csv(self, path: str | None = None) -> str:
        """Every case's per-ground-truth-instance table (``instances_per_gt=True``), one CSV with a
        leading ``case`` column (the columns of :meth:`EvaluationResult.to_csv` ``table="instances"``)."""
        header: list[str] | None = None
        rows: list[str] = []
        for c in self.per_case:
            inst = c.instances
            if inst is None or "per_gt" not in inst:
                from fastseg_eval.errors import OptionError

                raise OptionError(
                    "no per-instance tables in this dataset result: evaluate with instances=True, instances_per_gt=True"
                )
            lines = c.to_csv(table="instances").splitlines()
            header = header or lines[0]
            quoted = io.StringIO()
            csv.writer(quoted, lineterminator="").writerow([c.case])
            rows += [f"{quoted.getvalue()},{line}" for line in lines[1:]]
        text = "" if header is None else "\n".join([f"case,{header}", *rows]) + "\n"
        if path is not None:
            _write_atomic(path, text)
        return text

    # -------------------------------------------------------------- nnU-Net v2 summary.json
    def nnunet_summary(self) -> dict[str, Any]:
        """nnU-Net v2's ``summary.json`` content, computed as its ``compute_metrics_on_folder`` does.

        * Keys: ``str(label)`` for the labels other than the background label, as nnU-Net's own
          tools pass them; with regions, the regions only (``str(tuple)``, e.g. ``"(1, 2, 3)"``),
          as for nnU-Net's region-based datasets.
        * Per case (sorted by prediction file name, as nnU-Net lists them): Dice = 2TP / (2TP + FP +
          FN), IoU = TP / (TP + FP + FN), both NaN when TP + FP + FN = 0 (whatever ``empty`` says);
          FP, TP, FN, TN, n_pred = TP + FP, n_ref = TP + FN as integers.
        * ``mean[key][metric]``: ``np.nanmean`` over cases of all eight entries (counts too);
          ``foreground_mean[metric]``: ``np.mean`` (NaN propagates) over the keys other than ``"0"``.
        """
        keys: list[tuple[str, Any]]
        if self.regions:
            keys = [(k, None) for k in self.regions]
        else:
            bg = self.background_label
            keys = [(str(lab), lab) for lab in self.labels if bg is None or lab != bg]
        cases = sorted(self.per_case, key=lambda c: (os.path.basename(c.pred_source) or c.case, c.case))
        per_case = []
        for c in cases:
            metrics: dict[str, Any] = {}
            for key, lab in keys:
                row = c.per_class[lab] if lab is not None else c.regions[key]
                tp, fp, fn, tn = (np.int64(row[k]) for k in ("tp", "fp", "fn", "tn"))
                if tp + fp + fn == 0:
                    dice = iou = np.nan
                else:
                    dice = 2 * tp / (2 * tp + fp + fn)
                    iou = tp / (tp + fp + fn)
                metrics[key] = {
                    "Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp,
                    "n_ref": fn + tp,
                }  # fmt: skip
            per_case.append({"metrics": metrics, "prediction_file": c.pred_source, "reference_file": c.gt_source})
        means: dict[str, dict[str, Any]] = {}
        with warnings.catch_warnings():  # nanmean / mean of nothing: NaN, as nnU-Net writes it
            warnings.simplefilter("ignore", RuntimeWarning)
            for key, _ in keys:
                means[key] = {m: np.nanmean([pc["metrics"][key][m] for pc in per_case]) for m in NNUNET_METRICS}
            fg = {m: np.mean([means[k][m] for k, _ in keys if k != "0"]) for m in NNUNET_METRICS}
        return _nnunet_types({"metric_per_case": per_case, "mean": means, "foreground_mean": fg})

    def to_nnunet_summary(self, path: str | None = None) -> str:
        """nnU-Net v2's ``summary.json`` as text (see :meth:`nnunet_summary`), written as nnU-Net
        writes it: ``json.dump(..., sort_keys=True, indent=4)``, NaN as the literal ``NaN`` that
        nnU-Net's ``load_summary_json`` reads back (this file alone departs from "null for NaN"),
        no newline at the end. Also written to ``path`` (atomically) if given."""
        text = json.dumps(self.nnunet_summary(), sort_keys=True, indent=4)
        if path is not None:
            _write_atomic(path, text)
        return text

    # -------------------------------------------------------------- table
    def to_table(self, *, color: bool = False, metrics: Sequence[str] | None = None, width: int = 80) -> str:
        return format_dataset_table(self, color=color, metrics=metrics, width=width)

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        fg = self.foreground_mean.get("dice")
        return f"DatasetResult({len(self.per_case)} cases, labels={self.labels[:8]}, foreground_mean_dice={fg})"


def _case_dict(c: CaseResult, pooled: bool = False) -> dict[str, Any]:
    full = c.to_dict()
    keep = [
        "n_voxels", "n_ignored", "n_masked", "confusion_matrix", "per_class", "mean", "foreground_mean",
        "micro", "weighted", "overall",
    ]  # fmt: skip
    d: dict[str, Any] = {} if pooled else {"case": c.case, "pred": c.pred_source, "gt": c.gt_source}
    if not pooled:
        d["inputs"] = full.get("inputs", {})
    d.update({k: full[k] for k in keep if k in full})
    d["regions"] = jsonable(c.regions)
    if not pooled and c.instances is not None:  # figures; per_gt only when it was kept
        d["instances"] = jsonable(dict(c.instances))
    if not pooled:
        d["warnings"] = [str(w) for w in c.warnings]
    return d


def _warning_of(text: str) -> Any:
    """A journal's warning text as a :class:`~fastseg_eval.errors.Message` when it names options."""
    from fastseg_eval.errors import Message

    return Message(text) if isinstance(text, str) and "\x02" in text else text


def _nnunet_types(x: Any) -> Any:
    """numpy scalars as Python ints / floats (nnU-Net's recursive_fix_for_json_export); NaN stays NaN."""
    if isinstance(x, dict):
        return {k: _nnunet_types(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nnunet_types(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _write_atomic(path: str, text: str) -> None:
    from fastseg_eval.io.outputs import atomic_write

    data = text.encode("utf-8")

    def write(p: str) -> None:
        with open(p, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


# ------------------------------------------------------------------------------------ building
def build_dataset_result(
    records: Sequence[Mapping[str, Any]],
    *,
    labels: Sequence[int] | None,
    regions: Sequence[tuple[int, ...]],
    metric_options: Mapping[str, Any],
    options: Mapping[str, Any],
    inputs: Mapping[str, Any],
    label_names: Mapping[int, str] | None = None,
    failed: Sequence[FailedCase] = (),
    missing_cases: Mapping[str, Any] | None = None,
    warnings_: Sequence[str] = (),
) -> DatasetResult:
    """A :class:`DatasetResult` from the cases' records (journal form: ``case``, ``pred``, ``gt``,
    ``counts``, ``inputs``, ``warnings``), ordered by case id.

    ``labels``: the fixed label space, or None for the union of the cases' labels (sorted).
    """
    from fastseg_eval.errors import FastSegError

    records = sorted(records, key=lambda r: r["case"])
    counts = [CaseCounts.from_dict(r["counts"]) for r in records]
    if labels is None:
        seen: set[int] = set()
        for c in counts:
            seen.update(c._labels)
        labels = sorted(seen)
    labels = [int(x) for x in labels]
    if regions and any(c.table is None for c in counts) and any(len(set(r)) > 1 for r in regions):
        raise FastSegError(
            "regions of several labels need each case's full confusion matrix, but some cases have too many "
            "labels for one (diagonal + marginals mode)"
        )
    names = list(M.resolve_metrics(metric_options.get("metrics")))
    opts = dict(metric_options)
    opts["metrics"] = names
    opts["label_names"] = label_names
    per_case = [
        case_result(
            c, labels, regions, case=r["case"], pred_source=r.get("pred") or "", gt_source=r.get("gt") or "",
            metric_options=opts, inputs=r.get("inputs") or {}, warnings_=[_warning_of(w) for w in r.get("warnings") or ()],
            boundary=r.get("boundary"), region_boundary=r.get("region_boundary"),
        )  # fmt: skip
        for r, c in zip(records, counts)
    ]
    region_keys = [region_key(r) for r in regions]
    agg = aggregate(per_case, labels, region_keys, names)
    bg = opts.get("background_label", 0)
    fg_keys = [lab for lab in labels if bg is None or lab != bg]
    pooled_counts = CaseCounts.total(counts, labels)
    pooled = case_result(  # count metrics only: distances do not add up over cases
        pooled_counts, labels, regions, case="(pooled)", pred_source="", gt_source="", metric_options=opts,
        warnings_=(),
    )  # fmt: skip
    inst_recs = [r.get("instances") for r in records]
    inst = None
    if any(x is not None for x in inst_recs):
        for c, x in zip(per_case, inst_recs):
            c.instances = case_instances(x) if x is not None else None
        inst = instance_summary([x for x in inst_recs if x is not None])
    return DatasetResult(
        instances=inst,
        per_case=per_case,
        aggregate=agg,
        pooled=pooled,
        labels=labels,
        regions={region_key(r): tuple(r) for r in regions},
        metrics=names,
        mean=_mean_of_means(agg, labels, names),
        foreground_mean=_mean_of_means(agg, fg_keys, names),
        options=dict(options),
        inputs=dict(inputs),
        label_names={int(k): str(v) for k, v in label_names.items()} if label_names else None,
        failed_cases=list(failed),
        missing_cases=dict(missing_cases or {}),
        warnings=list(warnings_),
    )


# ------------------------------------------------------------------------------------ table
TABLE_METRICS = ("dice", "iou")


def _pm(stats: Mapping[str, Any]) -> str:
    m, s = stats.get("mean"), stats.get("std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.4f} ± {s:.4f}"


def format_dataset_table(
    ds: DatasetResult, *, color: bool = False, metrics: Sequence[str] | None = None, width: int = 80
) -> str:
    """Per label (and region): mean ± std over cases and n; the means; the pooled figure; the worst cases."""
    from fastseg_eval.report.table import label_text, printable

    bold = (lambda s: f"\033[1m{s}\033[0m") if color else (lambda s: s)
    yellow = (lambda s: f"\033[33m{s}\033[0m") if color else (lambda s: s)
    cols = [m for m in (metrics or TABLE_METRICS) if m in ds.metrics] or ds.metrics[:2]
    names = ds.label_names or {}
    lines = []
    src = ds.inputs
    lines.append(f"prediction   (PRED): {printable(str(src.get('pred', '?')))}")
    lines.append(f"ground truth (GT):   {printable(str(src.get('gt', '?')))}")
    n = len(ds.per_case)
    extra = []
    if ds.failed_cases:
        extra.append(f"{len(ds.failed_cases)} failed")
    for side, what in (("pred", "prediction"), ("gt", "ground truth")):
        miss = (ds.missing_cases or {}).get(side) or []
        if miss:
            extra.append(f"{len(miss)} without a {what} ({ds.missing_cases.get('policy')})")
    lines.append(f"{n} case{'s' if n != 1 else ''} evaluated" + (f"; {', '.join(extra)}" if extra else ""))
    lines.append("")
    rows: list[tuple[str, Mapping[str, Any]]] = [(label_text(lab, names), ds.aggregate[lab]) for lab in ds.labels]
    rows += [(f"region {k}", ds.aggregate[k]) for k in ds.regions]
    cell_w = 17
    lab_w = max(12, min(max([len("label"), *(len(t) for t, _ in rows)]), width - 6 - cell_w * len(cols)))
    head = f"{'label':<{lab_w}}" + "".join(f"{c + ' mean ± std':>{cell_w}}" for c in cols) + f"{'n':>6}"
    lines.append(bold(head))
    lines.append("-" * len(head))
    for text, agg in rows:
        n_def = agg[cols[0]]["n"] if cols else 0
        lines.append(
            f"{text[:lab_w]:<{lab_w}}" + "".join(f"{_pm(agg[c]):>{cell_w}}" for c in cols) + f"{n_def:>6}"
        )
    lines.append("-" * len(head))
    bg = ds.background_label
    for title, d in (("mean", ds.mean), ("fg mean" if bg is not None else None, ds.foreground_mean)):
        if title is None:
            continue
        vals = "".join(f"{_num(d.get(c)):>{cell_w}}" for c in cols)
        lines.append(f"{title:<{lab_w}}{vals}")
    lines.append("")
    pooled = ds.pooled.foreground_mean if bg is not None else ds.pooled.mean
    lines.append(
        "voxel-pooled (summed counts, not a mean over cases): "
        + ", ".join(f"{c} {_num(pooled.get(c))}" for c in cols)
    )
    if ds.instances is not None:
        ia, ip = ds.instances["aggregate"], ds.instances["pooled"]
        lines.append("")
        lines.append(bold(f"instances ({ds.instances['n_cases']} cases){'':<4}" + "mean ± std over cases    pooled"))
        for k in ("pq", "sq", "rq", "f1", "precision", "recall"):
            lines.append(f"  {k:<20}{_pm(ia[k]):>22}    {_num(ip.get(k))}")
        lines.append(f"  tp / fp / fn (summed): {ip['tp']} / {ip['fp']} / {ip['fn']}")
    worst = ds.worst_cases(WORST_CASES, "dice") if "dice" in ds.metrics else []
    if worst:
        lines.append("")
        lines.append(bold(f"worst {len(worst)} case{'s' if len(worst) != 1 else ''} by foreground Dice:"))
        by_id = {c.case: c for c in ds.per_case}
        for case, v in worst:
            c = by_id[case]
            per = ", ".join(
                f"{lab}: {_num(c.per_class[lab].get('dice'))}" for lab in ds.labels if bg is None or lab != bg
            )
            lines.append(f"  {printable(case)}  {v:.4f}" + (f"  ({per})" if per and len(per) < width - 30 else ""))
    if ds.failed_cases:
        lines.append("")
        for f in ds.failed_cases[:10]:
            lines.append(yellow(f"failed: {printable(f.case)}: {printable(f.error)}"[: max(width, 40) * 3]))
        if len(ds.failed_cases) > 10:
            lines.append(yellow(f"... and {len(ds.failed_cases) - 10} more failed cases (all in the JSON report)"))
    for w in ds.warnings[:20]:
        lines.append(yellow(f"warning: {w}"))
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
