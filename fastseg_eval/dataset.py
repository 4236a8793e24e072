"""Datasets: evaluate many cases (pred / gt pairs) in parallel, resumably, into one report.

:func:`evaluate_dataset` finds the cases (two folders matched by case id, two sequences, or a
manifest), evaluates each with :func:`fastseg_eval.evaluate` (every input format it opens:
zarr, NIfTI, TIFF, ``.npy``, HDF5, NRRD / MHA), and builds a
:class:`~fastseg_eval.report.dataset.DatasetResult` from the cases' counts.

Parallelism and memory
    Cases run in a pool of ``workers`` threads, one case per thread at a time (the readers and
    the counting kernels release the GIL), so memory is bounded by ``workers`` x one case's
    decoded volumes, never by the dataset. With fewer cases than workers, each case gets the
    spare threads for its own chunks. With ``scheduler`` (a dask.distributed cluster, an
    address, ``"local:N"``, or dask's ``"processes"``), each case is one task on a worker, which
    opens the files itself: only paths go out and only counts come back.

Resume
    With ``resume=JOURNAL``, every finished case is appended to the journal (one JSON line of
    counts, flushed and fsynced). Run again with the same journal and options, finished cases
    are skipped (unless their files changed since), and the reports are byte-identical to an
    uninterrupted run: reports are always built from the journal form of the counts. A last
    line cut short by a kill is dropped (and later overwritten).

Bad cases
    ``on_error="stop"`` (default): the first case that cannot be evaluated stops the run with its
    message, prefixed with the case id (cases finished by then are in the journal).
    ``on_error="skip"``: the case is recorded in ``failed_cases`` and the run goes on.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseg_eval import api
from fastseg_eval.engine import check_workers
from fastseg_eval.errors import FastSegError, InputError, OptionError, option
from fastseg_eval.io.formats import case_id, file_format
from fastseg_eval.io.outputs import ZARR_METADATA
from fastseg_eval.io.volume import open_volume
from fastseg_eval.metrics import formulas as M
from fastseg_eval.progress import CaseProgressBar
from fastseg_eval.report.dataset import (
    CaseCounts,
    DatasetResult,
    FailedCase,
    build_dataset_result,
    encode_float,
    instance_record,
    parse_regions,
    region_key,
)
from fastseg_eval.report.result import check_metric_options

MISSING_POLICIES = ("error", "skip", "empty")
ON_ERROR = ("stop", "skip")
SHOW_MISSING = 5
"""Case ids named per side when cases do not match."""
JOURNAL_FORMAT = 1

COUNT_OPTIONS = (
    "num_classes", "labels", "ignore_label", "threshold", "channel_axis", "prob_scale", "pred_key", "gt_key",
    "mask_key", "level",
)  # fmt: skip
"""evaluate() options that change a case's counts: a journal is only reused with the same values."""
METRIC_OPTIONS = ("metrics", "tversky_alpha", "tversky_beta", "smooth", "empty", "background_label", "per_class_limit")
"""Options applied to the counts when the report is built (a journal holds counts, so they may change)."""
NOT_PER_DATASET = {
    "thresholds": "a threshold sweep (--sweep) per dataset",
}
INSTANCE_OPTIONS = ("iou_threshold", "connectivity", "background_label")
"""evaluate() options that change a case's instance metrics (kept per case in the journal when
``instances=True``)."""
BOUNDARY_OPTIONS = ("spacing", "surface", "hd_percentile", "nsd_tolerance", "empty_distance", "background_label")
"""evaluate() options that change the distance metrics a journal keeps per case (when some are asked)."""


# ------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class CaseSpec:
    """One case: its id and its inputs (paths or arrays; ``pred`` None: absent, scored as background)."""

    case: str
    pred: Any
    gt: Any
    mask: Any = None
    pred_source: str = ""
    gt_source: str = ""
    mask_source: str | None = None


def _source(x: Any, what: str) -> str:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return what


def _is_case_folder(x: Any) -> bool:
    """A directory that is not itself a zarr store (its entries are cases)."""
    if not isinstance(x, (str, os.PathLike)):
        return False
    p = os.fspath(x)
    return os.path.isdir(p) and not any(os.path.isfile(os.path.join(p, m)) for m in ZARR_METADATA)


def is_case_folder(path: Any) -> bool:
    """Whether ``path`` is a folder of cases: a directory that is not itself a zarr store."""
    return _is_case_folder(path)


def list_cases(folder: str, role: str) -> dict[str, str]:
    """``{case id: path}`` of the cases in ``folder``: files of a known format, zarr stores
    (directories holding zarr metadata or named ``*.zarr``) and ``.zip`` stores. Hidden entries
    and other files are left out."""
    label = {"pred": "PRED folder", "gt": "GT folder", "mask": "mask folder"}.get(role, role)
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise InputError(f"{label} {folder}: cannot list it: {e.strerror or e}") from e
    out: dict[str, str] = {}
    for name in names:
        if name.startswith("."):
            continue
        full = os.path.join(folder, name)
        low = name.lower()
        if os.path.isfile(full):
            if file_format(name) is None and not low.endswith(".zip"):
                continue
        elif os.path.isdir(full):
            if not (low.endswith((".zarr", ".zip")) or any(os.path.isfile(os.path.join(full, m)) for m in ZARR_METADATA)):
                continue
        else:
            continue
        cid = case_id(name)
        if cid in out:
            raise InputError(
                f"{label} {folder} has two entries for case {cid!r}: {os.path.basename(out[cid])} and {name}; "
                "keep one"
            )
        out[cid] = full
    return out


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOW_MISSING])
    return shown + (f", ... ({len(items)} in all)" if len(items) > SHOW_MISSING else "")


def _match(
    preds: Mapping[str, Any], gts: Mapping[str, Any], missing: str, where: tuple[str, str]
) -> tuple[list[tuple[str, Any, Any]], dict[str, Any]]:
    """Matched (case, pred, gt) by case id, and what had no partner, under the ``missing`` policy."""
    only_pred = sorted(set(preds) - set(gts))
    only_gt = sorted(set(gts) - set(preds))
    if missing == "error" and (only_pred or only_gt):
        parts = []
        if only_gt:
            parts.append(f"{len(only_gt)} case(s) of GT {where[1]} have no prediction in {where[0]}: {_first(only_gt)}")
        if only_pred:
            parts.append(f"{len(only_pred)} case(s) of PRED {where[0]} have no ground truth in {where[1]}: {_first(only_pred)}")
        raise InputError(
            "; ".join(parts) + f". Pass {option('missing', 'skip')} to evaluate the matched cases only, or "
            f"{option('missing', 'empty')} to score an absent prediction as all background"
        )
    matched = [(c, preds[c], gts[c]) for c in sorted(set(preds) & set(gts))]
    if missing == "empty":
        matched += [(c, None, gts[c]) for c in only_gt]
        matched.sort(key=lambda t: t[0])
    info: dict[str, Any] = {}
    if only_pred or only_gt:
        info = {"policy": missing, "pred": only_gt, "gt": only_pred}  # pred: cases without a prediction
    return matched, info


def _read_manifest(path: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fieldnames = [f.strip().lower() for f in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except OSError as e:
        raise InputError(f"cases manifest {path}: cannot read it: {e.strerror or e}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"cases manifest {path}: not a CSV file: {e}") from e
    if not {"pred", "gt"} <= set(fieldnames):
        raise InputError(
            f"cases manifest {path}: its header is {','.join(fieldnames) or '(empty)'}; expected the columns "
            "case,pred,gt (and optionally mask), paths relative to the manifest's folder"
        )
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(rows, start=2):
        row = {}
        for col in ("pred", "gt", "mask"):
            v = r.get(col) or ""
            row[col] = v if not v or os.path.isabs(v) or "://" in v else os.path.join(base, v)
        if not row["gt"]:
            raise InputError(f"cases manifest {path}, line {i}: no gt path")
        row["case"] = r.get("case") or case_id(row["pred"] or row["gt"])
        out.append(row)
    return out


def resolve_cases(
    preds: Any, gts: Any, *, cases: Any = None, missing: str = "error", mask: Any = None
) -> tuple[list[CaseSpec], dict[str, Any], dict[str, Any]]:
    """The cases to evaluate, what had no partner (under ``missing``), and a description of the inputs."""
    if missing not in MISSING_POLICIES:
        raise OptionError(f"missing={missing!r} is not a policy; choose one of {', '.join(MISSING_POLICIES)}")
    info: dict[str, Any] = {}
    if cases is not None:
        if preds is not None or gts is not None:
            raise OptionError("pass either cases= (a manifest) or preds and gts, not both")
        rows = _read_manifest(os.fspath(cases)) if isinstance(cases, (str, os.PathLike)) else [dict(r) for r in cases]
        inputs = {"cases": os.fspath(cases) if isinstance(cases, (str, os.PathLike)) else f"{len(rows)} cases given"}
        specs, no_pred, no_gt = [], [], []
        seen: set[str] = set()
        for i, r in enumerate(rows):
            if "gt" not in r or "pred" not in r:
                raise OptionError(f"cases[{i}] needs the keys 'pred' and 'gt' (and optionally 'case', 'mask')")
            cid = str(r.get("case") or (case_id(os.fspath(r["pred"])) if isinstance(r["pred"], (str, os.PathLike)) else f"case_{i:04d}"))
            if cid in seen:
                raise InputError(f"case {cid!r} is listed twice in the cases")
            seen.add(cid)
            pred, gt = r["pred"] or None, r["gt"]
            if isinstance(gt, (str, os.PathLike)) and not os.path.exists(gt) and "://" not in os.fspath(gt):
                no_gt.append(cid)
                continue
            if pred is None or (isinstance(pred, (str, os.PathLike)) and not os.path.exists(pred) and "://" not in os.fspath(pred)):
                no_pred.append(cid)
                pred = None
            m = r.get("mask") or None
            specs.append(CaseSpec(cid, pred, gt, m, _source(pred, "") if pred is not None else "",
                                  _source(gt, f"cases[{i}].gt"), None if m is None else _source(m, f"cases[{i}].mask")))  # fmt: skip
        if (no_pred or no_gt) and missing == "error":
            parts = []
            if no_pred:
                parts.append(f"{len(no_pred)} case(s) have no prediction file: {_first(no_pred)}")
            if no_gt:
                parts.append(f"{len(no_gt)} case(s) have no ground-truth file: {_first(no_gt)}")
            raise InputError(
                "; ".join(parts) + f". Pass {option('missing', 'skip')} to evaluate the others, or "
                f"{option('missing', 'empty')} to score an absent prediction as all background"
            )
        if missing == "skip":
            specs = [s for s in specs if s.pred is not None]
        if no_pred or no_gt:
            info = {"policy": missing, "pred": sorted(no_pred), "gt": sorted(no_gt)}
        specs.sort(key=lambda s: s.case)
    elif _is_case_folder(preds) or _is_case_folder(gts):
        for x, role in ((preds, "PRED"), (gts, "GT")):
            if not _is_case_folder(x):
                raise InputError(
                    f"{'PRED' if role == 'GT' else 'GT'} is a folder of cases but {role} {_source(x, 'an array')} is "
                    "not: give two folders of cases (matched by case id), or two volumes"
                )
        pmap, gmap = list_cases(os.fspath(preds), "pred"), list_cases(os.fspath(gts), "gt")
        if not gmap:
            raise InputError(f"GT folder {os.fspath(gts)} holds no cases: {_no_cases_hint()}")
        if not pmap and missing != "empty":
            raise InputError(f"PRED folder {os.fspath(preds)} holds no cases: {_no_cases_hint()}")
        matched, info = _match(pmap, gmap, missing, (os.fspath(preds), os.fspath(gts)))
        inputs = {"pred": os.fspath(preds), "gt": os.fspath(gts)}
        specs = [CaseSpec(c, p, g, None, p or "", g) for c, p, g in matched]
    else:
        if preds is None or gts is None:
            raise OptionError("evaluate_dataset needs preds and gts (two folders or two sequences), or cases=")
        if isinstance(preds, (str, os.PathLike)) or isinstance(gts, (str, os.PathLike)):
            which = preds if isinstance(preds, (str, os.PathLike)) else gts
            raise InputError(
                f"{os.fspath(which)} is not a folder of cases (no such directory, or a zarr store itself); "
                "give two folders, two sequences of volumes, or cases="
            )
        preds, gts = list(preds), list(gts)
        if len(preds) != len(gts):
            raise InputError(f"{len(preds)} predictions but {len(gts)} ground truths: the sequences pair up one to one")
        ids = []
        for i, (p, g) in enumerate(zip(preds, gts)):
            src = p if isinstance(p, (str, os.PathLike)) else g
            ids.append(case_id(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else f"case_{i:04d}")
        if len(set(ids)) != len(ids):
            ids = [f"case_{i:04d}" for i in range(len(ids))]
        specs = [
            CaseSpec(c, p, g, None, _source(p, f"preds[{i}]"), _source(g, f"gts[{i}]"))
            for i, (c, p, g) in enumerate(zip(ids, preds, gts))
        ]
        inputs = {"pred": f"{len(preds)} volumes", "gt": f"{len(gts)} volumes"}
    if mask is not None:
        specs, inputs["mask"] = _with_masks(specs, mask), _source(mask, "an array")
    if not specs:
        raise InputError("no case to evaluate" + (f" ({info})" if info else ""))
    return specs, info, inputs


def _no_cases_hint() -> str:
    from fastseg_eval.io.formats import FILE_SUFFIXES

    return f"expected files ending in {', '.join(FILE_SUFFIXES)}, or zarr stores (.zarr directories, .zip)"


def _with_masks(specs: list[CaseSpec], mask: Any) -> list[CaseSpec]:
    """A folder of masks matched by case id, or one mask for every case."""
    if _is_case_folder(mask):
        masks = list_cases(os.fspath(mask), "mask")
        absent = [s.case for s in specs if s.case not in masks]
        if absent:
            raise InputError(f"mask folder {os.fspath(mask)} has no mask for {len(absent)} case(s): {_first(absent)}")
        return [
            CaseSpec(s.case, s.pred, s.gt, masks[s.case], s.pred_source, s.gt_source, masks[s.case]) for s in specs
        ]
    return [
        s if s.mask is not None else CaseSpec(s.case, s.pred, s.gt, mask, s.pred_source, s.gt_source, _source(mask, "mask"))
        for s in specs
    ]


# ------------------------------------------------------------------------------------ journal
def _stamp(x: Any) -> list[int] | None:
    """(size, mtime in ns) of a file, or of a store's metadata file; None for arrays."""
    if not isinstance(x, (str, os.PathLike)):
        return None
    p = os.fspath(x)
    try:
        if os.path.isdir(p):
            for m in ZARR_METADATA:
                q = os.path.join(p, m)
                if os.path.isfile(q):
                    p = q
                    break
        st = os.stat(p)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _stamps(spec: CaseSpec) -> dict[str, Any]:
    return {"pred": _stamp(spec.pred), "gt": _stamp(spec.gt), "mask": _stamp(spec.mask)}


class Journal:
    """An append-only JSON-lines file of finished cases (``--resume``), fsynced line by line.

    Line 1 names the options that change counts; each further line is one case's record. A last
    line cut short (a kill during a write) is dropped when the journal is opened again.
    """

    def __init__(self, path: str, fingerprint: dict[str, Any]):
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.lock = threading.Lock()
        self.fh: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Records of the finished cases (the last line per case wins); opens the file for appending."""
        records: dict[str, dict[str, Any]] = {}
        header = {"fastseg_eval_journal": JOURNAL_FORMAT, "options": self.fingerprint}
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = b""
        except OSError as e:
            raise InputError(f"journal {self.path}: cannot read it: {e.strerror or e}") from e
        good = 0  # bytes of complete, valid lines
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            if last and not raw:
                break
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                if last or (i == len(lines) - 2 and not lines[-1]):
                    break  # the line a kill cut short: drop it
                raise InputError(
                    f"journal {self.path}: line {i + 1} is not a journal entry; the file is damaged (not just cut "
                    "short at the end): give another --resume file"
                ) from None
            if last:  # valid JSON but no newline: the write was cut before its end of line
                break
            if i == 0:
                if obj.get("fastseg_eval_journal") != JOURNAL_FORMAT:
                    raise InputError(f"journal {self.path}: not a fastseg-eval dataset journal (line 1 is {raw[:80]!r})")
                if obj.get("options") != _plain(self.fingerprint):
                    theirs = obj.get("options") or {}
                    diff = [
                        f"{option(k)} {theirs.get(k)!r} there, {v!r} now"
                        for k, v in _plain(self.fingerprint).items()
                        if theirs.get(k) != v
                    ]
                    raise OptionError(
                        f"journal {self.path} was written with other options ({'; '.join(diff[:4])}): its counts "
                        "do not apply. Use the same options, or another --resume file"
                    )
            elif obj.get("case") is not None and isinstance(obj.get("counts"), dict):
                records[str(obj["case"])] = obj
            good += len(raw) + 1
        try:
            if good == 0:
                self.fh = open(self.path, "wb")
                self._write(header)
            else:
                self.fh = open(self.path, "r+b")
                self.fh.truncate(good)  # drop a torn last line before appending after it
                self.fh.seek(good)
        except OSError as e:
            raise InputError(f"journal {self.path}: cannot write it: {e.strerror or e}") from e
        return records

    def _write(self, obj: dict[str, Any]) -> None:
        self.fh.write((json.dumps(obj, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def append(self, record: dict[str, Any]) -> None:
        with self.lock:
            try:
                self._write(record)
            except OSError as e:
                from fastseg_eval.io.outputs import OutputWriteError

                raise OutputWriteError(f"cannot write the journal {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------ one case
def _warning_text(w: Any) -> str:
    """A warning as journal text: a :class:`~fastseg_eval.errors.Message` keeps its option markers."""
    return str(getattr(w, "template", w))


def run_case(spec: CaseSpec, kwargs: Mapping[str, Any], workers: int = 1, progress: Any = None) -> dict[str, Any]:
    """Evaluate one case; its record (journal form). Errors name the case."""
    try:
        return _run_case(spec, kwargs, workers, progress)
    except FastSegError as e:
        if e.args and isinstance(e.args[0], str) and not e.args[0].startswith(f"case {spec.case}: "):
            e.args = (f"case {spec.case}: {e.args[0]}", *e.args[1:])
        raise
    except OSError as e:
        raise InputError(f"case {spec.case}: cannot read its files: {e.strerror or e} ({getattr(e, 'filename', '')})") from e


def _run_case(spec: CaseSpec, kwargs: Mapping[str, Any], workers: int, progress: Any) -> dict[str, Any]:
    kw = dict(kwargs)
    gv = open_volume(spec.gt, "gt", key=kw.pop("gt_key", None), level=kw.get("level"), storage_options=kw.get("storage_options"))
    pred_key = kw.pop("pred_key", None)
    if spec.pred is None:  # missing="empty": an absent prediction is all background
        bg = kw.get("background_label")
        zeros = np.broadcast_to(np.full((), 0 if bg is None else bg, dtype=gv.dtype), gv.shape)
        pv: Any = open_volume(zeros, "pred")
        pv.source = "(no prediction: all background)"
    else:
        pv = open_volume(spec.pred, "pred", key=pred_key, level=kw.get("level"), storage_options=kw.get("storage_options"))
    per_gt = bool(kw.pop("instances_per_gt", False))
    bregions = kw.pop("boundary_regions", None)
    res = api.evaluate(pv, gv, mask=spec.mask, workers=workers, progress=progress or False, **kw)
    inputs = {}
    for role, v in (("pred", pv), ("gt", gv)):
        d = dict(res.inputs.get(role) or {})
        if getattr(v, "spacing", None) is not None:
            d["spacing"] = [float(x) for x in v.spacing]
        inputs[role] = d
    if res.inputs.get("mask"):
        inputs["mask"] = res.inputs["mask"]
    bnames = [m for m in kw.get("metrics") or [] if m not in M.METRICS]  # hd95, ...: not from counts
    table = res.class_table
    boundary = {
        m: [encode_float(v) for v in (table.column(m) if table is not None else [res.per_class[lab][m] for lab in res.labels.tolist()])]
        for m in bnames
    }
    region_boundary = _region_boundary(pv, gv, bregions, bnames, res, kw, workers) if bregions and bnames else None
    record = {
        "case": spec.case,
        "pred": spec.pred_source,
        "gt": spec.gt_source,
        "mask": spec.mask_source,
        "counts": CaseCounts.from_result(res).to_dict(),
        "inputs": inputs,
        "warnings": [_warning_text(w) for w in res.warnings],
        **({"boundary": boundary} if boundary else {}),
        **({"region_boundary": region_boundary} if region_boundary else {}),
        **({"instances": instance_record(res.instances, per_gt)} if res.instances is not None else {}),
        "stamp": _stamps(spec),
    }
    return json.loads(json.dumps(record, sort_keys=True, allow_nan=False))  # exactly what a journal line gives back


def _region_mask(vol: Any, members: Sequence[int]) -> Any:
    """The region (voxels whose label is one of ``members``) of an opened input, as 0/1 labels:
    computed chunk by chunk (dask) for a chunked store, in memory for an array already read."""
    arr = vol.array
    if vol.kind == "zarr":
        import dask.array as da

        arr = da.from_zarr(arr)
    if vol.kind in ("zarr", "dask"):
        import dask.array as da

        return da.isin(arr, list(members)).astype(np.uint8)
    return np.isin(np.asarray(arr), list(members)).astype(np.uint8)


def _region_boundary(
    pv: Any, gv: Any, regions: Sequence[Sequence[int]], bnames: Sequence[str], res: Any, kw: Mapping[str, Any],
    workers: int,
) -> dict[str, dict[str, Any]]:
    """Distance metrics (hd95, ...) of each region's own surfaces, per region key (journal form).

    A region's surface is that of the union of its labels (BraTS's whole tumour is one object,
    not three): it is the surface of label 1 of the region's 0/1 masks, measured with the spacing
    and convention of the case's labels.
    """
    opts = {k: kw[k] for k in ("surface", "hd_percentile", "nsd_tolerance", "empty_distance") if k in kw}
    spacing = (res.options or {}).get("spacing")
    out = {}
    for members in regions:
        r = api.evaluate(
            _region_mask(pv, members), _region_mask(gv, members), num_classes=2, background_label=0,
            metrics=list(bnames), spacing=spacing, workers=workers, **opts,
        )  # fmt: skip
        out[region_key(members)] = {m: encode_float(r.per_class[1][m]) for m in bnames}
    return out


def _case_task(spec: CaseSpec, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """One case as a dask task (on a worker: one thread; the cluster runs many cases at once)."""
    return run_case(spec, kwargs, 1, None)


# ------------------------------------------------------------------------------------ running
def _check_options(evaluate_options: Mapping[str, Any]) -> None:
    params = inspect.signature(api.evaluate).parameters
    for k in evaluate_options:
        if k in NOT_PER_DATASET and evaluate_options[k]:
            raise OptionError(f"{NOT_PER_DATASET[k]} is not available yet; evaluate the cases one by one")
        if k not in params or k in ("pred", "gt", "workers", "scheduler", "progress"):
            raise OptionError(f"evaluate_dataset got an unknown option {k}=")


def _run_local(
    todo: Sequence[CaseSpec],
    kwargs: Mapping[str, Any],
    workers: int,
    on_done: Callable[[CaseSpec, dict[str, Any] | None, BaseException | None], None],
    bar: CaseProgressBar | None,
) -> None:
    """Cases in a pool of threads: ``min(workers, cases)`` at a time, the spare threads inside each."""
    outer = max(1, min(workers, len(todo)))
    inner = max(1, workers // outer)
    progress = bar.add_voxels if bar is not None else None
    it: Iterator[CaseSpec] = iter(todo)
    stop = threading.Event()
    if outer == 1:
        for spec in it:
            try:
                rec = run_case(spec, kwargs, inner, progress)
            except Exception as e:
                on_done(spec, None, e)
                continue
            on_done(spec, rec, None)
        return
    with ThreadPoolExecutor(outer, thread_name_prefix="fastseg-case") as ex:
        running: dict[Future, CaseSpec] = {}

        def submit() -> None:
            while len(running) < outer and not stop.is_set():
                spec = next(it, None)
                if spec is None:
                    return
                running[ex.submit(run_case, spec, kwargs, inner, progress)] = spec

        try:
            submit()
            while running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in done:
                    spec = running.pop(f)
                    e = f.exception()
                    on_done(spec, None if e is not None else f.result(), e)
                submit()
        except BaseException:  # a stop, or Ctrl-C: let the running cases end, start none
            stop.set()
            raise


def _run_dask(
    todo: Sequence[CaseSpec],
    kwargs: Mapping[str, Any],
    scheduler: Any,
    on_done: Callable[[CaseSpec, dict[str, Any] | None, BaseException | None], None],
) -> None:
    """One task per case on a dask scheduler; results handled as they finish."""
    from fastseg_eval.engine.cluster import connect, resolve_scheduler

    spec_ = resolve_scheduler(scheduler)
    if spec_.kind == "local" and spec_.value == "threads":
        raise AssertionError("threads are run locally")  # pragma: no cover - decided by the caller
    with connect(spec_) as session:
        client = session.client
        if client is None:
            import dask

            if session.local == "sync" or spec_.kind == "default":
                for s in todo:
                    try:
                        rec = _case_task(s, kwargs)
                    except Exception as e:
                        on_done(s, None, e)
                        continue
                    on_done(s, rec, None)
                return
            if session.local == "processes":
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                n = check_workers(None)
                with ProcessPoolExecutor(min(n, len(todo)), mp_context=multiprocessing.get_context("spawn")) as ex:
                    futs = {ex.submit(_case_task, s, kwargs): s for s in todo}
                    pending = set(futs)
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            e = f.exception()
                            on_done(futs[f], None if e is not None else f.result(), e)
                return
            task = dask.delayed(_case_task, pure=False)
            results = dask.compute(*[task(s, kwargs) for s in todo], scheduler=session.local)
            for s, rec in zip(todo, results):
                on_done(s, rec, None)
            return
        from distributed import as_completed

        futures = {client.submit(_case_task, s, kwargs, pure=False, key=f"fastseg-case-{i}-{s.case}"): s for i, s in enumerate(todo)}
        try:
            for f in as_completed(list(futures), loop=client.loop):
                s = futures[f]
                if f.status == "error":
                    on_done(s, None, f.exception())
                else:
                    on_done(s, f.result(), None)
                f.release()
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(list(futures))
            raise


def evaluate_dataset(
    preds: Any = None,
    gts: Any = None,
    *,
    cases: Any = None,
    missing: str = "error",
    regions: Any = None,
    spacing: Any = None,
    workers: int | None = None,
    scheduler: Any = None,
    progress: Any = False,
    resume: str | os.PathLike[str] | None = None,
    on_error: str = "stop",
    label_names: Mapping[int, str] | None = None,
    instances_per_gt: bool = False,
    **evaluate_options: Any,
) -> DatasetResult:
    """Evaluate a dataset of cases: per-case results, statistics over cases, the pooled result.

    Parameters
    ----------
    preds, gts : folder, or sequence of volumes
        Two folders of cases, matched by case id (the file or store name without its format
        suffix: ``.nii.gz``, ``.nii``, ``.zarr``, ``.zip``, ``.tif``, ``.tiff``, ``.npy``, ``.h5``,
        ``.nrrd``, ``.mha``, ...); or two sequences of equal length (paths or arrays), paired in
        order. Prediction first.
    cases : path of a CSV manifest or list of dicts, optional
        Instead of ``preds`` / ``gts``: rows ``case,pred,gt[,mask]`` (manifest paths are relative
        to the manifest's folder).
    missing : {"error", "skip", "empty"}
        Cases without a partner: an error naming the first few of each side (default), left
        out, or (``"empty"``) an absent prediction scored as all background.
    regions : str or sequence, optional
        Merged labels reported beside the labels (``"1,2,3;2,3;3"`` or ``[(1, 2, 3), (2, 3), (3,)]``),
        exact from each case's matrix, keyed as nnU-Net keys them (``"(1, 2, 3)"``).
    spacing : sequence of float, optional
        Voxel size for distance metrics (default: each case's header); not used by counts.
    workers : int, optional
        Cases evaluated at once (threads; default: the CPUs available). Memory: about ``workers``
        x one case's decoded volumes.
    scheduler : optional
        Spread cases over dask: ``"local:N"``, a ``tcp://`` address, a Client or cluster,
        ``"distributed"``, ``"processes"`` (see :mod:`fastseg_eval.engine.cluster`). Workers open
        the files themselves.
    progress : bool or callable
        ``True``: a progress bar over cases and voxels on stderr; or a callable ``(cases, done)``
        returning a :class:`CaseProgressBar` (``done``: cases resumed from the journal).
    resume : path, optional
        Journal file: finished cases are appended; an interrupted run given the same journal skips
        them and reports exactly what an uninterrupted run reports.
    on_error : {"stop", "skip"}
        A case that cannot be evaluated stops the run (default) or is recorded in
        ``failed_cases`` while the others go on.
    label_names : mapping, optional
        Names shown beside labels.
    instances_per_gt : bool
        With ``instances=True``: also keep each case's per-instance table (``per_gt``: one row per
        ground-truth instance) in its result, journal line and JSON record. Off by default: the
        dataset report needs only each case's figures, and a case may have millions of instances.
    **evaluate_options
        Options of :func:`fastseg_eval.evaluate` applied to every case: ``num_classes``,
        ``labels``, ``ignore_label``, ``mask`` (a folder of masks matched by case id, or one
        mask), ``metrics``, ``empty``, ``background_label``, ``geometry_check``, ``pred_key``, ...
        ``instances=True`` (with ``iou_threshold``, ``connectivity``) computes each case's
        instance metrics as :func:`~fastseg_eval.evaluate` does (``per_case[i].instances``) and
        adds ``ds.instances``: per figure the statistics over cases, and a detection summary
        pooled over the dataset (TP, FP, FN summed over cases; SQ = the matched IoUs summed
        over all cases / TP; RQ = TP / (TP + FP/2 + FN/2); PQ = SQ x RQ, as panoptic
        evaluation pools a dataset).

    Returns
    -------
    DatasetResult
        ``per_case``, ``aggregate``, ``pooled``, ``to_json()``, ``to_csv()``, ``to_nnunet_summary()``.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> gts = [np.array([[0, 1], [1, 1]]), np.array([[0, 0], [2, 2]])]
    >>> preds = [np.array([[0, 1], [1, 0]]), np.array([[0, 0], [2, 2]])]
    >>> ds = fse.evaluate_dataset(preds, gts, workers=1)
    >>> round(ds.aggregate[1]["dice"]["mean"], 4), ds.aggregate[1]["dice"]["n"]
    (0.8, 1)
    >>> ds.aggregate[2]["dice"]["mean"]
    1.0
    """
    t0 = time.perf_counter()
    if on_error not in ON_ERROR:
        raise OptionError(f"on_error={on_error!r}: choose one of {', '.join(ON_ERROR)}")
    _check_options(evaluate_options)
    mask = evaluate_options.pop("mask", None)
    M.check_empty(evaluate_options.get("empty", "nan"))
    check_metric_options(
        evaluate_options.get("tversky_alpha", 0.5), evaluate_options.get("tversky_beta", 0.5),
        evaluate_options.get("smooth", 0.0),
    )  # fmt: skip
    names = M.resolve_metrics(evaluate_options.get("metrics"))
    region_list = parse_regions(regions)
    nworkers = check_workers(workers)
    if spacing is not None:
        if "spacing" not in inspect.signature(api.evaluate).parameters:
            raise OptionError("spacing= sets the voxel size for distance metrics, which this version does not compute")
        evaluate_options["spacing"] = spacing
    specs, missing_info, inputs = resolve_cases(preds, gts, cases=cases, missing=missing, mask=mask)
    metric_options = {k: evaluate_options[k] for k in METRIC_OPTIONS if k in evaluate_options}
    metric_options["metrics"] = names
    metric_options.setdefault("background_label", 0)
    kwargs = {k: v for k, v in evaluate_options.items() if k not in METRIC_OPTIONS}
    # per case only counts are kept (the report derives every count metric), and distances (hd95, ...)
    kwargs["metrics"] = ["dice", *(m for m in names if m not in M.METRICS)]
    kwargs["background_label"] = metric_options["background_label"]
    fingerprint = {k: evaluate_options.get(k) for k in COUNT_OPTIONS}
    fingerprint["missing"] = missing
    fingerprint["mask"] = _source(mask, "array") if mask is not None else None
    bnames = kwargs["metrics"][1:]
    if bnames:  # the journal keeps their per-case values: they must be computed the same way
        fingerprint["boundary_metrics"] = bnames
        fingerprint.update({k: _jsonish(evaluate_options.get(k)) for k in BOUNDARY_OPTIONS})
        if region_list:  # distances of a region come from its own surfaces: computed per case
            kwargs["boundary_regions"] = [list(r) for r in region_list]
            fingerprint["boundary_regions"] = [region_key(r) for r in region_list]
    if not isinstance(instances_per_gt, (bool, np.bool_)):
        raise OptionError(f"instances_per_gt must be True or False, got {instances_per_gt!r}")
    if evaluate_options.get("instances"):  # the journal keeps each case's instance figures
        defaults = inspect.signature(api.evaluate).parameters
        inst_opts = {k: _jsonish(kwargs.get(k, defaults[k].default)) for k in INSTANCE_OPTIONS}
        inst_opts["per_gt"] = bool(instances_per_gt)
        fingerprint["instances"] = inst_opts
        if instances_per_gt:
            kwargs["instances_per_gt"] = True
    elif instances_per_gt:
        raise OptionError("instances_per_gt=True keeps the per-instance tables of instances=True: turn that on too")

    records: dict[str, dict[str, Any]] = {}
    if resume is not None:
        arrays = [s.case for s in specs if any(x is not None and _stamp(x) is None for x in (s.pred, s.gt))]
        if arrays:
            raise OptionError(
                f"resume= needs every case given as files or stores (case {arrays[0]} is an array or cannot be "
                "read from disk): a journal can only vouch for inputs it can check for changes"
            )
    journal = Journal(os.fspath(resume), fingerprint) if resume is not None else None
    changed: list[str] = []
    if journal is not None:
        old = journal.load()
        for s in specs:
            r = old.get(s.case)
            if r is None:
                continue
            if r.get("pred") == s.pred_source and r.get("gt") == s.gt_source and r.get("stamp") == _stamps(s):
                records[s.case] = r
            else:
                changed.append(s.case)
    resumed = len(records)
    todo = [s for s in specs if s.case not in records]
    if progress is True:
        bar: CaseProgressBar | None = CaseProgressBar(len(specs), done=resumed)
    elif progress in (False, None):
        bar = None
    elif callable(progress):
        bar = progress(len(specs), resumed)
    else:
        raise OptionError(f"progress must be True, False or a callable (cases, done) -> CaseProgressBar, got {progress!r}")
    failed: list[FailedCase] = []

    def on_done(spec: CaseSpec, rec: dict[str, Any] | None, err: BaseException | None) -> None:
        if err is not None:
            if isinstance(err, (KeyboardInterrupt, SystemExit)) or on_error == "stop":
                raise err
            if not isinstance(err, (FastSegError, OSError, ValueError, RuntimeError, MemoryError)):
                raise err  # a bug, not a bad case
            failed.append(FailedCase(spec.case, spec.pred_source, spec.gt_source, _error_text(err, spec.case)))
        else:
            assert rec is not None
            records[spec.case] = rec
            if journal is not None:
                journal.append(rec)
            if bar is not None and not local:  # cluster tasks report no voxels as they go
                bar.add_voxels(CaseCounts.from_dict(rec["counts"]).n_voxels)
        if bar is not None:
            bar.case_done()

    local = scheduler is None or (isinstance(scheduler, str) and scheduler.strip().lower() in ("threads", "threading"))
    try:
        if todo:
            if local:
                _run_local(todo, kwargs, nworkers, on_done, bar)
            else:
                _run_dask(todo, kwargs, scheduler, on_done)
    finally:
        if journal is not None:
            journal.close()
        if bar is not None:
            bar.close()
    if not records:
        raise InputError(
            f"every case failed ({len(failed)}): " + "; ".join(f.error for f in failed[:3])
            if failed else "no case was evaluated"
        )
    options = {
        **{k: _jsonish(evaluate_options.get(k)) for k in COUNT_OPTIONS},
        "mask": inputs.get("mask"),
        "missing": missing,
        "regions": [region_key(r) for r in region_list],
        "geometry_check": bool(evaluate_options.get("geometry_check", True)),
        "on_error": on_error,
        **{k: _jsonish(v) for k, v in metric_options.items() if k != "per_class_limit"},
    }
    if "instances" in fingerprint:
        fi = fingerprint["instances"]
        options.update(
            instances=True, iou_threshold=fi["iou_threshold"], connectivity=fi["connectivity"],
            instances_per_gt=fi["per_gt"],
        )  # fmt: skip
    ds = build_dataset_result(
        list(records.values()),
        labels=_fixed_labels(evaluate_options),
        regions=region_list,
        metric_options=metric_options,
        options=options,
        inputs=inputs,
        label_names=label_names,
        failed=sorted(failed, key=lambda f: f.case),
        missing_cases=missing_info,
        warnings_=_dataset_warnings(records, missing_info),
    )
    ds.timing = {
        "seconds": time.perf_counter() - t0,
        "cases": len(records),
        "resumed": resumed,
        "changed_since_journal": changed,
        "workers": nworkers,
    }
    return ds


def _fixed_labels(options: Mapping[str, Any]) -> list[int] | None:
    if options.get("labels") is not None:
        return [int(x) for x in options["labels"]]
    k = options.get("num_classes")
    return list(range(int(k))) if k is not None else None


def _jsonish(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    return x


def _error_text(e: BaseException, case: str) -> str:
    if isinstance(e, FastSegError):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return text if text.startswith(f"case {case}: ") else f"case {case}: {text}"


def _dataset_warnings(records: Mapping[str, Mapping[str, Any]], missing: Mapping[str, Any]) -> list[str]:
    out = []
    if missing:
        for side, what in (("pred", "prediction"), ("gt", "ground truth")):
            ids = list(missing.get(side) or [])
            if ids:
                verb = {"skip": "left out", "empty": "scored as all background" if side == "pred" else "left out"}.get(
                    missing.get("policy", ""), "left out"
                )
                out.append(f"{len(ids)} case(s) without a {what} {verb}: {_first(ids)}")
    nwarn = sum(1 for r in records.values() if r.get("warnings"))
    if nwarn:
        out.append(f"{nwarn} case(s) have warnings of their own (per case in the JSON report)")
    return out


def summary_line(ds: DatasetResult) -> str:
    """One line for stderr: cases, resumed, failed, time."""
    t = ds.timing
    parts = [f"{len(ds.per_case)} cases"]
    if t.get("resumed"):
        parts.append(f"{t['resumed']} resumed from the journal")
    if ds.failed_cases:
        parts.append(f"{len(ds.failed_cases)} failed")
    if t.get("seconds") is not None:
        parts.append(f"{t['seconds']:.1f} s")
    return ", ".join(parts)


__all__ = ["evaluate_dataset", "CaseProgressBar", "Journal", "resolve_cases", "list_cases", "is_case_folder"]
