"""Stacking a transformer's per-layer block subtrees into ``[n_layers, ...]`` leaves, and back.

The one low-level pair behind :func:`idesign.models.stack_blocks` / :func:`idesign.models.unstack_blocks`
(parameters) and ``ids.optim.layer_stacked`` (updates and optimizer state, whose leaves may be
placeholders such as ``optax.MaskedNode``). It imports nothing from idesign, so both layers can use it
without an import cycle.

>>> import jax.numpy as jnp
>>> layers = [{'w': jnp.ones(2)}, {'w': jnp.zeros(2)}]
>>> stacked = stack_layers(layers)
>>> stacked['w'].shape
(2, 2)
>>> back = unstack_layers(stacked, 2)
>>> sorted(back), back[0]['w'].tolist()
([0, 1], [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Placeholder = Callable[[Any], bool]


def stack_layers(layers: Sequence[Any], *, is_placeholder: Placeholder | None = None) -> Any:
    """One subtree whose leaves stack the matching leaves of ``layers`` (identical structures) along a new axis 0.

    With ``is_placeholder``, a leaf position where some layers hold a placeholder is stacked with zeros
    (shaped like a real layer's leaf) there, and one where every layer holds it stays the first layer's
    placeholder. Without it, every leaf is stacked as it is.

    >>> import jax.numpy as jnp
    >>> hole = lambda x: x is None or x == 'gap'
    >>> out = stack_layers([{'w': 'gap', 'b': 'gap'}, {'w': jnp.ones(2), 'b': 'gap'}], is_placeholder=hole)
    >>> out['w'].tolist(), out['b']
    ([[0.0, 0.0], [1.0, 1.0]], 'gap')
    """
    if is_placeholder is None:
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)

    def stack(*xs: Any) -> Any:
        real = [x for x in xs if not is_placeholder(x)]
        if not real:
            return xs[0]
        return jnp.stack([jnp.zeros_like(real[0]) if is_placeholder(x) else x for x in xs])

    return jax.tree_util.tree_map(stack, *layers, is_leaf=is_placeholder)


def unstack_layers(stacked: Any, n: int, *, like: Sequence[Any] | None = None,
                   is_placeholder: Placeholder | None = None) -> dict[int, Any]:
    """``{i: layer i}`` for ``i < n``: each leaf of ``stacked`` indexed at ``i``.

    With ``like`` (the per-layer subtrees ``stacked`` was made from) and ``is_placeholder``, layer ``i``
    keeps ``like[i]``'s placeholders where it had them (the zeros :func:`stack_layers` filled in are dropped).

    >>> import jax.numpy as jnp
    >>> hole = lambda x: x is None or x == 'gap'
    >>> like = [{'w': 'gap'}, {'w': jnp.ones(2)}]
    >>> out = unstack_layers(stack_layers(like, is_placeholder=hole), 2, like=like, is_placeholder=hole)
    >>> out[0]['w'], out[1]['w'].tolist()
    ('gap', [1.0, 1.0])
    """
    if like is None:
        return {i: jax.tree_util.tree_map(lambda x: x[i], stacked) for i in range(n)}
    if is_placeholder is None:
        raise ValueError("unstack_layers: `like` was given without `is_placeholder`; it only serves to put placeholders back.")
    if len(like) != n:
        raise ValueError(f"unstack_layers: n={n} layers but `like` has {len(like)}.")
    return {i: jax.tree_util.tree_map(lambda s, ref: ref if is_placeholder(ref) else s[i], stacked, like[i],
                                      is_leaf=is_placeholder)
            for i in range(n)}
