"""One wrapper for transforms that must see an optimizer's *final* update (projection, observation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from idesign import masks as masks_lib
from idesign.optim._freezing import freeze_masks_in


def then_on_final_update(optimizer: optax.GradientTransformation, final: optax.GradientTransformation,
                         state_cls: Callable[[Any, Any], Any]) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` followed by ``final``, with the state ``state_cls(inner_state, final_state)``.

    Unlike ``optax.chain``, extra arguments reach ``optimizer`` only, and the state is a named pair, so
    users can find ``final``'s state (e.g. to swap bases with ``optax.tree_utils.tree_set``).

    >>> import jax.numpy as jnp, optax
    >>> from typing import NamedTuple
    >>> class Pair(NamedTuple):
    ...     inner: optax.OptState
    ...     final: optax.OptState
    >>> opt = then_on_final_update(optax.sgd(1.0), optax.scale(0.5), Pair)
    >>> updates, state = opt.update({'w': jnp.ones(2)}, opt.init({'w': jnp.zeros(2)}))
    >>> updates['w'].tolist(), type(state).__name__
    ([-0.5, -0.5], 'Pair')
    """
    inner = optax.with_extra_args_support(optimizer)
    final = optax.with_extra_args_support(final)

    def init_fn(params):
        return state_cls(inner.init(params), final.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        inner_state, final_state = state
        updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        # the final transform must honour every freeze mask, or it would move frozen elements: one passed down
        # by an enclosing `frozen`, and those of `frozen` wrappers inside `optimizer` (static data in its state)
        masks = [extra_args["freeze_mask"]] if extra_args.get("freeze_mask") is not None else []
        masks += freeze_masks_in(inner_state)
        extra = {"freeze_mask": masks_lib.union(*masks)} if masks else {}
        updates, final_state = final.update(updates, final_state, params, **extra)
        return updates, state_cls(inner_state, final_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
