"""Output files: checked against the inputs before a run, written atomically after it.

Two promises, kept for every file the command line writes (``-o``, ``--save-matrix``,
``--plot`` and its curves file, the demo stores):

* **Inputs are never written.** Every output path is resolved (symlinks and ``..`` included)
  and refused when it lies inside the store of an input (the root directory of the zarr
  hierarchy the input lives in, however deep the node path given; the ``.zip`` file of a zip
  store) or when two outputs resolve to the same file (:func:`check_outputs`).
* **A failed write changes nothing.** A file is written to a temporary file in the same
  directory, flushed to disk (``fsync``) and renamed over the target (:func:`atomic_write`):
  a full disk or an interrupt leaves the previous file intact and no partial or temporary file
  behind. Write errors raise :class:`OutputWriteError`, one line naming the file.

Special files that exist (``/dev/null``, ``/dev/stdout``, a named pipe) are written in place:
they are streams, there is nothing to replace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastseg_eval.errors import FastSegError, OptionError

T = TypeVar("T")

ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
"""Files that make a directory a zarr node (v3, v2)."""


class OutputPathError(OptionError):
    """An output path is refused before the run (inside an input store, or a duplicate): exit 2."""


class OutputWriteError(FastSegError):
    """An output could not be written (disk full, permissions, closed stdout, ...): exit 1."""


# ------------------------------------------------------------------------------- path checks
def _is_zarr_node(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in ZARR_METADATA)


def _ancestors(path: str) -> list[str]:
    """``path`` and every directory above it, innermost first."""
    out = [path]
    while True:
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            return out
        out.append(parent)


def enclosing_store(path: str | os.PathLike[str]) -> str | None:
    """The root of the zarr store that ``path`` lies in (resolved), or None.

    The root is the outermost directory at or above ``path`` holding zarr metadata, so
    ``pred.zarr/labels/cells/0`` and ``pred.zarr/c/0/0`` both give ``.../pred.zarr``.
    """
    real = os.path.realpath(os.fspath(path))
    roots = [d for d in _ancestors(real) if os.path.isdir(d) and _is_zarr_node(d)]
    return roots[-1] if roots else None


def input_root(source: Any) -> str | None:
    """What must never be written for an input given as ``source``: a resolved path, or None.

    A zip store: the ``.zip`` file (``data.zip/seg/0`` -> ``.../data.zip``). A local zarr
    store: its root directory (see :func:`enclosing_store`); any other local file: the file
    itself. A plain directory (a folder of cases, say) is not protected as a whole, so that a
    summary may go next to the cases. URLs other than ``file://`` and in-memory arrays: None.
    """
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if "://" in text:
        if not text.startswith("file://"):
            return None
        text = text[len("file://") :]
    if not text:
        return None
    parts = text.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part.lower().endswith(".zip"):
            return os.path.realpath("/".join(parts[: i + 1]) or "/")
    store = enclosing_store(text)
    if store is not None:
        return store
    real = os.path.realpath(text)
    return None if os.path.isdir(real) else real


def is_within(path: str, root: str) -> bool:
    """Whether resolved ``path`` is ``root`` or lies below it."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def check_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Mapping[str, Any]) -> dict[str, str]:
    """Refuse output paths that lie inside an input store or name the same file twice.

    ``outputs``: ``(flag, path)`` pairs (``path`` None: not asked for); ``inputs``: role ->
    source as given (path, URL or array). Returns ``{flag: resolved path}``; raises
    :class:`OutputPathError` naming both sides.
    """
    roots = [(role, src, input_root(src)) for role, src in inputs.items() if src is not None]
    resolved: dict[str, str] = {}
    seen: list[tuple[str, str, str]] = []
    for flag, path in outputs:
        if not path:
            continue
        real = os.path.realpath(path)
        for role, src, root in roots:
            if root is not None and is_within(real, root):
                where = "is" if real == root else "lies inside"
                raise OutputPathError(
                    f"{flag} {path} {where} the {role} input {src} (store {root}); "
                    "outputs are never written into an input: choose another path"
                )
        for other_flag, other_path, other_real in seen:
            if real == other_real:
                raise OutputPathError(
                    f"{flag} {path} and {other_flag} {other_path} are the same file; give them different names"
                )
        seen.append((flag, path, real))
        resolved[flag] = real
    return resolved


# ------------------------------------------------------------------------------------ writing
def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], T], *, what: str = "") -> T:
    """Write a file by calling ``writer(tmp_path)``, then move it over ``path`` in one step.

    The temporary file sits in the directory of the resolved target (so the rename is atomic;
    a symlink at ``path`` is kept and its target replaced) and ends in the target's extension
    (writers that pick a format from it, matplotlib and numpy, keep working). It is fsynced
    before the rename and removed on any failure, interrupts included; the previous file, if
    any, keeps its content and permissions until the rename. ``what`` names the output in the
    error message (e.g. ``"-o"``). Returns what ``writer`` returned.
    """
    path = os.fspath(path)
    label = f"{what} {path}".strip()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputWriteError(f"cannot write {label}: {_why(e)}") from e
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputWriteError(f"cannot write {label}: it is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):  # a device or a pipe: a stream, write in place
        try:
            return writer(path)
        except OSError as e:
            raise OutputWriteError(f"cannot write {label}: {_why(e)}") from e
    real = os.path.realpath(path)
    directory, name = os.path.split(real)
    stem, ext = os.path.splitext(name)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
        os.close(fd)
        result = writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else _default_mode())
        os.replace(tmp, real)
        tmp = None
    except OSError as e:
        raise OutputWriteError(
            f"cannot write {label}: {_why(e)}"
            + ("; the previous file is unchanged" if st is not None else "")
        ) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(directory)
    return result


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "") -> None:
    """Atomically write ``text`` (UTF-8, ending in a newline) to ``path``."""
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")

    def write(p: str) -> None:
        with open(p, "wb") as fh:
            fh.write(data)

    atomic_write(path, write, what=what)


def save_npy(path: str | os.PathLike[str], array: Any, *, what: str = "") -> None:
    """Atomically write ``array`` as a ``.npy`` file."""
    import numpy as np

    def write(p: str) -> None:
        with open(p, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write, what=what)


def replace_directory(path: str | os.PathLike[str], writer: Callable[[str], T], *, what: str = "") -> T:
    """Build a directory with ``writer(tmp_dir)`` next to ``path``, then swap it in.

    An existing ``path`` is moved aside, the new one renamed into place and the old one
    removed; if anything fails the old directory is put back and the new one removed.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    label = f"{what} {path}".strip()
    tmp = old = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        result = writer(tmp)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=directory)
            os.rename(path, os.path.join(old, name))
        os.rename(tmp, path)
        tmp = None
    except BaseException as e:
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(old, name), path)
        if isinstance(e, OSError):
            raise OutputWriteError(f"cannot write {label}: {_why(e)}") from e
        raise
    finally:
        for d in (tmp, old):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------- stdout
def write_stdout(text: str) -> None:
    """Write ``text`` to stdout and flush; a closed or failing stdout is an :class:`OutputWriteError`.

    ``BrokenPipeError`` (a reader such as ``head`` went away) propagates unchanged.
    """
    out = sys.stdout
    if out is None:
        raise OutputWriteError(
            "cannot write the report: stdout is closed (give -o FILE to write it to a file)"
        )
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # ValueError: I/O operation on closed file
        silence_stdout()
        raise OutputWriteError(f"cannot write the report to stdout: {_why(e)}") from e


def silence_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit cannot fail a second time."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
