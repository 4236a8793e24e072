"""CUDA counting kernels (numba-cuda) and the per-worker :class:`CudaCounter`.

Importing this module raises :class:`ImportError` when numba-cuda (or the CUDA Python bindings
it needs) is not installed; :func:`fastseg_eval.backends.cuda_status` turns that into "not
installed". :func:`available` says whether kernels can run here: on a CUDA GPU with the CUDA
compiler libraries (libNVVM, NVRTC), or under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``
set before numba is imported; one Python thread per CUDA thread: it proves logic, not speed).
Nothing here has run on GPU hardware yet: see the README section "GPU (CUDA) backend" for what was checked and how.

How a chunk is counted
----------------------
``CudaCounter.add_chunk(gt, pred, mask, offset=...)`` (ground truth first: rows of the matrix)
takes numpy chunks of any shape, dtype and strides, or arrays already on the GPU (numba device
arrays, or any object with ``__cuda_array_interface__``, such as CuPy arrays). Host chunks are
copied once into a pinned staging buffer in their own label dtype (never widened; signed labels
travel as the unsigned view of the same width, bool as uint8) and sent on one of two CUDA
streams, so that the transfer and counting of one chunk overlap the reading of the next one
(double buffering). Device chunks are counted where they are (a non-contiguous one is first
gathered into a contiguous device buffer, on the device).

The counting kernel (:func:`_count_pairs_kernel`) runs a grid-stride loop over the flat chunk.
Each block keeps ``nsub`` interleaved uint32 sub-histograms in shared memory (thread ``t``
counts into copy ``t % nsub``; with one dominant class, usually background, the copies spread
what would otherwise be one contended counter), and adds them into the uint64 table in global
memory once at the end. Tables too large for shared memory keep only their hot part there:

* ``DENSE_FULL``: the whole ``K x K`` table (``K <= 90``, up to 32 copies);
* ``DENSE_DIAG``: dense tables above that keep the diagonal of the first ``hot`` labels in
  shared memory (a usable segmentation is mostly diagonal); other pairs use global atomics;
* ``MARGINALS``: the diagonal + marginals mode of :class:`~fastseg_eval.ConfusionMatrix`
  (``3 x K`` counts) keeps the first ``hot`` labels of each part in shared memory and uses global
  atomics for the rest.

Label values map to rows / columns exactly as in the CPU kernels: ``0..K-1`` used directly for
``num_classes=K``; through :func:`fastseg_eval.kernels.cpu.lookup_label` (the same ``@njit``
function the CPU kernel calls, compiled for the device) for explicit labels; and discovered
labels are found on the device: unknown values are recorded in a per-stream "seen" set
(a flag table for values below ``LUT_SIZE``, a lock-free hash set for larger ids), the host
adds them to the label space and counts the voxels that were left out in a follow-up pass
over the data still on the device. Pass ``j`` counts exactly the voxels whose larger label index
lies in ``[lo_j, hi_j)``, so every voxel is counted once however the label space grew between
passes and streams. The first invalid voxel (C order, gt before pred) is found with an atomic
minimum and reported like the CPU backend does: the same :class:`~fastseg_eval.LabelError`,
role, value and position in the full volume.

No warp intrinsics are used (the simulator lacks them): every shared update is an atomic, and
``syncthreads`` separates zeroing, counting and flushing. Probability maps (``threshold=``,
``channel_axis=``) have no GPU kernels yet: a counter for such an accumulator hands its chunks
to the CPU kernels.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import nullcontext
from typing import Any

import numpy as np

try:  # numba-cuda, the maintained CUDA target (the CUDA target inside numba is deprecated)
    import numba_cuda  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"numba-cuda is not installed ({e})") from e
from numba import cuda  # noqa: E402  (raises ImportError without the CUDA Python bindings)

from ..confusion import (  # noqa: E402
    ConfusionMatrix,
    _ignore_bits,
    _label_message,
    _lookup_many,
    _reinsert,
    label_view,
)
from ..errors import FastSegError, InputError, LabelError  # noqa: E402
from . import cpu  # noqa: E402

log = logging.getLogger("fastseg_eval")


def _simulator_active() -> bool:
    cfg = getattr(cuda, "config", None)
    if cfg is None:  # pragma: no cover - older numba-cuda keeps its config in numba
        from numba import config as cfg
    return bool(getattr(cfg, "ENABLE_CUDASIM", False))


SIMULATOR = _simulator_active()
"""True when numba's CUDA simulator replaced the CUDA target (``NUMBA_ENABLE_CUDASIM=1``)."""

NUMBA_CUDA_VERSION = getattr(numba_cuda, "__version__", "unknown")


def _device_fn(f: Any) -> Any:
    """A plain ``@njit`` helper that takes arrays, as the kernels call it: itself on a GPU
    (numba-cuda compiles it for the device), its Python source under the simulator (which runs
    kernels as Python and hands them array wrappers that the CPU target cannot take)."""
    return f.py_func if SIMULATOR else f


_lookup_label = _device_fn(cpu.lookup_label)
_hash_slot = cpu.hash_slot  # scalars only: the simulator can call the compiled CPU version (wrapping uint64)

# ------------------------------------------------------------------------------ constants
SHARED_WORDS = 8192  # uint32 counters per block in shared memory (32 KiB; a compile-time shape)
MAX_COPIES = 32  # sub-histogram copies at most (one per lane of a warp)
HOT_COPIES = 8  # copies of the hot part when a table does not fit
DENSE_FULL, DENSE_DIAG, MARGINALS = 0, 1, 2

_LUT_SIZE_U = np.uint64(cpu.LUT_SIZE)
_ONE32 = np.uint32(1)
_ONE64 = np.uint64(1)
_ZERO64 = np.uint64(0)
_NO_BAD = np.uint64(0xFFFFFFFFFFFFFFFF)
_TWO64 = np.uint64(2)
_INITIAL_KCAP = 16
_NEW_BIG_SLOTS = 1024  # initial size of the device hash set of newly seen ids >= LUT_SIZE

# status words written by the kernel (uint64)
ST_BAD = 0  # min over invalid voxels of 2 * position + (0 gt, 1 pred); _NO_BAD if none
ST_NEW = 1  # 1 if a value unknown to this pass's label snapshot was seen
ST_OVERFLOW = 2  # 1 if the device hash set of new big ids was full
ST_SIZE = 4

# launch geometry: real GPUs get full blocks; the simulator (one Python thread per CUDA thread)
# small grids. Module attributes so that tests can vary them.
THREADS = 32 if SIMULATOR else 256
MAX_BLOCKS = 2 if SIMULATOR else None  # None: 8 blocks per multiprocessor
# numba-cuda warns (NumbaPerformanceWarning) at every launch of fewer than 128 blocks; idle
# blocks cost microseconds, a warning per small chunk is noise (and an error under -W error)
MIN_BLOCKS = 1 if SIMULATOR else 128
POOL_MAX_BYTES = 256 << 20  # pinned staging memory a thread keeps between counters

# The simulator runs one kernel at a time and, while it runs, replaces this module's ``cuda``
# global by its fake module: kernels are launched under this lock there, and host code reaches
# the CUDA API through ``_api`` (an attribute, which the simulator does not replace).
_SIM_LOCK = threading.Lock()


class _Api:
    cuda = cuda


_api = _Api()


def _launch_guard() -> Any:
    return _SIM_LOCK if SIMULATOR else nullcontext()


# --------------------------------------------------------------------------- availability
def available(simulated: bool) -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and why not: ``(True, "")`` or ``(False, reason)``.

    ``simulated`` says whether ``NUMBA_ENABLE_CUDASIM=1`` is set now; the simulator counts only
    if it was set before numba was imported.
    """
    if SIMULATOR:
        return True, ""
    if simulated:
        return False, (
            "NUMBA_ENABLE_CUDASIM=1 was set after numba.cuda had been imported, so the simulator is "
            "not active; set it in the environment before starting Python"
        )
    try:
        ok = bool(_api.cuda.is_available())
    except Exception as e:  # pragma: no cover - driver oddities
        return False, f"the CUDA driver failed to initialise ({type(e).__name__}: {e})"
    if not ok:
        why = ""
        try:
            err = _api.cuda.cuda_error()
            if err is not None:
                why = " (" + " ".join(str(err).split()) + ")"
        except Exception:  # pragma: no cover
            pass
        return False, (
            f"no usable CUDA GPU was found{why}; use backend='cpu', or set NUMBA_ENABLE_CUDASIM=1 "
            "before starting Python to run the CUDA kernels in numba's (slow) simulator"
        )
    problem = compiler_problem()
    if problem:
        return False, (
            f"a GPU is present but the CUDA compiler libraries cannot be loaded ({problem}); install them "
            "with `pip install fastseg-eval[cuda12]` (CUDA 12 drivers) or `fastseg-eval[cuda13]` (CUDA 13 drivers)"
        )
    return True, ""


def compiler_problem() -> str | None:
    """Why numba-cuda cannot compile kernels here (libNVVM or NVRTC missing), or None."""
    try:
        from numba.cuda.cudadrv import nvrtc, nvvm

        checks = (("libNVVM", lambda: nvvm.NVVM().get_version()), ("NVRTC", nvrtc.get_supported_ccs))
    except (ImportError, AttributeError):  # pragma: no cover - another numba-cuda layout: compiling will tell
        return None
    for name, check in checks:
        try:
            check()
        except Exception as e:
            return f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


# -------------------------------------------------------------------------------- kernels
@cuda.jit(device=True)
def _note_unknown(v, seen, newbig, status):
    """Record label value ``v`` (uint64), unknown to this pass, in the per-stream seen sets."""
    if v < _LUT_SIZE_U:
        if seen[v] == 0:  # a stale read only costs one more atomic
            cuda.atomic.max(seen, v, _ONE32)
        return
    cap = newbig.shape[0]
    hmask = np.uint64(cap - 1)
    h = _hash_slot(v, hmask)
    for _ in range(cap):
        cur = newbig[h]
        if cur == v:
            return
        if cur == _ZERO64:  # free (0 < LUT_SIZE is never a key here)
            old = cuda.atomic.cas(newbig, h, _ZERO64, v)
            if old == _ZERO64 or old == v:
                return
        h = (h + _ONE64) & hmask
    cuda.atomic.max(status, ST_OVERFLOW, _ONE64)


@cuda.jit
def _count_pairs_kernel(
    g, p, m, n, has_mask, ignore, has_ignore,
    direct, g_limit, p_limit, g_signed_from, p_signed_from, fixed, lut, hkeys, hvals,
    lo, hi, first, layout, kcap, hot, nsub, nslots,
    table, skipped, status, seen, newbig,
):  # fmt: skip
    """Add the pairs of flat chunk ``g`` / ``p`` (gt / pred, unsigned views) into ``table``.

    ``direct``: labels are indices; ``v >= g_limit`` (resp. ``p_limit``) is invalid. Otherwise a
    value maps through ``lut`` / ``hkeys`` / ``hvals`` (:func:`cpu.lookup_label`); an unmapped
    value is invalid when ``fixed`` or negative (``>= *_signed_from``, nonzero for signed inputs),
    else unknown: recorded in ``seen`` / ``newbig`` for the host, not counted. A voxel is counted
    iff both indices are known and ``lo <= max(index) < hi``. ``skipped`` gets the ignored and
    masked-out voxel counts (on the ``first`` pass over a chunk), ``status`` the first invalid
    voxel and the discovery flags.
    """
    sh = cuda.shared.array(SHARED_WORDS, dtype=np.uint32)
    sh_skip = cuda.shared.array(2, dtype=np.uint64)
    tid = cuda.threadIdx.x
    nth = cuda.blockDim.x
    for s in range(tid, nslots * nsub, nth):
        sh[s] = 0
    if tid < 2:
        sh_skip[tid] = 0
    cuda.syncthreads()

    copy = tid % nsub
    n_ignored = 0
    n_masked = 0
    found = False
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        if has_mask and m[i] == 0:
            n_masked += 1
            continue
        gv = np.uint64(g[i])
        if has_ignore and gv == ignore:
            n_ignored += 1
            continue
        pv = np.uint64(p[i])
        if direct:
            ig = np.int64(gv) if gv < g_limit else np.int64(-2)
            ip = np.int64(pv) if pv < p_limit else np.int64(-2)
        else:
            ig = _lookup_label(gv, lut, hkeys, hvals)
            if ig < 0 and (fixed or (g_signed_from != _ZERO64 and gv >= g_signed_from)):
                ig = np.int64(-2)
            ip = _lookup_label(pv, lut, hkeys, hvals)
            if ip < 0 and (fixed or (p_signed_from != _ZERO64 and pv >= p_signed_from)):
                ip = np.int64(-2)
        if ig == -2 or ip == -2:  # invalid: remember the first one (C order, gt first)
            code = np.uint64(i) * _TWO64 + (_ZERO64 if ig == -2 else _ONE64)
            cuda.atomic.min(status, ST_BAD, code)
            continue
        if ig < 0 or ig >= hi or ip < 0 or ip >= hi:  # not in this pass's label snapshot
            if ig < 0 or ig >= hi:
                _note_unknown(gv, seen, newbig, status)
            if ip < 0 or ip >= hi:
                _note_unknown(pv, seen, newbig, status)
            found = True
            continue
        if ig < lo and ip < lo:  # counted by an earlier pass
            continue
        if layout == DENSE_FULL:
            cuda.atomic.add(sh, (ig * kcap + ip) * nsub + copy, _ONE32)
        elif layout == DENSE_DIAG:
            if ig == ip and ig < hot:
                cuda.atomic.add(sh, ig * nsub + copy, _ONE32)
            else:
                cuda.atomic.add(table, ig * kcap + ip, _ONE64)
        else:  # MARGINALS: gt counts [0, K), pred counts [K, 2K), diagonal [2K, 3K)
            if ig < hot:
                cuda.atomic.add(sh, ig * nsub + copy, _ONE32)
            else:
                cuda.atomic.add(table, ig, _ONE64)
            if ip < hot:
                cuda.atomic.add(sh, (hot + ip) * nsub + copy, _ONE32)
            else:
                cuda.atomic.add(table, kcap + ip, _ONE64)
            if ig == ip:
                if ig < hot:
                    cuda.atomic.add(sh, (2 * hot + ig) * nsub + copy, _ONE32)
                else:
                    cuda.atomic.add(table, 2 * kcap + ig, _ONE64)
    if first:  # skipped voxels are counted by a chunk's first pass only
        if n_ignored:
            cuda.atomic.add(sh_skip, 0, np.uint64(n_ignored))
        if n_masked:
            cuda.atomic.add(sh_skip, 1, np.uint64(n_masked))
    if found:
        cuda.atomic.max(status, ST_NEW, _ONE64)
    cuda.syncthreads()

    for s in range(tid, nslots, nth):  # flush: sum the copies of each slot into global memory
        total = _ZERO64
        base = s * nsub
        for c in range(nsub):
            total += np.uint64(sh[base + c])
        if total != _ZERO64:
            if layout == DENSE_FULL:
                gi = s
            elif layout == DENSE_DIAG:
                gi = s * kcap + s
            else:
                part = s // hot
                gi = part * kcap + (s - part * hot)
            cuda.atomic.add(table, gi, total)
    if tid < 2:
        if sh_skip[tid] != _ZERO64:
            cuda.atomic.add(skipped, tid, sh_skip[tid])


@cuda.jit
def _gather1(src, dst):
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit
def _gather2(src, dst):
    n1 = src.shape[1]
    for i in range(cuda.grid(1), src.shape[0] * n1, cuda.gridsize(1)):
        a = i // n1
        dst[i] = src[a, i - a * n1]


@cuda.jit
def _gather3(src, dst):
    """Copy a strided 3-d device array into the flat C-order device array ``dst``."""
    n1 = src.shape[1]
    n2 = src.shape[2]
    plane = n1 * n2
    for i in range(cuda.grid(1), src.shape[0] * plane, cuda.gridsize(1)):
        a = i // plane
        r = i - a * plane
        b = r // n2
        dst[i] = src[a, b, r - b * n2]


_GATHER = {1: _gather1, 2: _gather2, 3: _gather3}


# ------------------------------------------------------------------------- host helpers
def _layout(kcap: int, dense: bool) -> tuple[int, int, int, int]:
    """``(layout, hot, nsub, nslots)`` of the shared-memory part of a table of ``kcap`` labels."""
    if dense:
        width = kcap * kcap
        if width <= SHARED_WORDS:
            return DENSE_FULL, kcap, _pow2_floor(min(MAX_COPIES, SHARED_WORDS // width)), width
        hot = min(kcap, SHARED_WORDS // HOT_COPIES)
        return DENSE_DIAG, hot, HOT_COPIES, hot
    if 3 * kcap <= SHARED_WORDS // HOT_COPIES:
        nsub = _pow2_floor(min(MAX_COPIES, SHARED_WORDS // (3 * kcap)))
        return MARGINALS, kcap, nsub, 3 * kcap
    hot = min(kcap, SHARED_WORDS // (3 * HOT_COPIES))
    return MARGINALS, hot, HOT_COPIES, 3 * hot


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _is_device_array(obj: Any) -> bool:
    """True for numba device arrays (and the simulator's) and objects with ``__cuda_array_interface__``."""
    return bool(getattr(obj, "__cuda_ndarray__", False)) or hasattr(obj, "__cuda_array_interface__")


def _as_device_array(obj: Any, role: str) -> Any:
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    if SIMULATOR:
        raise InputError(
            f"{role}: {type(obj).__name__} exposes __cuda_array_interface__, which the CUDA simulator "
            "cannot read; pass a numba device array (numba.cuda.to_device) or a numpy array"
        )
    return _api.cuda.as_cuda_array(obj)


def _unsigned_dtype(dt: np.dtype, role: str) -> tuple[np.dtype, int]:
    """The unsigned view dtype of label dtype ``dt`` and its negative threshold (see ``label_view``)."""
    view, signed_from = label_view(np.empty(0, dtype=dt), role)
    return view.dtype, signed_from


def _value_of(bits: int, dtype: np.dtype) -> int:
    """The value of unsigned bit pattern ``bits`` read as ``dtype`` (bool, signed or unsigned)."""
    if dtype.kind == "b":
        return int(bits)
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return int(np.array(bits, dtype=unsigned).view(dtype.newbyteorder("=")))


class _Labels:
    """The counter's label space: value -> index map (LUT + hash, as the CPU kernels use) on the
    host, and its current device copy (replaced, never modified, when labels are added: a kernel
    in flight keeps reading the version it was launched with)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.lut = np.full(cpu.LUT_SIZE, -1, dtype=np.int32)
        self.hkeys = np.zeros(64, dtype=np.uint64)
        self.hvals = np.full(64, -1, dtype=np.int32)
        self.hcount = 0
        self.device: tuple[Any, Any, Any] | None = None

    @property
    def n(self) -> int:
        return len(self.keys)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        return _lookup_many(values.astype(np.uint64), self.lut, self.hkeys, self.hvals)

    def add(self, values: np.ndarray) -> int:
        """Append the values of ``values`` not yet known (sorted); returns how many were new."""
        values = np.unique(values.astype(np.uint64))
        new = values[self.lookup(values) < 0]
        if not len(new):
            return 0
        big = int(np.count_nonzero(new >= np.uint64(cpu.LUT_SIZE)))
        if big:
            cap = len(self.hkeys)
            while 2 * (self.hcount + big + 1) > cap:
                cap *= 2
            if cap != len(self.hkeys):
                used = self.hvals >= 0
                keys, vals = self.hkeys[used], self.hvals[used]
                self.hkeys = np.zeros(cap, dtype=np.uint64)
                self.hvals = np.full(cap, -1, dtype=np.int32)
                _reinsert(keys, vals, self.lut, self.hkeys, self.hvals)
        ids = np.arange(self.n, self.n + len(new), dtype=np.int32)
        _reinsert(new, ids, self.lut, self.hkeys, self.hvals)
        self.hcount += big
        self.keys = np.concatenate([self.keys, new])
        self.device = None
        return len(new)

    def on_device(self) -> tuple[Any, Any, Any]:
        if self.device is None:
            to = _api.cuda.to_device
            self.device = (to(self.lut), to(self.hkeys), to(self.hvals))
        return self.device


def _from_counts(template: ConfusionMatrix, keys, table, marginals, n_ignored: int, n_masked: int):
    """A :class:`ConfusionMatrix` like ``template`` holding these counts.

    Built through the accumulator's pickling state (the one serialised form it guarantees), so
    that label bookkeeping, dense / marginals storage and ordering stay ConfusionMatrix's own.
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
    out = ConfusionMatrix.__new__(ConfusionMatrix)
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
        c = _api.cuda
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
            c = _api.cuda
            self.pinned.pop(role, None)
            self.device.pop(role, None)
            self.pinned[role] = c.pinned_array(size, dtype=np.uint8)
            self.device[role] = c.device_array(size, dtype=np.uint8)
        return self.pinned[role], self.device[role]


# ---------------------------------------------------------------------------- the counter
class CudaCounter:
    """Count chunks on the GPU into a :class:`~fastseg_eval.ConfusionMatrix` (one per worker thread).

    ``add_chunk(gt, pred, mask=None, offset=...)`` (ground truth first) as many times as needed,
    then :meth:`finish`, which returns ``acc`` with the counts added. Chunks are counted
    asynchronously, two in flight: a :class:`~fastseg_eval.LabelError` in one chunk is raised by
    a later ``add_chunk`` call or by :meth:`finish`, with the position of the offending voxel
    in the full volume. Not thread-safe: use one counter per thread.

    Parameters
    ----------
    acc : ConfusionMatrix
        Receives the counts in :meth:`finish`; its label space (``num_classes``, ``labels`` or
        discovery), ``ignore_label`` and ``dense_max`` decide how chunks are counted.
    """

    def __init__(self, acc: ConfusionMatrix) -> None:
        self.acc = acc
        template = acc.spawn()
        # probability maps (threshold / argmax / curves) have no GPU kernels yet: the CPU ones count
        self.on_cpu = template.__getstate__().get("probability") is not None
        if self.on_cpu:
            log.info("backend cuda: probability maps are thresholded and counted by the CPU kernels")
        self.ignore_label = acc.ignore_label
        self.fixed = template.num_classes > 0
        self.labels = _Labels()
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
            self.kcap = min(_INITIAL_KCAP, max(acc.dense_max, 1))
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
        c = _api.cuda
        self._slots = _take_slots()
        self._table = c.to_device(np.zeros(self._width(), dtype=np.uint64))
        self._skipped = c.to_device(np.zeros(2, dtype=np.uint64))
        self._dummy = c.to_device(np.zeros(1, dtype=np.uint8))
        self._no_bad = c.pinned_array(ST_SIZE, dtype=np.uint64)
        self._no_bad[:] = 0
        self._no_bad[ST_BAD] = _NO_BAD
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
        kcap = old_k
        while kcap < need:
            kcap *= 2
        dense = old_dense and need <= self.dense_max
        if dense:
            kcap = min(kcap, self.dense_max)
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
        self._table = _api.cuda.to_device(new.view(np.uint64))

    # -------------------------------------------------------------------- input
    def _check_usable(self) -> None:
        if self._failed:
            raise FastSegError(
                f"this CUDA counter stopped at an invalid label ({self._failed}); start a new count"
            )

    def _put(self, slot: _Slot, role: str, a: Any) -> tuple[Any, np.dtype]:
        """The flat unsigned device view of label or mask chunk ``a`` (numpy or device array)."""
        if _is_device_array(a):
            d = _as_device_array(a, role)
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
                with _launch_guard():
                    _GATHER[piece.ndim][blocks, threads, slot.stream](piece, out[k * step : (k + 1) * step])
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
        ignore, has_ignore = _ignore_bits(self.ignore_label, ch.g_dtype)
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
        layout, hot, nsub, nslots = _layout(self.kcap, self.dense)
        if self.direct:
            lut, hkeys, hvals = self._direct_maps
        else:
            lut, hkeys, hvals = self.labels.on_device()
        if slot.d_seen is None or (not self.fixed and slot.d_seen.shape[0] < cpu.LUT_SIZE):
            c = _api.cuda
            if self.fixed:  # nothing is ever unknown: placeholders
                slot.d_seen = c.to_device(np.zeros(1, dtype=np.uint32))
                slot.d_newbig = c.to_device(np.zeros(1, dtype=np.uint64))
            else:  # zero, and kept zero between passes (see _collect_new)
                slot.d_seen = c.to_device(np.zeros(cpu.LUT_SIZE, dtype=np.uint32))
                slot.d_newbig = c.to_device(np.zeros(_NEW_BIG_SLOTS, dtype=np.uint64))
        slot.d_status.copy_to_device(self._no_bad, stream=slot.stream)
        blocks, threads = self._grid(ch.n)
        has_mask = ch.dm is not None
        with _launch_guard():
            _count_pairs_kernel[blocks, threads, slot.stream](
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
            if st[ST_BAD] != _NO_BAD:
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
        c = _api.cuda
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
        value = _value_of(bits, dtype)
        inner = tuple(int(x) for x in np.unravel_index(pos, ch.shape))
        full = inner if ch.offset is None else tuple(a + b for a, b in zip(ch.offset, inner))
        msg = _label_message(role, value, full, self.acc)
        self._failed = msg
        for s in self._slots or ():  # drop the other chunk in flight: the count is abandoned
            s.stream.synchronize()
            s.chunk = None
        raise LabelError(msg, role=role, value=value, position=full)

    def finish(self) -> ConfusionMatrix:
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
    if _is_device_array(a):
        return _as_device_array(a, role).copy_to_host()
    return np.asarray(a)


def _mask_dtype(dt: np.dtype) -> np.dtype:
    if dt.kind == "b":
        return np.dtype(np.uint8)
    if dt.kind in "iu":
        return dt
    raise InputError(f"mask has dtype {dt}: a mask on the GPU must be bool or integer (nonzero = count)")


# ------------------------------------------------------------------------------ public API
def count_device(pred: Any, gt: Any, acc: ConfusionMatrix, mask: Any = None) -> ConfusionMatrix:
    """Count ``pred`` against ``gt`` (prediction first) on the GPU into ``acc``, and return it.

    ``pred``, ``gt`` and ``mask`` may be arrays already on the GPU (numba device arrays, CuPy
    arrays, anything with ``__cuda_array_interface__``): they are counted in place, without a
    copy to the host. numpy arrays are transferred in their own dtype. ``acc`` changes only if
    the whole count succeeds.

    Examples
    --------
    >>> import numpy as np, fastseg_eval as fse                       # doctest: +SKIP
    >>> from numba import cuda                                        # doctest: +SKIP
    >>> from fastseg_eval.kernels.cuda import count_device             # doctest: +SKIP
    >>> gt = cuda.to_device(np.array([0, 1, 1, 2], np.uint8))          # doctest: +SKIP
    >>> pred = cuda.to_device(np.array([0, 1, 2, 2], np.uint8))        # doctest: +SKIP
    >>> count_device(pred, gt, fse.ConfusionMatrix(3)).counts.tolist()  # doctest: +SKIP
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    counter = CudaCounter(acc.spawn())
    counter.add_chunk(gt, pred, mask, offset=None)
    acc.merge(counter.finish())
    return acc


__all__ = [
    "CudaCounter",
    "available",
    "compiler_problem",
    "count_device",
    "release_buffers",
    "SIMULATOR",
    "NUMBA_CUDA_VERSION",
]
