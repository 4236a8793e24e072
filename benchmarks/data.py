"""Synthetic segmentation pairs for the benchmarks, the on-disk cache, and the measuring worker.

Data
----
A pair is (prediction, ground truth) of the same shape, made from smooth random fields so that it
looks like a real segmentation: about 85 % background, blobs tens of voxels across, and a
prediction whose boundaries are jittered by a finer noise field (so the confusion matrix has
real off-diagonal counts). Two kinds:

* ``"classes"``: semantic labels ``0..K-1`` (uint8 for K <= 256); every foreground label occurs.
* ``"instances"``: uint16 instance ids (tens of thousands of distinct ids, about 64**3 cells of
  the volume carry their own id); the prediction shifts every cell boundary by one voxel and
  relabels 2 % of the cells.
* ``"ids64"``: the same with uint64 ids near 2**64 on a grid of ``IDS64_GRID`` cells per axis
  whatever the volume size (about 10**5 instances): the instance benchmarks, where the id count
  stays fixed while the volume grows. Its reference is the contingency table itself (distinct
  (gt, pred) pairs and their counts, sorted).

Every value is a pure function of ``(spec, voxel position)``: any box of a volume can be made
on its own, so large volumes are written chunk row by chunk row in a few threads with bounded
memory, and the result does not depend on how the volume was cut. Fields are trilinear
(smoothstep) interpolations of coarse Gaussian grids, computed with broadcasting only (no
gathers at full size): 512**3 takes a few seconds.

Reference counts (numpy ``bincount``, independent of fastseg-eval) are computed while the data
is made and stored beside it, so each benchmark can check that what it timed was also right.

Worker
------
End-to-end measurements (zarr, scaling) run in a child process (``python data.py serve``): one
fresh process per benchmark case, so that its ``ru_maxrss`` (peak resident memory) belongs to
that case alone. The parent times each request round trip (a JSON line over a pipe, well under
a millisecond), so pytest-benchmark's numbers are those of the work itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

GEN_VERSION = 1  # bump when the generator changes: cached data is then made again
REPO = Path(__file__).resolve().parents[1]
BACKGROUND = 0.85  # target fraction of background voxels in the ground truth

# field scales in voxels (coarse grid spacing), independent of the volume size
BLOB_CELL, DETAIL_CELL, CLASS_CELL, NOISE_CELL = 32, 16, 64, 8
NOISE_FG, NOISE_CLASS = 0.22, 0.02  # amplitude of the prediction's boundary noise
BANDS = 6.0  # class bands per unit of the class field (shells ~15 voxels thick)
OFFSET_CUBES = 32  # cubes per axis that each shift the run of labels they use (K > 32)
INSTANCE_GRID = 64  # instance cells per axis (about 64**3 ids before masking)
RELABEL = 0.02  # fraction of instance cells the prediction labels differently
IDS64_GRID = 80  # "ids64": instance cells per axis, any volume size (about 10**5 ids in the foreground)
IDS64_LOW = 2**64 - 2**48  # "ids64": ids are drawn from [IDS64_LOW, 2**64 - 1)


# ------------------------------------------------------------------------------ sizes
def bench_size() -> str:
    """``FASTSEG_BENCH_SIZE``: ``full`` (default) or ``small`` (a smoke run of under a minute).

    The one size setting of every benchmark. ``FASTSEG_BENCH_SMALL=1``, the distributed
    benchmark's former variable, is deprecated: it still means ``small`` when
    ``FASTSEG_BENCH_SIZE`` is unset (``benchmarks/conftest.py`` prints a note).
    """
    default = "small" if deprecated_small() else "full"
    size = os.environ.get("FASTSEG_BENCH_SIZE", default).strip().lower() or default
    if size not in SIZES:
        raise ValueError(f"FASTSEG_BENCH_SIZE={size!r}: use one of {', '.join(SIZES)}")
    return size


def deprecated_small() -> bool:
    """Whether the deprecated ``FASTSEG_BENCH_SMALL`` asks for the small size."""
    return os.environ.get("FASTSEG_BENCH_SMALL", "").strip().lower() not in ("", "0", "false", "no")


SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "kernel": 512,  # in-memory numpy cube edge
        "sklearn_planes": 32,  # scikit-learn gets kernel[:planes] (it is ~100x slower)
        "zarr": 1024,
        "scaling": (256, 512, 1024),
        "cli": 64,
        "sweep": 512,  # test_bench_sweep.py
        "distributed": 512,  # test_bench_distributed.py
        "rounds": 3,
        "kernel_rounds": 5,
        "cli_rounds": 5,
        "cold_rounds": 2,
    },
    "small": {
        "kernel": 128,
        "sklearn_planes": 32,
        "zarr": 256,
        "scaling": (64, 128, 256),
        "cli": 64,
        "sweep": 256,
        "distributed": 128,
        "rounds": 2,
        "kernel_rounds": 3,
        "cli_rounds": 3,
        "cold_rounds": 1,
    },
}


def sizes() -> dict[str, Any]:
    return SIZES[bench_size()]


def data_dir() -> Path:
    """Where generated zarr pairs are cached: ``$FASTSEG_BENCH_DATA`` or ``<repo>/bench-data``."""
    d = Path(os.environ.get("FASTSEG_BENCH_DATA") or REPO / "bench-data")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# -------------------------------------------------------------------------- generator
@dataclass(frozen=True)
class SegSpec:
    """What to generate. ``kind`` is ``"classes"`` (labels 0..K-1) or ``"instances"`` (uint16 ids)."""

    shape: tuple[int, int, int]
    kind: str = "classes"
    num_classes: int = 4
    seed: int = 0

    @property
    def dtype(self) -> np.dtype:
        if self.kind == "instances":
            return np.dtype(np.uint16)
        if self.kind == "ids64":
            return np.dtype(np.uint64)
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def tag(self) -> str:
        n = "x".join(map(str, self.shape))
        k = f"K{self.num_classes}" if self.kind == "classes" else f"g{IDS64_GRID}" if self.kind == "ids64" else "ids"
        return f"v{GEN_VERSION}-{self.kind}-{k}-{n}-s{self.seed}"


def _weights(cell: int) -> np.ndarray:
    t = (np.arange(cell, dtype=np.float32) + np.float32(0.5)) / np.float32(cell)
    return t * t * (np.float32(3) - np.float32(2) * t)


def _interp(c: np.ndarray, axis: int, lo: int, hi: int, cell: int) -> np.ndarray:
    """Fine samples ``lo:hi`` along ``axis`` of the coarse grid ``c`` (spacing ``cell``)."""
    j0, j1 = lo // cell, (hi - 1) // cell + 1
    a = np.moveaxis(c[(slice(None),) * axis + (slice(j0, j1),)], axis, -1)[..., None]
    b = np.moveaxis(c[(slice(None),) * axis + (slice(j0 + 1, j1 + 1),)], axis, -1)[..., None]
    out = a + (b - a) * _weights(cell)  # (..., cells, cell)
    out = out.reshape(out.shape[:-2] + (-1,))[..., lo - j0 * cell : hi - j0 * cell]
    return np.moveaxis(out, -1, axis)


class _Generator:
    """Coarse grids and thresholds of one :class:`SegSpec`; :meth:`block` makes any box."""

    def __init__(self, spec: SegSpec):
        if spec.kind not in ("classes", "instances", "ids64"):
            raise ValueError(f"kind must be 'classes', 'instances' or 'ids64', got {spec.kind!r}")
        if spec.kind == "classes" and not 2 <= spec.num_classes <= 65536:
            raise ValueError(f"num_classes must be 2..65536, got {spec.num_classes}")
        self.spec = spec
        rng = np.random.default_rng([spec.seed, GEN_VERSION])
        shape = spec.shape

        def grid(cell: int) -> np.ndarray:
            return rng.standard_normal(tuple(n // cell + 2 for n in shape), dtype=np.float32)

        self.blob, self.detail, self.cls, self.noise = (
            grid(BLOB_CELL),
            grid(DETAIL_CELL),
            grid(CLASS_CELL),
            grid(NOISE_CELL),
        )
        self.offsets = None  # small label spaces: every region cycles through all labels anyway
        if spec.kind == "classes" and spec.num_classes > 32:
            self.ocell = max(1, min(shape) // OFFSET_CUBES)
            ocount = tuple(n // self.ocell + 1 for n in shape)
            # every offset 0..K-2 as evenly as the number of cubes allows, in random places
            perm = rng.permutation(int(np.prod(ocount))) % (spec.num_classes - 1)
            self.offsets = perm.astype(np.int32).reshape(ocount)
        if spec.kind == "ids64":
            self.icell = tuple(max(1, -(-n // IDS64_GRID)) for n in shape)
            ishape = tuple(-(-n // c) + 1 for n, c in zip(shape, self.icell))
            span = 2**64 - 1 - IDS64_LOW
            self.ids_gt = (np.uint64(IDS64_LOW) + rng.integers(0, span, size=ishape, dtype=np.uint64)).astype(np.uint64)
            self.ids_pred = self.ids_gt.copy()
            flip = rng.random(ishape) < RELABEL
            self.ids_pred[flip] = np.uint64(IDS64_LOW) + rng.integers(0, span, size=int(flip.sum()), dtype=np.uint64)
        if spec.kind == "instances":
            self.icell = tuple(max(1, -(-n // INSTANCE_GRID)) for n in shape)
            ishape = tuple(-(-n // c) + 1 for n, c in zip(shape, self.icell))
            self.ids_gt = rng.integers(1, 65536, size=ishape, dtype=np.uint16)
            self.ids_pred = self.ids_gt.copy()
            flip = rng.random(ishape) < RELABEL
            self.ids_pred[flip] = rng.integers(1, 65536, size=int(flip.sum()), dtype=np.uint16)
        # threshold for BACKGROUND from a fixed-size sample box at the origin
        sample = tuple((0, min(n, m)) for n, m in zip(shape, (64, 256, 256)))
        self.t_fg = np.float32(np.quantile(self._fg_field(sample), BACKGROUND))

    def _field(self, grid: np.ndarray, cell: int, box) -> np.ndarray:
        out = grid
        for ax in range(3):
            out = _interp(out, ax, box[ax][0], box[ax][1], cell)
        return np.ascontiguousarray(out)

    def _fg_field(self, box) -> np.ndarray:
        f = self._field(self.blob, BLOB_CELL, box)
        f += np.float32(0.5) * self._field(self.detail, DETAIL_CELL, box)
        return f

    def block(self, box) -> tuple[np.ndarray, np.ndarray]:
        """``(pred, gt)`` of the box ``((z0, z1), (y0, y1), (x0, x1))``."""
        spec = self.spec
        f = self._fg_field(box)
        noise = self._field(self.noise, NOISE_CELL, box)
        bg_gt = f <= self.t_fg
        noise *= np.float32(NOISE_FG)
        f += noise
        bg_pred = f <= self.t_fg
        del f
        (z0, z1), (y0, y1), (x0, x1) = box
        if spec.kind == "classes":
            c = self._field(self.cls, CLASS_CELL, box)
            off = 0
            if self.offsets is not None:
                off = self.offsets[np.ix_(*(np.arange(a, b) // self.ocell for a, b in box))]
            gt = self._bands(c, off, bg_gt)
            noise *= np.float32(NOISE_CLASS / NOISE_FG)
            c += noise
            pred = self._bands(c, off, bg_pred)
            return pred, gt
        cz, cy, cx = self.icell
        zi, yi = np.arange(z0, z1) // cz, np.arange(y0, y1) // cy
        xi = np.arange(x0, x1) // cx
        xs = np.minimum(np.arange(x0, x1) + 1, spec.shape[2] - 1) // cx  # boundaries off by one
        gt = self.ids_gt[np.ix_(zi, yi, xi)]
        gt[bg_gt] = 0
        pred = self.ids_pred[np.ix_(zi, yi, xs)]
        pred[bg_pred] = 0
        return pred, gt

    def _bands(self, c: np.ndarray, off: Any, bg: np.ndarray) -> np.ndarray:
        """Label ``1 + (floor(BANDS * c) + off) mod (K - 1)``, 0 where ``bg``.

        Bands of the smooth field ``c`` are shells about 15 voxels thick; ``off`` (per
        cube of ``1 / OFFSET_CUBES`` of the volume) shifts which run of consecutive labels a region of the volume uses,
        so that every label of a large label space occurs.
        """
        v = c * np.float32(BANDS)
        v += np.float32(1 << 12)  # positive: truncation is floor (|c| < 100 by far)
        lab = v.astype(np.int32)
        del v
        lab += off
        lab %= self.spec.num_classes - 1
        lab += 1
        out = lab.astype(self.spec.dtype)
        out[bg] = 0
        return out


def reference_counts(spec: SegSpec, pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Independent numpy counts of one block: the K x K table, or diagonal + marginals for ids."""
    if spec.kind == "classes":
        k = spec.num_classes
        flat = gt.astype(np.intp).ravel() * k + pred.ravel()
        return {"cm": np.bincount(flat, minlength=k * k).reshape(k, k)}
    if spec.kind == "ids64":
        return pair_counts(gt, pred)
    n = 65536
    g, p = gt.ravel(), pred.ravel()
    return {
        "gt": np.bincount(g, minlength=n),
        "pred": np.bincount(p, minlength=n),
        "diag": np.bincount(g[g == p], minlength=n),
    }


def pair_counts(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Independent contingency table: the distinct (gt, pred) pairs (sorted) and their counts."""
    g, p = gt.ravel(), pred.ravel()
    order = np.lexsort((p, g))
    g, p = g[order], p[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    idx = np.flatnonzero(first)
    return {"ct_gt": g[idx], "ct_pred": p[idx], "ct_count": np.diff(np.append(idx, len(g))).astype(np.int64)}


def combine_counts(spec: SegSpec, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The reference counts of the whole volume from those of its blocks."""
    if spec.kind != "ids64":
        return {k: sum(p[k] for p in parts) for k in parts[0]}
    g = np.concatenate([p["ct_gt"] for p in parts])
    pr = np.concatenate([p["ct_pred"] for p in parts])
    c = np.concatenate([p["ct_count"] for p in parts])
    order = np.lexsort((pr, g))
    g, pr, c = g[order], pr[order], c[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (pr[1:] != pr[:-1])
    idx = np.flatnonzero(first)
    return {"ct_gt": g[idx], "ct_pred": pr[idx], "ct_count": np.add.reduceat(c, idx) if len(idx) else c}


def _boxes(shape, step):
    """Boxes of ``step`` planes (axis 0) by ``step`` rows (axis 1), full width: aligned to ``step`` chunks."""
    (nz, ny, nx), (sz, sy) = shape, step
    for z0, y0 in itertools.product(range(0, nz, sz), range(0, ny, sy)):
        yield ((z0, min(z0 + sz, nz)), (y0, min(y0 + sy, ny)), (0, nx))


def make_pair(
    spec: SegSpec, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """In-memory ``(pred, gt, reference counts)`` of ``spec``, made slab by slab in ``threads`` threads."""
    gen = _Generator(spec)
    pred = np.empty(spec.shape, spec.dtype)
    gt = np.empty(spec.shape, spec.dtype)
    step = max(1, (1 << 23) // (spec.shape[1] * spec.shape[2]))  # ~8 M voxels per slab

    def one(box):
        p, g = gen.block(box)
        sl = tuple(slice(a, b) for a, b in box)
        pred[sl], gt[sl] = p, g
        return reference_counts(spec, p, g)

    boxes = list(_boxes(spec.shape, (step, spec.shape[1])))
    with ThreadPoolExecutor(threads or cpu_count()) as ex:
        parts = list(ex.map(one, boxes))
    ref = combine_counts(spec, parts)
    return pred, gt, ref


def cached_pair(spec: SegSpec) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """:func:`make_pair`, kept as ``.npy`` files in :func:`data_dir` (loading beats making 512**3)."""
    root = data_dir() / f"{spec.tag()}-npy"
    done = root / "ref.npz"
    if done.exists():
        with np.load(done) as z:
            ref = {k: z[k] for k in z.files}
        return np.load(root / "pred.npy"), np.load(root / "gt.npy"), ref
    pred, gt, ref = make_pair(spec)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "pred.npy", pred)
    np.save(root / "gt.npy", gt)
    np.savez(done, **ref)  # written last: marks the directory complete
    return pred, gt, ref


def _cached_meta(root: Path) -> dict[str, Any] | None:
    """A data directory's ``meta.json`` (written last: the data are complete), else None with the
    directory emptied, ready to be written."""
    meta_path = root / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return None


def ensure_zarr_pair(spec: SegSpec, chunks: int = 128, threads: int | None = None) -> dict[str, Any]:
    """Write ``spec`` as two zarr v3 arrays (default codec) once; later calls reuse the cache.

    Returns ``{"pred", "gt", "dir", "cm", "seconds", ...}`` from ``meta.json``, which is written
    last: a directory without it (an interrupted run) is made again.
    """
    import zarr

    root = data_dir() / f"{spec.tag()}-c{chunks}"
    meta_path = root / "meta.json"
    done = _cached_meta(root)
    if done is not None:
        return done
    t0 = time.perf_counter()
    gen = _Generator(spec)
    c = tuple(min(chunks, n) for n in spec.shape)
    arrays = {
        role: zarr.create_array(
            store=str(root / f"{role}.zarr"),
            shape=spec.shape,
            chunks=c,
            dtype=spec.dtype,
            fill_value=0,
            zarr_format=3,
        )
        for role in ("pred", "gt")
    }

    def one(box):
        p, g = gen.block(box)
        sl = tuple(slice(a, b) for a, b in box)
        arrays["pred"][sl] = p
        arrays["gt"][sl] = g
        return reference_counts(spec, p, g)

    with ThreadPoolExecutor(threads or cpu_count()) as ex:
        parts = list(ex.map(one, _boxes(spec.shape, c[:2])))
    ref = combine_counts(spec, parts)
    meta = {
        "spec": asdict(spec),
        "tag": spec.tag(),
        "pred": str(root / "pred.zarr"),
        "gt": str(root / "gt.zarr"),
        "dir": str(root),
        "chunks": list(c),
        "voxels": spec.voxels,
        "stored_bytes": sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
        "generate_seconds": round(time.perf_counter() - t0, 3),
        **{k: v.tolist() for k, v in ref.items()},
    }
    meta_path.write_text(json.dumps(meta))
    return meta


def ensure_sparse_zarr_pair(n: int, core: int = 256, chunks: int = 128) -> dict[str, Any]:
    """An ``n**3`` zarr pair that is background except its first ``core**3`` corner (the K=4
    generator's ``core**3`` pair): zarr stores no file for the chunks that hold only the fill
    value, as for any sparse label volume written by zarr-python. Cached like the others."""
    import zarr

    root = data_dir() / f"sparse-v1-K4-{n}-core{core}-c{chunks}"
    meta_path = root / "meta.json"
    done = _cached_meta(root)
    if done is not None:
        return done
    spec = SegSpec((core, core, core), num_classes=4)
    pred, gt, ref = cached_pair(spec)
    for role, a in (("pred", pred), ("gt", gt)):
        z = zarr.create_array(
            store=str(root / f"{role}.zarr"), shape=(n, n, n), chunks=(chunks,) * 3, dtype=a.dtype,
            fill_value=0, zarr_format=3,
        )  # fmt: skip
        z[:core, :core, :core] = a
    cm = np.array(ref["cm"], dtype=np.int64)
    cm[0, 0] += n**3 - core**3
    stored = [f for f in root.rglob("*") if f.is_file() and f.name != "zarr.json"]
    meta = {
        "pred": str(root / "pred.zarr"),
        "gt": str(root / "gt.zarr"),
        "dir": str(root),
        "chunks": [chunks] * 3,
        "voxels": n**3,
        "stored_chunks": len(stored) // 2,
        "total_chunks": (-(-n // chunks)) ** 3,
        "stored_bytes": sum(f.stat().st_size for f in stored),
        "cm": cm.tolist(),
    }
    meta_path.write_text(json.dumps(meta))
    return meta


def fingerprint(a: np.ndarray) -> str:
    """Short hash of an array's bytes (to show that the generator is deterministic)."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()[:16]


# ----------------------------------------------------------------------------- worker
def _rss_now_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    """This program's peak resident memory: ``VmHWM`` of its own address space.

    Not ``getrusage().ru_maxrss``: on Linux that also holds the parent's high-water mark at
    ``exec`` (the kernel folds the replaced address space into it), so a child started from a
    pytest process holding gigabytes of data would report those gigabytes.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _op_prepare(dtype: str = "uint8", num_classes: int = 4, contingency: bool = False) -> dict[str, Any]:
    """Import everything and load (or compile) the kernels that the later requests use
    (with ``contingency``, those of ``fse.contingency`` for ``dtype`` too)."""
    import dask.array  # noqa: F401
    import zarr  # noqa: F401

    import fastseg_eval as fse

    rng = np.random.default_rng(0)
    a = rng.integers(0, num_classes, size=(8, 8, 8)).astype(dtype)
    fse.evaluate(a, a, num_classes=num_classes, workers=2)
    fse.evaluate(a, a, workers=2)
    if contingency:
        fse.contingency(a, a, workers=2)
    return {}


def _op_evaluate(
    pred: str, gt: str, num_classes: int | None, workers: int, unstored_as_fill: bool = True
) -> dict[str, Any]:
    """``fse.evaluate``; ``unstored_as_fill=False`` turns off the engine's path for chunks the
    store does not hold (they are then filled with the fill value and counted voxel by voxel,
    as before that path existed), for the side-by-side in the sparse zarr group."""
    import fastseg_eval as fse
    from fastseg_eval.reducers.confusion import ConfusionCounts

    ConfusionCounts.accepts_constant = unstored_as_fill
    res = fse.evaluate(pred, gt, num_classes=num_classes, workers=workers)
    return {"cm": res.confusion_matrix.tolist(), "engine_seconds": res.timing.get("seconds")}


def _op_decode(pred: str, gt: str, workers: int) -> dict[str, Any]:
    """Read every chunk of both arrays with zarr-python in ``workers`` threads, and nothing else."""
    import zarr

    arrs = [zarr.open_array(pred, mode="r"), zarr.open_array(gt, mode="r")]
    shape, chunks = arrs[0].shape, arrs[0].chunks
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]

    def read(origin):
        sl = tuple(slice(o, o + c) for o, c in zip(origin, chunks))
        return sum(a[sl].nbytes for a in arrs)

    with ThreadPoolExecutor(workers) as ex:
        nbytes = sum(ex.map(read, itertools.product(*grid)))
    return {"bytes": int(nbytes)}


def _op_decode_fast(pred: str, gt: str, workers: int) -> dict[str, Any]:
    """Read every chunk of both arrays with fastseg-eval's own chunk reader, and nothing else.

    The same reads the engine makes (numcodecs in the worker thread, into a reused buffer):
    the evaluation's time over this one is the cost of counting that decoding does not hide.
    """
    import zarr

    from fastseg_eval.io.chunkread import chunk_reader

    arrs = [zarr.open_array(pred, mode="r"), zarr.open_array(gt, mode="r")]
    readers = [chunk_reader(a, "x", "x") for a in arrs]
    assert all(r is not None for r in readers)
    shape, chunks = arrs[0].shape, arrs[0].chunks
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]

    def read(origin):
        sl = tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, chunks, shape))
        return sum(r.read(sl, reuse=True).nbytes for r in readers)

    with ThreadPoolExecutor(workers) as ex:
        nbytes = sum(ex.map(read, itertools.product(*grid)))
    return {"bytes": int(nbytes)}


def _op_raw_floor(pred: str, gt: str, workers: int) -> dict[str, Any]:
    """The raw codec floor: read every chunk file of both arrays and decode it with numcodecs'
    Zstd into a buffer the thread reuses, in ``workers`` threads, and nothing else (no zarr, no
    checks, no counting). No reader of these stores can be faster with the same codec."""
    import json
    import os
    import threading

    import numcodecs

    codec = numcodecs.Zstd()
    local = threading.local()
    files = []
    for root in (pred, gt):
        with open(os.path.join(root, "zarr.json")) as f:
            meta = json.load(f)
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"], meta["codecs"]
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        nbytes = int(np.prod(chunk)) * np.dtype(meta["data_type"]).itemsize
        sep = meta["chunk_key_encoding"]["configuration"]["separator"]
        grid = [range(-(-n // c)) for n, c in zip(meta["shape"], chunk)]
        for idx in itertools.product(*grid):
            key = sep.join(["c", *map(str, idx)])
            files.append((os.path.join(root, *key.split("/")), nbytes))

    def read(item):
        path, nbytes = item
        buf = getattr(local, "buf", None)
        if buf is None or buf.nbytes != nbytes:
            buf = local.buf = np.empty(nbytes, np.uint8)
        with open(path, "rb") as fh:
            data = fh.read()
        codec.decode(data, out=buf)
        return nbytes

    files = [f for f in files if os.path.exists(f[0])]  # an unstored chunk costs a reader nothing

    with ThreadPoolExecutor(workers) as ex:
        total = sum(ex.map(read, files))
    return {"bytes": int(total)}


def _op_dask(pred: str, gt: str, num_classes: int) -> dict[str, Any]:
    """The idiom a dask user writes: bincount of ``gt * K + pred`` over ``da.from_zarr`` inputs."""
    import dask.array as da

    k = num_classes
    p, g = da.from_zarr(pred), da.from_zarr(gt)
    counts = da.bincount((g.astype(np.int64) * k + p).ravel(), minlength=k * k).compute()
    return {"cm": counts.reshape(k, k).tolist()}


def _op_contingency(pred: str, gt: str, workers: int) -> dict[str, Any]:
    """``fse.contingency`` of a zarr pair; the table comes back as a digest and its sizes."""
    import fastseg_eval as fse

    t0 = time.perf_counter()
    ct = fse.contingency(pred, gt, workers=workers)
    seconds = time.perf_counter() - t0
    g, p, c = ct.raw()
    return {"entries": len(c), "voxels": int(c.sum()), "digest": table_digest(g, p, c), "engine_seconds": seconds}


def table_digest(g: np.ndarray, p: np.ndarray, c: np.ndarray) -> str:
    """Short hash of a sorted contingency table (uint64 ids, int64 counts)."""
    h = hashlib.sha256()
    for a, dt in ((g, np.uint64), (p, np.uint64), (c, np.int64)):
        h.update(np.ascontiguousarray(np.asarray(a, dtype=dt)).view(np.uint8))
    return h.hexdigest()[:16]


OPS = {
    "prepare": _op_prepare,
    "contingency": _op_contingency,
    "evaluate": _op_evaluate,
    "decode": _op_decode,
    "decode_fast": _op_decode_fast,
    "raw_floor": _op_raw_floor,
    "dask": _op_dask,
}


def serve() -> None:
    """Answer JSON requests, one per line on stdin, with one JSON line each on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the reply channel
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            break
        t0 = time.perf_counter()
        try:
            reply = OPS[op](**req)
        except BaseException:  # report, keep serving: the parent decides
            reply = {"error": traceback.format_exc()}
        reply["seconds"] = time.perf_counter() - t0
        reply["rss_mib"] = _rss_now_mib()
        reply["maxrss_mib"] = _maxrss_mib()
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Worker:
    """A child Python process that runs :data:`OPS` on request; ``peak_rss_mib`` is its high-water mark."""

    def __init__(self, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )
        self.last: dict[str, Any] = {}

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died during {op!r} (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark worker failed in {op!r}:\n{reply['error']}")
        self.last = reply
        return reply

    @property
    def peak_rss_mib(self) -> float:
        return float(self.last.get("maxrss_mib", float("nan")))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# A minimal launcher (no site, no imports beyond os and sys, about 10 MiB and 10 ms) between the
# measuring process and the measured one: ``ru_maxrss`` of an exec'd child starts from the RSS of
# the process it was spawned from, so that must be small. It writes the child's own peak (KiB).
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``cmd`` (``cmd[0]`` a path); return its stdout and its own peak RSS in MiB."""
    fd, rss_file = tempfile.mkstemp(prefix="fastseg-bench-rss-")
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-S", "-I", "-c", _LAUNCHER, rss_file, *cmd],
            capture_output=True,
            env=env,
            cwd=str(REPO),
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.decode(errors='replace')[-4000:]}"
            )
        with open(rss_file) as fh:
            rss = int(fh.read()) / 1024
    finally:
        os.unlink(rss_file)
    return proc.stdout.decode(), rss


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["make"]:  # python data.py make 1024 [K]: write (or find) a cached zarr pair
        n = int(sys.argv[2])
        k = int(sys.argv[3]) if len(sys.argv) > 3 else 4
        meta = ensure_zarr_pair(SegSpec((n, n, n), num_classes=k))
        print({k: v for k, v in meta.items() if k not in ("cm",)})
    else:
        sys.exit("usage: python benchmarks/data.py serve | make N [K]")
