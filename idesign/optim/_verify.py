"""Measured leaks: how much a training run moved what it promised not to move.

``verify_frozen`` reads the change on frozen elements, ``verify_projected`` the part of each change that
lies inside the protected subspaces. Both return the measured number, never a pass/fail, so a study can
report it beside its results (METHODS.md §8: the shortcut an arm could take is measured).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import masks as masks_lib
from idesign import tree as tree_lib
from idesign._types import PyTree
from idesign.optim import projection


class Leak(NamedTuple):
    """``max_abs``: the largest absolute leaked entry; ``norm``: the leaked part's global L2 norm;
    ``relative``: ``norm`` over the norm of the whole change (0 when nothing changed); ``by_path``: per-leaf ``max_abs``."""

    max_abs: float
    norm: float
    relative: float
    by_path: dict[str, float]


def _same_structure(before: PyTree, after: PyTree, what: str) -> None:
    sb, sa = jax.tree_util.tree_structure(before), jax.tree_util.tree_structure(after)
    if sb != sa:
        raise ValueError(f"{what}: `before` and `after` must have the same tree structure; got {sb} and {sa}. "
                         "Pass the parameters saved before training and the trained parameters of the same model.")
    for (p, b), a in zip(tree_lib.leaves_with_paths(before), jax.tree_util.tree_leaves(after)):
        if jnp.shape(b) != jnp.shape(a):
            raise ValueError(f"{what}: leaf {tree_lib.path_str(p)} has shape {jnp.shape(b)} before and {jnp.shape(a)} "
                             "after; pass the same model's parameters twice.")


def _leak(parts: list[tuple[str, np.ndarray, np.ndarray]]) -> Leak:
    by_path = {path: float(np.max(np.abs(leak))) if leak.size else 0.0 for path, leak, _ in parts}
    norm = float(np.sqrt(sum(float(np.sum(leak.astype(np.float64) ** 2)) for _, leak, _ in parts)))
    total = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for _, _, d in parts)))
    return Leak(max(by_path.values(), default=0.0), norm, norm / total if total > 0 else 0.0, by_path)


def verify_frozen(before: PyTree, after: PyTree, mask: PyTree) -> Leak:
    """The change on frozen elements (``mask`` True) between two parameter trees.

    Args:
      before: parameters before training.
      after: parameters after training (same structure and shapes).
      mask: an element mask, ``True`` where frozen (the mask given to :func:`idesign.optim.freeze`).

    Returns:
      A :class:`Leak`; exactly frozen training gives ``max_abs == 0.0``.

    Raises:
      ValueError: mismatched structures or shapes, naming the leaf path.

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> leak = ids.optim.verify_frozen({'w': jnp.zeros(3)}, {'w': jnp.array([0.0, 2.0, 0.5])},
    ...                                {'w': np.array([True, False, True])})
    >>> leak.max_abs, leak.by_path
    (0.5, {'w': 0.5})
    """
    _same_structure(before, after, "verify_frozen")
    masks_lib.check(before, mask)
    masks = jax.tree_util.tree_leaves(mask)
    parts = []
    for (p, b), a, m in zip(tree_lib.leaves_with_paths(before), jax.tree_util.tree_leaves(after), masks):
        d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        parts.append((tree_lib.path_str(p), np.where(np.broadcast_to(np.asarray(m, bool), d.shape), d, 0.0), d))
    return _leak(parts)


def verify_projected(before: PyTree, after: PyTree, subspaces: PyTree) -> Leak:
    """The part of the change ``after - before`` that lies inside each leaf's protected subspace.

    Args:
      before, after: parameter trees of the same structure.
      subspaces: the subspace tree given to :func:`idesign.optim.projected` / ``project_out``.

    Returns:
      A :class:`Leak`; training that projected every update out of the subspaces gives ``max_abs`` at
      float rounding level (optimizer updates are projected, so nothing inside accumulates).

    >>> import jax.numpy as jnp, idesign as ids
    >>> s = {'w': ids.subspaces.Subspace(jnp.eye(2)[:1])}
    >>> ids.optim.verify_projected({'w': jnp.zeros((2, 2))}, {'w': jnp.array([[0.0, 3.0], [1.0, 1.0]])}, s).max_abs
    3.0
    """
    _same_structure(before, after, "verify_projected")
    projection.check_subspaces(subspaces, before)
    delta = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32), after, before)
    inside = projection.apply_projection(delta, subspaces, onto=True, others="zero")
    parts = [(tree_lib.path_str(p), np.asarray(i), np.asarray(d)) for (p, d), i in
             zip(tree_lib.leaves_with_paths(delta), jax.tree_util.tree_leaves(inside))]
    return _leak(parts)
