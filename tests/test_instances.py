"""Instance segmentations: the sparse contingency table and the metrics over it, against references.

* the table equals numpy's ``np.unique`` over (gt, pred) pairs (any integer dtypes, ids near
  2**64, ignore label, mask, empty volumes), through the threads engine, dask and an in-process
  dask.distributed cluster, on zarr stores with misaligned chunk grids; partial tables merge and
  pickle exactly; the kernel's growth / resume path and its error positions are exercised;
* VOI and the adapted Rand error equal scikit-image's ``variation_of_information`` and
  ``adapted_rand_error`` to 1e-9 (with precision and recall as CREMI defines them, which
  scikit-image's code returns swapped);
* matching, F1 and PQ / SQ / RQ equal :func:`panoptica_reference`, a transcription of
  panoptica's definitions (panoptica 2.1.7: ``NaiveThresholdMatching`` over
  ``_calc_count_matching_metric_of_overlapping_labels``, ``rq``, ``sq`` = mean IoU, ``pq = sq *
  rq``, and its zero-TP edge cases). panoptica itself is not a test dependency: it pins
  ``numpy<2.3`` and pulls pandas, plotly, typer and rich; the transcription was checked against
  the real package once (see the module's last test, skipped unless panoptica imports);
* the matching is unique at IoU > 0.5 and greedy below it, as documented (a hand-made case
  where greedy and optimal assignments differ);
* connected components (26- and 6-connectivity) against scipy.ndimage.label per class.
"""

from __future__ import annotations

import math
import pickle

import dask.array as da
import numpy as np
import pytest
from conftest import write_zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseg_eval as fse
from fastseg_eval.errors import InputError, LabelError, OptionError
from fastseg_eval.kernels import pairs, simd
from fastseg_eval.metrics.instances import instance_metrics
from fastseg_eval.reducers import contingency as contingency_reducer
from fastseg_eval.reducers.base import Block
from fastseg_eval.reducers.contingency import ContingencyCounts, ContingencyTable

skimage_metrics = pytest.importorskip("skimage.metrics")

TOP = 2**64 - 1


# =============================================================================== references
def numpy_table(gt, pred, mask=None, ignore=None):
    """(gt ids, pred ids, counts) by np.unique over the (gt, pred) pairs, as uint64 / int64."""
    keep = np.ones(gt.shape, dtype=bool)
    if mask is not None:
        keep &= mask.astype(bool)
    if ignore is not None:
        keep &= gt != ignore
    g = gt[keep].astype(np.uint64) if gt.dtype.kind != "i" else gt[keep].astype(np.int64).astype(np.uint64)
    p = pred[keep].astype(np.uint64) if pred.dtype.kind != "i" else pred[keep].astype(np.int64).astype(np.uint64)
    if g.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    pairs, counts = np.unique(np.stack([g, p]), axis=1, return_counts=True)
    return pairs[0], pairs[1], counts.astype(np.int64)


def assert_table(ct: ContingencyTable, gt, pred, mask=None, ignore=None):
    g, p, c = numpy_table(gt, pred, mask, ignore)
    rg, rp, rc = ct.raw()
    np.testing.assert_array_equal(rg, g)
    np.testing.assert_array_equal(rp, p)
    np.testing.assert_array_equal(rc, c)
    if ignore is not None:
        keep = np.ones(gt.shape, bool) if mask is None else mask.astype(bool)
        assert ct.n_ignored == int(np.count_nonzero((gt == ignore) & keep))


def panoptica_reference(gt, pred, threshold=0.5, strict=True):
    """panoptica 2.1.7's matching and PQ on instance arrays (background 0), transcribed.

    ``_calc_count_matching_metric_of_overlapping_labels``: IoU of every overlapping (ref, pred)
    pair, listed in ``np.unique`` order of ``ref + pred * max_ref`` (pred, then ref), sorted by
    IoU descending (a stable sort); ``NaiveThresholdMatching``: take a pair when neither side is
    taken yet and ``IoU > threshold`` (``strict_threshold=True``) or ``>=``. Then tp, fp =
    n_pred - tp, fn = n_ref - tp, rq = tp / (tp + fp/2 + fn/2), sq = mean IoU of the matches,
    pq = sq * rq; zero tp: rq = sq = pq = 0, or NaN when neither side has an instance.
    """
    ref = gt.astype(np.int64).ravel()
    prd = pred.astype(np.int64).ravel()
    ref_labels = [int(x) for x in np.unique(ref) if x != 0]
    pred_labels = [int(x) for x in np.unique(prd) if x != 0]
    pairs = []
    if ref_labels:
        max_ref = max(ref_labels) + 1
        enc = ref + prd * max_ref
        enc[ref == 0] = 0
        values, inter = np.unique(enc, return_counts=True)
        keep = values > max_ref
        values, inter = values[keep], inter[keep].astype(np.float64)
        pr, pp = values % max_ref, values // max_ref
        ra = np.bincount(ref)[pr].astype(np.float64)
        pa = np.bincount(prd)[pp].astype(np.float64)
        scores = inter / (ra + pa - inter)
        pairs = [(float(s), (int(r), int(p))) for s, r, p in zip(scores, pr, pp)]
    pairs = sorted(pairs, key=lambda x: x[0], reverse=True)
    taken_ref, taken_pred, ious = set(), set(), []
    for score, (r, p) in pairs:
        if p in taken_pred or r in taken_ref:
            continue
        if (score > threshold) if strict else (score >= threshold):
            taken_ref.add(r)
            taken_pred.add(p)
            ious.append(score)
    tp, n_ref, n_pred = len(ious), len(ref_labels), len(pred_labels)
    fp, fn = n_pred - tp, n_ref - tp
    if tp == 0:
        rq = sq = pq = 0.0 if n_pred + n_ref > 0 else math.nan
    else:
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(np.mean(ious))
        pq = sq * rq
    return {"tp": tp, "fp": fp, "fn": fn, "rq": rq, "sq": sq, "pq": pq, "n_gt": n_ref, "n_pred": n_pred}


def skimage_figures(gt, pred, ignore=None, background=0):
    """VOI (split, merge) and (ARE, precision, recall) from scikit-image, precision / recall
    swapped back to CREMI's definition (scikit-image issue 6485).

    scikit-image indexes its table by raw id (a coo_matrix as wide as the largest id): ids are
    renumbered first, keeping their order (so 0 stays 0, and the ignore label maps along)."""
    g_ids, g = np.unique(gt, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    gt, pred = g.reshape(gt.shape), p.reshape(pred.shape)
    if ignore is not None:
        ignore = int(np.searchsorted(g_ids, np.asarray(ignore, dtype=g_ids.dtype)))
    if background is not None:
        assert g_ids[0] == background == 0 and p_ids[0] == 0, "the generators keep 0 as the smallest id"
    vi = skimage_metrics.variation_of_information(gt, pred, ignore_labels=() if ignore is None else (ignore,))
    drop = tuple(x for x in (background, ignore) if x is not None)
    with np.errstate(divide="ignore", invalid="ignore"):
        are, prec, rec = skimage_metrics.adapted_rand_error(gt, pred, ignore_labels=drop)
    return vi[0], vi[1], are, rec, prec


def close(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b) or (isinstance(b, np.floating) and np.isnan(b))
    return abs(float(a) - float(b)) <= tol


# ================================================================================ generators
def instance_pair(shape, n_big, n_tiny, rng, *, dtype=np.uint32, high=None, background=0.05):
    """A ground truth of a few large blocks and many one-to-few-voxel ids, and a prediction that
    shifts, merges, splits and relabels some of them."""
    gt = np.zeros(shape, dtype=np.int64)
    grid = max(1, round(n_big ** (1 / 3)))
    cells = [np.linspace(0, s, grid + 1).astype(int) for s in shape]
    k = 1
    for z0, z1 in zip(cells[0][:-1], cells[0][1:]):
        for y0, y1 in zip(cells[1][:-1], cells[1][1:]):
            for x0, x1 in zip(cells[2][:-1], cells[2][1:]):
                gt[z0:z1, y0:y1, x0:x1] = k
                k += 1
    gt[rng.random(shape) < background] = 0
    tiny = rng.integers(0, gt.size, size=n_tiny)
    gt.flat[tiny] = np.arange(k, k + n_tiny)
    pred = np.roll(gt, 1, axis=-1).copy()
    merge = rng.random(shape) < 0.05
    pred[merge] = np.roll(gt, 2, axis=1)[merge]
    split = (pred > 0) & (rng.random(shape) < 0.05)
    pred[split] += 10_000
    if n_big > 1:
        pred[pred == 2] = 0  # one instance missed
    if high is not None:  # ids near 2**64: keep 0 as background, map id i to high - i
        return (np.where(gt > 0, np.uint64(high) - gt.astype(np.uint64), 0).astype(np.uint64),
                np.where(pred > 0, np.uint64(high) - pred.astype(np.uint64), 0).astype(np.uint64))  # fmt: skip
    return gt.astype(dtype), pred.astype(dtype)


CASES = {
    "few-large": dict(shape=(12, 20, 24), n_big=8, n_tiny=0),
    "many-tiny": dict(shape=(10, 16, 18), n_big=1, n_tiny=400),
    "mixed": dict(shape=(9, 17, 31), n_big=27, n_tiny=60),
    "near-2**64": dict(shape=(8, 15, 21), n_big=8, n_tiny=50, high=TOP),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    spec = dict(CASES[request.param])
    shape = spec.pop("shape")
    return request.param, *instance_pair(shape, rng=np.random.default_rng(len(request.param)), **spec)


# ================================================================================ the table
_LISTED = pytest.mark.skipif(not simd.VECTOR_COMPRESS, reason="numba's LLVM has no vector compress (LLVM < 19)")


@pytest.fixture(params=[False, pytest.param(True, marks=_LISTED)], ids=["rows", "listed"])
def kernel_choice(request, monkeypatch):
    """The reducer's kernel for contiguous chunks without a mask, both ways: row by row
    (``count_pairs``) or through listed run starts (``count_pairs_listed``), whatever this CPU
    would choose. Chunks with a mask always go row by row."""
    monkeypatch.setattr(contingency_reducer, "LISTED_RUNS", request.param)
    return request.param


def test_table_equals_numpy_unique(kernel_choice, pair):
    name, gt, pred = pair
    assert_table(fse.contingency(pred, gt), gt, pred)


def test_docstring_example_rows_are_gt():
    gt = np.array([[1, 1, 2], [2, 2, 0]], dtype=np.uint64)
    pred = np.array([[7, 7, 7], [9, 9, 0]], dtype=np.uint64)
    ct = fse.contingency(pred, gt)
    assert list(zip(ct.gt_ids.tolist(), ct.pred_ids.tolist(), ct.counts.tolist())) == [
        (0, 0, 1), (1, 7, 2), (2, 7, 1), (2, 9, 2),
    ]  # fmt: skip
    assert ct.gt_ids.dtype == np.int64 and ct.counts.dtype == np.int64
    m = ct.to_scipy()
    assert m.shape == (3, 3) and m.dtype == np.int64
    np.testing.assert_array_equal(m.toarray(), [[1, 0, 0], [0, 2, 0], [0, 1, 2]])  # rows gt 0, 1, 2


def test_ids_near_2_64_stay_uint64():
    gt = np.array([TOP, TOP, TOP - 1, 0, 2**63], dtype=np.uint64)
    pred = np.array([TOP, 5, TOP, TOP, 2**63 - 1], dtype=np.uint64)
    ct = fse.contingency(pred, gt)
    assert ct.gt_ids.dtype == np.uint64
    assert set(zip(ct.gt_ids.tolist(), ct.pred_ids.tolist(), ct.counts.tolist())) == {
        (0, TOP, 1), (2**63, 2**63 - 1, 1), (TOP - 1, TOP, 1), (TOP, 5, 1), (TOP, TOP, 1),
    }  # fmt: skip


@settings(
    max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 40)),
    gdt=st.sampled_from(["uint8", "int16", "uint32", "int64", "uint64", "bool"]),
    pdt=st.sampled_from(["uint8", "uint16", "int32", "uint64"]),
    k=st.integers(1, 6),
    noise=st.sampled_from([0.0, 0.05, 0.5]),
    with_mask=st.booleans(),
    with_ignore=st.booleans(),
    run=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_table_hypothesis(kernel_choice, shape, gdt, pdt, k, noise, with_mask, with_ignore, run, seed):
    """Runs of ``run`` voxels along rows, repeated rows, noise: every path of the row-record kernel."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, k, size=(shape[0], max(1, shape[1] // 2), shape[2] // run + 1))
    gt = np.repeat(np.repeat(base, 2, axis=1), run, axis=2)[:, : shape[1], : shape[2]]
    if gt.shape[1] < shape[1]:
        gt = np.concatenate([gt, gt[:, -1:]], axis=1)
    pred = gt.copy()
    flip = rng.random(shape) < noise
    pred[flip] = rng.integers(0, k + 1, size=int(flip.sum()))
    gt = gt.astype(gdt) if gdt != "bool" else (gt % 2).astype(bool)
    pred = pred.astype(pdt)
    if pdt == "uint64":
        pred = np.where(pred > 0, np.uint64(TOP) - pred.astype(np.uint64), 0).astype(np.uint64)
    mask = None
    if with_mask:  # runs of masked voxels repeated over rows (records of masked segments carry on)
        m = rng.random((shape[0], max(1, shape[1] // 2), shape[2] // run + 1)) < 0.8
        m = np.repeat(np.repeat(m, 2, axis=1), run, axis=2)[:, : shape[1], : shape[2]]
        mask = np.concatenate([m, m[:, -1:]], axis=1)[:, : shape[1]] if m.shape[1] < shape[1] else m
    ignore = int(gt.flat[int(rng.integers(gt.size))]) if with_ignore else None
    ct = fse.contingency(pred, gt, mask=mask, ignore_label=ignore, workers=1)
    assert_table(ct, gt, pred, mask, ignore)
    assert ct.n_masked == (0 if mask is None else int(np.count_nonzero(~mask)))


def test_kernel_grows_and_resumes_from_a_tiny_table(kernel_choice, monkeypatch):
    """Every insertion may hit the load limit: the kernel stops, the table grows, counting resumes."""
    from fastseg_eval.reducers import contingency as C

    monkeypatch.setattr(C, "_INITIAL_CAP", 2)
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 40, size=(6, 9, 13)).astype(np.uint64) * np.uint64(2**57)
    pred = rng.integers(0, 40, size=gt.shape).astype(np.int32)
    mask = rng.random(gt.shape) < 0.9
    r = ContingencyCounts(ignore_label=int(gt[0, 0, 0]))
    r.add_chunk(gt, pred, mask)
    assert r.nbytes >= 3 * 8 * 2 * r.n_entries  # load factor at most 1/2
    assert_table(r.table(), gt, pred, mask, int(gt[0, 0, 0]))


@pytest.mark.parametrize("spill_cap", [4, 64])
def test_full_tables_spill_into_sorted_runs(kernel_choice, monkeypatch, spill_cap):
    """Past ``_SPILL_CAP`` slots a full table is sorted into a run and cleared instead of grown:
    pairs seen before and after a spill add up exactly; runs stay few (each at least twice the
    next); merging, pickling and counting on afterwards keep every count."""
    from fastseg_eval.reducers import contingency as C

    monkeypatch.setattr(C, "_INITIAL_CAP", 2)
    monkeypatch.setattr(C, "_SPILL_CAP", spill_cap)
    rng = np.random.default_rng(spill_cap)
    gt = rng.integers(0, 30, size=(7, 9, 31)).astype(np.uint64) * np.uint64(2**58 + 1)
    pred = rng.integers(0, 30, size=gt.shape).astype(np.uint16)
    mask = rng.random(gt.shape) < 0.9
    r = ContingencyCounts(ignore_label=int(gt[0, 0, 0]))
    r.add_chunk(gt[:4], pred[:4], mask[:4])
    assert len(r._runs) >= 1 and r._cap == spill_cap  # it spilled, and never grew past the cap
    sizes = [len(run[2]) for run in r._runs]
    assert all(a > 2 * b for a, b in zip(sizes, sizes[1:])), sizes
    other = ContingencyCounts(ignore_label=int(gt[0, 0, 0]))
    other.add_chunk(gt[4:], pred[4:], mask[4:])
    r.merge(pickle.loads(pickle.dumps(other)))
    assert_table(r.table(), gt, pred, mask, int(gt[0, 0, 0]))
    keys = np.stack([gt[mask].ravel(), pred[mask].astype(np.uint64).ravel()])[:, gt[mask].ravel() != gt[0, 0, 0]]
    assert r.n_entries == len(np.unique(keys, axis=1)[0])
    r.add_chunk(gt[:1], pred[:1], mask[:1])  # counts go on after spills and merges
    both = (np.concatenate([gt, gt[:1]]), np.concatenate([pred, pred[:1]]), np.concatenate([mask, mask[:1]]))
    assert_table(r.table(), *both, int(gt[0, 0, 0]))
    assert_table(pickle.loads(pickle.dumps(r)).table(), *both, int(gt[0, 0, 0]))


@pytest.mark.parametrize("n2", [1, 2, 8, 63, 64, 65, 66, 127, 128, 129, 200, 1000])
@pytest.mark.parametrize("with_mask", [False, True])
def test_rows_of_any_length_and_runs_across_rows(kernel_choice, n2, with_mask):
    """Segment flags are computed in blocks of 64 with an overlapping last block: rows around
    those sizes, long runs that cross row and plane ends, flags at the very first and last voxels."""
    rng = np.random.default_rng(n2)
    shape = (3, 4, n2)
    flat = np.repeat(rng.integers(0, 4, size=max(1, 3 * 4 * n2 // 37 + 1)), 37)[: 3 * 4 * n2]
    gt = flat.reshape(shape).astype(np.uint64) * np.uint64(2**62)
    pred = np.roll(flat, 5).reshape(shape).astype(np.uint64)
    pred[..., 0] += np.uint64(1)  # a segment of one voxel at every row start
    gt[..., -1] = np.uint64(TOP)  # and at every row end
    mask = rng.random(shape) < 0.7 if with_mask else None
    assert_table(fse.contingency(pred, gt, mask=mask, workers=1), gt, pred, mask)


def test_ids_0_and_2_64_minus_1_side_by_side(kernel_choice):
    """No id is a sentinel: 0 and 2**64 - 1 next to each other, alone and in runs, as gt and pred,
    and 2**64 - 1 as the ignore label."""
    row = np.array([0, TOP, TOP, 0, 0, TOP, 0] * 20, dtype=np.uint64)
    gt = np.stack([row, row[::-1], np.roll(row, 1)])[None]
    pred = np.stack([row[::-1], row, row])[None]
    assert_table(fse.contingency(pred, gt, workers=1), gt, pred)
    assert_table(fse.contingency(pred, gt, ignore_label=TOP, workers=1), gt, pred, ignore=TOP)
    ct = fse.contingency(np.full((2, 70), TOP, np.uint64), np.zeros((2, 70), np.uint64))
    assert (ct.gt_ids.tolist(), ct.pred_ids.tolist(), ct.counts.tolist()) == ([0], [TOP], [140])


@pytest.mark.parametrize("with_mask", [False, True])
def test_table_grows_in_the_middle_of_long_rows(kernel_choice, monkeypatch, with_mask):
    """A tiny table fills many times within one row of 300 voxels: each stop resumes mid-row."""
    from fastseg_eval.reducers import contingency as C

    monkeypatch.setattr(C, "_INITIAL_CAP", 2)
    rng = np.random.default_rng(8)
    gt = np.repeat(rng.integers(0, 300, size=(2, 3, 100)), 3, axis=2).astype(np.uint64)
    pred = rng.integers(0, 3, size=gt.shape).astype(np.uint16)
    mask = rng.random(gt.shape) < 0.8 if with_mask else None
    r = ContingencyCounts()
    r.add_chunk(gt, pred, mask)
    assert r.nbytes >= 3 * 8 * 2 * r.n_entries
    assert_table(r.table(), gt, pred, mask)


STRETCH = pairs.LISTED * 64  # voxels whose run starts one list of count_pairs_listed holds


@_LISTED
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint32", "uint64"])
def test_listed_kernel_equals_the_row_kernel_across_stretches(dtype):
    """``count_pairs_listed`` on a flat chunk of several stretches against ``count_pairs`` on the
    same chunk as rows: the same table (runs may cross rows: counts add up the same), the same
    ignored count; with a tiny table it stops for room (GROW) at the end of a run, and resumed
    from there it ends with the same table; a negative value in a later stretch is reported at
    its first voxel in C order."""
    rng = np.random.default_rng(len(dtype))
    n = 3 * STRETCH + 333
    runs = np.repeat(rng.integers(0, 60, size=n // 5 + 1), 5)[:n]
    gt = runs.astype(dtype)
    pred = np.roll(runs, 2).astype(dtype)
    pred[STRETCH - 40 : 2 * STRETCH + 40] = 7  # one run across two stretch edges
    gt[STRETCH - 40 : 2 * STRETCH + 40] = 9
    pred[n // 2 : n // 2 + 300] = rng.integers(0, 60, size=300)  # a run per voxel
    u = gt.dtype.type
    gv, pv = gt.view(f"uint{8 * gt.itemsize}"), pred.view(f"uint{8 * gt.itemsize}")
    signed = np.uint64(2 ** (8 * gt.itemsize - 1)) if np.issubdtype(gt.dtype, np.signedinteger) else np.uint64(0)

    def listed(table, state, start, g=gv, p=pv):
        starts = np.full(pairs.LIST_SIZE, 0xBEEF, dtype=np.uint16)
        return pairs.count_pairs_listed(g, p, np.uint64(3), True, signed, signed, table, state, start, starts)

    rows_table, rows_state = np.zeros(3 * 16384, np.uint64), np.zeros(8, np.int64)
    words = np.zeros(pairs.scratch_words(n // 3), np.uint64)
    g3, p3 = gv[: n - n % 3].reshape(1, 3, -1), pv[: n - n % 3].reshape(1, 3, -1)
    status = pairs.count_pairs(g3, p3, np.ones((1, 1, 1), np.uint8), False, np.uint64(3), True, signed, signed,
                               rows_table, rows_state, 0, words)  # fmt: skip
    assert status == pairs.OK
    flat_table, flat_state = np.zeros(3 * 16384, np.uint64), np.zeros(8, np.int64)
    assert listed(flat_table, flat_state, 0, gv[: n - n % 3], pv[: n - n % 3]) == pairs.OK

    def entries(table):
        t = table.reshape(-1, 3)
        t = t[t[:, 2] != 0]
        return t[np.lexsort((t[:, 1], t[:, 0]))]

    np.testing.assert_array_equal(entries(flat_table), entries(rows_table))
    assert flat_state[pairs.NIGNORED] == rows_state[pairs.NIGNORED] == int((gt[: n - n % 3] == u(3)).sum())
    # a tiny table: stops for room at run ends, resumes there
    cap, table, state, start, stops = 4, np.zeros(12, np.uint64), np.zeros(8, np.int64), 0, 0
    while True:
        status = listed(table, state, start)
        if status != pairs.GROW:
            break
        stops += 1
        start = int(state[pairs.POS])
        assert start < n and (gt[start], pred[start]) != (gt[start - 1], pred[start - 1])  # a run's start
        cap *= 2
        bigger = np.zeros(3 * cap, np.uint64)
        pairs.rehash(table, bigger)
        table = bigger
    assert status == pairs.OK and stops >= 5
    keys = np.stack([gv.astype(np.uint64), pv.astype(np.uint64)])[:, gt != u(3)]
    ref, counts = np.unique(keys, axis=1, return_counts=True)
    got = entries(table)
    np.testing.assert_array_equal(got[:, :2].T, ref)
    np.testing.assert_array_equal(got[:, 2], counts)
    if signed:
        bad = 2 * STRETCH + 77
        pred[bad : bad + 10] = -1  # a negative run after long runs, in the third stretch
        state = np.zeros(8, np.int64)
        assert listed(np.zeros(3 * 16384, np.uint64), state, 0) == pairs.BAD_PRED
        assert state[pairs.POS] == bad and state[pairs.VALUE] == int(pv[bad])


def test_first_negative_value_in_c_order_after_long_runs(kernel_choice):
    gt = np.zeros((2, 3, 150), dtype=np.int32)
    pred = np.zeros((2, 3, 150), dtype=np.int32)
    pred[1, 2, 140:] = -7  # later in C order, a run
    pred[1, 1, 97] = -5  # first, alone in a long row
    with pytest.raises(LabelError, match=r"pred has label -5 at voxel \(1, 1, 97\)"):
        fse.contingency(pred, gt, workers=1)


@pytest.mark.parametrize("high", [1, 3, 2**16, 2**31, 2**32, 2**63, 2**64 - 1])
def test_pair_order_equals_lexsort(high):
    """The radix sort of the finished table against np.lexsort (stable, any id range)."""
    from fastseg_eval.kernels.pairs import pair_order

    rng = np.random.default_rng(high % 1000)
    for n in (0, 1, 2, 1000, 5000):
        g = rng.integers(0, high, size=n, dtype=np.uint64, endpoint=True)
        p = rng.integers(0, high, size=n, dtype=np.uint64, endpoint=True)
        if n > 10:
            g[: n // 2] = g[n // 2 : 2 * (n // 2)]  # equal gt ids and equal pairs
            p[: n // 4] = p[n // 2 : n // 2 + n // 4]
        np.testing.assert_array_equal(pair_order(g, p), np.lexsort((p, g)))


def test_merged_tables_are_never_written_in_place():
    """A merged partial is kept as a sorted run that may share its arrays with the partial's
    table; later counting on either side, and later merges, must not show in the other."""
    rng = np.random.default_rng(21)
    gt, pred = instance_pair((4, 5, 70), 6, 12, rng)
    a = ContingencyCounts()
    a.add_chunk(gt[:2], pred[:2])
    ta = a.table()
    merged = ContingencyCounts().merge(ta)
    assert merged.table() == ta
    a.add_chunk(gt[2:], pred[2:])  # the partial goes on: the merged copy does not change
    assert_table(merged.table(), gt[:2], pred[:2])
    merged.add_chunk(gt[2:3], pred[2:3])  # counted in the hash table, beside the run
    assert_table(a.table(), gt, pred)
    assert_table(merged.table(), gt[:3], pred[:3])
    assert_table(ta, gt[:2], pred[:2])
    merged.merge(ta)  # a second merge makes new arrays, not writes into ta's
    assert_table(ta, gt[:2], pred[:2])
    b = ContingencyCounts()
    b.add_chunk(gt, pred)
    both = ContingencyCounts().merge(b).merge(a)  # reducers merge as their tables
    assert_table(b.table(), gt, pred)
    assert both.table() == b.table() + a.table()


def test_run_and_hash_table_together():
    """Counts merged in (a sorted run) and counted afterwards (the hash table) add up exactly:
    in the table, in ``n_entries`` (distinct pairs, not the sum of both sides), through pickle."""
    rng = np.random.default_rng(8)
    gt, pred = instance_pair((6, 7, 90), 9, 15, rng)
    r = ContingencyCounts()
    for sl in (np.s_[:2], np.s_[4:]):
        part = ContingencyCounts()
        part.add_chunk(gt[sl], pred[sl])
        r.merge(part.finish())
    r.add_chunk(gt[2:4], pred[2:4])  # pairs seen before and new ones
    assert_table(r.table(), gt, pred)
    assert r.n_entries == len(r.table()) == len(np.unique(np.stack([gt.ravel(), pred.ravel()]), axis=1)[0])
    back = pickle.loads(pickle.dumps(r))
    assert back.table() == r.table() and back.n_entries == r.n_entries
    back.add_chunk(gt[:1], pred[:1])
    assert_table(back.table(), np.concatenate([gt, gt[:1]]), np.concatenate([pred, pred[:1]]))


def test_state_of_an_older_version_in_slot_order_loads():
    """A pickled reducer of an older version holds its entries in hash-slot order, without the
    ``sorted`` flag: it is sorted when loaded."""
    rng = np.random.default_rng(5)
    gt, pred = instance_pair((3, 6, 40), 8, 12, rng)
    r = ContingencyCounts(ignore_label=7)
    r.add_chunk(gt, pred)
    g, p, c = r._entries()  # slot order, as older versions pickled them
    assert not np.array_equal(np.lexsort((p, g)), np.arange(len(g)))
    old = {"ignore_label": 7, "gt": g, "pred": p, "counts": c, "n_ignored": r.n_ignored, "n_masked": 0,
           "poisoned": None}  # fmt: skip
    back = ContingencyCounts.__new__(ContingencyCounts)
    back.__setstate__(old)
    assert back.table() == r.table()


@pytest.mark.parametrize("high", [50, 2**64 - 1])
def test_merge_sorted_equals_numpy(high):
    """The linear merge of two sorted tables: equal pairs add, order by (gt, pred) unsigned."""
    from fastseg_eval.kernels.pairs import merge_sorted

    rng = np.random.default_rng(high % 97)
    for n1, n2 in ((0, 5), (5, 0), (1, 1), (300, 200), (1000, 3)):
        t = []
        for n in (n1, n2):
            g = rng.integers(high - 40 if high > 50 else 0, high, size=n, dtype=np.uint64, endpoint=True)
            p = rng.integers(0, 60, size=n, dtype=np.uint64) + np.uint64(high - 60 if high > 60 else 0)
            t.append(ContingencyTable(g, p, rng.integers(1, 9, size=n)).raw())
        (g1, p1, c1), (g2, p2, c2) = t
        out = [np.empty(n1 + n2, dtype=d) for d in (np.uint64, np.uint64, np.int64)]
        m = merge_sorted(g1, p1, c1, g2, p2, c2, *out)
        want = ContingencyTable(np.r_[g1, g2], np.r_[p1, p2], np.r_[c1, c2]).raw()  # sort + sum
        for got, w in zip(out, want):
            np.testing.assert_array_equal(got[:m], w)


def test_negative_ids_are_refused_with_the_position(kernel_choice):
    gt = np.zeros((3, 4, 5), dtype=np.int16)
    pred = np.zeros((3, 4, 5), dtype=np.int64)
    pred[2, 1, 3] = -4
    with pytest.raises(LabelError, match=r"pred has label -4 at voxel \(2, 1, 3\)") as e:
        fse.contingency(pred, gt, workers=1)
    assert e.value.position == (2, 1, 3) and e.value.value == -4
    gt[1, 0, 0] = -1
    with pytest.raises(LabelError, match=r"gt has label -1 at voxel \(1, 0, 0\).*ignore_label=-1"):
        fse.contingency(pred, gt, workers=1)


def test_negative_pred_is_an_error_even_with_an_ignore_label(kernel_choice):
    gt = np.zeros((2, 3), dtype=np.int8)
    pred = np.array([[0, 0, -4], [0, 0, 0]], dtype=np.int8)
    with pytest.raises(LabelError, match="pred has label -4"):
        fse.contingency(pred, gt, ignore_label=-4)
    gt[0, 2] = -4  # an ignored gt voxel is skipped whole, pred is not read there (as in the confusion counts)
    ct = fse.contingency(pred, gt, ignore_label=-4)
    assert (ct.gt_ids.tolist(), ct.pred_ids.tolist(), ct.counts.tolist(), ct.n_ignored) == ([0], [0], [5], 1)


def test_float_and_probability_inputs_are_refused():
    a = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(InputError, match="labels must be integers"):
        fse.contingency(a, np.zeros((2, 3), np.uint8))
    with pytest.raises(OptionError, match="probability maps"):
        fse.evaluate(a, np.zeros((2, 3), np.uint8), threshold=0.5, instances=True)


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 2)])
def test_empty_volumes(shape):
    gt = np.zeros(shape, dtype=np.uint64)
    ct = fse.contingency(gt, gt)
    assert len(ct) == 0 and ct.n_voxels == 0 and ct.gt_ids.dtype == np.int64
    res = fse.evaluate(gt, gt, instances=True)
    inst = res.instances
    assert inst["n_gt"] == inst["n_pred"] == inst["tp"] == 0
    assert all(math.isnan(inst[k]) for k in ("pq", "sq", "rq", "f1", "precision", "recall"))
    assert inst["voi_split"] == inst["voi_merge"] == 0.0
    assert math.isnan(inst["adapted_rand_error"])
    assert '"pq": null' in res.to_json()


def test_merge_and_pickle_are_exact(pair):
    name, gt, pred = pair
    whole = ContingencyCounts()
    whole.add_chunk(gt, pred)
    parts = []
    for sl in (np.s_[:3], np.s_[3:4], np.s_[4:]):
        r = ContingencyCounts()
        r.add_chunk(gt[sl], pred[sl])
        parts.append(pickle.loads(pickle.dumps(r)))
    merged = parts[0].spawn()
    for p in reversed(parts):
        merged.merge(p)
    assert merged.table() == whole.table()
    tables = [p.table() for p in parts]
    total = tables[0] + tables[1] + tables[2]
    assert total == whole.table() and tables[0] != total
    back = pickle.loads(pickle.dumps(total))
    assert back == total and back.to_scipy().sum() == gt.size
    assert ContingencyCounts().merge(total).table() == total  # a table merges into a reducer too


def test_add_counts_only_the_core_of_a_block():
    """A block handed with a halo (as to other reducers of the same run) counts its core only."""
    rng = np.random.default_rng(13)
    gt, pred = instance_pair((9, 10, 11), 8, 20, rng)
    mask = rng.random(gt.shape) < 0.9
    r = ContingencyCounts()
    for z0, z1 in ((0, 4), (4, 9)):
        lo, hi = max(0, z0 - 2), min(9, z1 + 2)
        r.add(Block(gt=gt[lo:hi], pred=pred[lo:hi], mask=mask[lo:hi], origin=(z0, 0, 0),
                    core=(slice(z0 - lo, z1 - lo), slice(None), slice(None)), shape=gt.shape, halo=2))  # fmt: skip
    assert r.halo == 0
    assert_table(r.table(), gt, pred, mask)


def test_merge_refuses_different_ignore_labels():
    with pytest.raises(OptionError, match="different ignore labels"):
        ContingencyCounts(3).merge(ContingencyCounts(4))
    with pytest.raises(OptionError, match="different ignore labels"):
        ContingencyTable(ignore_label=1).merge(ContingencyTable(ignore_label=None))


def test_table_constructor_canonicalises_and_checks():
    t = ContingencyTable([2, 1, 2], [0, 5, 0], [1, 2, 3])
    assert (t.gt_ids.tolist(), t.pred_ids.tolist(), t.counts.tolist()) == ([1, 2], [5, 0], [2, 4])
    with pytest.raises(InputError, match="negative id"):
        ContingencyTable([-1], [0], [1])
    with pytest.raises(InputError, match="one length"):
        ContingencyTable([1, 2], [0], [1])


# ============================================================================ through engines
ENGINES = ["threads-1", "threads-2", "dask-sync", "dask-threads", "distributed"]


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
    )  # fmt: skip
    c = distributed.Client(cluster, set_as_default=False)
    with cluster, c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """ids near 2**64 in zarr stores with misaligned chunk grids (pred, gt and mask)."""
    rng = np.random.default_rng(11)
    gt, pred = instance_pair((23, 29, 37), 27, 150, rng, high=TOP)
    mask = rng.random(gt.shape) < 0.85
    root = tmp_path_factory.mktemp("instances")
    write_zarr(root / "gt.zarr", gt, (8, 16, 37))
    write_zarr(root / "pred.zarr", pred, (10, 7, 12))
    write_zarr(root / "mask.zarr", mask, (16, 16, 16))
    paths = {r: str(root / f"{r}.zarr") for r in ("gt", "pred", "mask")}
    return gt, pred, mask, paths


def _engine(name, request):
    if name.startswith("threads"):
        return {"workers": int(name[-1])}
    if name == "dask-sync":
        return {"scheduler": "synchronous"}
    if name == "dask-threads":
        return {"scheduler": "threads", "workers": 2}
    return {"scheduler": request.getfixturevalue("client")}


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_on_misaligned_zarr(engine, stores, request, monkeypatch):
    from fastseg_eval.engine import dask_graph

    monkeypatch.setattr(dask_graph, "UNIT_VOXELS", 4096)  # many units, so partial tables merge
    monkeypatch.setattr(dask_graph, "ALIGN_MAX_VOXELS", 1)
    gt, pred, mask, paths = stores
    ct = fse.contingency(paths["pred"], paths["gt"], mask=paths["mask"], ignore_label=TOP - 3, **_engine(engine, request))
    assert_table(ct, gt, pred, mask, TOP - 3)
    assert ct.n_ignored > 0 and ct.n_masked == int(np.count_nonzero(~mask))


@pytest.mark.parametrize("engine", ["threads-2", "distributed"])
def test_evaluate_instances_in_one_pass_per_engine(engine, stores, request):
    gt, pred, mask, paths = stores
    res = fse.evaluate(paths["pred"], paths["gt"], mask=paths["mask"], instances=True, **_engine(engine, request))
    want = fse.contingency(pred, gt, mask=mask)
    got = instance_metrics(*want.raw())
    for k in ("voi_split", "voi_merge", "adapted_rand_error", "tp", "pq"):
        assert close(res.instances[k], got[k]), k
    assert res.instances["n_pairs"] == len(want)


def test_dask_array_inputs_and_progress():
    rng = np.random.default_rng(2)
    gt, pred = instance_pair((10, 12, 14), 8, 30, rng)
    seen = []
    ct = fse.contingency(da.from_array(pred, chunks=(4, 5, 14)), da.from_array(gt, chunks=(3, 12, 7)), progress=seen.append)
    assert_table(ct, gt, pred)
    assert sum(seen) == gt.size


# ========================================================================= metrics: references
@pytest.mark.parametrize("with_ignore", [False, True])
def test_voi_and_adapted_rand_equal_scikit_image(pair, with_ignore):
    name, gt, pred = pair
    ignore = int(gt.flat[gt.size // 2]) if with_ignore else None
    if ignore == 0:
        ignore = int(gt.max())
    res = fse.evaluate(pred, gt, instances=True, ignore_label=ignore)
    split, merge, are, prec, rec = skimage_figures(gt, pred, ignore)
    inst = res.instances
    for key, want in (("voi_split", split), ("voi_merge", merge), ("adapted_rand_error", are),
                      ("rand_precision", prec), ("rand_recall", rec)):  # fmt: skip
        assert close(inst[key], want), (name, key, inst[key], want)
    assert inst["rand_precision"] != inst["rand_recall"]  # the convention is visible


def test_adapted_rand_background_none_keeps_every_gt_id(pair):
    name, gt, pred = pair
    inst = fse.evaluate(pred, gt, instances=True, background_label=None).instances
    _, g = np.unique(gt, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    are, prec, rec = skimage_metrics.adapted_rand_error(g.reshape(gt.shape), p.reshape(pred.shape), ignore_labels=())
    assert close(inst["adapted_rand_error"], are) and close(inst["rand_precision"], rec)


def test_all_background_volumes_match_scikit_image():
    z = np.zeros((4, 5, 6), dtype=np.uint8)
    inst = fse.evaluate(z, z, instances=True).instances
    split, merge, are, prec, rec = skimage_figures(z, z)
    assert (inst["voi_split"], inst["voi_merge"]) == (split, merge) == (0.0, 0.0)
    assert math.isnan(inst["adapted_rand_error"]) and math.isnan(are)


def renumbered(a):
    """Ids renumbered 0, 1, 2, ... in their order (0 stays 0): panoptica indexes by raw id."""
    _, inv = np.unique(a, return_inverse=True)
    return inv.reshape(a.shape)


@pytest.mark.parametrize("threshold", [0.5, 0.75])
def test_pq_equals_panoptica(pair, threshold):
    name, gt, pred = pair
    inst = fse.evaluate(pred, gt, instances=True, iou_threshold=threshold).instances
    assert inst["matching"] == "unique"
    ref = panoptica_reference(renumbered(gt), renumbered(pred), threshold)
    for k, v in ref.items():
        assert close(inst[k], v), (name, k, inst[k], v)
    assert inst["f1"] == inst["rq"]
    if name != "many-tiny" and threshold == 0.5:
        assert inst["tp"] > 0 and inst["fp"] > 0 and inst["fn"] > 0  # the data exercise every count


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3])
def test_low_threshold_greedy_equals_panoptica(pair, threshold):
    """Renumbering keeps the order of ids, so panoptica's tie order (pred id, then gt id) too."""
    name, gt, pred = pair
    inst = fse.evaluate(pred, gt, instances=True, iou_threshold=threshold).instances
    assert inst["matching"] == "greedy"
    ref = panoptica_reference(renumbered(gt), renumbered(pred), threshold)
    for k, v in ref.items():
        assert close(inst[k], v), (name, threshold, k, inst[k], v)


def test_matching_rule_by_hand():
    """gt A (8 voxels) overlaps pred X (4 of A) and pred Y (the other 4 and 2 more).

    IoU(A, X) = 4/8 = 0.5 exactly: no match at 0.5 (strict >). IoU(A, Y) = 4/10 = 0.4.
    At 0.3 the greedy matching takes A-X (0.5) first; pred Y is then unmatched although A-Y
    also clears the threshold, and gt B (2 voxels, all inside Y: IoU 2/6) takes Y.
    """
    gt = np.array([1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0], dtype=np.uint8)
    pred = np.array([7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 0, 0], dtype=np.uint8)
    at = {t: fse.evaluate(pred, gt, instances=True, iou_threshold=t).instances for t in (0.5, 0.3, 0.35, 0.45)}
    assert at[0.5]["tp"] == 0 and at[0.5]["matching"] == "unique" and at[0.5]["pq"] == 0.0
    assert [r["matched_id"] for r in at[0.3]["per_gt"]] == [7, 9]
    assert close(at[0.3]["sq"], (0.5 + 2 / 6) / 2)
    assert [r["matched_id"] for r in at[0.35]["per_gt"]] == [7, None]  # B-Y (1/3) is below 0.35
    assert at[0.45]["tp"] == 1 and at[0.45]["per_gt"][1] == {"id": 2, "matched_id": None, "iou": 0.0, "dice": 0.0, "size": 2}
    row = at[0.3]["per_gt"][0]
    assert row == {"id": 1, "matched_id": 7, "iou": 0.5, "dice": 2 * 4 / (8 + 4), "size": 8}


def test_unique_matching_above_one_half():
    """At IoU > 0.5 no instance has two partners (so no assignment problem): a random check."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        gt, pred = instance_pair((6, 9, 11), 8, 20, rng)
        inst = fse.evaluate(pred, gt, instances=True, iou_threshold=0.5).instances
        ct = fse.contingency(pred, gt)
        g, p, n = ct.raw()
        a = {int(x): int(c) for x, c in zip(*np.unique(gt, return_counts=True))}
        b = {int(x): int(c) for x, c in zip(*np.unique(pred, return_counts=True))}
        above = [(int(i), int(j)) for i, j, c in zip(g, p, n) if i and j and c / (a[int(i)] + b[int(j)] - c) > 0.5]
        assert len({i for i, _ in above}) == len(above) == len({j for _, j in above}) == inst["tp"]


def test_background_none_makes_zero_an_instance():
    gt = np.array([0, 0, 0, 1, 1], dtype=np.uint8)
    pred = np.array([0, 0, 0, 1, 2], dtype=np.uint8)
    assert fse.evaluate(pred, gt, instances=True).instances["n_gt"] == 1
    inst = fse.evaluate(pred, gt, instances=True, background=None).instances
    assert (inst["n_gt"], inst["n_pred"], inst["tp"]) == (2, 3, 1)  # 0 matches 0; 1 -> 1 is IoU 1/2
    with pytest.raises(OptionError, match="name the same thing"):
        fse.evaluate(pred, gt, instances=True, background=None, background_label=2)


def test_options_are_checked():
    a = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(OptionError, match=r"iou_threshold must be a number in \[0, 1\)"):
        fse.evaluate(a, a, instances=True, iou_threshold=1.0)
    with pytest.raises(OptionError, match="turn them on with instances"):
        fse.evaluate(a, a, connectivity=26)
    with pytest.raises(OptionError, match="not a 3-D neighbourhood"):
        fse.evaluate(a, a, instances=True, connectivity=8)
    with pytest.raises(OptionError, match="connectivity must be one of"):
        fse.evaluate(a, a, instances=True, connectivity=5)


# ====================================================================== connected components
def scipy_components(a, connectivity, background=0):
    """Instances of a class volume by scipy.ndimage.label per class: a set of voxel-index sets."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(a.ndim, {6: 1, 18: 2, 26: 3, 4: 1, 8: 2}[connectivity])
    out = set()
    for c in np.unique(a):
        if c == background:
            continue
        lab, n = ndimage.label(a == c, structure=structure)
        for i in range(1, n + 1):
            out.add((int(c), frozenset(np.flatnonzero(lab == i).tolist())))
    return out


@pytest.mark.parametrize("connectivity", [6, 26])
def test_components_equal_scipy_label_per_class(connectivity):
    pytest.importorskip("cc3d")
    from fastseg_eval.io.components import label_components
    from fastseg_eval.io.volume import open_volume

    rng = np.random.default_rng(connectivity)
    a = (rng.random((7, 9, 11)) < 0.35).astype(np.uint8) * rng.integers(1, 4, size=(7, 9, 11)).astype(np.uint8)
    ids, classes, ignore_id = label_components(open_volume(a, "gt"), connectivity)
    got = {(classes[i], frozenset(np.flatnonzero(ids == i).tolist())) for i in np.unique(ids) if i}
    assert got == scipy_components(a, connectivity)
    assert ignore_id is None and (ids[a == 0] == 0).all()


def test_semantic_masks_with_connectivity_equal_the_instance_path():
    """Labelling components then evaluating equals evaluating the components as instance ids."""
    pytest.importorskip("cc3d")
    from scipy import ndimage

    rng = np.random.default_rng(9)
    gt = np.zeros((12, 20, 20), np.uint8)
    for _ in range(12):
        z, y, x = rng.integers(0, 10), rng.integers(0, 16), rng.integers(0, 16)
        gt[z : z + 2, y : y + 4, x : x + 4] = rng.integers(1, 3)
    pred = np.roll(gt, 1, axis=2)
    pred[rng.random(gt.shape) < 0.01] = 1
    res = fse.evaluate(pred, gt, instances=True, connectivity=26)
    s26 = ndimage.generate_binary_structure(3, 3)

    def label(a):
        out = np.zeros(a.shape, np.int64)
        cls = {}
        nxt = 0
        for c in (1, 2):
            lab, n = ndimage.label(a == c, structure=s26)
            out[lab > 0] = lab[lab > 0] + nxt
            cls.update({nxt + i: c for i in range(1, n + 1)})
            nxt += n
        return out, cls

    g, gc = label(gt)
    p, pc = label(pred)
    ct = fse.contingency(p, g)
    want = instance_metrics(*ct.raw(), gt_class=gc, pred_class=pc)
    inst = res.instances
    for k in ("n_gt", "n_pred", "tp", "fp", "fn", "pq", "sq", "rq", "voi_split", "voi_merge", "adapted_rand_error"):
        assert close(inst[k], want[k]), (k, inst[k], want[k])
    assert inst["connectivity"] == 26 and set(inst["per_gt"][0]) == {"id", "matched_id", "iou", "dice", "size", "class"}
    assert sorted(r["size"] for r in inst["per_gt"]) == sorted(np.bincount(g.ravel())[1:].tolist())


def test_components_match_only_within_a_class():
    pytest.importorskip("cc3d")
    gt = np.zeros((1, 4, 8), np.uint8)
    gt[0, :, :4] = 1
    pred = gt * 2  # the same region, another class: no match
    inst = fse.evaluate(pred, gt, instances=True, connectivity=26).instances
    assert (inst["n_gt"], inst["n_pred"], inst["tp"]) == (1, 1, 0)
    ids = fse.evaluate(pred, gt, instances=True).instances  # as ids, 1 and 2 are two instances that match
    assert ids["tp"] == 1


def test_components_ignore_label_and_mask():
    pytest.importorskip("cc3d")
    gt = np.zeros((2, 6, 6), np.uint8)
    gt[:, 1:5, 1:3] = 1
    gt[:, 1:5, 3] = 255  # void: splits nothing away, is not counted
    gt[:, 1:5, 4:6] = 1
    pred = gt.copy()
    pred[pred == 255] = 1  # the prediction joins the two sides: one instance
    mask = np.ones(gt.shape, bool)
    mask[1] = False
    res = fse.evaluate(pred, gt, instances=True, connectivity=6, ignore_label=255, mask=mask)
    inst = res.instances
    assert (inst["n_gt"], inst["n_pred"]) == (2, 1)
    assert sorted(r["size"] for r in inst["per_gt"]) == [8, 8]  # counted under the mask only
    assert res.n_ignored == 4


def test_components_memory_limit_refuses_before_reading():
    pytest.importorskip("cc3d")
    a = np.zeros((64, 64, 64), np.uint8)
    with pytest.raises(InputError, match="Out-of-core labelling is not available yet"):
        fse.evaluate(a, a, instances=True, connectivity=26, memory_limit="1M")


def test_missing_cc3d_is_one_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_cc3d(name, *args, **kwargs):
        if name == "cc3d":
            raise ImportError("no cc3d")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cc3d)
    a = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(fse.FastSegError, match=r"pip install 'fastseg-eval\[instances\]'"):
        fse.evaluate(a, a, instances=True, connectivity=26)


# ============================================================================ reports and CLI
def test_reports_unchanged_without_instances_and_extended_with():
    rng = np.random.default_rng(4)
    gt, pred = instance_pair((6, 8, 10), 8, 10, rng, dtype=np.uint8)
    plain = fse.evaluate(pred, gt, workers=1)
    both = fse.evaluate(pred, gt, workers=1, instances=True)
    assert "instances" not in plain.to_dict() and "instances" not in plain.options
    d = both.to_dict()
    assert list(d["instances"])[:5] == ["voi_split", "voi_merge", "adapted_rand_error", "rand_precision", "rand_recall"]
    assert len(d["instances"]["per_gt"]) == d["instances"]["n_gt"]
    assert plain.to_csv() == both.to_csv()  # the per-class CSV does not change
    rows = both.to_csv(table="instances").splitlines()
    assert rows[0] == "id,matched_id,iou,dice,size" and len(rows) == 1 + both.instances["n_gt"]
    assert "instances:" in both.to_table() and "instances:" not in plain.to_table()
    with pytest.raises(OptionError, match="instances=True"):
        plain.to_csv(table="instances")


def test_json_per_gt_is_capped_by_per_class_limit():
    rng = np.random.default_rng(6)
    gt, pred = instance_pair((6, 8, 10), 1, 200, rng)
    res = fse.evaluate(pred, gt, instances=True, per_class_limit=50)
    d = res.to_dict()["instances"]
    assert len(d["per_gt"]) == 50 and d["per_gt_omitted"] == res.instances["n_gt"] - 50
    assert len(res.to_csv(table="instances").splitlines()) == 1 + res.instances["n_gt"]  # the CSV lists all


def test_long_per_gt_is_a_lazy_sequence_with_the_same_rows(monkeypatch):
    from fastseg_eval import api
    from fastseg_eval.metrics.instances import PerGT

    rng = np.random.default_rng(6)
    gt, pred = instance_pair((6, 8, 10), 8, 60, rng)
    small = fse.evaluate(pred, gt, instances=True, per_class_limit=20)
    monkeypatch.setattr(api, "PER_CLASS_DICT_MAX", 5)
    lazy = fse.evaluate(pred, gt, instances=True, per_class_limit=20)
    assert isinstance(small.instances["per_gt"], list) and isinstance(lazy.instances["per_gt"], PerGT)
    assert lazy.instances["per_gt"] == small.instances["per_gt"]
    assert lazy.to_dict()["instances"] == small.to_dict()["instances"]  # the same 20 largest rows
    assert lazy.to_csv(table="instances") == small.to_csv(table="instances")
    np.testing.assert_array_equal(lazy.instances["per_gt"].column("size"), [r["size"] for r in small.instances["per_gt"]])


def test_cli_instances(tmp_path, capsys):
    from fastseg_eval.cli import main

    rng = np.random.default_rng(8)
    gt, pred = instance_pair((8, 12, 16), 8, 20, rng, high=TOP)
    write_zarr(tmp_path / "gt.zarr", gt, (4, 12, 16))
    write_zarr(tmp_path / "pred.zarr", pred, (8, 5, 16))
    gs, ps = str(tmp_path / "gt.zarr"), str(tmp_path / "pred.zarr")
    out = tmp_path / "per_gt.csv"
    assert main([ps, gs, "--instances", "--format", "json", "--instances-csv", str(out), "-q"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    want = instance_metrics(*fse.contingency(pred, gt).raw())
    assert d["instances"]["tp"] == want["tp"] and close(d["instances"]["pq"], want["pq"])
    assert d["options"]["instances"] is True and d["options"]["iou_threshold"] == 0.5
    assert len(out.read_text().splitlines()) == 1 + want["n_gt"]
    assert main([ps, gs, "--iou-threshold", "0.3", "--instances", "-q"]) == 0
    assert "greedy" in capsys.readouterr().out
    assert main([ps, gs, "--connectivity", "6"]) == 2
    assert "turn them on with --instances" in capsys.readouterr().err
    assert main([ps, gs, "--instances", "--iou-threshold", "1"]) == 2
    assert main([ps, gs, "--instances", "--instances-csv", str(tmp_path / "x.txt")]) == 2


# ===================================================================== the transcription, checked
def test_panoptica_transcription_against_panoptica_itself():
    """Skipped unless panoptica imports (it is not a test dependency; see the module docstring)."""
    pytest.importorskip("panoptica")
    from panoptica import InputType, NaiveThresholdMatching, Panoptica_Evaluator

    rng = np.random.default_rng(12)
    for thr in (0.5, 0.3):
        gt, pred = instance_pair((10, 12, 14), 8, 30, rng)
        ev = Panoptica_Evaluator(
            expected_input=InputType.UNMATCHED_INSTANCE,
            instance_matcher=NaiveThresholdMatching(matching_threshold=thr, strict_threshold=True),
        )
        res = ev.evaluate(pred.astype(np.int32), gt.astype(np.int32), verbose=False)
        r = res["ungrouped"] if isinstance(res, dict) and "ungrouped" in res else res
        ref = panoptica_reference(gt, pred, thr)
        for k, attr in (("tp", "tp"), ("fp", "fp"), ("fn", "fn"), ("rq", "rq"), ("sq", "sq"), ("pq", "pq")):
            assert close(getattr(r, attr), ref[k]), (thr, k)
