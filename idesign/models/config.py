"""Configuration of the reference transformer, with presets shaped like GPT-2 and Llama."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rotary"]
Mlp = Literal["standard", "gated"]
Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]
RopeKind = Literal["linear", "llama3"]
BlockNorms = Literal["pre", "pre_post", "post"]
QkNorm = Literal["head", "proj"]
LayerType = Literal["global", "sliding"]

_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "positions": ("learned", "rotary"),
    "mlp": ("standard", "gated"),
    "activation": ("gelu", "gelu_tanh", "silu", "relu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16", "float16"),
    "block_norms": ("pre", "pre_post", "post"),
    "qk_norm": (None, "head", "proj"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaled rotary frequencies for long contexts (Hugging Face's ``rope_scaling`` / ``rope_parameters``).

    Attributes:
      kind: ``'linear'`` (every frequency divided by ``factor``) or ``'llama3'`` (low frequencies
        divided by ``factor``, high ones kept, a smooth blend between; Llama 3.1 and later).
      factor: the context-extension factor.
      low_freq_factor, high_freq_factor, original_max_len: the ``'llama3'`` band edges:
        wavelengths above ``original_max_len / low_freq_factor`` are scaled, those below
        ``original_max_len / high_freq_factor`` are not.

    >>> import idesign as ids
    >>> ids.models.RopeScaling("linear", factor=2.0).factor
    2.0
    """

    kind: RopeKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"RopeScaling.kind={self.kind!r}; expected 'linear' or 'llama3'.")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor={self.factor!r}; expected a positive number.")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor > 0; got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}.")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer, general enough to hold GPT-2- and Llama-style weights.

    Attributes:
      vocab_size: number of token ids.
      d_model: residual stream width.
      n_layers: number of blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention); ``None`` means ``n_heads``.
      d_head: per-head width; ``None`` means ``d_model // n_heads`` (which must divide evenly).
      d_ff: MLP hidden width; ``None`` means ``4 * d_model``.
      max_len: longest sequence (learned positions table size; KV-cache bound).
      norm: ``'layernorm'`` (GPT-2) or ``'rmsnorm'`` (Llama).
      norm_eps: epsilon inside the norms.
      positions: ``'learned'`` absolute embeddings (GPT-2) or ``'rotary'`` (Llama).
      rope_theta: rotary base frequency.
      rope_scaling: a :class:`RopeScaling` of the rotary frequencies, or ``None`` for plain rotary.
      mlp: ``'standard'`` (up, act, down) or ``'gated'`` (SwiGLU: act(gate) * up, down).
      activation: MLP nonlinearity.
      qkv_bias, out_bias, mlp_bias: biases on q/k/v projections, the attention output
        projection, and the MLP projections (GPT-2: all True; Llama: all False; Qwen2: qkv only).
      tie_embeddings: unembedding shares the token embedding matrix.
      dtype: computation dtype (softmax and norms always run in float32).
      param_dtype: storage dtype of the parameters (``'bfloat16'`` halves the memory of an imported model).
      norm_unit_offset: norms multiply by ``1 + scale`` instead of ``scale`` (Gemma), so a zero scale is the identity.
      block_norms: where each block's norms sit: ``'pre'`` (before attention and MLP: GPT-2, Llama), ``'pre_post'``
        (also after each sublayer, before the residual add: Gemma 2/3), ``'post'`` (after each sublayer only: OLMo-2).
      scale_embeddings: token embeddings are multiplied by ``sqrt(d_model)``, rounded to ``dtype`` first (Gemma).
      attn_logit_softcap: attention scores become ``c * tanh(scores / c)`` before masking (Gemma 2); ``None``: off.
      final_logit_softcap: logits become ``c * tanh(logits / c)`` (Gemma 2); ``None``: off.
      query_pre_attn_scalar: scores are scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``d_head ** -0.5``
        (Gemma); ``None``: ``d_head``.
      qk_norm: a norm on queries and keys before rotary: ``'head'`` over each head's ``d_head`` features, one scale
        shared by the heads (Qwen3, Gemma 3), ``'proj'`` over the whole q / k projection (OLMo-2); ``None``: off.
      layer_types: per layer, ``'global'`` (full causal attention) or ``'sliding'`` (the last ``sliding_window``
        positions only); ``None``: every layer global. A tuple indexed by layer, so it can become data.
      sliding_window: how many positions a sliding layer's query sees, itself included.
      local_rope_theta: rotary base of the sliding layers, which then take no ``rope_scaling`` (Gemma 3: local
        10k, global 1M with linear scaling); ``None``: every layer uses ``rope_theta`` and ``rope_scaling``.
      rotary_pct: the fraction of each head's features that rotary rotates (the first ones; Pythia: 0.25).
      parallel_residual: attention and MLP both read the block input and are added together,
        ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX / Pythia); no ``resid_mid`` site then.
      scan_layers: run the blocks with ``jax.lax.scan`` (one traced block, so compile time stays flat in depth)
        instead of a Python loop. Nothing user-facing changes: parameters stay per layer (``blocks.{i}....``)
        and are stacked inside the forward pass, so masks, projections, K-FAC, checkpoints and importers
        address one layer as before and a checkpoint loads either way; per-layer hooks are stacked (or, when
        their structures differ, chosen with ``lax.switch`` on the layer index) and captures come back per
        layer. The stack copies the block parameters once per call (see ``benchmarks/compile.py``).

    >>> import idesign as ids
    >>> ids.TransformerConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4).head_dim
    16
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_ff: int | None = None
    max_len: int = 256
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    positions: Positions = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    mlp: Mlp = "standard"
    activation: Activation = "gelu_tanh"
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    norm_unit_offset: bool = False
    block_norms: BlockNorms = "pre"
    scale_embeddings: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    qk_norm: QkNorm | None = None
    layer_types: tuple[LayerType, ...] | None = None
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    rotary_pct: float = 1.0
    parallel_residual: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if isinstance(self.layer_types, list):  # a list from JSON: stored as a tuple so the config stays hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            _require_positive(name, getattr(self, name))
        for name in ("n_kv_heads", "d_head", "d_ff"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r}; expected one of {allowed}.")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose d_model as a multiple of n_heads or set d_head explicitly.")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"TransformerConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}; "
                "grouped-query attention needs each key/value head to serve a whole group of query heads.")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"TransformerConfig.rope_scaling must be a RopeScaling or None; got "
                            f"{type(self.rope_scaling).__name__}.")
        if self.positions == "rotary" and self.rotary_dim % 2:
            raise ValueError(f"TransformerConfig: rotary positions need an even number of rotated features; d_head="
                             f"{self.head_dim} with rotary_pct={self.rotary_pct} rotates {self.rotary_dim}.")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"TransformerConfig.rotary_pct={self.rotary_pct!r}; expected a fraction in (0, 1].")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"TransformerConfig.{name}={value!r}; expected a positive number or None.")
        if self.sliding_window is not None:
            _require_positive("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.n_layers:
                raise ValueError(f"TransformerConfig.layer_types={self.layer_types!r}; expected a tuple of n_layers="
                                 f"{self.n_layers} entries, each 'global' or 'sliding'.")
            bad = [(i, t) for i, t in enumerate(self.layer_types) if t not in ("global", "sliding")]
            if bad:
                raise ValueError(f"TransformerConfig.layer_types[{bad[0][0]}]={bad[0][1]!r}; expected 'global' or "
                                 "'sliding'.")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("TransformerConfig: layer_types has sliding layers but sliding_window is None.")
        if self.parallel_residual and self.block_norms != "pre":
            raise ValueError(f"TransformerConfig: parallel_residual needs block_norms='pre'; got {self.block_norms!r}.")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading features of each head rotary rotates (``int(d_head * rotary_pct)``, as GPT-NeoX)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the sliding window (``None``: global attention)."""
        types = self.layer_types or ("global",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding" else None for t in types)

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """``(rope_theta, rope_scaling)`` of one layer: sliding layers use ``local_rope_theta`` when it is set."""
        if self.local_rope_theta is not None and self.layer_windows[layer] is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def gpt2_like(cls, vocab_size: int, **overrides) -> "TransformerConfig":
        """LayerNorm, learned positions, GELU (tanh) MLP, biases, tied embeddings."""
        base = dict(norm="layernorm", positions="learned", mlp="standard", activation="gelu_tanh",
                    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
        return cls(vocab_size=vocab_size, **{**base, **overrides})

    @classmethod
    def llama_like(cls, vocab_size: int, **overrides) -> "TransformerConfig":
        """RMSNorm, rotary positions, SwiGLU MLP, no biases, untied embeddings."""
        base = dict(norm="rmsnorm", norm_eps=1e-6, positions="rotary", mlp="gated", activation="silu",
                    qkv_bias=False, out_bias=False, mlp_bias=False, tie_embeddings=False)
        return cls(vocab_size=vocab_size, **{**base, **overrides})


def _require_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TransformerConfig.{name}={value!r}; expected a positive integer.")
