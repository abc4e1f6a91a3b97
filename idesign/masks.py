"""Element masks: boolean pytrees with the parameters' structure, and their algebra.

A *mask* has the structure of a parameter pytree. Each leaf is one of

* a bool array of the parameter leaf's shape (element granularity);
* a bool array of the same rank with size-1 axes that broadcasts to it, e.g. ``(1, d_out)`` for
  whole columns of a ``[d_in, d_out]`` kernel, ``(d_in, 1)`` for whole rows;
* a Python ``bool`` (or a 0-d bool array) that stands for the whole leaf.

Compact leaves keep masks of large models cheap: a mask of a few heads stores one row of flags per
kernel it cuts into, not a copy of the kernel's shape (jit embeds closed-over masks as constants).
Masks are host-side data (numpy arrays from idesign's constructors); jax arrays are accepted too.
``True`` means selected. Users write ``ids.masks.union(a, b)``, ``ids.masks.check(params, m)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign._treescope import MaskView, mask_view as view  # display: frozen fraction per leaf (treescope or repr)
from idesign._types import Mask, PyTree
from idesign.tree import named_leaves, structure_diff


def _is_scalar_bool(leaf: Any) -> bool:
    return isinstance(leaf, (bool, np.bool_))


def _is_whole(leaf: Any) -> bool:
    return _is_scalar_bool(leaf) or np.ndim(leaf) == 0


def fits(mask_shape: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether a mask leaf of ``mask_shape`` is valid for a parameter of ``shape``: ``()``, or the same rank
    with every axis equal or 1.

    >>> fits((1, 4), (3, 4)), fits((4,), (3, 4)), fits((), (3, 4))
    (True, False, True)
    """
    mask_shape, shape = tuple(mask_shape), tuple(shape)
    return mask_shape == () or (len(mask_shape) == len(shape) and all(m in (1, s) for m, s in zip(mask_shape, shape)))


def check(params: PyTree, mask: Mask, *, what: str = "mask") -> None:
    """Validates a mask against parameters: same structure, bool leaves, shapes that fit (see :func:`fits`).

    Raises:
      ValueError: naming the paths that are missing or unexpected, or a leaf whose shape is neither
        the parameter's shape nor ``()``.
      TypeError: naming the path of a leaf that is not boolean (a float or int array, say).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
    >>> ids.masks.check(params, {'w': np.ones((2, 3), bool), 'b': False})
    >>> ids.masks.check(params, {'w': np.ones((3, 2), bool), 'b': False})
    Traceback (most recent call last):
    ...
    ValueError: mask leaf w has shape (3, 2); expected the parameter's shape (2, 3) (or that shape with size-1 axes, which broadcast), or a bool for the whole leaf.
    """
    problem = structure_diff(params, mask, what=what)
    if problem:
        raise ValueError(problem)
    expected = named_leaves(params)
    got = named_leaves(mask)
    for path, m in got.items():
        if _is_scalar_bool(m):
            continue
        dtype = getattr(m, "dtype", None)
        if dtype is None or dtype != np.bool_:
            kind = f"dtype {dtype}" if dtype is not None else f"type {type(m).__name__}"
            raise TypeError(
                f"{what} leaf {path} has {kind}; masks must be boolean (True = selected). "
                "Convert scores with a comparison, e.g. `scores > threshold`, or `x.astype(bool)`.")
        shape, want = tuple(np.shape(m)), tuple(np.shape(expected[path]))
        if not fits(shape, want):
            raise ValueError(
                f"{what} leaf {path} has shape {shape}; expected the parameter's shape {want} (or that shape "
                "with size-1 axes, which broadcast), or a bool for the whole leaf.")


def full(params: PyTree, value: bool, *, dense: bool = False) -> Mask:
    """A mask selecting every element (``value=True``) or none (``False``).

    Leaves are Python bools (whole leaves); ``dense=True`` gives numpy bool arrays of each leaf's shape
    instead, ready for element-wise editing.

    >>> import jax.numpy as jnp, idesign as ids
    >>> params = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)}
    >>> ids.masks.full(params, False)
    {'b': False, 'w': False}
    >>> ids.masks.full(params, True, dense=True)['b']
    array([ True,  True])
    """
    if not _is_scalar_bool(value):
        raise TypeError(f"masks.full: value must be True or False; got {value!r}.")
    if dense:
        return jax.tree_util.tree_map(lambda p: np.full(np.shape(p), bool(value)), params)
    return jax.tree_util.tree_map(lambda _: bool(value), params)


def _combine(masks: Sequence[Mask], leaf_op: Callable[..., Any], what: str) -> Mask:
    if not masks:
        raise ValueError(f"{what} needs at least one mask.")
    for m in masks[1:]:
        problem = structure_diff(masks[0], m, what=f"{what}: a mask", against="the first mask's structure")
        if problem:
            raise ValueError(problem)
    return jax.tree_util.tree_map(leaf_op, *masks)


def _xp(*leaves: Any):
    return jnp if any(isinstance(x, jax.Array) for x in leaves) else np


def _combine_leaves(leaves: tuple[Any, ...], absorbing: bool) -> Any:
    """OR (``absorbing=True``) or AND (``absorbing=False``) of mask leaves; a scalar bool equal to
    ``absorbing`` decides the result, the other scalar is the identity."""
    if any(_is_scalar_bool(x) and bool(x) == absorbing for x in leaves):
        return absorbing
    arrays = [x for x in leaves if not _is_scalar_bool(x)]
    if not arrays:
        return not absorbing
    xp = _xp(*arrays)
    op = xp.logical_or if absorbing else xp.logical_and
    out = arrays[0]
    for x in arrays[1:]:
        out = op(out, x)
    return xp.asarray(out, bool)


def _union_leaf(*leaves: Any) -> Any:
    return _combine_leaves(leaves, absorbing=True)


def _intersection_leaf(*leaves: Any) -> Any:
    return _combine_leaves(leaves, absorbing=False)


def _complement_leaf(x: Any) -> Any:
    return (not x) if _is_scalar_bool(x) else _xp(x).logical_not(x)


def union(*masks: Mask) -> Mask:
    """Elements selected by any of the masks.

    >>> import numpy as np, idesign as ids
    >>> ids.masks.union({'w': np.array([True, False])}, {'w': np.array([False, False])})
    {'w': array([ True, False])}
    """
    return _combine(masks, _union_leaf, "masks.union")


def intersection(*masks: Mask) -> Mask:
    """Elements selected by every mask.

    >>> import numpy as np, idesign as ids
    >>> ids.masks.intersection({'w': np.array([True, True])}, {'w': np.array([False, True])})
    {'w': array([False,  True])}
    """
    return _combine(masks, _intersection_leaf, "masks.intersection")


def complement(mask: Mask) -> Mask:
    """Elements not selected by the mask.

    >>> import numpy as np, idesign as ids
    >>> ids.masks.complement({'w': np.array([True, False]), 'b': True})
    {'b': False, 'w': array([False,  True])}
    """
    return jax.tree_util.tree_map(_complement_leaf, mask)


def difference(mask: Mask, remove: Mask) -> Mask:
    """Elements selected by ``mask`` and not by ``remove``.

    >>> import numpy as np, idesign as ids
    >>> ids.masks.difference({'w': True}, {'w': np.array([True, False])})
    {'w': array([False,  True])}
    """
    return _combine([mask, complement(remove)], _intersection_leaf, "masks.difference")


class SizeReport(NamedTuple):
    """Selected elements per layer (a parameter path without its last segment, e.g. ``blocks.0.attn.q_proj``).

    ``layers`` maps each layer to ``(selected, total)``; ``str(report)`` renders a table.
    """

    layers: dict[str, tuple[int, int]]
    selected: int
    total: int

    @property
    def fraction(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def fractions(self) -> dict[str, float]:
        """``{layer: selected / total}``."""
        return {k: (s / t if t else 0.0) for k, (s, t) in self.layers.items()}

    def __str__(self) -> str:
        rows = [(k, s, t) for k, (s, t) in self.layers.items()] + [("total", self.selected, self.total)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'layer':<{width}}  {'selected':>10}  {'total':>10}  {'fraction':>8}"]
        for name, s, t in rows:
            lines.append(f"{name:<{width}}  {s:>10,}  {t:>10,}  {(s / t if t else 0.0):>8.2%}")
        return "\n".join(lines)


def size_report(mask: Mask, params: PyTree | None = None) -> SizeReport:
    """Counts selected elements per layer and in total.

    ``params`` gives each leaf's size; it is required when the mask has whole-leaf ``bool`` leaves
    (array leaves of the parameter's full shape carry their own size).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'mlp': {'kernel': jnp.zeros((2, 4)), 'bias': jnp.zeros(4)}}
    >>> report = ids.masks.size_report({'mlp': {'kernel': np.array([[True, False, False, True]]), 'bias': True}}, params)
    >>> report.layers, report.fraction
    ({'mlp': (8, 12)}, 0.6666666666666666)
    >>> print(report)
    layer    selected       total  fraction
    mlp             8          12    66.67%
    total           8          12    66.67%
    """
    if params is not None:
        check(params, mask)
        sizes = {p: int(np.size(x)) if not hasattr(x, "size") else int(x.size)
                 for p, x in named_leaves(params).items()}
    layers: dict[str, tuple[int, int]] = {}
    for path, m in named_leaves(mask).items():
        if params is not None:
            size = sizes[path]
        elif _is_whole(m):
            raise ValueError(f"masks.size_report: leaf {path} is a whole-leaf bool; pass `params` "
                             "so its size is known.")
        else:
            size = int(np.size(m))
        if _is_whole(m):
            selected = size if bool(m) else 0
        elif np.size(m):
            # A compact leaf's flags each stand for size / m.size elements (its broadcast copies).
            selected = int(np.count_nonzero(np.asarray(m))) * (size // int(np.size(m)))
        else:
            selected = 0
        layer = path.rsplit(".", 1)[0] if "." in path else path
        s, t = layers.get(layer, (0, 0))
        layers[layer] = (s + selected, t + size)
    return SizeReport(layers, sum(s for s, _ in layers.values()), sum(t for _, t in layers.values()))


def random(params: PyTree, count: int, *, seed: int, within: Mask | None = None) -> Mask:
    """``count`` elements chosen uniformly at random (among those of ``within``, if given).

    The control for a circuit mask: a random mask of the same size (``size_report(m).selected``).

    >>> import jax.numpy as jnp, idesign as ids
    >>> m = ids.masks.random({'w': jnp.zeros((4, 4)), 'b': jnp.zeros(4)}, 5, seed=0)
    >>> ids.masks.size_report(m, {'w': jnp.zeros((4, 4)), 'b': jnp.zeros(4)}).selected
    5
    """
    within = full(params, True) if within is None else within
    check(params, within, what="within")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    allowed = [np.broadcast_to(np.asarray(m, bool), np.shape(p)).reshape(-1)
               for p, m in zip(leaves, treedef.flatten_up_to(within))]
    offsets = np.cumsum([0] + [a.size for a in allowed])
    eligible = np.flatnonzero(np.concatenate(allowed)) if allowed else np.zeros(0, np.int64)
    if not 0 <= count <= eligible.size:
        raise ValueError(f"masks.random: count={count}, but only {eligible.size} elements are eligible.")
    chosen = np.zeros(int(offsets[-1]), bool)
    chosen[np.random.default_rng(seed).choice(eligible, size=count, replace=False)] = True
    out = [chosen[offsets[i]:offsets[i + 1]].reshape(np.shape(p)) for i, p in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, [m if m.any() else False for m in out])


__all__ = ["Mask", "fits", "check", "full", "union", "intersection", "complement", "difference", "SizeReport",
           "size_report", "random", "MaskView", "view"]
