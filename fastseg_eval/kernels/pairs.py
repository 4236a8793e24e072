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
cuts each row into segments (maximal runs of one pair) with one vectorised pass that flags
where a voxel differs from the one before, packs the flags one bit per voxel, walks them a
64-bit word at a time (``tzcnt``) and makes one hash lookup per segment. A row of a segmentation has few segments,
so most voxels cost one comparison with their neighbour at memory speed. Faster than it looks:
keeping each segment's slot for the next row or plane, to reuse it without hashing, was
measured slower (writing and reading those records cost more than the lookups they saved:
the lookups of one row are independent, and a row's pairs are those of the row before, in
cache). Positions index arrays as unsigned integers: numba checks every signed index for
wraparound, which keeps loops from vectorising (measured 4x slower).

Where the CPU compresses vectors in one instruction (AVX-512 VBMI2), C-contiguous chunks
without a mask go through :func:`count_pairs_listed` instead: runs follow C order across rows,
the run starts of 16 Ki voxels at a time are listed by vector compares and a vector compress,
and the lookups then run in one loop over that list, with no branch between them that depends
on the data (512**3 uint64 ids on one core: 78-91 ms against 100-107 ms per half volume).

Finishing a table
-----------------
:func:`pair_order` sorts the entries by (gt id, pred id) with radix sorts (linear in the
entries; 2x or more faster than ``np.lexsort`` on 10**5 entries and more). Each worker sorts
its own table, in its own thread, when it finishes; sorted partials are then added with the
linear :func:`merge_sorted` (merging them through a hash table and sorting the union again cost
more than the counting of one worker's half on 512**3 ids).
"""

from __future__ import annotations

import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros  # numba's llvm.cttz (tzcnt)

from fastseg_eval.kernels.jit import njit
from fastseg_eval.kernels.simd import run_starts64

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

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xD6E8FEB86659FD93)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_TWO = np.uint64(2)
_THREE = np.uint64(3)
_ZERO = np.uint64(0)


def scratch_words(n2: int) -> int:
    """Scratch words :func:`count_pairs` needs for rows of ``n2`` voxels: byte flags, then bit flags."""
    return n2 // 8 + 2 + n2 // 64 + 1


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
        b = s * _THREE  # unsigned: no wraparound check on the accesses
        c = table[b + _TWO]
        if c == _ZERO:
            table[b] = g
            table[b + _ONE] = p
            table[b + _TWO] = w
            return 1
        if table[b] == g and table[b + _ONE] == p:
            table[b + _TWO] = c + w
            return 0
        s = (s + _ONE) & hmask


@njit(nogil=True, cache=True, inline="always")
def _u(k):
    """A position as an unsigned index: numba checks every signed index for wraparound, which
    keeps loops from vectorising (measured 4x slower here)."""
    return np.uint64(k)


@njit(nogil=True, cache=True, inline="always")
def _boundaries(g, p, m, has_mask, fb, n2):
    """Byte flags of a row: ``fb[k]`` = 1 where voxel ``k`` starts a new segment (it differs from
    voxel ``k - 1`` in gt, pred or, with a mask, mask), 0 at ``k = 0``, 1 at the sentinel ``n2``.

    Blocks of 64 with a fixed trip count, the last one overlapping the one before instead of a
    remainder loop: numba vectorises those (a remainder would run scalar, a third of the time).
    """
    fb[0] = 0
    last = n2 - 64
    if last < 1:
        for k in range(1, n2):
            fb[k] = (g[k] != g[k - 1]) | (p[k] != p[k - 1]) | (has_mask and ((m[k] != 0) != (m[k - 1] != 0)))
    elif has_mask:
        k0 = 1
        while True:
            for q in range(64):
                a = _u(k0 + q)
                b = _u(k0 + q - 1)
                fb[a] = (g[a] != g[b]) | (p[a] != p[b]) | ((m[a] != 0) != (m[b] != 0))
            if k0 == last:
                break
            k0 = min(k0 + 64, last)
    else:
        k0 = 1
        while True:
            for q in range(64):
                a = _u(k0 + q)
                b = _u(k0 + q - 1)
                fb[a] = (g[a] != g[b]) | (p[a] != p[b])
            if k0 == last:
                break
            k0 = min(k0 + 64, last)
    fb[n2] = 1


_PACK = np.uint64(0x0102040810204080)  # byte flags (0 or 1) times this: the 8 flags in the top byte


@njit(nogil=True, cache=True, inline="always")
def _pack_flags(words, nflag, bits, nbits):
    """Byte flags (``words``, 8 per word, each 0 or 1) packed into ``nbits`` words of bit flags:
    bit ``k`` of the row is flag byte ``k``. One multiply per 8 flags; the walk then takes 64
    voxels per word, and its word-advance branch is taken once per 64 voxels instead of once
    every few segments (measured: 512**3 uint64 ids on one worker, 244-258 ms against 268-281)."""
    for b in range(nbits):
        acc = _ZERO
        for q in range(8):
            k = 8 * b + q
            x = words[k] if k < nflag else _ZERO
            acc |= ((x * _PACK) >> np.uint64(56)) << np.uint64(8 * q)
        bits[b] = acc


@njit(nogil=True, cache=True)
def count_pairs(gt, pred, mask, has_mask, ignore, has_ignore, gt_signed_from, pred_signed_from, table, state, start, words):  # fmt: skip
    """Add the (gt, pred) pairs of a 3-D chunk into ``table``, starting at C-order position ``start``.

    ``gt`` / ``pred`` are unsigned views (one width); ``gt_signed_from`` / ``pred_signed_from``
    are the unsigned values from which a signed input is negative (0: unsigned input). Voxels
    where ``mask`` is 0 (if ``has_mask``) or gt equals ``ignore`` (if ``has_ignore``) are skipped
    and counted in ``state[NMASKED]`` / ``state[NIGNORED]``. ``words`` is scratch: uint64, at
    least :func:`scratch_words` of them, byte flags of a row and the same packed into bits.

    Each row is cut into *segments*, maximal runs of voxels with one gt, pred (and mask value),
    by one vectorised pass that flags where a voxel differs from the one before; then each
    segment adds its length to its pair's entry with one hash lookup (or to the masked or
    ignored count). A segment costs about as much as a voxel would, and a row of a segmentation
    has few of them. (Measured against keeping each voxel's table slot for the next row and
    plane to copy: writing and reading those maps cost more than the lookups they saved.)

    Returns ``OK``; ``GROW`` when the table reached :func:`max_entries` (every voxel before
    ``state[POS]`` is counted and in the table; grow it and call again with ``start =
    state[POS]``); ``BAD_GT`` / ``BAD_PRED`` for a negative value (``state[POS]``,
    ``state[VALUE]`` set; the first such voxel in C order). The caller makes sure that the
    table is below :func:`max_entries` before each call.
    """
    n0, n1, n2 = gt.shape
    if n1 == 0 or n2 == 0:
        return OK
    cap = table.shape[0] // 3
    hmask = np.uint64(cap - 1)
    limit = cap // 2
    entries = state[ENTRIES]
    nignored = 0
    nmasked = 0
    status = OK
    stop_at = 0
    nflag = n2 // 8 + 2  # flag words (bytes 0..n2, the sentinel at n2)
    fb = words[:nflag].view(np.uint8)
    bits = words[nflag:]  # the flags packed, one bit per voxel
    nbits = n2 // 64 + 1  # bit words holding flags 0..n2
    plane = n1 * n2
    i0 = start // plane
    j0 = (start % plane) // n2
    k0 = start % n2
    for i in range(i0, n0):
        for j in range(j0 if i == i0 else 0, n1):
            g = gt[i, j]
            p = pred[i, j]
            m = mask[i, j] if has_mask else mask[0, 0]
            _boundaries(g, p, m, has_mask, fb, n2)
            _pack_flags(words, nflag, bits, nbits)
            s = k0 if (i == i0 and j == j0) else 0
            w = s >> 6  # the bit word holding the next boundary after s, with lower flags cleared
            keep = (s & 63) + 1
            word = bits[w] & (~_ZERO << np.uint64(keep)) if keep < 64 else _ZERO
            while s < n2:
                while word == _ZERO:
                    w += 1
                    word = bits[w]
                e = 64 * w + np.int64(trailing_zeros(word))
                word &= word - _ONE
                n = e - s
                if has_mask and m[_u(s)] == 0:
                    nmasked += n
                else:
                    gv = np.uint64(g[_u(s)])
                    if has_ignore and gv == ignore:
                        nignored += n
                    else:
                        pv = np.uint64(p[_u(s)])
                        if gt_signed_from != _ZERO and gv >= gt_signed_from:
                            status = BAD_GT
                            state[VALUE] = np.int64(gv)
                        elif pred_signed_from != _ZERO and pv >= pred_signed_from:
                            status = BAD_PRED
                            state[VALUE] = np.int64(pv)
                        if status != OK:
                            stop_at = (i * n1 + j) * n2 + s
                            break
                        entries += add_pair(table, hmask, gv, pv, np.uint64(n))
                        if entries >= limit:
                            if e < n2 or j + 1 < n1 or i + 1 < n0:
                                status = GROW
                                stop_at = (i * n1 + j) * n2 + e
                            s = e
                            break
                s = e
            if status != OK:
                break
        if status != OK:
            break
    state[ENTRIES] = entries
    state[NIGNORED] += nignored
    state[NMASKED] += nmasked
    if status != OK:
        state[POS] = stop_at
    return status


LISTED = 256  # blocks of 64 voxels whose run starts one list holds (16 Ki voxels: 256 KiB of uint64 input)
LIST_SIZE = LISTED * 64 + 64  # uint16 slots of that list


@njit(nogil=True, cache=True)
def count_pairs_listed(g1, p1, ignore, has_ignore, gt_signed_from, pred_signed_from, table, state, start, starts):  # fmt: skip
    """:func:`count_pairs` for a C-contiguous chunk flattened to 1-D (``g1``, ``p1``: one width,
    any of 1, 2, 4, 8 bytes) without a mask: runs follow C order across rows, and the run starts
    of each stretch of :data:`LISTED` x 64 voxels are listed first
    (:func:`~fastseg_eval.kernels.simd.run_starts64`: vector compares and a vector compress), then
    each run makes its one hash lookup in one loop over the list, without the bit walk's
    mispredicted branches between lookups. ``starts``: uint16 scratch of at least
    :data:`LIST_SIZE` slots. Same results, statuses and ``state`` as :func:`count_pairs`, with
    positions in the flat chunk; chosen where the compress is one instruction
    (:func:`~fastseg_eval.kernels.simd.fast_compress`).
    """
    n = g1.shape[0]
    if start >= n:
        return OK
    cap = table.shape[0] // 3
    hmask = np.uint64(cap - 1)
    limit = cap // 2
    entries = state[ENTRIES]
    nignored = 0
    status = OK
    rs = _u(start)  # the open run's first voxel
    pos = start + 1  # the next voxel to compare with the one before it
    s0 = start  # the list holds offsets from s0
    k = 0
    while True:
        stop = min(n, pos + LISTED * 64)
        q = pos
        while q + 64 <= stop:
            k = run_starts64(g1, p1, q, q - s0, starts, k)
            q += 64
        for i in range(q, stop):  # the chunk's last voxels, past the last whole block
            if g1[i] != g1[i - 1] or p1[i] != p1[i - 1]:
                starts[k] = i - s0
                k += 1
        last = stop == n
        if last:  # close the open run at the end of the chunk
            starts[k] = n - s0
            k += 1
        s0u = _u(s0)
        for j in range(k):
            e = s0u + np.uint64(starts[j])
            gv = np.uint64(g1[rs])
            if has_ignore and gv == ignore:
                nignored += np.int64(e - rs)
            else:
                pv = np.uint64(p1[rs])
                if (gt_signed_from != _ZERO) & (gv >= gt_signed_from):
                    status = BAD_GT
                    state[VALUE] = np.int64(gv)
                elif (pred_signed_from != _ZERO) & (pv >= pred_signed_from):
                    status = BAD_PRED
                    state[VALUE] = np.int64(pv)
                if status != OK:
                    state[POS] = np.int64(rs)
                    break
                entries += add_pair(table, hmask, gv, pv, e - rs)
                if entries >= limit and e < _u(n):
                    status = GROW
                    state[POS] = np.int64(e)
                    break
            rs = e
        if status != OK or last:
            break
        pos = stop
        s0 = stop
        k = 0
    state[ENTRIES] = entries
    state[NIGNORED] += nignored
    return status


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


_RADIX_BITS = 11
_RADIX_MASK = np.uint64((1 << _RADIX_BITS) - 1)


@njit(nogil=True, cache=True)
def _radix_sort(key, idx):
    """Stable LSD radix sort of uint64 ``key`` carrying ``idx`` (both modified; returns the sorted
    pair, which may be the other buffers). Digits of 11 bits; a digit where every key agrees is
    skipped (small ids, or ids sharing high bits, cost fewer passes)."""
    n = key.shape[0]
    all_or = _ZERO
    all_and = ~_ZERO
    for i in range(n):
        all_or |= key[i]
        all_and &= key[i]
    varying = all_or ^ all_and
    tkey = np.empty_like(key)
    tidx = np.empty_like(idx)
    cnt = np.empty((1 << _RADIX_BITS) + 1, dtype=np.int64)
    for sh in range(0, 64, _RADIX_BITS):
        shift = np.uint64(sh)
        if (varying >> shift) & _RADIX_MASK == _ZERO:
            continue
        cnt[:] = 0
        for i in range(n):
            cnt[np.int64((key[i] >> shift) & _RADIX_MASK) + 1] += 1
        for b in range(1 << _RADIX_BITS):
            cnt[b + 1] += cnt[b]
        for i in range(n):
            d = np.int64((key[i] >> shift) & _RADIX_MASK)
            at = cnt[d]
            cnt[d] = at + 1
            tkey[at] = key[i]
            tidx[at] = idx[i]
        key, tkey = tkey, key
        idx, tidx = tidx, idx
    return key, idx


@njit(nogil=True, cache=True)
def pair_order(g, p):
    """The permutation that sorts pairs (``g[k]``, ``p[k]``) (uint64 each) by g, then p; stable.

    Radix sorts, linear in the number of pairs (numpy's lexsort is a comparison sort, 3x slower
    here on 3 * 10**5 pairs): one pass over 64-bit keys ``g << 32 | p`` when every id is below
    2**32, else by p and then, stably, by g.
    """
    n = g.shape[0]
    idx = np.arange(n)
    if n < 2:
        return idx
    big = _ZERO
    for i in range(n):
        big |= g[i] | p[i]
    if big >> np.uint64(32) == _ZERO:
        key = np.empty(n, dtype=np.uint64)
        for i in range(n):
            key[i] = (g[i] << np.uint64(32)) | p[i]
        return _radix_sort(key, idx)[1]
    _, idx = _radix_sort(p.copy(), idx)
    key = np.empty(n, dtype=np.uint64)
    for i in range(n):
        key[i] = g[idx[i]]
    return _radix_sort(key, idx)[1]


@njit(nogil=True, cache=True)
def merge_sorted(g1, p1, c1, g2, p2, c2, go, po, co):
    """Merge two tables sorted by (gt id, pred id) with unique pairs into ``go``, ``po``, ``co``
    (room for ``len(c1) + len(c2)`` entries), adding the counts of pairs in both; returns the
    entries written. Linear: finishing a run merges the workers' sorted partials with this
    instead of sorting their concatenation again."""
    n1 = g1.shape[0]
    n2 = g2.shape[0]
    i = 0
    j = 0
    n = 0
    while i < n1 and j < n2:
        a = g1[i]
        b = g2[j]
        if a < b or (a == b and p1[i] < p2[j]):
            go[n] = a
            po[n] = p1[i]
            co[n] = c1[i]
            i += 1
        elif a == b and p1[i] == p2[j]:
            go[n] = a
            po[n] = p1[i]
            co[n] = c1[i] + c2[j]
            i += 1
            j += 1
        else:
            go[n] = b
            po[n] = p2[j]
            co[n] = c2[j]
            j += 1
        n += 1
    for gs, ps, cs, k in ((g1, p1, c1, i), (g2, p2, c2, j)):  # what is left of one of them
        rest = gs.shape[0] - k
        go[n : n + rest] = gs[k:]
        po[n : n + rest] = ps[k:]
        co[n : n + rest] = cs[k:]
        n += rest
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
