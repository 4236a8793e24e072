"""The people-facing outputs: the text table (80 columns) and the figures.

Numbers shown are checked against a numpy bincount reference of the same arrays; figure data is
read back from the matplotlib artists.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import fastseg_eval as fse
from fastseg_eval.demo import make_demo_pair, write_demo_pair
from fastseg_eval.errors import FastSegError
from fastseg_eval.report.table import SHORT_NAMES, format_table, headline


def bincount_cm(pred: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    """Rows = ground truth, columns = prediction."""
    return np.bincount(gt.astype(np.int64).ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)


def dice_iou(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


@pytest.fixture(scope="module")
def demo():
    pred, gt = make_demo_pair((40, 36, 32), 4, seed=5)
    return pred, gt


@pytest.fixture(scope="module")
def res(demo):
    pred, gt = demo
    return fse.evaluate(pred, gt, label_names={1: "liver", 2: "hepatocellular carcinoma (arterial phase)"})


def class_rows(text: str) -> list[str]:
    """The per-class lines: between the first two rules of dashes."""
    lines = text.splitlines()
    rules = [i for i, x in enumerate(lines) if x and set(x) == {"-"}]
    return [x for x in lines[rules[0] + 1 : rules[1]] if x[:1].isdigit()]  # not the "... more" note


def _scaled(res, factor: int):
    """The same result with supports multiplied (for width checks with huge counts)."""
    per_class = {lab: {**row, "support": row["support"] * factor} for lab, row in res.per_class.items()}
    return dataclasses.replace(res, per_class=per_class)


# ---------------------------------------------------------------------------- table
def test_table_numbers_match_the_reference(res, demo):
    pred, gt = demo
    cm = bincount_cm(pred, gt, 4)
    dice, iou = dice_iou(cm)
    text = format_table(res)
    rows = {line.split()[0]: line for line in class_rows(text)}
    assert sorted(rows) == ["0", "1", "2", "3"]
    for k in range(4):
        parts = rows[str(k)].split()
        assert f"{int(cm[k].sum()):,}" in parts  # support = gt row sum
        assert f"{dice[k]:.4f}" in parts and f"{iou[k]:.4f}" in parts
    assert f"Dice {np.nanmean(dice[1:]):.4f}" in headline(res)


def test_table_fits_80_columns_with_long_names_and_big_supports(res):
    for factor in (1, 10, 10**7):  # 4-5 digit, 6 digit and 11-13 digit supports
        text = format_table(_scaled(res, factor))
        lines = text.splitlines()
        body = [x for x in lines if not x.startswith(("prediction", "ground truth"))]
        assert max(len(x) for x in body) <= 80, max(body, key=len)
        long_row = next(x for x in lines if x.startswith("2 hepatocell"))
        assert ".." in long_row  # shortened, visibly
        assert f"{_scaled(res, factor).per_class[2]['support']:,}" in long_row  # never the count
    # every selected metric that fits becomes a column, in order; the rest are named in a note
    many = list(res.metrics)
    text = format_table(res, metrics=many)
    head = next(x for x in text.splitlines() if x.startswith("label")).split()[2:]
    assert head == [SHORT_NAMES[m] for m in many[: len(head)]] and 5 <= len(head) < len(many)
    assert all(m in text for m in many[len(head) :])
    assert max(len(x) for x in text.splitlines()[2:]) <= 80


def test_table_sections_in_order_and_warnings_last(res):
    warned = dataclasses.replace(res, warnings=["label 9 is absent " + "and long " * 12, "second"])
    text = format_table(warned)
    lines = text.splitlines()
    i_head = next(i for i, x in enumerate(lines) if x.startswith("label"))
    i_mean = next(i for i, x in enumerate(lines) if x.startswith("mean ("))
    i_fg = next(i for i, x in enumerate(lines) if x.startswith("fg mean ("))
    i_overall = next(i for i, x in enumerate(lines) if x.startswith("overall:"))
    assert lines[0].startswith("prediction   (PRED): ") and lines[1].startswith("ground truth (GT): ")
    assert i_head < i_mean < i_fg < i_overall
    i_warn = next(i for i, x in enumerate(lines) if x.startswith("warning: "))
    assert i_warn > i_overall
    tail = lines[i_warn:]
    assert all(x.startswith(("warning: ", "  ")) for x in tail)  # nothing after the warnings
    assert " ".join(tail).split() == " ".join(f"warning: {w}" for w in warned.warnings).split()
    assert len(tail) > 2  # the long one was wrapped
    assert max(len(x) for x in lines[i_warn:]) <= 80


def test_table_rows_capped_to_the_largest_classes():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 60, (30, 30, 30)).astype(np.uint16)
    gt[gt % 7 == 0] = 0  # label 0 is big, every multiple of 7 is absent from gt
    pred = np.where(rng.random(gt.shape) < 0.9, gt, 1).astype(np.uint16)
    r = fse.evaluate(pred, gt)
    text = format_table(r, max_rows=10)
    shown = [int(x.split()[0]) for x in class_rows(text)]
    size = {lab: row["support"] + row["predicted"] for lab, row in r.per_class.items()}
    assert len(shown) == 10 and shown == sorted(shown)
    assert min(size[lab] for lab in shown) >= max(size[lab] for lab in r.per_class if lab not in shown)
    assert f"{len(r.per_class) - 10} more labels not shown" in text
    assert len(class_rows(format_table(r, max_rows=0))) == len(r.per_class)
    # warnings are capped too (the JSON report keeps all of them)
    many = dataclasses.replace(r, warnings=[f"w{i}" for i in range(30)])
    t = format_table(many, max_warnings=5)
    assert t.count("warning: ") == 5 and "25 more warnings" in t


def test_headline_without_background(demo):
    pred, gt = demo
    r = fse.evaluate(pred, gt, background_label=None, metrics=["iou", "dice"])
    dice, iou = dice_iou(bincount_cm(pred, gt, 4))
    assert (
        headline(r)
        == f"mean over all labels: Dice {np.mean(dice):.4f}, IoU {np.mean(iou):.4f} (4 labels; background included)"
    )
    assert "fg mean" not in format_table(r)
    assert "micro" in format_table(r) and "fg micro" not in format_table(r)


def test_colour_codes_only_when_asked(res):
    warned = dataclasses.replace(res, warnings=["something to read"])
    assert "\033[" not in format_table(warned)
    coloured = format_table(warned, color=True)
    assert "\033[1m" in coloured and "\033[33mwarning" in coloured


# ---------------------------------------------------------------------------- demo data
def test_demo_pair_is_deterministic_and_interesting(tmp_path):
    import zarr

    a_pred, a_gt = make_demo_pair((32, 30, 28), 5, seed=7)
    b_pred, b_gt = make_demo_pair((32, 30, 28), 5, seed=7)
    np.testing.assert_array_equal(a_pred, b_pred)
    np.testing.assert_array_equal(a_gt, b_gt)
    assert a_gt.dtype == np.uint8 and a_gt.shape == (32, 30, 28)
    assert set(np.unique(a_gt).tolist()) == set(range(5))  # every label occurs
    cm = bincount_cm(a_pred, a_gt, 5)
    off = cm - np.diag(np.diag(cm))
    assert off[1:, 0].sum() > 0 and off[0, 1:].sum() > 0  # boundary errors both ways
    assert (off[1:, 1:] > 0).any()  # and one foreground-foreground confusion
    assert not np.array_equal(make_demo_pair((32, 30, 28), 5, seed=8)[1], a_gt)
    p, g = write_demo_pair(tmp_path, shape=(32, 30, 28), num_classes=5, seed=7, chunks=16)
    np.testing.assert_array_equal(zarr.open_array(p, mode="r")[...], a_pred)
    np.testing.assert_array_equal(zarr.open_array(g, mode="r")[...], a_gt)
    assert zarr.open_array(g, mode="r").chunks == (16, 16, 16)
    with pytest.raises(ValueError):
        make_demo_pair(8, 1)


# ---------------------------------------------------------------------------- figures
@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def test_figure_heatmap_is_row_normalised_and_bars_are_dice_iou(res, demo, mpl):
    from fastseg_eval.report.plot import make_figure

    pred, gt = demo
    cm = bincount_cm(pred, gt, 4)
    fig, note = make_figure(res)
    assert note is None
    ax_heat, ax_bars = fig.axes[:2]
    img = np.asarray(ax_heat.images[0].get_array())
    np.testing.assert_allclose(img, cm / cm.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(img.sum(axis=1), 1.0)
    assert ax_heat.get_ylabel() == "ground truth" and ax_heat.get_xlabel() == "prediction"
    assert [t.get_text() for t in ax_heat.get_yticklabels()][:2] == ["0", "1 liver"]
    dice, iou = dice_iou(cm)
    heights = [p.get_height() for p in ax_bars.patches]
    np.testing.assert_allclose(heights, np.concatenate([dice, iou]), rtol=1e-12)
    assert "ground truth:" in fig._suptitle.get_text() and "prediction:" in fig._suptitle.get_text()


def test_plot_file_and_many_labels(tmp_path, mpl):
    from fastseg_eval.report.plot import MAX_BARS, plot_result

    rng = np.random.default_rng(3)
    gt = rng.integers(0, 45, (20, 20, 20)).astype(np.uint16)
    pred = np.where(rng.random(gt.shape) < 0.8, gt, 0).astype(np.uint16)
    r = fse.evaluate(pred, gt)
    path = tmp_path / "many.png"
    note = plot_result(r, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert note is not None and f"{MAX_BARS} largest of 45" in note
    # diagonal + marginals mode: no matrix, bars of the largest classes only, and the figure says so
    sparse = dataclasses.replace(r, confusion_matrix=None)
    from fastseg_eval.report.plot import bar_classes, make_figure

    fig, note = make_figure(sparse, max_bars=10)
    assert len(fig.axes) == 1 and "no full confusion matrix" in note and "10 largest" in note
    support = {lab: row["support"] for lab, row in r.per_class.items()}
    chosen = bar_classes(sparse, 10)
    assert min(support[x] for x in chosen) >= max(support[x] for x in support if x not in chosen)
    labels_drawn = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels_drawn == [str(x) for x in chosen]
    assert "no full confusion matrix" in fig._suptitle.get_text()


def test_curves_figure_from_sweep_counts(tmp_path, mpl):
    """ROC / PR lines are the rates of the DESIGN.md curve counts (independent toy data)."""
    from fastseg_eval.report.plot import make_curves_figure, plot_curves

    rng = np.random.default_rng(4)
    prob = rng.random(5000)
    truth = rng.random(5000) < prob  # calibrated toy scores
    thr = np.linspace(0, 1, 11)
    tp = np.array([(truth & (prob >= t)).sum() for t in thr])
    fp = np.array([(~truth & (prob >= t)).sum() for t in thr])
    fn, tn = truth.sum() - tp, (~truth).sum() - fp
    curves = {"1": {"thresholds": thr.tolist(), "tp": tp.tolist(), "fp": fp.tolist(), "fn": fn.tolist(),
                    "tn": tn.tolist(), "roc_auc": 0.83, "average_precision": 0.8}}  # fmt: skip
    fig = make_curves_figure(curves)
    roc, pr = fig.axes[:2]
    x, y = roc.lines[0].get_data()
    np.testing.assert_allclose(x, fp / (fp + tn))
    np.testing.assert_allclose(y, tp / (tp + fn))
    x, y = pr.lines[0].get_data()
    np.testing.assert_allclose(x, tp / (tp + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(y, np.where(tp + fp > 0, tp / (tp + fp), np.nan))
    plot_curves(curves, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(FastSegError, match="--sweep"):
        make_curves_figure({})


def test_missing_matplotlib_is_a_clear_error(res, monkeypatch, mpl):
    from fastseg_eval.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(FastSegError, match=r"pip install 'fastseg-eval\[plot\]'"):
        plot.make_figure(res)
