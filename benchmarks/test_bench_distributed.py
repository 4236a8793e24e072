"""Local thread engine vs a dask.distributed LocalCluster on the same zarr pair.

Group ``distributed-<N>``: the thread engine (2 threads), an already running LocalCluster
(2 single-threaded worker processes, start-up not timed), and
``scheduler="local:2"`` as the command line uses it (cluster start-up and shutdown included).
Each entry but the last has one untimed warm-up round (numba's cache loads on first use).
The cluster entries record ``overhead_vs_threads`` (their mean over the threads' mean) in
``extra_info``.

    pytest benchmarks/test_bench_distributed.py --benchmark-only                  # 512^3 pair
    FASTSEG_BENCH_SIZE=small pytest benchmarks/test_bench_distributed.py --benchmark-only   # 128^3

The 512^3 pair is two uint8 volumes of 128 MiB each (64 chunks of 128^3), written once per
session under pytest's temporary directory.
"""

from __future__ import annotations

import fastseg_bench_data as bd
import numpy as np
import pytest
import zarr

import fastseg_eval as fse

distributed = pytest.importorskip("distributed")

SIDE = bd.sizes()["distributed"]  # FASTSEG_BENCH_SIZE: 512 (full) or 128 (small)
CHUNK = 64 if SIDE <= 128 else 128
K = 8
GROUP = f"distributed-{SIDE}"
ROUNDS = 2
_means: dict[str, float] = {}


def _slab_pair(z0: int, z1: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blocky ground truth (labels constant over 8^3 cells) and a prediction that disagrees on
    about 10 % of the voxels, for slab ``z0:z1``."""
    coarse = rng.integers(0, K, ((z1 - z0 + 7) // 8, SIDE // 8, SIDE // 8), dtype=np.uint8)
    gt = np.repeat(np.repeat(np.repeat(coarse, 8, 0), 8, 1), 8, 2)[: z1 - z0]
    flip = rng.random(gt.shape, dtype=np.float32) < 0.1
    pred = np.where(flip, rng.integers(0, K, gt.shape, dtype=np.uint8), gt)
    return np.ascontiguousarray(gt), pred


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(pred_path, gt_path, expected_matrix)``; the expected matrix by np.bincount, slab by slab."""
    root = tmp_path_factory.mktemp("bench-distributed")
    shape = (SIDE,) * 3
    arrays = {
        name: zarr.create_array(
            store=str(root / f"{name}.zarr"), shape=shape, chunks=(CHUNK,) * 3, dtype="uint8", fill_value=0
        )
        for name in ("gt", "pred")
    }
    rng = np.random.default_rng(512)
    expected = np.zeros(K * K, dtype=np.int64)
    for z0 in range(0, SIDE, CHUNK):
        gt, pred = _slab_pair(z0, z0 + CHUNK, rng)
        arrays["gt"][z0 : z0 + CHUNK] = gt
        arrays["pred"][z0 : z0 + CHUNK] = pred
        expected += np.bincount(gt.astype(np.int64).ravel() * K + pred.ravel(), minlength=K * K)
    return str(root / "pred.zarr"), str(root / "gt.zarr"), expected.reshape(K, K)


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        tiny = np.zeros((2, 2, 2), dtype=np.uint8)
        c.run(fse.confusion_matrix, tiny, tiny, K)  # load numba's cache on every worker, untimed
        yield c


def _run(benchmark, name, pair, rounds=ROUNDS, warmup=1, **options):
    pred, gt, expected = pair
    result = benchmark.pedantic(
        fse.evaluate,
        args=(pred, gt),
        kwargs=dict(num_classes=K, **options),
        rounds=rounds,
        iterations=1,
        warmup_rounds=warmup,
    )
    np.testing.assert_array_equal(result.confusion_matrix, expected)
    benchmark.extra_info["voxels"] = SIDE**3
    benchmark.extra_info["key"] = f"distributed.{name}"
    benchmark.extra_info["engine"] = result.to_dict()["timing"]["engine"]
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _means[name] = stats.stats.mean
        if name != "threads" and "threads" in _means:
            benchmark.extra_info["overhead_vs_threads"] = round(_means[name] / _means["threads"], 3)


@pytest.mark.benchmark(group=GROUP)
def test_threads(benchmark, pair):
    _run(benchmark, "threads", pair, workers=2)


@pytest.mark.benchmark(group=GROUP)
def test_local_cluster_running(benchmark, pair, client):
    _run(benchmark, "local-cluster", pair, scheduler=client)


@pytest.mark.benchmark(group=GROUP)
def test_local_2_with_startup(benchmark, pair):
    _run(benchmark, "local:2", pair, rounds=1, warmup=0, scheduler="local:2")  # start-up dominates: one round
