"""Element-level freezing: frozen parameter elements never change, bit for bit.

optax's ``freeze``/``masked`` work on whole leaves; a circuit is a few heads inside a fused q/k/v
kernel or a few neurons of an MLP, so the mask here is an *element mask* (:mod:`idesign.tree`: bool
arrays of each leaf's shape, or a bool for the whole leaf; ``True`` = frozen for :func:`freeze`).

Placement matters: anything after the freezing step (weight decay, a learning-rate schedule, a
``scale``) would move frozen elements again. So either

* chain :func:`freeze` *last*: ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr), freeze(mask))``, or
* wrap the optimizer: ``frozen(optimizer, freeze_mask=mask)`` (or ``train_mask=`` for the complement), which
  cannot be mis-placed and also drops the optimizer state of leaves that are frozen entirely (via
  ``optax.partition``). The names follow optax: ``optax.freeze`` is a plain transform,
  ``optax.transforms.selective_transform(opt, freeze_mask=)`` a wrapper.

Frozen updates are set to ``-0.0``, not ``+0.0``: ``p + (-0.0) == p`` bit for bit for every float
``p`` including ``-0.0``, while ``-0.0 + 0.0`` is ``+0.0``.

The mask is static data, like optax's masks: closed over, not part of the optimizer state, so its arrays
become constants of the compiled step. Compact masks (``(1, d_out)`` column flags, as
:func:`idesign.circuits.heads_mask` makes) keep those constants small; a mask passed in as a traced
argument also works (it freezes exactly, but ``frozen`` cannot then drop state for it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import masks as masks_lib
from idesign import tree as tree_lib

from idesign._types import Mask, PyTree


def _is_whole(leaf: Any) -> bool:
    """A mask leaf known (at trace time) to cover the whole parameter leaf one way or the other."""
    return isinstance(leaf, (bool, np.bool_)) or (not isinstance(leaf, jax.core.Tracer) and np.ndim(leaf) == 0)


def _zero_frozen(path: str, update: Any, frozen: Any) -> Any:
    if update is None or isinstance(update, optax.MaskedNode):
        return update
    if _is_whole(frozen):
        return jnp.full_like(update, -0.0) if bool(frozen) else update
    if not masks_lib.fits(np.shape(frozen), np.shape(update)):
        raise ValueError(f"mask leaf {path} has shape {tuple(np.shape(frozen))} but the update has shape "
                         f"{tuple(np.shape(update))}; masks must fit the parameters' shapes.")
    return jnp.where(frozen, jnp.asarray(-0.0, update.dtype), update)


def _apply_freeze(updates: PyTree, frozen: Mask) -> PyTree:
    is_leaf = lambda x: x is None or isinstance(x, optax.MaskedNode)
    return jax.tree_util.tree_map_with_path(
        lambda p, u, m: _zero_frozen(tree_lib.path_str(p), u, m), updates, frozen, is_leaf=is_leaf)


def _check_dtype(mask: Mask) -> None:
    for path, m in tree_lib.named_leaves(mask).items():
        if not isinstance(m, (bool, np.bool_)) and getattr(m, "dtype", None) != np.bool_:
            raise TypeError(f"mask leaf {path} has {getattr(m, 'dtype', type(m).__name__)}; masks must be "
                            "boolean (True = frozen). Use e.g. `scores > threshold` or `x.astype(bool)`.")


def freeze(mask: Mask) -> optax.GradientTransformation:
    """Sets the updates of the masked elements to zero; chain it *last* (after weight decay and the learning rate).

    Args:
      mask: an element mask with the parameters' structure, ``True`` where the parameter is frozen.

    Returns:
      A stateless ``optax.GradientTransformation`` (state ``optax.EmptyState``). ``init`` validates the
      mask against the parameters (:func:`idesign.masks.check`).

    >>> import numpy as np, jax.numpy as jnp, optax, idesign as ids
    >>> params = {'w': jnp.ones(3)}
    >>> opt = optax.chain(optax.adamw(0.1, weight_decay=0.5), ids.optim.freeze({'w': np.array([True, False, True])}))
    >>> updates, _ = opt.update({'w': jnp.ones(3)}, opt.init(params), params)
    >>> np.asarray(optax.apply_updates(params, updates)['w']).round(3)
    array([1.  , 0.85, 1.  ], dtype=float32)

    References:
      optax's leaf-level ``optax.freeze`` / ``optax.masked``, generalised to elements.
    """
    _check_dtype(mask)

    def init_fn(params: PyTree) -> optax.EmptyState:
        masks_lib.check(params, mask)
        return optax.EmptyState()

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        del params
        return _apply_freeze(updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


def _one_mask(freeze_mask: Mask | None, train_mask: Mask | None) -> Mask:
    """The freeze mask (``True`` = frozen) from exactly one of the two spellings."""
    if (freeze_mask is None) == (train_mask is None):
        raise TypeError("give exactly one of freeze_mask= (True = frozen) and train_mask= (True = trained); got "
                        f"{'both' if freeze_mask is not None else 'neither'}.")
    mask = freeze_mask if freeze_mask is not None else train_mask
    _check_dtype(mask)
    return mask if freeze_mask is not None else masks_lib.complement(mask)


class StaticMask:
    """A freeze mask carried in an optimizer state as static pytree data: no leaves (it costs no state memory,
    is not checkpointed, and never becomes a tracer); states compare it by identity, so a jitted step that
    returns the state it was given does not recompile."""

    __slots__ = ("mask",)

    def __init__(self, mask: Mask):
        self.mask = mask

    def __repr__(self) -> str:
        return "StaticMask(...)"


jax.tree_util.register_pytree_node(StaticMask, lambda s: ((), s), lambda s, _: s)


class FrozenState(NamedTuple):
    """State of :func:`frozen`: the wrapped optimizer's state, partitioned so that leaves frozen
    entirely hold none (``optax.MaskedNode`` in their place), and the freeze mask as static data.

    The mask is there so that a projection wrapped *around* ``frozen`` (``projected(optax.chain(frozen(...),
    ...), ...)``) finds it in the inner state and keeps the frozen elements at zero (see
    :func:`freeze_masks_in`)."""

    inner_state: Any
    freeze_mask: StaticMask


def freeze_masks_in(state: Any) -> list[Mask]:
    """The freeze masks of every :func:`frozen` wrapper whose state is inside ``state``."""
    found = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, FrozenState))
    return [s.freeze_mask.mask for s in found if isinstance(s, FrozenState)]


def _fully_frozen(leaf: Any) -> bool:
    if isinstance(leaf, jax.core.Tracer):
        return False  # a traced mask is not known at trace time: keep state, still freeze exactly
    return bool(np.all(np.asarray(leaf)))


def frozen(optimizer: optax.GradientTransformation, *, freeze_mask: Mask | None = None,
           train_mask: Mask | None = None) -> optax.GradientTransformationExtraArgs:
    """Wraps any optax optimizer so the masked elements (``True``) never change, and keep no state where possible.

    Per step: the frozen elements' gradients are zeroed, the optimizer runs on what remains, and the
    frozen elements' updates are set to zero at the very end — so their parameters stay bit-identical
    however the optimizer is composed (weight decay, schedules, clipping). Zeroing the gradients first
    makes frozen elements invisible to the optimizer, as ``requires_grad=False`` parameters are in
    PyTorch: ``clip_by_global_norm`` measures the trainable gradient only, and a leaf frozen entirely
    behaves exactly like one that is partly frozen. Leaves frozen entirely are partitioned out with
    ``optax.partition``, so the optimizer keeps no state for them (Adam: two fewer copies of the leaf).

    The updates equal those of ``optax.chain(freeze(mask), optimizer, freeze(mask))``, which holds
    state for every leaf.

    Args:
      optimizer: any ``optax.GradientTransformation`` (extra arguments are passed through).
      freeze_mask: element mask, ``True`` = frozen. Give exactly one of ``freeze_mask`` and ``train_mask``.
      train_mask: element mask, ``True`` = trained (everything else is frozen).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`FrozenState`. A projection inside
      ``optimizer`` (``projected``, or ``project_out`` chained) receives the mask as the extra argument
      ``freeze_mask=`` and keeps frozen elements at zero while it projects, so both guarantees hold; a
      ``projected`` (or ``observed``) around ``frozen`` finds the mask in the state.

    >>> import numpy as np, jax.numpy as jnp, optax, idesign as ids
    >>> params = {'embed': jnp.ones((4, 2)), 'w': jnp.ones(3)}
    >>> mask = {'embed': True, 'w': np.array([False, True, False])}
    >>> opt = ids.optim.frozen(optax.adamw(0.1), freeze_mask=mask)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> np.asarray(optax.apply_updates(params, updates)['w']).round(3)
    array([0.9, 1. , 0.9], dtype=float32)
    >>> ids.optim.opt_state_nbytes(state) < ids.optim.opt_state_nbytes(optax.adamw(0.1).init(params))
    True

    The complement, training only the masked elements:

    >>> sgd = ids.optim.frozen(optax.sgd(1.0), train_mask={'a': np.array([True, False]), 'b': False})
    >>> p = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> optax.apply_updates(p, sgd.update({'a': jnp.ones(2), 'b': jnp.ones(2)}, sgd.init(p))[0])
    {'a': Array([0., 1.], dtype=float32), 'b': Array([1., 1.], dtype=float32)}
    """
    mask = _one_mask(freeze_mask, train_mask)
    labels = jax.tree_util.tree_map(lambda m: "frozen" if _fully_frozen(m) else "train", mask)
    inner = optax.partition({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
    static_mask = StaticMask(mask)

    def init_fn(params: PyTree) -> FrozenState:
        masks_lib.check(params, mask)
        return FrozenState(inner.init(params), static_mask)

    def update_fn(updates: PyTree, state: FrozenState, params: PyTree | None = None, **extra_args):
        # a projection inside `optimizer` receives the mask (as `freeze_mask=`, with any from an enclosing
        # `frozen`) and projects onto the updates that keep the frozen elements at zero: re-freezing after a
        # plain projection would put components back inside the protected subspace
        outer = extra_args.pop("freeze_mask", None)
        combined = mask if outer is None else masks_lib.union(mask, outer)
        updates = _apply_freeze(updates, combined)
        updates, inner_state = inner.update(updates, state.inner_state, params, freeze_mask=combined, **extra_args)
        return _apply_freeze(updates, combined), FrozenState(inner_state, state.freeze_mask)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def opt_state_nbytes(opt_state: PyTree) -> int:
    """Bytes held by the arrays of an optimizer state (or any pytree of arrays or ``ShapeDtypeStruct``).

    >>> import jax.numpy as jnp, optax, idesign as ids
    >>> ids.optim.opt_state_nbytes(optax.adam(1e-3).init({'w': jnp.zeros(10)}))   # mu, nu and a step count
    84
    """
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "shape")))


def frozen_state_savings(optimizer: optax.GradientTransformation, params: PyTree, mask: Mask) -> dict[str, float]:
    """Optimizer-state memory of ``optimizer`` vs ``frozen(optimizer, freeze_mask=mask)``, from shapes only.

    Returns ``{'bytes_without': ..., 'bytes_with': ..., 'bytes_saved': ..., 'fraction_saved': ...}``;
    nothing is allocated (``jax.eval_shape``).

    >>> import jax.numpy as jnp, optax, idesign as ids
    >>> params = {'embed': jnp.zeros((100, 8)), 'w': jnp.zeros(8)}
    >>> ids.optim.frozen_state_savings(optax.adam(1e-3), params, {'embed': True, 'w': False})['bytes_saved']
    6400
    """
    without = opt_state_nbytes(jax.eval_shape(optimizer.init, params))
    with_ = opt_state_nbytes(jax.eval_shape(frozen(optimizer, freeze_mask=mask).init, params))
    return {"bytes_without": without, "bytes_with": with_, "bytes_saved": without - with_,
            "fraction_saved": (without - with_) / without if without else 0.0}
