"""Issue 10 item 6, input side: each odd store gets one line that says what happened and what to do.

Before: a chunk path that is a directory, a self-symlinked chunk, a zero chunk axis, a missing
OME level or label image were "this is unexpected"; a symlink loop was "no such file"; a huge
chunk shape advised fewer workers; a directory store named ``x.zip`` was "no such zip file";
a 0-voxel volume warned "everything ignored or masked out"; missing chunks went unmentioned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

import fastseg_eval as fse

CLI = [sys.executable, "-m", "fastseg_eval"]


def run(*args, cwd):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    return stderr


@pytest.fixture
def pair(tmp_path):
    a = np.zeros((16, 16, 16), np.uint8)
    a[4:8] = 1
    for n in ("p.zarr", "g.zarr"):
        z = zarr.create_array(tmp_path / n, shape=a.shape, chunks=(8, 8, 8), dtype="u1")
        z[:] = a
    return tmp_path, a


def _edit_meta(path, fn):
    meta = json.loads((path / "zarr.json").read_text())
    fn(meta)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_chunk_path_is_a_directory(pair):
    d, _ = pair
    chunk = d / "p.zarr" / "c" / "0" / "0" / "0"
    chunk.unlink()
    chunk.mkdir()
    rc, _, err = run("p.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "c/0/0/0" in one_line(err) and "Is a directory" in err and "readable file" in err


def test_chunk_symlinked_to_itself(pair):
    d, _ = pair
    chunk = d / "p.zarr" / "c" / "0" / "0" / "0"
    chunk.unlink()
    os.symlink("0", chunk)
    rc, _, err = run("p.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "c/0/0/0" in one_line(err) and "symbolic links" in err


def test_zero_chunk_axis(pair):
    d, _ = pair
    _edit_meta(d / "p.zarr", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0, 8, 8]))
    rc, _, err = run("p.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "chunk shape (0, 8, 8)" in one_line(err) and "at least 1" in err


def test_huge_chunk_shape_says_rechunk(pair):
    d, _ = pair
    _edit_meta(
        d / "p.zarr", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[100000, 100000, 1000])
    )
    rc, _, err = run("p.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "rechunk" in one_line(err) and "even one worker" in err and "fewer --workers" not in err


def test_symlink_loop_is_not_no_such_file(pair):
    d, _ = pair
    os.symlink("loop.zarr", d / "loop.zarr")
    rc, _, err = run("loop.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "loops back" in one_line(err) and "no such file" not in err


def test_directory_store_named_zip(pair):
    d, a = pair
    os.rename(d / "p.zarr", d / "x.zip")
    rc, out, err = run("x.zip", "g.zarr", "--format", "json", cwd=d)
    assert rc == 0, err
    assert json.loads(out)["n_voxels"] == a.size
    (d / "run.zip").mkdir()
    os.rename(d / "x.zip", d / "run.zip" / "p.zarr")
    rc, out, err = run("run.zip/p.zarr", "g.zarr", "--format", "json", cwd=d)
    assert rc == 0, err
    assert json.loads(out)["confusion_matrix"] == [[3072, 0], [0, 1024]]


def _ome(d, a, labels=None, levels=("0", "1"), stored=("0",)):
    g = zarr.open_group(d / "ome.zarr", mode="w", zarr_format=2)
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    target = g
    if labels is not None:
        lg = g.create_group("labels")
        lg.attrs["labels"] = [labels]
        target = None
    if target is not None:
        target.attrs["multiscales"] = [
            {"version": "0.4", "axes": axes, "datasets": [{"path": p} for p in levels]}
        ]
        for p in stored:
            target.create_array(p, shape=a.shape, chunks=(8, 8, 8), dtype="u1")[:] = a


def test_missing_ome_level(pair):
    d, a = pair
    _ome(d, a)
    rc, _, err = run("ome.zarr", "g.zarr", "--level", "1", cwd=d)
    assert rc == 1
    assert "multiscale level '1'" in one_line(err) and "does not exist" in err
    rc, out, err = run("ome.zarr", "g.zarr", "--level", "0", "--format", "json", cwd=d)
    assert rc == 0, err


def test_missing_ome_label_image(pair):
    d, a = pair
    _ome(d, a, labels="cells")
    rc, _, err = run("ome.zarr", "g.zarr", cwd=d)
    assert rc == 1
    assert "label image 'cells'" in one_line(err) and "does not exist" in err


def test_zero_voxel_volume_says_so(tmp_path):
    for n in ("e1.zarr", "e2.zarr"):
        zarr.create_array(tmp_path / n, shape=(0, 4, 4), chunks=(1, 4, 4), dtype="u1")
    res = fse.evaluate(str(tmp_path / "e1.zarr"), str(tmp_path / "e2.zarr"))
    assert res.n_voxels == 0
    assert any("hold no voxels" in w for w in res.warnings), res.warnings
    assert not any("ignored or masked" in w for w in res.warnings)
    a = np.ones((4, 4, 4), np.uint8)
    res = fse.evaluate(a, a, ignore_label=1)
    assert any("64 ignored" in w for w in res.warnings), res.warnings


def test_missing_chunks_are_reported(pair):
    d, a = pair
    # zarr does not store chunks equal to the fill value: p.zarr holds 4 of its 8 chunks
    stored = sum(len(f) for _, _, f in os.walk(d / "p.zarr" / "c"))
    res = fse.evaluate(str(d / "p.zarr"), str(d / "g.zarr"))
    assert res.inputs["pred"]["chunks_missing"] == 8 - stored
    assert res.inputs["pred"]["fill_value"] == 0
    assert res.inputs["gt"]["chunks_missing"] == 8 - stored
    rc, out, _ = run("p.zarr", "g.zarr", cwd=d)
    assert f"{8 - stored} chunks not stored, read as fill value 0" in out
    # numpy inputs have no chunks to miss
    assert "chunks_missing" not in fse.evaluate(a, a).inputs["pred"]
