"""The CUDA backend end to end under numba's simulator: zarr inputs with misaligned chunk grids,
several engine workers, the dask engine, the public entry points; identical to the CPU backend
and to numpy. Each test also checks that the CUDA counter did the counting.
"""

from __future__ import annotations

from simlib import assert_same, require_simulator, write_zarr

require_simulator()

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from strategies import make_labels, perturb, reference_confusion  # noqa: E402

import fastseg_eval as fse  # noqa: E402
from fastseg_eval.api import count_into  # noqa: E402
from fastseg_eval.errors import LabelError  # noqa: E402
from fastseg_eval.reducers import cuda as rc  # noqa: E402
from fastseg_eval.reducers.backends import cuda_status, resolve_backend  # noqa: E402


@pytest.fixture
def cuda_calls(monkeypatch):
    """Counts the chunks that CudaCounter.add_chunk received (the engine builds counters per worker)."""
    calls = {"chunks": 0, "voxels": 0}
    real = rc.CudaCounter.add_chunk

    def spy(self, gt, pred, mask=None, *, offset=None):
        calls["chunks"] += 1
        calls["voxels"] += int(np.prod(gt.shape))
        return real(self, gt, pred, mask, offset=offset)

    monkeypatch.setattr(rc.CudaCounter, "add_chunk", spy)
    return calls


def test_backend_selection_under_the_simulator():
    assert cuda_status() == (True, "")
    assert resolve_backend("cuda") == "cuda"
    assert resolve_backend("auto") == "cpu"  # the simulator is never picked automatically


def _volumes(shape=(6, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    gt = make_labels(shape, np.dtype("uint16"), [0, 0, 0, 1, 2, 300, 4464], rng)
    pred = perturb(gt, np.dtype("int32"), [0, 1, 2, 300, 4464], 0.7, rng)
    gt[rng.random(shape) < 0.1] = 65535  # the ignore label
    mask = rng.random(shape) < 0.85
    return pred, gt, mask


@pytest.mark.parametrize("workers", [1, 2])
def test_count_into_zarr_misaligned(tmp_path, cuda_calls, workers):
    """Misaligned zarr chunk grids (gt, pred and mask all differ), discovered labels, ignore and mask."""
    pred, gt, mask = _volumes()
    _, zp = write_zarr(tmp_path / "pred.zarr", pred, (4, 7, 4))
    _, zg = write_zarr(tmp_path / "gt.zarr", gt, (3, 4, 9), zarr_format=2)
    _, zm = write_zarr(tmp_path / "mask.zarr", mask, (6, 3, 5))
    cpu = fse.ConfusionMatrix(ignore_label=65535)
    count_into(cpu, zp, zg, zm, workers=workers, backend="cpu")
    assert cuda_calls["chunks"] == 0
    gpu = fse.ConfusionMatrix(ignore_label=65535)
    stats = count_into(gpu, zp, zg, zm, workers=workers, backend="cuda")
    assert cuda_calls["chunks"] > stats.units >= 2  # misaligned: units were cut into several cells
    assert cuda_calls["voxels"] == gt.size
    assert_same(gpu, cpu)
    ref, labels = reference_confusion(pred, gt, mask=mask, ignore_label=65535)
    np.testing.assert_array_equal(gpu.counts, ref)
    assert [int(x) for x in gpu.labels] == labels


def test_evaluate_zarr_backend_cuda(tmp_path, cuda_calls):
    pred, gt, mask = _volumes((5, 6, 7), seed=1)
    pp, _ = write_zarr(tmp_path / "p.zarr", pred, (2, 6, 4))
    pg, _ = write_zarr(tmp_path / "g.zarr", gt, (3, 3, 7))
    kwargs = dict(labels=[300, 0, 2, 1, 4464], ignore_label=65535, mask=mask, workers=2)
    res_cpu = fse.evaluate(pp, pg, backend="cpu", **kwargs)
    res_gpu = fse.evaluate(pp, pg, backend="cuda", **kwargs)
    ref, _ = reference_confusion(pred, gt, mask=mask, ignore_label=65535, labels=kwargs["labels"])
    np.testing.assert_array_equal(res_gpu.confusion_matrix, ref)
    np.testing.assert_array_equal(res_cpu.confusion_matrix, ref)
    assert res_gpu.timing["backend"] == "cuda"
    a, b = res_gpu.to_dict(), res_cpu.to_dict()
    for key in ("labels", "confusion_matrix", "per_class", "mean", "overall", "n_voxels", "n_ignored"):
        assert a[key] == b[key], key


def test_evaluate_counts_on_the_cuda_backend(cuda_calls):
    pred, gt, _ = _volumes((3, 4, 5), seed=2)
    res = fse.evaluate(pred, gt, backend="cuda", ignore_label=65535)
    assert cuda_calls["chunks"] > 0 and cuda_calls["voxels"] == gt.size
    ref, labels = reference_confusion(pred, gt, ignore_label=65535)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert [int(x) for x in res.labels] == labels


def test_probability_maps_fall_back_to_the_cpu_kernels(cuda_calls):
    """threshold= / channel_axis= have no GPU kernels yet: backend='cuda' gives the CPU's exact result."""
    rng = np.random.default_rng(6)
    gt = rng.integers(0, 2, size=(4, 5, 6)).astype(np.uint8)
    prob = rng.random((4, 5, 6)).astype(np.float32)
    a = fse.evaluate(prob, gt, threshold=0.5, thresholds=8, backend="cuda").to_dict()
    b = fse.evaluate(prob, gt, threshold=0.5, thresholds=8, backend="cpu").to_dict()
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["curves"] == b["curves"]
    ref, _ = reference_confusion((prob >= 0.5).astype(np.uint8), gt, labels=[0, 1])
    assert a["confusion_matrix"] == ref.tolist()
    assert cuda_calls["chunks"] > 0  # through the CUDA counter, which hands them to the CPU kernels


def test_confusion_matrix_and_update_backend_cuda(cuda_calls):
    pred, gt, mask = _volumes((4, 5, 6), seed=3)
    cm = fse.confusion_matrix(pred, gt, mask=mask, backend="cuda")
    ref, _ = reference_confusion(pred, gt, mask=mask)
    np.testing.assert_array_equal(cm, ref)
    assert cuda_calls["chunks"] > 0
    seen = cuda_calls["chunks"]
    acc = fse.ConfusionMatrix(ignore_label=65535)
    acc.update(pred, gt, mask, backend="cuda", workers=2)
    acc.update(pred[:2], gt[:2], backend="cuda")
    ref1, _ = reference_confusion(pred, gt, mask=mask, ignore_label=65535)
    ref2, _ = reference_confusion(pred[:2], gt[:2], ignore_label=65535, labels=[int(x) for x in acc.labels])
    np.testing.assert_array_equal(acc.counts, ref1 + ref2)
    assert cuda_calls["chunks"] > seen


def test_dask_engine_backend_cuda(cuda_calls):
    pred, gt, mask = _volumes((6, 5, 8), seed=4)
    dp = da.from_array(pred, chunks=(4, 5, 3))
    dg = da.from_array(gt, chunks=(3, 2, 8))
    cpu = fse.ConfusionMatrix(ignore_label=65535)
    count_into(cpu, dp, dg, mask, backend="cpu")
    gpu = fse.ConfusionMatrix(ignore_label=65535)
    stats = count_into(gpu, dp, dg, mask, backend="cuda")
    assert stats.engine == "dask" and cuda_calls["chunks"] == stats.units > 1
    assert_same(gpu, cpu)


def test_label_error_through_the_engine_names_the_full_volume_voxel(tmp_path):
    pred, gt, _ = _volumes((6, 7, 9), seed=5)
    gt[gt == 65535] = 0
    gt[4, 5, 6] = 9
    pp, _ = write_zarr(tmp_path / "p.zarr", pred.astype(np.int32), (4, 7, 4))
    pg, _ = write_zarr(tmp_path / "g.zarr", gt, (3, 4, 9))
    errors = []
    for backend in ("cpu", "cuda"):
        acc = fse.ConfusionMatrix(labels=[0, 1, 2, 300, 4464])
        with pytest.raises(LabelError) as info:
            count_into(acc, pp, pg, workers=1, backend=backend)
        errors.append(info.value)
        assert acc.num_classes == 5 and acc.n_voxels == 0  # the accumulator is untouched
    cpu_e, gpu_e = errors
    assert (gpu_e.role, gpu_e.value, gpu_e.position) == (cpu_e.role, cpu_e.value, cpu_e.position)
    assert (gpu_e.role, gpu_e.value, gpu_e.position) == ("gt", 9, (4, 5, 6))
    assert str(gpu_e) == str(cpu_e)


def test_device_arrays_are_counted_in_place(cuda_calls):
    """Arrays already on the GPU go straight to the CUDA counter through evaluate / confusion_matrix."""
    from numba import cuda

    rng = np.random.default_rng(21)
    gt = rng.integers(0, 4, (6, 7, 9)).astype(np.uint8)
    pred = gt.copy()
    pred[rng.random(gt.shape) < 0.3] = 1
    mask = rng.random(gt.shape) < 0.8
    want, _ = reference_confusion(pred, gt, mask=mask, labels=list(range(4)))
    dg, dp, dm = cuda.to_device(gt), cuda.to_device(pred), cuda.to_device(mask)
    res = fse.evaluate(dp, dg, num_classes=4, mask=dm)  # backend "auto" follows the data
    assert res.confusion_matrix.tolist() == np.asarray(want).tolist()
    assert res.timing["backend"] == "cuda" and res.timing["engine"] == "device"
    assert res.inputs["gt"]["source"].startswith("GPU array")
    cm = fse.confusion_matrix(dp, dg, mask=dm)
    assert cm.tolist() == np.asarray(want).tolist()
    with pytest.raises(fse.OptionError, match="GPU"):
        fse.evaluate(dp, dg, num_classes=4, backend="cpu")
