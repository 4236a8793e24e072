"""Chunks the store does not hold (zarr writes no file for a chunk of fill values).

The threads engine hands them to the confusion reducer as broadcasts of the fill value, read
and decoded not at all; a pair that is one value on both sides is counted with one add. Every
case here is checked against numpy on what zarr-python reads: both sides unstored, one side,
an unstored mask chunk, a non-zero fill value, the ignore label as fill value, discovery, a
label list, marginals, an invalid or negative fill value (reported at the chunk's first voxel),
edge chunks, and runs with another reducer beside counting (boundary metrics), which get
ordinary arrays.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastseg_eval as fse
from fastseg_eval.errors import LabelError

zarr = pytest.importorskip("zarr")

SHAPE = (40, 36, 20)  # chunks of 16: edge chunks of 8, 4 and 4 voxels
CHUNKS = (16, 16, 16)


def _store(path, a, fill=0, chunks=CHUNKS):
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype, fill_value=fill)
    z[:] = a
    return str(path)


def _stored(path) -> int:
    return sum(1 for _, _, files in os.walk(path) for f in files if f != "zarr.json")


def _pair(dtype=np.uint8, fill=0):
    gt = np.full(SHAPE, fill, dtype=dtype)
    pred = np.full(SHAPE, fill, dtype=dtype)
    gt[2:12, 3:14, 1:9] = 2
    pred[4:13, 3:12, 2:9] = 2
    pred[30:38, 20:30, 16:20] = 1  # only pred holds data in this corner: gt's chunk is unstored
    gt[20:24, 2:5, 3:4] = 3  # only gt here
    return gt, pred


def _numpy_counts(gt, pred, labels, mask=None, ignore=None):
    keep = np.ones(gt.shape, bool) if mask is None else mask.astype(bool)
    if ignore is not None:
        keep &= gt != ignore
    idx = {int(v): i for i, v in enumerate(labels)}
    g = np.array([idx[int(v)] for v in gt[keep]], dtype=np.int64)
    p = np.array([idx[int(v)] for v in pred[keep]], dtype=np.int64)
    k = len(labels)
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k)


@pytest.mark.parametrize("fill", [0, 3])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_classes=6), dict(labels=[0, 1, 2, 3, 7]), dict(ignore_label="fill")],
    ids=["discovery", "num_classes", "labels", "ignore-fill"],
)
def test_unstored_chunks_count_exactly(tmp_path, fill, options):
    gt, pred = _pair(fill=fill)
    g = _store(tmp_path / "gt.zarr", gt, fill)
    p = _store(tmp_path / "pred.zarr", pred, fill)
    total = int(np.prod([-(-n // c) for n, c in zip(SHAPE, CHUNKS)]))
    assert _stored(g) < total and _stored(p) < total  # the case under test: chunks are missing
    options = dict(options)
    ignore = None
    if options.get("ignore_label") == "fill":
        ignore = options["ignore_label"] = fill
    res = fse.evaluate(p, g, workers=2, **options)
    labels = res.labels
    np.testing.assert_array_equal(res.confusion_matrix, _numpy_counts(gt, pred, labels, ignore=ignore))
    assert res.n_ignored == (int((gt == ignore).sum()) if ignore is not None else 0)


def test_marginals_mode_with_unstored_chunks(tmp_path):
    gt, pred = _pair(np.uint16)
    gt[gt == 2], pred[pred == 2] = 4000, 4000
    g, p = _store(tmp_path / "gt.zarr", gt), _store(tmp_path / "pred.zarr", pred)
    acc = fse.ConfusionMatrix(num_classes=5000, dense_max=16)
    acc.update(p, g, workers=2)
    assert not acc.is_dense
    for lab in (0, 1, 3, 4000):
        assert acc.gt_counts[lab] == int((gt == lab).sum())
        assert acc.pred_counts[lab] == int((pred == lab).sum())
        assert acc.diagonal[lab] == int(((gt == lab) & (pred == lab)).sum())


def test_unstored_mask_chunks(tmp_path):
    gt, pred = _pair()
    mask = np.zeros(SHAPE, np.uint8)
    mask[0:20, 0:20, :] = 1  # other mask chunks are unstored: fill 0, masked out
    g, p = _store(tmp_path / "gt.zarr", gt), _store(tmp_path / "pred.zarr", pred)
    m = _store(tmp_path / "mask.zarr", mask)
    res = fse.evaluate(p, g, mask=m, workers=2)
    np.testing.assert_array_equal(res.confusion_matrix, _numpy_counts(gt, pred, res.labels, mask=mask))
    assert res.n_masked == int((mask == 0).sum())


def test_invalid_fill_value_is_reported_at_the_chunks_first_voxel(tmp_path):
    gt, pred = _pair(fill=9)
    g, p = _store(tmp_path / "gt.zarr", gt, 9), _store(tmp_path / "pred.zarr", pred, 9)
    with pytest.raises(LabelError) as e:
        fse.evaluate(p, g, num_classes=4, workers=1)
    assert int(e.value.value) == 9 and e.value.role == "gt"
    assert all(x % 16 == 0 for x in e.value.position)  # the first voxel of an (unstored) chunk


def test_negative_fill_value(tmp_path):
    gt, pred = _pair(np.int16, fill=-1)
    g, p = _store(tmp_path / "gt.zarr", gt, -1), _store(tmp_path / "pred.zarr", pred, -1)
    with pytest.raises(LabelError, match="negative"):
        fse.evaluate(p, g, workers=1)
    pred[pred == -1] = 0  # the ignore label applies to gt; pred must hold labels
    p = _store(tmp_path / "pred0.zarr", pred, 0)
    res = fse.evaluate(p, g, ignore_label=-1, workers=2)
    np.testing.assert_array_equal(res.confusion_matrix, _numpy_counts(gt, pred, res.labels, ignore=-1))


def test_other_reducers_get_ordinary_arrays(tmp_path):
    """Boundary metrics beside counting: the engine reads unstored chunks as filled arrays."""
    gt, pred = _pair()
    g, p = _store(tmp_path / "gt.zarr", gt), _store(tmp_path / "pred.zarr", pred)
    res = fse.evaluate(p, g, num_classes=4, metrics=["dice", "hd95"], workers=2)
    ref = fse.evaluate(pred, gt, num_classes=4, metrics=["dice", "hd95"])
    np.testing.assert_array_equal(res.confusion_matrix, _numpy_counts(gt, pred, range(4)))
    for lab in (1, 2, 3):
        assert res.per_class[lab]["hd95"] == pytest.approx(ref.per_class[lab]["hd95"], rel=1e-12, nan_ok=True)


def test_dask_engine_agrees(tmp_path):
    gt, pred = _pair(fill=3)
    g, p = _store(tmp_path / "gt.zarr", gt, 3), _store(tmp_path / "pred.zarr", pred, 3)
    a = fse.evaluate(p, g, num_classes=4, workers=2)
    b = fse.evaluate(p, g, num_classes=4, scheduler="synchronous")  # the dask graph engine
    np.testing.assert_array_equal(a.confusion_matrix, b.confusion_matrix)


def test_negative_fill_whose_bits_are_a_label(tmp_path):
    """int16 fill -1 with num_classes=65536: its bits are label 65535's, it is still refused."""
    gt, pred = _pair(np.int16, fill=-1)
    pred[pred == -1] = 0
    g, p = _store(tmp_path / "gt.zarr", gt, -1), _store(tmp_path / "pred.zarr", pred, 0)
    with pytest.raises(LabelError, match="negative"):
        fse.evaluate(p, g, num_classes=65536, workers=1)
