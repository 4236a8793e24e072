"""Every metric against scikit-learn and against formulas written here from TP / FP / FN / TN.

scikit-learn: per-class precision / recall / F1 / support, Jaccard, the confusion matrix, accuracy,
balanced accuracy, MCC and Cohen's kappa. The rest (every entry of ``fse.METRICS``, the empty
policies, ``smooth``, Tversky alpha / beta, aliases, means) against ``strategies.reference_metric``,
which computes exact fractions from the counts of an independent bincount matrix.
"""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from sklearn import metrics as skm
from strategies import apply_policy, reference_confusion, reference_metric, reference_overall, seeds

import fastseg_eval as fse
from fastseg_eval.metrics.formulas import ALIASES

RTOL = 1e-12
METRIC_NAMES = [
    "accuracy", "precision", "recall", "specificity", "dice", "iou", "tversky", "npv", "fpr", "fnr",
    "fdr", "for", "balanced_accuracy", "informedness", "markedness", "mcc", "fowlkes_mallows",
    "prevalence_threshold", "volume_similarity",
]  # fmt: skip


def sk(fn, *args, **kwargs):
    """Call a scikit-learn metric with its warnings (undefined metric, unseen classes) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def close(a, b, rtol=RTOL, atol=1e-12):
    np.testing.assert_allclose(
        np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol, equal_nan=True
    )


@st.composite
def labelings(draw, max_n=120, max_label=5):
    """1-D gt / pred int arrays and a label list (the labels present plus some absent, unsorted)."""
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(seeds))
    k = draw(st.integers(1, max_label + 1))
    pool = rng.choice(max_label + 1, size=k, replace=False)
    gt = rng.choice(pool, size=n).astype(np.int32)
    pred = gt.copy()
    flip = rng.random(n) < draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    pred[flip] = rng.choice(pool, size=int(flip.sum()))
    present = sorted(set(gt.tolist()) | set(pred.tolist()))
    absent = [v for v in range(max_label + 3) if v not in present]
    extra = draw(st.lists(st.sampled_from(absent), max_size=2, unique=True))
    labels = draw(st.permutations(present + extra))
    return pred, gt, [int(x) for x in labels]


def per_class(res, name):
    return np.array([res.per_class[int(lab)][name] for lab in res.labels])


# ------------------------------------------------------------------------- scikit-learn
@settings(max_examples=40)
@given(labelings(), st.sampled_from(["nan", "zero", "one"]))
def test_per_class_against_sklearn(data, empty):
    pred, gt, labels = data
    res = fse.evaluate(pred, gt, labels=labels, empty=empty)
    np.testing.assert_array_equal(res.confusion_matrix, sk(skm.confusion_matrix, gt, pred, labels=labels))
    zd = {"nan": np.nan, "zero": 0.0, "one": 1.0}[empty]
    p, r, f, s = sk(
        skm.precision_recall_fscore_support, gt, pred, labels=labels, average=None, zero_division=zd
    )
    close(per_class(res, "precision"), p)
    close(per_class(res, "recall"), r)
    close(per_class(res, "dice"), f)
    np.testing.assert_array_equal(per_class(res, "support"), s)
    if empty != "nan":  # jaccard_score takes zero_division in {0, 1} only
        j = sk(skm.jaccard_score, gt, pred, labels=labels, average=None, zero_division=int(zd))
        close(per_class(res, "iou"), j)
    else:
        j = sk(skm.jaccard_score, gt, pred, labels=labels, average=None, zero_division=0)
        iou = per_class(res, "iou")
        defined = ~np.isnan(iou)
        close(iou[defined], j[defined])
        # NaN exactly where the class is in neither volume
        absent = per_class(res, "support") + per_class(res, "predicted") == 0
        np.testing.assert_array_equal(~defined, absent)


@settings(max_examples=40)
@given(labelings())
def test_overall_against_sklearn(data):
    pred, gt, labels = data
    res = fse.evaluate(pred, gt, labels=labels)
    ov = res.overall
    close(ov["accuracy"], skm.accuracy_score(gt, pred))
    close(ov["balanced_accuracy"], sk(skm.balanced_accuracy_score, gt, pred))
    kappa = sk(skm.cohen_kappa_score, gt, pred)
    close(ov["cohen_kappa"], kappa, rtol=1e-9)
    mcc = sk(skm.matthews_corrcoef, gt, pred)
    if math.isnan(ov["mcc"]):
        # undefined (a constant volume): sklearn reports 0, we report NaN under empty="nan"
        assert mcc == 0.0
        assert len(set(gt.tolist())) == 1 or len(set(pred.tolist())) == 1
    else:
        close(ov["mcc"], mcc, rtol=1e-9)
    ref = reference_overall(sk(skm.confusion_matrix, gt, pred, labels=labels))
    for key, v in ref.items():
        close(ov[key], apply_policy(v, "nan"), rtol=1e-9)


def test_mcc_undefined_is_nan_where_sklearn_says_zero():
    """Our explicit empty policy differs from scikit-learn's silent 0 for an undefined MCC."""
    gt = np.ones(10, dtype=np.uint8)
    pred = np.ones(10, dtype=np.uint8)
    assert sk(skm.matthews_corrcoef, gt, pred) == 0.0
    assert math.isnan(fse.evaluate(pred, gt).overall["mcc"])
    assert fse.evaluate(pred, gt, empty="zero").overall["mcc"] == 0.0
    assert fse.evaluate(pred, gt, empty="one").overall["mcc"] == 1.0
    # per class too: class 1 has TN = 0, so the per-class MCC denominator is zero
    assert math.isnan(fse.evaluate(pred, gt).per_class[1]["mcc"])
    # a defined case still agrees
    gt[6:] = 0
    pred[:3] = 0
    close(fse.evaluate(pred, gt).overall["mcc"], sk(skm.matthews_corrcoef, gt, pred))


def test_sklearn_with_ignore_label_and_mask():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(6, 7, 5)).astype(np.int16)
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 4, size=gt.shape)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = -1
    mask = rng.random(gt.shape) < 0.8
    res = fse.evaluate(pred, gt, ignore_label=-1, mask=mask)
    keep = mask & (gt != -1)
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    labels = [0, 1, 2, 3]
    np.testing.assert_array_equal(res.confusion_matrix, sk(skm.confusion_matrix, g, p, labels=labels))
    close(res.overall["accuracy"], skm.accuracy_score(g, p))
    close(res.overall["mcc"], skm.matthews_corrcoef(g, p), rtol=1e-9)
    close(res.overall["cohen_kappa"], skm.cohen_kappa_score(g, p), rtol=1e-9)
    f = sk(skm.f1_score, g, p, labels=labels, average=None, zero_division=np.nan)
    close(per_class(res, "dice"), f)
    assert res.n_voxels == keep.sum() and res.n_ignored == (mask & (gt == -1)).sum()


# --------------------------------------------------------------- every metric by formula
def test_reference_covers_every_registered_metric():
    assert set(fse.METRICS) == set(METRIC_NAMES), "a metric was added or removed: add its reference formula"


def _counts(cm):
    tp = np.diagonal(cm).astype(np.int64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fp - fn
    return tp, fp, fn, tn


@settings(max_examples=40)
@given(
    labelings(),
    st.sampled_from(["nan", "zero", "one"]),
    st.sampled_from([0.0, 1e-5, 1.0]),
    st.tuples(st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0]), st.sampled_from([0.0, 0.5, 0.7, 1.0])),
)
def test_every_metric_against_formula(data, empty, smooth, ab):
    pred, gt, labels = data
    alpha, beta = ab
    res = fse.evaluate(pred, gt, labels=labels, empty=empty, smooth=smooth, tversky_alpha=alpha,
                       tversky_beta=beta)  # fmt: skip
    cm, _ = reference_confusion(pred, gt, labels=labels)
    tp, fp, fn, tn = _counts(cm)
    assert res.metrics == METRIC_NAMES or set(res.metrics) == set(METRIC_NAMES)
    expected = {}
    for name in METRIC_NAMES:
        sm = smooth if name in ("dice", "iou", "tversky") else 0.0
        vals = [
            apply_policy(
                reference_metric(name, int(a), int(b), int(c), int(d), alpha=alpha, beta=beta, smooth=sm),
                empty,
            )
            for a, b, c, d in zip(tp, fp, fn, tn)
        ]
        expected[name] = np.array(vals)
        close(per_class(res, name), expected[name], rtol=1e-9)
    for i, lab in enumerate(labels):
        row = res.per_class[lab]
        assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (tp[i], fp[i], fn[i], tn[i])
        assert row["support"] == tp[i] + fn[i] and row["predicted"] == tp[i] + fp[i]

    # means: NaN skipped, n_averaged reported; foreground excludes label 0; weighted by support
    fg = np.array([lab != 0 for lab in labels])
    support = tp + fn
    for name in METRIC_NAMES:
        v = expected[name]
        for got, sel in ((res.mean, np.ones_like(fg)), (res.foreground_mean, fg)):
            ok = sel & ~np.isnan(v)
            assert got["n_averaged"][name] == ok.sum()
            close(got[name], v[ok].mean() if ok.any() else np.nan, rtol=1e-9)
        w = ~np.isnan(v) & (support > 0)
        close(
            res.weighted[name], (v[w] * support[w]).sum() / support[w].sum() if w.any() else np.nan, rtol=1e-9
        )
        sm = smooth if name in ("dice", "iou", "tversky") else 0.0
        pooled = [int(x[fg].sum()) for x in (tp, fp, fn, tn)]
        micro = apply_policy(reference_metric(name, *pooled, alpha=alpha, beta=beta, smooth=sm), empty)
        close(res.micro[name], micro, rtol=1e-9)
    ref_ov = reference_overall(cm)
    for key, v in ref_ov.items():
        close(res.overall[key], apply_policy(v, empty), rtol=1e-9)


def test_means_with_other_background_labels():
    gt = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1, 2, 0, 3, 2, 3], dtype=np.uint8)
    cm, _ = reference_confusion(pred, gt, labels=[0, 1, 2, 3, 4])
    tp, fp, fn, tn = _counts(cm)
    dice = np.array(
        [apply_policy(reference_metric("dice", *map(int, c)), "nan") for c in zip(tp, fp, fn, tn)]
    )
    assert np.isnan(dice[4])
    for bg, sel in ((None, [0, 1, 2, 3]), (3, [0, 1, 2]), (0, [1, 2, 3])):
        res = fse.evaluate(pred, gt, num_classes=5, background_label=bg)
        close(res.foreground_mean["dice"], dice[sel].mean())
        assert res.foreground_mean["n_averaged"]["dice"] == len(sel)
        keep = [i for i in range(5) if i != bg] if bg is not None else list(range(5))
        pooled = [int(x[keep].sum()) for x in (tp, fp, fn)]
        close(res.micro["dice"], 2 * pooled[0] / (2 * pooled[0] + pooled[1] + pooled[2]))
    res = fse.evaluate(pred, gt, num_classes=5)
    close(res.mean["dice"], np.nanmean(dice))
    assert res.mean["n_averaged"]["dice"] == 4


# --------------------------------------------------------------------------- Tversky
@settings(max_examples=30)
@given(labelings())
def test_tversky_identities(data):
    pred, gt, labels = data
    half = fse.evaluate(pred, gt, labels=labels, tversky_alpha=0.5, tversky_beta=0.5)
    close(per_class(half, "tversky"), per_class(half, "dice"))
    one = fse.evaluate(pred, gt, labels=labels, tversky_alpha=1.0, tversky_beta=1.0)
    close(per_class(one, "tversky"), per_class(one, "iou"))
    # alpha weights FP, beta FN: swapping the roles of pred and gt swaps FP and FN
    a = fse.evaluate(pred, gt, labels=labels, tversky_alpha=0.8, tversky_beta=0.2)
    b = fse.evaluate(gt, pred, labels=labels, tversky_alpha=0.2, tversky_beta=0.8)
    close(per_class(a, "tversky"), per_class(b, "tversky"))
    close(per_class(a, "precision"), per_class(b, "recall"))


def test_tversky_alpha_weights_false_positives():
    gt = np.array([1, 1, 0, 0, 0, 0], dtype=np.uint8)
    pred = np.array([1, 0, 1, 1, 0, 0], dtype=np.uint8)
    # class 1 counted by hand: TP = 1 (voxel 0), FN = 1 (voxel 1), FP = 2 (voxels 2, 3)
    tp, fn, fp = 1, 1, 2
    res = fse.evaluate(pred, gt, tversky_alpha=0.7, tversky_beta=0.3)
    row = res.per_class[1]
    assert (row["tp"], row["fn"], row["fp"]) == (tp, fn, fp)
    close(row["tversky"], tp / (tp + 0.7 * fp + 0.3 * fn))  # 1 / 2.7
    assert not math.isclose(row["tversky"], tp / (tp + 0.3 * fp + 0.7 * fn))  # 1 / 2.3 would mean swapped
    only_fp = fse.evaluate(pred, gt, tversky_alpha=1.0, tversky_beta=0.0).per_class[1]["tversky"]
    close(only_fp, tp / (tp + fp))
    close(only_fp, row["precision"])
    only_fn = fse.evaluate(pred, gt, tversky_alpha=0.0, tversky_beta=1.0).per_class[1]["tversky"]
    close(only_fn, row["recall"])


# --------------------------------------------------------------- empty policies, smooth
def test_empty_policies_on_absent_class():
    gt = np.array([0, 0, 1, 1], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1], dtype=np.uint8)
    by_policy = {e: fse.evaluate(pred, gt, num_classes=3, empty=e) for e in ("nan", "zero", "one")}
    for name in METRIC_NAMES:
        # class 2 is in neither volume: TP = FP = FN = 0, TN = 4
        ref = reference_metric(name, 0, 0, 0, 4)
        for e, res in by_policy.items():
            close(res.per_class[2][name], apply_policy(ref, e))
    assert math.isnan(by_policy["nan"].per_class[2]["dice"])
    assert by_policy["zero"].per_class[2]["dice"] == 0.0
    assert by_policy["one"].per_class[2]["dice"] == 1.0
    assert by_policy["nan"].per_class[2]["specificity"] == 1.0  # defined: TN / (TN + FP) = 4 / 4
    # means skip NaN under "nan" only, and say how many classes they averaged
    assert by_policy["nan"].mean["n_averaged"]["dice"] == 2
    assert by_policy["zero"].mean["n_averaged"]["dice"] == 3
    d0, d1 = by_policy["nan"].per_class[0]["dice"], by_policy["nan"].per_class[1]["dice"]
    close(by_policy["nan"].mean["dice"], (d0 + d1) / 2)
    close(by_policy["zero"].mean["dice"], (d0 + d1) / 3)
    close(by_policy["one"].mean["dice"], (d0 + d1 + 1) / 3)
    # JSON has no NaN: undefined values become null
    import json

    doc = json.loads(by_policy["nan"].to_json())
    assert doc["per_class"]["2"]["dice"] is None


def test_smooth_applies_to_overlap_metrics_only():
    gt = np.array([0, 0, 1, 1, 1], dtype=np.uint8)
    pred = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    eps = 1e-3
    res = fse.evaluate(pred, gt, num_classes=3, smooth=eps)
    tp, fp, fn = 2, 1, 1  # class 1
    close(res.per_class[1]["dice"], (2 * tp + eps) / (2 * tp + fp + fn + eps))
    close(res.per_class[1]["iou"], (tp + eps) / (tp + fp + fn + eps))
    close(res.per_class[1]["tversky"], (tp + eps) / (tp + 0.5 * fp + 0.5 * fn + eps))
    close(res.per_class[1]["precision"], tp / (tp + fp))  # not smoothed
    # an absent class gets eps / eps = 1 from smoothing, whatever the empty policy
    for e in ("nan", "zero"):
        r = fse.evaluate(pred, gt, num_classes=3, smooth=eps, empty=e)
        assert r.per_class[2]["dice"] == 1.0 and r.per_class[2]["iou"] == 1.0
        assert (
            (r.per_class[2]["precision"] == 0.0) if e == "zero" else math.isnan(r.per_class[2]["precision"])
        )


# ------------------------------------------------------------------------------ aliases
DOCUMENTED_ALIASES = {
    "ppv": "precision", "sensitivity": "recall", "tpr": "recall", "hit_rate": "recall",
    "tnr": "specificity", "selectivity": "specificity", "f1": "dice", "jaccard": "iou",
    "threat_score": "iou", "csi": "iou", "fall_out": "fpr", "miss_rate": "fnr",
}  # fmt: skip


@pytest.mark.parametrize("alias,canonical", sorted(DOCUMENTED_ALIASES.items()))
def test_aliases(alias, canonical):
    assert ALIASES[alias] == canonical
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 3, 50).astype(np.uint8)
    pred = rng.integers(0, 3, 50).astype(np.uint8)
    full = fse.evaluate(pred, gt)
    res = fse.evaluate(pred, gt, metrics=[alias])
    assert res.metrics == [canonical]
    for lab in (0, 1, 2):
        assert res.per_class[lab][canonical] == full.per_class[lab][canonical]
    close(res.foreground_mean[canonical], full.foreground_mean[canonical])


def test_metric_selection_keeps_counts_and_drops_others():
    gt = np.array([0, 1, 1, 2], dtype=np.uint8)
    pred = np.array([0, 1, 2, 2], dtype=np.uint8)
    res = fse.evaluate(pred, gt, metrics=["F1", "jaccard", "dice"])
    assert res.metrics == ["dice", "iou"]
    assert "precision" not in res.per_class[1]
    assert res.per_class[1]["tp"] == 1 and res.per_class[1]["fn"] == 1
