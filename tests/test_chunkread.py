"""The fast chunk reader returns exactly what zarr-python returns, or declines the layout."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, ZstdCodec

import fastseg_eval as fse
from fastseg_eval.io.chunkread import chunk_reader

SHAPE, CHUNKS = (13, 10, 7), (5, 4, 7)
REGIONS = [
    (slice(0, 5), slice(0, 4), slice(0, 7)),  # one interior chunk
    (slice(10, 13), slice(8, 10), slice(0, 7)),  # the corner edge chunk
    (slice(5, 13), slice(0, 10), slice(0, 7)),  # several chunks, to the edge
    (slice(0, 13), slice(0, 10), slice(0, 7)),  # everything
]


def data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "b":
        return rng.random(SHAPE) < 0.4
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    hi = 50 if info is None else min(int(info.max), 1000)
    return rng.integers(0, hi, SHAPE).astype(dtype)


def v3(path, a, compressors, fill=0):
    z = zarr.create_array(
        path, shape=a.shape, chunks=CHUNKS, dtype=a.dtype, compressors=compressors, fill_value=fill
    )
    z[:] = a
    return zarr.open_array(path, mode="r")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64, np.float32, bool])
@pytest.mark.parametrize("compressor", ["zstd", "blosc", "gzip", None])
def test_v3_reads_equal_zarr(tmp_path, dtype, compressor):
    codecs = {"zstd": ZstdCodec(), "blosc": BloscCodec(), "gzip": GzipCodec(), None: None}[compressor]
    a = data(dtype)
    z = v3(tmp_path / "a.zarr", a, codecs)
    r = chunk_reader(z, "gt", "a.zarr")
    assert r is not None
    for reg in REGIONS:
        for reuse in (True, False):
            np.testing.assert_array_equal(r.read(reg, reuse=reuse), z[reg])


@pytest.mark.parametrize(
    "compressor", [numcodecs.Zstd(), numcodecs.Blosc(), numcodecs.GZip(), numcodecs.LZ4(), None]
)
@pytest.mark.parametrize("separator", [".", "/"])
def test_v2_reads_equal_zarr(tmp_path, compressor, separator):
    a = data(np.uint16, 1)
    z = zarr.create_array(
        tmp_path / "a.zarr", shape=a.shape, chunks=CHUNKS, dtype=a.dtype, zarr_format=2,
        compressors=compressor, chunk_key_encoding={"name": "v2", "separator": separator},
    )  # fmt: skip
    z[:] = a
    z = zarr.open_array(tmp_path / "a.zarr", mode="r")
    r = chunk_reader(z, "gt", "a.zarr")
    assert r is not None
    for reg in REGIONS:
        np.testing.assert_array_equal(r.read(reg, reuse=True), a[reg])


def test_missing_chunks_read_as_fill_value(tmp_path):
    z = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="u1", fill_value=7)
    z[0:5, 0:4, :] = 1  # one chunk written
    z = zarr.open_array(tmp_path / "a.zarr", mode="r")
    r = chunk_reader(z, "gt", "a.zarr")
    for reg in REGIONS:
        np.testing.assert_array_equal(r.read(reg, reuse=True), z[reg])


def test_reused_buffer_is_per_thread_and_fresh_reads_are_kept(tmp_path):
    a = data(np.uint8, 2)
    z = v3(tmp_path / "a.zarr", a, ZstdCodec())
    r = chunk_reader(z, "gt", "a.zarr")
    kept = r.read(REGIONS[0], reuse=False)
    first = r.read(REGIONS[0], reuse=True)
    r.read((slice(5, 10), slice(0, 4), slice(0, 7)), reuse=True)  # overwrites the reused buffer
    np.testing.assert_array_equal(kept, a[REGIONS[0]])
    assert not np.array_equal(first, a[REGIONS[0]]) or np.array_equal(a[REGIONS[0]], a[5:10, 0:4])


def test_layouts_zarr_must_read_are_declined(tmp_path):
    a = data(np.uint16, 3)
    sharded = zarr.create_array(
        tmp_path / "s.zarr", shape=SHAPE, chunks=(5, 2, 7), shards=(5, 4, 7), dtype=a.dtype
    )
    sharded[:] = a
    big = zarr.create_array(
        tmp_path / "b.zarr", shape=SHAPE, chunks=CHUNKS, dtype=a.dtype, serializer=BytesCodec(endian="big")
    )
    big[:] = a
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=SHAPE, chunks=CHUNKS, dtype=a.dtype)
    mem[:] = a
    for z in (sharded, big, mem):
        assert chunk_reader(z, "gt", "x") is None
        assert (
            any(isinstance(c, ShardingCodec) for c in getattr(z.metadata, "codecs", ())) or z is not sharded
        )
    # and evaluate still reads them right, through zarr-python
    for z in (sharded, big, mem):
        res = fse.evaluate(z, a, workers=2)
        assert res.confusion_matrix.trace() == a.size


def test_corrupted_chunk_is_a_clear_error(tmp_path):
    a = data(np.uint8, 4)
    v3(tmp_path / "a.zarr", a, ZstdCodec())
    chunk = tmp_path / "a.zarr" / "c" / "1" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(fse.InputError, match=r"c/1/1/0.*truncated or corrupted"):
        fse.evaluate(str(tmp_path / "a.zarr"), a)


def test_engine_reads_through_the_fast_reader(tmp_path, monkeypatch):
    """evaluate on zarr v2 / v3 pairs uses the reader, and counts equal numpy's."""
    from fastseg_eval.io import chunkread

    calls = []
    real = chunkread.ChunkReader.read

    def spy(self, region, *, reuse, constant=False):
        calls.append(reuse)
        return real(self, region, reuse=reuse, constant=constant)

    monkeypatch.setattr(chunkread.ChunkReader, "read", spy)
    gt = data(np.uint8, 5) % 4
    pred = data(np.uint8, 6) % 4
    v3(tmp_path / "g.zarr", gt, ZstdCodec())
    z = zarr.create_array(tmp_path / "p.zarr", shape=SHAPE, chunks=(4, 5, 3), dtype="u1", zarr_format=2)
    z[:] = pred
    res = fse.evaluate(str(tmp_path / "p.zarr"), str(tmp_path / "g.zarr"), workers=2)
    ref = np.bincount(gt.astype(np.int64).ravel() * 4 + pred.ravel(), minlength=16).reshape(4, 4)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert calls and True in calls and False in calls  # direct reads reuse, cached straddlers do not
    assert res.timing["chunks_decoded"] == res.timing["chunks_total"]
