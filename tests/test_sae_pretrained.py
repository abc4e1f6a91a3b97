"""Pretrained SAEs (SAELens, Gemma Scope) against hand computation on files the tests write; the SAE splice."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import idesign as ids
from idesign import sae as sae_lib

D, M = 8, 12
RNG = np.random.default_rng(0)


def _weights(**extra):
    w = {"W_enc": RNG.normal(size=(D, M)), "b_enc": RNG.normal(size=M) * 0.3, "W_dec": RNG.normal(size=(M, D)),
         "b_dec": RNG.normal(size=D) * 0.3, **extra}
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def _write_saelens(tmp_path, cfg, weights):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    return tmp_path


X = RNG.normal(size=(5, 3, D)).astype(np.float32)
relu = lambda a: np.maximum(a, 0)


def test_saelens_standard_matches_hand_computation(tmp_path):
    w = _weights()
    s = sae_lib.load_saelens(_write_saelens(tmp_path, {"d_in": D, "d_sae": M, "architecture": "standard",
                                                       "apply_b_dec_to_input": True, "normalize_activations": "none",
                                                       "dtype": "float32", "metadata": {"hook_name": "blocks.0.hook_resid_post"}}, w))
    f = relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(s.encode(X), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.decode(f), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.reconstruct(X), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-4)
    assert (s.d_in, s.d_sae, s.hook_name) == (D, M, "blocks.0.hook_resid_post")
    assert (f > 0).any() and (f == 0).any()  # both branches of the ReLU are exercised


@pytest.mark.parametrize("stored", ["threshold", "log_threshold"])
def test_saelens_jumprelu_matches_hand_computation(tmp_path, stored):
    theta = np.abs(RNG.normal(size=M)).astype(np.float32) * 0.5
    w = _weights(**{stored: theta if stored == "threshold" else np.log(theta)})
    s = sae_lib.load_saelens(_write_saelens(tmp_path, {"d_in": D, "d_sae": M, "architecture": "jumprelu",
                                                       "apply_b_dec_to_input": False}, w))
    pre = X @ w["W_enc"] + w["b_enc"]
    f = (pre > theta) * relu(pre)
    np.testing.assert_allclose(s.encode(X), f, rtol=1e-5, atol=1e-5)
    assert ((pre > 0) & (pre <= theta)).any()  # some units are cut by the threshold, not by the ReLU


def test_saelens_topk_current_and_pre_6_configs_agree_with_hand_computation(tmp_path):
    w = _weights()
    new = sae_lib.load_saelens(_write_saelens(tmp_path / "new", {"d_in": D, "d_sae": M, "architecture": "topk", "k": 3}, w))
    old = sae_lib.load_saelens(_write_saelens(tmp_path / "old", {
        "d_in": D, "d_sae": M, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.1.hook_resid_pre", "normalize_activations": False}, w))
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = np.argsort(-pre, axis=-1)[..., :3]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, relu(np.take_along_axis(pre, top, -1)), -1)
    np.testing.assert_allclose(new.encode(X), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new.encode(X), old.encode(X))
    assert old.hook_name == "blocks.1.hook_resid_pre" and old.k == 3 and old.architecture == "topk"


def test_saelens_gated_matches_hand_computation(tmp_path):
    w = _weights()
    del w["b_enc"]
    w.update(b_gate=RNG.normal(size=M).astype(np.float32), r_mag=RNG.normal(size=M).astype(np.float32) * 0.2,
             b_mag=RNG.normal(size=M).astype(np.float32))
    s = sae_lib.load_saelens(_write_saelens(tmp_path, {"d_in": D, "d_sae": M, "architecture": "gated"}, w))
    x = X - w["b_dec"]
    f = ((x @ w["W_enc"] + w["b_gate"]) > 0) * relu(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
    np.testing.assert_allclose(s.encode(X), f, rtol=1e-5, atol=1e-5)


def test_pre_6_scaling_factor_and_normalisations_match_hand_computation(tmp_path):
    scale = (1 + RNG.uniform(size=M)).astype(np.float32)
    w = _weights(scaling_factor=scale)
    s = sae_lib.load_saelens(_write_saelens(tmp_path / "a", {"d_in": D, "d_sae": M, "finetuning_scaling_factor": True}, w))
    f = relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(s.decode(f), (f * scale) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-4)
    w = _weights()
    cnr = sae_lib.load_saelens(_write_saelens(tmp_path / "b", {"d_in": D, "d_sae": M,
                                                                "normalize_activations": "constant_norm_rescale"}, w))
    coeff = np.sqrt(D) / np.linalg.norm(X, axis=-1, keepdims=True)
    f = relu((X * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(cnr.reconstruct(X), (f @ w["W_dec"] + w["b_dec"]) / coeff, rtol=1e-4, atol=1e-4)
    ln = sae_lib.load_saelens(_write_saelens(tmp_path / "c", {"d_in": D, "d_sae": M, "normalize_activations": "layer_norm"}, w))
    mu, sd = X.mean(-1, keepdims=True), X.std(-1, ddof=1, keepdims=True)   # torch's unbiased std, as SAELens
    f = relu(((X - mu) / (sd + 1e-5) - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(ln.reconstruct(X), (f @ w["W_dec"] + w["b_dec"]) * sd + mu, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decode\\(features, x\\)"):
        ln.decode(f)


def test_gemma_scope_matches_its_formula(tmp_path):
    w = _weights(threshold=np.abs(RNG.normal(size=M)).astype(np.float32) * 0.5)
    np.savez(tmp_path / "params.npz", **w)
    s = sae_lib.load_gemma_scope(tmp_path, hook_name="blocks.0.resid_post")
    pre = X @ w["W_enc"] + w["b_enc"]   # no b_dec subtracted from the input
    f = (pre > w["threshold"]) * pre
    np.testing.assert_allclose(s.encode(X), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.decode(f), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-4)
    assert s.architecture == "jumprelu" and not s.apply_b_dec_to_input
    # lowercase keys (as some exports write them) load the same SAE
    np.savez(tmp_path / "lower.npz", **{k.lower() if k.startswith("W_") else k: v for k, v in w.items()})
    np.testing.assert_array_equal(sae_lib.load_gemma_scope(tmp_path / "lower.npz").encode(X), s.encode(X))


@pytest.mark.parametrize("cfg, pattern", [
    ({"d_in": D}, "'d_sae'"),
    ({"d_sae": M}, "'d_in'"),
    ({"d_in": D, "d_sae": M, "architecture": "topk"}, "'k'"),
    ({"d_in": D, "d_sae": M, "architecture": "matryoshka"}, "'architecture'.*supported"),
    ({"d_in": D, "d_sae": M, "activation_fn_str": "tanh-relu"}, "'activation_fn'"),
    ({"d_in": D, "d_sae": M, "normalize_activations": "whiten"}, "'normalize_activations'"),
    ({"d_in": "8", "d_sae": M}, "'d_in'"),
])
def test_malformed_cfg_names_the_field(tmp_path, cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        sae_lib.load_saelens(_write_saelens(tmp_path, cfg, _weights()))


def test_bad_tensors_are_named(tmp_path):
    cfg = {"d_in": D, "d_sae": M}
    w = _weights()
    with pytest.raises(ValueError, match="missing \\['b_enc'\\]"):
        sae_lib.load_saelens(_write_saelens(tmp_path / "a", cfg, {k: v for k, v in w.items() if k != "b_enc"}))
    with pytest.raises(ValueError, match="'W_dec' has shape \\(12, 7\\).*\\(12, 8\\)"):
        sae_lib.load_saelens(_write_saelens(tmp_path / "b", cfg, {**w, "W_dec": w["W_dec"][:, :7].copy()}))
    with pytest.raises(ValueError, match="\\['threshold'\\] have no place"):
        sae_lib.load_saelens(_write_saelens(tmp_path / "c", cfg, {**w, "threshold": np.ones(M, np.float32)}))
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        sae_lib.load_saelens(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# The splice, on a tiny transformer.

SITE = "blocks.0.resid_post"
FEATURES = SITE + ".sae.features"


@pytest.fixture(scope="module")
def model():
    cfg = ids.TransformerConfig(vocab_size=13, d_model=D, n_heads=2, n_layers=2)
    apply, params = ids.init_transformer(cfg, seed=0)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 13, (6, 5)), jnp.int32)
    # A standard SAE whose features are often active on this site (positive encoder bias).
    s = sae_lib.SAE(w_enc=jnp.asarray(rng.normal(size=(D, M)), jnp.float32), b_enc=jnp.full((M,), 0.5),
                    w_dec=jnp.asarray(rng.normal(size=(M, D)) * 0.3, jnp.float32), b_dec=jnp.zeros(D))
    return apply, params, tokens, s


def test_splice_with_error_leaves_the_forward_pass_unchanged(model):
    apply, params, tokens, s = model
    plain, _ = apply(params, tokens)
    spliced, captured = apply(params, tokens, hooks={SITE: (ids.Capture(), sae_lib.Splice(s, error=True)),
                                                     FEATURES: ids.Capture(), SITE + ".sae.error": ids.Capture()})
    np.testing.assert_array_equal(spliced, plain)
    h = captured[SITE]
    np.testing.assert_allclose(captured[FEATURES], s.encode(h), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(captured[SITE + ".sae.error"], h - s.reconstruct(h), rtol=1e-5, atol=1e-5)
    # without the error term the site holds the reconstruction, and the logits move
    recon, _ = apply(params, tokens, hooks={SITE: sae_lib.Splice(s)})
    replaced, _ = apply(params, tokens, hooks={SITE: ids.Replace(s.reconstruct(h))})
    np.testing.assert_allclose(recon, replaced, rtol=1e-5, atol=1e-5)
    assert not np.allclose(recon, plain, atol=1e-3)


def test_splice_refuses_an_sae_of_another_width(model):
    apply, params, tokens, _ = model
    narrow = sae_lib.SAE(w_enc=jnp.eye(4, 6), b_enc=jnp.zeros(6), w_dec=jnp.eye(6, 4), b_dec=jnp.zeros(4),
                         hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=f"Splice at site '{SITE}'.*d_in=4.*width {D}"):
        apply(params, tokens, hooks={SITE: sae_lib.Splice(narrow)})
    with pytest.raises(KeyError, match="unknown site"):  # feature sites exist only where a splice is hooked
        apply(params, tokens, hooks={FEATURES: ids.Capture()})


def test_feature_site_feeds_collect_activations_and_a_probe(model):
    apply, params, tokens, s = model
    hooks = {SITE: sae_lib.Splice(s, error=True)}
    labels = np.asarray(tokens[:, -1] % 2)
    acts = ids.collect_activations(apply, params, {"tokens": np.asarray(tokens), "label": labels},
                                   [FEATURES, SITE], batch_size=4, positions="last", hooks=hooks, progress=False)
    assert acts[FEATURES].shape == (6, M)
    np.testing.assert_allclose(acts[FEATURES], s.encode(acts[SITE]), rtol=1e-5, atol=1e-5)
    probe = ids.probes.fit_mass_mean(acts[FEATURES], acts["label"])
    assert probe.w.shape == (M,)


def test_steering_a_feature_adds_its_decoder_row(model):
    apply, params, tokens, s = model
    j, alpha = 3, 2.5
    steered, _ = apply(params, tokens, hooks={SITE: sae_lib.Splice(s, error=True),
                                              FEATURES: ids.Add(jnp.eye(M)[j], alpha)})
    reference, _ = apply(params, tokens, hooks={SITE: ids.Add(s.w_dec[j], alpha)})
    np.testing.assert_allclose(steered, reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(steered, apply(params, tokens)[0], atol=1e-3)


def test_caft_ablates_a_feature_during_training(model):
    apply, params, tokens, s = model
    j = 5
    splice = ids.shaping.TrainingHooks({SITE: sae_lib.Splice(s, error=True)})
    th = ids.shaping.combine(splice, ids.shaping.caft({FEATURES: jnp.eye(M)[j:j + 1]}))
    # the ablation removes exactly feature j's contribution f_j * w_dec[j] from the site
    manual = ids.Apply(lambda h: h - s.encode(h)[..., j:j + 1] * s.w_dec[j])
    ablated, _ = apply(params, tokens, hooks=th.resolve({}))
    reference, _ = apply(params, tokens, hooks={SITE: manual})
    np.testing.assert_allclose(ablated, reference, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(s.encode(apply(params, tokens, hooks=ids.capture(SITE))[1][SITE])[..., j]).max()) > 0
    opt = optax.sgd(0.1)
    step = ids.make_train_step(ids.lm_loss(apply, hooks=th), opt)
    state, metrics = step(ids.init_train_state(params, opt), {"tokens": tokens})
    loss_plain, _ = ids.lm_loss(apply)(params, {"tokens": tokens})
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != float(loss_plain)


def test_trained_topk_sae_splices_like_a_loaded_one(model):
    apply, params, tokens, _ = model
    x = np.asarray(apply(params, tokens, hooks=ids.capture(SITE))[1][SITE]).reshape(-1, D)
    p, _ = sae_lib.train_sae(x, sae_lib.SAEConfig(n_features=M, k=2, steps=10, batch_size=8))
    s = sae_lib.SAE.from_params(p, k=2)
    np.testing.assert_allclose(s.encode(x), sae_lib.encode(p, x, 2), rtol=1e-6, atol=1e-6)
    out, _ = apply(params, tokens, hooks={SITE: sae_lib.Splice(s, error=True)})
    np.testing.assert_array_equal(out, apply(params, tokens)[0])
