"""The run kernel for 1-byte labels (``kernels.cpu.count_runs``): where runs of one (gt, pred)
pair start comes 64 voxels at a time from vector compares of each input with itself one voxel
later; each run adds its length to its pair's cell.

Checked against numpy on uniform blocks, blocks of 2..64 distinct pairs, runs across block
edges and across the whole chunk, ignore labels, chunk lengths that are not whole blocks, signed
8-bit inputs; a value past K anywhere stops the kernel at the first voxel of its run, and the
public API then reports that voxel, exactly where it is.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastseg_eval as fse
from fastseg_eval.errors import LabelError
from fastseg_eval.kernels import cpu


def _numpy(gt, pred, k, ignore=None):
    keep = np.ones(gt.shape, bool) if ignore is None else gt != ignore
    return np.bincount(gt[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


def _pair(rng, n, k, pairs_per_block):
    """Blocks of 64 voxels with about ``pairs_per_block`` distinct pairs each."""
    nblocks = n // 64 + 1
    gt = np.empty(nblocks * 64, np.uint8)
    pred = np.empty(nblocks * 64, np.uint8)
    for b in range(nblocks):
        d = int(rng.integers(1, pairs_per_block + 1))
        cuts = np.sort(rng.choice(np.arange(1, 64), size=d - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [64]]).astype(np.int64))
        gt[b * 64 : (b + 1) * 64] = np.repeat(rng.integers(0, k, size=d), lengths)
        pred[b * 64 : (b + 1) * 64] = np.repeat(rng.integers(0, k, size=d), lengths)
    return gt[:n], pred[:n]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 256),
    n=st.integers(0, 3000),
    pairs=st.sampled_from([1, 2, 4, 5, 9, 64]),
    seed=st.integers(0, 2**32 - 1),
    use_ignore=st.booleans(),
)
def test_count_runs_equals_numpy(k, n, pairs, seed, use_ignore):
    rng = np.random.default_rng(seed)
    gt, pred = _pair(rng, n, k, pairs)
    if pairs == 1 and n > 200:  # runs across blocks: one pair over a long stretch
        gt[50:180], pred[50:180] = gt[60], pred[60]
    ignore = int(gt[0]) if use_ignore and n else None
    acc = np.zeros(k * k, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    done = cpu.count_runs(
        gt, pred, np.uint64(ignore or 0), ignore is not None, np.uint64(k), np.uint64(k), k, acc, state
    )
    assert done == n // 64 * 64  # the tail is the caller's
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k, ignore))
    if ignore is not None:
        assert state[cpu.NIGNORED] == int((gt[:done] == ignore).sum())


@pytest.mark.parametrize("where", [0, 63, 64, 64 * 5 + 17, 64 * 9 - 1, 64 * 9 + 2])
@pytest.mark.parametrize("side", ["gt", "pred"])
def test_value_past_k_stops_at_its_run(where, side):
    """The kernel stops at the first voxel of the run holding the bad value (that voxel itself:
    the run is made of it, its pair differs from its neighbours'), having counted every voxel
    before it; past the last whole block, the tail is the caller's."""
    rng = np.random.default_rng(where)
    k = 200
    gt, pred = _pair(rng, 64 * 9 + 5, k, 5)
    (gt if side == "gt" else pred)[where] = 230
    acc = np.zeros(k * k, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    done = cpu.count_runs(gt, pred, np.uint64(0), False, np.uint64(k), np.uint64(k), k, acc, state)
    assert done == min(where, 64 * 9)
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k))


def test_value_past_k_in_a_long_run_stops_at_the_run_start():
    gt = np.zeros(64 * 4, np.uint8)
    pred = np.zeros_like(gt)
    gt[70:150] = 9  # one run across two block edges, past K = 8
    acc = np.zeros(64, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    assert cpu.count_runs(gt, pred, np.uint64(0), False, np.uint64(8), np.uint64(8), 8, acc, state) == 70
    assert acc[0] == 70 and acc.sum() == 70


def test_ignored_gt_voxels_are_not_checked():
    """As in the word kernel: a gt voxel with the ignore label is skipped whatever its pred value."""
    gt = np.zeros(128, np.uint8)
    pred = np.zeros(128, np.uint8)
    gt[70] = 9  # the ignore label
    pred[70] = 250  # past K, but ignored
    acc = np.zeros(16, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    assert cpu.count_runs(gt, pred, np.uint64(9), True, np.uint64(4), np.uint64(4), 4, acc, state) == 128
    assert acc[0] == 127 and acc.sum() == 127 and state[cpu.NIGNORED] == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("k", [5, 17, 128])
def test_through_the_public_api(dtype, k):
    """Chunks of 1-byte labels with K > 4 go through count_runs: a tail past the last block, the
    ignore label."""
    rng = np.random.default_rng(k)
    gt, pred = _pair(rng, 7 * 9 * 131, k, 6)
    gt, pred = gt.reshape(7, 9, 131).astype(dtype), pred.reshape(7, 9, 131).astype(dtype)
    cm = fse.confusion_matrix(pred, gt, num_classes=k, ignore_label=3)
    np.testing.assert_array_equal(cm, _numpy(gt.ravel().astype(np.int64), pred.ravel().astype(np.int64), k, 3))


@pytest.mark.parametrize("where", [(0, 0, 0), (3, 5, 64), (6, 8, 130)])
def test_invalid_label_reported_at_its_voxel(where):
    rng = np.random.default_rng(1)
    gt, pred = _pair(rng, 7 * 9 * 131, 10, 4)
    gt, pred = gt.reshape(7, 9, 131), pred.reshape(7, 9, 131)
    pred[where] = 77
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred, gt, num_classes=10)
    assert info.value.position == where and info.value.value == 77 and info.value.role == "pred"


def test_negative_int8_values_are_refused():
    gt = np.zeros((2, 3, 100), np.int8)
    pred = np.zeros_like(gt)
    gt[1, 2, 90] = -3
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred, gt, num_classes=200)
    assert info.value.position == (1, 2, 90) and info.value.value == -3


def test_lane_diff64_equals_numpy():
    """The run-start intrinsic against numpy: bit i set where byte pos + i differs from the byte
    before it, at unaligned starts, every byte value, equal neighbours across the 64 lanes."""
    from numba import njit

    from fastseg_eval.kernels.simd import lane_diff64

    @njit
    def mask(a, pos):
        return lane_diff64(a, pos)

    rng = np.random.default_rng(4)
    a = np.concatenate([
        np.arange(256, dtype=np.uint8), np.repeat(rng.integers(0, 256, size=60, dtype=np.uint8), 5),
        np.zeros(100, np.uint8),
    ])  # fmt: skip
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    for pos in (1, 3, 64, 100, 255, 256, 300, 480, len(a) - 64):
        hit = a[pos : pos + 64] != a[pos - 1 : pos + 63]
        assert int(mask(a, pos)) == int(hit.astype(np.uint64) @ weights), pos
