"""Gemma 2, Gemma 3 (text-only and the text part of the multimodal model), Qwen3, OLMo-2 and GPT-NeoX (Pythia)
checkpoints, imported and checked against ``transformers`` itself (issue 16, item 1).

Each family is a tiny random model (2-3 layers) whose every tensor is randomised, norm weights and biases
included (transformers initialises them to 0 or 1, which would hide a wrongly mapped or mis-offset norm). Sliding
windows are shorter than the sequences, soft-caps small enough to bend the scores, and rotary bases differ
between sliding and global layers, so each feature changes the logits it is checked on. No download.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids

torch = pytest.importorskip("torch", reason="the importer tests compare against transformers: pip install -e '.[compare]' (torch + transformers)")
transformers = pytest.importorskip("transformers")

V = 80
PROMPT, NEW = 6, 32
FAMILIES = ("gemma2", "gemma3_text", "gemma3", "qwen3", "olmo2", "gpt_neox", "gpt_neox_sequential")


def _hf_model(kind: str):
    torch.manual_seed(FAMILIES.index(kind))
    common = dict(vocab_size=V, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    T = transformers
    if kind == "gemma2":  # every other layer sliding (window 5), both soft-caps, d_head * heads != d_model
        model = T.Gemma2ForCausalLM(T.Gemma2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, query_pre_attn_scalar=20, sliding_window=5, attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0, max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 500.0}, **common))
    elif kind in ("gemma3_text", "gemma3"):  # local / global bases, linear scaling on global layers only
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    max_position_embeddings=128,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}, **common)
        if kind == "gemma3_text":
            model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text))
        else:
            vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14)
            model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=T.Gemma3TextConfig(**text),
                                                                    vision_config=vision, mm_tokens_per_image=4))
    elif kind == "qwen3":  # per-head QK-norm, biases on q/k/v/o, explicit head_dim, untied
        model = T.Qwen3ForCausalLM(T.Qwen3Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, attention_bias=True, max_position_embeddings=128, tie_word_embeddings=False, **common))
    elif kind == "olmo2":  # norms after the sublayers only, QK-norm over the whole projection, GQA
        model = T.Olmo2ForCausalLM(T.Olmo2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, **common))
    else:  # Pythia: partial rotary, fused per-head q/k/v, parallel (or sequential) residual, untied embed_out
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
            use_parallel_residual=kind == "gpt_neox", max_position_embeddings=128, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:  # Gemma's zero-centred scales too: 0.1 noise around their identity
                p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: (directory, transformers model)}``, made on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            model = _hf_model(kind)
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path)
            made[kind] = (path, model)
        return made[kind]

    return get


def _left_padded(seed: int, shape, pads=(0, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(3, V, shape).astype(np.int32)
    valid = np.ones(shape, bool)
    for row, pad in enumerate(pads[:shape[0]]):
        valid[row, :pad] = False
        tokens[row, :pad] = 0
    return tokens, valid


def _torch_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    mask = torch.tensor(valid, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them for left padding
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=mask, position_ids=positions).logits.numpy()


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_generation_and_cache_match_transformers(checkpoints, kind):
    path, model = checkpoints(kind)
    apply, params = ids.models.load_pretrained(path)
    tokens, valid = _left_padded(0, (3, 16))
    logits, _ = jax.jit(apply)(params, jnp.asarray(tokens), valid=jnp.asarray(valid))
    reference = _torch_logits(model, tokens, valid)
    assert logits.shape == reference.shape == (3, 16, V)
    err = np.abs(np.asarray(logits) - reference)[valid].max()
    assert err <= 1e-4, err

    # KV cache: prefill 8 tokens, then decode the rest one at a time; logits equal the full forward's.
    cache = apply.init_cache(3, 16)
    step = jax.jit(lambda p, t, v, c: apply.forward(p, t, valid=v, cache=c))
    first, _, cache = step(params, jnp.asarray(tokens[:, :8]), jnp.asarray(valid[:, :8]), cache)
    pieces = [np.asarray(first)]
    for t in range(8, 16):
        out, _, cache = step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(valid[:, t:t + 1]), cache)
        pieces.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(pieces, 1)[valid], np.asarray(logits)[valid], atol=2e-5, rtol=0)

    if kind == "gemma3":  # the multimodal wrapper's text path is gemma3_text's, whose generation is checked
        return
    prompts, prompt_valid = _left_padded(1, (3, PROMPT), pads=(0, 2, 4))
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompts, dtype=torch.long),
                                attention_mask=torch.tensor(prompt_valid, dtype=torch.long),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[:, PROMPT:].numpy()
    ours = ids.generate(apply, params, jnp.asarray(prompts), prompt_valid=jnp.asarray(prompt_valid),
                        max_new_tokens=NEW, sampling=ids.SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def test_imported_configs_name_each_family_feature(checkpoints):
    gemma2 = ids.models.config_from_hf(checkpoints("gemma2")[0])
    assert (gemma2.norm_unit_offset, gemma2.block_norms, gemma2.scale_embeddings, gemma2.attn_logit_softcap,
            gemma2.final_logit_softcap, gemma2.query_pre_attn_scalar, gemma2.head_dim) == (
        True, "pre_post", True, 3.0, 4.0, 20.0, 12)
    assert gemma2.layer_types == ("sliding", "global", "sliding") and gemma2.layer_windows == (5, None, 5)
    gemma3 = ids.models.config_from_hf(checkpoints("gemma3")[0])
    assert gemma3 == ids.models.config_from_hf(checkpoints("gemma3_text")[0])
    assert (gemma3.qk_norm, gemma3.local_rope_theta, gemma3.rope_theta) == ("head", 50.0, 1e4)
    assert gemma3.layer_rope(0) == (50.0, None) and gemma3.layer_rope(1) == (1e4, ids.models.RopeScaling("linear", 4.0))
    olmo = ids.models.config_from_hf(checkpoints("olmo2")[0])
    assert (olmo.block_norms, olmo.qk_norm) == ("post", "proj")
    neox = ids.models.config_from_hf(checkpoints("gpt_neox")[0])
    assert (neox.parallel_residual, neox.rotary_dim, neox.norm, neox.activation) == (True, 4, "layernorm", "gelu")


def test_the_site_table_holds_for_every_family(checkpoints):
    """Each family's sites exist and mean what the table says: the post-norms' outputs are what the residual adds,
    parallel blocks have no resid_mid, post-norm blocks no ln1/ln2, and resid_post matches transformers."""
    for kind in ("gemma2", "olmo2", "gpt_neox"):
        path, model = checkpoints(kind)
        apply, params = ids.models.load_pretrained(path)
        names = apply.site_names
        assert ("blocks.0.attn_post_norm.out" in names) == (kind != "gpt_neox")
        assert ("blocks.0.ln1.out" in names) == (kind != "olmo2")
        assert ("blocks.0.resid_mid" in names) == (kind != "gpt_neox")
        tokens = np.random.default_rng(2).integers(3, V, (2, 9)).astype(np.int32)
        wanted = ["blocks.*.resid_p*", "blocks.0.*_out"] + (["blocks.0.*post_norm.out"] if kind != "gpt_neox" else [])
        _, cap = apply(params, jnp.asarray(tokens), hooks=ids.capture(*wanted))
        r = lambda s: np.asarray(cap[s])
        np.testing.assert_allclose(r("blocks.0.resid_post"),
                                   r("blocks.0.resid_pre") + r("blocks.0.attn_out") + r("blocks.0.mlp_out"),
                                   atol=1e-5)
        if kind != "gpt_neox":
            np.testing.assert_array_equal(r("blocks.0.attn_post_norm.out"), r("blocks.0.attn_out"))
            np.testing.assert_array_equal(r("blocks.0.mlp_post_norm.out"), r("blocks.0.mlp_out"))
        with torch.no_grad():
            hidden = model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(r("blocks.0.resid_post"), hidden[1].numpy(), atol=1e-4)


def test_gemma3_vision_tensors_are_skipped_but_text_tensors_are_checked(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    path, _ = checkpoints("gemma3")
    tensors = load_file(str(path / "model.safetensors"))
    assert any(n.startswith("vision_tower.") for n in tensors) and "language_model.model.norm.weight" in tensors
    tensors.pop("language_model.model.layers.1.self_attn.k_norm.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing tensor 'language_model.model.layers.1.self_attn.k_norm.weight' "
                                         r"\(shape \(12,\)\) for blocks.1.attn.k_norm.scale"):
        ids.models.load_pretrained(tmp_path)


def _gemma3_text(**changes):
    base = {"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 4, "sliding_window": 4}
    return {**base, **changes}


def test_features_we_do_not_implement_are_refused_with_the_field_named():
    from_hf = ids.models.config_from_hf
    with pytest.raises(ValueError, match=r"rope_parameters.full_attention.rope_type='yarn'"):
        from_hf(_gemma3_text(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                              "sliding_attention": {"rope_type": "default"}}))
    with pytest.raises(ValueError, match=r"rope_parameters.sliding_attention.rope_type='linear'"):
        from_hf(_gemma3_text(rope_parameters={"full_attention": {"rope_type": "default"},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='dynamic'"):  # a hub-format Gemma 3 config
        from_hf(_gemma3_text(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match=r"use_bidirectional_attention=True is not supported"):
        from_hf(_gemma3_text(use_bidirectional_attention=True))
    with pytest.raises(ValueError, match=r"layer_types\[1\]='chunked_attention' is not supported"):
        from_hf(_gemma3_text(layer_types=["sliding_attention", "chunked_attention"]))
    with pytest.raises(ValueError, match=r"gemma2 has sliding layers \(layer_types\) but sliding_window is null"):
        from_hf({**_gemma3_text(model_type="gemma2"), "sliding_window": None})
    with pytest.raises(ValueError, match=r"qwen3 with use_sliding_window=True is not supported"):
        from_hf({**_gemma3_text(model_type="qwen3"), "use_sliding_window": True})
    with pytest.raises(ValueError, match=r"olmo2 with clip_qkv=8.0 is not supported"):
        from_hf({**_gemma3_text(model_type="olmo2"), "clip_qkv": 8.0})
    neox = {"model_type": "gpt_neox", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type='linear'"):
        from_hf({**neox, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match=r"rotary_pct=0.25 rotates 1 features"):
        from_hf({**neox, "rotary_pct": 0.25})
    with pytest.raises(ValueError, match=r"model_type='gemma3' config.json has no text_config"):
        from_hf({"model_type": "gemma3"})
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='olmo'.*gemma2.*gemma3_text.*gemma3.*"
                                         r"qwen3.*olmo2.*gpt_neox"):
        from_hf({"model_type": "olmo"})


def test_hub_format_gemma3_config_reads_local_base_and_pattern():
    """Configs on the hub predate per-layer-type rope dicts: rope_theta / rope_scaling are the global layers',
    rope_local_base_freq the sliding layers', and every sliding_window_pattern-th layer is global."""
    cfg = ids.models.config_from_hf(_gemma3_text(num_hidden_layers=6, rope_theta=1e6, rope_local_base_freq=1e4,
                                                 rope_scaling={"rope_type": "linear", "factor": 8.0},
                                                 sliding_window_pattern=3))
    assert cfg.layer_types == ("sliding", "sliding", "global") * 2
    assert cfg.layer_rope(0) == (1e4, None) and cfg.layer_rope(2) == (1e6, ids.models.RopeScaling("linear", 8.0))
    flat = ids.models.config_from_hf(_gemma3_text(num_hidden_layers=6, rope_local_base_freq=20.0, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 3e5}))
    assert flat.layer_rope(0) == (20.0, None) and flat.layer_rope(5) == (3e5, ids.models.RopeScaling("linear", 2.0))
