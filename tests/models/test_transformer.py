import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign.hooks import SiteRunner
from tests.conftest import build, random_tokens


def test_every_site_is_visited_once_and_has_the_documented_shape(any_config):
    cfg = any_config
    apply, params = build(cfg)
    B, T = 2, 7
    logits, cap = apply(params, random_tokens(0, (B, T)), hooks={"*": ids.Capture()})
    assert set(cap) == set(apply.site_names)
    H, K, Dh, D, F = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.ff_dim
    assert cap["blocks.1.attn.q"].shape == (B, T, H, Dh)
    assert cap["blocks.1.attn.k"].shape == (B, T, K, Dh)
    assert cap["blocks.0.attn.pattern"].shape == (B, H, T, T)
    assert cap["blocks.0.attn.head_out"].shape == (B, T, H, D)
    assert cap["blocks.0.mlp.hidden"].shape == (B, T, F)
    assert cap["blocks.0.mlp.up.in"].shape == (B, T, D)
    assert cap["logits"].shape == (B, T, cfg.vocab_size)
    np.testing.assert_allclose(cap["logits"], logits)


def test_site_names_are_exactly_the_sites_the_forward_pass_visits(any_config):
    apply, params = build(any_config)
    runner = SiteRunner({"blocks.*.attn.head_out": ids.Capture()}, apply.site_names)
    import flax.nnx as nnx
    nnx.merge(apply.graphdef, params).forward(random_tokens(0, (1, 3)), runner)
    assert runner.visited == set(apply.site_names)


def test_capturing_changes_nothing(any_config):
    apply, params = build(any_config)
    toks = random_tokens(1, (2, 6))
    plain, _ = apply(params, toks)
    hooked, _ = apply(params, toks, hooks={"*": ids.Capture()})
    np.testing.assert_allclose(plain, hooked, atol=1e-6)


def test_causal_later_tokens_do_not_change_earlier_logits(any_config):
    apply, params = build(any_config)
    a = random_tokens(2, (1, 8))
    b = a.at[0, 5:].set((a[0, 5:] + 1) % any_config.vocab_size)
    np.testing.assert_allclose(apply(params, a)[0][:, :5], apply(params, b)[0][:, :5], atol=1e-6)
    assert not np.allclose(apply(params, a)[0][:, 5:], apply(params, b)[0][:, 5:])


def test_dense_sites_are_the_inputs_and_outputs_of_the_kernels(any_config):
    apply, params = build(any_config)
    _, cap = apply(params, random_tokens(3, (2, 5)), hooks={"*": ids.Capture()})
    for name, kernel_path in apply.dense_layers.items():
        kernel = ids.tree.named_leaves(params)[kernel_path]
        if kernel_path == "embed.embedding":
            kernel = kernel.T
        bias = ids.tree.named_leaves(params).get(f"{name}.bias", 0.0)
        np.testing.assert_allclose(cap[f"{name}.in"] @ kernel + bias, cap[f"{name}.out"], atol=2e-5, err_msg=name)


def test_per_head_outputs_sum_to_the_attention_output(any_config):
    apply, params = build(any_config)
    _, cap = apply(params, random_tokens(4, (2, 5)), hooks={"*": ids.Capture()})
    bias = params["blocks"][1]["attn"]["o_proj"].get("bias", 0.0)
    np.testing.assert_allclose(cap["blocks.1.attn.head_out"].sum(2) + bias, cap["blocks.1.attn_out"], atol=1e-5)


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads(tiny_llama_config):
    gqa = tiny_llama_config
    full = gqa.replace(n_kv_heads=None)
    apply_g, pg = build(gqa)
    apply_f, pf = build(full)
    group, dh = gqa.n_heads // gqa.kv_heads, gqa.head_dim
    pf = jax.tree_util.tree_map(lambda x: x, pg)  # same weights, then widen k/v by repeating heads
    for block in pf["blocks"].values():
        for name in ("k_proj", "v_proj"):
            w = block["attn"][name]["kernel"]
            w = w.reshape(w.shape[0], gqa.kv_heads, 1, dh).repeat(group, 2).reshape(w.shape[0], -1)
            block["attn"][name] = {"kernel": w}
    toks = random_tokens(5, (2, 9))
    np.testing.assert_allclose(apply_g(pg, toks)[0], apply_f(pf, toks)[0], atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_match_their_formulas(norm):
    cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1, norm=norm, norm_eps=1e-5)
    apply, params = build(cfg)
    _, cap = apply(params, random_tokens(6, (2, 4), 11), hooks=ids.capture("blocks.0.resid_pre", "blocks.0.ln1.out"))
    x = np.asarray(cap["blocks.0.resid_pre"], np.float64)
    if norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(cap["blocks.0.ln1.out"], ref, atol=1e-5)


def test_rotary_is_relative_attention_scores_depend_on_offset_only():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
    def score(i, j):
        qi = ids.models.rotary(q, jnp.array([[i]]), 10000.0)
        kj = ids.models.rotary(k, jnp.array([[j]]), 10000.0)
        return float((qi * kj).sum())
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_left_padding_gives_the_same_logits_as_the_unpadded_sequence(any_config):
    apply, params = build(any_config)
    toks = random_tokens(7, (1, 5))
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], 1)
    valid = jnp.arange(8)[None] >= 3
    np.testing.assert_allclose(apply(params, padded, valid=valid)[0][:, 3:], apply(params, toks)[0], atol=1e-5)


def test_kv_cache_prefill_and_decode_match_full_recompute(any_config):
    apply, params = build(any_config)
    toks = random_tokens(8, (2, 10))
    full, _ = apply(params, toks)
    cache = apply.init_cache(2, 12)
    out, _, cache = apply.forward(params, toks[:, :6], cache=cache)
    steps = [out]
    for t in range(6, 10):
        out, _, cache = apply.forward(params, toks[:, t:t + 1], cache=cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    assert int(cache.length) == 10


def test_bfloat16_compute_runs_and_stays_close_to_float32(tiny_config):
    apply32, params = build(tiny_config)
    apply16, _ = build(tiny_config.replace(dtype="bfloat16"))
    toks = random_tokens(9, (2, 6))
    l32, l16 = apply32(params, toks)[0], apply16(params, toks)[0]
    assert l16.dtype == jnp.float32 and bool(jnp.isfinite(l16).all())
    assert float(jnp.abs(l32 - l16).max()) < 0.05


def test_tied_and_untied_unembedding(tiny_config):
    apply, params = build(tiny_config.replace(tie_embeddings=False))
    assert params["unembed"]["kernel"].shape == (tiny_config.d_model, tiny_config.vocab_size)
    assert apply.dense_layers["unembed"] == "unembed.kernel"


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(norm="batchnorm"), r"norm='batchnorm'; expected one of"),
    (dict(n_layers=0), "n_layers=0; expected a positive integer"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ids.TransformerConfig(vocab_size=10, **kwargs)


def test_bad_tokens_are_explained(tiny_config):
    apply, params = build(tiny_config)
    with pytest.raises(TypeError, match="integer token ids; got dtype float32"):
        apply(params, jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match=re.escape("[batch, seq]; got shape (3,) (add a batch axis")):
        apply(params, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="exceeds the model's max_len=64"):
        apply(params, jnp.zeros((1, 65), jnp.int32))


def test_params_that_do_not_fit_name_the_path(tiny_config):
    apply, params = build(tiny_config)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["blocks"][1]["mlp"]["up"]["kernel"] = jnp.zeros((3, 3))
    del bad["final_norm"]["bias"]
    with pytest.raises(ValueError) as e:
        apply(bad, jnp.zeros((1, 3), jnp.int32))
    assert "blocks.1.mlp.up.kernel: shape (3, 3), expected (32, 128)" in str(e.value)
    assert "missing final_norm.bias" in str(e.value)


def test_cache_overflow_is_refused(tiny_config):
    apply, params = ids.init_transformer(tiny_config)
    cache = apply.init_cache(1, 4)
    _, _, cache = apply.forward(params, jnp.zeros((1, 3), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="cache overflow: 3 slots filled \\+ 2 new tokens > 4 slots"):
        apply.forward(params, jnp.zeros((1, 2), jnp.int32), cache=cache)
