"""``njit`` for fastseg-eval's kernels: numba's on-disk cache, kept out of the installed package.

Use ``from fastseg_eval.kernels.jit import njit`` instead of ``numba.njit``; it takes the same
arguments. With ``cache=True`` the compiled code goes to a per-user cache directory instead of
numba's default, ``__pycache__`` beside the source. That default broke installs: pip's RECORD
does not list the ``*.nbi`` / ``*.nbc`` files, so ``pip uninstall`` and every reinstall left a
``site-packages/fastseg_eval/`` folder without ``__init__.py``, which Python then found before
the next (editable) install.

Where the cache goes (:func:`cache_dir`)
    1. ``$NUMBA_CACHE_DIR`` when set (numba's own setting; it wins), else ``numba.config.CACHE_DIR``
       when code set it; numba lays the files out below it as it would;
    2. else the platform's per-user cache: ``$XDG_CACHE_HOME/fastseg-eval/numba`` (default
       ``~/.cache/fastseg-eval/numba``), ``~/Library/Caches/fastseg-eval/numba`` on macOS,
       ``%LOCALAPPDATA%\\fastseg-eval\\numba`` on Windows.
    Below it, one folder per source folder (numba's ``<name>_<sha1 of path>``): an installed copy
    and an editable checkout never share entries.

What works with numba 0.68, whichever of numba and fastseg_eval is imported first
    numba picks a function's cache location once, when the ``cache=True`` decorator runs (at the
    import of the kernel module), from ``numba.config.CACHE_DIR``, falling back to ``__pycache__``
    beside the source. numba reads ``NUMBA_CACHE_DIR`` into that setting at its own import, and
    again before each compilation but only if some ``NUMBA_*`` variable changed meanwhile, which
    also throws away a value set in code. So setting ``numba.config.CACHE_DIR`` (or the variable)
    from fastseg_eval would be fragile once numba is imported, and would move every other
    library's cache too. Instead each kernel gets its own cache object whose location is resolved
    here, when the decorator runs; numba's global settings are read, never changed, and the
    order of imports does not matter.

When the cache cannot be used
    A cache directory that cannot be created or written, or an entry that cannot be read (a
    truncated or corrupt ``.nbi`` / ``.nbc``) never fails a run: the kernel is compiled in
    memory, as without a cache, and one line is logged (``fastseg_eval`` logger, warning level,
    once per process; never a Python warning, which ``-W error`` would turn into a failure). A
    broken index is rewritten on the next save, so the cache repairs itself.

Several processes (dask process workers, a cluster sharing one home directory)
    numbagg keeps numba's cache off because several processes writing one index "will likely
    cause segfaults". Decision: keep it on (every worker process would otherwise compile every
    kernel again, seconds each) and close the hole. numba writes each file to a temporary name
    and renames it over the old one (atomic), so no reader sees a half-written file. What can go
    wrong is a lost race: two processes give the same data file number to different entries, or
    machines with different CPUs share one cache; an index entry then points at code compiled for
    another signature or CPU, which numba would run. Here every data file also stores the full key
    it was saved under (signature, target CPU and features, bytecode hash), and a load whose key
    differs is treated as a miss (silently). Two processes updating one index at once can also
    drop an entry (the last rename wins). The worst case of a race is a recompilation.

Staleness
    numba invalidates an entry when the function's own source file changes, but a kernel's code
    also contains the helpers it calls from other files. Here the stamp also covers every module
    of ``fastseg_eval/kernels/``, so an upgrade or an edit there recompiles all kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numba
from numba.core import caching

__all__ = ["njit", "cache_dir"]

log = logging.getLogger("fastseg_eval")

APP = "fastseg-eval"
_KERNELS_DIR = Path(__file__).resolve().parent
_noted = threading.Event()
_note_lock = threading.Lock()
_IN_MEMORY = "kernels are compiled in memory (set NUMBA_CACHE_DIR to a writable directory to keep them)"


def _note(message: str) -> None:
    """Log ``message`` once per process: the first problem with the cache, the rest are alike."""
    with _note_lock:
        if _noted.is_set():
            return
        _noted.set()
    log.warning("note: %s", message)


def _user_cache_root() -> Path | None:
    """The platform's per-user cache directory (stdlib only), or None when there is none."""
    try:
        if sys.platform == "win32":
            base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        elif sys.platform == "darwin":
            base = str(Path.home() / "Library" / "Caches")
        else:
            xdg = os.environ.get("XDG_CACHE_HOME", "")
            base = xdg if os.path.isabs(xdg) else str(Path.home() / ".cache")  # XDG: relative is invalid
    except (RuntimeError, KeyError, OSError):  # no home directory
        return None
    return Path(base)


def cache_dir() -> Path | None:
    """Directory that holds fastseg-eval's compiled kernels (None: no usable location).

    ``$NUMBA_CACHE_DIR``, else ``numba.config.CACHE_DIR`` set in code, else the per-user
    cache directory's ``fastseg-eval/numba`` (see the module docstring).
    """
    user = os.environ.get("NUMBA_CACHE_DIR") or getattr(numba.config, "CACHE_DIR", "")
    if user:
        return Path(os.path.abspath(os.path.expanduser(user)))
    root = _user_cache_root()
    return None if root is None else root / APP / "numba"


@functools.lru_cache(maxsize=8)
def _kernels_stamp(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _mtime, _size in files:
        h.update(name.encode())
        with open(_KERNELS_DIR / name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _kernels_files() -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in sorted(_KERNELS_DIR.glob("*.py")):
        st = p.stat()
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class _Locator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Cache files under :func:`cache_dir`, never beside the source."""

    def __init__(self, py_func: Any, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        root = cache_dir()
        assert root is not None  # from_function checked
        self._cache_path = str(root / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self) -> Any:
        own = super().get_source_stamp()
        try:
            return (own, _kernels_stamp(_kernels_files()))
        except OSError:  # a frozen or zipped install: the function's own stamp
            return own

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> _Locator | None:
        if cache_dir() is None:
            return None
        return super().from_function(py_func, py_file)  # None when the directory is not writable


class _Impl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _CheckedCache(caching.FunctionCache):
    """numba's function cache, with each entry checked against its key and every failure a miss."""

    _impl_class = _Impl

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # a corrupt or foreign entry: compile instead
            _note(
                f"an unreadable entry in numba's cache {self._cache_path} ({type(e).__name__}: {e}) "
                "was compiled again and is replaced"
            )
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
            return
        except Exception:  # maybe an unreadable index: start a fresh one, then try once more
            pass
        try:
            self._cache_file.flush()
            super().save_overload(sig, data)
        except Exception as e:
            self.disable()
            _note(
                f"numba's cache {self._cache_path} cannot be written ({type(e).__name__}: {e}); {_IN_MEMORY}"
            )

    # numba's own _load_overload / _save_overload, with the key stored beside the data
    def _load_overload(self, sig: Any, target_context: Any) -> Any:
        if not self._enabled:
            return None
        key = self._index_key(sig, target_context.codegen())
        data = self._cache_file.load(key)
        if not (isinstance(data, tuple) and len(data) == 2 and data[0] == key):
            return None  # missing, or saved under another key by a process that lost a race
        return self._impl.rebuild(target_context, data[1])

    def _save_overload(self, sig: Any, data: Any) -> None:
        if not self._enabled or not self._impl.check_cachable(data):
            return
        self._impl.locator.ensure_cache_path()
        key = self._index_key(sig, data.codegen)
        self._cache_file.save(key, (key, self._impl.reduce(data)))


def _attach_cache(disp: Any) -> None:
    """Give dispatcher ``disp`` a cache under :func:`cache_dir`, or leave it without one."""
    try:
        # numba.config.CACHE_LOCATOR_CLASSES (NUMBA_CACHE_LOCATOR_CLASSES), an expert's explicit
        # choice, replaces _Locator here as it does in numba
        disp._cache = _CheckedCache(disp.py_func)
    except Exception as e:  # no writable location (numba: "no locator available"), or a numba change
        where = cache_dir()
        why = f"numba's cache directory {where} is not writable" if where is not None else "no home directory"
        _note(f"{why}; {_IN_MEMORY}")
        log.debug("numba cache for %s: %s: %s", getattr(disp, "__name__", disp), type(e).__name__, e)


def njit(*args: Any, cache: bool = False, **kwargs: Any) -> Any:
    """``numba.njit`` whose ``cache=True`` keeps the compiled code in :func:`cache_dir`.

    Used as ``@njit(nogil=True, cache=True)`` (or bare ``@njit``); other arguments go to numba.
    """
    if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], str):
        return njit(cache=cache)(args[0])  # bare @njit
    decorate = numba.njit(*args, **kwargs)

    def wrap(func: Any) -> Any:
        disp = decorate(func)
        if cache and hasattr(disp, "enable_caching"):  # not under NUMBA_DISABLE_JIT
            _attach_cache(disp)
        return disp

    return wrap
