"""Group "kernel": in-memory numpy volumes, fastseg-eval beside the baselines a user would write.

Three label spaces on the same generator (about 85 % background, jittered boundaries):

* K=4 (uint8, 512**3): ``fse.confusion_matrix`` with ``num_classes`` (direct kernel), the same on
  one thread, and with label discovery; numpy ``bincount(gt * K + pred)``; scikit-learn
  ``confusion_matrix`` on the first planes only (it is two orders of magnitude slower; the
  size is in the case name, and make_table.py compares voxels per second).
* K=256 (uint8, every label 0..255 present): ``fse.confusion_matrix(num_classes=256)`` and
  numpy bincount.
* instance ids (uint16, tens of thousands of ids): ``ConfusionMatrix(num_classes=65536)``
  (diagonal + marginals mode), ``fse.evaluate`` with discovery (all metrics for every id), and
  the numpy equivalent (three bincounts: gt, pred, and gt where gt == pred).
* the three fastseg-eval cases above alternated call by call (group "kernel ratios"): the
  K=256 / K=4 and ids / K=4 ratios from calls made moments apart. The cases of the groups
  above run tens of seconds apart, and this VM's speed drifts by 20-30 % within minutes, which
  the ratio of their medians then carries.

Every case checks its counts against the generator's independent numpy reference after timing.
"""

from __future__ import annotations

import time

import fastseg_bench_data as bd
import numpy as np
import pytest

import fastseg_eval as fse

S = bd.sizes()
N = S["kernel"]
ROUNDS = S["kernel_rounds"]
PLANES = min(S["sklearn_planes"], N)
SIZE = f"{N}^3"
SPECS = {
    "k4": bd.SegSpec((N, N, N), num_classes=4),
    "k256": bd.SegSpec((N, N, N), num_classes=256),
    "ids": bd.SegSpec((N, N, N), kind="instances"),
}
_held: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}


def pair(name: str):
    """``(pred, gt, reference)``; one data set in memory at a time (tests run in file order)."""
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


def numpy_bincount(pred, gt, k):
    return np.bincount((gt.astype(np.int64) * k + pred).ravel(), minlength=k * k).reshape(k, k)


# ------------------------------------------------------------------------------------ K = 4
K4 = [
    ("fastseg-eval", "fse", dict(num_classes=4)),
    ("fastseg-eval workers=1", "fse1", dict(num_classes=4, workers=1)),
    ("fastseg-eval discovery", "discovery", {}),
]


@pytest.mark.benchmark(group="kernel K=4")
@pytest.mark.parametrize("case,key,kwargs", K4, ids=[f"{k}-{SIZE}" for _, k, _ in K4])
def test_k4_fastseg(benchmark, case, key, kwargs):
    pred, gt, ref = pair("k4")
    cm = run(benchmark, fse.confusion_matrix, pred, gt, **kwargs)
    bd.annotate(benchmark, key=f"kernel.k4.{key}", case=case, size=SIZE, voxels=gt.size)
    np.testing.assert_array_equal(cm, ref["cm"])


@pytest.mark.benchmark(group="kernel K=4")
@pytest.mark.parametrize("k", [4], ids=[f"numpy-bincount-{SIZE}"])
def test_k4_numpy(benchmark, k):
    pred, gt, ref = pair("k4")
    cm = run(benchmark, numpy_bincount, pred, gt, k)
    bd.annotate(benchmark, key="kernel.k4.numpy", case="numpy bincount", size=SIZE, voxels=gt.size)
    np.testing.assert_array_equal(cm, ref["cm"])


@pytest.mark.benchmark(group="kernel K=4")
@pytest.mark.parametrize("planes", [PLANES], ids=[f"sklearn-{PLANES}x{N}x{N}"])
def test_k4_sklearn(benchmark, planes):
    from sklearn.metrics import confusion_matrix

    pred, gt, _ = pair("k4")
    p, g = pred[:planes].ravel(), gt[:planes].ravel()
    cm = run(benchmark, confusion_matrix, g, p, labels=np.arange(4), rounds=max(1, ROUNDS - 2))
    size = f"{planes}x{N}x{N}"
    bd.annotate(
        benchmark, key="kernel.k4.sklearn", case="scikit-learn confusion_matrix", size=size, voxels=g.size
    )
    np.testing.assert_array_equal(cm, numpy_bincount(p, g, 4))  # rows = gt in both


# ---------------------------------------------------------------------------------- K = 256
@pytest.mark.benchmark(group="kernel K=256")
@pytest.mark.parametrize("case", ["fastseg-eval", "numpy bincount"], ids=[f"fse-{SIZE}", f"numpy-{SIZE}"])
def test_k256(benchmark, case):
    pred, gt, ref = pair("k256")
    assert (ref["cm"].sum(axis=0) > 0).all() and (ref["cm"].sum(axis=1) > 0).all(), "all 256 labels occur"
    if case == "fastseg-eval":
        cm = run(benchmark, fse.confusion_matrix, pred, gt, num_classes=256)
    else:
        cm = run(benchmark, numpy_bincount, pred, gt, 256)
    key = "fse" if case == "fastseg-eval" else "numpy"
    bd.annotate(benchmark, key=f"kernel.k256.{key}", case=case, size=SIZE, voxels=gt.size)
    np.testing.assert_array_equal(cm, ref["cm"])


# ------------------------------------------------------------------------- uint16 instance ids
def _accumulate(acc, pred, gt):
    return acc.update(pred, gt)


def _check_ids(acc, ref):
    """The accumulator of the ids case against the generator's numpy counts."""
    assert not acc.is_dense
    np.testing.assert_array_equal(acc.labels, np.arange(65536))
    np.testing.assert_array_equal(acc.diagonal, ref["diag"])
    np.testing.assert_array_equal(acc.gt_counts, ref["gt"])
    np.testing.assert_array_equal(acc.pred_counts, ref["pred"])


def numpy_marginals(pred, gt):
    g, p = gt.ravel(), pred.ravel()
    n = 65536
    return {
        "gt": np.bincount(g, minlength=n),
        "pred": np.bincount(p, minlength=n),
        "diag": np.bincount(g[g == p], minlength=n),
    }


@pytest.mark.benchmark(group="kernel ids")
@pytest.mark.parametrize("case", ["ConfusionMatrix(65536)"], ids=[f"fse-accumulator-{SIZE}"])
def test_ids_accumulator(benchmark, case):
    pred, gt, ref = pair("ids")
    acc = benchmark.pedantic(
        _accumulate,
        setup=lambda: ((fse.ConfusionMatrix(num_classes=65536), pred, gt), {}),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )
    n_ids = int(np.count_nonzero(ref["gt"][1:]))
    bd.annotate(
        benchmark, key="kernel.ids.fse", case=f"fastseg-eval {case}", size=SIZE, voxels=gt.size, gt_ids=n_ids
    )
    _check_ids(acc, ref)


@pytest.mark.benchmark(group="kernel ids")
@pytest.mark.parametrize("case", ["evaluate"], ids=[f"fse-evaluate-{SIZE}"])
def test_ids_evaluate(benchmark, case):
    pred, gt, ref = pair("ids")
    res = run(benchmark, fse.evaluate, pred, gt)
    present = np.flatnonzero((ref["gt"] > 0) | (ref["pred"] > 0))
    bd.annotate(
        benchmark,
        key="kernel.ids.evaluate",
        case="fastseg-eval evaluate (discovery, all metrics)",
        size=SIZE,
        voxels=gt.size,
        labels=len(present),
    )
    np.testing.assert_array_equal(res.labels, present)
    assert res.confusion_matrix is None  # too many labels for a dense table: diagonal + marginals
    for name, key in (("tp", "diag"), ("support", "gt"), ("predicted", "pred")):
        got = np.array([res.per_class[int(lab)][name] for lab in present])
        np.testing.assert_array_equal(got, ref[key][present])


@pytest.mark.benchmark(group="kernel ids")
@pytest.mark.parametrize("case", ["numpy"], ids=[f"numpy-3-bincounts-{SIZE}"])
def test_ids_numpy(benchmark, case):
    pred, gt, ref = pair("ids")
    out = run(benchmark, numpy_marginals, pred, gt)
    bd.annotate(
        benchmark,
        key="kernel.ids.numpy",
        case="numpy diag + marginals (3 bincounts)",
        size=SIZE,
        voxels=gt.size,
    )
    for k in ("gt", "pred", "diag"):
        np.testing.assert_array_equal(out[k], ref[k])


# ------------------------------------------------------------------ ratios, cases alternated
PAIRED_ROUNDS = 15


@pytest.mark.benchmark(group="kernel ratios")
@pytest.mark.parametrize("case", ["alternated"], ids=[f"k4-k256-ids-alternated-{SIZE}"])
def test_ratios_alternated(benchmark, case):
    """K=4, K=256 and ids (the calls of the cases above) one after the other, ``PAIRED_ROUNDS``
    times; each round gives a K=256 / K=4 and an ids / K=4 throughput ratio (same voxel count:
    the inverse time ratio), and the medians of those are reported. The benchmark's own time is
    that of a whole round."""
    _held.clear()
    data = {name: bd.cached_pair(SPECS[name]) for name in ("k4", "k256", "ids")}
    times: dict[str, list[float]] = {name: [] for name in data}
    out: dict[str, object] = {}

    def one_round():
        for name, (pred, gt, _) in data.items():
            acc = fse.ConfusionMatrix(num_classes=65536) if name == "ids" else None
            t = time.perf_counter()
            if acc is not None:
                acc.update(pred, gt)
                out[name] = acc
            else:
                out[name] = fse.confusion_matrix(pred, gt, num_classes=4 if name == "k4" else 256)
            times[name].append(time.perf_counter() - t)

    run(benchmark, one_round, rounds=PAIRED_ROUNDS)
    for v in times.values():
        assert len(v) == PAIRED_ROUNDS + 1
        del v[0]  # the warm-up round
    t4, t256, tids = (np.array(times[n]) for n in ("k4", "k256", "ids"))
    bd.annotate(
        benchmark,
        key="kernel.ratios.alternated",
        case="K=4, K=256, ids alternated (a round: one call each)",
        size=SIZE,
        voxels=3 * data["k4"][1].size,
        paired_rounds=PAIRED_ROUNDS,
        k4_ms=[round(x * 1e3, 2) for x in t4],
        k256_ms=[round(x * 1e3, 2) for x in t256],
        ids_ms=[round(x * 1e3, 2) for x in tids],
        k256_over_k4=float(np.median(t4 / t256)),
        ids_over_k4=float(np.median(t4 / tids)),
    )
    np.testing.assert_array_equal(out["k4"], data["k4"][2]["cm"])
    np.testing.assert_array_equal(out["k256"], data["k256"][2]["cm"])
    _check_ids(out["ids"], data["ids"][2])
    data.clear()
