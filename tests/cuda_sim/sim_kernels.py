"""The CUDA counter under numba's simulator: identical to the CPU backend and to numpy.

Every test counts the same chunks with :class:`fastseg_eval.ConfusionMatrix` (the CPU kernels)
and with :class:`fastseg_eval.reducers.cuda.CudaCounter`, and compares every public number; most
also compare with the independent numpy reference of tests/strategies.py. Arrays are tiny (the
simulator runs one Python thread per CUDA thread).
"""

from __future__ import annotations

import itertools
import zlib

from simlib import (
    LAST_COUNTER,
    assert_matches_numpy,
    assert_same,
    chunk_slices,
    count_cpu,
    count_gpu,
    raised,
    require_simulator,
)

require_simulator()

import hypothesis.strategies as st  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from numba import cuda  # noqa: E402
from strategies import (  # noqa: E402
    BIG_ENDIAN,
    dtype_range,
    label_pool,
    label_spaces,
    make_labels,
    masks,
    perturb,
    reference_confusion,
    volume_pairs,
)

import fastseg_eval as fse  # noqa: E402
from fastseg_eval.errors import FastSegError, InputError, LabelError  # noqa: E402
from fastseg_eval.kernels import cuda as kc  # noqa: E402
from fastseg_eval.reducers import cuda as rc  # noqa: E402


def test_simulator_is_active():
    assert kc.SIMULATOR
    assert kc.available(True) == (True, "")
    assert kc.THREADS == 32 and kc.MAX_BLOCKS == 2  # small grids: one Python thread per CUDA thread


def _space(mode, value):
    return {"num_classes": value} if mode == "num_classes" else {"labels": value} if mode == "labels" else {}


def check(gt, pred, mask=None, *, chunks=None, ignore_label=None, dense_max=None, numpy_ref=True, **space):
    """Count on both backends; assert identical results (and equal to numpy); return the GPU one."""
    opts = dict(space, ignore_label=ignore_label)
    if dense_max is not None:
        opts["dense_max"] = dense_max
    cpu = count_cpu(gt, pred, mask, chunks=chunks, **opts)
    gpu = count_gpu(gt, pred, mask, chunks=chunks, **opts)
    assert_same(gpu, cpu)
    if numpy_ref:
        labels = space.get("labels")
        if "num_classes" in space:
            labels = list(range(space["num_classes"]))
        assert_matches_numpy(
            gpu, pred, gt, mask=mask, ignore_label=ignore_label, labels=labels if gpu.is_dense else None
        )
    return gpu


# ------------------------------------------------------------------------------ dtypes
DTYPE_PAIRS = [
    (np.dtype(a), np.dtype(b))
    for a, b in itertools.product(["uint8", "int16", "uint32", "int64", "bool"], repeat=2)
] + [
    (np.dtype("int8"), np.dtype("uint64")),
    (np.dtype("uint64"), np.dtype("int8")),
    (np.dtype("uint16"), np.dtype("int32")),
    (np.dtype("int32"), np.dtype("uint16")),
    (BIG_ENDIAN[0], np.dtype("uint8")),
    (np.dtype("int16"), BIG_ENDIAN[1]),
    (BIG_ENDIAN[2], BIG_ENDIAN[2]),
]


@pytest.mark.parametrize("gdt,pdt", DTYPE_PAIRS, ids=[f"{a.str}-{b.str}" for a, b in DTYPE_PAIRS])
def test_dtype_pairs(gdt, pdt):
    """Dtype pairs, big-endian included: discovered labels with an ignore label, and num_classes; two chunks."""
    rng = np.random.default_rng(zlib.crc32(f"{gdt.str}{pdt.str}".encode()))
    hi = min(dtype_range(gdt)[1], dtype_range(pdt)[1])
    pool = label_pool(hi, 4, rng)
    gt = make_labels((3, 4, 5), gdt, pool, rng)
    pred = perturb(gt, pdt, pool, 0.6, rng)
    ignore = -1 if gdt.kind == "i" else (dtype_range(gdt)[1] if gdt.kind == "u" else None)
    if ignore is not None:
        gt[rng.random(gt.shape) < 0.2] = ignore
    gpu = check(gt, pred, ignore_label=ignore)
    assert gpu.n_voxels > 0
    check(gt, pred, chunks=(2, 4, 5), ignore_label=ignore, num_classes=int(max(gpu.labels)) + 2)


# -------------------------------------------------------------------- hypothesis sweep
@st.composite
def scenarios(draw):
    pred, gt, info = draw(
        volume_pairs([np.dtype(d) for d in ("uint8", "int16", "uint32", "int64")], max_voxels=200, max_dims=4)
    )
    mask = draw(masks(gt.shape))
    ignore = None
    if draw(st.booleans()) and len(info["pool"]) > 1:
        ignore = draw(st.sampled_from(info["pool"]))
        other = next(v for v in info["pool"] if v != ignore)
        pred[pred == ignore] = other
    _, present = reference_confusion(pred, gt, mask=mask, ignore_label=ignore)
    hi = min(dtype_range(info["dtypes"][0])[1], dtype_range(info["dtypes"][1])[1])
    mode, value = draw(label_spaces(present, hi, exclude=() if ignore is None else (ignore,)))
    chunks = tuple(draw(st.integers(max(1, s // 2), s)) for s in gt.shape)  # 1 to 2**ndim chunks
    return pred, gt, mask, ignore, mode, value, chunks


@settings(max_examples=15)
@given(scenarios())
def test_generated_cases(scenario):
    """Hypothesis: dtypes, 1-4-D odd shapes, strided layouts, masks, ignore labels, all label modes, chunk grids."""
    pred, gt, mask, ignore, mode, value, chunks = scenario
    check(gt, pred, mask, chunks=chunks, ignore_label=ignore, **_space(mode, value))


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (17,), (1, 1, 1), (2, 3, 1, 4, 2)])
def test_odd_shapes(shape):
    if shape == ():
        gt, pred = np.array(4, np.uint8), np.array(1, np.uint8)
        gpu = count_gpu(gt, pred)
        assert_same(gpu, count_cpu(gt, pred))
        assert gpu.labels.tolist() == [1, 4] and gpu.counts.tolist() == [[0, 0], [1, 0]]
        return
    rng = np.random.default_rng(5)
    gt = make_labels(shape, np.dtype("uint8"), [0, 1, 4], rng)
    pred = perturb(gt, np.dtype("uint8"), [0, 1, 4], 0.5, rng)
    check(gt, pred, num_classes=5, chunks=tuple(max(1, s // 2) for s in shape))
    if gt.size == 0:  # the CPU backend's discovery kernel divides by zero on empty chunks (reported)
        gpu = count_gpu(gt, pred)
        assert gpu.num_classes == 0 and gpu.n_voxels == 0 and gpu.counts.shape == (0, 0)
    else:
        check(gt, pred)


def test_empty_classes_and_empty_chunks():
    rng = np.random.default_rng(2)
    gt = make_labels((4, 5, 3), np.dtype("uint8"), [1, 3], rng)
    pred = perturb(gt, np.dtype("uint8"), [1, 3], 0.5, rng)
    gpu = check(gt, pred, num_classes=8)
    for k in (0, 2, 4, 5, 6, 7):
        assert gpu.counts[k].sum() == 0 and gpu.counts[:, k].sum() == 0
    # empty chunks between real ones count nothing and break nothing
    acc = fse.ConfusionMatrix(num_classes=8)
    counter = rc.CudaCounter(acc.spawn())
    counter.add_chunk(gt[:0], pred[:0])
    counter.add_chunk(gt, pred)
    counter.add_chunk(gt[:, :0], pred[:, :0], np.ones((4, 0, 3), bool))
    acc.merge(counter.finish())
    np.testing.assert_array_equal(acc.counts, gpu.counts)


# ------------------------------------------------------------------ masks, ignore label
def test_mask_and_ignore_skip_invalid_values_like_the_cpu():
    """Voxels under mask == 0 or with gt == ignore are skipped before their labels are checked."""
    rng = np.random.default_rng(8)
    gt = make_labels((5, 4, 6), np.dtype("int16"), [0, 1, 2], rng)
    pred = perturb(gt, np.dtype("int16"), [0, 1, 2], 0.7, rng)
    mask = rng.random(gt.shape) < 0.6
    gt[~mask & (rng.random(gt.shape) < 0.5)] = 50  # out of range, but masked out
    pred[~mask & (rng.random(gt.shape) < 0.5)] = -3  # negative, but masked out
    ign = mask & (rng.random(gt.shape) < 0.2)
    gt[ign] = -1
    pred[ign] = 99  # out of range where gt is ignored: skipped
    for mk in (mask, (mask * 3).astype(np.int16)):
        gpu = check(gt, pred, mk, chunks=(3, 4, 6), ignore_label=-1, num_classes=3)
        assert gpu.n_ignored == int(ign.sum()) and gpu.n_masked == int((~mask).sum())
    check(gt, pred, mask.astype(np.uint8), chunks=(5, 2, 6), ignore_label=-1)


# ------------------------------------------------------------------------ large values
def test_uint64_extremes_through_the_hash():
    top = 2**64 - 1
    vals = [0, 1, 65535, 65536, 2**32, 2**63 - 1, 2**63, top - 1, top]
    rng = np.random.default_rng(11)
    gt = make_labels((4, 6, 5), np.dtype("uint64"), vals, rng)
    pred = perturb(gt, np.dtype("uint64"), vals, 0.5, rng)
    gpu = check(gt, pred, chunks=(2, 6, 5))
    assert gpu.labels.dtype == np.uint64 and int(gpu.labels[-1]) == top
    check(gt, pred, chunks=(4, 3, 5), labels=list(reversed(vals)))
    i64 = make_labels((5, 5, 4), np.dtype("int64"), [2**63 - 1, 0, 70000, 5], rng)
    i64[rng.random(i64.shape) < 0.3] = -1
    check(i64, perturb(i64, np.dtype("int64"), [2**63 - 1, 0, 70000], 0.5, rng), ignore_label=-1)


# ------------------------------------------------------------------------- many labels
@pytest.mark.parametrize(
    "case",
    [
        "direct-dense-diag",
        "discover-dense-diag",
        "direct-marginals-hot",
        "discover-marginals-hot",
        "marginals-full",
    ],
)
def test_many_labels_beyond_shared_memory(case):
    """Tables larger than shared memory: the hot part in shared memory, the rest with global atomics."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    if case == "direct-dense-diag":  # 200 x 200 dense table > 8192 shared counters
        k, space, dense_max = 200, {"num_classes": 200}, None
    elif case == "discover-dense-diag":
        k, space, dense_max = 300, {}, None
    elif case == "direct-marginals-hot":  # 3 x 2000 counts: beyond the 341 labels kept in shared memory
        k, space, dense_max = 2000, {"num_classes": 2000}, None
    elif case == "discover-marginals-hot":
        k, space, dense_max = 700, {}, 64
    else:  # few labels in marginals mode: all in shared memory
        k, space, dense_max = 40, {}, 8
    pool = list(range(k))
    gt = make_labels((12, 12, 15), np.dtype("uint16"), pool, rng)
    gt[rng.random(gt.shape) < 0.5] = 0  # a dominant class
    gt.reshape(-1)[:k] = np.arange(k)  # every label occurs
    pred = perturb(gt, np.dtype("uint16"), pool, 0.7, rng)
    gpu = check(gt, pred, chunks=(6, 12, 8), dense_max=dense_max, **space)
    assert gpu.num_classes == k
    counter = LAST_COUNTER[0]
    layout, hot, nsub, nslots = kc.table_layout(counter.kcap, counter.dense)  # what the last pass used
    assert layout == (kc.DENSE_DIAG if "diag" in case else kc.MARGINALS)
    assert nslots * nsub <= kc.SHARED_WORDS
    if case.endswith("hot"):
        assert hot < k  # the labels past `hot` go to global memory
    if case == "marginals-full":
        assert hot >= k and nsub > 1


def test_many_large_ids_and_a_full_device_hash_set(monkeypatch):
    """Hundreds of ids >= 2**16 discovered on the device; a tiny 'new ids' set forces the overflow path."""
    rng = np.random.default_rng(21)
    ids = [int(x) for x in rng.choice(2**40, size=150, replace=False) + 2**16]
    gt = make_labels((8, 9, 10), np.dtype("uint64"), ids + [0], rng)
    pred = perturb(gt, np.dtype("uint64"), ids, 0.6, rng)
    check(gt, pred, chunks=(4, 9, 5), dense_max=32)
    monkeypatch.setattr(rc, "NEW_BIG_SLOTS", 4)
    monkeypatch.setattr(rc._POOL, "slots", None)  # fresh streams and sets, not the last counter's
    acc = fse.ConfusionMatrix(dense_max=32)
    counter = rc.CudaCounter(acc.spawn())
    counter.add_chunk(gt, pred)
    acc.merge(counter.finish())
    assert counter.passes > 2  # overflowed: more passes, each finding more ids
    assert_same(acc, count_cpu(gt, pred, dense_max=32))


def test_labels_discovered_across_chunks_and_streams():
    """New labels in every chunk (two chunks in flight): each voxel counted once, in the right cell."""
    rng = np.random.default_rng(4)
    parts_g, parts_p = [], []
    for i in range(6):
        pool = [0, i + 1, 1000 + 7 * i, 70000 + i]
        g = make_labels((2, 5, 6), np.dtype("uint32"), pool, rng)
        parts_g.append(g)
        parts_p.append(perturb(g, np.dtype("uint32"), pool + [i + 2], 0.5, rng))
    gt, pred = np.concatenate(parts_g), np.concatenate(parts_p)
    acc = fse.ConfusionMatrix()
    counter = rc.CudaCounter(acc.spawn())
    for sl, off in chunk_slices(gt.shape, (2, 5, 6)):
        counter.add_chunk(gt[sl], pred[sl], offset=off)
    acc.merge(counter.finish())
    assert counter.passes > counter.chunks  # follow-up passes counted the newly found labels
    assert_same(acc, count_cpu(gt, pred, chunks=(2, 5, 6)))
    assert_matches_numpy(acc, pred, gt)


@pytest.mark.parametrize("threads,blocks", [(32, 1), (64, 3), (32, 5)])
def test_launch_geometry_does_not_change_counts(monkeypatch, threads, blocks):
    monkeypatch.setattr(kc, "THREADS", threads)
    monkeypatch.setattr(kc, "MAX_BLOCKS", blocks)
    rng = np.random.default_rng(threads * blocks)
    gt = make_labels((6, 7, 8), np.dtype("uint8"), [0, 1, 2, 3], rng)
    gt[:3] = 0  # a hot bin
    pred = perturb(gt, np.dtype("uint8"), [0, 1, 2, 3], 0.8, rng)
    check(gt, pred, num_classes=4)
    check(gt, pred, labels=[3, 0, 2, 1], ignore_label=9)


# ------------------------------------------------------------------------------ errors
def _both_raise(gt, pred, mask=None, *, chunks=None, **space):
    e_cpu = raised(lambda: count_cpu(gt, pred, mask, chunks=chunks, **space))
    e_gpu = raised(lambda: count_gpu(gt, pred, mask, chunks=chunks, **space))
    assert e_cpu is not None and e_gpu is not None
    assert type(e_gpu) is type(e_cpu)
    assert str(e_gpu) == str(e_cpu)
    if isinstance(e_cpu, LabelError):
        assert (e_gpu.role, e_gpu.value, e_gpu.position) == (e_cpu.role, e_cpu.value, e_cpu.position)
    return e_gpu


@pytest.mark.parametrize(
    "dtype,space,bad_value",
    [
        ("uint8", {"num_classes": 3}, 7),
        ("int16", {"num_classes": 3}, -4),
        ("int16", {"num_classes": 65536}, -1),  # -1's bits are label 65535 of the table: still refused
        ("int16", {"labels": [0, 2, 65535]}, -1),
        ("int64", {}, -(2**40)),
        ("int8", {}, -1),
        ("uint32", {"labels": [5, 0, 2]}, 3),
        ("uint64", {"labels": [2**40, 0, 2]}, 2**40 + 1),
        ("bool", {"num_classes": 1}, True),
    ],
)
@pytest.mark.parametrize("role", ["gt", "pred"])
def test_invalid_labels_reported_like_the_cpu(dtype, space, bad_value, role):
    """Same exception, message, role, value and full-volume position (third chunk of four)."""
    dt = np.dtype(dtype)
    ok = [0] if dt.kind == "b" else [0, 2]
    rng = np.random.default_rng(3)
    gt = make_labels((8, 3, 5), dt, ok, rng)
    pred = make_labels((8, 3, 5), dt, ok, rng)
    target = gt if role == "gt" else pred
    target[5, 1, 3] = bad_value
    target[6, 0, 0] = bad_value  # later in C order: not the one reported
    e = _both_raise(gt, pred, chunks=(2, 3, 5), **space)
    assert isinstance(e, LabelError)
    assert e.role == role and e.position == (5, 1, 3) and e.value == int(bad_value)


def test_first_invalid_voxel_wins_and_gt_before_pred():
    gt = np.zeros((3, 4, 5), np.uint8)
    pred = np.zeros((3, 4, 5), np.uint8)
    pred[1, 2, 0] = 9
    gt[1, 2, 4] = 9
    e = _both_raise(gt, pred, chunks=(3, 4, 5), num_classes=2)
    assert (e.role, e.position) == ("pred", (1, 2, 0))
    gt[1, 2, 0] = 8  # the same voxel: gt is reported
    e = _both_raise(gt, pred, num_classes=2)
    assert (e.role, e.value, e.position) == ("gt", 8, (1, 2, 0))
    e = _both_raise(gt.reshape(3, 2, 2, 5), pred.reshape(3, 2, 2, 5), chunks=(1, 2, 2, 5), num_classes=2)
    assert e.position == (1, 1, 0, 0)


def test_counter_stops_after_an_error_and_bad_input_is_refused():
    gt = np.zeros((2, 3, 4), np.uint8)
    pred = gt.copy()
    pred[1, 1, 1] = 5
    counter = rc.CudaCounter(fse.ConfusionMatrix(num_classes=2))
    with pytest.raises(LabelError) as info:
        counter.add_chunk(gt, pred, offset=(10, 0, 0))
        counter.add_chunk(gt, gt, offset=(12, 0, 0))
        counter.finish()
    assert info.value.position == (11, 1, 1)
    with pytest.raises(FastSegError, match="stopped at an invalid label"):
        counter.add_chunk(gt, gt)
    fresh = rc.CudaCounter(fse.ConfusionMatrix(num_classes=2))
    e = _both_raise(gt.astype(np.float32), gt, num_classes=2)
    assert isinstance(e, InputError) and "float" in str(e)
    with pytest.raises(InputError, match="shape"):
        fresh.add_chunk(gt, gt[:1])
    with pytest.raises(InputError, match="mask chunk shape"):
        fresh.add_chunk(gt, gt, np.ones((1, 3, 4), bool))


# ------------------------------------------------------------------------ device arrays
def _device_views(a: np.ndarray):
    """The same values as device arrays: contiguous, and strided views of bigger device arrays."""
    yield cuda.to_device(np.ascontiguousarray(a))
    big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    dbig = cuda.to_device(big)
    yield dbig[tuple(slice(None, None, 2) for _ in a.shape)]


@pytest.mark.parametrize(
    "shape,dtype", [((37,), "uint8"), ((5, 7), "int16"), ((3, 4, 5), "bool"), ((2, 3, 2, 4), "uint64")]
)
def test_device_arrays_are_counted_in_place(shape, dtype):
    """numba device arrays (contiguous or strided; signed, bool, 64-bit) through CudaCounter and count_device."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(len(shape))
    pool = [0, 1] if dt.kind == "b" else [0, 1, 5, 2**33] if dt.itemsize == 8 else [0, 1, 5]
    gt = make_labels(shape, dt, pool, rng)
    pred = perturb(gt, dt, pool, 0.6, rng)
    mask = rng.random(shape) < 0.8
    cpu = count_cpu(gt, pred, mask, ignore_label=1)
    (dg, dp), (sg, sp) = zip(_device_views(gt), _device_views(pred))
    assert dg.is_c_contiguous()
    assert not sg.is_c_contiguous() and not sp.is_c_contiguous()
    for g, p, m in (
        (dg, dp, cuda.to_device(mask)),
        (sg, sp, mask),
        (dg, sp, cuda.to_device(mask.astype(np.int32))),
    ):
        acc = fse.ConfusionMatrix(ignore_label=1)
        assert rc.count_device(p, g, acc, mask=m) is acc
        assert_same(acc, cpu)
    acc = fse.ConfusionMatrix(ignore_label=1)
    counter = rc.CudaCounter(acc.spawn())
    counter.add_chunk(sg, pred, mask)  # device gt, host pred
    counter.add_chunk(gt, dp, mask)
    acc.merge(counter.finish())
    assert acc.n_voxels == 2 * cpu.n_voxels
    np.testing.assert_array_equal(acc.counts, 2 * cpu.counts)


def test_device_array_errors_name_the_voxel():
    gt = np.zeros((4, 5), np.int32)
    gt[2, 3] = -7
    e = _both_raise(gt, np.zeros_like(gt), num_classes=2)
    with pytest.raises(LabelError) as info:
        rc.count_device(
            cuda.to_device(np.zeros_like(gt)), cuda.to_device(gt), fse.ConfusionMatrix(num_classes=2)
        )
    assert str(info.value) == str(e) and info.value.position == (2, 3) and info.value.value == -7


# ---------------------------------------------------------------------- counter lifecycle
def test_counters_share_thread_resources_and_can_resume():
    """A thread's streams and buffers pass from one counter to the next (fixed -> discovering)."""
    rng = np.random.default_rng(9)
    gt = make_labels((4, 5, 6), np.dtype("uint16"), [0, 3, 70], rng)
    pred = perturb(gt, np.dtype("uint16"), [0, 3, 70], 0.5, rng)
    check(gt, pred, labels=[70, 3, 0])
    check(gt, pred)  # reuses the previous counter's slots; discovery needs the full seen table
    acc = fse.ConfusionMatrix()
    counter = rc.CudaCounter(acc)
    counter.add_chunk(gt, pred)
    counter.finish()
    counter.add_chunk(gt[:2], pred[:2])  # counting after finish adds only the new chunks
    counter.finish()
    ref = count_cpu(gt, pred)
    ref.merge(count_cpu(gt[:2], pred[:2]))
    assert_same(acc, ref)
    rc.release_buffers()  # the next counter in this thread starts with fresh streams and buffers
    assert getattr(rc._POOL, "slots", None) is None
    check(gt, pred, num_classes=71)
    assert rc._POOL.slots is not None  # kept for the next counter (far below POOL_MAX_BYTES)
