"""Surface kernels for the boundary metrics (numba ``njit(nogil=True, cache=True)``).

Points
------
A *surface point* of label ``L`` is, depending on the convention (see
:mod:`fastseg_eval.metrics.boundary`):

* ``voxels`` (MONAI, MedPy): a voxel of label ``L`` with a 6-neighbour of another label or outside
  the volume (the mask minus its 6-neighbour erosion, the border counting as surface);
* ``corners`` (DeepMind's ``surface-distance``): a voxel *corner* whose 2 x 2 x 2 neighbourhood
  holds label ``L`` and something else (another label, or outside the volume); corner ``c``
  lies between voxels ``c - 1`` and ``c`` on every axis, so corners run ``0 .. n`` on an axis of
  ``n`` voxels. Each corner also gets the 8-bit neighbourhood code of ``L`` (bit ``2**(7 - (4i +
  2j + k))`` set when voxel ``(c-1+i, c-1+j, c-1+k)`` has label ``L``), DeepMind's encoding, from
  which the metric layer takes the surfel area.

Kernels take one window of a label volume (the core of a work unit grown by the reducer's halo),
never a whole volume; they allocate nothing and keep no state between calls. Label values arrive
as the array's own integer dtype and leave as ``int64``. Nothing here is CPU-specific beyond the
loops themselves: the per-point logic is plain arithmetic on arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros  # numba's llvm.ctlz / cttz

from fastseg_eval.kernels.jit import njit
from fastseg_eval.kernels.simd import lane_mask64

SENTINEL = np.int64(-1)  # "outside the volume" in a corner's neighbourhood (labels are >= 0)

# statuses
OK = 0
TOO_MANY_LABELS = 1  # more distinct labels in one window than the label table holds


def offset_distance(dz: np.ndarray, dy: np.ndarray, dx: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Physical length of integer offsets, with the float operations of scipy's
    ``distance_transform_edt`` (each component times its spacing, squared, summed z, y, x, root)."""
    s = np.asarray(spacing, dtype=np.float64)
    a = np.asarray(dz, dtype=np.float64) * s[0]
    b = np.asarray(dy, dtype=np.float64) * s[1]
    c = np.asarray(dx, dtype=np.float64) * s[2]
    return np.sqrt((a * a + b * b) + c * c)


@njit(nogil=True, cache=True, inline="always")
def _skipped(v, skip):
    for s in skip:
        if v == s:
            return True
    return False


@njit(nogil=True, cache=True, inline="always")
def _label_index(v, table, ntab):
    """Index of label ``v`` in ``table[:ntab[0]]``, inserting it; -1 when the table is full."""
    n = ntab[0]
    for i in range(n):
        if table[i] == v:
            return i
    if n >= table.shape[0]:
        return -1
    table[n] = v
    ntab[0] = n + 1
    return n


@njit(nogil=True, cache=True, inline="always")
def _emit(v, z, y, x, code, own, table, ntab, out_zyx, out_lab, out_code, out_own, n, cache):
    """Write one point at ``n``; returns False when the label table is full. ``cache`` keeps
    the last (value, index) pair: labels come in runs."""
    if v != cache[0]:
        li = _label_index(v, table, ntab)
        if li < 0:
            return False
        cache[0] = v
        cache[1] = li
    out_zyx[n, 0] = z
    out_zyx[n, 1] = y
    out_zyx[n, 2] = x
    out_lab[n] = cache[1]
    out_code[n] = code
    out_own[n] = own
    return True


@njit(nogil=True, cache=True)
def voxel_surface(win, lo, hi, own_lo, own_hi, skip, table, ntab, out_zyx, out_lab, out_code, out_own):
    """Surface voxels of every label in ``win[lo:hi]`` (window coordinates, per axis).

    A neighbour outside ``win`` counts as outside the volume: callers pass a region whose
    neighbours are in the window unless the window ends at the volume's edge. Labels in ``skip``
    (background, ignore) give no points. Writes each point's coordinates, label index (into
    ``table``, grown as labels are met; ``out_code`` stays 0) and whether it lies in
    ``[own_lo, own_hi)``. Returns the number of points; -1 when ``table`` is full, -2 when the
    outputs are (call again with larger ones).
    """
    cache = np.array([-2, -1], np.int64)
    return _voxel_box(win, lo[0], lo[1], lo[2], hi[0], hi[1], hi[2], own_lo, own_hi, skip, table, ntab, out_zyx,
                      out_lab, out_code, out_own, 0, cache)


@njit(nogil=True, cache=True, inline="always")
def _vox(win, z, y, x):
    nz, ny, nx = win.shape
    if z < 0 or y < 0 or x < 0 or z >= nz or y >= ny or x >= nx:
        return SENTINEL
    return np.int64(win[z, y, x])


@njit(nogil=True, cache=True)
def _corner_points(win, z, y, x, own, skip, table, ntab, out_zyx, out_lab, out_code, out_own, n, cache, labs):
    """The points of one mixed corner (one per label among its 8 voxels); returns the new count,
    -1 (table full) or -2 (outputs full)."""
    nz, ny, nx = win.shape
    if 1 <= z < nz and 1 <= y < ny and 1 <= x < nx:
        labs[0] = win[z - 1, y - 1, x - 1]
        labs[1] = win[z - 1, y - 1, x]
        labs[2] = win[z - 1, y, x - 1]
        labs[3] = win[z - 1, y, x]
        labs[4] = win[z, y - 1, x - 1]
        labs[5] = win[z, y - 1, x]
        labs[6] = win[z, y, x - 1]
        labs[7] = win[z, y, x]
    else:
        labs[0] = _vox(win, z - 1, y - 1, x - 1)
        labs[1] = _vox(win, z - 1, y - 1, x)
        labs[2] = _vox(win, z - 1, y, x - 1)
        labs[3] = _vox(win, z - 1, y, x)
        labs[4] = _vox(win, z, y - 1, x - 1)
        labs[5] = _vox(win, z, y - 1, x)
        labs[6] = _vox(win, z, y, x - 1)
        labs[7] = _vox(win, z, y, x)
    first = labs[0]
    uniform = True
    for i in range(1, 8):
        if labs[i] != first:
            uniform = False
            break
    if uniform:
        return n
    cap = out_lab.shape[0]
    for i in range(8):
        v = labs[i]
        if v == SENTINEL or _skipped(v, skip):
            continue
        seen = False
        for j in range(i):
            if labs[j] == v:
                seen = True
                break
        if seen:
            continue
        code = 0
        for j in range(i, 8):
            if labs[j] == v:
                code |= 1 << (7 - j)
        if n >= cap:
            return -2
        if not _emit(v, z, y, x, code, own, table, ntab, out_zyx, out_lab, out_code, out_own, n, cache):
            return -1
        n += 1
    return n


@njit(nogil=True, cache=True, inline="always")
def _mixed_row(r0, r1, r2, r3, xs, xe, flag):
    """``flag[x]`` for ``xs <= x < xe`` (``xs >= 1``): the 8 voxels of corner ``x`` between rows
    ``r0 .. r3`` (columns ``x - 1`` and ``x``) are not all equal. Branch-free over slices indexed
    from 0 (no negative-index wraparound to rule out), so it vectorises."""
    m = xe - xs
    a0, a1, a2, a3 = r0[xs:xe], r1[xs:xe], r2[xs:xe], r3[xs:xe]
    b0, b1, b2, b3 = r0[xs - 1 : xe - 1], r1[xs - 1 : xe - 1], r2[xs - 1 : xe - 1], r3[xs - 1 : xe - 1]
    f = flag[xs:xe]
    for k in range(m):
        a = a0[k]
        b = b0[k]
        f[k] = (a != a1[k]) | (a != a2[k]) | (a != a3[k]) | (a != b) | (b != b1[k]) | (b != b2[k]) | (b != b3[k])


@njit(nogil=True, cache=True)
def _corner_row(r0, r1, r2, r3, z, y, xs, xe, own_zy, ox0, ox1, skip, table, ntab, out_zyx, out_lab, out_code,
                out_own, n, cache, flag, labs):  # fmt: skip
    """Corners ``xs .. xe - 1`` (``xs >= 1``) of one row whose four voxel rows ``r0 .. r3`` (``z-1, z``
    times ``y-1, y``) hold every voxel they see: a branch-free scan (:func:`_mixed_row`), then the
    mixed corners one by one, taken 64 flags at a time as a bit mask (set bits walked with
    ``tzcnt``: no branch per uniform corner). A mixed corner takes its 8 voxels and emits one point
    per label among them, in the order of each label's first voxel: the uncovered voxels are the
    set bits of an 8-bit mask in the code's bit order, so the next label's first voxel is its
    highest set bit (``lzcnt``)."""
    _mixed_row(r0, r1, r2, r3, xs, xe, flag)
    cap = out_lab.shape[0]
    cv, ci = cache[0], cache[1]  # the last label value and its index (labels come in runs)
    for pos in range(xs, xe, 64):
        m = lane_mask64(flag, pos, 1)
        if xe - pos < 64:
            m &= (np.uint64(1) << np.uint64(xe - pos)) - np.uint64(1)
        while m != 0:
            x = pos + np.int64(trailing_zeros(m))
            m &= m - np.uint64(1)
            own = own_zy and ox0 <= x < ox1
            labs[0], labs[1], labs[2], labs[3] = r0[x - 1], r0[x], r1[x - 1], r1[x]
            labs[4], labs[5], labs[6], labs[7] = r2[x - 1], r2[x], r3[x - 1], r3[x]
            left = np.int64(255)  # voxels not yet covered by a label, bit 7 - j for voxel j
            while left != 0:
                w = labs[np.int64(leading_zeros(left)) - 56]
                code = (
                    (np.int64(labs[0] == w) << 7) | (np.int64(labs[1] == w) << 6) | (np.int64(labs[2] == w) << 5)
                    | (np.int64(labs[3] == w) << 4) | (np.int64(labs[4] == w) << 3)
                    | (np.int64(labs[5] == w) << 2) | (np.int64(labs[6] == w) << 1) | np.int64(labs[7] == w)
                )  # fmt: skip
                left &= ~code
                if _skipped(w, skip):
                    continue
                if n >= cap:
                    return -2
                if w != cv:
                    li = _label_index(w, table, ntab)
                    if li < 0:
                        return -1
                    cv, ci = w, li
                    cache[0], cache[1] = cv, ci
                out_zyx[n, 0] = z
                out_zyx[n, 1] = y
                out_zyx[n, 2] = x
                out_lab[n] = ci
                out_code[n] = code
                out_own[n] = own
                n += 1
    return n


@njit(nogil=True, cache=True)
def _corner_box(win, lo0, lo1, lo2, hi0, hi1, hi2, own_lo, own_hi, skip, table, ntab, out_zyx, out_lab, out_code,
                out_own, n, cache, labs, flag):  # fmt: skip
    """The points of corners ``[lo, hi)`` appended from ``n``; returns the new count (or -1 / -2).

    Rows whose four voxel rows lie in ``win`` go through :func:`_corner_row`; corners on the
    window's edge take the general path (:func:`_corner_points`).
    """
    nz, ny, nx = win.shape
    for z in range(lo0, hi0):
        for y in range(lo1, hi1):
            own_zy = own_lo[0] <= z < own_hi[0] and own_lo[1] <= y < own_hi[1]
            if 1 <= z < nz and 1 <= y < ny and max(lo2, 1) < min(hi2, nx):
                xs, xe = max(lo2, 1), min(hi2, nx)
            else:
                xs, xe = hi2, hi2
            if xs > lo2:  # corners on the window's low x edge (or the whole row)
                n = _corner_edges(win, z, y, lo2, xs, own_zy, own_lo[2], own_hi[2], skip, table, ntab, out_zyx,
                                  out_lab, out_code, out_own, n, cache, labs)  # fmt: skip
                if n < 0:
                    return n
            if xs < xe:
                n = _corner_row(win[z - 1, y - 1], win[z - 1, y], win[z, y - 1], win[z, y], z, y, xs, xe, own_zy,
                                own_lo[2], own_hi[2], skip, table, ntab, out_zyx, out_lab, out_code, out_own, n,
                                cache, flag, labs)  # fmt: skip
                if n < 0:
                    return n
            if xe < hi2:  # the high x edge
                n = _corner_edges(win, z, y, xe, hi2, own_zy, own_lo[2], own_hi[2], skip, table, ntab, out_zyx,
                                  out_lab, out_code, out_own, n, cache, labs)  # fmt: skip
                if n < 0:
                    return n
    return n


@njit(nogil=True, cache=True)
def _corner_edges(win, z, y, xs, xe, own_zy, ox0, ox1, skip, table, ntab, out_zyx, out_lab, out_code, out_own, n,
                  cache, labs):  # fmt: skip
    """Corners ``xs .. xe - 1`` of one row by the general path (window edges)."""
    for x in range(xs, xe):
        own = own_zy and ox0 <= x < ox1
        n = _corner_points(win, z, y, x, own, skip, table, ntab, out_zyx, out_lab, out_code, out_own, n, cache, labs)
        if n < 0:
            return n
    return n


@njit(nogil=True, cache=True)
def corner_surface(win, lo, hi, own_lo, own_hi, skip, table, ntab, out_zyx, out_lab, out_code, out_own):
    """Surface corners of every label for corners ``lo .. hi - 1`` (corner coordinates, per axis).

    Corner ``c`` sees voxels ``c - 1`` and ``c`` on each axis; one outside ``win`` counts as outside
    the volume (callers pass corners whose voxels lie in the window unless the window ends at the
    volume's edge). A corner whose 8 voxels are not all equal is a surface point of each label
    among them (labels in ``skip`` excepted), with that label's neighbourhood code. Outputs and
    return value as in :func:`voxel_surface`.

    Fast path: along a row of corners, the 4 voxels of each column ``x`` (rows ``z-1, z`` times
    ``y-1, y``) are compared once; a corner is uniform when its two columns are uniform and equal.
    """
    labs = np.empty(8, np.int64)
    cache = np.array([-2, -1], np.int64)
    flag = np.zeros(win.shape[2] + 128, np.uint8)  # 64 lanes past any row: the mask loads stay inside
    return _corner_box(win, lo[0], lo[1], lo[2], hi[0], hi[1], hi[2], own_lo, own_hi, skip, table, ntab, out_zyx,
                       out_lab, out_code, out_own, 0, cache, labs, flag)  # fmt: skip


@njit(nogil=True, cache=True)
def _voxel_box(win, lo0, lo1, lo2, hi0, hi1, hi2, own_lo, own_hi, skip, table, ntab, out_zyx, out_lab, out_code,
               out_own, n, cache):  # fmt: skip
    nz, ny, nx = win.shape
    cap = out_lab.shape[0]
    for z in range(lo0, hi0):
        zin = 0 < z < nz - 1
        for y in range(lo1, hi1):
            inner = zin and 0 < y < ny - 1
            own_zy = own_lo[0] <= z < own_hi[0] and own_lo[1] <= y < own_hi[1]
            for x in range(lo2, hi2):
                w = win[z, y, x]
                if inner and 0 < x < nx - 1:
                    if (
                        win[z, y, x - 1] == w and win[z, y, x + 1] == w and win[z, y - 1, x] == w
                        and win[z, y + 1, x] == w and win[z - 1, y, x] == w and win[z + 1, y, x] == w
                    ):  # fmt: skip
                        continue
                else:
                    surf = (
                        z == 0 or z == nz - 1 or y == 0 or y == ny - 1 or x == 0 or x == nx - 1
                        or win[z - 1, y, x] != w or win[z + 1, y, x] != w
                        or win[z, y - 1, x] != w or win[z, y + 1, x] != w
                        or win[z, y, x - 1] != w or win[z, y, x + 1] != w
                    )  # fmt: skip
                    if not surf:
                        continue
                v = np.int64(w)
                if _skipped(v, skip):
                    continue
                if n >= cap:
                    return -2
                own = own_zy and own_lo[2] <= x < own_hi[2]
                if not _emit(v, z, y, x, 0, own, table, ntab, out_zyx, out_lab, out_code, out_own, n, cache):
                    return -1
                n += 1
    return n


@njit(nogil=True, cache=True)
def surface_in_boxes(win, corners, boxes, skip, table, ntab, out_zyx, out_lab, out_code, out_own):
    """Surface points (corners when ``corners``, else voxels) of every label inside each box
    ``boxes[i] = (z0, y0, x0, z1, y1, x1)`` (window coordinates, half open; boxes do not overlap).
    Outputs and return value as in :func:`voxel_surface` (``out_own`` is set for every point)."""
    labs = np.empty(8, np.int64)
    cache = np.array([-2, -1], np.int64)
    flag = np.zeros(win.shape[2] + 128, np.uint8)  # 64 lanes past any row: the mask loads stay inside
    n = 0
    for i in range(boxes.shape[0]):
        b = boxes[i]
        if corners:
            n = _corner_box(win, b[0], b[1], b[2], b[3], b[4], b[5], b[:3], b[3:], skip, table, ntab, out_zyx,
                            out_lab, out_code, out_own, n, cache, labs, flag)  # fmt: skip
        else:
            n = _voxel_box(win, b[0], b[1], b[2], b[3], b[4], b[5], b[:3], b[3:], skip, table, ntab, out_zyx,
                           out_lab, out_code, out_own, n, cache)  # fmt: skip
        if n < 0:
            return n
    return n


@njit(nogil=True, cache=True)
def group_by_label(lab, nlab, order, starts):
    """Counting sort of point indices by label index: ``order[starts[k]:starts[k+1]]`` has label k."""
    counts = np.zeros(nlab + 1, np.int64)
    for i in range(lab.shape[0]):
        counts[lab[i] + 1] += 1
    for k in range(nlab):
        counts[k + 1] += counts[k]
    for k in range(nlab + 1):
        starts[k] = counts[k]
    for i in range(lab.shape[0]):
        k = lab[i]
        order[counts[k]] = i
        counts[k] += 1


@njit(nogil=True, cache=True)
def mark_points(bitmap, coarse, zyx, idx, value):
    """``bitmap[zyx[i]] = value`` for every ``i`` in ``idx``, and the same in ``coarse`` for the
    point's cell of 4 x 4 x 4 (one label's marks: 1 to mark, 0 to undo every mark)."""
    for i in idx:
        z, y, x = zyx[i, 0], zyx[i, 1], zyx[i, 2]
        bitmap[z, y, x] = value
        coarse[z >> 2, y >> 2, x >> 2] = value


@njit(nogil=True, cache=True, inline="always")
def _closer(dz, dy, dx, sz, sy, sx, best, best2):
    """The length of offset ``(dz, dy, dx)`` (spacing ``sz, sy, sx``) and its square when it is
    shorter than ``best``, else ``(best, best2)``; ``best2`` is ``best * best``, and ``d * d >=
    best2`` implies ``d >= best`` (``sqrt(fl(b * b)) == b``): most candidates need no root."""
    fz, fy, fx = dz * sz, dy * sy, dx * sx
    d2 = (fz * fz + fy * fy) + fx * fx
    if d2 < best2:
        d = np.sqrt(d2)
        if d < best:
            return d, d * d
    return best, best2


@njit(nogil=True, cache=True)
def mark_labels(bits, coarse, zyx, lab, n):
    """``bits[zyx[i]] |= 1 << lab[i]`` for the first ``n`` points whose label index is below 8 (one
    sequential pass over a window's points: every label's bit at once), and the same bit in
    ``coarse``, one byte per cell of 4 x 4 x 4 points."""
    for i in range(n):
        li = lab[i]
        if li < 8:
            z, y, x = zyx[i, 0], zyx[i, 1], zyx[i, 2]
            b = np.uint8(1 << li)
            bits[z, y, x] |= b
            coarse[z >> 2, y >> 2, x >> 2] |= b


@njit(nogil=True, cache=True)
def nearest_in_bits(bits32, coarse, bit, a_zyx, a_idx, cell_offsets, cell_bound, offset_index, reach, spacing,
                    limit, out):  # fmt: skip
    """Second stage, on the marks themselves: for the points ``a_idx`` whose ``out`` is still -1, the
    exact nearest point marked with ``bit``, by cells of 4 x 4 x 4 in order of ``cell_bound`` (a
    lower bound of the distance between any two points of cells that far apart; the search stops
    at the first cell that bound puts beyond the best hit); a cell is looked into only when
    ``coarse`` has the bit, then row by
    row, 4 marks per 32-bit word (``bits32``: the marks viewed as words, rows padded to 4 bytes).
    Accepts only offsets within ``reach`` on every axis and shorter than ``limit``; ``out`` gets the
    offset's distance index (``offset_index``, indexed by offset + reach), or stays -1."""
    sz, sy, sx = spacing[0], spacing[1], spacing[2]
    nz, ny, nw = bits32.shape
    gz, gy, gx = coarse.shape
    word = np.uint32(bit) * np.uint32(0x01010101)
    for t in range(a_idx.shape[0]):
        if out[t] >= 0:
            continue
        i = a_idx[t]
        z, y, x = np.int64(a_zyx[i, 0]), np.int64(a_zyx[i, 1]), np.int64(a_zyx[i, 2])
        cz, cy, cx = z >> 2, y >> 2, x >> 2
        best = limit
        best2 = limit * limit
        best_j = -1
        for k in range(cell_offsets.shape[0]):
            if cell_bound[k] >= best:
                break
            qz, qy, qx = cz + cell_offsets[k, 0], cy + cell_offsets[k, 1], cx + cell_offsets[k, 2]
            if qz < 0 or qy < 0 or qx < 0 or qz >= gz or qy >= gy or qx >= gx:
                continue
            if not (coarse[qz, qy, qx] & bit):
                continue
            for pz in range(qz * 4, min(qz * 4 + 4, nz)):
                dz = pz - z
                if abs(dz) > reach:
                    continue
                for py in range(qy * 4, min(qy * 4 + 4, ny)):
                    dy = py - y
                    if abs(dy) > reach:
                        continue
                    w = bits32[pz, py, qx] & word
                    while w != 0:
                        low = np.int64(trailing_zeros(w))
                        w &= w - np.uint32(1)  # one bit per byte: the byte is done
                        dx = qx * 4 + (low >> 3) - x
                        if abs(dx) > reach:
                            continue
                        d, d2 = _closer(dz, dy, dx, sz, sy, sx, best, best2)
                        if d < best:
                            best, best2 = d, d2
                            best_j = offset_index[dz + reach, dy + reach, dx + reach]
        out[t] = best_j


@njit(nogil=True, cache=True)
def nearest_marked(bitmap, bit, zyx, idx, offsets, offset_dist, out):
    """For each point ``zyx[i]`` (``i`` in ``idx``), the distance index of the nearest cell of
    ``bitmap`` marked with ``bit`` (``bitmap & bit != 0``).

    ``offsets`` are sorted by distance; the first marked ``point + offset`` wins and its
    ``offset_dist`` goes to ``out`` (in the order of ``idx``); -1 when no offset reaches a marked
    cell. Cells outside ``bitmap`` are never marked.
    """
    nz, ny, nx = bitmap.shape
    noff = offsets.shape[0]
    reach = np.zeros(3, np.int64)
    flat = bitmap.reshape(-1)
    flat_off = np.empty(noff, np.int64)
    for j in range(noff):
        flat_off[j] = (np.int64(offsets[j, 0]) * ny + np.int64(offsets[j, 1])) * nx + np.int64(offsets[j, 2])
    for j in range(noff):
        for a in range(3):
            r = abs(np.int64(offsets[j, a]))
            if r > reach[a]:
                reach[a] = r
    for t in range(idx.shape[0]):
        i = idx[t]
        z = np.int64(zyx[i, 0])
        y = np.int64(zyx[i, 1])
        x = np.int64(zyx[i, 2])
        inside = (
            z - reach[0] >= 0 and z + reach[0] < nz and y - reach[1] >= 0 and y + reach[1] < ny
            and x - reach[2] >= 0 and x + reach[2] < nx
        )  # fmt: skip
        found = -1
        if inside:  # flat offsets, unsigned: no negative-index wraparound in the hot loop
            base = (z * ny + y) * nx + x
            for j in range(noff):
                if flat[np.uint64(base + flat_off[j])] & bit:
                    found = offset_dist[j]
                    break
        else:
            for j in range(noff):
                qz = z + offsets[j, 0]
                qy = y + offsets[j, 1]
                qx = x + offsets[j, 2]
                if qz < 0 or qy < 0 or qx < 0 or qz >= nz or qy >= ny or qx >= nx:
                    continue
                if bitmap[qz, qy, qx] & bit:
                    found = offset_dist[j]
                    break
        out[t] = found


@njit(nogil=True, cache=True)
def add_counts(hist, ncodes, dist_idx, codes, idx):
    """``hist[dist_idx[t] * ncodes + code] += 1`` for near points (``dist_idx >= 0``); returns how many."""
    n = 0
    for t in range(idx.shape[0]):
        d = dist_idx[t]
        if d < 0:
            continue
        c = 0 if ncodes == 1 else np.int64(codes[idx[t]])
        hist[d * ncodes + c] += 1
        n += 1
    return n


@njit(nogil=True, cache=True)
def mark_cells(bits, zyx, idx, cz, cy, cx, gy, gx):
    """Set the bits (``bits`` packed, little bit order) of the coarse cells (``gy`` x ``gx`` per slice)
    that hold points ``zyx[idx]``; ``cz, cy, cx`` map a window coordinate to its cell's index on
    that axis (tables: no division per point)."""
    for i in idx:
        f = (np.int64(cz[zyx[i, 0]]) * gy + np.int64(cy[zyx[i, 1]])) * gx + np.int64(cx[zyx[i, 2]])
        bits[f >> 3] |= np.uint8(1 << (f & 7))


@njit(nogil=True, cache=True, inline="always")
def _bit(bits, f):
    return (bits[f >> 3] >> (f & 7)) & 1


@njit(nogil=True, cache=True, inline="always")
def _axis_far(p, k, cell, npts):
    """Largest |p - q| over the points q of cell ``k`` on one axis."""
    lo = k * cell
    hi = min(lo + cell, npts) - 1
    return max(abs(p - lo), abs(p - hi))


@njit(nogil=True, cache=True, inline="always")
def _axis_gap(p, k, cell, npts):
    """Smallest |p - q| over the points q of cell ``k`` on one axis."""
    lo = k * cell
    hi = min(lo + cell, npts) - 1
    if p < lo:
        return lo - p
    if p > hi:
        return p - hi
    return 0


@njit(nogil=True, cache=True)
def far_bounds(pts, row, occ, grid, cell, npts, spacing, out):
    """``out[i]``: an upper bound of the distance from point ``pts[i]`` to the nearest point of any
    occupied cell (bits ``occ[row[i]]``): the least, over occupied cells, of the largest distance to a
    point of the cell. Cells are visited in Chebyshev shells around the point's own cell, stopping
    once every cell of the shell is farther than the best bound; ``inf`` when no cell is occupied."""
    gz, gy, gx = grid[0], grid[1], grid[2]
    sz, sy, sx = spacing[0], spacing[1], spacing[2]
    msp = min(sz, min(sy, sx))
    rmax = max(gz, max(gy, gx))
    for i in range(pts.shape[0]):
        z, y, x = np.int64(pts[i, 0]), np.int64(pts[i, 1]), np.int64(pts[i, 2])
        kz, ky, kx = z // cell, y // cell, x // cell
        bits = occ[row[i]]
        best = np.inf
        for r in range(rmax + 1):
            if r > 0 and ((r - 1) * cell + 1) * msp > best:
                break
            for a in range(-r, r + 1):
                qz = kz + a
                if qz < 0 or qz >= gz:
                    continue
                fz = _axis_far(z, qz, cell, npts[0]) * sz
                for b in range(-r, r + 1):
                    qy = ky + b
                    if qy < 0 or qy >= gy:
                        continue
                    fy = _axis_far(y, qy, cell, npts[1]) * sy
                    edge = a == -r or a == r or b == -r or b == r
                    step = 1 if edge else 2 * r
                    for c in range(-r, r + 1, max(step, 1)):
                        qx = kx + c
                        if qx < 0 or qx >= gx:
                            continue
                        if not _bit(bits, (qz * gy + qy) * gx + qx):
                            continue
                        fx = _axis_far(x, qx, cell, npts[2]) * sx
                        d = np.sqrt((fz * fz + fy * fy) + fx * fx)
                        if d < best:
                            best = d
        out[i] = best


@njit(nogil=True, cache=True)
def want_cells(pts, row, bound, occ, grid, cell, npts, spacing, wanted):
    """Set ``wanted[row[i]]`` bits of the occupied cells that hold a point no farther than
    ``bound[i]`` from ``pts[i]`` (the cells where the nearest occupied point may be)."""
    gz, gy, gx = grid[0], grid[1], grid[2]
    sz, sy, sx = spacing[0], spacing[1], spacing[2]
    for i in range(pts.shape[0]):
        u = bound[i]
        z, y, x = np.int64(pts[i, 0]), np.int64(pts[i, 1]), np.int64(pts[i, 2])
        bits = occ[row[i]]
        out = wanted[row[i]]
        z0, z1 = max(0, np.int64((z - u / sz) // cell)), min(gz - 1, np.int64((z + u / sz) // cell))
        y0, y1 = max(0, np.int64((y - u / sy) // cell)), min(gy - 1, np.int64((y + u / sy) // cell))
        x0, x1 = max(0, np.int64((x - u / sx) // cell)), min(gx - 1, np.int64((x + u / sx) // cell))
        for qz in range(z0, z1 + 1):
            fz = _axis_gap(z, qz, cell, npts[0]) * sz
            for qy in range(y0, y1 + 1):
                fy = _axis_gap(y, qy, cell, npts[1]) * sy
                base = (qz * gy + qy) * gx
                for qx in range(x0, x1 + 1):
                    f = base + qx
                    if _bit(out, f) or not _bit(bits, f):
                        continue
                    fx = _axis_gap(x, qx, cell, npts[2]) * sx
                    if np.sqrt((fz * fz + fy * fy) + fx * fx) <= u:
                        out[f >> 3] |= np.uint8(1 << (f & 7))


@njit(nogil=True, cache=True)
def far_tiles(pts, bound, spacing, tsz, ntiles, npts, owner, tile):
    """Pairs (point, tile) where tile (edge ``tsz`` points; the last one per axis also holds the
    points past it) has a point within ``bound[i]`` of ``pts[i]``: written to ``owner`` / ``tile``
    (flat tile ids) when they are long enough, else only counted; returns the count."""
    fill = owner.shape[0] > 0
    n = 0
    for i in range(pts.shape[0]):
        u = bound[i]
        lo = np.empty(3, np.int64)
        hi = np.empty(3, np.int64)
        for a in range(3):
            r = u / spacing[a]
            lo[a] = min(max(np.int64(np.floor(pts[i, a] - r)), 0) // tsz[a], ntiles[a] - 1)
            hi[a] = min(min(np.int64(np.ceil(pts[i, a] + r)), npts[a] - 1) // tsz[a], ntiles[a] - 1)
        for tz in range(lo[0], hi[0] + 1):
            gz = max(max(tz * tsz[0] - pts[i, 0], pts[i, 0] - (tz + 1) * tsz[0] + 1), 0) * spacing[0]
            if tz == ntiles[0] - 1:
                gz = max(tz * tsz[0] - pts[i, 0], 0) * spacing[0]
            for ty in range(lo[1], hi[1] + 1):
                gy = max(max(ty * tsz[1] - pts[i, 1], pts[i, 1] - (ty + 1) * tsz[1] + 1), 0) * spacing[1]
                if ty == ntiles[1] - 1:
                    gy = max(ty * tsz[1] - pts[i, 1], 0) * spacing[1]
                for tx in range(lo[2], hi[2] + 1):
                    gx = max(max(tx * tsz[2] - pts[i, 2], pts[i, 2] - (tx + 1) * tsz[2] + 1), 0) * spacing[2]
                    if tx == ntiles[2] - 1:
                        gx = max(tx * tsz[2] - pts[i, 2], 0) * spacing[2]
                    if np.sqrt((gz * gz + gy * gy) + gx * gx) > u:
                        continue
                    if fill:
                        owner[n] = i
                        tile[n] = (tz * ntiles[1] + ty) * ntiles[2] + tx
                    n += 1
    return n


@njit(nogil=True, cache=True)
def cell_boxes(bits, grid, cell, lo, hi, win0, out):
    """Boxes (window coordinates: minus ``win0``) of the cells set in ``bits``, cut to points
    ``[lo, hi)``; returns how many were written to ``out`` (rows ``z0, y0, x0, z1, y1, x1``)."""
    gy, gx = grid[1], grid[2]
    n = 0
    for qz in range(lo[0] // cell, (hi[0] - 1) // cell + 1):
        for qy in range(lo[1] // cell, (hi[1] - 1) // cell + 1):
            for qx in range(lo[2] // cell, (hi[2] - 1) // cell + 1):
                if not _bit(bits, (qz * gy + qy) * gx + qx):
                    continue
                out[n, 0] = max(qz * cell, lo[0]) - win0[0]
                out[n, 1] = max(qy * cell, lo[1]) - win0[1]
                out[n, 2] = max(qx * cell, lo[2]) - win0[2]
                out[n, 3] = min((qz + 1) * cell, hi[0]) - win0[0]
                out[n, 4] = min((qy + 1) * cell, hi[1]) - win0[1]
                out[n, 5] = min((qx + 1) * cell, hi[2]) - win0[2]
                n += 1
    return n


@njit(nogil=True, cache=True)
def points_in_cells(zyx, lab, want_lab, win0, bits, cell, gy, gx, out):
    """``out[i]``: point ``i`` has label index ``want_lab`` and lies in a cell set in ``bits``;
    returns how many."""
    n = 0
    for i in range(lab.shape[0]):
        ok = False
        if lab[i] == want_lab:
            cz = (np.int64(zyx[i, 0]) + win0[0]) // cell
            cy = (np.int64(zyx[i, 1]) + win0[1]) // cell
            cx = (np.int64(zyx[i, 2]) + win0[2]) // cell
            ok = _bit(bits, (cz * gy + cy) * gx + cx) == 1
        out[i] = ok
        n += ok
    return n


# ------------------------------------------------------------------ exact float emulations
@njit(nogil=True, cache=True)
def _pairwise_leaf(values, ends, lo, n):
    """numpy's pairwise sum for ``n <= 128`` virtual elements from position ``lo``."""
    r = np.searchsorted(ends, lo, side="right")
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            while ends[r] <= i:
                r += 1
            res += values[r]
        return res
    acc = np.zeros(8)
    for j in range(8):
        while ends[r] <= lo + j:
            r += 1
        acc[j] = values[r]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        for j in range(8):
            while ends[r] <= lo + i + j:
                r += 1
            acc[j] += values[r]
        i += 8
    res = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    while i < n:
        while ends[r] <= lo + i:
            r += 1
        res += values[r]
        i += 1
    return res


@njit(nogil=True, cache=True)
def pairwise_sum_runs(values, counts):
    """``np.sum(np.repeat(values, counts))`` bit for bit, without building the repeated array.

    Mirrors ``pairwise_sum_DOUBLE`` (numpy/_core/src/umath/loops_utils.h.src): 8 interleaved
    partial sums up to 128 elements, halves (cut at multiples of 8) above; evaluated with an
    explicit stack (numba's cache cannot hold recursive functions).
    """
    ends = np.cumsum(counts)
    total = ends[-1] if ends.shape[0] else 0
    if total == 0:
        return 0.0
    s_lo = np.empty(256, np.int64)
    s_n = np.empty(256, np.int64)
    s_ph = np.empty(256, np.int64)
    res = np.empty(256)
    sp = 0
    rp = 0
    s_lo[0], s_n[0], s_ph[0] = 0, total, 0
    sp = 1
    while sp > 0:
        sp -= 1
        lo, n, ph = s_lo[sp], s_n[sp], s_ph[sp]
        if n <= 128:
            res[rp] = _pairwise_leaf(values, ends, lo, n)
            rp += 1
        elif ph == 0:
            n2 = n // 2
            n2 -= n2 % 8
            s_lo[sp], s_n[sp], s_ph[sp] = lo, n, 1  # combine, after both halves
            s_lo[sp + 1], s_n[sp + 1], s_ph[sp + 1] = lo + n2, n - n2, 0  # right half, second
            s_lo[sp + 2], s_n[sp + 2], s_ph[sp + 2] = lo, n2, 0  # left half, first
            sp += 3
        else:
            res[rp - 2] = res[rp - 2] + res[rp - 1]
            rp -= 1
    return res[0]


@njit(nogil=True, cache=True)
def first_cumsum_reaching(values, counts, total, q):
    """Position of the first element where ``np.cumsum(a) / total >= q`` for ``a = np.repeat(values,
    counts)`` (sequential float64 sums, as numpy's cumsum), or the length of ``a`` if none."""
    acc = 0.0
    pos = 0
    for r in range(values.shape[0]):
        v = values[r]
        for _ in range(counts[r]):
            acc += v
            if acc / total >= q:
                return pos
            pos += 1
    return pos
