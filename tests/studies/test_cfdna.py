"""Synthetic cfDNA cohorts: the planted shift has the configured size, confounders behave, the set model is a set model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm

from idesign.studies import cfdna

SMALL = cfdna.CohortConfig(n_samples=1000, min_fragments=40, max_fragments=80)


def _class_shift(values: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """Case-minus-control mean difference and its standard error."""
    a, b = values[label == 1], values[label == 0]
    return float(a.mean() - b.mean()), float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def _short_fraction(c: cfdna.Cohort) -> np.ndarray:
    return ((c.lengths < 150) & c.mask).sum(1) / c.mask.sum(1)


def test_planted_short_fraction_shift_has_the_configured_size():
    c = cfdna.make_cohort(dataclasses.replace(SMALL, effect=0.08), seed=0)
    shift, se = _class_shift(c.planted_value, c.label)
    assert abs(shift - 0.08) < 3 * se
    # The observable statistic moves by effect x (P(<150 | sub-nucleosomal) - P(<150 | mono)), computed exactly.
    w = SMALL.sub_peak_decay ** np.arange(len(cfdna.SUB_NUCLEOSOMAL_PEAKS))
    p_short = np.sum(w / w.sum() * norm.cdf((149.5 - np.asarray(cfdna.SUB_NUCLEOSOMAL_PEAKS)) / SMALL.sub_peak_sd))
    p_mono = norm.cdf((149.5 - SMALL.mono_peak) / SMALL.mono_sd)
    observed, se = _class_shift(_short_fraction(c), c.label)
    assert abs(observed - 0.08 * (p_short - p_mono)) < 3 * se


@pytest.mark.parametrize("planted, effect", [("motif:CCCA", 0.03), ("methylation", 0.02), ("gc", 0.01)])
def test_other_planted_properties_shift_by_effect(planted, effect):
    c = cfdna.make_cohort(dataclasses.replace(SMALL, planted=planted, effect=effect, batch_label_skew=0.0), seed=1)
    shift, se = _class_shift(c.planted_value, c.label)
    assert abs(shift - effect) < 3 * se
    if planted.startswith("motif:"):
        freq = ((c.motifs == cfdna.MOTIF_INDEX[planted[6:]]) & c.mask).sum(1) / c.mask.sum(1)
        observed, se = _class_shift(freq, c.label)
        assert abs(observed - effect) < 3 * se
    # Only the planted property moves: the short fraction stays put.
    shift, se = _class_shift(_short_fraction(c), c.label)
    assert abs(shift) < 3.5 * se


def test_null_setting_has_no_shift():
    c = cfdna.make_cohort(cfdna.null_config(SMALL), seed=2)
    for values in (c.planted_value, _short_fraction(c)):
        shift, se = _class_shift(values, c.label)
        assert abs(shift) < 3.5 * se


def test_confounders_batch_gc_age_methylation_and_depth():
    config = dataclasses.replace(SMALL, batch_label_skew=0.4, effect=0.0)
    c = cfdna.make_cohort(config, seed=3)
    gc = (c.gc * c.mask).sum(1) / c.mask.sum(1)
    shift, se = _class_shift(gc, c.batch)
    assert abs(shift - config.batch_gc_shift) < 3 * se
    # The skew makes batch (hence GC) track the label inside the cohort: P(batch 1 | case) - P(batch 1 | control).
    skew, se = _class_shift(c.batch.astype(float), c.label)
    assert abs(skew - 0.4) < 3 * se
    meth = (c.methylation * c.mask).sum(1) / c.mask.sum(1)
    assert np.corrcoef(c.age, meth)[0, 1] < -0.3  # the age drift
    assert abs(np.corrcoef(c.age, c.label)[0, 1]) < 0.1
    assert c.depth.min() >= config.min_fragments and c.depth.max() <= config.max_fragments
    assert c.depth.std() > 5
    held = cfdna.make_cohort(cfdna.heldout_config(config), seed=3)
    assert set(held.batch.tolist()) == {2} and held.depth.max() <= config.max_fragments // 2


def test_fragments_are_a_masked_prefix_and_deterministic():
    config = cfdna.CohortConfig(n_samples=30, min_fragments=10, max_fragments=40)
    a, b, other = (cfdna.make_cohort(config, s) for s in (5, 5, 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.lengths, other.lengths)
    np.testing.assert_array_equal(a.mask, np.arange(40)[None] < a.depth[:, None])
    assert (a.lengths[~a.mask] == 0).all() and (a.lengths[a.mask] >= 40).all()
    lengths = a.lengths[a.mask]
    assert abs(np.median(lengths) - 167) < 8  # the mono-nucleosomal peak
    padded = cfdna.pad_fragments(a, 64)
    assert padded.lengths.shape == (30, 64) and padded.mask.sum() == a.mask.sum()


def test_bad_configs_are_refused_with_the_value():
    with pytest.raises(ValueError, match="motif:CCCX"):
        cfdna.make_cohort(dataclasses.replace(SMALL, planted="motif:CCCX"), 0)
    with pytest.raises(ValueError, match="length"):
        cfdna.make_cohort(dataclasses.replace(SMALL, planted="length"), 0)
    with pytest.raises(ValueError, match="min_fragments"):
        cfdna.make_cohort(dataclasses.replace(SMALL, min_fragments=100, max_fragments=50), 0)
    with pytest.raises(ValueError, match="below"):
        cfdna.pad_fragments(cfdna.make_cohort(dataclasses.replace(SMALL, n_samples=4), 0), 10)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_set_model_is_permutation_and_padding_invariant(pooling):
    c = cfdna.make_cohort(cfdna.CohortConfig(n_samples=6, min_fragments=8, max_fragments=16), seed=0)
    inputs = cfdna.featurize(c)
    model = cfdna.FragmentSetModel(d_hidden=8, d_embed=4, pooling=pooling, rngs=nnx.Rngs(0))
    fn = jax.jit(lambda d: model(d["continuous"], d["motifs"], d["weights"]))
    logit, emb = fn(inputs)
    perm = np.random.default_rng(0).permutation(16)
    logit_p, emb_p = fn({k: v[:, perm] for k, v in inputs.items()})
    np.testing.assert_allclose(logit_p, logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(emb_p, emb, rtol=1e-5, atol=1e-5)
    # Garbage in padded slots changes nothing.
    noisy = dict(inputs, continuous=np.where(inputs["weights"][..., None] > 0, inputs["continuous"], 7.0),
                 motifs=np.where(inputs["weights"] > 0, inputs["motifs"], 3))
    np.testing.assert_allclose(fn(noisy)[0], logit, rtol=1e-5, atol=1e-5)
    # ... and the logit depends on the real fragments.
    assert not np.allclose(fn(dict(inputs, continuous=inputs["continuous"][::-1]))[0], logit)
    assert jnp.isfinite(jax.grad(lambda w: fn(dict(inputs, weights=w))[0].sum())(jnp.asarray(inputs["weights"]))).all()


@pytest.fixture(scope="module")
def cohort():
    return cfdna.make_cohort(cfdna.CohortConfig(n_samples=60, min_fragments=20, max_fragments=50), seed=0)


# ----------------------------------------------------------------------------------------------
# Candidates


def test_candidate_bank_matches_direct_computation(cohort):
    bank = cfdna.candidate_bank(cohort, n_motifs=5, with_fragments=True)
    col = {n: i for i, n in enumerate(bank.names)}
    i = 7
    lengths = cohort.lengths[i, :cohort.depth[i]]
    assert bank.values[i, col["short_fraction"]] == pytest.approx(np.mean(lengths < 150))
    assert bank.values[i, col["mean_length"]] == pytest.approx(lengths.mean())
    assert bank.values[i, col["median_length"]] == pytest.approx(np.median(lengths))
    assert bank.values[i, col["log_depth"]] == pytest.approx(np.log(cohort.depth[i]))
    top = bank.names[col["motif_diversity"] - 5]
    assert top == "motif:" + cfdna.top_motifs(cohort.motifs, cohort.mask, 1)[0]
    assert bank.values[i, col[top]] == pytest.approx(np.mean(cohort.motifs[i, :cohort.depth[i]] == cfdna.MOTIF_INDEX[top[6:]]))
    bins = [c for n, c in col.items() if n.startswith("length[")]
    np.testing.assert_allclose(bank.values[:, bins].sum(1), 1.0)
    # A fragment-mean candidate is the masked mean of its fragment values; sample-level ones have none.
    frag = bank.fragment_values[..., col["gc_mean"]]
    np.testing.assert_allclose((frag * cohort.mask).sum(1) / cohort.mask.sum(1), bank.values[:, col["gc_mean"]], rtol=1e-5)
    assert np.isnan(bank.fragment_values[..., col["length_sd"]]).all()
    # Another cohort's bank with the same motif list has the same columns.
    other = cfdna.candidate_bank(cfdna.make_cohort(cfdna.CohortConfig(n_samples=10, min_fragments=8,
                                                                            max_fragments=16), 1),
                                       motifs=[n[6:] for n in bank.names if n.startswith("motif:")])
    assert other.names == bank.names
    with pytest.raises(ValueError, match="ZZZZ"):
        cfdna.candidate_bank(cohort, motifs=["ZZZZ"])


def test_planted_candidate_names():
    assert cfdna.planted_candidate("gc") == "gc_mean"
    with pytest.raises(ValueError, match="length"):
        cfdna.planted_candidate("length")


def test_import_idesign_does_not_load_the_study():
    code = "import sys, idesign; print(any(m.startswith('idesign.studies') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
