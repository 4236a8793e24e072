"""The CUDA confusion reducer: a counter per worker that streams chunks through the GPU kernels.

The kernels and device helpers live in :mod:`fastseg_eval.kernels.cuda`; the label space (value
-> index map shared with the CPU kernels) in :mod:`fastseg_eval.labels.space`. Results come back
as a :class:`~fastseg_eval.reducers.confusion.ConfusionCounts`, merged like the CPU's.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from fastseg_eval.errors import FastSegError, InputError, LabelError
from fastseg_eval.kernels import cpu
from fastseg_eval.kernels.cuda import (
    GATHER,
    INITIAL_KCAP,
    MAX_BLOCKS,
    MIN_BLOCKS,
    NEW_BIG_SLOTS,
    NO_BAD,
    POOL_MAX_BYTES,
    ST_BAD,
    ST_NEW,
    ST_OVERFLOW,
    ST_SIZE,
    THREADS,
    api,
    as_device_array,
    count_pairs_kernel,
    is_device_array,
    launch_guard,
    table_layout,
)
from fastseg_eval.labels.space import (
    LabelTable,
    ignore_bits,
    label_message,
    label_view,
    table_capacity,
    value_of,
)
from fastseg_eval.reducers.base import Block
from fastseg_eval.reducers.confusion import ConfusionCounts

log = logging.getLogger("fastseg_eval")


def _unsigned_dtype(dt: np.dtype, role: str) -> tuple[np.dtype, int]:
    """The unsigned view dtype of label dtype ``dt`` and its negative threshold (see ``label_view``)."""
    view, signed_from = label_view(np.empty(0, dtype=dt), role)
    return view.dtype, signed_from



class _DeviceLabels(LabelTable):
    """The counter's label space on the host, and its current device copy (replaced, never
    modified, when labels are added: a kernel in flight keeps reading the version it was launched
    with)."""

    def __init__(self) -> None:
        super().__init__()
        self._device: tuple[Any, Any, Any] | None = None
        self._device_version = -1

    def on_device(self) -> tuple[Any, Any, Any]:
        if self._device is None or self._device_version != self.version:
            to = api.cuda.to_device
            self._device = (to(self.lut), to(self.hkeys), to(self.hvals))
            self._device_version = self.version
        return self._device


def _from_counts(template: ConfusionCounts, keys, table, marginals, n_ignored: int, n_masked: int):
    """A :class:`ConfusionCounts` like ``template`` holding these counts.

    Built through the accumulator's pickling state (the one serialised form it guarantees), so
    that label bookkeeping, dense / marginals storage and ordering stay ConfusionCounts's own.
    """
    state = template.spawn().__getstate__()
    state.update(
        keys=np.asarray(keys, dtype=np.uint64),
        table=table,
        marginals=marginals,
        n_ignored=int(n_ignored),
        n_masked=int(n_masked),
        poisoned=None,
    )
    out = type(template).__new__(type(template))
    out.__setstate__(state)
    return out


class _Chunk:
    """A chunk on the device, waiting for (or between) counting passes."""

    __slots__ = ("dg", "dp", "dm", "n", "shape", "offset", "g_dtype", "p_dtype", "params", "lo", "hi", "seq")


_POOL = threading.local()  # per thread: streams and staging buffers that finished counters left


def _take_slots() -> list[_Slot]:
    slots = getattr(_POOL, "slots", None)
    _POOL.slots = None
    return slots if slots is not None else [_Slot(), _Slot()]


def _give_back(slots: list[_Slot]) -> None:
    """Keep a finished counter's streams and pinned buffers for the thread's next counter (the
    dask engine makes one counter per block: pinned allocations are slow), unless they are big."""
    held = sum(int(b.nbytes) for s in slots for b in s.pinned.values())
    _POOL.slots = slots if held <= POOL_MAX_BYTES else None


def release_buffers() -> None:
    """Free the CUDA streams and pinned / device staging buffers cached by the calling thread."""
    _POOL.slots = None


class _Slot:
    """One of the two streams of a counter, with its staging buffers and discovery sets."""

    def __init__(self) -> None:
        c = api.cuda
        self.stream = c.stream()
        self.pinned: dict[str, Any] = {}
        self.device: dict[str, Any] = {}
        self.h_status = c.pinned_array(ST_SIZE, dtype=np.uint64)
        self.d_status = c.device_array(ST_SIZE, dtype=np.uint64)
        self.d_seen = None
        self.d_newbig = None
        self.chunk: _Chunk | None = None

    def buffers(self, role: str, nbytes: int) -> tuple[Any, Any]:
        """Pinned host and device byte buffers of at least ``nbytes`` for ``role``."""
        have = self.device.get(role)
        if have is None or have.shape[0] < nbytes:
            size = max(nbytes, 1 << 16)
            size = size + size // 4 if have is not None else size  # grow with some headroom
            c = api.cuda
            self.pinned.pop(role, None)
            self.device.pop(role, None)
            self.pinned[role] = c.pinned_array(size, dtype=np.uint8)
            self.device[role] = c.device_array(size, dtype=np.uint8)
        return self.pinned[role], self.device[role]


# ---------------------------------------------------------------------------- the counter
class CudaCounter:
    """Count chunks on the GPU into a :class:`~fastseg_eval.reducers.confusion.ConfusionCounts` (one per worker thread).

    ``add_chunk(gt, pred, mask=None, offset=...)`` (ground truth first) as many times as needed,
    then :meth:`finish`, which returns ``acc`` with the counts added. Chunks are counted
    asynchronously, two in flight: a :class:`~fastseg_eval.LabelError` in one chunk is raised by
    a later ``add_chunk`` call or by :meth:`finish`, with the position of the offending voxel
    in the full volume. Not thread-safe: use one counter per thread.

    Parameters
    ----------
    acc : ConfusionCounts
        Receives the counts in :meth:`finish`; its label space (``num_classes``, ``labels`` or
        discovery), ``ignore_label`` and ``dense_max`` decide how chunks are counted.
    """

    def __init__(self, acc: ConfusionCounts) -> None:
        self.acc = acc
        template = acc.spawn()
        # probability maps (threshold / argmax / curves) have no GPU kernels yet: the CPU ones count
        self.on_cpu = template.probability is not None
        if self.on_cpu:
            log.info("backend cuda: probability maps are thresholded and counted by the CPU kernels")
        self.ignore_label = acc.ignore_label
        self.fixed = template.num_classes > 0
        self.labels = _DeviceLabels()
        self.direct = False
        if self.fixed:
            values = np.asarray(template.labels).astype(np.uint64)
            self.direct = bool(np.array_equal(values, np.arange(len(values), dtype=np.uint64)))
            if not self.direct:
                self.labels.add(values)  # index order is the counter's own: finish() maps by value
            self.k = len(values)
            self.kcap = self.k
            self.dense = self.k <= acc.dense_max
        else:
            self.k = 0
            self.kcap = min(INITIAL_KCAP, max(acc.dense_max, 1))
            self.dense = self.kcap <= acc.dense_max
        self.dense_max = acc.dense_max
        self._slots: list[_Slot] | None = None
        self._table = None
        self._skipped = None
        self._dummy = None
        self._next = 0
        self._seq = 0
        self._failed: str | None = None
        self.chunks = 0
        self.passes = 0

    # -------------------------------------------------------------- device state
    def _ensure_device(self) -> None:
        if self._slots is not None:
            return
        c = api.cuda
        self._slots = _take_slots()
        self._table = c.to_device(np.zeros(self._width(), dtype=np.uint64))
        self._skipped = c.to_device(np.zeros(2, dtype=np.uint64))
        self._dummy = c.to_device(np.zeros(1, dtype=np.uint8))
        self._no_bad = c.pinned_array(ST_SIZE, dtype=np.uint64)
        self._no_bad[:] = 0
        self._no_bad[ST_BAD] = NO_BAD
        if self.direct:
            z = c.to_device(np.zeros(1, dtype=np.int32))
            self._direct_maps = (z, c.to_device(np.zeros(1, dtype=np.uint64)), z)
        if MAX_BLOCKS is None:
            self._max_blocks = 8 * int(c.get_current_device().MULTIPROCESSOR_COUNT)
        else:
            self._max_blocks = int(MAX_BLOCKS)

    def _width(self) -> int:
        return self.kcap * self.kcap if self.dense else 3 * self.kcap

    def _sync_all(self) -> None:
        for s in self._slots or ():
            s.stream.synchronize()

    def _grow(self, need: int) -> None:
        """Make the device table hold ``need`` labels (discovery), switching to marginals past dense_max."""
        if need <= self.kcap and (not self.dense or need <= self.dense_max):
            return
        self._sync_all()  # kernels in flight add into the old table
        old = self._table.copy_to_host().view(np.int64)
        old_k, old_dense = self.kcap, self.dense
        kcap, dense = table_capacity(old_k, need, old_dense, self.dense_max)
        n = min(self.labels.n, old_k)  # labels beyond the old capacity have no counts yet
        if old_dense:
            t = old.reshape(old_k, old_k)[:n, :n]
            parts = (t.sum(axis=1), t.sum(axis=0), np.diagonal(t))
        else:
            parts = tuple(old[i * old_k : i * old_k + n] for i in range(3))
        new = np.zeros(kcap * kcap if dense else 3 * kcap, dtype=np.int64)
        if dense:
            new.reshape(kcap, kcap)[:n, :n] = old.reshape(old_k, old_k)[:n, :n]
        else:
            for i, part in enumerate(parts):
                new[i * kcap : i * kcap + n] = part
        self.kcap, self.dense = kcap, dense
        self._table = api.cuda.to_device(new.view(np.uint64))

    # -------------------------------------------------------------------- input
    def _check_usable(self) -> None:
        if self._failed:
            raise FastSegError(
                f"this CUDA counter stopped at an invalid label ({self._failed}); start a new count"
            )

    def _put(self, slot: _Slot, role: str, a: Any) -> tuple[Any, np.dtype]:
        """The flat unsigned device view of label or mask chunk ``a`` (numpy or device array)."""
        if is_device_array(a):
            d = as_device_array(a, role)
            dt = np.dtype(d.dtype)
            if not dt.isnative:
                raise InputError(f"{role}: device arrays in non-native byte order ({dt}) are not supported")
            udt = _unsigned_dtype(dt, role)[0] if role != "mask" else _mask_dtype(dt)
            n = int(math.prod(d.shape))
            if n == 0:
                return None, dt
            if d.is_c_contiguous():
                flat = d.reshape(n) if d.ndim != 1 else d
                return (flat.view(udt) if udt != dt else flat), dt
            _, dbuf = slot.buffers(role, n * dt.itemsize)
            out = dbuf[: n * dt.itemsize].view(dt)
            pieces = [d] if d.ndim <= 3 else [d[idx] for idx in np.ndindex(*d.shape[:-3])]
            step = n // len(pieces)
            for k, piece in enumerate(pieces):
                blocks, threads = self._grid(step)
                with launch_guard():
                    GATHER[piece.ndim][blocks, threads, slot.stream](piece, out[k * step : (k + 1) * step])
            return (out.view(udt) if udt != dt else out), dt
        a = np.asarray(a)
        dt = a.dtype
        if role == "mask":
            if dt.kind == "b":
                view = a.view(np.uint8)
            elif dt.kind in "iu":
                view = a if dt.isnative else a.astype(dt.newbyteorder("="))
            else:
                view = (a != 0).view(np.uint8)
        else:
            view, _ = label_view(a, role)
        if view.size == 0:
            return None, dt
        nbytes = view.nbytes
        pinned, dbuf = slot.buffers(role, nbytes)
        host = pinned[:nbytes].view(view.dtype).reshape(view.shape)
        np.copyto(host, view)  # one host pass, same dtype (also makes strided chunks contiguous)
        dev = dbuf[:nbytes]
        dev.copy_to_device(pinned[:nbytes], stream=slot.stream)
        return dev.view(view.dtype), dt

    def _grid(self, n: int) -> tuple[int, int]:
        threads = THREADS
        blocks = max(MIN_BLOCKS, min(-(-n // threads), self._max_blocks))
        # each block's uint32 copies must not overflow: fewer than 2**31 voxels per block
        blocks = max(blocks, -(-n // (1 << 31)))
        return blocks, threads

    # ------------------------------------------------------------------ counting
    def add_chunk(self, gt: Any, pred: Any, mask: Any = None, *, offset: Any = None) -> None:
        """Count one chunk (ground truth first); numpy arrays or device arrays of any shape and dtype.

        ``offset`` is the chunk's position in the full volume, used in error messages.
        """
        self._check_usable()
        if self.on_cpu:
            host = [
                None if a is None else _to_host(a, role)
                for a, role in ((gt, "gt"), (pred, "pred"), (mask, "mask"))
            ]
            self.acc.add_chunk(host[0], host[1], host[2], offset=offset)
            self.chunks += 1
            return
        gshape, pshape = tuple(gt.shape), tuple(pred.shape)
        if gshape != pshape:
            raise InputError(f"gt chunk shape {gshape} differs from pred chunk shape {pshape}")
        if mask is not None and tuple(mask.shape) != gshape:
            raise InputError(f"mask chunk shape {tuple(mask.shape)} differs from gt chunk shape {gshape}")
        _unsigned_dtype(np.dtype(gt.dtype), "gt")  # the CPU backend's dtype errors, before any work
        _unsigned_dtype(np.dtype(pred.dtype), "pred")
        self._ensure_device()
        n = int(math.prod(gshape))
        self.chunks += 1
        if n == 0:
            return
        slot = self._slots[self._next]
        if slot.chunk is not None:  # normally already done: it was the previous call's "other" slot
            self._finish_chunk(slot)
        ch = _Chunk()
        try:
            ch.dg, ch.g_dtype = self._put(slot, "gt", gt)
            ch.dp, ch.p_dtype = self._put(slot, "pred", pred)
            ch.dm = None if mask is None else self._put(slot, "mask", mask)[0]
        except Exception:
            slot.stream.synchronize()
            raise
        ch.n, ch.shape = n, gshape
        ch.offset = None if offset is None else tuple(int(o) for o in offset)
        ignore, has_ignore = ignore_bits(self.ignore_label, ch.g_dtype)
        g_signed = _unsigned_dtype(ch.g_dtype, "gt")[1]
        p_signed = _unsigned_dtype(ch.p_dtype, "pred")[1]
        if self.direct:
            g_limit = min(self.k, g_signed) if g_signed else self.k
            p_limit = min(self.k, p_signed) if p_signed else self.k
        else:
            g_limit = p_limit = 0
        ch.params = (
            np.uint64(ignore), bool(has_ignore), bool(self.direct), np.uint64(g_limit), np.uint64(p_limit),
            np.uint64(g_signed), np.uint64(p_signed), bool(self.fixed),
        )  # fmt: skip
        ch.lo, ch.hi = 0, (self.k if self.fixed else self.labels.n)
        self._seq += 1
        ch.seq = self._seq
        slot.chunk = ch
        self._launch(slot, ch)
        self._next = 1 - self._next
        other = self._slots[self._next]
        if other.chunk is not None:  # the previous chunk: its kernel ran while this one was staged
            self._finish_chunk(other)

    def _launch(self, slot: _Slot, ch: _Chunk, first: bool = True) -> None:
        layout, hot, nsub, nslots = table_layout(self.kcap, self.dense)
        if self.direct:
            lut, hkeys, hvals = self._direct_maps
        else:
            lut, hkeys, hvals = self.labels.on_device()
        if slot.d_seen is None or (not self.fixed and slot.d_seen.shape[0] < cpu.LUT_SIZE):
            c = api.cuda
            if self.fixed:  # nothing is ever unknown: placeholders
                slot.d_seen = c.to_device(np.zeros(1, dtype=np.uint32))
                slot.d_newbig = c.to_device(np.zeros(1, dtype=np.uint64))
            else:  # zero, and kept zero between passes (see _collect_new)
                slot.d_seen = c.to_device(np.zeros(cpu.LUT_SIZE, dtype=np.uint32))
                slot.d_newbig = c.to_device(np.zeros(NEW_BIG_SLOTS, dtype=np.uint64))
        slot.d_status.copy_to_device(self._no_bad, stream=slot.stream)
        blocks, threads = self._grid(ch.n)
        has_mask = ch.dm is not None
        with launch_guard():
            count_pairs_kernel[blocks, threads, slot.stream](
                ch.dg, ch.dp, ch.dm if has_mask else self._dummy, np.int64(ch.n), has_mask, *ch.params,
                lut, hkeys, hvals, np.int64(ch.lo), np.int64(ch.hi), first,
                np.int64(layout), np.int64(self.kcap), np.int64(hot), np.int64(nsub), np.int64(nslots),
                self._table, self._skipped, slot.d_status, slot.d_seen, slot.d_newbig,
            )  # fmt: skip
        slot.d_status.copy_to_host(slot.h_status, stream=slot.stream)
        self.passes += 1

    def _finish_chunk(self, slot: _Slot) -> None:
        """Wait for the slot's chunk; raise its first invalid label, or count its new labels."""
        ch = slot.chunk
        while True:
            slot.stream.synchronize()
            st = np.array(slot.h_status, dtype=np.uint64)
            if st[ST_BAD] != NO_BAD:
                slot.chunk = None
                self._fail(slot, ch, int(st[ST_BAD]))
            if not (st[ST_NEW] or st[ST_OVERFLOW]):
                break
            values = self._collect_new(slot, bool(st[ST_OVERFLOW]))
            self.labels.add(values)
            self._grow(self.labels.n)
            ch.lo, ch.hi = ch.hi, self.labels.n
            self._launch(slot, ch, first=False)  # count the voxels whose labels the last pass lacked
        slot.chunk = None

    def _collect_new(self, slot: _Slot, overflow: bool) -> np.ndarray:
        c = api.cuda
        seen = slot.d_seen.copy_to_host()
        big = slot.d_newbig.copy_to_host()
        small = np.flatnonzero(seen).astype(np.uint64)
        values = np.concatenate([small, big[big != 0]])
        slot.d_seen = c.to_device(np.zeros(cpu.LUT_SIZE, dtype=np.uint32))
        size = len(big) * (4 if overflow else 1)
        slot.d_newbig = c.to_device(np.zeros(size, dtype=np.uint64))
        return values

    def _fail(self, slot: _Slot, ch: _Chunk, code: int) -> None:
        pos, which = divmod(code, 2)
        role = "gt" if which == 0 else "pred"
        dflat, dtype = (ch.dg, ch.g_dtype) if role == "gt" else (ch.dp, ch.p_dtype)
        bits = int(dflat[pos : pos + 1].copy_to_host()[0])
        value = value_of(bits, dtype)
        inner = tuple(int(x) for x in np.unravel_index(pos, ch.shape))
        full = inner if ch.offset is None else tuple(a + b for a, b in zip(ch.offset, inner))
        msg = label_message(role, value, full, *self.acc.config)
        self._failed = msg
        for s in self._slots or ():  # drop the other chunk in flight: the count is abandoned
            s.stream.synchronize()
            s.chunk = None
        raise LabelError(msg, role=role, value=value, position=full)

    def finish(self) -> ConfusionCounts:
        """Wait for every chunk, add the counts into ``acc`` and return it."""
        self._check_usable()
        if self._slots is None:
            return self.acc
        pending = sorted((s for s in self._slots if s.chunk is not None), key=lambda s: s.chunk.seq)
        for s in pending:
            self._finish_chunk(s)
        self._sync_all()
        table = self._table.copy_to_host().view(np.int64)
        n_ignored, n_masked = (int(x) for x in self._skipped.copy_to_host())
        keys = np.arange(self.k, dtype=np.uint64) if self.direct else self.labels.keys
        n, k = len(keys), self.kcap
        if self.dense:
            part, marg = table.reshape(k, k)[:n, :n].copy(), None
        else:
            part, marg = None, tuple(table[i * k : i * k + n].copy() for i in range(3))
        self.acc.merge(_from_counts(self.acc, keys, part, marg, n_ignored, n_masked))
        _give_back(self._slots)
        self._slots = None  # a later add_chunk starts a fresh device table
        self._table = None
        return self.acc


def _to_host(a: Any, role: str) -> np.ndarray:
    if is_device_array(a):
        return as_device_array(a, role).copy_to_host()
    return np.asarray(a)


def _mask_dtype(dt: np.dtype) -> np.dtype:
    if dt.kind == "b":
        return np.dtype(np.uint8)
    if dt.kind in "iu":
        return dt
    raise InputError(f"mask has dtype {dt}: a mask on the GPU must be bool or integer (nonzero = count)")


# ------------------------------------------------------------------------------ public API
def count_device(pred: Any, gt: Any, acc: ConfusionCounts, mask: Any = None) -> ConfusionCounts:
    """Count ``pred`` against ``gt`` (prediction first) on the GPU into ``acc``, and return it.

    ``pred``, ``gt`` and ``mask`` may be arrays already on the GPU (numba device arrays, CuPy
    arrays, anything with ``__cuda_array_interface__``): they are counted in place, without a
    copy to the host. numpy arrays are transferred in their own dtype. ``acc`` changes only if
    the whole count succeeds.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse                       # doctest: +SKIP
    >>> from numba import cuda                                        # doctest: +SKIP
    >>> from fastseg_eval.reducers.cuda import count_device            # doctest: +SKIP
    >>> gt = cuda.to_device(np.array([0, 1, 1, 2], np.uint8))          # doctest: +SKIP
    >>> pred = cuda.to_device(np.array([0, 1, 2, 2], np.uint8))        # doctest: +SKIP
    >>> count_device(pred, gt, fse.ConfusionMatrix(3)).counts.tolist()  # doctest: +SKIP
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    counter = CudaCounter(acc.spawn())
    counter.add_chunk(gt, pred, mask, offset=None)
    acc.merge(counter.finish())
    return acc


class CudaConfusion:
    """The confusion counts on the GPU, as a reducer (see :mod:`fastseg_eval.reducers.base`).

    Wraps a :class:`ConfusionCounts` (the caller's accumulator, or an empty one per worker). A
    worker's reducer streams its blocks through a :class:`CudaCounter`, made on the first block
    in the thread or task that uses it (device state never travels); ``finish`` brings the
    counts back to the host, and ``merge`` adds them into the wrapped accumulator.
    """

    halo = 0

    def __init__(self, counts: ConfusionCounts) -> None:
        self.counts = counts
        self._counter: CudaCounter | None = None

    def spawn(self) -> CudaConfusion:
        return CudaConfusion(self.counts.spawn())

    def add(self, block: Block) -> None:
        if self._counter is None:
            self._counter = CudaCounter(self.counts)
        core = block.core
        mask = None if block.mask is None else block.mask[core]
        self._counter.add_chunk(block.gt[core], block.pred[core], mask, offset=block.origin)

    def finish(self) -> ConfusionCounts:
        return self.counts if self._counter is None else self._counter.finish()

    def merge(self, other: ConfusionCounts) -> CudaConfusion:
        self.counts.merge(other)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"]
        self._counter = None


__all__ = ["CudaConfusion", "CudaCounter", "count_device", "release_buffers"]
