"""Group "zarr": end-to-end evaluation of a zarr v3 pair beside reading it and the dask idiom.

Data: a 1024**3 uint8 pair (K=4), 128**3 chunks, zarr's default codec (zstd), written once into
the benchmark data directory and reused by later runs. Cases, each in its own fresh child
process (so that its peak RSS is its own), all with the same number of threads:

* ``fastseg-eval``: ``fse.evaluate(pred_path, gt_path, num_classes=4, workers=W)``;
* ``decode-only``: zarr-python reads every chunk of both arrays in a pool of W threads
  (``arr[chunk slices]``) and does nothing else: what reading the data costs a zarr user;
* ``decode-only (fastseg reader)``: the same with fastseg-eval's own chunk reader (numcodecs in
  the thread, reused buffers), i.e. the engine's reads without the counting: evaluate's time
  over this one is what counting adds;
* ``dask``: ``da.bincount((g.astype(np.int64) * K + p).ravel(), minlength=K*K)`` over
  ``da.from_zarr`` inputs, computed with dask's default (threaded) scheduler.

The confusion matrices of fastseg-eval and dask are checked against the reference counts.
"""

from __future__ import annotations

import fastseg_bench_data as bd
import numpy as np
import pytest

S = bd.sizes()
N = S["zarr"]
K = 4
SIZE = f"{N}^3"
WORKERS = bd.cpu_count()


@pytest.fixture(scope="module")
def zpair():
    return bd.ensure_zarr_pair(bd.SegSpec((N, N, N), num_classes=K))


CASES = [
    ("fastseg-eval", "evaluate", dict(num_classes=K, workers=WORKERS)),
    ("decode-only (zarr-python, same threads)", "decode", dict(workers=WORKERS)),
    ("decode-only (fastseg chunk reader, same threads)", "decode_fast", dict(workers=WORKERS)),
    ("dask bincount idiom", "dask", dict(num_classes=K)),
]


@pytest.mark.benchmark(group="zarr")
@pytest.mark.parametrize("case,op,kwargs", CASES, ids=[f"{op}-{SIZE}" for _, op, _ in CASES])
def test_zarr(benchmark, zpair, warm_kernels, case, op, kwargs):
    with bd.Worker() as w:
        base = w.call("prepare")
        reply = benchmark.pedantic(
            w.call,
            args=(op,),
            kwargs=dict(pred=zpair["pred"], gt=zpair["gt"], **kwargs),
            rounds=S["rounds"],
            iterations=1,
            warmup_rounds=1,
        )
        bd.annotate(
            benchmark,
            key=f"zarr.{op}",
            case=case,
            size=SIZE,
            voxels=zpair["voxels"],
            workers=WORKERS,
            peak_rss_mib=round(w.peak_rss_mib, 1),
            baseline_rss_mib=round(base["maxrss_mib"], 1),
            stored_mib=round(zpair["stored_bytes"] / 2**20, 1),
            chunks=zpair["chunks"],
        )
    if op in ("decode", "decode_fast"):
        assert reply["bytes"] == 2 * zpair["voxels"]  # every voxel of both uint8 arrays was decoded
    else:
        np.testing.assert_array_equal(np.array(reply["cm"]), np.array(zpair["cm"]))
