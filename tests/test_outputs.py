"""Output files never land inside an input store, and a failed write changes nothing.

Issue 10, items 2, 3 and part of 6: ``-o`` / ``--save-matrix`` / ``--plot`` / ``demo DIR`` into an
input store are refused (exit 2, naming both sides), two outputs naming the same file are
refused, every file is replaced atomically (a full disk leaves the previous file and no
temporary file), and write errors (closed stdout, ``/proc``, ``/dev/full``) are one clear line
with exit 1. The property test drives :func:`fastseg_eval.io.outputs.check_outputs` and the
atomic writer with random store layouts and relative / absolute / symlinked / ``..`` paths.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import zarr
from hypothesis import given, settings

import fastseg_eval as fse
from fastseg_eval import cli
from fastseg_eval.io import outputs
from fastseg_eval.io.outputs import OutputPathError, OutputWriteError

SHAPE = (6, 7, 8)


# ---------------------------------------------------------------------------------- helpers
def write_store(path, data, chunks=(4, 4, 4), zarr_format=3, name=None):
    arr = zarr.create_array(
        store=str(path), name=name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
        zarr_format=zarr_format, overwrite=True,
    )  # fmt: skip
    arr[...] = data
    return str(path) if name is None else f"{path}/{name}"


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (or the file itself) and its bytes."""
    root = Path(root)
    if root.is_file():
        return {str(root): root.read_bytes()}
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def leftovers(directory) -> list[str]:
    """Temporary files an atomic write might have left behind."""
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp" in p.name or p.name.startswith("."))


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 3, SHAPE).astype(np.uint8)
    pred = np.where(rng.random(SHAPE) < 0.7, gt, rng.integers(0, 3, SHAPE)).astype(np.uint8)
    return write_store(tmp_path / "p.zarr", pred), write_store(tmp_path / "g.zarr", gt)


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


# ------------------------------------------------------------------- outputs inside inputs
@pytest.mark.parametrize(
    "target",
    ["p.zarr/zarr.json", "g.zarr/c/0/0/0", "p.zarr", "p.zarr/new-report.json", "g.zarr/c/../zarr.json"],
)
def test_report_into_an_input_store_is_refused(tmp_path, pair, capsys, target):
    before = {s: snapshot(s) for s in pair}
    fmt = [] if target.endswith(".json") else ["--format", "json"]
    code, out, err = run_main(capsys, *pair, "-o", tmp_path / target, *fmt, "-q")
    assert code == 2, err
    line = one_line(err)
    assert str(tmp_path / target) in line and "input" in line
    assert {s: snapshot(s) for s in pair} == before


def test_symlink_into_a_store_is_refused(tmp_path, pair, capsys):
    p, g = pair
    before = snapshot(g)
    (tmp_path / "report.json").symlink_to(Path(g) / "zarr.json")
    (tmp_path / "dirlink").symlink_to(Path(g) / "c")
    for out in (tmp_path / "report.json", tmp_path / "dirlink" / "0" / "0" / "0"):
        code, _, err = run_main(capsys, p, g, "-o", out, "--format", "json", "-q")
        assert code == 2 and "g.zarr" in one_line(err)
    assert snapshot(g) == before


def test_node_path_input_protects_the_whole_store(tmp_path, capsys):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 3, SHAPE).astype(np.uint8)
    p = write_store(tmp_path / "p.zarr", data, name="labels/cells/0")
    g = write_store(tmp_path / "g.zarr", data, zarr_format=2)
    before = snapshot(tmp_path / "p.zarr")
    for out in (tmp_path / "p.zarr" / "report.json", tmp_path / "p.zarr" / "labels" / "r.json"):
        code, _, err = run_main(capsys, p, g, "-o", out, "-q")
        assert code == 2 and "p.zarr" in one_line(err)
    code, _, err = run_main(capsys, p, g, "--save-matrix", tmp_path / "g.zarr" / ".zarray.npy", "-q")
    assert code == 2 and "--save-matrix" in one_line(err)
    assert snapshot(tmp_path / "p.zarr") == before
    # next to the store is fine
    assert run_main(capsys, p, g, "-o", tmp_path / "report.json", "-q")[0] == 0


def test_zip_store_input_and_mask_are_protected(tmp_path, pair, capsys):
    p, g = pair
    zpath = tmp_path / "m.zip"
    with zipfile.ZipFile(zpath, "w") as zf:  # a zip of the gt store is a valid mask
        for f in Path(g).rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(g).as_posix())
    before = zpath.read_bytes()
    code, _, err = run_main(capsys, p, g, "--mask", zpath, "-o", zpath, "--format", "json", "-q")
    assert code == 2 and "mask" in one_line(err)
    assert zpath.read_bytes() == before


def test_save_matrix_same_file_as_report_is_refused(tmp_path, pair, capsys):
    out = tmp_path / "r.csv"
    code, _, err = run_main(capsys, *pair, "-o", out, "--save-matrix", out, "-q")
    line = one_line(err)
    assert code == 2 and "-o" in line and "--save-matrix" in line
    assert not out.exists()
    # the same file through a symlink, or spelled with ..
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.csv").symlink_to(out)
    for other in (tmp_path / "link.csv", tmp_path / "sub" / ".." / "r.csv"):
        code, _, err = run_main(capsys, *pair, "-o", out, "--save-matrix", other, "-q")
        assert code == 2 and "same file" in one_line(err)


def test_save_matrix_replaces_an_existing_file(tmp_path, pair, capsys):
    m = tmp_path / "m.npy"
    m.write_bytes(b"old")
    os.chmod(m, 0o640)
    assert run_main(capsys, *pair, "--save-matrix", m, "-q")[0] == 0
    cm = np.load(m)
    assert cm.dtype == np.int64 and cm.sum() == np.prod(SHAPE)
    assert (os.stat(m).st_mode & 0o777) == 0o640  # permissions of the file it replaced
    assert leftovers(tmp_path) == []


def test_demo_into_a_zarr_store_is_refused(tmp_path, pair, capsys):
    p, g = pair
    before = snapshot(p)
    for target in (Path(p), Path(p) / "c", Path(p) / "new-dir"):
        code, _, err = run_main(capsys, "demo", target, "--shape", "8")
        assert code == 2 and "p.zarr" in one_line(err)
    assert snapshot(p) == before
    assert not (Path(p) / "new-dir").exists()
    # a fresh directory, then again over the demo's own stores: fine
    assert run_main(capsys, "demo", tmp_path / "d", "--shape", "8")[0] == 0
    assert run_main(capsys, "demo", tmp_path / "d", "--shape", "8", "--seed", "3")[0] == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["gt.zarr", "pred.zarr"]


# ------------------------------------------------------------------------------ failed writes
class _DiskFullAfter:
    """``open`` whose files in ``directory`` opened for writing take ``limit`` bytes, then ENOSPC."""

    def __init__(self, directory, limit=40):
        self.directory, self.limit, self.real_open = str(directory), limit, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        fh = self.real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and ("w" in mode or "a" in mode):
            if os.path.dirname(os.path.abspath(os.fspath(file))) == self.directory:
                return _Full(fh, self.limit)
        return fh


class _Full:
    def __init__(self, fh, limit):
        self.fh, self.left = fh, limit

    def write(self, data):
        if len(data) > self.left:
            self.fh.write(data[: self.left])
            self.fh.flush()
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("flag", ["-o", "--save-matrix"])
def test_disk_full_keeps_the_previous_file(tmp_path, pair, capsys, monkeypatch, flag):
    outdir = tmp_path / "out"
    outdir.mkdir()
    target = outdir / ("report.json" if flag == "-o" else "m.npy")
    if flag == "-o":
        assert run_main(capsys, *pair, "-o", target, "-q")[0] == 0
    else:
        assert run_main(capsys, *pair, "--save-matrix", target, "-q")[0] == 0
    old = target.read_bytes()
    monkeypatch.setattr(builtins, "open", _DiskFullAfter(outdir))
    code, _, err = run_main(capsys, *pair, flag, target, "--label-names", "1=one", "-q")
    monkeypatch.undo()
    line = one_line(err)
    assert code == 1 and "No space left on device" in line and str(target) in line
    assert target.read_bytes() == old
    assert sorted(os.listdir(outdir)) == [target.name]  # no temporary or partial file


def test_disk_full_on_a_new_file_leaves_nothing(tmp_path, pair, capsys, monkeypatch):
    outdir = tmp_path / "out"
    outdir.mkdir()
    monkeypatch.setattr(builtins, "open", _DiskFullAfter(outdir))
    code, _, err = run_main(capsys, *pair, "-o", outdir / "r.json", "--save-matrix", outdir / "m.npy", "-q")
    monkeypatch.undo()
    assert code == 1 and "No space left on device" in one_line(err)
    assert os.listdir(outdir) == []


def test_interrupt_during_a_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old\n")

    def writer(p):
        Path(p).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write(target, writer, what="-o")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["r.txt"]


def _run_script(*args, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "fastseg-eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fastseg_eval"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=False, text=True, timeout=120, **kw)


@pytest.mark.slow
def test_stdout_closed_or_full_and_unwritable_paths(tmp_path, pair):
    """Closed stdout, stdout on /dev/full, -o /dev/full and -o /proc/x: one line, exit 1."""
    err_file = tmp_path / "err"

    def run(*args, stdout=None, close_stdout=False):
        with open(err_file, "w") as err:
            pre = (lambda: os.close(1)) if close_stdout else None
            r = _run_script(*pair, "--no-progress", *args, stdout=stdout, stderr=err, preexec_fn=pre)
        return r.returncode, err_file.read_text()

    code, err = run(close_stdout=True)
    assert code == 1 and "stdout is closed" in one_line(err)
    code, err = run("-o", tmp_path / "r.json", close_stdout=True)  # the report still goes to the file
    assert code == 0 and "Traceback" not in err
    assert json.loads((tmp_path / "r.json").read_text())["n_voxels"] == np.prod(SHAPE)
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            code, err = run(stdout=full)
        assert code == 1 and "No space left on device" in one_line(err)
        code, err = run("-o", "/dev/full", "--format", "json", stdout=subprocess.DEVNULL)
        assert code == 1 and "/dev/full" in one_line(err)
    if os.path.isdir("/proc/self"):
        code, err = run("-o", "/proc/x.json", stdout=subprocess.DEVNULL)
        assert code == 1 and "/proc/x.json" in one_line(err)


def test_special_files_are_written_in_place(tmp_path, pair, capsys):
    assert run_main(capsys, *pair, "-o", os.devnull, "--format", "json", "-q")[0] == 0
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


# ------------------------------------------------------------------------- label names in tables
def test_control_characters_in_label_names_are_escaped():
    from fastseg_eval.report.table import format_table

    gt = np.array([[0, 1, 2, 2]], dtype=np.uint8)
    names = {1: "evil\nrow", 2: "\x1b[31mred\x1b[0m\r\t\x07", 0: "bg\u2028x"}
    res = fse.evaluate(gt, gt, label_names=names)
    text = format_table(res, color=False)
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\u2028" not in text
    assert "\t" not in text
    assert "evil\\nrow" in text and "\\x1b[31mred" in text
    assert not any(line.startswith("row") for line in text.splitlines())


# ----------------------------------------------------------------------------- property test
_LAYOUT = st.fixed_dictionaries(
    {
        "zarr_format": st.sampled_from([2, 3]),
        "node": st.sampled_from(["", "a", "a/b/0"]),  # the array's node path inside the store
        "given_as": st.sampled_from(["node", "root", "symlink"]),  # how the input path is spelled
    }
)
_TARGETS = st.sampled_from(
    [
        "{root}/zarr.json", "{root}/.zgroup", "{root}/.zarray", "{root}/{node}/zarr.json", "{root}/{node}/.zarray",
        "{root}/{node}/c/0/0", "{root}/{node}/0.0", "{root}/new.json", "{root}", "{root}/{node}",
        "{root}/{node}/../r.json", "{root}/../r.json", "{root}/../{rootname}/r.json", "{tmp}/r.json",
        "{tmp}/out/../r.json", "{tmp}/out/r.json", "{tmp}/link/r.json", "{tmp}/link/../r.json",
        "{tmp}/filelink", "{tmp}/rootlink/zarr.json", "{tmp}/rootlink/../r.json",
    ]
)  # fmt: skip


@settings(max_examples=60)
@given(layout=_LAYOUT, target=_TARGETS, relative=st.booleans())
def test_outputs_never_land_inside_inputs(layout, target, relative):
    """Random store layouts and output spellings: refused, or the input store is byte-identical.

    Also the converse: a path that resolves outside every store is not refused.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.path.realpath(tmp)
        root = os.path.join(tmp, "data", "p.zarr")
        node = layout["node"]
        data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
        write_store(root, data, chunks=(1, 2, 4), zarr_format=layout["zarr_format"], name=node or None)
        os.makedirs(os.path.join(tmp, "out"))
        array_dir = os.path.join(root, node) if node else root
        os.symlink(os.path.join(array_dir), os.path.join(tmp, "link"))  # a directory link into the store
        os.symlink(root, os.path.join(tmp, "rootlink"))
        meta = "zarr.json" if layout["zarr_format"] == 3 else ".zarray"
        os.symlink(os.path.join(array_dir, meta), os.path.join(tmp, "filelink"))
        given_input = {
            "node": array_dir,
            "root": root,
            "symlink": os.path.join(tmp, "rootlink", node) if node else os.path.join(tmp, "rootlink"),
        }[layout["given_as"]]
        out = target.format(root=root, node=node or ".", rootname="p.zarr", tmp=tmp).replace("/./", "/")
        if relative:
            out = os.path.relpath(out, os.getcwd())
        before = snapshot(root)
        real_out = os.path.realpath(out)
        inside = real_out == root or real_out.startswith(root + os.sep)
        try:
            outputs.check_outputs([("-o", out)], {"pred": given_input, "gt": None})
        except OutputPathError as e:
            assert inside, f"{out} resolves outside the store but was refused: {e}"
            return
        assert not inside, f"{out} resolves into the store {root} but was not refused"
        try:
            outputs.write_text(out, '{"report": 1}', what="-o")
        except OutputWriteError:
            pass  # e.g. a directory
        assert snapshot(root) == before
        assert not [f for f in os.listdir(os.path.dirname(real_out)) if ".tmp" in f]
