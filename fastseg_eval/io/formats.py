"""Volumes stored in files: NIfTI, TIFF / OME-TIFF, ``.npy``, HDF5, NRRD / MetaImage.

:func:`open_file_path` recognises a path by its suffix (:data:`FILE_SUFFIXES`) and opens it
read-only with its reader. Opening reads the header only (shape, dtype, geometry); voxels are
read when the engine first asks for a region:

=================  ========================================================  ===================
format             voxels                                                    reader
=================  ========================================================  ===================
``.nii``           memory-mapped: any region, no copy                        nibabel (core)
``.nii.gz``        gzip-decoded whole on first read, once per volume         nibabel (core)
``.tif(f)``        uncompressed: memory-mapped; tiled or over 256 MiB: tile  tifffile (core)
                   by tile (tifffile's zarr store); otherwise whole, once
``.npy``           memory-mapped                                             numpy
``.h5``/``.hdf5``  contiguous: memory-mapped; chunked / compressed: by       h5py (``[hdf5]``)
                   region (``file.h5/path/to/dataset`` or a key)
``.nrrd``/``.mha`` decoded whole on first read                               SimpleITK (``[itk]``)
=================  ========================================================  ===================

gzip dominates a ``.nii.gz`` read: with python-isal installed (a core dependency) it is
inflated by ISA-L's igzip, 2-3x faster than zlib; otherwise by zlib.

Array axis order and geometry. NIfTI and ITK images are read with their axes reversed, the
order SimpleITK and nnU-Net use (``z, y, x`` for a 3-d image): that is the file's own memory
layout, so no copy is made. TIFF, HDF5 and ``.npy`` keep their stored order. ``spacing`` is
the voxel size per array axis; ``origin`` the world position of voxel ``(0, ..., 0)`` in the
file's world axes; ``direction`` each array axis's unit vector in world axes. They come from
the NIfTI affine and pixdims, ITK's spacing / origin / direction, TIFF resolution tags (or the
ImageJ / OME metadata, in micrometres), or an HDF5 dataset's ``element_size_um``,
``resolution`` or ``spacing`` attribute.

This module builds no :class:`~fastseg_eval.io.volume.Volume` (volume.py does, from the
:class:`OpenedFile` returned here), so the two modules import in one direction only.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseg_eval.errors import InputError

FORMATS: tuple[tuple[str, str], ...] = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".ome.tiff", "tiff"),
    (".ome.tif", "tiff"),
    (".tiff", "tiff"),
    (".tif", "tiff"),
    (".npy", "npy"),
    (".h5", "hdf5"),
    (".hdf5", "hdf5"),
    (".nrrd", "itk"),
    (".nhdr", "itk"),
    (".mha", "itk"),
    (".mhd", "itk"),
)
"""File suffixes (lower case, longest first where one ends another) and the reader of each."""

FILE_SUFFIXES = tuple(s for s, _ in FORMATS)

FORMAT_NAMES = {"nifti": "NIfTI", "tiff": "TIFF", "npy": "NumPy .npy", "hdf5": "HDF5", "itk": "NRRD / MetaImage"}

CASE_SUFFIXES = (".ome.zarr", ".zarr", ".zip", *FILE_SUFFIXES)
"""Suffixes a case id leaves out: ``case_001.nii.gz`` and ``case_001.zarr`` are case ``case_001``."""

EXTRAS = {"hdf5": ("h5py", "hdf5"), "itk": ("SimpleITK", "itk")}
"""Formats whose reader is an optional dependency: (module, pip extra)."""

WHOLE_READ_MAX = 256 << 20
"""Compressed, untiled TIFFs up to this many bytes are decoded whole; larger ones page by page."""


def file_format(path: str) -> str | None:
    """The reader for ``path`` by its suffix (``"nifti"``, ``"tiff"``, ...), or None."""
    low = path.lower().rstrip("/")
    for suffix, fmt in FORMATS:
        if low.endswith(suffix):
            return fmt
    return None


def case_id(name: str) -> str:
    """A case's id: its file or store name without the format suffix (``a.nii.gz`` -> ``a``)."""
    base = os.path.basename(name.rstrip("/\\"))
    low = base.lower()
    for suffix in CASE_SUFFIXES:
        if low.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


@dataclass
class OpenedFile:
    """What a file reader found: the array to read by region, its kind, and the geometry."""

    source: str
    kind: str  # "numpy" (an ndarray or memmap), "zarr" (tifffile's zarr store), "file" (read by region)
    array: Any
    key: str | None = None
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[tuple[float, ...], ...] | None = None
    geometry_source: str | None = None

    def geometry(self) -> dict[str, Any]:
        return {
            "spacing": self.spacing,
            "origin": self.origin,
            "direction": self.direction,
            "geometry_source": self.geometry_source,
        }


def require(module: str, fmt: str, label: str, path: str) -> Any:
    """Import an optional reader, or one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        _, extra = EXTRAS[fmt]
        raise InputError(
            f"{label}: {path} is a {FORMAT_NAMES[fmt]} file, which needs {module}: "
            f"pip install 'fastseg-eval[{extra}]' (or 'fastseg-eval[all]')"
        ) from None


def open_file_path(
    path: str, label: str, *, key: str | None = None, level: int | str | None = None, remote: bool = False
) -> OpenedFile | None:
    """Open ``path`` with its file reader, or None when it is not a file of a known format.

    ``label`` names the input in messages (``"pred (prediction)"``). An HDF5 dataset may be
    addressed inside the file (``seg.h5/volumes/labels``) or with ``key``.
    """
    fmt = file_format(path)
    if remote:
        if fmt is not None:
            raise InputError(
                f"{label}: {path}: {FORMAT_NAMES[fmt]} files are read from a local disk only; copy it first"
            )
        return None
    local = path[len("file://") :] if path.startswith("file://") else path
    if fmt is not None and os.path.isfile(local):
        return _OPENERS[fmt](local, label, key, level)
    inside = _split_file(local)
    if inside is not None:
        file, inner = inside
        if file_format(file) != "hdf5":
            raise InputError(
                f"{label}: {file} is a {FORMAT_NAMES.get(file_format(file) or '', 'plain')} file holding one "
                f"volume; {path} addresses nothing inside it"
            )
        return _open_hdf5(file, label, "/".join(p for p in (inner, key) if p) or None, level)
    if fmt is not None and not os.path.exists(local) and not os.path.islink(local):
        raise InputError(f"{label}: no such file: {local}")
    return None


def _split_file(path: str) -> tuple[str, str] | None:
    """``("a/b.h5", "grp/ds")`` for ``a/b.h5/grp/ds`` where ``a/b.h5`` is a file of a known format."""
    parts = path.replace("\\", "/").split("/")
    for i in range(1, len(parts)):
        head = "/".join(parts[:i])
        if head and file_format(head) is not None and os.path.isfile(head):
            return head, "/".join(p for p in parts[i:] if p)
    return None


def _no_key(fmt: str, label: str, path: str, key: str | None) -> None:
    if key:
        raise InputError(
            f"{label}: {path} is a {FORMAT_NAMES[fmt]} file holding one volume; the key {key!r} addresses "
            "nothing inside it (keys address arrays inside zarr stores and HDF5 files)"
        )


class Truncated(ValueError):
    """A file holds fewer voxels than its header promises."""


def _decode_error(label: str, path: str, e: BaseException) -> InputError:
    return InputError(
        f"{label}: cannot decode {path}: {type(e).__name__}: {e}; the file may be truncated or corrupted"
    )


def _native(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.isnative or dtype.itemsize == 1 else dtype.newbyteorder("=")


# ------------------------------------------------------------------ region readers (picklable)
class DecodedFile:
    """A volume decoded whole on first read, kept while the volume lives, then read by region.

    Memory: one decoded volume (what a whole-file format such as gzip NIfTI needs anyway).
    Pickles as the path and how to decode it (a dask worker decodes it again where it lands).
    """

    chunks = None

    def __init__(self, label: str, path: str, shape: tuple[int, ...], dtype: np.dtype, decode: Callable[[], np.ndarray]):
        self.label, self.path = label, path
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self._decode = decode
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        """The whole array (decoded now if not yet)."""
        with self._lock:
            if self._data is None:
                try:
                    data = self._decode()
                except (InputError, MemoryError, KeyboardInterrupt):
                    raise
                except Truncated as e:
                    raise InputError(f"{self.label}: {self.path} is truncated: {e}; copy it again") from e
                except Exception as e:
                    raise _decode_error(self.label, self.path, e) from e
                if tuple(data.shape) != self.shape:
                    raise InputError(
                        f"{self.label}: {self.path} decodes to shape {tuple(data.shape)}, but its header says "
                        f"{self.shape}; the file is corrupted"
                    )
                self._data = data if data.dtype == self.dtype else data.astype(self.dtype)
            return self._data

    def release(self) -> None:
        """Drop the decoded voxels (read again on next use)."""
        with self._lock:
            self._data = None

    def __getitem__(self, region: Any) -> np.ndarray:
        return self.load()[region]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.load()
        return a if dtype is None else a.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.path, "shape": self.shape, "dtype": self.dtype, "decode": self._decode}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["label"], st["path"], st["shape"], st["dtype"], st["decode"])

    def __repr__(self) -> str:
        return f"DecodedFile({self.path!r}, shape={self.shape}, dtype={self.dtype})"


class Swapped:
    """Region reads of a memory-mapped array in non-native byte order, converted to native order."""

    chunks = None

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = tuple(array.shape), _native(array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, region: Any) -> np.ndarray:
        return np.asarray(self.array[region]).astype(self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.array).astype(dtype or self.dtype)


class TiffTiles:
    """A tiled (or very large) TIFF read region by region through tifffile's zarr store.

    Every region decodes only the tiles (or strips) it touches; the file stays open while the
    volume lives. (Not a zarr volume to the engines: the store has no chunk listing, so zarr's
    "chunks not stored" count would be wrong.)
    """

    def __init__(self, label: str, path: str, tiles: Any, tiff: Any):
        self.label, self.path = label, path
        self._tiles, self._tiff = tiles, tiff
        self.shape, self.dtype = tuple(int(s) for s in tiles.shape), _native(np.dtype(tiles.dtype))
        self.chunks = tuple(int(c) for c in tiles.chunks)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, region: Any) -> np.ndarray:
        try:
            out = np.asarray(self._tiles[region])
        except Exception as e:
            raise _decode_error(self.label, self.path, e) from e
        return out.astype(self.dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[tuple(slice(0, n) for n in self.shape)]
        return a if dtype is None else a.astype(dtype)

    def __del__(self) -> None:
        tf = getattr(self, "_tiff", None)
        if tf is not None:
            try:
                tf.close()
            except Exception:  # interpreter shutdown
                pass


class HDF5Array:
    """A chunked or compressed HDF5 dataset read by region through h5py (one open handle per process).

    h5py serialises its calls with a global lock, so threads reading one file take turns;
    contiguous datasets are memory-mapped instead (see :func:`_open_hdf5`).
    """

    def __init__(self, label: str, path: str, key: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Any):
        self.label, self.path, self.key = label, path, key
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)
        self._file: Any = None
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, region: Any) -> np.ndarray:
        import h5py

        with self._lock:
            try:
                if self._file is None:
                    self._file = h5py.File(self.path, "r")
                out = self._file[self.key][region]
            except Exception as e:
                where = ", ".join(f"{s.start}:{s.stop}" for s in region) if isinstance(region, tuple) else str(region)
                raise InputError(
                    f"{self.label}: cannot read voxels [{where}] of {self.path}::{self.key}: {type(e).__name__}: "
                    f"{e}; the file may be truncated or corrupted"
                ) from e
        return np.asarray(out).astype(_native(out.dtype), copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[tuple(slice(0, n) for n in self.shape)]
        return a if dtype is None else a.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("label", "path", "key", "shape", "dtype", "chunks")}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["label"], st["path"], st["key"], st["shape"], st["dtype"], st["chunks"])

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            try:
                f.close()
            except Exception:  # interpreter shutdown: h5py may be gone already
                pass


def _memmap(path: str, dtype: np.dtype, offset: int, shape: tuple[int, ...], label: str, what: str) -> Any:
    """A read-only memory map of ``shape`` at ``offset``, after checking the file holds that many bytes."""
    need = offset + math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise InputError(
            f"{label}: {path} is truncated: {what} needs {need:,} bytes, the file has {size:,}; copy it again"
        )
    if math.prod(shape) == 0:
        arr = np.zeros(shape, dtype=dtype)
    else:
        arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return arr if dtype.isnative or dtype.itemsize == 1 else Swapped(arr)


# ---------------------------------------------------------------------------------- NIfTI
def inflate(data: bytes) -> bytes:
    """Decompress gzip data (every member), with ISA-L's igzip when installed, else zlib."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - python-isal is a core dependency
        import gzip

        return gzip.decompress(data)
    return igzip.decompress(data)


def _decode_nifti_gz(path: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    with open(path, "rb") as fh:
        raw = fh.read()
    data = inflate(raw) if raw[:2] == b"\x1f\x8b" else raw
    del raw
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if len(data) < offset + n * dt.itemsize:
        raise Truncated(
            f"its header asks for {n * dt.itemsize:,} bytes of voxels after byte {offset}, the decompressed file "
            f"has {len(data):,}"
        )
    arr = np.frombuffer(data, dtype=dt, count=n, offset=offset).reshape(shape)
    return arr if dt.isnative or dt.itemsize == 1 else arr.astype(_native(dt))


def _open_nifti(path: str, label: str, key: str | None, level: Any) -> OpenedFile:
    import nibabel as nib

    _no_key("nifti", label, path, key)
    try:
        img = nib.load(path)  # the header only (nibabel reads voxels lazily)
        hdr = img.header
        shape = tuple(int(s) for s in img.shape)
        proxy = img.dataobj  # where the voxels start (a loaded header may say vox_offset 0)
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
        if getattr(proxy, "order", "F") != "F":
            raise ValueError(f"voxel order {proxy.order!r} (NIfTI stores Fortran order)")
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in hdr.get_zooms()[: len(shape)])
    except Exception as e:
        raise InputError(
            f"{label}: cannot read the NIfTI header of {path}: {type(e).__name__}: {e}; the file may be "
            "truncated, corrupted or not NIfTI"
        ) from e
    if (slope is not None and slope != 1) or (inter is not None and inter != 0):
        raise InputError(
            f"{label}: {path} stores scaled values (scl_slope {slope}, scl_inter {inter}): its stored integers are "
            "not the labels. Save label images unscaled (slope 1, intercept 0)"
        )
    rshape = shape[::-1]  # the file is x-fastest (Fortran order): reversed axes read it in C order, no copy
    if path.lower().endswith(".gz"):
        decode = functools.partial(_decode_nifti_gz, path, offset, dtype.str, rshape)
        array: Any = DecodedFile(label, path, rshape, _native(dtype), decode)
        kind = "file"
    else:
        array = _memmap(path, dtype, offset, rshape, label, "its voxel data")
        kind = "numpy" if isinstance(array, np.ndarray) else "file"
    nd = len(shape)
    direction = None
    if nd <= 3:
        m = affine[:3, :3]
        cols = []
        for a in range(nd):
            c = m[:, nd - 1 - a]
            norm = float(np.linalg.norm(c))
            cols.append(tuple(float(x) for x in (c / norm if norm else c)))
        direction = tuple(cols)
    return OpenedFile(
        source=path, kind=kind, array=array, spacing=zooms[::-1], origin=tuple(float(x) for x in affine[:3, 3]),
        direction=direction, geometry_source="NIfTI header",
    )  # fmt: skip


# ----------------------------------------------------------------------------------- TIFF
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, "millimeter": 1000.0, "micrometer": 1.0, "nanometer": 1e-3}
_OME_UNITS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6}
_IMAGEJ_UNITS = {"micron": 1.0, "um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "mm": 1e3, "nm": 1e-3, "cm": 1e4}


def _tiff_spacing(tf: Any, series: Any) -> tuple[tuple[float, ...] | None, str | None]:
    """Voxel size per axis of ``series`` (micrometres when the file names a unit), and its source."""
    size: dict[str, float] = {}
    source = None
    try:
        if tf.is_ome and tf.ome_metadata:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(tf.ome_metadata)
            pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
            if pixels is not None:
                for ax in "XYZ":
                    v = pixels.get(f"PhysicalSize{ax}")
                    if v is not None:
                        size[ax] = float(v) * _OME_UNITS.get(pixels.get(f"PhysicalSize{ax}Unit", "µm"), 1.0)
                source = "OME-TIFF metadata (micrometres)"
        if not size:
            page = series.keyframe
            tags = page.tags
            if "XResolution" in tags and "YResolution" in tags:
                xres, yres = page.get_resolution()
                unit = getattr(page.resolutionunit, "name", str(page.resolutionunit)).lower()
                scale = _UM_PER_UNIT.get(unit)
                source = f"TIFF resolution ({unit})" if scale is None else "TIFF resolution (micrometres)"
                ij = tf.imagej_metadata if tf.is_imagej else None
                if ij:
                    scale = _IMAGEJ_UNITS.get(str(ij.get("unit", "")), scale)
                    if ij.get("spacing") is not None:
                        size["Z"] = float(ij["spacing"]) * (scale or 1.0)
                    source = "ImageJ metadata" + (" (micrometres)" if scale else "")
                if xres and yres:
                    size["X"], size["Y"] = (scale or 1.0) / float(xres), (scale or 1.0) / float(yres)
    except Exception:  # metadata we cannot read: no geometry, never a wrong one
        return None, None
    axes = series.axes
    if not size or any(ax not in size for ax in axes):
        return None, None
    return tuple(size[ax] for ax in axes), source


def _decode_tiff(path: str, level: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        if level:
            series = series.levels[level]
        return np.asarray(series.asarray(maxworkers=1))


def _open_tiff(path: str, label: str, key: str | None, level: Any) -> OpenedFile:
    import tifffile

    _no_key("tiff", label, path, key)
    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:
        raise InputError(
            f"{label}: cannot read {path} as TIFF: {type(e).__name__}: {e}; the file may be truncated or corrupted"
        ) from e
    keep_open = False
    try:
        if not tf.series:
            raise InputError(f"{label}: {path} holds no image")
        series = tf.series[0]
        lvl = 0
        if level is not None:
            levels = list(getattr(series, "levels", [series]))
            try:
                lvl = int(level)
                series = levels[lvl]
            except (ValueError, IndexError):
                raise InputError(
                    f"{label}: level {level!r} does not exist in {path}; it has {len(levels)} level(s) "
                    f"(0..{len(levels) - 1})"
                ) from None
        shape = tuple(int(s) for s in series.shape)
        dtype = np.dtype(series.dtype)
        if "S" in series.axes and shape[series.axes.index("S")] > 1:
            raise InputError(
                f"{label}: {path} is a colour image (axes {series.axes}, {shape[series.axes.index('S')]} samples per "
                "pixel), not a label image"
            )
        spacing, gsource = _tiff_spacing(tf, series)
        offset = series.dataoffset
        if offset is not None:  # uncompressed and contiguous: a memory map
            array: Any = _memmap(path, dtype, int(offset), shape, label, "its image data")
            kind = "numpy" if isinstance(array, np.ndarray) else "file"
        elif series.keyframe.is_tiled or math.prod(shape) * dtype.itemsize > WHOLE_READ_MAX:
            import zarr

            tiles = zarr.open_array(store=series.aszarr(), mode="r")  # tile by tile; the store keeps tf open
            array, kind, keep_open = TiffTiles(label, path, tiles, tf), "file", True
        else:
            array = DecodedFile(label, path, shape, _native(dtype), functools.partial(_decode_tiff, path, lvl))
            kind = "file"
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"{label}: cannot read {path} as TIFF: {type(e).__name__}: {e}; the file may be truncated or corrupted"
        ) from e
    finally:
        if not keep_open:
            tf.close()
    return OpenedFile(source=path, kind=kind, array=array, spacing=spacing, geometry_source=gsource)


# ------------------------------------------------------------------------------------ npy
def _open_npy(path: str, label: str, key: str | None, level: Any) -> OpenedFile:
    _no_key("npy", label, path, key)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InputError(
            f"{label}: cannot read {path}: {e}; a .npy of labels holds a plain integer array "
            "(saved with numpy.save), complete"
        ) from e
    except Exception as e:
        raise _decode_error(label, path, e) from e
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{label}: {path} holds no array")
    if not arr.dtype.isnative:
        return OpenedFile(source=path, kind="file", array=Swapped(arr))
    return OpenedFile(source=path, kind="numpy", array=arr)


# ----------------------------------------------------------------------------------- HDF5
_SPACING_ATTRS = ("element_size_um", "resolution", "spacing")


def _open_hdf5(path: str, label: str, key: str | None, level: Any) -> OpenedFile:
    h5py = require("h5py", "hdf5", label, path)
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise InputError(
            f"{label}: cannot open {path} as HDF5: {type(e).__name__}: {e}; the file may be truncated or corrupted"
        ) from e
    with f:
        if key:
            node = f.get(key)
            if node is None:
                raise InputError(f"{label}: {path} has no dataset {key!r}; it holds {_datasets_text(f, h5py)}")
            if not isinstance(node, h5py.Dataset):
                inner = _datasets(node, h5py)
                if len(inner) != 1:
                    raise InputError(
                        f"{label}: {path}::{key} is a group holding {_datasets_text(node, h5py)}; address one "
                        f"dataset, e.g. {path}/{key}/{inner[0] if inner else 'NAME'}"
                    )
                key = f"{key.rstrip('/')}/{inner[0]}"
                node = f[key]
        else:
            names = _datasets(f, h5py)
            if len(names) != 1:
                first = names[0] if names else "NAME"
                raise InputError(
                    f"{label}: {path} holds {_datasets_text(f, h5py)}; address one dataset, e.g. {path}/{first} "
                    "(or pass the key)"
                )
            key = names[0]
            node = f[key]
        shape = tuple(int(s) for s in node.shape)
        dtype = np.dtype(node.dtype)
        spacing = None
        for name in _SPACING_ATTRS:
            v = node.attrs.get(name)
            if v is not None:
                try:
                    vals = tuple(float(x) for x in np.ravel(v))
                except (TypeError, ValueError):
                    continue
                if len(vals) == len(shape):
                    spacing = vals
                    break
        offset = None
        if node.chunks is None and node.compression is None and not node.id.get_create_plist().get_nfilters():
            try:
                offset = node.id.get_offset()
            except Exception:  # not yet allocated, or external storage
                offset = None
        chunks = node.chunks
    source = f"{path}::{key}"
    geometry = {"spacing": spacing, "geometry_source": f"HDF5 attribute of {key}" if spacing else None}
    if offset is not None:
        array: Any = _memmap(path, dtype, int(offset), shape, label, f"dataset {key}")
        return OpenedFile(source=source, kind="numpy" if isinstance(array, np.ndarray) else "file", array=array,
                          key=key, **geometry)  # fmt: skip
    if math.prod(shape) == 0 or dtype.kind not in "biuf":
        with h5py.File(path, "r") as f:
            return OpenedFile(source=source, kind="numpy", array=np.asarray(f[key][()]), key=key, **geometry)
    return OpenedFile(source=source, kind="file", array=HDF5Array(label, path, key, shape, dtype, chunks), key=key,
                      **geometry)  # fmt: skip


def _datasets(group: Any, h5py: Any) -> list[str]:
    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(name)

    group.visititems(visit)
    return sorted(names)


def _datasets_text(group: Any, h5py: Any) -> str:
    names = _datasets(group, h5py)
    if not names:
        return "no dataset"
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"{len(names)} dataset{'s' if len(names) != 1 else ''} ({shown})"


# ---------------------------------------------------------------------- NRRD / MetaImage (ITK)
def _decode_itk(path: str) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _open_itk(path: str, label: str, key: str | None, level: Any) -> OpenedFile:
    sitk = require("SimpleITK", "itk", label, path)
    _no_key("itk", label, path, key)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        ncomp = int(reader.GetNumberOfComponents())
        spacing = tuple(float(s) for s in reader.GetSpacing())
        origin = tuple(float(s) for s in reader.GetOrigin())
        dmat = tuple(float(s) for s in reader.GetDirection())
        pixel = reader.GetPixelID()
        probe = sitk.Image([1] * len(size), pixel)
        dtype = np.dtype(sitk.GetArrayViewFromImage(probe).dtype)
    except Exception as e:
        raise InputError(
            f"{label}: cannot read the header of {path}: {type(e).__name__}: {e}; the file may be truncated or "
            "corrupted"
        ) from e
    nd = len(size)
    shape = size[::-1] + ((ncomp,) if ncomp > 1 else ())
    direction = tuple(
        tuple(dmat[r * nd + (nd - 1 - a)] for r in range(nd)) for a in range(nd)
    )  # column (nd-1-a) of the row-major matrix: the world direction of array axis a
    array = DecodedFile(label, path, shape, dtype, functools.partial(_decode_itk, path))
    return OpenedFile(
        source=path, kind="file", array=array, spacing=spacing[::-1], origin=origin, direction=direction,
        geometry_source="image header",
    )  # fmt: skip


_OPENERS: dict[str, Callable[[str, str, str | None, Any], OpenedFile]] = {
    "nifti": _open_nifti,
    "tiff": _open_tiff,
    "npy": _open_npy,
    "hdf5": _open_hdf5,
    "itk": _open_itk,
}
