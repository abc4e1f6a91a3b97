"""The functional interface of the reference transformer: ``apply(params, tokens, *, hooks)``.

``params`` is a plain nested dict of arrays (``nnx.to_pure_dict`` of the model's parameters), the
same kind of pytree optax, orbax and every idesign transform work on. Its leaves are named by
dotted paths such as ``blocks.0.attn.q_proj.kernel`` (see :mod:`idesign.tree`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idesign import tree as tree_lib
from idesign._types import Array, Params
from idesign.hooks import Hooks, SiteRunner
from idesign.models import _scan
from idesign.models.config import TransformerConfig
from idesign.models.transformer import (KVCache, LayerCache, Transformer, dense_layer_names,
                                        site_names)


@dataclasses.dataclass(frozen=True, eq=False)
class TransformerApply:
    """``apply(params, tokens, *, hooks=None, valid=None) -> (logits, captured)`` for the reference model.

    Hashable by identity and free of arrays, so it can be closed over or passed as a static
    argument to ``jax.jit``. Build one with :func:`init_transformer` or :func:`functional`.

    Attributes:
      config: the model's :class:`TransformerConfig`.
      site_names: every hookable site, in forward order.
      dense_layers: ``{site_prefix: kernel_path}`` for every dense layer, e.g.
        ``'blocks.0.mlp.up' -> 'blocks.0.mlp.up.kernel'`` (kernel layout ``[d_in, d_out]``). With tied
        embeddings, ``'unembed'`` maps to ``'embed.embedding'`` (layout ``[d_out, d_in]``).

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1))
    >>> apply.dense_layers['blocks.0.mlp.up'], len(apply.site_names)
    ('blocks.0.mlp.up.kernel', 32)
    >>> cache = apply.init_cache(batch_size=1, max_len=8)           # prefill, then decode one token
    >>> logits, _, cache = apply.forward(params, jnp.array([[3, 4, 5]]), cache=cache)
    >>> logits, _, cache = apply.forward(params, jnp.array([[6]]), cache=cache)
    >>> int(cache.length)
    4
    """

    config: TransformerConfig
    graphdef: Any
    param_shapes: Any  # pytree of jax.ShapeDtypeStruct, for validating params

    @property
    def site_names(self) -> tuple[str, ...]:
        return site_names(self.config)

    @property
    def dense_layers(self) -> dict[str, str]:
        out = {name: f"{name}.kernel" for name in dense_layer_names(self.config)}
        if self.config.tie_embeddings:
            out["unembed"] = "embed.embedding"
        return out

    def __call__(self, params: Params, tokens: Array, *, hooks: Hooks | None = None,
                 valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
        logits, captured, _ = self.forward(params, tokens, hooks=hooks, valid=valid)
        return logits, captured

    def forward(self, params: Params, tokens: Array, *, hooks: Hooks | None = None,
                valid: Array | None = None, cache: KVCache | None = None
                ) -> tuple[Array, dict[str, Array], KVCache | None]:
        """Like ``__call__`` but also appends to and returns a :class:`KVCache` when given one.

        ``valid`` [B, T] marks real tokens (False for padding); padding is never attended to
        and does not advance positions.
        """
        if isinstance(tokens, (list, tuple)):  # Python lists of ids: accepted, as integer arrays
            tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
        self._check_tokens(tokens, valid, cache)
        stacked = None
        if _scan.is_stacked(params):  # blocks stacked by stack_blocks: the scan reads them as they are
            stacked = self._check_stacked(params["blocks"])
            # A per-layer view only to build the module; the scan never reads these slices, so XLA drops them.
            params = _scan.unstack_blocks(params)
        self.check_params(params)
        model = nnx.merge(self.graphdef, params)
        sites = SiteRunner(hooks, self.site_names)
        logits, cache = model.forward(tokens, sites, valid=valid, cache=cache, stacked_blocks=stacked)
        return logits, sites.captured, cache

    def with_config(self, **changes: Any) -> "TransformerApply":
        """The same model with config fields changed that keep the parameter pytree (e.g. ``scan_layers=True``).

        This is how an imported or trained model is run scanned or unrolled: its ``params`` fit both.
        A change that alters the parameters' paths or shapes is refused, naming them.

        >>> import jax.numpy as jnp, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=20, d_model=16, n_heads=2))
        >>> scanned = apply.with_config(scan_layers=True)
        >>> bool(jnp.allclose(scanned(params, jnp.ones((1, 3), jnp.int32))[0], apply(params, jnp.ones((1, 3), jnp.int32))[0], atol=1e-6))
        True
        """
        config = self.config.replace(**changes)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
        old, new = tree_lib.named_leaves(self.param_shapes), tree_lib.named_leaves(shapes)
        diff = sorted(set(old) ^ set(new)) + [p for p in old if p in new and old[p].shape != new[p].shape]
        if diff:
            raise ValueError(f"with_config({', '.join(f'{k}={v!r}' for k, v in changes.items())}) changes the "
                             f"parameters (e.g. {diff[:3]}); only changes that keep them can reuse params.")
        return TransformerApply(config, graphdef, self.param_shapes)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty cache with ``max_len`` slots per row (with ``scan_layers``, stacked along a leading layer axis)."""
        c = self.config
        if max_len > c.max_len and c.positions == "learned":
            raise ValueError(f"init_cache: max_len={max_len} exceeds the model's max_len={c.max_len} "
                             "(learned positions have no embedding beyond it).")
        dtype = dtype or c.compute_dtype
        shape = (batch_size, max_len, c.kv_heads, c.head_dim)
        if c.scan_layers:  # stacked along a leading layer axis, as the scan reads and writes it (no copy per step)
            stacked = (c.n_layers,) + shape
            layers = LayerCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
        else:
            layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.n_layers))
        return KVCache(layers, jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32))

    def _check_stacked(self, blocks: Params) -> Params:
        if not self.config.scan_layers:
            raise ValueError("params['blocks'] is stacked (stack_blocks), which only a scan_layers=True model reads; "
                             "unstack it with ids.models.unstack_blocks(params) or set scan_layers=True.")
        n = self.config.n_layers
        bad = [f"blocks.{p}: shape {tuple(np.shape(x))}" for p, x in tree_lib.named_leaves(blocks).items()
               if not np.shape(x) or np.shape(x)[0] != n]
        if bad:
            raise ValueError(f"stacked params need a leading layer axis of n_layers={n}: " + "; ".join(bad[:5]))
        return blocks

    def check_params(self, params: Params) -> None:
        """Raises a ValueError naming each path whose presence, shape or kind differs from the model's."""
        expected = tree_lib.named_leaves(self.param_shapes)
        try:
            got = tree_lib.named_leaves(params)
        except Exception as e:  # pragma: no cover - exotic containers
            raise TypeError(f"params must be a nested dict of arrays; got {type(params).__name__}") from e
        problems = [f"missing {p} (expected shape {expected[p].shape})" for p in expected if p not in got]
        problems += [f"unexpected {p}" for p in got if p not in expected]
        for p, leaf in got.items():
            if p in expected and tuple(np.shape(leaf)) != expected[p].shape:
                problems.append(f"{p}: shape {tuple(np.shape(leaf))}, expected {expected[p].shape}")
        if problems:
            raise ValueError("params do not fit this model: " + "; ".join(problems[:10])
                             + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))

    def _check_tokens(self, tokens: Array, valid: Array | None, cache: KVCache | None) -> None:
        shape, dtype = np.shape(tokens), getattr(tokens, "dtype", None)
        if len(shape) != 2:
            raise ValueError(f"tokens must have shape [batch, seq]; got shape {tuple(shape)}"
                             + (" (add a batch axis: tokens[None])" if len(shape) == 1 else "") + ".")
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"tokens must be integer token ids; got dtype {dtype}; cast with jnp.asarray(tokens, jnp.int32).")
        if valid is not None and tuple(np.shape(valid)) != tuple(shape):
            raise ValueError(f"valid has shape {tuple(np.shape(valid))}; expected the tokens' shape {tuple(shape)}.")
        total = shape[1] if cache is None else cache.valid.shape[1]
        if cache is not None and cache.valid.shape[0] != shape[0]:
            raise ValueError(f"cache holds batch {cache.valid.shape[0]} but tokens have batch {shape[0]}.")
        if cache is not None and not isinstance(cache.length, jax.core.Tracer):
            # Writing past the last slot would be clamped silently by dynamic_update_slice.
            if int(cache.length) + shape[1] > cache.valid.shape[1]:
                raise ValueError(f"cache overflow: {int(cache.length)} slots filled + {shape[1]} new tokens > "
                                 f"{cache.valid.shape[1]} slots; make the cache larger with init_cache(batch, max_len).")
        if self.config.positions == "learned" and total > self.config.max_len:
            raise ValueError(f"sequence of {total} tokens exceeds the model's max_len={self.config.max_len}.")


def functional(model: Transformer) -> tuple[TransformerApply, Params]:
    """Splits an NNX :class:`Transformer` into ``(apply, params)``; the model is not modified.

    >>> from flax import nnx
    >>> import jax.numpy as jnp, idesign as ids
    >>> model = ids.Transformer(ids.TransformerConfig(vocab_size=20, d_model=16, n_heads=2), rngs=nnx.Rngs(0))
    >>> apply, params = ids.models.functional(model)
    >>> apply(params, jnp.zeros((1, 4), jnp.int32))[0].shape
    (1, 4, 20)
    """
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return TransformerApply(model.config, graphdef, shapes), params


def init_transformer(config: TransformerConfig, seed: int = 0) -> tuple[TransformerApply, Params]:
    """Initialises the reference transformer and returns ``(apply, params)``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=20, d_model=16, n_heads=2))
    >>> logits, captured = apply(params, jnp.ones((2, 3), jnp.int32), hooks=ids.capture('blocks.*.resid_post'))
    >>> sorted(captured)
    ['blocks.0.resid_post', 'blocks.1.resid_post']
    """
    return functional(Transformer(config, rngs=nnx.Rngs(seed)))
