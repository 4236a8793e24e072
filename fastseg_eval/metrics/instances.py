"""Instance metrics from a contingency table: VOI, adapted Rand error, matching, F1, PQ / SQ / RQ.

Pure numpy over the sorted COO table of :class:`~fastseg_eval.reducers.contingency.ContingencyTable`
(``n[k]`` voxels carry gt id ``g[k]`` and pred id ``p[k]``). ``a_i`` is the size of gt segment
``i`` and ``b_j`` of pred segment ``j`` (voxels counted: not ignored, not masked), ``N`` the
voxels counted.

* **VOI** (scikit-image's ``variation_of_information(image0=gt, image1=pred)``, every id an
  ordinary segment, background included): ``voi_split = H(pred | gt)``, ``voi_merge = H(gt |
  pred)``, in bits (log base 2).
* **Adapted Rand error** (scikit-image's ``adapted_rand_error``, which leaves voxels whose gt
  is the background out; pairs of voxels, no self-pairs): with ``S = sum n_ij^2 - n_ij``,
  ``rand_precision = S / sum_j (b_j^2 - b_j)`` and ``rand_recall = S / sum_i (a_i^2 - a_i)``
  (CREMI / Arganda-Carreras 2015; scikit-image's code returns these two swapped, its issue
  6485), ``adapted_rand_error = 1 - 2 P R / (P + R) = 1 - 2 S / (sum_i (a_i^2 - a_i) + sum_j
  (b_j^2 - b_j))`` (the second form is also defined when only one of P and R is).
* **Matching**: a gt instance and a pred instance (background left out) match when their IoU
  is above ``iou_threshold``. At a threshold of 0.5 or more each instance has at most one such
  partner, so the matching is unique. Below 0.5 the candidates are taken greedily, highest IoU
  first (ties: smaller pred id, then smaller gt id: the order of panoptica's
  ``NaiveThresholdMatching``), each instance matched at most once.
* ``tp`` matches, ``fp = n_pred - tp``, ``fn = n_gt - tp``; ``precision = tp / n_pred``,
  ``recall = tp / n_gt``, ``f1 = 2 tp / (2 tp + fp + fn)`` (= ``rq``); ``sq`` = mean IoU of the
  matches, ``pq = sq * rq`` (Kirillov et al. 2019, panoptica). With no match ``sq = pq = 0``;
  with no instance on either side every matching figure is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from fastseg_eval.errors import OptionError, option
from fastseg_eval.kernels.pairs import greedy_match

PER_GT_KEYS = ("id", "matched_id", "iou", "dice", "size")
SUMMARY_KEYS = (
    "voi_split", "voi_merge", "adapted_rand_error", "rand_precision", "rand_recall", "n_gt", "n_pred",
    "tp", "fp", "fn", "precision", "recall", "f1", "pq", "sq", "rq",
)  # fmt: skip


def check_iou_threshold(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not 0 <= t < 1:
        raise OptionError(f"{option('iou_threshold')} must be a number in [0, 1), got {t!r}")
    return float(t)


class PerGT(Sequence):
    """``[{"id", "matched_id", "iou", "dice", "size"}, ...]``, one row per ground-truth instance in
    id order, each built on access from arrays (a million instances cost a few arrays).

    ``matched_id`` is None for an unmatched instance, whose ``iou`` and ``dice`` are 0.
    ``column(name)`` gives one field for every instance at once.
    """

    def __init__(self, columns: dict[str, np.ndarray], extra: Sequence[str] = ()):
        self._c = columns
        self._keys = list(PER_GT_KEYS) + list(extra)

    def __len__(self) -> int:
        return len(self._c["id"])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        c = self._c
        matched = bool(c["matched"][i])
        row = {
            "id": int(c["id"][i]),
            "matched_id": int(c["matched_id"][i]) if matched else None,
            "iou": float(c["iou"][i]),
            "dice": float(c["dice"][i]),
            "size": int(c["size"][i]),
        }
        for k in self._keys[len(PER_GT_KEYS) :]:
            row[k] = int(c[k][i])
        return row

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def column(self, name: str) -> np.ndarray:
        return self._c[name]

    def largest(self, limit: int | None) -> np.ndarray:
        """Row indices to list one by one: all within ``limit``, else the largest instances, in id order."""
        n = len(self)
        if limit is None or limit <= 0 or n <= limit:
            return np.arange(n)
        order = np.lexsort((np.arange(n), -self._c["size"]))[:limit]
        return np.sort(order)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return f"PerGT({len(self)} ground-truth instances)"


def _sizes(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ``ids`` (sorted), each entry's index among them, and the total count per id."""
    uniq, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(-1)
    return uniq, inv, _sum_by(inv, counts, len(uniq))


def _sum_by(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """``out[i] = sum(values[index == i])``, exactly in int64 (no float weights)."""
    out = np.zeros(n, dtype=np.int64)
    if len(index) == 0:
        return out
    order = np.argsort(index, kind="stable")
    idx = index[order]
    first = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    out[idx[first]] = np.add.reduceat(values[order], first)
    return out


def _sum_squares_minus_self(n: np.ndarray) -> float:
    """``sum(n * (n - 1))`` exactly when it fits int64, else via exactly rounded float sums."""
    if len(n) == 0:
        return 0.0
    top = int(n.max())
    total = int(n.sum())
    if top * total < 2**62:
        return float(int(np.dot(n, n - 1)))
    nf = n.astype(np.float64)
    return math.fsum(nf * nf) - float(total)


def _entropy_terms(n: np.ndarray, group_size: np.ndarray, total: int) -> float:
    """``sum n * log2(group / n) / N`` (a conditional entropy), n > 0."""
    if total == 0 or len(n) == 0:
        return 0.0
    nf = n.astype(np.float64)
    return float(math.fsum(nf * (np.log2(group_size.astype(np.float64)) - np.log2(nf))) / total)


def _iou_above(inter: np.ndarray, union: np.ndarray, t: float) -> np.ndarray:
    """``inter / union > t`` exactly (float64 first, rationals where it is too close to tell)."""
    iou = inter / union
    out = iou > t
    close = np.flatnonzero(np.abs(iou - t) <= 4 * np.spacing(max(t, 1e-300)) + 1e-15)
    if len(close):
        ft = Fraction(t)
        for k in close.tolist():
            out[k] = Fraction(int(inter[k]), int(union[k])) > ft
    return out


def instance_metrics(
    gt_ids: np.ndarray,
    pred_ids: np.ndarray,
    counts: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    background: int | None = 0,
    gt_class: dict[int, int] | None = None,
    pred_class: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Every instance metric of a contingency table (sorted COO, uint64 ids; see the module doc).

    ``background`` is the id left out of matching and of the adapted Rand error's ground truth
    (None: every id is an instance). ``gt_class`` / ``pred_class`` (id -> semantic class, from
    connected components) restrict matches to instances of one class and add a ``class``
    column to ``per_gt``.

    Returns the dict of :data:`SUMMARY_KEYS` plus ``per_gt`` (a :class:`PerGT`), ``iou_threshold``,
    ``background`` and ``matching`` (``"unique"`` or ``"greedy"``).
    """
    t = check_iou_threshold(iou_threshold)
    g = np.asarray(gt_ids, dtype=np.uint64)
    p = np.asarray(pred_ids, dtype=np.uint64)
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum())

    # segment sizes over every id (VOI counts the background as a segment like any other)
    gu, gi, a = _sizes(g, n)
    pu, pj, b = _sizes(p, n)
    voi_split = _entropy_terms(n, a[gi], total)  # H(pred | gt)
    voi_merge = _entropy_terms(n, b[pj], total)  # H(gt | pred)

    # adapted Rand error: voxels whose gt is the background left out (pred background stays)
    bg = None if background is None else np.uint64(background)
    keep = np.ones(len(n), dtype=bool) if bg is None else g != bg
    nk = n[keep]
    s = _sum_squares_minus_self(nk)
    a_k = _sum_by(gi[keep], nk, len(gu))
    b_k = _sum_by(pj[keep], nk, len(pu))
    sum_a = _sum_squares_minus_self(a_k[a_k > 0])
    sum_b = _sum_squares_minus_self(b_k[b_k > 0])
    rand_precision = s / sum_b if sum_b else math.nan
    rand_recall = s / sum_a if sum_a else math.nan
    # 1 - F-score = 1 - 2PR / (P + R), written as scikit-image does so that it stays defined when
    # only one of P and R is (e.g. every pred segment a single voxel)
    are = 1.0 - 2.0 * s / (sum_a + sum_b) if sum_a + sum_b else math.nan

    # instances: ids other than the background
    g_inst = np.ones(len(gu), dtype=bool) if bg is None else gu != bg
    p_inst = np.ones(len(pu), dtype=bool) if bg is None else pu != bg
    n_gt, n_pred = int(g_inst.sum()), int(p_inst.sum())
    cand = g_inst[gi] & p_inst[pj]
    if gt_class is not None and pred_class is not None:
        gc = np.array([gt_class.get(int(x), -1) for x in gu.tolist()], dtype=np.int64)
        pc = np.array([pred_class.get(int(x), -2) for x in pu.tolist()], dtype=np.int64)
        cand &= gc[gi] == pc[pj]
    ck = np.flatnonzero(cand)
    inter = n[ck]
    union = a[gi[ck]] + b[pj[ck]] - inter
    above = _iou_above(inter.astype(np.float64), union.astype(np.float64), t) if len(ck) else np.zeros(0, bool)
    ck, inter, union = ck[above], inter[above], union[above]
    if t >= 0.5:
        chosen = np.ones(len(ck), dtype=bool)
        matching = "unique"
    else:
        matching = "greedy"
        # highest IoU first; ties: smaller pred id, then smaller gt id (panoptica's order)
        order = np.lexsort((g[ck], p[ck], -(inter / union))).astype(np.int64)
        chosen = np.zeros(len(ck), dtype=bool)
        greedy_match(order, gi[ck].astype(np.int64), pj[ck].astype(np.int64),
                     np.zeros(len(gu), dtype=np.bool_), np.zeros(len(pu), dtype=np.bool_), chosen)  # fmt: skip
    mk = ck[chosen]
    m_inter, m_union = inter[chosen], union[chosen]
    tp = len(mk)
    fp, fn = n_pred - tp, n_gt - tp
    ious = m_inter / m_union if tp else np.zeros(0)

    nan = math.nan
    precision = tp / n_pred if n_pred else nan
    recall = tp / n_gt if n_gt else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else nan
    if n_gt + n_pred == 0:
        sq = rq = pq = nan
    elif tp == 0:
        sq, rq, pq = 0.0, 0.0, 0.0
    else:
        sq = math.fsum(ious.tolist()) / tp
        rq = f1
        pq = sq * rq

    # one row per gt instance: its match (IoU, Dice), or 0
    rows = np.flatnonzero(g_inst)
    pos = np.full(len(gu), -1, dtype=np.int64)
    pos[rows] = np.arange(len(rows))
    matched = np.zeros(len(rows), dtype=bool)
    matched_id = np.zeros(len(rows), dtype=np.uint64)
    iou_col = np.zeros(len(rows), dtype=np.float64)
    dice_col = np.zeros(len(rows), dtype=np.float64)
    if tp:
        r = pos[gi[mk]]
        matched[r] = True
        matched_id[r] = p[mk]
        iou_col[r] = ious
        dice_col[r] = 2 * m_inter / (a[gi[mk]] + b[pj[mk]])
    columns = {
        "id": gu[rows], "matched": matched, "matched_id": matched_id, "iou": iou_col, "dice": dice_col,
        "size": a[rows],
    }  # fmt: skip
    extra: list[str] = []
    if gt_class is not None:
        columns["class"] = np.array([gt_class.get(int(x), 0) for x in gu[rows].tolist()], dtype=np.int64)
        extra.append("class")
    return {
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "adapted_rand_error": are,
        "rand_precision": rand_precision,
        "rand_recall": rand_recall,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "pq": pq,
        "sq": sq,
        "rq": rq,
        "per_gt": PerGT(columns, extra),
        "iou_threshold": t,
        "background": background,
        "matching": matching,
    }
