"""The public entry points: :func:`evaluate`, :func:`confusion_matrix` and :class:`ConfusionMatrix`.

A thin shell over the layers below: open the inputs (:mod:`fastseg_eval.io`), build the
reducers a run needs (:mod:`fastseg_eval.reducers`: the confusion counts on the CPU or the GPU),
run them in one pass (:mod:`fastseg_eval.engine`) and derive the report
(:mod:`fastseg_eval.report`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastseg_eval.engine import RunStats, check_workers, run_reducers
from fastseg_eval.errors import FastSegError, InputError, OptionError, option
from fastseg_eval.io.components import check_components_memory, check_connectivity, label_components
from fastseg_eval.io.geometry import check_geometry
from fastseg_eval.io.volume import ROLES as ROLE_NAMES
from fastseg_eval.io.volume import Volume, check_chunks, check_volumes, open_volume
from fastseg_eval.memory import check_label_space
from fastseg_eval.metrics import boundary as B
from fastseg_eval.metrics import formulas as M
from fastseg_eval.metrics import instances as I
from fastseg_eval.progress import ProgressBar
from fastseg_eval.reducers.backends import resolve_backend
from fastseg_eval.reducers.confusion import DENSE_MAX, ConfusionCounts
from fastseg_eval.reducers.contingency import ContingencyCounts, ContingencyTable
from fastseg_eval.reducers.probability import check_bins, make_spec, scale_mistake
from fastseg_eval.reducers.surface import SurfaceDistances, finish_distances
from fastseg_eval.report.result import (
    PER_CLASS_DICT_MAX,
    PER_CLASS_LIMIT,
    EvaluationResult,
    check_metric_options,
    result_from_counts,
)

log = logging.getLogger("fastseg_eval")

_SAME: Any = object()  # evaluate(background=...) not given: it is background_label

CONFUSION_MATRIX_MAX = 4096
"""Largest label count :func:`confusion_matrix` returns as a dense table (128 MiB of int64)."""


def _open_all(pred, gt, mask, *, pred_key, gt_key, mask_key, level, storage_options):
    pv = open_volume(pred, "pred", key=pred_key, level=level, storage_options=storage_options)
    gv = open_volume(gt, "gt", key=gt_key, level=level, storage_options=storage_options)
    mv = None
    if mask is not None:
        mv = open_volume(mask, "mask", key=mask_key, level=level, storage_options=storage_options)
    return pv, gv, mv


class ConfusionMatrix(ConfusionCounts):
    __doc__ = ConfusionCounts.__doc__

    def update(self, pred: Any, gt: Any, mask: Any = None, **engine_options: Any) -> ConfusionMatrix:
        """Add the counts of one batch (prediction first, ground truth second).

        Accepts what :func:`fastseg_eval.evaluate` accepts: numpy arrays (and array-likes such as
        CPU tensors), dask arrays, zarr arrays and zarr paths. Keyword options: ``workers``,
        ``scheduler``, ``progress``, ``backend``. Returns ``self``.
        """
        count_into(self, pred, gt, mask, **engine_options)
        return self

    def result(self, **options: Any) -> EvaluationResult:
        """Metrics of the counts so far: an :class:`~fastseg_eval.report.result.EvaluationResult`.

        Keyword options are those of :func:`fastseg_eval.evaluate` that act on the matrix
        (``tversky_alpha``, ``tversky_beta``, ``smooth``, ``empty``, ``label_names``, ...).
        """
        return result_from_counts(self, **options)


def count_into(
    acc: ConfusionCounts,
    pred: Any,
    gt: Any,
    mask: Any = None,
    *,
    workers: int | None = None,
    scheduler: Any = None,
    progress: Any = None,
    volumes: tuple[Volume, Volume, Volume | None] | None = None,
    backend: str = "cpu",
    also: Sequence[Any] = (),
) -> RunStats:
    """Count ``pred`` against ``gt`` (optionally under ``mask``) into ``acc`` in one pass.

    ``acc`` changes only if the whole run succeeds. ``backend`` is a resolved backend name
    (``"cpu"`` or ``"cuda"``); arrays already on a GPU are counted there in place. ``also``:
    more reducers (e.g. surface distances) run in the same pass.
    """
    if volumes is None:
        pv, gv = open_volume(pred, "pred"), open_volume(gt, "gt")
        mv = None if mask is None else open_volume(mask, "mask")
        if acc.channel_axis is not None:
            pv.channel_axis = acc.channel_axis % max(len(pv.shape), 1)
        check_volumes(pv, gv, mv, pred_shape=pv.spatial_shape if acc.probability is not None else None)
    else:
        pv, gv, mv = volumes
    if any(v is not None and v.kind == "cuda" for v in (pv, gv, mv)):
        return _count_on_device(acc, pv, gv, mv, backend)
    reducer: Any = acc
    if backend == "cuda":
        from fastseg_eval.reducers.cuda import CudaConfusion

        reducer = CudaConfusion(acc)
    return run_reducers([reducer, *also], (pv, gv, mv), workers=workers, scheduler=scheduler, progress=progress)


def _count_on_device(acc: ConfusionCounts, pv: Volume, gv: Volume, mv: Volume | None, backend: str) -> RunStats:
    """Arrays already on the GPU: one CUDA count in place, no chunking and no copy to the host."""
    import time

    if backend != "cuda":
        raise OptionError(
            "the inputs include arrays already on the GPU: use backend='cuda' (or 'auto'), "
            "or copy them to the host first"
        )
    if acc.probability is not None:
        raise OptionError("probability maps on the GPU are not supported yet; copy them to the host first")
    from fastseg_eval.reducers.cuda import count_device

    t0 = time.perf_counter()
    count_device(pv.array, gv.array, acc, mask=None if mv is None else mv.array)
    n = int(np.prod(gv.shape, dtype=np.int64))
    return RunStats(engine="device", workers=1, units=1, seconds=time.perf_counter() - t0, voxels=n)


def _device_backend(requested: str, chosen: str, vols: tuple) -> str:
    """ "auto" with arrays already on a GPU means the CUDA backend."""
    if requested == "auto" and chosen == "cpu" and any(v is not None and v.kind == "cuda" for v in vols):
        return resolve_backend("cuda")
    return chosen


def _check_label_space(num_classes: Any, labels: Any, workers: int, dense_max: int, memory_limit: Any) -> None:
    """Refuse a fixed label space whose per-worker tables and report exceed the memory budget."""
    if labels is not None:
        k = len(labels)
    elif isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool) and num_classes > 0:
        k = int(num_classes)
    else:
        return  # discovered labels, or a bad num_classes that ConfusionMatrix reports
    check_label_space(k, workers=workers, dense_max=dense_max, memory_limit=memory_limit)


def _plain(x: Any) -> Any:
    """A zarr fill value as a JSON-ready Python value."""
    return x.item() if isinstance(x, np.generic) else x


def _progress(progress: Any, total: int):
    if progress is True:
        return ProgressBar(total)
    if progress in (False, None):
        return None
    if callable(progress):
        return progress
    raise OptionError(f"progress must be True, False or a callable taking a voxel count, got {progress!r}")


def evaluate(
    pred: Any,
    gt: Any,
    num_classes: int | None = None,
    *,
    labels: Sequence[int] | None = None,
    ignore_label: int | None = None,
    mask: Any = None,
    threshold: float | None = None,
    channel_axis: int | None = None,
    thresholds: int | None = None,
    prob_scale: float | None = None,
    tversky_alpha: float = 0.5,
    tversky_beta: float = 0.5,
    smooth: float = 0.0,
    empty: str = "nan",
    backend: str = "auto",
    workers: int | None = None,
    scheduler: Any = None,
    progress: Any = False,
    metrics: Sequence[str] | str | None = None,
    label_names: Mapping[int, str] | None = None,
    background_label: int | None = 0,
    pred_key: str | None = None,
    gt_key: str | None = None,
    mask_key: str | None = None,
    level: int | str | None = None,
    storage_options: dict[str, Any] | None = None,
    memory_limit: int | str | None = None,
    per_class_limit: int | None = PER_CLASS_LIMIT,
    geometry_check: bool = True,
    spacing: Sequence[float] | float | None = None,
    surface: str = "deepmind",
    hd_percentile: float = 95,
    nsd_tolerance: float = 1.0,
    empty_distance: float | None = None,
    instances: bool = False,
    iou_threshold: float = 0.5,
    connectivity: int | None = None,
    background: Any = _SAME,
) -> EvaluationResult:
    """Evaluate a segmentation against ground truth in one pass over the data.

    Parameters
    ----------
    pred, gt : array-like, dask array, zarr array, or path / URL of a zarr store
        Prediction first, ground truth second. Paths may address a node inside a store
        (``"seg.zarr/labels/cells"``), a ``.zip`` store, or an OME-Zarr image; stores are
        opened read-only.
    num_classes : int, optional
        Labels are ``0 .. num_classes - 1``; any other value raises :class:`LabelError`.
    labels : sequence of int, optional
        The labels, in the order the matrix follows. Without ``num_classes`` and ``labels``
        the labels present in either volume are discovered in the same pass, sorted.
    ignore_label : int, optional
        Ground-truth value whose voxels are skipped entirely (reported as ``n_ignored``).
    mask : array-like or path, optional
        Count only voxels where the mask is nonzero.
    threshold : float, optional
        ``pred`` is a binary probability map: a voxel is predicted label 1 iff ``p > threshold``
        (default 0.5 when ``thresholds`` or ``prob_scale`` is given without it).
    channel_axis : int, optional
        ``pred`` holds one probability per class along this axis (which may be chunked); the
        predicted label is the argmax (first channel on ties).
    thresholds : int, optional
        Also sweep the threshold in the same pass, with this many bins (e.g. 1000): per-class
        TP/FP/FN/TN exact for "p > i / B", ROC AUC, average precision, best Dice / IoU
        threshold, in ``result.curves``.
    prob_scale : float, optional
        ``pred`` holds integers meaning ``value / prob_scale`` (e.g. 255 for uint8 maps).
    tversky_alpha, tversky_beta : float
        Tversky index ``TP / (TP + alpha FP + beta FN)``: alpha weights false positives.
    smooth : float
        Added to numerator and denominator of dice, iou and tversky.
    empty : {"nan", "zero", "one"}
        Value of a metric whose denominator is zero. Means skip NaN.
    backend : {"auto", "cpu", "cuda"}
    workers : int, optional
        Threads reading and counting chunks (default: the CPUs available).
    scheduler : optional
        Run as a dask graph: a ``distributed.Client`` or cluster, an address ``"tcp://host:port"``,
        ``"local:N"`` (a LocalCluster of N worker processes for this run), ``"distributed"`` (the
        current client), or a local dask scheduler name (``"threads"``, ``"processes"``,
        ``"synchronous"``); see :mod:`fastseg_eval.engine.cluster`. Workers open zarr stores
        themselves; only small count arrays travel back.
    progress : bool or callable
        ``True`` draws a progress bar on stderr; a callable receives voxel counts as units finish.
    metrics : list of str, optional
        Metric names or aliases to report (default: all).
    label_names : mapping, optional
        Names shown beside labels in reports.
    background_label : int or None
        Label left out of ``foreground_mean`` and ``micro`` (default 0).
    pred_key, gt_key, mask_key, level, storage_options
        Where to find the array inside a store, which OME-Zarr level (default: full
        resolution), and fsspec options for remote URLs.
    memory_limit : int or str, optional
        Memory budget for the label space (bytes or ``"8G"``): a ``num_classes`` / ``labels`` whose
        count tables (one per worker) and report would exceed it is refused before counting.
        Default: the environment variable ``FASTSEG_MEMORY_LIMIT``, else half the available memory.
    per_class_limit : int or None
        Most labels the reports (JSON, CSV, table) list one by one (default 10,000); past it they
        keep the labels that occur, largest first. ``None`` or 0: every label.
        ``result.per_class`` answers for every label either way.
    geometry_check : bool
        Refuse inputs whose headers (NIfTI, ITK, TIFF, HDF5 spacing / origin / direction) say they
        do not lie on the same grid (see :mod:`fastseg_eval.io.geometry`). Default True.
    spacing : (float, float, float) or float, optional
        Physical voxel size (z, y, x) for the boundary metrics; default: the inputs' own (NIfTI
        header, OME-Zarr scale of the level read), else 1.0. The report says which.
    surface : {"deepmind", "monai", "medpy"}
        Convention of the boundary metrics (``hd``, ``hd95``, ``assd``, ``masd``, ``nsd``, computed
        only when named in ``metrics``): DeepMind's surfels and areas (default), or MONAI's /
        MedPy's surface voxels; see :mod:`fastseg_eval.metrics.boundary`.
    hd_percentile : float
        Percentile of ``hd95`` (default 95).
    nsd_tolerance : float
        Tolerance of ``nsd`` in physical units (default 1.0).
    empty_distance : float, optional
        Distance reported instead of ``inf`` for a label present in one volume only.
    instances : bool
        Also compute the instance metrics in the same pass (``result.instances``): the sparse
        contingency table of the ids (:func:`contingency`), VOI split / merge (bits), adapted
        Rand error with its precision and recall, matching at IoU > ``iou_threshold``, instance
        precision / recall / F1, PQ / SQ / RQ and one row per ground-truth instance; see
        :mod:`fastseg_eval.metrics.instances`. ``background_label`` is left out of matching
        (None: every id is an instance).
    iou_threshold : float
        A gt and a pred instance match when their IoU is above this (default 0.5, which makes
        the matching unique; below 0.5 the matching is greedy, highest IoU first).
    connectivity : {6, 18, 26} or {4, 8}, optional
        The inputs are semantic masks (a class per voxel): label each class's connected
        components as instances first, with this neighbourhood (26 the usual choice in 3-D).
        Needs ``instances=True``, the whole volumes in memory (refused beyond the memory
        budget) and the connected-components-3d package (``pip install 'fastseg-eval[instances]'``).
    background : int or None
        Another name for ``background_label`` (the name the instance metrics use).

    Returns
    -------
    EvaluationResult
        ``confusion_matrix`` (rows = ground truth, columns = prediction), ``per_class``, means,
        ``overall``, warnings and timing; ``to_json()`` / ``to_csv()`` write reports.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> gt = np.array([[0, 0, 1], [1, 2, 2]])
    >>> pred = np.array([[0, 1, 1], [1, 2, 0]])
    >>> res = fse.evaluate(pred, gt, num_classes=3)
    >>> res.confusion_matrix.tolist()
    [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    >>> round(res.per_class[1]["dice"], 4)
    0.8
    """
    M.check_empty(empty)
    check_metric_options(tversky_alpha, tversky_beta, smooth)
    names = M.resolve_metrics(metrics)
    background_label = _background(background_label, background)
    _check_instance_options(instances, iou_threshold, connectivity)
    bnames = [n for n in names if B.is_boundary(n)]
    if bnames:
        pct, tol, empty_d, given_spacing = B.check_boundary_options(
            bnames, surface=surface, spacing=spacing, hd_percentile=hd_percentile,
            nsd_tolerance=nsd_tolerance, empty_distance=empty_distance,
        )  # fmt: skip
    nworkers = check_workers(workers)
    chosen = resolve_backend(backend)
    check_bins(thresholds)
    pv, gv, mv = _open_all(
        pred, gt, mask, pred_key=pred_key, gt_key=gt_key, mask_key=mask_key, level=level,
        storage_options=storage_options,
    )  # fmt: skip
    chosen = _device_backend(backend, chosen, (pv, gv, mv))
    spec, axis = make_spec(
        pv.dtype, len(pv.shape), len(gv.shape), pv.shape, threshold=threshold, channel_axis=channel_axis,
        thresholds=thresholds, prob_scale=prob_scale, num_classes=num_classes, labels=labels,
    )  # fmt: skip
    pv.channel_axis = axis
    check_volumes(pv, gv, mv, pred_shape=pv.spatial_shape if spec is not None else None)
    if geometry_check:
        check_geometry(pv, gv, mv)
    check_chunks((pv, gv, mv), 1 if scheduler is not None else nworkers, memory_limit)
    _check_label_space(num_classes, labels, nworkers, DENSE_MAX, memory_limit)
    acc = ConfusionMatrix(
        num_classes, labels=labels, ignore_label=ignore_label, probability=spec, channel_axis=axis,
        memory_limit=False,
    )  # fmt: skip
    surf = None
    if bnames:
        sp, sp_from = _boundary_spacing(given_spacing, pv, gv)
        _check_boundary_inputs(pv, gv, mv, spec, ignore_label)
        skip = tuple(x for x in (background_label,) if x is not None)
        surf = SurfaceDistances(B.SURFACE_POINTS[surface], sp, skip)
    ct = _instance_reducer(instances, connectivity, pv, gv, mv, spec, ignore_label, memory_limit)
    total = int(np.prod(gv.shape, dtype=np.int64))
    bar = _progress(progress, total)
    try:
        stats = count_into(
            acc,
            None,
            None,
            workers=workers,  # None: the engine picks (one thread for small in-memory runs)
            scheduler=scheduler,
            progress=bar,
            volumes=(pv, gv, mv),
            backend=chosen,
            also=[r for r in (surf, ct) if r is not None],
        )
    finally:
        if isinstance(bar, ProgressBar):
            bar.close()
    mistake = scale_mistake(spec, acc.largest_probability)  # e.g. prob_scale=255 on a map already in [0, 1]
    if mistake:
        raise OptionError(mistake)
    inputs = {"pred": pv.describe(), "gt": gv.describe(), "mask": None if mv is None else mv.describe()}
    for v in (pv, gv, mv):
        missing = None if v is None else v.missing_chunks()
        if missing is not None:  # never-written chunks read as the fill value (zarr semantics)
            inputs[v.role]["chunks_missing"] = missing[0]
            inputs[v.role]["fill_value"] = _plain(v.array.fill_value)
    timing = {
        "seconds": stats.seconds,
        "voxels_per_second": stats.voxels / stats.seconds if stats.seconds > 0 else None,
        "backend": chosen,
        "engine": stats.engine,
        "workers": stats.workers,
        "units": stats.units,
        "chunks_decoded": stats.chunks_decoded,
        "chunks_total": stats.chunks_total,
    }
    options = {
        "num_classes": acc.config[0],
        "labels": None if labels is None else [int(x) for x in labels],
        "mask": None if mv is None else mv.source,
        "prediction": "labels" if spec is None else spec.mode,
    }
    if spec is not None:
        options.update(
            threshold=spec.threshold if spec.mode == "threshold" else None,
            channel_axis=axis,
            prob_scale=spec.scale,
            thresholds=spec.bins or None,
        )
    boundary = None
    if surf is not None:
        import time

        t0 = time.perf_counter()
        distances = finish_distances(surf, gv, pv)  # far points: a sparse second look at the inputs
        boundary = B.boundary_columns(
            distances, acc.labels, bnames, surface=surface, spacing=sp, hd_percentile=pct,
            nsd_tolerance=tol, empty_distance=empty_d, skip=skip,
        )  # fmt: skip
        timing["boundary_far_seconds"] = time.perf_counter() - t0
        timing["seconds"] = stats.seconds + timing["boundary_far_seconds"]
        options.update(
            surface=surface, spacing=list(sp), spacing_from=sp_from, hd_percentile=pct, nsd_tolerance=tol,
            empty_distance=empty_d, boundary_labels="every label" if not skip else f"all but {skip[0]}",
            boundary_reach=surf.reach, boundary_far_points=surf.far_count(),
        )  # fmt: skip
    inst = None
    if instances:
        inst = _instance_metrics(
            ct, pv, gv, mv, connectivity=connectivity, iou_threshold=iou_threshold,
            background=background_label, ignore_label=ignore_label, workers=nworkers, timing=timing,
        )  # fmt: skip
        options.update(instances=True, iou_threshold=float(iou_threshold), connectivity=connectivity)
    res = result_from_counts(
        acc,
        metrics=names, tversky_alpha=tversky_alpha, tversky_beta=tversky_beta, smooth=smooth, empty=empty,
        background_label=background_label, label_names=label_names, inputs=inputs, options=options,
        timing=timing, per_class_limit=per_class_limit, boundary=boundary,
    )  # fmt: skip
    if inst is not None:
        res.instances = inst
        res.warnings.extend(_instance_warnings(inst))
    return res


# ------------------------------------------------------------------------------ instances
def _background(background_label: Any, background: Any) -> Any:
    """``background`` is another name for ``background_label``; both given must agree."""
    if background is _SAME:
        return background_label
    if background_label not in (0, background):
        raise OptionError(
            f"{option('background', background)} and {option('background_label', background_label)} name the "
            "same thing; pass one of them"
        )
    return background


def _check_instance_options(instances: Any, iou_threshold: Any, connectivity: Any) -> None:
    if not isinstance(instances, (bool, np.bool_)):
        raise OptionError(f"{option('instances')} must be True or False, got {instances!r}")
    I.check_iou_threshold(iou_threshold)
    check_connectivity(connectivity)
    if connectivity is not None and not instances:
        raise OptionError(
            f"{option('connectivity', connectivity)} labels connected components for the instance metrics: "
            f"turn them on with {option('instances')}"
        )


def _instance_reducer(
    instances: bool, connectivity: Any, pv: Volume, gv: Volume, mv: Volume | None, spec: Any,
    ignore_label: Any, memory_limit: Any,
) -> ContingencyCounts | None:  # fmt: skip
    """The contingency reducer of the pass (instance ids), or None (not asked, or components
    labelled after the pass); refuses what instance metrics cannot use, before the pass."""
    if not instances:
        return None
    if spec is not None:
        raise OptionError(
            "instance metrics need label volumes (ids or classes), not probability maps: threshold or argmax them first"
        )
    for v in (pv, gv):
        if v.dtype.kind not in "iub":
            raise InputError(f"{v.role} has dtype {v.dtype}: instance ids must be integers")
        if v.kind == "cuda":
            raise OptionError("instance metrics count on the host: copy GPU arrays to the host first")
    if connectivity is not None:
        check_connectivity(connectivity, len(gv.shape))
        check_components_memory([pv, gv], memory_limit)
        return None
    return ContingencyCounts(ignore_label)


def _instance_metrics(
    ct: ContingencyCounts | None, pv: Volume, gv: Volume, mv: Volume | None, *, connectivity: Any,
    iou_threshold: float, background: Any, ignore_label: Any, workers: int, timing: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """``result.instances``: from the pass's contingency table, or from connected components
    labelled in memory and counted in a second (in-memory) pass."""
    import time

    t0 = time.perf_counter()
    gt_class = pred_class = None
    if connectivity is not None:
        g_ids, gt_class, ignore_id = label_components(gv, connectivity, background=background, ignore_label=ignore_label)
        p_ids, pred_class, _ = label_components(pv, connectivity, background=background)
        cc_vols = (Volume("pred", "pred components", "numpy", p_ids), Volume("gt", "gt components", "numpy", g_ids), mv)
        ct = ContingencyCounts(ignore_id)
        run_reducers([ct], cc_vols, workers=workers)  # type: ignore[arg-type]
    semantic_background = background
    if connectivity is not None and background is not None:
        background = 0  # components: id 0 holds the background class
    assert ct is not None
    table = ct.table()
    out = I.instance_metrics(
        *table.raw(), iou_threshold=iou_threshold, background=background, gt_class=gt_class, pred_class=pred_class
    )
    if len(out["per_gt"]) <= PER_CLASS_DICT_MAX:  # a plain list of dicts (JSON-ready) unless very long
        out["per_gt"] = list(out["per_gt"])
    out["n_pairs"] = len(table)
    if connectivity is not None:
        out["connectivity"] = int(connectivity)
        out["background"] = semantic_background  # the class left out, as the user named it
    timing["instances_seconds"] = time.perf_counter() - t0
    return out


def _instance_warnings(inst: dict[str, Any]) -> list[str]:
    out = []
    if inst["n_gt"] == 0 and inst["n_pred"] == 0:
        out.append("no instance in either volume (only background): the matching figures are undefined")
    elif inst.get("matching") == "greedy":
        out.append(
            f"iou_threshold {inst['iou_threshold']:g} < 0.5: an instance may overlap several others above it, so "
            "matches were chosen greedily (highest IoU first; ties: smaller pred id, then smaller gt id)"
        )
    return out


def contingency(
    pred: Any,
    gt: Any,
    *,
    ignore_label: int | None = None,
    mask: Any = None,
    workers: int | None = None,
    scheduler: Any = None,
    progress: Any = False,
    pred_key: str | None = None,
    gt_key: str | None = None,
    mask_key: str | None = None,
    level: int | str | None = None,
    storage_options: dict[str, Any] | None = None,
    memory_limit: int | str | None = None,
) -> ContingencyTable:
    """The sparse contingency table of two id volumes, in one pass: ``counts[k]`` voxels have
    ground-truth id ``gt_ids[k]`` and predicted id ``pred_ids[k]`` (rows = ground truth).

    Ids may be any integers (uint64 up to 2**64 - 1 included; negative ids are refused); memory
    follows the number of distinct (gt, pred) pairs, not the volume or the largest id. Each
    worker (thread, dask task) fills a hash table of its own; partial tables merge exactly.
    Inputs, ``ignore_label`` (gt voxels skipped), ``mask``, ``workers``, ``scheduler`` and
    ``progress`` are as in :func:`evaluate`.

    Returns
    -------
    ContingencyTable
        ``gt_ids``, ``pred_ids`` (sorted by gt id, then pred id), ``counts`` (int64);
        ``to_scipy()``, ``n_ignored``, ``n_masked``; picklable, ``merge()`` adds tables.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> gt = np.array([[1, 1, 2], [2, 2, 0]], dtype=np.uint64)
    >>> pred = np.array([[7, 7, 7], [9, 9, 0]], dtype=np.uint64)
    >>> ct = fse.contingency(pred, gt)
    >>> [(int(g), int(p), int(c)) for g, p, c in zip(ct.gt_ids, ct.pred_ids, ct.counts)]
    [(0, 0, 1), (1, 7, 2), (2, 7, 1), (2, 9, 2)]
    """
    nworkers = check_workers(workers)
    pv, gv, mv = _open_all(
        pred, gt, mask, pred_key=pred_key, gt_key=gt_key, mask_key=mask_key, level=level,
        storage_options=storage_options,
    )  # fmt: skip
    check_volumes(pv, gv, mv)
    check_chunks((pv, gv, mv), 1 if scheduler is not None else nworkers, memory_limit)
    ct = _instance_reducer(True, None, pv, gv, mv, None, ignore_label, memory_limit)
    assert ct is not None
    bar = _progress(progress, int(np.prod(gv.shape, dtype=np.int64)))
    try:
        run_reducers([ct], (pv, gv, mv), workers=workers, scheduler=scheduler, progress=bar)
    finally:
        if isinstance(bar, ProgressBar):
            bar.close()
    return ct.table()


def _boundary_spacing(given: Any, pv: Volume, gv: Volume) -> tuple[tuple[float, float, float], str]:
    """The spacing of the boundary metrics and where it came from."""
    if given is not None:
        return given, "given"
    for v in (gv, pv):
        sp = getattr(v, "spacing", None)
        if sp is not None and len(sp) == 3:
            where = getattr(v, "geometry_source", None) or "input metadata"
            return B.check_spacing(sp), f"{where} of {ROLE_NAMES[v.role]}"  # type: ignore[return-value]
    return (1.0, 1.0, 1.0), "default 1.0 (no spacing in the inputs)"


def _check_boundary_inputs(pv: Volume, gv: Volume, mv: Volume | None, spec: Any, ignore_label: Any) -> None:
    """Boundary metrics are defined here for 3-D label volumes without mask or ignore label."""
    what = None
    if len(gv.shape) != 3:
        what = f"3-D volumes (these have {len(gv.shape)} dimensions)"
    elif spec is not None:
        what = "label volumes (not probability maps): threshold or argmax them first"
    elif mv is not None or ignore_label is not None:
        what = "volumes without a mask or ignore label (no peer library defines surfaces under one)"
    elif any(v.kind == "cuda" for v in (pv, gv)):
        what = "arrays on the host (copy GPU arrays to the host first)"
    if what is not None:
        raise OptionError(f"boundary metrics (hd, hd95, assd, masd, nsd) need {what}")


def confusion_matrix(
    pred: Any,
    gt: Any,
    num_classes: int | None = None,
    *,
    ignore_label: int | None = None,
    mask: Any = None,
    backend: str = "auto",
    labels: Sequence[int] | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """The int64 confusion matrix: ``cm[i, j]`` = voxels with ground-truth label i predicted as j.

    Rows and columns are ``0 .. num_classes - 1`` when ``num_classes`` is given, ``labels`` when
    given, else the sorted labels present in either volume (without the ignore label).

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> fse.confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), num_classes=2).tolist()
    [[1, 1], [0, 1]]
    """
    chosen = resolve_backend(backend)
    nworkers = check_workers(workers)
    k = num_classes if num_classes is not None else (len(labels) if labels is not None else None)
    if k is not None and k > CONFUSION_MATRIX_MAX:
        raise OptionError(
            f"a dense {k} x {k} matrix would need {8 * k * k / 2**30:.1f} GiB; use evaluate(), which keeps "
            "the diagonal and marginals for large label spaces"
        )
    dense_max = max(DENSE_MAX, k or 0) if k is not None else CONFUSION_MATRIX_MAX
    acc = ConfusionMatrix(num_classes, labels=labels, ignore_label=ignore_label, dense_max=dense_max)
    pv, gv, mv = _open_all(
        pred, gt, mask, pred_key=None, gt_key=None, mask_key=None, level=None, storage_options=None
    )
    check_volumes(pv, gv, mv)
    check_chunks((pv, gv, mv), nworkers)
    chosen = _device_backend(backend, chosen, (pv, gv, mv))
    count_into(acc, None, None, workers=workers, volumes=(pv, gv, mv), backend=chosen)
    if not acc.is_dense:
        raise FastSegError(
            f"{acc.num_classes} distinct labels: more than {CONFUSION_MATRIX_MAX}, too many for a dense matrix; "
            "use evaluate(), which keeps the diagonal and marginals"
        )
    return acc.counts
