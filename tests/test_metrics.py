"""Metrics against scikit-learn and hand-computed cases; bootstrap intervals; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve

from idesign import metrics

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def binary_problem(draw, weighted: bool = False):
    """Labels with both classes, heavily tied scores (few distinct values), optional weights."""
    n = draw(st.integers(2, 40))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < len(y)))
    levels = draw(st.integers(1, 6))
    scores = draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))
    weights = None
    if weighted:
        weights = np.asarray(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), np.float64)
    return np.asarray(labels), np.asarray(scores, np.float64) / levels, weights


# ----------------------------------------------------------------------------------------------
# ROC AUC and recall at FPR.


@SETTINGS
@given(binary_problem(weighted=True))
def test_roc_auc_equals_sklearn_with_ties_and_weights(problem):
    y, s, w = problem
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_roc_auc_on_many_ties_and_continuous_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    tied = rng.integers(0, 5, 2000) + y  # five levels, overlapping classes
    w = rng.uniform(0.1, 3.0, 2000)
    assert metrics.roc_auc(y, tied) == pytest.approx(roc_auc_score(y, tied), abs=1e-12)
    assert metrics.roc_auc(y, tied, w) == pytest.approx(roc_auc_score(y, tied, sample_weight=w), abs=1e-12)
    cont = rng.normal(size=2000) + y
    assert metrics.roc_auc(y.astype(bool), cont) == pytest.approx(roc_auc_score(y, cont), abs=1e-12)
    assert metrics.roc_auc(y, np.zeros(2000)) == 0.5


def test_roc_auc_is_jittable_and_vmappable():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (3, 50))
    s = rng.integers(0, 4, (3, 50)).astype(np.float32)
    batched = jax.jit(jax.vmap(metrics.roc_auc))(y, s)
    expected = [roc_auc_score(y[i], s[i]) for i in range(3)]
    np.testing.assert_allclose(np.asarray(batched), expected, atol=1e-6)
    w = rng.uniform(0.5, 2.0, (3, 50))
    recall = jax.vmap(lambda a, b, c: metrics.recall_at_fpr(a, b, 0.3, sample_weight=c))(y, s, w)
    np.testing.assert_allclose(recall, [metrics.recall_at_fpr(y[i], s[i], 0.3, w[i]) for i in range(3)], atol=1e-6)
    # Concrete JAX arrays take the checked float64 path and return a Python float.
    assert isinstance(metrics.roc_auc(jnp.asarray(y[0]), jnp.asarray(s[0])), float)
    assert bool(jnp.isnan(jax.jit(metrics.roc_auc)(jnp.ones(4), jnp.arange(4.0))))


@SETTINGS
@given(binary_problem(weighted=True), st.sampled_from([0.05, 0.1, 0.25, 0.5, 0.9]))
def test_recall_at_fpr_equals_the_uninterpolated_roc_curve(problem, fpr):
    y, s, w = problem
    for weights in (None, w):
        false_rate, tpr, _ = roc_curve(y, s, sample_weight=weights, drop_intermediate=False)
        expected = tpr[false_rate <= fpr].max()
        assert metrics.recall_at_fpr(y, s, fpr, sample_weight=weights) == pytest.approx(expected, abs=1e-12)


def test_recall_at_fpr_moves_tied_scores_together_and_jits():
    # Two negatives tie with a positive at 0.5: taking that positive costs both negatives (FPR 0.5).
    y = np.array([1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.1])
    assert metrics.recall_at_fpr(y, s, 0.4) == 0.5
    assert metrics.recall_at_fpr(y, s, 0.5) == 1.0
    jitted = jax.jit(lambda a, b: metrics.recall_at_fpr(a, b, 0.4))
    assert float(jitted(y, s)) == 0.5


# ----------------------------------------------------------------------------------------------
# Accuracy and calibration.


def test_accuracy_matches_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 100)
    p = rng.uniform(size=100)
    assert metrics.accuracy(y, p) == pytest.approx(accuracy_score(y, p > 0.5))
    assert metrics.accuracy(y, p - 0.5, threshold=0.0) == pytest.approx(accuracy_score(y, p > 0.5))
    w = rng.uniform(size=100)
    assert metrics.accuracy(y, p, sample_weight=w) == pytest.approx(accuracy_score(y, p > 0.5, sample_weight=w))
    yc = rng.integers(0, 4, 100)
    logits = rng.normal(size=(100, 4))
    assert metrics.accuracy(yc, logits) == pytest.approx(accuracy_score(yc, logits.argmax(1)))
    assert float(jax.jit(metrics.accuracy)(yc, logits)) == pytest.approx(accuracy_score(yc, logits.argmax(1)), abs=1e-6)


def test_ece_hand_computed_uniform_and_quantile():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9, 0.95])
    # uniform, 2 bins: (0, .5] holds .1 .3 .35 (labels 0 0 1): |1 - .75| = .25;
    # (.5, 1] holds .8 .9 .95 (labels 1 1 0): |2 - 2.65| = .65  ->  (.25 + .65) / 6 = .15
    assert metrics.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.15)
    # quantile, 3 bins of two by rank: {.1,.3}: |0 - .4|; {.35,.8}: |2 - 1.15|; {.9,.95}: |1 - 1.85|
    assert metrics.expected_calibration_error(y, p, n_bins=3, strategy="quantile") == pytest.approx((0.4 + 0.85 + 0.85) / 6)
    # A boundary value belongs to the lower bin: 0.5 goes to (0, .5].
    assert metrics.expected_calibration_error([1, 0], [0.5, 0.5], n_bins=2) == pytest.approx(0.0)
    jitted = jax.jit(lambda a, b: metrics.expected_calibration_error(a, b, n_bins=3, strategy="quantile"))
    assert float(jitted(y, p)) == pytest.approx((0.4 + 0.85 + 0.85) / 6, abs=1e-6)


def test_ece_multiclass_is_top_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]])
    labels = np.array([0, 1, 2, 2])
    # confidences .7 .6 .8 .5, correct 1 0 1 1; 2 bins: (0,.5]: {.5 -> 1}: |1-.5|; (.5,1]: |2 - 2.1|
    assert metrics.expected_calibration_error(labels, probs, n_bins=2) == pytest.approx((0.5 + 0.1) / 4)
    perfect = metrics.expected_calibration_error(np.array([0, 0, 0, 1]), np.full((4, 2), [0.75, 0.25]), n_bins=10)
    assert perfect == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# Bootstrap.


def _noisy(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, y + rng.normal(size=n) * 1.5


def test_bootstrap_contains_the_estimate_is_deterministic_and_narrows():
    y, s = _noisy(200)
    a = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=300, seed=3)
    b = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=300, seed=3)
    assert a == b
    assert a.estimate == metrics.roc_auc(y, s)
    assert a.low < a.estimate < a.high
    assert metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=300, seed=4) != a
    y2, s2 = _noisy(3200, seed=1)
    big = metrics.bootstrap_ci(metrics.roc_auc, y2, s2, n_boot=300, seed=3)
    assert (big.high - big.low) < 0.5 * (a.high - a.low)


def test_stratified_bootstrap_keeps_a_rare_class_and_batched_agrees():
    y = np.zeros(30, int)
    y[:2] = 1
    s = np.random.default_rng(0).normal(size=30) + y
    with pytest.raises(ValueError, match="stratified=True keeps every class"):
        metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=200, stratified=False)
    loop = metrics.bootstrap_ci(metrics.roc_auc, y, s, n_boot=200)
    batched = metrics.bootstrap_ci(jax.jit(jax.vmap(metrics.roc_auc)), y, s, n_boot=200, batched=True)
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    with pytest.raises(ValueError, match="integer or bool labels"):
        metrics.bootstrap_ci(metrics.roc_auc, s, y)


# ----------------------------------------------------------------------------------------------
# Uncertainty baselines.


def test_entropy_and_max_probability_match_numpy_formulas_and_are_stable():
    logits = np.random.default_rng(0).normal(size=(5, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(metrics.predictive_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(metrics.max_probability(logits), p.max(-1), rtol=1e-10)
    big = np.array([[1000.0, 0.0, -np.inf]], np.float32)
    assert np.isfinite(metrics.predictive_entropy(big)).all() and metrics.max_probability(big)[0] == 1.0
    masked = np.array([[0.0, 0.0, -np.inf]])
    assert metrics.predictive_entropy(masked)[0] == pytest.approx(np.log(2))
    out = jax.jit(metrics.predictive_entropy)(jnp.asarray(logits, jnp.bfloat16))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, -(p * np.log(p)).sum(-1), atol=0.05)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="labels has 3 rows but scores has 2"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="only the positive \\(1\\) class is present.*without negative"):
        metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only the negative \\(0\\) class is present.*without positive"):
        metrics.recall_at_fpr([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores contain 1 NaN or inf value\\(s\\) \\(first at index 1\\)"):
        metrics.roc_auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.roc_auc([0, 1], [0.1, np.inf])
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            metrics.recall_at_fpr([0, 1], [0.1, 0.2], fpr=bad)
    with pytest.raises(ValueError, match="binary"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels has 2 rows but sample_weight has 1"):
        metrics.roc_auc([0, 1], [0.1, 0.2], sample_weight=[1.0])
    with pytest.raises(ValueError, match="must sum to 1"):
        metrics.expected_calibration_error([0, 1], [[0.5, 0.9], [0.0, 1.0]])
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        metrics.expected_calibration_error([0, 1], [1.5, 0.2])
    with pytest.raises(ValueError, match="arrays\\[0\\] has 3 rows but arrays\\[1\\] has 2"):
        metrics.bootstrap_ci(metrics.roc_auc, np.array([0, 1, 1]), np.zeros(2))
    with pytest.raises(ValueError, match="class indices in \\[0, 2\\)"):
        metrics.accuracy([0, 3], [[0.1, 0.9], [0.5, 0.5]])
