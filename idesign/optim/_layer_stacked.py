"""An optimizer that sees a transformer's per-layer block parameters as one stacked leaf per block parameter.

A ``scan_layers=True`` model compiles its blocks once, whatever the depth; an optimizer over its per-layer
parameter pytree (``blocks.{i}.mlp.up.kernel``) does not: every layer's every leaf is a separate piece of
the program. :func:`layer_stacked` stacks the ``blocks`` subtrees of the updates, the parameters and the
state once per step (``[n_layers, ...]`` leaves), runs the inner optimizer there, and unstacks the
updates, so the user's parameter pytree, and every per-layer tool wrapped *around* it (``frozen``,
``freeze`` chained after, ``projected``), still addresses one layer by its path. (Training on parameters
stacked once, :func:`idesign.models.stack_blocks`, is flatter still: NOTES.md, "Scanned blocks".)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from idesign._stacking import stack_layers, unstack_layers
from idesign._types import PyTree


class LayerStackedState(NamedTuple):
    """The inner optimizer's state, over the stacked layout (``blocks`` keyed by the block's fields)."""
    inner: Any


def _is_node(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _per_layer_blocks(tree: Any) -> dict | None:
    """``tree['blocks']`` when it is per layer ({0: ..., 1: ...}, n >= 1), else None (nothing to stack)."""
    blocks = tree.get("blocks") if isinstance(tree, dict) else None
    if isinstance(blocks, dict) and blocks and all(isinstance(k, int) for k in blocks):
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"layer_stacked: params['blocks'] has keys {sorted(blocks)}; expected 0..{len(blocks) - 1}.")
        return blocks
    return None


def _stack(tree: Any) -> Any:
    """Stacks ``tree['blocks']`` across layers; a leaf position where some layers hold a placeholder
    (``optax.MaskedNode``, as ``frozen`` passes for leaves frozen whole) is stacked with zeros there,
    and one where every layer holds it stays a placeholder."""
    blocks = _per_layer_blocks(tree)
    if blocks is None:
        return tree
    n = len(blocks)

    try:
        stacked = stack_layers([blocks[i] for i in range(n)], is_placeholder=_is_node)
    except ValueError as e:
        raise ValueError(f"layer_stacked: the {n} blocks differ in structure ({e}); stacking needs identical "
                         "blocks, as scan_layers does.") from e
    return {**tree, "blocks": stacked}


def _unstack(stacked: Any, like: Any) -> Any:
    """The per-layer layout of ``stacked`` with ``like``'s placeholders (per layer) put back."""
    blocks = _per_layer_blocks(like)
    if blocks is None:
        return stacked
    n = len(blocks)
    layers = unstack_layers(stacked["blocks"], n, like=[blocks[i] for i in range(n)], is_placeholder=_is_node)
    return {**stacked, "blocks": layers}


def layer_stacked(optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``optimizer`` on the per-layer ``blocks`` of a transformer's pytrees stacked into ``[n_layers, ...]`` leaves.

    For a ``scan_layers=True`` model trained on per-layer parameters (``blocks.{i}....``, what
    checkpoints, importers, masks, ``projected`` and K-FAC address): the inner optimizer's program has
    one leaf per block parameter rather than one per layer and block parameter. The rest of the step
    stays per layer (the forward's stack, its gradient's slices, this wrapper's stack/unstack,
    ``apply_updates``), so compile time still grows with depth, less than without it
    (``benchmarks.compile --quick``, 4 -> 32 layers: 2.8x, against 3.5x plain and 1.2x for parameters
    stacked once by :func:`idesign.models.stack_blocks`, the recommended layout to train in when no
    per-layer tool needs the per-layer parameters).
    Its updates equal the inner optimizer's on the per-layer pytree for elementwise optimizers (Adam,
    SGD, weight decay; tested to 1e-6). Transforms that mix leaves see the same numbers in another
    layout: a global norm (``clip_by_global_norm``) is unchanged, a per-leaf statistic is per stacked leaf.

    Wrap per-layer tools *around* it, so their masks and subspaces address one layer:
    ``ids.optim.frozen(layer_stacked(optax.adamw(lr)), freeze_mask=mask)``, or chain
    ``ids.optim.freeze(mask)`` after it. (Leaves ``frozen`` partitions out in some layers but not in
    all are stacked with zeros there, so the inner state keeps those slices.)

    Trees without per-layer ``blocks`` (keyed 0, 1, ...) pass through unchanged. Extra arguments are passed to
    the inner optimizer as they are.

    >>> import jax, jax.numpy as jnp, optax, idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=3,
    ...                                                      scan_layers=True))
    >>> opt = ids.optim.layer_stacked(optax.adam(1e-2))
    >>> state = opt.init(params)
    >>> state.inner[0].mu['blocks']['mlp']['up']['kernel'].shape   # one leaf for the three layers
    (3, 8, 32)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> updates['blocks'][2]['mlp']['up']['kernel'].shape           # the updates are per layer again
    (8, 32)
    >>> ref, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    >>> bool(jnp.allclose(updates['blocks'][1]['attn']['q_proj']['kernel'], ref['blocks'][1]['attn']['q_proj']['kernel']))
    True
    """
    def init(params: PyTree) -> LayerStackedState:
        return LayerStackedState(optimizer.init(_stack(params)))

    def update(updates: PyTree, state: LayerStackedState, params: PyTree | None = None,
               **extra: Any) -> tuple[PyTree, LayerStackedState]:
        stacked_params = None if params is None else _stack(params)
        inner = optax.with_extra_args_support(optimizer)
        new, inner_state = inner.update(_stack(updates), state.inner, stacked_params, **extra)
        return _unstack(new, updates), LayerStackedState(inner_state)

    return optax.GradientTransformationExtraArgs(init, update)
