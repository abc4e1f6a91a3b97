"""Multiple testing in idesign.metrics: label-permutation p-values, Holm and Benjamini–Hochberg."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from idesign import metrics


def test_permutation_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(4)
    pvalues = []
    for rep in range(200):
        y = rng.permutation(np.repeat([0, 1], 20))
        scores = rng.normal(size=(40, 5))
        scores[:, 4] = np.round(scores[:, 4])  # ties too
        p, _ = metrics.permutation_pvalues(y, scores, n_permutations=199, seed=rep)
        pvalues.append(p)
    p = np.concatenate(pvalues)
    for alpha in (0.05, 0.1, 0.25, 0.5):
        share = (p <= alpha).mean()
        assert abs(share - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / p.size), (alpha, share)
    assert p.min() >= 1 / 200


def test_permutation_pvalue_converges_to_the_exact_one():
    # n = 8 (4 + 4): all 70 labelings can be enumerated, giving the exact permutation p-value.
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.8, 0.2, 0.7, 0.6])
    y = np.array([0, 0, 0, 1, 1, 0, 1, 1])
    observed = abs(roc_auc_score(y, scores) - 0.5)
    null = [abs(roc_auc_score(np.isin(np.arange(8), c).astype(int), scores) - 0.5)
            for c in itertools.combinations(range(8), 4)]
    exact = np.mean(np.asarray(null) >= observed - 1e-12)
    p, auc = metrics.permutation_pvalues(y, scores, n_permutations=20000, seed=0)
    assert auc[0] == pytest.approx(roc_auc_score(y, scores))
    assert abs(p[0] - exact) < 0.01


def test_permutation_pvalues_detect_a_real_effect_and_check_inputs():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 50)
    p, _ = metrics.permutation_pvalues(y, (y + rng.normal(size=100))[:, None], n_permutations=999)
    assert p[0] == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="both classes"):
        metrics.permutation_pvalues(np.zeros(10), rng.normal(size=10))
    with pytest.raises(ValueError, match="N=100"):
        metrics.permutation_pvalues(y, rng.normal(size=(99, 2)))


def test_holm_and_bh_match_references():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # Holm: sorted p times (m, m-1, ...), running max; BH: p * m / rank, running min from the top.
    np.testing.assert_allclose(metrics.holm(p), [0.04, 0.09, 0.09, 0.025, 0.5])
    np.testing.assert_allclose(metrics.benjamini_hochberg(p), [0.025, 0.05, 0.05, 0.025, 0.5])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_adjustments_are_monotone_and_ordered(p):
    p = np.asarray(p)
    h, b = metrics.holm(p), metrics.benjamini_hochberg(p)
    assert (h >= p - 1e-12).all() and (b >= p - 1e-12).all() and (h >= b - 1e-12).all()
    assert (h <= 1).all() and (b <= 1).all()
    order = np.argsort(p, kind="stable")
    assert (np.diff(h[order]) >= -1e-12).all() and (np.diff(b[order]) >= -1e-12).all()
