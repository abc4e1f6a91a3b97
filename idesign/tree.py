"""Pytree paths: one readable dotted name per leaf, and selection by pattern.

Every idesign error about a parameter names it the same way, e.g.
``blocks.0.attn.q_proj.kernel``; selection by glob pattern over those names is how
users pick the parts of a model a transform applies to. Element masks (boolean pytrees with the
parameters' structure) select parts finer than a leaf: one head inside a fused kernel, a few neurons.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]


def key_str(key: Any) -> str:
    """Renders one pytree key (dict key, attribute, sequence index) as a path segment.

    >>> import jax
    >>> key_str(jax.tree_util.DictKey(0)), key_str(jax.tree_util.GetAttrKey('mu'))
    ('0', 'mu')
    """
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: KeyPath) -> str:
    """Dotted name of a key path, e.g. ``blocks.0.attn.q_proj.kernel``.

    >>> import jax.numpy as jnp
    >>> import idesign as ids
    >>> params = {'blocks': {0: {'kernel': jnp.ones(2)}}}
    >>> [ids.tree.path_str(p) for p, _ in ids.tree.leaves_with_paths(params)]
    ['blocks.0.kernel']
    """
    return ".".join(key_str(k) for k in path)


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[KeyPath, Any]]:
    """``(key_path, leaf)`` pairs in flattening order.

    >>> [path_str(p) for p, _ in leaves_with_paths({'a': [1, 2]})]
    ['a.0', 'a.1']
    """
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """``{dotted_path: leaf}`` for every leaf.

    >>> import jax.numpy as jnp, idesign as ids
    >>> sorted(ids.tree.named_leaves({'a': {'b': jnp.zeros(1)}, 'c': jnp.ones(2)}))
    ['a.b', 'c']
    """
    return {path_str(p): leaf for p, leaf in leaves_with_paths(tree)}


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree_map`` whose function also receives each leaf's dotted path first.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.tree.map_with_path(lambda p, x: p, {'w': jnp.ones(1)})
    {'w': 'w'}
    """
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def matches(path: str, patterns: str | Sequence[str]) -> bool:
    """Whether a dotted path matches any glob pattern (``*`` spans dots too).

    >>> matches('blocks.3.mlp.up.kernel', 'blocks.*.mlp.*.kernel')
    True
    >>> matches('blocks.3.mlp.up.bias', ['*.kernel', 'embed.*'])
    False
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def select(tree: PyTree, patterns: str | Sequence[str]) -> PyTree:
    """A boolean pytree: True for the leaves whose path matches a pattern.

    Raises if no leaf matches, since a silently empty selection is almost always a typo.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.tree.select({'mlp': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}}, '*.kernel')
    {'mlp': {'bias': False, 'kernel': True}}
    """
    mask = map_with_path(lambda p, _: matches(p, patterns), tree)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(
            f"no leaf matches {patterns!r}; paths in this tree are e.g. "
            f"{list(named_leaves(tree))[:8]}")
    return mask


def expand_patterns(patterns: Iterable[str], names: Sequence[str], *, what: str = "name") -> list[str]:
    """Expands glob patterns against a list of known names, keeping order and uniqueness.

    A pattern that matches nothing raises, suggesting the closest known names.

    >>> expand_patterns(['b.*.x'], ['b.0.x', 'b.1.x', 'b.0.y'])
    ['b.0.x', 'b.1.x']
    """
    out: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise KeyError(unknown_name_message(pattern, names, what=what))
        out.extend(h for h in hits if h not in out)
    return out


def unknown_name_message(name: str, names: Sequence[str], *, what: str) -> str:
    """An error message for an unknown name, with the closest known names.

    >>> unknown_name_message('resid_pots', ['resid_post', 'resid_pre'], what='site')[:58]
    "unknown site 'resid_pots'. Did you mean ['resid_post', 're"
    """
    import difflib
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known {what}s include {list(names)[:12]}{' ...' if len(names) > 12 else ''}."


# --- Element masks -------------------------------------------------------------------------------
#
# A *mask* has the structure of a parameter pytree. Each leaf is one of
#   * a bool array of the parameter leaf's shape (element granularity);
#   * a bool array of the same rank with size-1 axes that broadcasts to it, e.g. ``(1, d_out)`` for
#     whole columns of a ``[d_in, d_out]`` kernel, ``(d_in, 1)`` for whole rows;
#   * a Python ``bool`` (or a 0-d bool array) that stands for the whole leaf.
# Compact leaves keep masks of large models cheap: a mask of a few heads stores one row of flags per
# kernel it cuts into, not a copy of the kernel's shape. Masks are host-side data (numpy arrays from
# idesign's constructors); jax arrays are accepted too. ``True`` means selected.

Mask = PyTree


def _is_scalar_bool(leaf: Any) -> bool:
    return isinstance(leaf, (bool, np.bool_))


def _is_whole(leaf: Any) -> bool:
    return _is_scalar_bool(leaf) or np.ndim(leaf) == 0


def mask_fits(mask_shape: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether a mask leaf of ``mask_shape`` is valid for a parameter of ``shape``: ``()``, or the same rank
    with every axis equal or 1.

    >>> mask_fits((1, 4), (3, 4)), mask_fits((4,), (3, 4)), mask_fits((), (3, 4))
    (True, False, True)
    """
    mask_shape, shape = tuple(mask_shape), tuple(shape)
    return mask_shape == () or (len(mask_shape) == len(shape) and all(m in (1, s) for m, s in zip(mask_shape, shape)))


def _paths_differ_message(what: str, expected: Sequence[str], got: Sequence[str]) -> str:
    missing = [p for p in expected if p not in set(got)]
    extra = [p for p in got if p not in set(expected)]
    parts = ([f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else [])
    parts += ([f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}"] if extra else [])
    return f"{what} does not have the parameters' structure: " + "; ".join(parts)


def check_mask(params: PyTree, mask: Mask, *, what: str = "mask") -> None:
    """Validates a mask against parameters: same structure, bool leaves, shapes that fit (see :func:`mask_fits`).

    Raises:
      ValueError: naming the paths that are missing or unexpected, or a leaf whose shape is neither
        the parameter's shape nor ``()``.
      TypeError: naming the path of a leaf that is not boolean (a float or int array, say).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
    >>> ids.tree.check_mask(params, {'w': np.ones((2, 3), bool), 'b': False})
    >>> ids.tree.check_mask(params, {'w': np.ones((3, 2), bool), 'b': False})
    Traceback (most recent call last):
    ...
    ValueError: mask leaf w has shape (3, 2); expected the parameter's shape (2, 3) (or that shape with size-1 axes, which broadcast), or a bool for the whole leaf.
    """
    expected = named_leaves(params)
    got = named_leaves(mask)
    if list(expected) != list(got) or (jax.tree_util.tree_structure(params)
                                       != jax.tree_util.tree_structure(mask)):
        raise ValueError(_paths_differ_message(what, list(expected), list(got))
                         + (" (the paths agree: a container type or key type differs, e.g. int vs str keys)"
                            if list(expected) == list(got) else ""))
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
        if not mask_fits(shape, want):
            raise ValueError(
                f"{what} leaf {path} has shape {shape}; expected the parameter's shape {want} (or that shape "
                "with size-1 axes, which broadcast), or a bool for the whole leaf.")


def full_mask(params: PyTree, value: bool, *, dense: bool = False) -> Mask:
    """A mask selecting every element (``value=True``) or none (``False``).

    Leaves are Python bools (whole leaves); ``dense=True`` gives numpy bool arrays of each leaf's shape
    instead, ready for element-wise editing.

    >>> import jax.numpy as jnp, idesign as ids
    >>> params = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)}
    >>> ids.tree.full_mask(params, False)
    {'b': False, 'w': False}
    >>> ids.tree.full_mask(params, True, dense=True)['b']
    array([ True,  True])
    """
    if not _is_scalar_bool(value):
        raise TypeError(f"full_mask: value must be True or False; got {value!r}.")
    if dense:
        return jax.tree_util.tree_map(lambda p: np.full(np.shape(p), bool(value)), params)
    return jax.tree_util.tree_map(lambda _: bool(value), params)


def _combine(masks: Sequence[Mask], leaf_op: Callable[..., Any], what: str) -> Mask:
    if not masks:
        raise ValueError(f"{what} needs at least one mask.")
    first = masks[0]
    names = list(named_leaves(first))
    for m in masks[1:]:
        if jax.tree_util.tree_structure(m) != jax.tree_util.tree_structure(first):
            raise ValueError(_paths_differ_message(f"{what}: a mask", names, list(named_leaves(m))))
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


def mask_union(*masks: Mask) -> Mask:
    """Elements selected by any of the masks.

    >>> import numpy as np, idesign as ids
    >>> ids.tree.mask_union({'w': np.array([True, False])}, {'w': np.array([False, False])})
    {'w': array([ True, False])}
    """
    return _combine(masks, _union_leaf, "mask_union")


def mask_intersection(*masks: Mask) -> Mask:
    """Elements selected by every mask.

    >>> import numpy as np, idesign as ids
    >>> ids.tree.mask_intersection({'w': np.array([True, True])}, {'w': np.array([False, True])})
    {'w': array([False,  True])}
    """
    return _combine(masks, _intersection_leaf, "mask_intersection")


def mask_complement(mask: Mask) -> Mask:
    """Elements not selected by the mask.

    >>> import numpy as np, idesign as ids
    >>> ids.tree.mask_complement({'w': np.array([True, False]), 'b': True})
    {'b': False, 'w': array([False,  True])}
    """
    return jax.tree_util.tree_map(_complement_leaf, mask)


def mask_difference(mask: Mask, remove: Mask) -> Mask:
    """Elements selected by ``mask`` and not by ``remove``.

    >>> import numpy as np, idesign as ids
    >>> ids.tree.mask_difference({'w': True}, {'w': np.array([True, False])})
    {'w': array([False,  True])}
    """
    return _combine([mask, mask_complement(remove)], _intersection_leaf, "mask_difference")


class MaskReport(NamedTuple):
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


def mask_size_report(mask: Mask, params: PyTree | None = None) -> MaskReport:
    """Counts selected elements per layer and in total.

    ``params`` gives each leaf's size; it is required when the mask has whole-leaf ``bool`` leaves
    (array leaves of the parameter's full shape carry their own size).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'mlp': {'kernel': jnp.zeros((2, 4)), 'bias': jnp.zeros(4)}}
    >>> report = ids.tree.mask_size_report({'mlp': {'kernel': np.array([[True, False, False, True]]), 'bias': True}}, params)
    >>> report.layers, report.fraction
    ({'mlp': (8, 12)}, 0.6666666666666666)
    >>> print(report)
    layer    selected       total  fraction
    mlp             8          12    66.67%
    total           8          12    66.67%
    """
    if params is not None:
        check_mask(params, mask)
        sizes = {p: int(np.size(x)) if not hasattr(x, "size") else int(x.size)
                 for p, x in named_leaves(params).items()}
    layers: dict[str, tuple[int, int]] = {}
    for path, m in named_leaves(mask).items():
        if params is not None:
            size = sizes[path]
        elif _is_whole(m):
            raise ValueError(f"mask_size_report: leaf {path} is a whole-leaf bool; pass `params` "
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
    return MaskReport(layers, sum(s for s, _ in layers.values()), sum(t for _, t in layers.values()))


def random_mask(params: PyTree, count: int, *, seed: int, within: Mask | None = None) -> Mask:
    """``count`` elements chosen uniformly at random (among those of ``within``, if given).

    The control for a circuit mask: a random mask of the same size (``mask_size_report(m).selected``).

    >>> import jax.numpy as jnp, idesign as ids
    >>> m = ids.tree.random_mask({'w': jnp.zeros((4, 4)), 'b': jnp.zeros(4)}, 5, seed=0)
    >>> ids.tree.mask_size_report(m, {'w': jnp.zeros((4, 4)), 'b': jnp.zeros(4)}).selected
    5
    """
    within = full_mask(params, True) if within is None else within
    check_mask(params, within, what="within")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    allowed = [np.broadcast_to(np.asarray(m, bool), np.shape(p)).reshape(-1)
               for p, m in zip(leaves, treedef.flatten_up_to(within))]
    offsets = np.cumsum([0] + [a.size for a in allowed])
    eligible = np.flatnonzero(np.concatenate(allowed)) if allowed else np.zeros(0, np.int64)
    if not 0 <= count <= eligible.size:
        raise ValueError(f"random_mask: count={count}, but only {eligible.size} elements are eligible.")
    chosen = np.zeros(int(offsets[-1]), bool)
    chosen[np.random.default_rng(seed).choice(eligible, size=count, replace=False)] = True
    out = [chosen[offsets[i]:offsets[i + 1]].reshape(np.shape(p)) for i, p in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, [m if m.any() else False for m in out])
