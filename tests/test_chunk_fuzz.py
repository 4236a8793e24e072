"""Corrupted chunks: every path refuses them or gives exactly what zarr-python reads, never another number.

A chunk file is replaced by something a codec may still decode: fewer or more elements than the
chunk holds, another dtype's bytes, random bytes, a truncated or bit-flipped file. For each
codec the fast chunk reader handles (and one it leaves to the generic numcodecs path), through
the aligned fast path, misaligned chunk grids (the chunk cache), a corrupted mask, and the dask
engine, the result must be an error naming the input, or the counts numpy gives on the arrays
zarr-python reads from the same stores.
"""

from __future__ import annotations

import os
import zlib

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

import fastseg_eval as fse
from fastseg_eval.errors import FastSegError
from fastseg_eval.io.chunkread import chunk_reader, decode_into

SHAPE, CHUNKS = (16, 16, 16), (8, 8, 8)
K = 4

V3 = {"zstd": ZstdCodec(), "blosc": BloscCodec(), "gzip": GzipCodec(), "raw": None}
V2 = {
    "zstd": numcodecs.Zstd(),
    "blosc": numcodecs.Blosc(),
    "gzip": numcodecs.GZip(),
    "zlib": numcodecs.Zlib(),  # not a fast-reader codec by name: the generic numcodecs path
    "raw": None,
}
NUMCODEC = {
    "zstd": numcodecs.Zstd(),
    "blosc": numcodecs.Blosc(),
    "gzip": numcodecs.GZip(),
    "zlib": numcodecs.Zlib(),
    "raw": None,
}


def _encode(codec_name: str, raw: bytes) -> bytes:
    codec = NUMCODEC[codec_name]
    return bytes(raw) if codec is None else bytes(codec.encode(np.frombuffer(raw, np.uint8)))


def _store(path, a, fmt, codec_name, chunks=CHUNKS):
    if fmt == 3:
        comp = V3[codec_name]
        z = zarr.create_array(path, shape=a.shape, chunks=chunks, dtype=a.dtype, compressors=comp)
    else:
        z = zarr.create_array(
            path, shape=a.shape, chunks=chunks, dtype=a.dtype, zarr_format=2, compressors=V2[codec_name]
        )
    z[:] = a
    return z


def _chunk_path(root, fmt, coords=(1, 1, 1)):
    if fmt == 3:
        return os.path.join(root, "c", *map(str, coords))
    return os.path.join(root, ".".join(map(str, coords)))


def corruptions(codec_name: str, dtype: np.dtype, rng: np.random.Generator) -> dict[str, bytes]:
    """Replacement chunk files that a careless reader could take for the chunk."""
    n = int(np.prod(CHUNKS))
    vals = rng.integers(0, K, n).astype(dtype)
    other = np.uint16 if dtype.itemsize == 1 else np.uint8
    good = _encode(codec_name, vals.tobytes())
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    return {
        "short": _encode(codec_name, vals[: n // 2].tobytes()),
        "one_short": _encode(codec_name, vals[:-1].tobytes()),
        "long": _encode(codec_name, np.concatenate([vals, vals[:7]]).tobytes()),
        "other_dtype": _encode(codec_name, vals.astype(other).tobytes()),
        "empty_payload": _encode(codec_name, b""),
        "truncated": good[: max(1, len(good) // 2)],
        "bitflip": bytes(flipped),
        "random": rng.integers(0, 256, 64, dtype=np.uint8).tobytes(),
        "zero_bytes": b"",
    }


def _zarr_answer(paths):
    """The arrays zarr-python reads, or None if it refuses one."""
    try:
        return [np.asarray(zarr.open_array(p, mode="r")[:]) for p in paths]
    except Exception:
        return None


def _expected(pred, gt, mask=None):
    g, p = gt.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    if mask is not None:
        keep = mask.ravel() != 0
        g, p = g[keep], p[keep]
    kk = int(max(g.max(initial=0), p.max(initial=0))) + 1
    return np.bincount(g * kk + p, minlength=kk * kk).reshape(kk, kk)


def _check(run, pred_path, gt_path, mask_path=None):
    """``run()`` must raise a FastSegError or give exactly zarr-python's counts."""
    ref = _zarr_answer([pred_path, gt_path] + ([mask_path] if mask_path else []))
    try:
        res = run()
    except FastSegError as e:
        assert "pred" in str(e) or "mask" in str(e) or "gt" in str(e), str(e)
        return "refused"
    assert ref is not None, "zarr-python refuses this chunk, fastseg-eval counted it"
    exp = _expected(*ref)
    labels = [int(x) for x in res.labels]
    k = max(max(labels) + 1, exp.shape[0])
    got = np.zeros((k, k), np.int64)
    got[np.ix_(labels, labels)] = res.confusion_matrix  # rows and columns by label value
    np.testing.assert_array_equal(got, np.pad(exp, ((0, k - exp.shape[0]), (0, k - exp.shape[1]))))
    return "same"


FAST = [(3, c) for c in V3] + [(2, c) for c in V2]


@pytest.mark.parametrize("fmt,codec_name", FAST, ids=[f"v{f}-{c}" for f, c in FAST])
@pytest.mark.parametrize("dtype", ["u1", "u2"])
def test_corrupt_chunk_every_path(tmp_path, fmt, codec_name, dtype):
    rng = np.random.default_rng(7)
    dtype = np.dtype(dtype)
    pred = rng.integers(0, K, SHAPE).astype(dtype)
    gt = rng.integers(0, K, SHAPE).astype(dtype)
    mask = (rng.random(SHAPE) < 0.7).astype(np.uint8)
    outcomes = {}
    for name, blob in corruptions(codec_name, dtype, rng).items():
        d = tmp_path / name
        p = str(d / "p.zarr")
        g = str(d / "g.zarr")
        g_mis = str(d / "g_mis.zarr")
        m = str(d / "m.zarr")
        _store(p, pred, fmt, codec_name)
        _store(g, gt, fmt, codec_name)
        _store(g_mis, gt, fmt, codec_name, chunks=(5, 6, 16))  # misaligned with pred's 8^3 grid
        _store(m, mask, fmt, codec_name)
        with open(_chunk_path(p, fmt), "wb") as fh:
            fh.write(blob)
        runs = {
            "fast": lambda p=p, g=g: fse.evaluate(p, g, workers=1),
            "threads2": lambda p=p, g=g: fse.evaluate(p, g, workers=2),
            "misaligned": lambda p=p, g=g_mis: fse.evaluate(p, g, workers=2),
            "dask": lambda p=p, g=g: fse.evaluate(p, g, scheduler="synchronous"),
        }
        for label, run in runs.items():
            outcomes[(name, label)] = _check(run, p, g if label != "misaligned" else g_mis)
        # a corrupted mask chunk, on the fast and the misaligned path
        m_bad = str(d / "m_bad.zarr")
        _store(m_bad, mask, fmt, codec_name)
        with open(_chunk_path(m_bad, fmt), "wb") as fh:
            fh.write(_encode(codec_name, np.ones(int(np.prod(CHUNKS)) // 2, dtype=np.uint8).tobytes()))
        for label, gg in (("mask", g), ("mask-misaligned", g_mis)):
            outcomes[(name, label)] = _mask_check(pred, d, fmt, codec_name, gg, m_bad)
    # the cases that must never count: a chunk with the wrong number of bytes
    # (the mask runs use an intact pred and a mask chunk holding half its bytes: always refused)
    for name in ("short", "one_short", "long", "other_dtype", "empty_payload", "zero_bytes"):
        for label in ("fast", "threads2", "misaligned", "dask", "mask", "mask-misaligned"):
            assert outcomes[(name, label)] == "refused", (name, label)


def _mask_check(pred, d, fmt, codec_name, gg, m_bad):
    p_ok = str(d / "p_ok.zarr")
    if not os.path.exists(p_ok):
        _store(p_ok, pred, fmt, codec_name)
    return _check(lambda: fse.evaluate(p_ok, gg, mask=m_bad, workers=2), p_ok, gg, m_bad)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    codec_name=st.sampled_from(["zstd", "blosc", "gzip", "raw"]),
    payload=st.binary(min_size=0, max_size=1200),
    cut=st.integers(0, 64),
)
def test_decode_into_never_reports_bytes_it_did_not_write(codec_name, payload, cut):
    """decode_into reports exactly the decoded length; a wrong length is never the buffer's size."""
    size = 512
    blob = _encode(codec_name, payload)
    blob = blob[: max(0, len(blob) - cut)] if cut % 3 == 0 else blob
    out = np.full(size, 0xAB, np.uint8)
    codec = NUMCODEC[codec_name]
    try:
        n = decode_into(codec, blob, out)
    except Exception:
        return
    # what the codec really holds, decoded into fresh memory
    try:
        truth = b"" if codec is None and not blob else (blob if codec is None else bytes(codec.decode(blob)))
    except Exception:
        truth = None
    if n == size:
        assert truth is not None and truth == out.tobytes()
    else:
        assert truth is None or len(truth) == n or (n == size + 1 and len(truth) > size)


def test_zstd_content_size_header_variants():
    """Frame headers with 1-, 2-, 4- and 8-byte content sizes, and frames without one."""
    from fastseg_eval.io.chunkread import _zstd_content_size

    for n in (0, 1, 255, 256, 300, 65791, 65792, 100_000):
        blob = numcodecs.Zstd().encode(np.zeros(n, np.uint8))
        assert _zstd_content_size(bytes(blob)) == n
    assert _zstd_content_size(b"not zstd") is None
    assert _zstd_content_size(zlib.compress(b"abc")) is None


def test_widened_dtype_in_metadata_is_refused(tmp_path):
    """uint8 chunks behind a zarr.json that says uint16: half the bytes, no invented labels."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, K, SHAPE).astype(np.uint8)
    p, g = str(tmp_path / "p.zarr"), str(tmp_path / "g.zarr")
    _store(p, a, 3, "zstd")
    _store(g, a.astype(np.uint16), 3, "zstd")
    meta_path = tmp_path / "p.zarr" / "zarr.json"
    meta_path.write_text(meta_path.read_text().replace('"uint8"', '"uint16"'))
    z = zarr.open_array(p, mode="r")
    assert chunk_reader(z, "pred", p) is not None  # the fast reader handles this layout
    with pytest.raises(FastSegError, match=r"holds 512 bytes once decoded, not the 1024 of a 8x8x8 uint16 chunk"):
        fse.evaluate(p, g, workers=1)
    with pytest.raises(FastSegError):
        fse.evaluate(p, g, workers=2, num_classes=K)
