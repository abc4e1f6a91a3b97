"""Type aliases shared by every module (one definition, imported where used).

They document intent in signatures; none is checked at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

PyTree = Any
"""Any JAX pytree (nested dicts, lists, tuples, registered classes) of arrays."""

Array = jax.Array

Params = Any
"""A parameter pytree: plain nested dicts of arrays for idesign models (see ``NOTES.md``)."""

Mask = Any
"""A boolean pytree with the parameters' structure (see :mod:`idesign.masks`)."""

Batch = Mapping[str, Any]
"""A batch: ``{"tokens": [B, T], ...}``."""

KeyPath = tuple[Any, ...]
"""A pytree key path, as ``jax.tree_util.tree_flatten_with_path`` returns it."""

__all__ = ["PyTree", "Array", "Params", "Mask", "Batch", "KeyPath"]
