"""Probes: agreement with scikit-learn and closed forms, span-max and attention probes, fit_many, errors, I/O.

Small data throughout; tests that fit the same shapes with the same static options share one
compilation (C is a traced argument, so a sweep over C compiles once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from idesign import probes
from tests.conftest import run_with_8_devices

N, D = 300, 8


def _cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated, badly scaled features with offsets, like activations."""
    mix = rng.normal(size=(d, d)) / np.sqrt(d) * rng.uniform(0.3, 4.0, d)
    return (rng.normal(size=(n, d)) @ mix + rng.normal(scale=3.0, size=d)).astype(np.float32)


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    x = _correlated(rng, N, D)
    z = StandardScaler().fit_transform(x) @ rng.normal(size=D)
    y = (rng.random(N) < 1 / (1 + np.exp(-z))).astype(np.int32)
    return x, y


def _sklearn(x, y, *, standardize: bool = True, **kwargs):
    xs = StandardScaler().fit_transform(x) if standardize else x
    return LogisticRegression(tol=1e-10, max_iter=100_000, **kwargs).fit(xs, y), xs


# ----------------------------------------------------------------------------------------------
# Linear probes against scikit-learn


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_logistic_matches_sklearn(binary, C):
    x, y = binary
    probe, info = probes.fit_logistic(x, y, C=C, return_info=True)
    model, xs = _sklearn(x, y, C=C)
    assert bool(info.converged) and float(info.grad_max) <= 1e-5
    assert _cosine(probe.w, model.coef_) > 0.999
    np.testing.assert_allclose(probe.w, model.coef_[0], rtol=2e-2, atol=2e-3)
    assert float(probe.b) == pytest.approx(model.intercept_[0], abs=2e-3)
    ours = roc_auc_score(y, probes.score(probe, x))
    assert ours == pytest.approx(roc_auc_score(y, model.decision_function(xs)), abs=1e-3)
    # The standardisation lives in the probe: as_affine scores the raw activations identically.
    weight, bias = probes.as_affine(probe)
    np.testing.assert_allclose(x @ np.asarray(weight) + float(bias), probes.score(probe, x), rtol=1e-4, atol=1e-4)


def test_logistic_without_standardisation_matches_sklearn_on_raw_activations(binary):
    x, y = binary
    probe = probes.fit_logistic(x, y, C=1.0, standardize=False)
    model, _ = _sklearn(x, y, standardize=False, C=1.0)
    np.testing.assert_array_equal(probe.mean, 0.0)
    assert _cosine(probe.w, model.coef_) > 0.999
    assert roc_auc_score(y, probes.score(probe, x)) == pytest.approx(roc_auc_score(y, model.decision_function(x)),
                                                                      abs=1e-3)


def test_balanced_class_weight_and_sample_weights_match_sklearn(binary):
    x, y = binary
    rng = np.random.default_rng(1)
    y = np.where(rng.random(N) < 0.7, 0, y)  # imbalanced
    sw = rng.uniform(0.2, 3.0, N).astype(np.float32)
    probe = probes.fit_logistic(x, y, C=0.5, class_weight="balanced", sample_weight=sw)
    model, xs = _sklearn(x, y, C=0.5, class_weight="balanced")
    model.fit(xs, y, sample_weight=sw)
    assert _cosine(probe.w, model.coef_) > 0.999
    np.testing.assert_allclose(probe.w, model.coef_[0], rtol=2e-2, atol=2e-3)
    assert float(probe.b) == pytest.approx(model.intercept_[0], abs=2e-3)
    # A zero weight removes a row entirely, also from the standardisation.
    sw[:50] = 0.0
    dropped = probes.fit_logistic(x, y, C=0.5, class_weight="balanced", sample_weight=sw)
    model, _ = _sklearn(x[50:], y[50:], C=0.5, class_weight="balanced")
    model.fit(StandardScaler().fit_transform(x[50:]), y[50:], sample_weight=sw[50:])
    np.testing.assert_allclose(dropped.w, model.coef_[0], rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(dropped.mean, x[50:].mean(0), rtol=1e-5, atol=1e-5)


def test_explicit_class_weights_match_sklearn(binary):
    x, y = binary
    probe = probes.fit_logistic(x, y, C=1.0, class_weight={1: 3.0})
    model, _ = _sklearn(x, y, C=1.0, class_weight={0: 1.0, 1: 3.0})
    assert _cosine(probe.w, model.coef_) > 0.999
    assert float(probe.b) == pytest.approx(model.intercept_[0], abs=2e-3)


def test_softmax_matches_sklearn_multinomial(binary):
    x, _ = binary
    rng = np.random.default_rng(2)
    xs = StandardScaler().fit_transform(x)
    y = np.argmax(xs[:, :3] + rng.normal(size=(N, 3)), axis=1)
    probe = probes.fit_softmax(x, y, C=1.0)
    model = LogisticRegression(C=1.0, tol=1e-10, max_iter=100_000).fit(xs, y)
    assert probe.w.shape == (D, 3) and probe.b.shape == (3,)
    assert _cosine(probe.w, model.coef_.T) > 0.999
    np.testing.assert_allclose(probe.w, model.coef_.T, rtol=2e-2, atol=3e-3)
    np.testing.assert_allclose(probes.predict_proba(probe, x), model.predict_proba(xs), atol=2e-3)
    for k in range(3):
        ours = roc_auc_score(y == k, probes.score(probe, x)[:, k])
        assert ours == pytest.approx(roc_auc_score(y == k, model.decision_function(xs)[:, k]), abs=1e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # LogisticRegressionCV's coming API changes
def test_cross_validation_picks_the_same_C_as_sklearn():
    # One informative feature among correlated noise: heavy regularisation is clearly worse.
    rng = np.random.default_rng(3)
    x = _correlated(rng, N, D)
    z = StandardScaler().fit_transform(x)[:, 0] * 1.5
    y = (rng.random(N) < 1 / (1 + np.exp(-z))).astype(np.int32)
    Cs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    probe, info = probes.fit_logistic(x, y, C=Cs, cv=5, seed=0, return_info=True)
    folds = probes.stratified_folds(y, 5, seed=0)
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(5)]
    xs = StandardScaler().fit_transform(x)
    model = LogisticRegressionCV(Cs=Cs, cv=splits, scoring="neg_log_loss", tol=1e-8, max_iter=100_000).fit(xs, y)
    np.testing.assert_allclose(info.cv_loss, -model.scores_[1].mean(axis=0), rtol=1e-3, atol=1e-4)
    assert float(info.C) == pytest.approx(model.C_[0], rel=1e-5)
    losses = np.asarray(info.cv_loss)
    assert losses[0] > losses.min() + 0.05  # the heaviest regularisation is clearly worse, and not chosen
    assert float(info.C) > Cs[0]
    refit = probes.fit_logistic(x, y, C=float(info.C))  # CV refits on all rows with the chosen C
    np.testing.assert_allclose(probe.w, refit.w, rtol=1e-3, atol=1e-4)
    # Folds can also be given per row (e.g. grouping tokens by sequence), with any integer ids.
    _, by_ids = probes.fit_logistic(x, y, C=Cs, cv=folds * 10 + 7, return_info=True)
    np.testing.assert_allclose(by_ids.cv_loss, info.cv_loss, rtol=1e-5)


def test_fit_many_equals_fitting_one_by_one(binary):
    x, y = binary
    rng = np.random.default_rng(4)
    acts = np.stack([x, _correlated(rng, N, D), x[:, ::-1] * 2.0 + 1.0])  # 3 layers
    targets = np.stack([y, (acts[1, :, 0] > np.median(acts[1, :, 0])).astype(np.int32)])  # 2 targets
    weights = rng.uniform(0.5, 2.0, (2, N)).astype(np.float32)  # one set per target
    stack, info = probes.fit_many(acts, targets, C=1.0, sample_weight=weights, return_info=True)
    assert stack.w.shape == (3, 2, D) and stack.b.shape == (3, 2) and info.n_iter.shape == (3, 2)
    assert bool(np.all(info.converged))
    for layer in range(3):
        for k in range(2):
            alone = probes.fit_logistic(acts[layer], targets[k], C=1.0, sample_weight=weights[k])
            np.testing.assert_allclose(stack.w[layer, k], alone.w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stack.b[layer, k], alone.b, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stack.mean[layer, k], alone.mean, rtol=1e-6)
    assert probes.fit_many(acts[0], y).w.shape == (D,)  # missing axes are dropped


# ----------------------------------------------------------------------------------------------
# Mass-mean / LDA from streamed statistics


@pytest.fixture(scope="module")
def two_gaussians():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 500)
    cov = np.diag(rng.uniform(0.2, 3.0, 5)) + 0.3
    x = rng.multivariate_normal(np.zeros(5), cov, 500) + np.outer(y, [1.0, 0.5, 0.0, 0.0, -1.0]) + 10.0
    return x.astype(np.float32), y


def test_lda_direction_matches_closed_form_and_sklearn(two_gaussians):
    x, y = two_gaussians
    x64 = x.astype(np.float64)
    mu = np.stack([x64[y == k].mean(0) for k in (0, 1)])
    within = sum((x64[y == k] - mu[k]).T @ (x64[y == k] - mu[k]) for k in (0, 1)) / len(y)
    shrunk = 0.8 * within + 0.2 * np.trace(within) / 5 * np.eye(5)
    expected = np.linalg.solve(shrunk, mu[1] - mu[0])
    probe = probes.fit_mass_mean(x, y, whiten=True, shrinkage=0.2)
    np.testing.assert_allclose(probe.w, expected, rtol=1e-3, atol=1e-4)
    assert float(probe.b) == pytest.approx(-expected @ (mu[0] + mu[1]) / 2, rel=1e-3)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2).fit(x64, y)
    assert _cosine(probe.w, lda.coef_) > 0.9999
    mass_mean = probes.fit_mass_mean(x, y)
    np.testing.assert_allclose(mass_mean.w, mu[1] - mu[0], rtol=1e-4, atol=1e-5)
    # Calibrated: the logit is the 1-D Gaussian log-odds of the projection.
    calibrated = probes.fit_mass_mean(x, y, whiten=True, shrinkage=0.2, calibrate=True)
    m0, m1, var = expected @ mu[0], expected @ mu[1], expected @ within @ expected
    a = (m1 - m0) / var
    np.testing.assert_allclose(calibrated.w, a * expected, rtol=2e-3, atol=1e-4)
    assert float(calibrated.b) == pytest.approx(-a * (m0 + m1) / 2 + np.log(y.mean() / (1 - y.mean())), rel=2e-3)


def test_streamed_statistics_equal_all_at_once(two_gaussians):
    x, y = two_gaussians
    w = np.random.default_rng(6).uniform(0.0, 2.0, len(y)).astype(np.float32)
    whole = probes.class_means_update(probes.class_means_init(5), x, y, w)
    stats = probes.class_means_init(5)
    update = jax.jit(probes.class_means_update)
    for lo in range(0, len(y), 64):  # tokens as [B, T, D] batches, some with a single class
        batch = slice(lo, lo + 64)
        stats = update(stats, x[batch][None], y[batch][None], w[batch][None])
    for a, b in zip(stats, whole):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(probes.class_means_finalize(stats, whiten=True).w, probes.class_means_finalize(whole, whiten=True).w,
                               rtol=1e-3, atol=1e-4)
    # Weight 0 drops rows; the stats match those of the kept rows.
    kept = probes.class_means_update(probes.class_means_init(5), x[w > 1], y[w > 1])
    dropped = probes.class_means_update(probes.class_means_init(5), x, y, (w > 1).astype(np.float32))
    for a, b in zip(kept, dropped):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Span-max probes


def _bce(y, p):
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_span_max_loss_by_hand():
    z = np.array([[0.5, -1.0, 2.0, 0.0, -0.5], [1.0, 1.5, -2.0, 0.3, 0.0]], np.float32)
    ids = np.array([[0, 1, 1, 0, 2], [2, 2, 0, 0, 0]])  # sequence 1 has no span 1 (absent, ignored)
    span_labels = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.float32)
    omega = 0.3
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    token_y = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], np.float64)
    token_w = np.array([[1, 10, 10, 1, 10], [10, 10, 1, 1, 1]], np.float64) * mask
    token_term = (token_w * _bce(token_y, p)).sum() / mask.sum()
    span_terms = [_bce(1.0, p[0, 1:3].max()), _bce(0.0, p[0, 4]), _bce(0.0, p[1, 0:2].max())]
    expected = (1 - omega) * token_term + omega * np.mean(span_terms)
    loss = probes.span_max_loss(z, ids, span_labels, omega=omega, mask=mask)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    scores = probes.span_max_logits(z, ids, 2, mask)
    np.testing.assert_allclose(scores, [[2.0, -0.5], [-np.inf, 1.5]])


def test_omega_schedule_is_linear_from_zero_to_one():
    omega = probes.omega_schedule(11)
    np.testing.assert_allclose([omega(t) for t in (0, 5, 10, 20)], [0.0, 0.5, 1.0, 1.0], atol=1e-7)


def _planted_spans(seed: int, B: int = 96, T: int = 12, Dm: int = 6):
    """Sequences with 2 spans each; a hallucinated span has the signal on *one* of its tokens."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(B, T, Dm)).astype(np.float32)
    ids = np.zeros((B, T), np.int32)
    labels = rng.integers(0, 2, (B, 2))
    for b in range(B):
        starts = (rng.integers(0, 3), rng.integers(6, 9))
        for s, start in enumerate(starts):
            length = rng.integers(2, 4)
            ids[b, start:start + length] = s + 1
            if labels[b, s]:
                acts[b, start + rng.integers(0, length), 0] += 3.0
    return acts, ids, labels


def test_span_probe_detects_planted_hallucinated_spans():
    acts, ids, labels = _planted_spans(0)
    probe = probes.fit_span_probe(acts, ids, labels, num_steps=200, batch_size=16, learning_rate=3e-2,
                                  progress=False)
    test_acts, test_ids, test_labels = _planted_spans(1)
    scores = np.asarray(probes.span_scores(probe, test_acts, test_ids, 2))
    assert roc_auc_score(test_labels.ravel(), scores.ravel()) > 0.85
    assert abs(float(probe.w[0])) > 3 * np.abs(np.asarray(probe.w[1:])).max()  # found the planted feature


# ----------------------------------------------------------------------------------------------
# Attention probes


def _planted_sequences(seed: int, n: int = 192, T: int = 10, Dm: int = 6):
    """Label 1 iff one (random) position carries a direction; padding at the end of each sequence."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, Dm)).astype(np.float32)
    y = rng.integers(0, 2, n)
    lengths = rng.integers(4, T + 1, n)
    mask = np.arange(T)[None] < lengths[:, None]
    where = (rng.random(n) * lengths).astype(int)
    x[np.arange(n), where, :2] += y[:, None] * 2.5
    x[~mask] = 50.0  # padding garbage must be ignored
    return x, y, mask


def test_attention_probe_learns_a_planted_signal_and_is_deterministic():
    x, y, mask = _planted_sequences(0)
    fit = lambda: probes.fit_attention_probe(x, y, mask, n_heads=2, num_steps=150, batch_size=32,
                                             learning_rate=3e-2, progress=False)
    probe = fit()
    xt, yt, mt = _planted_sequences(1)
    assert roc_auc_score(yt, probes.score(probe, xt, mt)) > 0.9
    weights = probes.attention_weights(probe, xt, mt)
    assert weights.shape == (len(yt), 2, 10)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.where(mt[:, None, :], 0.0, weights)).max()) == 0.0
    again = fit()
    for a, b in zip(probe, again):
        np.testing.assert_array_equal(a, b)


def test_attention_probe_multiclass_and_spans():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 96)
    x = rng.normal(size=(96, 5, 4)).astype(np.float32)
    x[:, 2, :3] += 3.0 * np.eye(3)[y]
    probe = probes.fit_attention_probe(x, y, n_heads=1, num_steps=100, learning_rate=5e-2, progress=False)
    assert probe.w.shape == (1, 4, 3)
    assert float((probes.score(probe, x).argmax(-1) == y).mean()) > 0.8
    np.testing.assert_allclose(probes.predict_proba(probe, x).sum(-1), 1.0, rtol=1e-5)
    # Scoring spans: activations [B, 1, T, D] against span masks [B, S, T] give [B, S, K].
    span_ids = np.array([[1, 1, 2, 2, 0]] * 96)
    per_span = probes.score(probe, x[:, None], probes.span_masks(span_ids, 2))
    assert per_span.shape == (96, 2, 3)
    np.testing.assert_allclose(per_span[:, 0], probes.score(probe, x, span_ids == 1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_errors_that_name_the_problem(binary):
    x, y = binary
    with pytest.raises(ValueError, match=r"labels has 299 entries but the activations have 300 rows"):
        probes.fit_logistic(x, y[:-1])
    with pytest.raises(ValueError, match=r"single class \[1\]"):
        probes.fit_logistic(x, np.ones(N, np.int32))
    bad = x.copy()
    bad[[3, 17], 2] = np.nan
    bad[40, 0] = np.inf
    with pytest.raises(ValueError, match=r"3 non-finite values \(2 NaN, 1 inf\) in 3 rows: 3, 17, 40"):
        probes.fit_logistic(bad, y)
    with pytest.raises(ValueError, match=r"non-finite .* \(layer 1, row 3\)"):
        probes.fit_many(np.stack([x, bad]), y)
    with pytest.raises(ValueError, match=r"non-finite"):
        probes.fit_logistic(jnp.asarray(bad), y)  # device arrays are checked too
    with pytest.raises(ValueError, match=r"must be \[N, D\].*got shape \(300,\)"):
        probes.fit_logistic(x[:, 0], y)
    with pytest.raises(ValueError, match=r"must be \[N, D\].*got shape \(1, 300, 8\)"):
        probes.fit_logistic(x[None], y)
    with pytest.raises(ValueError, match=r"binary labels must be 0 or 1"):
        probes.fit_logistic(x, y * 2)
    with pytest.raises(ValueError, match=r"class ids \[1\] have no examples"):
        probes.fit_softmax(x, y * 2)
    with pytest.raises(TypeError, match=r"must hold numbers"):
        probes.fit_logistic(x.astype(str), y)
    with pytest.raises(ValueError, match=r"C must be positive"):
        probes.fit_logistic(x, y, C=-1.0)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(300,\)"):
        probes.fit_logistic(x, y, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match=r"sample_weight must be finite and non-negative"):
        probes.fit_logistic(x, y, sample_weight=-np.ones(N))
    with pytest.raises(ValueError, match=r"labels has 5 entries but the activations have 300 rows"):
        probes.fit_mass_mean(x, y[:5])
    with pytest.raises(ValueError, match=r"single class"):
        probes.fit_mass_mean(x, np.zeros(N, np.int32))
    with pytest.raises(ValueError, match=r"both classes need examples"):
        probes.class_means_finalize(probes.class_means_update(probes.class_means_init(D), x, np.zeros(N, np.int32)))
    with pytest.raises(ValueError, match=r"labels has 3 entries but the activations have 4 sequences"):
        probes.fit_attention_probe(np.zeros((4, 2, 3)), [0, 1, 0], progress=False)
    with pytest.raises(ValueError, match=r"mask selects no position in 1 sequences \(rows \[2\]\)"):
        probes.fit_attention_probe(np.zeros((4, 2, 3)), [0, 1, 0, 1], np.array([[1, 1], [1, 0], [0, 0], [1, 1]]),
                                   progress=False)
    with pytest.raises(ValueError, match=r"span_ids must be in 0..2"):
        probes.fit_span_probe(np.zeros((2, 3, 4)), np.array([[0, 3, 0], [1, 0, 0]]), np.ones((2, 2)), progress=False)
    with pytest.raises(ValueError, match=r"spans of both classes"):
        probes.fit_span_probe(np.zeros((2, 3, 4)), np.array([[0, 1, 0], [1, 0, 0]]), np.ones((2, 2)), progress=False)


def test_scoring_checks_the_probe_and_the_shapes():
    probe = probes.LogisticProbe(jnp.ones(4), jnp.zeros(()), jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"expects activations \[\.\.\., 4\], got shape \(2, 5\)"):
        probes.score(probe, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"mask applies only to AttentionProbe"):
        probes.score(probe, jnp.ones((2, 4)), jnp.ones(2, bool))
    with pytest.raises(TypeError, match=r"expected a probe"):
        probes.score({"w": jnp.ones(4)}, jnp.ones((2, 4)))
    assert jax.jit(probes.score)(probe, jnp.ones((3, 4))).shape == (3,)


# ----------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip(tmp_path, binary):
    x, y = binary
    logistic = probes.fit_logistic(x, y)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), logistic)
    attention = probes.init_attention_probe(jax.random.key(0), D, n_heads=2, n_classes=3)
    mass_mean = probes.MassMeanProbe(jnp.arange(3.0), jnp.asarray(0.5))
    cases = [(logistic, "blocks.3.resid_post", 3), (stacked, "blocks.*.resid_post", None),
             (attention, "layers.12.mlp_out", 12), (mass_mean, None, None)]
    for i, (probe, site, layer) in enumerate(cases):
        probes.save_probe(tmp_path / str(i), probe, site=site, metadata={"C": 1.0, "note": "test"})
        loaded, info = probes.load_probe(tmp_path / str(i))
        assert type(loaded) is type(probe)
        for a, b in zip(loaded, probe):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        assert info == {"family": type(probe).__name__, "site": site, "layer": layer,
                        "metadata": {"C": 1.0, "note": "test"}}
    np.testing.assert_array_equal(probes.score(probes.load_probe(tmp_path / "0")[0], x), probes.score(logistic, x))
    with pytest.raises(FileExistsError):
        probes.save_probe(tmp_path / "0", logistic)
    probes.save_probe(tmp_path / "0", mass_mean, overwrite=True, layer=7)
    assert probes.load_probe(tmp_path / "0")[1]["layer"] == 7
    with pytest.raises(TypeError, match=r"expected a probe"):
        probes.save_probe(tmp_path / "x", {"w": jnp.ones(2)})
    from idesign.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "plain", {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"not a probe"):
        probes.load_probe(tmp_path / "plain")


# ----------------------------------------------------------------------------------------------
# Sharded data

_SHARDED = r"""
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from idesign import probes
assert jax.device_count() == 8
rng = np.random.default_rng(0)
acts = rng.normal(size=(256, 6)).astype(np.float32) + 3.0
labels = (acts[:, 0] + 0.5 * rng.normal(size=256) > 3.0).astype(np.int32)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(acts, NamedSharding(mesh, P("data", None)))  # rows split over 8 devices
one = probes.fit_logistic(acts, labels, C=0.3)
eight = probes.fit_logistic(sharded, jax.device_put(labels, NamedSharding(mesh, P("data"))), C=0.3)
print(json.dumps({"w": float(np.abs(np.asarray(one.w) - np.asarray(eight.w)).max()),
                  "b": float(np.abs(np.asarray(one.b) - np.asarray(eight.b)).max()),
                  "input_devices": len(sharded.sharding.device_set)}))
"""


def test_probes_fitted_on_sharded_rows_equal_unsharded():

    report = run_with_8_devices(code=_SHARDED, timeout=300)
    assert report["input_devices"] == 8
    assert report["w"] < 1e-4 and report["b"] < 1e-4


def test_read_span_ids_read_each_span_where_read_span_reads_it():
    rng = np.random.default_rng(0)
    ids_ = np.zeros((5, 9), np.int32)
    ids_[:, 2:4], ids_[:, 6:8] = 1, 2
    valid = rng.random((5, 9)) > 0.2
    valid[:, 2:4] = valid[:, 6:8] = True
    for reading in probes.READINGS:
        got = np.asarray(probes.read_span_ids(ids_, valid, reading))
        for s in (1, 2):
            want = np.asarray(probes.read_span(ids_ == s, valid, reading))
            # Positions read for span s are exactly read_span's, except where the later span claims one.
            assert ((got == s) <= want).all() and (want <= ((got == s) | (got > s))).all()


# ---------------------------------------------------------------------------------------------
# sweep and grouped_split


def _sweep_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    acts = {"blocks.0": rng.normal(size=(n, 4)),
            "blocks.1": rng.normal(size=(n, 4)) + 1.5 * y[:, None],
            "wide": rng.normal(size=(n, 6)) + 0.5 * y[:, None]}       # another width: a second fit_many call
    return acts, y, np.arange(n) // 3


def test_sweep_matches_sklearn_auc_and_accuracy_on_held_out_rows():
    acts, y, groups = _sweep_data()
    table = probes.sweep(acts, y, groups=groups, split=0.25, n_boot=200, seed=1)
    train, test = probes.grouped_split(groups, 0.25, seed=1)
    assert table.sites == ("blocks.0", "blocks.1", "wide")
    assert (table.n_train, table.n_test) == (train.size, test.size)
    for k, site in enumerate(table.sites):
        p = np.asarray(probes.predict_proba(table.probes[site], acts[site][test].astype(np.float32)))
        assert table.auc[k] == pytest.approx(roc_auc_score(y[test], p), abs=1e-12)
        assert table.accuracy[k] == pytest.approx(np.mean((p > 0.5) == y[test]), abs=1e-12)
        assert table.auc_low[k] <= table.auc[k] <= table.auc_high[k]
        # the probe is the one fit_many gives on the training rows alone
        alone = probes.fit_many(acts[site][train].astype(np.float32)[None], y[train], seed=1)
        np.testing.assert_allclose(table.probes[site].w, alone.w[0], rtol=1e-5, atol=1e-6)
    assert table.best() == "blocks.1"
    rows = table.rows()
    assert rows[1]["site"] == "blocks.1" and set(rows[1]) == {"site", "auc", "auc_low", "auc_high", "accuracy",
                                                              "n_train", "n_test"}
    assert "blocks.1" in str(table) and "95% CI" in str(table)
    again = probes.sweep(acts, y, groups=groups, split=0.25, n_boot=200, seed=1)
    np.testing.assert_array_equal(again.auc_low, table.auc_low)   # same seed, same interval


def test_sweep_explicit_split_and_row_bootstrap():
    acts, y, _ = _sweep_data()
    train, test = np.arange(0, 120, 2), np.arange(1, 120, 2)
    table = probes.sweep(acts, y, split=(train, test), n_boot=100)
    mask_table = probes.sweep(acts, y, split=(np.arange(120) % 2 == 0, np.arange(120) % 2 == 1), n_boot=100)
    np.testing.assert_array_equal(table.auc, mask_table.auc)
    p = np.asarray(probes.predict_proba(table.probes["blocks.0"], acts["blocks.0"][test].astype(np.float32)))
    assert table.auc[0] == pytest.approx(roc_auc_score(y[test], p), abs=1e-12)
    import matplotlib
    matplotlib.use("Agg")
    fig = table.plot()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(table.sites)


def test_sweep_bad_input():
    acts, y, groups = _sweep_data()
    with pytest.raises(ValueError, match=r"acts_by_site\['wide'\] has 119 rows but labels has 120"):
        probes.sweep({**acts, "wide": acts["wide"][1:]}, y)
    with pytest.raises(ValueError, match=r"must be \[N, D\].*shape \(120, 2, 3\)"):
        probes.sweep({"x": np.zeros((120, 2, 3))}, y)
    with pytest.raises(ValueError, match="labels must be binary 0/1"):
        probes.sweep(acts, y + 1)
    with pytest.raises(ValueError, match=r"groups has shape \(60,\); expected one group id per row"):
        probes.sweep(acts, y, groups=groups[:60])
    with pytest.raises(ValueError, match="shares rows"):
        probes.sweep(acts, y, split=(np.arange(10), np.arange(5, 20)))
    with pytest.raises(ValueError, match="not both"):
        probes.sweep(acts, y, groups=groups, split=(np.arange(10), np.arange(10, 20)))
    with pytest.raises(ValueError, match="held-out rows .* hold only class 0"):
        probes.sweep(acts, y, split=(np.arange(60), 60 + np.flatnonzero(y[60:] == 0)))
    with pytest.raises(TypeError, match="held-out fraction"):
        probes.sweep(acts, y, split="half")


def test_grouped_split_errors():
    with pytest.raises(ValueError, match="1 distinct group.*at least 2"):
        probes.grouped_split([7, 7, 7])
    with pytest.raises(ValueError, match=r"test_size = 1.0"):
        probes.grouped_split([0, 1, 2], 1.0)
    with pytest.raises(ValueError, match=r"shape \[N\]; got shape \(2, 2\)"):
        probes.grouped_split([[0, 1], [2, 3]])


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(0, 8), min_size=2, max_size=40).filter(lambda g: len(set(g)) >= 2),
       test_size=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 16))
def test_grouped_split_invariants(groups, test_size, seed):
    g = np.asarray(groups)
    train, test = probes.grouped_split(g, test_size, seed=seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(g)))  # a partition
    assert train.size and test.size
    assert not set(g[train].tolist()) & set(g[test].tolist())                                # no group on both sides
    n_groups = len(set(groups))
    assert len(set(g[test].tolist())) == min(max(round(test_size * n_groups), 1), n_groups - 1)
    again = probes.grouped_split(g, test_size, seed=seed)
    np.testing.assert_array_equal(again[0], train)                                           # deterministic
