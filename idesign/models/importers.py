"""Importers: Hugging Face GPT-2, Llama-family, Gemma 2/3, Qwen3, OLMo-2 and GPT-NeoX checkpoints into the reference transformer.

A checkpoint is a directory with ``config.json`` and one or more ``*.safetensors`` files (a
sharded checkpoint's shards are found by their headers, so ``model.safetensors.index.json`` is
optional), or a hub id such as ``"openai-community/gpt2"`` when the network allows. The result is
the reference transformer's ``(apply, params)``, so every idesign site, hook and transform works
on the imported model unchanged.

Supported ``model_type`` values (``config.json``):

- ``gpt2``: GPT-2 (LayerNorm, learned positions, GELU-tanh MLP, biases, tied embeddings). GPT-2's
  ``Conv1D`` weights are already ``[d_in, d_out]``; the fused ``c_attn`` is split into q, k, v.
- ``llama``, ``qwen2``, ``mistral``: the Llama family (RMSNorm, rotary positions with optional
  linear / llama3 frequency scaling, SwiGLU, grouped-query attention). Llama, Llama 2/3, SmolLM,
  TinyLlama and Qwen2 / Qwen2.5 checkpoints share this layout; Qwen2 adds q/k/v biases.
  ``torch.nn.Linear`` weights ``[d_out, d_in]`` are transposed to Flax ``[d_in, d_out]`` kernels.
- ``gemma2``, ``gemma3_text``, ``gemma3``: Gemma 2 and 3 (RMSNorm with ``1 + w`` scale, norms before and after each
  sublayer, embeddings times ``sqrt(d_model)``, GeGLU, ``query_pre_attn_scalar``, sliding-window and global layers;
  Gemma 2 soft-caps attention scores and logits; Gemma 3 has per-head QK-norm and a separate rotary base for its
  sliding layers). For ``gemma3`` (``Gemma3ForConditionalGeneration``) the text model is imported from
  ``language_model.model.*`` and the vision tower is left out.
- ``qwen3``: the Llama layout plus per-head QK-norm. ``olmo2``: norms after each sublayer only, QK-norm over the
  whole q / k projection.
- ``gpt_neox``: Pythia and GPT-NeoX (LayerNorm, partial rotary, parallel attention + MLP residual); the fused
  ``query_key_value`` weight interleaves q, k, v per head and is split into q, k, v kernels.

With ``mesh=``, every tensor is read from disk straight into its ``NamedSharding`` (the rules of
:mod:`idesign.sharding`): each device's block is read from the file on its own, so no device
ever holds a whole sharded tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from idesign import sharding as sharding_lib
from idesign import tree as tree_lib
from idesign.models._hub import hub_reachable, resolve_checkpoint
from idesign.models._tokenizers import Tokenizer, load_tokenizer
from idesign.models.config import RopeScaling, TransformerConfig
from idesign.models._functional import Params, TransformerApply
from idesign.models.transformer import Transformer

__all__ = ["SUPPORTED_ARCHITECTURES", "Tokenizer", "config_from_hf", "hub_reachable", "load_pretrained",
           "load_tokenizer", "read_hf_config", "resolve_checkpoint", "weight_names"]

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM (Llama 1-3, SmolLM, TinyLlama, ...)",
    "qwen2": "Qwen2ForCausalLM (Qwen2, Qwen2.5)",
    "mistral": "MistralForCausalLM (without a sliding window)",
    "gemma2": "Gemma2ForCausalLM (Gemma 2)",
    "gemma3_text": "Gemma3ForCausalLM (Gemma 3 text-only, e.g. 1B)",
    "gemma3": "Gemma3ForConditionalGeneration (Gemma 3 4B-27B: the text model; the vision tower is skipped)",
    "qwen3": "Qwen3ForCausalLM (dense Qwen3)",
    "olmo2": "Olmo2ForCausalLM (OLMo 2)",
    "gpt_neox": "GPTNeoXForCausalLM (Pythia, GPT-NeoX)",
}

_DTYPES = ("float32", "bfloat16")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_LLAMA_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_new": "gelu_tanh", "relu": "relu"}
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "global"}


# --------------------------------------------------------------------------- configs


def read_hf_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory (or hub id), as a dict.

    Args:
      checkpoint: a directory holding ``config.json``, or a hub id (see :func:`resolve_checkpoint`).

    Returns:
      The parsed JSON.

    >>> import json, tempfile, pathlib, idesign as ids
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    >>> ids.models.importers.read_hf_config(d)["model_type"]
    'gpt2'
    """
    path = resolve_checkpoint(checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no config.json; a Hugging Face checkpoint directory holds "
                                "config.json and *.safetensors (save one with model.save_pretrained(dir)).")
    return json.loads(path.read_text())


def config_from_hf(hf_config: Mapping[str, Any] | str | os.PathLike, *, dtype: str = "float32",
                   max_len: int | None = None) -> TransformerConfig:
    """The :class:`TransformerConfig` that holds a Hugging Face model's weights exactly.

    Args:
      hf_config: the ``config.json`` contents (a dict, e.g. ``transformers_config.to_dict()``), or a
        checkpoint directory / hub id to read it from.
      dtype: ``'float32'`` or ``'bfloat16'``: both the parameters' storage and the computation
        (softmax and norms always run in float32).
      max_len: the longest sequence to support; defaults to the checkpoint's
        ``n_positions`` / ``max_position_embeddings``. With learned positions (GPT-2) it may only
        shrink the table; with rotary positions it bounds nothing but KV caches.

    Returns:
      A :class:`TransformerConfig`.

    Raises:
      ValueError: for an unsupported ``model_type`` (the message lists the supported ones) or an
        option of a supported one that the reference transformer does not implement.

    >>> import idesign as ids
    >>> cfg = ids.models.config_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
    ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    ...     "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0})
    >>> cfg.norm, cfg.kv_heads, cfg.ff_dim, cfg.rope_theta, cfg.tie_embeddings
    ('rmsnorm', 2, 64, 500000.0, False)
    """
    if not isinstance(hf_config, Mapping):
        hf_config = read_hf_config(hf_config)
    if dtype not in _DTYPES:
        raise ValueError(f"config_from_hf: dtype={dtype!r}; expected one of {_DTYPES}.")
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = hf_config.get("architectures") or []
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ValueError(f"config_from_hf: unsupported architecture model_type={model_type!r}"
                         + (f" ({', '.join(archs)})" if archs else "")
                         + f". Supported model_type values: {supported}. Other Flax models can still use idesign "
                         "through idesign.models.from_nnx / from_linen.")
    fields = _FIELDS.get(model_type, _llama_fields)(_text_config(hf_config), model_type)
    if max_len is not None:
        if fields["positions"] == "learned" and max_len > fields["max_len"]:
            raise ValueError(f"config_from_hf: max_len={max_len} exceeds the checkpoint's {fields['max_len']} "
                             "learned positions.")
        fields["max_len"] = max_len
    return TransformerConfig(dtype=dtype, param_dtype=dtype, **fields)


def _require(hf: Mapping[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ValueError(f"config_from_hf: config.json of model_type={hf.get('model_type')!r} lacks {missing}.")
    return [hf[k] for k in keys]


def _activation(hf: Mapping[str, Any], key: str, table: Mapping[str, str], default: str) -> str:
    name = hf.get(key, default)
    if name not in table:
        raise ValueError(f"config_from_hf: {key}={name!r} is not supported; expected one of {sorted(table)}.")
    return table[name]


def _text_config(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's config: ``text_config`` of a multimodal Gemma 3, else the config itself."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError("config_from_hf: a model_type='gemma3' config.json has no text_config to import.")
    # Gemma3Config keeps tie_word_embeddings at the top level (the language model's lm_head).
    return {**text, "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}


def _refuse(hf: Mapping[str, Any], model_type: str, field: str, supported: Any) -> None:
    """Refuses a checkpoint whose ``field`` is set to something other than ``supported`` (its default when absent)."""
    value = hf.get(field, supported)
    if value != supported:
        raise ValueError(f"config_from_hf: {model_type} with {field}={value!r} is not supported (the reference "
                         f"transformer implements {field}={supported!r}).")


def _gpt2_fields(hf: Mapping[str, Any], model_type: str = "gpt2") -> dict[str, Any]:
    vocab, d, layers, heads, positions = _require(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
    for flag, wanted in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                         ("scale_attn_weights", True)):
        if bool(hf.get(flag, wanted)) != wanted:
            raise ValueError(f"config_from_hf: GPT-2 with {flag}={hf[flag]!r} is not supported "
                             f"(the reference transformer implements {flag}={wanted}).")
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=hf.get("n_inner") or 4 * d,
                max_len=positions, norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                positions="learned", mlp="standard",
                activation=_activation(hf, "activation_function", _GPT2_ACTIVATIONS, "gelu_new"),
                qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 keeps theta and scaling together in `rope_parameters`; earlier versions used
    # a top-level `rope_theta` and an optional `rope_scaling` dict.
    params = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters" if "rope_type" in params or "type" in params else "rope_scaling"
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return theta, _rope_scaling(params, field)


def _rope_scaling(params: Mapping[str, Any], field: str,
                  allowed: tuple[str, ...] = ("default", "linear", "llama3")) -> RopeScaling | None:
    """The :class:`RopeScaling` of one Hugging Face rope dict; ``field`` names it in errors."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in allowed:
        raise ValueError(f"config_from_hf: {field}.rope_type={kind!r}: rope scaling {kind!r} is not supported; "
                         f"expected one of {allowed}.")
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    return RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                       float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def _llama_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    vocab, d, ff, layers, heads = _require(hf, "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("config_from_hf: Qwen2 with use_sliding_window=True is not supported (full attention only).")
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        raise ValueError(f"config_from_hf: Mistral with sliding_window={hf['sliding_window']} is not supported "
                         "(full attention only; later Mistral releases set sliding_window to null).")
    if model_type == "qwen3":
        _refuse(hf, model_type, "use_sliding_window", False)
    if model_type == "olmo2":
        _refuse(hf, model_type, "clip_qkv", None)
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    out_bias = False if model_type == "qwen2" else attention_bias
    family = {"qwen3": dict(qk_norm="head"), "olmo2": dict(qk_norm="proj", block_norms="post")}.get(model_type, {})
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, d_head=hf.get("head_dim") or d // heads,
                d_ff=ff, max_len=int(hf.get("max_position_embeddings", 2048)), norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rotary", rope_theta=theta,
                rope_scaling=scaling, mlp="gated", activation=_activation(hf, "hidden_act", _LLAMA_ACTIVATIONS, "silu"),
                qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **family)


def _layer_types(hf: Mapping[str, Any], layers: int, pattern: int) -> tuple[str, ...]:
    """Per-layer 'sliding' / 'global' from ``layer_types``, or from the every-``pattern``-th-global default."""
    types = hf.get("layer_types")
    if types is None:  # configs written before transformers had layer_types
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", pattern)))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(types) != layers:
        raise ValueError(f"config_from_hf: layer_types has {len(types)} entries for num_hidden_layers={layers}.")
    for i, t in enumerate(types):
        if t not in _LAYER_TYPES:
            raise ValueError(f"config_from_hf: layer_types[{i}]={t!r} is not supported; expected one of "
                             f"{sorted(_LAYER_TYPES)}.")
    return tuple(_LAYER_TYPES[t] for t in types)


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """``(global theta, global scaling, local theta)``: Gemma 3 rotates sliding and global layers differently."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers >= 5: one dict per layer type
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        _rope_scaling(local, "rope_parameters.sliding_attention", allowed=("default",))
        return (float(full.get("rope_theta", 1e6)), _rope_scaling(full, "rope_parameters.full_attention"),
                float(local.get("rope_theta", 1e4)))
    # Hub configs: rope_theta and rope_scaling (or one flat rope_parameters dict) are the global layers';
    # rope_local_base_freq the sliding layers'.
    field = "rope_parameters" if params else "rope_scaling"
    flat = {**(hf.get("rope_scaling") or {}), **params}
    return (float(flat.get("rope_theta", hf.get("rope_theta", 1e6))), _rope_scaling(flat, field),
            float(hf.get("rope_local_base_freq", 1e4)))


def _gemma_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    vocab, d, ff, layers, heads = _require(hf, "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"config_from_hf: {model_type} with use_bidirectional_attention=True is not supported "
                         "(the reference transformer is causal).")
    gemma3 = model_type != "gemma2"
    types = _layer_types(hf, layers, pattern=6 if gemma3 else 2)
    window = hf.get("sliding_window")
    if "sliding" in types and window is None:
        raise ValueError(f"config_from_hf: {model_type} has sliding layers (layer_types) but sliding_window is null.")
    if gemma3:
        theta, scaling, local_theta = _gemma3_rope(hf)
    else:
        (theta, scaling), local_theta = _rope(hf), None
    attention_bias = bool(hf.get("attention_bias", False))
    activation = _activation(hf, "hidden_activation" if "hidden_activation" in hf else "hidden_act",
                             _LLAMA_ACTIVATIONS, "gelu_pytorch_tanh")
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, d_head=hf.get("head_dim") or d // heads,
                d_ff=ff, max_len=int(hf.get("max_position_embeddings", 8192)), norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rotary", rope_theta=theta,
                rope_scaling=scaling, mlp="gated", activation=activation,
                qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=False,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                norm_unit_offset=True, block_norms="pre_post", scale_embeddings=True,
                attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
                final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                qk_norm="head" if gemma3 else None, layer_types=types,
                sliding_window=None if window is None else int(window), local_rope_theta=local_theta)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


_NEOX_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def _neox_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    vocab, d, ff, layers, heads = _require(hf, "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads")
    params = hf.get("rope_parameters") or {}
    _rope_scaling({**(hf.get("rope_scaling") or {}), **params},
                  "rope_parameters" if params else "rope_scaling", allowed=("default",))
    theta = float(params.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0))))
    pct = float(params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    if int(d // heads * pct) % 2:
        raise ValueError(f"config_from_hf: gpt_neox rotary_pct={pct} rotates {int(d // heads * pct)} features of "
                         f"each {d // heads}-wide head; an even number is needed.")
    bias = bool(hf.get("attention_bias", True))
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=ff,
                max_len=int(hf.get("max_position_embeddings", 2048)), norm="layernorm",
                norm_eps=float(hf.get("layer_norm_eps", 1e-5)), positions="rotary", rope_theta=theta,
                rotary_pct=pct, mlp="standard", activation=_activation(hf, "hidden_act", _NEOX_ACTIVATIONS, "gelu"),
                qkv_bias=bias, out_bias=bias, mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                parallel_residual=bool(hf.get("use_parallel_residual", True)))


_FIELDS = {"gpt2": _gpt2_fields, "gemma2": _gemma_fields, "gemma3_text": _gemma_fields, "gemma3": _gemma_fields,
           "gpt_neox": _neox_fields}


# --------------------------------------------------------------------------- weight names


class _Source(NamedTuple):
    """Where one parameter comes from: a checkpoint tensor, maybe transposed, maybe a block of it.

    ``block`` is a tuple of slices in *our* layout (after the transpose), e.g. GPT-2's q kernel is
    ``c_attn.weight[:, 0:d]``.
    """

    name: str
    shape: tuple[int, ...]  # the checkpoint tensor's expected shape
    transpose: bool = False
    block: tuple[slice, ...] | None = None
    # (axis, indices) in our layout: a strided selection (GPT-NeoX's per-head interleaved q, k, v); read whole.
    take: tuple[int, tuple[int, ...]] | None = None


def _gpt2_sources(c: TransformerConfig, prefix: str, n_positions: int) -> dict[str, _Source]:
    d, f = c.d_model, c.ff_dim
    out = {"embed.embedding": _Source(f"{prefix}wte.weight", (c.vocab_size, d)),
           "pos_embed.embedding": _Source(f"{prefix}wpe.weight", (n_positions, d), block=(slice(0, c.max_len),)),
           "final_norm.scale": _Source(f"{prefix}ln_f.weight", (d,)),
           "final_norm.bias": _Source(f"{prefix}ln_f.bias", (d,))}
    for i in range(c.n_layers):
        h, b = f"{prefix}h.{i}", f"blocks.{i}"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{b}.{ours}.scale"] = _Source(f"{h}.{theirs}.weight", (d,))
            out[f"{b}.{ours}.bias"] = _Source(f"{h}.{theirs}.bias", (d,))
        for j, p in enumerate("qkv"):
            cols = slice(j * d, (j + 1) * d)
            out[f"{b}.attn.{p}_proj.kernel"] = _Source(f"{h}.attn.c_attn.weight", (d, 3 * d), block=(slice(None), cols))
            out[f"{b}.attn.{p}_proj.bias"] = _Source(f"{h}.attn.c_attn.bias", (3 * d,), block=(cols,))
        out[f"{b}.attn.o_proj.kernel"] = _Source(f"{h}.attn.c_proj.weight", (d, d))
        out[f"{b}.attn.o_proj.bias"] = _Source(f"{h}.attn.c_proj.bias", (d,))
        out[f"{b}.mlp.up.kernel"] = _Source(f"{h}.mlp.c_fc.weight", (d, f))
        out[f"{b}.mlp.up.bias"] = _Source(f"{h}.mlp.c_fc.bias", (f,))
        out[f"{b}.mlp.down.kernel"] = _Source(f"{h}.mlp.c_proj.weight", (f, d))
        out[f"{b}.mlp.down.bias"] = _Source(f"{h}.mlp.c_proj.bias", (d,))
    if not c.tie_embeddings:
        out["unembed.kernel"] = _Source("lm_head.weight", (c.vocab_size, d), transpose=True)
    return out


def _linear(name: str, d_in: int, d_out: int) -> _Source:
    return _Source(name, (d_out, d_in), transpose=True)


# Our block norms and the checkpoint's names for them. Llama's `post_attention_layernorm` is the norm *before* the
# MLP; Gemma's and OLMo-2's is the norm *after* attention.
_NORM_NAMES = {
    "pre": {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
    "pre_post": {"ln1": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "ln2": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
    "post": {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
}


def _llama_sources(c: TransformerConfig, prefix: str, lm_head: str = "lm_head.weight") -> dict[str, _Source]:
    d, f, q, kv = c.d_model, c.ff_dim, c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    out = {"embed.embedding": _Source(f"{prefix}embed_tokens.weight", (c.vocab_size, d)),
           "final_norm.scale": _Source(f"{prefix}norm.weight", (d,))}
    for i in range(c.n_layers):
        h, b = f"{prefix}layers.{i}", f"blocks.{i}"
        for ours, theirs in _NORM_NAMES[c.block_norms].items():
            out[f"{b}.{ours}.scale"] = _Source(f"{h}.{theirs}.weight", (d,))
        if c.qk_norm is not None:
            per_head = c.qk_norm == "head"
            out[f"{b}.attn.q_norm.scale"] = _Source(f"{h}.self_attn.q_norm.weight", (c.head_dim if per_head else q,))
            out[f"{b}.attn.k_norm.scale"] = _Source(f"{h}.self_attn.k_norm.weight", (c.head_dim if per_head else kv,))
        for p, width in (("q", q), ("k", kv), ("v", kv)):
            out[f"{b}.attn.{p}_proj.kernel"] = _linear(f"{h}.self_attn.{p}_proj.weight", d, width)
            if c.qkv_bias:
                out[f"{b}.attn.{p}_proj.bias"] = _Source(f"{h}.self_attn.{p}_proj.bias", (width,))
        out[f"{b}.attn.o_proj.kernel"] = _linear(f"{h}.self_attn.o_proj.weight", q, d)
        if c.out_bias:
            out[f"{b}.attn.o_proj.bias"] = _Source(f"{h}.self_attn.o_proj.bias", (d,))
        for ours, theirs, d_in, d_out in (("up", "up_proj", d, f), ("gate", "gate_proj", d, f), ("down", "down_proj", f, d)):
            out[f"{b}.mlp.{ours}.kernel"] = _linear(f"{h}.mlp.{theirs}.weight", d_in, d_out)
            if c.mlp_bias:
                out[f"{b}.mlp.{ours}.bias"] = _Source(f"{h}.mlp.{theirs}.bias", (d_out,))
    if not c.tie_embeddings:
        out["unembed.kernel"] = _linear(lm_head, d, c.vocab_size)
    return out


def _neox_sources(c: TransformerConfig, prefix: str, lm_head: str) -> dict[str, _Source]:
    d, f, H, Dh = c.d_model, c.ff_dim, c.n_heads, c.head_dim
    out = {"embed.embedding": _Source(f"{prefix}embed_in.weight", (c.vocab_size, d)),
           "final_norm.scale": _Source(f"{prefix}final_layer_norm.weight", (d,)),
           "final_norm.bias": _Source(f"{prefix}final_layer_norm.bias", (d,))}
    for i in range(c.n_layers):
        h, b = f"{prefix}layers.{i}", f"blocks.{i}"
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            out[f"{b}.{ours}.scale"] = _Source(f"{h}.{theirs}.weight", (d,))
            out[f"{b}.{ours}.bias"] = _Source(f"{h}.{theirs}.bias", (d,))
        # query_key_value's output features are [head, (q | k | v), d_head]: q of head h is features
        # h*3*Dh + [0, Dh), k the next Dh, v the next. Our q kernel's column h*Dh + e is feature h*3*Dh + e.
        for j, p in enumerate("qkv"):
            cols = tuple(int(x) for x in (np.arange(H)[:, None] * 3 * Dh + j * Dh + np.arange(Dh)[None]).ravel())
            qkv = f"{h}.attention.query_key_value"
            out[f"{b}.attn.{p}_proj.kernel"] = _Source(f"{qkv}.weight", (3 * d, d), transpose=True, take=(1, cols))
            if c.qkv_bias:
                out[f"{b}.attn.{p}_proj.bias"] = _Source(f"{qkv}.bias", (3 * d,), take=(0, cols))
        out[f"{b}.attn.o_proj.kernel"] = _linear(f"{h}.attention.dense.weight", d, d)
        if c.out_bias:
            out[f"{b}.attn.o_proj.bias"] = _Source(f"{h}.attention.dense.bias", (d,))
        for ours, theirs, d_in, d_out in (("up", "dense_h_to_4h", d, f), ("down", "dense_4h_to_h", f, d)):
            out[f"{b}.mlp.{ours}.kernel"] = _linear(f"{h}.mlp.{theirs}.weight", d_in, d_out)
            out[f"{b}.mlp.{ours}.bias"] = _Source(f"{h}.mlp.{theirs}.bias", (d_out,))
    if not c.tie_embeddings:
        out["unembed.kernel"] = _linear(lm_head, d, c.vocab_size)
    return out


def _first_present(names: Sequence[str], candidates: Sequence[str]) -> str:
    """The first candidate name the checkpoint holds (the first candidate when it holds none, or for no names)."""
    return next((n for n in candidates if n in set(names)), candidates[0])


def _prefix(names: Sequence[str], prefix: str, probe: str) -> str:
    """``prefix`` if the checkpoint's names carry it (a ``*ForCausalLM`` save), else ``''`` (a bare base model)."""
    return prefix if any(n.startswith(prefix + probe) for n in names) or not names else ""


def _sources(config: TransformerConfig, hf: Mapping[str, Any], names: Sequence[str]) -> dict[str, _Source]:
    model_type = hf["model_type"]
    if model_type == "gpt2":
        return _gpt2_sources(config, _prefix(names, "transformer.", "wte."), int(hf["n_positions"]))
    if model_type == "gpt_neox":  # Pythia's unembedding is `embed_out` (transformers renames it `lm_head` in memory)
        return _neox_sources(config, _prefix(names, "gpt_neox.", "embed_in."),
                             _first_present(names, ("embed_out.weight", "lm_head.weight")))
    if model_type == "gemma3":
        # save_pretrained (and the hub) write the text model as `language_model.model.*`; transformers' in-memory
        # names are `model.language_model.*`.
        prefix = _first_present([n.split("embed_tokens.")[0] for n in names if n.endswith("embed_tokens.weight")],
                                ("language_model.model.", "model.language_model."))
        return _llama_sources(config, prefix, _first_present(names, ("lm_head.weight", "language_model.lm_head.weight")))
    return _llama_sources(config, _prefix(names, "model.", "embed_tokens."))


def weight_names(hf_config: Mapping[str, Any], config: TransformerConfig | None = None) -> dict[str, str]:
    """``{our parameter path: checkpoint tensor name}`` for a Hugging Face config.

    Args:
      hf_config: the ``config.json`` contents.
      config: the matching :class:`TransformerConfig` (default: :func:`config_from_hf` of it).

    Returns:
      The mapping, for every parameter of the reference transformer (GPT-2's q, k and v kernels
      all come from blocks of ``attn.c_attn.weight``).

    >>> import idesign as ids
    >>> names = ids.models.importers.weight_names({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8,
    ...                                           "n_layer": 1, "n_head": 2, "n_positions": 16})
    >>> names["blocks.0.attn.k_proj.kernel"], names["embed.embedding"]
    ('transformer.h.0.attn.c_attn.weight', 'transformer.wte.weight')
    """
    config = config or config_from_hf(hf_config)
    return {path: s.name for path, s in _sources(config, hf_config, []).items()}


_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _ignorable(name: str, model_type: str = "") -> bool:
    """Checkpoint entries that are buffers, not parameters (causal masks, cached rotary frequencies), and the
    vision tower of a multimodal Gemma 3 (only its text model is imported)."""
    # GPT-2's causal-mask buffers are `h.{i}.attn.bias` / `.attn.masked_bias`; its real biases are `attn.c_*.bias`.
    # GPT-NeoX's are `attention.bias` / `attention.masked_bias`; its real ones `attention.{query_key_value,dense}.bias`.
    if model_type == "gemma3" and name.startswith(_VISION):
        return True
    return name.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                          "rotary_emb.inv_freq"))


# --------------------------------------------------------------------------- files


class _Tensors:
    """The tensors of every ``*.safetensors`` file in a directory, opened lazily (read by block)."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        from safetensors import safe_open
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} has no *.safetensors files; only safetensors checkpoints are "
                                    "imported (convert with model.save_pretrained(dir, safe_serialization=True)).")
        self.handles: dict[str, Any] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="numpy"))
            for name in handle.keys():
                if name in self.handles:
                    raise ValueError(f"tensor {name!r} appears in more than one file of {directory}.")
                self.handles[name] = handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[name].get_slice(name).get_shape())

    def read(self, source: _Source, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``index`` (our layout, within ``source.block``) of ``source``'s tensor."""
        if source.take is not None:  # a strided selection: read the whole tensor, select, then index
            data = np.asarray(self.handles[source.name].get_tensor(source.name))
            data = data.T if source.transpose else data
            return np.take(data, np.asarray(source.take[1]), axis=source.take[0])[tuple(index)]
        ndim = len(source.shape)
        index = tuple(index) + (slice(None),) * (ndim - len(index))
        if source.block is not None:
            block = tuple(source.block) + (slice(None),) * (ndim - len(source.block))
            index = tuple(_compose(outer, inner) for outer, inner in zip(block, index))
        raw_index = index[::-1] if source.transpose else index
        data = self.handles[source.name].get_slice(source.name)[raw_index]
        return np.asarray(data).T if source.transpose else np.asarray(data)


def _compose(outer: slice, inner: slice) -> slice:
    """``x[outer][inner] == x[_compose(outer, inner)]`` for unit-step slices with non-negative bounds."""
    start = outer.start or 0
    inner_start = inner.start or 0
    if inner.stop is None:
        return slice(start + inner_start, outer.stop)
    return slice(start + inner_start, start + inner.stop)


# --------------------------------------------------------------------------- loading


def _abstract(config: TransformerConfig) -> tuple[TransformerApply, Params]:
    """The functional model and its parameter shapes, without allocating (or initialising) any weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    shapes = nnx.to_pure_dict(state)
    return TransformerApply(config, graphdef, shapes), shapes


def _check_tensors(tensors: _Tensors, sources: Mapping[str, _Source], config: TransformerConfig,
                   directory: pathlib.Path, model_type: str = "") -> None:
    problems = []
    for path, source in sources.items():
        if source.name not in tensors.handles:
            problems.append(f"missing tensor {source.name!r} (shape {source.shape}) for {path}")
        elif tensors.shape(source.name) != source.shape:
            problems.append(f"tensor {source.name!r} has shape {tensors.shape(source.name)} in the checkpoint but "
                            f"config.json implies {source.shape} (for {path})")
    used = {s.name for s in sources.values()}
    # A tied checkpoint may still store the unembedding; it is the embedding, so it is not needed.
    spare = ({"lm_head.weight", "language_model.lm_head.weight", "embed_out.weight"} if config.tie_embeddings
             else set())
    unused = sorted(n for n in tensors.handles if n not in used and n not in spare and not _ignorable(n, model_type))
    if unused:
        problems.append(f"{len(unused)} checkpoint tensors have no place in the model (a different architecture?): "
                        + ", ".join(repr(n) for n in unused[:5]) + (" ..." if len(unused) > 5 else ""))
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit its config.json: " + "; ".join(problems[:10])
                         + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))


def load_pretrained(checkpoint: str | os.PathLike, *, dtype: str = "float32", max_len: int | None = None,
                    mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.TRANSFORMER_RULES,
                    revision: str | None = None) -> tuple[TransformerApply, Params]:
    """Imports a Hugging Face checkpoint (see :data:`SUPPORTED_ARCHITECTURES`) as the reference transformer's ``(apply, params)``.

    Args:
      checkpoint: a directory with ``config.json`` and ``*.safetensors`` (sharded or not), or a hub id.
      dtype: ``'float32'`` or ``'bfloat16'`` (parameters and computation; see :func:`config_from_hf`).
      max_len: longest sequence; defaults to the checkpoint's.
      mesh: place every parameter on this mesh as it is read, by ``rules``
        (:data:`idesign.sharding.TRANSFORMER_RULES` by default); each device reads only its block.
        ``None``: the default device.
      rules: sharding rules for ``mesh``.
      revision: hub revision, for a hub id.

    Returns:
      ``(apply, params)``: a :class:`~idesign.models.TransformerApply` and its plain-dict parameters.

    Raises:
      ValueError: unsupported architecture (lists the supported ones); a missing, extra or
        mis-shaped tensor (names the tensor, the checkpoint's shape and the shape config.json implies).

    >>> import json, tempfile, pathlib, numpy as np, jax.numpy as jnp, idesign as ids
    >>> from safetensors.numpy import save_file
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> hf = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
    ...       "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True}
    >>> _ = (d / "config.json").write_text(json.dumps(hf))
    >>> rng = np.random.default_rng(0)
    >>> shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
    ...           "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
    ...           **{f"model.layers.0.self_attn.{p}_proj.weight": (8, 8) for p in "qkvo"},
    ...           "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
    ...           "model.layers.0.mlp.down_proj.weight": (8, 16)}
    >>> save_file({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, str(d / "model.safetensors"))
    >>> apply, params = ids.models.load_pretrained(d)
    >>> params["blocks"][0]["mlp"]["down"]["kernel"].shape, apply(params, jnp.zeros((1, 3), jnp.int32))[0].shape
    ((16, 8), (1, 3, 16))
    """
    directory = resolve_checkpoint(checkpoint, revision=revision)
    hf = read_hf_config(directory)
    config = config_from_hf(hf, dtype=dtype, max_len=max_len)
    apply, shapes = _abstract(config)
    specs = None if mesh is None else sharding_lib.param_specs(shapes, mesh, rules)
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(directory, stack)
        sources = _sources(config, hf, list(tensors.handles))
        expected = tree_lib.named_leaves(shapes)
        assert set(sources) == set(expected), sorted(set(sources) ^ set(expected))  # the tables above are complete
        _check_tensors(tensors, sources, config, directory, hf["model_type"])

        def load(path: str, shape: jax.ShapeDtypeStruct, spec: Any = None) -> jax.Array:
            source = sources[path]
            if spec is None:
                return jnp.asarray(tensors.read(source, ()).astype(shape.dtype))
            return jax.make_array_from_callback(
                shape.shape, NamedSharding(mesh, spec), lambda index: tensors.read(source, index).astype(shape.dtype))

        params = (tree_lib.map_with_path(load, shapes) if specs is None
                  else tree_lib.map_with_path(load, shapes, specs))
    return apply, params
