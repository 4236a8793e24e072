"""Group "scaling": time per voxel and peak memory of end-to-end zarr evaluation by volume size.

The same generator and layout as the zarr group (uint8, K=4, 128**3 chunks, default codec) at
256**3, 512**3 and 1024**3 (``small``: 64**3 to 256**3). Each size runs in its own fresh child
process; ``peak_rss_mib`` is that process's high-water mark (imports and the untimed warm-up
round included) and ``baseline_rss_mib`` the mark after imports and kernel loading. Memory
should stay flat while the volume grows 64-fold: the engine holds about ``workers`` chunks.
"""

from __future__ import annotations

import fastseg_bench_data as bd
import numpy as np
import pytest

S = bd.sizes()
K = 4
WORKERS = bd.cpu_count()


@pytest.mark.benchmark(group="scaling")
@pytest.mark.parametrize("n", S["scaling"], ids=[f"evaluate-{n}^3" for n in S["scaling"]])
def test_scaling(benchmark, warm_kernels, n):
    zpair = bd.ensure_zarr_pair(bd.SegSpec((n, n, n), num_classes=K))
    with bd.Worker() as w:
        base = w.call("prepare")
        reply = benchmark.pedantic(
            w.call,
            args=("evaluate",),
            kwargs=dict(pred=zpair["pred"], gt=zpair["gt"], num_classes=K, workers=WORKERS),
            rounds=S["rounds"],
            iterations=1,
            warmup_rounds=1,
        )
        bd.annotate(
            benchmark,
            key=f"scaling.{n}",
            case="fastseg-eval",
            size=f"{n}^3",
            voxels=zpair["voxels"],
            edge=n,
            workers=WORKERS,
            peak_rss_mib=round(w.peak_rss_mib, 1),
            baseline_rss_mib=round(base["maxrss_mib"], 1),
        )
    np.testing.assert_array_equal(np.array(reply["cm"]), np.array(zpair["cm"]))
