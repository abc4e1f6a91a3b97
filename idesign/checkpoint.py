"""Checkpoints for training-state pytrees on orbax-checkpoint, with per-leaf checksums.

:func:`save_checkpoint` / :func:`restore_checkpoint` save and restore one pytree with a JSON metadata dict;
:class:`CheckpointManager` saves every ``save_every`` steps (asynchronously), keeps the newest ``keep`` and
restores the latest (intact) one. All go through one orbax path (:func:`_checkpointer`, :func:`_write`,
:func:`_read`; synchronous for the one-shot functions) and one layout: ``<checkpoint>/state/`` (the pytree),
``metadata/`` (the caller's JSON) and ``checksums/`` (per leaf: dtype, shape, xxh3-64 of its bytes).

**Restoring** goes into a *target* (arrays or ``jax.ShapeDtypeStruct``s, see :func:`abstract_like`), compared
with the checkpoint before any read (:func:`idesign.tree.leaf_diff`): a difference raises
:class:`CheckpointMismatchError` naming every dotted path in the target's order (parameters before optimizer
state). **Corruption** (a leaf's bytes, dtype or shape changed after saving; unreadable files) raises
:class:`CheckpointCorruptError`; not detected: a checkpoint replaced whole by another consistent one, leaves
not fully addressable from one process, tampering. **Atomicity**: orbax writes into
``<name>.orbax-checkpoint-tmp`` and renames at the end; leftovers of a failed save are removed.
"""

from __future__ import annotations

import glob
import itertools
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from idesign import tree as tree_lib
from idesign._types import PyTree

__all__ = ["CheckpointCorruptError", "CheckpointManager", "CheckpointMismatchError", "abstract_like",
           "restore_checkpoint", "save_checkpoint"]

PathLike = str | Path

_STATE, _METADATA, _CHECKSUMS = "state", "metadata", "checksums"
_TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # '.orbax-checkpoint-tmp'
_MAX_LISTED = 20
_barrier_ids = itertools.count()


class CheckpointMismatchError(ValueError):
    """A restore target does not match the pytree stored in a checkpoint (raised before any read).

    ``problems`` holds one line per offending leaf, starting with its dotted path.

    >>> import tempfile, jax.numpy as jnp, idesign.checkpoint as ckpt
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = ckpt.save_checkpoint(d, {'w': jnp.zeros((4, 8))})
    ...     try:
    ...         ckpt.restore_checkpoint(d, {'w': jnp.zeros((4, 16))})
    ...     except ckpt.CheckpointMismatchError as e:
    ...         print(e.problems[0])
    w: shape mismatch: expected (4, 16), checkpoint has (4, 8)
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


class CheckpointCorruptError(Exception):
    """A checkpoint's files no longer hold what was saved: ``step``, ``where`` (a leaf's dotted path
    or a file) and ``reason`` say which and how. The underlying read error, if any, is chained.

    >>> import pathlib, tempfile, jax.numpy as jnp, idesign.checkpoint as ckpt
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = ckpt.save_checkpoint(d, {'w': jnp.zeros(2)}, step=3)
    ...     _ = (path / 'metadata' / 'metadata').write_text('{not json')
    ...     try:
    ...         ckpt.restore_checkpoint(d, {'w': jnp.zeros(2)})
    ...     except ckpt.CheckpointCorruptError as e:
    ...         print(e.step, e.where)
    3 metadata
    """

    def __init__(self, step: int | None, where: str, reason: str, location: Path | None = None):
        at = (f" step {step}" if step is not None else "") + (f" at {location}" if location else "")
        super().__init__(f"Checkpoint{at} is corrupt: {where}: {reason}")
        self.step, self.where, self.reason = step, where, reason


# Orbax stores dict keys as strings and NamedTuples as dicts of fields: leaves are matched by dotted name.
_named = tree_lib.named_leaves


_is_python_scalar = lambda x: isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)  # noqa: E731
_is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731


class _ScalarSpec(str):
    """The spec of a Python-scalar leaf for tree.leaf_diff: shape ``()``, no fixed dtype, described by its text."""
    shape, dtype = (), None


# Leaf specs for tree.leaf_diff: jax.ShapeDtypeStructs, or (a Python scalar) _SCALAR.
_SCALAR = _ScalarSpec("a Python scalar")


def _target_spec(leaf: Any, name: str) -> jax.ShapeDtypeStruct | str:
    if _is_python_scalar(leaf):
        return _SCALAR
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
        if _is_key(leaf):  # orbax stores typed PRNG keys as their raw key data
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), np.dtype(leaf.dtype))
    raise TypeError(f"Cannot restore into the target leaf at {name} of type {type(leaf).__name__}: target leaves "
                    "must be jax or numpy arrays or scalars, jax.ShapeDtypeStructs or Python scalars.")


def _saved_spec(meta: Any) -> jax.ShapeDtypeStruct | str:
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if isinstance(meta, ocp.metadata.ScalarMetadata) or shape is None or dtype is None:
        return _SCALAR if isinstance(meta, ocp.metadata.ScalarMetadata) else type(meta).__name__
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def _fingerprint(leaf: Any) -> dict[str, Any] | None:
    """dtype, shape and xxh3-64 of a leaf's host bytes; None where one process cannot see them all."""
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            return None
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "xxh3_64": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array.reshape(-1)).view(np.uint8))}


def _check_savable(tree: PyTree) -> None:
    for name, leaf in _named(tree).items():
        problem = None
        if isinstance(leaf, jax.core.Tracer):
            problem = "it is a tracer. Save outside jax.jit / jax.grad, on concrete arrays"
        elif isinstance(leaf, jax.ShapeDtypeStruct):
            problem = "it is an abstract jax.ShapeDtypeStruct, not an array"
        elif isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "OUSc":
            problem = f"numpy dtype {leaf.dtype} is not supported (use numeric or boolean arrays)"
        elif not isinstance(leaf, (jax.Array, np.ndarray, np.generic)) and not _is_python_scalar(leaf):
            problem = (f"its type {type(leaf).__name__} is not a jax or numpy array or scalar or a Python "
                       "bool/int/float. Keep other values (strings, configs) in `metadata`")
        if problem:
            raise TypeError(f"Cannot checkpoint the leaf at {name}: {problem}.")


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        array = np.asarray(value)
        return (array if array.dtype.kind in "biu" else array.astype(np.float64)).tolist()
    raise TypeError(f"Checkpoint metadata at {where} of type {type(value).__name__} is not JSON-serialisable; "
                    "metadata must hold dicts, lists, strings, numbers, booleans, None or small arrays.")


def _checkpointer(async_save: bool = False) -> ocp.Checkpointer:
    # Handlers given up front: a bare CompositeCheckpointHandler learns them only from a save, so a fresh
    # one could not read an existing checkpoint.
    handler = ocp.CompositeCheckpointHandler(**{_STATE: ocp.StandardCheckpointHandler(),
                                                _METADATA: ocp.JsonCheckpointHandler(),
                                                _CHECKSUMS: ocp.JsonCheckpointHandler()})
    return ocp.AsyncCheckpointer(handler) if async_save else ocp.Checkpointer(handler)


_is_primary = lambda: jax.process_index() == 0  # noqa: E731


def _sync() -> None:
    ocp.multihost.sync_global_processes(f"idesign_checkpoint_{next(_barrier_ids)}")


def _drain(checkpointer: ocp.Checkpointer) -> None:
    # Waits out every background write a failed async save left queued, ignoring their errors (the
    # caller re-raises the first one). Each wait consumes the futures it saw, so a few passes suffice.
    for _ in range(10):
        try:
            checkpointer.wait_until_finished()
            return
        except Exception:  # noqa: BLE001 - secondary failures of the same save
            continue


def _remove_temporaries(parent: Path, name_glob: str = "*") -> None:
    # Removes orbax's unfinished checkpoint directories. After a failed async save other writers may still
    # flush files into the temporary directory, so removal repeats until nothing is left (bounded: 5 s).
    for _ in range(100):
        leftovers = list(parent.glob(f"{name_glob}{_TMP_SUFFIX}*")) if _is_primary() and parent.is_dir() else []
        if not leftovers:
            return
        for tmp in leftovers:
            shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.05)


def _write(checkpointer: ocp.Checkpointer, path: Path, tree: PyTree, metadata: Mapping[str, Any] | None, *,
           force: bool = False, checksums: bool = True) -> None:
    _check_savable(tree)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    items = {_STATE: ocp.args.StandardSave(tree), _METADATA: ocp.args.JsonSave(_jsonable(metadata or {}, "metadata"))}
    if checksums:  # computed now, from the caller's arrays, before an async save returns
        sums = {name: _fingerprint(leaf) for name, leaf in _named(tree).items()}
        items[_CHECKSUMS] = ocp.args.JsonSave({"algorithm": "xxh3_64", "leaves": sums})
    try:
        checkpointer.save(path, args=ocp.args.Composite(**items), force=force)
    except BaseException:
        _remove_temporaries(path.parent, glob.escape(path.name))
        raise


def _leaf_in_error(error: BaseException, location: Path) -> str | None:
    # Orbax's read errors quote the TensorStore spec, whose innermost kvstore 'path' is the leaf's
    # name inside the checkpoint (keys joined by '.'); the other 'path's are directories.
    text = "\n".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    names = [p.rstrip("/") for p in re.findall(r"""\\?['"]path\\?['"]:\s*\\?['"]([^'"\\]+)""", text)]
    names = [n for n in names if n and not n.startswith("/") and "://" not in n and str(location) not in n]
    return names[-1] if names else None


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def _read(checkpointer: ocp.Checkpointer, path: Path, step: int | None, target: PyTree | None,
          verify: bool = True) -> tuple[PyTree, dict[str, Any]]:
    def corrupt(where: str, reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(step, where, reason, path)

    if not (path / _STATE).is_dir():
        raise corrupt(f"{_STATE}/", "the state directory is missing")

    def read_json(item: str) -> Any:
        if not (path / item).is_dir():
            return None
        try:
            return checkpointer.restore(path, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read it means the file is damaged
            raise corrupt(item, f"unreadable ({_first_line(e)})") from e

    metadata, checksums = read_json(_METADATA), read_json(_CHECKSUMS)
    if checksums is not None and not (isinstance(checksums, dict) and isinstance(checksums.get("leaves"), dict)):
        raise corrupt(_CHECKSUMS, "not a checksum record")
    try:
        saved = checkpointer.metadata(path).item_metadata[_STATE]
        if saved is None:
            raise ValueError("no tree metadata")
        saved = getattr(saved, "tree", saved)
        saved_specs = jax.tree.map(_saved_spec, saved)
    except Exception as e:  # noqa: BLE001
        raise corrupt(f"{_STATE}/ tree metadata", f"unreadable ({_first_line(e)})") from e
    if checksums is not None:  # the tree metadata must describe the leaves that were hashed
        hashed = {n: "a leaf not hashed" if c is None else jax.ShapeDtypeStruct(tuple(c["shape"]), np.dtype(c["dtype"]))
                  for n, c in checksums["leaves"].items()}
        if diff := tree_lib.leaf_diff(hashed, saved_specs, what="the tree metadata"):
            raise corrupt(f"{_STATE}/ tree metadata", f"disagrees with the checksums: {'; '.join(diff[:3])}")
    if target is not None:
        specs = tree_lib.map_with_path(lambda name, leaf: _target_spec(leaf, name), target)
        problems = tree_lib.leaf_diff(specs, saved_specs, what="checkpoint")  # in the target's order
        problems.sort(key=lambda line: tree_lib.in_optimizer_state(line.split(":")[0]))  # parameters first
        if problems:
            lines = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                               if len(problems) > _MAX_LISTED else [])
            raise CheckpointMismatchError("\n  ".join(
                [f"Checkpoint at {path / _STATE} does not match the restore target ({len(problems)} problems):",
                 *lines, "Build the target with the same model config and optimizer as the saved state, or pass "
                 "target=None to restore_checkpoint to inspect the checkpoint as stored."]), problems)
        # Orbax accepts numpy scalars when saving but not as restore targets.
        orbax_target = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target)
    try:
        args = ocp.args.StandardRestore(None if target is None else orbax_target)
        restored = checkpointer.restore(path, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
    except Exception as e:  # noqa: BLE001 - the target was checked above: what fails now is the files
        raise corrupt(_leaf_in_error(e, path) or f"{_STATE}/", f"reading failed ({_first_line(e)})") from e
    by_name = _named(restored)
    if verify and checksums is not None:
        for name, saved_sum in checksums["leaves"].items():
            if saved_sum is None:
                continue
            if name not in by_name:
                raise corrupt(name, "a checksummed leaf is missing from the restored state")
            read_sum = _fingerprint(by_name[name])
            for key in ("dtype", "shape", "xxh3_64") if read_sum is not None else ():
                if read_sum[key] != saved_sum.get(key):
                    raise corrupt(name, f"{key} differs from the one saved (saved {saved_sum.get(key)}, read "
                                        f"{read_sum[key]})")
    if target is not None:  # exactly the target's structure (int keys, NamedTuples) and scalar types
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        restored = jax.tree_util.tree_unflatten(treedef, [
            wanted.dtype.type(np.asarray(by_name[tree_lib.path_str(p)])) if isinstance(wanted, np.generic)
            else by_name[tree_lib.path_str(p)] for p, wanted in leaves])
    return restored, dict(metadata or {})


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and p.is_dir() and ocp.step.is_path_finalized(p))


def _restore(checkpointer: ocp.Checkpointer, root: Path, target: PyTree | None, step: int | None, fallback: bool,
             verify: bool) -> tuple[PyTree, dict[str, Any]]:
    """The restore of both :func:`restore_checkpoint` and :meth:`CheckpointManager.restore`: ``step``, the
    checkpoint ``root`` itself, or the newest step (with ``fallback``, the newest intact one, warning which it skipped)."""
    steps = _steps(root)
    if step is not None:
        if int(step) not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {root}; available steps: {steps}.")
        return _read(checkpointer, root / str(int(step)), int(step), target, verify)
    if (root / _STATE).is_dir():
        return _read(checkpointer, root, None, target, verify)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {root}.")
    skipped: list[CheckpointCorruptError] = []
    for step in reversed(steps):
        try:
            result = _read(checkpointer, root / str(step), step, target, verify)
        except CheckpointCorruptError as e:
            if not fallback:
                raise
            skipped.append(e)
            continue
        for e in skipped:
            warnings.warn(f"{e} -- skipped it and restored step {step} instead.", stacklevel=3)
        return result
    raise skipped[0]


def abstract_like(tree: PyTree) -> PyTree:
    """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` (shardings kept): a restore
    target that places each leaf where the original lives, without holding memory. Scalars pass through.

    >>> import jax.numpy as jnp, idesign.checkpoint as ckpt
    >>> ckpt.abstract_like({'w': jnp.zeros((2, 3)), 'step': 0})['w'].shape
    (2, 3)
    """
    def to_abstract(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        return leaf

    return jax.tree.map(to_abstract, tree)


def save_checkpoint(directory: PathLike, tree: PyTree, *, step: int | None = None,
                    metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Saves a pytree, a JSON metadata dict and per-leaf checksums as one checkpoint, atomically; returns its path.

    Args:
      directory: the checkpoint itself without ``step`` (it may exist only if empty, unless ``overwrite``);
        with ``step``, ``directory/<step>`` (the manager's layout).
      tree: parameters or a training state (NamedTuples, optax states, int dict keys are fine) of jax or
        numpy arrays or scalars, or Python bool/int/float. A leaf that is not raises ``TypeError`` naming it.
      metadata: small JSON-serialisable dict (numpy scalars and small arrays become numbers and lists).
      overwrite: replace an existing checkpoint (written under a staging name, then swapped in, so a
        failed overwrite keeps the old one); otherwise an existing one raises ``FileExistsError``.

    >>> import tempfile, jax.numpy as jnp
    >>> from idesign.checkpoint import save_checkpoint, restore_checkpoint
    >>> params = {'blocks': {0: {'kernel': jnp.ones((2, 2))}}}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = save_checkpoint(d, params, step=10, metadata={'lr': 1e-3})
    ...     restored, meta = restore_checkpoint(d, params)
    ...     print(path.name, meta, list(restored['blocks']))
    10 {'lr': 0.001} [0]
    """
    if step is not None and int(step) < 0:
        raise ValueError(f"step must be non-negative, got {step}.")
    root = Path(directory).absolute()
    final = root if step is None else root / str(int(step))
    write_to, empty = final, final.is_dir() and not any(final.iterdir())
    if final.exists() and not empty:
        if not (final / _STATE).is_dir():
            raise FileExistsError(f"{final} exists and is not a checkpoint; refusing to write over it.")
        elif not overwrite:
            raise FileExistsError(f"A checkpoint already exists at {final}; pass overwrite=True to replace it.")
        else:
            write_to = final.with_name(final.name + ".idesign-staging")
    _sync()  # every process has looked before the primary changes anything
    if _is_primary():
        if empty:
            final.rmdir()  # an empty directory (e.g. from tempfile) holds nothing to lose
        final.parent.mkdir(parents=True, exist_ok=True)
    checkpointer = _checkpointer()
    try:
        _write(checkpointer, write_to, tree, metadata, force=write_to != final)
    finally:
        checkpointer.close()
    if write_to != final and _is_primary():  # swap in with two renames; the old copy survives until then
        old = final.with_name(final.name + ".idesign-old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        write_to.rename(final)
        shutil.rmtree(old)
    _sync()
    return final


def restore_checkpoint(directory: PathLike, target: PyTree | None, *, step: int | None = None,
                       fallback: bool = False, verify: bool = True) -> tuple[PyTree, dict[str, Any]]:
    """Restores a checkpoint written by :func:`save_checkpoint` or :class:`CheckpointManager`.

    Args:
      directory: a checkpoint, or a directory of step checkpoints (then the latest, unless ``step``).
      target: arrays or ``jax.ShapeDtypeStruct``s (see :func:`abstract_like`) with the saved structure,
        shapes and dtypes, else :class:`CheckpointMismatchError`; shardings are honoured. ``None``
        restores the tree as orbax stored it (string keys, NamedTuples as dicts), for inspection.
      fallback: for the latest of several steps: restore the newest *intact* one, warning which
        corrupt steps it skipped (otherwise :class:`CheckpointCorruptError`, as for a given ``step``).
      verify: check every leaf against the checksums saved with it.

    Returns:
      ``(tree, metadata)``, ``tree`` with ``target``'s exact structure. ``FileNotFoundError`` if there is
      no checkpoint (for ``step``).

    >>> import tempfile, jax.numpy as jnp
    >>> from idesign.checkpoint import abstract_like, save_checkpoint, restore_checkpoint
    >>> state = {'w': jnp.arange(3.0), 'step': 7}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_checkpoint(d, state)
    ...     restored, _ = restore_checkpoint(d, abstract_like(state))
    >>> restored['w'].tolist(), restored['step']
    ([0.0, 1.0, 2.0], 7)
    """
    checkpointer = _checkpointer()
    try:
        return _restore(checkpointer, Path(directory).absolute(), target, step, fallback, verify)
    finally:
        checkpointer.close()


class CheckpointManager:
    """Saves a training state every ``save_every`` steps and keeps the newest ``keep``.

    ``state`` is any pytree (e.g. a :class:`~idesign.train.TrainState`), saved with a JSON metadata dict
    and checksums. Saves are asynchronous by default: :meth:`save` returns once the arrays are copied
    off the device and hashed. Every read waits for pending saves; the error of a failed background save
    is raised there (or by the next :meth:`save`, :meth:`wait`, :meth:`close`); its step is not listed.

    Args:
      directory: one sub-directory per saved step.
      keep: how many of the newest checkpoints to keep (``None``: all; 2 or more for ``fallback``).
      save_every: :meth:`save` writes at steps divisible by this (or a multi-host preemption point).
      async_save: write in a background thread.

    >>> import tempfile, jax.numpy as jnp
    >>> from idesign.checkpoint import CheckpointManager
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with CheckpointManager(d, keep=2, save_every=10) as manager:
    ...         for step in range(1, 31):
    ...             state = {'w': jnp.full((2,), float(step)), 'step': step}
    ...             _ = manager.save(step, state, metadata={'loss': 1.0 / step})
    ...         steps = manager.all_steps()
    ...         restored, meta = manager.restore(state)
    >>> steps, restored['step'], meta
    ([20, 30], 30, {'loss': 0.03333333333333333})
    """

    def __init__(self, directory: PathLike, *, keep: int | None = 3, save_every: int = 1, async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be a positive int or None, got {keep}.")
        if save_every < 1:
            raise ValueError(f"save_every must be a positive int, got {save_every}.")
        self._directory = Path(directory).absolute()
        self.keep, self.save_every = keep, save_every
        if _is_primary():
            self._directory.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(self._directory)  # unfinished saves of an earlier (killed) run
        _sync()
        self._checkpointer = _checkpointer(async_save)

    @property
    def directory(self) -> Path:
        """The directory holding the step checkpoints."""
        return self._directory

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self._directory)!r}, keep={self.keep}, save_every={self.save_every})"

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would write (without ``force``)."""
        return int(step) % self.save_every == 0 or ocp.utils.reached_preemption(int(step))

    def save(self, step: int, state: PyTree, *, metadata: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` at ``step`` if the ``save_every`` interval says so (or ``force``).

        A step that exists already (a run resumed from an older step reaching it again) is replaced.
        Returns whether a checkpoint was started; checkpoints beyond ``keep`` are deleted once it is
        written.

        >>> import tempfile, jax.numpy as jnp
        >>> from idesign.checkpoint import CheckpointManager
        >>> with tempfile.TemporaryDirectory() as d, CheckpointManager(d, save_every=5) as m:
        ...     [m.save(s, {'w': jnp.ones(2)}) for s in (4, 5)], m.save(6, {'w': jnp.ones(2)}, force=True)
        ([False, True], True)
        """
        if not (force or self.should_save(step)):
            return False
        self.wait()
        path = self._directory / str(int(step))
        _write(self._checkpointer, path, state, metadata, force=path.exists())
        return True

    def restore(self, target: PyTree | None, *, step: int | None = None, fallback: bool = False,
                verify: bool = True) -> tuple[PyTree, dict[str, Any]]:
        """Restores the latest checkpoint (or ``step``) into ``target``: ``(state, metadata)``.

        Arguments and errors as for :func:`restore_checkpoint`; ``fallback=True`` restores the newest
        intact step, warning which newer corrupt steps it skipped.
        """
        self.wait()
        return _restore(self._checkpointer, self._directory, target, step, fallback, verify)

    def latest_step(self) -> int | None:
        """The newest finished step, or ``None``; waits for pending saves first."""
        return (self.all_steps() or [None])[-1]

    def all_steps(self) -> list[int]:
        """All finished steps, ascending; waits for pending saves first."""
        self.wait()
        return _steps(self._directory)

    def wait(self) -> None:
        """Blocks until pending saves are written (raising the error of a failed one), then deletes
        the checkpoints beyond ``keep``."""
        try:
            if isinstance(self._checkpointer, ocp.AsyncCheckpointer):
                self._checkpointer.wait_until_finished()
        except BaseException:
            # Orbax queues a metadata write into the temporary directory alongside the commit; it
            # must finish (or fail) before that directory is removed, or its error surfaces on the
            # next, unrelated wait. Later waits find nothing pending.
            _drain(self._checkpointer)
            _remove_temporaries(self._directory)
            raise
        if self.keep is not None and _is_primary():
            for old in _steps(self._directory)[:-self.keep]:
                shutil.rmtree(self._directory / str(old), ignore_errors=True)
        _sync()  # all processes list the same steps afterwards

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources."""
        try:
            self.wait()
        finally:
            self._checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
