"""Importing Hugging Face GPT-2 and Llama-family checkpoints, checked against ``transformers`` itself.

Tiny random models are built with ``transformers`` (PyTorch on the CPU), every parameter —
biases and norm scales included, which transformers initialises to 0 and 1 — is randomised so a
wrongly mapped tensor cannot hide, and the model is saved with ``save_pretrained``. No download.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids
from idesign.models import importers
from tests.conftest import run_with_8_devices

torch = pytest.importorskip("torch", reason="the importer tests compare against transformers: pip install -e '.[compare]' (torch + transformers)")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V = 96
PROMPT, NEW = 6, 32


def _hf_model(kind: str):
    torch.manual_seed({"gpt2": 0, "llama": 1, "qwen2": 2}[kind])
    common = dict(vocab_size=V, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                     **common))
    elif kind == "llama":  # grouped-query attention, untied, llama3 rotary scaling (Llama 3.1 style)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}, **common))
    else:  # q/k/v biases, tied embeddings, large rotary base
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1e6, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: (directory, transformers model)}``, saved once for the module."""
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


_LOADED: dict = {}


def _load(checkpoints, kind: str, **kwargs):
    key = (kind, tuple(sorted(kwargs.items())))
    if key not in _LOADED:
        apply, params = ids.models.load_pretrained(checkpoints[kind][0], **kwargs)
        _LOADED[key] = (apply, jax.jit(apply), params)
    return _LOADED[key]


def _tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_logits_and_greedy_generation_match_transformers(checkpoints, kind):
    apply, jitted, params = _load(checkpoints, kind)
    model = checkpoints[kind][1]
    tokens = _tokens(0, (3, 20))
    logits, _ = jitted(params, jnp.asarray(tokens))
    reference = _torch_logits(model, tokens)
    assert logits.shape == reference.shape == (3, 20, V)
    assert np.abs(np.asarray(logits) - reference).max() <= 1e-4
    if kind == "qwen2":  # its numerics are covered above; generation is the same code path as llama's
        return

    prompts = tokens[:, :PROMPT]
    with torch.no_grad():
        # An explicit all-ones mask: otherwise transformers treats prompt tokens equal to pad_token_id as padding.
        theirs = model.generate(torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones(prompts.shape),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[:, PROMPT:].numpy()
    ours = ids.generate(apply, params, jnp.asarray(prompts), max_new_tokens=NEW,
                        sampling=ids.SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def test_imported_config_and_sites(checkpoints):
    llama, _, params = _load(checkpoints, "llama")
    c = llama.config
    assert (c.norm, c.positions, c.mlp, c.kv_heads, c.tie_embeddings, c.norm_eps) == ("rmsnorm", "rotary", "gated", 2,
                                                                                      False, 1e-5)
    assert c.rope_scaling == ids.models.RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert "blocks.1.mlp.gate.in" in llama.site_names and "unembed.kernel" in ids.tree.named_leaves(params)
    qwen = _load(checkpoints, "qwen2")[0].config
    assert (qwen.qkv_bias, qwen.out_bias, qwen.mlp_bias, qwen.tie_embeddings, qwen.rope_theta) == (True, False, False,
                                                                                                True, 1e6)
    gpt2, _, gpt2_params = _load(checkpoints, "gpt2")
    assert (gpt2.config.positions, gpt2.config.activation, gpt2.config.max_len) == ("learned", "gelu_tanh", 64)
    short, short_params = ids.models.load_pretrained(checkpoints["gpt2"][0], max_len=16)  # a shorter position table
    assert short.config.max_len == 16
    np.testing.assert_array_equal(short_params["pos_embed"]["embedding"], gpt2_params["pos_embed"]["embedding"][:16])
    with pytest.raises(ValueError, match="max_len=65 exceeds the checkpoint's 64 learned positions"):
        ids.models.load_pretrained(checkpoints["gpt2"][0], max_len=65)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_frequencies_match_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, rope_theta=5e5, rope_scaling=scaling)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    config = ids.models.config_from_hf(hf.to_dict())
    ours = ids.models.rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    assert attention_factor == 1.0 and config.rope_theta == 5e5
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def test_residual_stream_matches_transformers_hidden_states(checkpoints):
    _, jitted, params = _load(checkpoints, "gpt2")
    tokens = _tokens(1, (2, 10))
    _, captured = jitted(params, jnp.asarray(tokens), hooks=ids.capture("blocks.0.resid_post"))
    with torch.no_grad():
        hidden = checkpoints["gpt2"][1](torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(captured["blocks.0.resid_post"], hidden[1].numpy(), atol=1e-5)


def test_sharded_checkpoint_files_load_the_same_params(checkpoints, tmp_path):
    model = checkpoints["llama"][1]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, _, whole = _load(checkpoints, "llama")
    _, sharded = ids.models.load_pretrained(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_import_and_bfloat16_checkpoints(checkpoints, tmp_path):
    _, jitted, params = _load(checkpoints, "llama", dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens = _tokens(2, (2, 12))
    reference = _torch_logits(checkpoints["llama"][1], tokens)
    logits = np.asarray(jitted(params, jnp.asarray(tokens))[0])
    assert logits.dtype == np.float32
    # bfloat16 keeps 8 mantissa bits: about 2-3 significant digits survive two blocks.
    assert np.abs(logits - reference).max() <= 0.05 * np.abs(reference).max()
    assert np.abs(logits - reference).max() > 1e-4  # it really computed in bfloat16

    # A checkpoint stored in bfloat16 reads into float32 exactly.
    model = _hf_model("gpt2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, p32 = ids.models.load_pretrained(tmp_path)
    wte = model.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(p32["embed"]["embedding"], wte)
    assert p32["embed"]["embedding"].dtype == jnp.float32


def test_loading_onto_a_mesh_of_8_devices(checkpoints):
    path = checkpoints["llama"][0]
    report = run_with_8_devices(code=f"import tests._sharded_importer_checks as m; m.main({str(path)!r})")
    assert report["param_max_diff"] == 0.0
    P = jax.sharding.PartitionSpec
    assert report["up_spec"] == repr(P(None, "model")) and report["down_spec"] == repr(P("model", None))
    # Each device holds one 'model' block of a sharded kernel, never the whole tensor.
    assert report["up_shard_shape"] == [32, 64 // 4]
    assert report["devices_per_kernel"] == 8


# --------------------------------------------------------------------------- tokenizers


def _word_tokenizer(n_words: int) -> "tokenizers.Tokenizer":
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    return tok


def test_tokenizer_from_tokenizer_json_agrees_with_transformers(checkpoints, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text((checkpoints["llama"][0] / "config.json").read_text())
    _word_tokenizer(40).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<unk>"}))
    tok = ids.models.load_tokenizer(directory)
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 43)
    text = "w1 w7 w39 w3"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    assert tok.encode(text) == fast(text)["input_ids"] == [4, 10, 42, 6]
    assert tok.decode(tok.encode(text)) == text
    tokens, valid = tok.batch(["w1", "w2 w3 w4"])
    assert tokens.tolist() == [[0, 0, 4], [5, 6, 7]] and valid.tolist() == [[False, False, True], [True, True, True]]


def test_tokenizer_that_does_not_fit_the_vocabulary_is_refused(checkpoints, tmp_path):
    _word_tokenizer(V).save(str(tmp_path / "tokenizer.json"))   # ids up to V + 2
    with pytest.raises(ValueError, match=rf"ids up to {V + 2}, but the model's vocab_size is {V}"):
        ids.models.load_tokenizer(tmp_path, vocab_size=V)
    assert ids.models.load_tokenizer(tmp_path, vocab_size=V + 3).vocab_size == V + 3


# --------------------------------------------------------------------------- bad input


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gemma' \(GemmaForCausalLM\).*"
                                         r"gpt2.*llama.*qwen2.*mistral"):
        ids.models.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        ids.models.config_from_hf({"model_type": "gpt2"}, dtype="float16")
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        ids.models.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_mismatched_and_extra_tensors_are_named(checkpoints, tmp_path):
    src = checkpoints["llama"][0]
    name = "model.layers.1.self_attn.k_proj.weight"

    bad = _rewrite(src, tmp_path / "shape", lambda t: t.update({name: np.zeros((32, 32), np.float32)}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(32, 32\) in the checkpoint but config.json "
                                         r"implies \(16, 32\) \(for blocks.1.attn.k_proj.kernel\)"):
        ids.models.load_pretrained(bad)

    gone = _rewrite(src, tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.norm.weight' \(shape \(32,\)\) for final_norm.scale"):
        ids.models.load_pretrained(gone)

    extra = _rewrite(src, tmp_path / "extra",
                     lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=r"1 checkpoint tensors have no place.*q_norm"):
        ids.models.load_pretrained(extra)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        ids.models.load_pretrained(empty)


def test_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not importers.hub_reachable()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set.*local directory"):
        importers.resolve_checkpoint("idesign-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        importers.resolve_checkpoint(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- every capability


def test_capture_and_hooks_on_an_imported_model(checkpoints):
    _, jitted, params = _load(checkpoints, "llama")
    tokens = jnp.asarray(_tokens(3, (2, 8)))
    base, captured = jitted(params, tokens, hooks=ids.capture("blocks.*.resid_post", "blocks.0.attn.k"))
    assert captured["blocks.1.resid_post"].shape == (2, 8, 32) and captured["blocks.0.attn.k"].shape == (2, 8, 2, 8)
    direction = jax.random.normal(jax.random.key(0), (32,))
    steered, _ = jitted(params, tokens, hooks={"blocks.0.resid_post": ids.Add(direction, scale=3.0)})
    # Steering the last block's input by hand (replace it with the steered value) gives the same logits.
    patched, _ = jitted(params, tokens, hooks={
        "blocks.1.resid_pre": ids.Replace(captured["blocks.0.resid_post"] + 3.0 * direction)})
    assert np.abs(np.asarray(steered - base)).max() > 1e-2
    np.testing.assert_allclose(steered, patched, atol=1e-5)


def test_probe_on_an_imported_model_reads_the_last_token(checkpoints):
    apply, _, params = _load(checkpoints, "qwen2")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (400, 8)).astype(np.int32)
    labels = rng.integers(0, 2, 400)
    tokens[:, -1] = np.where(labels == 1, 5, 9)  # which of two tokens ends the sequence, after random contexts
    acts = ids.collect_activations(apply, params, {"tokens": tokens}, ["blocks.0.resid_post"], batch_size=200,
                                   positions="last", progress=False)["blocks.0.resid_post"]
    probe = ids.probes.fit_logistic(acts[:300], labels[:300], C=1.0)
    assert ids.metrics.roc_auc(labels[300:], ids.probes.score(probe, acts[300:])) > 0.95
    # Control: labels unrelated to the input give a held-out AUC near chance.
    shuffled = rng.permutation(labels)
    control = ids.probes.fit_logistic(acts[:300], shuffled[:300], C=1.0)
    assert abs(ids.metrics.roc_auc(shuffled[300:], ids.probes.score(control, acts[300:])) - 0.5) < 0.2


def test_projection_and_freezing_on_an_imported_model(checkpoints):
    apply, jitted, params = _load(checkpoints, "llama")
    batch = {"tokens": jnp.asarray(_tokens(4, (4, 12)))}
    _, captured = jitted(params, batch["tokens"], hooks=ids.capture("blocks.0.mlp.down.in"))
    basis = ids.subspaces.from_activations(np.asarray(captured["blocks.0.mlp.down.in"]).reshape(-1, 64), rank=8)
    mask = ids.circuits.heads_mask(params, apply.config, [(0, 1), (1, 3)])
    optimizer = optax.chain(
        ids.optim.frozen(optax.sgd(0.1), freeze_mask=mask),
        ids.optim.project_out(ids.optim.subspaces_for(params, {"blocks.0.mlp.down.kernel": basis})))
    step = ids.make_train_step(ids.lm_loss(apply), optimizer)
    state, _ = step(ids.init_train_state(params, optimizer), batch)
    delta = state.params["blocks"][0]["mlp"]["down"]["kernel"] - params["blocks"][0]["mlp"]["down"]["kernel"]
    rows = np.asarray(basis.basis)  # [k, d_in], orthonormal rows; input side: U Uᵀ ΔW must vanish
    assert basis.side == "input" and rows.shape == (8, 64)
    assert np.abs(np.asarray(delta)).max() > 1e-6
    assert np.abs(rows @ np.asarray(delta)).max() <= 1e-5 * np.abs(np.asarray(delta)).max()
    new, old = ids.tree.named_leaves(state.params), ids.tree.named_leaves(params)
    for path, m in ids.tree.named_leaves(mask).items():
        frozen = np.broadcast_to(np.asarray(m), old[path].shape)
        np.testing.assert_array_equal(np.asarray(new[path])[frozen], np.asarray(old[path])[frozen])
    q = "blocks.0.attn.q_proj.kernel"
    assert np.abs(np.asarray(new[q]) - np.asarray(old[q])).max() > 0  # the unfrozen heads moved


def test_kfac_factors_match_transformers_and_low_curvature_pruning_uses_them(checkpoints):
    apply, jitted, params = _load(checkpoints, "llama")
    model = checkpoints["llama"][1]
    tokens = _tokens(5, (2, 9))
    factors = ids.curvature.collect_factors(apply, params, [{"tokens": jnp.asarray(tokens)}], ["blocks.0.mlp.up"],
                                            fisher="empirical", progress=False)["blocks.0.mlp.up"]
    seen = {}
    layer = model.model.layers[0].mlp.up_proj
    def keep_output(module, args, out):  # returns None, so the module's output is unchanged
        out.retain_grad()
        seen["y"] = out

    handles = [layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach())),
               layer.register_forward_hook(keep_output)]
    try:
        logits = model(torch.tensor(tokens[:, :-1], dtype=torch.long)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(tokens[:, 1:].reshape(-1), dtype=torch.long),
                                                 reduction="sum")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad()
    x = seen["x"].reshape(-1, 32).double().numpy()
    g = seen["y"].grad.reshape(-1, 64).double().numpy()
    assert float(factors.count) == x.shape[0] == 16
    np.testing.assert_allclose(factors.a_sum, x.T @ x, rtol=1e-4, atol=1e-5 * np.abs(x.T @ x).max())
    np.testing.assert_allclose(factors.g_sum, g.T @ g, rtol=1e-3, atol=1e-5 * np.abs(g.T @ g).max())

    # Low-curvature pruning with these factors: rho = 1 keeps the weights, rho = 0.6 removes components.
    eigen = ids.curvature.eigendecompose({"blocks.0.mlp.up": factors})
    kept_all, _ = ids.edit.prune_low_curvature(params, eigen, None, rho=1.0)
    pruned, report = ids.edit.prune_low_curvature(params, eigen, None, rho=0.6)
    assert 0 < report["blocks.0.mlp.up"]["kept_fraction"] < 1 and report["blocks.0.mlp.up"]["rel_weight_change"] > 0
    up = lambda p: np.asarray(p["blocks"][0]["mlp"]["up"]["kernel"])
    np.testing.assert_allclose(up(kept_all), up(params), atol=1e-5)
    assert np.abs(up(pruned) - up(params)).max() > 1e-3
    logits = lambda p: np.asarray(jitted(p, jnp.asarray(tokens))[0])
    assert np.abs(logits(pruned) - logits(params)).max() > 1e-3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _NormBuffer(ids.Monitor):
    """Records the last block's residual norm at every generated token, in a ``[B, steps]`` buffer."""

    steps: int = dataclasses.field(metadata=dict(static=True))
    sites = ("blocks.1.resid_post",)

    def init(self, batch_size):
        return jnp.zeros((batch_size, self.steps))

    def step(self, state, info):
        norm = jnp.linalg.norm(info.activations["blocks.1.resid_post"], axis=-1)
        return state.at[:, info.step].set(norm), ids.Injection.none(info.token.shape[0])


def test_monitored_generation_on_an_imported_model(checkpoints):
    apply, jitted, params = _load(checkpoints, "qwen2")
    prompts = jnp.asarray(_tokens(8, (2, 5)))
    greedy = ids.SamplingConfig(temperature=0.0)
    # What a monitor reads at each token is the residual stream of a full forward over the same tokens.
    plain = ids.generate(apply, params, prompts, max_new_tokens=6, sampling=greedy, monitor=_NormBuffer(steps=6))
    norms = plain.monitor_state
    sequence, _ = plain.sequences()
    _, captured = jitted(params, sequence, hooks=ids.capture("blocks.1.resid_post"))
    full = np.linalg.norm(np.asarray(captured["blocks.1.resid_post"]), axis=-1)[:, prompts.shape[1]:]
    np.testing.assert_allclose(np.asarray(norms), full, rtol=1e-4)
