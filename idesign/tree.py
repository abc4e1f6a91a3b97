"""Pytree paths: one readable dotted name per leaf, and selection by pattern.

Every idesign error about a parameter names it the same way, e.g.
``blocks.0.attn.q_proj.kernel``; selection by glob pattern over those names is how
users pick the parts of a model a transform applies to.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

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
