"""File readers (io.formats): NIfTI, TIFF / OME-TIFF, .npy, HDF5, NRRD / MHA read exactly, by region,
with their geometry; and one clear line for a corrupt file, a missing reader, or a geometry mismatch."""

from __future__ import annotations

import builtins
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

import fastseg_eval as fse
from fastseg_eval.errors import InputError
from fastseg_eval.io.formats import case_id, file_format
from fastseg_eval.io.volume import open_volume

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")

SHAPE = (7, 9, 11)  # odd sizes: a wrong axis order cannot pass by symmetry


def _pair(dtype=np.uint8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, SHAPE).astype(dtype)
    pred = gt.copy()
    flip = rng.random(SHAPE) < 0.35
    pred[flip] = rng.integers(0, k, int(flip.sum())).astype(dtype)
    return pred, gt


def _cm(pred, gt, k):
    return np.bincount(gt.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(), minlength=k * k).reshape(k, k)


# writers: write(path, array) stores `array` so that the reader gives back `array` in the same axis order
def _nifti(path, a, affine=None):
    # NIfTI is x-fastest; the reader reverses the axes (SimpleITK / nnU-Net order): store a.T to read a
    nib.save(nib.Nifti1Image(np.asarray(a).T, np.eye(4) if affine is None else affine), str(path))


def _tiff(**kw):
    def write(path, a):
        tifffile.imwrite(str(path), a, **kw)

    return write


def _npy(path, a):
    np.save(str(path), a)


def _h5(chunked):
    def write(path, a):
        h5py = pytest.importorskip("h5py")
        with h5py.File(str(path), "w") as f:
            if chunked:
                f.create_dataset("seg", data=a, chunks=(3, 4, 5), compression="gzip")
            else:
                f.create_dataset("seg", data=a)

    return write


def _itk(path, a):
    sitk = pytest.importorskip("SimpleITK")
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path), True)


WRITERS = {
    "nii": (".nii", _nifti),
    "nii.gz": (".nii.gz", _nifti),
    "tif": (".tif", _tiff()),
    "tif-zlib": (".tif", _tiff(compression="zlib")),
    "tif-tiled": (".tif", _tiff(tile=(16, 16), compression="zlib")),
    "ome.tif": (".ome.tif", _tiff(metadata={"axes": "ZYX"})),
    "npy": (".npy", _npy),
    "h5": (".h5", _h5(False)),
    "h5-chunked": (".h5", _h5(True)),
    "nrrd": (".nrrd", _itk),
    "mha": (".mha", _itk),
}


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16])
def test_each_format_counts_exactly_and_reads_regions(tmp_path, name, dtype):
    suffix, write = WRITERS[name]
    if name == "ome.tif" and dtype == np.int16:
        pytest.skip("one dtype is enough for the OME flavour")
    pred, gt = _pair(dtype)
    p, g = tmp_path / f"pred{suffix}", tmp_path / f"gt{suffix}"
    write(p, pred)
    write(g, gt)
    res = fse.evaluate(str(p), str(g), num_classes=4, workers=2)
    assert np.array_equal(res.confusion_matrix, _cm(pred, gt, 4))
    v = open_volume(str(p), "pred")
    assert v.shape == SHAPE and v.dtype == np.dtype(dtype).newbyteorder("=")
    rng = np.random.default_rng(1)
    for _ in range(5):  # arbitrary regions, also across tiles and chunks: the same voxels, same order
        lo = [int(rng.integers(0, n)) for n in SHAPE]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, SHAPE)]
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        assert np.array_equal(v.read(region), pred[region])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".npy"])
def test_big_endian_files(tmp_path, suffix):
    pred, gt = _pair(np.dtype(">i2"))
    for name, a in (("p", pred), ("g", gt)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".npy":
            np.save(path, a)
        else:
            img = nib.Nifti1Image(a.T, np.eye(4))
            img.set_data_dtype(np.dtype(">i2"))
            nib.save(img, str(path))
    res = fse.evaluate(str(tmp_path / f"p{suffix}"), str(tmp_path / f"g{suffix}"), num_classes=4)
    assert np.array_equal(res.confusion_matrix, _cm(pred, gt, 4))


def test_nifti_geometry_is_read_in_array_axis_order(tmp_path):
    aff = np.array([[0, 0, 2.5, 10], [0, -0.8, 0, 20], [0.5, 0, 0, -30], [0, 0, 0, 1]], dtype=float)
    a = np.zeros((4, 5, 6), np.uint8)  # file axes (i, j, k)
    nib.save(nib.Nifti1Image(a, aff), str(tmp_path / "a.nii.gz"))
    v = open_volume(str(tmp_path / "a.nii.gz"), "gt")
    assert v.shape == (6, 5, 4)  # reversed: array axis 0 is the file's k
    assert v.spacing == pytest.approx((2.5, 0.8, 0.5))
    assert v.origin == pytest.approx((10, 20, -30))
    assert v.direction == (pytest.approx((1, 0, 0)), pytest.approx((0, -1, 0)), pytest.approx((0, 0, 1)))
    assert v.geometry_source == "NIfTI header"


def test_itk_and_tiff_and_hdf5_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8))  # array (z, y, x)
    img.SetSpacing((0.5, 0.7, 2.0))  # ITK order (x, y, z)
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    v = open_volume(str(tmp_path / "a.nrrd"), "gt")
    assert v.shape == (3, 4, 5) and v.spacing == pytest.approx((2.0, 0.7, 0.5))
    assert v.origin == pytest.approx((1, 2, 3))

    tifffile.imwrite(str(tmp_path / "a.tif"), np.zeros((3, 4, 5), np.uint8), imagej=True,
                     resolution=(1 / 0.25, 1 / 0.5), metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})  # fmt: skip
    v = open_volume(str(tmp_path / "a.tif"), "gt")
    assert v.spacing == pytest.approx((2.0, 0.5, 0.25))

    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("raw", data=np.zeros((3, 4, 5), np.uint8)).attrs["element_size_um"] = [4.0, 1.0, 1.0]
    v = open_volume(str(tmp_path / "a.h5"), "gt")
    assert v.spacing == (4.0, 1.0, 1.0) and v.source.endswith("a.h5::raw")


def test_geometry_mismatch_is_one_error_naming_both_and_can_be_bypassed(tmp_path):
    pred, gt = _pair()
    aff = np.eye(4)
    _nifti(tmp_path / "g.nii.gz", gt, aff)
    shifted = aff.copy()
    shifted[:3, 3] = [0, 0, 5]
    _nifti(tmp_path / "p.nii.gz", pred, shifted)
    scaled = np.diag([1, 1, 2.0, 1])
    _nifti(tmp_path / "s.nii.gz", pred, scaled)
    for name, what in (("p", "origin"), ("s", "spacing")):
        with pytest.raises(InputError) as ei:
            fse.evaluate(str(tmp_path / f"{name}.nii.gz"), str(tmp_path / "g.nii.gz"))
        msg = str(ei.value)
        assert what in msg and f"{name}.nii.gz" in msg and "g.nii.gz" in msg and "geometry_check=False" in msg
        res = fse.evaluate(str(tmp_path / f"{name}.nii.gz"), str(tmp_path / "g.nii.gz"), geometry_check=False)
        assert np.array_equal(res.confusion_matrix, _cm(pred, gt, 4))
    # float32 rounding of a header is not a mismatch
    near = aff.copy()
    near[:3, 3] = [1e-6, 0, 0]
    _nifti(tmp_path / "n.nii.gz", pred, near)
    fse.evaluate(str(tmp_path / "n.nii.gz"), str(tmp_path / "g.nii.gz"))


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastseg_eval", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


def test_cli_geometry_mismatch_exit_1_and_flag(tmp_path):
    pred, gt = _pair()
    _nifti(tmp_path / "g.nii.gz", gt)
    _nifti(tmp_path / "p.nii.gz", pred, np.diag([2.0, 1, 1, 1]))
    r = _cli(str(tmp_path / "p.nii.gz"), str(tmp_path / "g.nii.gz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "spacing" in r.stderr and "--no-geometry-check" in r.stderr
    r = _cli(str(tmp_path / "p.nii.gz"), str(tmp_path / "g.nii.gz"), "--no-geometry-check", "-q", "--format", "json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_gzip_nifti_names_the_file(tmp_path, how):
    pred, gt = _pair()
    _nifti(tmp_path / "g.nii.gz", gt)
    _nifti(tmp_path / "p.nii.gz", pred)
    raw = (tmp_path / "p.nii.gz").read_bytes()
    if how == "truncated":
        bad = raw[: len(raw) // 2]
    else:  # header intact, data stream damaged
        bad = raw[:200] + bytes(200) + raw[400:]
    (tmp_path / "p.nii.gz").write_bytes(bad)
    with pytest.raises(InputError) as ei:
        fse.evaluate(str(tmp_path / "p.nii.gz"), str(tmp_path / "g.nii.gz"))
    msg = str(ei.value)
    assert "p.nii.gz" in msg and msg.startswith("pred") and ("truncated" in msg or "corrupted" in msg)


def test_truncated_uncompressed_files(tmp_path):
    pred, gt = _pair()
    _nifti(tmp_path / "p.nii", pred)
    raw = (tmp_path / "p.nii").read_bytes()
    (tmp_path / "p.nii").write_bytes(raw[:-10])
    with pytest.raises(InputError, match=r"p\.nii is truncated.*copy it again"):
        fse.evaluate(str(tmp_path / "p.nii"), gt)
    np.save(tmp_path / "q.npy", pred)
    raw = (tmp_path / "q.npy").read_bytes()
    (tmp_path / "q.npy").write_bytes(raw[:-10])
    with pytest.raises(InputError, match=r"q\.npy"):
        fse.evaluate(str(tmp_path / "q.npy"), gt)


def test_nifti_with_scaling_is_refused(tmp_path):
    pred, gt = _pair()
    img = nib.Nifti1Image(pred.T.astype(np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, str(tmp_path / "p.nii.gz"))
    with pytest.raises(InputError, match=r"scl_slope 2\.0"):
        fse.evaluate(str(tmp_path / "p.nii.gz"), gt)


def test_hdf5_addressing(tmp_path):
    h5py = pytest.importorskip("h5py")
    pred, gt = _pair()
    with h5py.File(tmp_path / "both.h5", "w") as f:
        f.create_dataset("pred", data=pred)
        f.create_dataset("grp/gt", data=gt, chunks=(4, 4, 4), compression="gzip")
    both = str(tmp_path / "both.h5")
    with pytest.raises(InputError, match=r"2 datasets \(grp/gt, pred\).*both\.h5/grp/gt"):
        fse.evaluate(both, both)
    cm = _cm(pred, gt, 4)
    assert np.array_equal(fse.evaluate(f"{both}/pred", f"{both}/grp/gt", num_classes=4).confusion_matrix, cm)
    res = fse.evaluate(both, both, pred_key="pred", gt_key="grp", num_classes=4)  # a group with one dataset
    assert np.array_equal(res.confusion_matrix, cm)
    with pytest.raises(InputError, match=r"no dataset 'nope'"):
        fse.evaluate(both, both, pred_key="nope", gt_key="grp")


def test_missing_optional_reader_names_the_extra(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    pred, _ = _pair()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("seg", data=pred)
    real_import = builtins.__import__

    def no_h5py(name, *a, **kw):
        if name == "h5py" or name.startswith("h5py."):
            raise ImportError("No module named 'h5py'")
        return real_import(name, *a, **kw)

    monkeypatch.delitem(sys.modules, "h5py", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_h5py)
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no_h5py(name))
    with pytest.raises(InputError) as ei:
        open_volume(str(tmp_path / "a.h5"), "pred")
    msg = str(ei.value)
    assert "a.h5" in msg and "h5py" in msg and "pip install 'fastseg-eval[hdf5]'" in msg
    assert "\n" not in msg


def test_cli_missing_reader_one_line_exit_1(tmp_path):
    h5py = pytest.importorskip("h5py")
    pred, gt = _pair()
    for name, a in (("p", pred), ("g", gt)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("seg", data=a)
    code = (
        "import sys; sys.modules['h5py'] = None\n"
        "from fastseg_eval.cli import main\n"
        f"sys.exit(main([{str(tmp_path / 'p.h5')!r}, {str(tmp_path / 'g.h5')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fastseg-eval[hdf5]" in lines[0] and "p.h5" in lines[0]


def test_keys_and_urls_on_single_volume_files(tmp_path):
    pred, gt = _pair()
    _nifti(tmp_path / "p.nii.gz", pred)
    with pytest.raises(InputError, match=r"holding one volume.*'seg'"):
        fse.evaluate(str(tmp_path / "p.nii.gz"), gt, pred_key="seg")
    with pytest.raises(InputError, match=r"p\.nii\.gz/inner addresses nothing"):
        fse.evaluate(str(tmp_path / "p.nii.gz") + "/inner", gt)
    with pytest.raises(InputError, match=r"local disk"):
        fse.evaluate("s3://bucket/p.nii.gz", gt)
    with pytest.raises(InputError, match=r"no such file"):
        fse.evaluate(str(tmp_path / "absent.nii.gz"), gt)


def test_whole_file_decoded_once_and_lazily(tmp_path, monkeypatch):
    from fastseg_eval.io import formats

    pred, gt = _pair()
    _nifti(tmp_path / "p.nii.gz", pred)
    _nifti(tmp_path / "g.nii.gz", gt)
    calls = []
    real = formats.inflate
    monkeypatch.setattr(formats, "inflate", lambda b: calls.append(1) or real(b))
    v = open_volume(str(tmp_path / "p.nii.gz"), "pred")
    assert calls == [] and v.shape == SHAPE  # opening reads the header only
    fse.evaluate(str(tmp_path / "p.nii.gz"), str(tmp_path / "g.nii.gz"), workers=3)
    assert len(calls) == 2  # one decode per file, whatever the number of units and threads


def test_suffixes_and_case_ids():
    assert file_format("a/B.NII.GZ") == "nifti" and file_format("x.ome.tiff") == "tiff"
    assert file_format("x.zarr") is None and file_format("x.nii.gz.txt") is None
    assert case_id("dir/case_001.nii.gz") == "case_001" and case_id("c.ome.zarr/") == "c"
    assert case_id("c.zarr") == "c" and case_id("c.zip") == "c" and case_id("c.H5") == "c"
    assert case_id(".nii.gz") == ".nii.gz"  # nothing left: the name itself


def test_gzip_inflater_matches_zlib(tmp_path):
    from fastseg_eval.io.formats import inflate

    data = np.random.default_rng(0).integers(0, 4, 1 << 16).astype(np.uint8).tobytes()
    two = gzip.compress(data[:1000]) + gzip.compress(data[1000:])  # multi-member, as some tools write
    assert inflate(two) == data


def test_ome_zarr_scales_must_agree(tmp_path):
    import zarr

    pred, gt = _pair()

    def ome(path, a, scale):
        g = zarr.open_group(str(path), mode="w", zarr_format=2)
        g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": scale}]}]}]  # fmt: skip
        g.create_array("0", shape=a.shape, dtype=a.dtype, chunks=(4, 4, 4))[...] = a

    ome(tmp_path / "g.zarr", gt, [1.0, 0.5, 0.5])
    ome(tmp_path / "p.zarr", pred, [2.0, 0.5, 0.5])
    ome(tmp_path / "q.zarr", pred, [1.0, 0.5, 0.5])
    with pytest.raises(InputError, match=r"OME-Zarr scale.*spacing \(2, 0\.5, 0\.5\) vs \(1, 0\.5, 0\.5\)"):
        fse.evaluate(str(tmp_path / "p.zarr"), str(tmp_path / "g.zarr"))
    res = fse.evaluate(str(tmp_path / "q.zarr"), str(tmp_path / "g.zarr"), num_classes=4)
    assert np.array_equal(res.confusion_matrix, _cm(pred, gt, 4))
