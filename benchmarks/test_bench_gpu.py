"""Group "gpu": the CUDA backend beside the CPU backend and CuPy baselines, on the same data.

Skipped unless a real CUDA GPU is usable (numba's simulator is not a GPU). Data are the kernel
group's in-memory volumes (benchmarks/data.py); every case checks its counts against numpy's
reference after timing.

* ``gpu K=4`` (uint8, labels 0..3, ~85 % background: the one-hot-bin case for GPU histograms):
  ``fse.confusion_matrix(..., backend="cuda")`` from host numpy arrays (transfer included), the
  same on one engine worker, ``count_device`` on arrays already on the GPU (kernel + readback
  only), the CPU backend, and CuPy ``bincount(gt * K + pred)`` from device and from host arrays.
* ``gpu ids`` (uint16 instance ids, tens of thousands): diagonal + marginals mode with
  ``num_classes=65536`` (direct indexing, hot labels in shared memory, the rest global atomics)
  and with label discovery, against the CPU backend and CuPy's three bincounts.

Run: ``pytest benchmarks/test_bench_gpu.py --benchmark-only`` (``FASTSEG_BENCH_SIZE=small`` for
a smoke run).
"""

from __future__ import annotations

import os

import fastseg_bench_data as bd
import numpy as np
import pytest

import fastseg_eval as fse


def _why_no_gpu() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU"
    from fastseg_eval.reducers.backends import cuda_status

    ok, why = cuda_status()
    return None if ok else why


_NO_GPU = _why_no_gpu()
pytestmark = pytest.mark.skipif(_NO_GPU is not None, reason=f"no CUDA GPU: {_NO_GPU}")

S = bd.sizes()
N = S["kernel"]
ROUNDS = S["kernel_rounds"]
SIZE = f"{N}^3"
SPECS = {"k4": bd.SegSpec((N, N, N), num_classes=4), "ids": bd.SegSpec((N, N, N), kind="instances")}
_held: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}


def pair(name: str):
    """``(pred, gt, reference)``; one data set in host memory at a time."""
    if name not in _held:
        _held.clear()
        _held[name] = bd.cached_pair(SPECS[name])
    return _held[name]


@pytest.fixture(scope="module", autouse=True)
def _free_data():
    yield
    _held.clear()


def run(benchmark, fn, *args, rounds=ROUNDS, **kwargs):
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=rounds, iterations=1, warmup_rounds=1)


def _cupy():
    return pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")


def _on_device(*arrays):
    from numba import cuda

    return [cuda.to_device(a) for a in arrays]


def _count_device(pred, gt, **space):
    from fastseg_eval.reducers.cuda import count_device

    return count_device(pred, gt, fse.ConfusionMatrix(**space))


def _cupy_bincount(cp, pred, gt, k):
    cm = cp.bincount((gt.astype(cp.int64) * k + pred).ravel(), minlength=k * k).reshape(k, k)
    return cm.get()  # to the host: includes the device synchronisation


def _cupy_marginals(cp, pred, gt):
    g, p = gt.ravel(), pred.ravel()
    n = 65536
    out = {
        "gt": cp.bincount(g, minlength=n),
        "pred": cp.bincount(p, minlength=n),
        "diag": cp.bincount(g[g == p], minlength=n),
    }
    return {k: v.get() for k, v in out.items()}


def _check_dense(acc, cm):
    """``acc`` holds ``cm`` (all labels 0..K-1, or with discovery the labels present)."""
    if acc.num_classes == len(cm):
        np.testing.assert_array_equal(acc.counts, cm)
        return
    present = np.flatnonzero((cm.sum(axis=0) > 0) | (cm.sum(axis=1) > 0))
    np.testing.assert_array_equal(acc.labels, present)
    np.testing.assert_array_equal(acc.counts, cm[np.ix_(present, present)])


# ------------------------------------------------------------------------------------ K = 4
K4_HOST = [
    ("fastseg-eval cuda", "cuda", dict(backend="cuda")),
    ("fastseg-eval cuda workers=1", "cuda1", dict(backend="cuda", workers=1)),
    ("fastseg-eval cpu", "cpu", dict(backend="cpu")),
]


@pytest.mark.benchmark(group="gpu K=4")
@pytest.mark.parametrize("case,key,kwargs", K4_HOST, ids=[f"{k}-{SIZE}" for _, k, _ in K4_HOST])
def test_k4_host_arrays(benchmark, case, key, kwargs):
    pred, gt, ref = pair("k4")
    cm = run(benchmark, fse.confusion_matrix, pred, gt, num_classes=4, **kwargs)
    bd.annotate(benchmark, key=f"gpu.k4.{key}", case=case, size=SIZE, voxels=gt.size)
    np.testing.assert_array_equal(cm, ref["cm"])


@pytest.mark.benchmark(group="gpu K=4")
@pytest.mark.parametrize(
    "space", ["num_classes", "discovery"], ids=[f"device-{SIZE}", f"device-discovery-{SIZE}"]
)
def test_k4_device_arrays(benchmark, space):
    pred, gt, ref = pair("k4")
    dp, dg = _on_device(pred, gt)
    kwargs = {"num_classes": 4} if space == "num_classes" else {}
    acc = run(benchmark, _count_device, dp, dg, **kwargs)
    case = "fastseg-eval count_device (data on the GPU)" + ("" if kwargs else ", discovery")
    bd.annotate(benchmark, key=f"gpu.k4.device.{space}", case=case, size=SIZE, voxels=gt.size)
    _check_dense(acc, ref["cm"])


@pytest.mark.benchmark(group="gpu K=4")
@pytest.mark.parametrize("where", ["device", "host"], ids=[f"cupy-device-{SIZE}", f"cupy-host-{SIZE}"])
def test_k4_cupy(benchmark, where):
    cp = _cupy()
    pred, gt, ref = pair("k4")
    if where == "device":
        dp, dg = cp.asarray(pred), cp.asarray(gt)
        cm = run(benchmark, _cupy_bincount, cp, dp, dg, 4)
    else:
        cm = run(benchmark, lambda p, g: _cupy_bincount(cp, cp.asarray(p), cp.asarray(g), 4), pred, gt)
    case = f"CuPy bincount(gt * K + pred), data on the {where}"
    bd.annotate(benchmark, key=f"gpu.k4.cupy.{where}", case=case, size=SIZE, voxels=gt.size)
    np.testing.assert_array_equal(cm, ref["cm"])


# ------------------------------------------------------------------------- uint16 instance ids
def _check_marginals(acc, ref):
    present = np.flatnonzero((ref["gt"] > 0) | (ref["pred"] > 0))
    labels = np.asarray(acc.labels)
    idx = labels if len(labels) == 65536 else None
    if idx is None:
        np.testing.assert_array_equal(labels, present)
        for name, key in (("diagonal", "diag"), ("gt_counts", "gt"), ("pred_counts", "pred")):
            np.testing.assert_array_equal(getattr(acc, name), ref[key][present])
    else:
        for name, key in (("diagonal", "diag"), ("gt_counts", "gt"), ("pred_counts", "pred")):
            np.testing.assert_array_equal(getattr(acc, name), ref[key])


def _update(acc, pred, gt, backend):
    return acc.update(pred, gt, backend=backend)


IDS = [
    ("fastseg-eval cuda ConfusionMatrix(65536)", "cuda", "cuda", {"num_classes": 65536}),
    ("fastseg-eval cuda discovery", "cuda-discovery", "cuda", {}),
    ("fastseg-eval cpu ConfusionMatrix(65536)", "cpu", "cpu", {"num_classes": 65536}),
]


@pytest.mark.benchmark(group="gpu ids")
@pytest.mark.parametrize("case,key,backend,space", IDS, ids=[f"{k}-{SIZE}" for _, k, _, _ in IDS])
def test_ids_host_arrays(benchmark, case, key, backend, space):
    pred, gt, ref = pair("ids")
    acc = benchmark.pedantic(
        _update,
        setup=lambda: ((fse.ConfusionMatrix(**space), pred, gt, backend), {}),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )
    bd.annotate(benchmark, key=f"gpu.ids.{key}", case=case, size=SIZE, voxels=gt.size)
    assert not acc.is_dense
    _check_marginals(acc, ref)


@pytest.mark.benchmark(group="gpu ids")
@pytest.mark.parametrize(
    "space", ["num_classes", "discovery"], ids=[f"device-{SIZE}", f"device-discovery-{SIZE}"]
)
def test_ids_device_arrays(benchmark, space):
    pred, gt, ref = pair("ids")
    dp, dg = _on_device(pred, gt)
    kwargs = {"num_classes": 65536} if space == "num_classes" else {}
    acc = run(benchmark, _count_device, dp, dg, **kwargs)
    case = "fastseg-eval count_device (data on the GPU)" + ("" if kwargs else ", discovery")
    bd.annotate(benchmark, key=f"gpu.ids.device.{space}", case=case, size=SIZE, voxels=gt.size)
    _check_marginals(acc, ref)


@pytest.mark.benchmark(group="gpu ids")
@pytest.mark.parametrize("where", ["device"], ids=[f"cupy-3-bincounts-device-{SIZE}"])
def test_ids_cupy(benchmark, where):
    cp = _cupy()
    pred, gt, ref = pair("ids")
    dp, dg = cp.asarray(pred), cp.asarray(gt)
    out = run(benchmark, _cupy_marginals, cp, dp, dg)
    bd.annotate(
        benchmark, key="gpu.ids.cupy", case="CuPy diag + marginals (3 bincounts), data on the device",
        size=SIZE, voxels=gt.size,
    )  # fmt: skip
    for k in ("gt", "pred", "diag"):
        np.testing.assert_array_equal(out[k], ref[k])
