"""The surface-distance reducer: exact boundary distances per label, out of core.

What it computes
    For every label ``L`` (background and ignore labels aside) and both directions (ground truth
    to prediction, prediction to ground truth): for each surface point of ``L`` on one side, the
    physical distance to the nearest surface point of ``L`` on the other side. Surface points are
    voxels or voxel corners (:mod:`fastseg_eval.kernels.surface`); the metric layer
    (:mod:`fastseg_eval.metrics.boundary`) turns the distances into hd, hd95, assd, masd, nsd.

Near points, in the pass (``add``)
    The reducer asks the engine for a halo of ``reach + 1`` voxels. In each block it extracts the
    surface points of both sides, all labels in one scan, in the core grown by ``reach`` (the
    extra voxel decides surface-ness across the block's edge) and, for every surface point it
    *owns* (in the core), walks the integer offsets ``o`` with ``|o_axis| <= reach``, sorted by
    length, up to the first surface point of the other side. Each side's points are marked once
    per block in a bitmap, one bit per label (the window's first 8 labels; a label past those is
    marked alone, in a plane of its own, when searched), with the same bits per cell of 4 x 4 x 4
    points. The first stage probes the marks up to ``_FIRST_STAGE`` voxels away; the rest walk
    the cells nearest first, looking into a cell only when its bit is set. Every point outside
    that box lies at
    least ``G = (reach + 1) * min(spacing)`` away, and only offsets shorter than ``G`` count, so a
    hit is the exact nearest point. The record is compact and exact: per label and direction, a
    count per (distance value, neighbourhood code), the distance being an index into the sorted
    distinct offset lengths (a few hundred values; 256 codes for DeepMind's surfels, 1 for voxel
    conventions). Partials merge by adding counts: a few hundred kilobytes per label, whatever
    the volume or its surface area.

Far points, after the pass (:func:`finish_distances`)
    A point with no hit is *far* (its nearest counterpart is at least ``G`` away, possibly beyond
    the block): its coordinates and code are kept (sparse: about 1 % of the points on the
    benchmark's blobs). The pass also sets, per label and side, one bit per coarse cell (``cell``
    points on an edge, at most ``_GRID`` cells per axis) that holds surface points. After the
    pass, per far point: an upper bound ``u`` of its distance (the nearest occupied cell by its
    farthest point, found by a shell search over the bits); the occupied cells with a point
    within ``u`` are *wanted* (the nearest point lies in one of them). Then the input is read
    again tile by tile (tiles = its chunks, each decoded about once; tiles without wanted cells
    are not read), the surface points of the wanted cells alone are extracted, and every far
    point whose ``u``-ball meets the tile is answered by a k-d tree of its label's points there;
    the nearest over the tiles wins. Memory: the far points and the bits, plus one tile's points
    per thread and a bounded cache of decoded chunks (``_CHUNK_CACHE``), never the volume's
    surface.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastseg_eval.errors import FastSegError
from fastseg_eval.kernels import surface as K
from fastseg_eval.reducers.base import Block

DEFAULT_REACH = 16
"""Voxels searched around each surface point inside a block (the halo is one more)."""
MAX_LABELS = 1024
"""Most labels boundary metrics are computed for in one run (per-label state is per worker)."""
_WINDOW_LABELS = 4096  # distinct labels one window may hold (kernel label table)
_TILE = 128  # edge of the regions read again for far points when an input has no chunk grid
_GRID = 128  # coarse cells per axis, at most (occupancy bits: 256 KiB per label and side)
_CHUNK_CACHE = 64 << 20  # bytes of decoded chunks the far step keeps (a tile reads its neighbours' edges)
_GT, _PRED = 0, 1


def _point_buffers(cap: int, table: np.ndarray | None = None, ntab: np.ndarray | None = None) -> tuple:
    """Output buffers of the surface kernels for ``cap`` points: coordinates, label indices,
    codes, owned flags, and the window's label table (kept when the buffers grow)."""
    return (
        np.empty((cap, 3), np.int32), np.empty(cap, np.int32), np.empty(cap, np.uint8), np.empty(cap, np.bool_),
        np.zeros(_WINDOW_LABELS, np.int64) if table is None else table,
        np.zeros(1, np.int64) if ntab is None else ntab,
    )
DIRECTIONS = ("gt_to_pred", "pred_to_gt")  # direction d goes from side d to side 1 - d


_CELL = 4  # edge of the cells of the second search stage (points; the kernels' shifts assume 4)
_FIRST_STAGE = 4.0  # the first stage walks offsets shorter than this many times the smallest spacing


def cell_offsets_table(reach: int, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Cell offsets (cells of :data:`_CELL` points) that can hold a point within ``reach``, sorted by
    a lower bound of the distance between any point of a cell and any point of a cell that far."""
    r = -(-reach // _CELL) + 1
    g = np.arange(-r, r + 1)
    cz, cy, cx = (a.ravel() for a in np.meshgrid(g, g, g, indexing="ij"))
    gap = [np.maximum(0, (np.abs(c) - 1) * _CELL + 1) for c in (cz, cy, cx)]
    bound = np.sqrt(sum((gp * s) ** 2 for gp, s in zip(gap, spacing)))
    order = np.argsort(bound, kind="stable")
    offs = np.stack([cz[order], cy[order], cx[order]], axis=1).astype(np.int64)
    return offs, bound[order] * (1 - 1e-12)  # a hair lower: the bound never cuts an equal distance


def offsets_table(reach: int, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer offsets within ``reach`` on every axis and shorter than ``(reach + 1) * min(spacing)``,
    sorted by physical length: ``(offsets (n, 3) int32, distance index per offset, distinct lengths)``."""
    r = np.arange(-reach, reach + 1)
    oz, oy, ox = (a.ravel() for a in np.meshgrid(r, r, r, indexing="ij"))
    d = K.offset_distance(oz, oy, ox, spacing)
    keep = d < (reach + 1) * min(spacing)
    oz, oy, ox, d = oz[keep], oy[keep], ox[keep], d[keep]
    order = np.argsort(d, kind="stable")
    offsets = np.stack([oz[order], oy[order], ox[order]], axis=1).astype(np.int32)
    values, index = np.unique(d[order], return_inverse=True)
    return offsets, index.astype(np.int32), values


@dataclass
class _Label:
    """The state of one label: near-distance counts, far points, occupied cells, point counts."""

    hist: np.ndarray  # int64 (2, n_distances * n_codes), by direction
    cells: np.ndarray  # uint8 (2, ceil(n_cells / 8)): one bit per coarse cell holding surface points, by side
    npoints: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # surface points by side
    far: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=lambda: [[], []])  # by direction

    def merge(self, other: _Label) -> None:
        self.hist += other.hist
        np.bitwise_or(self.cells, other.cells, out=self.cells)
        self.npoints += other.npoints
        for d in (0, 1):
            self.far[d].extend(other.far[d])

    def pack(self) -> None:
        for d in (0, 1):
            if len(self.far[d]) > 1:
                self.far[d] = [(np.concatenate([c for c, _ in self.far[d]]), np.concatenate([k for _, k in self.far[d]]))]


class SurfaceDistances:
    """Reducer of exact surface distances per label (see the module docstring).

    Parameters
    ----------
    points : {"voxels", "corners"}
        What a surface point is (MONAI / MedPy voxels, DeepMind corners).
    spacing : (float, float, float)
        Physical voxel size (z, y, x).
    skip : sequence of int
        Labels that get no surface (the background, the ignore label).
    reach : int
        Voxels searched around each point inside a block; the halo is ``reach + 1``.
    """

    def __init__(
        self,
        points: str = "corners",
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        skip: tuple[int, ...] = (),
        reach: int | None = None,
        _tables: Any = None,
    ) -> None:
        if points not in ("voxels", "corners"):
            raise ValueError(f"points must be 'voxels' or 'corners', got {points!r}")
        self.points = points
        self.spacing = tuple(float(s) for s in spacing)
        self.skip = tuple(int(s) for s in skip)
        self.reach = int(DEFAULT_REACH if reach is None else reach)
        self.halo = self.reach + 1
        self.ncodes = 256 if points == "corners" else 1
        if _tables is None:
            offsets, offset_dist, distances = offsets_table(self.reach, self.spacing)
            limit = (self.reach + 1) * min(self.spacing)
            first = int(np.searchsorted(distances[offset_dist], _FIRST_STAGE * min(self.spacing)))
            index = np.full((2 * self.reach + 1,) * 3, -1, np.int32)
            index[tuple((offsets + self.reach).T)] = offset_dist
            cells, bounds = cell_offsets_table(self.reach, self.spacing)
            _tables = (offsets, offset_dist, distances, first, index, cells, bounds, limit)
        self._tables = _tables
        (self.offsets, self.offset_dist, self.distances, self._first, self._index, self._cells,
         self._bounds, self._limit) = _tables  # fmt: skip
        self.labels: dict[int, _Label] = {}
        self.shape: tuple[int, ...] | None = None
        self.blocks = 0
        self.spawned = 0
        self._buffers: dict[Any, Any] = {}

    # ------------------------------------------------------------------ protocol
    def spawn(self) -> SurfaceDistances:
        self.spawned += 1  # the far step uses as many threads as the pass had workers
        return SurfaceDistances(
            self.points, self.spacing, self.skip, self.reach,
            _tables=self._tables,
        )  # fmt: skip

    def finish(self) -> SurfaceDistances:
        for st in self.labels.values():
            st.pack()
        return self

    def merge(self, other: SurfaceDistances) -> SurfaceDistances:
        if other.shape is not None:
            self._set_shape(other.shape)
        for lab, st in other.labels.items():
            mine = self.labels.get(lab)
            if mine is None:
                self.labels[lab] = st
            else:
                mine.merge(st)
        self._check_count()
        self.blocks += other.blocks
        return self

    def far_count(self) -> int:
        """Surface points whose nearest counterpart lay beyond the block (resolved after the pass)."""
        return sum(sum(c.shape[0] for c, _ in st.far[d]) for st in self.labels.values() for d in (0, 1))

    # ------------------------------------------------------------------ geometry
    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if self.shape is None:
            self.shape = tuple(int(s) for s in shape)
        elif tuple(shape) != self.shape:
            raise ValueError(f"blocks of two volumes ({self.shape}, {tuple(shape)}) in one surface reducer")

    @property
    def cell(self) -> int:
        """Edge of the coarse cells that record where surface points are (in points)."""
        assert self.shape is not None
        return max(8, -(-(max(self.shape) + 1) // _GRID))

    @property
    def grid(self) -> tuple[int, int, int]:
        assert self.shape is not None
        c = self.cell
        return tuple(-(-(n + 1) // c) for n in self.shape)  # type: ignore[return-value]

    def _label(self, lab: int) -> _Label:
        st = self.labels.get(lab)
        if st is None:
            st = _Label(
                hist=np.zeros((2, self.distances.size * self.ncodes), np.int64),
                cells=np.zeros((2, -(-math.prod(self.grid) // 8)), np.uint8),
            )
            self.labels[lab] = st
            self._check_count()
        return st

    def _check_count(self) -> None:
        if len(self.labels) > MAX_LABELS:
            raise FastSegError(
                f"boundary metrics cover at most {MAX_LABELS} labels in one run; these volumes hold more. "
                "Evaluate the boundary metrics on a label subset (or a relabelled volume)"
            )

    def regions(self, n: tuple[int, ...], win0: tuple[int, ...], core: tuple[slice, ...] | None):
        """(points to extract ``[lo, hi)``, points owned ``[own_lo, own_hi)``) in window coordinates.

        ``core`` None: the whole window is owned (the far step's reads).
        """
        assert self.shape is not None
        shape, reach = self.shape, (self.reach if core is not None else 0)
        lo, hi, olo, ohi = [], [], [], []
        for a in range(3):
            at_start, at_end = win0[a] == 0, win0[a] + n[a] == shape[a]
            if self.points == "voxels":
                first, last = (0 if at_start else 1), (n[a] if at_end else n[a] - 1)  # decidable voxels
            else:
                first, last = (0 if at_start else 1), (n[a] + 1 if at_end else n[a])  # decidable corners
            if core is None:
                cs, ce = first, last
            else:
                cs, ce = core[a].start, core[a].stop
                if self.points == "corners" and win0[a] + ce == shape[a]:
                    ce += 1  # the corner on the volume's far face belongs to the last block
            olo.append(cs)
            ohi.append(ce)
            lo.append(max(cs - reach, first))
            hi.append(min(ce + reach, last))
        return (np.array(lo, np.int64), np.array(hi, np.int64), np.array(olo, np.int64), np.array(ohi, np.int64))

    def extract(self, win: np.ndarray, lo, hi, olo, ohi, slot: int = 0):
        """Surface points of ``win`` in ``[lo, hi)``: coordinates, label values, codes, owned flags.

        The outputs live in buffers this reducer keeps per ``slot`` (grown when a window needs more);
        they are valid until the next call with the same slot.
        """
        skip = np.array(self.skip, np.int64)
        if win.dtype == np.bool_:
            win = win.view(np.uint8)
        kernel = K.voxel_surface if self.points == "voxels" else K.corner_surface
        region = int(np.prod(np.maximum(np.asarray(hi) - np.asarray(lo), 0)))
        (zyx, lab, code, own, table, ntab), n = self._points(
            slot, max(1 << 12, region // 4),
            lambda zyx, lab, code, own, table, ntab: kernel(win, lo, hi, olo, ohi, skip, table, ntab, zyx, lab, code, own),
        )  # fmt: skip
        return zyx[:n], table[: int(ntab[0])].copy(), lab[:n], code[:n], own[:n]

    def _points(self, key: Any, cap: int, run: Any) -> tuple[tuple, int]:
        """Run a surface kernel (``run(*buffers)`` -> points written, -2 when the buffers are full)
        on this reducer's point buffers under ``key``, doubling them until it fits."""
        while True:
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = _point_buffers(cap)
            buf[5][0] = 0  # the window's label table starts empty
            n = run(*buf)
            if n != -2:
                break
            self._buffers[key] = _point_buffers(2 * buf[1].shape[0], buf[4], buf[5])
        if n < 0:
            raise FastSegError(
                f"more than {_WINDOW_LABELS} distinct labels in one block: boundary metrics are meant for "
                "semantic labels, not instance ids"
            )
        return buf, n

    def extract_boxes(self, win: np.ndarray, boxes: np.ndarray):
        """Surface points of ``win`` inside ``boxes`` (window coordinates): coordinates, the label
        table, label indices (buffers valid until the next call)."""
        skip = np.array(self.skip, np.int64)
        if win.dtype == np.bool_:
            win = win.view(np.uint8)
        corners = self.points == "corners"
        (zyx, lab, code, own, table, ntab), n = self._points(
            ("far", threading.get_ident()), max(1 << 14, win.size // 8),  # one buffer per thread of the far step
            lambda zyx, lab, code, own, table, ntab: K.surface_in_boxes(
                win, corners, boxes, skip, table, ntab, zyx, lab, code, own
            ),
        )  # fmt: skip
        return zyx[:n], table[: int(ntab[0])].copy(), lab[:n]

    def _one_label(self, bshape: tuple[int, ...], cshape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Marks and cells of one label at a time (labels past a window's 8th), shaped as the
        bit planes of this block; all zero between uses (every mark is undone)."""
        size, csize = math.prod(bshape), math.prod(cshape)
        held = self._buffers.get("one")
        if held is None or held[0].size < size or held[1].size < csize:
            held = self._buffers["one"] = (np.zeros(size, np.uint8), np.zeros(csize, np.uint8))
        return held[0][:size].reshape(bshape), held[1][:csize].reshape(cshape)

    def _scratch(self, key: Any, n: int, dtype: Any) -> np.ndarray:
        """``n`` elements of a per-worker scratch array (grown, never shrunk): no allocation churn
        per block, which glibc would otherwise keep as heap fragments."""
        buf = self._buffers.get(key)
        if buf is None or buf.size < n:
            buf = self._buffers[key] = np.empty(max(n, 1 << 16), dtype)
        return buf[:n]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buffers"] = {}  # scratch space never travels
        return state

    def add(self, block: Block) -> None:
        if block.gt.ndim != 3 or block.pred.ndim != 3:
            raise FastSegError(
                f"boundary metrics need 3-D volumes; these blocks have {block.gt.ndim} dimensions"
            )
        self._set_shape(block.shape)
        n = block.gt.shape
        win0 = tuple(o - c.start for o, c in zip(block.origin, block.core))
        lo, hi, olo, ohi = self.regions(n, win0, block.core)
        bshape = (n[0] + 1, n[1] + 1, -(-(n[2] + 1) // 4) * 4)  # rows padded to 32-bit words
        cshape = tuple(-(-b // 4) for b in bshape)  # cells of 4 x 4 x 4 points
        size, csize = math.prod(bshape), math.prod(cshape)
        held = self._buffers.get("bits")  # both sides' label bits and their cells; all zero between blocks
        if held is None or held[0].shape[1] < size or held[1].shape[1] < csize:
            held = self._buffers["bits"] = (np.zeros((2, size), np.uint8), np.zeros((2, csize), np.uint8))
        bits = [held[0][s, :size].reshape(bshape) for s in (0, 1)]
        coarse = [held[1][s, :csize].reshape(cshape) for s in (0, 1)]
        sides = []
        for slot, arr in enumerate((block.gt, block.pred)):
            zyx, values, lab, code, own = self.extract(arr, lo, hi, olo, ohi, slot)
            K.mark_labels(bits[slot], coarse[slot], zyx, lab, lab.size)  # the window's first 8 labels: a bit each
            order = self._scratch(("order", slot), lab.size, np.int64)
            starts = np.empty(values.size + 1, np.int64)
            K.group_by_label(lab, values.size, order, starts)
            groups = {int(v): order[starts[i] : starts[i + 1]] for i, v in enumerate(values)}
            sides.append((zyx, code, own, groups, {int(v): i for i, v in enumerate(values)}))
        try:
            self._near(n, win0, sides, bits, coarse)
        finally:
            held[0][:, :size] = 0
            held[1][:, :csize] = 0

    def _near(self, n: tuple[int, ...], win0: tuple[int, ...], sides: list, bits: list, coarse: list) -> None:
        """Distances of the owned points within reach (the pass's part of :meth:`add`)."""
        origin = np.array(win0, np.int64)
        c, (_, gy, gx) = self.cell, self.grid
        cell_of = [((np.arange(m + 2) + o) // c).astype(np.int32) for m, o in zip(n, win0)]  # coarse cell per coordinate
        spacing = np.array(self.spacing)
        first_offsets, first_dist = self.offsets[: self._first], self.offset_dist[: self._first]
        for lab_value in sorted(set(sides[0][3]) | set(sides[1][3])):
            st = self._label(lab_value)
            owned = []
            for s in (0, 1):
                zyx, code, own, groups, _ = sides[s]
                idx = groups.get(lab_value, np.empty(0, np.int64))
                mine = idx[own[idx]]
                owned.append(mine)
                st.npoints[s] += mine.size
                if mine.size:
                    K.mark_cells(st.cells[s], zyx, mine, *cell_of, gy, gx)
            for d in (0, 1):  # direction d: from side d to side 1 - d
                a_idx = owned[d]
                if a_idx.size == 0:
                    continue
                a_zyx, a_code = sides[d][0], sides[d][1]
                b_zyx, b_groups = sides[1 - d][0], sides[1 - d][3]
                b_idx = b_groups.get(lab_value)
                dist = self._scratch("dist", a_idx.size, np.int64)
                dist.fill(-1)
                if b_idx is not None and b_idx.size:
                    li = sides[1 - d][4][lab_value]
                    if li < 8:  # marked by the extraction
                        plane, cells, bit = bits[1 - d], coarse[1 - d], np.uint8(1 << li)
                    else:  # past a window's 8th label: marked alone, in a plane of its own, then unmarked
                        plane, cells = self._one_label(bits[0].shape, coarse[0].shape)
                        bit = np.uint8(1)
                        K.mark_points(plane, cells, b_zyx, b_idx, 1)
                    try:
                        K.nearest_marked(plane, bit, a_zyx, a_idx, first_offsets, first_dist, dist)
                        if np.any(dist < 0):  # no counterpart among the nearest offsets: by cells
                            K.nearest_in_bits(
                                plane.view(np.uint32), cells, bit, a_zyx, a_idx, self._cells, self._bounds,
                                self._index, self.reach, spacing, self._limit, dist,
                            )  # fmt: skip
                    finally:
                        if li >= 8:
                            K.mark_points(plane, cells, b_zyx, b_idx, 0)
                    K.add_counts(st.hist[d], self.ncodes, dist, a_code, a_idx)
                far = a_idx[dist < 0]
                if far.size:
                    st.far[d].append((a_zyx[far].astype(np.int64) + origin, a_code[far].copy()))
        self.blocks += 1


# ====================================================================== after the pass
@dataclass
class DirectedPoints:
    """Distances of one label in one direction: sorted ``distance``, ``code``, ``count``."""

    distance: np.ndarray
    code: np.ndarray
    count: np.ndarray


def _physical(points: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    return points.astype(np.float64) * np.asarray(spacing, np.float64)


class _Tiles:
    """Windows of one input for the far step, assembled from whole chunks (zarr: decoded once
    while the byte budget keeps them) so that a tile's one-voxel rim costs no second decode."""

    def __init__(self, vol: Any, shape: tuple[int, ...], budget: int = _CHUNK_CACHE):
        chunks = getattr(vol, "spatial_chunks", None)
        self.vol, self.shape = vol, shape
        self.zarr = getattr(vol, "kind", None) == "zarr" and chunks is not None
        self.chunks = tuple(int(c) for c in chunks) if self.zarr else (_TILE,) * 3
        self.budget = budget
        self.cache: dict[tuple[int, ...], np.ndarray] = {}
        self.nbytes = 0
        self.lock = threading.Lock()

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        with self.lock:
            arr = self.cache.pop(idx, None)
            if arr is not None:
                self.cache[idx] = arr  # most recently used last
                return arr
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape))
        arr = np.asarray(self.vol.read(region))  # outside the lock: threads decode in parallel
        with self.lock:
            if idx not in self.cache:
                self.cache[idx] = arr
                self.nbytes += arr.nbytes
            while self.nbytes > self.budget and len(self.cache) > 1:
                old = next(iter(self.cache))
                self.nbytes -= self.cache.pop(old).nbytes
        return arr

    def window(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
        if not self.zarr:
            return np.asarray(self.vol.read(tuple(slice(a, b) for a, b in zip(lo, hi))))
        c = self.chunks
        ranges = [range(a // ci, (b - 1) // ci + 1) for a, b, ci in zip(lo, hi, c)]
        out = None
        for idx in itertools.product(*ranges):
            arr = self._chunk(idx)
            if out is None:
                out = np.empty(tuple(b - a for a, b in zip(lo, hi)), arr.dtype)
            start = [i * ci for i, ci in zip(idx, c)]
            src = tuple(slice(max(a, s0) - s0, min(b, s0 + n) - s0) for a, b, s0, n in zip(lo, hi, start, arr.shape))
            dst = tuple(slice(max(a, s0) - a, min(b, s0 + n) - a) for a, b, s0, n in zip(lo, hi, start, arr.shape))
            out[dst] = arr[src]
        return out  # type: ignore[return-value]


def _in_order(ex: Any, fn: Any, n: int, ahead: int) -> Any:
    """``fn(0), fn(1), ...`` in order, run on executor ``ex`` (None: here) with at most ``ahead`` in flight."""
    if ex is None:
        yield from map(fn, range(n))
        return
    pending: deque[Any] = deque()
    for i in range(n):
        pending.append(ex.submit(fn, i))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _resolve_far(
    red: SurfaceDistances, vol: Any, pts: np.ndarray, row: np.ndarray, occ: np.ndarray, labels: np.ndarray,
    workers: int = 1,
) -> np.ndarray:
    """Exact distances from far points ``pts`` to the surface of ``vol`` of their label (``row``
    indexes ``labels`` and ``occ``, the labels' occupancy bits on that side).

    1. an upper bound ``u`` of each point's distance: the nearest occupied cell, by its farthest point;
    2. the occupied cells with a point within ``u`` are *wanted* (the nearest point lies in one);
    3. the input is read again tile by tile (each chunk decoded about once), the surface points of
       the wanted cells extracted, and each far point whose ``u``-box meets the tile is queried in a
       k-d tree of its label's points there; the nearest over the tiles wins.
    Tiles are spread over ``workers`` threads (kernels and k-d trees release the GIL) and their
    answers merged in tile order. Memory: the far points, the bits, a tile's points per thread
    and the chunk cache.
    """
    from scipy.spatial import cKDTree

    assert red.shape is not None
    shape, c, grid = red.shape, red.cell, np.array(red.grid, np.int64)
    corners = red.points == "corners"
    npts = np.array([n + 1 if corners else n for n in shape], np.int64)  # points per axis
    spacing = np.array(red.spacing, np.float64)
    n = pts.shape[0]
    bound = np.empty(n)
    K.far_bounds(pts, row, occ, grid, c, npts, spacing, bound)
    bound = bound * (1 + 1e-9) + 1e-12  # never cut a cell at exactly the bound
    wanted = np.zeros_like(occ)
    K.want_cells(pts, row, bound, occ, grid, c, npts, spacing, wanted)
    union = np.bitwise_or.reduce(wanted, axis=0)
    tiles = _Tiles(vol, shape)
    tsz = np.array(tiles.chunks, np.int64)
    ntiles = np.maximum(1, -(-np.array(shape, np.int64) // tsz))
    # far point -> the tiles its u-ball meets (a point of the last tile's far face belongs to it)
    count = K.far_tiles(pts, bound, spacing, tsz, ntiles, npts, np.empty(0, np.int64), np.empty(0, np.int64))
    owner, tflat = np.empty(count, np.int64), np.empty(count, np.int64)
    K.far_tiles(pts, bound, spacing, tsz, ntiles, npts, owner, tflat)
    order = np.lexsort((row[owner], tflat))
    owner, tflat = owner[order], tflat[order]
    bounds_at = np.flatnonzero(np.r_[True, tflat[1:] != tflat[:-1]])
    phys = _physical(pts, red.spacing)
    gy, gx = int(grid[1]), int(grid[2])

    def tile(bi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Nearest candidates in one tile for the far points whose box meets it: (points, kd
        distances, integer offsets)."""
        start = bounds_at[bi]
        stop = bounds_at[bi + 1] if bi + 1 < bounds_at.size else owner.size
        t = int(tflat[start])
        tidx = np.array([t // (ntiles[1] * ntiles[2]), (t // ntiles[2]) % ntiles[1], t % ntiles[2]], np.int64)
        p_lo = tidx * tsz
        p_hi = np.where(tidx == ntiles - 1, npts, (tidx + 1) * tsz)  # points of this tile
        v_lo = np.maximum(p_lo - 1, 0)
        v_hi = np.minimum(p_hi + (0 if corners else 1), np.array(shape))
        boxes = np.empty((int(np.prod((p_hi - 1) // c - p_lo // c + 1)), 6), np.int64)
        nb = K.cell_boxes(union, grid, c, p_lo, p_hi, v_lo, boxes)
        if nb == 0:
            return None
        win = tiles.window(tuple(int(a) for a in v_lo), tuple(int(b) for b in v_hi))
        zyx, values, lab_idx = red.extract_boxes(win, boxes[:nb])
        if lab_idx.size == 0:
            return None
        who = owner[start:stop]
        rows = row[who]
        sel = np.empty(lab_idx.size, np.bool_)
        found = []
        for r in np.unique(rows):
            li = np.flatnonzero(values == labels[r])
            if li.size == 0 or K.points_in_cells(zyx, lab_idx, int(li[0]), v_lo, wanted[r], c, gy, gx, sel) == 0:
                continue
            tgt = zyx[sel].astype(np.int64) + v_lo
            q = who[rows == r]
            # nothing beyond the points' bounds can be the nearest: let the tree prune there
            tree = cKDTree(_physical(tgt, red.spacing), balanced_tree=False, compact_nodes=False)  # built 2x faster, queried no slower
            dq, j = tree.query(phys[q], distance_upper_bound=float(bound[q].max()))
            hit = np.isfinite(dq)
            q, dq, j = q[hit], dq[hit], j[hit]
            found.append((q, dq, tgt[j] - pts[q]))
        if not found:
            return None
        return tuple(np.concatenate(x) for x in zip(*found))  # type: ignore[return-value]

    best = np.full(n, np.inf)
    best_off = np.zeros((n, 3), np.int64)
    nthreads = max(1, min(workers, bounds_at.size))
    with ThreadPoolExecutor(nthreads, thread_name_prefix="fastseg-far") if nthreads > 1 else nullcontext() as ex:
        for res in _in_order(ex, tile, bounds_at.size, 2 * nthreads):  # the same answer for any thread count
            if res is None:
                continue
            q, dq, off = res
            better = dq < best[q]
            qb = q[better]
            best[qb] = dq[better]
            best_off[qb] = off[better]
    if not np.all(np.isfinite(best)):  # cannot happen: an occupied cell holds a point of its label
        raise FastSegError("a far surface point found no surface point again in its recorded cells")
    return K.offset_distance(best_off[:, 0], best_off[:, 1], best_off[:, 2], red.spacing)


def finish_distances(
    red: SurfaceDistances, gt: Any, pred: Any, workers: int | None = None
) -> dict[int, tuple[DirectedPoints, DirectedPoints]]:
    """Resolve far points exactly (reading again only the tiles of ``gt`` / ``pred``, objects with
    ``read(region)``, that hold candidate cells) and return, per label, the (gt -> pred, pred -> gt)
    distances. ``workers`` threads (default: as many as the pass spawned, at most the CPUs)."""
    if workers is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not on Linux
            cpus = os.cpu_count() or 1
        workers = max(1, min(red.spawned, cpus))
    far_d: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    jobs = []
    for side, vol in ((_GT, gt), (_PRED, pred)):  # side is the target of direction 1 - side
        d = 1 - side
        labs, pts, codes, occ = [], [], [], []
        for lab, st in red.labels.items():
            st.pack()
            if not st.far[d]:
                continue
            p, cd = st.far[d][0]
            if st.npoints[side] == 0:
                far_d[(lab, d)] = (np.full(p.shape[0], np.inf), cd)
                continue
            labs.append(lab)
            pts.append(p)
            codes.append(cd)
            occ.append(st.cells[side])
        if not labs:
            continue
        jobs.append((d, vol, labs, pts, codes, occ))

    def resolve(job: tuple) -> None:
        d, vol, labs, pts, codes, occ = job
        sizes = [p.shape[0] for p in pts]
        row = np.repeat(np.arange(len(labs)), sizes)
        dist = _resolve_far(red, vol, np.concatenate(pts).astype(np.int64), row, np.stack(occ), np.array(labs), workers)
        for lab, part, cd in zip(labs, np.split(dist, np.cumsum(sizes)[:-1]), codes):
            far_d[(lab, d)] = (part, cd)

    try:
        if workers > 1 and len(jobs) == 2:  # both sides at once: one side's serial steps overlap the other's tiles
            with ThreadPoolExecutor(2, thread_name_prefix="fastseg-far-side") as ex:
                for fut in [ex.submit(resolve, job) for job in jobs]:
                    fut.result()
        else:
            for job in jobs:
                resolve(job)
    finally:
        for key in [k for k in red._buffers if isinstance(k, tuple) and k[0] == "far"]:  # far-step scratch
            del red._buffers[key]
    out = {}
    nd = red.distances.size
    for lab, st in red.labels.items():
        pair = []
        for d in (0, 1):
            counts = st.hist[d].reshape(nd, red.ncodes)
            di, ci = np.nonzero(counts)
            dist, code, cnt = red.distances[di], ci.astype(np.int64), counts[di, ci]
            if (lab, d) in far_d:
                fd, fc = far_d[(lab, d)]
                dist = np.concatenate([dist, fd])
                code = np.concatenate([code, fc.astype(np.int64) if red.ncodes > 1 else np.zeros(fc.size, np.int64)])
                cnt = np.concatenate([cnt, np.ones(fd.size, np.int64)])
            order = np.lexsort((code, dist))
            pair.append(DirectedPoints(dist[order], code[order], cnt[order]))
        out[lab] = (pair[0], pair[1])
    return out
