"""CPU kernels for probability maps: threshold / argmax to labels, and threshold-sweep histograms.

Each kernel reads one chunk of probabilities (binary: same shape as the 3-D gt chunk; per class:
an extra trailing channel axis), writes the predicted labels of the chunk into ``out`` and, when
``nbins > 0``, adds into ``hist`` (int64, shape ``(classes, 2, nbins + 1)``): axis 1 is
"gt is not this class" (0) / "gt is this class" (1); the last axis is a probability bin.

Binning is exact for the test "p > t" at the ``nbins`` thresholds ``edges[i] = (i + 0.5) / nbins``:
bin ``b`` holds ``edges[b - 1] < p <= edges[b]`` (bin 0: ``p <= edges[0]``; bin ``nbins``:
``p > edges[-1]``), so the number of voxels with ``p > edges[i]`` is ``hist[..., i + 1:].sum()``.
Thresholds sit between the levels ``k / nbins``: a map quantised to those levels (even with
float32 rounding) puts every level in its own bin, so the curves are then exact.

Values are read as ``value / scale`` in float64 (``scale`` 1 for float maps, e.g. 255 for uint8
maps). NaN and values outside [0, 1] stop the kernel with ``BAD_PROB`` and the position; masked
and ignored voxels are not read.
"""

from __future__ import annotations

import numpy as np

from fastseg_eval.kernels.jit import njit  # numba.njit, with the on-disk cache outside the package

OK = 0
BAD_PROB = 5

# slots of the int64 state array (shared layout with kernels.cpu)
POS = 4
VALUE_F = 0  # offending value, in the float64 ``fstate`` array


@njit(nogil=True, cache=True, inline="always")
def prob_bin(p, edges, nbins):
    """Bin of probability ``p`` (float64 in [0, 1]) such that edges[b-1] < p <= edges[b].

    ``floor(p * nbins + 0.5)`` is that bin except within rounding distance of an edge, where
    the edges themselves decide (rare, so the common path does no memory access).
    """
    y = p * nbins + 0.5
    b = np.int64(y)
    f = y - b
    if f < 1e-6 or f > 1.0 - 1e-6:
        if b > nbins:
            b = nbins
        if b > 0 and p <= edges[b - 1]:
            b -= 1
        elif b < nbins and p > edges[b]:
            b += 1
    return b


@njit(nogil=True, cache=True)
def threshold_chunk(
    prob, scale, threshold, gt, mask, has_mask, ignore, has_ignore, out, hist, edges, nbins, state, fstate
):  # fmt: skip
    """Binary map: ``out = prob / scale > threshold``; sweep histogram of class 1 (gt == 1).

    Equal consecutive (gt side, bin) pairs accumulate in a register run before reaching
    ``hist``: clipped maps put long runs into the bins of 0 and 1.
    """
    n0, n1, n2 = prob.shape
    one = np.uint64(1)
    run_side = 0
    run_bin = 0
    run_w = 0
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = 0
                if has_mask and mask[i, j, k] == 0:
                    continue
                g = np.uint64(gt[i, j, k])
                if has_ignore and g == ignore:
                    continue
                p = np.float64(prob[i, j, k]) / scale
                if not (p >= 0.0 and p <= 1.0):  # NaN fails both tests
                    hist[0, run_side, run_bin] += run_w
                    state[POS] = (i * n1 + j) * n2 + k
                    fstate[VALUE_F] = np.float64(prob[i, j, k])
                    return BAD_PROB
                if p > threshold:
                    out[i, j, k] = 1
                if nbins > 0:
                    side = 1 if g == one else 0
                    b = prob_bin(p, edges, nbins)
                    if side == run_side and b == run_bin:
                        run_w += 1
                    else:
                        hist[0, run_side, run_bin] += run_w
                        run_side = side
                        run_bin = b
                        run_w = 1
    hist[0, run_side, run_bin] += run_w
    return OK


@njit(nogil=True, cache=True)
def argmax_chunk(prob, scale, gt, mask, has_mask, ignore, has_ignore, out, hist, edges, nbins, state, fstate):
    """Per-class map (channel axis last): ``out`` = first channel of the largest probability.

    With ``nbins > 0``, channel ``c``'s probability goes into the histogram of class ``c``,
    split by whether the gt label is ``c``.
    """
    n0, n1, n2, nc = prob.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = 0
                if has_mask and mask[i, j, k] == 0:
                    continue
                g = np.uint64(gt[i, j, k])
                if has_ignore and g == ignore:
                    continue
                best = -1.0
                arg = 0
                for c in range(nc):
                    p = np.float64(prob[i, j, k, c]) / scale
                    if not (p >= 0.0 and p <= 1.0):
                        state[POS] = ((i * n1 + j) * n2 + k) * nc + c
                        fstate[VALUE_F] = np.float64(prob[i, j, k, c])
                        return BAD_PROB
                    if p > best:
                        best = p
                        arg = c
                    if nbins > 0:
                        hist[c, 1 if g == np.uint64(c) else 0, prob_bin(p, edges, nbins)] += 1
                out[i, j, k] = arg
    return OK
