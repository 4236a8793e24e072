"""The surface-distance reducer: exact boundary distances per label, out of core.

What it computes
    For every label ``L`` (background and ignore labels aside) and both directions (ground truth
    to prediction, prediction to ground truth): for each surface point of ``L`` on one side, the
    physical distance to the nearest surface point of ``L`` on the other side. Surface points are
    voxels or voxel corners (:mod:`fastseg_eval.kernels.surface`); the metric layer
    (:mod:`fastseg_eval.metrics.boundary`) turns the distances into hd, hd95, assd, masd, nsd.

Near points, in the pass (``add``)
    The reducer asks the engine for a halo of ``reach + 1`` voxels. In each block it extracts the
    surface points of both sides in the core grown by ``reach`` (the extra voxel decides
    surface-ness across the block's edge) and, for every surface point it *owns* (in the core),
    walks the integer offsets ``o`` with ``|o_axis| <= reach``, sorted by length, up to the first
    surface point of the other side. Every point outside that box lies at least
    ``G = (reach + 1) * min(spacing)`` away, and only offsets shorter than ``G`` are walked, so
    a hit is the exact nearest point. The distance is kept as an index into the sorted distinct
    offset lengths, counted per (distance, neighbourhood code): a few kilobytes per label,
    whatever the volume.

Far points, after the pass (:func:`finish_distances`)
    A point with no hit is *far* (its nearest counterpart is at least ``G`` away, possibly beyond
    the block): its coordinates and code are kept. The pass also records, per label and side,
    which coarse cells (``cell`` voxels on an edge) hold surface points. After the pass each far
    point's candidate cells are those whose centre lies within ``u + h`` of it, where ``u`` is
    the distance to the nearest occupied cell's centre plus the cell's half diagonal ``h`` (so
    the nearest surface point lies in one of them); only those cells are read again from the
    inputs, their surface points extracted, and a k-d tree (scipy) over them answers every far
    point exactly. Memory: the far points, plus the surface points in their candidate cells.
"""

from __future__ import annotations

import math
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
_TILE = 128  # edge of the regions read again for far points (cells are grouped by tile)
_GT, _PRED = 0, 1
DIRECTIONS = ("gt_to_pred", "pred_to_gt")  # direction d goes from side d to side 1 - d


_CELL = 4  # edge of the buckets of the second search stage (points)
_FIRST_STAGE = 2.5  # the first stage walks offsets shorter than this many times the smallest spacing


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
    cells: np.ndarray  # uint8 (2, n_cells), by side
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
        self._buffers: dict[int, Any] = {}

    # ------------------------------------------------------------------ protocol
    def spawn(self) -> SurfaceDistances:
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
        return max(16, -(-(max(self.shape) + 1) // 64))

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
                cells=np.zeros((2, math.prod(self.grid)), np.uint8),
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
        while True:
            buf = self._buffers.get(slot)
            if buf is None:
                region = int(np.prod(np.maximum(np.asarray(hi) - np.asarray(lo), 0)))
                cap = max(1 << 12, region // 4)
                buf = self._buffers[slot] = (
                    np.empty((cap, 3), np.int32), np.empty(cap, np.int32), np.empty(cap, np.uint8),
                    np.empty(cap, np.bool_), np.zeros(_WINDOW_LABELS, np.int64), np.zeros(1, np.int64),
                )  # fmt: skip
            zyx, lab, code, own, table, ntab = buf
            ntab[0] = 0
            n = kernel(win, lo, hi, olo, ohi, skip, table, ntab, zyx, lab, code, own)
            if n == -2:  # outputs full: twice as large, and again
                cap = 2 * lab.shape[0]
                self._buffers[slot] = (
                    np.empty((cap, 3), np.int32), np.empty(cap, np.int32), np.empty(cap, np.uint8),
                    np.empty(cap, np.bool_), table, ntab,
                )  # fmt: skip
                continue
            break
        if n < 0:
            raise FastSegError(
                f"more than {_WINDOW_LABELS} distinct labels in one block: boundary metrics are meant for "
                "semantic labels, not instance ids"
            )
        return zyx[:n], table[: int(ntab[0])].copy(), lab[:n], code[:n], own[:n]

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
        sides = []
        for slot, arr in enumerate((block.gt, block.pred)):
            zyx, values, lab, code, own = self.extract(arr, lo, hi, olo, ohi, slot)
            order = np.empty(lab.size, np.int64)
            starts = np.empty(values.size + 1, np.int64)
            K.group_by_label(lab, values.size, order, starts)
            groups = {int(v): order[starts[i] : starts[i + 1]] for i, v in enumerate(values)}
            sides.append((zyx, code, own, groups))
        bitmap = np.zeros(tuple(s + 1 for s in n), np.uint8)
        origin = np.array(win0, np.int64)
        c, (_, gy, gx) = self.cell, self.grid
        bg = tuple(-(-(s + 1) // _CELL) for s in n)  # buckets of the second search stage
        starts = np.zeros(math.prod(bg) + 1, np.int64)
        spacing = np.array(self.spacing)
        first_offsets, first_dist = self.offsets[: self._first], self.offset_dist[: self._first]
        for lab_value in sorted(set(sides[0][3]) | set(sides[1][3])):
            st = self._label(lab_value)
            owned = []
            for s in (0, 1):
                zyx, code, own, groups = sides[s]
                idx = groups.get(lab_value, np.empty(0, np.int64))
                mine = idx[own[idx]]
                owned.append(mine)
                st.npoints[s] += mine.size
                if mine.size:
                    K.mark_cells(st.cells[s], zyx, mine, origin, c, gy, gx)
            for d in (0, 1):  # direction d: from side d to side 1 - d
                a_idx = owned[d]
                if a_idx.size == 0:
                    continue
                a_zyx, a_code = sides[d][0], sides[d][1]
                b_zyx, b_groups = sides[1 - d][0], sides[1 - d][3]
                b_idx = b_groups.get(lab_value)
                dist = np.full(a_idx.size, -1, np.int64)
                if b_idx is not None and b_idx.size:
                    K.mark_points(bitmap, b_zyx, b_idx, 1)
                    K.nearest_marked(bitmap, a_zyx, a_idx, first_offsets, first_dist, dist)
                    K.mark_points(bitmap, b_zyx, b_idx, 0)
                    if np.any(dist < 0):  # no counterpart among the nearest offsets: search by buckets
                        starts[:] = 0
                        items = np.empty(b_idx.size, np.int64)
                        K.bucket_points(b_zyx, b_idx, _CELL, bg[1], bg[2], starts, items)
                        K.nearest_in_cells(
                            a_zyx, a_idx, b_zyx, starts, items, _CELL, bg[0], bg[1], bg[2], self._cells,
                            self._bounds, self._index, self.reach, spacing, self._limit, dist,
                        )  # fmt: skip
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


def _candidate_cells(red: SurfaceDistances, far: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Flat ids of the occupied ``cells`` that may hold the nearest surface point of a far point."""
    from scipy.spatial import cKDTree

    c = red.cell
    _, gy, gx = red.grid
    occupied = np.flatnonzero(cells)
    cz, rem = np.divmod(occupied, gy * gx)
    cy, cx = np.divmod(rem, gx)
    centres = _physical(np.stack([cz, cy, cx], axis=1) * c + (c - 1) / 2, red.spacing)
    half = (c - 1) / 2 * math.sqrt(sum(s * s for s in red.spacing))
    tree = cKDTree(centres)
    chosen = np.zeros(occupied.size, bool)
    for start in range(0, far.shape[0], 65536):
        pts = _physical(far[start : start + 65536], red.spacing)
        d0, _ = tree.query(pts)
        radius = (d0 + 2 * half) * (1 + 1e-9) + 1e-9
        for hits in tree.query_ball_point(pts, radius, return_sorted=False):
            chosen[hits] = True
    return occupied[chosen]


def _read_points(red: SurfaceDistances, vol: Any, wanted: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Surface points (volume coordinates) of each label in its wanted cells, read from ``vol``."""
    assert red.shape is not None
    c, (_, gy, gx), shape = red.cell, red.grid, red.shape
    per_tile = max(1, _TILE // c)
    tiles: dict[tuple[int, int, int], list[tuple[int, np.ndarray]]] = {}
    for lab, ids in wanted.items():
        cz, rem = np.divmod(ids, gy * gx)
        cy, cx = np.divmod(rem, gx)
        cc = np.stack([cz, cy, cx], axis=1)
        keys = cc // per_tile
        for key in {tuple(k) for k in keys.tolist()}:
            sel = np.all(keys == key, axis=1)
            tiles.setdefault(key, []).append((lab, cc[sel]))
    found: dict[int, list[np.ndarray]] = {lab: [] for lab in wanted}
    for items in tiles.values():
        cmin = np.min([cc.min(axis=0) for _, cc in items], axis=0)
        cmax = np.max([cc.max(axis=0) for _, cc in items], axis=0)
        p_lo = cmin * c  # points (voxels or corners) to extract
        p_hi = (cmax + 1) * c
        region = []
        for a in range(3):
            v_lo = max(0, int(p_lo[a]) - 1)
            v_hi = min(shape[a], int(p_hi[a]) + (1 if red.points == "voxels" else 0))
            region.append((v_lo, v_hi))
        arr = np.asarray(vol.read(tuple(slice(a, b) for a, b in region)))
        win0 = tuple(a for a, _ in region)
        lo, hi, olo, ohi = red.regions(arr.shape, win0, None)
        lo = np.maximum(lo, p_lo - np.array(win0))
        hi = np.minimum(hi, p_hi - np.array(win0))
        if np.any(hi <= lo):
            continue
        zyx, values, lab_idx, _, _ = red.extract(arr, lo, hi, lo, hi)
        pts = zyx.astype(np.int64) + np.array(win0, np.int64)
        cells_of = (pts // c)
        flat = (cells_of[:, 0] * gy + cells_of[:, 1]) * gx + cells_of[:, 2]
        for lab, cc in items:
            where = np.flatnonzero(values == lab)
            if where.size == 0:
                continue
            sel = lab_idx == where[0]
            want = (cc[:, 0] * gy + cc[:, 1]) * gx + cc[:, 2]
            sel &= np.isin(flat, want)
            found[lab].append(pts[sel])
    return {lab: (np.concatenate(v) if v else np.empty((0, 3), np.int64)) for lab, v in found.items()}


def finish_distances(red: SurfaceDistances, gt: Any, pred: Any) -> dict[int, tuple[DirectedPoints, DirectedPoints]]:
    """Resolve far points exactly (reading only their candidate cells of ``gt`` / ``pred``, objects
    with ``read(region)``) and return, per label, the (gt -> pred, pred -> gt) distances."""
    from scipy.spatial import cKDTree

    far_d: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for side, vol in ((_GT, gt), (_PRED, pred)):  # side is the target of direction 1 - side
        d = 1 - side
        wanted, todo = {}, {}
        for lab, st in red.labels.items():
            st.pack()
            if not st.far[d]:
                continue
            pts, codes = st.far[d][0]
            if st.npoints[side] == 0:
                far_d[(lab, d)] = (np.full(pts.shape[0], np.inf), codes)
                continue
            todo[lab] = (pts, codes)
            wanted[lab] = _candidate_cells(red, pts, st.cells[side])
        if not todo:
            continue
        targets = _read_points(red, vol, wanted)
        for lab, (pts, codes) in todo.items():
            tgt = targets[lab]
            if tgt.shape[0] == 0:  # cannot happen: a cell is occupied only by points of the label
                raise FastSegError(f"label {lab}: no surface point found again in its recorded cells")
            _, j = cKDTree(_physical(tgt, red.spacing)).query(_physical(pts, red.spacing))
            off = pts - tgt[j]
            far_d[(lab, d)] = (K.offset_distance(off[:, 0], off[:, 1], off[:, 2], red.spacing), codes)
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
