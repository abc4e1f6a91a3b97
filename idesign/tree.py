"""Pytree paths: one readable dotted name per leaf, selection by pattern, structure comparison.

Every idesign error about a parameter names it the same way, e.g.
``blocks.0.attn.q_proj.kernel``; selection by glob pattern over those names is how
users pick the parts of a model a transform applies to. :func:`structure_diff` is the one message for
two trees whose paths differ, and :func:`resolve_kernels` the one resolution of a pattern to dense
kernels (with the tied unembedding's transposed layout). Element masks, finer than a leaf, are in
:mod:`idesign.masks`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from idesign._types import KeyPath, PyTree


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
    import re
    if re.match(r"blocks\.\d+\.", name) and any(re.match(r"blocks\.[^\d]", n) for n in names):
        # A per-layer name against stacked blocks (ids.models.stack_blocks): say how to get the per-layer layout.
        hint += (" params['blocks'] is stacked (ids.models.stack_blocks): per-layer tools take "
                 "ids.models.unstack_blocks(params).")
    return f"unknown {what} {name!r}.{hint} Known {what}s include {list(names)[:12]}{' ...' if len(names) > 12 else ''}."


def _paths(tree: PyTree | Sequence[str], is_leaf: Callable[[Any], bool] | None) -> list[str]:
    if isinstance(tree, (list, tuple)) and tree and all(isinstance(p, str) for p in tree):
        return list(tree)
    return [path_str(p) for p, _ in leaves_with_paths(tree, is_leaf=is_leaf)]


#: Path components that name an optimizer state: in structure messages its paths come after the parameters'.
OPTIMIZER_STATE_NAMES = frozenset({"opt_state", "optimizer_state", "optimizer"})


def parameters_first(paths: Sequence[str]) -> list[str]:
    """``paths`` with those under an optimizer state (a component in :data:`OPTIMIZER_STATE_NAMES`) last,
    each group in its given order: a mismatch message names the parameters, the likely cause, first
    (a dict state flattens in sorted key order, which would put ``opt_state`` before ``params``).

    >>> parameters_first(['opt_state.0.mu.w', 'params.w', 'step'])
    ['params.w', 'step', 'opt_state.0.mu.w']
    """
    return sorted(paths, key=in_optimizer_state)


def in_optimizer_state(path: str) -> bool:
    """Whether a dotted path lies under an optimizer state (a component in :data:`OPTIMIZER_STATE_NAMES`).

    >>> in_optimizer_state('opt_state.0.mu.w'), in_optimizer_state('params.optimizer_bias')
    (True, False)
    """
    return any(part in OPTIMIZER_STATE_NAMES for part in path.split("."))


def _listed(names: Sequence[str]) -> str:
    return f"{list(names[:6])}{' ...' if len(names) > 6 else ''}"


def structure_diff(expected: PyTree | Sequence[str], got: PyTree | Sequence[str], *, what: str = "tree",
                   against: str = "the parameters' structure",
                   is_leaf: Callable[[Any], bool] | None = None) -> str:
    """Why ``got`` does not have ``expected``'s structure, as one message; ``""`` when it does.

    Either argument may be a pytree or a list of dotted paths (when only paths are known, e.g. a
    checkpoint's). The message names the missing and unexpected paths (six of each at most); when the
    paths agree but the trees do not, it says whether the order or a container / key type differs.
    Callers raise it with their own exception type and may append a hint.

    >>> import jax.numpy as jnp
    >>> structure_diff({'w': 1, 'b': 2}, {'w': 1, 'b': 2})
    ''
    >>> structure_diff({'w': 1, 'b': 2}, {'w': 1, 'v': 2}, what='mask')
    "mask does not have the parameters' structure: missing ['b']; unexpected ['v']"
    >>> structure_diff({0: 1}, {'0': 1})
    "tree does not have the parameters' structure: the paths agree but a container or key type differs (e.g. int vs str keys)"
    """
    want, have = _paths(expected, is_leaf), _paths(got, is_leaf)
    head = f"{what} does not have {against}: "
    if want != have:
        missing = parameters_first([p for p in want if p not in set(have)])
        extra = parameters_first([p for p in have if p not in set(want)])
        parts = ([f"missing {_listed(missing)}"] if missing else []) + (
            [f"unexpected {_listed(extra)}"] if extra else [])
        return head + ("; ".join(parts) or "the same paths in a different order")
    both_trees = not any(isinstance(t, (list, tuple)) and t and all(isinstance(p, str) for p in t)
                         for t in (expected, got))
    if both_trees and (jax.tree_util.tree_structure(expected, is_leaf=is_leaf)
                       != jax.tree_util.tree_structure(got, is_leaf=is_leaf)):
        return head + "the paths agree but a container or key type differs (e.g. int vs str keys)"
    return ""


def _describe(leaf: Any) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{np.dtype(dtype)} array of shape {tuple(shape)}"
    return leaf if isinstance(leaf, str) else type(leaf).__name__  # a string leaf describes itself


def leaf_diff(expected: PyTree, got: PyTree, *, what: str = "tree") -> list[str]:
    """One line per leaf where ``got`` differs from ``expected`` (missing, unexpected, shape or dtype), each
    starting with the dotted path, in ``expected``'s order: the per-leaf companion of :func:`structure_diff`.

    Leaves are compared by their ``shape`` and ``dtype`` where both have them (arrays, ``jax.ShapeDtypeStruct``);
    a string leaf stands for a leaf described by that string.

    >>> leaf_diff({'a': np.zeros(2), 'b': np.zeros(1)}, {'a': np.zeros(3), 'c': 1.0}, what='x')
    ['a: shape mismatch: expected (2,), x has (3,)', 'b: missing from x (expected float64 array of shape (1,))', 'c: unexpected in x (float)']
    """
    want, have = named_leaves(expected), named_leaves(got)
    lines = []
    for name, e in want.items():
        if name not in have:
            lines.append(f"{name}: missing from {what} (expected {_describe(e)})")
            continue
        for attr in ("shape", "dtype"):
            a, b = getattr(e, attr, None), getattr(have[name], attr, None)
            if a is not None and b is not None and a != b:
                lines.append(f"{name}: {attr} mismatch: expected {a}, {what} has {b}")
                break
    return lines + [f"{name}: unexpected in {what} ({_describe(g)})" for name, g in have.items() if name not in want]


class Kernel(NamedTuple):
    """A dense kernel a pattern resolved to: its parameter ``path``, and whether it is ``transposed``
    (a tied unembedding's table, ``[d_out, d_in]`` instead of ``[d_in, d_out]``)."""

    path: str
    transposed: bool


def resolve_kernels(params: PyTree, patterns: str | Sequence[str], dense_layers: Mapping[str, str] | None = None, *,
                    layers_only: bool = False, tied: bool = True, ndim: int | None = None) -> dict[str, Kernel]:
    """Resolves glob patterns to the kernels they name: ``{name: Kernel(path, transposed)}``.

    A pattern names parameter paths (``blocks.*.mlp.up.kernel``; skipped with ``layers_only``) and, through
    ``dense_layers`` (``apply.dense_layers``, ``{site prefix: kernel path}``), dense layers
    (``blocks.*.mlp.up``, ``unembed``). A layer whose kernel path does not end in ``.kernel`` is a tied
    embedding table used in transposed layout. Keys are the names matched, in order; the same kernel may
    appear under its path and its layer name (dedupe the values when that matters).

    Args:
      params: the parameters the kernels must exist in.
      patterns: one glob pattern or several.
      dense_layers: ``{layer: kernel_path}``; ``None`` for parameter paths only.
      layers_only: match layer names only (curvature and pruning work per layer).
      tied: whether transposed (tied) kernels are accepted.
      ndim: the rank every resolved kernel must have, if given.

    Raises:
      KeyError: a pattern that names nothing, suggesting the closest names.
      ValueError: a layer whose kernel is not in ``params``, a refused tied kernel, or a wrong rank.

    >>> import jax.numpy as jnp
    >>> params = {'embed': {'embedding': jnp.zeros((5, 2))}, 'up': {'kernel': jnp.zeros((2, 3))}}
    >>> layers = {'up': 'up.kernel', 'unembed': 'embed.embedding'}
    >>> resolve_kernels(params, ['up', 'unembed'], layers)
    {'up': Kernel(path='up.kernel', transposed=False), 'unembed': Kernel(path='embed.embedding', transposed=True)}
    >>> list(resolve_kernels(params, '*.kernel'))
    ['up.kernel']
    """
    leaves = named_leaves(params)
    dense = dict(dense_layers or {})
    paths = [] if layers_only else list(leaves)
    what = "dense layer" if layers_only else "parameter path or dense layer"
    out: dict[str, Kernel] = {}
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        hits = {p: Kernel(p, False) for p in paths if matches(p, pattern)}
        hits.update({name: Kernel(k, not k.endswith(".kernel")) for name, k in dense.items() if matches(name, pattern)})
        if not hits:
            raise KeyError(unknown_name_message(pattern, paths + list(dense), what=what))
        out.update(hits)
    for name, kernel in out.items():
        if kernel.path not in leaves:
            raise ValueError(unknown_name_message(kernel.path, [p for p in leaves if p.endswith(".kernel")], what="kernel")
                             + f" (for layer {name!r})")
        if kernel.transposed and not tied:
            raise ValueError(f"dense layer {name!r} uses the tied parameter {kernel.path!r} (layout [d_out, d_in], "
                             "shared with the input embedding); only untied kernels are supported here.")
        if ndim is not None and np.ndim(leaves[kernel.path]) != ndim:
            raise ValueError(f"layer {name!r}: {kernel.path!r} has shape {np.shape(leaves[kernel.path])}; expected a "
                             f"{ndim}-D kernel.")
    return out


__all__ = ["key_str", "path_str", "leaves_with_paths", "named_leaves", "map_with_path", "matches", "select",
           "expand_patterns", "unknown_name_message", "structure_diff", "leaf_diff", "Kernel", "resolve_kernels"]
