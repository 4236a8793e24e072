"""Boundary metrics (hd, hd95, assd, masd, nsd) against the libraries whose conventions they follow.

References, all independent of fastseg-eval's code:

* ``deepmind``: the ``surface-distance`` package itself (test extra);
* ``medpy``: MedPy's ``medpy.metric.binary`` (test extra);
* ``monai``: :func:`monai_oracle`, MONAI 1.x's definitions re-implemented here from its source
  (``monai/metrics/utils.py`` ``get_mask_edges`` / ``get_surface_distance``,
  ``hausdorff_distance.py``, ``surface_distance.py``, ``surface_dice.py``) with scipy, numpy and
  torch.quantile's float32 arithmetic; and, when MONAI is installed (``pip install
  'fastseg-eval[monai]'``, torch is large), :func:`test_real_monai` compares with MONAI itself.

Masks: random blobs of several labels, thin plates and lines, one-voxel objects, objects on the
volume's faces, anisotropic spacing, a label on one side only, on neither; zarr inputs whose
chunk grids cut objects and disagree between pred and gt; far predictions (a blob 200 voxels
away) that only the sparse step after the pass resolves; several engines, dask.distributed
included, giving identical numbers.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from conftest import write_zarr
from scipy import ndimage as ndi

import fastseg_eval as fse
from fastseg_eval.errors import OptionError

sd = pytest.importorskip("surface_distance")
medpy_binary = pytest.importorskip("medpy.metric.binary")
np.Inf = np.inf  # noqa: NPY201 (surface-distance 0.1 still calls np.Inf, which NumPy 2 removed)

NAMES = ("hd", "hd95", "assd", "masd", "nsd")
# surface-distance 0.1 imports scipy.ndimage.filters / .morphology, namespaces scipy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Please import `:DeprecationWarning")


# ================================================================================ references
def deepmind_reference(gt: np.ndarray, pred: np.ndarray, spacing, pct: float, tol: float) -> dict[str, float]:
    s = sd.compute_surface_distances(gt, pred, spacing)
    a = sd.compute_average_surface_distance(s)
    da, pa = s["distances_gt_to_pred"], s["surfel_areas_gt"]
    db, pb = s["distances_pred_to_gt"], s["surfel_areas_pred"]
    return {
        "hd": sd.compute_robust_hausdorff(s, 100),
        "hd95": sd.compute_robust_hausdorff(s, pct),
        "assd": (np.sum(da * pa) + np.sum(db * pb)) / (np.sum(pa) + np.sum(pb)),
        "masd": (a[0] + a[1]) / 2,
        "nsd": sd.compute_surface_dice_at_tolerance(s, tol),
    }


def medpy_reference(gt: np.ndarray, pred: np.ndarray, spacing, pct: float, tol: float) -> dict[str, float]:
    b = medpy_binary
    d = np.hstack([_medpy_dist(pred, gt, spacing), _medpy_dist(gt, pred, spacing)])
    return {
        "hd": b.hd(pred, gt, spacing),
        "hd95": b.hd95(pred, gt, spacing) if pct == 95 else float(np.percentile(d, pct)),
        "assd": b.assd(pred, gt, spacing),
        "masd": (b.asd(pred, gt, spacing) + b.asd(gt, pred, spacing)) / 2,
    }


def _medpy_dist(a, b, spacing):
    return medpy_binary.__dict__["__surface_distances"](a, b, spacing)


def _torch_quantile_f32(x: np.ndarray, q: float) -> float:
    """torch.quantile (linear) of a float32 tensor: q, the rank and the lerp in float32
    (aten/src/ATen/native/Sorting.cpp quantile_compute; aten lerp)."""
    f = np.float32
    v = np.sort(x.astype(np.float32))
    rank = f(f(q) * f(v.size - 1))
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    w = f(rank - f(lo))
    a, b = v[lo], v[hi]
    return float(a + w * (b - a)) if abs(w) < 0.5 else float(b - (b - a) * (f(1) - w))


def monai_oracle(gt: np.ndarray, pred: np.ndarray, spacing, pct: float, tol: float) -> dict[str, float]:
    """MONAI's compute_hausdorff_distance / compute_average_surface_distance (symmetric=True for
    assd) / compute_surface_dice (use_subvoxels=False), from its source: edges = mask XOR its
    6-neighbour erosion (border = background), scipy EDT, distances stored as float32."""
    eg = gt ^ ndi.binary_erosion(gt)
    ep = pred ^ ndi.binary_erosion(pred)
    d_pg = ndi.distance_transform_edt(~eg, sampling=spacing).astype(np.float32)[ep]
    d_gp = ndi.distance_transform_edt(~ep, sampling=spacing).astype(np.float32)[eg]
    both = np.concatenate([d_pg, d_gp]).astype(np.float64)
    return {
        "hd": float(max(d_pg.max(), d_gp.max())),
        "hd95": max(_torch_quantile_f32(d_pg, pct / 100), _torch_quantile_f32(d_gp, pct / 100)),
        "assd": float(both.mean()),
        "masd": float((d_pg.astype(np.float64).mean() + d_gp.astype(np.float64).mean()) / 2),
        "nsd": float((np.sum(d_pg <= np.float32(tol)) + np.sum(d_gp <= np.float32(tol))) / (d_pg.size + d_gp.size)),
    }


REFERENCES = {"deepmind": deepmind_reference, "monai": monai_oracle, "medpy": medpy_reference}
TOL = {"deepmind": dict(rtol=0, atol=1e-9), "medpy": dict(rtol=0, atol=1e-9), "monai": dict(rtol=1e-6, atol=1e-6)}
"""deepmind / medpy: float64 like the libraries (1e-9, well inside the 1e-6 asked for); monai stores
float32 distances and averages in float32: its own precision is ~1e-7 relative."""


# ====================================================================================== data
def blobs(shape, k: int, rng, cell: int = 6, fg: float = 0.5) -> np.ndarray:
    coarse = rng.integers(1, k, [s // cell + 2 for s in shape])
    idx = [(np.arange(s) + int(rng.integers(0, cell))) // cell for s in shape]
    lab = coarse[np.ix_(*idx)]
    f = ndi.gaussian_filter(rng.random(shape), 2.0)
    lab[f < np.quantile(f, 1 - fg)] = 0
    return lab.astype(np.uint8)


def perturb(gt: np.ndarray, rng, k: int) -> np.ndarray:
    pred = gt.copy()
    noise = ndi.gaussian_filter(rng.random(gt.shape), 1.5) > 0.56
    pred[noise] = rng.integers(0, k)
    return np.roll(pred, 1, axis=2)


def case(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) of one named situation."""
    rng = np.random.default_rng(seed)
    shape = (22, 26, 30)
    if name == "blobs":
        gt = blobs(shape, 4, rng)
        return perturb(gt, rng, 4), gt
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    if name == "thin":  # a one-voxel plate, a one-voxel line, a two-voxel plate off by one
        gt[5, 3:20, 4:25] = 1
        pred[6, 3:21, 4:24] = 1
        gt[10:20, 12, 15] = 2
        pred[10:19, 13, 15] = 2
        gt[14:16, 2:10, 2:28] = 3
        pred[15:17, 2:10, 3:28] = 3
    elif name == "single-voxels":
        for z, y, x in rng.integers(1, 20, (6, 3)):
            gt[z, y, x] = 1
        for z, y, x in rng.integers(1, 20, (4, 3)):
            pred[z, y, x] = 1
        gt[3, 3, 3] = pred[3, 3, 4] = 2
    elif name == "border":  # objects on the volume's faces and corners
        gt[:6, :, :8] = 1
        pred[:5, :, :9] = 1
        gt[-4:, -5:, -6:] = 2
        pred[-3:, -5:, -6:] = 2
        gt[10:15, 0, 10:20] = 3
        pred[10:16, 0:2, 11:20] = 3
    else:
        raise ValueError(name)
    return pred, gt


CASES = ["blobs", "thin", "single-voxels", "border"]
SPACINGS = {"iso": (1.0, 1.0, 1.0), "aniso": (1.5, 0.8, 1.1), "thick": (3.0, 0.7, 0.7)}


def check_against_reference(res, pred, gt, surface, spacing, pct=95.0, tol=1.0, labels=None) -> int:
    ref_fn = REFERENCES[surface]
    names = [m for m in NAMES if not (surface == "medpy" and m == "nsd")]
    checked = 0
    for k in labels or [int(x) for x in res.labels if x != 0]:
        g, p = gt == k, pred == k
        if not g.any() or not p.any():
            continue
        ref = ref_fn(g, p, spacing, pct, tol)
        got = {m: res.per_class[k][m] for m in names}
        for m in names:
            np.testing.assert_allclose(got[m], ref[m], err_msg=f"{surface} label {k} {m}", **TOL[surface])
        checked += 1
    return checked


# ================================================================ the conventions, in memory
@pytest.mark.parametrize("spacing", list(SPACINGS), ids=list(SPACINGS))
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("surface", ["deepmind", "monai", "medpy"])
def test_matches_the_library(surface, name, spacing):
    pred, gt = case(name)
    sp = SPACINGS[spacing]
    metrics = "dice," + ",".join(m for m in NAMES if not (surface == "medpy" and m == "nsd"))
    res = fse.evaluate(pred, gt, metrics=metrics, spacing=sp, surface=surface, nsd_tolerance=1.6, workers=2)
    assert check_against_reference(res, pred, gt, surface, sp, tol=1.6) >= 1
    assert res.options["surface"] == surface and res.options["spacing"] == list(sp)
    assert res.options["spacing_from"] == "given"


@pytest.mark.parametrize("surface", ["deepmind", "medpy"])
def test_windows_of_more_than_eight_labels(surface):
    """The pass marks the first 8 labels of a window with one bit each; the others are searched one
    label at a time. Both kinds in one window, against the library."""
    rng = np.random.default_rng(11)
    gt = blobs((22, 26, 30), 14, rng, cell=4, fg=0.8)
    pred = perturb(gt, rng, 14)
    assert np.unique(gt).size > 9 and np.unique(pred).size > 9
    names = ",".join(m for m in NAMES if not (surface == "medpy" and m == "nsd"))
    res = fse.evaluate(pred, gt, metrics=names, surface=surface, spacing=(1.2, 1.0, 0.9), workers=1)
    assert check_against_reference(res, pred, gt, surface, (1.2, 1.0, 0.9)) >= 10


@pytest.mark.parametrize("surface", ["deepmind", "monai", "medpy"])
@pytest.mark.parametrize("pct", [50.0, 90.0, 99.0, 100.0])
def test_other_percentiles_and_tolerances(surface, pct):
    pred, gt = case("blobs", seed=3)
    sp = SPACINGS["aniso"]
    names = "hd95" if surface == "medpy" else "hd95,nsd"
    res = fse.evaluate(pred, gt, metrics=names, spacing=sp, surface=surface, hd_percentile=pct, nsd_tolerance=2.2)
    for k in (1, 2, 3):
        ref = REFERENCES[surface](gt == k, pred == k, sp, pct, 2.2)
        for m in names.split(","):
            np.testing.assert_allclose(res.per_class[k][m], ref[m], **TOL[surface])


def test_the_conventions_differ():
    """The three conventions really are different definitions (a test that could not tell them
    apart would prove nothing above)."""
    pred, gt = case("blobs", seed=1)
    res = {
        s: fse.evaluate(pred, gt, metrics="hd95,assd", surface=s, spacing=(1.5, 0.8, 1.1)).per_class
        for s in ("deepmind", "monai", "medpy")
    }

    def apart(a: str, b: str, m: str) -> bool:
        return any(abs(res[a][k][m] - res[b][k][m]) > 1e-3 for k in (1, 2, 3))

    assert apart("deepmind", "medpy", "assd") and apart("deepmind", "monai", "hd95")
    assert apart("monai", "medpy", "hd95")  # max of directed percentiles vs pooled percentile


def test_reference_oracle_catches_a_float64_monai():
    """monai_oracle keeps MONAI's float32: with float64 the NSD at a tolerance that equals a
    distance in float32 only (spacing 0.8 x 2 = 1.6) would differ; our convention follows float32."""
    gt = np.zeros((8, 8, 8), bool)
    pred = np.zeros((8, 8, 8), bool)
    gt[2:6, 2:6, 2:6] = True
    pred[2:6, 2:6, 4:8] = True
    ref = monai_oracle(gt, pred, (0.8, 0.8, 0.8), 95, 1.6)
    res = fse.evaluate(pred.astype(np.uint8), gt.astype(np.uint8), metrics="nsd", surface="monai",
                       spacing=(0.8, 0.8, 0.8), nsd_tolerance=1.6)  # fmt: skip
    assert res.per_class[1]["nsd"] == pytest.approx(ref["nsd"], abs=1e-12)


# ============================================================================ empty masks
@pytest.mark.parametrize("surface", ["deepmind", "monai", "medpy"])
def test_empty_masks_follow_the_design(surface):
    gt = np.zeros((10, 12, 14), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:5, 2:5, 2:5] = 1  # label 1: gt only
    pred[6:8, 6:8, 6:8] = 2  # label 2: pred only
    gt[1:3, 8:10, 9:12] = 4
    pred[1:3, 8:10, 9:12] = 4  # label 4: both, identical
    names = [m for m in NAMES if not (surface == "medpy" and m == "nsd")]
    res = fse.evaluate(pred, gt, labels=[0, 1, 2, 3, 4], metrics=names, surface=surface)
    for k in (1, 2):
        for m in names:
            assert res.per_class[k][m] == (0.0 if m == "nsd" else math.inf), (k, m)
    for m in names:  # label 3: in neither volume
        assert math.isnan(res.per_class[3][m])
        assert res.per_class[4][m] == (1.0 if m == "nsd" else 0.0)
        assert math.isnan(res.per_class[0][m])  # the background gets no boundary metrics
    doc = json.loads(res.to_json())
    assert doc["per_class"]["1"]["hd95"] is None and doc["per_class"]["3"]["hd95"] is None
    assert any("one volume only" in w and "1, 2" in w for w in doc["warnings"])
    sub = fse.evaluate(pred, gt, labels=[0, 1, 2, 3, 4], metrics=names, surface=surface, empty_distance=50.0)
    assert sub.per_class[2]["hd"] == 50.0 and sub.options["empty_distance"] == 50.0
    assert math.isnan(sub.per_class[3]["hd"])
    assert not any("one volume only" in w for w in sub.warnings)


def test_what_the_libraries_do_with_empty_masks():
    """Documented in the README: DeepMind gives inf (also for both empty), MedPy raises."""
    a = np.zeros((6, 6, 6), bool)
    b = a.copy()
    b[2:4, 2:4, 2:4] = True
    assert sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, (1, 1, 1)), 95) == math.inf
    assert sd.compute_robust_hausdorff(sd.compute_surface_distances(a, a, (1, 1, 1)), 95) == math.inf
    assert sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(a, b, (1, 1, 1)), 1) == 0
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(a, b)


# ============================================================================ out of core
@pytest.fixture(scope="module")
def chunked_pair(tmp_path_factory):
    """A blob pair in zarr stores whose chunk grids cut the objects and disagree (pred vs gt)."""
    root = tmp_path_factory.mktemp("boundary")
    rng = np.random.default_rng(11)
    gt = blobs((45, 52, 38), 4, rng, cell=9, fg=0.4)
    pred = perturb(gt, rng, 4)
    pred[30:36, 2:7, 2:6] = 3  # a false positive far from any 3 of the ground truth, maybe
    p = write_zarr(root / "pred.zarr", pred, (16, 13, 19))
    g = write_zarr(root / "gt.zarr", gt, (10, 20, 15))
    return pred, gt, str(root / "pred.zarr"), str(root / "gt.zarr"), p, g


@pytest.mark.parametrize("surface", ["deepmind", "monai"])
def test_chunked_misaligned_zarr_equals_the_library(chunked_pair, surface):
    pred, gt, pz, gz, _, _ = chunked_pair
    sp = (1.2, 0.9, 1.0)
    res = fse.evaluate(pz, gz, metrics=",".join(NAMES), spacing=sp, surface=surface, workers=2)
    assert check_against_reference(res, pred, gt, surface, sp) == 3
    assert res.timing["units"] > 1


@pytest.fixture
def short_reach(monkeypatch):
    """Search only 2 voxels inside blocks: most distances go through the far step after the pass."""
    from fastseg_eval.reducers import surface

    monkeypatch.setattr(surface, "DEFAULT_REACH", 2)


@pytest.mark.parametrize("surface", ["deepmind", "medpy"])
def test_far_points_resolved_exactly(chunked_pair, surface, short_reach):
    pred, gt, pz, gz, _, _ = chunked_pair
    names = [m for m in NAMES if not (surface == "medpy" and m == "nsd")]
    res = fse.evaluate(pz, gz, metrics=names, surface=surface, spacing=(1.0, 1.3, 0.7), workers=2)
    assert res.options["boundary_reach"] == 2 and res.options["boundary_far_points"] > 100
    assert check_against_reference(res, pred, gt, surface, (1.0, 1.3, 0.7)) == 3


ENGINES = {
    "threads-1": dict(workers=1),
    "threads-3": dict(workers=3),
    "dask-sync": dict(scheduler="synchronous"),
    "dask-threads": dict(scheduler="threads"),
}


def test_engines_and_distributed_give_identical_numbers(chunked_pair, short_reach):
    distributed = pytest.importorskip("distributed")
    pred, gt, pz, gz, _, _ = chunked_pair
    kw = dict(metrics=",".join(NAMES), spacing=(1.2, 0.9, 1.0))
    base = fse.evaluate(pred, gt, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=":0") as cluster, distributed.Client(cluster) as client:  # fmt: skip
            runs = {name: fse.evaluate(pz, gz, **kw, **opts) for name, opts in ENGINES.items()}
            runs["distributed"] = fse.evaluate(pz, gz, **kw, scheduler=client)
    assert runs["distributed"].timing["engine"] == "distributed"
    for name, r in runs.items():
        for k in base.per_class:
            for m in NAMES:
                a, b = base.per_class[k][m], r.per_class[k][m]
                assert (math.isnan(a) and math.isnan(b)) or a == b, (name, k, m, a, b)


def test_blob_predicted_200_voxels_away_in_a_chunked_512_cube(tmp_path):
    """The nearest surfaces lie 200 voxels apart, far beyond any block's halo: the in-RAM answer."""
    import zarr

    shape = (512, 512, 512)
    gt_obj = np.zeros((20, 24, 22), np.uint8)
    zz, yy, xx = np.mgrid[:20, :24, :22]
    gt_obj[((zz - 9.5) / 9) ** 2 + ((yy - 11.5) / 11) ** 2 + ((xx - 10.5) / 10) ** 2 <= 1] = 1
    pred_obj = np.zeros_like(gt_obj)
    pred_obj[2:17, 3:20, 4:18] = 1
    g0, p0 = (100, 150, 60), (110, 160, 260)  # pred 200 voxels along x, offset in z and y
    arrays = {}
    for role, obj, at in (("gt", gt_obj, g0), ("pred", pred_obj, p0)):
        z = zarr.create_array(store=str(tmp_path / f"{role}.zarr"), shape=shape, chunks=(128, 128, 128),
                              dtype=np.uint8, fill_value=0)  # fmt: skip
        z[tuple(slice(a, a + n) for a, n in zip(at, obj.shape))] = obj
        arrays[role] = (obj, at)
    sp = (1.0, 0.8, 0.8)
    res = fse.evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), metrics=",".join(NAMES),
                       spacing=sp, num_classes=2, workers=2)  # fmt: skip
    # in RAM: the bounding box of both objects with a margin (the conventions see outside = background)
    lo = np.minimum(g0, p0) - 2
    hi = np.maximum(np.add(g0, gt_obj.shape), np.add(p0, pred_obj.shape)) + 2
    crop = {}
    for role, (obj, at) in arrays.items():
        a = np.zeros(tuple(hi - lo), np.uint8)
        a[tuple(slice(s - b, s - b + n) for s, b, n in zip(at, lo, obj.shape))] = obj
        crop[role] = a
    assert check_against_reference(res, crop["pred"], crop["gt"], "deepmind", sp, labels=[1]) == 1
    assert res.per_class[1]["hd"] > 150
    assert res.options["boundary_far_points"] > 0


# ======================================================== far step, kernels and partials (issue 14)
@pytest.fixture
def tiny_far_cache(monkeypatch):
    """The far step keeps at most one decoded chunk: every tile's rim is decoded again."""
    from fastseg_eval.reducers import surface

    monkeypatch.setattr(surface, "_CHUNK_CACHE", 1)


@pytest.mark.parametrize("surface", ["deepmind", "monai"])
def test_far_step_across_small_tiles_and_an_evicting_cache(tmp_path, surface, short_reach, tiny_far_cache):
    """Far points whose candidate cells straddle many small chunks (tiles), read back through a
    cache too small to keep a neighbour, with thick anisotropic voxels: still the library's numbers."""
    rng = np.random.default_rng(21)
    gt = blobs((37, 41, 33), 4, rng, cell=8, fg=0.35)
    pred = perturb(gt, rng, 4)
    pred[2:7, 30:38, 3:9] = 2  # a false positive, likely far from any 2
    write_zarr(tmp_path / "pred.zarr", pred, (7, 9, 8))
    write_zarr(tmp_path / "gt.zarr", gt, (9, 7, 10))
    sp = (3.0, 0.7, 0.9)
    res = fse.evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), metrics=",".join(NAMES),
                       spacing=sp, surface=surface, workers=2)  # fmt: skip
    assert res.options["boundary_far_points"] > 100
    assert check_against_reference(res, pred, gt, surface, sp) == 3


def _brute_corners(win: np.ndarray, skip: tuple[int, ...]) -> set[tuple[int, int, int, int, int]]:
    """(z, y, x, label, code) of every surface corner, from the definition (numpy, padded with -1)."""
    pad = np.pad(win.astype(np.int64), 1, constant_values=-1)
    out = set()
    for z, y, x in np.ndindex(*(n + 1 for n in win.shape)):
        cube = pad[z : z + 2, y : y + 2, x : x + 2].ravel()  # voxel (c-1+i, c-1+j, c-1+k) at 4i + 2j + k
        if np.all(cube == cube[0]):
            continue
        for v in set(cube.tolist()) - {-1, *skip}:
            code = sum(1 << (7 - b) for b in range(8) if cube[b] == v)
            out.add((z, y, x, v, code))
    return out


def _kernel_points(kernel_out, table) -> set[tuple[int, int, int, int, int]]:
    n, zyx, lab, code = kernel_out
    return {(*map(int, zyx[i]), int(table[lab[i]]), int(code[i])) for i in range(n)}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64])
def test_corner_kernel_matches_the_definition(dtype):
    """The row-scan corner kernel (branch-free scan, scalar fast path, general path at the window's
    edges) against a brute-force reading of DeepMind's neighbourhood codes; boxes give the same points."""
    from fastseg_eval.kernels import surface as K

    rng = np.random.default_rng(5)
    for trial in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 12, 3))
        win = rng.integers(0, int(rng.integers(1, 5)), shape).astype(dtype)
        if trial % 2:
            win = np.repeat(win, 2, axis=int(rng.integers(0, 3)))  # runs along an axis
        skip = (0,) if trial % 3 else ()
        n = np.array(win.shape, np.int64)
        cap = 8 * int(np.prod(n + 1)) + 8
        bufs = [np.empty((cap, 3), np.int32), np.empty(cap, np.int32), np.empty(cap, np.uint8), np.empty(cap, np.bool_)]
        table, ntab = np.zeros(64, np.int64), np.zeros(1, np.int64)
        zero = np.zeros(3, np.int64)
        m = K.corner_surface(win, zero, n + 1, zero, n + 1, np.array(skip, np.int64), table, ntab, *bufs)
        got = _kernel_points((m, bufs[0], bufs[1], bufs[2]), table)
        assert got == _brute_corners(win, skip) and m == len(got), trial
        assert bufs[3][:m].all()  # every point owned
        # two boxes splitting the corners along z: the same points
        cut = int(rng.integers(0, n[0] + 2))
        boxes = np.array([[0, 0, 0, cut, n[1] + 1, n[2] + 1], [cut, 0, 0, n[0] + 1, n[1] + 1, n[2] + 1]], np.int64)
        ntab[0] = 0
        m2 = K.surface_in_boxes(win, True, boxes, np.array(skip, np.int64), table, ntab, *bufs)
        assert _kernel_points((m2, bufs[0], bufs[1], bufs[2]), table) == got and m2 == m


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.8, 1.1)])
def test_mark_bits_and_both_search_stages_against_brute_force(spacing):
    """Marks of 8 labels in one bitmap (rows padded to words) and per-cell bits; the first stage
    (offsets up to 4 voxels) and the second (cells of 4, row words) together give, for every point,
    the distance index of its nearest mark of one label within the reach, as a brute force does:
    points on the bitmap's edges and in its last, partial cells included."""
    from fastseg_eval.kernels import surface as K
    from fastseg_eval.reducers.surface import SurfaceDistances

    rng = np.random.default_rng(13)
    red = SurfaceDistances(spacing=spacing, reach=5)
    first_off, first_dist = red.offsets[: red._first], red.offset_dist[: red._first]
    for trial in range(12):
        shape = tuple(int(v) for v in rng.integers(3, 23, 3))
        bshape = (shape[0], shape[1], -(-shape[2] // 4) * 4)
        cshape = tuple(-(-b // 4) for b in bshape)
        npts = int(rng.integers(1, 60))
        zyx = np.stack([rng.integers(0, s, npts) for s in shape], axis=1).astype(np.int32)
        lab = rng.integers(0, 10, npts).astype(np.int32)  # indices 8 and 9 get no bit
        bits, coarse = np.zeros(bshape, np.uint8), np.zeros(cshape, np.uint8)
        K.mark_labels(bits, coarse, zyx, lab, npts)
        for li in range(8):
            mine = zyx[lab == li].astype(np.int64)
            want = np.zeros(bshape, bool)
            want[tuple(mine.T)] = True
            assert np.array_equal((bits & (1 << li)) != 0, want)
            cells = np.zeros(cshape, bool)
            cells[tuple((mine >> 2).T)] = True
            assert np.array_equal((coarse & (1 << li)) != 0, cells)
            a = np.stack([rng.integers(0, s, 40) for s in shape], axis=1).astype(np.int32)
            a_idx = np.arange(40, dtype=np.int64)
            out = np.full(40, -1, np.int64)
            bit = np.uint8(1 << li)
            K.nearest_marked(bits, bit, a, a_idx, first_off, first_dist, out)
            K.nearest_in_bits(bits.view(np.uint32), coarse, bit, a, a_idx, red._cells, red._bounds, red._index,
                              red.reach, np.array(spacing), red._limit, out)  # fmt: skip
            for t in range(40):
                off = mine - a[t]
                ok = np.all(np.abs(off) <= red.reach, axis=1)
                idx = red._index[tuple((off[ok] + red.reach).T)]
                idx = idx[idx >= 0]
                assert out[t] == (idx.min() if idx.size else -1), (trial, li, t)


def test_far_bounds_and_wanted_cells_against_brute_force():
    """The shell search gives the least over occupied cells of the largest point distance, and the
    wanted cells are exactly the occupied ones with a point within that bound."""
    from fastseg_eval.kernels import surface as K

    rng = np.random.default_rng(9)
    cell, npts = 3, np.array([20, 17, 23], np.int64)
    grid = -(-npts // cell)
    ncell = int(np.prod(grid))
    spacing = np.array([1.7, 0.6, 1.1])
    occ = np.zeros((2, -(-ncell // 8)), np.uint8)
    dense = rng.random((2, ncell)) < np.array([[0.02], [0.3]])
    dense[0, 5] = True
    for r in range(2):
        occ[r] = np.packbits(dense[r], bitorder="little")[: occ.shape[1]]
    pts = np.stack([rng.integers(0, n, 60) for n in npts], axis=1).astype(np.int64)
    row = rng.integers(0, 2, 60).astype(np.int64)
    bound = np.empty(60)
    K.far_bounds(pts, row, occ, grid, cell, npts, spacing, bound)
    wanted = np.zeros_like(occ)
    K.want_cells(pts, row, bound, occ, grid, cell, npts, spacing, wanted)
    cz, cy, cx = np.unravel_index(np.arange(ncell), tuple(grid))
    lo = np.stack([cz, cy, cx], axis=1) * cell
    hi = np.minimum(lo + cell, npts) - 1
    for i in range(60):
        p = pts[i]
        far = np.maximum(np.abs(p - lo), np.abs(p - hi)) * spacing
        gap = np.maximum(np.maximum(lo - p, p - hi), 0) * spacing
        dmax = np.sqrt((far * far).sum(axis=1))
        dmin = np.sqrt((gap * gap).sum(axis=1))
        occupied = dense[row[i]]
        assert bound[i] == pytest.approx(dmax[occupied].min(), rel=1e-12)
        got = np.unpackbits(wanted[row[i]], bitorder="little")[:ncell].astype(bool)
        assert not np.any(occupied & (dmin <= bound[i]) & ~got)  # never a needed cell missed
    # and nothing beyond: rebuilt per point, the union is the set of points' own sets
    need = np.zeros((2, ncell), bool)
    for i in range(60):
        p = pts[i]
        gap = np.maximum(np.maximum(lo - p, p - (np.minimum(lo + cell, npts) - 1)), 0) * spacing
        need[row[i]] |= dense[row[i]] & (np.sqrt((gap * gap).sum(axis=1)) <= bound[i])
    for r in range(2):
        assert np.array_equal(np.unpackbits(wanted[r], bitorder="little")[:ncell].astype(bool), need[r])


def _blocks(gt: np.ndarray, pred: np.ndarray, core: int, halo: int):
    from fastseg_eval.reducers.base import Block

    shape = gt.shape
    for origin in np.ndindex(*(-(-n // core) for n in shape)):
        u = [(o * core, min((o + 1) * core, n)) for o, n in zip(origin, shape)]
        grown = [(max(0, a - halo), min(n, b + halo)) for (a, b), n in zip(u, shape)]
        reg = tuple(slice(a, b) for a, b in grown)
        yield Block(gt=gt[reg].copy(), pred=pred[reg].copy(), mask=None, origin=tuple(a for a, _ in u),
                    core=tuple(slice(a - g, b - g) for (a, b), (g, _) in zip(u, grown)), shape=shape, halo=halo)  # fmt: skip


def test_partials_merge_exactly_in_any_grouping_and_pickle():
    """Per-worker partials (distance x surfel-code counts, occupancy bits, far points) merged in any
    grouping and order, through pickle as dask / distributed send them, give identical state and
    identical finished distances."""
    import pickle

    from fastseg_eval.reducers.surface import SurfaceDistances, finish_distances

    rng = np.random.default_rng(4)
    gt = blobs((30, 34, 26), 4, rng, cell=7, fg=0.4)
    pred = perturb(gt, rng, 4)
    pred[1:5, 1:5, 20:25] = 1
    base = SurfaceDistances("corners", (1.2, 0.9, 1.0), (0,), reach=3)
    blocks = list(_blocks(gt, pred, 11, base.halo))
    assert len(blocks) > 8

    def run(groups):
        top = base.spawn()
        for g in groups:
            w = base.spawn()
            for i in g:
                w.add(blocks[i])
            top.merge(pickle.loads(pickle.dumps(w.finish())))
        return top

    one = run([range(len(blocks))])
    perm = rng.permutation(len(blocks))
    many = run([perm[i::3] for i in range(3)][::-1])
    assert one.far_count() == many.far_count() > 0
    assert set(one.labels) == set(many.labels) == {1, 2, 3}
    for lab in one.labels:
        a, b = one.labels[lab], many.labels[lab]
        assert np.array_equal(a.hist, b.hist) and np.array_equal(a.cells, b.cells)
        assert np.array_equal(a.npoints, b.npoints)
        for d in (0, 1):
            fa, fb = ([(tuple(p), int(c)) for pts, codes in x.far[d] for p, c in zip(pts.tolist(), codes)] for x in (a, b))
            assert sorted(fa) == sorted(fb)

    class Vol:
        def __init__(self, a):
            self.a = a

        def read(self, region):
            return self.a[region]

    fa = finish_distances(one, Vol(gt), Vol(pred), workers=1)
    fb = finish_distances(many, Vol(gt), Vol(pred), workers=3)
    for lab in fa:
        for x, y in zip(fa[lab], fb[lab]):
            assert np.array_equal(x.distance, y.distance) and np.array_equal(x.count, y.count)
            assert np.array_equal(x.code, y.code)


# ============================================================================ spacing and options
def test_spacing_from_an_ome_zarr_scale(tmp_path):
    import zarr

    pred, gt = case("blobs", seed=5)
    for role, a in (("pred", pred), ("gt", gt)):
        grp = zarr.open_group(str(tmp_path / f"{role}.zarr"), mode="w", zarr_format=2)
        grp.create_array("0", shape=a.shape, chunks=(11, 13, 15), dtype=a.dtype)[:] = a
        grp.attrs["multiscales"] = [{
            "version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}],
            "coordinateTransformations": [{"type": "scale", "scale": [1.5, 1.0, 1.0]}],
        }]  # fmt: skip
    res = fse.evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), metrics=",".join(NAMES))
    assert res.options["spacing"] == [3.0, 0.5, 0.5]
    assert "OME-Zarr scale" in res.options["spacing_from"]
    assert check_against_reference(res, pred, gt, "deepmind", (3.0, 0.5, 0.5)) == 3
    given = fse.evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), metrics="hd95", spacing=1)
    assert given.options["spacing"] == [1.0, 1.0, 1.0] and given.options["spacing_from"] == "given"
    plain = fse.evaluate(pred, gt, metrics="hd95")
    assert plain.options["spacing_from"].startswith("default 1.0")


def test_boundary_metrics_only_when_asked():
    pred, gt = case("thin")
    res = fse.evaluate(pred, gt)
    assert not any(m in res.metrics for m in NAMES) and "surface" not in res.options
    res = fse.evaluate(pred, gt, metrics=["Hausdorff", "surface-dice", "dice"])
    assert res.metrics == ["hd", "nsd", "dice"]
    assert set(res.mean) >= {"hd", "nsd", "dice"} and "hd" not in res.micro and "hd" not in res.weighted
    csv_head = res.to_csv().splitlines()[0].split(",")
    assert csv_head[-3:] == ["hd", "nsd", "dice"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(surface="itk"), "not a convention"),
        (dict(surface="medpy", metrics="nsd"), "MedPy defines no normalized surface Dice"),
        (dict(spacing=(1, 2)), "three positive numbers"),
        (dict(spacing=(1, 0, 1)), "three positive numbers"),
        (dict(hd_percentile=101), "between 0 and 100"),
        (dict(nsd_tolerance=-1), "between 0"),
        (dict(nsd_tolerance=float("nan")), "finite"),
        (dict(empty_distance="far"), "finite number"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs, match):
    pred, gt = case("thin")
    kwargs.setdefault("metrics", "hd95")
    with pytest.raises(OptionError, match=match):
        fse.evaluate(pred, gt, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask=np.ones((22, 26, 30), bool)), "without a mask or ignore label"),
        (dict(ignore_label=3), "without a mask or ignore label"),
    ],
)
def test_unsupported_inputs_are_refused(kwargs, match):
    pred, gt = case("thin")
    with pytest.raises(OptionError, match=match):
        fse.evaluate(pred, gt, metrics="hd95", **kwargs)
    with pytest.raises(OptionError, match="3-D volumes"):
        fse.evaluate(pred[0], gt[0], metrics="hd95")


def test_streaming_accumulator_cannot_give_boundary_metrics():
    pred, gt = case("thin")
    acc = fse.ConfusionMatrix(4).update(pred, gt)
    with pytest.raises(OptionError, match="surfaces of the volumes"):
        acc.result(metrics="hd95")


# ==================================================================================== CLI
def test_cli_boundary_flags(chunked_pair, capsys):
    from fastseg_eval.cli import main

    pred, gt, pz, gz, _, _ = chunked_pair
    args = [pz, gz, "--metrics", "dice,hd95,nsd", "--nsd-tolerance", "2", "--spacing", "0.8,0.8,3",
            "--surface", "monai"]  # fmt: skip
    assert main([*args, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["options"]["surface"] == "monai" and doc["options"]["nsd_tolerance"] == 2.0
    assert doc["options"]["spacing"] == [0.8, 0.8, 3.0]
    ref = monai_oracle(gt == 2, pred == 2, (0.8, 0.8, 3.0), 95, 2.0)
    assert doc["per_class"]["2"]["hd95"] == pytest.approx(ref["hd95"], rel=1e-6)
    assert doc["per_class"]["2"]["nsd"] == pytest.approx(ref["nsd"], rel=1e-6)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "hd95" in table and "nsd" in table and "boundary metrics: surface monai" in table
    for bad in (["--surface", "itk"], ["--spacing", "1,2"], ["--surface", "medpy", "--metrics", "nsd"]):
        assert main([pz, gz, "--metrics", "hd95", *bad]) == 2
        assert "error" in capsys.readouterr().err


# ============================================================================ float emulations
def test_pairwise_sum_is_numpys_bit_for_bit():
    from fastseg_eval.kernels.surface import pairwise_sum_runs

    rng = np.random.default_rng(0)
    for n in [*range(1, 140), 257, 1000, 8193, 100_003]:
        vals = np.sort(rng.random(4) * 3)
        cnt = rng.multinomial(n, [0.25] * 4).astype(np.int64)
        assert pairwise_sum_runs(vals, cnt) == np.sum(np.repeat(vals, cnt)), n


def test_percentile_emulations():
    from fastseg_eval.metrics.boundary import _numpy_percentile, _torch_quantile

    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 101, 5000, 100_001):
        v = np.sort(rng.integers(0, 40, n) * 0.7)
        vals, cnt = np.unique(v, return_counts=True)
        for p in (0, 50, 95, 99.5, 100):
            assert _numpy_percentile(vals, cnt, p) == pytest.approx(np.percentile(v, p), abs=1e-12)
            v32 = vals.astype(np.float32).astype(np.float64)
            assert _torch_quantile(v32, cnt, p / 100) == pytest.approx(_torch_quantile_f32(v, p / 100), rel=1e-7)


# ============================================================================ real MONAI
@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_real_monai(name):
    """MONAI itself (skipped unless installed: ``pip install 'fastseg-eval[monai]'``)."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    pred, gt = case(name, seed=2)
    sp = [1.5, 0.8, 1.1]
    res = fse.evaluate(pred, gt, metrics=",".join(NAMES), surface="monai", spacing=sp, nsd_tolerance=1.6)
    for k in [int(x) for x in res.labels if x != 0]:
        g, p = gt == k, pred == k
        if not g.any() or not p.any():
            continue
        yp, yg = (torch.from_numpy(a[None, None].astype(np.float32)) for a in (p, g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = {
                "hd": metrics.compute_hausdorff_distance(yp, yg, include_background=True, spacing=sp),
                "hd95": metrics.compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=sp),
                "assd": metrics.compute_average_surface_distance(yp, yg, include_background=True, symmetric=True, spacing=sp),
                "masd": (metrics.compute_average_surface_distance(yp, yg, include_background=True, spacing=sp)
                         + metrics.compute_average_surface_distance(yg, yp, include_background=True, spacing=sp)) / 2,
                "nsd": metrics.compute_surface_dice(yp, yg, [1.6], include_background=True, spacing=sp),
            }  # fmt: skip
        for m in NAMES:
            np.testing.assert_allclose(res.per_class[k][m], float(ref[m].item()), rtol=1e-6, atol=1e-6,
                                       err_msg=f"label {k} {m}")  # fmt: skip
