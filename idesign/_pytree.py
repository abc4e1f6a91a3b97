"""The one pattern for pytree classes in idesign (interventions, subspaces, concepts, training hooks, monitors).

Equinox's model, in a few lines: a class is a frozen dataclass; its fields are pytree children unless
declared :func:`static` (then they are part of the tree structure: hashable, compared at trace time, a new
value recompiles). Validation lives in ``__post_init__``, which runs when the user *constructs* an object
and never when JAX *unflattens* one: unflattening fills the fields directly, because JAX rebuilds objects
with tracers, ``None`` or other placeholders as leaves, which a check must not see.

>>> import jax, jax.numpy as jnp
>>> @pytree_class
... class Scaled:
...     x: jax.Array
...     name: str = static(default="s")
...     def __post_init__(self):
...         if jnp.ndim(self.x) != 1:
...             raise ValueError("x must be 1-D")
>>> s = Scaled(jnp.ones(2))
>>> jax.tree_util.tree_leaves(s), jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(Scaled(jnp.zeros(2)))
([Array([1., 1.], dtype=float32)], True)
>>> jax.jit(lambda s: s.x * 2)(s)
Array([2., 2.], dtype=float32)
>>> jax.tree_util.tree_map(lambda _: object(), s).name   # placeholders: no check at unflatten
's'
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T", bound=type)


class _Items(tuple):
    """A static dict field as hashable aux data (its items, in order); unflattening rebuilds the dict."""


def static(**kwargs: Any) -> Any:
    """A dataclass field that is static pytree metadata (part of the structure, not a leaf).

    Static values must be hashable (a ``dict`` of hashable values is accepted: it travels as its items).
    """
    metadata = dict(kwargs.pop("metadata", None) or {}, static=True)
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_class(cls: T | None = None, *, eq: bool = False, repr: bool = True) -> Any:  # noqa: A002
    """Makes ``cls`` a frozen dataclass registered as a pytree (keys are attribute names).

    ``eq=False`` (the default) keeps identity equality and hashing, which arrays need; pass ``eq=True``
    for classes whose fields are all static or comparable. A ``__repr__`` defined on the class is kept.
    """
    if cls is None:
        return lambda c: pytree_class(c, eq=eq, repr=repr)
    cls = dataclasses.dataclass(frozen=True, eq=eq, repr=repr)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))

    def aux(obj: Any) -> tuple:
        return tuple(_Items(v.items()) if isinstance(v, dict) else v for v in (getattr(obj, n) for n in meta))

    def flatten_with_keys(obj: Any):
        return [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data], aux(obj)

    def flatten(obj: Any):
        return [getattr(obj, n) for n in data], aux(obj)

    def unflatten(aux: tuple, children: Any) -> Any:
        obj = object.__new__(cls)  # not __init__: no __post_init__ check on tracers / placeholders
        for n, v in zip(data, children):
            object.__setattr__(obj, n, v)
        for n, v in zip(meta, aux):
            object.__setattr__(obj, n, dict(v) if isinstance(v, _Items) else v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


@pytree_class(eq=True)
class Static:
    """A value (a function, say) held as static data inside a pytree field that also holds arrays; calling
    it calls the value. Equal (and hashed) by the value, so the same function never recompiles.

    >>> f = Static(len)
    >>> f([1, 2]), jax.tree_util.tree_leaves({'a': f}), Static(len) == f
    (2, [], True)
    """

    value: Any = static()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value(*args, **kwargs)


__all__ = ["pytree_class", "static", "Static"]
