"""Helpers of the CUDA simulator tests: count a volume chunk by chunk on the CPU backend and on the
CUDA backend (numba's simulator), and compare both with each other and with numpy.

These modules are named ``sim_*.py`` so that a plain ``pytest`` run does not collect them: the
simulator must be switched on (``NUMBA_ENABLE_CUDASIM=1``) before numba is imported, so they run
in a child process started by ``tests/test_cuda_sim.py``. Keep arrays tiny: the simulator runs
one Python thread per CUDA thread.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def require_simulator() -> None:
    """Skip the calling module unless the simulator is on (run it through tests/test_cuda_sim.py)."""
    if not SIMULATED:
        pytest.skip(
            "CUDA simulator tests run in their own process: pytest tests/test_cuda_sim.py",
            allow_module_level=True,
        )


def chunk_slices(shape: Sequence[int], chunks: Sequence[int]):
    """Regular chunks of ``shape`` in C order: (slices, offset)."""
    ranges = [range(0, max(n, 1), c) for n, c in zip(shape, chunks)]
    for start in itertools.product(*ranges):
        sl = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, chunks, shape))
        yield sl, start


def _chunks(gt, chunks):
    if gt.ndim == 0:
        return [(..., ())]  # a 0-d array stays an array (gt[()] would be a scalar)
    return chunk_slices(gt.shape, chunks or tuple(max(1, n) for n in gt.shape))


def count_cpu(gt, pred, mask=None, *, chunks=None, **space) -> Any:
    """The CPU backend's accumulator for ``gt`` / ``pred`` counted chunk by chunk (ground truth first)."""
    import fastseg_eval as fse

    acc = fse.ConfusionMatrix(**space)
    for sl, off in _chunks(gt, chunks):
        acc.add_chunk(gt[sl], pred[sl], None if mask is None else mask[sl], offset=off)
    return acc


LAST_COUNTER: list[Any] = [None]  # the CudaCounter of the latest count_gpu call (tests inspect it)


def count_gpu(gt, pred, mask=None, *, chunks=None, **space) -> Any:
    """The same through :class:`fastseg_eval.reducers.cuda.CudaCounter` (what the engine does)."""
    import fastseg_eval as fse
    from fastseg_eval.reducers.cuda import CudaCounter

    acc = fse.ConfusionMatrix(**space)
    counter = CudaCounter(acc.spawn())
    for sl, off in _chunks(gt, chunks):
        counter.add_chunk(gt[sl], pred[sl], None if mask is None else mask[sl], offset=off)
    acc.merge(counter.finish())
    LAST_COUNTER[0] = counter
    return acc


def assert_same(gpu, cpu) -> None:
    """Every public number of two accumulators is identical (labels, matrix or marginals, skips)."""
    np.testing.assert_array_equal(gpu.labels, cpu.labels, err_msg="labels differ")
    assert gpu.labels.dtype == cpu.labels.dtype
    assert gpu.is_dense == cpu.is_dense
    if cpu.is_dense:
        np.testing.assert_array_equal(gpu.counts, cpu.counts, err_msg="matrix differs")
    for name in ("diagonal", "gt_counts", "pred_counts"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)
    assert (gpu.n_voxels, gpu.n_ignored, gpu.n_masked) == (cpu.n_voxels, cpu.n_ignored, cpu.n_masked)


def assert_matches_numpy(acc, pred, gt, *, mask=None, ignore_label=None, labels=None) -> None:
    """``acc`` equals the independent numpy reference of tests/strategies.py."""
    from strategies import reference_confusion, reference_marginals

    if acc.is_dense:
        ref, ref_labels = reference_confusion(pred, gt, mask=mask, ignore_label=ignore_label, labels=labels)
        assert [int(x) for x in acc.labels] == [int(x) for x in ref_labels]
        np.testing.assert_array_equal(acc.counts, ref)
        return
    assert labels is None
    ref_labels, diag, gtc, prc = reference_marginals(pred, gt, mask=mask, ignore_label=ignore_label)
    assert [int(x) for x in acc.labels] == ref_labels
    np.testing.assert_array_equal(acc.diagonal, diag)
    np.testing.assert_array_equal(acc.gt_counts, gtc)
    np.testing.assert_array_equal(acc.pred_counts, prc)


def write_zarr(path, data: np.ndarray, chunks, *, zarr_format: int = 3):
    """Write ``data`` as a zarr array with chunk shape ``chunks``; return (path, array opened read-only)."""
    import zarr

    arr = zarr.create_array(
        store=str(path), shape=data.shape, chunks=tuple(chunks), dtype=data.dtype, fill_value=0,
        zarr_format=zarr_format, overwrite=True,
    )  # fmt: skip
    arr[...] = data
    return str(path), zarr.open_array(store=str(path), mode="r")


def raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # the tests compare what each backend raises
        return e
    return None
