"""The mapped word kernel (``kernels.cpu.count_words``): 1- and 2-byte labels through the lookup
table, counted by distinct (gt, pred) pair per 64-bit word.

It runs for every contiguous 1- or 2-byte chunk whose labels are not ``0..K-1`` counted directly:
fixed label lists, ``num_classes`` past ``dense_max`` (marginals), discovery on 2-byte inputs.
Each case is checked against numpy on volumes built to hit the word kernel's paths: long
uniform runs, words of 2..8 distinct pairs, masked and ignored lanes inside mixed words, a
chunk tail that is not a whole word, tables that grow in the middle of a chunk, and the first
invalid voxel of a mixed word.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastseg_eval as fse
from fastseg_eval.errors import LabelError


def _volume(rng, n, values, run_scale, dtype):
    """Runs of random length (mean ``run_scale``) of values drawn from ``values``."""
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        w = int(rng.geometric(1.0 / run_scale))
        out[i : i + w] = rng.choice(values)
        i += w
    return out.astype(dtype)


def _pair(seed, n, dtype, values, agree=0.8, run_scale=6.0):
    rng = np.random.default_rng(seed)
    gt = _volume(rng, n, values, run_scale, dtype)
    pred = gt.copy()
    flip = rng.random(n) > agree
    pred[flip] = rng.choice(values, size=int(flip.sum())).astype(dtype)
    return gt, pred


def _reference(gt, pred, labels, mask=None, ignore=None):
    keep = np.ones(gt.shape, bool) if mask is None else mask.astype(bool)
    if ignore is not None:
        keep &= gt != ignore
    index = {int(v): i for i, v in enumerate(labels)}
    g = np.array([index[int(v)] for v in gt[keep].ravel()], dtype=np.int64)
    p = np.array([index[int(v)] for v in pred[keep].ravel()], dtype=np.int64)
    k = len(labels)
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k)


def _check(acc, gt, pred, mask=None, ignore=None):
    labels = np.asarray(acc.labels)
    ref = _reference(gt, pred, labels, mask, ignore)
    np.testing.assert_array_equal(acc.gt_counts, ref.sum(axis=1))
    np.testing.assert_array_equal(acc.pred_counts, ref.sum(axis=0))
    np.testing.assert_array_equal(acc.diagonal, np.diagonal(ref))
    if acc.is_dense:
        np.testing.assert_array_equal(acc.counts, ref)


DTYPES = [np.uint8, np.int8, np.uint16, np.int16]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(0, 300),
    nvals=st.integers(1, 9),
    run_scale=st.sampled_from([1.0, 3.0, 12.0]),
    mode=st.sampled_from(["labels", "marginals", "discovery"]),
    use_mask=st.booleans(),
    use_ignore=st.booleans(),
)
# the only value is the ignore label: the added label must not be the ignore label (CI found it)
@example(seed=283863, dtype=np.int8, n=0, nvals=1, run_scale=1.0, mode="labels", use_mask=False, use_ignore=True)
def test_word_kernel_equals_numpy(seed, dtype, n, nvals, run_scale, mode, use_mask, use_ignore):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    values = rng.choice(np.arange(0, min(info.max, 3000) + 1), size=nvals, replace=False)  # labels are >= 0
    if mode == "marginals":  # num_classes past dense_max: values 0..K-1, diagonal + marginals
        values = np.abs(values) % 200
        values = np.unique(values)
    gt, pred = _pair(seed, n, dtype, values, run_scale=run_scale)
    mask = (rng.random(n) > 0.3).astype(np.uint8) if use_mask else None
    if mask is not None and run_scale > 1:  # masks in runs too, so that whole words are masked
        mask = _volume(rng, n, [0, 1, 1], run_scale, np.uint8)
    ignore = int(values[0]) if use_ignore else None
    if ignore is not None and len(values) > 1:  # the ignore label applies to gt only
        pred[pred == ignore] = values[1]
    if mode == "labels":
        labels = sorted(int(v) for v in np.unique(values) if v != ignore)
        if 0 not in labels and ignore != 0:
            # never 0..K-1: the mapped kernel; never the ignore label either
            labels = labels + [max([*labels, ignore if ignore is not None else 0]) + 1]
        acc = fse.ConfusionMatrix(labels=labels, ignore_label=ignore)
    elif mode == "marginals":
        acc = fse.ConfusionMatrix(num_classes=200, ignore_label=ignore, dense_max=16)
    else:
        acc = fse.ConfusionMatrix(ignore_label=ignore, dense_max=4)  # grows into marginals mid-chunk
    if mode == "labels" and any(v not in labels and v != ignore for v in np.unique(np.r_[gt, pred])):
        return  # covered by the error tests below
    acc.update(pred.reshape(1, 1, -1), gt.reshape(1, 1, -1), mask=None if mask is None else mask.reshape(1, 1, -1))
    _check(acc, gt, pred, mask, ignore)
    assert acc.n_masked == (0 if mask is None else int((mask == 0).sum()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_growth_inside_a_chunk_resumes_at_the_word(dtype):
    """Discovery on 2-byte labels (1-byte ones go through the raw 256 x 256 table) with a tiny
    table: every few words a new label forces a grow-and-resume; nothing is counted twice."""
    gt, pred = _pair(7, 4099, dtype, np.arange(0, 120, dtype=np.int64), agree=0.6, run_scale=5.0)
    acc = fse.ConfusionMatrix(dense_max=1000)
    acc.update(pred, gt)
    _check(acc, gt, pred)
    acc = fse.ConfusionMatrix(dense_max=8)  # marginals after 8 labels
    acc.update(pred, gt)
    _check(acc, gt, pred)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("where", [0, 5, 13, 4096 + 3, 8191])
@pytest.mark.parametrize("role", ["gt", "pred"])
def test_first_invalid_voxel_of_a_mixed_word(dtype, where, role):
    """The error names the first invalid voxel in C order, inside a mixed word or the tail."""
    n = 8192 + 3
    gt, pred = _pair(3, n, dtype, np.array([1, 5, 9]), agree=0.7, run_scale=2.0)
    bad = np.array(11, dtype=dtype)
    (gt if role == "gt" else pred)[where] = bad
    (gt if role == "gt" else pred)[where + 2] = bad  # a later one in the same word: not reported
    acc = fse.ConfusionMatrix(labels=[1, 5, 9])
    with pytest.raises(LabelError) as e:
        acc.update(pred, gt)
    assert e.value.role == role and int(e.value.value) == 11 and tuple(e.value.position) == (where,)


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_negative_values_in_discovery_are_refused_at_their_voxel(dtype):
    gt, pred = _pair(5, 999, dtype, np.array([0, 3, 4]), run_scale=4.0)
    pred[517] = -2
    with pytest.raises(LabelError) as e:
        fse.ConfusionMatrix(dense_max=4).update(pred.astype(np.int16), gt.astype(np.int16))
    assert e.value.role == "pred" and int(e.value.value) == -2 and tuple(e.value.position) == (517,)


def test_ignored_and_masked_lanes_inside_mixed_words():
    """Every lane pattern of one word: ignored, masked and counted lanes mixed in all ways."""
    rng = np.random.default_rng(11)
    gt = rng.choice(np.array([300, 301, 302], dtype=np.uint16), size=4 * 4096)
    pred = rng.choice(np.array([300, 302], dtype=np.uint16), size=gt.size)
    mask = rng.integers(0, 2, size=gt.size, dtype=np.uint8)
    acc = fse.ConfusionMatrix(labels=[300, 302], ignore_label=301)
    acc.update(pred, gt, mask=mask)
    _check(acc, gt, pred, mask, 301)
    assert acc.n_ignored == int(((gt == 301) & (mask == 1)).sum())
    assert acc.n_masked == int((mask == 0).sum())


@pytest.mark.parametrize("layout", ["C", "F"])  # the word kernel, and the per-voxel mapped kernel
@pytest.mark.parametrize("space", [dict(num_classes=65536), dict(labels=[0, 2, 65535]), dict()])
@pytest.mark.parametrize("role", ["gt", "pred"])
def test_negative_values_whose_bits_are_a_known_label(layout, space, role):
    """int16 -1 has the bits of 65535, a label of these spaces (or one discovered from uint16 data
    before): it is still a negative value, refused at its voxel, never counted as 65535."""
    gt = np.zeros((3, 4, 10), np.int16)
    pred = np.zeros_like(gt)
    (gt if role == "gt" else pred)[1, 2, 7] = -1
    acc = fse.ConfusionMatrix(**space)
    if not space:
        acc.update(np.full(8, 65535, np.uint16), np.full(8, 65535, np.uint16))
    with pytest.raises(LabelError) as e:
        acc.update(np.asarray(pred, order=layout), np.asarray(gt, order=layout))
    assert e.value.role == role and int(e.value.value) == -1 and tuple(e.value.position) == (1, 2, 7)
