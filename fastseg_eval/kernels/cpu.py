"""CPU counting kernels (numba ``njit(nogil=True, cache=True)``).

Every kernel here takes one 3-D chunk of ground truth and prediction (``gt`` first: rows of the
confusion matrix are ground truth) and *adds* into an int64 count table that the caller owns.
Kernels validate nothing beyond what they must to stay memory safe, allocate nothing, and never
raise: they stop and return a status code that :mod:`fastseg_eval.reducers.confusion` turns into an error
or acts on (growing a table and resuming where the kernel stopped).

Label values arrive as unsigned integers: signed inputs are passed as unsigned views of the
same width (no copy) together with the unsigned value from which they are negative, and bool
inputs as ``uint8`` views.

Count table layouts (``acc``, int64, 1-D)
-----------------------------------------
* dense: ``kcap * kcap`` counts; pair (gt index a, pred index b) at ``a * kcap + b``;
* marginals: ``3 * kcap`` counts; ``[0:kcap]`` gt counts (row sums), ``[kcap:2kcap]`` pred
  counts (column sums), ``[2kcap:3kcap]`` the diagonal (TP).

How counting is fast
--------------------
Segmentations are mostly large uniform regions, dominated by one class. Rows are walked in
blocks of ``RUN`` voxels: when gt, pred (and mask) are each constant over a block, the block is
resolved once. Equal consecutive pairs (whole blocks or single voxels) accumulate in a register
(a run) that is added to the table only when the pair changes, so the dominant pair never
serialises on one memory counter. Both are exact for any data. Three kernels work on 64-bit
words of contiguous 1- or 2-byte chunks: :func:`count_direct_flat` (labels ``0..K-1``, as
above), :func:`count_words` (labels through the lookup table, a mixed word counted by distinct
pair) and :func:`count_small` (labels ``0..3`` on 1 byte: no branch per word at all, counts from
sums of ANDed bit planes). Past K = 4 on 1 byte, and for 2-byte labels without a mask, chunks are
counted run by run (:func:`count_runs`, :func:`count_runs16`); where the CPU compresses vectors
in one instruction, a stretch's run starts are listed first and counted in one loop
(:func:`count_runs_listed`, :func:`count_runs16_listed`).

A numba pitfall
---------------
In a ``while True:`` loop, a local assigned in a branch that ends in ``break`` must not be read
later in the loop body: numba (0.61 and 0.68, Python 3.11) then compiles the fall-through path
with the branch's value, or with a stale one. Minimal case, ``f(3)``: Python ``(203, 102)``,
numba ``(300, 5)``::

    def f(n):
        kk = out = pos = 0
        while True:
            kk += 1
            if pos == n:
                kk += 1
                break
            out += kk
            pos += 1
            kk = 100
        return out, kk

A loop condition other than the constant ``True``, or a ``return`` in place of the ``break``,
compiles correctly. ``tests/test_kernel_loops.py`` checks the kernels for the pattern.
"""

from __future__ import annotations

import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from fastseg_eval.kernels.jit import njit  # numba.njit, with the on-disk cache outside the package
from fastseg_eval.kernels.simd import (
    lane_diff32,
    lane_diff64,
    lane_mask64,
    popcount,
    run_starts32,
    run_starts64,
)

LUT_SIZE = 1 << 16  # label values below this map through a direct lookup table
_LUT_SIZE_U = np.uint64(LUT_SIZE)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(29)
_ONE_U = np.uint64(1)
RUN = 8  # voxels compared at once

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


@njit(nogil=True, cache=True, inline="always")
def same7(row, k, v):
    """True when ``row[k+1:k+8]`` all equal ``v`` (no short circuit: one branch for the block)."""
    return (
        (row[k + 1] == v) & (row[k + 2] == v) & (row[k + 3] == v) & (row[k + 4] == v)
        & (row[k + 5] == v) & (row[k + 6] == v) & (row[k + 7] == v)
    )  # fmt: skip


@njit(nogil=True, cache=True, inline="always")
def _add_run(acc, dense, ku, a, b, w):
    """Add a run of ``w`` voxels, gt index ``a`` and pred index ``b`` (uint64 in the hot loops,
    ``ku`` the capacity): one cell of a dense table, or both marginals and, without a branch (gt
    == pred at about half the runs), the diagonal. Inlined by numba, so the hot loops compile as
    if the lines were written out."""
    if dense:
        acc[a * ku + b] += w
    else:
        acc[a] += w
        acc[ku + b] += w
        acc[ku + ku + a] += w & -np.int64(a == b)


@njit(nogil=True, cache=True, inline="always")
def _add_pair(acc, dense, kcap, a, b, w):
    """:func:`_add_run` for the register run of :func:`count_mapped`, which may be empty."""
    if w != 0:
        _add_run(acc, dense, kcap, a, b, w)


@njit(nogil=True, cache=True)
def count_direct(gt, pred, mask, has_mask, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, state):
    """Count pairs of a chunk whose labels are ``0..K-1`` used directly as indices (dense table).

    ``gt_limit`` / ``pred_limit`` are the smallest invalid unsigned values (K, or 2**(bits-1) for
    signed inputs when that is smaller, so that negative values fail the same test).
    Returns ``OK`` or ``BAD_GT`` / ``BAD_PRED`` with ``state[POS]`` and ``state[VALUE]`` set.

    The per-voxel step is written out twice (non-uniform blocks, row tail): numba does not keep
    this loop as fast through a helper that returns the run register.
    """
    n0, n1, n2 = gt.shape
    run_idx = 0
    run_w = 0
    nignored = 0
    nmasked = 0
    bad = -1
    for i in range(n0):
        for j in range(n1):
            g_row = gt[i, j]
            p_row = pred[i, j]
            m_row = mask[i, j] if has_mask else mask[0, 0]
            k = 0
            while k + RUN <= n2:
                g0 = g_row[k]
                p0 = p_row[k]
                uniform = same7(g_row, k, g0) & same7(p_row, k, p0)
                if has_mask:
                    uniform = uniform & same7(m_row, k, m_row[k])
                if uniform:
                    g = np.uint64(g0)
                    p = np.uint64(p0)
                    if has_mask and m_row[k] == 0:
                        nmasked += RUN
                    elif has_ignore and g == ignore:
                        nignored += RUN
                    elif g >= gt_limit or p >= pred_limit:
                        bad = k
                        break
                    else:
                        idx = np.int64(g) * kcap + np.int64(p)
                        if idx == run_idx:
                            run_w += RUN
                        else:
                            acc[run_idx] += run_w
                            run_idx = idx
                            run_w = RUN
                else:
                    for kk in range(k, k + RUN):
                        if has_mask and m_row[kk] == 0:
                            nmasked += 1
                            continue
                        g = np.uint64(g_row[kk])
                        if has_ignore and g == ignore:
                            nignored += 1
                            continue
                        p = np.uint64(p_row[kk])
                        if g >= gt_limit or p >= pred_limit:
                            bad = kk
                            break
                        idx = np.int64(g) * kcap + np.int64(p)
                        if idx == run_idx:
                            run_w += 1
                        else:
                            acc[run_idx] += run_w
                            run_idx = idx
                            run_w = 1
                    if bad >= 0:
                        break
                k += RUN
            if bad < 0:
                for kk in range(k, n2):
                    if has_mask and m_row[kk] == 0:
                        nmasked += 1
                        continue
                    g = np.uint64(g_row[kk])
                    if has_ignore and g == ignore:
                        nignored += 1
                        continue
                    p = np.uint64(p_row[kk])
                    if g >= gt_limit or p >= pred_limit:
                        bad = kk
                        break
                    idx = np.int64(g) * kcap + np.int64(p)
                    if idx == run_idx:
                        run_w += 1
                    else:
                        acc[run_idx] += run_w
                        run_idx = idx
                        run_w = 1
            if bad >= 0:
                g = np.uint64(g_row[bad])
                p = np.uint64(p_row[bad])
                acc[run_idx] += run_w
                state[NIGNORED] += nignored
                state[NMASKED] += nmasked
                state[POS] = (i * n1 + j) * n2 + bad
                state[VALUE] = np.int64(g if g >= gt_limit else p)
                return BAD_GT if g >= gt_limit else BAD_PRED
    acc[run_idx] += run_w
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    return OK


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
    """Index of label value ``v``, giving it the next free one in discovery; or a negative status.

    ``-BAD_GT`` (the caller tells gt from pred) when ``v`` may not be a label, ``-GROW_LABELS``
    / ``-GROW_HASH`` when a table is full.
    """
    if signed_from != 0 and v >= signed_from:  # negative, even where its bits are a known label
        return np.int64(-BAD_GT)
    idx = lookup_label(v, lut, hkeys, hvals)
    if idx >= 0:
        return idx
    if fixed:
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


@njit(nogil=True, cache=True, inline="always")
def _known(v, limit, identity, lut):
    """The index of label value ``v`` if it is known without assigning: ``v`` itself with
    ``identity``, else the lookup table's entry; -1 at or past ``limit`` (see :func:`_limits`;
    values there go to :func:`_resolve`). Inlined by numba into the kernels' loops."""
    return (np.int64(v) if identity else np.int64(lut[v])) if v < limit else np.int64(-1)


@njit(nogil=True, cache=True)
def _resolve(rg, rp, glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals, labels, state):  # fmt: skip
    """``(status, gt index, pred index)`` of a run's pair (``rg``, ``rp``) that the run kernels'
    inner loops could not look up: each label is looked up, else assigned (discovery) through
    :func:`_assign`; ``status`` is ``OK``, or ``GROW_*`` / ``BAD_*`` with ``state[VALUE]`` set
    (the caller sets ``state[POS]``). The kernels look labels up inline and call this only for
    a pair they could not: a call on every pair made LLVM keep the loop's values on the stack."""
    ig = _known(rg, glim, identity, lut)
    if ig < 0:
        ig = _assign(rg, gt_signed_from, fixed, lut, hkeys, hvals, labels, state)
    ip = np.int64(0)
    if ig >= 0:
        ip = _known(rp, plim, identity, lut)
        if ip < 0:
            ip = _assign(rp, pred_signed_from, fixed, lut, hkeys, hvals, labels, state)
    if ig < 0 or ip < 0:
        state[VALUE] = np.int64(rg if ig < 0 else rp)
        return (-ig if ig < 0 else (BAD_PRED if ip == -BAD_GT else -ip)), ig, ip
    return OK, ig, ip


@njit(nogil=True, cache=True)
def count_mapped(
    gt, pred, mask, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, dense,
    lut, hkeys, hvals, labels, acc, state, start,
):  # fmt: skip
    """Count pairs of a chunk through a label map (value -> index), discovering labels if allowed.

    Label values below ``LUT_SIZE`` map through ``lut``; larger ones through the hash table
    ``hkeys`` / ``hvals``. A value with no index is an error when ``fixed``; otherwise it gets
    the next free index (``labels[index] = value``). ``gt_signed_from`` / ``pred_signed_from``
    are the unsigned values from which a signed input is negative (0: unsigned input).

    Counting starts at C-order position ``start`` of the chunk. On any status but ``OK`` every
    voxel before ``state[POS]`` has been counted: on ``GROW_LABELS`` / ``GROW_HASH`` the caller
    grows the tables and calls again with ``start = state[POS]``.
    """
    n0, n1, n2 = gt.shape
    kcap = labels.shape[0]
    run_g = 0
    run_p = 0
    run_w = 0
    nignored = 0
    nmasked = 0
    status = OK
    plane = n1 * n2
    i0 = start // plane
    j0 = (start % plane) // n2
    kstart = start % n2
    cache = np.full(4, -1, dtype=np.int64)
    glim, plim = _limits(gt_signed_from, pred_signed_from, False, 0)
    for i in range(i0, n0):
        for j in range(j0 if i == i0 else 0, n1):
            g_row = gt[i, j]
            p_row = pred[i, j]
            m_row = mask[i, j] if has_mask else mask[0, 0]
            k = kstart if (i == i0 and j == j0) else 0
            while k < n2:
                w = 1
                stop = min(k + RUN, n2)
                if k + RUN <= n2:
                    uniform = same7(g_row, k, g_row[k]) & same7(p_row, k, p_row[k])
                    if has_mask:
                        uniform = uniform & same7(m_row, k, m_row[k])
                    if uniform:
                        w = RUN
                        stop = k + 1
                for kk in range(k, stop):
                    if has_mask and m_row[kk] == 0:
                        nmasked += w
                        continue
                    g = np.uint64(g_row[kk])
                    if has_ignore and g == ignore:
                        nignored += w
                        continue
                    ig = _index(g, lut, hkeys, hvals, cache, 0) if g < glim else np.int64(-1)
                    if ig < 0:
                        ig = _assign(g, gt_signed_from, fixed, lut, hkeys, hvals, labels, state)
                        if ig < 0:
                            status = -ig
                            state[VALUE] = np.int64(g)
                    p = np.uint64(p_row[kk])
                    ip = (_index(p, lut, hkeys, hvals, cache, 2) if p < plim else np.int64(-1)) if status == OK else np.int64(0)
                    if ip < 0:
                        ip = _assign(p, pred_signed_from, fixed, lut, hkeys, hvals, labels, state)
                        if ip < 0:
                            status = BAD_PRED if ip == -BAD_GT else -ip
                            state[VALUE] = np.int64(p)
                    if status != OK:
                        _add_pair(acc, dense, kcap, run_g, run_p, run_w)
                        state[POS] = (i * n1 + j) * n2 + kk
                        state[NIGNORED] += nignored
                        state[NMASKED] += nmasked
                        return status
                    if ig == run_g and ip == run_p:
                        run_w += w
                    else:
                        _add_pair(acc, dense, kcap, run_g, run_p, run_w)
                        run_g = ig
                        run_p = ip
                        run_w = w
                k = stop if w == 1 else k + RUN
    _add_pair(acc, dense, kcap, run_g, run_p, run_w)
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    return status


_LOW = (np.uint64(0), np.uint64(0xFF), np.uint64(0xFFFF))
_BCAST = (np.uint64(0), np.uint64(0x0101010101010101), np.uint64(0x0001000100010001))
_LO7 = (np.uint64(0), np.uint64(0x7F7F7F7F7F7F7F7F), np.uint64(0x7FFF7FFF7FFF7FFF))
_SPREAD16 = np.uint64(0x0000FFFF0000FFFF)
_SPREAD8 = np.uint64(0x00FF00FF00FF00FF)
_LOW32 = np.uint64(0xFFFFFFFF)


@njit(nogil=True, cache=True, inline="always")
def _zero_lanes(x, lo7):
    """The top bit of every lane of ``x`` that is zero, nothing else (exact: no carry between lanes)."""
    return ~(((x & lo7) + lo7) | x | lo7)


@njit(nogil=True, cache=True, inline="always")
def _lane_count(z, top, bcast, width):
    """Number of lanes whose top bit is set in ``z`` (a multiply sums the lanes into the top one)."""
    return np.int64(((z >> top) * bcast) >> width)


@njit(nogil=True, cache=True, inline="always")
def _mask_lanes(word, w, size):
    """Mask bytes of label word ``w`` from mask word ``word`` (``mw[w >> (size - 1)]``), one per
    lane (a 2-byte lane holds its byte low)."""
    if size == 1:
        return word
    x = (word >> np.uint64((w & 1) * 32)) & _LOW32
    x = (x | (x << np.uint64(16))) & _SPREAD16
    return (x | (x << np.uint64(8))) & _SPREAD8


@njit(nogil=True, cache=True)
def _limits(gt_signed_from, pred_signed_from, identity, kcap):
    """Values below these may be looked up (gt, pred): a signed input's negative values never
    are (their bits may equal a known label), and with ``identity`` (labels ``0..kcap-1``, their
    own indices) nothing past ``kcap-1``. Values at or past a limit go to :func:`_assign`."""
    top = ~np.uint64(0)
    glim = gt_signed_from if gt_signed_from != 0 else top
    plim = pred_signed_from if pred_signed_from != 0 else top
    if identity:
        glim = min(glim, np.uint64(kcap))
        plim = min(plim, np.uint64(kcap))
    return glim, plim


@njit(nogil=True, cache=True)
def count_words(
    g1, p1, m1, gw, pw, mw, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed,
    identity, dense, lut, hkeys, hvals, labels, kcap, acc, state, start,
):  # fmt: skip
    """:func:`count_mapped` for C-contiguous 1-D chunks of 1- or 2-byte labels, one 64-bit word
    (8 or 4 voxels) at a time: label values map through ``lut`` (every value of these types is
    below ``LUT_SIZE``), with the same statuses, ``start`` and ``state[POS]``; the table layout is
    dense or marginals. ``gw`` / ``pw`` are uint64 views of the first ``len(gw) * 8`` bytes of
    ``g1`` / ``p1``, ``mw`` of the uint8 mask ``m1``; gt and pred have the same item size.

    * A word equal to the previous counted uniform word extends the run.
    * A uniform word (every lane equal to its first) is resolved once.
    * A mixed word is counted by distinct (gt, pred) pair: the lanes equal to the lowest uncounted
      lane's pair are found with a carry-free zero-lane test on ``(gt ^ g0) | (pred ^ p0)`` and
      counted with one multiply, so a word of two pairs costs two lookups and two table updates
      instead of one per voxel. Its pairs are resolved before any is added: a word is counted whole or not at all, so a grow-and-resume
      restarts at the word.
    """
    size = g1.itemsize
    lanes = 8 // size
    glim, plim = _limits(gt_signed_from, pred_signed_from, identity, kcap)
    width = np.uint64(64 - 8 * size)
    top = np.uint64(8 * size - 1)
    low = _LOW[size]
    bcast = _BCAST[size]
    lo7 = _LO7[size]
    hi = ~lo7
    nwords = gw.shape[0]
    pairs_g = np.empty(8, dtype=np.int64)
    pairs_p = np.empty(8, dtype=np.int64)
    pairs_n = np.empty(8, dtype=np.int64)
    run_g = np.int64(0)
    run_p = np.int64(0)
    run_w = np.int64(0)
    nignored = 0
    nmasked = 0
    status = OK
    have_prev = False
    prev_a = np.uint64(0)
    prev_b = np.uint64(0)
    prev_m = np.uint64(0)
    w = start // lanes if start < nwords * lanes else nwords
    while w < nwords:
        a = gw[w]
        b = pw[w]
        mword = _mask_lanes(mw[(w) >> (size - 1)], w, size) if has_mask else hi
        if have_prev and a == prev_a and b == prev_b and mword == prev_m:
            run_w += lanes
            w += 1
            continue
        have_prev = False
        g = a & low
        p = b & low
        if has_mask:
            m = mword & low
            uniform = (a == g * bcast) & (b == p * bcast) & (mword == m * bcast)
        else:
            m = np.uint64(1)
            uniform = (a == g * bcast) & (b == p * bcast)
        if uniform:
            if m == 0:
                nmasked += lanes
            elif has_ignore and g == ignore:
                nignored += lanes
            else:
                ig = _known(g, glim, identity, lut)
                ip = _known(p, plim, identity, lut)
                if (ig < 0) | (ip < 0):  # a label to assign (discovery) or refuse
                    status, ig, ip = _resolve(
                        g, p, glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals,
                        labels, state,
                    )  # fmt: skip
                    if status != OK:
                        state[POS] = w * lanes
                        break
                if ig == run_g and ip == run_p:
                    run_w += lanes
                else:
                    if dense:
                        acc[run_g * kcap + run_p] += run_w
                    else:
                        acc[run_g] += run_w
                        acc[kcap + run_p] += run_w
                        if run_g == run_p:
                            acc[2 * kcap + run_g] += run_w
                    run_g = ig
                    run_p = ip
                    run_w = lanes
                have_prev = True
                prev_a = a
                prev_b = b
                prev_m = mword
            w += 1
            continue
        remaining = hi
        if has_mask:
            z = _zero_lanes(mword, lo7)
            nmasked_w = _lane_count(z, top, bcast, width)
            remaining ^= z
        else:
            nmasked_w = 0
        nignored_w = 0
        npairs = 0
        while remaining != 0:
            sh = np.uint64(trailing_zeros(remaining)) - top
            g = (a >> sh) & low
            p = (b >> sh) & low
            z = _zero_lanes((a ^ (g * bcast)) | (b ^ (p * bcast)), lo7) & remaining
            remaining ^= z
            n = _lane_count(z, top, bcast, width)
            if has_ignore and g == ignore:
                nignored_w += n
                continue
            ig = _known(g, glim, identity, lut)
            ip = _known(p, plim, identity, lut)
            if (ig < 0) | (ip < 0):  # a label to assign (discovery) or refuse
                status, ig, ip = _resolve(
                    g, p, glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals,
                    labels, state,
                )  # fmt: skip
                if status != OK:
                    break
            pairs_g[npairs] = ig
            pairs_p[npairs] = ip
            pairs_n[npairs] = n
            npairs += 1
        if status != OK:
            if status == BAD_GT or status == BAD_PRED:  # report the first bad voxel in order
                status = OK
                for kk in range(w * lanes, (w + 1) * lanes):
                    status = _voxel_status(
                        g1, p1, m1, kk, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed,
                        identity, glim, plim, lut, hkeys, hvals, labels, state,
                    )  # fmt: skip
                    if status != OK:
                        break
                if status == OK:  # cannot happen (the failing pair's first lane fails the same test)
                    status = BAD_GT
                    state[POS] = w * lanes
                    state[VALUE] = np.int64(a & low)
            else:
                state[POS] = w * lanes
            break
        for q in range(npairs):
            if dense:
                acc[pairs_g[q] * kcap + pairs_p[q]] += pairs_n[q]
            else:
                acc[pairs_g[q]] += pairs_n[q]
                acc[kcap + pairs_p[q]] += pairs_n[q]
                if pairs_g[q] == pairs_p[q]:
                    acc[2 * kcap + pairs_g[q]] += pairs_n[q]
        nmasked += nmasked_w
        nignored += nignored_w
        w += 1
    if status == OK:
        for kk in range(max(start, nwords * lanes), g1.shape[0]):
            status = _voxel_status(
                g1, p1, m1, kk, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, identity,
                glim, plim, lut, hkeys, hvals, labels, state,
            )  # fmt: skip
            if status != OK:
                break
            if has_mask and m1[kk] == 0:
                nmasked += 1
                continue
            g = np.uint64(g1[kk])
            if has_ignore and g == ignore:
                nignored += 1
                continue
            ig = _known(g, glim, identity, lut)
            if ig < 0:
                ig = _assign(g, gt_signed_from, fixed, lut, hkeys, hvals, labels, state)
            p = np.uint64(p1[kk])
            ip = _known(p, plim, identity, lut)
            if ip < 0:
                ip = _assign(p, pred_signed_from, fixed, lut, hkeys, hvals, labels, state)
            if dense:
                acc[ig * kcap + ip] += 1
            else:
                acc[ig] += 1
                acc[kcap + ip] += 1
                if ig == ip:
                    acc[2 * kcap + ig] += 1
    if dense:
        acc[run_g * kcap + run_p] += run_w
    else:
        acc[run_g] += run_w
        acc[kcap + run_p] += run_w
        if run_g == run_p:
            acc[2 * kcap + run_g] += run_w
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    return status


@njit(nogil=True, cache=True)
def _voxel_status(
    g1, p1, m1, kk, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, identity, glim,
    plim, lut, hkeys, hvals, labels, state,
):  # fmt: skip
    """``OK`` when voxel ``kk`` is masked, ignored or has (or is given) an index for both labels;
    else its status, with ``state[POS]`` / ``state[VALUE]`` set (gt is checked first)."""
    if has_mask and m1[kk] == 0:
        return OK
    g = np.uint64(g1[kk])
    if has_ignore and g == ignore:
        return OK
    status, _, _ = _resolve(
        g, np.uint64(p1[kk]), glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals,
        labels, state,
    )  # fmt: skip
    if status != OK:
        state[POS] = kk
    return status


@njit(nogil=True, cache=True)
def count_direct_flat(
    g1, p1, m1, gw, pw, mw, has_mask, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, side, state
):  # fmt: skip
    """:func:`count_direct` for C-contiguous 1-D chunks of 1- or 2-byte labels, 8 voxels at a time.

    ``gw`` / ``pw`` (and ``mw``, a uint8 mask) are uint64 views of the first ``len(gw) * 8``
    bytes of ``g1`` / ``p1`` (``m1``); gt and pred have the same item size. Positions are flat.

    * A block whose words equal the previous counted uniform block's extends the run (two loads,
      two compares for 8 uint8 voxels).
    * A uniform block (each word equals its first value broadcast to every lane) is resolved once.
    * A mixed block is validated first, then its voxels are added without branches (masked and
      ignored voxels add 0 to cell 0) into two interleaved tables ``side`` (shape
      ``(2, len(acc))``, zero on entry and on return; with no columns, into ``acc`` itself), so
      that equal neighbours do not serialise on one counter (measured: 0.80 -> 0.63 ns/voxel).
    """
    size = g1.itemsize
    low = _LOW[size]
    bcast = _BCAST[size]
    nblocks = gw.shape[0] // size  # a block is 8 voxels: ``size`` words
    use_side = side.shape[1] > 0
    run_idx = 0
    run_w = 0
    nignored = 0
    nmasked = 0
    bad = -1
    have_prev = False
    prev_a = np.uint64(0)
    prev_b = np.uint64(0)
    prev_m = np.uint64(0)
    for blk in range(nblocks):
        w0 = blk * size
        a = gw[w0]
        b = pw[w0]
        if have_prev and a == prev_a and b == prev_b:
            same = True
            if size == 2:
                same = (gw[w0 + 1] == a) & (pw[w0 + 1] == b)
            if has_mask:
                same = same & (mw[blk] == prev_m)
            if same:
                run_w += 8
                continue
        g = a & low
        p = b & low
        uniform = (a == g * bcast) & (b == p * bcast)
        if size == 2:
            uniform = uniform & (gw[w0 + 1] == a) & (pw[w0 + 1] == b)
        if has_mask:
            mword = mw[blk]
            uniform = uniform & (mword == (mword & _LOW[1]) * _BCAST[1])
        k = blk * 8
        if uniform:
            have_prev = False
            if has_mask and m1[k] == 0:
                nmasked += 8
            elif has_ignore and g == ignore:
                nignored += 8
            elif g >= gt_limit or p >= pred_limit:
                bad = k
                break
            else:
                idx = np.int64(g) * kcap + np.int64(p)
                if idx == run_idx:
                    run_w += 8
                else:
                    acc[run_idx] += run_w
                    run_idx = idx
                    run_w = 8
                have_prev = True
                prev_a = a
                prev_b = b
                if has_mask:
                    prev_m = mw[blk]
            continue
        have_prev = False
        invalid = False
        for kk in range(k, k + 8):
            keep = True
            if has_mask:
                keep = m1[kk] != 0
            g = np.uint64(g1[kk])
            if has_ignore:
                keep = keep & (g != ignore)
            invalid |= keep & ((g >= gt_limit) | (np.uint64(p1[kk]) >= pred_limit))
        if invalid:
            for kk in range(k, k + 8):  # the first invalid voxel, in order
                if has_mask and m1[kk] == 0:
                    continue
                g = np.uint64(g1[kk])
                if has_ignore and g == ignore:
                    continue
                if g >= gt_limit or np.uint64(p1[kk]) >= pred_limit:
                    bad = kk
                    break
            break
        for kk in range(k, k + 8):
            keep = True
            if has_mask:
                keep = m1[kk] != 0
                nmasked += m1[kk] == 0
            g = np.uint64(g1[kk])
            if has_ignore:
                skip = keep & (g == ignore)
                nignored += skip
                keep = keep & ~skip
            idx = np.int64(g) * kcap + np.int64(p1[kk]) if keep else np.int64(0)
            if use_side:
                side[kk & 1, idx] += keep
            else:
                acc[idx] += keep
    if bad < 0:
        for kk in range(nblocks * 8, g1.shape[0]):
            if has_mask and m1[kk] == 0:
                nmasked += 1
                continue
            g = np.uint64(g1[kk])
            if has_ignore and g == ignore:
                nignored += 1
                continue
            p = np.uint64(p1[kk])
            if g >= gt_limit or p >= pred_limit:
                bad = kk
                break
            acc[np.int64(g) * kcap + np.int64(p)] += 1
    acc[run_idx] += run_w
    if use_side:
        for s in range(2):
            for i in range(side.shape[1]):
                if side[s, i]:
                    acc[i] += side[s, i]
                    side[s, i] = 0
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    if bad >= 0:
        g = np.uint64(g1[bad])
        p = np.uint64(p1[bad])
        state[POS] = bad
        state[VALUE] = np.int64(g if g >= gt_limit else p)
        return BAD_GT if g >= gt_limit else BAD_PRED
    return OK


# ------------------------------------------------------------ 1-byte labels: runs found 64 at a time
@njit(nogil=True, cache=True)
def count_runs(g1, p1, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, state):
    """Count a C-contiguous 1-D chunk of 1-byte labels into the dense table ``acc`` (``kcap``
    columns) run by run; no mask; gt voxels equal to ``ignore`` (if ``has_ignore``) are counted
    in ``state[NIGNORED]`` instead. Returns how many voxels it counted: all but the last ``len %
    64`` (left to the caller), or fewer when a run holds a value past the limits (``gt_limit`` /
    ``pred_limit``; runs of the ignore label in gt are not checked): it stops at that run's
    first voxel, the first such voxel in C order, and the caller counts from there with
    :func:`count_direct_flat`, which reports it.

    A *run* is a maximal stretch of one (gt, pred) pair. Where runs start comes 64 voxels at a
    time from two vector compares of each input with itself one voxel later
    (:func:`~fastseg_eval.kernels.simd.lane_diff64`); the starts are then walked with ``tzcnt``
    and each run adds its length to its pair's cell with one scalar add. The cost follows the
    number of runs, not of voxels or of distinct pairs per block: a block inside a run costs the
    two compares, and segmentations change pair at a few percent of their voxels. (Measured on
    the K = 256 benchmark volume, 3.4 runs per 64 voxels: 1.8-2x the kernel that peeled each
    block's distinct pairs by vector compares; random noise, a run per voxel, about the same.
    Collecting a block's run starts first, branch-free, and adding them in a second loop was
    measured slower, as was unrolling the walk.)
    """
    n = g1.shape[0]
    nb = n // 64
    if nb == 0:
        return 0
    nignored = 0
    ign = ignore if has_ignore else np.uint64(256)  # no 1-byte value equals 256
    ku = np.uint64(kcap)
    rs = 0  # the open run: its start and pair
    rg = np.uint64(g1[0])
    rp = np.uint64(p1[0])
    m = np.uint64(0)
    for i in range(1, 64):  # the first block by scalar compares (no voxel before it)
        if g1[i] != g1[i - 1] or p1[i] != p1[i - 1]:
            m |= np.uint64(1) << np.uint64(i)
    pos = 0
    b = 0
    end = nb * 64
    while True:
        if m == np.uint64(0):
            b += 1
            if b < nb:
                pos = b * 64
                m = lane_diff64(g1, pos) | lane_diff64(p1, pos)
                continue
            e = end  # close the open run at the end of the blocks
        else:
            e = pos + trailing_zeros(m)
            m &= m - np.uint64(1)
        if rg == ign:
            nignored += e - rs
        elif (rg >= gt_limit) | (rp >= pred_limit):
            state[NIGNORED] += nignored
            return np.int64(rs)  # the caller counts from this run on, and reports its first voxel
        else:
            acc[rg * ku + rp] += e - rs  # unsigned index: no wraparound code
        if e == end:
            break
        rs = e
        rg = np.uint64(g1[np.uint64(e)])
        rp = np.uint64(p1[np.uint64(e)])
    state[NIGNORED] += nignored
    return end


LISTED = 768  # blocks of 64 voxels whose run starts are listed before they are counted (48 Ki voxels)
LIST_SIZE = LISTED * 64 + 64  # uint16 slots of the list: every start of a stretch, and room for a vector store


@njit(nogil=True, cache=True)
def count_runs_listed(g1, p1, ignore, has_ignore, gt_limit, pred_limit, kcap, acc, state, starts):
    """:func:`count_runs` in two steps per stretch of :data:`LISTED` blocks: the run starts of all
    its blocks are listed first (:func:`~fastseg_eval.kernels.simd.run_starts64`: compares and a
    vector compress, no branch per run), then each run adds its length to its pair's cell in one
    loop over the list. Walking each block's bits in turn costs a mispredicted branch at most
    blocks (their run counts vary); the list's loop is predictable. Same arguments, result and
    stopping rule as :func:`count_runs`, plus ``starts``: a uint16 scratch of at least
    :data:`LIST_SIZE` slots. Fast where the compress is an instruction
    (:func:`~fastseg_eval.kernels.simd.fast_compress`); chosen there only.
    """
    n = g1.shape[0]
    nb = n // 64
    if nb == 0:
        return 0
    end = nb * 64
    nignored = 0
    rs = np.uint64(0)  # the open run's first voxel (unsigned indices: no wraparound code)
    ign = ignore if has_ignore else np.uint64(256)  # no 1-byte value equals 256
    ku = np.uint64(kcap)
    k = 0
    for i in range(1, 64):  # the first block by scalar compares (no voxel before it)
        if g1[i] != g1[i - 1] or p1[i] != p1[i - 1]:
            starts[k] = i
            k += 1
    b = 1
    s0 = 0  # the list holds offsets from s0
    while True:
        b1 = min(nb, b + LISTED - 1)
        for bb in range(b, b1):
            k = run_starts64(g1, p1, bb * 64, bb * 64 - s0, starts, k)
        last = b1 == nb
        if last:  # close the open run at the end of the blocks
            starts[k] = end - s0
            k += 1
        s0u = np.uint64(s0)
        for j in range(k):
            e = s0u + np.uint64(starts[j])
            rg = np.uint64(g1[rs])
            rp = np.uint64(p1[rs])
            if rg == ign:
                nignored += np.int64(e - rs)
            elif (rg >= gt_limit) | (rp >= pred_limit):
                state[NIGNORED] += nignored
                return np.int64(rs)  # the caller counts from this run on, and reports its first voxel
            else:
                acc[rg * ku + rp] += np.int64(e - rs)
            rs = e
        if last:
            break
        b = b1
        s0 = b * 64
        k = 0
    state[NIGNORED] += nignored
    return end


# ------------------------------------------------- 2-byte labels through the lookup: runs, 32 at a time
@njit(nogil=True, cache=True)
def count_runs16(
    g1, p1, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, identity, dense, lut, hkeys, hvals,
    labels, kcap, acc, state, start,
):  # fmt: skip
    """:func:`count_words` for C-contiguous 1-D chunks of 2-byte labels without a mask, run by run
    (as :func:`count_runs`: run starts come 32 voxels at a time from two vector compares, see
    :func:`~fastseg_eval.kernels.simd.lane_diff32`); each run's pair is looked up once and its
    length added to the dense table or to the marginals (and the diagonal).

    Counts from ``start`` up to the chunk's last multiple of 32 voxels and returns ``OK`` with
    ``state[POS]`` there (the caller counts the rest with :func:`count_words`), or stops at the
    first voxel of a run whose label needs room (``GROW_*``) or is refused (``BAD_*``), with
    ``state[POS]`` / ``state[VALUE]`` as :func:`count_words` sets them: every voxel before it is
    counted, and that voxel is the first failing one in C order (a run is one value pair).

    The lookup of a run's pair is written out as in :func:`count_words`: the same lines as a
    shared ``@njit`` helper called from the loop (array arguments) measured 3x slower on uint16
    ids (0.84 against 2.4 Gvoxel/s). The add goes through :func:`_add_run`, which numba inlines
    into the loop's IR: it timed the same as the lines written out (64 Mvoxel of uint16 ids on
    one core, listed kernel: 17.8-19.0 against 17.4-20.3 ms; with an ignore label 21.7-25.5
    against 22.6-23.2 ms; the walk compiled for haswell 23.0-23.9 against 22.4-23.8 ms). A run
    whose label must be assigned or refused leaves the inner loop for the code below it: with the call to :func:`_assign` inside, LLVM kept the loop's values on the
    stack (64 Mvoxel of uint16 ids on one core: 35.7 ms, against 25.4 without).
    """
    glim, plim = _limits(gt_signed_from, pred_signed_from, identity, kcap)
    whole = identity and not dense and not has_ignore and min(glim, plim) >= np.uint64(1 << 16)  # see count_runs16_listed
    ign = ignore if has_ignore else np.uint64(1 << 16)  # no 2-byte value equals 65536
    end = (g1.shape[0] // 32) * 32  # whole blocks only: count_words resumes at a word boundary
    if start >= end:
        state[POS] = start
        return OK
    state[POS] = end
    nignored = 0
    status = OK
    rs = start  # the open run: its start and pair
    rg = np.uint64(g1[start])
    rp = np.uint64(p1[start])
    nxt = min(end, (start // 32 + 1) * 32)  # blocks are aligned; the part before, by scalar compares
    m = np.uint64(0)
    for i in range(start + 1, nxt):
        if g1[i] != g1[i - 1] or p1[i] != p1[i - 1]:
            m |= np.uint64(1) << np.uint64(i - start)
    pos = start
    ku = np.uint64(kcap)
    while True:
        done = False
        while True:  # runs whose labels are known (no call in this loop: registers stay)
            if m == np.uint64(0):
                if nxt < end:
                    pos = nxt
                    nxt += 32
                    m = lane_diff32(g1, pos) | lane_diff32(p1, pos)
                    continue
                e = end  # close the open run at the end of the blocks
            else:
                e = pos + trailing_zeros(m)
                m &= m - np.uint64(1)
            w = e - rs
            if whole:  # no test per run
                _add_run(acc, False, ku, rg, rp, w)
            elif rg == ign:
                nignored += w
            else:
                ig = _known(rg, glim, identity, lut)
                ip = _known(rp, plim, identity, lut)
                if (ig < 0) | (ip < 0):
                    break  # to the run's labels, assigned or refused below
                _add_run(acc, dense, ku, np.uint64(ig), np.uint64(ip), w)
            if e == end:
                done = True
                break
            rs = e
            rg = np.uint64(g1[np.uint64(e)])
            rp = np.uint64(p1[np.uint64(e)])
        if done:
            break
        # the run [rs, e) has a label to assign (discovery) or refuse
        status, ig, ip = _resolve(
            rg, rp, glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals, labels, state
        )
        if status != OK:
            state[POS] = rs
            break
        _add_run(acc, dense, ku, np.uint64(ig), np.uint64(ip), e - rs)
        if e == end:
            break
        rs = e
        rg = np.uint64(g1[e])
        rp = np.uint64(p1[e])
    state[NIGNORED] += nignored
    return status


@njit(nogil=True, cache=True)
def count_runs16_listed(
    g1, p1, ignore, has_ignore, gt_signed_from, pred_signed_from, fixed, identity, dense, lut, hkeys, hvals,
    labels, kcap, acc, state, start, starts,
):  # fmt: skip
    """:func:`count_runs16` in two steps per stretch of :data:`LISTED` x 64 voxels, as
    :func:`count_runs_listed`: the run starts are listed first
    (:func:`~fastseg_eval.kernels.simd.run_starts32`), then each run is looked up and counted in
    one loop over the list. Same arguments, result and stopping rule as :func:`count_runs16`,
    plus ``starts``: a uint16 scratch of at least :data:`LIST_SIZE` slots.
    """
    glim, plim = _limits(gt_signed_from, pred_signed_from, identity, kcap)
    # labels 0..K-1 with K >= 65536, unsigned inputs, no ignore label, diagonal + marginals: each
    # value is its own index, nothing to look up, refuse or skip (instance ids in uint16)
    whole = identity and not dense and not has_ignore and min(glim, plim) >= np.uint64(1 << 16)
    ign = ignore if has_ignore else np.uint64(1 << 16)  # no 2-byte value equals 65536
    end = (g1.shape[0] // 32) * 32  # whole blocks only: count_words resumes at a word boundary
    if start >= end:
        state[POS] = start
        return OK
    state[POS] = end
    nignored = 0
    ku = np.uint64(kcap)
    rs = np.uint64(start)  # the open run's first voxel (unsigned indices: no wraparound code)
    nxt = min(end, (start // 32 + 1) * 32)  # blocks are aligned; the part before, by scalar compares
    s0 = start  # the list holds offsets from s0
    k = 0
    for i in range(start + 1, nxt):
        if g1[i] != g1[i - 1] or p1[i] != p1[i - 1]:
            starts[k] = i - s0
            k += 1
    pos = nxt
    while True:
        stop = min(end, pos + LISTED * 64)
        for q in range(pos, stop, 32):
            k = run_starts32(g1, p1, q, q - s0, starts, k)
        last = stop == end
        if last:  # close the open run at the end of the blocks
            starts[k] = end - s0
            k += 1
        s0u = np.uint64(s0)
        j = 0
        if whole:  # no test per run
            for i in range(k):
                e = s0u + np.uint64(starts[np.uint64(i)])
                rg = np.uint64(g1[rs])
                rp = np.uint64(p1[rs])
                _add_run(acc, False, ku, rg, rp, np.int64(e - rs))
                rs = e
            j = k
        while j < k:
            while j < k:  # runs whose labels are known (no call in this loop: registers stay)
                e = s0u + np.uint64(starts[np.uint64(j)])  # unsigned index: no wraparound code
                rg = np.uint64(g1[rs])
                rp = np.uint64(p1[rs])
                w = np.int64(e - rs)
                if rg == ign:
                    nignored += w
                else:
                    ig = _known(rg, glim, identity, lut)
                    ip = _known(rp, plim, identity, lut)
                    if (ig < 0) | (ip < 0):
                        break
                    _add_run(acc, dense, ku, np.uint64(ig), np.uint64(ip), w)
                rs = e
                j += 1
            if j == k:
                break
            # a run with a label to assign (discovery) or refuse; then back to the loop above
            e = s0u + np.uint64(starts[np.uint64(j)])
            rg = np.uint64(g1[rs])
            rp = np.uint64(p1[rs])
            status, ig, ip = _resolve(
                rg, rp, glim, plim, gt_signed_from, pred_signed_from, fixed, identity, lut, hkeys, hvals, labels, state
            )
            if status != OK:
                state[POS] = np.int64(rs)
                state[NIGNORED] += nignored
                return status
            _add_run(acc, dense, ku, np.uint64(ig), np.uint64(ip), np.int64(e - rs))
            rs = e
            j += 1
        if last:
            break
        pos = stop
        s0 = stop
        k = 0
    state[NIGNORED] += nignored
    return OK


# ----------------------------------------------------------------- K <= 4: bit planes, no branches
SMALL_K = 4  # largest label count the bit-plane kernel counts (two bits per label)


_BATCH = 64  # blocks of 64 voxels whose plane masks are made before they are counted


@njit(nogil=True, cache=True)
def _mask_sums2(g1, p1, nb, high, tot):
    """Subset sums of the planes (pred bit 0, gt bit 0) over ``nb`` blocks of 64 voxels (labels
    < 2); True when a lane has a bit of ``high`` set (a value ``>= k``). In batches, as
    :func:`_mask_sums4`."""
    one = np.uint64(1)
    bad = np.uint64(0)
    m0 = np.empty(_BATCH, dtype=np.uint64)
    m2 = np.empty(_BATCH, dtype=np.uint64)
    t1 = t4 = t5 = 0
    for b0 in range(0, nb, _BATCH):
        nbb = min(_BATCH, nb - b0)
        for q in range(nbb):
            pos = (b0 + q) * 64
            m0[q] = lane_mask64(p1, pos, one)
            m2[q] = lane_mask64(g1, pos, one)
            bad |= lane_mask64(g1, pos, high) | lane_mask64(p1, pos, high)
        for q in range(nbb):
            q0 = m0[q]
            q2 = m2[q]
            t1 += popcount(q0)
            t4 += popcount(q2)
            t5 += popcount(q0 & q2)
    tot[1] += t1
    tot[4] += t4
    tot[5] += t5
    return bad != 0


@njit(nogil=True, cache=True)
def _mask_sums4(g1, p1, nb, three, tot):
    """Subset sums of the planes (pred bit 0, pred bit 1, gt bit 0, gt bit 1) over ``nb`` blocks
    of 64 voxels (labels < 4, or < 3 with ``three``); True when a value is out of range.

    In batches of :data:`_BATCH` blocks: first the four plane masks of each block (vector tests,
    kept in four small arrays), then the ANDs and popcounts over the batch, a loop the compiler
    vectorises (``vpopcntq`` where the machine has it). Counting block by block instead kept 15
    scalar counters live and spilled them: half the speed (5.4 against 11 Gvoxel/s on one core
    in cache).
    """
    one = np.uint64(1)
    two = np.uint64(2)
    high = np.uint64(0xFC)
    bad = np.uint64(0)
    m0 = np.empty(_BATCH, dtype=np.uint64)
    m1 = np.empty(_BATCH, dtype=np.uint64)
    m2 = np.empty(_BATCH, dtype=np.uint64)
    m3 = np.empty(_BATCH, dtype=np.uint64)
    t1 = t2 = t3 = t4 = t5 = t6 = t7 = t8 = t9 = t10 = t11 = t12 = t13 = t14 = t15 = 0
    for b0 in range(0, nb, _BATCH):
        nbb = min(_BATCH, nb - b0)
        for q in range(nbb):
            pos = (b0 + q) * 64
            q0 = lane_mask64(p1, pos, one)
            q1 = lane_mask64(p1, pos, two)
            q2 = lane_mask64(g1, pos, one)
            q3 = lane_mask64(g1, pos, two)
            out = lane_mask64(g1, pos, high) | lane_mask64(p1, pos, high)
            if three:  # the value 3: both low bits set
                out |= (q0 & q1) | (q2 & q3)
            bad |= out
            m0[q] = q0
            m1[q] = q1
            m2[q] = q2
            m3[q] = q3
        for q in range(nbb):
            q0 = m0[q]
            q1 = m1[q]
            q2 = m2[q]
            q3 = m3[q]
            u01 = q0 & q1
            u02 = q0 & q2
            u12 = q1 & q2
            u23 = q2 & q3
            t1 += popcount(q0)
            t2 += popcount(q1)
            t3 += popcount(u01)
            t4 += popcount(q2)
            t5 += popcount(u02)
            t6 += popcount(u12)
            t7 += popcount(u01 & q2)
            t8 += popcount(q3)
            t9 += popcount(q0 & q3)
            t10 += popcount(q1 & q3)
            t11 += popcount(u01 & q3)
            t12 += popcount(u23)
            t13 += popcount(u02 & q3)
            t14 += popcount(u12 & q3)
            t15 += popcount(u01 & u23)
    tot[1] += t1
    tot[2] += t2
    tot[3] += t3
    tot[4] += t4
    tot[5] += t5
    tot[6] += t6
    tot[7] += t7
    tot[8] += t8
    tot[9] += t9
    tot[10] += t10
    tot[11] += t11
    tot[12] += t12
    tot[13] += t13
    tot[14] += t14
    tot[15] += t15
    return bad != 0


@njit(nogil=True, cache=True)
def count_small(g1, p1, k, kcap, acc):
    """Count a C-contiguous 1-D chunk of 1-byte labels ``0..k-1`` (``k <= 4``) into the dense
    table ``acc`` (``kcap`` columns), without a branch per voxel; no mask, no ignore label.
    Returns False, having added nothing, when a value is ``>= k`` (the caller then counts the
    chunk with :func:`count_direct_flat`, which reports the first such voxel).

    Each voxel's pair is the 4-bit code ``c = p + 4 g``, whose bits are the planes pred bit 0,
    pred bit 1, gt bit 0, gt bit 1. For 64 voxels at a time, each plane becomes one 64-bit mask
    (:func:`~fastseg_eval.kernels.simd.lane_mask64`: one vector test per plane). Counting, for
    each subset S of the planes, the voxels where all planes of S are set (``T_S``: popcount of
    the AND of their masks) gives every pair count by inclusion-exclusion:
    ``N_c = sum over S containing bits(c) of (-1)^|S - bits(c)| T_S``. Exact for any data, and
    the same work for uniform and mixed blocks. (Summing the planes in byte lanes of 64-bit
    words instead, as before, took about 40 vector operations per 64 voxels and stalled on
    memory: 2.7 Gvoxel/s on one core from RAM, against 9.4 now.)
    """
    tot = np.zeros(16, dtype=np.int64)
    n = g1.shape[0]
    nb = n // 64
    if k <= 2:
        bad = _mask_sums2(g1, p1, nb, np.uint64(0x100 - k), tot)
    else:
        bad = _mask_sums4(g1, p1, nb, k == 3, tot)
    if bad:
        return False
    tot[0] += 64 * nb
    for kk in range(64 * nb, n):  # the last voxels, short of a block
        g = np.int64(g1[kk])
        p = np.int64(p1[kk])
        if g >= k or p >= k:
            return False
        c = p + 4 * g
        for s in range(16):
            if s & c == s:
                tot[s] += 1
    for g in range(k):
        for p in range(k):
            c = p + 4 * g
            cnt = np.int64(0)
            for s in range(16):
                if s & c == c:
                    bits = s ^ c
                    odd = ((bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1) + ((bits >> 3) & 1)) & 1
                    cnt += -tot[s] if odd else tot[s]
            acc[g * kcap + p] += cnt
    return True
