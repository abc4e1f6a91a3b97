"""Checkpoints of training-state pytrees on orbax-checkpoint, with per-leaf checksums.

:func:`save_checkpoint` / :func:`restore_checkpoint` save and restore one pytree with a JSON metadata dict;
:class:`CheckpointManager` saves every ``save_every`` steps (asynchronously), keeps the newest ``keep`` and
restores the latest (intact) one. Both use one orbax path (:func:`_write`, :func:`_read`) and one layout:
``<checkpoint>/state/`` (the pytree), ``metadata/`` (the caller's JSON), ``checksums/`` (per leaf: dtype, shape,
xxh3-64; :mod:`idesign._checkpoint_integrity`).

**Restoring** goes into a *target* (arrays or ``jax.ShapeDtypeStruct``s, :func:`abstract_like`) compared with
the checkpoint before any read: a difference raises :class:`CheckpointMismatchError` naming every dotted path,
parameters before optimizer state. Changed bytes, dtypes or shapes and unreadable files raise
:class:`CheckpointCorruptError` (not detected: a checkpoint replaced whole by another consistent one, leaves not
fully addressable from one process). **Atomicity**: orbax writes into ``<name>.orbax-checkpoint-tmp`` and
renames at the end; leftovers of a failed save are removed.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from idesign import _checkpoint_integrity as integrity
from idesign import tree as tree_lib
from idesign._checkpoint_integrity import CheckpointCorruptError, CheckpointMismatchError
from idesign._types import PyTree

__all__ = ["CheckpointCorruptError", "CheckpointManager", "CheckpointMismatchError", "abstract_like",
           "restore_checkpoint", "save_checkpoint"]

PathLike = str | Path

_STATE, _METADATA, _CHECKSUMS = "state", "metadata", "checksums"
_TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # '.orbax-checkpoint-tmp'
_barrier_ids = itertools.count()


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
    named = tree_lib.named_leaves(tree)
    for name, leaf in named.items():
        integrity.leaf_spec(leaf, name, saving=True)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    items = {_STATE: ocp.args.StandardSave(tree),
             _METADATA: ocp.args.JsonSave(integrity.jsonable(metadata or {}, "metadata"))}
    if checksums:  # computed now, from the caller's arrays, before an async save returns
        items[_CHECKSUMS] = ocp.args.JsonSave(integrity.checksum_record(named))
    try:
        checkpointer.save(path, args=ocp.args.Composite(**items), force=force)
    except BaseException:
        _remove_temporaries(path.parent, glob.escape(path.name))
        raise


def _read(checkpointer: ocp.Checkpointer, path: Path, step: int | None, target: PyTree | None,
          verify: bool = True) -> tuple[PyTree, dict[str, Any]]:
    corrupt = lambda where, reason: CheckpointCorruptError(step, where, reason, path)  # noqa: E731
    if not (path / _STATE).is_dir():
        raise corrupt(f"{_STATE}/", "the state directory is missing")

    def read_json(item: str) -> Any:
        if not (path / item).is_dir():
            return None
        with integrity.reading(corrupt, item):
            return checkpointer.restore(path, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    metadata, checksums = read_json(_METADATA), read_json(_CHECKSUMS)
    with integrity.reading(corrupt, f"{_STATE}/ tree metadata"):
        saved = checkpointer.metadata(path).item_metadata[_STATE]
        if saved is None:
            raise ValueError("no tree metadata")
        saved_specs = jax.tree.map(integrity.saved_spec, getattr(saved, "tree", saved))
    if checksums is not None:
        integrity.check_record(checksums, saved_specs, corrupt)
    if target is not None:
        integrity.check_target(target, saved_specs, path / _STATE)
    # the target was checked above: what fails now is the files. Orbax takes numpy scalars to save, not as targets.
    with integrity.reading(corrupt, f"{_STATE}/", "reading failed", leaf_from=path):
        args = ocp.args.StandardRestore(None if target is None else jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target))
        restored = checkpointer.restore(path, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
    by_name = tree_lib.named_leaves(restored)
    if verify and checksums is not None:
        integrity.verify(checksums, by_name, corrupt)
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
    """The restore of :func:`restore_checkpoint` and :meth:`CheckpointManager.restore`: ``step``, the checkpoint
    ``root`` itself, or the newest step (with ``fallback`` the newest intact one, warning which it skipped)."""
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

    ``directory`` is the checkpoint (it may exist only if empty, unless ``overwrite``), or with ``step``
    ``directory/<step>`` (the manager's layout). ``tree``'s leaves are jax or numpy arrays or scalars or Python
    bool/int/float (NamedTuples, optax states and int keys are fine; another leaf raises ``TypeError`` naming
    it); ``metadata`` is a small JSON-serialisable dict (numpy values become numbers and lists). ``overwrite``
    writes under a staging name and swaps it in, so a failed overwrite keeps the old checkpoint.

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
    with contextlib.closing(_checkpointer()) as checkpointer:
        _write(checkpointer, write_to, tree, metadata, force=write_to != final)
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

    ``directory`` is a checkpoint, or a directory of step checkpoints (the latest, unless ``step``). ``target``
    holds arrays or ``jax.ShapeDtypeStruct``s (:func:`abstract_like`; shardings are honoured) of the saved
    structure, shapes and dtypes, else :class:`CheckpointMismatchError`; ``None`` returns the tree as orbax
    stored it (string keys, NamedTuples as dicts). ``fallback`` restores the newest *intact* step, warning which
    corrupt ones it skipped (else :class:`CheckpointCorruptError`); ``verify`` checks every leaf's checksum.
    Returns ``(tree, metadata)``, ``tree`` with ``target``'s exact structure; ``FileNotFoundError`` without one.

    >>> import tempfile, jax.numpy as jnp
    >>> from idesign.checkpoint import abstract_like, save_checkpoint, restore_checkpoint
    >>> state = {'w': jnp.arange(3.0), 'step': 7}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_checkpoint(d, state)
    ...     restored, _ = restore_checkpoint(d, abstract_like(state))
    >>> restored['w'].tolist(), restored['step']
    ([0.0, 1.0, 2.0], 7)
    """
    with contextlib.closing(_checkpointer()) as checkpointer:
        return _restore(checkpointer, Path(directory).absolute(), target, step, fallback, verify)


class CheckpointManager:
    """Saves a training state every ``save_every`` steps and keeps the newest ``keep``.

    One sub-directory of ``directory`` per step; ``keep=None`` keeps all (use 2 or more for ``fallback``);
    :meth:`save` writes at steps divisible by ``save_every`` or at a multi-host preemption point. With
    ``async_save`` (default) :meth:`save` returns once the arrays are copied off the device and hashed; every
    read waits for pending saves, and a failed background save raises there (or in the next :meth:`save`,
    :meth:`wait`, :meth:`close`), its step not listed.

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
        """Saves ``state`` at ``step`` if ``save_every`` says so (or ``force``); returns whether it started.

        An existing step (a run resumed from an older step reaching it again) is replaced; checkpoints
        beyond ``keep`` are deleted once it is written.

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
        """Restores the latest checkpoint (or ``step``) into ``target``, as :func:`restore_checkpoint`."""
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
