"""The reference decoder-only transformer (Flax NNX), with named activation sites and a KV cache.

Every activation an interpretability workflow asks for passes through ``sites(name, value)``
(an :class:`idesign.hooks.SiteRunner`), which is the identity unless that site is hooked.
Site names follow one scheme (see :func:`site_names` and the README):

=================================  ==============================================================
``embed``, ``pos_embed``           token embeddings; learned position embeddings (learned only)
``blocks.{i}.resid_pre``           residual stream entering block i
``blocks.{i}.ln1.out``             attention-norm output (not with ``block_norms='post'``)
``blocks.{i}.attn.q`` / ``k`` / ``v``  per-head queries, keys, values ``[B, T, H, Dh]`` (after QK-norm, pre-rotary)
``blocks.{i}.attn.pattern``        attention probabilities ``[B, H, T, S]``
``blocks.{i}.attn.z``              per-head mixed values ``[B, T, H, Dh]``
``blocks.{i}.attn.head_out``       per-head contribution to the residual ``[B, T, H, D]`` (only if hooked)
``blocks.{i}.attn_post_norm.out``  post-attention norm output (``block_norms`` ``'pre_post'`` / ``'post'``)
``blocks.{i}.attn_out``            attention output added to the residual
``blocks.{i}.resid_mid``           residual after attention (not with ``parallel_residual``)
``blocks.{i}.ln2.out``             MLP-norm output (not with ``block_norms='post'``)
``blocks.{i}.mlp.hidden``          MLP hidden activation ``[B, T, F]`` (after the nonlinearity/gating)
``blocks.{i}.mlp_post_norm.out``   post-MLP norm output (``block_norms`` ``'pre_post'`` / ``'post'``)
``blocks.{i}.mlp_out``             MLP output added to the residual
``blocks.{i}.resid_post``          residual stream leaving block i
``<dense>.in`` / ``<dense>.out``   input / output of every dense layer, named by its parameter path:
                                   ``blocks.{i}.attn.{q,k,v,o}_proj``, ``blocks.{i}.mlp.{up,gate,down}``, ``unembed``
``final_norm``, ``logits``         final norm output; output logits (after ``final_logit_softcap``)
=================================  ==============================================================
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idesign._types import Array
from idesign.hooks import SiteRunner
from idesign.models import _scan
from idesign.models.config import RopeScaling, TransformerConfig


def check_tokens(tokens: Any, vocab_size: int, valid: Any = None) -> Array:
    """Returns ``tokens`` as an int32 ``[batch, seq]`` array, checking concrete values: ids in ``[0, vocab_size)``.

    Python lists are accepted. Under ``jit`` the values are unknown and only the shape is checked (use
    ``checkify_tokens`` inside ``jax.experimental.checkify.checkify`` for a range check inside jit). Ids at positions ``valid`` marks unused are
    not checked: padding may hold anything.

    >>> import idesign as ids
    >>> ids.models.check_tokens([[1, 2]], 10).dtype
    dtype('int32')
    >>> ids.models.check_tokens([[1, 12]], 10)
    Traceback (most recent call last):
    ...
    ValueError: tokens: id 12 at [0, 1] is outside the vocabulary [0, 10); map ids into range (or raise vocab_size) before calling the model.
    """
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"tokens: expected an integer array [batch, seq] (or a nested list of ints); got "
                        f"{type(tokens).__name__}. Wrap single sequences as [[...]].")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected an integer array of shape [batch, seq]; got shape {tuple(tokens.shape)} "
                         f"dtype {tokens.dtype}. Add a batch axis with tokens[None] or cast with .astype(jnp.int32).")
    if not isinstance(tokens, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer):
        ids = np.asarray(tokens)
        used = np.ones(ids.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), ids.shape)
        bad = used & ((ids < 0) | (ids >= vocab_size))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"tokens: id {int(ids[where])} at {list(where)} is outside the vocabulary [0, {vocab_size}); "
                             "map ids into range (or raise vocab_size) before calling the model.")
    return jnp.asarray(tokens, jnp.int32)


def checkify_tokens(tokens: Array, vocab_size: int, valid: Array | None = None) -> Array:
    """The checked mode inside jit: a ``checkify`` check that every id (where ``valid``) is in ``[0, vocab_size)``.

    Costs a reduction per call. Call it only inside a function transformed by ``checkify.checkify``:
    under a plain ``jit`` an unfunctionalised check is refused by jax. ``make_train_step(...,
    checked=True)`` does this for a training step.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> from jax.experimental import checkify
    >>> f = checkify.checkify(jax.jit(lambda t: ids.models.checkify_tokens(t, 10)))
    >>> err, _ = f(jnp.array([[3, 11]]))
    >>> 'outside the vocabulary' in err.get()
    True
    """
    from jax.experimental import checkify
    bad = (tokens < 0) | (tokens >= vocab_size)
    if valid is not None:  # padding may hold anything
        bad = bad & jnp.asarray(valid, bool)
    checkify.check(~jnp.any(bad),
                   "tokens: an id (min {lo}, max {hi}) is outside the vocabulary [0, " + str(vocab_size) + "); "
                   "map ids into range before calling the model.",
                   lo=jnp.min(jnp.where(bad, tokens, vocab_size)), hi=jnp.max(jnp.where(bad, tokens, -1)))
    return tokens


class LayerCache(NamedTuple):
    keys: Array    # [B, S, Hkv, Dh], rotary already applied
    values: Array  # [B, S, Hkv, Dh]


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` slots, with which slots hold real tokens.

    ``length`` slots are filled (the same for every row: rows are left-padded, and padding
    slots have ``valid`` False). Positions of new tokens are counted from the valid slots,
    so left padding does not shift positions. Make one with ``apply.init_cache(batch, slots)``.

    >>> import idesign as ids
    >>> apply, _ = ids.init_transformer(ids.TransformerConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1))
    >>> apply.init_cache(2, 8).layers[0].keys.shape
    (2, 8, 2, 8)
    """

    layers: tuple[LayerCache, ...] | LayerCache  # per layer; or one stacked [n_layers, ...] (scan_layers)
    valid: Array   # [B, S] bool
    length: Array  # [] int32


def _layer_cache(layers: tuple[LayerCache, ...] | LayerCache, i: int) -> LayerCache:
    """Layer ``i``'s cache, from per-layer caches or from one cache stacked along a leading layer axis."""
    return LayerCache(layers.keys[i], layers.values[i]) if isinstance(layers, LayerCache) else layers[i]


def dense_layer_names(config: TransformerConfig) -> tuple[str, ...]:
    """Site prefixes of every dense layer, in forward order (``<name>.in``/``<name>.out`` are sites).

    >>> import idesign as ids
    >>> ids.models.dense_layer_names(ids.TransformerConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1))[-3:]
    ('blocks.0.mlp.up', 'blocks.0.mlp.down', 'unembed')
    """
    names = []
    for i in range(config.n_layers):
        b = f"blocks.{i}"
        names += [f"{b}.attn.q_proj", f"{b}.attn.k_proj", f"{b}.attn.v_proj", f"{b}.attn.o_proj"]
        names += [f"{b}.mlp.up"] + ([f"{b}.mlp.gate"] if config.mlp == "gated" else []) + [f"{b}.mlp.down"]
    return tuple(names + ["unembed"])


def site_names(config: TransformerConfig) -> tuple[str, ...]:
    """Every activation site of a model with this config, in the order the forward pass visits them.

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2)
    >>> [s for s in ids.models.site_names(cfg) if s.endswith('resid_post')]
    ['blocks.0.resid_post']
    """
    names = ["embed"] + (["pos_embed"] if config.positions == "learned" else [])
    for i in range(config.n_layers):
        b = f"blocks.{i}"
        pre, post = config.block_norms != "post", config.block_norms != "pre"
        names += [f"{b}.resid_pre"] + ([f"{b}.ln1.out"] if pre else [])
        for p in ("q", "k", "v"):
            names += [f"{b}.attn.{p}_proj.in", f"{b}.attn.{p}_proj.out"]
        names += [f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.v", f"{b}.attn.pattern", f"{b}.attn.z",
                  f"{b}.attn.o_proj.in", f"{b}.attn.head_out", f"{b}.attn.o_proj.out"]
        names += ([f"{b}.attn_post_norm.out"] if post else []) + [f"{b}.attn_out"]
        names += ([] if config.parallel_residual else [f"{b}.resid_mid"]) + ([f"{b}.ln2.out"] if pre else [])
        for p in ("up", "gate") if config.mlp == "gated" else ("up",):
            names += [f"{b}.mlp.{p}.in", f"{b}.mlp.{p}.out"]
        names += [f"{b}.mlp.hidden", f"{b}.mlp.down.in", f"{b}.mlp.down.out"]
        names += ([f"{b}.mlp_post_norm.out"] if post else []) + [f"{b}.mlp_out", f"{b}.resid_post"]
    return tuple(names + ["final_norm", "unembed.in", "unembed.out", "logits"])


def _init(std: float = 0.02):
    return nnx.initializers.normal(std)


def _activation(name: str):
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


class Norm(nnx.Module):
    """LayerNorm or RMSNorm (params ``scale`` and, for LayerNorm, ``bias``) over the last axis, computed in float32.

    With ``config.norm_unit_offset`` the multiplier is ``1 + scale`` (Gemma) and ``scale`` starts at zero.
    ``dim`` is the normalised width (default ``d_model``; QK-norms use ``d_head`` or the projection's width).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dim: int | None = None):
        dim = dim or config.d_model
        self.kind, self.eps, self.out_dtype = config.norm, config.norm_eps, config.compute_dtype
        self.unit_offset = config.norm_unit_offset
        init = jnp.zeros if self.unit_offset else jnp.ones
        self.scale = nnx.Param(init((dim,), config.storage_dtype))
        if config.norm == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), config.storage_dtype))

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        scale = self.scale[...].astype(jnp.float32)
        if self.unit_offset:
            scale = 1.0 + scale
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * scale
        if self.kind == "layernorm":
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.out_dtype)


def _dense(config: TransformerConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                      kernel_init=_init(std), rngs=rngs)


def _call_dense(layer: nnx.Linear, sites: SiteRunner, name: str, x: Array) -> Array:
    x = sites(f"{name}.in", x)
    return sites(f"{name}.out", layer(x))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The ``head_dim // 2`` rotary angular frequencies ``theta ** (-2i / head_dim)``, rescaled by ``scaling``.

    Args:
      head_dim: per-head width (even).
      theta: rotary base.
      scaling: ``None``, or a :class:`RopeScaling` (``'linear'`` divides every frequency by the factor;
        ``'llama3'`` divides the low ones, keeps the high ones and blends in between).

    Returns:
      float32 numpy array ``[head_dim // 2]`` (static: computed once when the model is traced).

    >>> import idesign as ids
    >>> ids.models.rope_frequencies(4, 100.0).tolist()
    [1.0, 0.10000000149011612]
    >>> ids.models.rope_frequencies(4, 100.0, ids.models.RopeScaling("linear", 2.0)).tolist()
    [0.5, 0.05000000074505806]
    """
    half = head_dim // 2
    freqs = 1.0 / theta ** (np.arange(half, dtype=np.float32) / half)  # float32, as Hugging Face computes it
    if scaling is None:
        return freqs.astype(np.float32)
    if scaling.kind == "linear":
        return (freqs / scaling.factor).astype(np.float32)
    # llama3: long wavelengths (beyond the original context / low_freq_factor) are slowed by the factor,
    # short ones (below original / high_freq_factor) kept, and the band between interpolated.
    wavelen = 2 * np.pi / freqs
    low_edge = scaling.original_max_len / scaling.low_freq_factor
    high_edge = scaling.original_max_len / scaling.high_freq_factor
    smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    out = np.where(wavelen > low_edge, freqs / scaling.factor, np.where(wavelen < high_edge, freqs, blended))
    return out.astype(np.float32)


def rotary(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary embedding in the rotate-half convention (as Hugging Face Llama). ``x``: [B, T, H, Dh].

    Position 0 is the identity; norms are preserved. ``scaling`` rescales the frequencies
    (see :func:`rope_frequencies`).

    >>> import jax.numpy as jnp, idesign as ids
    >>> x = jnp.ones((1, 2, 1, 4))
    >>> y = ids.models.rotary(x, jnp.array([[0, 5]]), 10000.0)
    >>> bool(jnp.allclose(y[:, 0], x[:, 0])), bool(jnp.allclose(jnp.linalg.norm(y[:, 1]), 2.0))
    (True, True)
    """
    return _rotate(x, positions, jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling)))


def _rotate(x: Array, positions: Array, freqs: Array) -> Array:
    """Rotate-half rotary on the first ``2 * len(freqs)`` features of each head; the rest pass through (GPT-NeoX)."""
    rot = 2 * freqs.shape[-1]
    half = rot // 2
    angles = positions.astype(jnp.float32)[..., None] * freqs            # [B, T, half]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    xr = xf[..., :rot] if rot < x.shape[-1] else xf
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
    out = xr * cos + rotated * sin
    if rot < x.shape[-1]:
        out = jnp.concatenate([out, xf[..., rot:]], -1)
    return out.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def layer_rope_table(config: TransformerConfig) -> np.ndarray:
    """Every layer's rotary frequencies, ``[n_layers, rotary_dim // 2]`` (per-layer bases as data, indexable by layer).

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=10, d_model=8, n_heads=1, n_layers=2, positions="rotary",
    ...     layer_types=("sliding", "global"), sliding_window=4, rope_theta=100.0, local_rope_theta=10.0)
    >>> [round(float(f), 3) for f in ids.models.transformer.layer_rope_table(cfg)[:, 1]]  # local base 10, global 100
    [0.562, 0.316]
    """
    table = np.stack([rope_frequencies(config.rotary_dim, *config.layer_rope(i)) for i in range(config.n_layers)])
    table.flags.writeable = False  # cached and shared between calls
    return table


def _per_layer(values: Any, layer: int | Array) -> Any:
    """``values[layer]``: static for a Python int layer; a gather from the stacked values for a traced one (scan)."""
    return values[layer] if isinstance(layer, int) else jnp.asarray(values)[layer]


def _softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _sliding_window_mask(mask: Array, positions: Array, key_valid: Array, window: int | Array) -> Array:
    """``mask`` restricted to keys fewer than ``window`` positions back (by position, so left padding is skipped)."""
    key_positions = jnp.cumsum(key_valid, axis=1) - 1                          # [B, S], valid slots in order
    near = positions[:, :, None] - key_positions[:, None, :] < window            # [B, T, S]
    windowed = mask & near
    # A padding query (whose only allowed slot is itself) keeps its fallback so softmax stays finite.
    return jnp.where(windowed.any(-1, keepdims=True), windowed, mask)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads, rotary or none, and a KV cache (internal to :class:`Transformer`)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c, d, hd = config, config.d_model, config.head_dim
        self.config = config
        self.q_proj = _dense(c, d, c.n_heads * hd, c.qkv_bias, rngs)
        self.k_proj = _dense(c, d, c.kv_heads * hd, c.qkv_bias, rngs)
        self.v_proj = _dense(c, d, c.kv_heads * hd, c.qkv_bias, rngs)
        # GPT-2-style scaled init of the projections that write into the residual stream.
        self.o_proj = _dense(c, c.n_heads * hd, d, c.out_bias, rngs, std=0.02 / (2 * c.n_layers) ** 0.5)
        if c.qk_norm is not None:  # 'head': one scale over d_head shared by the heads; 'proj': the whole projection
            self.q_norm = Norm(c, rngs=rngs, dim=hd if c.qk_norm == "head" else c.n_heads * hd)
            self.k_norm = Norm(c, rngs=rngs, dim=hd if c.qk_norm == "head" else c.kv_heads * hd)

    def __call__(self, x: Array, sites: SiteRunner, prefix: str, positions: Array, mask: Array,
                 cache: LayerCache | None, start: Array, key_valid: Array,
                 layer: int | Array = 0) -> tuple[Array, LayerCache | None]:
        c = self.config
        B, T, _ = x.shape
        H, K, Dh = c.n_heads, c.kv_heads, c.head_dim
        q = _call_dense(self.q_proj, sites, f"{prefix}.q_proj", x)
        k = _call_dense(self.k_proj, sites, f"{prefix}.k_proj", x)
        v = _call_dense(self.v_proj, sites, f"{prefix}.v_proj", x).reshape(B, T, K, Dh)
        if c.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = sites(f"{prefix}.q", q), sites(f"{prefix}.k", k), sites(f"{prefix}.v", v)
        if c.positions == "rotary":
            freqs = jnp.asarray(_per_layer(layer_rope_table(c), layer))
            q, k = _rotate(q, positions, freqs), _rotate(k, positions, freqs)
        if cache is not None:
            keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), (0, start, 0, 0))
            cache = LayerCache(keys, values)
        else:
            keys, values = k, v
        # A padding slot's value may hold anything (NaN written by a hook at a padded position); its attention
        # weight is 0, but 0 * NaN is NaN, so `where` keeps it out of real positions' sums (and their gradients).
        values = jnp.where(key_valid[:, :, None, None], values, 0)
        # Grouped-query attention: query heads come in K groups of G sharing one key/value head.
        G = H // K
        qg = q.reshape(B, T, K, G, Dh).astype(jnp.float32)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(jnp.float32))
        if c.query_pre_attn_scalar is None:
            scores = scores / jnp.sqrt(Dh)
        else:  # Gemma: a fixed scale, independent of d_head
            scores = scores * c.query_pre_attn_scalar ** -0.5
        scores = _softcap(scores.reshape(B, H, T, keys.shape[1]), c.attn_logit_softcap)
        windows = c.layer_windows
        if any(w is not None for w in windows):
            if isinstance(layer, int):
                if windows[layer] is not None:
                    mask = _sliding_window_mask(mask, positions, key_valid, windows[layer])
            else:  # a traced layer index: global layers get a window no sequence reaches
                big = np.iinfo(np.int32).max
                mask = _sliding_window_mask(mask, positions, key_valid,
                                            _per_layer(tuple(big if w is None else w for w in windows), layer))
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        pattern = sites(f"{prefix}.pattern", jax.nn.softmax(scores, axis=-1))
        z = jnp.einsum("bkgts,bskd->btkgd", pattern.reshape(B, K, G, T, -1), values.astype(jnp.float32))
        z = sites(f"{prefix}.z", z.reshape(B, T, H, Dh).astype(x.dtype))
        z_flat = sites(f"{prefix}.o_proj.in", z.reshape(B, T, H * Dh))
        if sites.wants(f"{prefix}.head_out"):
            # Materialised only on request: [B, T, H, D] is H times the size of the residual.
            w = self.o_proj.kernel[...].astype(x.dtype).reshape(H, Dh, c.d_model)
            head_out = sites(f"{prefix}.head_out", jnp.einsum("bthd,hde->bthe", z_flat.reshape(B, T, H, Dh), w))
            out = head_out.sum(axis=2)
            if self.o_proj.bias is not None:
                out = out + self.o_proj.bias[...].astype(x.dtype)
        else:
            out = self.o_proj(z_flat)
        return sites(f"{prefix}.o_proj.out", out), cache


class Mlp(nnx.Module):
    """Standard (up, act, down) or gated (act(gate) * up, down) MLP (internal to :class:`Transformer`)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.gated = c.mlp == "gated"
        self.act = c.activation
        self.up = _dense(c, c.d_model, c.ff_dim, c.mlp_bias, rngs)
        if self.gated:
            self.gate = _dense(c, c.d_model, c.ff_dim, c.mlp_bias, rngs)
        self.down = _dense(c, c.ff_dim, c.d_model, c.mlp_bias, rngs, std=0.02 / (2 * c.n_layers) ** 0.5)

    def __call__(self, x: Array, sites: SiteRunner, prefix: str) -> Array:
        act = _activation(self.act)
        up = _call_dense(self.up, sites, f"{prefix}.up", x)
        if self.gated:
            hidden = act(_call_dense(self.gate, sites, f"{prefix}.gate", x)) * up
        else:
            hidden = act(up)
        hidden = sites(f"{prefix}.hidden", hidden)
        return _call_dense(self.down, sites, f"{prefix}.down", hidden)


class Block(nnx.Module):
    """Attention then MLP, each added to the residual (internal to :class:`Transformer`).

    Norms sit before each sublayer (``block_norms='pre'``), also after it (``'pre_post'``, Gemma) or only after it
    (``'post'``, OLMo-2); with ``parallel_residual`` both sublayers read the block input (GPT-NeoX).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.pre_norms, self.post_norms = config.block_norms != "post", config.block_norms != "pre"
        self.parallel = config.parallel_residual
        if self.pre_norms:
            self.ln1 = Norm(config, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        if self.pre_norms:
            self.ln2 = Norm(config, rngs=rngs)
        self.mlp = Mlp(config, rngs=rngs)
        if self.post_norms:
            self.attn_post_norm = Norm(config, rngs=rngs)
            self.mlp_post_norm = Norm(config, rngs=rngs)

    def __call__(self, x, sites, prefix, positions, mask, cache, start, key_valid, layer: int | Array = 0):
        x = sites(f"{prefix}.resid_pre", x)
        h = sites(f"{prefix}.ln1.out", self.ln1(x)) if self.pre_norms else x
        attn_out, cache = self.attn(h, sites, f"{prefix}.attn", positions, mask, cache, start, key_valid, layer)
        if self.post_norms:
            attn_out = sites(f"{prefix}.attn_post_norm.out", self.attn_post_norm(attn_out))
        attn_out = sites(f"{prefix}.attn_out", attn_out)
        mid = x if self.parallel else sites(f"{prefix}.resid_mid", x + attn_out)
        h = sites(f"{prefix}.ln2.out", self.ln2(mid)) if self.pre_norms else mid
        mlp_out = self.mlp(h, sites, f"{prefix}.mlp")
        if self.post_norms:
            mlp_out = sites(f"{prefix}.mlp_post_norm.out", self.mlp_post_norm(mlp_out))
        mlp_out = sites(f"{prefix}.mlp_out", mlp_out)
        if self.parallel:  # GPT-NeoX's order of the sum
            return sites(f"{prefix}.resid_post", mlp_out + attn_out + x), cache
        return sites(f"{prefix}.resid_post", mid + mlp_out), cache


class Transformer(nnx.Module):
    """The reference decoder-only transformer.

    Call it as an NNX module, ``logits, captured = model(tokens, hooks=...)``, or turn it into the
    functional interface with :func:`idesign.models.functional`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    >>> model = ids.Transformer(cfg, rngs=nnx.Rngs(0))
    >>> logits, captured = model(jnp.zeros((2, 5), jnp.int32), hooks=ids.capture('blocks.1.resid_post'))
    >>> logits.shape, captured['blocks.1.resid_post'].shape
    ((2, 5, 50), (2, 5, 32))
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, param_dtype=config.storage_dtype,
                               dtype=config.compute_dtype, embedding_init=_init(), rngs=rngs)
        if config.positions == "learned":
            self.pos_embed = nnx.Embed(config.max_len, config.d_model, param_dtype=config.storage_dtype,
                                       dtype=config.compute_dtype, embedding_init=_init(0.01), rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = Norm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.unembed = _dense(config, config.d_model, config.vocab_size, False, rngs)

    def __call__(self, tokens: Array, *, hooks=None, valid: Array | None = None) -> tuple[Array, dict]:
        sites = SiteRunner(hooks, site_names(self.config))
        logits, _ = self.forward(tokens, sites, valid=valid)
        return logits, sites.captured

    def _embed(self, tokens: Array) -> Array:
        x = self.embed(tokens)
        if self.config.scale_embeddings:  # Gemma rounds sqrt(d_model) to the model's dtype before multiplying
            x = x * jnp.asarray(self.config.d_model ** 0.5, self.config.compute_dtype)
        return x

    def forward(self, tokens: Array, sites: SiteRunner, *, valid: Array | None = None,
                cache: KVCache | None = None, stacked_blocks: Any = None) -> tuple[Array, KVCache | None]:
        """Runs ``tokens`` [B, T] through the model, appending to ``cache`` if one is given.

        ``stacked_blocks`` (``scan_layers`` only): the blocks' parameters already stacked along a leading
        layer axis (:func:`idesign.models.stack_blocks`), used instead of this module's per-layer ones.
        """
        c = self.config
        tokens = check_tokens(tokens, c.vocab_size, valid)
        B, T = tokens.shape
        sites.valid = None if valid is None else jnp.asarray(valid).astype(bool)  # hooks leave padding (SiteRunner)
        valid = jnp.ones((B, T), bool) if valid is None else jnp.asarray(valid).astype(bool)
        if cache is None:
            start, key_valid, past = jnp.zeros((), jnp.int32), valid, jnp.zeros((B,), jnp.int32)
        else:
            start = cache.length
            past = cache.valid.sum(-1).astype(jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))
        # Positions count real tokens only, so left padding and per-row prompt lengths line up.
        positions = jnp.maximum(past[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)
        S = key_valid.shape[1]
        causal = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]          # [T, S]
        mask = causal[None] & key_valid[:, None, :]                                   # [B, T, S]
        # A query with nothing to attend to (a pad) attends to itself to keep softmax finite.
        own = (jnp.arange(S)[None, :] == (start + jnp.arange(T))[:, None])[None]
        mask = jnp.where(mask.any(-1, keepdims=True), mask, own)

        # `where`, not multiplication: a pad slot's embedding may be NaN (an out-of-range pad id) and must
        # not reach real positions through attention values (0 * NaN is NaN).
        x = jnp.where(valid[..., None], sites("embed", self._embed(tokens)), 0)
        if c.positions == "learned":
            x = x + sites("pos_embed", self.pos_embed(positions))
        if c.scan_layers:  # one traced block run by lax.scan: idesign/models/_scan.py
            call = lambda block, x, sites, prefix, layer_cache, i: block(
                x, sites, prefix, positions, mask, layer_cache, start, key_valid, i)
            x, new_layers = _scan.run_blocks(self.blocks, x, sites, site_names(c), call,
                                             None if cache is None else cache.layers, stacked_blocks)
        else:
            new_layers = []
            for i, block in enumerate(self.blocks):
                layer_cache = None if cache is None else _layer_cache(cache.layers, i)
                x, layer_cache = block(x, sites, f"blocks.{i}", positions, mask, layer_cache, start, key_valid, i)
                new_layers.append(layer_cache)
            if cache is not None and isinstance(cache.layers, LayerCache):  # keep the layout it was given in
                new_layers = _scan.stack_cache(tuple(new_layers))
        x = sites("final_norm", self.final_norm(x))
        x = sites("unembed.in", x)
        logits = self.embed.attend(x) if c.tie_embeddings else self.unembed(x)
        logits = sites("logits", _softcap(sites("unembed.out", logits.astype(jnp.float32)), c.final_logit_softcap))
        if cache is not None:
            cache = KVCache(new_layers if isinstance(new_layers, LayerCache) else tuple(new_layers), key_valid, start + T)
        return logits, cache
