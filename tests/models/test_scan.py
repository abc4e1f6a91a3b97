"""Scanned blocks (``TransformerConfig(scan_layers=True)``) against the unrolled model, on the same parameters.

The parameter pytree is per layer either way, so one ``params`` feeds both; every comparison is
float32 and must agree to 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import idesign as ids
from idesign._pytree import pytree_class

ATOL = 1e-5
CFG = ids.TransformerConfig.llama_like(vocab_size=41, d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, max_len=32)
GPT = ids.TransformerConfig.gpt2_like(vocab_size=41, d_model=16, n_layers=3, n_heads=2, max_len=32)
# Per-layer differences given as data (Gemma 3's sliding/global alternation with its own rotary bases).
GEMMA = CFG.replace(layer_types=("sliding", "global", "sliding", "global"), sliding_window=3, local_rope_theta=100.0,
                    block_norms="pre_post", qk_norm="head", norm_unit_offset=True, scale_embeddings=True,
                    attn_logit_softcap=20.0)


def _pair(cfg):
    apply, params = ids.init_transformer(cfg, seed=3)
    scanned, scanned_params = ids.init_transformer(cfg.replace(scan_layers=True), seed=3)
    # Same pytree paths and shapes, and the same initial values: a checkpoint fits either model.
    assert jax.tree.structure(params) == jax.tree.structure(scanned_params)
    return apply, scanned, params


def _batch(seed=0, shape=(2, 7)):
    tokens = jax.random.randint(jax.random.key(seed), shape, 0, 41, jnp.int32)
    valid = jnp.ones(shape, bool).at[1, :2].set(False)  # row 1 left-padded
    return tokens, valid


def _close(a, b, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0, err_msg=what)


@pytest.mark.parametrize("cfg", [CFG, GPT, GEMMA], ids=["llama", "gpt2", "gemma"])
def test_logits_and_every_site_match_the_unrolled_model(cfg):
    apply, scanned, params = _pair(cfg)
    tokens, valid = _batch()
    hooks = {"*": ids.Capture()}
    run = lambda f: jax.jit(lambda p, t, v: f(p, t, hooks=hooks, valid=v))(params, tokens, valid)
    (logits, cap), (s_logits, s_cap) = run(apply), run(scanned)
    _close(logits, s_logits, "logits")
    assert set(cap) == set(s_cap) == set(apply.site_names)  # per-layer names
    for site in cap:
        _close(cap[site], s_cap[site], site)


def test_hooks_at_chosen_layers_act_only_there():
    apply, scanned, params = _pair(CFG)
    tokens, valid = _batch(1)
    basis = jnp.eye(16)[:3]
    hooks = {
        "blocks.2.resid_post": (ids.Capture(), ids.Add(0.5 * jnp.ones(16))),  # steering at a middle layer
        "blocks.1.mlp.hidden": ids.Ablate(basis[:, :16]) if CFG.ff_dim == 16 else ids.Replace(jnp.zeros(CFG.ff_dim)),
        "blocks.0.resid_post": ids.Ablate(basis),
        "blocks.3.resid_post": ids.Add(jnp.ones((7, 16))),  # another shape at another layer: its own group
        "blocks.*.attn_out": ids.Capture(),
        "blocks.1.attn.head_out": ids.Capture(),  # materialised in every scanned layer; captured at one
        "blocks.2.mlp.up.out": ids.Apply(lambda site, h: h * (2.0 if site == "blocks.2.mlp.up.out" else 0.0),
                                         with_site=True),
    }
    f = lambda a: jax.jit(lambda p: a(p, tokens, hooks=hooks, valid=valid))(params)
    (logits, cap), (s_logits, s_cap) = f(apply), f(scanned)
    _close(logits, s_logits, "logits")
    assert set(cap) == set(s_cap)
    for site in cap:
        _close(cap[site], s_cap[site], site)
    # The hooks did change the output (so the comparison is not vacuous).
    assert not np.allclose(apply(params, tokens, valid=valid)[0], logits, atol=1e-3)


def test_a_train_step_with_frozen_and_projected_gives_the_same_params():
    apply, scanned, params = _pair(CFG)
    tokens, valid = _batch(2, (4, 8))
    batch = {"tokens": tokens, "valid": valid}
    u = ids.subspaces.Subspace(jnp.eye(16)[:2])
    subspaces = ids.optim.projection.subspaces_for(params, {"blocks.*.attn.*_proj": u},
                                                    dense_layers=apply.dense_layers)
    freeze = jax.tree.map(lambda _: False, params)
    freeze["blocks"][1] = jax.tree.map(lambda _: True, freeze["blocks"][1])  # block 1 frozen
    opt = ids.optim.frozen(ids.optim.projection.projected(optax.adamw(1e-2), subspaces), freeze_mask=freeze)
    hooks = {"blocks.2.resid_post": ids.Add(0.1 * jnp.ones(16))}
    results = []
    for a in (apply, scanned):
        step = ids.train.make_train_step(ids.train.lm_loss(a, hooks=hooks), opt)
        state = ids.train.init_train_state(params, opt)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state.params, metrics["loss"]))
    (p, loss), (s_p, s_loss) = results
    _close(loss, s_loss, "loss")
    for path, leaf in ids.tree.named_leaves(p).items():
        _close(leaf, ids.tree.named_leaves(s_p)[path], path)
    _close(p["blocks"][1]["mlp"]["up"]["kernel"], params["blocks"][1]["mlp"]["up"]["kernel"], "frozen block moved")


def test_kfac_factors_match():
    apply, scanned, params = _pair(CFG)
    tokens, valid = _batch(3)
    batches = [{"tokens": tokens, "valid": valid}]
    layers = "blocks.*.mlp.down"
    f = ids.curvature.collect_factors(apply, params, batches, layers, progress=False)
    s_f = ids.curvature.collect_factors(scanned, params, batches, layers, progress=False)
    assert list(f) == list(s_f) == [f"blocks.{i}.mlp.down" for i in range(4)]
    for name in f:
        for a, b in zip(f[name], s_f[name]):
            _close(a, b, name)


def test_kv_cache_generation_matches_and_each_cache_layout_is_read():
    apply, scanned, params = _pair(CFG)
    prompts, valid = _batch(4, (2, 5))
    greedy = ids.SamplingConfig(temperature=0.0)
    run = lambda a: ids.generate(a, params, prompts, prompt_valid=valid, max_new_tokens=6, sampling=greedy,
                                 return_logits=True, hooks={"blocks.1.resid_post": ids.Add(0.3 * jnp.ones(16))})
    out, s_out = run(apply), run(scanned)
    np.testing.assert_array_equal(out.tokens, s_out.tokens)
    _close(out.logits, s_out.logits, "generation logits")
    # The scanned model's cache is stacked along a leading layer axis; a per-layer cache also works.
    assert scanned.init_cache(2, 8).layers.keys.shape == (4, 2, 8, 2, 4)
    per_layer = apply.init_cache(2, 8)
    a, _, cache = apply.forward(params, prompts, valid=valid, cache=per_layer)
    b, _, s_cache = scanned.forward(params, prompts, valid=valid, cache=per_layer)
    _close(a, b, "prefill logits")
    for i in range(4):
        _close(cache.layers[i].keys, s_cache.layers.keys[i], f"layer {i} keys")
    # ...and the unrolled model reads a stacked cache, keeping its layout.
    c, _, u_cache = apply.forward(params, prompts, valid=valid, cache=scanned.init_cache(2, 8))
    _close(a, c, "unrolled on a stacked cache")
    assert u_cache.layers.keys.shape == (4, 2, 8, 2, 4)


def test_a_checkpoint_of_the_unrolled_model_loads_into_the_scanned_one(tmp_path):
    apply, scanned, params = _pair(GPT)
    ids.checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    _, fresh = ids.init_transformer(GPT.replace(scan_layers=True), seed=9)
    restored, _ = ids.checkpoint.restore_checkpoint(tmp_path / "ckpt", ids.checkpoint.abstract_like(fresh))
    tokens, valid = _batch(5)
    _close(apply(params, tokens, valid=valid)[0], scanned(restored, tokens, valid=valid)[0], "restored logits")


@pytree_class
class _Tagged(ids.Intervention):
    tag: str  # a leaf that is not an array: cannot be stacked across layers

    def apply(self, site, h):
        return h


def test_hooks_that_cannot_be_stacked_are_refused_naming_the_sites():
    _, scanned, params = _pair(GPT)
    tokens, _ = _batch(6)
    apply, _ = ids.init_transformer(GPT)
    apply(params, tokens, hooks={"blocks.*.resid_post": _Tagged("x")})  # the unrolled model runs it
    with pytest.raises(TypeError, match=r"blocks\.0\.resid_post.*not an array"):
        scanned(params, tokens, hooks={"blocks.*.resid_post": _Tagged("x")})


def test_a_site_runner_without_chain_is_refused():
    from flax import nnx
    _, scanned, params = _pair(GPT)
    model = nnx.merge(scanned.graphdef, params)

    @dataclasses.dataclass
    class Runner:
        captured: dict = dataclasses.field(default_factory=dict)

        def __call__(self, site, h):
            return h

    with pytest.raises(TypeError, match="chain"):
        model.forward(_batch(7)[0], Runner())


def test_stacked_params_train_to_the_same_params_and_bad_layouts_are_refused():
    apply, scanned, params = _pair(GPT)
    tokens, valid = _batch(8, (2, 6))
    stacked = ids.models.stack_blocks(params)
    assert stacked["blocks"]["mlp"]["up"]["kernel"].shape == (3, 16, 64)
    assert jax.tree.structure(ids.models.unstack_blocks(stacked)) == jax.tree.structure(params)
    opt = optax.adamw(1e-2)
    step = ids.train.make_train_step(ids.train.lm_loss(scanned), opt)
    per_layer, _ = step(ids.train.init_train_state(params, opt), {"tokens": tokens, "valid": valid})
    from_stacked, _ = step(ids.train.init_train_state(stacked, opt), {"tokens": tokens, "valid": valid})
    for path, leaf in ids.tree.named_leaves(per_layer.params).items():
        _close(leaf, ids.tree.named_leaves(ids.models.unstack_blocks(from_stacked.params))[path], path)
    with pytest.raises(ValueError, match="only a scan_layers=True model"):
        apply(stacked, tokens)
    short = {**stacked, "blocks": jax.tree.map(lambda x: x[:2], stacked["blocks"])}
    with pytest.raises(ValueError, match=r"n_layers=3: blocks\.attn\.k_proj\.bias: shape \(2, 16\)"):
        scanned(short, tokens)


def test_an_imported_checkpoint_runs_scanned_through_with_config(tmp_path):
    import json
    safetensors = pytest.importorskip("safetensors.numpy")
    hf = {"model_type": "llama", "vocab_size": 41, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3,
          "num_attention_heads": 2, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (41, 8), "model.norm.weight": (8,)}
    for i in range(3):
        shapes.update({f"model.layers.{i}.input_layernorm.weight": (8,),
                       f"model.layers.{i}.post_attention_layernorm.weight": (8,),
                       **{f"model.layers.{i}.self_attn.{p}_proj.weight": (8, 8) for p in "qkvo"},
                       f"model.layers.{i}.mlp.gate_proj.weight": (16, 8), f"model.layers.{i}.mlp.up_proj.weight": (16, 8),
                       f"model.layers.{i}.mlp.down_proj.weight": (8, 16)})
    safetensors.save_file({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()},
                          str(tmp_path / "model.safetensors"))
    apply, params = ids.models.load_pretrained(tmp_path)
    scanned = apply.with_config(scan_layers=True)
    tokens, valid = _batch(9)
    _close(apply(params, tokens, valid=valid)[0], scanned(params, tokens, valid=valid)[0], "imported logits")
    with pytest.raises(ValueError, match="changes the parameters"):
        apply.with_config(n_layers=2)


TINY = ids.TransformerConfig(vocab_size=41, d_model=8, n_layers=3, n_heads=2, max_len=8)
_TINY_APPLY, _TINY_PARAMS = ids.init_transformer(TINY, seed=1)
_TINY_SCANNED = _TINY_APPLY.with_config(scan_layers=True)


@settings(max_examples=6, deadline=None)
@given(layers=st.lists(st.integers(0, 2), max_size=3, unique=True), scale=st.floats(-2, 2), seed=st.integers(0, 99))
def test_steering_any_set_of_layers_agrees_with_the_unrolled_model(layers, scale, seed):
    direction = jax.random.normal(jax.random.key(seed), (8,))
    hooks = {f"blocks.{i}.resid_mid": ids.Add(direction, scale * (i + 1)) for i in layers}
    hooks["blocks.*.mlp_out"] = ids.Capture()
    tokens = jax.random.randint(jax.random.key(seed), (2, 5), 0, 41)
    logits, cap = _TINY_APPLY(_TINY_PARAMS, tokens, hooks=hooks)
    s_logits, s_cap = _TINY_SCANNED(_TINY_PARAMS, tokens, hooks=hooks)
    _close(logits, s_logits, "logits")
    for site in cap:
        _close(cap[site], s_cap[site], site)


def test_an_sae_splice_runs_in_the_scan_and_hooks_on_its_features_are_refused():
    apply, scanned, params = _pair(CFG)
    tokens, valid = _batch(10)
    k = jax.random.split(jax.random.key(0), 2)
    sae = ids.sae.SAE.topk(0.3 * jax.random.normal(k[0], (16, 32)), jnp.zeros(32),
                           0.3 * jax.random.normal(k[1], (32, 16)), jnp.zeros(16), k=4)
    hooks = {"blocks.2.resid_post": ids.sae.Splice(sae), "blocks.*.resid_post": ids.Capture()}
    (logits, cap), (s_logits, s_cap) = (a(params, tokens, hooks=hooks, valid=valid) for a in (apply, scanned))
    _close(logits, s_logits, "logits")
    for site in cap:
        _close(cap[site], s_cap[site], site)
    assert not np.allclose(logits, apply(params, tokens, valid=valid)[0], atol=1e-3)  # the splice changed something
    with pytest.raises(ValueError, match=r"blocks\.2\.resid_post\.sae\.features.*with_config\(scan_layers=False\)"):
        scanned(params, tokens, hooks={**hooks, "blocks.2.resid_post.sae.features": ids.Capture()})


def test_training_in_the_stacked_layout_with_a_stacked_mask_freezes_the_same_layer_slices():
    apply, scanned, params = _pair(GPT)
    tokens, valid = _batch(9, (2, 6))
    batch = {"tokens": tokens, "valid": valid}
    mask = jax.tree.map(lambda _: False, params)
    mask["blocks"][1]["mlp"] = jax.tree.map(lambda _: True, mask["blocks"][1]["mlp"])  # block 1's MLP, whole
    heads = np.zeros((1, 16), bool)
    heads[:, :8] = True  # a compact column mask in block 2 (its first head)
    mask["blocks"][2]["attn"]["q_proj"]["kernel"] = heads
    stacked_mask = ids.models.stack_mask(mask, params)
    assert stacked_mask["blocks"]["attn"]["q_proj"]["kernel"].shape == (3, 1, 16)
    results = []
    for p, m in ((params, mask), (ids.models.stack_blocks(params), stacked_mask)):
        opt = ids.optim.frozen(optax.adamw(1e-2), freeze_mask=m)
        step = ids.train.make_train_step(ids.train.lm_loss(scanned), opt)
        state = ids.train.init_train_state(p, opt)
        for _ in range(2):
            state, _ = step(state, batch)
        results.append(ids.models.unstack_blocks(state.params))
    per_layer, from_stacked = results
    for path, leaf in ids.tree.named_leaves(per_layer).items():
        _close(leaf, ids.tree.named_leaves(from_stacked)[path], path)
    for path, frozen in ids.tree.named_leaves(mask).items():  # the frozen elements, bit for bit, in their layer only
        before, after = ids.tree.named_leaves(params)[path], ids.tree.named_leaves(from_stacked)[path]
        np.testing.assert_array_equal(np.where(frozen, after, before), before, err_msg=path)
    assert not np.allclose(from_stacked["blocks"][0]["mlp"]["up"]["kernel"], params["blocks"][0]["mlp"]["up"]["kernel"])
    one = ids.models.layer_params(ids.models.stack_blocks(params), 2)
    assert jax.tree.structure(one) == jax.tree.structure(params["blocks"][2])
    with pytest.raises(IndexError, match="layer 3 of a model with 3 stacked layers"):
        ids.models.layer_params(ids.models.stack_blocks(params), 3)
    with pytest.raises(ValueError, match=r"blocks\.0 has shape \(16,\)"):
        bad = jax.tree.map(lambda _: False, params)
        bad["blocks"][0]["attn"]["q_proj"]["kernel"] = np.zeros(16, bool)
        ids.models.stack_mask(bad, params)


def test_a_stacked_train_state_checkpoints_and_its_params_read_back_per_layer(tmp_path):
    apply, scanned, params = _pair(GPT)
    opt = optax.adam(1e-2)
    state = ids.train.init_train_state(ids.models.stack_blocks(params), opt)
    ids.checkpoint.save_checkpoint(tmp_path / "state", state)
    restored, _ = ids.checkpoint.restore_checkpoint(tmp_path / "state", ids.checkpoint.abstract_like(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    per_layer = ids.models.unstack_blocks(restored.params)  # read-out: the unrolled model takes it
    tokens, valid = _batch(4)
    _close(apply(per_layer, tokens, valid=valid)[0], scanned(restored.params, tokens, valid=valid)[0], "logits")


def test_per_layer_tools_given_stacked_params_say_to_unstack_them():
    apply, scanned, params = _pair(GPT)
    stacked = ids.models.stack_blocks(params)
    u = ids.subspaces.Subspace(jnp.eye(16)[:2])
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.kernel.*ids\.models\.unstack_blocks\(params\)"):
        ids.optim.projection.subspaces_for(stacked, {"blocks.0.attn.q_proj": u}, dense_layers=scanned.dense_layers)
    tokens, valid = _batch(6)
    with pytest.raises(ValueError, match=r"ids\.models\.unstack_blocks\(params\)"):
        ids.curvature.collect_factors(scanned, stacked, [{"tokens": tokens}], "blocks.*.mlp.down", progress=False)
