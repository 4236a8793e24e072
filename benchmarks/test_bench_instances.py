"""Group "instances": the sparse contingency table of two uint64 instance volumes, beside scikit-image.

Data: ``SegSpec(kind="ids64")``, uint64 ids near 2**64 on a grid of about 80**3 cells whatever
the volume size (about 10**5 instances in the foreground, about 85 % background; the prediction
shifts every cell boundary by one voxel and relabels 2 % of the cells). Every case checks its
table against the generator's independent numpy reference (distinct pairs by lexsort) after timing.

* ``fse.contingency`` on the in-memory volume (``kernel`` size: 512**3 full, 128**3 small) with
  the default workers (the cores available) and with one;
* scikit-image's ``contingency_table`` on the first planes only (it is far slower, and needs the
  ids renumbered 0..n first: it indexes a coo_matrix by raw id, so 2**64 - 1 cannot be a row;
  the renumbering is not timed); make_table.py compares voxels per second;
* ``fse.evaluate(..., instances=True)``: the table plus every instance metric (and the per-class
  confusion counts of the ~10**5 ids, in the same pass);
* memory: ``fse.contingency`` over zarr stores (128**3 chunks) of 256**3, 512**3 and 1024**3
  voxels (small: 64**3 to 256**3) at the same id count, each in a fresh process; the peak RSS
  should stay flat while the volume grows 64-fold (the table follows the distinct pairs).
"""

from __future__ import annotations

import fastseg_bench_data as bd
import numpy as np
import pytest

import fastseg_eval as fse

S = bd.sizes()
N = S["kernel"]
ROUNDS = S["kernel_rounds"]
PLANES = min(S["sklearn_planes"], N)
SIZE = f"{N}^3"
SPEC = bd.SegSpec((N, N, N), kind="ids64")
WORKERS = bd.cpu_count()
_held: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}


def pair():
    if "ids64" not in _held:
        _held["ids64"] = bd.cached_pair(SPEC)
    return _held["ids64"]


@pytest.fixture(scope="module")
def warm_contingency() -> None:
    """Fill numba's cache in a throwaway worker first, so that no measured worker compiles."""
    with bd.Worker() as w:
        w.call("prepare", dtype="uint64", num_classes=4, contingency=True)


@pytest.fixture(scope="module", autouse=True)
def _free_data():
    yield
    _held.clear()


def check(ct, ref):
    g, p, c = ct.raw()
    np.testing.assert_array_equal(g, ref["ct_gt"])
    np.testing.assert_array_equal(p, ref["ct_pred"])
    np.testing.assert_array_equal(c, ref["ct_count"])


def n_ids(ref) -> int:
    return int(np.count_nonzero(np.unique(ref["ct_gt"])))


CASES = [("fastseg-eval contingency", "fse", None), ("fastseg-eval contingency workers=1", "fse1", 1)]


@pytest.mark.benchmark(group="instances")
@pytest.mark.parametrize("case,key,workers", CASES, ids=[f"{k}-{SIZE}" for _, k, _ in CASES])
def test_contingency(benchmark, case, key, workers):
    pred, gt, ref = pair()
    fse.contingency(pred[:2], gt[:2], workers=workers)  # compile outside the timed rounds
    ct = benchmark.pedantic(
        fse.contingency, args=(pred, gt), kwargs={"workers": workers}, rounds=ROUNDS, iterations=1,
        warmup_rounds=1,
    )  # fmt: skip
    bd.annotate(
        benchmark, key=f"instances.{key}", case=case, size=SIZE, voxels=gt.size, gt_ids=n_ids(ref),
        pairs=len(ref["ct_count"]), workers=workers or WORKERS, dtype=str(gt.dtype),
    )  # fmt: skip
    check(ct, ref)


@pytest.mark.benchmark(group="instances")
@pytest.mark.parametrize("planes", [PLANES], ids=[f"skimage-{PLANES}x{N}x{N}"])
def test_skimage(benchmark, planes):
    metrics = pytest.importorskip("skimage.metrics")
    pred, gt, _ = pair()
    g_ids, g = np.unique(gt[:planes], return_inverse=True)  # renumbered: not timed
    p_ids, p = np.unique(pred[:planes], return_inverse=True)
    g, p = g.reshape(gt[:planes].shape), p.reshape(pred[:planes].shape)
    table = benchmark.pedantic(
        metrics.contingency_table, args=(g, p), rounds=max(1, ROUNDS - 2), iterations=1, warmup_rounds=0
    )
    size = f"{planes}x{N}x{N}"
    bd.annotate(
        benchmark, key="instances.skimage", case="scikit-image contingency_table (ids renumbered first, untimed)",
        size=size, voxels=g.size,
    )  # fmt: skip
    coo = table.tocoo()
    ref = bd.pair_counts(gt[:planes], pred[:planes])
    got = sorted(zip(g_ids[coo.row].tolist(), p_ids[coo.col].tolist(), coo.data.tolist()))
    want = list(zip(ref["ct_gt"].tolist(), ref["ct_pred"].tolist(), ref["ct_count"].tolist()))
    assert got == want  # rows = gt in both


@pytest.mark.benchmark(group="instances")
@pytest.mark.parametrize("case", ["evaluate"], ids=[f"fse-evaluate-instances-{SIZE}"])
def test_evaluate_instances(benchmark, case):
    pred, gt, ref = pair()
    res = benchmark.pedantic(
        fse.evaluate, args=(pred, gt), kwargs={"instances": True}, rounds=max(1, ROUNDS - 2), iterations=1,
        warmup_rounds=1,
    )  # fmt: skip
    bd.annotate(
        benchmark, key="instances.evaluate",
        case="fastseg-eval evaluate(instances=True) (table + instance metrics + per-id confusion counts)",
        size=SIZE, voxels=gt.size, gt_ids=n_ids(ref),
    )  # fmt: skip
    assert res.instances["n_pairs"] == len(ref["ct_count"])
    assert res.instances["n_gt"] == n_ids(ref)


@pytest.mark.benchmark(group="instances")
@pytest.mark.parametrize("n", S["scaling"], ids=[f"contingency-zarr-{n}^3" for n in S["scaling"]])
def test_memory_flat(benchmark, warm_contingency, n):
    zpair = bd.ensure_zarr_pair(bd.SegSpec((n, n, n), kind="ids64"))
    want = bd.table_digest(zpair["ct_gt"], zpair["ct_pred"], zpair["ct_count"])
    with bd.Worker() as w:
        base = w.call("prepare", dtype="uint64", num_classes=4, contingency=True)
        reply = benchmark.pedantic(
            w.call, args=("contingency",), kwargs=dict(pred=zpair["pred"], gt=zpair["gt"], workers=WORKERS),
            rounds=S["rounds"], iterations=1, warmup_rounds=1,
        )  # fmt: skip
        bd.annotate(
            benchmark, key=f"instances.scaling.{n}", case="fastseg-eval contingency (zarr)", size=f"{n}^3",
            voxels=zpair["voxels"], edge=n, workers=WORKERS, pairs=reply["entries"],
            peak_rss_mib=round(w.peak_rss_mib, 1), baseline_rss_mib=round(base["maxrss_mib"], 1),
        )  # fmt: skip
    assert reply["digest"] == want and reply["voxels"] == zpair["voxels"]
