"""Discovery tools: evidence lines, ranking, distillation (the cfDNA candidate bank is tested in tests/studies)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from idesign import discovery, probes, sae
from idesign.studies import cfdna


@pytest.fixture(scope="module")
def cohort():
    return cfdna.make_cohort(cfdna.CohortConfig(n_samples=60, min_fragments=20, max_fragments=50), seed=0)


# ----------------------------------------------------------------------------------------------
# Probes and evidence lines


def test_probe_evidence_is_squared_correlation_with_the_logit_for_linear_readouts():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 5))
    logit = emb @ np.array([1.0, -1.0, 0.5, 0.0, 0.0])
    cands = np.stack([logit + 0.3 * rng.normal(size=400), emb[:, 3], rng.normal(size=400)], 1)
    score = discovery.probe_evidence(probes.fit_ridge(emb, cands, alpha=1e-6), logit)
    direct = np.array([np.corrcoef(c, logit)[0, 1] ** 2 for c in cands.T])
    np.testing.assert_allclose(score, direct, atol=0.02)
    assert score.argmax() == 0 and score[1] < 0.01  # decodable (emb[:, 3]) but not read out: no evidence


def test_sae_evidence_follows_the_logit_driving_feature():
    rng = np.random.default_rng(2)
    codes = np.abs(rng.normal(size=(300, 3)))
    w_dec = np.eye(3)
    readout = np.array([0.0, 2.0, 0.0])  # only feature 1 reaches the logit
    cands = np.stack([codes[:, 0], codes[:, 1] + 0.1 * rng.normal(size=300), codes[:, 2]], 1)
    score, weight = discovery.sae_evidence(codes, w_dec, readout, cands)
    assert weight[0] == weight[2] == 0 and score.argmax() == 1 and score[1] > 0.9


def test_fragment_attribution_matches_the_analytic_gradient():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w = (rng.random((4, 6)) < 0.7).astype(np.float32)
    w[:, 0] = 1
    v = rng.normal(size=()).astype(np.float32)

    def logit_fn(inputs):  # a linear readout of a masked mean
        pooled = (inputs["weights"] * inputs["x"]).sum(-1) / inputs["weights"].sum(-1)
        return v * pooled

    attr, fields = discovery.fragment_attribution(logit_fn, {"x": x, "weights": w}, fields={"x": ("x", slice(None))})
    mean = (w * x).sum(-1, keepdims=True) / w.sum(-1, keepdims=True)
    expected = w * v * (x - mean) / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(attr, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fields["x"], np.abs(w * v * x / w.sum(-1, keepdims=True)).sum(-1), rtol=1e-5)
    with pytest.raises(KeyError, match="weights"):
        discovery.fragment_attribution(logit_fn, {"x": x})


def test_attribution_evidence_picks_the_indicator_the_logit_reads(cohort):
    bank = cfdna.candidate_bank(cohort, n_motifs=3, with_fragments=True)
    short = (cohort.lengths < 150).astype(np.float64)
    attr = np.where(cohort.mask, short - (short * cohort.mask).sum(1, keepdims=True) / cohort.mask.sum(1, keepdims=True), 0)
    score = discovery.attribution_evidence(attr, bank)
    assert bank.names[int(np.nanargmax(score))] == "short_fraction" and np.nanmax(score) == pytest.approx(1.0)
    assert np.isnan(score[bank.names.index("log_depth")])


# ----------------------------------------------------------------------------------------------
# Ranking and distillation


def test_rank_candidates_orders_tests_and_checks():
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], 40)
    scores = np.stack([y + 0.5 * rng.normal(size=80), rng.normal(size=80), rng.normal(size=80)], 1)
    lines = {"probe": np.array([0.9, 0.2, 0.1]), "attribution": np.array([np.nan, 0.8, 0.1])}
    r = discovery.rank_candidates(["a", "b", "c"], lines, test_labels=y, test_scores=scores, n_permutations=499)
    # a: 0.9/0.9 (attribution skipped) = 1; b: (0.2/0.9 + 0.8/0.8) / 2 = 0.61; c: (0.1/0.9 + 0.1/0.8) / 2 = 0.12.
    assert r.names == ("a", "b", "c")
    np.testing.assert_allclose(r.score, [1.0, (0.2 / 0.9 + 1) / 2, (0.1 / 0.9 + 0.125) / 2])
    assert r.rank_of("c") == 3 and r.significant.tolist() == [True, False, False]
    assert r.correction == "holm" and "| 1 | a |" in r.table()
    with pytest.raises(ValueError, match="shape"):
        discovery.rank_candidates(["a"], {"probe": np.zeros(2)})
    with pytest.raises(ValueError, match="both"):
        discovery.rank_candidates(["a"], {"probe": np.zeros(1)}, test_labels=y)


def test_distill_and_label_baseline():
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 100)
    x = np.stack([y + rng.normal(size=200), rng.normal(size=200)], 1)
    d = discovery.distill(["good"], x[::2, :1], y[::2], x[1::2, :1], y[1::2])
    assert d.auroc == pytest.approx(roc_auc_score(y[1::2], x[1::2, 0]), abs=1e-6)  # monotone in one statistic
    assert discovery.label_association(x, y).argmax() == 0
    with pytest.raises(ValueError, match="names"):
        discovery.distill(["a", "b"], x[:, :1], y, x[:, :1], y)


def test_sae_codes_are_numpy():
    p = sae.init_sae(jax.random.key(0), 3, 4)
    codes = discovery.sae_codes(p, np.ones((2, 3)), k=2)
    assert isinstance(codes, np.ndarray) and ((codes > 0).sum(1) <= 2).all()
