"""Engine: plan work units over the chunk grids and schedule reads and kernel calls.

Two engines, one contract (every voxel counted exactly once, each input chunk decoded once):

* **threads** (numpy and zarr inputs): a pool of ``workers`` threads pulls work units in
  C order. A unit is one chunk of the *primary* input (the zarr input with the largest chunks;
  numpy-only inputs are cut into slabs). Other inputs are read for the unit's region: in one
  call when their chunks nest inside it, otherwise chunk by chunk through a shared,
  reference-counted cache so that a chunk straddling several units is decoded once (while the
  cache budget allows). Each thread counts into its own accumulator with nogil kernels;
  accumulators are merged at the end. Memory: about ``workers`` units plus the cache.
* **dask** (any dask input, or ``scheduler=``): one task per block of the common chunk grid
  returns a small partial accumulator; partials are tree-summed in the same graph and the
  graph is computed once.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .confusion import ConfusionMatrix
from .errors import OptionError
from .sources import Volume, check_volumes, open_volume

log = logging.getLogger("fastseg_eval")

Region = tuple[tuple[int, int], ...]  # (start, stop) per axis
UNIT_VOXELS = 1 << 22  # target size of a numpy work unit
CACHE_BUDGET = 512 << 20  # bytes of straddling chunks kept decoded (misaligned chunk grids only)


@dataclass
class RunStats:
    """What a run did: used for the report's ``timing`` and for tests of the decode-once rule."""

    engine: str = "threads"
    workers: int = 1
    seconds: float = 0.0
    voxels: int = 0
    units: int = 0
    chunks_decoded: dict[str, int] = field(default_factory=dict)
    chunks_total: dict[str, int] = field(default_factory=dict)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers: Any) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise OptionError(f"workers must be a positive integer, got {workers!r}")
    return int(workers)


def count_into(
    acc: ConfusionMatrix,
    pred: Any,
    gt: Any,
    mask: Any = None,
    *,
    workers: int | None = None,
    scheduler: Any = None,
    progress: Callable[[int], None] | None = None,
    volumes: tuple[Volume, Volume, Volume | None] | None = None,
    backend: str = "cpu",
) -> RunStats:
    """Count ``pred`` against ``gt`` (optionally under ``mask``) into ``acc``.

    ``acc`` is only changed if the whole run succeeds. ``progress`` is called with the number of
    voxels each finished unit covered. ``backend`` is a resolved backend name (``"cpu"`` or
    ``"cuda"``, see :mod:`fastseg_eval.backends`).
    """
    if volumes is None:
        pv, gv = open_volume(pred, "pred"), open_volume(gt, "gt")
        mv = None if mask is None else open_volume(mask, "mask")
        if acc.channel_axis is not None:
            pv.channel_axis = acc.channel_axis % max(len(pv.shape), 1)
        check_volumes(pv, gv, mv, pred_shape=pv.spatial_shape if acc._prob is not None else None)
    else:
        pv, gv, mv = volumes
    nworkers = check_workers(workers)
    t0 = time.perf_counter()
    if any(v is not None and v.kind == "cuda" for v in (pv, gv, mv)):
        stats = _run_device(acc, gv, pv, mv, backend)
    elif scheduler is not None or any(v is not None and v.kind == "dask" for v in (pv, gv, mv)):
        from .dask_engine import run_dask

        stats = run_dask(acc, gv, pv, mv, scheduler=scheduler, progress=progress, backend=backend)
    else:
        stats = _run_threads(acc, gv, pv, mv, nworkers, progress, backend)
    stats.seconds = time.perf_counter() - t0
    stats.voxels = int(np.prod(gv.shape, dtype=np.int64))
    return stats


# ----------------------------------------------------------------------------------- planning
def auto_chunks(shape: Sequence[int], target: int = UNIT_VOXELS) -> tuple[int, ...]:
    """Chunk shape of about ``target`` voxels, cutting leading axes first (keeps rows whole)."""
    c = [max(1, int(s)) for s in shape]
    for ax in range(len(c)):
        while math.prod(c) > target and c[ax] > 1:
            c[ax] = (c[ax] + 1) // 2
    return tuple(c)


def boundaries(shape: Sequence[int], chunks: Sequence[int]) -> list[list[int]]:
    """Chunk start offsets plus the end, per axis."""
    return [[*range(0, n, c), n] if n else [0] for n, c in zip(shape, chunks)]


def _interval_index(bounds: list[int], x: int) -> int:
    """Index of the interval of ``bounds`` that contains ``x``."""
    return bisect.bisect_right(bounds, x) - 1


class _ChunkCache:
    """Decoded chunks of one zarr input that several units need, freed after their last use.

    A chunk is decoded by the first thread that asks; others asking meanwhile wait for it.
    It is kept while later units still need it and the byte budget allows; a chunk dropped for
    lack of budget is decoded again when next needed (counted in ``decodes``).
    """

    def __init__(self, vol: Volume, uses: Callable[[tuple[int, ...]], int], budget: int):
        self.vol, self.uses_of, self.budget = vol, uses, budget
        self.lock = threading.Lock()
        self.left: dict[tuple[int, ...], int] = {}  # uses not yet asked for
        self.data: dict[tuple[int, ...], np.ndarray] = {}
        self.pending: dict[tuple[int, ...], threading.Event] = {}  # being decoded by a thread
        self.waiting: dict[tuple[int, ...], int] = {}  # threads waiting for that decode
        self.nbytes = 0
        self.decodes = 0

    def _release(self, idx: tuple[int, ...]) -> None:
        """Drop a kept chunk once no use is left and nobody waits for it (lock held)."""
        if self.left[idx] == 0 and not self.waiting.get(idx):
            arr = self.data.pop(idx, None)
            if arr is not None:
                self.nbytes -= arr.nbytes
            del self.left[idx]
            self.waiting.pop(idx, None)

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        arr = self.vol.read(region)
        with self.lock:
            self.decodes += 1
        return arr

    def get(self, idx: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
        with self.lock:
            self.left[idx] = self.left.get(idx, self.uses_of(idx)) - 1
            arr = self.data.get(idx)
            if arr is not None:
                self._release(idx)
                return arr
            event = self.pending.get(idx)
            owner = event is None
            if owner:
                event = self.pending[idx] = threading.Event()
            else:
                self.waiting[idx] = self.waiting.get(idx, 0) + 1
        if owner:
            try:
                arr = self._read(region)
            except BaseException:
                with self.lock:
                    del self.pending[idx]
                event.set()
                raise
            with self.lock:
                del self.pending[idx]
                wanted = self.waiting.get(idx, 0) > 0 or self.left[idx] > 0
                if wanted and (self.waiting.get(idx, 0) > 0 or self.nbytes + arr.nbytes <= self.budget):
                    self.data[idx] = arr
                    self.nbytes += arr.nbytes
                elif self.left[idx] == 0:
                    self._release(idx)
            event.set()
            return arr
        event.wait()
        with self.lock:
            self.waiting[idx] -= 1
            arr = self.data.get(idx)
            if arr is not None:
                self._release(idx)
        if arr is None:  # the owner failed, or could not keep it for lack of budget
            arr = self._read(region)
        return arr


class _Plan:
    """Work units over the primary input's chunk grid, and how to fetch every input for a unit."""

    def __init__(self, vols: list[Volume], workers: int, cache_budget: int = CACHE_BUDGET):
        shape = vols[0].shape
        zarrs = [v for v in vols if v.kind == "zarr"]
        if zarrs:
            primary = max(zarrs, key=lambda v: (math.prod(v.spatial_chunks), v.role == "gt"))
            pchunks = primary.spatial_chunks
        else:
            primary = vols[0]
            target = max(1 << 16, min(UNIT_VOXELS, math.prod(shape) // max(1, 4 * workers)))
            pchunks = auto_chunks(shape, target)
        self.shape = shape
        self.primary = primary
        self.pbounds = boundaries(shape, pchunks)
        self.bounds = {
            v.role: (boundaries(shape, v.spatial_chunks) if v.kind == "zarr" else None) for v in vols
        }
        self.caches: dict[str, _ChunkCache] = {}
        for v in zarrs:
            if v is not primary:
                self.caches[v.role] = _ChunkCache(v, self._uses_fn(self.bounds[v.role]), cache_budget)
        self.direct_reads = {v.role: 0 for v in zarrs}
        self.count_lock = threading.Lock()

    def _uses_fn(self, sb: list[list[int]]) -> Callable[[tuple[int, ...]], int]:
        pb = self.pbounds

        def uses(idx: tuple[int, ...]) -> int:
            n = 1
            for a, j in enumerate(idx):
                lo = _interval_index(pb[a], sb[a][j])
                hi = _interval_index(pb[a], sb[a][j + 1] - 1)
                n *= hi - lo + 1
            return n

        return uses

    def units(self) -> Iterator[Region]:
        per_axis = [list(zip(b[:-1], b[1:])) for b in self.pbounds]
        return itertools.product(*per_axis)

    def n_units(self) -> int:
        return math.prod(len(b) - 1 for b in self.pbounds)

    def pieces(self, vol: Volume, unit: Region) -> tuple[list[list[int]], dict[tuple[int, ...], np.ndarray]]:
        """Split ``unit`` along ``vol``'s chunk boundaries: per-axis cut points and the data per piece."""
        whole = tuple(slice(a, b) for a, b in unit)
        sb = self.bounds.get(vol.role)
        if vol is self.primary or sb is None:
            if vol.kind == "zarr":
                with self.count_lock:
                    self.direct_reads[vol.role] += 1
            return [[a] for a, _ in unit], {(0,) * len(unit): vol.read(whole, reuse=True)}
        idx_ranges = [
            range(_interval_index(sb[a], lo), _interval_index(sb[a], hi - 1) + 1)
            for a, (lo, hi) in enumerate(unit)
        ]
        nested = all(
            sb[a][r[0]] >= lo and sb[a][r[-1] + 1] <= hi
            for a, (r, (lo, hi)) in enumerate(zip(idx_ranges, unit))
        )
        if nested:
            with self.count_lock:
                self.direct_reads[vol.role] += math.prod(len(r) for r in idx_ranges)
            return [[a] for a, _ in unit], {(0,) * len(unit): vol.read(whole, reuse=True)}
        cuts = [[max(sb[a][j], lo) for j in r] for a, (r, (lo, _)) in enumerate(zip(idx_ranges, unit))]
        data = {}
        cache = self.caches[vol.role]
        for local_idx, idx in zip(
            itertools.product(*(range(len(r)) for r in idx_ranges)), itertools.product(*idx_ranges)
        ):
            creg = tuple(slice(sb[a][j], sb[a][j + 1]) for a, j in enumerate(idx))
            chunk = cache.get(idx, creg)
            sub = tuple(
                slice(max(lo, c.start) - c.start, min(hi, c.stop) - c.start)
                for (lo, hi), c in zip(unit, creg)
            )
            data[local_idx] = chunk[sub]
        return cuts, data

    def decodes(self) -> dict[str, int]:
        out = dict(self.direct_reads)
        for role, c in self.caches.items():
            out[role] = out.get(role, 0) + c.decodes
        return out


def _cells(unit: Region, cut_lists: list[list[list[int]]]) -> Iterator[tuple[Region, list[tuple[int, ...]]]]:
    """Cells of the common refinement of several piece grids over ``unit``.

    Yields each cell and, per input, the index of the piece that holds it.
    """
    ndim = len(unit)
    axes = []
    for a in range(ndim):
        pts = sorted({p for cuts in cut_lists for p in cuts[a]} | {unit[a][0]})
        axes.append(list(zip(pts, [*pts[1:], unit[a][1]])))
    for cell in itertools.product(*axes):
        which = [
            tuple(bisect.bisect_right(cuts[a], cell[a][0]) - 1 for a in range(ndim)) for cuts in cut_lists
        ]
        yield cell, which


def _view(piece: np.ndarray, origin: Sequence[int], cell: Region) -> np.ndarray:
    return piece[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(cell, origin))]


def make_counter(acc: ConfusionMatrix, backend: str) -> Any:
    """A per-worker counter: ``add_chunk(gt, pred, mask, offset=...)``, then :func:`finish_counter`."""
    if backend == "cuda":
        from .kernels.cuda import CudaCounter

        return CudaCounter(acc.spawn())
    return acc.spawn()


def finish_counter(counter: Any) -> ConfusionMatrix:
    """The accumulator that a counter from :func:`make_counter` filled."""
    return counter if isinstance(counter, ConfusionMatrix) else counter.finish()


def _count_unit(counter: Any, plan: _Plan, gv: Volume, pv: Volume, mv: Volume | None, unit: Region) -> None:
    vols = [gv, pv] + ([mv] if mv is not None else [])
    fetched = [plan.pieces(v, unit) for v in vols]
    cut_lists = [f[0] for f in fetched]
    if all(len(c) == 1 for cuts in cut_lists for c in cuts):  # one piece each: the aligned case
        arrays = [f[1][(0,) * len(unit)] for f in fetched]
        counter.add_chunk(
            arrays[0], arrays[1], arrays[2] if mv is not None else None, offset=[a for a, _ in unit]
        )
        return
    for cell, which in _cells(unit, cut_lists):
        arrays = []
        for (cuts, data), w in zip(fetched, which):
            origin = [cuts[a][w[a]] for a in range(len(unit))]
            arrays.append(_view(data[w], origin, cell))
        counter.add_chunk(
            arrays[0], arrays[1], arrays[2] if mv is not None else None, offset=[a for a, _ in cell]
        )


def _run_device(acc: ConfusionMatrix, gv: Volume, pv: Volume, mv: Volume | None, backend: str) -> RunStats:
    """Arrays already on the GPU: one CUDA count in place, no chunking and no copy to the host."""
    if backend != "cuda":
        raise OptionError(
            "the inputs include arrays already on the GPU: use backend='cuda' (or 'auto'), "
            "or copy them to the host first"
        )
    if acc._prob is not None:
        raise OptionError("probability maps on the GPU are not supported yet; copy them to the host first")
    from .kernels.cuda import count_device

    count_device(pv.array, gv.array, acc, mask=None if mv is None else mv.array)
    return RunStats(engine="device", workers=1, units=1)


# ------------------------------------------------------------------------------- thread engine
def _run_threads(
    acc: ConfusionMatrix,
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    workers: int,
    progress: Callable[[int], None] | None,
    backend: str = "cpu",
) -> RunStats:
    vols = [gv, pv] + ([mv] if mv is not None else [])
    plan = _Plan(vols, workers)
    n_units = plan.n_units()
    workers = max(1, min(workers, n_units))
    units = plan.units()
    lock = threading.Lock()
    stop = threading.Event()
    counters = [make_counter(acc, backend) for _ in range(workers)]

    def work(counter: Any) -> None:
        while not stop.is_set():
            with lock:
                unit = next(units, None)
            if unit is None:
                return
            _count_unit(counter, plan, gv, pv, mv, unit)
            if progress is not None:
                progress(math.prod(b - a for a, b in unit))

    if workers == 1:
        work(counters[0])
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="fastseg") as ex:
            futures = [ex.submit(work, c) for c in counters]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # KeyboardInterrupt: let the workers finish their unit and stop
                stop.set()
                raise
            for f in done:
                if f.exception() is not None:
                    stop.set()
                    wait(futures)
                    raise f.exception()
            wait(futures)
            for f in futures:
                f.result()
    finished = [finish_counter(c) for c in counters]  # a late (CUDA) error must leave acc untouched
    for f in finished:
        acc.merge(f)
    zarrs = [v for v in vols if v.kind == "zarr"]
    return RunStats(
        engine="threads",
        workers=workers,
        units=n_units,
        chunks_decoded=plan.decodes(),
        chunks_total={v.role: math.prod(len(b) - 1 for b in plan.bounds[v.role]) for v in zarrs},
    )
