"""Input checks shared by the probe fitters.

Every message starts with the function that raised it and names the argument, the numbers
involved and what was expected. Checks that need the values (non-finite activations, classes
present) run only on concrete arrays; under ``jax.jit`` tracing they are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idesign._types import Array
from idesign.distributed import to_host

_SHOWN = 10  # how many offending rows a message lists


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def float_array(x: Any, *, fn: str, name: str) -> np.ndarray | Array:
    """``x`` as a floating array: float32/float64 kept, other numbers cast to float32.

    jax arrays stay on their device; anything else becomes a numpy array (checked on the host,
    moved to the device once, by the jitted fit).
    """
    if not isinstance(x, jax.Array):
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{fn}: {name} must be an array of numbers, got {type(x).__name__} ({e}).") from None
    dtype = x.dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)
            or dtype == jnp.bfloat16):
        raise TypeError(f"{fn}: {name} must hold numbers, got dtype {dtype}.")
    if dtype in (np.float32, np.float64):
        return x
    return x.astype(np.float32) if isinstance(x, np.ndarray) else x.astype(jnp.float32)


@jax.jit
def _nonfinite_count(x: Array) -> Array:
    return jnp.sum(~jnp.isfinite(x))


def check_ndim(x: Any, ndim: int | Sequence[int], *, fn: str, name: str, layout: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if np.ndim(x) not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        raise ValueError(f"{fn}: {name} must be {layout} ({want}), got shape {tuple(np.shape(x))}.")


def check_finite(x: Array, *, fn: str, name: str, axes: Sequence[str]) -> None:
    """Raises if ``x`` holds NaN or inf, saying how many and in which rows.

    ``axes`` names the leading axes that index rows (e.g. ``("row",)`` or ``("layer", "row")``);
    the remaining trailing axes are features.
    """
    if not is_concrete(x):
        return
    if isinstance(x, jax.Array):
        if int(_nonfinite_count(x)) == 0:
            return
        x = to_host(x)
    bad = ~np.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    lead = len(axes)
    per_row = bad.reshape(x.shape[:lead] + (-1,)).any(-1)
    where = np.argwhere(per_row)
    n_nan = int(np.isnan(x).sum())
    shown = ", ".join(_position(w, axes) for w in where[:_SHOWN])
    more = f" (first {_SHOWN} of {len(where)} shown)" if len(where) > _SHOWN else ""
    raise ValueError(
        f"{fn}: {name} contain {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} inf) in "
        f"{len(where)} {axes[-1]}s: {shown}{more}.")


def _position(index: np.ndarray, axes: Sequence[str]) -> str:
    if len(axes) == 1:
        return str(int(index[0]))
    return "(" + ", ".join(f"{a} {int(i)}" for a, i in zip(axes, index)) + ")"


def sequence_inputs(acts: Any, mask: Any, *, fn: str, position: str) -> tuple[Array, Array]:
    """Checked ``[B, T, D]`` activations (floating, finite) and a ``[B, T]`` bool mask (``None``: all set),
    as device arrays; ``position`` names the T axis in messages ("token", "position")."""
    x = float_array(acts, fn=fn, name="activations")
    check_ndim(x, 3, fn=fn, name="activations", layout=f"[B, T, D] (sequences, {position}s, features)")
    check_finite(x, fn=fn, name="activations", axes=("sequence", position))
    B, T, _ = x.shape
    m = jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask, bool)
    if m.shape != (B, T):
        raise ValueError(f"{fn}: mask must have shape {(B, T)} (one flag per {position}), got {tuple(m.shape)}.")
    return jnp.asarray(x), m


def check_rows(n_labels: int, n_rows: int, *, fn: str, name: str, what: str = "rows") -> None:
    if n_labels != n_rows:
        raise ValueError(f"{fn}: {name} has {n_labels} entries but the activations have {n_rows} {what}; "
                         "they must match one to one.")


def class_labels(labels: Any, *, fn: str, name: str = "labels", n_classes: int | None = None,
                 binary: bool = False, target: str = "") -> tuple[np.ndarray | Array, int]:
    """Integer class labels ``0..K-1`` as int32, and ``K``; checks that at least two classes occur.

    Booleans and integral floats are accepted. ``binary`` requires ``{0, 1}``.
    """
    dtype = getattr(labels, "dtype", None) or np.asarray(labels).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
            or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{fn}: {name}{target} must hold integer class ids, got dtype {dtype}.")
    if not is_concrete(labels):
        return jnp.asarray(labels).astype(jnp.int32), (2 if binary else int(n_classes or 2))
    values = to_host(labels)   # labels may be a global array spread over several processes
    if jnp.issubdtype(dtype, jnp.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ValueError(f"{fn}: {name}{target} must be integer class ids; got non-integral or non-finite values.")
    values = values.astype(np.int64)
    present = np.unique(values)
    if binary:
        if not set(present.tolist()) <= {0, 1}:
            raise ValueError(f"{fn}: binary {name}{target} must be 0 or 1 (or bool); got values "
                             f"{present[:_SHOWN].tolist()}. Use the softmax probe for more classes.")
        k = 2
    else:
        if present.size and present[0] < 0:
            raise ValueError(f"{fn}: {name}{target} must be class ids 0..K-1; got negative value {present[0]}.")
        k = int(n_classes) if n_classes is not None else int(present[-1]) + 1 if present.size else 0
        if present.size and present[-1] >= k:
            raise ValueError(f"{fn}: {name}{target} has class id {present[-1]} but n_classes={k}.")
    if present.size < 2:
        only = present.tolist()
        raise ValueError(f"{fn}: {name}{target} contain a single class {only}; a probe needs examples of at "
                         "least two classes (and AUC is undefined with one).")
    return values.astype(np.int32), k


def sample_weights(weights: Any, n_rows: int, *, fn: str, name: str = "sample_weight",
                   shape: tuple[int, ...] | None = None) -> np.ndarray | Array:
    """Non-negative finite weights of shape ``shape`` (default ``(n_rows,)``) with a positive sum."""
    w = float_array(weights, fn=fn, name=name)
    shape = (n_rows,) if shape is None else shape
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {shape} (one weight per row), got {tuple(w.shape)}.")
    if is_concrete(w):
        host = to_host(w)
        if not np.all(np.isfinite(host)) or np.any(host < 0):
            bad = np.argwhere(~np.isfinite(host) | (host < 0))[:_SHOWN].tolist()
            raise ValueError(f"{fn}: {name} must be finite and non-negative; bad entries at {bad}.")
        if host.size == 0 or np.any(host.reshape(-1, n_rows).sum(-1) <= 0):
            raise ValueError(f"{fn}: {name} sum to zero; nothing to fit.")
    return w


def class_weight_vector(class_weight: Any, n_classes: int, *, fn: str) -> tuple[Array | None, bool]:
    """``(weights [K] or None, balanced)`` from ``None``, ``"balanced"``, a dict or a sequence."""
    if class_weight is None:
        return None, False
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"{fn}: class_weight must be None, 'balanced', a dict or a sequence; got {class_weight!r}.")
        return None, True
    if isinstance(class_weight, Mapping):
        unknown = [k for k in class_weight if not (0 <= int(k) < n_classes)]
        if unknown:
            raise ValueError(f"{fn}: class_weight has keys {unknown} outside the classes 0..{n_classes - 1}.")
        vec = np.ones(n_classes, np.float32)
        for k, v in class_weight.items():
            vec[int(k)] = float(v)
    else:
        vec = np.asarray(class_weight, np.float32)
        if vec.shape != (n_classes,):
            raise ValueError(f"{fn}: class_weight must have one weight per class ({n_classes}), got shape {vec.shape}.")
    if not np.all(np.isfinite(vec)) or np.any(vec < 0):
        raise ValueError(f"{fn}: class_weight must be finite and non-negative, got {vec.tolist()}.")
    return vec, False
