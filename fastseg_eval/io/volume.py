"""Inputs: open numpy / dask / zarr arrays and zarr paths or URLs read-only, and validate them.

A path may address a node inside a store (``pred.zarr/labels/cells/0``), a store inside a zip
file (``pred.zip`` or ``pred.zip/seg``), or an OME-Zarr image or label group, whose
full-resolution level is chosen unless ``level`` says otherwise.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastseg_eval.errors import InputError, option

ROLES = {"pred": "prediction", "gt": "ground truth", "mask": "mask"}


@dataclass
class Volume:
    """One input volume and where it came from."""

    role: str
    source: str
    kind: str  # "numpy" | "zarr" | "dask" | "cuda" (an array already on the GPU) | "file" (io.formats: read by region)
    array: Any
    url: str | None = None  # the store's address, for reopening on dask workers
    key: str | None = None  # node path inside the store
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    channel_axis: int | None = None  # probability maps: the class axis, moved last when read
    spacing: tuple[float, ...] | None = None  # physical voxel size per array axis (file header, OME-Zarr scale)
    origin: tuple[float, ...] | None = None  # world position of voxel (0, ..., 0) (file header; world axes)
    direction: tuple[tuple[float, ...], ...] | None = None  # per array axis: its unit vector in world axes
    geometry_source: str | None = None  # where spacing / origin / direction come from ("NIfTI header", ...)
    _reader: Any = field(default=False, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "cuda" and hasattr(self.array, "__cuda_array_interface__"):
            return tuple(int(s) for s in self.array.__cuda_array_interface__["shape"])
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape without the channel axis (the grid the engine plans over)."""
        s = self.shape
        return s if self.channel_axis is None else s[: self.channel_axis] + s[self.channel_axis + 1 :]

    @property
    def spatial_chunks(self) -> tuple[int, ...] | None:
        c = self.chunks
        if c is None or self.channel_axis is None:
            return c
        return c[: self.channel_axis] + c[self.channel_axis + 1 :]

    @property
    def dtype(self) -> np.dtype:
        if self.kind == "cuda" and hasattr(self.array, "__cuda_array_interface__"):
            return np.dtype(self.array.__cuda_array_interface__["typestr"])  # torch dtypes are not numpy's
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Regular chunk shape of a zarr array, None otherwise (dask chunks: ``array.chunks``)."""
        if self.kind == "zarr":
            return tuple(int(c) for c in self.array.chunks)
        return None

    def describe(self) -> dict[str, Any]:
        chunks: Any = self.chunks
        if self.kind == "dask":
            chunks = [list(c) for c in self.array.chunks]
        return {"source": self.source, "shape": list(self.shape), "dtype": str(self.dtype), "chunks": chunks}

    def missing_chunks(self) -> tuple[int, int] | None:
        """(chunks not stored, chunks in all) of a zarr array, None for other inputs.

        A chunk that was never written (zarr skips chunks equal to the fill value) reads as the
        fill value; reports say how many there were. For sharded arrays the count is of shards'
        chunks as zarr-python counts them. Listing the store costs one directory walk.
        """
        if self.kind != "zarr":
            return None
        try:
            total = int(self.array.nchunks)
            return total - int(self.array.nchunks_initialized), total
        except Exception:  # a store that cannot be listed: say nothing rather than guess
            return None

    def unstored(self, region: tuple[slice, ...]) -> bool:
        """Whether ``region`` is one chunk of a zarr array (read by the fast reader) that the
        store does not hold: it reads as the fill value."""
        if self.kind != "zarr" or self.channel_axis is not None:
            return False
        reader = self._fast_reader()
        return reader is not None and not reader.stored(region)

    def release_buffers(self) -> None:
        """Drop the per-thread read buffers of a zarr array's chunk reader (the end of a run)."""
        if self._reader:
            self._reader.release()

    def _fast_reader(self) -> Any:
        """The chunk reader of a zarr array (None when its layout needs zarr-python)."""
        if self._reader is False:
            from fastseg_eval.io.chunkread import chunk_reader

            self._reader = chunk_reader(self.array, self.role, self.source)
        return self._reader

    def read(self, region: tuple[slice, ...], *, reuse: bool = False, constant: bool = False) -> np.ndarray:
        """Voxels of ``region`` (spatial) as a numpy array (a view for numpy inputs).

        With a channel axis, every channel is read and the channel axis is moved last. With
        ``reuse``, the result may live in a buffer the calling thread reuses for its next
        ``reuse`` read of this volume (the engine counts a unit before reading the next). With
        ``constant`` too, a region that is one chunk the store does not hold may come back as a
        read-only broadcast of the fill value (all strides 0), read and decoded not at all.
        """
        if self.channel_axis is not None:
            ax = self.channel_axis
            full = region[:ax] + (slice(0, self.shape[ax]),) + region[ax:]
            return np.moveaxis(self._read(full, reuse), ax, -1)
        return self._read(region, reuse, constant)

    def _read(self, region: tuple[slice, ...], reuse: bool = False, constant: bool = False) -> np.ndarray:
        if self.kind == "numpy":
            return self.array[region]
        if self.kind == "zarr":
            if self._fast_reader() is not None and all(
                s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
                for s, c, n in zip(region, self.array.chunks, self.shape)
            ):
                return self._reader.read(region, reuse=reuse, constant=constant)
        try:
            out = self.array[region]
        except InputError:  # a file reader's own message (io.formats) names the input already
            raise
        except Exception as e:  # a codec or store error: name the chunk and the input
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InputError(
                f"{self.role} ({self.source}): cannot read voxels [{where}]: {type(e).__name__}: {e}. "
                "The chunk file may be truncated or corrupted."
            ) from e
        return np.asarray(out)


def _is_device_array(obj: Any) -> bool:
    """Arrays already on a GPU: numba device arrays (also the simulator's), CuPy, torch CUDA tensors."""
    return bool(getattr(obj, "__cuda_ndarray__", False)) or hasattr(obj, "__cuda_array_interface__")


def _is_dask(obj: Any) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - dask is a core dependency
        return False
    return isinstance(obj, da.Array)


def open_volume(
    obj: Any,
    role: str,
    *,
    key: str | None = None,
    level: int | str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Volume:
    """Wrap ``obj`` (array, dask array, zarr array or group, path or URL) as a read-only :class:`Volume`."""
    import zarr

    if isinstance(obj, Volume):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return _open_path(os.fspath(obj), role, key=key, level=level, storage_options=storage_options)
    if _is_dask(obj):
        return Volume(role, f"dask array {obj.shape} {obj.dtype}", "dask", obj)
    if _is_device_array(obj):
        v = Volume(role, "", "cuda", obj)
        v.source = f"GPU array {v.shape} {v.dtype}"
        return v
    if isinstance(obj, zarr.Array):
        return _zarr_volume(obj, role, _zarr_source(obj), None, None, storage_options)
    if isinstance(obj, zarr.Group):
        arr, inner = _resolve_group(obj, role, _zarr_source(obj), key, level)
        return _zarr_volume(arr, role, _zarr_source(arr), None, None, storage_options)
    try:
        arr = np.asarray(obj)
    except Exception as e:
        raise InputError(
            f"{role}: cannot use an object of type {type(obj).__name__} as a volume ({e})"
        ) from e
    if arr.dtype == object:
        raise InputError(f"{role}: an object of type {type(obj).__name__} is not an array of labels")
    return Volume(role, f"numpy array {arr.shape} {arr.dtype}", "numpy", arr)


def _zarr_source(arr: Any) -> str:
    try:
        return f"{arr.store}/{arr.path}".rstrip("/") if arr.path else str(arr.store)
    except Exception:  # pragma: no cover - exotic stores
        return "zarr array"


def _zarr_volume(arr, role, source, url, key, storage_options) -> Volume:
    v = Volume(role, source, "zarr", arr, url=url, key=key, storage_options=storage_options)
    scale = _ome_scale(arr)
    if scale is not None:
        v.spacing, v.geometry_source = scale, "OME-Zarr scale"
    return v


def _ome_scale(arr: Any) -> tuple[float, ...] | None:
    """Voxel size of a multiscale level: its dataset's ``coordinateTransformations`` scale (times the
    multiscale's own, if any) from the parent group's OME-Zarr metadata; None if there is none."""
    import zarr

    path = str(getattr(arr, "path", "") or "")
    if not path:
        return None
    parent, _, name = path.rpartition("/")
    try:
        group = zarr.open_group(store=arr.store, path=parent, mode="r")
        multiscales = _ome_multiscales(dict(group.attrs)) or []
    except Exception:  # no parent group, or one zarr cannot read: no scale
        return None

    def scale_of(transforms: Any) -> list[float] | None:
        for t in transforms if isinstance(transforms, list) else []:
            if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
                return [float(x) for x in t["scale"]]
        return None

    for ms in multiscales:
        for d in ms.get("datasets") or []:
            if isinstance(d, dict) and str(d.get("path")) == name:
                scale = scale_of(d.get("coordinateTransformations"))
                top = scale_of(ms.get("coordinateTransformations"))
                if scale is not None and top is not None and len(top) == len(scale):
                    scale = [a * b for a, b in zip(scale, top)]
                if scale is None or len(scale) != len(arr.shape) or not all(x > 0 for x in scale):
                    return None
                return tuple(scale)
    return None


def _split_zip(path: str) -> tuple[str, str] | None:
    """``("a/b.zip", "inner/key")`` for ``a/b.zip/inner/key``; None if no component ends in .zip.

    A component ending in ``.zip`` that is a directory (a directory store named ``x.zip``, or a
    folder ``run.zip/`` holding stores) is a path component like any other.
    """
    parts = path.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part.lower().endswith(".zip") and not os.path.isdir("/".join(parts[: i + 1]) or "/"):
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def _open_path(
    path: str,
    role: str,
    *,
    key: str | None,
    level: int | str | None,
    storage_options: dict[str, Any] | None,
) -> Volume:
    import zarr
    import zarr.storage

    from fastseg_eval.io.formats import open_file_path

    label = f"{role} ({ROLES.get(role, role)})"
    remote = "://" in path and not path.startswith("file://")
    local = path[len("file://") :] if path.startswith("file://") else path
    store: Any
    inner = key or ""
    # NIfTI, TIFF, .npy, HDF5, NRRD / MHA: readers of their own (io.formats)
    opened = open_file_path(path, label, key=key, level=level, remote=remote)
    if opened is not None:
        return Volume(role, opened.source, opened.kind, opened.array, key=opened.key, **opened.geometry())
    zip_parts = None if remote else _split_zip(local)
    try:
        if zip_parts is not None:
            zpath, zkey = zip_parts
            if not os.path.isfile(zpath):
                raise InputError(f"{label}: no such zip file: {zpath}")
            store = zarr.storage.ZipStore(zpath, mode="r")
            inner = "/".join(p for p in (zkey, inner) if p)
        elif remote:
            store = zarr.storage.FsspecStore.from_url(path, storage_options=storage_options, read_only=True)
        else:
            if not os.path.exists(local):
                if os.path.islink(local) or _is_symlink_loop(local):
                    raise InputError(
                        f"{label}: {local} is a symbolic link whose target does not exist or loops back "
                        f"on itself ({_link_chain(local)}); point it at the zarr store"
                    )
                raise InputError(f"{label}: no such file or directory: {local}")
            if os.path.isfile(local):
                raise InputError(
                    f"{label}: {local} is a file, not a zarr store (expected a directory with zarr.json, "
                    ".zarray or .zgroup, a .zip store, or a file ending in " + _file_suffixes() + ")"
                )
            store = zarr.storage.LocalStore(local, read_only=True)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{label}: cannot open {path}: {type(e).__name__}: {e}") from e
    try:
        node = zarr.open(store=store, mode="r", path=inner or None)
    except Exception as e:
        where = f"{path}" + (f" (key {inner!r})" if inner and zip_parts is None else "")
        if isinstance(e, (FileNotFoundError, KeyError)) or type(e).__name__ in (
            "NodeNotFoundError",
            "GroupNotFoundError",
            "ArrayNotFoundError",
        ):
            raise InputError(
                f"{label}: {where} is not a zarr array or group (no zarr.json, .zarray or .zgroup there)"
            ) from e
        raise InputError(f"{label}: cannot read zarr metadata of {where}: {type(e).__name__}: {e}") from e
    source = path if not inner or zip_parts is not None else f"{path}::{inner}"
    if isinstance(node, zarr.Group):
        node, sub = _resolve_group(node, role, source, None, level)
        if sub:
            inner = "/".join(p for p in (inner, sub) if p)
            source = f"{source}/{sub}" if "::" not in source else f"{source}/{sub}"
    return _zarr_volume(node, role, source, path, inner or None, storage_options)


def _file_suffixes() -> str:
    from fastseg_eval.io.formats import FILE_SUFFIXES

    return ", ".join(FILE_SUFFIXES)


def _is_symlink_loop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _link_chain(path: str) -> str:
    """``a -> b -> a`` (at most a few steps) for a message about a broken or looping link."""
    chain, seen, cur = [path], {path}, path
    while os.path.islink(cur) and len(chain) < 6:
        cur = os.path.join(os.path.dirname(cur), os.readlink(cur))
        chain.append(cur)
        if cur in seen:
            break
        seen.add(cur)
    return " -> ".join(chain)


def _member(group: Any, name: str, label: str, source: str, what: str) -> Any:
    """``group[name]``, or one clear error when the metadata names a member the store lacks."""
    try:
        return group[name]
    except KeyError:
        raise InputError(
            f"{label}: {source} lists {what} {name!r} in its metadata, but {source}/{name} does not exist; "
            "the store is incomplete (copy it again) or its metadata is wrong"
        ) from None


def _ome_multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    ms = ome.get("multiscales") if isinstance(ome, dict) else None
    return ms if isinstance(ms, list) and ms else None


def _ome_labels(attrs: dict[str, Any]) -> list[str] | None:
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    labels = ome.get("labels") if isinstance(ome, dict) else None
    return [str(x) for x in labels] if isinstance(labels, list) else None


def _resolve_group(
    group: Any, role: str, source: str, key: str | None, level: int | str | None
) -> tuple[Any, str]:
    """The array a group stands for, and its path relative to the group."""
    import zarr

    label = f"{role} ({ROLES.get(role, role)})"
    if key:
        try:
            node = group[key]
        except KeyError:
            raise InputError(f"{label}: {source} has no member {key!r}") from None
        if isinstance(node, zarr.Array):
            return node, key
        arr, sub = _resolve_group(node, role, f"{source}/{key}", None, level)
        return arr, f"{key}/{sub}"
    attrs = dict(group.attrs)
    names = _ome_labels(attrs)
    # an OME-Zarr image that carries label images: evaluate a label image, never its intensities
    if names is None and "labels" in group and isinstance(group["labels"], zarr.Group):
        names = _ome_labels(dict(group["labels"].attrs))
        if names is not None:
            if len(names) == 1:
                arr, sub = _resolve_group(
                    _member(group["labels"], names[0], label, f"{source}/labels", "the label image"),
                    role, f"{source}/labels/{names[0]}", None, level,
                )  # fmt: skip
                return arr, f"labels/{names[0]}/{sub}"
            raise InputError(
                f"{label}: {source} is an OME-Zarr image with {len(names)} label images ({', '.join(names)}); "
                f"address one, e.g. {source}/labels/{names[0]}"
            )
    ms = _ome_multiscales(attrs)
    if ms is not None:
        datasets = ms[0].get("datasets") or []
        paths = [str(d.get("path")) for d in datasets if isinstance(d, dict) and "path" in d]
        if not paths:
            raise InputError(f"{label}: {source} has OME-Zarr multiscales metadata without datasets")
        if level is None:
            chosen = paths[0]
        elif isinstance(level, int) or (isinstance(level, str) and level.isdigit() and level not in paths):
            i = int(level)
            if not 0 <= i < len(paths):
                raise InputError(
                    f"{label}: level {i} does not exist in {source}; it has {len(paths)} levels (0..{len(paths) - 1})"
                )
            chosen = paths[i]
        elif str(level) in paths:
            chosen = str(level)
        else:
            raise InputError(f"{label}: level {level!r} is not one of {paths} in {source}")
        node = _member(group, chosen, label, source, "the multiscale level")
        if not isinstance(node, zarr.Array):
            raise InputError(f"{label}: {source}/{chosen} (a multiscale level) is not an array")
        return node, chosen
    if names is not None:  # the labels group itself
        if len(names) == 1:
            arr, sub = _resolve_group(
                _member(group, names[0], label, source, "the label image"), role, f"{source}/{names[0]}", None, level
            )
            return arr, f"{names[0]}/{sub}"
        raise InputError(
            f"{label}: {source} holds {len(names)} label images ({', '.join(names)}); address one, e.g. {source}/{names[0]}"
        )
    arrays = sorted(name for name, _ in group.arrays())
    if len(arrays) == 1:
        return group[arrays[0]], arrays[0]
    groups = sorted(name for name, _ in group.groups())
    if not arrays:
        inside = f" (it holds groups: {', '.join(groups[:10])})" if groups else " (it is empty)"
        raise InputError(
            f"{label}: {source} is a zarr group with no array{inside}; address an array inside it"
        )
    raise InputError(
        f"{label}: {source} is a zarr group with {len(arrays)} arrays ({', '.join(arrays[:10])}); "
        f"address one, e.g. {source}/{arrays[0]}"
    )


def check_volumes(
    pred: Volume, gt: Volume, mask: Volume | None, *, pred_shape: tuple[int, ...] | None = None
) -> None:
    """Shapes and dtypes that can be counted together; raises :class:`InputError` otherwise."""
    ps = pred_shape if pred_shape is not None else pred.shape
    gs = tuple(gt.shape)
    channel_axes = [
        a for a in range(len(ps)) if pred_shape is None and tuple(ps[:a]) + tuple(ps[a + 1 :]) == gs
    ]
    if channel_axes:  # one axis more than gt: a per-class probability map read as labels
        a = channel_axes[0]
        raise InputError(
            f"prediction shape {ps} ({pred.source}) has one axis more than ground-truth shape {gt.shape} "
            f"({gt.source}): if pred holds one probability per class along axis {a}, pass "
            f"{option('channel_axis', a)}"
        )
    if ps != gt.shape:
        raise InputError(
            f"prediction shape {ps} ({pred.source}) differs from ground-truth shape {gt.shape} ({gt.source}); "
            "they must match voxel for voxel (check the order PRED GT and any level / key)"
        )
    for v in (gt, pred) if pred_shape is None else (gt,):
        if v.dtype.kind not in "iub":
            hint = (
                f" For probability maps pass {option('threshold', '')} (binary) or "
                f"{option('channel_axis', '')} (argmax)."
                if v.dtype.kind == "f" and v.role == "pred"
                else ""
            )
            raise InputError(
                f"{v.role} ({v.source}) has dtype {v.dtype}: labels must be integers or bool.{hint}"
            )
    if mask is not None:
        if mask.shape != gt.shape:
            raise InputError(
                f"mask shape {mask.shape} ({mask.source}) differs from the volumes' shape {gt.shape}"
            )
        if mask.dtype.kind not in "iub":
            raise InputError(
                f"mask ({mask.source}) has dtype {mask.dtype}: a mask must be bool or integer (nonzero = count)"
            )


def check_chunks(vols: Sequence[Volume | None], workers: int, memory_limit: Any = None) -> None:
    """Chunk grids that can be read: no zero-length chunk axis, and chunks that fit in memory.

    Each worker decodes whole chunks (pred, gt and mask at once, plus a chunk cache on
    misaligned grids), so a chunk of several GiB cannot be read by any number of workers; the
    message says so instead of running out of memory half-way.
    """
    from fastseg_eval.memory import format_bytes, memory_budget

    need = 0
    for v in vols:
        if v is None or v.kind != "zarr":
            continue
        chunks = v.chunks or ()
        if any(c <= 0 for c in chunks):
            raise InputError(
                f"{v.role} ({v.source}) has chunk shape {tuple(chunks)} in its metadata: every chunk axis "
                "must be at least 1; the array's metadata is corrupt"
            )
        need += 2 * math.prod(chunks) * v.dtype.itemsize  # a decoded chunk and a region buffer
    budget, origin = memory_budget(memory_limit)
    if need and need * max(workers, 1) > budget:
        shapes = ", ".join(
            f"{v.role} {'x'.join(map(str, v.chunks or ()))} {v.dtype}" for v in vols if v is not None and v.kind == "zarr"
        )
        if need > budget:
            what = "even one worker cannot decode them; rechunk the store to smaller chunks (e.g. 128^3)"
        else:
            what = (
                f"use at most {budget // need} {option('workers')} or rechunk the store to smaller chunks (e.g. 128^3)"
            )
        raise InputError(
            f"the chunks ({shapes}) need about {format_bytes(need)} per worker to decode; with {workers} "
            f"worker(s) that exceeds the memory budget of {format_bytes(budget)} ({origin}): {what}, or raise "
            f"{option('memory_limit', '')}"
        )
