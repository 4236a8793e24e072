"""Contingency-table kernels: (gt id, pred id) -> int64 voxel counts in an open-addressing hash.

Instance segmentations pair two sets of arbitrary ids (uint64, sparse, up to 2**64 - 1): the
table they need is sparse, and its size follows the number of distinct (gt, pred) pairs, not
the volume or the largest id. :mod:`fastseg_eval.reducers.contingency` owns the table; the
kernels here fill it, grow nothing and allocate nothing: a kernel that would need a larger
table stops and returns :data:`GROW` with the position where it stopped, the caller grows the
table (:func:`rehash`) and calls again from there.

Table layout (``table``, uint64, 1-D)
-------------------------------------
``3 * cap`` words, ``cap`` a power of two: slot ``s`` holds ``table[3s]`` = gt id,
``table[3s + 1]`` = pred id, ``table[3s + 2]`` = voxel count. A count of 0 marks an empty slot
(an entry is only ever made for a count > 0). Linear probing; at most ``cap // 2`` entries
(:func:`max_entries`): the caller grows the table before a call when it is that full, and a
kernel stops as soon as an insertion makes it that full, so every insertion finds a free slot.

How counting is fast
--------------------
Counting a voxel by hashing its pair would cost a hash probe per voxel. :func:`count_pairs`
instead cuts each row into segments (maximal runs of one pair) and keeps them as records for
the next row: a row equal to the one before only bumps a counter; otherwise each record whose
voxels did not change carries on with no hashing and no table access, and only the voxels of
records that changed are cut again (their new pairs looked up first among the neighbouring
records, then in the hash). A record's count reaches the table once, when its segment ends.
Segmentations repeat from row to row, so most voxels cost a comparison with the row before.
Positions index arrays as unsigned integers: numba checks every signed index for wraparound,
which kept these loops from vectorising (measured 4x slower).
"""

from __future__ import annotations

import numpy as np

from fastseg_eval.kernels.jit import njit

# kernel status codes (the BAD_* values are those of kernels.cpu)
OK = 0
BAD_GT = 1  # a negative gt value (signed input)
BAD_PRED = 2  # the same for pred
GROW = 4  # the table is full: grow it and call again from state[POS]

# slots of the int64 ``state`` array
ENTRIES = 0  # occupied slots of the table
NIGNORED = 1  # voxels skipped because gt == ignore label
NMASKED = 2  # voxels skipped because mask == 0
POS = 3  # C-order position in the chunk where the kernel stopped (status != OK)
VALUE = 4  # offending value bits (status BAD_GT / BAD_PRED)
STATE_SIZE = 8

# count_pairs' scratch: one record per segment of a row, with these fields (int64 each)
START = 0  # first voxel of the segment in the row
CODE = 1  # the table slot of its pair, or MASKED / IGNORED
PENDING = 2  # voxels of the pair counted in the record and not yet added to the slot
GVAL = 3  # the pair's gt value (bits)
PVAL = 4  # the pair's pred value (bits)
SEG_FIELDS = 5
MASKED = -1
IGNORED = -2
NONE = -3

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xD6E8FEB86659FD93)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


def max_entries(cap: int) -> int:
    """Entries a table of ``cap`` slots may hold (load factor 1/2)."""
    return cap // 2


@njit(nogil=True, cache=True, inline="always")
def pair_slot(g, p, hmask):
    """Home slot of the pair (``g``, ``p``) (uint64 each) in a table of ``hmask + 1`` slots."""
    x = (g * _M1) ^ p
    x ^= x >> _S32
    x *= _M2
    x ^= x >> _S32
    return x & hmask


@njit(nogil=True, cache=True, inline="always")
def add_pair(table, hmask, g, p, w):
    """Add ``w`` (> 0) voxels to pair (``g``, ``p``); returns 1 when a new entry was made, else 0.

    The table must have a free slot.
    """
    s = pair_slot(g, p, hmask)
    while True:
        b = np.int64(s) * 3
        c = table[b + 2]
        if c == _ZERO:
            table[b] = g
            table[b + 1] = p
            table[b + 2] = w
            return 1
        if table[b] == g and table[b + 1] == p:
            table[b + 2] = c + w
            return 0
        s = (s + _ONE) & hmask


@njit(nogil=True, cache=True, inline="always")
def add_pair_slot(table, hmask, g, p, w):
    """:func:`add_pair` that returns ``(slot, 1 if the entry is new else 0)``."""
    s = pair_slot(g, p, hmask)
    while True:
        b = np.int64(s) * 3
        c = table[b + 2]
        if c == _ZERO:
            table[b] = g
            table[b + 1] = p
            table[b + 2] = w
            return np.int64(s), 1
        if table[b] == g and table[b + 1] == p:
            table[b + 2] = c + w
            return np.int64(s), 0
        s = (s + _ONE) & hmask


@njit(nogil=True, cache=True, inline="always")
def _u(k):
    """A position as an unsigned index (no wraparound check on access; see :func:`_span_equal`)."""
    return np.uint64(k)


@njit(nogil=True, cache=True, inline="always")
def _rows_equal(a, b, n):
    """Whether rows ``a`` and ``b`` agree on their first ``n`` values.

    Blocks of 64 with a fixed trip count (vectorised; 5x faster than a bound of ``min(.., n)``).
    """
    k0 = 0
    while k0 + 64 <= n:
        d = _ZERO
        for k in range(64):
            d |= a[k0 + k] ^ b[k0 + k]
        if d != _ZERO:
            return False
        k0 += 64
    d = _ZERO
    for k in range(k0, n):
        d |= a[k] ^ b[k]
    return d == _ZERO


@njit(nogil=True, cache=True, inline="always")
def _span_equal(a, b, s, e):
    """Whether ``a[s:e]`` equals ``b[s:e]``.

    Positions are cast to unsigned: numba checks a signed index for wraparound on every access,
    which keeps loops from vectorising (measured 4x slower here). Hence ``_u`` below too.
    """
    d = _ZERO
    for k in range(np.uint64(s), np.uint64(e)):
        d |= a[k] ^ b[k]
    return d == _ZERO


@njit(nogil=True, cache=True, inline="always")
def _flush(segs, b, lo, hi, table):
    """Add the pending counts of records ``segs[b, lo:hi]`` to their table slots."""
    for r in range(lo, hi):
        code = segs[b, r, CODE]
        if code >= 0 and segs[b, r, PENDING] != 0:
            table[3 * code + 2] += np.uint64(segs[b, r, PENDING])
            segs[b, r, PENDING] = 0


@njit(nogil=True, cache=True, inline="always")
def _record(segs, b, n, start, code, pending, g, p):
    """Append a segment record to row buffer ``b`` holding ``n`` records (merged into the last
    one when it has the same code); returns the new record count."""
    if n > 0 and segs[b, n - 1, CODE] == code:
        segs[b, n - 1, PENDING] += pending
        return n
    segs[b, n, START] = start
    segs[b, n, CODE] = code
    segs[b, n, PENDING] = pending
    segs[b, n, GVAL] = np.int64(g)
    segs[b, n, PVAL] = np.int64(p)
    return n + 1


@njit(nogil=True, cache=True, inline="always")
def _repeat(segs, b, n, times, nmasked, nignored):
    """Count ``times`` more rows equal to the row of records ``segs[b, :n]``; returns the masked
    and ignored counts."""
    for q in range(n):
        w = (segs[b, q + 1, START] - segs[b, q, START]) * times
        code = segs[b, q, CODE]
        if code >= 0:
            segs[b, q, PENDING] += w
        elif code == MASKED:
            nmasked += w
        else:
            nignored += w
    return nmasked, nignored


@njit(nogil=True, cache=True)
def count_pairs(gt, pred, mask, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, table, state, start, segs):  # fmt: skip
    """Add the (gt, pred) pairs of a 3-D chunk into ``table``, starting at C-order position ``start``.

    ``gt`` / ``pred`` are unsigned views (any widths); ``gt_signed_from`` / ``pred_signed_from``
    are the unsigned values from which a signed input is negative (0: unsigned input). Voxels
    where ``mask`` is 0 (if ``has_mask``) or gt equals ``ignore`` (if ``has_ignore``) are skipped
    and counted in ``state[NMASKED]`` / ``state[NIGNORED]``. ``segs`` is scratch: int64 of shape
    ``(2, n2 + 1, SEG_FIELDS)``, ``n2`` the length of a row.

    Each row is cut into *segments*, maximal runs of one (gt, pred) pair (or of masked, or of
    ignored voxels), and each segment is kept as a record (start, table slot, gt and pred
    values, and a count not yet added to the table). The next row is compared with this one:

    * a row equal to the row before repeats its records (a counter, no other work);
    * otherwise each record is checked in place: where the voxels still equal those of the row
      before, the record carries on and its count grows (no hashing, no table access);
    * only the voxels of the records that changed are cut again; a new segment whose pair is
      that of a neighbouring record takes that record's slot, any other is hashed.

    A record's count reaches the table when its segment ends, so a segment that spans many rows
    touches the table once. Rows of a segmentation mostly repeat the row before, so most voxels
    cost a comparison with it.

    Returns ``OK``; ``GROW`` when the table reached :func:`max_entries` (every voxel before
    ``state[POS]`` is counted and in the table; grow and call again with ``start = state[POS]``);
    ``BAD_GT`` / ``BAD_PRED`` for a negative value (``state[POS]``, ``state[VALUE]`` set). The
    caller makes sure that the table is below :func:`max_entries` before each call.
    """
    n0, n1, n2 = gt.shape
    cap = table.shape[0] // 3
    hmask = np.uint64(cap - 1)
    limit = cap // 2
    entries = state[ENTRIES]
    nignored = 0
    nmasked = 0
    status = OK
    stop_at = 0
    plane = n1 * n2
    if plane == 0:
        return OK
    i0 = start // plane
    j0 = (start % plane) // n2
    kstart = start % n2
    prev = 0
    prev_n = 0  # records of the previous row (0: none, e.g. after a resume)
    cur = 1
    cur_n = 0
    r = 0  # first record of the previous row not yet carried on or flushed
    g_prev = gt[0, 0]  # the previous row
    p_prev = pred[0, 0]
    m_prev = mask[0, 0]
    repeats = 0  # rows equal to the previous row that its records do not count yet
    for i in range(i0, n0):
        for j in range(j0 if i == i0 else 0, n1):
            g_row = gt[i, j]
            p_row = pred[i, j]
            m_row = mask[i, j] if has_mask else mask[0, 0]
            row_pos = (i * n1 + j) * n2
            kk = kstart if (i == i0 and j == j0) else 0
            whole_row = kk == 0
            if prev_n > 0:
                same = _rows_equal(g_row, g_prev, n2) and _rows_equal(p_row, p_prev, n2)
                if same and has_mask:
                    same = _rows_equal(m_row, m_prev, n2)
                if same:
                    repeats += 1
                    g_prev = g_row
                    p_prev = p_row
                    m_prev = m_row
                    continue
                if repeats:
                    nmasked, nignored = _repeat(segs, prev, prev_n, repeats, nmasked, nignored)
                    repeats = 0
            cur = 1 - prev
            cur_n = 0
            r = 0
            span_end = n2 if prev_n == 0 else 0
            while True:
                # cut voxels kk:span_end into segments (the voxels of record r - 1 of the row before)
                while kk < span_end:
                    pend = 0
                    g = _ZERO
                    p = _ZERO
                    if has_mask and m_row[_u(kk)] == 0:
                        t = kk + 1
                        while t < span_end and m_row[_u(t)] == 0:
                            t += 1
                        code = MASKED
                        nmasked += t - kk
                    else:
                        g = np.uint64(g_row[_u(kk)])
                        if has_ignore and g == ignore:
                            t = kk + 1
                            while t < span_end and np.uint64(g_row[_u(t)]) == ignore and (not has_mask or m_row[_u(t)] != 0):
                                t += 1
                            code = IGNORED
                            nignored += t - kk
                        else:
                            p = np.uint64(p_row[_u(kk)])
                            if gt_signed_from != _ZERO and g >= gt_signed_from:
                                status = BAD_GT
                                state[VALUE] = np.int64(g)
                                stop_at = row_pos + kk
                                break
                            if pred_signed_from != _ZERO and p >= pred_signed_from:
                                status = BAD_PRED
                                state[VALUE] = np.int64(p)
                                stop_at = row_pos + kk
                                break
                            t = kk + 1
                            while (
                                t < span_end
                                and np.uint64(g_row[_u(t)]) == g
                                and np.uint64(p_row[_u(t)]) == p
                                and (not has_mask or m_row[_u(t)] != 0)
                            ):
                                t += 1
                            pend = t - kk
                            code = NONE
                            for q in range(max(r - 2, 0), min(r + 1, prev_n)):  # records around
                                c = segs[prev, q, CODE]
                                if c >= 0 and np.uint64(segs[prev, q, GVAL]) == g and np.uint64(segs[prev, q, PVAL]) == p:
                                    code = c
                                    break
                            if code == NONE:
                                code, new = add_pair_slot(table, hmask, g, p, np.uint64(pend))
                                pend = 0  # the voxels went into the table
                                entries += new
                    cur_n = _record(segs, cur, cur_n, kk, code, pend, g, p)
                    kk = t
                    if entries >= limit:
                        status = GROW
                        stop_at = row_pos + kk
                        break
                if status != OK or r >= prev_n:
                    break
                # records of the row before whose voxels did not change carry on
                while r < prev_n:
                    s = segs[prev, r, START]
                    e = segs[prev, r + 1, START]
                    code = segs[prev, r, CODE]
                    r += 1
                    holds = _span_equal(g_row, g_prev, s, e)
                    if holds and code >= 0:
                        holds = _span_equal(p_row, p_prev, s, e)
                    if holds and has_mask:
                        holds = _span_equal(m_row, m_prev, s, e)
                    if not holds:
                        _flush(segs, prev, r - 1, r, table)
                        kk = s
                        span_end = e
                        break
                    if code == MASKED:
                        nmasked += e - s
                    elif code == IGNORED:
                        nignored += e - s
                    cur_n = _record(
                        segs, cur, cur_n, s, code, segs[prev, r - 1, PENDING] + (e - s),
                        np.uint64(segs[prev, r - 1, GVAL]), np.uint64(segs[prev, r - 1, PVAL]),
                    )  # fmt: skip
                    kk = e
                    span_end = e
            if status != OK:
                break
            segs[cur, cur_n, START] = n2
            prev = cur
            prev_n = cur_n
            if not whole_row:  # a row resumed half-way has no records before kstart
                _flush(segs, prev, 0, prev_n, table)
                prev_n = 0
            g_prev = g_row
            p_prev = p_row
            m_prev = m_row
        if status != OK:
            break
    if status == OK:
        if repeats:
            nmasked, nignored = _repeat(segs, prev, prev_n, repeats, nmasked, nignored)
        _flush(segs, prev, 0, prev_n, table)
    else:  # stopped in a row: its records so far, and the records of the row before not reached
        _flush(segs, cur, 0, cur_n, table)
        _flush(segs, prev, r, prev_n, table)
    state[ENTRIES] = entries
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    if status != OK:
        state[POS] = stop_at
    return status


@njit(nogil=True, cache=True)
def insert_entries(table, state, gs, ps, counts):
    """Add pairs ``gs[i], ps[i]`` with ``counts[i]`` voxels (uint64 each; zero counts skipped).

    The table must have room for ``len(gs)`` new entries below :func:`max_entries`.
    """
    hmask = np.uint64(table.shape[0] // 3 - 1)
    entries = state[ENTRIES]
    for i in range(gs.shape[0]):
        c = counts[i]
        if c != _ZERO:
            entries += add_pair(table, hmask, gs[i], ps[i], c)
    state[ENTRIES] = entries


@njit(nogil=True, cache=True)
def rehash(old, new):
    """Move every entry of table ``old`` into the empty table ``new`` (a power-of-two size)."""
    hmask = np.uint64(new.shape[0] // 3 - 1)
    for s in range(old.shape[0] // 3):
        c = old[3 * s + 2]
        if c != _ZERO:
            add_pair(new, hmask, old[3 * s], old[3 * s + 1], c)


@njit(nogil=True, cache=True)
def entries_of(table, gs, ps, counts):
    """Copy the table's entries (in slot order) into ``gs``, ``ps``, ``counts``; returns how many."""
    n = 0
    for s in range(table.shape[0] // 3):
        c = table[3 * s + 2]
        if c != _ZERO:
            gs[n] = table[3 * s]
            ps[n] = table[3 * s + 1]
            counts[n] = np.int64(c)
            n += 1
    return n


@njit(nogil=True, cache=True)
def greedy_match(order, gi, pj, matched_g, matched_p, out):
    """One-to-one matching of candidate pairs taken in ``order`` (best first).

    ``gi[k]`` / ``pj[k]`` are the row / column index of candidate ``k``; a candidate is taken
    when neither its row nor its column is taken yet (``matched_g`` / ``matched_p``, bool,
    False on entry). ``out[k]`` is set True for the candidates taken; returns how many.
    """
    n = 0
    for t in range(order.shape[0]):
        k = order[t]
        a = gi[k]
        b = pj[k]
        if matched_g[a] or matched_p[b]:
            continue
        matched_g[a] = True
        matched_p[b] = True
        out[k] = True
        n += 1
    return n
