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
* ``raw codec floor``: every chunk file of both arrays read and zstd-decoded with numcodecs
  into a reused buffer in a pool of W threads, nothing else (no zarr, no checks, no counting):
  the floor any reader of these stores sits on. ``fastseg-eval`` and this floor also run on
  the 512**3 pair (half the size), for the ratio at both sizes;
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
WORKERS = bd.cpu_count()


HALF = N // 2
_pairs: dict[int, dict] = {}


def zpair_of(n: int) -> dict:
    if n not in _pairs:
        _pairs[n] = bd.ensure_zarr_pair(bd.SegSpec((n, n, n), num_classes=K))
    return _pairs[n]


CASES = [
    ("fastseg-eval", "evaluate", dict(num_classes=K, workers=WORKERS), N),
    ("raw codec floor (numcodecs zstd, same threads)", "raw_floor", dict(workers=WORKERS), N),
    ("decode-only (zarr-python, same threads)", "decode", dict(workers=WORKERS), N),
    ("decode-only (fastseg chunk reader, same threads)", "decode_fast", dict(workers=WORKERS), N),
    ("dask bincount idiom", "dask", dict(num_classes=K), N),
    ("fastseg-eval", "evaluate", dict(num_classes=K, workers=WORKERS), HALF),
    ("raw codec floor (numcodecs zstd, same threads)", "raw_floor", dict(workers=WORKERS), HALF),
]


@pytest.mark.benchmark(group="zarr")
@pytest.mark.parametrize("case,op,kwargs,n", CASES, ids=[f"{op}-{n}^3" for _, op, _, n in CASES])
def test_zarr(benchmark, warm_kernels, case, op, kwargs, n):
    zpair = zpair_of(n)
    size = f"{n}^3"
    key = f"zarr.{op}" if n == N else f"zarr.{op}.half"
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
            key=key,
            case=case,
            size=size,
            voxels=zpair["voxels"],
            workers=WORKERS,
            peak_rss_mib=round(w.peak_rss_mib, 1),
            baseline_rss_mib=round(base["maxrss_mib"], 1),
            stored_mib=round(zpair["stored_bytes"] / 2**20, 1),
            chunks=zpair["chunks"],
        )
    if op in ("decode", "decode_fast", "raw_floor"):
        assert reply["bytes"] == 2 * zpair["voxels"]  # every voxel of both uint8 arrays was decoded
    else:
        np.testing.assert_array_equal(np.array(reply["cm"]), np.array(zpair["cm"]))


# --------------------------------------------------------------------------- sparse stores
SPARSE = [
    ("fastseg-eval", "evaluate", dict(num_classes=K, workers=WORKERS)),
    (
        "fastseg-eval, unstored chunks filled and counted (the path before)",
        "evaluate",
        dict(num_classes=K, workers=WORKERS, unstored_as_fill=False),
    ),
    ("raw codec floor (stored chunks only)", "raw_floor", dict(workers=WORKERS)),
]


@pytest.mark.benchmark(group="zarr sparse")
@pytest.mark.parametrize(
    "case,op,kwargs", SPARSE, ids=["evaluate", "evaluate-filled", "raw_floor"]
)
def test_zarr_sparse(benchmark, warm_kernels, case, op, kwargs):
    """A ``N**3`` pair whose data sits in one 256**3 corner: 8 of the chunks are stored, the
    rest are fill value and have no file (what zarr writes for sparse label volumes)."""
    sp = bd.ensure_sparse_zarr_pair(N)
    assert sp["stored_chunks"] < sp["total_chunks"]
    with bd.Worker() as w:
        base = w.call("prepare")
        reply = benchmark.pedantic(
            w.call, args=(op,), kwargs=dict(pred=sp["pred"], gt=sp["gt"], **kwargs),
            rounds=S["rounds"], iterations=1, warmup_rounds=1,
        )  # fmt: skip
        key = "zarr_sparse." + ("evaluate_filled" if kwargs.get("unstored_as_fill") is False else op)
        bd.annotate(
            benchmark, key=key, case=case, size=f"{N}^3", voxels=sp["voxels"], workers=WORKERS,
            peak_rss_mib=round(w.peak_rss_mib, 1), baseline_rss_mib=round(base["maxrss_mib"], 1),
            stored_chunks=f"{sp['stored_chunks']} of {sp['total_chunks']}",
        )  # fmt: skip
    if op == "evaluate":
        np.testing.assert_array_equal(np.array(reply["cm"]), np.array(sp["cm"]))
    else:
        assert reply["bytes"] == 2 * sp["stored_chunks"] * 128**3
