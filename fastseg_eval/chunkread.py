"""Fast whole-chunk reads for the common zarr layouts, with zarr-python as the general path.

zarr-python spends about as long on each chunk's bookkeeping (event loop round trip, buffer
objects, a fresh output allocation) as on decompressing it, and its per-call work does not scale
across threads. For the layouts that dominate label volumes, a :class:`ChunkReader` reads the
chunk file itself and decodes it with the numcodecs codec zarr would use, in the calling thread
(numcodecs releases the GIL), into a buffer that thread reuses:

* a ``LocalStore`` (plain directory), not sharded;
* zarr v3: codecs ``bytes`` (native byte order) optionally followed by one of ``zstd``,
  ``blosc``, ``gzip``; zarr v2: no filters, C order, native byte order, any numcodecs compressor
  or none.

Anything else (other stores, sharding, filters, transposes, checksums, big-endian data) returns
``None`` from :func:`chunk_reader` and is read through zarr-python. A chunk file that does not
exist reads as the fill value, as in zarr.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from .errors import InputError


def chunk_reader(arr: Any, role: str, source: str) -> ChunkReader | None:
    """A :class:`ChunkReader` for zarr array ``arr``, or None if its layout needs zarr-python."""
    try:
        import zarr.storage

        store = arr.store
        if not isinstance(store, zarr.storage.LocalStore):
            return None
        root = os.path.join(str(store.root), arr.path) if arr.path else str(store.root)
        meta = arr.metadata
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in "biuf" or not dtype.isnative:
            return None
        codec = _v3_codec(meta, dtype) if arr.metadata.zarr_format == 3 else _v2_codec(meta, dtype)
        if codec is False:
            return None
        fill = arr.fill_value
        return ChunkReader(
            root=root, meta=meta, shape=tuple(arr.shape), chunks=tuple(arr.chunks), dtype=dtype,
            codec=codec, fill=0 if fill is None else fill, role=role, source=source,
        )  # fmt: skip
    except Exception:  # any surprise in metadata: let zarr-python read it
        return None


def _v3_codec(meta: Any, dtype: np.dtype) -> Any:
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

    codecs = tuple(meta.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return False
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if dtype.itemsize > 1 and endian not in (None, "little" if np.little_endian else "big"):
        return False
    if len(codecs) == 1:
        return None
    compressor = codecs[1]
    if isinstance(compressor, ZstdCodec) and not compressor.checksum:
        return numcodecs.Zstd()
    if isinstance(compressor, BloscCodec):
        return numcodecs.Blosc()
    if isinstance(compressor, GzipCodec):
        return numcodecs.GZip()
    return False


def _v2_codec(meta: Any, dtype: np.dtype) -> Any:
    if meta.filters or meta.order != "C":
        return False
    return meta.compressor  # a numcodecs codec, or None (raw chunks)


class ChunkReader:
    """Reads regions made of whole chunks (clipped at the array's edge) of one zarr array."""

    def __init__(self, *, root, meta, shape, chunks, dtype, codec, fill, role, source):
        self.root, self.meta, self.shape, self.chunks = root, meta, shape, chunks
        self.dtype, self.codec, self.fill, self.role, self.source = dtype, codec, fill, role, source
        self.chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
        self._local = threading.local()

    def _buffer(self) -> np.ndarray:
        """This thread's reusable chunk buffer (decoding into fresh memory costs page faults)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.chunks, dtype=self.dtype)
        return buf

    def _decode(self, coords: tuple[int, ...], out: np.ndarray) -> None:
        key = self.meta.encode_chunk_key(coords)
        path = os.path.join(self.root, *key.split("/"))
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            out[...] = self.fill
            return
        where = f"chunk {key} ({path})"
        try:
            if self.codec is None:
                raw = data
            else:
                raw = self.codec.decode(data, out=out.reshape(-1).view(np.uint8))
        except Exception as e:
            raise InputError(
                f"{self.role} ({self.source}): cannot decode {where}: {type(e).__name__}: {e}. "
                "The chunk file may be truncated or corrupted."
            ) from e
        nbytes = memoryview(raw).nbytes
        if nbytes != self.chunk_bytes:
            raise InputError(
                f"{self.role} ({self.source}): {where} holds {nbytes} bytes once decoded, not "
                f"{self.chunk_bytes}; the chunk file may be truncated or corrupted"
            )
        if self.codec is None or not np.shares_memory(np.frombuffer(raw, np.uint8), out):
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)

    def read(self, region: tuple[slice, ...], *, reuse: bool) -> np.ndarray:
        """Voxels of ``region``, whose bounds lie on the chunk grid (or the array's edge).

        With ``reuse``, a one-chunk region may come back as a view of this thread's buffer,
        valid until the thread's next ``reuse`` read of this array.
        """
        first = tuple(s.start // c for s, c in zip(region, self.chunks))
        last = tuple((s.stop - 1) // c for s, c in zip(region, self.chunks))
        if first == last:
            buf = self._buffer() if reuse else np.empty(self.chunks, dtype=self.dtype)
            self._decode(first, buf)
            return buf[
                tuple(slice(s.start - i * c, s.stop - i * c) for s, i, c in zip(region, first, self.chunks))
            ]
        out = np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        buf = self._buffer()
        for coords in np.ndindex(*(b - a + 1 for a, b in zip(first, last))):
            idx = tuple(a + d for a, d in zip(first, coords))
            self._decode(idx, buf)
            lo = [max(s.start, i * c) for s, i, c in zip(region, idx, self.chunks)]
            hi = [min(s.stop, (i + 1) * c) for s, i, c in zip(region, idx, self.chunks)]
            out[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, region))] = buf[
                tuple(slice(a - i * c, b - i * c) for a, b, i, c in zip(lo, hi, idx, self.chunks))
            ]
        return out
