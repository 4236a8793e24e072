"""The ``fastseg-eval`` command line, run as a real console script in a subprocess.

Every count is checked against numpy ``bincount`` (rows = ground truth) computed here from the
arrays that were written, never against numbers the tool printed before. In-process tests
(``cli.main([...])``) cover the wiring of every option and the error mapping cheaply.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

from fastseg_eval import cli

K = 4
SHAPE = (20, 24, 28)  # 20*24*28 = 13,440 voxels, chunk grid misaligned with the shape
CHUNKS = (8, 8, 8)


# ---------------------------------------------------------------------------- helpers
def _command() -> list[str]:
    exe = Path(sys.executable).parent / ("fastseg-eval.exe" if os.name == "nt" else "fastseg-eval")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fastseg_eval"]


def run_cli(*args, env: dict[str, str] | None = None, module: bool = False) -> subprocess.CompletedProcess:
    """Run the installed console script (or ``python -m fastseg_eval``) and capture its output."""
    cmd = [sys.executable, "-m", "fastseg_eval"] if module else _command()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("NO_COLOR", None)
    return subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, env=full_env, timeout=300
    )


def _no_nan(token: str):
    raise AssertionError(f"JSON output contains the non-standard token {token}")


def load_json(text: str) -> dict:
    """Parse strictly: NaN / Infinity tokens fail the test."""
    return json.loads(text, parse_constant=_no_nan)


def reference(pred: np.ndarray, gt: np.ndarray, labels, mask=None, ignore=None) -> np.ndarray:
    """Confusion matrix by numpy bincount: rows = ground truth, columns = prediction."""
    labels = list(labels)
    keep = np.ones(gt.shape, dtype=bool)
    if mask is not None:
        keep &= mask != 0
    if ignore is not None:
        keep &= gt != ignore
    lut = np.full(max(max(labels), int(gt.max()), int(pred.max())) + 1, -1, dtype=np.int64)
    lut[labels] = np.arange(len(labels))
    g = lut[gt[keep].astype(np.int64)]
    p = lut[pred[keep].astype(np.int64)]
    assert (g >= 0).all() and (p >= 0).all()
    k = len(labels)
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def ref_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class counts and core metrics straight from DESIGN.md's definitions."""
    cm = cm.astype(np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = n - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "support": tp + fn, "predicted": tp + fp,
            "dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
            "precision": tp / (tp + fp), "recall": tp / (tp + fn), "specificity": tn / (tn + fp),
            "accuracy": (tp + tn) / n,
        }  # fmt: skip


def check_schema(d: dict) -> None:
    """The DESIGN.md JSON layout: required keys and types, a K x K integer matrix, no NaN."""
    types = {
        "fastseg_eval_version": str, "inputs": dict, "options": dict, "labels": list, "n_voxels": int,
        "n_ignored": int, "per_class": dict, "mean": dict, "foreground_mean": dict, "micro": dict,
        "weighted": dict, "overall": dict, "warnings": list, "timing": dict,
    }  # fmt: skip
    for key, t in types.items():
        assert key in d, f"missing key {key}"
        assert isinstance(d[key], t), f"{key} is {type(d[key]).__name__}, expected {t.__name__}"
    for role in ("pred", "gt"):
        inp = d["inputs"][role]
        assert isinstance(inp["source"], str) and inp["source"]
        assert isinstance(inp["dtype"], str)
        assert all(isinstance(s, int) for s in inp["shape"])
        assert "chunks" in inp
    assert "mask" in d["inputs"]
    for opt in ("empty", "tversky_alpha", "tversky_beta", "smooth", "ignore_label", "background_label"):
        assert opt in d["options"], f"options lacks {opt}"
    labels = d["labels"]
    assert all(isinstance(x, int) and not isinstance(x, bool) for x in labels)
    cm = d["confusion_matrix"]
    assert isinstance(cm, list) and len(cm) == len(labels)
    for row in cm:
        assert len(row) == len(labels) and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
    assert sum(map(sum, cm)) == d["n_voxels"]
    assert list(d["per_class"]) == [str(x) for x in labels]
    for row in d["per_class"].values():
        for k in ("tp", "fp", "fn", "tn", "support", "predicted"):
            assert isinstance(row[k], int)
        for k, v in row.items():
            assert v is None or isinstance(v, (int, float)), (k, v)
    for k in ("accuracy", "balanced_accuracy", "mcc", "cohen_kappa"):
        assert d["overall"][k] is None or isinstance(d["overall"][k], float)
    assert all(isinstance(w, str) for w in d["warnings"])
    for k in ("seconds", "backend"):
        assert k in d["timing"]
    if "label_names" in d:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in d["label_names"].items())


def check_numbers(d: dict, pred: np.ndarray, gt: np.ndarray, labels=range(K), **ref_kw) -> None:
    """Counts and metrics of a JSON report against the bincount reference."""
    check_schema(d)
    cm = reference(pred, gt, labels, **ref_kw)
    assert d["labels"] == list(labels)
    np.testing.assert_array_equal(np.array(d["confusion_matrix"], dtype=np.int64), cm)
    assert d["n_voxels"] == int(cm.sum())
    ref = ref_metrics(cm)
    for i, lab in enumerate(labels):
        row = d["per_class"][str(lab)]
        for k in ("tp", "fp", "fn", "tn", "support", "predicted"):
            assert row[k] == int(ref[k][i]), (lab, k)
        for k in ("dice", "iou", "precision", "recall", "specificity", "accuracy"):
            want = ref[k][i]
            if math.isnan(want):
                assert row[k] is None
            else:
                assert row[k] == pytest.approx(want, rel=1e-12), (lab, k)
    fg = [i for i, lab in enumerate(labels) if lab != 0]
    dice = ref["dice"]
    assert d["mean"]["dice"] == pytest.approx(np.nanmean(dice), rel=1e-12)
    assert d["foreground_mean"]["dice"] == pytest.approx(np.nanmean(dice[fg]), rel=1e-12)


def make_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` uint8, labels 0..K-1 with an asymmetric confusion (gt 1 -> pred 2)."""
    rng = np.random.default_rng(seed)
    gt = rng.choice(K, size=SHAPE, p=[0.55, 0.2, 0.15, 0.1]).astype(np.uint8)
    pred = np.where(rng.random(SHAPE) < 0.8, gt, rng.integers(0, K, SHAPE)).astype(np.uint8)
    pred[(gt == 1) & (rng.random(SHAPE) < 0.3)] = 2  # rows = gt must not read as columns
    return pred, gt


def write(path, data, *, zarr_format=3, chunks=CHUNKS, store=None) -> str:
    arr = zarr.create_array(
        store=store if store is not None else str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
        zarr_format=zarr_format, fill_value=0, overwrite=True,
    )  # fmt: skip
    arr[...] = data
    return str(path)


def write_ome(path, labels_level0: np.ndarray, name: str = "cells") -> str:
    """An NGFF 0.4 image (zarr v2) with one label image ``name`` at levels 0 and 1 (2x down)."""
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]

    def multiscales(title):
        return [{
            "version": "0.4", "name": title, "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]},
                {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}]},
            ],
        }]  # fmt: skip

    img = zarr.open_group(str(path), mode="w", zarr_format=2)
    img.attrs["multiscales"] = multiscales("image")
    intensity = (labels_level0.astype(np.uint16) * 1000 + 7).astype(np.uint16)
    write(None, intensity, zarr_format=2, store=img.store_path / "0")
    write(None, intensity[::2, ::2, ::2], zarr_format=2, store=img.store_path / "1")
    lab_group = img.create_group("labels")
    lab_group.attrs["labels"] = [name]
    cells = lab_group.create_group(name)
    cells.attrs["image-label"] = {"version": "0.4", "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}]}
    cells.attrs["multiscales"] = multiscales(name)
    write(None, labels_level0, zarr_format=2, store=cells.store_path / "0")
    write(None, labels_level0[::2, ::2, ::2], zarr_format=2, store=cells.store_path / "1")
    return str(path)


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, pair):
    """Both volumes as zarr v2 and v3 arrays, a group, an OME-Zarr image, and zip stores."""
    pred, gt = pair
    d = tmp_path_factory.mktemp("stores")
    out = {}
    for fmt in (2, 3):
        out[f"pred_v{fmt}"] = write(d / f"pred_v{fmt}.zarr", pred, zarr_format=fmt)
        out[f"gt_v{fmt}"] = write(d / f"gt_v{fmt}.zarr", gt, zarr_format=fmt)
    for role, data in (("pred", pred), ("gt", gt)):
        g = zarr.open_group(str(d / f"{role}_group.zarr"), mode="w", zarr_format=3)
        write(None, data, store=g.store_path / "seg")
        # a second array: a path to the group alone is ambiguous and must be refused
        write(None, np.zeros((3, 3, 3), np.uint8), store=g.store_path / "other")
        out[f"{role}_group"] = str(d / f"{role}_group.zarr")
        out[f"{role}_ome"] = write_ome(d / f"{role}_ome.zarr", data)
        zpath = d / f"{role}.zip"
        zs = zarr.storage.ZipStore(str(zpath), mode="w")
        write(None, data, store=zs)
        zs.close()
        out[f"{role}_zip"] = str(zpath)
    out["dir"] = d
    return out


# ---------------------------------------------------------------------------- end to end
def test_zarr_v3_json_stdout_with_progress_and_matrix(stores, pair, tmp_path):
    """JSON on stdout parses even with the progress bar forced on (it goes to stderr)."""
    pred, gt = pair
    npy = tmp_path / "cm.npy"
    r = run_cli(
        stores["pred_v3"], stores["gt_v3"], "--format", "json", "--progress", "--save-matrix", npy,
        "--workers", "2", env={cli.PROGRESS_DELAY_ENV: "0"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = load_json(r.stdout)
    check_numbers(d, pred, gt)
    assert d["inputs"]["pred"]["source"].endswith("pred_v3.zarr")
    assert d["inputs"]["gt"]["source"].endswith("gt_v3.zarr")
    assert "voxels" in r.stderr and "100.0%" in r.stderr  # the bar was drawn, on stderr only
    assert "Traceback" not in r.stderr
    cm = np.load(npy)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, reference(pred, gt, range(K)))


def test_zarr_v2_csv_output_file_and_table(stores, pair, tmp_path):
    """-o out.csv picks CSV from the extension (a row per class, then the means); the table goes to stdout."""
    pred, gt = pair
    out, mcsv = tmp_path / "report.csv", tmp_path / "cm.csv"
    r = run_cli(stores["pred_v2"], stores["gt_v2"], "-o", out, "--save-matrix", mcsv, "--label-names",
                "1=liver,2=a rather long tumour name for the table,3=vessel")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + K + 4  # header + exactly one row per class + the four means
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1 : 1 + K]]
    means = [dict(zip(header, line.split(","))) for line in lines[1 + K :]]
    assert [m["label"] for m in means] == ["mean", "foreground_mean", "micro", "weighted"]
    ref = ref_metrics(reference(pred, gt, range(K)))
    assert [int(r_["label"]) for r_ in rows] == list(range(K))
    for i, row in enumerate(rows):
        assert int(row["tp"]) == ref["tp"][i] and int(row["support"]) == ref["support"][i]
        assert float(row["dice"]) == pytest.approx(ref["dice"][i], rel=1e-12)
    assert rows[1]["name"] == "liver"
    cm = np.loadtxt(mcsv, delimiter=",", dtype=np.int64)
    np.testing.assert_array_equal(cm, reference(pred, gt, range(K)))
    assert "rows = ground truth" in mcsv.read_text().splitlines()[0]
    # the human table on stdout: both roles named, 80 columns, exact supports, no colour in a pipe
    table = r.stdout
    assert "prediction   (PRED): " + stores["pred_v2"] in table
    assert "ground truth (GT):   " + stores["gt_v2"] in table
    body = [x for x in table.splitlines() if not x.startswith(("prediction", "ground truth"))]
    assert max(len(x) for x in body) <= 80
    assert "\033[" not in table
    for i in range(K):
        assert f"{int(ref['support'][i]):,}" in table
    assert "1 liver" in table and "2 a rather long" in table
    assert "wrote the csv report" in r.stderr


def test_group_path_and_key(stores, pair):
    """An array inside a group: by path for PRED, by --gt-key for GT."""
    pred, gt = pair
    r = run_cli(
        stores["pred_group"] + "/seg", stores["gt_group"], "--gt-key", "seg", "--format", "json", "-q"
    )
    assert r.returncode == 0, r.stderr
    d = load_json(r.stdout)
    check_numbers(d, pred, gt)
    assert d["inputs"]["pred"]["source"].endswith("seg") and "seg" in d["inputs"]["gt"]["source"]


def test_group_with_two_arrays_names_them(stores):
    r = run_cli(stores["pred_group"], stores["gt_group"] + "/seg")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "seg" in r.stderr and "other" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("level", [None, 1])
def test_ome_zarr_label_image(stores, pair, level):
    """labels/cells resolves to its full-resolution level by default, --level 1 to the 2x one."""
    pred, gt = pair
    extra = [] if level is None else ["--level", str(level)]
    r = run_cli(stores["pred_ome"] + "/labels/cells", stores["gt_ome"] + "/labels/cells", "--format", "json",
                *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = load_json(r.stdout)
    if level is None:
        check_numbers(d, pred, gt)
        assert d["inputs"]["gt"]["source"].endswith("labels/cells/0")
    else:
        check_numbers(d, pred[::2, ::2, ::2], gt[::2, ::2, ::2])
        assert d["inputs"]["gt"]["source"].endswith("labels/cells/1")


def test_ome_zarr_image_root_resolves_to_labels(stores, pair):
    """The image root with a single label image evaluates that label image, not the intensities."""
    pred, gt = pair
    r = run_cli(stores["pred_ome"], stores["gt_ome"], "--format", "json")
    assert r.returncode == 0, r.stderr
    check_numbers(load_json(r.stdout), pred, gt)


def test_zip_store_and_file_url(stores, pair):
    """A .zip store for PRED, a file:// URL with a storage option for GT."""
    pred, gt = pair
    url = Path(stores["gt_v3"]).resolve().as_uri()
    r = run_cli(stores["pred_zip"], url, "--storage-option", "auto_mkdir=false", "--format", "json")
    assert r.returncode == 0, r.stderr
    d = load_json(r.stdout)
    check_numbers(d, pred, gt)
    assert d["inputs"]["pred"]["source"].endswith("pred.zip")
    assert d["inputs"]["gt"]["source"].startswith("file://")


def test_demo_then_the_printed_command(tmp_path):
    """`fastseg-eval demo DIR` writes a pair and prints a command that evaluates it (python -m too)."""
    from fastseg_eval.demo import DEMO_CLASSES, DEMO_SHAPE, make_demo_pair

    r = run_cli("demo", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    command = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("fastseg-eval ")]
    assert len(command) == 1
    argv = shlex.split(command[0])[1:]
    assert argv == [str(tmp_path / "demo" / "pred.zarr"), str(tmp_path / "demo" / "gt.zarr")]
    r2 = run_cli(*argv, "--format", "json", module=True)
    assert r2.returncode == 0, r2.stderr
    pred, gt = make_demo_pair(DEMO_SHAPE, DEMO_CLASSES, seed=0)
    d = load_json(r2.stdout)
    check_numbers(d, pred, gt, labels=range(DEMO_CLASSES))
    assert zarr.open_array(argv[0], mode="r").metadata.zarr_format == 3
    # a second run replaces its own stores; a foreign store is never overwritten
    assert cli.main(["demo", str(tmp_path / "demo"), "--shape", "12", "--classes", "3"]) == 0
    foreign = tmp_path / "foreign"
    write(foreign / "gt.zarr", np.zeros((4, 4, 4), np.uint8))
    assert cli.main(["--demo", str(foreign)]) == 1


def test_probability_map_threshold_and_sweep(tmp_path):
    """--threshold / --sweep reach the library: counts at every swept threshold match numpy."""
    rng = np.random.default_rng(9)
    gt = (rng.random(SHAPE) < 0.3).astype(np.uint8)
    # probabilities (2k+1)/128: exact in float32 and never equal to a threshold i/B
    k = np.clip(np.round((gt * 0.35 + rng.random(SHAPE) * 0.65) * 64 - 0.5), 0, 63)
    prob = ((2 * k + 1) / 128).astype(np.float32)
    p, g = write(tmp_path / "prob.zarr", prob), write(tmp_path / "gt.zarr", gt)
    png = tmp_path / "fig.png"
    r = run_cli(p, g, "--threshold", "0.5", "--format", "json", "--plot", png, "--sweep", "10")
    assert r.returncode == 0, r.stderr
    d = load_json(r.stdout)
    check_numbers(d, (prob > 0.5).astype(np.uint8), gt, labels=[0, 1])
    c = d["curves"]["1"]
    assert len(c["thresholds"]) >= 10
    for t, tp, fp in zip(c["thresholds"], c["tp"], c["fp"]):
        assert tp == int(((prob > t) & (gt == 1)).sum()) and fp == int(((prob > t) & (gt == 0)).sum()), t
    assert png.stat().st_size > 0 and (tmp_path / "fig-curves.png").stat().st_size > 0


# ---------------------------------------------------------------------------- bad input battery
@pytest.fixture(scope="module")
def bad(tmp_path_factory, pair):
    pred, gt = pair
    d = tmp_path_factory.mktemp("bad")
    paths = {"gt": write(d / "gt.zarr", gt), "pred": write(d / "pred.zarr", pred)}
    paths["small"] = write(d / "small.zarr", gt[:10])
    paths["float"] = write(d / "float.zarr", pred.astype(np.float32))
    big = gt.copy()
    big[3, 4, 5] = 9
    paths["big"] = write(d / "big.zarr", big)
    neg = pred.astype(np.int16)
    neg[1, 2, 3] = -4
    paths["neg"] = write(d / "neg.zarr", neg)
    corrupt = write(d / "corrupt.zarr", pred)  # zarr v3 default codecs: zstd
    chunk = Path(corrupt) / "c" / "1" / "1" / "1"
    assert chunk.is_file()
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    paths["corrupt"] = corrupt
    (d / "plain").mkdir()
    paths["plain_dir"] = str(d / "plain")
    (d / "plain.txt").write_text("not zarr")
    paths["plain_file"] = str(d / "plain.txt")
    paths["missing"] = str(d / "missing.zarr")
    return paths


BATTERY = [
    # (id, args (names refer to the `bad` fixture), exit code, words the message must contain)
    ("missing-path", ["missing", "gt"], 1, ["missing.zarr", "no such file"]),
    ("plain-directory", ["plain_dir", "gt"], 1, ["plain", "not a zarr"]),
    ("plain-file", ["pred", "plain_file"], 1, ["plain.txt", "not a zarr"]),
    ("shape-mismatch", ["small", "gt"], 1, ["(10, 24, 28)", "(20, 24, 28)"]),
    ("float-labels", ["float", "gt"], 1, ["float32", "float.zarr"]),
    ("out-of-range", ["pred", "big", "-n", "4"], 1, ["9", "(3, 4, 5)", "gt"]),
    ("negative-label", ["neg", "gt"], 1, ["-4", "pred"]),
    ("corrupted-chunk", ["corrupt", "gt"], 1, ["corrupt.zarr", "corrupted"]),
    ("empty-maybe", ["pred", "gt", "--empty", "maybe"], 2, ["--empty", "maybe"]),
    ("format-xml", ["pred", "gt", "--format", "xml"], 2, ["--format", "xml"]),
    ("unknown-metric", ["pred", "gt", "--metrics", "dice,bogus"], 2, ["bogus"]),
    ("backend-gpu", ["pred", "gt", "--backend", "gpu"], 2, ["--backend", "gpu"]),
    ("labels-not-int", ["pred", "gt", "--labels", "0,x"], 2, ["--labels", "'x'"]),
    ("output-extension", ["pred", "gt", "-o", "report.xml"], 2, ["report.xml", "--format"]),
    ("missing-positional", ["pred"], 2, ["GT"]),
]


@pytest.mark.parametrize("case", BATTERY, ids=[c[0] for c in BATTERY])
def test_bad_input_battery(bad, case):
    _, args, code, words = case
    argv = [bad.get(a, a) for a in args]
    r = run_cli(*argv)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line
    assert lines[0].startswith("fastseg-eval: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == ""


def test_debug_shows_the_traceback(bad):
    r = run_cli(bad["small"], bad["gt"], "--debug")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "InputError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("fastseg-eval: error: ")


def test_version_and_help_are_cheap_and_succeed():
    from fastseg_eval import __version__

    r = run_cli("--version", module=True)
    assert r.returncode == 0 and r.stdout.strip() == f"fastseg-eval {__version__}"
    r = run_cli("--help")
    assert r.returncode == 0
    for opt in ("--num-classes", "--label-names", "--no-background", "--sweep", "--save-matrix", "--plot",
                "--storage-option", "--scheduler", "--progress", "demo"):  # fmt: skip
        assert opt in r.stdout, opt


# ---------------------------------------------------------------------------- in-process wiring
class _Captured(Exception):
    pass


def test_every_option_reaches_evaluate(monkeypatch, tmp_path):
    """Each command-line option arrives at evaluate() under its library name and value."""
    import fastseg_eval.api as api

    seen = {}

    def fake_evaluate(pred, gt, **kw):
        seen.update(kw, pred=pred, gt=gt)
        raise _Captured

    monkeypatch.setattr(api, "evaluate", fake_evaluate)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "liver", "2": "tumour"}))
    argv = [
        "p.zarr", "g.zarr", "-n", "5", "--ignore-label", "255", "--mask", "m.zarr", "--mask-key", "roi",
        "--pred-key", "labels/a", "--gt-key", "labels/b", "--level", "2", "--storage-option", "anon=true",
        "--storage-option", "client_kwargs={\"region_name\": \"x\"}", "--storage-option", "profile=dev",
        "--tversky-alpha", "0.3", "--tversky-beta", "0.7", "--smooth", "1e-5", "--empty", "zero",
        "--no-background", "--metrics", "f1,jaccard,tpr", "--backend", "cpu", "--workers", "3",
        "--scheduler", "tcp://127.0.0.1:8786", "--threshold", "0.4", "--channel-axis", "0", "--prob-scale", "255",
        "--sweep",
        "--label-names", str(names), "--no-progress", "--memory-limit", "8G", "--per-class-limit", "7",
        "--no-geometry-check", "--spacing", "0.8,0.8,3", "--surface", "monai", "--hd-percentile", "90",
        "--nsd-tolerance", "2", "--empty-distance", "300", "--instances", "--iou-threshold", "0.3",
        "--connectivity", "6",
    ]  # fmt: skip
    with pytest.raises(_Captured):
        cli.run(cli.build_parser().parse_args(argv))
    assert seen == {
        "pred": "p.zarr", "gt": "g.zarr", "num_classes": 5, "labels": None, "ignore_label": 255,
        "mask": "m.zarr", "threshold": 0.4, "channel_axis": 0, "thresholds": True, "prob_scale": 255.0,
        "tversky_alpha": 0.3, "tversky_beta": 0.7, "smooth": 1e-5, "empty": "zero", "backend": "cpu",
        "workers": 3, "scheduler": "tcp://127.0.0.1:8786", "progress": False,
        "metrics": ["dice", "iou", "recall"], "label_names": {1: "liver", 2: "tumour"},
        "background_label": None, "pred_key": "labels/a", "gt_key": "labels/b", "mask_key": "roi",
        "level": 2, "storage_options": {"anon": True, "client_kwargs": {"region_name": "x"}, "profile": "dev"},
        "memory_limit": "8G", "per_class_limit": 7, "geometry_check": False,
        "spacing": (0.8, 0.8, 3.0), "surface": "monai", "hd_percentile": 90.0, "nsd_tolerance": 2.0,
        "empty_distance": 300.0, "instances": True, "iou_threshold": 0.3, "connectivity": 6,
    }  # fmt: skip
    args = cli.build_parser().parse_args(["p", "g", "--labels", "0-2,7", "--sweep", "11", "--level", "s0",
                                          "--background-label", "3", "--label-names", "1=a b,2=c"])  # fmt: skip
    kw = cli.evaluate_kwargs(args, None)
    assert kw["labels"] == [0, 1, 2, 7] and kw["thresholds"] == 11 and kw["level"] == "s0"
    assert kw["background_label"] == 3 and kw["label_names"] == {1: "a b", 2: "c"}
    assert kw["storage_options"] is None and kw["metrics"] is None


def test_mask_ignore_and_no_background_in_process(tmp_path, pair, capsys):
    """--mask, --ignore-label and --no-background change the numbers exactly as the reference does."""
    pred, gt = pair
    gt = gt.copy()
    gt[:2] = 255  # ignored slab
    mask = (np.indices(SHAPE).sum(axis=0) % 3 != 0).astype(np.uint8)
    paths = [write(tmp_path / n, a) for n, a in (("p.zarr", pred), ("g.zarr", gt), ("m.zarr", mask))]
    out = tmp_path / "r.json"
    code = cli.main([paths[0], paths[1], "--mask", paths[2], "--ignore-label", "255", "--no-background",
                     "-o", str(out), "-q"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == ""  # -q with -o: nothing on stdout
    d = load_json(out.read_text())
    check_schema(d)
    cm = reference(pred, gt, range(K), mask=mask, ignore=255)
    np.testing.assert_array_equal(np.array(d["confusion_matrix"]), cm)
    # the mask applies first: ignored = inside the mask with the ignore label; masked = outside the mask
    assert d["n_ignored"] == int(((gt == 255) & (mask != 0)).sum()) > 0
    assert d["n_masked"] == int((mask == 0).sum()) > 0
    dice = ref_metrics(cm)["dice"]
    # without a background label the foreground mean is the mean over every class
    assert d["options"]["background_label"] is None
    assert d["foreground_mean"]["dice"] == pytest.approx(np.nanmean(dice), rel=1e-12)
    assert d["inputs"]["mask"]["source"] == paths[2]


def test_table_headline_follows_background(tmp_path, pair, capsys):
    pred, gt = pair
    p, g = write(tmp_path / "p.zarr", pred), write(tmp_path / "g.zarr", gt)
    dice = ref_metrics(reference(pred, gt, range(K)))["dice"]
    assert cli.main([p, g, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"mean over foreground: Dice {np.nanmean(dice[1:]):.4f}" in out
    assert cli.main([p, g, "--no-background", "--metrics", "dice,iou,mcc"]) == 0
    out = capsys.readouterr().out
    assert f"mean over all labels: Dice {np.nanmean(dice):.4f}" in out
    head = next(line for line in out.splitlines() if line.startswith("label"))
    assert head.split() == ["label", "support", "dice", "iou", "mcc"]
    assert "fg mean" not in out


def test_colour_only_on_a_terminal(tmp_path, pair, capsys, monkeypatch):
    pred, gt = pair
    p, g = write(tmp_path / "p.zarr", pred), write(tmp_path / "g.zarr", gt)
    monkeypatch.setattr(cli, "_stdout_is_tty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert cli.use_color()
    assert cli.main([p, g, "--no-progress"]) == 0
    assert "\033[1m" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli.use_color()
    assert cli.main([p, g, "--no-progress"]) == 0
    assert "\033[" not in capsys.readouterr().out


def test_error_mapping(monkeypatch, capsys, tmp_path):
    """OptionError -> 2, other FastSegError -> 1, unexpected -> 1 with a --debug hint, ^C -> 130."""
    import fastseg_eval.api as api
    from fastseg_eval.errors import BackendError, LabelError, OptionError

    cases = [
        (OptionError("threshold= needs a probability map"), 2, "threshold= needs a probability map"),
        (BackendError("no GPU here"), 1, "no GPU here"),
        (LabelError("gt has label 7", role="gt", value=7, position=(0, 0, 0)), 1, "gt has label 7"),
        (ZeroDivisionError("division by zero"), 1, "rerun with --debug"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]
    for exc, code, text in cases:

        def boom(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(api, "evaluate", boom)
        assert cli.main(["p.zarr", "g.zarr", "--no-progress"]) == code
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err
    assert cli.main(["p.zarr", "g.zarr", "--no-progress", "--debug"]) == 130
    assert "Traceback" in capsys.readouterr().err
    # output directories are checked before the (possibly long) run
    assert cli.main(["p.zarr", "g.zarr", "-o", str(tmp_path / "no" / "such" / "r.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_plot_option_and_missing_matplotlib(tmp_path, pair, capsys, monkeypatch):
    pred, gt = pair
    p, g = write(tmp_path / "p.zarr", pred), write(tmp_path / "g.zarr", gt)
    png = tmp_path / "fig.png"
    assert cli.main([p, g, "--plot", str(png), "-q"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None)
    assert cli.main([p, g, "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "fastseg-eval[plot]" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_save_matrix_without_full_matrix_fails_clearly(tmp_path, capsys):
    """Diagonal + marginals mode (labels beyond the dense limit): no matrix file, exit 1, report kept."""
    from fastseg_eval.reducers.confusion import DENSE_MAX

    n = DENSE_MAX + 8
    gt = np.arange(n, dtype=np.uint16).reshape(1, 1, n) * 3
    pred = gt.copy()
    pred[0, 0, :5] = 0
    p, g = (
        write(tmp_path / "p.zarr", pred, chunks=(1, 1, 256)),
        write(tmp_path / "g.zarr", gt, chunks=(1, 1, 256)),
    )
    out = tmp_path / "r.csv"
    code = cli.main([p, g, "-o", str(out), "-q", "--save-matrix", str(tmp_path / "m.npy")])
    err = capsys.readouterr().err
    assert code == 1 and "no full matrix" in err
    assert not (tmp_path / "m.npy").exists()
    assert len(out.read_text().splitlines()) == 1 + n + 4  # the report itself was written (with the means)


def test_parse_helpers():
    assert cli._label_list("0, 1,2") == [0, 1, 2]
    assert cli._label_list("3-5,9") == [3, 4, 5, 9]
    assert cli._label_names("1=liver, 2 = tumour") == {1: "liver", 2: "tumour"}
    assert cli._storage_option("anon=true") == ("anon", True)
    assert cli._storage_option("token=abc") == ("token", "abc")
    assert cli._storage_option("n=3") == ("n", 3)
    for bad_value, fn in (("1-", cli._label_list), ("5-3", cli._label_list), ("liver", cli._label_names),
                          ("x=liver", cli._label_names), ("=3", cli._storage_option)):  # fmt: skip
        with pytest.raises(Exception, match=r"."):
            fn(bad_value)


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_json_pipes_into_jq(stores):
    cmd = shlex.join(_command() + [stores["pred_v3"], stores["gt_v3"], "--format", "json", "--progress"])
    r = subprocess.run(f"{cmd} | jq -e '.per_class[\"1\"].tp'", shell=True, capture_output=True, text=True,
                       env={**os.environ, cli.PROGRESS_DELAY_ENV: "0"}, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0
