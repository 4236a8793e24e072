"""Group "sweep": the threshold sweep (ROC / PR curves) against a plain thresholded evaluation.

Same float32 zarr probability map (v3 default codec, 128^3 chunks) and uint8 ground truth, same
run: ``evaluate(threshold=0.5)`` versus ``evaluate(threshold=0.5, thresholds=1000)``. The issue's
target is that the sweep adds at most 2x to the end-to-end time (ratio in ``extra_info``).

Size: 512^3 by default; ``FASTSEG_BENCH_SIZE=small`` uses 256^3. The pair is written once to
``$FASTSEG_BENCH_DATA`` (default ``bench-data/`` in the repository) and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import fastseg_bench_data as bd
import numpy as np
import pytest
import zarr

import fastseg_eval as fse

SIDE = bd.sizes()["sweep"]  # FASTSEG_BENCH_SIZE: 512 (full) or 256 (small)
CHUNK = 128
_times: dict[str, float] = {}


def _data_dir() -> Path:
    d = Path(os.environ.get("FASTSEG_BENCH_DATA", Path(__file__).resolve().parent.parent / "bench-data"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def prob_pair() -> tuple[str, str]:
    """A smooth float32 probability field and a ground truth correlated with it."""
    root = _data_dir() / f"sweep-{SIDE}"
    p_path, g_path = root / "prob.zarr", root / "gt.zarr"
    if not (root / "done").exists():
        rng = np.random.default_rng(7)
        shape = (SIDE,) * 3
        zp = zarr.create_array(p_path, shape=shape, chunks=(CHUNK,) * 3, dtype="f4", overwrite=True)
        zg = zarr.create_array(g_path, shape=shape, chunks=(CHUNK,) * 3, dtype="u1", overwrite=True)
        coarse = rng.random((SIDE // 16,) * 3).astype(np.float32)
        for z0 in range(0, SIDE, CHUNK):  # slab by slab: bounded memory
            field = coarse[z0 // 16 : (z0 + CHUNK) // 16].repeat(16, 0).repeat(16, 1).repeat(16, 2)
            gt = (field > 0.85).astype(np.uint8)
            prob = np.clip(0.6 * gt + 0.4 * field + 0.15 * rng.standard_normal(field.shape, np.float32), 0, 1)
            zp[z0 : z0 + CHUNK] = prob.astype(np.float32)
            zg[z0 : z0 + CHUNK] = gt
        (root / "done").touch()
    return str(p_path), str(g_path)


@pytest.mark.benchmark(group=f"sweep {SIDE}^3 float32 zarr")
@pytest.mark.parametrize("bins", [None, 1000], ids=["plain-threshold", "sweep-1000-bins"])
def test_sweep_overhead(benchmark, prob_pair, bins):
    pred, gt = prob_pair
    res = benchmark.pedantic(
        fse.evaluate, args=(pred, gt), kwargs={"threshold": 0.5, "thresholds": bins}, rounds=3, iterations=1,
        warmup_rounds=1,
    )  # fmt: skip
    assert res.n_voxels == SIDE**3
    assert (res.curves is not None) == (bins is not None)
    key = "sweep" if bins else "plain"
    _times[key] = benchmark.stats.stats.median
    benchmark.extra_info.update(key=f"sweep.{key}", size=f"{SIDE}^3", voxels=SIDE**3)
    if bins and "plain" in _times:
        ratio = _times["sweep"] / _times["plain"]
        benchmark.extra_info.update(ratio_to_plain=round(ratio, 3), target="<= 2.0", met=bool(ratio <= 2.0))
