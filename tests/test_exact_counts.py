"""Bit-exact confusion matrices against numpy.bincount (int64 codes, an independent label map).

Entry points: ``fse.confusion_matrix``, ``fse.evaluate(...).confusion_matrix`` and
``ConfusionMatrix.update``. Dtypes, byte orders, 1-4-D shapes with odd and size-1 axes,
non-contiguous layouts, ignore labels (also negative), masks, empty classes, discovered labels vs
``num_classes`` vs an explicit unsorted ``labels`` list, label values through the hash path
(>= 65536, up to 2**64 - 1), and the diagonal + marginals mode past 1024 labels.
"""

from __future__ import annotations

import itertools
import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import (
    BIG_ENDIAN,
    LABEL_DTYPES,
    LAYOUTS,
    dtype_range,
    label_pool,
    label_spaces,
    make_labels,
    masks,
    perturb,
    reference_confusion,
    reference_marginals,
    volume_pairs,
    with_layout,
)

import fastseg_eval as fse
from fastseg_eval.errors import FastSegError


def _space_kwargs(mode, value):
    if mode == "num_classes":
        return {"num_classes": value}
    if mode == "labels":
        return {"labels": value}
    return {}


def _expected_labels(mode, value, discovered):
    if mode == "num_classes":
        return list(range(value))
    if mode == "labels":
        return list(value)
    return discovered


def _all_entry_points(pred, gt, *, mask=None, ignore_label=None, **space):
    """The matrix and labels from each public entry point, keyed by its name."""
    out = {}
    cm = fse.confusion_matrix(pred, gt, ignore_label=ignore_label, mask=mask, **space)
    out["confusion_matrix"] = (cm, None)
    res = fse.evaluate(pred, gt, ignore_label=ignore_label, mask=mask, **space)
    out["evaluate"] = (res.confusion_matrix, [int(x) for x in res.labels])
    acc = fse.ConfusionMatrix(space.get("num_classes"), labels=space.get("labels"), ignore_label=ignore_label)
    acc.update(pred, gt, mask=mask)
    out["update"] = (acc.counts, [int(x) for x in acc.labels])
    return out, res, acc


def _check_all(pred, gt, *, mask=None, ignore_label=None, mode="discover", value=None):
    ref, discovered = reference_confusion(pred, gt, mask=mask, ignore_label=ignore_label)
    labels = _expected_labels(mode, value, discovered)
    if mode != "discover":
        ref, _ = reference_confusion(pred, gt, mask=mask, ignore_label=ignore_label, labels=labels)
    got, res, acc = _all_entry_points(
        pred, gt, mask=mask, ignore_label=ignore_label, **_space_kwargs(mode, value)
    )
    for name, (cm, labs) in got.items():
        assert cm.dtype == np.int64, name
        np.testing.assert_array_equal(cm, ref, err_msg=f"{name}: matrix differs from bincount")
        if labs is not None:
            assert labs == labels, name
    n_kept = int(ref.sum())
    assert res.n_voxels == acc.n_voxels == n_kept
    total = int(np.asarray(gt).size)
    n_masked = 0 if mask is None else int(np.count_nonzero(np.asarray(mask) == 0))
    assert acc.n_masked == res.n_masked == n_masked
    assert acc.n_ignored == res.n_ignored == total - n_masked - n_kept
    return ref, labels


# ------------------------------------------------------------------------ every dtype pair
def _pair_id(p):
    return f"{p[0].str}-{p[1].str}" if isinstance(p, tuple) else str(p)


DTYPE_PAIRS = list(itertools.product(LABEL_DTYPES, LABEL_DTYPES)) + [
    (BIG_ENDIAN[0], np.dtype("uint8")),
    (np.dtype("int16"), BIG_ENDIAN[1]),
    (BIG_ENDIAN[2], BIG_ENDIAN[2]),
]


@pytest.mark.parametrize("gdt,pdt", DTYPE_PAIRS, ids=[_pair_id(p) for p in DTYPE_PAIRS])
def test_every_dtype_pair(gdt, pdt):
    """All 81 pairs of label dtypes plus big-endian ones, discovered and num_classes, with an ignore label."""
    rng = np.random.default_rng(zlib.crc32(f"{gdt.str}{pdt.str}".encode()))
    hi = min(dtype_range(gdt)[1], dtype_range(pdt)[1])
    pool = label_pool(hi, 5, rng)
    gt = make_labels((3, 7, 5), gdt, pool, rng)
    pred = perturb(gt, pdt, pool, 0.6, rng)
    if gdt.kind == "i":
        ignore = -1  # a negative ignore label in a signed volume
    elif gdt.kind == "u":
        ignore = dtype_range(gdt)[1]
    else:
        ignore = None
    if ignore is not None:
        gt[rng.random(gt.shape) < 0.2] = ignore
    ref, labels = _check_all(pred, gt, ignore_label=ignore)
    _check_all(pred, gt, ignore_label=ignore, mode="num_classes", value=max(labels) + 2)
    assert ref.sum() > 0
    if ignore is not None:
        assert ignore not in labels


# ----------------------------------------------------------------------- hypothesis sweep
@st.composite
def scenarios(draw, **volume_kwargs):
    pred, gt, info = draw(volume_pairs(**volume_kwargs))
    gdt = info["dtypes"][0]
    mask = draw(masks(gt.shape))
    ignore_kind = draw(st.sampled_from([None, "value", "absent", "negative"]))
    ignore = None
    if ignore_kind == "value" and len(info["pool"]) > 1:
        ignore = draw(st.sampled_from(info["pool"]))
        # the prediction never uses the ignore value here (so a fixed label space can leave it out)
        other = next(v for v in info["pool"] if v != ignore)
        pred[pred == ignore] = other
    elif ignore_kind == "absent":
        ignore = dtype_range(gdt)[1] if gdt.kind != "b" else None
        if ignore is not None and ignore in info["pool"]:
            ignore = None
    elif ignore_kind == "negative" and gdt.kind == "i":
        ignore = -1
        rng = np.random.default_rng(info["seed"] + 1)
        gt[rng.random(gt.shape) < 0.25] = -1  # writes through the (possibly strided) view
    _, present = reference_confusion(pred, gt, mask=mask, ignore_label=ignore)
    hi = min(dtype_range(gdt)[1], dtype_range(info["dtypes"][1])[1])
    mode, value = draw(label_spaces(present, hi, exclude=() if ignore is None else (ignore,)))
    return pred, gt, mask, ignore, mode, value


@settings(max_examples=50)
@given(scenarios())
def test_matches_bincount(scenario):
    pred, gt, mask, ignore, mode, value = scenario
    _check_all(pred, gt, mask=mask, ignore_label=ignore, mode=mode, value=value)


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
def test_layouts_4d_odd_shape(layout):
    """Every memory layout on a 4-D volume with odd and size-1 axes, with a strided mask too."""
    rng = np.random.default_rng(7)
    shape = (3, 1, 5, 7)
    gt = make_labels(shape, np.dtype("int16"), [0, 1, 2, 9], rng)
    pred = perturb(gt, np.dtype("uint8"), [0, 1, 2, 9], 0.7, rng)
    lg, lp, lm = ("transpose", "step", "reversed") if layout == "mixed" else (layout,) * 3
    mask = with_layout(rng.random(shape) < 0.7, lm, rng)
    gt_l, pred_l = with_layout(gt, lg, rng), with_layout(pred, lp, rng)
    if layout != "contiguous":
        assert not (gt_l.flags.c_contiguous and pred_l.flags.c_contiguous)
    np.testing.assert_array_equal(gt_l, gt)
    np.testing.assert_array_equal(pred_l, pred)
    ref, labels = _check_all(pred_l, gt_l, mask=mask)
    assert labels == [0, 1, 2, 9]
    ref_c, _ = reference_confusion(pred, gt, mask=np.ascontiguousarray(mask))
    np.testing.assert_array_equal(ref, ref_c)
    _check_all(pred_l, gt_l, mask=mask, mode="num_classes", value=10)


def test_empty_classes_rows_and_columns_are_zero():
    rng = np.random.default_rng(3)
    gt = make_labels((6, 5, 4), np.dtype("uint8"), [1, 3], rng)
    pred = perturb(gt, np.dtype("uint8"), [1, 3], 0.5, rng)
    cm = fse.confusion_matrix(pred, gt, num_classes=6)
    ref, _ = reference_confusion(pred, gt, labels=range(6))
    np.testing.assert_array_equal(cm, ref)
    for k in (0, 2, 4, 5):
        assert cm[k].sum() == 0 and cm[:, k].sum() == 0
    assert cm.sum() == gt.size


def test_explicit_labels_follow_the_given_order():
    gt = np.array([5, 5, 2, 7, 7, 7], dtype=np.uint16)
    pred = np.array([5, 2, 2, 7, 5, 7], dtype=np.uint16)
    order = [7, 2, 11, 5]
    res = fse.evaluate(pred, gt, labels=order)
    assert [int(x) for x in res.labels] == order
    ref, _ = reference_confusion(pred, gt, labels=order)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    np.testing.assert_array_equal(fse.confusion_matrix(pred, gt, labels=order), ref)
    # the same counts as the discovered (sorted) matrix, permuted
    disc = fse.confusion_matrix(pred, gt)
    perm = [[2, 5, 7].index(v) for v in (7, 2, 5)]
    np.testing.assert_array_equal(ref[np.ix_([0, 1, 3], [0, 1, 3])], disc[np.ix_(perm, perm)])


# -------------------------------------------------------------------- hash path (>= 65536)
@settings(max_examples=30)
@given(
    volume_pairs(
        [np.dtype("uint32"), np.dtype("uint64"), np.dtype("int64")],
        max_dims=3,
        max_voxels=600,
        big_values=True,
        layouts=("contiguous", "step"),
    ),
    st.sampled_from(["discover", "labels"]),
)
def test_large_label_values(vols, mode):
    pred, gt, info = vols
    _, present = reference_confusion(pred, gt)
    value = list(reversed(present)) if mode == "labels" else None
    _check_all(pred, gt, mode=mode, value=value)


def test_uint64_extremes_and_negative_ignore():
    top = 2**64 - 1
    vals = [0, 1, 65535, 65536, 2**32, 2**63 - 1, 2**63, top - 1, top]
    rng = np.random.default_rng(11)
    gt = make_labels((4, 6, 5), np.dtype("uint64"), vals, rng)
    pred = perturb(gt, np.dtype("uint64"), vals, 0.5, rng)
    ref, labels = _check_all(pred, gt)
    assert labels == sorted(set(labels)) and labels[-1] == top
    res = fse.evaluate(pred, gt)
    assert res.labels.dtype == np.uint64 and int(res.labels[-1]) == top
    # int64 near its top, with -1 as the (negative) ignore label
    vals64 = [0, 3, 2**62, 2**63 - 2, 2**63 - 1]
    g64 = make_labels((5, 4, 3), np.dtype("int64"), vals64, rng)
    p64 = perturb(g64, np.dtype("int64"), vals64, 0.5, rng)
    g64[rng.random(g64.shape) < 0.3] = -1
    ref, labels = _check_all(p64, g64, ignore_label=-1)
    assert -1 not in labels and labels[-1] == 2**63 - 1
    _check_all(p64, g64, ignore_label=-1, mode="labels", value=[2**63 - 1, 0, 2**62, 3, 2**63 - 2, 17])
    # the top uint64 value as the ignore label goes through the hash path too
    gt[rng.random(gt.shape) < 0.3] = top
    _check_all(pred, gt, ignore_label=top)


# ----------------------------------------------------------- many labels: diagonal + marginals
def _many_labels(n_labels, shape, rng, dtype=np.uint32, offset=0):
    pool = (rng.choice(200_000, size=n_labels, replace=False) + offset).tolist()
    gt = make_labels(shape, np.dtype(dtype), pool, rng)
    gt.reshape(-1)[:n_labels] = pool  # every label present at least once
    pred = perturb(gt, np.dtype(dtype), pool, 0.6, rng)
    return pred, gt


def test_many_labels_switch_to_marginals():
    rng = np.random.default_rng(5)
    pred, gt = _many_labels(1500, (12, 30, 25), rng)
    mask = rng.random(gt.shape) < 0.9
    labels, diag, gtc, prc = reference_marginals(pred, gt, mask=mask)
    assert len(labels) > 1024 and labels[-1] >= 65536

    res = fse.evaluate(pred, gt, mask=mask)
    assert res.confusion_matrix is None
    assert [int(x) for x in res.labels] == labels
    acc = fse.ConfusionMatrix()
    acc.update(pred, gt, mask=mask)
    assert not acc.is_dense
    assert [int(x) for x in acc.labels] == labels
    np.testing.assert_array_equal(acc.diagonal, diag)
    np.testing.assert_array_equal(acc.gt_counts, gtc)
    np.testing.assert_array_equal(acc.pred_counts, prc)
    assert acc.n_voxels == int(mask.sum())
    with pytest.raises(FastSegError, match=r"1[0-9]{3} labels exceed dense_max=1024.*diagonal"):
        _ = acc.counts
    # per-class counts of the report follow from the same marginals
    n = int(mask.sum())
    for i, lab in enumerate(labels[:50]):
        row = res.per_class[lab]
        assert (row["tp"], row["fn"], row["fp"]) == (diag[i], gtc[i] - diag[i], prc[i] - diag[i])
        assert row["tn"] == n - gtc[i] - prc[i] + diag[i]

    # confusion_matrix() still returns a dense table up to 4096 labels: check it cell by cell
    ref, ref_labels = reference_confusion(pred, gt, mask=mask)
    assert ref_labels == labels
    np.testing.assert_array_equal(fse.confusion_matrix(pred, gt, mask=mask), ref)


def test_too_many_labels_for_a_dense_matrix():
    rng = np.random.default_rng(6)
    pred, gt = _many_labels(4200, (20, 21, 20), rng, dtype=np.int64, offset=70_000)
    with pytest.raises(FastSegError, match="4[0-9]{3} distinct labels.*evaluate"):
        fse.confusion_matrix(pred, gt)
    labels, diag, gtc, prc = reference_marginals(pred, gt)
    acc = fse.ConfusionMatrix().update(pred, gt)
    np.testing.assert_array_equal(acc.diagonal, diag)
    np.testing.assert_array_equal(acc.gt_counts, gtc)
    np.testing.assert_array_equal(acc.pred_counts, prc)


@settings(max_examples=30)
@given(
    volume_pairs(
        [np.dtype("uint16"), np.dtype("uint64")],
        max_dims=3,
        max_voxels=800,
        max_labels=12,
        big_values=True,
        layouts=("contiguous",),
    ),
    st.integers(1, 6),
    st.integers(1, 4),
)
def test_marginals_mode_in_batches(vols, dense_max, n_batches):
    """A small dense_max makes the switch to marginals happen mid-stream, between and inside batches."""
    pred, gt, _ = vols
    labels, diag, gtc, prc = reference_marginals(pred, gt)
    acc = fse.ConfusionMatrix(dense_max=dense_max)
    for part in np.array_split(np.arange(gt.shape[0]), n_batches):
        if len(part):
            acc.update(pred[part[0] : part[-1] + 1], gt[part[0] : part[-1] + 1])
    assert [int(x) for x in acc.labels] == labels
    assert acc.is_dense == (len(labels) <= dense_max)
    np.testing.assert_array_equal(acc.diagonal, diag)
    np.testing.assert_array_equal(acc.gt_counts, gtc)
    np.testing.assert_array_equal(acc.pred_counts, prc)
    if acc.is_dense:
        np.testing.assert_array_equal(acc.counts, reference_confusion(pred, gt)[0])
    else:
        with pytest.raises(FastSegError, match="dense_max"):
            _ = acc.counts


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.uint64])
def test_num_classes_past_dense_max_uses_values_as_indices(dtype):
    """num_classes beyond dense_max keeps marginals and maps values directly; errors still hold."""
    rng = np.random.default_rng(31)
    k = 4000
    gt = rng.integers(0, 3000, (50, 61)).astype(dtype)
    pred = gt.copy()
    pred[::3] = rng.integers(0, 3000, pred[::3].shape).astype(dtype)
    acc = fse.ConfusionMatrix(k).update(pred, gt)
    assert not acc.is_dense and acc.labels.tolist() == list(range(k))
    g64, p64 = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    np.testing.assert_array_equal(acc.gt_counts, np.bincount(g64, minlength=k))
    np.testing.assert_array_equal(acc.pred_counts, np.bincount(p64, minlength=k))
    np.testing.assert_array_equal(acc.diagonal, np.bincount(g64[g64 == p64], minlength=k))
    bad = gt.copy()
    bad[1, 2] = k
    with pytest.raises(fse.LabelError, match=r"label 4000 at voxel \(1, 2\)"):
        fse.ConfusionMatrix(k).update(pred, bad)
    if np.dtype(dtype).kind == "i":  # a negative value must not pass as a large index
        bad = gt.copy()
        bad[3, 4] = -7
        with pytest.raises(fse.LabelError, match=r"label -7 at voxel \(3, 4\)"):
            fse.ConfusionMatrix(40000).update(pred, bad)
