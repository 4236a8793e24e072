"""Locators: how a dask worker reopens a zarr input itself, so that no voxel data travels.

A :class:`Locator` names a store (local directory, zip file or fsspec URL), the node inside it
and its storage options; :class:`ZarrSource` is what counting tasks carry: the locator, the
shape and dtype the client saw (checked again on the worker), and the open array only in the
process that made it. Open handles are cached per process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseg_eval.errors import InputError
from fastseg_eval.io.volume import Volume


@dataclass(frozen=True)
class Locator:
    """Where a zarr array lives, in a form any worker can reopen: never the data itself."""

    store: str  # "local" | "zip" | "fsspec"
    location: str  # directory, zip file or URL of the store root
    path: str  # node path of the array inside the store ("" for a root array)
    storage_options: tuple[tuple[str, Any], ...] = ()

    def open(self) -> Any:
        import zarr
        import zarr.storage

        if self.store == "local":
            store: Any = zarr.storage.LocalStore(self.location, read_only=True)
        elif self.store == "zip":
            store = zarr.storage.ZipStore(self.location, mode="r")
        else:
            store = zarr.storage.FsspecStore.from_url(
                self.location, storage_options=dict(self.storage_options) or None, read_only=True
            )
        return zarr.open_array(store=store, path=self.path or None, mode="r")

    def describe(self) -> str:
        return f"{self.location}" + (f" (node {self.path})" if self.path else "")

    def cache_key(self) -> tuple[str, str, str, str]:
        # storage option values may be unhashable (nested dicts): key on their repr
        return (self.store, self.location, self.path, repr(self.storage_options))


def locate(vol: Volume) -> Locator | None:
    """A :class:`Locator` for a zarr volume, or None when its store cannot be reopened elsewhere
    (an in-memory store, a wrapper store)."""
    import zarr.storage

    arr = vol.array
    store = arr.store
    node = str(arr.path or "")
    if isinstance(store, zarr.storage.LocalStore):
        return Locator("local", os.path.abspath(store.root), node)
    if isinstance(store, zarr.storage.ZipStore):
        return Locator("zip", os.path.abspath(store.path), node)
    if isinstance(store, zarr.storage.FsspecStore):
        remote = vol.url is not None and "://" in vol.url and not vol.url.startswith("file://")
        if remote:
            url, opts = vol.url, dict(vol.storage_options or {})
        else:
            url = store.fs.unstrip_protocol(store.path)
            opts = {k: v for k, v in (store.fs.storage_options or {}).items() if k != "asynchronous"}
        return Locator("fsspec", str(url), node, tuple(sorted(opts.items())))
    return None


_OPEN: dict[tuple[str, str, str, str], Any] = {}
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 64


class ZarrSource:
    """A zarr input as tasks see it: the locator, the expected shape and dtype, and (only in
    the process that made it) the already-open array. Pickles to the locator alone."""

    def __init__(self, vol: Volume, locator: Locator | None):
        self.role, self.source, self.locator = vol.role, vol.source, locator
        self.shape, self.dtype = vol.shape, vol.dtype  # of the stored array, to check a reopened one
        self.chunks = vol.spatial_chunks  # the grid units are planned on (no channel axis)
        self.channel_axis = vol.channel_axis
        self._array = vol.array

    def __getstate__(self) -> dict[str, Any]:
        st = dict(self.__dict__)
        if self.locator is not None:
            st["_array"] = None  # reopened by path on the other side
        return st

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__dict__.update(st)

    def _open(self, fresh: bool = False) -> Any:
        if self._array is not None and not fresh:
            return self._array
        loc = self.locator
        assert loc is not None
        with _OPEN_LOCK:
            arr = None if fresh else _OPEN.get(loc.cache_key())
        if arr is None:
            try:
                arr = loc.open()
            except Exception as e:
                raise InputError(
                    f"{self.role} ({self.source}): cannot open {loc.describe()} on worker {_worker_name()}: "
                    f"{type(e).__name__}: {e}. The store must be reachable from every worker "
                    "(a shared filesystem path, or an object-store URL with storage options)"
                ) from e
            with _OPEN_LOCK:
                if len(_OPEN) >= _OPEN_MAX:
                    _OPEN.pop(next(iter(_OPEN)))
                _OPEN[loc.cache_key()] = arr
        if tuple(arr.shape) != self.shape or np.dtype(arr.dtype) != self.dtype:
            if not fresh:
                return self._open(fresh=True)  # a stale handle of a rewritten store
            raise InputError(
                f"{self.role} ({self.source}): on worker {_worker_name()} the array has shape "
                f"{tuple(arr.shape)} and dtype {arr.dtype}, not {self.shape} {self.dtype} as on the "
                "client; the store changed during the run or the worker sees a different copy"
            )
        return arr

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray:
        """Voxels of ``region`` (a tuple of slices) as a numpy array."""
        arr = self._open()
        ax = self.channel_axis
        try:
            if ax is None:
                return np.asarray(arr[region])
            # a probability map: every channel, channel axis last (as Volume.read)
            return np.moveaxis(np.asarray(arr[region[:ax] + (slice(None),) + region[ax:]]), ax, -1)
        except Exception as e:  # a codec or store error: name the input and the region
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InputError(
                f"{self.role} ({self.source}): cannot read voxels [{where}] on worker {_worker_name()}: "
                f"{type(e).__name__}: {e}. The chunk file may be truncated or corrupted."
            ) from e


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "(local)"
