"""CUDA counting kernels (numba-cuda) and the per-worker :class:`CudaCounter`.

Importing this module raises :class:`ImportError` when numba-cuda (or the CUDA Python bindings
it needs) is not installed; :func:`fastseg_eval.reducers.backends.cuda_status` turns that into "not
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

The counting kernel (:func:`count_pairs_kernel`) runs a grid-stride loop over the flat chunk.
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
import threading
from contextlib import nullcontext
from typing import Any

import numpy as np

try:  # numba-cuda, the maintained CUDA target (the CUDA target inside numba is deprecated)
    import numba_cuda  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"numba-cuda is not installed ({e})") from e
from numba import cuda  # noqa: E402  (raises ImportError without the CUDA Python bindings)

from fastseg_eval.errors import InputError  # noqa: E402
from fastseg_eval.kernels import cpu  # noqa: E402

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
NO_BAD = np.uint64(0xFFFFFFFFFFFFFFFF)
_TWO64 = np.uint64(2)
INITIAL_KCAP = 16
NEW_BIG_SLOTS = 1024  # initial size of the device hash set of newly seen ids >= LUT_SIZE

# status words written by the kernel (uint64)
ST_BAD = 0  # min over invalid voxels of 2 * position + (0 gt, 1 pred); NO_BAD if none
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
# the CUDA API through ``api`` (an attribute, which the simulator does not replace).
_SIM_LOCK = threading.Lock()


class _Api:
    cuda = cuda


api = _Api()


def launch_guard() -> Any:
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
        ok = bool(api.cuda.is_available())
    except Exception as e:  # pragma: no cover - driver oddities
        return False, f"the CUDA driver failed to initialise ({type(e).__name__}: {e})"
    if not ok:
        why = ""
        try:
            err = api.cuda.cuda_error()
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
def count_pairs_kernel(
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
            # negative values are invalid even where their bits equal a known label
            if (ig < 0 and fixed) or (g_signed_from != _ZERO64 and gv >= g_signed_from):
                ig = np.int64(-2)
            ip = _lookup_label(pv, lut, hkeys, hvals)
            if (ip < 0 and fixed) or (p_signed_from != _ZERO64 and pv >= p_signed_from):
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


GATHER = {1: _gather1, 2: _gather2, 3: _gather3}


# ------------------------------------------------------------------------- host helpers
def table_layout(kcap: int, dense: bool) -> tuple[int, int, int, int]:
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


def is_device_array(obj: Any) -> bool:
    """True for numba device arrays (and the simulator's) and objects with ``__cuda_array_interface__``."""
    return bool(getattr(obj, "__cuda_ndarray__", False)) or hasattr(obj, "__cuda_array_interface__")


def as_device_array(obj: Any, role: str) -> Any:
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    if SIMULATOR:
        raise InputError(
            f"{role}: {type(obj).__name__} exposes __cuda_array_interface__, which the CUDA simulator "
            "cannot read; pass a numba device array (numba.cuda.to_device) or a numpy array"
        )
    return api.cuda.as_cuda_array(obj)
