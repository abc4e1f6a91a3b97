"""What an activation store records about how it was written, and the check that a reader or a resumed writer
matches it: the model's identity (type, config, site names, parameter shapes and sampled values), the options
(positions, hooks, dtype) and the sites. Split from :mod:`idesign.activation_store`, which re-exports the public
names (``StoreMismatchError``, ``model_identity``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idesign import tree as tree_lib
from idesign.activations import FunctionalModel
from idesign.hooks import merge_hooks


class StoreMismatchError(ValueError):
    """A store was opened or resumed with another model, other sites or other options than it was written with.

    A ``ValueError``, so code that catches bad input in general catches it too; the message names what differs.

    >>> import tempfile, numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> path = tempfile.mkdtemp()
    >>> _ = ids.activation_store.write_store(path, apply, params, {'tokens': np.ones((4, 3), np.int32)}, 'embed',
    ...                                      batch_size=2, progress=False)
    >>> try:
    ...     ids.activation_store.open_store(path, sites=['blocks.0.resid_post'])
    ... except ids.activation_store.StoreMismatchError as e:
    ...     print(str(e).split(' (')[0].split('holds ')[1])
    sites ['embed'], not the requested ['blocks.0.resid_post']
    """


# ----------------------------------------------------------------------------------------------------------------
# .npy files written batch by batch.

def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _digest(x: Any) -> str:
    data = x if isinstance(x, bytes) else json.dumps(x, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@jax.jit
def _param_sample(params: Any) -> Any:
    # Eight values spread over each leaf: tells checkpoints of one architecture apart without reading them whole.
    def sample(leaf):
        flat = jnp.ravel(leaf)
        return flat[np.linspace(0, flat.size - 1, min(8, flat.size)).astype(np.int32)].astype(jnp.float32)
    return jax.tree_util.tree_map(sample, params)


def model_identity(apply: FunctionalModel, params: Any, model_id: str | None = None) -> dict[str, Any]:
    """What a store records about the model that wrote it: type, config, site names, parameter shapes and samples.

    Args:
      apply: the functional model.
      params: its parameters.
      model_id: an optional name (a hub id and revision, a checkpoint step) recorded and compared as well.

    Returns:
      ``{"id": digest, "type", "config", "sites", "params", "param_values", "model_id"}`` (JSON-able).

    >>> import idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> ident = model_identity(apply, params)
    >>> ident['config']['d_model'], len(ident['id'])
    (8, 16)
    """
    leaves = tree_lib.named_leaves(params)
    shapes = {path: [list(np.shape(v)), str(getattr(v, "dtype", np.asarray(v).dtype))] for path, v in leaves.items()}
    sample = jax.device_get(_param_sample(params))
    values = b"".join(np.asarray(v).tobytes() for _, v in sorted(tree_lib.named_leaves(sample).items()))
    config = getattr(apply, "config", None)
    desc = {"type": f"{type(apply).__module__}.{type(apply).__qualname__}",
            "config": _jsonable(config) if config is not None else None,
            "sites": _digest(list(apply.site_names)), "params": _digest(shapes), "param_values": _digest(values),
            "model_id": model_id}
    return {"id": _digest(desc), **desc}


def _positions_desc(positions: Any) -> Any:
    if positions is None or isinstance(positions, str):
        return positions
    if callable(positions):
        return f"function {getattr(positions, '__module__', '?')}.{getattr(positions, '__qualname__', '?')}"
    array = np.asarray(positions)
    return f"array {array.dtype}{list(array.shape)} sha {_digest(np.ascontiguousarray(array).tobytes())}"


def _hooks_desc(hooks: Any) -> Any:
    if hooks is None:
        return None
    chains = merge_hooks(hooks)
    leaves = b"".join(np.asarray(v).tobytes() for v in jax.tree_util.tree_leaves(jax.device_get(chains)))
    # the structure holds static fields (a splice's `error`); addresses of functions are not identity across runs
    structure = re.sub(r" at 0x[0-9a-f]+", "", str(jax.tree_util.tree_structure(chains)))
    return {"sites": {k: [type(i).__name__ for i in c] for k, c in chains.items()}, "values": _digest(leaves),
            "structure": _digest(structure.encode())}


# ----------------------------------------------------------------------------------------------------------------
# Writing.

def _mismatch(path: pathlib.Path, stored: Mapping[str, Any], given: Mapping[str, Any], what: str) -> str | None:
    diffs = []
    for key in sorted(set(stored) | set(given)):
        if key == "id" or stored.get(key) == given.get(key):
            continue
        a, b = stored.get(key), given.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = [f"{key}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            diffs += inner[:6]
        else:
            diffs.append(f"{key}: {a!r} vs {b!r}")
    if not diffs:
        return None
    return f"{path} was written with another {what} than this one (stored vs given): " + "; ".join(diffs) + "."


def _check_meta(path: pathlib.Path, meta: Mapping[str, Any], model: Mapping[str, Any] | None,
                sites: Sequence[str] | None, options: Mapping[str, Any] | None) -> None:
    if model is not None and meta["model"]["id"] != model["id"]:
        raise StoreMismatchError(_mismatch(path, meta["model"], model, "model")
                                 or f"{path} was written by model {meta['model']['id']}, not {model['id']}.")
    if sites is not None and list(meta["sites"]) != list(sites):
        missing = [s for s in sites if s not in meta["sites"]]
        extra = [s for s in meta["sites"] if s not in sites]
        raise StoreMismatchError(f"{path} holds sites {meta['sites']}, not the requested {list(sites)} (not in the "
                                 f"store: {missing}; in the store but not requested: {extra}). Write a new store for "
                                 "other sites.")
    if options is not None:
        message = _mismatch(path, meta["options"], options, "set of options")
        if message:
            raise StoreMismatchError(message)
