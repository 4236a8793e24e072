"""The streaming ConfusionMatrix accumulator: batches, merges, pickling, fixed label spaces, errors."""

from __future__ import annotations

import pickle

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import make_labels, perturb, reference_confusion, reference_marginals, seeds

import fastseg_eval as fse
from fastseg_eval.errors import FastSegError, LabelError, OptionError


def _same_counts(acc, ref_cm, ref_labels):
    assert [int(x) for x in acc.labels] == [int(x) for x in ref_labels]
    if acc.is_dense:
        np.testing.assert_array_equal(acc.counts, ref_cm)
    np.testing.assert_array_equal(acc.diagonal, np.diagonal(ref_cm))
    np.testing.assert_array_equal(acc.gt_counts, ref_cm.sum(axis=1))
    np.testing.assert_array_equal(acc.pred_counts, ref_cm.sum(axis=0))
    assert acc.n_voxels == ref_cm.sum()


@st.composite
def batch_streams(draw, max_batches=5):
    """A list of (pred, gt) batches of different shapes whose label sets differ from batch to batch."""
    rng = np.random.default_rng(draw(seeds))
    n = draw(st.integers(1, max_batches))
    big = draw(st.booleans())
    universe = [0, 1, 2, 3, 7, 40, 255] + ([65536, 2**40, 2**63 + 5] if big else [])
    dt = np.dtype("uint64") if big else np.dtype(draw(st.sampled_from(["uint8", "int32"])))
    batches = []
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=draw(st.integers(1, 3))))
        k = int(rng.integers(1, 4))
        pool = [int(v) for v in rng.choice(universe, size=k, replace=False)]
        gt = make_labels(shape, dt, pool, rng)
        batches.append((perturb(gt, dt, pool, 0.5, rng), gt))
    return batches


def _concat(batches):
    return (
        np.concatenate([p.reshape(-1) for p, _ in batches]),
        np.concatenate([g.reshape(-1) for _, g in batches]),
    )


@settings(max_examples=40)
@given(batch_streams(), st.sampled_from([None, 3]), st.sampled_from([1024, 2]))
def test_batches_equal_one_shot(batches, ignore, dense_max):
    pred_all, gt_all = _concat(batches)
    acc = fse.ConfusionMatrix(ignore_label=ignore, dense_max=dense_max)
    for pred, gt in batches:
        assert acc.update(pred, gt) is acc
    ref, labels = reference_confusion(pred_all, gt_all, ignore_label=ignore)
    if len(labels) <= dense_max:
        _same_counts(acc, ref, labels)
    else:
        assert not acc.is_dense
        _same_counts(acc, ref, labels)
    one = fse.ConfusionMatrix(ignore_label=ignore, dense_max=dense_max).update(pred_all, gt_all)
    _same_counts(one, ref, labels)
    ignored = 0 if ignore is None else int(np.count_nonzero(gt_all == ignore))
    assert acc.n_ignored == one.n_ignored == ignored


@settings(max_examples=40)
@given(batch_streams(max_batches=6), st.integers(0, 6), st.sampled_from([1024, 3]))
def test_merge_of_different_label_sets(batches, cut, dense_max):
    """Accumulators that discovered different labels (in different orders) merge into the one-shot counts."""
    cut = min(cut, len(batches))
    a = fse.ConfusionMatrix(dense_max=dense_max)
    b = fse.ConfusionMatrix(dense_max=1024)  # dense and marginals-mode accumulators merge too
    for pred, gt in batches[:cut]:
        a.update(pred, gt)
    for pred, gt in reversed(batches[cut:]):
        b.update(pred, gt)
    pred_all, gt_all = _concat(batches)
    ref, labels = reference_confusion(pred_all, gt_all)
    merged = a.copy().merge(b)
    _same_counts(merged, ref, labels)
    _same_counts(b + a, ref, labels)
    # merge leaves the other side alone
    if cut < len(batches):
        rb, lb = reference_confusion(*_concat(batches[cut:]))
        _same_counts(b, rb, lb)


def test_merge_into_fixed_label_space():
    fixed = fse.ConfusionMatrix(labels=[3, 0, 1])
    fixed.update(np.array([0, 1, 3]), np.array([0, 1, 1]))
    other = fse.ConfusionMatrix()
    other.update(np.array([3, 3, 0]), np.array([3, 1, 0]))
    fixed.merge(other)
    pred = np.array([0, 1, 3, 3, 3, 0])
    gt = np.array([0, 1, 1, 3, 1, 0])
    ref, _ = reference_confusion(pred, gt, labels=[3, 0, 1])
    _same_counts(fixed, ref, [3, 0, 1])

    outside = fse.ConfusionMatrix().update(np.array([0, 5]), np.array([0, 1]))
    before = fixed.counts
    with pytest.raises(OptionError, match=r"label 5.*not among"):
        fixed.merge(outside)
    np.testing.assert_array_equal(fixed.counts, before)  # unchanged by the refused merge


@pytest.mark.parametrize("k", [3, 65536, 65540], ids=["K=3", "K=65536", "K=65540 (hashed)"])
@pytest.mark.parametrize("dense_max", [1024, 2], ids=["dense", "marginals"])
def test_fixed_range_space_spawned_and_merged(k, dense_max):
    """``num_classes=K`` builds its label space without hashing where values are indices (K <=
    65536); spawned workers' tables add as they are, other fixed spaces through the labels."""
    rng = np.random.default_rng(k)
    pool = np.array([0, 1, k - 2, k - 1], dtype=np.int64)
    pred, gt = rng.choice(pool, size=(2, 5, 7, 9))
    parts = [fse.ConfusionMatrix(k, dense_max=dense_max) for _ in range(2)]
    parts.append(parts[0].spawn())
    for part, sl in zip(parts, (slice(0, 2), slice(2, 4), slice(4, 5))):
        part.update(pred[sl], gt[sl])
    shuffled = fse.ConfusionMatrix(labels=[k - 1, *range(k - 1)], dense_max=dense_max)  # same labels, other order
    shuffled.update(pred[:1], gt[:1])
    whole = parts[0].merge(parts[1]).merge(parts[2])
    ref, _ = reference_confusion(pred, gt, labels=range(k)) if k < 100 else (None, None)
    if ref is not None:
        _same_counts(whole, ref, range(k))
    np.testing.assert_array_equal(whole.diagonal, np.bincount(gt[gt == pred], minlength=k))
    np.testing.assert_array_equal(whole.gt_counts, np.bincount(gt.ravel(), minlength=k))
    np.testing.assert_array_equal(whole.pred_counts, np.bincount(pred.ravel(), minlength=k))
    assert whole.n_voxels == gt.size
    with pytest.raises(LabelError, match=f"label {k}"):
        fse.ConfusionMatrix(k).update(np.array([k]), np.array([0]))
    before = fse.ConfusionMatrix(k, dense_max=dense_max).update(pred[:1], gt[:1])
    before.merge(shuffled)  # the same labels in another order go through the lookup
    np.testing.assert_array_equal(before.gt_counts, 2 * np.bincount(gt[:1].ravel(), minlength=k))
    np.testing.assert_array_equal(before.diagonal, 2 * np.bincount(gt[:1][gt[:1] == pred[:1]], minlength=k))


@pytest.mark.parametrize("k", [4, 65536], ids=["K=4", "K=65536"])
def test_labels_0_to_k_share_one_lookup_table_that_nothing_writes(k):
    """Accumulators of ``num_classes=K`` (K <= 65536: values are indices) share one lookup table
    and one key list instead of making them per accumulator and per worker (0.33 ms of fresh
    pages per worker at K = 65536). Shared means never written: values outside the space are
    refused, through every kernel, by a spawned worker and in merges, and the table stays as it was."""
    a, b = fse.ConfusionMatrix(k), fse.ConfusionMatrix(k, dense_max=2)
    worker = a.spawn()
    assert a._lut is b._lut is worker._lut and a._keys is b._keys is worker._keys
    lut, keys = a._lut.copy(), a._keys.copy()
    bad = np.full((3, 5, 64), k - 1, dtype=np.int32)
    bad[1, 2, 33] = k + 7  # past the space (and for K=4 still inside the lookup table's range)
    for dtype in (np.int32, np.uint16, np.uint8):
        if np.iinfo(dtype).max < k + 7:
            continue
        for acc in (a, b, worker):
            fresh = acc.spawn()
            with pytest.raises(LabelError, match=f"label {k + 7}"):
                fresh.add_chunk(bad.astype(dtype), np.zeros_like(bad, dtype=dtype))
            with pytest.raises(LabelError, match=f"label {k + 7}"):
                fse.ConfusionMatrix(k).update(np.zeros_like(bad, dtype=dtype), bad.astype(dtype), workers=2)
    np.testing.assert_array_equal(a._lut, lut)
    np.testing.assert_array_equal(a._keys, keys)
    outside = fse.ConfusionMatrix(labels=[0, k + 7]).update(np.array([k + 7]), np.array([k + 7]))
    with pytest.raises(OptionError, match="not among"):
        fse.ConfusionMatrix(k).merge(outside)
    np.testing.assert_array_equal(a._lut, lut)
    np.testing.assert_array_equal(a._keys, keys)
    rng = np.random.default_rng(k)
    pred, gt = rng.integers(0, k, size=(2, 4, 16, 64)).astype(np.uint16 if k > 256 else np.uint8)
    for acc in (a, b):
        acc.update(pred, gt, workers=2)
        np.testing.assert_array_equal(acc.gt_counts, np.bincount(gt.ravel(), minlength=k))
        np.testing.assert_array_equal(acc.diagonal, np.bincount(gt[gt == pred], minlength=k))
    assert a._lut is fse.ConfusionMatrix(k)._lut  # still shared after counting
    np.testing.assert_array_equal(a._lut, lut)


def test_int32_tables_widen_before_they_could_overflow(monkeypatch):
    """A large fixed label space keeps its diagonal + marginals in int32 while no cell can pass
    2**31 - 1; it widens to int64 before a chunk that could, before a merge that could, before a
    constant chunk's counts are multiplied, and when restored from a pickle. Every count stays
    exact and reads back as int64."""
    from fastseg_eval.reducers import confusion

    rng = np.random.default_rng(3)
    pred, gt = rng.integers(0, 65536, size=(2, 6, 20, 30), dtype=np.uint16)
    pred[:, :10] = gt[:, :10]

    def check(acc, planes, width):
        assert acc._acc.dtype == width  # noqa: SLF001 - the table under test
        g, p = gt[planes].astype(np.int64).ravel(), pred[planes].astype(np.int64).ravel()
        for got, want in (
            (acc.gt_counts, np.bincount(g, minlength=65536)),
            (acc.pred_counts, np.bincount(p, minlength=65536)),
            (acc.diagonal, np.bincount(g[g == p], minlength=65536)),
        ):
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)

    monkeypatch.setattr(confusion, "INT32_ROOM", 2500)  # room for 4 planes of 600 voxels
    acc = fse.ConfusionMatrix(num_classes=65536)
    for z in range(4):
        acc.add_chunk(gt[z], pred[z])
    check(acc, slice(0, 4), np.int32)  # 2400 voxels fit
    acc.add_chunk(gt[4], pred[4])  # 3000 > 2500: widened first
    check(acc, slice(0, 5), np.int64)
    check(pickle.loads(pickle.dumps(acc)), slice(0, 5), np.int64)

    merged = fse.ConfusionMatrix(num_classes=65536).update(pred[:2], gt[:2])  # workers' int32 tables merged
    check(merged, slice(0, 2), np.int32)
    for z in (2, 3):
        other = merged.spawn()
        other.add_chunk(gt[z], pred[z])
        merged.merge(other)
    check(merged, slice(0, 4), np.int32)  # 2400 voxels fit
    other = merged.spawn()
    other.add_chunk(gt[4], pred[4])
    merged.merge(other)  # 3000 would not: widened before the merge
    check(merged, slice(0, 5), np.int64)
    two = fse.ConfusionMatrix(num_classes=65536)
    for z in (0, 1):
        part = fse.ConfusionMatrix(num_classes=65536)
        part.add_chunk(gt[z], pred[z])
        two.merge(part)  # the voxels taken add up through merges: 1200
    three = fse.ConfusionMatrix(num_classes=65536)
    for z in (2, 3):
        three.add_chunk(gt[z], pred[z])
    three.merge(two)  # 1200 + 1200 fit
    check(three, slice(0, 4), np.int32)
    rest = fse.ConfusionMatrix(num_classes=65536)
    rest.add_chunk(gt[4:], pred[4:])
    three.merge(rest)  # 2400 + 1200 would not
    check(three, slice(0, 6), np.int64)
    check(pickle.loads(pickle.dumps(fse.ConfusionMatrix(num_classes=65536).update(pred[:1], gt[:1]))), slice(0, 1), np.int64)
    merged.reset()  # a reset accumulator is an empty one: int32 again
    check(merged.update(pred[5:], gt[5:]), slice(5, 6), np.int32)

    monkeypatch.setattr(confusion, "INT32_ROOM", (1 << 31) - 1)
    big = (2000, 2000, 1000)  # 4e9 voxels of one pair: a constant (unstored) chunk, no memory
    acc = fse.ConfusionMatrix(num_classes=65536)
    acc.add_chunk(np.broadcast_to(np.uint16(5), big), np.broadcast_to(np.uint16(5), big))
    acc.add_chunk(np.broadcast_to(np.uint16(5), (3,)), np.broadcast_to(np.uint16(9), (3,)))
    assert acc.diagonal[5] == acc.gt_counts[5] - 3 == 4 * 10**9
    assert acc.pred_counts[9] == 3 and acc.n_voxels == 4 * 10**9 + 3
    labels = [*range(4999), 2**40]  # 5000 labels, kept as marginals; 2**40 is hashed, not in the lookup table
    one = fse.ConfusionMatrix(labels=labels)
    assert one._acc.dtype == np.int32  # noqa: SLF001
    one.add_chunk(np.broadcast_to(np.uint64(2**40), big), np.broadcast_to(np.uint64(7), big))  # counted once, times n
    assert one.gt_counts[-1] == one.pred_counts[7] == 4 * 10**9 and one.diagonal.sum() == 0
    three = fse.ConfusionMatrix(num_classes=65536)
    for _ in range(3):  # three merges of 4e9 voxels each into an int32 table
        part = fse.ConfusionMatrix(num_classes=65536)
        part.add_chunk(np.broadcast_to(np.uint16(1), big), np.broadcast_to(np.uint16(1), big))
        three.merge(part)
    assert three.diagonal[1] == 12 * 10**9


def test_merge_num_classes_with_discovered_and_marginals():
    a = fse.ConfusionMatrix(4).update(np.array([0, 1, 2, 3]), np.array([0, 1, 1, 3]))
    b = fse.ConfusionMatrix(dense_max=1).update(np.array([2, 2]), np.array([2, 0]))
    assert not b.is_dense
    a.merge(b)
    assert not a.is_dense  # the dense side adopts the marginals mode
    ref, labels = reference_confusion(
        np.array([0, 1, 2, 3, 2, 2]), np.array([0, 1, 1, 3, 2, 0]), labels=range(4)
    )
    _same_counts(a, ref, labels)


def test_merge_rejects_different_ignore_labels():
    a = fse.ConfusionMatrix(ignore_label=255)
    b = fse.ConfusionMatrix(ignore_label=0)
    with pytest.raises(OptionError, match="ignore labels.*255.*0"):
        a.merge(b)


@pytest.mark.parametrize("dense_max", [1024, 2], ids=["dense", "marginals"])
def test_pickle_round_trip(dense_max):
    rng = np.random.default_rng(8)
    pool = [0, 4, 9, 70000, 2**63 + 1]
    gt = make_labels((5, 6, 4), np.dtype("uint64"), pool, rng)
    pred = perturb(gt, np.dtype("uint64"), pool, 0.5, rng)
    mask = rng.random(gt.shape) < 0.8
    acc = fse.ConfusionMatrix(ignore_label=9, dense_max=dense_max).update(pred, gt, mask=mask)
    assert acc.is_dense == (dense_max == 1024)
    back = pickle.loads(pickle.dumps(acc))
    assert back.is_dense == acc.is_dense
    assert back.labels.dtype == acc.labels.dtype == np.uint64
    ref, labels = reference_confusion(pred, gt, mask=mask, ignore_label=9)
    _same_counts(back, ref, labels)
    assert (back.n_ignored, back.n_masked) == (acc.n_ignored, acc.n_masked)
    assert back.n_masked == np.count_nonzero(~mask)
    # the copy keeps counting, with the same result as the original
    acc.update(gt, pred)
    back.update(gt, pred)
    labels2, d, g, p = reference_marginals(
        np.concatenate([pred[mask], gt.ravel()]), np.concatenate([gt[mask], pred.ravel()]), ignore_label=9
    )
    for x in (acc, back):
        assert [int(v) for v in x.labels] == labels2
        np.testing.assert_array_equal(x.diagonal, d)
        np.testing.assert_array_equal(x.gt_counts, g)
        np.testing.assert_array_equal(x.pred_counts, p)
    if acc.is_dense:
        np.testing.assert_array_equal(acc.counts, back.counts)


def test_pickle_fixed_label_space_keeps_rejecting():
    acc = fse.ConfusionMatrix(labels=[2, 0]).update(np.array([0, 2]), np.array([2, 2]))
    back = pickle.loads(pickle.dumps(acc))
    assert back.labels.tolist() == [2, 0]
    np.testing.assert_array_equal(back.counts, [[1, 1], [0, 0]])
    with pytest.raises(LabelError, match="pred has label 1"):
        back.update(np.array([1]), np.array([0]))


def test_failed_add_chunk_poisons_until_reset():
    """A LabelError inside add_chunk leaves partial counts: every later use refuses until reset()."""
    acc = fse.ConfusionMatrix(3)
    acc.add_chunk(np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(LabelError) as ei:
        acc.add_chunk(np.array([0, 1, 1, 2]), np.array([0, 1, 7, 2]))  # gt first, pred 7 at voxel 2
    assert ei.value.role == "pred" and ei.value.value == 7 and ei.value.position == (2,)
    for use in (
        lambda: acc.counts,
        lambda: acc.add_chunk(np.array([0]), np.array([0])),
        lambda: acc.update(np.array([0]), np.array([0])),
        lambda: acc.merge(fse.ConfusionMatrix(3)),
        lambda: fse.ConfusionMatrix(3).merge(acc),
    ):
        with pytest.raises(FastSegError, match=r"reset\(\)"):
            use()
    acc.reset()
    assert acc.counts.sum() == 0 and acc.n_voxels == 0
    acc.update(np.array([2, 1]), np.array([2, 2]))
    np.testing.assert_array_equal(acc.counts, [[0, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert acc.labels.tolist() == [0, 1, 2]


def test_failed_add_chunk_message_names_the_position_in_the_poison_note():
    acc = fse.ConfusionMatrix(2)
    with pytest.raises(LabelError, match=r"voxel \(1, 2\)"):
        acc.add_chunk(np.array([[0, 0, 0], [0, 0, 5]]), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(FastSegError, match=r"gt has label 5 at voxel \(1, 2\)"):
        _ = acc.counts


def test_failed_update_leaves_counts_unchanged():
    """update() counts into per-worker copies and merges only on success (engine contract)."""
    acc = fse.ConfusionMatrix(3).update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    before = acc.counts
    bad = np.zeros((4, 5, 6), dtype=np.uint8)
    bad[3, 4, 5] = 9
    with pytest.raises(LabelError, match=r"pred has label 9 at voxel \(3, 4, 5\)"):
        acc.update(bad, np.zeros_like(bad), workers=2)
    np.testing.assert_array_equal(acc.counts, before)
    acc.update(np.array([2]), np.array([2]))
    before[2, 2] += 1
    np.testing.assert_array_equal(acc.counts, before)


def test_reset_keeps_label_space_and_options():
    acc = fse.ConfusionMatrix(labels=[5, 1], ignore_label=0).update(np.array([5, 1, 1]), np.array([5, 0, 1]))
    assert acc.n_ignored == 1
    acc.reset()
    assert acc.labels.tolist() == [5, 1] and acc.n_ignored == 0 and acc.counts.sum() == 0
    acc.update(np.array([1]), np.array([0]))
    assert acc.n_ignored == 1
    with pytest.raises(LabelError):
        acc.update(np.array([3]), np.array([1]))


def test_result_from_accumulator_equals_evaluate():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 4, size=(4, 5, 6)).astype(np.uint8)
    pred = rng.integers(0, 4, size=(4, 5, 6)).astype(np.uint8)
    acc = fse.ConfusionMatrix()
    for i in range(4):
        acc.update(pred[i], gt[i])
    res = acc.result(tversky_alpha=0.3, tversky_beta=0.7)
    ref = fse.evaluate(pred, gt, tversky_alpha=0.3, tversky_beta=0.7)
    np.testing.assert_array_equal(res.confusion_matrix, reference_confusion(pred, gt)[0])
    assert res.per_class == ref.per_class
    assert res.overall == ref.overall


@pytest.mark.parametrize("dense_max", [1024, 4], ids=["dense", "marginals past 4 labels"])
def test_label_order_read_between_updates_follows_new_labels(dense_max):
    """Discovered labels are sorted once per label set: reading the results, counting new labels
    (the key list grows, or is replaced when the tables grow) and reading again gives the new
    order, with every count at its label."""
    acc = fse.ConfusionMatrix(dense_max=dense_max)
    seen_gt: list[np.ndarray] = []
    seen_pred: list[np.ndarray] = []
    rng = np.random.default_rng(3)
    for values in ([50, 30], [30, 40, 10], [70, 60, 20, 90, 80], [5]):
        gt = rng.choice(values, size=(2, 3, 40)).astype(np.uint16)
        pred = rng.choice(values, size=(2, 3, 40)).astype(np.uint16)
        acc.update(pred, gt)
        seen_gt.append(gt.ravel())
        seen_pred.append(pred.ravel())
        g, p = np.concatenate(seen_gt), np.concatenate(seen_pred)
        labels = np.unique(np.concatenate([g, p]))
        np.testing.assert_array_equal(acc.labels, labels)
        for _ in range(2):  # the second read comes from the kept order
            np.testing.assert_array_equal(acc.gt_counts, [np.count_nonzero(g == v) for v in labels])
            np.testing.assert_array_equal(acc.pred_counts, [np.count_nonzero(p == v) for v in labels])
            np.testing.assert_array_equal(acc.diagonal, [np.count_nonzero((g == v) & (p == v)) for v in labels])
    merged = fse.ConfusionMatrix(dense_max=dense_max).update(np.array([[[1, 99]]]), np.array([[[99, 1]]]))
    merged.labels  # noqa: B018 (sorts)
    merged.merge(acc)
    np.testing.assert_array_equal(merged.labels, np.union1d(labels, [1, 99]))
    np.testing.assert_array_equal(merged.gt_counts[1:-1], acc.gt_counts)


def _by_value_pair(rng, shape, labels, dtype):
    gt = rng.choice(labels, size=shape).astype(dtype)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.choice(labels, size=shape)).astype(dtype)
    return pred, gt


def _check_marginals(acc, pred, gt, keep=None):
    g, p = gt.ravel(), pred.ravel()
    if keep is not None:
        g, p = g[keep.ravel()], p[keep.ravel()]
    labels = np.unique(np.concatenate([g, p]))
    np.testing.assert_array_equal(acc.labels, labels)
    np.testing.assert_array_equal(acc.gt_counts, [np.count_nonzero(g == v) for v in labels])
    np.testing.assert_array_equal(acc.pred_counts, [np.count_nonzero(p == v) for v in labels])
    np.testing.assert_array_equal(acc.diagonal, [np.count_nonzero((g == v) & (p == v)) for v in labels])
    assert acc.n_voxels == len(g)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_discovered_2_byte_labels_past_dense_max_count_by_value(dtype):
    """2-byte labels discovered past dense_max are counted by value (no lookup per run) and
    folded into the label space when read: exact through every kernel (runs, words with a mask,
    a switch in the middle of a chunk), with an ignore label, through merges in every direction,
    pickling, reset and two workers; a negative value is still refused at its voxel."""
    rng = np.random.default_rng(7)
    labels = rng.choice(np.arange(1, 30000), size=300, replace=False)
    pred, gt = _by_value_pair(rng, (6, 24, 97), labels, dtype)  # rows of 97: tails past the 32-voxel blocks
    acc = fse.ConfusionMatrix(dense_max=8)
    for z in range(6):
        acc.add_chunk(gt[z : z + 1], pred[z : z + 1])  # the space turns to marginals inside the first chunk
    assert acc._raw16 is not None and acc._raw16_dirty  # counted by value, not yet folded
    _check_marginals(acc, pred, gt)
    assert not acc._raw16_dirty
    few = fse.ConfusionMatrix(dense_max=8)  # within dense_max: the whole matrix, never by value
    for z in range(6):
        few.add_chunk(gt[z : z + 1] % 5, pred[z : z + 1] % 5)
    assert few._raw16 is None and few.is_dense
    ref, _ = reference_confusion(pred % 5, gt % 5, labels=range(5))
    _same_counts(few, ref, range(5))
    # a mask (the word kernel) and an ignore label, on an accumulator already by value
    mask = rng.random(gt.shape) < 0.7
    ign = int(labels[0])
    masked = fse.ConfusionMatrix(dense_max=8, ignore_label=ign)
    masked.add_chunk(gt[:1], pred[:1])
    for z in range(1, 6):
        masked.add_chunk(gt[z : z + 1], pred[z : z + 1], mask[z : z + 1])
    keep = np.concatenate([np.ones_like(mask[:1]), mask[1:]]) & (gt != ign)
    _check_marginals(masked, pred, gt, keep)
    assert masked.n_ignored == np.count_nonzero(np.concatenate([np.ones_like(mask[:1]), mask[1:]]) & (gt == ign))
    # merges: by value into by value, into a fresh dense one, into a folded one, into a fixed space
    parts = [fse.ConfusionMatrix(dense_max=8) for _ in range(3)]
    for part, z in zip(parts, (slice(0, 2), slice(2, 4), slice(4, 6))):
        part.add_chunk(gt[z], pred[z])
    assert all(p._raw16_dirty for p in parts)
    fresh = fse.ConfusionMatrix(dense_max=8).merge(parts[0])
    assert fresh._raw16_dirty  # taken by value, folded when read
    fresh.merge(parts[1])
    folded = parts[2].copy()
    folded.labels  # noqa: B018 (folds)
    fresh.merge(folded)
    _check_marginals(fresh, pred, gt)
    for part, z in zip(parts, (slice(0, 2), slice(2, 4), slice(4, 6))):
        _check_marginals(part, pred[z], gt[z])  # the merges left them as they were
    fixed = fse.ConfusionMatrix(labels=np.unique(np.concatenate([gt.ravel(), pred.ravel()])).tolist())
    by_value = fse.ConfusionMatrix(dense_max=8)
    by_value.add_chunk(gt, pred)
    fixed.merge(by_value)
    _check_marginals(fixed, pred, gt)
    # pickling and copying an accumulator with counts by value; reset forgets them
    again = fse.ConfusionMatrix(dense_max=8)
    again.add_chunk(gt, pred)
    _check_marginals(pickle.loads(pickle.dumps(again)), pred, gt)
    again.reset()
    assert again.n_voxels == 0 and again.num_classes == 0
    # two workers: each counts by value, the engine merges
    two = fse.ConfusionMatrix(dense_max=8).update(pred, gt, workers=2)
    _check_marginals(two, pred, gt)
    if dtype == np.int16:
        bad = gt.copy()
        bad[3, 5, 60] = -3
        with pytest.raises(LabelError, match=r"label -3 at voxel \(3, 5, 60\)"):
            fse.ConfusionMatrix(dense_max=8).update(pred, bad, workers=1)
