"""Hypothesis strategies for label volumes, and the independent references the tests compare against.

The references never import fastseg_eval: labels are mapped to indices with ``np.unique`` and a
plain dict, and pairs are counted with ``np.bincount`` on int64 codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np

# ------------------------------------------------------------------------------------ dtypes
UNSIGNED = ["uint8", "uint16", "uint32", "uint64"]
SIGNED = ["int8", "int16", "int32", "int64"]
LABEL_DTYPES = [np.dtype(d) for d in [*UNSIGNED, *SIGNED, "bool"]]
BIG_ENDIAN = [np.dtype(">u2"), np.dtype(">i4"), np.dtype(">u8")]
# a few dtypes for the tests that do not sweep every pair (numba compiles per dtype and layout)
FEW_DTYPES = [np.dtype(d) for d in ("uint8", "int16")]


def dtype_range(dt: np.dtype) -> tuple[int, int]:
    """Smallest and largest value of a label dtype (bool: 0, 1)."""
    dt = np.dtype(dt)
    if dt.kind == "b":
        return 0, 1
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def label_pool(hi: int, n: int, rng: np.random.Generator, *, big: bool = False) -> list[int]:
    """``n`` distinct label values in ``0..hi`` (values >= 65536 up to ``hi`` itself if ``big``)."""
    n = max(1, min(n, hi + 1))
    if big and hi >= 1 << 16:
        # values that go through the hash path: >= 65536, and the very top of the range
        cands = {hi, hi - 1, hi - 2, 1 << 16, (1 << 16) + 1, hi // 2 + 1, hi // 3}
        while len(cands) < 2 * n:
            cands.add(int(rng.integers(1 << 16, hi, endpoint=True, dtype=np.uint64)))
        vals = sorted(cands)
        return [vals[i] for i in rng.choice(len(vals), size=n, replace=False)]
    top = min(hi, max(n - 1, 11))
    return [int(v) for v in rng.choice(top + 1, size=n, replace=False)]


def make_labels(
    shape: tuple[int, ...], dt: np.dtype, pool: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Array of ``shape`` and dtype ``dt`` with values drawn from ``pool`` (python ints that fit ``dt``)."""
    values = np.array([int(v) for v in pool], dtype=np.dtype(dt))
    return values[rng.integers(0, len(values), size=shape)]


def perturb(gt: np.ndarray, pred_dtype: np.dtype, pool: Sequence[int], agree: float, rng) -> np.ndarray:
    """A prediction equal to ``gt`` on about ``agree`` of the voxels, random from ``pool`` elsewhere.

    Every value of ``gt`` must fit ``pred_dtype``.
    """
    pred = make_labels(gt.shape, pred_dtype, pool, rng)
    sel = rng.random(gt.shape) < agree
    pred[sel] = np.array([int(v) for v in gt[sel].tolist()], dtype=np.dtype(pred_dtype))
    return pred


# --------------------------------------------------------------------------------- layouts
LAYOUTS = ("contiguous", "fortran", "step", "reversed", "transpose")


def with_layout(a: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """The same values as ``a`` in a different memory layout (a non-contiguous view, mostly)."""
    if layout == "contiguous" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "step":  # every other element of a bigger buffer on every axis
        big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "reversed":  # negative strides
        big = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        return big[tuple(slice(None, None, -1) for _ in a.shape)]
    if layout == "transpose":  # a transposed view of a C array holding the transposed data
        perm = tuple(rng.permutation(a.ndim))
        inv = tuple(np.argsort(perm))
        return np.ascontiguousarray(a.transpose(perm)).transpose(inv)
    raise ValueError(layout)


# -------------------------------------------------------------------------------- strategies
def shapes(min_dims: int = 1, max_dims: int = 4, max_side: int = 9, max_voxels: int = 2000):
    """Array shapes of 1-4 axes, odd sizes and size-1 axes included, not too many voxels."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side).filter(
        lambda s: math.prod(s) <= max_voxels
    )


seeds = st.integers(0, 2**32 - 1)


@st.composite
def label_spaces(draw, present: Sequence[int], dt_max: int, exclude: Sequence[int] = ()):
    """How the label space is given: discovered, ``num_classes`` or an explicit unsorted ``labels`` list.

    Returns ``(mode, value)`` with ``mode`` in ``{"discover", "num_classes", "labels"}``. The given
    space always contains ``present`` (so counting succeeds) and may hold labels absent from the data,
    never one of ``exclude``.
    """
    mode = draw(st.sampled_from(["discover", "num_classes", "labels"]))
    if mode == "discover":
        return mode, None
    if mode == "num_classes":
        top = max(present, default=0)
        return mode, top + 1 + draw(st.integers(0, 3))
    extra_pool = [v for v in range(0, min(dt_max, 40) + 1) if v not in present and v not in exclude]
    extra = draw(st.lists(st.sampled_from(extra_pool), min_size=0 if present else 1, max_size=3, unique=True))
    labels = list(present) + extra
    order = draw(st.permutations(labels))
    if len(order) > 1 and list(order) == sorted(order):
        order = list(reversed(order))  # make sure the order is not the sorted one
    return mode, [int(x) for x in order]


@st.composite
def volume_pairs(
    draw,
    dtypes: Sequence[np.dtype] = FEW_DTYPES,
    *,
    min_dims: int = 1,
    max_dims: int = 4,
    max_voxels: int = 2000,
    max_labels: int = 7,
    big_values: bool = False,
    layouts: Sequence[str] = LAYOUTS,
    same_layout: bool = True,
):
    """``(pred, gt, info)``: two label volumes of one shape with chosen dtypes and layouts.

    ``info`` holds ``pool`` (label values used), ``seed`` and the chosen layouts. numba compiles
    one kernel per (dtype, layout) combination, so by default gt and pred share one layout.
    """
    gdt = draw(st.sampled_from(list(dtypes)))
    pdt = draw(st.sampled_from(list(dtypes)))
    shape = draw(shapes(min_dims, max_dims, max_voxels=max_voxels))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    hi = min(dtype_range(gdt)[1], dtype_range(pdt)[1])
    n = draw(st.integers(1, max_labels))
    pool = label_pool(hi, n, rng, big=big_values)
    gt = make_labels(shape, gdt, pool, rng)
    pred = perturb(gt, pdt, pool, draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), rng)
    lg = draw(st.sampled_from(list(layouts)))
    lp = lg if same_layout else draw(st.sampled_from(list(layouts)))
    info = {"pool": pool, "seed": seed, "layouts": (lg, lp), "dtypes": (gdt, pdt)}
    return with_layout(pred, lp, rng), with_layout(gt, lg, rng), info


@st.composite
def masks(draw, shape: tuple[int, ...]):
    """None, a bool mask, or an integer mask (nonzero = count) of ``shape``."""
    kind = draw(st.sampled_from([None, "bool", "uint8", "int32"]))
    if kind is None:
        return None
    rng = np.random.default_rng(draw(seeds))
    frac = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    keep = rng.random(shape) < frac
    if kind == "bool":
        return keep
    vals = rng.integers(1, 5, size=shape).astype(kind)
    return np.where(keep, vals, 0).astype(kind)


def chunk_shapes(shape: tuple[int, ...]):
    """Any regular chunk shape for ``shape`` (sides from 1 to the full axis)."""
    return st.tuples(*(st.integers(1, max(1, s)) for s in shape))


# ----------------------------------------------------------------------------- references
def _pyints(a: np.ndarray) -> list[int]:
    return [int(x) for x in a.tolist()]


def reference_confusion(
    pred,
    gt,
    *,
    mask=None,
    ignore_label: int | None = None,
    labels: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """``(cm, labels)``: rows = gt, columns = pred, by ``np.bincount`` on int64 codes.

    Voxels are kept where ``mask`` is nonzero and ``gt != ignore_label``. ``labels`` default to
    the sorted values present (after the filter) in either volume. Raises ``KeyError`` if a kept
    value is not in ``labels``.
    """
    g = np.asarray(gt).reshape(-1)
    p = np.asarray(pred).reshape(-1)
    keep = np.ones(g.shape, dtype=bool)
    if mask is not None:
        keep &= np.asarray(mask).reshape(-1) != 0
    if ignore_label is not None:
        ug_all, inv_all = np.unique(g, return_inverse=True)
        hit = np.array([int(v) == ignore_label for v in ug_all.tolist()], dtype=bool)
        if hit.any():
            keep &= ~hit[inv_all.reshape(-1)]
    g, p = g[keep], p[keep]
    ug, ginv = np.unique(g, return_inverse=True)
    up, pinv = np.unique(p, return_inverse=True)
    if labels is None:
        labels = sorted(set(_pyints(ug)) | set(_pyints(up)))
    labels = [int(x) for x in labels]
    index = {v: i for i, v in enumerate(labels)}
    gmap = np.array([index[v] for v in _pyints(ug)], dtype=np.int64)
    pmap = np.array([index[v] for v in _pyints(up)], dtype=np.int64)
    k = len(labels)
    codes = gmap[ginv.reshape(-1)] * np.int64(k) + pmap[pinv.reshape(-1)] if g.size else np.zeros(0, np.int64)
    cm = np.bincount(codes.astype(np.int64), minlength=k * k).astype(np.int64).reshape(k, k)
    return cm, labels


def reference_marginals(pred, gt, *, mask=None, ignore_label=None):
    """``(labels, diagonal, gt_counts, pred_counts)`` without a K x K table (for many labels)."""
    g = np.asarray(gt).reshape(-1)
    p = np.asarray(pred).reshape(-1)
    keep = np.ones(g.shape, dtype=bool)
    if mask is not None:
        keep &= np.asarray(mask).reshape(-1) != 0
    if ignore_label is not None:
        keep &= np.array([int(v) != ignore_label for v in g.tolist()], dtype=bool)
    g, p = g[keep], p[keep]
    labels = sorted(set(_pyints(np.unique(g))) | set(_pyints(np.unique(p))))
    arr = np.array(labels, dtype=np.uint64 if labels and labels[-1] >= 2**63 else np.int64)
    gi = np.searchsorted(arr, g.astype(arr.dtype))
    pi = np.searchsorted(arr, p.astype(arr.dtype))
    k = len(labels)
    diag = np.bincount(gi[gi == pi], minlength=k).astype(np.int64)
    return (
        labels,
        diag,
        np.bincount(gi, minlength=k).astype(np.int64),
        np.bincount(pi, minlength=k).astype(np.int64),
    )


# ------------------------------------------------------------------ metric formulas (exact)
def _div(num, den):
    """Exact ratio as a Fraction, or None when the denominator is zero."""
    if num is None or den is None or den == 0:
        return None
    return Fraction(num) / Fraction(den)


def _sub(a, b):
    return None if a is None or b is None else a - b


def _add(a, b):
    return None if a is None or b is None else a + b


def _sqrt(x):
    return None if x is None else math.sqrt(x)


def reference_metric(name: str, tp: int, fp: int, fn: int, tn: int, *, alpha=0.5, beta=0.5, smooth=0.0):
    """Value of metric ``name`` from the four counts, written from the textbook definitions.

    Returns a float, or None where a denominator in the definition is zero.
    """
    tpr = _div(tp, tp + fn)
    tnr = _div(tn, tn + fp)
    ppv = _div(tp, tp + fp)
    npv = _div(tn, tn + fn)
    fpr = _div(fp, fp + tn)
    if name == "accuracy":
        v = _div(tp + tn, tp + fp + fn + tn)
    elif name == "precision":
        v = ppv
    elif name == "recall":
        v = tpr
    elif name == "specificity":
        v = tnr
    elif name in ("dice", "iou", "tversky"):
        if name == "dice":
            num, den = 2 * tp, 2 * tp + fp + fn
        elif name == "iou":
            num, den = tp, tp + fp + fn
        else:
            num, den = tp, tp + Fraction(alpha) * fp + Fraction(beta) * fn
        num, den = Fraction(num) + Fraction(smooth), Fraction(den) + Fraction(smooth)
        v = None if den == 0 else num / den
    elif name == "npv":
        v = npv
    elif name == "fpr":
        v = fpr
    elif name == "fnr":
        v = _div(fn, fn + tp)
    elif name == "fdr":
        v = _div(fp, fp + tp)
    elif name == "for":
        v = _div(fn, fn + tn)
    elif name == "balanced_accuracy":
        s = _add(tpr, tnr)
        v = None if s is None else s / 2
    elif name == "informedness":
        v = _sub(_add(tpr, tnr), 1)
    elif name == "markedness":
        v = _sub(_add(ppv, npv), 1)
    elif name == "mcc":
        prod = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
        v = None if prod == 0 else (tp * tn - fp * fn) / math.sqrt(prod)
    elif name == "fowlkes_mallows":
        v = None if ppv is None or tpr is None else math.sqrt(ppv * tpr)
    elif name == "prevalence_threshold":
        if tpr is None or fpr is None or tpr == fpr:
            v = None
        else:
            v = (math.sqrt(tpr * fpr) - fpr) / (tpr - fpr)
    elif name == "volume_similarity":
        d = _div(abs(fn - fp), 2 * tp + fp + fn)
        v = None if d is None else 1 - d
    else:
        raise KeyError(name)
    return None if v is None else float(v)


def apply_policy(v, empty: str) -> float:
    """The value reported for a reference value ``v`` (None = undefined) under an empty policy."""
    if v is None:
        return {"nan": float("nan"), "zero": 0.0, "one": 1.0}[empty]
    return float(v)


def reference_overall(cm: np.ndarray) -> dict[str, float | None]:
    """Multi-class accuracy, balanced accuracy, MCC (Gorodkin) and Cohen's kappa from a dense matrix."""
    cm = cm.astype(object)  # exact python ints
    n = int(cm.sum())
    if n == 0:
        return {"accuracy": None, "balanced_accuracy": None, "mcc": None, "cohen_kappa": None}
    k = cm.shape[0]
    t = [int(cm[i, :].sum()) for i in range(k)]
    p = [int(cm[:, j].sum()) for j in range(k)]
    c = sum(int(cm[i, i]) for i in range(k))
    recalls = [Fraction(int(cm[i, i]), t[i]) for i in range(k) if t[i] > 0]
    cov_tp = c * n - sum(a * b for a, b in zip(t, p))
    cov_pp = n * n - sum(b * b for b in p)
    cov_tt = n * n - sum(a * a for a in t)
    mcc = None if cov_pp * cov_tt == 0 else cov_tp / math.sqrt(cov_pp * cov_tt)
    pe = Fraction(sum(a * b for a, b in zip(t, p)), n * n)
    po = Fraction(c, n)
    kappa = None if pe == 1 else (po - pe) / (1 - pe)
    return {
        "accuracy": float(po),
        "balanced_accuracy": float(sum(recalls) / len(recalls)) if recalls else None,
        "mcc": None if mcc is None else float(mcc),
        "cohen_kappa": None if kappa is None else float(kappa),
    }
