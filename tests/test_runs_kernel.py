"""The run kernel for 1-byte labels (``kernels.cpu.count_runs``): where runs of one (gt, pred)
pair start comes 64 voxels at a time from vector compares of each input with itself one voxel
later; each run adds its length to its pair's cell. ``count_runs_listed`` (and
``count_runs16_listed``) list a stretch's run starts first by vector compress, then count them;
every test of a kernel runs on both kinds, and the public API's on both choices of the reducer.

Checked against numpy on uniform blocks, blocks of 2..64 distinct pairs, runs across block
edges and across the whole chunk, ignore labels, chunk lengths that are not whole blocks, signed
8-bit inputs; a value past K anywhere stops the kernel at the first voxel of its run, and the
public API then reports that voxel, exactly where it is.

The same for 2-byte labels through the label lookup (``kernels.cpu.count_runs16``, 32 voxels at a
time): discovery that grows the tables mid-chunk (the kernel stops at a run and resumes there),
dense and diagonal + marginals tables, runs on the diagonal of every length, errors at their voxel;
``num_classes >= 65536`` on uint16 ids, where every value is a label and the run kernels test
nothing per run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseg_eval as fse
from fastseg_eval.errors import LabelError
from fastseg_eval.kernels import cpu, simd
from fastseg_eval.reducers import confusion

_LISTED = pytest.mark.skipif(not simd.VECTOR_COMPRESS, reason="numba's LLVM has no vector compress (LLVM < 19)")


def _listed(g1, p1, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, state):
    starts = np.full(cpu.LIST_SIZE, 0xABCD, dtype=np.uint16)  # garbage: every slot used is written first
    return cpu.count_runs_listed(g1, p1, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, state, starts)


RUNS = pytest.mark.parametrize(
    "runs", [cpu.count_runs, pytest.param(_listed, marks=_LISTED)], ids=["walked", "listed"]
)


@pytest.fixture(params=[False, pytest.param(True, marks=_LISTED)], ids=["walked", "listed"])
def kernel_choice(request, monkeypatch):
    """The reducer's choice of run kernels, both ways (whatever this CPU would choose)."""
    monkeypatch.setattr(confusion, "LISTED_RUNS", request.param)
    return request.param


def _numpy(gt, pred, k, ignore=None):
    keep = np.ones(gt.shape, bool) if ignore is None else gt != ignore
    return np.bincount(gt[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


def _pair(rng, n, values, pairs_per_block, block=64, dtype=np.uint8):
    """Blocks of ``block`` voxels with about ``pairs_per_block`` distinct pairs each, labels drawn
    from ``values`` (an array, or ``range(values)`` for an int)."""
    nblocks = n // block + 1
    gt = np.empty(nblocks * block, dtype)
    pred = np.empty(nblocks * block, dtype)
    for b in range(nblocks):
        d = int(rng.integers(1, pairs_per_block + 1))
        cuts = np.sort(rng.choice(np.arange(1, block), size=d - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [block]]).astype(np.int64))
        gt[b * block : (b + 1) * block] = np.repeat(rng.choice(values, size=d), lengths)
        pred[b * block : (b + 1) * block] = np.repeat(rng.choice(values, size=d), lengths)
    return gt[:n], pred[:n]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 256),
    n=st.integers(0, 3000),
    pairs=st.sampled_from([1, 2, 4, 5, 9, 64]),
    seed=st.integers(0, 2**32 - 1),
    use_ignore=st.booleans(),
)
@RUNS
def test_count_runs_equals_numpy(runs, k, n, pairs, seed, use_ignore):
    rng = np.random.default_rng(seed)
    gt, pred = _pair(rng, n, k, pairs)
    if pairs == 1 and n > 200:  # runs across blocks: one pair over a long stretch
        gt[50:180], pred[50:180] = gt[60], pred[60]
    ignore = int(gt[0]) if use_ignore and n else None
    acc = np.zeros(k * k, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    done = runs(gt, pred, np.uint64(ignore or 0), ignore is not None, np.uint64(k), np.uint64(k), k, acc, state)
    assert done == n // 64 * 64  # the tail is the caller's
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k, ignore))
    if ignore is not None:
        assert state[cpu.NIGNORED] == int((gt[:done] == ignore).sum())


@pytest.mark.parametrize("where", [0, 63, 64, 64 * 5 + 17, 64 * 9 - 1, 64 * 9 + 2])
@pytest.mark.parametrize("side", ["gt", "pred"])
@RUNS
def test_value_past_k_stops_at_its_run(runs, where, side):
    """The kernel stops at the first voxel of the run holding the bad value (that voxel itself:
    the run is made of it, its pair differs from its neighbours'), having counted every voxel
    before it; past the last whole block, the tail is the caller's."""
    rng = np.random.default_rng(where)
    k = 200
    gt, pred = _pair(rng, 64 * 9 + 5, k, 5)
    (gt if side == "gt" else pred)[where] = 230
    acc = np.zeros(k * k, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    done = runs(gt, pred, np.uint64(0), False, np.uint64(k), np.uint64(k), k, acc, state)
    assert done == min(where, 64 * 9)
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k))


@RUNS
def test_value_past_k_in_a_long_run_stops_at_the_run_start(runs):
    gt = np.zeros(64 * 4, np.uint8)
    pred = np.zeros_like(gt)
    gt[70:150] = 9  # one run across two block edges, past K = 8
    acc = np.zeros(64, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    assert runs(gt, pred, np.uint64(0), False, np.uint64(8), np.uint64(8), 8, acc, state) == 70
    assert acc[0] == 70 and acc.sum() == 70


@RUNS
def test_ignored_gt_voxels_are_not_checked(runs):
    """As in the word kernel: a gt voxel with the ignore label is skipped whatever its pred value."""
    gt = np.zeros(128, np.uint8)
    pred = np.zeros(128, np.uint8)
    gt[70] = 9  # the ignore label
    pred[70] = 250  # past K, but ignored
    acc = np.zeros(16, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    assert runs(gt, pred, np.uint64(9), True, np.uint64(4), np.uint64(4), 4, acc, state) == 128
    assert acc[0] == 127 and acc.sum() == 127 and state[cpu.NIGNORED] == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("k", [5, 17, 128])
def test_through_the_public_api(kernel_choice, dtype, k):
    """Chunks of 1-byte labels with K > 4 go through count_runs: a tail past the last block, the
    ignore label."""
    rng = np.random.default_rng(k)
    gt, pred = _pair(rng, 7 * 9 * 131, k, 6)
    gt, pred = gt.reshape(7, 9, 131).astype(dtype), pred.reshape(7, 9, 131).astype(dtype)
    cm = fse.confusion_matrix(pred, gt, num_classes=k, ignore_label=3)
    np.testing.assert_array_equal(cm, _numpy(gt.ravel().astype(np.int64), pred.ravel().astype(np.int64), k, 3))


@pytest.mark.parametrize("where", [(0, 0, 0), (3, 5, 64), (6, 8, 130)])
def test_invalid_label_reported_at_its_voxel(kernel_choice, where):
    rng = np.random.default_rng(1)
    gt, pred = _pair(rng, 7 * 9 * 131, 10, 4)
    gt, pred = gt.reshape(7, 9, 131), pred.reshape(7, 9, 131)
    pred[where] = 77
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred, gt, num_classes=10)
    assert info.value.position == where and info.value.value == 77 and info.value.role == "pred"


@pytest.mark.parametrize(
    "dtype,side,where,value,k",
    [(np.int8, "gt", (1, 2, 90), -3, 200), (np.int16, "pred", (1, 2, 45), -7, 1000)],
    ids=["int8-gt", "int16-pred"],
)
def test_negative_values_are_refused_at_their_voxel(kernel_choice, dtype, side, where, value, k):
    """Signed 1-byte (count_runs) and 2-byte (count_runs16) labels: a negative value is refused
    where it is."""
    gt = np.zeros((2, 3, 100), dtype)
    pred = np.zeros_like(gt)
    (gt if side == "gt" else pred)[where] = value
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred, gt, num_classes=k)
    assert info.value.position == where and info.value.value == value and info.value.role == side


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


# ------------------------------------------------------------- 2-byte labels: count_runs16
def _pair16(rng, n, values, pairs_per_block):
    return _pair(rng, n, values, pairs_per_block, block=32, dtype=np.uint16)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2500),
    pairs=st.sampled_from([1, 2, 5, 32]),
    nvalues=st.sampled_from([3, 300, 5000]),
    seed=st.integers(0, 2**32 - 1),
    use_ignore=st.booleans(),
    dense=st.booleans(),
)
def test_uint16_chunks_equal_numpy(kernel_choice, n, pairs, nvalues, seed, use_ignore, dense):
    """Discovery of 2-byte labels (tables grown while counting: the kernel stops at a run and
    resumes there), dense or diagonal + marginals, the ignore label, chunk lengths that are not
    whole blocks; counts equal numpy's."""
    rng = np.random.default_rng(seed)
    values = np.sort(rng.choice(65536, size=nvalues, replace=False)).astype(np.uint16)
    gt, pred = _pair16(rng, n, values, pairs)
    agree = rng.random(n) < 0.6  # diagonal runs of every length, down to single voxels
    pred[agree] = gt[agree]
    if pairs == 1 and n > 200:
        gt[20:150], pred[20:150] = gt[30], pred[30]  # a run across block edges
    ignore = int(gt[n // 2]) if use_ignore else None
    acc = fse.ConfusionMatrix(ignore_label=ignore, dense_max=65536 if dense else 16)
    acc.update(pred.reshape(1, 1, n), gt.reshape(1, 1, n))
    keep = np.ones(n, bool) if ignore is None else gt != ignore
    labels = np.union1d(gt[keep], pred[keep])
    np.testing.assert_array_equal(acc.labels, labels)
    gi, pi = np.searchsorted(labels, gt[keep]), np.searchsorted(labels, pred[keep])
    k = labels.size
    table = np.bincount(gi * k + pi, minlength=k * k).reshape(k, k)
    np.testing.assert_array_equal(acc.gt_counts, table.sum(axis=1))
    np.testing.assert_array_equal(acc.pred_counts, table.sum(axis=0))
    np.testing.assert_array_equal(acc.diagonal, np.diagonal(table))
    if dense and k <= 65536:
        np.testing.assert_array_equal(acc.counts, table)


@pytest.mark.parametrize("where", [0, 31, 32, 32 * 5 + 17, 32 * 9 - 1, 32 * 9 + 2])
@pytest.mark.parametrize("side", ["gt", "pred"])
def test_uint16_label_past_k_reported_at_its_voxel(kernel_choice, where, side):
    rng = np.random.default_rng(where)
    gt, pred = _pair16(rng, 32 * 9 + 5, np.arange(300), 5)
    (gt if side == "gt" else pred)[where] = 4000
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred.reshape(1, 1, -1), gt.reshape(1, 1, -1), num_classes=300)
    assert info.value.position == (0, 0, where) and info.value.value == 4000 and info.value.role == side


def test_lane_diff32_equals_numpy():
    from numba import njit

    from fastseg_eval.kernels.simd import lane_diff32

    @njit
    def mask(a, pos):
        return lane_diff32(a, pos)

    rng = np.random.default_rng(6)
    a = np.concatenate([np.repeat(rng.integers(0, 65536, size=40, dtype=np.uint16), 4), np.zeros(50, np.uint16)])
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    for arr in (a, a.view(np.int16)):
        for pos in (1, 3, 32, 100, 150, len(a) - 32):
            hit = arr[pos : pos + 32] != arr[pos - 1 : pos + 31]
            assert int(mask(arr, pos)) == int(hit.astype(np.uint64) @ weights), pos


# ------------------------------------------------------------- the listed kernels: many stretches
STRETCH = cpu.LISTED * 64  # voxels whose run starts one list holds


def _long_pair(rng, n, k, dtype):
    """Stretches of short runs (a few voxels), long runs across the stretch edges, one pair over
    a whole stretch, and voxel-by-voxel changes."""
    gt, pred = _pair(rng, n, k, 6, dtype=dtype)
    for edge in range(STRETCH, n, STRETCH):
        lo, hi = max(0, edge - 100), min(n, edge + 37)
        gt[lo:hi], pred[lo:hi] = gt[lo], pred[lo]  # a run across the edge
    if n > 2 * STRETCH + 10:
        gt[STRETCH + 5 : 2 * STRETCH + 5], pred[STRETCH + 5 : 2 * STRETCH + 5] = 1, 2  # one run, a whole stretch
    noise = slice(n // 3, n // 3 + 500)
    gt[noise] = rng.integers(0, k, size=len(gt[noise]))
    return gt, pred


@_LISTED
@pytest.mark.parametrize("n", [STRETCH - 1, STRETCH + 64, 3 * STRETCH + 777, 5 * STRETCH])
def test_listed_kernel_across_stretches(n):
    rng = np.random.default_rng(n)
    k = 256
    gt, pred = _long_pair(rng, n, k, np.uint8)
    for ignore in (None, int(gt[STRETCH // 2])):
        acc = np.zeros(k * k, dtype=np.int64)
        state = np.zeros(8, dtype=np.int64)
        done = _listed(gt, pred, np.uint64(ignore or 0), ignore is not None, np.uint64(k), np.uint64(k), k, acc, state)
        assert done == n // 64 * 64
        np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k, ignore))
        assert state[cpu.NIGNORED] == (0 if ignore is None else int((gt[:done] == ignore).sum()))


@_LISTED
@pytest.mark.parametrize("where", [STRETCH - 1, STRETCH, STRETCH + 1, 2 * STRETCH + 33, 3 * STRETCH - 64])
def test_listed_kernel_stops_in_a_later_stretch(where):
    """A value past K in a later stretch: every voxel before its run is counted, the result is
    its run's first voxel (the voxel itself: its pair differs from both neighbours')."""
    rng = np.random.default_rng(where)
    n = 3 * STRETCH + 100
    k = 100
    gt, pred = _pair(rng, n, k, 4)
    pred[where] = 250
    acc = np.zeros(k * k, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    done = _listed(gt, pred, np.uint64(0), False, np.uint64(k), np.uint64(k), k, acc, state)
    assert done == where
    np.testing.assert_array_equal(acc.reshape(k, k), _numpy(gt[:done], pred[:done], k))


@pytest.mark.parametrize("n", [3 * STRETCH + 777, 5 * STRETCH])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "marginals"])
def test_uint16_across_stretches(kernel_choice, n, dense):
    """2-byte labels over many stretches: discovery grows the tables in later stretches too (new
    labels keep arriving), and a bad value in the third stretch is reported at its voxel."""
    rng = np.random.default_rng(n)
    values = np.sort(rng.choice(65536, size=3000, replace=False)).astype(np.uint16)
    gt, pred = _long_pair(rng, n, len(values), np.uint16)
    gt, pred = values[gt], values[pred]
    agree = rng.random(n) < 0.5
    pred[agree] = gt[agree]
    acc = fse.ConfusionMatrix(dense_max=4096 if dense else 16)
    acc.update(pred.reshape(1, 1, n), gt.reshape(1, 1, n))
    labels = np.union1d(gt, pred)
    np.testing.assert_array_equal(acc.labels, labels)
    gi, pi = np.searchsorted(labels, gt), np.searchsorted(labels, pred)
    np.testing.assert_array_equal(acc.gt_counts, np.bincount(gi, minlength=labels.size))
    np.testing.assert_array_equal(acc.pred_counts, np.bincount(pi, minlength=labels.size))
    np.testing.assert_array_equal(acc.diagonal, np.bincount(gi[gi == pi], minlength=labels.size))
    if dense:
        np.testing.assert_array_equal(acc.counts, np.bincount(gi * labels.size + pi, minlength=labels.size**2).reshape(labels.size, -1))
    fixed = np.unique(np.concatenate([gt, pred])).astype(np.int64)
    where = 2 * STRETCH + 70
    bad = int(np.setdiff1d(np.arange(65536), fixed)[0])
    gt[where] = bad
    with pytest.raises(LabelError) as info:
        fse.confusion_matrix(pred.reshape(1, 1, n), gt.reshape(1, 1, n), labels=fixed[:4000])
    assert info.value.position == (0, 0, where) and info.value.value == bad and info.value.role == "gt"


@pytest.mark.parametrize("k", [65536, 70000])
@pytest.mark.parametrize("ignore", [None, 7], ids=["no-ignore", "ignore-7"])
def test_uint16_ids_every_value_a_label(kernel_choice, k, ignore):
    """``num_classes >= 65536`` on uint16 inputs: every value is a label, its own index (both run
    kernels count such runs with no test at all; with an ignore label they test each run).
    Over many stretches, values 0 and 65535, against numpy; on int16 inputs a negative value
    is still refused at its voxel."""
    rng = np.random.default_rng(k)
    n = 3 * STRETCH + 777
    values = np.concatenate([[0, 7, 65535, 65534], rng.choice(np.arange(8, 65534), size=2000, replace=False)])
    gt, pred = _long_pair(rng, n, len(values), np.uint16)
    gt, pred = values[gt].astype(np.uint16), values[pred].astype(np.uint16)
    agree = rng.random(n) < 0.5
    pred[agree] = gt[agree]
    gt[:9], pred[:9] = 65535, np.array([65535, 65535, 0, 0, 7, 7, 7, 65535, 65535])
    acc = fse.ConfusionMatrix(num_classes=k, ignore_label=ignore)
    acc.update(pred.reshape(1, 1, n), gt.reshape(1, 1, n))
    keep = np.ones(n, bool) if ignore is None else gt != ignore
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    assert not acc.is_dense and acc.num_classes == k
    np.testing.assert_array_equal(acc.gt_counts, np.bincount(g, minlength=k))
    np.testing.assert_array_equal(acc.pred_counts, np.bincount(p, minlength=k))
    np.testing.assert_array_equal(acc.diagonal, np.bincount(g[g == p], minlength=k))
    assert acc.n_ignored == n - int(keep.sum())
    where = 2 * STRETCH + 70
    signed = pred.view(np.int16).copy()
    signed[signed < 0] = 5
    signed[where] = -3
    with pytest.raises(LabelError) as info:
        fse.ConfusionMatrix(num_classes=k).update(signed.reshape(1, 1, n), gt.view(np.int16).clip(0).reshape(1, 1, n))
    assert info.value.position == (0, 0, where) and info.value.value == -3 and info.value.role == "pred"


@_LISTED
@pytest.mark.parametrize(
    "lanes,dtype", [(64, np.uint8), (64, np.uint16), (64, np.uint32), (64, np.uint64), (32, np.uint16)],
    ids=["64-uint8", "64-uint16", "64-uint32", "64-uint64", "32-uint16"],
)
def test_run_starts_intrinsics_equal_numpy(lanes, dtype):
    """``run_starts64`` (any label width) / ``run_starts32`` (2-byte labels): the offsets ``base +
    i`` of the lanes where (g1, p1) differs from the voxel before, in order, written from slot
    ``k`` on; returns ``k`` plus their count. Unaligned positions, every lane count from none to
    all, signed views, high bits that differ, slots before ``k`` untouched."""
    from numba import njit

    from fastseg_eval.kernels.simd import run_starts32, run_starts64

    fn = run_starts64 if lanes == 64 else run_starts32

    @njit
    def listed(g1, p1, pos, base, out, k):
        return fn(g1, p1, pos, base, out, k)

    rng = np.random.default_rng(lanes + np.dtype(dtype).itemsize)
    n = 4000
    g1 = np.repeat(rng.integers(0, 3, size=n // 2), 2).astype(dtype)
    p1 = rng.integers(0, 2, size=n).astype(dtype) * (rng.random(n) < 0.2)
    g1[1000:1100] = 7  # no change at all
    p1[1000:1100] = 7
    g1[2000:2100] = np.arange(100)  # a change at every voxel
    top = dtype(np.iinfo(dtype).max)
    g1[3000:3050:2] = top  # values that differ only in their high bits
    g1[3001:3050:2] = top ^ dtype(1 << (8 * np.dtype(dtype).itemsize - 1))
    signed = np.dtype(f"int{8 * np.dtype(dtype).itemsize}")
    for a, b in ((g1, p1), (g1.view(signed), p1.view(signed))):
        for pos in (1, 5, 64, 999, 1001, 1990, 2003, 2990, n - lanes):
            for base, k in ((0, 0), (pos % 977, 3), (65535 - lanes + 1, 40)):
                out = np.full(k + lanes + 8, 0x7777, dtype=np.uint16)
                got = listed(a, b, pos, base, out, k)
                hit = np.flatnonzero(
                    (a[pos : pos + lanes] != a[pos - 1 : pos + lanes - 1]) | (b[pos : pos + lanes] != b[pos - 1 : pos + lanes - 1])
                )
                assert got == k + hit.size
                np.testing.assert_array_equal(out[k : k + hit.size], base + hit)
                assert (out[:k] == 0x7777).all()


def test_fast_compress_follows_the_features_numba_compiles_for(monkeypatch):
    """The listed kernels are chosen by the features numba's JIT uses (``NUMBA_CPU_FEATURES``,
    else the host's): AVX-512 VBMI2 and BW, never on an LLVM without the vector compress."""
    from numba.core import config

    monkeypatch.setattr(simd, "VECTOR_COMPRESS", True)
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw,+avx512vbmi2")
    assert simd.fast_compress()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw,-avx512vbmi2")
    assert not simd.fast_compress()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma")
    assert not simd.fast_compress()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512bw,+avx512vbmi2")
    monkeypatch.setattr(simd, "VECTOR_COMPRESS", False)
    assert not simd.fast_compress()
