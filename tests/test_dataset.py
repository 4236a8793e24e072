"""Datasets: folders of cases against independent references (numpy; nnU-Net v2's evaluation,
re-implemented here from its source), matching, resume, bad cases, outputs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastseg_eval as fse
from fastseg_eval.errors import InputError, OptionError
from fastseg_eval.report.dataset import CaseResult

nib = pytest.importorskip("nibabel")

SHAPES = [(9, 10, 11), (12, 7, 8), (6, 13, 9), (10, 10, 5), (8, 9, 12), (11, 6, 7)]
K = 4


def make_cases(n=6, seed=0, drop_label3_in=(2,), empty_pred_in=(), k=K):
    """(pred, gt) pairs of odd shapes; label 3 absent from both sides in some cases; some preds empty."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        gt = rng.integers(0, k, shape).astype(np.uint8)
        pred = gt.copy()
        flip = rng.random(shape) < 0.3
        pred[flip] = rng.integers(0, k, int(flip.sum())).astype(np.uint8)
        if i in drop_label3_in:
            gt[gt == 3] = 1
            pred[pred == 3] = 2
        if i in empty_pred_in:
            pred[:] = 0
        out.append((pred, gt))
    return out


def write_nifti_dataset(root: Path, cases, names=None):
    pd, gd = root / "preds", root / "gts"
    pd.mkdir(parents=True, exist_ok=True)
    gd.mkdir(parents=True, exist_ok=True)
    names = names or [f"case_{i:03d}" for i in range(len(cases))]
    for name, (p, g) in zip(names, cases):
        nib.save(nib.Nifti1Image(p.T, np.eye(4)), str(pd / f"{name}.nii.gz"))  # read back as p (axes reversed)
        nib.save(nib.Nifti1Image(g.T, np.eye(4)), str(gd / f"{name}.nii.gz"))
    return str(pd), str(gd), names


def cm_of(pred, gt, k=K):
    return np.bincount(gt.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(), minlength=k * k).reshape(k, k)


# ------------------------------------------------------------------ nnU-Net v2, re-implemented from its source
# nnunetv2/evaluation/evaluate_predictions.py (compute_metrics, compute_metrics_on_folder, save_summary_json),
# with NibabelIO.read_seg as the reader; one process instead of a pool (same numbers).
def _nn_read_seg(f):
    img = nib.load(f)
    return np.vstack([img.get_fdata().transpose((2, 1, 0))[None]], dtype=np.float32, casting="unsafe")


def _nn_mask(seg, r):
    if np.isscalar(r):
        return seg == r
    mask = np.zeros_like(seg, dtype=bool)
    for x in r:
        mask[seg == x] = True
    return mask


def _nn_tp_fp_fn_tn(mask_ref, mask_pred, ignore_mask=None):
    use_mask = np.ones_like(mask_ref, dtype=bool) if ignore_mask is None else ~ignore_mask
    tp = np.sum((mask_ref & mask_pred) & use_mask)
    fp = np.sum(((~mask_ref) & mask_pred) & use_mask)
    fn = np.sum((mask_ref & (~mask_pred)) & use_mask)
    tn = np.sum(((~mask_ref) & (~mask_pred)) & use_mask)
    return tp, fp, fn, tn


def _nn_compute_metrics(reference_file, prediction_file, labels_or_regions, ignore_label=None):
    seg_ref, seg_pred = _nn_read_seg(reference_file), _nn_read_seg(prediction_file)
    ignore_mask = seg_ref == ignore_label if ignore_label is not None else None
    results = {"reference_file": reference_file, "prediction_file": prediction_file, "metrics": {}}
    for r in labels_or_regions:
        m = results["metrics"][r] = {}
        tp, fp, fn, tn = _nn_tp_fp_fn_tn(_nn_mask(seg_ref, r), _nn_mask(seg_pred, r), ignore_mask)
        if tp + fp + fn == 0:
            m["Dice"] = np.nan
            m["IoU"] = np.nan
        else:
            m["Dice"] = 2 * tp / (2 * tp + fp + fn)
            m["IoU"] = tp / (tp + fp + fn)
        m["FP"], m["TP"], m["FN"], m["TN"] = fp, tp, fn, tn
        m["n_pred"], m["n_ref"] = fp + tp, fn + tp
    return results


def _nn_fix(x):  # recursive_fix_for_json_export, for what occurs here
    if isinstance(x, dict):
        return {(int(k) if isinstance(k, np.integer) else k): _nn_fix(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nn_fix(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def nnunet_summary_text(folder_ref, folder_pred, regions_or_labels, file_ending=".nii.gz", ignore_label=None):
    files_pred = sorted(f for f in os.listdir(folder_pred) if f.endswith(file_ending))
    results = [
        _nn_compute_metrics(os.path.join(folder_ref, f), os.path.join(folder_pred, f), regions_or_labels, ignore_label)
        for f in files_pred
    ]
    metric_list = list(results[0]["metrics"][regions_or_labels[0]].keys())
    means = {}
    with _quiet():
        for r in regions_or_labels:
            means[r] = {m: np.nanmean([i["metrics"][r][m] for i in results]) for m in metric_list}
        foreground_mean = {}
        for m in metric_list:
            values = [means[k][m] for k in means if not (k == 0 or k == "0")]
            foreground_mean[m] = np.mean(values)
    result = _nn_fix({"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean})
    # save_summary_json: keys as str(label or region), json.dump(sort_keys=True, indent=4)
    result["mean"] = {str(k): v for k, v in result["mean"].items()}
    for c in result["metric_per_case"]:
        c["metrics"] = {str(k): v for k, v in c["metrics"].items()}
    return json.dumps(result, sort_keys=True, indent=4)


class _quiet:
    def __enter__(self):
        import warnings

        self.w = warnings.catch_warnings()
        self.w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self.w.__exit__(*a)


def run_cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fastseg_eval", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ nnU-Net parity
@pytest.mark.parametrize(
    "extra, labels_or_regions, ignore",
    [
        ([], [1, 2, 3], None),
        (["--regions", "1,2,3;2,3;3"], [(1, 2, 3), (2, 3), (3,)], None),
        (["--ignore-label", "3"], [1, 2], 3),
    ],
    ids=["labels", "regions", "ignore-label"],
)
def test_nnunet_summary_is_byte_identical_to_nnunets(tmp_path, extra, labels_or_regions, ignore):
    cases = make_cases(6, empty_pred_in=(4,))
    if ignore is not None:  # nnU-Net never predicts the ignore label
        for p, _ in cases:
            p[p == ignore] = 0
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    r = run_cli(pd, gd, "--nnunet-summary", tmp_path / "s.json", "-q", "--workers", "2", *extra)
    assert r.returncode == 0, r.stderr
    ours = (tmp_path / "s.json").read_text()
    ref = nnunet_summary_text(gd, pd, labels_or_regions, ignore_label=ignore)
    assert ours == ref
    loaded = json.loads(ours)  # Python's json (and so nnU-Net's load_summary_json) reads NaN back
    keys = {str(k) for k in labels_or_regions}
    assert set(loaded["mean"]) == keys and len(loaded["metric_per_case"]) == 6
    if ignore is None and not extra:  # label 3 absent from case 2: NaN Dice there, skipped by the mean
        c2 = loaded["metric_per_case"][2]["metrics"]["3"]
        assert math.isnan(c2["Dice"]) and c2["TP"] == c2["FP"] == c2["FN"] == 0


def test_nnunet_summary_numbers_match_numpy_counts(tmp_path):
    """The same numbers recomputed from numpy bincounts (independent of both implementations)."""
    cases = make_cases(5)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    ds = fse.evaluate_dataset(pd, gd, workers=1)
    s = ds.nnunet_summary()
    for (p, g), entry, name in zip(cases, s["metric_per_case"], names):
        assert entry["prediction_file"] == os.path.join(pd, f"{name}.nii.gz")
        cm = cm_of(p, g)
        for lab in (1, 2, 3):
            tp = int(cm[lab, lab])
            fp, fn = int(cm[:, lab].sum()) - tp, int(cm[lab].sum()) - tp
            m = entry["metrics"][str(lab)]
            assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (tp, fp, fn, p.size - tp - fp - fn)
            if tp + fp + fn:
                assert m["Dice"] == 2 * tp / (2 * tp + fp + fn)
    dice1 = [e["metrics"]["1"]["Dice"] for e in s["metric_per_case"]]
    assert s["mean"]["1"]["Dice"] == np.nanmean(dice1)
    assert s["foreground_mean"]["Dice"] == np.mean([s["mean"][k]["Dice"] for k in ("1", "2", "3")])


# ------------------------------------------------------------------------------------ formats x numpy
def _write_all(root: Path, fmt: str, cases):
    pd, gd = root / f"p-{fmt}", root / f"g-{fmt}"
    pd.mkdir()
    gd.mkdir()
    for i, (p, g) in enumerate(cases):
        for d, a in ((pd, p), (gd, g)):
            name = f"c{i}"
            if fmt == "zarr":
                from conftest import write_zarr

                write_zarr(d / f"{name}.zarr", a, (4, 5, 6))
            elif fmt == "nifti":
                nib.save(nib.Nifti1Image(a.T, np.eye(4)), str(d / f"{name}.nii.gz"))
            elif fmt == "tiff":
                import tifffile

                tifffile.imwrite(str(d / f"{name}.tif"), a, compression="zlib")
            elif fmt == "npy":
                np.save(d / f"{name}.npy", a)
            elif fmt == "hdf5":
                h5py = pytest.importorskip("h5py")
                with h5py.File(d / f"{name}.h5", "w") as f:
                    f.create_dataset("seg", data=a, chunks=(3, 3, 3), compression="gzip")
    return str(pd), str(gd)


@pytest.mark.parametrize("fmt", ["zarr", "nifti", "tiff", "npy", "hdf5"])
def test_counts_equal_numpy_in_every_format(tmp_path, fmt):
    cases = make_cases(4, seed=3)
    pd, gd = _write_all(tmp_path, fmt, cases)
    ds = fse.evaluate_dataset(pd, gd, workers=2)
    assert [c.case for c in ds.per_case] == ["c0", "c1", "c2", "c3"]
    assert ds.labels == [0, 1, 2, 3]
    total = np.zeros((K, K), np.int64)
    for (p, g), c in zip(cases, ds.per_case):
        assert isinstance(c, fse.EvaluationResult) and isinstance(c, CaseResult)
        assert np.array_equal(c.confusion_matrix, cm_of(p, g))
        assert c.pred_source.startswith(pd) and c.gt_source.startswith(gd)
        total += cm_of(p, g)
    assert np.array_equal(ds.pooled.confusion_matrix, total)


def test_mixed_formats_and_sequences(tmp_path):
    import tifffile

    cases = make_cases(3, seed=5)
    paths_p, paths_g = [], []
    for i, (p, g) in enumerate(cases):
        np.save(tmp_path / f"p{i}.npy", p)
        tifffile.imwrite(str(tmp_path / f"g{i}.tif"), g)
        paths_p.append(str(tmp_path / f"p{i}.npy"))
        paths_g.append(str(tmp_path / f"g{i}.tif"))
    ds = fse.evaluate_dataset(paths_p, paths_g, workers=1)
    for (p, g), c in zip(cases, ds.per_case):
        assert np.array_equal(c.confusion_matrix, cm_of(p, g))
    arrays = fse.evaluate_dataset([p for p, _ in cases], [g for _, g in cases])
    assert [c.case for c in arrays.per_case] == ["case_0000", "case_0001", "case_0002"]
    assert np.array_equal(arrays.pooled.confusion_matrix, ds.pooled.confusion_matrix)


def _dice_per_case(cases, lab):
    out = []
    for p, g in cases:
        cm = cm_of(p, g)
        tp = cm[lab, lab]
        den = cm[lab].sum() + cm[:, lab].sum()
        out.append(2 * tp / den if den else np.nan)
    return np.array(out, dtype=float)


def test_aggregate_foreground_mean_and_pooled(tmp_path):
    cases = make_cases(6, seed=7)
    ds = fse.evaluate_dataset([p for p, _ in cases], [g for _, g in cases], regions=[(1, 2, 3), 3], workers=3)
    for lab in range(K):
        d = _dice_per_case(cases, lab)
        ok = d[~np.isnan(d)]
        a = ds.aggregate[lab]["dice"]
        assert a["n"] == ok.size
        assert a["mean"] == pytest.approx(ok.mean(), abs=1e-15)
        assert a["std"] == pytest.approx(ok.std(), abs=1e-15)
        assert a["median"] == pytest.approx(np.median(ok), abs=1e-15)
        assert (a["min"], a["max"]) == (ok.min(), ok.max())
        assert ds.aggregate[str(lab)] is ds.aggregate[lab]
    assert ds.aggregate[3]["dice"]["n"] == 5  # case 2 has no label 3 on either side
    fg = np.mean([ds.aggregate[lab]["dice"]["mean"] for lab in (1, 2, 3)])
    assert ds.foreground_mean["dice"] == pytest.approx(fg, abs=1e-15)
    # regions from the matrices == numpy on merged masks
    for (p, g), c in zip(cases, ds.per_case):
        for key, members in (("(1, 2, 3)", (1, 2, 3)), ("(3,)", (3,))):
            mp, mg = np.isin(p, members), np.isin(g, members)
            row = c.regions[key]
            assert row["tp"] == int((mp & mg).sum()) and row["fp"] == int((mp & ~mg).sum())
            assert row["fn"] == int((~mp & mg).sum()) and row["tn"] == int((~mp & ~mg).sum())
    # pooled: summed counts, not the mean over cases
    total = sum(cm_of(p, g) for p, g in cases)
    assert np.array_equal(ds.pooled.confusion_matrix, total)
    pooled_dice1 = 2 * total[1, 1] / (total[1].sum() + total[:, 1].sum())
    assert ds.pooled.per_class[1]["dice"] == pytest.approx(pooled_dice1)
    assert ds.pooled.per_class[1]["dice"] != ds.aggregate[1]["dice"]["mean"]


def test_threads_and_synchronous_scheduler_agree(tmp_path):
    cases = make_cases(5, seed=11)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    a = fse.evaluate_dataset(pd, gd, workers=1).to_json()
    b = fse.evaluate_dataset(pd, gd, workers=4).to_json()
    c = fse.evaluate_dataset(pd, gd, scheduler="synchronous").to_json()
    assert a == b == c


@pytest.mark.slow
def test_distributed_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    cases = make_cases(4, seed=13)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    ds = fse.evaluate_dataset(pd, gd, scheduler="local:2")
    assert ds.to_json() == fse.evaluate_dataset(pd, gd, workers=1).to_json()


# ------------------------------------------------------------------------------------ matching
def test_missing_cases_error_skip_empty(tmp_path):
    cases = make_cases(4, seed=2)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    os.remove(os.path.join(pd, "case_001.nii.gz"))
    nib.save(nib.Nifti1Image(cases[0][0].T, np.eye(4)), os.path.join(pd, "extra.nii.gz"))
    with pytest.raises(InputError) as ei:
        fse.evaluate_dataset(pd, gd)
    msg = str(ei.value)
    assert "case_001" in msg and "extra" in msg and "missing=skip" in msg and "missing=empty" in msg
    ds = fse.evaluate_dataset(pd, gd, missing="skip")
    assert ds.cases == ["case_000", "case_002", "case_003"]
    assert ds.missing_cases == {"policy": "skip", "pred": ["case_001"], "gt": ["extra"]}
    ds = fse.evaluate_dataset(pd, gd, missing="empty")
    assert ds.cases == ["case_000", "case_001", "case_002", "case_003"]
    g1 = cases[1][1]
    assert np.array_equal(ds.case("case_001").confusion_matrix, cm_of(np.zeros_like(g1), g1))
    r = run_cli(pd, gd, "-q")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "case_001" in r.stderr and "--missing skip" in r.stderr


def test_many_missing_are_summarised(tmp_path):
    pd, gd = tmp_path / "p", tmp_path / "g"
    pd.mkdir()
    gd.mkdir()
    for i in range(9):
        np.save(gd / f"g{i}.npy", np.zeros((2, 2), np.uint8))
    np.save(pd / "x.npy", np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match=r"9 case\(s\) of GT .*g0, g1, g2, g3, g4, \.\.\. \(9 in all\)"):
        fse.evaluate_dataset(str(pd), str(gd))


def test_case_ids_and_folder_contents(tmp_path):
    pd, gd = tmp_path / "p", tmp_path / "g"
    pd.mkdir()
    gd.mkdir()
    a = np.zeros((3, 4), np.uint8)
    np.save(pd / "a.npy", a)
    from conftest import write_zarr

    write_zarr(gd / "a.zarr", a, (2, 2))
    (pd / "notes.txt").write_text("ignored")
    (pd / ".hidden.npy").write_bytes(b"")
    (pd / "sub").mkdir()
    ds = fse.evaluate_dataset(str(pd), str(gd))
    assert ds.cases == ["a"]
    nib.save(nib.Nifti1Image(a.T, np.eye(4)), str(pd / "a.nii.gz"))
    with pytest.raises(InputError, match=r"two entries for case 'a': a\.nii\.gz and a\.npy"):
        fse.evaluate_dataset(str(pd), str(gd))


def test_manifest(tmp_path):
    cases = make_cases(3, seed=4)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    man = tmp_path / "cases.csv"
    man.write_text(
        "case,pred,gt\n" + "".join(f"x{i},preds/{n}.nii.gz,gts/{n}.nii.gz\n" for i, n in enumerate(names))
    )
    ds = fse.evaluate_dataset(cases=str(man))
    assert ds.cases == ["x0", "x1", "x2"]
    for (p, g), c in zip(cases, ds.per_case):
        assert np.array_equal(c.confusion_matrix, cm_of(p, g))
    r = run_cli("--cases", man, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_cases"] == 3
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    r = run_cli("--cases", tmp_path / "bad.csv")
    assert r.returncode == 1 and "case,pred,gt" in r.stderr
    r = run_cli("--cases", man, pd)
    assert r.returncode == 2 and "--cases" in r.stderr


def test_mask_folder_matched_by_case(tmp_path):
    cases = make_cases(3, seed=6)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    md = tmp_path / "masks"
    md.mkdir()
    masks = []
    for name, (p, _) in zip(names, cases):
        m = (np.arange(p.size).reshape(p.shape) % 3 == 0).astype(np.uint8)
        masks.append(m)
        nib.save(nib.Nifti1Image(m.T, np.eye(4)), str(md / f"{name}.nii.gz"))
    ds = fse.evaluate_dataset(pd, gd, mask=str(md))
    for (p, g), m, c in zip(cases, masks, ds.per_case):
        sel = m.astype(bool)
        assert np.array_equal(c.confusion_matrix, cm_of(p[sel], g[sel]))


# ------------------------------------------------------------------------------------ outputs
def test_json_csv_table_outputs(tmp_path):
    cases = make_cases(6, seed=8)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    names_json = tmp_path / "dataset.json"
    names_json.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2, "vessel": 3}}))
    r = run_cli(pd, gd, "-o", tmp_path / "cases.csv", "--regions", "1,2;3", "--label-names", names_json)
    assert r.returncode == 0, r.stderr
    table = r.stdout
    assert "dice mean ± std" in table and "1 liver" in table and "region (1, 2)" in table
    assert "worst 5 cases by foreground Dice" in table and "voxel-pooled" in table
    with open(tmp_path / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * (4 + 2)
    assert {r["case"] for r in rows} == set(names)
    row = next(r for r in rows if r["case"] == "case_000" and r["kind"] == "label" and r["label"] == "1")
    cm = cm_of(*cases[0])
    assert int(row["tp"]) == cm[1, 1] and row["name"] == "liver"
    assert float(row["dice"]) == pytest.approx(2 * cm[1, 1] / (cm[1].sum() + cm[:, 1].sum()))
    assert next(r for r in rows if r["case"] == "case_002" and r["label"] == "3")["dice"] == ""  # undefined
    try:
        import pandas
    except ImportError:
        pass
    else:  # reads straight into pandas: one row per case x label, NaN where undefined
        df = pandas.read_csv(tmp_path / "cases.csv")
        assert len(df) == 36 and df[(df.case == "case_002") & (df.label == "3")].dice.isna().all()
    r = run_cli(pd, gd, "-o", tmp_path / "r.json", "-q")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["kind"] == "dataset" and d["n_cases"] == 6 and d["labels"] == [0, 1, 2, 3]
    assert d["aggregate"]["3"]["dice"]["n"] == 5 and d["per_case"][2]["per_class"]["3"]["dice"] is None
    assert set(d) >= {"options", "aggregate", "pooled", "per_case", "failed_cases", "foreground_mean"}
    assert "timing" not in d  # reports are the same bytes for the same data


def test_outputs_never_onto_cases(tmp_path):
    cases = make_cases(2)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    before = (Path(pd) / f"{names[0]}.nii.gz").read_bytes()
    r = run_cli(pd, gd, "--nnunet-summary", Path(pd) / f"{names[0]}.nii.gz")
    assert r.returncode == 2 and "never written into an input" in r.stderr
    r = run_cli(pd, gd, "--save-matrix", Path(gd) / "pooled.npy")
    assert r.returncode == 2 and "read as a case" in r.stderr
    assert (Path(pd) / f"{names[0]}.nii.gz").read_bytes() == before
    r = run_cli(pd, gd, "-o", Path(pd) / "summary.json", "-q")  # beside the cases, not a case: fine
    assert r.returncode == 0, r.stderr
    assert fse.evaluate_dataset(pd, gd).cases == names


def test_usage_errors(tmp_path):
    cases = make_cases(2)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    from conftest import write_zarr

    z = write_zarr(tmp_path / "one.zarr", cases[0][0], (4, 4, 4))
    r = run_cli(pd, str(tmp_path / "one.zarr"))
    assert r.returncode == 1 and "not a zarr store" in r.stderr and "folder of cases" in r.stderr
    r = run_cli(str(tmp_path / "one.zarr"), str(tmp_path / "one.zarr"), "--regions", "1,2")
    assert r.returncode == 2 and "--regions applies to datasets" in r.stderr
    r = run_cli(pd, gd, "--regions", "1,x")
    assert r.returncode == 2 and "'1,x'" in r.stderr
    r = run_cli(pd, gd, "--sweep")
    assert r.returncode == 2
    with pytest.raises(OptionError, match="missing="):
        fse.evaluate_dataset(pd, gd, missing="maybe")
    with pytest.raises(OptionError, match="unknown option bogus="):
        fse.evaluate_dataset(pd, gd, bogus=1)
    del z


# ------------------------------------------------------------------------------------ bad cases
def _corrupt(path: str) -> None:
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])


def test_corrupt_case_stop_and_skip(tmp_path):
    cases = make_cases(4, seed=9)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    _corrupt(os.path.join(pd, "case_002.nii.gz"))
    with pytest.raises(InputError) as ei:
        fse.evaluate_dataset(pd, gd, workers=1)
    assert str(ei.value).startswith("case case_002: pred") and "case_002.nii.gz" in str(ei.value)
    ds = fse.evaluate_dataset(pd, gd, on_error="skip", workers=2)
    assert ds.cases == ["case_000", "case_001", "case_003"]
    assert [f.case for f in ds.failed_cases] == ["case_002"]
    r = run_cli(pd, gd, "-q")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "case_002" in r.stderr
    r = run_cli(pd, gd, "--on-error", "skip", "-o", tmp_path / "r.json")
    assert r.returncode == 1 and "case_002" in r.stderr
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["failed_cases"][0]["case"] == "case_002" and "corrupted" in d["failed_cases"][0]["error"]
    assert d["n_cases"] == 3


def test_geometry_mismatch_in_a_dataset(tmp_path):
    cases = make_cases(2)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    nib.save(nib.Nifti1Image(cases[1][0].T, np.diag([1, 1, 3.0, 1])), os.path.join(pd, f"{names[1]}.nii.gz"))
    r = run_cli(pd, gd, "-q")
    assert r.returncode == 1 and "case_001" in r.stderr and "spacing" in r.stderr and "--no-geometry-check" in r.stderr
    r = run_cli(pd, gd, "-q", "--no-geometry-check")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------ resume
def _outputs(tmp_path, pd, gd, tag, *extra):
    r = run_cli(pd, gd, "-o", tmp_path / f"{tag}.json", "--nnunet-summary", tmp_path / f"{tag}-s.json", "-q",
                "--regions", "1,2,3;3", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return (tmp_path / f"{tag}.json").read_bytes(), (tmp_path / f"{tag}-s.json").read_bytes()


def test_resume_after_an_interruption_gives_the_same_bytes(tmp_path, monkeypatch):
    from fastseg_eval import dataset as D

    cases = make_cases(6, seed=10)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    journal = tmp_path / "j.jsonl"
    real = D.run_case
    calls = []

    def flaky(spec, *a, **kw):
        calls.append(spec.case)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(spec, *a, **kw)

    monkeypatch.setattr(D, "run_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        fse.evaluate_dataset(pd, gd, resume=str(journal), workers=1, regions="1,2,3;3")
    monkeypatch.setattr(D, "run_case", real)
    lines = journal.read_text().splitlines()
    assert len(lines) == 4  # the header and three finished cases
    with open(journal, "a") as fh:  # a kill in the middle of a write leaves a torn line
        fh.write('{"case": "case_003", "counts": {"lab')
    ds = fse.evaluate_dataset(pd, gd, resume=str(journal), workers=2, regions="1,2,3;3")
    assert ds.timing["resumed"] == 3
    full = fse.evaluate_dataset(pd, gd, workers=1, regions="1,2,3;3")
    assert ds.to_json() == full.to_json() and ds.to_nnunet_summary() == full.to_nnunet_summary()
    assert ds.to_csv() == full.to_csv()
    assert all(json.loads(x) for x in journal.read_text().splitlines())  # the torn line was dropped
    # the same command again: nothing to do, same bytes
    again = fse.evaluate_dataset(pd, gd, resume=str(journal), regions="1,2,3;3")
    assert again.timing["resumed"] == 6 and again.to_json() == full.to_json()


def test_journal_checks(tmp_path):
    cases = make_cases(3, seed=12)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    journal = tmp_path / "j.jsonl"
    fse.evaluate_dataset(pd, gd, resume=str(journal))
    with pytest.raises(OptionError, match=r"other options.*num_classes"):
        fse.evaluate_dataset(pd, gd, resume=str(journal), num_classes=4)
    # a case whose file changed since is evaluated again
    p0 = cases[0][0].copy()
    p0[:] = 0
    time.sleep(0.01)
    nib.save(nib.Nifti1Image(p0.T, np.eye(4)), os.path.join(pd, f"{names[0]}.nii.gz"))
    ds = fse.evaluate_dataset(pd, gd, resume=str(journal))
    assert ds.timing["resumed"] == 2 and ds.timing["changed_since_journal"] == [names[0]]
    assert np.array_equal(ds.per_case[0].confusion_matrix, cm_of(p0, cases[0][1]))
    # damage in the middle (not a torn last line) is refused
    lines = journal.read_text().splitlines()
    lines[1] = lines[1][:20]
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 2 .*damaged"):
        fse.evaluate_dataset(pd, gd, resume=str(journal))


_KILLABLE = """
import sys, time
from fastseg_eval import dataset as D
real = D.run_case
def slow(*a, **kw):
    time.sleep(0.4)
    return real(*a, **kw)
D.run_case = slow
from fastseg_eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_and_resume_gives_byte_identical_reports(tmp_path):
    cases = make_cases(8, seed=14)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    ref_json, ref_summary = _outputs(tmp_path, pd, gd, "ref")
    journal = tmp_path / "j.jsonl"
    args = [pd, gd, "-o", tmp_path / "r.json", "--nnunet-summary", tmp_path / "r-s.json", "-q", "--regions",
            "1,2,3;3", "--resume", journal, "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *map(str, args)], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_done = len(journal.read_bytes().splitlines()) - 1
    assert 3 <= n_done < 8, n_done  # killed mid-way
    assert not (tmp_path / "r.json").exists()  # nothing half-written
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.json").read_bytes() == ref_json
    assert (tmp_path / "r-s.json").read_bytes() == ref_summary


def test_progress_bar_over_cases(tmp_path):
    cases = make_cases(3)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    buf = io.StringIO()
    from fastseg_eval.progress import CaseProgressBar as CaseProgress

    bars = []

    def make(total, done):
        bars.append(CaseProgress(total, done=done, stream=buf, delay=0.0, interval=0.0))
        return bars[-1]

    fse.evaluate_dataset(pd, gd, progress=make, workers=1)
    out = buf.getvalue()
    assert "3/3 cases" in out and "voxels" in out and out.endswith("\n")
    assert bars[0].voxels == sum(g.size for _, g in cases)


def test_tidy_csv_reads_with_csv_module(tmp_path):
    cases = make_cases(2)
    ds = fse.evaluate_dataset([p for p, _ in cases], [g for _, g in cases], metrics=["dice", "iou"])
    rows = list(csv.DictReader(io.StringIO(ds.to_csv())))
    assert len(rows) == 2 * K and list(rows[0])[:6] == ["case", "kind", "label", "name", "pred", "gt"]
    assert list(rows[0])[-2:] == ["dice", "iou"]


def test_memory_bounded_by_workers_cases(tmp_path, monkeypatch):
    """At most ``workers`` cases' decoded volumes are alive at once, never the dataset's."""
    import gc
    import threading
    import weakref

    from fastseg_eval.io import formats

    cases = make_cases(8, seed=15)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    real = formats._decode_nifti_gz
    lock = threading.Lock()
    alive, peak = [0], [0]

    def dead():
        with lock:
            alive[0] -= 1

    def tracked(*a, **kw):
        arr = real(*a, **kw)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        weakref.finalize(arr, dead)
        return arr

    monkeypatch.setattr(formats, "_decode_nifti_gz", tracked)
    ds = fse.evaluate_dataset(pd, gd, workers=2)
    gc.collect()
    assert len(ds.per_case) == 8
    assert 2 <= peak[0] <= 4  # pred + gt of at most two cases at a time
    assert alive[0] == 0  # nothing kept after the run


def test_boundary_metrics_per_case_and_over_cases(tmp_path):
    """Distance metrics (not derived from counts) travel through the journal and are averaged over cases."""
    cases = make_cases(3, seed=16)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    journal = str(tmp_path / "j.jsonl")
    ds = fse.evaluate_dataset(pd, gd, metrics=["dice", "hd95"], resume=journal, workers=2)
    per = []
    for name, c in zip(names, ds.per_case):
        single = fse.evaluate(os.path.join(pd, f"{name}.nii.gz"), os.path.join(gd, f"{name}.nii.gz"), metrics=["dice", "hd95"])
        for lab in (1, 2):
            assert c.per_class[lab]["hd95"] == single.per_class[lab]["hd95"]
        per.append(single.per_class[1]["hd95"])
    assert ds.aggregate[1]["hd95"]["mean"] == pytest.approx(np.mean(per), abs=1e-12)
    assert "hd95" not in ds.pooled.per_class[1]  # distances do not add up over cases
    again = fse.evaluate_dataset(pd, gd, metrics=["dice", "hd95"], resume=journal)
    assert again.timing["resumed"] == 3 and again.to_json() == ds.to_json()
    with pytest.raises(OptionError, match="boundary_metrics"):
        fse.evaluate_dataset(pd, gd, metrics=["dice", "hd"], resume=journal)
    with pytest.raises(OptionError, match="instances"):  # a journal without instance figures is not reused
        fse.evaluate_dataset(pd, gd, metrics=["dice", "hd95"], resume=journal, instances=True)


# ------------------------------------------------------------------------------------ instances
INSTANCE_FIGURES = (
    "voi_split", "voi_merge", "adapted_rand_error", "rand_precision", "rand_recall", "n_gt", "n_pred",
    "tp", "fp", "fn", "precision", "recall", "f1", "pq", "sq", "rq",
)  # fmt: skip


def make_instance_cases(n=4, seed=30):
    """Instance volumes (uint16 ids): blocks, some shifted, split, merged or missed by the prediction;
    one case without any instance on either side (its figures are NaN: left out of the means)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        gt = np.zeros(shape, np.uint16)
        pred = np.zeros(shape, np.uint16)
        if i != n - 1:
            for k in range(1, 6 + i):
                z, y, x = (int(rng.integers(0, s - 3)) for s in shape)
                gt[z : z + 3, y : y + 3, x : x + 3] = k
                if rng.random() < 0.8:  # found, shifted by up to a voxel
                    dz, dy, dx = (int(rng.integers(0, 2)) for _ in range(3))
                    pred[z + dz : z + 3 + dz, y + dy : y + 3 + dy, x + dx : x + 3 + dx] = 100 + k
            pred[rng.random(shape) < 0.02] = 999  # a scattered false positive
        out.append((pred, gt))
    return out


def test_instances_per_case_equal_single_pair_and_aggregate_over_cases(tmp_path):
    """Each case's instance figures equal evaluate()'s; the statistics over cases are those of the
    single-pair values; the pooled summary equals sums over the single-pair matchings."""
    cases = make_instance_cases()
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    ds = fse.evaluate_dataset(pd, gd, instances=True, workers=2)
    singles = [
        fse.evaluate(os.path.join(pd, f"{n}.nii.gz"), os.path.join(gd, f"{n}.nii.gz"), instances=True).instances
        for n in names
    ]
    for c, one in zip(ds.per_case, singles):
        for k in INSTANCE_FIGURES:
            assert c.instances[k] == one[k] or (math.isnan(c.instances[k]) and math.isnan(one[k])), (c.case, k)
        assert "per_gt" not in c.instances  # kept only when asked
    for k in INSTANCE_FIGURES:
        vals = np.array([one[k] for one in singles], dtype=np.float64)
        st = ds.instances["aggregate"][k]
        ok = vals[~np.isnan(vals)]
        assert st["n"] == ok.size
        assert st["mean"] == pytest.approx(ok.mean(), abs=1e-12) and st["std"] == pytest.approx(ok.std(), abs=1e-12)
        assert (st["median"], st["min"], st["max"]) == pytest.approx((np.median(ok), ok.min(), ok.max()), abs=1e-12)
    assert ds.instances["aggregate"]["pq"]["n"] == len(cases) - 1  # the empty case: NaN, left out
    # pooled, from the per-instance rows of each single-pair matching
    tp = sum(sum(r["matched_id"] is not None for r in one["per_gt"]) for one in singles)
    n_gt = sum(len(one["per_gt"]) for one in singles)
    n_pred = sum(one["n_pred"] for one in singles)
    ious = [r["iou"] for one in singles for r in one["per_gt"] if r["matched_id"] is not None]
    pooled = ds.instances["pooled"]
    fp, fn = n_pred - tp, n_gt - tp
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["n_gt"], pooled["n_pred"]) == (tp, fp, fn, n_gt, n_pred)
    assert 0 < tp < n_gt and fp > 0
    assert pooled["precision"] == pytest.approx(tp / n_pred) and pooled["recall"] == pytest.approx(tp / n_gt)
    assert pooled["rq"] == pytest.approx(tp / (tp + fp / 2 + fn / 2)) == pooled["f1"]
    assert pooled["sq"] == pytest.approx(math.fsum(ious) / tp, abs=1e-12)
    assert pooled["pq"] == pytest.approx(pooled["sq"] * pooled["rq"], abs=1e-12)
    assert pooled["pq"] != pytest.approx(ds.instances["aggregate"]["pq"]["mean"])  # pooled is not the mean
    d = json.loads(ds.to_json())
    assert d["instances"]["pooled"]["tp"] == tp and d["instances"]["aggregate"]["pq"]["n"] == len(cases) - 1
    assert d["per_case"][0]["instances"]["tp"] == singles[0]["tp"] and "per_gt" not in d["per_case"][0]["instances"]
    assert d["per_case"][-1]["instances"]["pq"] is None  # NaN as null
    assert d["options"]["instances"] is True and d["options"]["iou_threshold"] == 0.5
    text = ds.to_table()
    assert "instances (4 cases)" in text and f"{tp} / {fp} / {fn}" in text
    plain = fse.evaluate_dataset(pd, gd, workers=1)  # without instances: reports unchanged
    assert plain.instances is None and "instances" not in json.loads(plain.to_json())
    assert all(c.instances is None for c in plain.per_case) and "tp / fp / fn" not in plain.to_table()


def test_instances_resume_and_per_gt(tmp_path, monkeypatch):
    """Instance figures (and per-instance rows when asked) travel through the journal: a resumed run
    reports the same bytes; options that change them make the journal refuse."""
    from fastseg_eval import dataset as D

    cases = make_instance_cases(5, seed=31)
    pd, gd, names = write_nifti_dataset(tmp_path, cases)
    journal = tmp_path / "j.jsonl"
    real = D.run_case
    calls = []

    def flaky(spec, *a, **kw):
        calls.append(spec.case)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(spec, *a, **kw)

    opts = dict(instances=True, iou_threshold=0.4, instances_per_gt=True)
    monkeypatch.setattr(D, "run_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        fse.evaluate_dataset(pd, gd, resume=str(journal), workers=1, **opts)
    monkeypatch.setattr(D, "run_case", real)
    ds = fse.evaluate_dataset(pd, gd, resume=str(journal), workers=2, **opts)
    assert ds.timing["resumed"] == 2
    full = fse.evaluate_dataset(pd, gd, workers=1, **opts)
    assert ds.to_json() == full.to_json() and ds.to_csv() == full.to_csv()
    single = fse.evaluate(
        os.path.join(pd, f"{names[0]}.nii.gz"), os.path.join(gd, f"{names[0]}.nii.gz"), instances=True,
        iou_threshold=0.4,
    ).instances  # fmt: skip
    assert ds.per_case[0].instances["per_gt"] == list(single["per_gt"])
    assert json.loads(ds.to_json())["per_case"][0]["instances"]["per_gt"] == json.loads(
        json.dumps(list(single["per_gt"]))
    )
    for k in ("tp", "pq", "matching"):
        assert ds.per_case[0].instances[k] == single[k]
    with pytest.raises(OptionError, match="instances"):
        fse.evaluate_dataset(pd, gd, resume=str(journal), instances=True, iou_threshold=0.5, instances_per_gt=True)
    with pytest.raises(OptionError, match="instances"):
        fse.evaluate_dataset(pd, gd, resume=str(journal))
    with pytest.raises(OptionError, match="instances_per_gt"):
        fse.evaluate_dataset(pd, gd, instances_per_gt=True)


@pytest.mark.parametrize("source", ["arrays", "nifti"])
def test_instances_of_semantic_masks_with_connected_components(tmp_path, source):
    """connectivity= in dataset mode: each case's classes cut into connected components, as evaluate() does
    (NIfTI volumes come back read-only from the reader: labelling must not need to write into them)."""
    pytest.importorskip("cc3d")
    cases = make_cases(3, seed=32)
    cases = [((p > 1).astype(np.uint8) * p, (g > 1).astype(np.uint8) * g) for p, g in cases]
    if source == "nifti":
        pd, gd, _ = write_nifti_dataset(tmp_path, cases)
        preds, gts = sorted(str(f) for f in Path(pd).iterdir()), sorted(str(f) for f in Path(gd).iterdir())
    else:
        preds, gts = [p for p, _ in cases], [g for _, g in cases]
    ds = fse.evaluate_dataset(preds, gts, instances=True, connectivity=6, workers=1)
    for (p, g), c in zip(cases, ds.per_case):
        one = fse.evaluate(p, g, instances=True, connectivity=6).instances
        assert all(c.instances[k] == one[k] or math.isnan(one[k]) for k in INSTANCE_FIGURES)
        assert c.instances["connectivity"] == 6
    assert ds.instances["pooled"]["tp"] == sum(c.instances["tp"] for c in ds.per_case)


def test_cli_instances_csv_over_cases(tmp_path):
    """``fastseg-eval PRED_DIR GT_DIR --instances --instances-csv F``: every case's per-instance rows,
    with a leading case column, equal to the single-pair tables."""
    cases = make_instance_cases()
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    out = tmp_path / "inst.csv"
    r = run_cli(pd, gd, "--instances", "--instances-csv", str(out), "-q")
    assert r.returncode == 0, r.stderr
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    names = sorted(f.name[: -len(".nii.gz")] for f in Path(pd).iterdir())
    want = []
    for n in names:
        res = fse.evaluate(os.path.join(pd, f"{n}.nii.gz"), os.path.join(gd, f"{n}.nii.gz"), instances=True)
        want += [{"case": n, **row} for row in csv.DictReader(io.StringIO(res.to_csv(table="instances")))]
    assert rows == want and len(rows) > 0
    bad = run_cli(pd, gd, "--instances-csv", str(tmp_path / "inst.txt"))
    assert bad.returncode == 2 and "must end in .csv" in bad.stderr


@pytest.mark.filterwarnings("ignore:Please import `:DeprecationWarning")  # surface-distance's scipy imports
def test_boundary_metrics_of_regions(tmp_path):
    """Regions with distance metrics: each region's hd95 / assd / nsd are those of the union of its
    labels (one surface per region, not a mix of its labels' values), equal to the surface-distance
    package on the region masks with the dataset's spacing; aggregated over cases like the labels."""
    sd = pytest.importorskip("surface_distance")
    cases = make_cases(4, seed=41)
    pd, gd, _ = write_nifti_dataset(tmp_path, cases)
    spacing = (1.5, 1.0, 0.5)
    regions = [(1, 2, 3), (2, 3), (3,)]
    ds = fse.evaluate_dataset(pd, gd, regions=regions, metrics=["dice", "hd95", "assd", "nsd"], spacing=spacing, workers=2)
    for (p, g), c in zip(cases, ds.per_case):
        for r in regions:
            gm, pm = np.isin(g, r), np.isin(p, r)
            row = c.regions[str(r) if len(r) > 1 else f"({r[0]},)"]
            if not gm.any() and not pm.any():
                assert math.isnan(row["hd95"])
                continue
            if not gm.any() or not pm.any():
                assert math.isinf(row["hd95"])
                continue
            s = sd.compute_surface_distances(gm, pm, spacing)
            assert row["hd95"] == pytest.approx(sd.compute_robust_hausdorff(s, 95), abs=1e-9)
            da, pa = s["distances_gt_to_pred"], s["surfel_areas_gt"]
            db, pb = s["distances_pred_to_gt"], s["surfel_areas_pred"]
            assert row["assd"] == pytest.approx((np.sum(da * pa) + np.sum(db * pb)) / (np.sum(pa) + np.sum(pb)), abs=1e-9)
            assert row["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(s, 1.0), abs=1e-9)
    key = "(2, 3)"
    vals = [c.regions[key]["hd95"] for c in ds.per_case]
    finite = [v for v in vals if not math.isnan(v)]
    assert ds.aggregate[key]["hd95"]["n"] == len(finite)
    d = json.loads(ds.to_json())
    assert d["per_case"][0]["regions"][key]["hd95"] is not None or math.isnan(vals[0])
    assert any(r["kind"] == "region" and r["hd95"] != "" for r in csv.DictReader(io.StringIO(ds.to_csv())))
    journal = tmp_path / "j.jsonl"
    fse.evaluate_dataset(pd, gd, regions=regions, metrics=["dice", "hd95"], spacing=spacing, resume=str(journal))
    with pytest.raises(OptionError):  # other regions: the journal's region distances do not apply
        fse.evaluate_dataset(pd, gd, regions=[(1,)], metrics=["dice", "hd95"], spacing=spacing, resume=str(journal))
