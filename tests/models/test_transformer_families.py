"""The reference transformer's family features (issue 16, item 1) without torch: the invariants every config must
keep (sites, causality, left padding, KV cache, per-head outputs), each feature against its formula, and per-layer
values read through a traced layer index as a scanned stack of blocks will read them.

The comparison with ``transformers`` itself is ``test_importer_families.py`` (it needs torch).
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign.hooks import SiteRunner
from idesign.models import transformer as transformer_lib
from tests.conftest import random_tokens

V = 37
FAMILY_CONFIGS = {
    # Gemma 3-like: every new attention feature at once; window 3 is shorter than every test sequence.
    "gemma": ids.TransformerConfig.llama_like(
        V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_head=12, activation="gelu_tanh", max_len=64,
        norm_unit_offset=True, block_norms="pre_post", scale_embeddings=True, attn_logit_softcap=3.0,
        final_logit_softcap=4.0, query_pre_attn_scalar=20.0, qk_norm="head",
        layer_types=("sliding", "global", "sliding"), sliding_window=3, rope_theta=1e4, local_rope_theta=50.0,
        rope_scaling=ids.models.RopeScaling("linear", 4.0)),
    "olmo": ids.TransformerConfig.llama_like(V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64,
                                             block_norms="post", qk_norm="proj"),
    "neox": ids.TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_len=64, positions="rotary",
                                  rotary_pct=0.5, parallel_residual=True, activation="gelu", tie_embeddings=False),
}
_BUILT: dict = {}


def _build(name: str):
    """``(apply, jitted apply, params)`` with every parameter randomised (so zero-initialised Gemma scales count)."""
    if name not in _BUILT:
        apply, params = ids.init_transformer(FAMILY_CONFIGS[name], seed=0)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        params = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
        _BUILT[name] = (apply, jax.jit(apply), params)
    return _BUILT[name]


@pytest.fixture(params=sorted(FAMILY_CONFIGS), scope="module")
def family(request):
    return request.param


def test_site_names_are_the_visited_sites_and_the_residual_adds_up(family):
    apply, jitted, params = _build(family)
    runner = SiteRunner({"blocks.*.attn.head_out": ids.Capture()}, apply.site_names)
    nnx.merge(apply.graphdef, params).forward(random_tokens(0, (1, 4)), runner)
    assert runner.visited == set(apply.site_names)
    _, cap = jitted(params, random_tokens(1, (2, 6)), hooks={"*": ids.Capture()})
    for i in range(apply.config.n_layers):
        b = f"blocks.{i}"
        np.testing.assert_allclose(cap[f"{b}.resid_post"], cap[f"{b}.resid_pre"] + cap[f"{b}.attn_out"]
                                   + cap[f"{b}.mlp_out"], atol=1e-5)
        # The per-head outputs (materialised when hooked) still sum to the attention output before any post-norm.
        bias = params["blocks"][i]["attn"]["o_proj"].get("bias", 0.0)
        np.testing.assert_allclose(cap[f"{b}.attn.head_out"].sum(2) + bias, cap[f"{b}.attn.o_proj.out"], atol=1e-5)


def test_causal_left_padding_and_kv_cache(family):
    apply, jitted, params = _build(family)
    toks = random_tokens(2, (2, 10), V)
    full, _ = jitted(params, toks)
    changed = toks.at[:, 6:].set((toks[:, 6:] + 1) % V)
    np.testing.assert_allclose(jitted(params, changed)[0][:, :6], full[:, :6], atol=1e-6)
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), toks], 1)
    valid = jnp.broadcast_to(jnp.arange(13)[None] >= 3, (2, 13))
    np.testing.assert_allclose(jitted(params, padded, valid=valid)[0][:, 3:], full, atol=1e-5)
    cache = apply.init_cache(2, 12)
    step = jax.jit(apply.forward)
    out, _, cache = step(params, toks[:, :4], cache=cache)
    pieces = [out]
    for t in range(4, 10):
        out, _, cache = step(params, toks[:, t:t + 1], cache=cache)
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_a_traced_layer_index_gives_the_same_model(family, monkeypatch):
    """Per-layer windows and rotary bases are data indexed by layer: a traced index (as inside ``lax.scan``)
    selects the same values as the Python index."""
    apply, jitted, params = _build(family)
    toks = random_tokens(3, (2, 9), V)
    static, _ = jitted(params, toks)
    block_call = transformer_lib.Block.__call__
    monkeypatch.setattr(transformer_lib.Block, "__call__",
                        lambda self, *args: block_call(self, *args[:-1], jnp.asarray(args[-1], jnp.int32)))
    traced, _ = jax.jit(lambda p, t: apply(p, t))(params, toks)  # a new function: jit's cache would reuse `jitted`
    np.testing.assert_allclose(traced, static, atol=1e-6)


def test_sliding_window_sees_exactly_the_last_w_positions():
    """One sliding layer of window 3: the logits at position t depend on tokens t-2..t only."""
    cfg = FAMILY_CONFIGS["gemma"].replace(n_layers=1, layer_types=("sliding",))
    apply, params = ids.init_transformer(cfg)
    toks = random_tokens(4, (1, 8), V)
    base, cap = apply(params, toks, hooks=ids.capture("blocks.0.attn.pattern"))
    pattern = np.asarray(cap["blocks.0.attn.pattern"])[0, 0]
    expected = (np.arange(8)[None] <= np.arange(8)[:, None]) & (np.arange(8)[:, None] - np.arange(8)[None] < 3)
    np.testing.assert_array_equal(pattern > 0, expected)
    # Left padding shifts slots, not positions: the window still covers three real tokens.
    padded = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), toks], 1)
    valid = jnp.arange(10)[None] >= 2
    np.testing.assert_allclose(apply(params, padded, valid=valid)[0][:, 2:], base, atol=1e-5)
    with_global, _ = ids.init_transformer(cfg.replace(layer_types=("global",)))
    assert not np.allclose(with_global(params, toks)[0][:, 3:], base[:, 3:], atol=1e-3)


def test_feature_formulas():
    """Unit-offset norm, soft-caps, the √d embedding scale rounded to the model dtype, and partial rotary."""
    cfg = FAMILY_CONFIGS["gemma"]
    norm = transformer_lib.Norm(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 32))
    norm.scale[...] = jnp.linspace(-0.5, 0.5, 32)
    rms = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
    np.testing.assert_allclose(norm(x), rms * (1 + jnp.linspace(-0.5, 0.5, 32)), rtol=1e-5)

    apply, _, params = _build("gemma")
    logits, cap = apply(params, random_tokens(5, (1, 4), V), hooks=ids.capture("unembed.out", "embed"))
    np.testing.assert_allclose(logits, 4.0 * np.tanh(cap["unembed.out"] / 4.0), rtol=1e-5)
    assert np.abs(logits).max() < 4.0
    bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    apply16, params16 = ids.init_transformer(bf16)
    toks = random_tokens(6, (1, 4), V)
    _, cap16 = apply16(params16, toks, hooks=ids.capture("embed"))
    table = params16["embed"]["embedding"][toks]
    # Gemma's normaliser is sqrt(32) = 5.657 rounded to bfloat16 (5.65625) before it multiplies.
    np.testing.assert_array_equal(cap16["embed"], table * jnp.asarray(32 ** 0.5, jnp.bfloat16))

    q = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
    positions = jnp.arange(5)[None]
    partial = transformer_lib._rotate(q, positions, jnp.asarray(ids.models.rope_frequencies(4, 100.0)))
    np.testing.assert_array_equal(partial[..., 4:], q[..., 4:])
    np.testing.assert_allclose(partial[..., :4], ids.models.rotary(q[..., :4], positions, 100.0), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_types=("sliding",)), r"layer_types=\('sliding',\); expected a tuple of n_layers=2"),
    (dict(layer_types=("sliding", "local")), r"layer_types\[1\]='local'; expected 'global' or 'sliding'"),
    (dict(layer_types=("sliding", "global")), "sliding layers but sliding_window is None"),
    (dict(block_norms="sandwich"), r"block_norms='sandwich'; expected one of"),
    (dict(qk_norm="layer"), r"qk_norm='layer'; expected one of"),
    (dict(rotary_pct=0.0), r"rotary_pct=0.0; expected a fraction in \(0, 1\]"),
    (dict(positions="rotary", d_model=24, n_heads=2, rotary_pct=0.25), "rotary_pct=0.25 rotates 3"),
    (dict(attn_logit_softcap=0.0), r"attn_logit_softcap=0.0; expected a positive number"),
    (dict(parallel_residual=True, block_norms="post"), "parallel_residual needs block_norms='pre'"),
])
def test_bad_family_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ids.TransformerConfig(vocab_size=10, **kwargs)
