"""The confusion counts reducer: int64 count tables filled by the CPU kernels, merged exactly.

:class:`ConfusionCounts` is the first reducer of the engine (see :mod:`fastseg_eval.reducers.base`):
``add(block)`` dispatches each block to a numba kernel (:mod:`fastseg_eval.kernels.cpu`, or
:mod:`fastseg_eval.kernels.prob` for probability maps), using the label space of
:mod:`fastseg_eval.labels.space`. The public streaming accumulator ``fse.ConfusionMatrix``
(in :mod:`fastseg_eval.api`) is this class plus ``update()`` and ``result()``.

Rows are ground truth, columns are prediction: ``counts[i, j]`` is the number of voxels whose
ground-truth label is ``labels[i]`` and whose predicted label is ``labels[j]``.

Two storage modes:

* **dense**: a full ``K x K`` table, kept while ``K <= dense_max`` (default 1024);
* **marginals**: for larger label spaces (ids up to 2**16 and far beyond) only the diagonal and
  the two marginals (``3 x K`` counts) are kept. Every per-class metric and every overall metric
  (accuracy, balanced accuracy, MCC, Cohen's kappa) needs nothing more; only the off-diagonal
  cells are lost, so :attr:`ConfusionCounts.counts` is unavailable in this mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

import numpy as np

from fastseg_eval.errors import FastSegError, InputError, LabelError, OptionError, option
from fastseg_eval.kernels import cpu
from fastseg_eval.kernels import prob as prob_kernels
from fastseg_eval.kernels.simd import fast_compress
from fastseg_eval.labels.space import (
    check_ignore,
    check_num_classes,
    fixed_labels,
    ignore_bits,
    insert_labels,
    is_range,
    label_message,
    label_view,
    lookup_labels,
    table_capacity,
    value_of,
)
from fastseg_eval.memory import check_label_space
from fastseg_eval.reducers.base import Block
from fastseg_eval.reducers.probability import ProbabilitySpec, make_spec

DENSE_MAX = 1024
"""Largest label count kept as a dense K x K table; beyond it the accumulator keeps 3 x K counts."""

_INITIAL_KCAP = 16


def as_3d(a: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Split an N-d array into 3-d views (no copies), each with the index of its leading axes."""
    if a.ndim <= 3:
        return [((), a.reshape((1,) * (3 - a.ndim) + a.shape))]
    return [(idx, a[idx]) for idx in np.ndindex(a.shape[:-3])]


class ConfusionCounts:
    """Streaming, mergeable, picklable int64 confusion matrix (rows = gt, columns = pred).

    Parameters
    ----------
    num_classes : int, optional
        Labels are ``0 .. num_classes - 1``; any other value is an error.
    labels : sequence of int, optional
        The labels, in the order rows and columns follow; any other value is an error.
        Without ``num_classes`` and ``labels`` the labels are discovered from the data and
        reported sorted.
    ignore_label : int, optional
        Ground-truth voxels with this value are skipped (counted in :attr:`n_ignored`).
    dense_max : int
        Largest label count kept as a dense table; beyond it only the diagonal and marginals.
    memory_limit : int or str, optional
        Budget for the label space's tables and report (bytes or ``"8G"``); a fixed label space
        that would not fit is refused before anything is allocated (see :mod:`fastseg_eval.memory`).
        Default: ``FASTSEG_MEMORY_LIMIT`` or half the available memory. ``False`` skips the check.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse
    >>> acc = fse.ConfusionCounts(3)
    >>> acc.update(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))   # pred, gt
    >>> acc.counts.tolist()   # rows = gt, columns = pred
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        labels: Sequence[int] | None = None,
        ignore_label: int | None = None,
        dense_max: int = DENSE_MAX,
        threshold: float | None = None,
        channel_axis: int | None = None,
        thresholds: int | None = None,
        prob_scale: float | None = None,
        probability: ProbabilitySpec | None = None,
        memory_limit: Any = None,
    ) -> None:
        self.ignore_label = check_ignore(ignore_label)
        self.dense_max = int(dense_max)
        if probability is None and (
            threshold is not None
            or channel_axis is not None
            or thresholds is not None
            or prob_scale is not None
        ):
            if channel_axis is not None and num_classes is None:
                raise OptionError(
                    "a per-class probability map (channel_axis) needs num_classes = the channel count"
                )
            probability, _ = make_spec(
                np.dtype(np.float32), 2 if channel_axis is not None else 1, 1,
                (num_classes or 2, 1), threshold=threshold, thresholds=thresholds, prob_scale=prob_scale,
                channel_axis=None if channel_axis is None else 0, num_classes=num_classes, labels=labels,
            )  # fmt: skip
        self._prob = probability
        self.channel_axis = channel_axis
        self._prob_max = float("-inf")  # largest value of float maps read with a scale (scale_mistake)
        if probability is not None:
            if num_classes is not None and num_classes != probability.channels:
                raise OptionError(
                    f"num_classes={num_classes} does not match the probability map's {probability.channels} classes"
                )
            num_classes = probability.channels
            self._hist = np.zeros((probability.curve_classes, 2, probability.bins + 1), dtype=np.int64)
            self._edges = probability.edges()
        self._config = (num_classes, None if labels is None else [int(x) for x in labels])
        self._poisoned: str | None = None
        nlabels = len(labels) if labels is not None else check_num_classes(num_classes)
        if nlabels is not None and memory_limit is not False:  # refuse what cannot fit, before allocating
            check_label_space(nlabels, dense_max=self.dense_max, memory_limit=memory_limit)
        fixed = fixed_labels(num_classes, labels, self.ignore_label)
        self._fixed = fixed is not None
        nfixed = 0 if fixed is None else len(fixed)
        self._identity = fixed is not None and is_range(fixed)  # labels 0..K-1: values are indices
        self._direct = self._identity and nfixed <= self.dense_max
        if self._fixed:
            kcap, dense = nfixed, nfixed <= self.dense_max
        else:
            kcap = min(_INITIAL_KCAP, max(self.dense_max, 1))
            dense = kcap <= self.dense_max
        in_lut = self._identity and nfixed <= cpu.LUT_SIZE  # labels 0..K-1: value v is index v, no hashing
        if in_lut:
            self._lut, self._keys = _identity_maps(nfixed)  # shared, never written
        else:
            self._lut = np.full(cpu.LUT_SIZE, -1, dtype=np.int32)
        self._hkeys = np.zeros(0, dtype=np.uint64)
        self._hvals = np.zeros(0, dtype=np.int32)
        self._state = _padded_zeros(cpu.STATE_SIZE)
        self._raw8: np.ndarray | None = None  # discovery on 8-bit inputs: counts by raw value
        self._raw16: np.ndarray | None = None  # discovery on 2-byte inputs past dense_max: see _space
        self._raw16_dirty = False  # _raw16 holds counts not yet folded into the label space
        self._small_raw = True  # discovery: chunks so far held labels 0..3 only (bit-plane kernel)
        self._fill_buffers: dict[str, np.ndarray] = {}  # unstored chunks beside stored ones, filled
        self._side: np.ndarray | None = None  # scratch of the flat kernel (zero between calls)
        self._run_list: np.ndarray | None = None  # scratch of the listed run kernels
        self._sorted: tuple[int, np.ndarray] | None = None  # see _order
        # a fixed label space kept as diagonal + marginals counts into int32 until it could overflow
        self._alloc(kcap, dense, narrow=self._fixed and not dense)
        if in_lut:
            self._state[cpu.NLAB] = nfixed
        elif fixed is not None:
            keys = np.arange(nfixed, dtype=np.uint64) if isinstance(fixed, range) else np.asarray(fixed, dtype=np.uint64)
            self._add_keys(keys)

    # ------------------------------------------------------------------ storage
    def _alloc(self, kcap: int, dense: bool, narrow: bool = False) -> None:
        """Tables for ``kcap`` labels; ``narrow``: diagonal + marginals in int32 (see :meth:`_widen`)."""
        self._kcap = kcap
        self._dense = dense
        keys = getattr(self, "_keys", None)
        if keys is None or len(keys) != kcap:
            self._keys = np.zeros(kcap, dtype=np.uint64) if keys is None else _resized(keys, kcap)
        size = kcap * kcap if dense else 3 * kcap
        self._acc = _padded_zeros(size, np.int32) if narrow else _padded_zeros(size)
        self._room = INT32_ROOM if narrow else None  # an int32 table: voxels it may still take
        self._taken = 0  # voxels it took

    def _grow_labels(self, need: int) -> None:
        """Make room for at least ``need`` labels, switching to marginals past ``dense_max``."""
        self._widen()
        old_k, old_acc, old_dense = self._kcap, self._acc, self._dense
        n = int(self._state[cpu.NLAB])
        kcap, dense = table_capacity(old_k, need, old_dense, self.dense_max)
        self._alloc(kcap, dense)
        if old_dense:
            table = old_acc.reshape(old_k, old_k)[:n, :n]
            if dense:
                self._acc.reshape(kcap, kcap)[:n, :n] = table
            else:
                self._marginal_parts()[0][:n] = table.sum(axis=1)
                self._marginal_parts()[1][:n] = table.sum(axis=0)
                self._marginal_parts()[2][:n] = np.diagonal(table)
        else:
            for part in range(3):
                self._acc[part * kcap : part * kcap + n] = old_acc[part * old_k : part * old_k + n]

    def _grow_hash(self, extra: int = 1) -> None:
        count = int(self._state[cpu.HCOUNT])
        cap = max(64, len(self._hkeys))
        while 2 * (count + extra) > cap:
            cap *= 2
        if cap == len(self._hkeys):
            return
        keys = self._hkeys[self._hvals >= 0]
        vals = self._hvals[self._hvals >= 0]
        self._hkeys = np.zeros(cap, dtype=np.uint64)
        self._hvals = np.full(cap, -1, dtype=np.int32)
        insert_labels(keys, vals, self._lut, self._hkeys, self._hvals)

    def _marginal_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self._kcap
        return self._acc[:k], self._acc[k : 2 * k], self._acc[2 * k : 3 * k]

    def _add_keys(self, keys: np.ndarray) -> np.ndarray:
        """Indices of label values ``keys`` (uint64), assigning new ones (in order) if needed."""
        idx = lookup_labels(keys, self._lut, self._hkeys, self._hvals)
        new = np.flatnonzero(idx < 0)
        if len(new):
            newkeys = keys[new]
            _, first = np.unique(newkeys, return_index=True)
            newkeys = newkeys[np.sort(first)]
            n = int(self._state[cpu.NLAB])
            if n + len(newkeys) > self._kcap:
                self._grow_labels(n + len(newkeys))
            big = int(np.count_nonzero(newkeys >= cpu.LUT_SIZE))
            if big:
                self._grow_hash(big)
            self._keys[n : n + len(newkeys)] = newkeys
            ids = np.arange(n, n + len(newkeys), dtype=np.int32)
            insert_labels(newkeys, ids, self._lut, self._hkeys, self._hvals)
            self._state[cpu.NLAB] = n + len(newkeys)
            self._state[cpu.HCOUNT] += big
            idx = lookup_labels(keys, self._lut, self._hkeys, self._hvals)
        return idx

    # ------------------------------------------------------------------ the reducer protocol
    halo = 0
    """Counting needs no context around a block (see :mod:`fastseg_eval.reducers.base`)."""
    accepts_constant = True
    """Blocks of unstored chunks may come as broadcasts of the fill value: a chunk pair that is
    one value on both sides is counted as one voxel times its size (:meth:`add_chunk`)."""

    def add(self, block: Block) -> None:
        """Count the core voxels of one block (rows = gt); see :meth:`add_chunk`."""
        core = block.core
        mask = None if block.mask is None else block.mask[core]
        self.add_chunk(block.gt[core], block.pred[core], mask, offset=block.origin)

    def finish(self) -> ConfusionCounts:
        """The counts of a worker's accumulator: itself (merged by the engine)."""
        return self

    # ------------------------------------------------------------------ options, read back
    @property
    def config(self) -> tuple[int | None, list[int] | None]:
        """(num_classes, labels) as given (both None when labels are discovered)."""
        return self._config

    @property
    def label_source(self) -> str:
        """Where the labels come from: ``"labels"``, ``"num_classes"`` or ``"discovered"``."""
        num_classes, labels = self._config
        return "labels" if labels is not None else "num_classes" if num_classes is not None else "discovered"

    @property
    def probability(self) -> ProbabilitySpec | None:
        """How a probability map becomes labels (None for label volumes)."""
        return self._prob

    @property
    def sweep_histogram(self) -> np.ndarray | None:
        """Per class, positives / negatives by probability bin (threshold sweeps), else None."""
        return self._hist if self._prob is not None and self._prob.bins else None

    @property
    def largest_probability(self) -> float:
        """The largest value seen in float maps read with a scale (``prob_scale`` mistakes)."""
        return self._prob_max

    # ------------------------------------------------------------------ counting
    def _check_usable(self) -> None:
        if self._poisoned:
            raise FastSegError(
                f"this ConfusionCounts holds partial counts of an update that failed ({self._poisoned}); "
                "call reset() or create a new one"
            )

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
        if mask is not None and mask.shape != gt.shape:
            raise InputError(f"mask chunk shape {mask.shape} differs from gt chunk shape {gt.shape}")
        if self._room is not None:  # an int32 table: no cell may pass 2**31 - 1
            if gt.size > self._room:
                self._widen()
            else:
                self._room -= gt.size
                self._taken += gt.size
        broadcast = [a is not None and _constant(a) for a in (gt, pred, mask)]
        if any(broadcast):  # unstored chunks, read as their fill value
            if self._prob is None and broadcast[0] and broadcast[1] and (mask is None or broadcast[2]):
                if gt.shape != pred.shape:
                    raise InputError(f"gt chunk shape {gt.shape} differs from pred chunk shape {pred.shape}")
                self._add_constant(gt, pred, mask, offset)
                return
            # one side stored: the other is filled into a buffer this accumulator reuses (a
            # worker's accumulator sees one chunk at a time), as the reader would have filled it
            gt, pred, mask = (
                self._filled(a, role) if flag else a for a, role, flag in zip((gt, pred, mask), ("gt", "pred", "mask"), broadcast)
            )
        mv = None if mask is None else _mask_view(mask)
        if self._prob is not None:
            pred = self._labels_from_probabilities(gt, pred, mv, offset)
        if gt.shape != pred.shape:
            raise InputError(f"gt chunk shape {gt.shape} differs from pred chunk shape {pred.shape}")
        if gt.size == 0:
            return
        gv, g_signed = label_view(gt, "gt")
        pv, p_signed = label_view(pred, "pred")
        try:
            self._count(gv, pv, mv, g_signed, p_signed, ignore_bits(self.ignore_label, gt.dtype), gt, pred)
        except LabelError as e:
            full = _shifted(e.position, offset)
            e.position = full
            e.args = (label_message(e.role, e.value, full, *self._config),)
            self._poisoned = str(e)
            raise

    def _filled(self, a: np.ndarray, role: str) -> np.ndarray:
        """A contiguous array holding broadcast ``a``'s one value, in a buffer kept per role."""
        held = self._fill_buffers.get(role)
        if held is None or held.dtype != a.dtype or held.size < a.size:
            held = self._fill_buffers[role] = np.empty(a.size, dtype=a.dtype)
        out = held[: a.size].reshape(a.shape)
        out.fill(a.reshape(-1)[0])
        return out

    def _add_constant(self, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None, offset: Any) -> None:
        """Count a chunk pair that holds one value on each side: its first voxel, ``size`` times.

        Known labels add ``size`` to one cell; anything else (a label to discover, an invalid
        value) is counted by the usual kernel in an empty accumulator, so that validation and
        discovery behave exactly as voxel by voxel (an invalid value is reported at the chunk's
        first voxel, the first in C order), whose counts are scaled by the size and merged.
        """
        n = gt.size
        first = (0,) * gt.ndim
        state = self._state
        if mask is not None and not mask[first]:
            state[cpu.NMASKED] += n
            return
        box = tuple(slice(0, 1) for _ in gt.shape)
        gv, g_signed = label_view(gt[box], "gt")
        pv, p_signed = label_view(pred[box], "pred")
        g, p = int(gv.reshape(-1)[0]), int(pv.reshape(-1)[0])
        ignore, has_ignore = ignore_bits(self.ignore_label, gt.dtype)
        if has_ignore and g == int(ignore):
            state[cpu.NIGNORED] += n
            return
        cell = None
        if not self._fixed and gv.itemsize == 1 and pv.itemsize == 1:  # discovery: the raw 8-bit table
            if g < (min(256, g_signed) if g_signed else 256) and p < (min(256, p_signed) if p_signed else 256):
                if self._raw8 is None:
                    self._raw8 = np.zeros(256 * 256, dtype=np.int64)
                self._raw8[g * 256 + p] += n
                return
        elif self._direct:
            k = self._kcap
            if g < (min(k, g_signed) if g_signed else k) and p < (min(k, p_signed) if p_signed else k):
                cell = (g, p)
        elif (
            g < cpu.LUT_SIZE and p < cpu.LUT_SIZE and self._lut[g] >= 0 and self._lut[p] >= 0
            and not (g_signed and g >= g_signed) and not (p_signed and p >= p_signed)  # never a negative value
        ):  # fmt: skip
            cell = (int(self._lut[g]), int(self._lut[p]))
        if cell is not None:
            a, b = cell
            if self._dense:
                self._acc[a * self._kcap + b] += n
            else:
                parts = self._marginal_parts()
                parts[0][a] += n
                parts[1][b] += n
                if a == b:
                    parts[2][a] += n
            return
        one = self.spawn()
        one.add_chunk(
            np.ascontiguousarray(gt[box]), np.ascontiguousarray(pred[box]),
            None if mask is None else np.ascontiguousarray(mask[box]), offset=offset,
        )  # fmt: skip
        one._fold()
        one._widen()  # n times its counts may not fit an int32 table
        one._acc *= n
        one._state[cpu.NIGNORED] *= n
        one._state[cpu.NMASKED] *= n
        self.merge(one)

    def _labels_from_probabilities(
        self, gt: np.ndarray, prob: np.ndarray, mv: np.ndarray | None, offset: Any
    ) -> np.ndarray:
        """Threshold / argmax a probability chunk (channel axis last) into labels; fill the sweep.

        ``mv`` is the mask as uint8 (:func:`_mask_view`) or None.
        """
        spec = self._prob
        want = gt.shape + ((spec.channels,) if spec.mode == "argmax" else ())
        if prob.shape != want:
            raise InputError(
                f"probability chunk shape {prob.shape} does not match {want} (gt chunk {gt.shape})"
            )
        if prob.dtype.kind == "f" and prob.dtype.itemsize < 4:
            prob = prob.astype(np.float32)  # numba has no float16 arithmetic
        elif prob.dtype.kind == "b":
            prob = prob.view(np.uint8)
        elif prob.dtype.kind not in "fiu":
            raise InputError(f"pred has dtype {prob.dtype}: not a probability map")
        if not prob.dtype.isnative:
            prob = prob.astype(prob.dtype.newbyteorder("="))
        if spec.scale != 1.0 and prob.dtype.kind == "f" and prob.size:  # fmax: NaN is skipped
            self._prob_max = max(self._prob_max, float(np.fmax.reduce(prob, axis=None)))
        out = np.empty(gt.shape, dtype=np.uint8 if spec.channels <= 256 else np.uint16)
        gv, _ = label_view(gt, "gt")
        ignore, has_ignore = ignore_bits(self.ignore_label, gt.dtype)
        hist = self._hist if spec.bins else _NO_HIST
        fstate = np.zeros(1, dtype=np.float64)
        pieces = _pieces(gv, prob, mv, channels=spec.mode == "argmax")
        for ((lead, g3), (_, p3), (_, m3)), (_, o3) in zip(pieces, as_3d(out)):
            if spec.mode == "threshold":
                status = prob_kernels.threshold_chunk(
                    p3, spec.scale, spec.threshold, g3, m3, mv is not None, np.uint64(ignore), has_ignore,
                    o3, hist, self._edges, spec.bins, self._state, fstate,
                )  # fmt: skip
            else:
                status = prob_kernels.argmax_chunk(
                    p3, spec.scale, g3, m3, mv is not None, np.uint64(ignore), has_ignore, o3, hist,
                    self._edges, spec.bins, self._state, fstate,
                )  # fmt: skip
            if status != prob_kernels.OK:
                pos = np.unravel_index(int(self._state[cpu.POS]), p3.shape)
                channel = int(pos[3]) if spec.mode == "argmax" else None
                full = _shifted(_chunk_position(lead, pos[:3], gt.ndim), offset)
                value = float(fstate[0])
                where = f" at voxel {full}" + ("" if channel is None else f", channel {channel}")
                hint = (
                    f"; if they are scaled integers pass {option('prob_scale')} (e.g. 255)"
                    if spec.scale == 1.0 and prob.dtype.kind != "f"
                    else ""
                )
                read = (
                    f"probability {value:g}{where}"
                    if spec.scale == 1.0
                    else f"value {value:g}{where}, which {option('prob_scale', f'{spec.scale:g}')} reads as "
                    f"probability {value / spec.scale:g}"
                )
                msg = f"pred has {read}: a probability map must hold values in [0, 1] (NaN is not allowed){hint}"
                self._poisoned = msg
                raise LabelError(msg, role="pred", value=value, position=full)
        return out

    def _count(self, gv, pv, mv, g_signed, p_signed, ignore_bits, gt, pred) -> None:
        """Dispatch one chunk (unsigned views) to a kernel; raises LabelError with the chunk position.

        * labels ``0..K-1`` (``direct``), or discovery on 8-bit inputs (counted by raw value into a
          256 x 256 table, folded into the label space when read): the direct kernel, on flat
          64-bit words when the chunk is contiguous with 1- or 2-byte labels;
        * otherwise the mapped kernel (lookup table / hash, discovery, marginals), on flat words
          by distinct pair when the chunk is contiguous with 1- or 2-byte labels.
        """
        ignore, has_ignore = np.uint64(ignore_bits[0]), ignore_bits[1]
        has_mask = mv is not None
        state = self._state
        raw = not self._fixed and gv.itemsize == 1 and pv.itemsize == 1
        if self._direct or raw:
            if raw:
                if self._raw8 is None:
                    self._raw8 = np.zeros(256 * 256, dtype=np.int64)
                k, acc = 256, self._raw8
            else:
                k, acc = self._kcap, self._acc
            gl = np.uint64(min(k, g_signed) if g_signed else k)
            pl = np.uint64(min(k, p_signed) if p_signed else k)
            if _flat_ok(gv, pv, mv):
                g1, p1 = gv.reshape(-1), pv.reshape(-1)
                m1 = _NO_MASK.reshape(-1) if mv is None else mv.reshape(-1)
                nwords = (g1.size * g1.itemsize) // 8 // g1.itemsize * g1.itemsize
                small = min(k, cpu.SMALL_K) if raw else k  # discovery tries labels 0..3 first
                if (
                    g1.itemsize == 1 and mv is None and not has_ignore and small <= cpu.SMALL_K
                    and (not raw or self._small_raw)
                ):  # fmt: skip
                    if cpu.count_small(g1, p1, small, k, acc):
                        return
                    if raw:  # labels past 3: stop trying on this accumulator's chunks
                        self._small_raw = False
                done = 0
                if g1.itemsize == 1 and mv is None:  # run by run, run starts found 64 voxels at a time
                    if LISTED_RUNS:
                        done = cpu.count_runs_listed(g1, p1, ignore, has_ignore, gl, pl, k, acc, state, self._starts())
                    else:
                        done = cpu.count_runs(g1, p1, ignore, has_ignore, gl, pl, k, acc, state)
                    if done == g1.size:
                        return
                    g1, p1 = g1[done:], p1[done:]  # the tail, or from a block with a value past K
                    nwords = g1.size // 8
                status = cpu.count_direct_flat(
                    g1, p1, m1, _words(g1, nwords), _words(p1, nwords),
                    _NO_WORDS if mv is None else _words(m1, nwords // g1.itemsize),
                    has_mask, ignore, has_ignore, gl, pl, k, acc, self._side_for(acc), state,
                )  # fmt: skip
                if status != cpu.OK:
                    state[cpu.POS] += done
                    self._raise_bad(status, np.unravel_index(int(state[cpu.POS]), gv.shape), gt, pred)
                return
            for (lead, g3), (_, p3), (_, m3) in _pieces(gv, pv, mv):
                status = cpu.count_direct(g3, p3, m3, has_mask, ignore, has_ignore, gl, pl, k, acc, state)
                if status != cpu.OK:
                    self._raise_bad(status, _kernel_position(lead, g3, state, gv.ndim), gt, pred)
            return
        if _flat_ok(gv, pv, mv):  # every value of these types maps through the lookup table
            g1, p1 = gv.reshape(-1), pv.reshape(-1)
            m1 = _NO_MASK.reshape(-1) if mv is None else mv.reshape(-1)
            nwords = (g1.size * g1.itemsize) // 8 // g1.itemsize * g1.itemsize
            mw = _NO_WORDS if mv is None else _words(m1, nwords // g1.itemsize)
            words = _words(g1, nwords), _words(p1, nwords), mw
            start = 0
            size = g1.itemsize
            if size == 2 and mv is None:  # run by run, run starts found 32 voxels at a time
                runs16 = (
                    partial(cpu.count_runs16_listed, starts=self._starts()) if LISTED_RUNS else cpu.count_runs16
                )
                status = self._growing(  # the space is asked for at every call: it may change on growing
                    lambda start: runs16(
                        g1, p1, ignore, has_ignore, np.uint64(g_signed), np.uint64(p_signed), *self._space(size),
                        state, start,
                    )  # fmt: skip
                )
                if status != cpu.OK:
                    self._raise_bad(status, np.unravel_index(int(state[cpu.POS]), gv.shape), gt, pred)
                start = int(state[cpu.POS])  # the rest, past the last whole block
                if start == g1.size:
                    return
            status = self._growing(
                lambda at: cpu.count_words(
                    g1, p1, m1, *words, has_mask, ignore, has_ignore, np.uint64(g_signed), np.uint64(p_signed),
                    *self._space(size), state, at,
                ),
                start,
            )  # fmt: skip
            if status != cpu.OK:
                self._raise_bad(status, np.unravel_index(int(state[cpu.POS]), gv.shape), gt, pred)
            return
        for (lead, g3), (_, p3), (_, m3) in _pieces(gv, pv, mv):
            status = self._growing(
                lambda start, g3=g3, p3=p3, m3=m3: cpu.count_mapped(
                    g3, p3, m3, has_mask, ignore, has_ignore, np.uint64(g_signed), np.uint64(p_signed),
                    self._fixed, self._dense, self._lut, self._hkeys, self._hvals, self._keys, self._acc,
                    state, start,
                )  # fmt: skip
            )
            if status != cpu.OK:
                self._raise_bad(status, _kernel_position(lead, g3, state, gv.ndim), gt, pred)

    def _space(self, itemsize: int) -> tuple[Any, ...]:
        """The label-space arguments of the mapped kernels (``fixed, identity, dense, lut, hkeys,
        hvals, labels, kcap, acc``): this accumulator's tables, or a table by value.

        Labels discovered on 2-byte inputs, once past ``dense_max`` (diagonal + marginals, for
        good), are counted by value into ``_raw16`` (gt, pred and diagonal counts of each of the
        65 536 values) as if the space were ``0..65535``: each run's value is its index, with no
        lookup, no label to assign and the kernels' fastest path (512^3 uint16 ids: a discovery
        ``update`` 27 ms against 45, ``evaluate`` 50 against 80). :meth:`_fold` moves them into the
        label space before anything reads it. Negative values of signed inputs are still refused:
        the space is fixed."""
        if itemsize == 2 and not self._fixed and not self._dense:
            lut, keys = _identity_maps(1 << 16)
            return True, True, False, lut, self._hkeys, self._hvals, keys, 1 << 16, self._by_value()
        return (
            self._fixed, self._identity, self._dense, self._lut, self._hkeys, self._hvals, self._keys, self._kcap,
            self._acc,
        )  # fmt: skip

    def _by_value(self) -> np.ndarray:
        """The table of counts by value (:meth:`_space`), marked as holding counts to fold."""
        if self._raw16 is None:
            self._raw16 = _padded_zeros(3 << 16)
        self._raw16_dirty = True
        return self._raw16

    def _starts(self) -> np.ndarray:
        """The run-start list of the listed run kernels (scratch, kept per accumulator)."""
        if self._run_list is None:
            self._run_list = np.empty(cpu.LIST_SIZE, dtype=np.uint16)
        return self._run_list

    def _side_for(self, acc: np.ndarray) -> np.ndarray:
        """Scratch tables of the flat kernel for ``acc`` (none for large tables: folding costs)."""
        if acc.size > SIDE_MAX:
            return _NO_SIDE
        side = self._side
        if side is None or side.shape[1] != acc.size:
            side = self._side = _padded_zeros(2 * acc.size).reshape(2, acc.size)
        return side

    def _growing(self, count: Callable[[int], int], start: int = 0) -> int:
        """Run a mapped kernel (``count(start)``) over a chunk from ``start``, growing the label
        tables and resuming at ``state[POS]`` whenever it stops for room; its final status."""
        while True:
            status = count(start)
            if status == cpu.GROW_LABELS:
                self._grow_labels(self._kcap + 1)
            elif status == cpu.GROW_HASH:
                self._grow_hash()
            else:
                return status
            start = int(self._state[cpu.POS])

    def _raise_bad(self, status: int, position: Any, gt: np.ndarray, pred: np.ndarray) -> None:
        role = "gt" if status == cpu.BAD_GT else "pred"
        value = value_of(int(self._state[cpu.VALUE]), (gt if role == "gt" else pred).dtype)
        pos = tuple(int(x) for x in position)
        raise LabelError(label_message(role, value, pos, *self._config), role=role, value=value, position=pos)

    def _fold(self, raw16: bool = True) -> None:
        """Move the counts by value (discovery: the raw 8-bit table, and, unless told, the 2-byte
        table of :meth:`_space`) into the label space."""
        table16 = self._raw16
        if raw16 and table16 is not None and self._raw16_dirty:
            self._raw16_dirty = False
            k = 1 << 16
            by_value = table16[:k], table16[k : 2 * k], table16[2 * k :]
            values = np.flatnonzero((by_value[0] != 0) | (by_value[1] != 0))
            idx = self._add_keys(values.astype(np.uint64)).astype(np.intp)
            for mine, theirs in zip(self._marginal_parts(), by_value):  # marginals: the mode _space needs
                mine[idx] += theirs[values]
            table16[:] = 0
        raw = self._raw8
        if raw is None or not raw.any():
            return
        table = raw.reshape(256, 256)
        values = np.flatnonzero(table.any(axis=1) | table.any(axis=0))
        idx = self._add_keys(values.astype(np.uint64)).astype(np.intp)
        sub = table[np.ix_(values, values)]
        if self._dense:
            self._acc.reshape(self._kcap, self._kcap)[np.ix_(idx, idx)] += sub
        else:
            for mine, theirs in zip(
                self._marginal_parts(), (sub.sum(axis=1), sub.sum(axis=0), np.diagonal(sub))
            ):
                mine[idx] += theirs
        raw[:] = 0


    # ------------------------------------------------------------------ combining
    def spawn(self) -> ConfusionCounts:
        """An empty accumulator with the same label space and options (for another worker)."""
        num_classes, labels = self._config
        return type(self)(
            num_classes, labels=labels, ignore_label=self.ignore_label, dense_max=self.dense_max,
            probability=self._prob, channel_axis=self.channel_axis, memory_limit=False,
        )  # fmt: skip

    def _widen(self) -> None:
        """A fixed label space's diagonal + marginals start in int32: half the bytes of the
        tables each run adds into (65 536 labels: 0.75 instead of 1.5 MiB, within a core's L2),
        about 5 % faster on uint16 ids. They become int64 here, before any cell could pass
        2**31 - 1: before a chunk larger than the voxels they may still take
        (:meth:`add_chunk`), before a merge of more, before counts are multiplied or restored."""
        if self._room is not None:
            wide = _padded_zeros(len(self._acc))
            wide += self._acc
            self._acc = wide
            self._room = None

    def merge(self, other: ConfusionCounts) -> ConfusionCounts:
        """Add the counts of ``other`` into this accumulator (label spaces are unified). Returns ``self``."""
        # counts by value (2-byte discovery, see _space) add as they are, folded once when read:
        # folding each worker's 65 536 ids before merging them cost more than counting a worker's share
        by_value = other._raw16_dirty and not self._fixed
        self._fold(raw16=not by_value)
        other._fold(raw16=not by_value)
        self._check_usable()
        other._check_usable()
        if other._prob != self._prob:
            raise OptionError(
                f"cannot merge accumulators with different probability settings ({self._prob} and {other._prob})"
            )
        if other.ignore_label != self.ignore_label:
            raise OptionError(
                f"cannot merge accumulators with different ignore labels ({self.ignore_label} and {other.ignore_label})"
            )
        if self._room is not None:  # int32 tables stay so while both sides' voxels fit
            if other._room is not None and other._taken <= self._room:
                self._room -= other._taken
                self._taken += other._taken
            else:
                self._widen()
        n_other = int(other._state[cpu.NLAB])
        keys = other._keys[:n_other]
        if (
            self._fixed and other._fixed and self._dense == other._dense and self._kcap == other._kcap
            and n_other == int(self._state[cpu.NLAB])
            and ((self._identity and other._identity) or np.array_equal(keys, self._keys[:n_other]))
        ):  # the same label space in the same order (a spawned worker's): add the tables as they are
            self._acc += other._acc
            self._merge_rest(other)
            return self
        if self._fixed:
            idx = lookup_labels(keys, self._lut, self._hkeys, self._hvals)
            missing = keys[idx < 0]
            if len(missing):
                # labels the other side has but that carry no counts can be dropped safely
                present = other._present_mask()[idx < 0]
                if present.any():
                    raise OptionError(
                        f"cannot merge: the other accumulator counted label {int(missing[present][0])}, "
                        f"which is not among this one's labels"
                    )
                keep = idx >= 0
            else:
                keep = np.ones(n_other, dtype=bool)
        else:
            idx = self._add_keys(keys)
            keep = np.ones(n_other, dtype=bool)
        if self._dense and not other._dense:
            self._grow_labels_to_marginals()
        src_idx = np.flatnonzero(keep)
        dst = idx[keep].astype(np.intp)
        if self._dense:
            ko = other._kcap
            table = other._acc.reshape(ko, ko)[np.ix_(src_idx, src_idx)]
            self._acc.reshape(self._kcap, self._kcap)[np.ix_(dst, dst)] += table
        else:
            for mine, theirs in zip(self._marginal_parts(), other._marginals_raw(raw16=not by_value)):
                mine[dst] += theirs[src_idx]
        if by_value:  # other counts by value only past dense_max: self is in diagonal + marginals mode now
            self._by_value()[:] += other._raw16
        self._merge_rest(other)
        return self

    def _merge_rest(self, other: ConfusionCounts) -> None:
        """What :meth:`merge` adds besides the table: skipped voxels and the probability histogram."""
        for slot in (cpu.NIGNORED, cpu.NMASKED):
            self._state[slot] += other._state[slot]
        if self._prob is not None:
            self._hist += other._hist
            self._prob_max = max(self._prob_max, other._prob_max)

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        out = self.copy()
        return out.merge(other)

    def copy(self) -> ConfusionCounts:
        """A deep copy."""
        import copy

        return copy.deepcopy(self)

    def _grow_labels_to_marginals(self) -> None:
        saved = self.dense_max
        self.dense_max = 0
        try:
            self._grow_labels(self._kcap)
        finally:
            self.dense_max = saved

    def _marginals_raw(self, raw16: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gt counts, pred counts, diagonal) in internal index order, length NLAB (``raw16``:
        see :meth:`_fold`)."""
        self._fold(raw16)
        n = int(self._state[cpu.NLAB])
        if self._dense:
            t = self._acc.reshape(self._kcap, self._kcap)[:n, :n]
            return t.sum(axis=1), t.sum(axis=0), np.diagonal(t).copy()
        g, p, d = self._marginal_parts()
        if self._room is not None:  # an int32 table: sums of its cells may not fit int32
            return g[:n].astype(np.int64), p[:n].astype(np.int64), d[:n].astype(np.int64)
        return g[:n], p[:n], d[:n]

    def _present_mask(self) -> np.ndarray:
        g, p, _ = self._marginals_raw()
        return (g > 0) | (p > 0)

    def reset(self) -> None:
        """Forget every count (the label space of ``num_classes`` / ``labels`` stays)."""
        fresh = self.spawn()
        self.__dict__.update(fresh.__dict__)

    # ------------------------------------------------------------------ results
    def _order(self) -> np.ndarray:
        """Positions of the labels in ascending order of value. Discovered labels are sorted once
        per label set (each of :attr:`labels`, :attr:`diagonal`, :attr:`gt_counts`,
        :attr:`pred_counts` asked for it: six sorts of 65 536 ids, 15 ms of an 80 ms
        ``evaluate``). Keys are only appended (discovery, merges), never rewritten, so the label
        count tells a stale order."""
        n = int(self._state[cpu.NLAB])
        if self._fixed:
            return np.arange(n)
        held = self._sorted
        if held is not None and held[0] == n:
            return held[1]
        order = np.argsort(self._keys[:n], kind="stable")
        order.flags.writeable = False
        self._sorted = (n, order)
        return order

    @property
    def labels(self) -> np.ndarray:
        """Label values of the rows / columns, in order (int64, or uint64 for ids >= 2**63)."""
        self._fold()
        n = int(self._state[cpu.NLAB])
        keys = self._keys[:n][self._order()]
        if n and keys.max() >= np.uint64(1 << 63):
            return keys.copy()
        return keys.astype(np.int64)

    @property
    def num_classes(self) -> int:
        """Number of labels (rows) so far."""
        self._fold()
        return int(self._state[cpu.NLAB])

    @property
    def is_dense(self) -> bool:
        """True when the full K x K table is kept (False in diagonal + marginals mode)."""
        return self._dense

    @property
    def counts(self) -> np.ndarray:
        """The (K, K) int64 matrix, rows = ground truth, columns = prediction, in :attr:`labels` order."""
        self._fold()
        self._check_usable()
        if not self._dense:
            raise FastSegError(
                f"{self.num_classes} labels exceed dense_max={self.dense_max}: only the diagonal and the "
                "marginals are kept (every per-class metric is still exact); use .diagonal, .gt_counts "
                "and .pred_counts, or pass a larger dense_max"
            )
        n = int(self._state[cpu.NLAB])
        o = self._order()
        return self._acc.reshape(self._kcap, self._kcap)[:n, :n][np.ix_(o, o)].copy()

    @property
    def diagonal(self) -> np.ndarray:
        """True positives per label (int64), in :attr:`labels` order."""
        return self._marginals_raw()[2][self._order()].astype(np.int64)

    @property
    def gt_counts(self) -> np.ndarray:
        """Ground-truth voxels per label (row sums, the support), in :attr:`labels` order."""
        return self._marginals_raw()[0][self._order()].astype(np.int64)

    @property
    def pred_counts(self) -> np.ndarray:
        """Predicted voxels per label (column sums), in :attr:`labels` order."""
        return self._marginals_raw()[1][self._order()].astype(np.int64)

    @property
    def n_voxels(self) -> int:
        """Voxels counted (not ignored, not masked out)."""
        return int(self._marginals_raw()[0].sum())

    @property
    def n_ignored(self) -> int:
        """Ground-truth voxels skipped because they carry the ignore label."""
        return int(self._state[cpu.NIGNORED])

    @property
    def n_masked(self) -> int:
        """Voxels skipped because the mask is zero there."""
        return int(self._state[cpu.NMASKED])


    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        self._fold()
        n = int(self._state[cpu.NLAB])
        g, p, d = self._marginals_raw()
        table = self._acc.reshape(self._kcap, self._kcap)[:n, :n].copy() if self._dense else None
        return {
            "config": self._config,
            "ignore_label": self.ignore_label,
            "dense_max": self.dense_max,
            "keys": self._keys[:n].copy(),
            "table": table,
            "marginals": None if self._dense else (g.copy(), p.copy(), d.copy()),
            "n_ignored": int(self._state[cpu.NIGNORED]),
            "n_masked": self.n_masked,
            "poisoned": self._poisoned,
            "probability": self._prob,
            "channel_axis": self.channel_axis,
            "hist": self._hist if self._prob is not None else None,
            "prob_max": self._prob_max,
        }

    def __setstate__(self, st: dict[str, Any]) -> None:
        num_classes, labels = st["config"]
        self.__init__(
            num_classes, labels=labels, ignore_label=st["ignore_label"], dense_max=st["dense_max"],
            probability=st["probability"], channel_axis=st["channel_axis"], memory_limit=False,
        )  # fmt: skip
        self._widen()  # the counts restored may not fit int32
        if st["hist"] is not None:
            self._hist += st["hist"]
        self._prob_max = st.get("prob_max", self._prob_max)
        keys = st["keys"]
        idx = self._add_keys(keys).astype(np.intp)
        if st["table"] is not None:
            if not self._dense:
                g, p, d = st["table"].sum(axis=1), st["table"].sum(axis=0), np.diagonal(st["table"])
                for mine, theirs in zip(self._marginal_parts(), (g, p, d)):
                    mine[idx] += theirs
            else:
                self._acc.reshape(self._kcap, self._kcap)[np.ix_(idx, idx)] += st["table"]
        else:
            if self._dense:
                self._grow_labels_to_marginals()
            for mine, theirs in zip(self._marginal_parts(), st["marginals"]):
                mine[idx] += theirs
        self._state[cpu.NIGNORED] = st["n_ignored"]
        self._state[cpu.NMASKED] = st["n_masked"]
        self._poisoned = st["poisoned"]

    def __deepcopy__(self, memo: dict) -> ConfusionCounts:
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __repr__(self) -> str:
        mode = "dense" if self._dense else "diagonal+marginals"
        return f"ConfusionCounts(num_classes={self.num_classes}, n_voxels={self.n_voxels}, mode={mode})"


_NO_MASK = np.ones((1, 1, 1), dtype=np.uint8)
_NO_WORDS = np.zeros(1, dtype=np.uint64)
_NO_SIDE = np.zeros((2, 0), dtype=np.int64)
LISTED_RUNS = fast_compress()
"""Count runs through a list of run starts (:func:`~fastseg_eval.kernels.cpu.count_runs_listed`)
where the CPU compresses vectors in one instruction; else walk each block's bits."""
INT32_ROOM = (1 << 31) - 1  # voxels an int32 table takes: no cell can pass it
SIDE_MAX = 1 << 12  # folding a larger scratch table per chunk would cost more than it saves
_NO_HIST = np.zeros((1, 2, 1), dtype=np.int64)


@lru_cache(maxsize=8)
def _identity_maps(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The lookup table and the keys of the label space ``0..n-1`` (``n <= LUT_SIZE``): value
    ``v`` is index ``v``. Shared by every accumulator of that space, and never written: a fixed
    space refuses a value it does not hold instead of assigning it (``fixed`` in the kernels'
    ``_assign``, and :meth:`ConfusionCounts._add_keys` finds every key of its own space), and its
    capacity ``n`` never grows. Made per accumulator they cost fresh pages each time: 0.33 ms
    for each worker's accumulator of a run at 65 536 labels (0.75 MiB), 0.09 ms at K = 4."""
    lut = np.arange(cpu.LUT_SIZE, dtype=np.int32)
    lut[n:] = -1
    return lut, np.arange(n, dtype=np.uint64)


def _padded_zeros(n: int, dtype: Any = np.int64) -> np.ndarray:
    """Zeros (int64 unless told) with a cache line of padding on each side: the small tables of
    two workers must not share a cache line (false sharing halved two-thread throughput at K=4)."""
    pad = 64 // np.dtype(dtype).itemsize
    return np.zeros(n + 2 * pad, dtype=dtype)[pad : pad + n]


def _constant(a: np.ndarray) -> bool:
    """A broadcast of one value (every stride 0), as the engine hands unstored chunks."""
    return a.size > 1 and not any(a.strides)


def _flat_ok(gv: np.ndarray, pv: np.ndarray, mv: np.ndarray | None) -> bool:
    """Whether the flat 64-bit word kernel applies: contiguous chunks of equal 1- or 2-byte labels."""
    return (
        gv.itemsize == pv.itemsize
        and gv.itemsize in (1, 2)
        and gv.flags.c_contiguous
        and pv.flags.c_contiguous
        and (mv is None or mv.flags.c_contiguous)
    )


def _words(a1: np.ndarray, nwords: int) -> np.ndarray:
    """uint64 view of the first ``nwords`` words of contiguous 1-D ``a1`` (no copy)."""
    return a1.view(np.uint8)[: nwords * 8].view(np.uint64)


def _pieces(gv: np.ndarray, pv: np.ndarray, mv: np.ndarray | None, *, channels: bool = False):
    """Matching 3-D pieces ``(lead, piece)`` of gt, pred (with a trailing channel axis if
    ``channels``) and mask (a 1-voxel dummy when there is none)."""
    g_pieces = as_3d(gv)
    m_pieces = [((), _NO_MASK)] * len(g_pieces) if mv is None else as_3d(mv)
    return zip(g_pieces, _as_3d_channels(pv) if channels else as_3d(pv), m_pieces)


def _chunk_position(lead: tuple[int, ...], pos3: Any, ndim: int) -> tuple[int, ...]:
    """Chunk coordinates of position ``pos3`` in the 3-D piece at ``lead`` of an ``ndim``-d chunk."""
    inner = pos3[3 - ndim :] if ndim < 3 else pos3
    return tuple(lead) + tuple(int(x) for x in inner)


def _kernel_position(lead: tuple[int, ...], g3: np.ndarray, state: np.ndarray, ndim: int) -> tuple[int, ...]:
    """Chunk coordinates of the position a kernel stopped at in 3-D piece ``g3``."""
    return _chunk_position(lead, np.unravel_index(int(state[cpu.POS]), g3.shape), ndim)


def _shifted(position: tuple[int, ...] | None, offset: Any) -> tuple[int, ...] | None:
    """A chunk position moved to full-volume coordinates by the chunk's ``offset``."""
    if position is None or offset is None:
        return position
    return tuple(int(a) + int(b) for a, b in zip(offset, position))


def _mask_view(mask: np.ndarray) -> np.ndarray:
    """A mask as uint8 (nonzero = count), without a copy for bool and uint8 masks."""
    mv = mask if mask.dtype in (np.uint8, np.bool_) else (mask != 0)
    return mv.view(np.uint8)


def _as_3d_channels(a: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Like :func:`as_3d` for an array whose last axis is a channel axis."""
    nd = a.ndim - 1
    if nd <= 3:
        return [((), a.reshape((1,) * (3 - nd) + a.shape))]
    return [(idx, a[idx]) for idx in np.ndindex(a.shape[: nd - 3])]


def _resized(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=a.dtype)
    m = min(n, len(a))
    out[:m] = a[:m]
    return out
