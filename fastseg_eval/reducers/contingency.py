"""The contingency reducer: a sparse (gt id, pred id) -> int64 count table, in the same pass as the rest.

Instance segmentations pair two sets of arbitrary integer ids (any integer dtype, uint64 ids up
to 2**64 - 1 included). :class:`ContingencyCounts` is a reducer (see
:mod:`fastseg_eval.reducers.base`): each worker fills an open-addressing hash table of its own
with the numba kernel of :mod:`fastseg_eval.kernels.pairs` (past :data:`_SPILL_CAP` slots a full
table is sorted into runs and reused, not grown), and partials merge exactly, as sorted runs by
linear merges. Memory follows the number of distinct (gt, pred) pairs, not the volume size nor
the largest id.
:meth:`ContingencyCounts.table` gives the finished table, a :class:`ContingencyTable`: sorted
COO arrays (``gt_ids``, ``pred_ids``, ``counts``), picklable and mergeable.

Rows are ground truth, columns prediction, as everywhere in fastseg-eval. The ignore label
skips ground-truth voxels; the mask skips voxels where it is 0; neither reaches the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fastseg_eval.errors import FastSegError, InputError, LabelError
from fastseg_eval.kernels import pairs
from fastseg_eval.kernels.simd import fast_compress
from fastseg_eval.labels.space import check_ignore, ignore_bits, label_message, label_view, value_of
from fastseg_eval.reducers.base import Block
from fastseg_eval.reducers.confusion import as_3d

_INITIAL_CAP = 1 << 10
_SPILL_CAP = 1 << 17
"""Slots past which a full hash table is not grown but spilled: its entries are sorted and merged
into the reducer's sorted runs (24 bytes an entry, against 48 to 96 in a table at most half
full), and the table is cleared and used again. Memory then follows the distinct pairs at the
runs' 24 bytes each, the table stays a fixed 3 MiB that caches keep, and every pair still adds
exactly: merges sum equal pairs. Measured on 1024**3 uint64 ids (752k pairs), 2 workers: peak
RSS 331 MiB against 368 MiB growing the table; no slower on 512**3."""
_NO_MASK = np.ones((1, 1, 1), dtype=np.uint8)
LISTED_RUNS = fast_compress()
"""Count C-contiguous chunks without a mask through a list of run starts
(:func:`~fastseg_eval.kernels.pairs.count_pairs_listed`) where the CPU compresses vectors in one
instruction; else row by row (:func:`~fastseg_eval.kernels.pairs.count_pairs`)."""
_TOP_BIT = np.uint64(1 << 63)


class ContingencyTable:
    """A finished contingency table: ``counts[k]`` voxels have gt id ``gt_ids[k]`` and pred id
    ``pred_ids[k]``; entries sorted by (gt id, pred id), every count > 0.

    Ids are int64, or uint64 when some id is 2**63 or more (both arrays share one dtype).
    Voxels skipped by the ignore label or the mask are not in the table (``n_ignored``,
    ``n_masked``). Picklable; ``a.merge(b)`` (or ``a + b``) adds tables exactly.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> ct = fse.contingency(np.array([5, 5, 7, 0]), np.array([1, 1, 1, 0]))   # pred, gt
    >>> ct.gt_ids.tolist(), ct.pred_ids.tolist(), ct.counts.tolist()
    ([0, 1, 1], [0, 5, 7], [1, 2, 1])
    """

    def __init__(
        self,
        gt_ids: Any = (),
        pred_ids: Any = (),
        counts: Any = (),
        *,
        n_ignored: int = 0,
        n_masked: int = 0,
        ignore_label: int | None = None,
        canonical: bool = False,
    ) -> None:
        g = np.asarray(gt_ids)
        p = np.asarray(pred_ids)
        c = np.asarray(counts, dtype=np.int64)
        if not (g.ndim == p.ndim == c.ndim == 1 and len(g) == len(p) == len(c)):
            raise InputError("gt_ids, pred_ids and counts must be 1-D arrays of one length")
        if not canonical:
            g, p, c = _canonical(_as_u64(g, "gt_ids"), _as_u64(p, "pred_ids"), c)
        self._g = g  # uint64, sorted by (g, p), unique pairs, counts > 0
        self._p = p
        self._c = c
        self.n_ignored = int(n_ignored)
        self.n_masked = int(n_masked)
        self.ignore_label = ignore_label

    # ---------------------------------------------------------------- the COO arrays
    def _ids(self, a: np.ndarray) -> np.ndarray:
        wide = len(self._g) and (self._g[-1] >= _TOP_BIT or (len(self._p) and self._p.max() >= _TOP_BIT))
        return a.copy() if wide else a.astype(np.int64)

    @property
    def gt_ids(self) -> np.ndarray:
        """Ground-truth id of each entry (sorted; int64, or uint64 when an id is >= 2**63)."""
        return self._ids(self._g)

    @property
    def pred_ids(self) -> np.ndarray:
        """Predicted id of each entry (sorted within each gt id)."""
        return self._ids(self._p)

    @property
    def counts(self) -> np.ndarray:
        """Voxels of each (gt id, pred id) entry (int64, all > 0)."""
        return self._c.copy()

    def __len__(self) -> int:
        return len(self._c)

    @property
    def n_voxels(self) -> int:
        """Voxels counted (the sum of the counts)."""
        return int(self._c.sum())

    @property
    def gt_labels(self) -> np.ndarray:
        """The distinct ground-truth ids, sorted (the rows of :meth:`to_scipy`)."""
        return self._ids(np.unique(self._g))

    @property
    def pred_labels(self) -> np.ndarray:
        """The distinct predicted ids, sorted (the columns of :meth:`to_scipy`)."""
        return self._ids(np.unique(self._p))

    def raw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gt ids as uint64, pred ids as uint64, counts)``, no copies (do not modify)."""
        return self._g, self._p, self._c

    def to_scipy(self) -> Any:
        """The table as a ``scipy.sparse.csr_matrix`` (int64), rows :attr:`gt_labels`, columns
        :attr:`pred_labels` (positions, not raw ids: ids may be as large as 2**64 - 1)."""
        try:
            from scipy import sparse
        except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn / scikit-image
            raise FastSegError("to_scipy() needs scipy: pip install scipy") from e
        rows = np.searchsorted(np.unique(self._g), self._g)
        gl, cols = np.unique(self._p, return_inverse=True)
        shape = (len(np.unique(self._g)), len(gl))
        return sparse.csr_matrix((self._c, (rows, cols.reshape(-1))), shape=shape, dtype=np.int64)

    # ---------------------------------------------------------------- combining
    def merge(self, other: ContingencyTable) -> ContingencyTable:
        """Add the entries (and skipped-voxel counts) of ``other`` into this table; returns ``self``."""
        if not isinstance(other, ContingencyTable):
            raise TypeError(f"cannot merge a {type(other).__name__} into a ContingencyTable")
        _same_ignore(self.ignore_label, other.ignore_label)
        self._g, self._p, self._c = _merge_runs((self._g, self._p, self._c), other.raw())
        self.n_ignored += other.n_ignored
        self.n_masked += other.n_masked
        return self

    def __add__(self, other: ContingencyTable) -> ContingencyTable:
        return self.copy().merge(other)

    def copy(self) -> ContingencyTable:
        return ContingencyTable(
            self._g.copy(), self._p.copy(), self._c.copy(), n_ignored=self.n_ignored, n_masked=self.n_masked,
            ignore_label=self.ignore_label, canonical=True,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContingencyTable):
            return NotImplemented
        return (
            np.array_equal(self._g, other._g)
            and np.array_equal(self._p, other._p)
            and np.array_equal(self._c, other._c)
            and (self.n_ignored, self.n_masked) == (other.n_ignored, other.n_masked)
        )

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        return {
            "gt_ids": self._g, "pred_ids": self._p, "counts": self._c, "n_ignored": self.n_ignored,
            "n_masked": self.n_masked, "ignore_label": self.ignore_label,
        }  # fmt: skip

    def __setstate__(self, st: dict[str, Any]) -> None:
        self._g, self._p, self._c = st["gt_ids"], st["pred_ids"], st["counts"]
        self.n_ignored, self.n_masked, self.ignore_label = st["n_ignored"], st["n_masked"], st["ignore_label"]

    def __repr__(self) -> str:
        return (
            f"ContingencyTable({len(self)} entries, {len(np.unique(self._g))} gt ids, "
            f"{len(np.unique(self._p))} pred ids, n_voxels={self.n_voxels})"
        )


class ContingencyCounts:
    """The contingency reducer: per-worker hash tables of (gt id, pred id) -> int64 counts.

    ``spawn`` / ``add(block)`` / ``finish`` / ``merge`` as in :mod:`fastseg_eval.reducers.base`
    (halo 0); picklable (it pickles as its entries, not as its hash table). :meth:`table` gives
    the sorted :class:`ContingencyTable`.

    Parameters
    ----------
    ignore_label : int, optional
        Ground-truth voxels with this value are skipped (counted in ``n_ignored``).
    """

    halo = 0
    """Counting needs no context around a block."""

    def __init__(self, ignore_label: int | None = None) -> None:
        self.ignore_label = check_ignore(ignore_label)
        self._cap = _INITIAL_CAP
        self._table = np.zeros(3 * self._cap, dtype=np.uint64)
        self._state = np.zeros(pairs.STATE_SIZE, dtype=np.int64)
        self._flags: np.ndarray | None = None  # the kernel's scratch (row flags)
        self._run_list: np.ndarray | None = None  # the listed kernel's scratch (run starts)
        # sorted entries merged in or spilled, as runs each at least twice the size of the next
        # (merged when not, so that spilling many times costs n log n, not n**2)
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._poisoned: str | None = None

    # ---------------------------------------------------------------- the reducer protocol
    def spawn(self) -> ContingencyCounts:
        """An empty reducer with the same options (for another worker)."""
        return type(self)(self.ignore_label)

    def add(self, block: Block) -> None:
        """Count the core voxels of one block (rows = gt)."""
        core = block.core
        mask = None if block.mask is None else block.mask[core]
        self.add_chunk(block.gt[core], block.pred[core], mask, offset=block.origin)

    def finish(self) -> ContingencyTable:
        """The worker's partial: its sorted table. The threads engine calls this in the worker's
        own thread, so the workers sort their tables at the same time; partials then merge
        linearly (:meth:`merge`).

        The counts move from the hash table into a sorted run, and the hash table, the largest
        piece (at least twice the entries' size), is let go before sorting: both workers sort
        at once, and their peaks add up. The reducer stays usable (later counts go to a new
        hash table)."""
        self._check_usable()
        self._add_run(_canonical(*self._take_entries(), unique=True))
        return self.table()

    def _take_entries(self, keep: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The hash table's entries (as :meth:`_entries`), leaving an empty table behind: the
        same one cleared (``keep``), else a new small one."""
        entries = self._entries()
        if keep:
            self._table[:] = 0
        else:
            self._cap = _INITIAL_CAP
            self._table = np.zeros(3 * self._cap, dtype=np.uint64)
        self._state[pairs.ENTRIES] = 0
        return entries

    def _spill(self) -> None:
        """Move the full hash table's entries into the sorted run; the table is cleared for reuse."""
        self._add_run(_canonical(*self._take_entries(keep=True), unique=True))

    def _add_run(self, run: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Keep a sorted run of unique pairs; merge the last runs while one is not at least twice
        the size of the next (a binary counter: each entry is merged O(log n) times)."""
        if len(run[2]) == 0:
            return
        self._runs.append(run)
        self._collapse(every=False)

    def _collapse(self, every: bool) -> None:
        """Merge the last two runs while ``every`` (until one is left) or while the one before the
        last is not at least twice the size of the last."""
        runs = self._runs
        while len(runs) > 1 and (every or len(runs[-2][2]) <= 2 * len(runs[-1][2])):
            last = runs.pop()
            runs[-1] = _merge_runs(runs[-1], last)

    def _one_run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """All runs merged into one (kept so), or None when there is none."""
        self._collapse(every=True)
        return self._runs[0] if self._runs else None

    def merge(self, other: ContingencyCounts | ContingencyTable) -> ContingencyCounts:
        """Add the counts of ``other`` (a :class:`ContingencyTable`, or a reducer) exactly; returns ``self``.

        A table is kept as a sorted run beside the hash table; runs are added by linear merges
        (:meth:`_add_run`); nothing is hashed again. The run's arrays may be
        those of ``other`` (never written in place, by either side).
        """
        self._check_usable()
        if isinstance(other, ContingencyCounts):
            other = other.table()
        elif not isinstance(other, ContingencyTable):
            raise TypeError(f"cannot merge a {type(other).__name__} into ContingencyCounts")
        _same_ignore(self.ignore_label, other.ignore_label)
        self._add_run(other.raw())
        self._state[pairs.NIGNORED] += other.n_ignored
        self._state[pairs.NMASKED] += other.n_masked
        return self

    # ---------------------------------------------------------------- counting
    def add_chunk(
        self,
        gt: np.ndarray,
        pred: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        offset: tuple[int, ...] | None = None,
    ) -> None:
        """Count one in-memory chunk (ground truth first). Not thread-safe: one per worker.

        ``offset`` is the chunk's position in the full volume, used in error messages.
        """
        self._check_usable()
        if gt.shape != pred.shape:
            raise InputError(f"gt chunk shape {gt.shape} differs from pred chunk shape {pred.shape}")
        if mask is not None and mask.shape != gt.shape:
            raise InputError(f"mask chunk shape {mask.shape} differs from gt chunk shape {gt.shape}")
        if gt.size == 0:
            return
        gv, g_signed = label_view(gt, "gt")
        pv, p_signed = label_view(pred, "pred")
        if gv.dtype != pv.dtype:  # one kernel per width, not per pair of widths: widen the narrower chunk
            wide = max(gv.dtype, pv.dtype, key=lambda d: d.itemsize)
            gv, pv = gv.astype(wide, copy=False), pv.astype(wide, copy=False)
        mv = None if mask is None else _mask_view(mask)
        ignore, has_ignore = ignore_bits(self.ignore_label, gt.dtype)
        if LISTED_RUNS and mv is None and gv.ndim <= 3 and gv.flags.c_contiguous and pv.flags.c_contiguous:
            g1, p1 = gv.reshape(-1), pv.reshape(-1)  # runs follow C order across rows
            starts = self._starts()
            status = self._counting(
                lambda start: pairs.count_pairs_listed(
                    g1, p1, np.uint64(ignore), has_ignore, np.uint64(g_signed), np.uint64(p_signed), self._table,
                    self._state, start, starts,
                )  # fmt: skip
            )
            if status != pairs.OK:
                self._raise_bad(status, (), gv.reshape((1,) * (3 - gv.ndim) + gv.shape), gv.ndim, offset, gt, pred)
            return
        m_pieces = [((), _NO_MASK)] * len(as_3d(gv)) if mv is None else as_3d(mv)
        for (lead, g3), (_, p3), (_, m3) in zip(as_3d(gv), as_3d(pv), m_pieces):
            words = self._words(g3.shape[2])
            status = self._counting(
                lambda start, g3=g3, p3=p3, m3=m3, words=words: pairs.count_pairs(
                    g3, p3, m3, mv is not None, np.uint64(ignore), has_ignore, np.uint64(g_signed),
                    np.uint64(p_signed), self._table, self._state, start, words,
                )  # fmt: skip
            )
            if status != pairs.OK:
                self._raise_bad(status, lead, g3, gv.ndim, offset, gt, pred)

    def _counting(self, count: Callable[[int], int]) -> int:
        """Run a kernel (``count(start)``) over a chunk, growing (or spilling) the table and
        resuming at ``state[POS]`` whenever it stops for room; its final status."""
        start = 0
        while True:
            if self._state[pairs.ENTRIES] >= pairs.max_entries(self._cap):
                if self._cap >= _SPILL_CAP:
                    self._spill()
                else:
                    self._grow()
            status = count(start)
            if status != pairs.GROW:
                return status
            start = int(self._state[pairs.POS])

    def _raise_bad(self, status, lead, g3, ndim, offset, gt, pred) -> None:
        role = "gt" if status == pairs.BAD_GT else "pred"
        value = value_of(int(self._state[pairs.VALUE]), (gt if role == "gt" else pred).dtype)
        pos3 = np.unravel_index(int(self._state[pairs.POS]), g3.shape)
        inner = pos3[3 - ndim :] if ndim < 3 else pos3
        pos = tuple(int(x) for x in tuple(lead) + tuple(inner))
        if offset is not None:
            pos = tuple(int(a) + int(b) for a, b in zip(offset, pos))
        msg = label_message(role, value, pos, None, None)
        self._poisoned = msg
        raise LabelError(msg, role=role, value=value, position=pos)

    def _check_usable(self) -> None:
        if self._poisoned:
            raise FastSegError(
                f"this ContingencyCounts holds partial counts of an update that failed ({self._poisoned}); "
                "create a new one"
            )

    def _starts(self) -> np.ndarray:
        """The listed kernel's scratch (:data:`~fastseg_eval.kernels.pairs.LIST_SIZE` run starts)."""
        if self._run_list is None:
            self._run_list = np.empty(pairs.LIST_SIZE, dtype=np.uint16)
        return self._run_list

    def _words(self, n2: int) -> np.ndarray:
        """The kernel's scratch for rows of ``n2`` voxels (:func:`~fastseg_eval.kernels.pairs.scratch_words`)."""
        need = pairs.scratch_words(n2)
        if self._flags is None or len(self._flags) < need:
            self._flags = np.zeros(need, dtype=np.uint64)
        return self._flags

    def _grow(self, need: int = 0) -> None:
        """Double the table (or more, for ``need`` entries in all)."""
        cap = self._cap * 2
        while pairs.max_entries(cap) <= max(need, int(self._state[pairs.ENTRIES])):
            cap *= 2
        new = np.zeros(3 * cap, dtype=np.uint64)
        pairs.rehash(self._table, new)
        self._table, self._cap = new, cap

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gt uint64, pred uint64, counts int64) of the occupied slots, in slot order."""
        n = int(self._state[pairs.ENTRIES])
        g = np.empty(n, dtype=np.uint64)
        p = np.empty(n, dtype=np.uint64)
        c = np.empty(n, dtype=np.int64)
        got = pairs.entries_of(self._table, g, p, c)
        assert got == n, (got, n)
        return g, p, c

    # ---------------------------------------------------------------- results
    @property
    def n_ignored(self) -> int:
        """Ground-truth voxels skipped because they carry the ignore label."""
        return int(self._state[pairs.NIGNORED])

    @property
    def n_masked(self) -> int:
        """Voxels skipped because the mask is zero there."""
        return int(self._state[pairs.NMASKED])

    @property
    def n_entries(self) -> int:
        """Distinct (gt, pred) pairs so far."""
        hashed = int(self._state[pairs.ENTRIES])
        if not self._runs:
            return hashed
        return len(self._runs[0][2]) if hashed == 0 and len(self._runs) == 1 else len(self.table())

    @property
    def nbytes(self) -> int:
        """Bytes held by the hash table and the merged run (what grows with the number of distinct pairs)."""
        return int(self._table.nbytes) + sum(int(a.nbytes) for run in self._runs for a in run)

    def table(self) -> ContingencyTable:
        """The finished table: sorted COO arrays (see :class:`ContingencyTable`)."""
        self._check_usable()
        g, p, c = _canonical(*self._entries(), unique=True)
        run = self._one_run()
        if run is not None:
            g, p, c = _merge_runs(run, (g, p, c))
        return ContingencyTable(
            g, p, c, n_ignored=self.n_ignored, n_masked=self.n_masked, ignore_label=self.ignore_label,
            canonical=True,
        )  # fmt: skip

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._poisoned:
            g, p, c = self._entries()  # what it holds, for the message; it cannot be used anyway
        else:
            g, p, c = self.table().raw()
        return {
            "ignore_label": self.ignore_label, "gt": g, "pred": p, "counts": c, "sorted": not self._poisoned,
            "n_ignored": self.n_ignored, "n_masked": self.n_masked, "poisoned": self._poisoned,
        }  # fmt: skip

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["ignore_label"])
        g, p, c = st["gt"], st["pred"], st["counts"]
        if not st.get("sorted", False):  # written by an older version: entries in slot order
            g, p, c = _canonical(g, p, c)
        self._add_run((g, p, c))
        self._state[pairs.NIGNORED] = st["n_ignored"]
        self._state[pairs.NMASKED] = st["n_masked"]
        self._poisoned = st["poisoned"]

    def __repr__(self) -> str:
        return f"ContingencyCounts({self.n_entries} pairs, ignore_label={self.ignore_label})"


def _as_u64(a: np.ndarray, name: str) -> np.ndarray:
    """Ids as uint64 (bit patterns); negative ids are refused."""
    if a.dtype.kind == "u":
        return a.astype(np.uint64)
    if a.dtype.kind == "i" or (a.dtype.kind == "O" and len(a) == 0) or (a.dtype.kind == "f" and len(a) == 0):
        a = a.astype(np.int64)
        if len(a) and a.min() < 0:
            raise InputError(f"{name} holds a negative id ({int(a.min())}); ids are non-negative integers")
        return a.astype(np.uint64)
    raise InputError(f"{name} must hold integer ids, got dtype {a.dtype}")


def _canonical(
    g: np.ndarray, p: np.ndarray, c: np.ndarray, *, unique: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries sorted by (g, p), equal pairs summed (unless known ``unique``), zero counts dropped."""
    order = pairs.pair_order(g, p)  # radix sorts: about 2x numpy's lexsort on 10**5 pairs
    g, p, c = g[order], p[order], c[order]
    if not unique and len(g) > 1:
        first = np.ones(len(g), dtype=bool)
        first[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
        idx = np.flatnonzero(first)
        g, p, c = g[idx], p[idx], np.add.reduceat(c, idx)
    keep = c != 0
    if not keep.all():
        if (c < 0).any():
            raise InputError("contingency counts must be >= 0")
        g, p, c = g[keep], p[keep], c[keep]
    return g, p, c


def _merge_runs(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two sorted runs of unique pairs as one, by a linear merge (new arrays unless one run is
    empty: then the other itself)."""
    if len(a[2]) == 0:
        return b
    if len(b[2]) == 0:
        return a
    n = len(a[2]) + len(b[2])
    g, p, c = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.int64)
    m = pairs.merge_sorted(a[0], a[1], a[2], b[0], b[1], b[2], g, p, c)
    if m < n:
        g, p, c = g[:m].copy(), p[:m].copy(), c[:m].copy()
    return g, p, c


def _same_ignore(a: int | None, b: int | None) -> None:
    if a != b:
        from fastseg_eval.errors import OptionError

        raise OptionError(f"cannot merge contingency tables with different ignore labels ({a} and {b})")


def _mask_view(mask: np.ndarray) -> np.ndarray:
    """A mask as uint8 (nonzero = count), without a copy for bool and uint8 masks."""
    mv = mask if mask.dtype in (np.uint8, np.bool_) else (mask != 0)
    return mv.view(np.uint8)
