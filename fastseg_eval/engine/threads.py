"""The threads engine: the calling thread and the threads of a kept pool read work units and
hand them to every reducer.

Contract (every engine keeps it): every voxel lies in exactly one block's core; each input chunk
is decoded once (while the chunk cache's budget allows); the reducers passed in change only
after the whole run succeeded.

A unit is one chunk of the *primary* input (the zarr input with the largest chunks; numpy-only
inputs are cut into slabs). Other inputs are read for the unit's region: in one call when their
chunks nest inside it, otherwise chunk by chunk through a shared, reference-counted cache so
that a chunk straddling several units is decoded once (while the cache budget allows). Each
thread holds its own spawned reducers; partials are merged at the end. Memory: about
``workers`` units plus the cache.

Halos: when a reducer asks for ``halo > 0``, each unit is read grown by the largest halo (clipped
at the volume's edges) and every zarr input goes through the chunk cache, whose use counts then
include the neighbouring units that need a chunk for their halo. A chunk is kept until its last
neighbour has read it while the halo budget (``HALO_CACHE_BUDGET`` per input) allows; past it, the
chunks whose next use lies farthest in the order of the units are dropped and decoded again when
needed (at 1024^3 with 128^3 chunks: about 2.9 decodes per chunk, and 0.25 GiB of cache instead of
0.6). Grown units are read into buffers each thread reuses. Reducers with a smaller halo get views trimmed to
theirs (:meth:`~fastseg_eval.reducers.base.Block.with_halo`).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import numpy as np

from fastseg_eval.engine.plan import (
    Region,
    RunStats,
    auto_chunks,
    boundaries,
    core_slices,
    grow,
    interval_index,
)
from fastseg_eval.io.volume import Volume
from fastseg_eval.reducers.base import Block, Reducer

log = logging.getLogger("fastseg_eval")

UNIT_VOXELS = 1 << 22  # target size of a numpy work unit
SMALL_RUN = 1 << 20
"""In-memory runs of fewer voxels, without a halo and with ``workers`` not given, count in the
calling thread alone: waking a second thread, the GIL turns of a few small units and one more
merge cost more than the second thread saves (measured with a pool started per run: a 2 x 64^3
update, K = 4: 1.1 ms with two threads, 0.2 ms in one; uint16 ids, 1 Mvoxel: 2.9 against 1.2 ms;
with the kept pool, the caller one of the workers: 1 Mvoxel K = 4 1.15 against 0.58 ms, ids 2.1
against 1.7 ms, even at 2 Mvoxel for ids)."""
CACHE_BUDGET = 512 << 20  # bytes of straddling chunks kept decoded per input (misaligned grids)
HALO_CACHE_BUDGET = 128 << 20  # per input, halo runs: chunks a neighbour needs much later are decoded again


class _ChunkCache:
    """Decoded chunks of one zarr input that several units need, freed after their last use.

    A chunk is decoded by the first thread that asks; others asking meanwhile wait for it.
    It is kept while later units still need it and the byte budget allows. When it does not,
    and the order of the units is known (``users``: the ordinals of the units that need a chunk),
    the chunks whose next use lies farthest ahead make room for one needed sooner (Belady's
    rule); a chunk dropped is decoded again when next needed (counted in ``decodes``).
    """

    def __init__(
        self,
        vol: Volume,
        uses: Callable[[tuple[int, ...]], int],
        budget: int,
        users: Callable[[tuple[int, ...]], list[int]] | None = None,
    ):
        self.vol, self.uses_of, self.budget, self.users_of = vol, uses, budget, users
        self.lock = threading.Lock()
        self.left: dict[tuple[int, ...], int] = {}  # uses not yet asked for
        self.data: dict[tuple[int, ...], np.ndarray] = {}
        self.users: dict[tuple[int, ...], list[int]] = {}  # sorted unit ordinals, of kept chunks
        self.transient: set[tuple[int, ...]] = set()  # kept only until the waiting threads read them
        self.pending: dict[tuple[int, ...], threading.Event] = {}  # being decoded by a thread
        self.waiting: dict[tuple[int, ...], int] = {}  # threads waiting for that decode
        self.nbytes = 0
        self.decodes = 0

    def _drop(self, idx: tuple[int, ...]) -> None:
        arr = self.data.pop(idx, None)
        if arr is not None:
            self.nbytes -= arr.nbytes
        self.users.pop(idx, None)
        self.transient.discard(idx)

    def _release(self, idx: tuple[int, ...]) -> None:
        """Drop a kept chunk once no use is left and nobody waits for it (lock held)."""
        if self.left[idx] == 0 and not self.waiting.get(idx):
            self._drop(idx)
            del self.left[idx]
            self.waiting.pop(idx, None)

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        arr = self.vol.read(region)
        with self.lock:
            self.decodes += 1
        return arr

    def _next(self, users: list[int], unit: int) -> int:
        i = bisect.bisect_right(users, unit)
        return users[i] if i < len(users) else math.inf  # type: ignore[return-value]

    def _room(self, idx: tuple[int, ...], nbytes: int, unit: int | None) -> bool:
        """Whether chunk ``idx`` (``nbytes``) may be kept, evicting chunks needed later than it if
        that makes room (lock held)."""
        if self.nbytes + nbytes <= self.budget:
            return True
        if self.users_of is None or unit is None:
            return False
        users = self.users.get(idx) or sorted(self.users_of(idx))
        mine = self._next(users, unit)
        later = sorted(
            ((self._next(self.users[k], unit), k) for k in self.data if k in self.users and not self.waiting.get(k)),
            reverse=True,
        )
        free, victims = self.budget - self.nbytes, []
        for nxt, k in later:
            if free >= nbytes or nxt <= mine:
                break
            victims.append(k)
            free += self.data[k].nbytes
        if free < nbytes:
            return False
        for k in victims:
            self._drop(k)
        self.users[idx] = users
        return True

    def get(self, idx: tuple[int, ...], region: tuple[slice, ...], unit: int | None = None) -> np.ndarray:
        """Chunk ``idx`` (``region``) for unit ``unit`` (its ordinal in the order of the units)."""
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
                waited = self.waiting.get(idx, 0) > 0
                if self.left[idx] > 0 and self._room(idx, arr.nbytes, unit):
                    self.data[idx] = arr
                    self.nbytes += arr.nbytes
                    if idx not in self.users and self.users_of is not None:
                        self.users[idx] = sorted(self.users_of(idx))
                elif waited:  # kept just for the threads waiting on this decode
                    self.data[idx] = arr
                    self.nbytes += arr.nbytes
                    self.transient.add(idx)
                elif self.left[idx] == 0:
                    self._release(idx)
            event.set()
            return arr
        event.wait()
        with self.lock:
            self.waiting[idx] -= 1
            arr = self.data.get(idx)
            if arr is not None:
                if idx in self.transient and not self.waiting[idx]:  # the last waiter has it: no room kept
                    self.transient.discard(idx)
                    self._drop(idx)
                self._release(idx)
        if arr is None:  # the owner failed, or could not keep it for lack of budget
            arr = self._read(region)
        return arr


class _Plan:
    """Work units over the primary input's chunk grid, and how to fetch every input for a unit."""

    def __init__(
        self, vols: list[Volume], workers: int, halo: int = 0, cache_budget: int = CACHE_BUDGET, constant: bool = False
    ):
        shape = vols[0].spatial_shape
        self.vols = vols
        self.constant = constant  # unit reads may be broadcasts of a fill value (unstored chunks)
        zarrs = [v for v in vols if v.kind == "zarr"]
        if zarrs:
            primary = max(zarrs, key=lambda v: (math.prod(v.spatial_chunks), v.role == "gt"))
            pchunks = primary.spatial_chunks
        else:
            primary = vols[0]
            target = max(1 << 16, min(UNIT_VOXELS, math.prod(shape) // max(1, 4 * workers)))
            pchunks = auto_chunks(shape, target)
        self.shape = shape
        self.halo = halo
        self.primary = primary
        self.pbounds = boundaries(shape, pchunks)
        self.bounds = {
            v.role: (boundaries(shape, v.spatial_chunks) if v.kind == "zarr" else None) for v in vols
        }
        self.caches: dict[str, _ChunkCache] = {}
        counts = [len(b) - 1 for b in self.pbounds]
        self.strides = [math.prod(counts[a + 1 :]) for a in range(len(counts))]  # unit ordinals, C order
        for v in zarrs:
            if v is not primary or halo > 0:
                sb = self.bounds[v.role]
                self.caches[v.role] = _ChunkCache(
                    v, self._uses_fn(sb), cache_budget if halo == 0 else min(cache_budget, HALO_CACHE_BUDGET),
                    self._users_fn(sb) if halo > 0 else None,
                )  # fmt: skip
        self.direct_reads = {v.role: 0 for v in zarrs}
        self.count_lock = threading.Lock()
        self._grown = threading.local()  # per thread and input: the grown-unit buffer

    def _uses_fn(self, sb: list[list[int]]) -> Callable[[tuple[int, ...]], int]:
        """How many (grown) units need chunk ``idx`` of a grid with boundaries ``sb``."""

        def uses(idx: tuple[int, ...]) -> int:
            return math.prod(len(r) for r in self._users(sb, idx))

        return uses

    def _users(self, sb: list[list[int]], idx: tuple[int, ...]) -> list[range]:
        """Per axis, the unit indices whose (grown) region meets chunk ``idx`` of grid ``sb``."""
        pb, h, shape = self.pbounds, self.halo, self.shape
        return [
            range(
                interval_index(pb[a], max(0, sb[a][j] - h)),
                interval_index(pb[a], min(shape[a], sb[a][j + 1] + h) - 1) + 1,
            )
            for a, j in enumerate(idx)
        ]

    def _users_fn(self, sb: list[list[int]]) -> Callable[[tuple[int, ...]], list[int]]:
        """The ordinals of the units that need chunk ``idx`` (in the order units are handed out)."""
        strides = self.strides

        def users(idx: tuple[int, ...]) -> list[int]:
            return [sum(i * st for i, st in zip(c, strides)) for c in itertools.product(*self._users(sb, idx))]

        return users

    def ordinal(self, unit: Region) -> int:
        """Position of ``unit`` in the order :meth:`units` hands units out."""
        return sum(interval_index(b, lo) * st for b, (lo, _), st in zip(self.pbounds, unit, self.strides))

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
            return [[a] for a, _ in unit], {(0,) * len(unit): vol.read(whole, reuse=True, constant=self.constant)}
        idx_ranges = [
            range(interval_index(sb[a], lo), interval_index(sb[a], hi - 1) + 1)
            for a, (lo, hi) in enumerate(unit)
        ]
        nested = all(
            sb[a][r[0]] >= lo and sb[a][r[-1] + 1] <= hi
            for a, (r, (lo, hi)) in enumerate(zip(idx_ranges, unit))
        )
        if nested:
            with self.count_lock:
                self.direct_reads[vol.role] += math.prod(len(r) for r in idx_ranges)
            return [[a] for a, _ in unit], {(0,) * len(unit): vol.read(whole, reuse=True, constant=self.constant)}
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

    def release(self) -> None:
        """Drop what the run's threads hold: the grown-unit buffers of every thread (the pool's
        threads outlive the run, and the plan may too: its chunk caches refer back to it, so it
        waits for the garbage collector), the chunk caches, and the inputs' read buffers."""
        self._grown = threading.local()
        self.caches.clear()
        for v in self.vols:
            v.release_buffers()

    def _grown_buffer(self, role: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """This thread's array for a grown unit of input ``role``, reused from unit to unit (a fresh
        one per unit cost the allocator's churn: measured hundreds of MiB of fragmented heap at
        1024^3 with boundary metrics). Valid until the thread's next grown read of that input,
        which comes after the engine has handed this unit to every reducer."""
        held = getattr(self._grown, role, None)
        n = math.prod(shape)
        if held is None or held.dtype != dtype or held.size < n:
            held = np.empty(n, dtype=dtype)
            setattr(self._grown, role, held)
        return held[:n].reshape(shape)

    def read_grown(self, vol: Volume, region: Region, unit: int | None = None) -> np.ndarray:
        """All of ``region`` (a unit grown by the halo) of ``vol`` as one array (a copy for zarr, in a
        buffer this thread reuses for its next grown read of ``vol``)."""
        sb = self.bounds.get(vol.role)
        whole = tuple(slice(a, b) for a, b in region)
        if sb is None:
            return vol.read(whole)
        cache = self.caches[vol.role]
        out: np.ndarray | None = None
        idx_ranges = [
            range(interval_index(sb[a], lo), interval_index(sb[a], hi - 1) + 1) for a, (lo, hi) in enumerate(region)
        ]
        for idx in itertools.product(*idx_ranges):
            creg = tuple(slice(sb[a][j], sb[a][j + 1]) for a, j in enumerate(idx))
            chunk = cache.get(idx, creg, unit)
            if out is None:
                extra = chunk.shape[len(region) :]  # a probability map's channel axis
                out = self._grown_buffer(vol.role, tuple(b - a for a, b in region) + extra, chunk.dtype)
            dst = tuple(slice(max(lo, c.start) - lo, min(hi, c.stop) - lo) for (lo, hi), c in zip(region, creg))
            src = tuple(slice(max(lo, c.start) - c.start, min(hi, c.stop) - c.start) for (lo, hi), c in zip(region, creg))
            out[dst] = chunk[src]
        return out  # type: ignore[return-value]  (a region holds at least one chunk)

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



def unit_blocks(plan: _Plan, gv: Volume, pv: Volume, mv: Volume | None, unit: Region) -> Iterator[Block]:
    """The blocks of one unit: the unit grown by the plan's halo, or (halo 0) the cells of the
    inputs' common chunk refinement, which need no copy."""
    shape = plan.shape
    if plan.halo > 0:
        grown = grow(unit, plan.halo, shape)
        u = plan.ordinal(unit)
        arrays = [plan.read_grown(v, grown, u) for v in (gv, pv)]
        mask = None if mv is None else plan.read_grown(mv, grown, u)
        yield Block(
            gt=arrays[0], pred=arrays[1], mask=mask, origin=tuple(a for a, _ in unit),
            core=core_slices(unit, grown), shape=shape, halo=plan.halo,
        )  # fmt: skip
        return
    vols = [gv, pv] + ([mv] if mv is not None else [])
    fetched = [plan.pieces(v, unit) for v in vols]
    cut_lists = [f[0] for f in fetched]
    if all(len(c) == 1 for cuts in cut_lists for c in cuts):  # one piece each: the aligned case
        cells: Iterator[tuple[Region, list[tuple[int, ...]]]] = iter([(unit, [(0,) * len(unit)] * len(vols))])
    else:
        cells = _cells(unit, cut_lists)
    for cell, which in cells:
        arrays = []
        for (cuts, data), w in zip(fetched, which):
            origin = [cuts[a][w[a]] for a in range(len(unit))]
            arrays.append(_view(data[w], origin, cell))
        yield Block(
            gt=arrays[0], pred=arrays[1], mask=arrays[2] if mv is not None else None,
            origin=tuple(a for a, _ in cell), core=tuple(slice(0, b - a) for a, b in cell), shape=shape,
        )  # fmt: skip


class _KeptPool:
    """Worker threads kept from one run to the next.

    Starting a thread costs 0.3-0.7 ms on a small VM (the call waits until the thread runs), and
    a run started two: about 1 ms before the first unit was counted, 8-10 % of a 512**3 K = 4
    count in memory, more than the whole count of a training-loop batch. One run at a time holds
    the kept pool; a run that finds it held (another thread's run, or a run nested in one) makes
    a pool of its own for its duration, as before, so that no run ever waits for another's
    units. The pool grows to the largest ``workers`` asked for; a forked child starts without
    one (the parent's threads do not exist there). Idle threads are joined at interpreter exit
    by :mod:`concurrent.futures`, as any executor's.
    """

    def __init__(self) -> None:
        self._held = threading.Lock()
        self._ex: ThreadPoolExecutor | None = None
        self._size = 0

    @contextmanager
    def lend(self, workers: int) -> Iterator[ThreadPoolExecutor]:
        if not self._held.acquire(blocking=False):
            with ThreadPoolExecutor(workers, thread_name_prefix="fastseg") as own:
                yield own
            return
        try:
            if self._ex is None or self._size < workers:
                if self._ex is not None:
                    self._ex.shutdown(wait=False)  # idle threads: they exit at once
                self._ex = ThreadPoolExecutor(workers, thread_name_prefix="fastseg")
                self._size = workers
            yield self._ex
        finally:
            self._held.release()


_POOL = _KeptPool()


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there."""
    global _POOL
    _POOL = _KeptPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_threads(
    reducers: Sequence[Reducer],
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    workers: int,
    progress: Callable[[int], None] | None,
    auto: bool = False,
) -> RunStats:
    """Run ``reducers`` over the inputs in a thread pool; merge their partials on success.
    ``auto``: ``workers`` is the default, not the caller's (see :data:`SMALL_RUN`)."""
    vols = [gv, pv] + ([mv] if mv is not None else [])
    halo = max((int(r.halo) for r in reducers), default=0)
    if auto and halo == 0 and all(v.kind == "numpy" for v in vols) and math.prod(gv.spatial_shape) < SMALL_RUN:
        workers = 1
    constant = all(getattr(r, "accepts_constant", False) for r in reducers)
    plan = _Plan(vols, workers, halo=halo, constant=constant)
    try:
        return _run_plan(plan, reducers, workers, progress)
    finally:
        plan.release()  # the kept pool's threads outlive the run: drop what they hold for it


def _run_plan(
    plan: _Plan, reducers: Sequence[Reducer], workers: int, progress: Callable[[int], None] | None
) -> RunStats:
    """The body of :func:`run_threads` once its plan is made (the inputs are the plan's: gt, pred,
    and the mask if there is one)."""
    vols, halo = plan.vols, plan.halo
    gv, pv, mv = vols[0], vols[1], (vols[2] if len(vols) > 2 else None)
    n_units = plan.n_units()
    workers = max(1, min(workers, n_units))
    units = plan.units()
    empty: list[Region] = []
    if plan.constant and halo == 0 and plan.primary.kind == "zarr":
        # Units whose chunks the stores do not hold are counted first, in this thread: each is a
        # few Python steps, which two threads would only take turns at (the GIL).
        rest = []
        for unit in units:
            region = tuple(slice(a, b) for a, b in unit)
            if all(v.unstored(region) for v in (plan.primary, *(v for v in vols if v is not plan.primary))):
                empty.append(unit)
            else:
                rest.append(unit)
        units = iter(rest)
    lock = threading.Lock()
    stop = threading.Event()
    crews = [[r.spawn() for r in reducers] for _ in range(workers)]
    halos = [int(r.halo) for r in reducers]

    def work(crew: list[Any], units: Iterator[Region]) -> None:
        while not stop.is_set():
            with lock:
                unit = next(units, None)
            if unit is None:
                return
            for block in unit_blocks(plan, gv, pv, mv, unit):
                for r, h in zip(crew, halos):
                    r.add(block.with_halo(h))
            if progress is not None:
                progress(math.prod(b - a for a, b in unit))

    def work_and_finish(crew: list[Any], units: Iterator[Region]) -> list[Any]:
        # a worker finishes its reducers in its own thread: heavy finishes (sorting a contingency
        # table, copying device counts back) run side by side, not one after the other
        try:
            work(crew, units)
            return [r.finish() for r in crew]
        except BaseException:
            stop.set()  # the others stop after their unit
            raise

    work(crews[0], iter(empty))
    if workers == 1:
        partials = [work_and_finish(crews[0], units)]
    else:
        # this thread is one of the workers: it counts at once, while the kept pool's threads
        # wake up (a fraction of a millisecond each on a small VM)
        with _POOL.lend(workers - 1) as ex:
            futures = [ex.submit(work_and_finish, c, units) for c in crews[1:]]
            try:
                mine = work_and_finish(crews[0], units)
                wait(futures)
            except BaseException:  # a bad value, or KeyboardInterrupt: the others finish their unit
                stop.set()
                wait(futures)
                raise
            for f in futures:
                exc = f.exception()
                if exc is not None:
                    raise exc
            # every worker finished before any partial is merged: a late (CUDA) error leaves the
            # reducers untouched
            partials = [mine] + [f.result() for f in futures]
    for crew in partials:
        for r, part in zip(reducers, crew):
            r.merge(part)
    zarrs = [v for v in vols if v.kind == "zarr"]
    return RunStats(
        engine="threads",
        workers=workers,
        units=n_units,
        chunks_decoded=plan.decodes(),
        chunks_total={v.role: math.prod(len(b) - 1 for b in plan.bounds[v.role]) for v in zarrs},
    )
