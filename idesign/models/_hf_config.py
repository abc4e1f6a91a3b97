"""Hugging Face ``config.json`` → :class:`~idesign.models.TransformerConfig`: one translation per supported family.

Private: :mod:`idesign.models.importers` re-exports :func:`config_from_hf`, :func:`read_hf_config` and
``SUPPORTED_ARCHITECTURES``. A field we do not implement is refused with its name, never silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from idesign.models._hub import resolve_checkpoint
from idesign.models.config import RopeScaling, TransformerConfig

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
