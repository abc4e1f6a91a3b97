"""TopK sparse autoencoders: exact encoding, dictionary recovery, the decoder constraint, resampling, vmapped training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idesign import sae

D, M, ACTIVE, N = 12, 16, 2, 4096


@pytest.fixture(scope="module")
def sparse_data():
    """Inputs made of ACTIVE atoms of a known unit-norm dictionary, with positive magnitudes."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(M, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((N, M))
    for i in range(N):
        codes[i, rng.choice(M, ACTIVE, replace=False)] = rng.uniform(1.0, 2.0, ACTIVE)
    return (codes @ atoms).astype(np.float32), atoms


CONFIG = sae.SAEConfig(n_features=24, k=ACTIVE, steps=800, batch_size=256, learning_rate=5e-3,
                       resample_every=200, dead_after=100)


@pytest.fixture(scope="module")
def trained(sparse_data):
    x, _ = sparse_data
    return sae.train_sae(x, CONFIG, seed=0)


def test_encode_matches_a_numpy_topk_reference():
    rng = np.random.default_rng(1)
    params = sae.SAEParams(*(jnp.asarray(a, jnp.float32) for a in
                             (rng.normal(size=(5, 7)), rng.normal(size=7), rng.normal(size=(7, 5)), rng.normal(size=5))))
    x = rng.normal(size=(9, 5)).astype(np.float32)
    pre = (x - np.asarray(params.b_dec)) @ np.asarray(params.w_enc) + np.asarray(params.b_enc)
    expected = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :3]
    np.put_along_axis(expected, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    np.testing.assert_allclose(sae.encode(params, x, 3), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.reconstruct(params, x, 3), expected @ np.asarray(params.w_dec) + np.asarray(params.b_dec),
                               rtol=1e-4, atol=1e-4)


def test_recovers_the_generating_dictionary(sparse_data, trained):
    """Mean max cosine similarity (MMCS, Sharkey et al. 2022) of the true atoms to the learned rows."""
    x, atoms = sparse_data
    params, info = trained
    cosine = np.abs(np.asarray(params.w_dec) @ atoms.T)  # [learned, true]
    best = cosine.max(axis=0)
    assert best.mean() > 0.9 and best.min() > 0.8, best.round(2)
    m = sae.sae_metrics(params, x, ACTIVE)
    assert float(m["fvu"]) < 0.1 and float(m["l0"]) <= ACTIVE and float(m["cosine"]) > 0.95
    assert float(info.loss[-50:].mean()) < float(info.loss[:50].mean())
    # A random dictionary of the same size does not look like this: the test can fail.
    random = np.random.default_rng(2).normal(size=(24, D))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    assert np.abs(random @ atoms.T).max(axis=0).mean() < 0.8


def test_decoder_rows_stay_unit_norm(trained):
    params, _ = trained
    np.testing.assert_allclose(np.linalg.norm(params.w_dec, axis=1), 1.0, atol=1e-5)


def test_unit_norm_decoder_needs_params():
    opt = optax.chain(optax.sgd(0.1), sae.unit_norm_decoder())
    p = sae.init_sae(jax.random.key(0), 3, 4)
    with pytest.raises(ValueError, match="params"):
        opt.update(p, opt.init(p))


def test_resampling_revives_dead_features(sparse_data, trained):
    x, _ = sparse_data
    # Half the features start dead: an encoder bias no input can overcome.
    params = sae.init_sae(jax.random.key(0), D, 24, b_dec=x.mean(0))
    params = params._replace(b_enc=params.b_enc.at[:12].set(-1e3))
    assert float(sae.sae_metrics(params, x, ACTIVE)["dead_fraction"]) >= 0.5
    dead = jnp.arange(24) < 12
    revived = sae.resample_dead(params, dead, jnp.asarray(x[:512]), ACTIVE, jax.random.key(1))
    np.testing.assert_array_equal(revived.w_dec[12:], params.w_dec[12:])
    assert float(revived.b_enc[:12].max()) == 0.0
    np.testing.assert_allclose(np.linalg.norm(revived.w_dec, axis=1), 1.0, atol=1e-5)
    # In training, features that died were re-initialised (and the dictionary was still recovered, above);
    # with 24 features for 16 atoms some must end up redundant, so "none dead" is not the claim.
    _, info = trained
    assert int(info.n_resampled) > 0


def test_vmapped_training_equals_one_at_a_time_and_is_deterministic(sparse_data):
    x, _ = sparse_data
    small = dataclasses.replace(CONFIG, steps=60, batch_size=64, resample_every=20, dead_after=10)
    xs = np.stack([x[:512], x[512:1024]])
    stacked, _ = sae.train_sae_many(xs, small, seeds=[3, 4])
    one, _ = sae.train_sae(xs[1], small, seed=4)
    again, _ = sae.train_sae(xs[1], small, seed=4)
    for a, b, c in zip(jax.tree.leaves(jax.tree.map(lambda t: t[1], stacked)), jax.tree.leaves(one),
                       jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(b, c)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        sae.train_sae(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="floating"):
        sae.train_sae(np.zeros((8, 3), np.int32))
    with pytest.raises(ValueError, match="k=9"):
        sae.train_sae(np.zeros((8, 3), np.float32), sae.SAEConfig(n_features=4, k=9))
    with pytest.raises(ValueError, match="seeds"):
        sae.train_sae_many(np.zeros((2, 8, 3), np.float32), sae.SAEConfig(n_features=4, k=1), seeds=[1, 2, 3])
