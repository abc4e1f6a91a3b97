"""What :mod:`idesign.checkpoint` stores, and how a restore is checked against it.

A leaf is described by a *spec*, compared by :func:`idesign.tree.leaf_diff`: a ``jax.ShapeDtypeStruct``, or
:data:`SCALAR` for a Python scalar (shape ``()``, no fixed dtype). A restore target is compared with the saved
specs before any read (:func:`check_target`). What was saved is also *fingerprinted* (dtype, shape and xxh3-64 of
the host bytes) in the ``checksums`` item: per leaf, not per file, because orbax's OCDBT packs many arrays into
shared data files, so a file checksum could not name the leaf. Whatever differs from what was saved raises
:class:`CheckpointCorruptError` naming the leaf (:func:`check_record`, :func:`verify`, :func:`reading`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from idesign import tree as tree_lib
from idesign._types import PyTree


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

    __module__ = "idesign.checkpoint"

    def __init__(self, step: int | None, where: str, reason: str, location: Path | None = None):
        at = (f" step {step}" if step is not None else "") + (f" at {location}" if location else "")
        super().__init__(f"Checkpoint{at} is corrupt: {where}: {reason}")
        self.step, self.where, self.reason = step, where, reason


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

    __module__ = "idesign.checkpoint"

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


def jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        array = np.asarray(value)
        return (array if array.dtype.kind in "biu" else array.astype(np.float64)).tolist()
    raise TypeError(f"Checkpoint metadata at {where} of type {type(value).__name__} is not JSON-serialisable; "
                    "metadata must hold dicts, lists, strings, numbers, booleans, None or small arrays.")


is_python_scalar = lambda x: isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)  # noqa: E731
_is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
_ARRAYS = (jax.Array, np.ndarray, np.generic)


class _ScalarSpec(str):
    """The spec of a Python-scalar leaf: shape ``()``, no fixed dtype, described by its text."""
    shape, dtype = (), None


SCALAR = _ScalarSpec("a Python scalar")


def leaf_spec(leaf: Any, name: str, *, saving: bool = False) -> jax.ShapeDtypeStruct | str:
    """The spec of a restore-target leaf, or with ``saving`` of a leaf to save (then tracers and abstract
    leaves are refused too); a leaf that cannot be stored raises ``TypeError`` naming its path."""
    problem = None
    if saving and isinstance(leaf, jax.core.Tracer):
        problem = "it is a tracer. Save outside jax.jit / jax.grad, on concrete arrays"
    elif saving and isinstance(leaf, jax.ShapeDtypeStruct):
        problem = "it is an abstract jax.ShapeDtypeStruct, not an array"
    elif isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "OUSc":
        problem = f"numpy dtype {leaf.dtype} is not supported (use numeric or boolean arrays)"
    elif is_python_scalar(leaf):
        return SCALAR
    elif isinstance(leaf, (*_ARRAYS, jax.ShapeDtypeStruct)):
        if _is_key(leaf):  # orbax stores typed PRNG keys as their raw key data
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), np.dtype(leaf.dtype))
    else:
        problem = (f"its type {type(leaf).__name__} is not a jax or numpy array or scalar"
                   + (" or a Python bool/int/float. Keep other values (strings, configs) in `metadata`" if saving
                      else ", a jax.ShapeDtypeStruct or a Python bool/int/float"))
    raise TypeError(f"Cannot {'checkpoint' if saving else 'restore into'} the leaf at {name}: {problem}.")


def saved_spec(meta: Any) -> jax.ShapeDtypeStruct | str:
    """The spec of a leaf as orbax's tree metadata describes it."""
    if isinstance(meta, ocp.metadata.ScalarMetadata):
        return SCALAR
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return type(meta).__name__
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def fingerprint(leaf: Any) -> dict[str, Any] | None:
    """dtype, shape and xxh3-64 of a leaf's host bytes; None where one process cannot see them all."""
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            return None
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "xxh3_64": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array.reshape(-1)).view(np.uint8))}


def checksum_record(named: Mapping[str, Any]) -> dict[str, Any]:
    """The ``checksums`` item for leaves ``{dotted path: leaf}``."""
    return {"algorithm": "xxh3_64", "leaves": {name: fingerprint(leaf) for name, leaf in named.items()}}


def check_record(record: Any, saved_specs: PyTree, corrupt: Any) -> None:
    """Raises ``corrupt(where, reason)`` unless ``record`` is a checksum record describing the tree metadata's
    leaves (checked before anything is read, so a damaged key name is corruption, not a target mismatch)."""
    if not (isinstance(record, dict) and isinstance(record.get("leaves"), dict)):
        raise corrupt("checksums", "not a checksum record")
    hashed = {n: "a leaf not hashed" if c is None else jax.ShapeDtypeStruct(tuple(c["shape"]), np.dtype(c["dtype"]))
              for n, c in record["leaves"].items()}
    if diff := tree_lib.leaf_diff(hashed, saved_specs, what="the tree metadata"):
        raise corrupt("state/ tree metadata", f"disagrees with the checksums: {'; '.join(diff[:3])}")


def verify(record: Mapping[str, Any], by_name: Mapping[str, Any], corrupt: Any) -> None:
    """Raises ``corrupt(leaf, reason)`` for the first restored leaf whose fingerprint differs from the record's."""
    for name, saved in record["leaves"].items():
        if saved is None:
            continue
        if name not in by_name:
            raise corrupt(name, "a checksummed leaf is missing from the restored state")
        read = fingerprint(by_name[name]) or {}
        for key in read:
            if read[key] != saved.get(key):
                raise corrupt(name, f"{key} differs from the one saved (saved {saved.get(key)}, read {read[key]})")


@contextlib.contextmanager
def reading(corrupt: Callable[[str, str], Exception], where: str, reason: str = "unreadable", *,
            leaf_from: Path | None = None) -> Iterator[None]:
    """Any exception raised inside becomes ``corrupt(where, reason (error))``: what was saved fails to read, so its
    files are damaged. With ``leaf_from`` (the checkpoint's path), ``where`` is the leaf the error names, if any."""
    try:
        yield
    except CheckpointCorruptError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read it means the files are damaged
        leaf = None if leaf_from is None else _leaf_in_error(e, leaf_from)
        raise corrupt(leaf or where, f"{reason} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})") from e


def _leaf_in_error(error: BaseException, location: Path) -> str | None:
    # Orbax's read errors quote the TensorStore spec, whose innermost kvstore 'path' is the leaf's name inside
    # the checkpoint (keys joined by '.'); the other 'path's are directories.
    text = "\n".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    names = [p.rstrip("/") for p in re.findall(r"""\\?['"]path\\?['"]:\s*\\?['"]([^'"\\]+)""", text)]
    names = [n for n in names if n and not n.startswith("/") and "://" not in n and str(location) not in n]
    return names[-1] if names else None


_MAX_LISTED = 20


def check_target(target: PyTree, saved_specs: PyTree, location: Path) -> None:
    """Raises :class:`CheckpointMismatchError` listing every leaf of ``target`` that the saved tree lacks or
    stores with another shape or dtype (and the saved leaves it lacks): parameters first, then in its order."""
    specs = tree_lib.map_with_path(lambda name, leaf: leaf_spec(leaf, name), target)
    problems = tree_lib.leaf_diff(specs, saved_specs, what="checkpoint")
    problems.sort(key=lambda line: tree_lib.in_optimizer_state(line.split(":")[0]))
    if problems:
        more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise CheckpointMismatchError("\n  ".join(
            [f"Checkpoint at {location} does not match the restore target ({len(problems)} problems):",
             *problems[:_MAX_LISTED], *more, "Build the target with the same model config and optimizer as the "
             "saved state, or pass target=None to restore_checkpoint to inspect the checkpoint as stored."]), problems)
