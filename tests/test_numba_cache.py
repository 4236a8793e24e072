"""numba's on-disk cache stays out of the installed package and never fails a run (issue 11).

In-process tests decorate a small function of this file with :func:`fastseg_eval.kernels.jit.njit`
(each new decoration is what a new process sees); subprocess tests run the real kernels with a
given environment and import order.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fastseg_eval
from fastseg_eval.kernels import jit

PACKAGE = Path(fastseg_eval.__file__).resolve().parent


def _add(a, b):
    return a + b


def cached_add():
    return jit.njit(nogil=True, cache=True)(_add)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc"))


def package_cache_files() -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cache_files(PACKAGE)}


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """A fresh cache location (``XDG_CACHE_HOME``), no ``NUMBA_CACHE_DIR``, the note not yet given."""
    import numba

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(jit, "_noted", threading.Event())
    return tmp_path / "xdg" / "fastseg-eval" / "numba"


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastseg_eval" and "numba" in r.getMessage()]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG layout is the Linux one")
def test_cache_dir_follows_platform_convention(monkeypatch, tmp_path):
    import numba

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jit.cache_dir() == tmp_path / "fastseg-eval" / "numba"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    assert jit.cache_dir() == Path.home() / ".cache" / "fastseg-eval" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert jit.cache_dir() == Path.home() / ".cache" / "fastseg-eval" / "numba"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cfg"))  # set in code
    assert jit.cache_dir() == tmp_path / "cfg"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "env"))  # the variable wins
    assert jit.cache_dir() == tmp_path / "env"


def test_cache_is_written_to_the_cache_dir_and_reused(cache_env):
    before = package_cache_files()
    f = cached_add()
    assert f(2, 3) == 5
    files = cache_files(cache_env)
    assert [p.suffix for p in files].count(".nbi") == 1 and [p.suffix for p in files].count(".nbc") == 1
    assert not any(PACKAGE in p.parents for p in files)
    g = cached_add()  # what the next process sees
    assert g(2, 3) == 5
    assert sum(g.stats.cache_hits.values()) == 1 and sum(g.stats.cache_misses.values()) == 0
    assert package_cache_files() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_files_fall_back_and_repair(cache_env, caplog, damage):
    f = cached_add()
    assert f(2, 3) == 5 and f(2.5, 1.0) == 3.5
    for p in cache_files(cache_env):
        size = p.stat().st_size
        if damage == "truncate":
            with open(p, "r+b") as fh:
                fh.truncate(size // 2)
        elif damage == "garbage":
            p.write_bytes(os.urandom(size))
        else:
            p.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fastseg_eval"):
        g = cached_add()
        assert g(2, 3) == 5 and g(2.5, 1.0) == 3.5  # compiled in memory, not a failed run
        assert sum(g.stats.cache_misses.values()) == 2
    assert len(notes(caplog)) <= 1  # at most one quiet note
    h = cached_add()  # the entries were rewritten
    assert h(2, 3) == 5 and h(2.5, 1.0) == 3.5
    assert sum(h.stats.cache_hits.values()) == 2


def test_entry_saved_under_another_key_is_a_miss(cache_env):
    """The result of a lost race between processes: an index entry pointing at another signature's
    code. numba alone would run that code with the wrong argument types."""
    f = cached_add()
    assert f(2, 3) == 5 and f(2.5, 1.0) == 3.5
    data = [p for p in cache_files(cache_env) if p.suffix == ".nbc"]
    assert len(data) == 2
    a, b = (p.read_bytes() for p in data)
    data[0].write_bytes(b)
    data[1].write_bytes(a)
    g = cached_add()
    assert g(2, 3) == 5 and g(2.5, 1.0) == 3.5
    assert sum(g.stats.cache_hits.values()) == 0
    h = cached_add()
    assert h(2, 3) == 5 and h(2.5, 1.0) == 3.5 and sum(h.stats.cache_hits.values()) == 2


def test_unwritable_cache_dir_compiles_in_memory(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jit, "_noted", threading.Event())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "numba"))  # cannot be created, even by root
    before = package_cache_files()
    with caplog.at_level(logging.WARNING, logger="fastseg_eval"):
        f = cached_add()
        g = cached_add()
        assert f(2, 3) == 5 and g(4, 5) == 9
    assert len(notes(caplog)) == 1 and "not writable" in notes(caplog)[0]
    assert package_cache_files() == before  # no fallback to __pycache__ beside the source


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_cache_dir_compiles_in_memory(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jit, "_noted", threading.Event())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(ro))
    try:
        with caplog.at_level(logging.WARNING, logger="fastseg_eval"):
            assert cached_add()(2, 3) == 5
        assert len(notes(caplog)) == 1
    finally:
        ro.chmod(0o755)


# the real kernels, in a fresh interpreter --------------------------------------------------------
RUN = """
import numpy as np
import fastseg_eval as fse
from fastseg_eval.kernels import cpu
a = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 3).astype(np.uint8)
cm = fse.confusion_matrix(a, a)
assert cm.trace() == a.size, cm
print(cpu.count_direct_flat.stats.cache_path)
"""

ORDERS = {
    # NUMBA_CACHE_DIR in the environment before the interpreter starts
    "env": "",
    # numba imported first, the variable set afterwards (numba has read its config already)
    "numba-first-env": "import numba, os\nos.environ['NUMBA_CACHE_DIR'] = {d!r}\n",
    # numba imported first, its setting changed in code
    "numba-first-config": "import numba\nnumba.config.CACHE_DIR = {d!r}\n",
}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("order", list(ORDERS))
def test_numba_cache_dir_wins_in_any_import_order(tmp_path, order):
    d = tmp_path / "numba-cache"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    if order == "env":
        env["NUMBA_CACHE_DIR"] = str(d)
    before = package_cache_files()
    r = run_python(ORDERS[order].format(d=str(d)) + RUN, env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == d
    assert cache_files(d) and not (tmp_path / "xdg").exists()
    assert package_cache_files() == before


@pytest.mark.slow
def test_default_cache_is_per_user_and_processes_share_it(tmp_path):
    """Three interpreters fill one fresh cache at once (as dask process workers do), then three
    read it: every run is correct, and no cache file lands inside the package."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    root = tmp_path / "xdg" / "fastseg-eval" / "numba"
    before = package_cache_files()
    more = "for dt in (np.uint16, np.int64):\n    assert fse.confusion_matrix(a.astype(dt), a).trace() == a.size\n"
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    full.update(env)
    for _round in range(2):
        cmd = [sys.executable, "-c", RUN + more]
        procs = [
            subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
            assert Path(out.strip()).parent == root
            assert "note:" not in err
    assert cache_files(root)
    assert package_cache_files() == before
