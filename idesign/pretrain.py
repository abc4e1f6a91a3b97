"""Pretrain once, fine-tune many: a cache of trained base models keyed by their config.

Fine-tuning studies start from a pretrained model, as the papers do. Every arm of a study, and every
study that shares a world, should start from the *same* base weights without training them again.
:func:`cached` trains a pytree with the caller's function the first time and stores it with orbax
(through :mod:`idesign.checkpoint`); later calls with the same key restore it bit for bit.

The key is a SHA-256 of a canonical JSON form of ``(name, config, seed, version)``:

* ``config`` may be a (nested) dataclass, dict with string keys, list, tuple, str, int, float, bool or
  ``None`` (numpy scalars count as numbers). Anything else — a function, an array, an optimizer — has
  no stable text form and is refused with a ``TypeError`` naming its path (``config.optimizer``):
  put the *settings* that build it in the config instead.
* ``version`` is the caller's tag for the training code. Bump it when the training function changes
  in a way the config does not show, or stale weights are restored.

Layout: ``<cache_dir>/pretrained/<name>-<hash16>/`` is a checkpoint of :func:`idesign.checkpoint.save_checkpoint`
whose metadata holds the canonical key, so an entry can be read by a person and is checked on restore.

The cache directory is ``cache_dir`` if given, else the ``IDESIGN_CACHE`` environment variable, else
``~/.cache/idesign``.

Safety. An entry is written completely under a private staging name (unique per process and call) and
moved into place with one ``rename``, which is atomic on POSIX file systems and fails if the entry
already exists. So a reader never sees a half-written entry, and two processes that compute the same key
at once both succeed: the loser of the race drops its copy and reads the winner's (identical when training
is deterministic). An entry that cannot be restored into the expected structure, or whose stored key
differs, is moved aside, removed and recomputed, never trusted. (Meant for one process per cache entry
at a time per host; on multi-host jobs give each host its own cache or train on one host.)
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from idesign import checkpoint
from idesign._types import PyTree

__all__ = ["cache_dir", "cache_key", "cache_path", "canonical_config", "cached"]

ENV_VAR = "IDESIGN_CACHE"
_SUBDIR = "pretrained"


def cache_dir(directory: str | os.PathLike | None = None) -> Path:
    """The cache root: ``directory``, else ``$IDESIGN_CACHE``, else ``~/.cache/idesign``.

    >>> str(cache_dir('/tmp/my-cache'))
    '/tmp/my-cache'
    """
    if directory is not None:
        return Path(directory).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idesign"


def canonical_config(config: Any, *, path: str = "config") -> Any:
    """A JSON-ready form of ``config`` that is the same in every process and Python session.

    Dataclasses become ``{"__dataclass__": "<module>.<QualName>", field: value, ...}`` (the class is part
    of the key: two configs of different types never collide), dicts keep string keys only (sorted when
    dumped), tuples and lists become lists, floats are kept exactly (``repr`` round-trips).

    Raises:
      TypeError: a value with no stable text form; the message names its path, e.g. ``config.opt``.

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     width: int = 8
    ...     sizes: tuple = (1, 2)
    >>> canonical_config(C())['sizes']
    [1, 2]
    >>> canonical_config({'fn': len})
    Traceback (most recent call last):
    ...
    TypeError: config['fn']: cannot key on a builtin_function_or_method (len); use plain data (dataclasses, dicts with str keys, lists, tuples, str, int, float, bool, None).
    """
    if config is None or isinstance(config, (bool, str)):
        return config
    if isinstance(config, np.bool_):
        return bool(config)
    if isinstance(config, (int, np.integer)):
        return int(config)
    if isinstance(config, (float, np.floating)):
        value = float(config)
        if math.isfinite(value):
            return value
        return {"__float__": repr(value)}  # JSON has no nan/inf
    if isinstance(config, enum.Enum):
        return {"__enum__": f"{type(config).__module__}.{type(config).__qualname__}", "name": config.name}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out: dict[str, Any] = {"__dataclass__": f"{type(config).__module__}.{type(config).__qualname__}"}
        for field in dataclasses.fields(config):
            out[field.name] = canonical_config(getattr(config, field.name), path=f"{path}.{field.name}")
        return out
    if isinstance(config, Mapping):
        out = {}
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: dict keys must be str; got key {key!r} "
                                f"of type {type(key).__name__}.")
            out[key] = canonical_config(value, path=f"{path}[{key!r}]")
        return out
    if isinstance(config, (list, tuple)):
        return [canonical_config(v, path=f"{path}[{i}]") for i, v in enumerate(config)]
    name = getattr(config, "__name__", None)
    what = type(config).__name__ + (f" ({name})" if name else "")
    raise TypeError(f"{path}: cannot key on a {what}; use plain data (dataclasses, dicts with str keys, "
                    "lists, tuples, str, int, float, bool, None).")


def _key_record(name: str, config: Any, seed: int, version: str) -> dict[str, Any]:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"name = {name!r}: expected a non-empty str of letters, digits, '-', '_', '.'.")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed = {seed!r}: expected an int.")
    return {"name": name, "config": canonical_config(config), "seed": int(seed), "version": str(version)}


def cache_key(name: str, config: Any, seed: int, *, version: str = "1") -> str:
    """The entry name ``<name>-<first 16 hex digits of the SHA-256 of the canonical key>``.

    >>> a = cache_key('toy', {'width': 8}, seed=0)
    >>> a == cache_key('toy', {'width': 8}, seed=0), a == cache_key('toy', {'width': 8}, seed=1)
    (True, False)
    >>> a.startswith('toy-'), len(a)
    (True, 20)
    """
    record = _key_record(name, config, seed, version)
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def cache_path(name: str, config: Any, seed: int, *, version: str = "1",
               directory: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached` keeps this entry (it may not exist yet)."""
    return cache_dir(directory) / _SUBDIR / cache_key(name, config, seed, version=version)


def _target(like: PyTree | Callable[[], PyTree]) -> PyTree:
    tree = like() if callable(like) else like
    return checkpoint.abstract_like(tree)


def _try_restore(path: Path, target: PyTree, record: dict[str, Any]) -> PyTree | None:
    """The entry's tree, or ``None`` after moving a bad entry out of the way (it is then recomputed)."""
    try:
        tree, meta = checkpoint.restore_checkpoint(path, target)
        if meta.get("key") != json.loads(json.dumps(record)):
            raise ValueError(f"stored key {meta.get('key')!r} differs from the requested key {record!r}")
        return tree
    except Exception as error:  # anything unreadable or mismatched is recomputed, never trusted
        warnings.warn(f"pretrain.cached: discarding the cache entry {path} ({type(error).__name__}: {error}); "
                      "recomputing it.", stacklevel=3)
        _discard(path)
        return None


def _discard(path: Path) -> None:
    # Rename first (atomic) so no reader picks up a half-deleted entry; a concurrent discard may win.
    trash = path.with_name(f"{path.name}.discarded-{uuid.uuid4().hex}")
    try:
        path.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def cached(
    name: str,
    config: Any,
    seed: int,
    train_fn: Callable[[Any, int], PyTree],
    *,
    like: PyTree | Callable[[], PyTree],
    version: str = "1",
    directory: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PyTree:
    """Returns ``train_fn(config, seed)``'s pytree, trained once and then restored from the cache.

    Args:
      name: a short name for the world or model (letters, digits, ``-_.``); part of the key and the folder name.
      config: everything that determines the training: plain data (see :func:`canonical_config`).
      seed: the seed; part of the key.
      train_fn: ``train_fn(config, seed) -> tree``, called only on a cache miss. The tree is any pytree
        of arrays and scalars (parameters, or a dict of parameters and other state).
      like: the structure to restore into: a pytree with the trained tree's structure, shapes and
        dtypes (arrays or ``jax.ShapeDtypeStruct``s), or a function returning one (called only to read its
        shapes, e.g. ``lambda: ids.init_transformer(model_config)[1]``).
      version: the caller's tag for the training code; bump it when the code changes.
      directory: cache root; default ``$IDESIGN_CACHE`` or ``~/.cache/idesign``.
      metadata: extra JSON-serialisable information stored with a new entry (e.g. pretraining metrics).

    Returns:
      The tree, always as restored from the cache (so a miss and a hit return bit-identical arrays with
      ``like``'s pytree structure).

    Raises:
      TypeError: ``config`` holds something with no stable text form (the message names its path).

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from idesign.pretrain import cached
      >>> calls = []
      >>> def train(config, seed):
      ...     calls.append(seed)
      ...     return {'w': jnp.full((2,), config['lr'] * (seed + 1))}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     a = cached('toy', {'lr': 0.5}, 1, train, like={'w': jnp.zeros(2)}, directory=d)
      ...     b = cached('toy', {'lr': 0.5}, 1, train, like={'w': jnp.zeros(2)}, directory=d)
      >>> a['w'].tolist(), bool((a['w'] == b['w']).all()), calls
      ([1.0, 1.0], True, [1])
    """
    record = _key_record(name, config, seed, version)
    path = cache_dir(directory) / _SUBDIR / cache_key(name, config, seed, version=version)
    target = _target(like)
    if path.exists():
        tree = _try_restore(path, target, record)
        if tree is not None:
            return tree

    trained = train_fn(config, seed)
    jax.block_until_ready(trained)
    staging = path.with_name(f"{path.name}.staging-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        checkpoint.save_checkpoint(staging, trained, metadata={"key": record, **dict(metadata or {})})
        try:
            staging.rename(path)  # atomic; refuses (ENOTEMPTY/EEXIST) if another process got there first
        except OSError:
            if not path.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    try:
        tree, _ = checkpoint.restore_checkpoint(path, target)
    except checkpoint.CheckpointMismatchError as error:
        _discard(path)
        raise checkpoint.CheckpointMismatchError(
            f"pretrain.cached({name!r}): the tree train_fn returned does not match `like`:\n{error}",
            error.problems) from None
    return tree
