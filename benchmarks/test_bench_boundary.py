"""Group "boundary": hd95 + assd + nsd per class, beside the libraries users would call.

* ``boundary-256``: in-memory 256**3 pair (``small``: 128**3), K = 4 (3 foreground labels),
  ``fse.evaluate(metrics="hd95,assd,nsd")`` against DeepMind's ``surface-distance`` (one
  ``compute_surface_distances`` per label, then its three metrics) and MONAI
  (``compute_hausdorff_distance`` / ``compute_average_surface_distance`` / ``compute_surface_dice``
  on one-hot tensors; skipped unless MONAI is installed). Each reference runs once (they take
  seconds to minutes) and is checked against fastseg-eval's numbers.
* ``boundary-zarr``: a 1024**3 zarr pair (``small``: 256**3; 128**3 chunks), K = 4, in a fresh
  process with 2 workers: wall time and peak RSS of ``fastseg-eval --metrics hd95,assd,nsd``.
"""

from __future__ import annotations

import json
import sys
import warnings

import fastseg_bench_data as bd
import numpy as np
import pytest

S = bd.sizes()
K = 4
N_MEM = 256 if bd.bench_size() == "full" else 128
N_ZARR = S["zarr"]
METRICS = "hd95,assd,nsd"


@pytest.fixture(scope="module")
def pair():
    pred, gt, _ = bd.cached_pair(bd.SegSpec((N_MEM,) * 3, num_classes=K))
    return pred, gt


def _fse(pred, gt, surface):
    import fastseg_eval as fse

    r = fse.evaluate(pred, gt, num_classes=K, metrics=METRICS, surface=surface, workers=bd.cpu_count())
    return {k: [r.per_class[k][m] for m in ("hd95", "assd", "nsd")] for k in range(1, K)}


def _deepmind(pred, gt):
    np.Inf = np.inf  # noqa: NPY201 (surface-distance 0.1 calls np.Inf)
    import surface_distance as sd

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(1, K):
            s = sd.compute_surface_distances(gt == k, pred == k, (1.0, 1.0, 1.0))
            pa, pb = s["surfel_areas_gt"], s["surfel_areas_pred"]
            assd = (np.sum(s["distances_gt_to_pred"] * pa) + np.sum(s["distances_pred_to_gt"] * pb)) / (
                np.sum(pa) + np.sum(pb)
            )
            out[k] = [sd.compute_robust_hausdorff(s, 95), assd, sd.compute_surface_dice_at_tolerance(s, 1.0)]
    return out


def _monai(pred, gt):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yp = torch.from_numpy(np.stack([pred == k for k in range(1, K)])[None].astype(np.float32))
        yg = torch.from_numpy(np.stack([gt == k for k in range(1, K)])[None].astype(np.float32))
        hd = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95)
        asd = compute_average_surface_distance(yp, yg, include_background=True, symmetric=True)
        nsd = compute_surface_dice(yp, yg, [1.0] * (K - 1), include_background=True)
    for i, k in enumerate(range(1, K)):
        out[k] = [float(hd[0, i]), float(asd[0, i]), float(nsd[0, i])]
    return out


def _check(got, ref, rtol):
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=1e-6, err_msg=f"label {k}")


@pytest.mark.benchmark(group="boundary")
@pytest.mark.parametrize("case", ["fastseg-eval deepmind", "surface-distance", "fastseg-eval monai", "monai"])
def test_boundary_in_memory(benchmark, pair, case):
    pred, gt = pair
    if case == "monai":
        pytest.importorskip("monai")
        fn, ref = (lambda: _monai(pred, gt)), ("monai", 1e-6)
    elif case == "surface-distance":
        pytest.importorskip("surface_distance")
        fn, ref = (lambda: _deepmind(pred, gt)), ("deepmind", 0)
    else:
        surface = case.split()[-1]
        _fse(pred[:16], gt[:16], surface)  # compiled kernels before timing
        fn, ref = (lambda: _fse(pred, gt, surface)), None
    rounds = 1 if ref is not None else S["rounds"]
    got = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if ref is not None:
        _check(_fse(pred, gt, ref[0]), got, ref[1] or 1e-9)
    key = {"fastseg-eval deepmind": "fse", "surface-distance": "deepmind", "fastseg-eval monai": "fse_monai",
           "monai": "monai"}[case]  # fmt: skip
    bd.annotate(benchmark, key=f"boundary.{key}", case=case, size=f"{N_MEM}^3", voxels=N_MEM**3, classes=K)


_RUN = """
import json, sys, time
import fastseg_eval as fse
t = time.perf_counter()
r = fse.evaluate(sys.argv[1], sys.argv[2], num_classes=4, metrics="hd95,assd,nsd", workers=2)
print(json.dumps({"seconds": time.perf_counter() - t, "far": r.options["boundary_far_points"],
                  "hd95": [r.per_class[k]["hd95"] for k in (1, 2, 3)]}))
"""


@pytest.mark.benchmark(group="boundary")
def test_boundary_zarr(benchmark, warm_kernels):
    zpair = bd.ensure_zarr_pair(bd.SegSpec((N_ZARR,) * 3, num_classes=K))
    bd.run_measured([sys.executable, "-c", _RUN, zpair["pred"], zpair["gt"]])  # compile boundary kernels once
    box = {}

    def run():
        out, rss = bd.run_measured([sys.executable, "-c", _RUN, zpair["pred"], zpair["gt"]])
        box.update(json.loads(out), rss=rss)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    bd.annotate(
        benchmark, key="boundary.zarr", case="fastseg-eval hd95+assd+nsd, 2 workers", size=f"{N_ZARR}^3",
        voxels=N_ZARR**3, peak_rss_mib=round(box["rss"], 1), engine_seconds=round(box["seconds"], 2),
        far_points=box["far"],
    )  # fmt: skip
