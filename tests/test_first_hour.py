"""A first hour with the tool (issue 11, items 3-10): warnings that are true, errors that name
the flags a command-line user typed, label names from the files people have, one key type.

Library users see Python spellings (``num_classes=2``), command-line users see flags
(``--num-classes 2``); every count is checked against numpy where it matters.
"""

from __future__ import annotations

import csv
import io
import json
import pickle

import numpy as np
import pytest
import zarr

import fastseg_eval as fse
from fastseg_eval import cli
from fastseg_eval.errors import InputError, LabelError, OptionError


def write(path, a, chunks=None) -> str:
    z = zarr.open_array(str(path), mode="w", shape=a.shape, dtype=a.dtype, chunks=chunks or a.shape)
    z[...] = a
    return str(path)


def cli_error(capsys, *argv) -> tuple[int, str]:
    code = cli.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture
def prob_pair():
    rng = np.random.default_rng(3)
    p = rng.random((6, 7, 8)).astype(np.float32)
    gt = (p + rng.normal(0, 0.2, p.shape) > 0.5).astype(np.uint8)
    return p, gt


# ---------------------------------------------------------------------- 3. ignore label warning
def test_ignore_label_inside_the_label_range_warns_only_when_predicted():
    gt = np.array([[0, 1, 1], [2, 2, 1]], dtype=np.uint8)
    pred = np.array([[1, 1, 1], [2, 2, 1]], dtype=np.uint8)
    res = fse.evaluate(pred, gt, num_classes=3, ignore_label=0)
    assert res.n_ignored == 1
    assert not [w for w in res.warnings if "ignore label" in w or "(0)" in w], res.warnings
    # where the prediction does hold it, the warning says how often
    pred2 = pred.copy()
    pred2[1, 0] = 0
    res = fse.evaluate(pred2, gt, num_classes=3, ignore_label=0)
    assert any("holds the ignore label 0 in 1 counted voxels" in w for w in res.warnings), res.warnings


# ---------------------------------------------------------------------- 4. flags in CLI errors
def test_label_errors_name_python_parameters_in_the_library_and_flags_on_the_command_line(tmp_path, capsys):
    gt = np.zeros((2, 3, 4), dtype=np.uint8)
    gt[0, 0, 0] = 255
    p, g = write(tmp_path / "p.zarr", np.zeros_like(gt)), write(tmp_path / "g.zarr", gt)
    with pytest.raises(LabelError) as e:
        fse.evaluate(p, g, num_classes=2)
    msg = str(e.value)
    assert "num_classes=2 allows 0..1; raise num_classes" in msg and "ignore_label=255" in msg
    assert "\x02" not in repr(e.value) and "\x02" not in str(pickle.loads(pickle.dumps(e.value)))
    code, err = cli_error(capsys, p, g, "-n", "2")
    assert code == 1
    assert "--num-classes 2 allows 0..1; raise --num-classes" in err and "--ignore-label 255" in err
    assert "num_classes" not in err and "ignore_label" not in err


def test_options_are_spelled_for_their_reader():
    from fastseg_eval.errors import Message, option, spell

    text = f"{option('num_classes', 3)}, {option('threshold', '')}, {option('thresholds')}, {option('dense_max', 4)}"
    assert spell(text) == "num_classes=3, threshold=, thresholds, dense_max=4"
    assert (
        spell(text, cli.option_flag) == "--num-classes 3, --threshold, --sweep, dense_max=4"
    )  # no flag: Python
    assert str(OptionError(text)) == spell(text) and OptionError(text).spell(cli.option_flag) == spell(
        text, cli.option_flag
    )
    m = Message(text)
    assert m == spell(text) and pickle.loads(pickle.dumps(m)).spell(cli.option_flag).startswith(
        "--num-classes"
    )
    assert json.dumps([m]) == json.dumps([spell(text)])
    # every parameter the command line sets has its flag
    for name in cli.evaluate_kwargs(cli.build_parser().parse_args(["p", "g"]), None):
        assert (cli.option_flag(name) or "").startswith("--"), name


def test_probability_option_errors_name_flags(tmp_path, capsys, prob_pair):
    p, gt = prob_pair
    fp, g = write(tmp_path / "p.zarr", p), write(tmp_path / "g.zarr", gt)
    u8 = write(tmp_path / "u8.zarr", (p * 255).astype(np.uint8))
    code, err = cli_error(capsys, fp, g)  # a float map without --threshold
    assert code == 1 and "--threshold" in err and "--channel-axis" in err and "threshold=" not in err
    code, err = cli_error(capsys, u8, g, "--threshold", "0.5")
    assert code == 2 and "pass --prob-scale" in err and "prob_scale" not in err
    code, err = cli_error(capsys, fp, g, "--sweep", str(2**21))
    assert code == 2 and "--sweep must be" in err and "thresholds" not in err
    code, err = cli_error(capsys, fp, g, "--threshold", "0.5", "-n", "3")
    assert code == 2 and "--num-classes 3" in err and "num_classes" not in err
    code, err = cli_error(capsys, fp, g, "--prob-scale", "0")
    assert code == 2 and "--prob-scale must be" in err
    with pytest.raises(OptionError, match="prob_scale must be"):
        fse.evaluate(p, gt, prob_scale=0)
    lab = write(tmp_path / "lab.zarr", gt)
    code, err = cli_error(capsys, lab, g, "-n", "3", "--labels", "0,1")
    assert code == 2 and "--num-classes 3" in err and "--labels" in err and "num_classes" not in err


def test_a_probability_map_with_channels_but_no_channel_axis_is_pointed_at_the_option(
    tmp_path, capsys, prob_pair
):
    p, gt = prob_pair
    p4 = np.stack([1 - p, p])
    with pytest.raises(InputError, match=r"channel_axis=0") as e:
        fse.evaluate(p4, gt)
    assert "order" not in str(e.value)
    code, err = cli_error(capsys, write(tmp_path / "p4.zarr", p4), write(tmp_path / "g.zarr", gt))
    assert code == 1 and "--channel-axis 0" in err and "PRED GT" not in err
    # the same map with its channels last
    with pytest.raises(InputError, match=r"channel_axis=3"):
        fse.evaluate(np.moveaxis(p4, 0, -1), gt)
    # PRED and GT swapped still points at the order
    with pytest.raises(InputError, match=r"order PRED GT"):
        fse.evaluate(gt, p4)


# ---------------------------------------------------------------------- 5. prob_scale on float maps
def test_prob_scale_on_a_float_map_already_in_0_1_is_refused(tmp_path, capsys, prob_pair):
    p, gt = prob_pair
    with pytest.raises(OptionError, match=r"prob_scale=255.*already.*\[0, 1\]"):
        fse.evaluate(p, gt, prob_scale=255)
    with pytest.raises(OptionError, match="prob_scale"):
        fse.evaluate(np.stack([1 - p, p]), gt, channel_axis=0, prob_scale=255, workers=2)
    code, err = cli_error(capsys, write(tmp_path / "p.zarr", p, chunks=(3, 7, 8)),
                          write(tmp_path / "g.zarr", gt), "--prob-scale", "255")  # fmt: skip
    assert code == 2 and "--prob-scale 255" in err and "prob_scale" not in err
    # a float map that really holds 0..255 is read as value / 255
    res = fse.evaluate(p * 255, gt, prob_scale=255, threshold=0.5)
    ref = fse.evaluate(p, gt, threshold=0.5)
    np.testing.assert_array_equal(res.confusion_matrix, ref.confusion_matrix)
    # an all-zero float map cannot tell: accepted
    fse.evaluate(np.zeros_like(p), gt, prob_scale=255)


def test_out_of_range_scaled_value_shows_raw_and_scaled_values(prob_pair):
    p, gt = prob_pair
    u8 = (p * 100).astype(np.uint8)
    u8[2, 3, 4] = 168
    with pytest.raises(LabelError) as e:
        fse.evaluate(u8, gt, prob_scale=100)
    msg = str(e.value)
    assert "168" in msg and "1.68" in msg and "prob_scale=100" in msg and "(2, 3, 4)" in msg
    assert "probability 168" not in msg


# ---------------------------------------------------------------------- 6. label names files
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"1": "liver", "2": "tumour"}, {1: "liver", 2: "tumour"}),
        (["background", "liver"], {0: "background", 1: "liver"}),
        ({"liver": 1, "tumour": 2}, {1: "liver", 2: "tumour"}),  # name -> label
        (  # nnU-Net v2 dataset.json, with regions
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "edema": 1, "whole tumor": [1, 2, 3], "enhancing": [3]},
                "numTraining": 10,
                "file_ending": ".nii.gz",
            },
            {0: "background", 1: "edema", 3: "enhancing"},
        ),
        (  # Medical Segmentation Decathlon dataset.json
            {
                "name": "Liver",
                "labels": {"0": "background", "1": "liver", "2": "cancer"},
                "modality": {"0": "CT"},
            },
            {0: "background", 1: "liver", 2: "cancer"},
        ),
    ],
)
def test_label_names_from_the_json_files_people_have(tmp_path, content, expected):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(content))
    assert cli._label_names(str(path)) == expected
    args = cli.build_parser().parse_args(["p", "g", "--label-names", str(path)])
    assert args.label_names == expected


def test_label_names_file_that_cannot_be_read_as_names_fails_clearly(tmp_path, capsys):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"1": 2}))
    with pytest.raises(Exception, match="names.json"):
        cli._label_names(str(path))
    assert cli.main(["p", "g", "--label-names", str(path)]) == 2
    assert "--label-names" in capsys.readouterr().err


# ---------------------------------------------------------------------- 7. one key type
def test_per_class_and_curves_share_int_keys_and_accept_the_json_spelling(prob_pair):
    p, gt = prob_pair
    res = fse.evaluate(p, gt, thresholds=10)
    assert list(res.per_class) == [0, 1] and list(res.curves) == [1]
    assert res.curves[1] is res.curves["1"] and res.per_class["1"] == res.per_class[1]
    assert res.curves[np.int64(1)] is res.curves[1]
    assert "1" in res.curves and 1 in res.curves and "0" not in res.curves
    assert res.per_class.get("0") == res.per_class[0] and res.curves.get("7") is None
    assert "1" in res.per_class and np.int64(0) in res.per_class and "2" not in res.per_class
    with pytest.raises(KeyError, match="label 7"):
        res.curves[7]
    with pytest.raises(KeyError, match="liver"):
        res.per_class["liver"]
    d = json.loads(res.to_json())
    assert list(d["curves"]) == ["1"] and list(d["per_class"]) == ["0", "1"]
    assert pickle.loads(pickle.dumps(res.curves))["1"] == res.curves[1]
    # a result built by hand with JSON keys reads the same way
    res2 = fse.EvaluationResult(**{**res.__dict__, "per_class": d["per_class"], "curves": d["curves"]})
    assert list(res2.per_class) == [0, 1] and res2.curves[1]["roc_auc"] == res.curves[1]["roc_auc"]


# ---------------------------------------------------------------------- 8. CSV means
def test_csv_has_rows_for_the_means_the_table_shows():
    gt = np.array([0, 0, 1, 1, 2, 2, 2], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1, 2, 0, 2], dtype=np.uint8)
    res = fse.evaluate(pred, gt, label_names={1: "liver"})
    rows = list(csv.DictReader(io.StringIO(res.to_csv())))
    assert [r["label"] for r in rows] == ["0", "1", "2", "mean", "foreground_mean", "micro", "weighted"]
    assert rows[1]["name"] == "liver"
    for r, d in zip(rows[3:], (res.mean, res.foreground_mean, res.micro, res.weighted)):
        assert r["tp"] == "" and r["support"] == ""
        for m in res.metrics:
            assert float(r[m]) == pytest.approx(d[m], rel=1e-12) if r[m] else np.isnan(d[m])
    table = res.to_table()
    for title in ("mean", "fg mean", "fg micro", "weighted"):
        assert title in table
    assert [r["name"] for r in rows[3:]] == ["mean", "fg mean", "fg micro", "weighted"]


# ---------------------------------------------------------------------- 9. --sweep before PRED GT
def test_sweep_before_the_positionals_does_not_swallow_pred():
    parse = cli.build_parser().parse_args
    args = parse(["--sweep", "prob.zarr", "gt.zarr", "--threshold", "0.3"])
    assert (args.pred, args.gt, args.sweep, args.threshold) == ("prob.zarr", "gt.zarr", True, 0.3)
    args = parse(["--swe", "prob.zarr", "gt.zarr"])
    assert (args.pred, args.gt, args.sweep) == ("prob.zarr", "gt.zarr", True)
    args = parse(["--sweep", "20", "prob.zarr", "gt.zarr"])
    assert (args.pred, args.gt, args.sweep) == ("prob.zarr", "gt.zarr", 20)
    args = parse(["prob.zarr", "gt.zarr", "--sweep"])
    assert args.sweep is True
    args = parse(["--sweep", "--", "prob.zarr", "gt.zarr"])
    assert (args.pred, args.gt, args.sweep) == ("prob.zarr", "gt.zarr", True)
    for bad in (["--sweep", "0", "p", "g"], ["--sweep", "1.5", "p", "g"]):
        with pytest.raises(cli.UsageError, match="--sweep"):
            parse(bad)


# ---------------------------------------------------------------------- 10. void values in gt
@pytest.mark.parametrize(
    ("dtype", "void"), [(np.uint8, 255), (np.uint16, 65535), (np.int8, 127), (np.uint16, 255)]
)
def test_a_gt_only_void_value_suggests_the_ignore_label(tmp_path, capsys, dtype, void):
    gt = np.array([[0, 1, 1], [void, void, 1]], dtype=dtype).reshape(1, 2, 3)
    pred = np.array([[0, 1, 1], [0, 1, 1]], dtype=dtype).reshape(1, 2, 3)
    res = fse.evaluate(pred, gt)
    hint = [w for w in res.warnings if f"label {void} is in the ground truth" in w]
    assert len(hint) == 1 and f"ignore_label={void}" in hint[0], res.warnings
    code = cli.main([write(tmp_path / "p.zarr", pred), write(tmp_path / "g.zarr", gt), "--format", "json",
                     "--no-progress"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert any(f"--ignore-label {void}" in w for w in out["warnings"]), out["warnings"]
    assert not any("ignore_label" in w for w in out["warnings"])


def test_an_ordinary_gt_only_label_gets_no_void_hint():
    gt = np.array([0, 1, 7, 7], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1], dtype=np.uint8)
    res = fse.evaluate(pred, gt)
    assert any("label 7 is in the ground truth" in w for w in res.warnings)
    assert not any("ignore" in w for w in res.warnings)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64], ids=["uint8", "uint64 ids past 2**63"])
def test_class_imbalance_and_single_label_notes(dtype):
    """The class-imbalance note names the background's share when accuracy hides a poor
    foreground; a volume with one label says so. Labels are an array (65 536 ids need no list
    of Python ints); large uint64 ids and a background label absent from the labels work too."""
    big = 2**63 + 5 if dtype == np.uint64 else 7
    gt = np.zeros((10, 10, 10), dtype=dtype)
    pred = gt.copy()
    gt[0, 0, :6] = big  # 6 foreground voxels, 2 of them found
    pred[0, 0, :2] = big
    pred[0, 1, :2] = big
    res = fse.evaluate(pred, gt)
    notes = [w for w in res.warnings if w.startswith("class imbalance")]
    assert len(notes) == 1, res.warnings
    share = 100 * np.count_nonzero(gt == 0) / gt.size
    assert f"dominated by label 0 ({share:.0f}% of voxels)" in notes[0]
    assert "mean foreground IoU is 0.250" in notes[0], notes[0]  # TP 2, FP 2, FN 4
    assert not [w for w in fse.evaluate(pred, gt, background_label=None).warnings if "imbalance" in w]
    assert not [w for w in fse.evaluate(pred, gt, background_label=3).warnings if "imbalance" in w]
    one = fse.evaluate(np.full((4, 4, 4), big, dtype=dtype), np.full((4, 4, 4), big, dtype=dtype))
    assert f"only one label ({big}) occurs: per-class metrics are trivial" in one.warnings
    assert not [w for w in res.warnings if "only one label" in w]
