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

from fastseg_eval.errors import InputError


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


def decode_into(codec: Any, data: bytes, out: np.ndarray) -> int:
    """Decode chunk file ``data`` into the uint8 buffer ``out``; return the bytes the codec produced.

    The count is what the encoded data holds, never the size of ``out``: a chunk that decodes to
    fewer bytes than the buffer must not pass with the tail of the buffer left over from the
    previous chunk. The caller compares it with the chunk's byte size and copies nothing more.

    * no codec: the file's length;
    * zstd: the frame header's content size (libzstd checks the frame against it while decoding
      in place); frames without a stated size, or several frames, decode into fresh memory;
    * blosc: the header's uncompressed and compressed sizes (the latter must equal the file);
    * gzip: bytes read until the end of the stream;
    * any other numcodecs codec (zarr v2): decoded into fresh memory, then copied.

    Nothing is written into ``out`` beyond the count returned; when the count differs from
    ``out.nbytes`` its contents are unspecified.
    """
    import numcodecs

    size = out.nbytes
    if codec is None:
        if len(data) == size:
            out[:] = np.frombuffer(data, np.uint8)
        return len(data)
    if isinstance(codec, numcodecs.Zstd):
        if _zstd_content_size(data) == size:
            codec.decode(data, out=out)
            return size
    elif isinstance(codec, numcodecs.Blosc):
        nbytes, cbytes = _blosc_sizes(data)
        if cbytes != len(data):
            raise ValueError(f"blosc header says {cbytes} compressed bytes, the file holds {len(data)}")
        if nbytes != size:
            return nbytes
        codec.decode(data, out=out)
        return size
    elif isinstance(codec, numcodecs.GZip):
        return _gunzip_into(data, out)
    raw = np.frombuffer(memoryview(codec.decode(data)).cast("B"), np.uint8)
    if raw.nbytes == size:
        out[:] = raw
    return raw.nbytes


def _zstd_content_size(data: bytes) -> int | None:
    """Content size in a zstd frame header (RFC 8878, 3.1.1.1), or None if absent or not zstd."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = data[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(data) < pos + width:
        return None
    value = int.from_bytes(data[pos : pos + width], "little")
    return value + 256 if width == 2 else value


def _blosc_sizes(data: bytes) -> tuple[int, int]:
    """(uncompressed, compressed) byte counts from a blosc 1 header (16 bytes, little endian)."""
    if len(data) < 16:
        raise ValueError(f"{len(data)} bytes are too few for a blosc header")
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")


def _gunzip_into(data: bytes, out: np.ndarray) -> int:
    """Inflate gzip ``data`` into ``out``; the byte count of the stream (``out.nbytes + 1`` if longer)."""
    import gzip
    import io

    view = memoryview(out)
    total = 0
    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as f:
        while total < out.nbytes:
            n = f.readinto(view[total:])
            if not n:
                return total
            total += n
        if f.read(1):
            return total + 1
    return total


class ChunkReader:
    """Reads regions made of whole chunks (clipped at the array's edge) of one zarr array."""

    def __init__(self, *, root, meta, shape, chunks, dtype, codec, fill, role, source):
        self.root, self.meta, self.shape, self.chunks = root, meta, shape, chunks
        self.dtype, self.codec, self.fill, self.role, self.source = dtype, codec, fill, role, source
        self.chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
        self._local = threading.local()

    def release(self) -> None:
        """Drop every thread's chunk buffer: the engine's threads outlive a run (a kept pool),
        and this reader may outlive it too until the garbage collector finds it."""
        self._local = threading.local()

    def _buffer(self) -> np.ndarray:
        """This thread's reusable chunk buffer (decoding into fresh memory costs page faults)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.chunks, dtype=self.dtype)
        return buf

    def _load(self, coords: tuple[int, ...]) -> tuple[bytes | None, str]:
        """The chunk file's bytes (None: not stored, it reads as the fill value) and its name."""
        key = self.meta.encode_chunk_key(coords)
        path = os.path.join(self.root, *key.split("/"))
        where = f"chunk {key} ({path})"
        try:
            with open(path, "rb") as fh:
                return fh.read(), where
        except FileNotFoundError:
            return None, where
        except OSError as e:  # a directory, a symlink loop, no permission: not a chunk we can read
            raise InputError(
                f"{self.role} ({self.source}): cannot read {where}: {e.strerror or e}. "
                "A chunk must be a readable file; repair or remove it (a missing chunk reads as the fill value)"
            ) from e

    def stored(self, region: tuple[slice, ...]) -> bool:
        """False when ``region`` is exactly one chunk and the store holds no file for it."""
        first = tuple(s.start // c for s, c in zip(region, self.chunks))
        if any(s.start != i * c or s.stop != min((i + 1) * c, n) for s, i, c, n in zip(region, first, self.chunks, self.shape)):
            return True
        key = self.meta.encode_chunk_key(first)
        return os.path.lexists(os.path.join(self.root, *key.split("/")))

    def _decode(self, coords: tuple[int, ...], out: np.ndarray, loaded: tuple[bytes | None, str] | None = None) -> None:
        data, where = self._load(coords) if loaded is None else loaded
        if data is None:
            out[...] = self.fill
            return
        flat = out.reshape(-1).view(np.uint8)
        try:
            nbytes = decode_into(self.codec, data, flat)
        except Exception as e:
            raise InputError(
                f"{self.role} ({self.source}): cannot decode {where}: {type(e).__name__}: {e}. "
                "The chunk file may be truncated or corrupted."
            ) from e
        if nbytes != self.chunk_bytes:
            raise InputError(
                f"{self.role} ({self.source}): {where} holds {nbytes} bytes once decoded, not the "
                f"{self.chunk_bytes} of a {'x'.join(map(str, self.chunks))} {self.dtype} chunk; the chunk "
                "file is truncated or corrupted, or the array's metadata (dtype, chunk shape) does not "
                "match its chunks"
            )

    def read(self, region: tuple[slice, ...], *, reuse: bool, constant: bool = False) -> np.ndarray:
        """Voxels of ``region``, whose bounds lie on the chunk grid (or the array's edge).

        With ``reuse``, a one-chunk region may come back as a view of this thread's buffer,
        valid until the thread's next ``reuse`` read of this array. With ``constant`` too, a
        one-chunk region whose chunk is not stored (zarr writes no file for a chunk that holds
        only the fill value) comes back as a read-only broadcast of the fill value (all strides
        0): nothing is read, decoded or filled.
        """
        first = tuple(s.start // c for s, c in zip(region, self.chunks))
        last = tuple((s.stop - 1) // c for s, c in zip(region, self.chunks))
        if first == last:
            loaded = self._load(first)
            if loaded[0] is None and reuse and constant:
                return np.broadcast_to(np.array(self.fill, dtype=self.dtype), tuple(s.stop - s.start for s in region))
            buf = self._buffer() if reuse else np.empty(self.chunks, dtype=self.dtype)
            self._decode(first, buf, loaded)
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
