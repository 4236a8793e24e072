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

from fastseg_eval._version import __version__
from fastseg_eval.errors import Message, option
from fastseg_eval.metrics import formulas as M
from fastseg_eval.metrics.curves import curves
from fastseg_eval.reducers.probability import scale_mistake

if TYPE_CHECKING:
    from fastseg_eval.reducers.confusion import ConfusionCounts

COUNT_KEYS = ("tp", "fp", "fn", "tn", "support", "predicted")
WARN_LABELS = 20
"""Labels named one per warning line for each kind of warning; more are summarised in one line."""

PER_CLASS_LIMIT = 10_000
"""Reports (JSON, CSV, table) list at most this many labels one by one unless asked for more;
past it they keep the labels that occur, largest first. Means and overall figures are exact."""


PER_CLASS_DICT_MAX = 10_000
"""Up to this many labels ``per_class`` is a plain dict of dicts; beyond it a :class:`PerClass`."""


class PerClass(Mapping):
    """``{label: {"tp", "fp", ..., <metrics>}}``, each row built on access from count arrays.

    A million labels cost a few arrays, not a million dicts. ``column(name)`` gives one count
    or metric for every label at once, in the order of ``labels``.
    """

    def __init__(self, labels: np.ndarray, columns: dict[str, np.ndarray], metrics: Sequence[str]):
        self._labels = np.asarray(labels)
        self._columns = columns
        self._metrics = list(metrics)
        self._index: dict[int, int] | None = None

    def _position(self, label: Any) -> int:
        if self._index is None:
            self._index = {lab: i for i, lab in enumerate(self._labels.tolist())}
        key = label
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            key = int(label)
        elif isinstance(label, np.integer):
            key = int(label)
        if isinstance(key, bool) or not isinstance(key, int) or key not in self._index:
            raise KeyError(label)
        return self._index[key]

    def __getitem__(self, label: Any) -> dict[str, Any]:
        i = self._position(label)
        row: dict[str, Any] = {k: int(self._columns[k][i]) for k in COUNT_KEYS}
        row.update({m: float(self._columns[m][i]) for m in self._metrics})
        return row

    def __contains__(self, label: Any) -> bool:
        try:
            self._position(label)
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(self._labels.tolist())

    def __len__(self) -> int:
        return len(self._labels)

    def column(self, name: str) -> np.ndarray:
        """One count or metric for every label, in label order."""
        return self._columns[name]

    def largest(self, limit: int | None) -> list[int]:
        """Labels to list one by one: all of them within ``limit``, else the occurring ones, largest first
        (support + predicted), at most ``limit``, in label order."""
        if limit is None or limit <= 0 or len(self) <= limit:
            return self._labels.tolist()
        size = self._columns["support"] + self._columns["predicted"]
        order = np.lexsort((np.arange(len(size)), -size))[:limit]
        order = order[size[order] > 0]
        return self._labels[np.sort(order)].tolist()

    def __repr__(self) -> str:
        return f"PerClass({len(self)} labels)"


class LabelDict(dict):
    """A dict keyed by integer label that also takes a label's JSON spelling: ``d["1"]`` is ``d[1]``.

    Keys given as digit strings are stored as ints; a key that is no label raises ``KeyError``
    naming it.
    """

    __slots__ = ()

    def __init__(self, items: Any = (), /) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        super().__init__((_label_key(k), v) for k, v in pairs)

    def __missing__(self, key: Any) -> Any:
        k = _label_key(key)
        if k is not key and dict.__contains__(self, k):
            return dict.__getitem__(self, k)
        shown = ", ".join(map(str, list(self)[:10])) + (", ..." if len(self) > 10 else "")
        raise KeyError(f"label {key!r} is not among the labels here ({shown})")

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, _label_key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return dict.get(self, _label_key(key), default)

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, _label_key(key), value)

    def __reduce__(self):
        return (LabelDict, (dict(self),))


def _label_key(key: Any) -> Any:
    """``"1"`` or ``numpy.int64(1)`` -> ``1``; anything else unchanged."""
    if isinstance(key, str):
        text = key.strip()
        return int(text) if text.lstrip("-").isdigit() else key
    if isinstance(key, np.integer):
        return int(key)
    return key


@dataclass
class EvaluationResult:
    """Everything one evaluation produced.

    ``confusion_matrix[i, j]`` counts voxels with ground-truth label ``labels[i]`` predicted as
    ``labels[j]`` (rows = ground truth, columns = prediction). It is ``None`` when the label space
    was too large for a dense table (diagonal + marginals mode); every metric is exact either way.
    """

    labels: np.ndarray
    confusion_matrix: np.ndarray | None
    per_class: Mapping[int, dict[str, Any]]
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
    curves: dict[int, Any] | None = None
    instances: dict[str, Any] | None = None
    """Instance metrics (``evaluate(..., instances=True)``): VOI, adapted Rand, matching, PQ and
    ``per_gt``; see :mod:`fastseg_eval.metrics.instances`. None when not asked."""
    per_class_limit: int | None = PER_CLASS_LIMIT
    class_table: PerClass | None = field(default=None, repr=False, compare=False)
    """The per-class counts and metrics as arrays (``column(name)``), when built from counts."""

    def __post_init__(self) -> None:
        # one key type: int labels, found by their JSON spelling too ("1"), whoever built the result
        if isinstance(self.per_class, dict) and not isinstance(self.per_class, LabelDict):
            self.per_class = LabelDict(self.per_class)
        if self.curves is not None and not isinstance(self.curves, LabelDict):
            self.curves = LabelDict(self.curves)

    def reported_labels(self) -> list[int]:
        """The labels the reports list one by one (see :data:`PER_CLASS_LIMIT`)."""
        table = self.class_table if self.class_table is not None else self.per_class
        if isinstance(table, PerClass):
            return table.largest(self.per_class_limit)
        labels, limit = list(self.per_class), self.per_class_limit
        if limit is None or limit <= 0 or len(labels) <= limit:
            return labels
        size = {lab: self.per_class[lab]["support"] + self.per_class[lab]["predicted"] for lab in labels}
        keep = set(sorted((lab for lab in labels if size[lab] > 0), key=lambda lab: (-size[lab], lab))[:limit])
        return [lab for lab in labels if lab in keep]

    # -------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python types, in the JSON layout of DESIGN.md (NaN -> None)."""
        d: dict[str, Any] = {
            "fastseg_eval_version": __version__,
            "inputs": self.inputs,
            "options": self.options,
            "labels": np.asarray(self.labels),
        }
        shown = self.reported_labels()
        if len(shown) < len(self.per_class):
            d["per_class_omitted"] = len(self.per_class) - len(shown)
        if self.label_names:
            d["label_names"] = {str(k): v for k, v in self.label_names.items()}
        d.update(
            {
                "n_voxels": self.n_voxels,
                "n_ignored": self.n_ignored,
                "n_masked": self.n_masked,
                "confusion_matrix": self.confusion_matrix,
                "per_class": {str(k): self.per_class[k] for k in shown},
                "mean": self.mean,
                "foreground_mean": self.foreground_mean,
                "micro": self.micro,
                "weighted": self.weighted,
                "overall": self.overall,
            }
        )
        if self.curves is not None:
            d["curves"] = self.curves
        if self.instances is not None:
            d["instances"] = self._instances_dict()
        d["warnings"] = list(self.warnings)
        d["timing"] = self.timing
        return jsonable(d)

    def to_json(self, path: str | None = None, *, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (``null`` for undefined values); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def _instances_dict(self) -> dict[str, Any]:
        """``instances`` for JSON: the figures, then ``per_gt`` (the largest ``per_class_limit`` rows)."""
        inst = self.instances or {}
        per_gt = inst.get("per_gt") or []
        out = {k: v for k, v in inst.items() if k != "per_gt"}
        limit = self.per_class_limit
        if hasattr(per_gt, "largest"):
            shown = per_gt.largest(limit)
        elif limit is None or limit <= 0 or len(per_gt) <= limit:
            shown = range(len(per_gt))
        else:  # a plain list: the largest instances, in id order
            shown = sorted(sorted(range(len(per_gt)), key=lambda i: (-per_gt[i]["size"], i))[:limit])
        if len(shown) < len(per_gt):
            out["per_gt_omitted"] = len(per_gt) - len(shown)
        out["per_gt"] = [per_gt[int(i)] for i in shown]
        return out

    def to_csv(self, path: str | None = None, *, table: str = "classes") -> str:
        """CSV text: label, name, counts, then every selected metric; one row per class, then the means.

        The means follow the classes, one row each, labelled as in the JSON report (``mean``,
        ``foreground_mean``, ``micro``, ``weighted``) and named as in the table; their counts are empty.

        ``table="instances"`` writes the per-instance table instead (``evaluate(..., instances=True)``):
        one row per ground-truth instance, every one of them, ``id, matched_id, iou, dice, size``
        (``matched_id`` empty when unmatched; ``class`` too when instances are connected components).
        """
        if table == "instances":
            return self._instances_csv(path)
        if table != "classes":
            from fastseg_eval.errors import OptionError

            raise OptionError(f"table must be 'classes' or 'instances', got {table!r}")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "name", *COUNT_KEYS, *self.metrics])
        for lab in self.reported_labels():
            row = self.per_class[lab]
            name = (self.label_names or {}).get(lab, "")
            w.writerow([lab, name, *(row[k] for k in COUNT_KEYS), *(csv_number(row[m]) for m in self.metrics)])
        for key, title, d in self._mean_rows():
            w.writerow(
                [key, title, *("" for _ in COUNT_KEYS), *(csv_number(d.get(m, "")) for m in self.metrics)]
            )
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        return text

    def _instances_csv(self, path: str | None) -> str:
        if self.instances is None:
            from fastseg_eval.errors import OptionError

            raise OptionError("no instance metrics in this result: evaluate with instances=True")
        per_gt = self.instances["per_gt"]
        if hasattr(per_gt, "keys"):
            keys = per_gt.keys
        else:
            keys = list(per_gt[0]) if len(per_gt) else ["id", "matched_id", "iou", "dice", "size"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for row in per_gt:
            w.writerow(["" if row[k] is None else row[k] for k in keys])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        return text

    def _mean_rows(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        """(JSON key, table title, values) of the means below the classes."""
        bg = (self.options or {}).get("background_label")
        fg = bg is not None and any(int(x) == bg for x in self.labels)
        return [
            ("mean", "mean", self.mean),
            ("foreground_mean", "fg mean" if fg else "mean", self.foreground_mean),
            ("micro", "fg micro" if fg else "micro", self.micro),
            ("weighted", "weighted", self.weighted),
        ]

    def to_table(self, *, color: bool = False, metrics: Sequence[str] | None = None) -> str:
        """A plain-text table for people (fits 80 columns with the default metrics)."""
        from fastseg_eval.report.table import format_table

        return format_table(self, color=color, metrics=metrics)

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        fg = self.foreground_mean.get("dice")
        return (
            f"EvaluationResult(labels={[int(x) for x in self.labels][:8]}{'...' if len(self.labels) > 8 else ''}, "
            f"n_voxels={self.n_voxels}, foreground_mean_dice={fg})"
        )


def csv_number(x: Any) -> Any:
    """A CSV cell: an empty cell for NaN."""
    return "" if isinstance(x, float) and math.isnan(x) else x


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types: str keys, lists, ints, floats with ``None`` for NaN / inf."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iub":  # plain ints already: no walk over a million elements
            return x.tolist()
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def result_from_counts(
    acc: ConfusionCounts,
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
    per_class_limit: int | None = PER_CLASS_LIMIT,
    boundary: Mapping[str, np.ndarray] | None = None,
) -> EvaluationResult:
    """Derive every metric from an accumulator's counts.

    ``per_class_limit`` caps the labels the reports list one by one (None or 0: all of them);
    ``per_class`` itself always answers for every label. ``boundary``: per-label columns of the
    boundary metrics asked for (from :func:`fastseg_eval.metrics.boundary.boundary_columns`).
    """
    M.check_empty(empty)
    check_metric_options(tversky_alpha, tversky_beta, smooth)
    names = M.resolve_metrics(metrics)
    bnames = [m for m in names if m not in M.METRICS]  # boundary metrics: not formulas over counts
    missing = [m for m in bnames if boundary is None or m not in boundary]
    if missing:
        from fastseg_eval.errors import OptionError

        raise OptionError(
            f"{', '.join(missing)} need(s) the surfaces of the volumes, not only their counts: use "
            "fastseg_eval.evaluate(..., metrics=[...]) on the volumes"
        )
    labels = acc.labels
    n = acc.n_voxels
    diag, gtc, prc = acc.diagonal, acc.gt_counts, acc.pred_counts
    counts = M.class_counts(diag, gtc, prc, n)
    opts = {"tversky_alpha": tversky_alpha, "tversky_beta": tversky_beta, "smooth": smooth, "empty": empty}
    conf = [m for m in names if m in M.METRICS]
    values = M.compute(conf, counts["tp"], counts["fp"], counts["fn"], counts["tn"], **opts)
    values.update({m: np.asarray(boundary[m], dtype=np.float64) for m in bnames})  # type: ignore[index]

    columns = {k: np.asarray(counts[k], dtype=np.int64) for k in COUNT_KEYS}
    columns.update({name: np.asarray(values[name], dtype=np.float64) for name in names})
    table = PerClass(labels, columns, names)
    # a plain dict (JSON-ready, as users expect) unless the label space is too large for one
    per_class: Mapping[int, dict[str, Any]] = LabelDict(table.items()) if len(table) <= PER_CLASS_DICT_MAX else table

    all_classes = np.ones(len(labels), dtype=bool)
    fg = labels != background_label if background_label is not None else all_classes
    mean, mean_n = M.macro(values, all_classes)
    fg_mean, fg_n = M.macro(values, fg)
    pooled = {k: np.array([counts[k][fg].sum()], dtype=np.int64) for k in ("tp", "fp", "fn", "tn")}
    micro = {k: float(v[0]) for k, v in M.compute(conf, **pooled, **opts).items()}
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
        weighted=M.weighted({m: values[m] for m in conf}, counts["support"]),
        overall=overall,
        n_voxels=n,
        n_ignored=acc.n_ignored,
        n_masked=acc.n_masked,
        metrics=names,
        options={
            "labels_from": acc.label_source,
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
        per_class_limit=per_class_limit,
        class_table=table,
    )
    spec = acc.probability
    if spec is not None and spec.bins:
        curve_labels = [1] if spec.mode == "threshold" else list(range(spec.channels))
        res.curves = LabelDict(curves(acc.sweep_histogram, spec, curve_labels))
    res.warnings = [*warnings, *diagnose(res, counts, background_label), *_boundary_warnings(res, values, bnames)]
    mistake = scale_mistake(spec, acc.largest_probability)  # evaluate() refuses it; a streaming result warns
    if mistake:
        res.warnings.append(Message(mistake))
    shown = res.reported_labels()
    if len(shown) < len(labels):
        res.warnings.append(
            Message(
                f"{len(labels):,} labels: the reports list {len(shown):,} of them one by one (those that "
                f"occur, largest first); means and overall figures cover all. Pass "
                f"{option('per_class_limit', 0)} to list every label"
            )
        )
    if not acc.is_dense:
        res.warnings.append(
            f"{len(labels)} labels: kept the diagonal and marginals only (no full matrix); "
            "every per-class and overall metric is exact"
        )
    return res


def _boundary_warnings(res: EvaluationResult, values: Mapping[str, np.ndarray], bnames: Sequence[str]) -> list[str]:
    """Labels whose boundary distances are infinite (present in one volume only): JSON writes null."""
    dist = [m for m in bnames if m != "nsd"]
    if not dist:
        return []
    inf = np.zeros(len(res.labels), bool)
    for m in dist:
        inf |= np.isinf(values[m])
    labs = np.asarray(res.labels)[inf].tolist()
    if not labs:
        return []
    shown = ", ".join(map(str, labs[:WARN_LABELS])) + (", ..." if len(labs) > WARN_LABELS else "")
    return [
        Message(
            f"label(s) {shown} occur in one volume only: their boundary distances ({', '.join(dist)}) are "
            f"infinite (null in JSON, and so are means over them), nsd 0; pass "
            f"{option('empty_distance', '')} to report a fixed distance instead"
        )
    ]


def check_metric_options(tversky_alpha: float, tversky_beta: float, smooth: float) -> None:
    from fastseg_eval.errors import OptionError

    for name, v in (("tversky_alpha", tversky_alpha), ("tversky_beta", tversky_beta), ("smooth", smooth)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) or v < 0:
            raise OptionError(f"{option(name)} must be a finite number >= 0, got {v!r}")


def _void_values(gt_input: Mapping[str, Any] | None) -> set[int]:
    """Ground-truth values that usually mark void voxels: 255, and the largest value of gt's dtype."""
    out = {255}
    try:
        dt = np.dtype((gt_input or {}).get("dtype"))
    except TypeError:
        return out
    if dt.kind in "iu":
        out.add(int(np.iinfo(dt).max))
    return out



def diagnose(res: EvaluationResult, counts: dict[str, np.ndarray], background_label: int | None) -> list[str]:
    """Plain-language warnings that help read the numbers."""
    out: list[str] = []
    labels_arr = np.asarray(res.labels)  # 65 536 discovered ids: no list of Python ints (5 ms)
    n = res.n_voxels
    if n == 0:
        shape = (res.inputs.get("gt") or {}).get("shape")
        if shape is not None and math.prod(shape) == 0:
            out.append(
                f"the volumes hold no voxels (shape {'x'.join(map(str, shape))}): there is nothing to "
                "evaluate and every metric is undefined"
            )
        elif res.n_ignored or res.n_masked:
            out.append(
                f"no voxel was counted ({res.n_ignored:,} ignored, {res.n_masked:,} masked out): every "
                "metric is undefined"
            )
        else:
            out.append("no voxel was counted: every metric is undefined")
        return out
    support, predicted = np.asarray(counts["support"]), np.asarray(counts["predicted"])
    voids = _void_values((res.inputs or {}).get("gt"))
    # one line per label up to WARN_LABELS of each kind, then one summary line (a million
    # discovered ids must not give a million warnings)
    pred_only = np.flatnonzero((support == 0) & (predicted > 0))
    for i in pred_only[:WARN_LABELS].tolist():
        out.append(
            f"label {int(labels_arr[i])} is absent from the ground truth but predicted in {int(predicted[i])} "
            "voxels (precision 0, recall undefined)"
        )
    if len(pred_only) > WARN_LABELS:
        out.append(
            f"... and {len(pred_only) - WARN_LABELS:,} more labels absent from the ground truth but predicted "
            f"({len(pred_only):,} in all)"
        )
    gt_only = np.flatnonzero((support > 0) & (predicted == 0))
    void_first = sorted(gt_only.tolist(), key=lambda i: int(labels_arr[i]) not in voids)[:WARN_LABELS]
    for i in sorted(void_first):
        lab = int(labels_arr[i])
        void = f"; if {lab} marks voxels to skip (void), pass {option('ignore_label', lab)}" if lab in voids else ""
        out.append(
            Message(
                f"label {lab} is in the ground truth ({int(support[i])} voxels) but never predicted "
                f"(recall 0){void}"
            )
        )
    if len(gt_only) > WARN_LABELS:
        out.append(
            f"... and {len(gt_only) - WARN_LABELS:,} more labels in the ground truth but never predicted "
            f"({len(gt_only):,} in all)"
        )
    ignore = res.options.get("ignore_label")
    quiet_ignore = False  # the ignore label in the label space, never predicted: nothing to say about it
    where = np.flatnonzero(labels_arr == ignore) if ignore is not None and 0 <= ignore < 2**64 else []
    if len(where):
        i = int(where[0])
        quiet_ignore = predicted[i] == 0 and res.options.get("empty") == "nan"
        if predicted[i] > 0:
            out.append(
                Message(
                    f"the prediction holds the ignore label {ignore} in {int(predicted[i])} counted voxels; "
                    f"{option('ignore_label')} only skips ground-truth voxels, so it is counted as a predicted "
                    "label there"
                )
            )
    absent_mask = (support == 0) & (predicted == 0)
    if quiet_ignore:
        absent_mask &= labels_arr != ignore
    absent = labels_arr[np.flatnonzero(absent_mask)[:11]].tolist()
    n_absent = int(np.count_nonzero(absent_mask))
    if n_absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if n_absent > 10 else "")
        out.append(
            f"{n_absent} label(s) appear in neither volume ({shown}): their metrics follow empty={res.options['empty']!r}"
        )
    acc_all = res.overall.get("accuracy", float("nan"))
    fg_iou = res.foreground_mean.get("iou")
    at = np.flatnonzero(labels_arr == background_label) if background_label is not None and 0 <= background_label < 2**64 else []
    if len(at) and fg_iou is not None and not math.isnan(fg_iou):
        bg = int(at[0])
        share = support[bg] / n
        if acc_all >= 0.9 and fg_iou < 0.5 and share >= 0.5:
            out.append(
                f"class imbalance: overall accuracy {acc_all:.3f} is dominated by label {background_label} "
                f"({100 * share:.0f}% of voxels) while the mean foreground IoU is {fg_iou:.3f}; "
                "read the per-class and foreground means"
            )
    if len(labels_arr) == 1:
        out.append(f"only one label ({int(labels_arr[0])}) occurs: per-class metrics are trivial")
    return out
