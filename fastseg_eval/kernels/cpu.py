"""CPU counting kernels (numba ``njit(nogil=True, cache=True)``).

Every kernel here takes one 3-D chunk of ground truth and prediction (``gt`` first: rows of the
confusion matrix are ground truth) and *adds* into count tables that the caller owns. Kernels
validate nothing beyond what they must to stay memory safe, allocate nothing, and never raise:
they stop and return a status code that :mod:`fastseg_eval.confusion` turns into an error or
acts on (growing a table and resuming where the kernel stopped).

Label values arrive as unsigned integers: signed inputs are passed as unsigned views of the
same width (no copy) together with the unsigned value from which they are negative, and bool
inputs as ``uint8`` views.

Count tables
------------
``local`` (uint32, shape ``(nsub, width)``) holds ``nsub`` interleaved sub-histograms: voxel
``k`` of a row lands in copy ``k % nsub``, so runs of one dominant class (background) do not
serialise on a single counter. ``local`` is flushed into ``acc`` (int64, shape ``(width,)``)
before any copy can reach 2**32 and before every return. Layouts of one table row:

* dense: ``width = kcap * kcap``; pair (gt index a, pred index b) at ``a * kcap + b``;
* marginals: ``width = 3 * kcap``; ``[0:kcap]`` gt counts (row sums), ``[kcap:2kcap]`` pred
  counts (column sums), ``[2kcap:3kcap]`` the diagonal (TP).

Uniform runs
------------
Segmentations are mostly large uniform regions. Rows are walked in runs of ``RUN`` voxels: when
gt, pred (and mask) are each constant over a run, the run is resolved once and counted with one
add of ``RUN``; otherwise its voxels are counted one by one. This is exact for any data and
several times faster on real label volumes than counting voxel by voxel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

LUT_SIZE = 1 << 16  # label values below this map through a direct lookup table
_LUT_SIZE_U = np.uint64(LUT_SIZE)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(29)
_ONE_U = np.uint64(1)

# kernel status codes
OK = 0
BAD_GT = 1  # a gt value that is negative, out of range or not among the fixed labels
BAD_PRED = 2  # the same for pred
GROW_LABELS = 3  # discovery found more labels than the tables hold: grow and resume
GROW_HASH = 4  # the hash table for label values >= LUT_SIZE is too full: grow and resume

# slots of the int64 ``state`` array
NLAB = 0  # labels known so far (index i < NLAB is in use)
HCOUNT = 1  # entries in the hash table
NIGNORED = 2  # voxels skipped because gt == ignore label
NMASKED = 3  # voxels skipped because mask == 0
POS = 4  # C-order position in the chunk where the kernel stopped (status != OK)
VALUE = 5  # offending value bits (status BAD_GT / BAD_PRED)
STATE_SIZE = 8

BLOCK = 1 << 16  # voxels of a row counted between overflow checks
RUN = 8  # voxels compared at once: a run of 8 equal (gt, pred[, mask]) triples counts in one add
FLUSH_AT = np.int64(1) << np.int64(31)  # flush local uint32 tables before a copy can overflow


@njit(nogil=True, cache=True, inline="always")
def hash_slot(key, hmask):
    """Slot of ``key`` (uint64) in an open-addressing table of ``hmask + 1`` slots."""
    return ((key * _GOLDEN) >> _SHIFT) & hmask


@njit(nogil=True, cache=True)
def lookup_label(key, lut, hkeys, hvals):
    """Index of label value ``key`` (uint64), or -1 if unknown. Callable from CUDA kernels."""
    if key < _LUT_SIZE_U:
        return np.int64(lut[key])
    cap = hkeys.shape[0]
    if cap == 0:
        return np.int64(-1)
    hmask = np.uint64(cap - 1)
    h = hash_slot(key, hmask)
    while True:
        v = hvals[h]
        if v < 0:
            return np.int64(-1)
        if hkeys[h] == key:
            return np.int64(v)
        h = (h + _ONE_U) & hmask


@njit(nogil=True, cache=True)
def insert_label(key, index, lut, hkeys, hvals):
    """Record ``key -> index``; the hash table must have a free slot."""
    if key < _LUT_SIZE_U:
        lut[key] = index
        return
    hmask = np.uint64(hkeys.shape[0] - 1)
    h = hash_slot(key, hmask)
    while hvals[h] >= 0:
        h = (h + _ONE_U) & hmask
    hkeys[h] = key
    hvals[h] = index


@njit(nogil=True, cache=True)
def flush(local, acc, nlab, kcap, dense):
    """Add the used part of every sub-histogram into ``acc`` (int64) and zero it."""
    nsub = local.shape[0]
    if dense:
        for s in range(nsub):
            for a in range(nlab):
                row = a * kcap
                for b in range(nlab):
                    c = local[s, row + b]
                    if c:
                        acc[row + b] += c
                        local[s, row + b] = 0
    else:
        for s in range(nsub):
            for part in range(3):
                off = part * kcap
                for a in range(nlab):
                    c = local[s, off + a]
                    if c:
                        acc[off + a] += c
                        local[s, off + a] = 0


@njit(nogil=True, cache=True, inline="always")
def same8(row, k):
    """True when ``row[k:k+8]`` holds one value (the caller guarantees 8 elements)."""
    v = row[k]
    return (
        (row[k + 1] == v) & (row[k + 2] == v) & (row[k + 3] == v) & (row[k + 4] == v)
        & (row[k + 5] == v) & (row[k + 6] == v) & (row[k + 7] == v)
    )  # fmt: skip


@njit(nogil=True, cache=True, inline="always")
def _uniform(g_row, p_row, m_row, has_mask, k):
    """True when gt, pred (and mask) are each constant over ``k .. k+7``."""
    return same8(g_row, k) and same8(p_row, k) and (not has_mask or same8(m_row, k))


@njit(nogil=True, cache=True)
def count_direct(gt, pred, mask, has_mask, ignore, has_ignore, gt_limit, pred_limit, kcap, local, acc, state):
    """Count pairs of a chunk whose labels are ``0..K-1`` used directly as indices (dense table).

    ``gt_limit`` / ``pred_limit`` are the smallest invalid unsigned values (K, or 2**(bits-1) for
    signed inputs when that is smaller, so that negative values fail the same test).
    Returns ``OK`` or ``BAD_GT`` / ``BAD_PRED`` with ``state[POS]`` and ``state[VALUE]`` set.
    """
    n0, n1, n2 = gt.shape
    smask = local.shape[0] - 1
    nignored = 0
    nmasked = 0
    since = np.int64(0)
    status = OK
    for i in range(n0):
        for j in range(n1):
            g_row = gt[i, j]
            p_row = pred[i, j]
            m_row = mask[i, j] if has_mask else mask[0, 0]
            for k0 in range(0, n2, BLOCK):
                k1 = min(k0 + BLOCK, n2)
                k = k0
                while k < k1:
                    if k + RUN <= k1 and _uniform(g_row, p_row, m_row, has_mask, k):
                        w = RUN
                        end = k + 1
                    else:
                        w = 1
                        end = min(k + RUN, k1)
                    for kk in range(k, end):
                        if has_mask and m_row[kk] == 0:
                            nmasked += w
                            continue
                        g = np.uint64(g_row[kk])
                        if has_ignore and g == ignore:
                            nignored += w
                            continue
                        p = np.uint64(p_row[kk])
                        if g >= gt_limit or p >= pred_limit:
                            status = BAD_GT if g >= gt_limit else BAD_PRED
                            state[POS] = (i * n1 + j) * n2 + kk
                            state[VALUE] = np.int64(g if status == BAD_GT else p)
                            break
                        local[kk & smask, np.int64(g) * kcap + np.int64(p)] += w
                    if status != OK:
                        break
                    k = end if w == 1 else k + RUN
                if status != OK:
                    break
                since += k1 - k0
                if since >= FLUSH_AT:
                    flush(local, acc, kcap, kcap, True)
                    since = 0
            if status != OK:
                break
        if status != OK:
            break
    flush(local, acc, kcap, kcap, True)
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    return status


@njit(nogil=True, cache=True, inline="always")
def _index(v, lut, hkeys, hvals, cache, slot):
    """Index of label value ``v`` (-1 if unknown): the LUT below LUT_SIZE, else the hash table.

    ``cache[slot]`` / ``cache[slot + 1]`` remember the last large value found and its index
    (indices never change once assigned; unknown values are never cached).
    """
    if v < _LUT_SIZE_U:
        return np.int64(lut[v])
    if np.uint64(cache[slot]) == v and cache[slot + 1] >= 0:  # -1 (empty) also reads as 2**64-1
        return cache[slot + 1]
    idx = lookup_label(v, lut, hkeys, hvals)
    if idx >= 0:
        cache[slot] = np.int64(v)
        cache[slot + 1] = idx
    return idx


@njit(nogil=True, cache=True)
def _assign(v, signed_from, fixed, lut, hkeys, hvals, labels, state):
    """Give unknown label value ``v`` the next index (discovery), or a negative status.

    ``-BAD_GT`` (the caller tells gt from pred) when ``v`` may not be a label, ``-GROW_LABELS``
    / ``-GROW_HASH`` when a table is full.
    """
    idx = lookup_label(v, lut, hkeys, hvals)
    if idx >= 0:
        return idx
    if fixed or (signed_from != 0 and v >= signed_from):
        return np.int64(-BAD_GT)
    nlab = state[NLAB]
    if nlab >= labels.shape[0]:
        return np.int64(-GROW_LABELS)
    if v >= _LUT_SIZE_U:
        if 2 * (state[HCOUNT] + 1) > hkeys.shape[0]:
            return np.int64(-GROW_HASH)
        state[HCOUNT] += 1
    labels[nlab] = v
    insert_label(v, nlab, lut, hkeys, hvals)
    state[NLAB] = nlab + 1
    return nlab


@njit(nogil=True, cache=True)
def count_mapped(
    gt, pred, mask, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, dense,
    lut, hkeys, hvals, labels, local, acc, state, start,
):  # fmt: skip
    """Count pairs of a chunk through a label map (value -> index), discovering labels if allowed.

    Label values below ``LUT_SIZE`` map through ``lut``; larger ones through the hash table
    ``hkeys`` / ``hvals``. A value with no index is an error when ``fixed``; otherwise it gets
    the next free index (``labels[index] = value``). ``gt_signed_from`` / ``pred_signed_from``
    are the unsigned values from which a signed input is negative (0: unsigned input).

    Counting starts at C-order position ``start`` of the chunk. On ``GROW_LABELS`` /
    ``GROW_HASH`` every voxel before ``state[POS]`` has been counted (and flushed into
    ``acc``): the caller grows the tables and calls again with ``start = state[POS]``.
    """
    n0, n1, n2 = gt.shape
    smask = local.shape[0] - 1
    kcap = labels.shape[0]
    nignored = 0
    nmasked = 0
    since = np.int64(0)
    status = OK
    plane = n1 * n2
    i0 = start // plane
    j0 = (start % plane) // n2
    kstart = start % n2
    cache = np.full(4, -1, dtype=np.int64)
    for i in range(i0, n0):
        for j in range(j0 if i == i0 else 0, n1):
            g_row = gt[i, j]
            p_row = pred[i, j]
            m_row = mask[i, j] if has_mask else mask[0, 0]
            first_k = kstart if (i == i0 and j == j0) else 0
            for k0 in range(first_k, n2, BLOCK):
                k1 = min(k0 + BLOCK, n2)
                k = k0
                while k < k1:
                    if k + RUN <= k1 and _uniform(g_row, p_row, m_row, has_mask, k):
                        w = RUN
                        end = k + 1
                    else:
                        w = 1
                        end = min(k + RUN, k1)
                    for kk in range(k, end):
                        if has_mask and m_row[kk] == 0:
                            nmasked += w
                            continue
                        g = np.uint64(g_row[kk])
                        if has_ignore and g == ignore:
                            nignored += w
                            continue
                        ig = _index(g, lut, hkeys, hvals, cache, 0)
                        if ig < 0:
                            ig = _assign(g, gt_signed_from, fixed, lut, hkeys, hvals, labels, state)
                            if ig < 0:
                                status = -ig
                                state[VALUE] = np.int64(g)
                                state[POS] = (i * n1 + j) * n2 + kk
                                break
                        p = np.uint64(p_row[kk])
                        ip = _index(p, lut, hkeys, hvals, cache, 2)
                        if ip < 0:
                            ip = _assign(p, pred_signed_from, fixed, lut, hkeys, hvals, labels, state)
                            if ip < 0:
                                status = BAD_PRED if ip == -BAD_GT else -ip
                                state[VALUE] = np.int64(p)
                                state[POS] = (i * n1 + j) * n2 + kk
                                break
                        s = kk & smask
                        if dense:
                            local[s, ig * kcap + ip] += w
                        else:
                            local[s, ig] += w
                            local[s, kcap + ip] += w
                            if ig == ip:
                                local[s, 2 * kcap + ig] += w
                    if status != OK:
                        break
                    k = end if w == 1 else k + RUN
                if status != OK:
                    break
                since += k1 - k0
                if since >= FLUSH_AT:
                    flush(local, acc, state[NLAB], kcap, dense)
                    since = 0
            if status != OK:
                break
        if status != OK:
            break
    flush(local, acc, state[NLAB], kcap, dense)
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    return status
