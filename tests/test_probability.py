"""Probability maps: threshold, argmax over a (chunked) channel axis, and the threshold sweep.

References are numpy (thresholding, argmax, bincount) and scikit-learn (roc_curve,
precision_recall_curve, roc_auc_score, average_precision_score).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

import fastseg_eval as fse


def cm_ref(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(
        gt.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(), minlength=k * k
    ).reshape(k, k)


def binary_case(shape=(13, 17, 19), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    gt = (rng.random(shape) < 0.3).astype(np.uint8)
    p = np.clip(gt * 0.3 + rng.random(shape) * 0.7, 0, 1).astype(dtype)
    return gt, p


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.9])
def test_threshold_is_strictly_greater(dtype, threshold):
    gt, p = binary_case(dtype=dtype)
    p.ravel()[:50] = dtype(threshold)  # values exactly at the threshold are negative
    res = fse.evaluate(p, gt, threshold=threshold)
    want = cm_ref(gt, (p.astype(np.float64) > threshold).astype(np.uint8), 2)
    assert res.confusion_matrix.tolist() == want.tolist()
    assert res.options["prediction"] == "threshold" and res.options["threshold"] == threshold


def test_uint8_scaled_probabilities():
    gt, p = binary_case()
    u8 = np.round(p * 255).astype(np.uint8)
    res = fse.evaluate(u8, gt, threshold=0.5, prob_scale=255)
    want = cm_ref(gt, (u8 / 255.0 > 0.5).astype(np.uint8), 2)
    assert res.confusion_matrix.tolist() == want.tolist()
    with pytest.raises(fse.OptionError, match="prob_scale"):
        fse.evaluate(u8, gt, threshold=0.5)


def test_threshold_with_mask_and_ignore_and_zarr(tmp_path):
    gt, p = binary_case(shape=(20, 21, 22), seed=1)
    gt = gt.astype(np.int16)
    gt[:3] = -1
    mask = np.random.default_rng(2).random(gt.shape) < 0.7
    p[~mask] = np.nan  # never read: masked out
    zp = zarr.create_array(tmp_path / "p.zarr", shape=p.shape, chunks=(7, 8, 9), dtype=p.dtype)
    zp[:] = p
    res = fse.evaluate(str(tmp_path / "p.zarr"), gt, threshold=0.4, ignore_label=-1, mask=mask, thresholds=20)
    sel = mask & (gt != -1)
    want = cm_ref(gt[sel], (p[sel] > 0.4).astype(np.uint8), 2)
    assert res.confusion_matrix.tolist() == want.tolist()
    c = res.curves["1"]
    for t, tp, fp in zip(c["thresholds"], c["tp"], c["fp"]):
        assert tp == int(np.sum((p[sel] > t) & (gt[sel] == 1)))
        assert fp == int(np.sum((p[sel] > t) & (gt[sel] == 0)))


@pytest.mark.parametrize("axis", [0, -1, 1])
def test_argmax_equals_numpy_with_chunked_channel_axis(tmp_path, axis):
    rng = np.random.default_rng(3)
    k, spatial = 4, (9, 10, 11)
    probs = rng.random((k, *spatial)).astype(np.float32)
    probs[:, 0, 0, :4] = 0.25  # exact ties: the first channel wins, as in numpy
    probs = np.moveaxis(probs, 0, axis)
    gt = rng.integers(0, k, spatial).astype(np.uint8)
    chunks = list(np.moveaxis(np.empty((2, 4, 5, 3)), 0, axis).shape)  # the channel axis is cut in 2
    z = zarr.create_array(tmp_path / "probs.zarr", shape=probs.shape, chunks=chunks, dtype="f4")
    z[:] = probs
    want = cm_ref(gt, np.argmax(probs, axis=axis), k)
    for src in (probs, str(tmp_path / "probs.zarr")):
        res = fse.evaluate(src, gt, channel_axis=axis, workers=2)
        assert res.confusion_matrix.tolist() == want.tolist()
        assert res.labels.tolist() == list(range(k))
    # the spatial grid of the probability map is decoded once, channel chunks included
    assert res.timing["chunks_decoded"] == res.timing["chunks_total"]


def sklearn_counts_at(y: np.ndarray, s: np.ndarray, t: float) -> tuple[int, int]:
    """TP and FP of the rule s > t, read off scikit-learn's curves (which use s >= threshold)."""
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    npos, nneg = int(y.sum()), int((1 - y).sum())
    above = thr > t  # thresholds are decreasing; the last one above t gives "s > t"
    if not above.any():
        return 0, 0
    i = np.flatnonzero(above)[-1]
    tp, fp = round(tpr[i] * npos), round(fpr[i] * nneg)
    prec, rec, pthr = precision_recall_curve(y, s, drop_intermediate=False)
    j = np.flatnonzero(pthr > t)
    if len(j):
        assert round(rec[j[0]] * npos) == tp  # precision_recall_curve agrees
    return tp, fp


def test_sweep_counts_equal_sklearn_at_every_edge():
    gt, p = binary_case(shape=(31, 33), seed=4, dtype=np.float64)
    res = fse.evaluate(p, gt, thresholds=50)
    c = res.curves["1"]
    assert len(c["thresholds"]) == len(c["tp"]) == len(c["fp"]) == len(c["fn"]) == len(c["tn"]) == 50
    y, s = gt.ravel(), p.ravel()
    for t, tp, fp, fn, tn in zip(c["thresholds"], c["tp"], c["fp"], c["fn"], c["tn"]):
        assert (tp, fp) == sklearn_counts_at(y, s, t)
        assert tp + fn == y.sum() and fp + tn == (1 - y).sum()


@pytest.mark.parametrize("bins", [10, 100, 1000])
def test_auc_and_ap_within_stated_binning_error(bins):
    gt, p = binary_case(shape=(40, 50, 30), seed=5)
    c = fse.evaluate(p, gt, thresholds=bins).curves["1"]
    exact_auc = roc_auc_score(gt.ravel(), p.ravel())
    exact_ap = average_precision_score(gt.ravel(), p.ravel())
    assert abs(c["roc_auc"] - exact_auc) <= c["roc_auc_max_error"] + 1e-12
    assert abs(c["average_precision"] - exact_ap) <= c["average_precision_max_error"] + 1e-12
    assert c["roc_auc_max_error"] > 0  # the bound is not vacuous here: bins hold both classes


@pytest.mark.parametrize("bins", [20, 255])
def test_curves_equal_sklearn_when_quantised(bins):
    rng = np.random.default_rng(6)
    gt = (rng.random(30000) < 0.4).astype(np.uint8)
    levels = np.clip(np.round((gt * 0.2 + rng.random(gt.size) * 0.8) * bins), 0, bins)
    p32 = (levels / bins).astype(np.float32)  # float32 rounding must not move a level across an edge
    for pred, kw in ((p32, {}), (levels.astype(np.uint8), {"prob_scale": bins})):
        if pred.dtype == np.uint8 and bins > 255:
            continue
        c = fse.evaluate(pred, gt, thresholds=bins, **kw).curves["1"]
        assert c["roc_auc"] == pytest.approx(roc_auc_score(gt, p32), abs=1e-12)
        assert c["average_precision"] == pytest.approx(average_precision_score(gt, p32), abs=1e-12)
        # the stated bounds stay conservative: they cannot tell tied levels from distinct values in a bin
        assert c["roc_auc_max_error"] >= 0 and c["average_precision_max_error"] >= 0


def test_best_dice_and_iou_are_the_argmax_over_edges():
    gt, p = binary_case(seed=7)
    c = fse.evaluate(p, gt, thresholds=40).curves["1"]
    y, s = gt.ravel().astype(bool), p.ravel().astype(np.float64)
    dice = [2 * np.sum(y & (s > t)) / (np.sum(y) + np.sum(s > t)) for t in c["thresholds"]]
    iou = [np.sum(y & (s > t)) / np.sum(y | (s > t)) for t in c["thresholds"]]
    assert c["best_dice"]["dice"] == pytest.approx(max(dice))
    assert c["best_dice"]["threshold"] == c["thresholds"][int(np.argmax(dice))]
    assert c["best_iou"]["iou"] == pytest.approx(max(iou))
    assert c["best_iou"]["threshold"] == c["thresholds"][int(np.argmax(iou))]


def test_multiclass_curves_are_one_vs_rest():
    rng = np.random.default_rng(8)
    k = 3
    probs = rng.random((20, 30, k))
    probs /= probs.sum(-1, keepdims=True)
    gt = rng.integers(0, k, (20, 30)).astype(np.uint8)
    res = fse.evaluate(probs, gt, channel_axis=-1, thresholds=30)
    assert sorted(res.curves) == [0, 1, 2]  # int labels, as per_class (issue 11); "0" finds 0 too
    for c in range(k):
        cur = res.curves[str(c)]
        y, s = (gt == c).ravel(), probs[..., c].ravel()
        for t, tp, fp in zip(cur["thresholds"], cur["tp"], cur["fp"]):
            assert (tp, fp) == (int(np.sum(y & (s > t))), int(np.sum(~y & (s > t))))
        assert abs(cur["roc_auc"] - roc_auc_score(y, s)) <= cur["roc_auc_max_error"] + 1e-12


@pytest.mark.parametrize("bad", [np.nan, -0.01, 1.5])
def test_invalid_probabilities_are_reported_not_counted(tmp_path, bad):
    gt, p = binary_case(shape=(10, 12, 14), seed=9)
    p[6, 7, 8] = bad
    z = zarr.create_array(tmp_path / "p.zarr", shape=p.shape, chunks=(4, 5, 6), dtype=p.dtype)
    z[:] = p
    with pytest.raises(fse.LabelError) as e:
        fse.evaluate(str(tmp_path / "p.zarr"), gt, threshold=0.5)
    assert e.value.position == (6, 7, 8)
    assert "(6, 7, 8)" in str(e.value) and "[0, 1]" in str(e.value)
    probs = np.stack([1 - p, p], axis=0)
    with pytest.raises(fse.LabelError, match="channel"):
        fse.evaluate(probs, gt, channel_axis=0)


def test_probability_option_errors():
    gt, p = binary_case()
    with pytest.raises(fse.InputError, match="threshold="):
        fse.evaluate(p, gt)  # a float map needs an explicit threshold or channel axis
    with pytest.raises(fse.OptionError, match="threshold"):
        fse.evaluate(p, gt, threshold=1.5)
    with pytest.raises(fse.OptionError, match="2 classes"):
        fse.evaluate(p, gt, threshold=0.5, num_classes=3)
    with pytest.raises(fse.OptionError, match="one axis more"):
        fse.evaluate(p, gt, channel_axis=0)
    with pytest.raises(fse.OptionError, match="channels"):
        fse.evaluate(np.stack([p, 1 - p]), gt, channel_axis=0, num_classes=3)
    with pytest.raises(fse.OptionError, match="thresholds"):
        fse.evaluate(p, gt, thresholds=0)


def test_streaming_accumulator_with_sweep_merges_and_pickles():
    gt, p = binary_case(shape=(8, 40, 40), seed=10)
    whole = fse.evaluate(p, gt, threshold=0.5, thresholds=25)
    a = fse.ConfusionMatrix(2, threshold=0.5, thresholds=25)
    b = fse.ConfusionMatrix(2, threshold=0.5, thresholds=25)
    for i in range(4):
        a.update(p[i], gt[i])
    for i in range(4, 8):
        b.update(p[i], gt[i])
    merged = pickle.loads(pickle.dumps(a)).merge(pickle.loads(pickle.dumps(b)))
    assert merged.counts.tolist() == whole.confusion_matrix.tolist()
    assert merged.result().curves == whole.curves
    with pytest.raises(fse.OptionError, match="probability"):
        a.merge(fse.ConfusionMatrix(2, threshold=0.3, thresholds=25))


def test_curves_in_json_have_the_design_keys():
    import json

    gt, p = binary_case(seed=11)
    d = json.loads(fse.evaluate(p, gt, thresholds=10).to_json())
    cur = d["curves"]["1"]
    for key in (
        "thresholds",
        "tp",
        "fp",
        "fn",
        "tn",
        "roc_auc",
        "average_precision",
        "best_dice",
        "best_iou",
    ):
        assert key in cur
    assert set(cur["best_dice"]) == {"threshold", "dice"} and set(cur["best_iou"]) == {"threshold", "iou"}


@pytest.mark.parametrize("scheduler", [None, "synchronous"])
def test_argmax_through_the_dask_engine(tmp_path, scheduler):
    """Dask probability maps (channel axis chunked) and zarr ones read by dask tasks."""
    import dask.array as da

    rng = np.random.default_rng(12)
    k, spatial = 3, (10, 12, 14)
    probs = rng.random((*spatial[:2], k, spatial[2])).astype(np.float32)  # channel axis 2
    gt = rng.integers(0, k, spatial).astype(np.uint8)
    want = cm_ref(gt, np.argmax(probs, axis=2), k)
    z = zarr.create_array(tmp_path / "probs.zarr", shape=probs.shape, chunks=(4, 5, 2, 6), dtype="f4")
    z[:] = probs
    sources = [da.from_array(probs, chunks=(3, 7, 1, 5)), str(tmp_path / "probs.zarr")]
    for src in sources:
        res = fse.evaluate(
            src, da.from_array(gt, chunks=(5, 5, 5)), channel_axis=2, scheduler=scheduler, thresholds=8
        )
        assert res.confusion_matrix.tolist() == want.tolist()
        cur = res.curves["1"]
        y, s = (gt == 1).ravel(), probs[:, :, 1, :].ravel()
        assert cur["tp"] == [int(np.sum(y & (s > t))) for t in cur["thresholds"]]
