"""The bit-plane kernel for labels 0..3 (``kernels.cpu.count_small``): one code path for every
block of 64 voxels, counts recovered from popcounts of ANDed bit-plane masks by
inclusion-exclusion.

Checked against numpy for K = 1..4 on random data (every pair code in every lane), on
uniform runs, on lengths that are not whole blocks; values past K (in any lane of a block, in
the tail) must add nothing and hand the chunk to the word kernel, which reports the first one;
discovery on 8-bit labels uses it while labels stay below 4. The two LLVM intrinsics it is made
of (``kernels.simd``) are checked on their own against numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastseg_eval as fse
from fastseg_eval.errors import LabelError
from fastseg_eval.kernels import cpu


def _numpy(gt, pred, k):
    return np.bincount(gt.astype(np.int64).ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)


@settings(max_examples=80, deadline=None)
@given(
    k=st.integers(1, 4),
    n=st.integers(0, 5000),
    seed=st.integers(0, 2**32 - 1),
    runs=st.sampled_from([1, 7, 300]),
)
def test_count_small_equals_numpy(k, n, seed, runs):
    rng = np.random.default_rng(seed)
    gt = np.repeat(rng.integers(0, k, size=n // runs + 1), runs)[:n].astype(np.uint8)
    pred = np.where(rng.random(n) < 0.8, gt, rng.integers(0, k, size=n)).astype(np.uint8)
    acc = np.zeros(k * k, dtype=np.int64)
    assert cpu.count_small(gt, pred, k, k, acc)
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt, pred, k))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
# first and last lane of a 64-voxel block, inside blocks, and in the tail past the last block
@pytest.mark.parametrize("where", [0, 7, 8, 63, 64, 2047, 2048 * 8 + 3])
@pytest.mark.parametrize("side", ["gt", "pred"])
def test_values_past_k_add_nothing(k, where, side):
    n = 2048 * 8 + 5  # 256 blocks of 64 voxels and a tail of 5
    rng = np.random.default_rng(k)
    gt = rng.integers(0, k, size=n).astype(np.uint8)
    pred = rng.integers(0, k, size=n).astype(np.uint8)
    (gt if side == "gt" else pred)[where] = k + (where % 200)  # k, 2k-1, ... and values past 127 too
    acc = np.zeros(k * k, dtype=np.int64)
    assert not cpu.count_small(gt, pred, k, k, acc)
    assert not acc.any()


def test_every_pair_in_every_lane():
    codes = np.arange(16 * 8) % 16
    gt, pred = (codes // 4).astype(np.uint8), (codes % 4).astype(np.uint8)
    for shift in range(8):
        g, p = np.roll(gt, shift), np.roll(pred, shift)
        acc = np.zeros(16, dtype=np.int64)
        assert cpu.count_small(g, p, 4, 4, acc)
        np.testing.assert_array_equal(acc, np.full(16, 8))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_through_the_public_api(dtype, k):
    rng = np.random.default_rng(3)
    shape = (9, 31, 37)
    hi = 2 if dtype is np.bool_ else k
    gt = rng.integers(0, hi, size=shape).astype(dtype)
    pred = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, hi, size=shape).astype(dtype))
    for nc in (k, None):  # fixed labels and discovery
        cm = fse.confusion_matrix(pred, gt, num_classes=nc if dtype is not np.bool_ else (nc and 2))
        ref = _numpy(gt.astype(np.uint8), pred.astype(np.uint8), hi if nc is None or dtype is np.bool_ else k)
        present = np.flatnonzero(ref.any(0) | ref.any(1)) if nc is None else np.arange(len(ref))
        np.testing.assert_array_equal(cm, ref[np.ix_(present, present)])


def test_discovery_falls_back_when_labels_pass_3():
    rng = np.random.default_rng(5)
    acc = fse.ConfusionMatrix()
    a = rng.integers(0, 3, size=(4, 16, 16)).astype(np.uint8)
    b = rng.integers(0, 9, size=(4, 16, 16)).astype(np.uint8)
    acc.update(a, a).update(b, a).update(a, a)
    want = _numpy(np.r_[a.ravel(), a.ravel(), a.ravel()], np.r_[a.ravel(), b.ravel(), a.ravel()], 9)
    np.testing.assert_array_equal(acc.counts, want[np.ix_(acc.labels, acc.labels)])


def test_invalid_label_reported_at_its_voxel():
    gt = np.zeros((3, 8, 9), np.uint8)
    pred = np.ones_like(gt)
    gt[2, 5, 7] = 6
    with pytest.raises(LabelError) as e:
        fse.confusion_matrix(pred, gt, num_classes=4)
    assert tuple(e.value.position) == (2, 5, 7) and int(e.value.value) == 6


def test_lane_mask64_and_popcount_equal_numpy():
    """The two intrinsics against numpy: every byte value, every bit pattern, unaligned starts."""
    from numba import njit

    from fastseg_eval.kernels.simd import lane_mask64, popcount

    @njit
    def masks(a, pos, bits):
        return lane_mask64(a, pos, bits), popcount(lane_mask64(a, pos, bits))

    rng = np.random.default_rng(3)
    a = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, size=300, dtype=np.uint8)])
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    for bits in (1, 2, 3, 0x80, 0xFC, 0xFE, 0xFF):
        for pos in (0, 1, 63, 64, 129, len(a) - 64):
            want = int(((a[pos : pos + 64] & bits) != 0).astype(np.uint64) @ weights)
            got, count = masks(a, pos, bits)
            assert int(got) == want and count == bin(want).count("1"), (bits, pos)
