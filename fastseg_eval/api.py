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
from fastseg_eval.errors import FastSegError, OptionError
from fastseg_eval.io.volume import Volume, check_chunks, check_volumes, open_volume
from fastseg_eval.memory import check_label_space
from fastseg_eval.metrics import formulas as M
from fastseg_eval.progress import ProgressBar
from fastseg_eval.reducers.backends import resolve_backend
from fastseg_eval.reducers.confusion import DENSE_MAX, ConfusionCounts
from fastseg_eval.reducers.probability import check_bins, make_spec, scale_mistake
from fastseg_eval.report.result import (
    PER_CLASS_LIMIT,
    EvaluationResult,
    check_metric_options,
    result_from_counts,
)

log = logging.getLogger("fastseg_eval")

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
) -> RunStats:
    """Count ``pred`` against ``gt`` (optionally under ``mask``) into ``acc`` in one pass.

    ``acc`` changes only if the whole run succeeds. ``backend`` is a resolved backend name
    (``"cpu"`` or ``"cuda"``); arrays already on a GPU are counted there in place.
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
    return run_reducers([reducer], (pv, gv, mv), workers=workers, scheduler=scheduler, progress=progress)


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
    check_chunks((pv, gv, mv), 1 if scheduler is not None else nworkers, memory_limit)
    _check_label_space(num_classes, labels, nworkers, DENSE_MAX, memory_limit)
    acc = ConfusionMatrix(
        num_classes, labels=labels, ignore_label=ignore_label, probability=spec, channel_axis=axis,
        memory_limit=False,
    )  # fmt: skip
    total = int(np.prod(gv.shape, dtype=np.int64))
    bar = _progress(progress, total)
    try:
        stats = count_into(
            acc,
            None,
            None,
            workers=nworkers,
            scheduler=scheduler,
            progress=bar,
            volumes=(pv, gv, mv),
            backend=chosen,
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
    return result_from_counts(
        acc,
        metrics=names, tversky_alpha=tversky_alpha, tversky_beta=tversky_beta, smooth=smooth, empty=empty,
        background_label=background_label, label_names=label_names, inputs=inputs, options=options,
        timing=timing, per_class_limit=per_class_limit,
    )  # fmt: skip


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
    count_into(acc, None, None, workers=nworkers, volumes=(pv, gv, mv), backend=chosen)
    if not acc.is_dense:
        raise FastSegError(
            f"{acc.num_classes} distinct labels: more than {CONFUSION_MATRIX_MAX}, too many for a dense matrix; "
            "use evaluate(), which keeps the diagonal and marginals"
        )
    return acc.counts
