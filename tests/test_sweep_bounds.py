"""The sweep's stated ROC AUC / average precision errors are upper bounds (issue 11, item 2).

``roc_auc_max_error`` and ``average_precision_max_error`` must bound |binned - exact| for every
score set, against scikit-learn's ``roc_auc_score`` / ``average_precision_score`` on the same
scores: random and adversarial sets (ties, bins holding only positives, confident false
positives, scores exactly on the bin edges, few positives), and scikit-learn's own fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

import fastseg_eval as fse
from fastseg_eval.metrics.curves import _binning_errors

ROUNDING = 1e-12  # both sides are float64 sums; the bounds are exact in real arithmetic


def sweep(scores, y, bins: int) -> dict:
    return fse.evaluate(
        np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.uint8), thresholds=bins
    ).curves["1"]


def assert_within_bounds(scores, y, bins: int) -> dict:
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.uint8)
    c = sweep(scores, y, bins)
    if y.any():
        exact_ap = average_precision_score(y, scores)
        assert abs(c["average_precision"] - exact_ap) <= c["average_precision_max_error"] + ROUNDING, (
            c["average_precision"],
            exact_ap,
            c["average_precision_max_error"],
        )
    if y.any() and not y.all():
        exact_auc = roc_auc_score(y, scores)
        assert abs(c["roc_auc"] - exact_auc) <= c["roc_auc_max_error"] + ROUNDING, (
            c["roc_auc"],
            exact_auc,
            c["roc_auc_max_error"],
        )
    return c


@st.composite
def scored_labels(draw):
    """Scores in [0, 1] with labels: random, tied, on edges, confident false positives, few positives."""
    bins = draw(st.sampled_from([1, 2, 3, 5, 10, 37, 100, 1000]))
    n = draw(st.integers(1, 60))
    edges = [(i + 0.5) / bins for i in range(bins)]
    levels = [k / bins for k in range(bins + 1)]
    score = st.one_of(
        st.floats(0.0, 1.0, allow_nan=False),
        st.sampled_from(edges),  # exactly on an edge: the lower bin holds it
        st.sampled_from(levels),  # ties
        st.sampled_from([0.0, 1.0, 0.5, 0.999, 0.001]),
        st.sampled_from(edges).map(lambda e: float(np.nextafter(e, 2.0))),  # just above an edge
    )
    scores = draw(st.lists(score, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["random", "few_positives", "confident_fp"]))
    if kind == "random":
        y = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif kind == "few_positives":
        k = draw(st.integers(1, min(3, n)))
        where = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
        y = [i in where for i in range(n)]
    else:  # positives score by rank, a few negatives score higher than every positive
        y = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        hi = draw(st.floats(0.9, 1.0))
        lo = [s * 0.9 for s in scores]
        scores = [hi if (not yi and i % 4 == 0) else s for i, (s, yi) in enumerate(zip(lo, y))]
    if not any(y):
        y[draw(st.integers(0, n - 1))] = True
    return np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.uint8), bins


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_labels())
def test_stated_errors_bound_the_difference_to_sklearn(case):
    scores, y, bins = case
    assert_within_bounds(scores, y, bins)


def _issue_fixture():
    """scikit-learn's former ``test_precision_recall_curve`` data (``make_prediction(binary=True)``).

    Earlier scikit-learn releases built it from iris restricted to classes 0 and 1, shuffled with
    ``check_random_state(37)``, 200 * 4 noise features from ``RandomState(0)``, and
    ``SVC(kernel="linear", probability=True, random_state=0)`` trained on the first half; these
    are its 50 test scores, written out (``SVC(probability=True)`` is deprecated in scikit-learn
    1.9, and libsvm's Platt scaling need not give the same digits everywhere). The issue quotes
    this fixture: exact AP 0.8595364, binned (1000 thresholds) 0.8599759.
    """
    s = [
        0.4663610914632609, 0.35232629893543305, 0.5850922438680445, 0.5137690147524031,
        0.4541154657384417, 0.42880430575325684, 0.5895562109070381, 0.6482317474174798,
        0.4512640231667927, 0.35452982119679666, 0.6619306823413981, 0.5059186679300871, 0.5,
        0.552227449199974, 0.35001790644266284, 0.4280935835666267, 0.5631506327913104,
        0.4437993674708089, 0.569429669854672, 0.3570716546277133, 0.305149671021724,
        0.6442595367410789, 0.41819125673588775, 0.43701692313894197, 0.5483345641483489,
        0.3548500713190377, 0.6490046948760301, 0.554210642143242, 0.4035638999309155,
        0.38879229101835083, 0.42510752024633874, 0.3081396047450412, 0.3652599960337721,
        0.48150140531853286, 0.5374814528869631, 0.2708580086366786, 0.24380262608826903, 0.5,
        0.5600959249255775, 0.5, 0.4629186486520453, 0.5518306435171852, 0.4851103459310219,
        0.5962125910039673, 0.3714136239819674, 0.3153885535035523, 0.5255431170672262,
        0.610044332320558, 0.4912898697225973, 0.4274485843860262,
    ]  # fmt: skip
    y = [
        0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1,
        0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0,
    ]  # fmt: skip
    return np.array(s), np.array(y, dtype=np.uint8)


def _current_fixture():
    """scikit-learn's ``make_prediction(binary=True)`` as its installed tests build it today."""
    from sklearn import datasets
    from sklearn.linear_model import LogisticRegression
    from sklearn.utils import check_random_state

    iris = datasets.load_iris()
    X, y = iris.data, iris.target
    X, y = X[y < 2], y[y < 2]
    n_samples, n_features = X.shape
    p = np.arange(n_samples)
    check_random_state(37).shuffle(p)
    X, y = X[p], y[p]
    half = n_samples // 2
    X = np.c_[X, np.random.RandomState(0).randn(n_samples, 200 * n_features)]
    score = LogisticRegression(random_state=0).fit(X[:half], y[:half]).predict_proba(X[half:])[:, 1]
    return score, y[half:].astype(np.uint8)


def test_issue_fixture_ap_error_is_within_the_stated_bound():
    s, y = _issue_fixture()
    assert average_precision_score(y, s) == pytest.approx(0.8595364, abs=1e-7)
    c = assert_within_bounds(s, y, 1000)
    assert c["average_precision"] == pytest.approx(0.8599759, abs=1e-7)
    # a bin with two positives of different scores below a negative: (12/14 - 11/13) / 25
    assert c["average_precision_max_error"] >= (12 / 14 - 11 / 13) / 25
    assert c["average_precision_max_error"] < 0.01  # and the bound is not vacuous


@pytest.mark.parametrize("bins", [2, 5, 10, 20, 50, 100, 1000])
@pytest.mark.parametrize("fixture", [_issue_fixture, _current_fixture])
def test_sklearn_fixture_within_bounds(fixture, bins):
    s, y = fixture()
    assert len(s) == 50 and y.sum() == 25
    assert_within_bounds(s, y, bins)


def test_confident_false_positives_are_covered():
    """Five negatives at p = 0.9999 above well separated classes: no bin holds both classes, yet
    every bin of two or more positives moves AP (the old bound stated 0 here)."""
    rng = np.random.default_rng(5)
    gt = (rng.random(20000) < 0.3).astype(np.uint8)
    p = np.where(gt == 1, 0.55 + 0.44 * rng.random(gt.size), 0.5 * rng.random(gt.size))
    p[np.flatnonzero(gt == 0)[:5]] = 0.9999
    c = assert_within_bounds(p, gt, 1000)
    err = abs(c["average_precision"] - average_precision_score(gt, p))
    assert err > 1e-4
    # distinct scores below the negatives are the worst case, so the bound is attained here
    assert c["average_precision_max_error"] == pytest.approx(err, rel=1e-6)
    assert c["roc_auc_max_error"] == 0 and c["roc_auc"] == pytest.approx(roc_auc_score(gt, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_bounds_are_attained_by_some_score_set(seed):
    """The AP bound is the worst case: build scores that reach (nearly) it, inside each bin."""
    rng = np.random.default_rng(seed)
    bins = 8
    pos = rng.integers(0, 6, bins + 1)
    neg = rng.integers(0, 6, bins + 1)
    pos[-1] = max(pos[-1], 1)
    edges = (np.arange(bins) + 0.5) / bins
    lo = np.concatenate([[0.0], edges])  # bin b: lo[b] < p <= hi[b]
    hi = np.concatenate([edges, [1.0]])
    _, ap_bound = _binning_errors(pos, neg)
    best = 0.0
    for worst_up in (True, False):
        scores, y = [], []
        for b in range(bins + 1):
            top, bottom = hi[b], lo[b] + (hi[b] - lo[b]) * 1e-3
            grid = np.linspace(top, bottom, pos[b] + neg[b] + 3)[1:-1]  # distinct, inside the bin
            if worst_up:  # positives tied above the bin's negatives
                scores += [grid[0]] * pos[b] + list(grid[1 : 1 + neg[b]])
            else:  # negatives above distinct positives
                scores += list(grid[: neg[b]]) + list(grid[neg[b] : neg[b] + pos[b]])
            y += [1] * pos[b] + [0] * neg[b]
        s, yy = np.array(scores), np.array(y, dtype=np.uint8)
        c = assert_within_bounds(s, yy, bins)
        best = max(best, abs(c["average_precision"] - average_precision_score(yy, s)))
    assert best == pytest.approx(ap_bound, rel=1e-9, abs=1e-12)
