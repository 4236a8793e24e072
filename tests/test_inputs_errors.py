"""Bad input raises one clear fastseg_eval error (InputError / LabelError / OptionError) naming the
input and the value; label errors carry the voxel position in the full volume, also for chunked inputs."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import write_zarr

import fastseg_eval as fse
from fastseg_eval.errors import FastSegError, InputError, LabelError, OptionError

A = np.zeros((3, 4), dtype=np.uint8)


def raises(exc, *patterns):
    """Context manager: ``exc`` (a FastSegError) whose message matches every regex in ``patterns``."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            ok = self.ctx.__exit__(*a)
            assert isinstance(self.info.value, FastSegError)
            msg = str(self.info.value)
            for p in patterns:
                assert re.search(p, msg), f"{p!r} not in message: {msg}"
            return ok

    return _Ctx()


# ------------------------------------------------------------------------------- shapes, dtypes
def test_shape_mismatch_names_both_roles_and_shapes():
    with raises(InputError, r"prediction shape \(3, 4\)", r"ground-truth shape \(4, 3\)"):
        fse.evaluate(A, np.zeros((4, 3), dtype=np.uint8))
    with raises(InputError, r"prediction shape \(3, 4\)", r"ground-truth shape \(3, 4, 1\)"):
        fse.confusion_matrix(A, np.zeros((3, 4, 1), dtype=np.uint8))
    with raises(InputError, r"prediction shape"):
        fse.ConfusionMatrix().update(A, np.zeros(12, dtype=np.uint8))


def test_mask_shape_and_dtype():
    with raises(InputError, r"mask shape \(3, 3\)", r"\(3, 4\)"):
        fse.evaluate(A, A, mask=np.ones((3, 3), dtype=bool))
    with raises(InputError, r"mask", r"float64", r"bool or integer"):
        fse.evaluate(A, A, mask=np.ones((3, 4)))


@pytest.mark.parametrize("role", ["pred", "gt"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_labels(role, dtype):
    f = A.astype(dtype)
    args = (f, A) if role == "pred" else (A, f)
    with raises(InputError, rf"\b{role}\b", dtype, r"integers or bool"):
        fse.evaluate(*args)
    with raises(InputError, rf"\b{role}\b", dtype):
        fse.confusion_matrix(*args, num_classes=2)
    with raises(InputError, rf"\b{role}\b", dtype):
        fse.ConfusionMatrix(2).update(*args)


def test_float_prediction_hints_at_probability_options():
    with raises(InputError, r"threshold="):
        fse.evaluate(A.astype(np.float32), A)


def test_non_numeric_and_ragged_inputs():
    with raises(InputError, r"\bgt\b", r"<U1"):
        fse.evaluate(A, np.zeros((3, 4), dtype="U1"))
    with raises(InputError, r"\bgt\b", r"list"):
        fse.evaluate(A, [[1, 2], [3]])


# ----------------------------------------------------------------------------- label values
@pytest.mark.parametrize("role", ["pred", "gt"])
@pytest.mark.parametrize("space", [{}, {"num_classes": 3}, {"labels": [2, 0, 1]}])
def test_negative_label(role, space):
    good = np.zeros((2, 3, 4), dtype=np.int16)
    bad = good.copy()
    bad[1, 2, 3] = -4
    args = (bad, good) if role == "pred" else (good, bad)
    for call in (fse.evaluate, fse.confusion_matrix):
        with raises(LabelError, rf"^{role} has label -4 at voxel \(1, 2, 3\)", "negative") as ei:
            call(*args, **space)
        assert (ei.value.role, ei.value.value, ei.value.position) == (role, -4, (1, 2, 3))
    if role == "gt":  # the message offers the way out
        with raises(LabelError, r"ignore_label=-4"):
            fse.evaluate(*args, **space)
        assert fse.evaluate(*args, ignore_label=-4, **space).n_ignored == 1


@pytest.mark.parametrize("role", ["pred", "gt"])
def test_out_of_range_label(role):
    good = np.zeros((4, 5), dtype=np.uint8)
    bad = good.copy()
    bad[3, 1] = 200
    args = (bad, good) if role == "pred" else (good, bad)
    with raises(LabelError, rf"^{role} has label 200 at voxel \(3, 1\)", r"num_classes=3", r"0\.\.2") as ei:
        fse.evaluate(*args, num_classes=3)
    assert (ei.value.role, ei.value.value, ei.value.position) == (role, 200, (3, 1))
    with raises(LabelError, rf"{role} has label 200 at voxel \(3, 1\)"):
        fse.ConfusionMatrix(3).update(*args)


def test_label_not_in_labels():
    gt = np.array([0, 1, 5, 1], dtype=np.uint32)
    with raises(LabelError, r"^gt has label 5 at voxel \(2,\)", r"not among the given labels") as ei:
        fse.evaluate(np.zeros(4, dtype=np.uint32), gt, labels=[1, 0])
    assert ei.value.value == 5
    with raises(LabelError, r"^pred has label 70000 at voxel \(1,\)", r"not among"):
        fse.evaluate(np.array([0, 70000, 1, 1], dtype=np.uint32), np.zeros(4, dtype=np.uint32), labels=[1, 0])


def test_uint64_value_reported_exactly():
    bad = np.zeros(5, dtype=np.uint64)
    bad[4] = 2**64 - 1
    with raises(LabelError, rf"pred has label {2**64 - 1} at voxel \(4,\)") as ei:
        fse.evaluate(bad, np.zeros(5, dtype=np.uint64), num_classes=2)
    assert ei.value.value == 2**64 - 1


def test_label_error_position_in_4d():
    good = np.zeros((2, 3, 4, 5), dtype=np.int8)
    bad = good.copy()
    bad[1, 2, 0, 3] = 9
    with raises(LabelError, r"gt has label 9 at voxel \(1, 2, 0, 3\)") as ei:
        fse.evaluate(good, bad, num_classes=4)
    assert ei.value.position == (1, 2, 0, 3)


SHAPE = (20, 13, 14)
BAD_AT = (17, 11, 9)


def _chunked_inputs(tmp_path, source, role):
    """pred / gt / mask with a single bad voxel at BAD_AT, on misaligned zarr or dask chunk grids."""
    good = np.zeros(SHAPE, dtype=np.uint16)
    bad = good.copy()
    bad[BAD_AT] = 77
    pred, gt = (bad, good) if role == "pred" else (good, bad)
    mask = np.ones(SHAPE, dtype=bool)
    if source.startswith("zarr"):
        fmt = int(source[-1])
        write_zarr(tmp_path / "pred.zarr", pred, (5, 7, 3), zarr_format=fmt)
        g = write_zarr(tmp_path / "gt.zarr", gt, (4, 4, 4), zarr_format=fmt)
        m = write_zarr(tmp_path / "mask.zarr", mask, (6, 13, 5), zarr_format=fmt)
        return str(tmp_path / "pred.zarr"), g, m  # a path, an array object and an array
    return da.from_array(pred, chunks=(5, 7, 3)), da.from_array(gt, chunks=(4, 4, 4)), mask


@pytest.mark.parametrize("role", ["pred", "gt"])
@pytest.mark.parametrize("source", ["zarr-v2", "zarr-v3", "dask"])
@pytest.mark.parametrize("workers", [1, 3])
def test_label_error_position_in_full_chunked_volume(tmp_path, role, source, workers):
    pred, gt, mask = _chunked_inputs(tmp_path, source, role)
    with raises(LabelError, rf"^{role} has label 77 at voxel \(17, 11, 9\)", r"num_classes=2") as ei:
        fse.evaluate(pred, gt, num_classes=2, mask=mask, workers=workers)
    assert ei.value.position == BAD_AT and ei.value.role == role and ei.value.value == 77
    with raises(LabelError, r"at voxel \(17, 11, 9\)"):
        fse.confusion_matrix(pred, gt, labels=[0, 1], workers=workers)


# ---------------------------------------------------------------------------------- paths
def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "pred.zarr"
    with raises(InputError, r"^pred", r"no such file or directory", re.escape(str(missing))):
        fse.evaluate(str(missing), A)
    with raises(InputError, r"^gt", r"no such file"):
        fse.confusion_matrix(A, missing)  # a Path object works like a string
    with raises(InputError, r"^mask", r"no such file"):
        fse.evaluate(A, A, mask=str(missing))


def test_directory_that_is_not_zarr(tmp_path):
    d = tmp_path / "plain_dir"
    d.mkdir()
    (d / "readme.txt").write_text("not zarr")
    with raises(InputError, r"^gt", re.escape(str(d)), r"not a zarr array or group"):
        fse.evaluate(A, str(d))
    f = tmp_path / "file.raw"  # .npy, .nii.gz, .tif, ... are read by their own readers (io.formats)
    f.write_bytes(A.tobytes())
    with raises(InputError, r"^pred", r"is a file, not a zarr store", r"\.nii\.gz"):
        fse.evaluate(str(f), A)


def test_group_with_several_arrays_or_none(tmp_path, zarr_format):
    g = zarr.open_group(str(tmp_path / "two.zarr"), mode="w", zarr_format=zarr_format)
    g.create_array("seg", shape=A.shape, dtype="u1")
    g.create_array("raw", shape=A.shape, dtype="u1")
    with raises(InputError, r"^pred", r"2 arrays", r"raw, seg", r"two\.zarr/raw"):
        fse.evaluate(str(tmp_path / "two.zarr"), A)
    # addressing one of them works
    assert fse.evaluate(str(tmp_path / "two.zarr/seg"), A).n_voxels == A.size
    e = zarr.open_group(str(tmp_path / "none.zarr"), mode="w", zarr_format=zarr_format)
    e.create_group("sub")
    with raises(InputError, r"^gt", r"no array", r"sub"):
        fse.evaluate(A, str(tmp_path / "none.zarr"))
    with raises(InputError, r"^gt", r"'missing'", r"not a zarr array"):
        fse.evaluate(A, str(tmp_path / "two.zarr"), gt_key="missing")


def test_paths_are_opened_read_only(tmp_path):
    p = write_zarr(tmp_path / "p.zarr", np.ones((4, 4), dtype=np.uint8), (2, 2))
    del p
    before = sorted(x.name for x in (tmp_path / "p.zarr").rglob("*"))
    fse.evaluate(str(tmp_path / "p.zarr"), np.ones((4, 4), dtype=np.uint8))
    assert sorted(x.name for x in (tmp_path / "p.zarr").rglob("*")) == before


# -------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs,patterns",
    [
        ({"metrics": ["dize"]}, [r"unknown metric 'dize'", r"dice"]),
        ({"empty": "maybe"}, [r"empty='maybe'", r"nan, zero, one"]),
        ({"backend": "gpu"}, [r"backend='gpu'", r"auto, cpu, cuda"]),
        ({"num_classes": 0}, [r"num_classes must be a positive integer, got 0"]),
        ({"num_classes": -2}, [r"num_classes", r"-2"]),
        ({"num_classes": 2.5}, [r"num_classes", r"2\.5"]),
        ({"num_classes": True}, [r"num_classes", r"True"]),
        ({"num_classes": "3"}, [r"num_classes", r"'3'"]),
        ({"labels": [0, 3, 3]}, [r"labels must be unique, 3 appears twice"]),
        ({"labels": []}, [r"labels is empty"]),
        ({"labels": [-1, 0]}, [r"non-negative", r"-1"]),
        ({"labels": [0, 1.5]}, [r"integers", r"1\.5"]),
        ({"labels": [0, 1], "num_classes": 3}, [r"num_classes=3", r"2 labels"]),
        ({"labels": [0, 1], "ignore_label": 1}, [r"ignore_label 1", r"labels"]),
        ({"ignore_label": 1.5}, [r"ignore_label", r"1\.5"]),
        ({"workers": 0}, [r"workers", r"0"]),
        ({"tversky_alpha": -1}, [r"tversky_alpha", r"-1"]),
        ({"tversky_beta": float("nan")}, [r"tversky_beta", r"nan"]),
        ({"smooth": -0.5}, [r"smooth", r"-0\.5"]),
    ],
    ids=lambda x: "-".join(map(str, x)) if isinstance(x, dict) else None,
)
def test_bad_options(kwargs, patterns):
    with raises(OptionError, *patterns):
        fse.evaluate(A, A, **kwargs)


@pytest.mark.parametrize(
    "kwargs,patterns",
    [
        ({"backend": "tpu"}, [r"backend='tpu'"]),
        ({"num_classes": 0}, [r"num_classes", r"0"]),
        ({"labels": [2, 2]}, [r"unique", r"2"]),
        ({"num_classes": 5000}, [r"5000 x 5000", r"evaluate"]),
    ],
)
def test_bad_options_confusion_matrix(kwargs, patterns):
    with raises(OptionError, *patterns):
        fse.confusion_matrix(A, A, **kwargs)


def test_bad_options_accumulator():
    with raises(OptionError, r"num_classes", r"-1"):
        fse.ConfusionMatrix(-1)
    with raises(OptionError, r"unique"):
        fse.ConfusionMatrix(labels=[1, 1])
    acc = fse.ConfusionMatrix(2).update(A, A)
    with raises(OptionError, r"empty='none'"):
        acc.result(empty="none")
    with raises(OptionError, r"unknown metric 'recal'"):
        acc.result(metrics=["recal"])
