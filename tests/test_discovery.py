"""Discovery tools: candidate bank, probes, evidence lines, permutation p-values, multiple testing, distillation."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from idesign import discovery, sae
from idesign.data import cfdna


@pytest.fixture(scope="module")
def cohort():
    return cfdna.make_cohort(cfdna.CohortConfig(n_samples=60, min_fragments=20, max_fragments=50), seed=0)


# ----------------------------------------------------------------------------------------------
# Candidates


def test_candidate_bank_matches_direct_computation(cohort):
    bank = discovery.cfdna_candidates(cohort, n_motifs=5, with_fragments=True)
    col = {n: i for i, n in enumerate(bank.names)}
    i = 7
    lengths = cohort.lengths[i, :cohort.depth[i]]
    assert bank.values[i, col["short_fraction"]] == pytest.approx(np.mean(lengths < 150))
    assert bank.values[i, col["mean_length"]] == pytest.approx(lengths.mean())
    assert bank.values[i, col["median_length"]] == pytest.approx(np.median(lengths))
    assert bank.values[i, col["log_depth"]] == pytest.approx(np.log(cohort.depth[i]))
    top = bank.names[col["motif_diversity"] - 5]
    assert top == "motif:" + discovery.top_motifs(cohort.motifs, cohort.mask, 1)[0]
    assert bank.values[i, col[top]] == pytest.approx(np.mean(cohort.motifs[i, :cohort.depth[i]] == cfdna.MOTIF_INDEX[top[6:]]))
    bins = [c for n, c in col.items() if n.startswith("length[")]
    np.testing.assert_allclose(bank.values[:, bins].sum(1), 1.0)
    # A fragment-mean candidate is the masked mean of its fragment values; sample-level ones have none.
    frag = bank.fragment_values[..., col["gc_mean"]]
    np.testing.assert_allclose((frag * cohort.mask).sum(1) / cohort.mask.sum(1), bank.values[:, col["gc_mean"]], rtol=1e-5)
    assert np.isnan(bank.fragment_values[..., col["length_sd"]]).all()
    # Another cohort's bank with the same motif list has the same columns.
    other = discovery.cfdna_candidates(cfdna.make_cohort(cfdna.CohortConfig(n_samples=10, min_fragments=8,
                                                                            max_fragments=16), 1),
                                       motifs=[n[6:] for n in bank.names if n.startswith("motif:")])
    assert other.names == bank.names
    with pytest.raises(ValueError, match="ZZZZ"):
        discovery.cfdna_candidates(cohort, motifs=["ZZZZ"])


def test_planted_candidate_names():
    assert discovery.planted_candidate("gc") == "gc_mean"
    with pytest.raises(ValueError, match="length"):
        discovery.planted_candidate("length")


# ----------------------------------------------------------------------------------------------
# Probes and evidence lines


def test_ridge_probes_match_the_closed_form_and_decode_what_is_there():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 1, 1, 1] + 4.0
    y = np.stack([x[:, 1] - 2 * x[:, 2], rng.normal(size=300)], 1)
    fit = discovery.fit_probes(x, y, alpha=0.0)
    assert fit.r2[0] > 0.999 and fit.r2[1] < 0.05
    # With alpha = 0 the refit is ordinary least squares.
    design = np.concatenate([x, np.ones((300, 1))], 1)
    ols = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(discovery.predict_probes(fit.probes, x), design @ ols, atol=1e-8)
    with pytest.raises(ValueError, match="same N"):
        discovery.fit_probes(x, y[:10])


def test_probe_evidence_is_squared_correlation_with_the_logit_for_linear_readouts():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 5))
    logit = emb @ np.array([1.0, -1.0, 0.5, 0.0, 0.0])
    cands = np.stack([logit + 0.3 * rng.normal(size=400), emb[:, 3], rng.normal(size=400)], 1)
    score = discovery.probe_evidence(discovery.fit_probes(emb, cands, alpha=1e-6), logit)
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
    bank = discovery.cfdna_candidates(cohort, n_motifs=3, with_fragments=True)
    short = (cohort.lengths < 150).astype(np.float64)
    attr = np.where(cohort.mask, short - (short * cohort.mask).sum(1, keepdims=True) / cohort.mask.sum(1, keepdims=True), 0)
    score = discovery.attribution_evidence(attr, bank)
    assert bank.names[int(np.nanargmax(score))] == "short_fraction" and np.nanmax(score) == pytest.approx(1.0)
    assert np.isnan(score[bank.names.index("log_depth")])


# ----------------------------------------------------------------------------------------------
# Permutation tests and multiple testing


def test_permutation_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(4)
    pvalues = []
    for rep in range(200):
        y = rng.permutation(np.repeat([0, 1], 20))
        scores = rng.normal(size=(40, 5))
        scores[:, 4] = np.round(scores[:, 4])  # ties too
        p, _ = discovery.permutation_pvalues(y, scores, n_permutations=199, seed=rep)
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
    p, auc = discovery.permutation_pvalues(y, scores, n_permutations=20000, seed=0)
    assert auc[0] == pytest.approx(roc_auc_score(y, scores))
    assert abs(p[0] - exact) < 0.01


def test_permutation_pvalues_detect_a_real_effect_and_check_inputs():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 50)
    p, _ = discovery.permutation_pvalues(y, (y + rng.normal(size=100))[:, None], n_permutations=999)
    assert p[0] == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="both classes"):
        discovery.permutation_pvalues(np.zeros(10), rng.normal(size=10))
    with pytest.raises(ValueError, match="N=100"):
        discovery.permutation_pvalues(y, rng.normal(size=(99, 2)))


def test_holm_and_bh_match_references():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # Holm: sorted p times (m, m-1, ...), running max; BH: p * m / rank, running min from the top.
    np.testing.assert_allclose(discovery.holm(p), [0.04, 0.09, 0.09, 0.025, 0.5])
    np.testing.assert_allclose(discovery.benjamini_hochberg(p), [0.025, 0.05, 0.05, 0.025, 0.5])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_adjustments_are_monotone_and_ordered(p):
    p = np.asarray(p)
    h, b = discovery.holm(p), discovery.benjamini_hochberg(p)
    assert (h >= p - 1e-12).all() and (b >= p - 1e-12).all() and (h >= b - 1e-12).all()
    assert (h <= 1).all() and (b <= 1).all()
    order = np.argsort(p, kind="stable")
    assert (np.diff(h[order]) >= -1e-12).all() and (np.diff(b[order]) >= -1e-12).all()


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
