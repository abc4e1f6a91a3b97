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
from idesign.models._hf_config import SUPPORTED_ARCHITECTURES, config_from_hf, read_hf_config
from idesign.models.config import TransformerConfig
from idesign.models._functional import Params, TransformerApply
from idesign.models.transformer import Transformer

__all__ = ["SUPPORTED_ARCHITECTURES", "Tokenizer", "config_from_hf", "hub_reachable", "load_pretrained",
           "load_tokenizer", "read_hf_config", "resolve_checkpoint", "weight_names"]


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
