"""Checkpoints for training-state pytrees, on top of orbax-checkpoint.

Two entry points:

* :func:`save_checkpoint` / :func:`restore_checkpoint` -- one-off save and restore of any
  pytree (parameters, or a whole training state) together with a small JSON metadata dict
  (config, metrics, ...).
* :class:`CheckpointManager` -- the training-loop manager: saves every ``save_every`` steps,
  keeps the newest ``keep`` checkpoints, saves asynchronously, restores the latest.

Both write the same on-disk layout, so a directory written by one can be read by the other::

    <directory>/<step>/state/      the pytree (orbax ``StandardCheckpointHandler``)
    <directory>/<step>/metadata/   the JSON metadata (orbax ``JsonCheckpointHandler``)

(``save_checkpoint(directory, tree)`` without a ``step`` writes ``state/`` and ``metadata/``
directly under ``directory``.)

Restoring always goes *into a target*: a pytree with the structure the caller expects (arrays,
``jax.ShapeDtypeStruct``s, or a mix; see :func:`abstract_like`). The target is checked against
the checkpoint's own metadata before orbax reads anything, and a mismatch raises
:class:`CheckpointMismatchError` naming every offending leaf by its dotted path
(``params.blocks.0.attn.q_proj.kernel``). The result has exactly the target's pytree structure:
integer dict keys (orbax stores every key as a string), NamedTuple optimizer states and tuples
come back as they went in. Leaves are restored with the target's sharding when it has one.

Atomicity: orbax writes each checkpoint into ``<name>.orbax-checkpoint-tmp`` and renames it to
its final name only once everything is written, so a failed or interrupted save never leaves a
final directory behind on a POSIX file system. This module also removes the temporary directory
when a save fails. (On object stores without atomic rename, e.g. GCS, orbax instead marks a
finished checkpoint with ``commit_success.txt`` and ignores unmarked ones.)
"""

from __future__ import annotations

import glob
import itertools
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from idesign import tree as tree_lib

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "abstract_like",
    "restore_checkpoint",
    "save_checkpoint",
]

PyTree = Any
PathLike = str | Path

_STATE = "state"
_METADATA = "metadata"
_TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX  # '.orbax-checkpoint-tmp'
_STAGING_SUFFIX = ".idesign-staging"
_OLD_SUFFIX = ".idesign-old"
_MAX_LISTED_PROBLEMS = 20
_barrier_ids = itertools.count()


class CheckpointMismatchError(ValueError):
    """A restore target does not match the pytree stored in a checkpoint.

    Raised before any array is read. ``problems`` holds one line per offending leaf, each
    starting with the leaf's dotted path; the message lists them (up to 20).

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> import idesign.checkpoint as ckpt
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = ckpt.save_checkpoint(d, {'w': jnp.zeros((4, 8))})
      ...     try:
      ...         ckpt.restore_checkpoint(d, {'w': jnp.zeros((4, 16))})
      ...     except ckpt.CheckpointMismatchError as e:
      ...         print(e.problems[0])
      w: shape mismatch: target expects (4, 16), checkpoint has (4, 8)
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


# --------------------------------------------------------------------------------------------
# Pytree paths


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
    # Orbax stores every dict key as a string and every NamedTuple as a dict of its fields,
    # so a path of key *names* is what a target and a checkpoint can be matched on.
    return tuple(tree_lib.key_str(k) for k in path)


def _dotted(names: tuple[str, ...]) -> str:
    return ".".join(names) if names else "<root>"


# --------------------------------------------------------------------------------------------
# Leaf specs (shape and dtype) on both sides


class _LeafSpec(NamedTuple):
    shape: tuple[int, ...] | None
    dtype: np.dtype | None  # None: a Python scalar, whose dtype is not pinned down

    def describe(self) -> str:
        if self.dtype is None and self.shape == ():
            return "a Python scalar"
        return f"{self.dtype} array of shape {self.shape}"


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def _is_prng_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _target_spec(leaf: Any, names: tuple[str, ...]) -> _LeafSpec:
    if _is_python_scalar(leaf):
        return _LeafSpec((), None)
    if isinstance(leaf, np.generic):
        return _LeafSpec((), np.dtype(leaf.dtype))
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
        if _is_prng_key(leaf):
            # Orbax stores typed PRNG keys as their raw key data.
            data = jax.eval_shape(jax.random.key_data, leaf)
            return _LeafSpec(tuple(data.shape), np.dtype(data.dtype))
        return _LeafSpec(tuple(leaf.shape), np.dtype(leaf.dtype))
    raise TypeError(
        f"Cannot restore into the target leaf at {_dotted(names)} of type "
        f"{type(leaf).__name__}: target leaves must be jax arrays, numpy arrays or scalars, "
        "jax.ShapeDtypeStructs or Python scalars."
    )


def _saved_spec(meta: Any) -> _LeafSpec:
    if isinstance(meta, ocp.metadata.ScalarMetadata):
        return _LeafSpec((), None)
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", None)
    return _LeafSpec(
        None if shape is None else tuple(shape), None if dtype is None else np.dtype(dtype)
    )


def _compare_leaf(target: _LeafSpec, saved: _LeafSpec) -> str | None:
    if target.shape is not None and saved.shape is not None and target.shape != saved.shape:
        return f"shape mismatch: target expects {target.shape}, checkpoint has {saved.shape}"
    if target.dtype is not None and saved.dtype is not None and target.dtype != saved.dtype:
        return f"dtype mismatch: target expects {target.dtype}, checkpoint has {saved.dtype}"
    return None


def _structure_problems(target: PyTree, saved_tree: PyTree) -> list[str]:
    """One line per leaf where ``target`` and the checkpoint's metadata tree disagree."""
    wanted = {
        _path_names(path): _target_spec(leaf, _path_names(path))
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    found = {
        _path_names(path): _saved_spec(meta)
        for path, meta in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
    }
    problems = []
    for names in sorted(wanted.keys() | found.keys()):
        where = _dotted(names)
        if names not in found:
            problems.append(
                f"{where}: missing from checkpoint: target expects {wanted[names].describe()}, "
                "checkpoint has no leaf at this path"
            )
        elif names not in wanted:
            problems.append(
                f"{where}: unexpected leaf in checkpoint: checkpoint has "
                f"{found[names].describe()}, target has no leaf at this path"
            )
        elif (issue := _compare_leaf(wanted[names], found[names])) is not None:
            problems.append(f"{where}: {issue}")
    return problems


def _raise_if_mismatch(target: PyTree, saved_tree: PyTree, location: Path) -> None:
    problems = _structure_problems(target, saved_tree)
    if not problems:
        return
    listed = problems[:_MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    lines = [
        f"Checkpoint at {location} does not match the restore target "
        f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):",
        *(f"  {p}" for p in listed),
        *([f"  ... and {more} more"] if more else []),
        "Build the target with the same model config and optimizer as the saved state, or "
        "pass target=None to restore_checkpoint to inspect the checkpoint as stored.",
    ]
    raise CheckpointMismatchError("\n".join(lines), problems)


# --------------------------------------------------------------------------------------------
# Validation and conversion of what is saved / restored


def _check_savable(tree: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = _dotted(_path_names(path))
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(
                f"Cannot checkpoint the leaf at {where}: it is a tracer. Save outside jax.jit "
                "/ jax.grad, on concrete arrays."
            )
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                f"Cannot checkpoint the leaf at {where}: it is an abstract "
                "jax.ShapeDtypeStruct, not an array."
            )
        if isinstance(leaf, jax.Array):
            continue
        if isinstance(leaf, (np.ndarray, np.generic)):
            if leaf.dtype.kind in "OUSc":
                raise TypeError(
                    f"Cannot checkpoint the leaf at {where}: numpy dtype {leaf.dtype} is not "
                    "supported (use numeric or boolean arrays)."
                )
            continue
        if _is_python_scalar(leaf):
            continue
        raise TypeError(
            f"Cannot checkpoint the leaf at {where} of type {type(leaf).__name__}: leaves must "
            "be jax arrays, numpy arrays or scalars, or Python bool/int/float. Keep other "
            "values (strings, configs) in `metadata`."
        )


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        array = np.asarray(value)
        if array.dtype.kind not in "biu":
            array = array.astype(np.float64)  # bfloat16 and friends are not JSON numbers
        return array.tolist()
    raise TypeError(
        f"Checkpoint metadata at {where} of type {type(value).__name__} is not "
        "JSON-serialisable; metadata must hold dicts, lists, strings, numbers, booleans, None "
        "or small arrays."
    )


def _metadata_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    return _jsonable(metadata, "metadata")


def _save_args(tree: PyTree, metadata: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(tree), _METADATA: ocp.args.JsonSave(metadata)}
    )


def _as_orbax_target(target: PyTree) -> PyTree:
    # Orbax accepts numpy scalars when saving but not as restore targets.
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target)


def _into_target_structure(restored: PyTree, target: PyTree) -> PyTree:
    """Re-assemble ``restored`` with exactly ``target``'s pytree structure and scalar types."""
    by_path = {
        _path_names(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
    }
    target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, wanted in target_leaves:
        leaf = by_path[_path_names(path)]
        if isinstance(wanted, np.generic):
            leaf = wanted.dtype.type(np.asarray(leaf))
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _restore_items(
    restore: Callable[[ocp.args.Composite], Any],
    item_metadata: Any,
    target: PyTree | None,
    location: Path,
) -> tuple[PyTree, dict[str, Any]]:
    state_metadata = item_metadata[_STATE] if _STATE in item_metadata else None
    if state_metadata is None:
        raise FileNotFoundError(
            f"{location} holds no '{_STATE}' item; it was not written by idesign.checkpoint."
        )
    saved_tree = getattr(state_metadata, "tree", state_metadata)
    if target is None:
        state_args = ocp.args.StandardRestore()
    else:
        _raise_if_mismatch(target, saved_tree, location / _STATE)
        state_args = ocp.args.StandardRestore(_as_orbax_target(target))
    items = {_STATE: state_args}
    has_metadata = (location / _METADATA).is_dir()
    if has_metadata:
        items[_METADATA] = ocp.args.JsonRestore()
    restored = restore(ocp.args.Composite(**items))
    tree = restored[_STATE]
    if target is not None:
        tree = _into_target_structure(tree, target)
    metadata = restored[_METADATA] if has_metadata else None
    return tree, dict(metadata or {})


# --------------------------------------------------------------------------------------------
# File-system helpers


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    ocp.multihost.sync_global_processes(f"idesign_checkpoint_{name}_{next(_barrier_ids)}")


def _remove_temporaries(parent: Path, name_glob: str = "*", *, attempts: int = 100, pause_s: float = 0.05) -> None:
    """Remove orbax's temporary (unfinished) checkpoint directories under ``parent``.

    When an async save fails, orbax reports the error while other writers of that save may still
    be flushing files into its temporary directory, so one ``rmtree`` can race with them and leave
    the directory behind. Removal is therefore repeated until nothing is left (bounded: 5 s).
    """
    if not _is_primary() or not parent.is_dir():
        return
    for _ in range(attempts):
        leftovers = list(parent.glob(f"{name_glob}{_TMP_SUFFIX}*"))
        if not leftovers:
            return
        for tmp in leftovers:
            shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(pause_s)


def _is_checkpoint(path: Path) -> bool:
    return (path / _STATE).is_dir()


def _finalized_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and p.is_dir() and ocp.step.is_path_finalized(p)
    )


def _resolve_checkpoint(directory: PathLike, step: int | None) -> Path:
    root = Path(directory).absolute()
    if step is not None:
        path = root / str(int(step))
        if not _is_checkpoint(path):
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {root}; available steps: "
                f"{_finalized_steps(root)}."
            )
        return path
    if _is_checkpoint(root):
        return root
    steps = _finalized_steps(root)
    if not steps:
        raise FileNotFoundError(f"No checkpoint found at {root}.")
    return root / str(steps[-1])


def _composite_checkpointer() -> ocp.Checkpointer:
    # Register the item handlers up front: a bare CompositeCheckpointHandler learns them only
    # from a save, so a fresh one cannot read the item metadata of an existing checkpoint.
    registry = ocp.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    metadata_handler = ocp.JsonCheckpointHandler()
    registry.add(_STATE, ocp.args.StandardSave, state_handler)
    registry.add(_STATE, ocp.args.StandardRestore, state_handler)
    registry.add(_METADATA, ocp.args.JsonSave, metadata_handler)
    registry.add(_METADATA, ocp.args.JsonRestore, metadata_handler)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def _save_atomically(checkpointer: ocp.Checkpointer, path: Path, args: Any, force: bool) -> None:
    try:
        checkpointer.save(path, args=args, force=force)
    except BaseException:
        _remove_temporaries(path.parent, glob.escape(path.name))
        raise


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with two renames; the old copy survives until the end."""
    if _is_primary():
        old = final.with_name(final.name + _OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    _sync("swap")


# --------------------------------------------------------------------------------------------
# Public API


def abstract_like(tree: PyTree) -> PyTree:
    """Returns ``tree`` with every array replaced by a ``jax.ShapeDtypeStruct``.

    Shardings of jax arrays are kept, so the result is a restore target that places each leaf
    where the original lives, without holding any memory. Python scalars pass through.

    Args:
      tree: a pytree of jax arrays, numpy arrays and scalars.

    Returns:
      A pytree of the same structure with ``ShapeDtypeStruct`` leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign.checkpoint import abstract_like
      >>> abstract_like({'w': jnp.zeros((2, 3)), 'step': 0})['w'].shape
      (2, 3)
    """

    def to_abstract(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        return leaf

    return jax.tree.map(to_abstract, tree)


def save_checkpoint(
    directory: PathLike,
    tree: PyTree,
    *,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a pytree and a JSON metadata dict as one checkpoint, atomically.

    Args:
      directory: where to write. Without ``step`` the checkpoint is ``directory`` itself (it
        may exist only if empty, unless ``overwrite``); with ``step`` it is
        ``directory/<step>``, the layout :class:`CheckpointManager` uses.
      tree: the pytree to save: parameters, or a whole training state (NamedTuples, optax
        states, int dict keys are fine). Leaves must be jax or numpy arrays or scalars.
      step: optional step number, see ``directory``.
      metadata: small JSON-serialisable dict (config, metrics, ...). numpy scalars and small
        arrays are converted to numbers and lists; dict keys become strings.
      overwrite: replace an existing checkpoint at the same place. The new checkpoint is
        written completely under a staging name first, then swapped in.

    Returns:
      The path of the written checkpoint.

    Raises:
      FileExistsError: the checkpoint exists (or the path holds something that is not a
        checkpoint) and ``overwrite`` is false.
      TypeError: a leaf of ``tree`` or a value of ``metadata`` cannot be saved; the message
        names its path.

    A failed save leaves no directory under the final name: orbax writes into
    ``<name>.orbax-checkpoint-tmp`` and renames at the end, and that temporary directory is
    removed when the save raises.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from idesign.checkpoint import save_checkpoint, restore_checkpoint
      >>> params = {'blocks': {0: {'kernel': jnp.ones((2, 2))}}}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = save_checkpoint(d, params, step=10, metadata={'lr': 1e-3})
      ...     restored, meta = restore_checkpoint(d, params)
      ...     print(path.name, meta, list(restored['blocks']))
      10 {'lr': 0.001} [0]
    """
    _check_savable(tree)
    metadata_json = _metadata_json(metadata)
    root = Path(directory).absolute()
    if step is not None and int(step) < 0:
        raise ValueError(f"step must be non-negative, got {step}.")
    final = root if step is None else root / str(int(step))

    replace = False
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            if _is_primary():
                final.rmdir()  # an empty directory (e.g. from tempfile) holds nothing to lose
            _sync("rmdir")
        elif not _is_checkpoint(final):
            raise FileExistsError(
                f"{final} exists and is not a checkpoint; refusing to write over it."
            )
        elif not overwrite:
            raise FileExistsError(
                f"A checkpoint already exists at {final}; pass overwrite=True to replace it."
            )
        else:
            replace = True
    if _is_primary():
        final.parent.mkdir(parents=True, exist_ok=True)

    checkpointer = _composite_checkpointer()
    try:
        args = _save_args(tree, metadata_json)
        if replace:
            staging = final.with_name(final.name + _STAGING_SUFFIX)
            _save_atomically(checkpointer, staging, args, force=True)
            _swap_in(staging, final)
        else:
            _save_atomically(checkpointer, final, args, force=False)
    finally:
        checkpointer.close()
    return final


def restore_checkpoint(
    directory: PathLike, target: PyTree | None, *, step: int | None = None
) -> tuple[PyTree, dict[str, Any]]:
    """Restores a checkpoint written by :func:`save_checkpoint` or :class:`CheckpointManager`.

    Args:
      directory: a checkpoint, or a directory of step checkpoints (then the latest finished
        step is restored unless ``step`` is given).
      target: a pytree with the structure, shapes and dtypes that were saved: concrete arrays
        or ``jax.ShapeDtypeStruct``s (see :func:`abstract_like`). Leaves carrying a sharding
        are restored with that sharding. ``None`` restores the tree as orbax stored it (dict
        keys as strings, NamedTuples as dicts, tuples as lists), for inspection.
      step: which step of ``directory`` to restore.

    Returns:
      ``(tree, metadata)``: the restored pytree, with ``target``'s exact structure, and the
      metadata dict saved with it (``{}`` if none).

    Raises:
      CheckpointMismatchError: (a ``ValueError``) ``target`` differs from the checkpoint in
        structure, shape or dtype; the message lists each offending dotted path.
      FileNotFoundError: no checkpoint at ``directory`` (for ``step``).

    Example:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp
      >>> from idesign.checkpoint import abstract_like, save_checkpoint, restore_checkpoint
      >>> state = {'w': jnp.arange(3.0), 'step': 7}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = save_checkpoint(d, state)
      ...     restored, _ = restore_checkpoint(d, abstract_like(state))
      >>> restored['w'].tolist(), restored['step']
      ([0.0, 1.0, 2.0], 7)
    """
    path = _resolve_checkpoint(directory, step)
    checkpointer = _composite_checkpointer()
    try:
        item_metadata = checkpointer.metadata(path).item_metadata
        return _restore_items(
            lambda args: checkpointer.restore(path, args=args), item_metadata, target, path
        )
    finally:
        checkpointer.close()


class CheckpointManager:
    """Saves a training state every ``save_every`` steps and keeps the newest ``keep``.

    A thin wrapper over ``orbax.checkpoint.CheckpointManager``. ``state`` is any pytree (for
    example a NamedTuple ``(params, opt_state, step)``); each checkpoint also holds a JSON
    metadata dict. Saves are asynchronous by default: :meth:`save` returns once the arrays are
    copied off the device and writing continues in the background. Every read
    (:meth:`restore`, :meth:`latest_step`, :meth:`all_steps`) first waits for pending saves, so
    it sees them; an error from a background save is raised there (or by the next
    :meth:`save`, :meth:`wait` or :meth:`close`), and the failed step is not listed.

    Args:
      directory: the directory holding one sub-directory per saved step.
      keep: how many of the newest checkpoints to keep (``None``: all).
      save_every: :meth:`save` writes only at steps divisible by this, unless forced (so a
        fresh run does not save its first step; pass ``force=True`` for that).
      async_save: write in a background thread.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
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

    def __init__(
        self,
        directory: PathLike,
        *,
        keep: int | None = 3,
        save_every: int = 1,
        async_save: bool = True,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be a positive int or None, got {keep}.")
        if save_every < 1:
            raise ValueError(f"save_every must be a positive int, got {save_every}.")
        self._directory = Path(directory).absolute()
        self.keep = keep
        self.save_every = save_every
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Strictly every `save_every` steps (and on a preemption signal): orbax's default
            # policy would also save whatever step comes first when the directory is empty.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # unfinished saves of an earlier run
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _METADATA: ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def directory(self) -> Path:
        """The directory holding the step checkpoints."""
        return self._directory

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self._directory)!r}, keep={self.keep}, "
            f"save_every={self.save_every})"
        )

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would write (without ``force``)."""
        return self._manager.should_save(int(step))

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` at ``step`` if the ``save_every`` interval says so.

        Args:
          step: the training step; checkpoints are named by it.
          state: any pytree of arrays and scalars.
          metadata: small JSON-serialisable dict stored with this step.
          force: save even off the ``save_every`` interval (never over an existing step).

        Returns:
          Whether a checkpoint was started. The oldest checkpoints beyond ``keep`` are deleted
          once it is finished.

        Example:
          >>> import tempfile
          >>> import jax.numpy as jnp
          >>> from idesign.checkpoint import CheckpointManager
          >>> with tempfile.TemporaryDirectory() as d, CheckpointManager(d, save_every=5) as m:
          ...     [m.save(s, {'w': jnp.ones(2)}) for s in (4, 5)], m.save(6, {'w': jnp.ones(2)}, force=True)
          ([False, True], True)
        """
        _check_savable(state)
        args = _save_args(state, _metadata_json(metadata))
        try:
            return self._manager.save(int(step), args=args, force=force)
        except BaseException:
            _remove_temporaries(self._directory)
            raise

    def restore(
        self, target: PyTree | None, *, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restores the latest checkpoint (or ``step``) into ``target``.

        Args:
          target: as for :func:`restore_checkpoint`: concrete arrays or
            ``ShapeDtypeStruct``s with the saved structure; shardings are honoured.
          step: the step to restore; by default the latest.

        Returns:
          ``(state, metadata)``.

        Raises:
          CheckpointMismatchError: ``target`` does not match the saved state (dotted paths in
            the message).
          FileNotFoundError: there is no checkpoint (for ``step``).

        Example:
          >>> import tempfile
          >>> import jax.numpy as jnp
          >>> from idesign.checkpoint import CheckpointManager
          >>> with tempfile.TemporaryDirectory() as d, CheckpointManager(d) as m:
          ...     for s in (1, 2):
          ...         _ = m.save(s, {'w': jnp.full((2,), s)})
          ...     state, _ = m.restore({'w': jnp.zeros((2,), jnp.int32)}, step=1)
          >>> state['w'].tolist()
          [1, 1]
        """
        self.wait()
        available = list(self._manager.all_steps())
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in {self._directory}.")
        elif int(step) not in available:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self._directory}; available steps: "
                f"{sorted(available)}."
            )
        step = int(step)
        return _restore_items(
            lambda args: self._manager.restore(step, args=args),
            self._manager.item_metadata(step),
            target,
            self._directory / str(step),
        )

    def latest_step(self) -> int | None:
        """The newest finished step, or ``None``; waits for pending saves first."""
        self.wait()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finished steps, ascending; waits for pending saves first."""
        self.wait()
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending saves are written; raises the error of a failed one."""
        try:
            self._manager.wait_until_finished()
        except BaseException:
            _remove_temporaries(self._directory)
            raise

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
