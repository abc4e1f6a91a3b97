"""An on-disk activation store: stream chosen sites over a dataset into sharded ``.npy`` files, read them in batches.

:func:`write_store` runs :func:`idesign.activations.stream_activations` (so ``positions``, ``reduce``,
``valid_column``, ``pad_id``, ``dtype``, ``hooks`` and ``mesh`` mean what they mean there) over the dataset,
``shard_rows`` dataset rows at a time, and appends every batch straight to disk: host memory holds a few
batches, never a shard or the store. :func:`open_store` reads it back; :meth:`ActivationStore.batches` yields
batches (in order, or shuffled with a seed) gathered from memory-mapped shards, for the streaming statistics
(``probes.class_means_update``, ``subspaces.covariance_update``) and :func:`idesign.sae.train_sae_batches`.

Layout of a store directory::

    meta.json              model identity, sites, options, dataset size, shard count (written first)
    shard-00000/           one directory per shard of `shard_rows` dataset rows, complete or absent
        shard.json         its rows, dataset row range, and each array's dtype and shape
        _tokens.npy        the token ids of its dataset rows (checked when a writer resumes)
        <site>.npy         [rows, ...] activations of each site (``blocks.0.resid_post.npy``)
        <column>.npy       the dataset's other columns (labels, ``row``/``position`` for a token mask)

**Resumable.** A shard is written into ``shard-XXXXX.tmp/`` and renamed into place when complete (a directory
rename is atomic), so an interrupted writer leaves only complete shards plus a temporary directory. Running
:func:`write_store` again with the same arguments removes the temporary directory, skips the complete shards
(after checking that their token ids are the dataset's) and writes the rest; the files are identical to an
uninterrupted run's. ``max_shards`` writes a budgeted number of shards per call (a Colab session at a time).

**Checked.** ``meta.json`` records a model identity (its type, config, site names, parameter shapes and a
sample of parameter values, plus an optional ``model_id``), the sites and the options. Writing into or opening
a store with another model, other sites or other options raises an error that names what differs.

**Why numpy shards, not tensorstore/zarr.** Each array of a shard is one plain ``.npy`` file: no dependency
beyond numpy (tensorstore only arrives through orbax, which may change it), readable with ``np.load`` anywhere
(Colab, another framework), memory-mapped for random access (a shuffled batch reads only its rows), and
atomic per shard with a directory rename. zarr/tensorstore would add chunk-level compression and cloud
(``gs://``) paths; write to a local disk and copy the directory instead.

>>> import tempfile, numpy as np, idesign as ids
>>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
>>> data = {'tokens': np.arange(60).reshape(10, 6) % 11, 'label': np.arange(10) % 2}
>>> path = tempfile.mkdtemp()
>>> store = ids.activation_store.write_store(path, apply, params, data, 'blocks.0.resid_post', batch_size=2,
...                                          shard_rows=4, positions='last', progress=False)
>>> len(store), store.shape('blocks.0.resid_post'), store.n_shards
(10, (10, 8), 3)
>>> [b['label'].tolist() for b in store.batches(4, keys=['label'], shuffle=True, seed=0)]
[[0, 0, 0, 1], [1, 1, 1, 0], [0, 1]]
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from idesign import tree as tree_lib
from idesign.activations import FunctionalModel, stream_activations
from idesign.hooks import with_sub_sites
from idesign._store_identity import (StoreMismatchError, _check_meta, _hooks_desc, _jsonable,
                                     _positions_desc, model_identity)

FORMAT = "idesign.activation_store"
VERSION = 1
_TOKENS = "_tokens"
_WRITE_THREAD = True
_HEADER = 256  # bytes reserved for a .npy header; a multiple of 64, as the format asks



class _NpyWriter:
    """Appends arrays to a ``.npy`` file whose header (shape) is written last, into space reserved up front."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.file = open(path, "wb")
        self.file.write(b"\0" * _HEADER)
        self.rows, self.dtype, self.tail = 0, None, None

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if self.dtype is None:
            self.dtype, self.tail = array.dtype, array.shape[1:]
        elif array.dtype != self.dtype or array.shape[1:] != self.tail:
            raise ValueError(f"{self.path.name}: a batch has dtype {array.dtype} and shape {array.shape}; earlier batches "
                             f"had {self.dtype} and [rows, *{self.tail}].")
        self.file.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.rows += len(array)

    def close(self) -> tuple[str, tuple[int, ...]]:
        shape = (self.rows, *self.tail)
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        body = header.encode("latin1").ljust(_HEADER - 11) + b"\n"
        self.file.seek(0)
        self.file.write(np.lib.format.magic(1, 0) + struct.pack("<H", len(body)) + body)
        self.file.close()
        return str(self.dtype), shape


def _storable(array: np.ndarray, key: str) -> tuple[np.ndarray, str]:
    """The array as .npy can hold it, and the dtype to read it back as (bfloat16 travels as uint16)."""
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:
        return array.view(np.uint16), "bfloat16"
    if array.dtype == object:
        raise TypeError(f"write_store: column {key!r} holds Python objects (ragged or strings of mixed types), which "
                        "a .npy shard cannot hold; leave it out with columns=[...].")
    return array, str(array.dtype)



def _dataset_rows(dataset: Any, start: int, stop: int) -> Any:
    if isinstance(dataset, Mapping):
        return {k: v[start:stop] for k, v in dataset.items()}
    return dataset.select(range(start, stop))


def _dataset_len(dataset: Any) -> int:
    if isinstance(dataset, Mapping):
        lengths = {len(v) for v in dataset.values()}
        if len(lengths) != 1:
            raise ValueError(f"write_store: dataset columns have different lengths {sorted(lengths)}.")
        return lengths.pop()
    return len(dataset)


def _column(dataset: Any, name: str, start: int, stop: int) -> np.ndarray:
    if isinstance(dataset, Mapping):
        return np.asarray(dataset[name][start:stop])
    return np.asarray(dataset.select_columns([name]).with_format("numpy")[start:stop][name])


def _shard_dir(root: pathlib.Path, i: int) -> pathlib.Path:
    return root / f"shard-{i:05d}"


def write_store(path: str | os.PathLike, apply: FunctionalModel, params: Any, dataset: Any,
                sites: str | Sequence[str], *, batch_size: int, shard_rows: int | None = None,
                tokens_column: str = "tokens", model_id: str | None = None, max_shards: int | None = None,
                progress: bool = True, **stream_kwargs: Any) -> "ActivationStore":
    """Streams ``sites`` over ``dataset`` into a sharded store at ``path`` (resuming one that is partly written).

    Args:
      path: the store directory (created if needed).
      apply, params, dataset, sites, batch_size, tokens_column: as :func:`idesign.activations.stream_activations`
        (site names may include sub-sites that ``hooks`` open, e.g. an SAE splice's ``<site>.sae.features``).
      shard_rows: dataset rows per shard (a multiple of ``batch_size``; default ``16 * batch_size``).
      model_id: an optional model name recorded in the identity (tells checkpoints of one config apart by name).
      max_shards: write at most this many missing shards in this call, then return (``None``: all of them);
        the store is complete when :attr:`ActivationStore.complete` says so.
      progress: a progress bar over shards.
      **stream_kwargs: ``positions``, ``reduce``, ``valid_column``, ``pad_id``, ``columns``, ``dtype``, ``hooks``,
        ``mesh`` of :func:`idesign.activations.stream_activations`.

    Returns:
      The :class:`ActivationStore` (complete unless ``max_shards`` stopped early).

    Raises:
      StoreMismatchError: ``path`` already holds a store of another model, other sites or other options.
      ValueError: bad sizes, or a complete shard whose token ids are not the dataset's rows.

    Two shards of the last token's residual stream plus the ``label`` column; ``max_shards=1`` stops after one
    shard (a session's budget) and the same call again finishes the store:

    >>> import tempfile, numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> data = {'tokens': np.arange(24).reshape(8, 3) % 11, 'label': np.arange(8) % 2}
    >>> path = tempfile.mkdtemp()
    >>> kw = dict(batch_size=2, shard_rows=4, positions='last', progress=False)
    >>> write_store(path, apply, params, data, 'blocks.0.resid_post', max_shards=1, **kw).complete
    False
    >>> store = write_store(path, apply, params, data, 'blocks.0.resid_post', **kw)
    >>> store.complete, store.keys, store.shape('blocks.0.resid_post')
    (True, ['blocks.0.resid_post', 'label', 'tokens'], (8, 8))
    """
    root = pathlib.Path(path)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"write_store: batch_size = {batch_size!r}; expected an integer >= 1.")
    shard_rows = 16 * batch_size if shard_rows is None else shard_rows
    if not isinstance(shard_rows, (int, np.integer)) or shard_rows < 1 or shard_rows % batch_size:
        raise ValueError(f"write_store: shard_rows = {shard_rows!r} must be a positive multiple of batch_size = "
                         f"{batch_size} (a shard is whole batches, so no batch is padded mid-store).")
    stream_kwargs.pop("progress", None)
    hooks = stream_kwargs.get("hooks")
    resolved = tree_lib.expand_patterns([sites] if isinstance(sites, str) else list(sites),
                                        with_sub_sites(hooks, apply.site_names), what="site")
    n = _dataset_len(dataset)
    if n == 0:
        raise ValueError("write_store: the dataset has no rows.")
    positions = stream_kwargs.get("positions")
    options = {"batch_size": int(batch_size), "shard_rows": int(shard_rows), "tokens_column": tokens_column,
               "positions": _positions_desc(positions), "hooks": _hooks_desc(hooks),
               **{k: _jsonable(stream_kwargs.get(k)) for k in ("reduce", "valid_column", "pad_id", "columns", "dtype")},
               "dataset_rows": n}
    if callable(stream_kwargs.get("reduce")):
        options["reduce"] = _positions_desc(stream_kwargs["reduce"])
    model = model_identity(apply, params, model_id)
    n_shards = -(-n // shard_rows)
    meta = {"format": FORMAT, "version": VERSION, "model": model, "sites": resolved, "options": options,
            "n_shards": n_shards}
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "meta.json"
    if meta_path.exists():
        stored = _read_meta(root)
        _check_meta(root, stored, model, resolved, options)
    else:
        _atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True))
    todo = [i for i in range(n_shards) if not _shard_dir(root, i).is_dir()]
    for i in range(n_shards):
        if i not in todo:
            _check_shard_tokens(root, i, dataset, tokens_column, shard_rows, n)
    if max_shards is not None:
        todo = todo[:max_shards]
    bar = tqdm(total=len(todo), desc="store", unit="shard", disable=not progress)
    for i in todo:
        _write_shard(root, i, apply, params, dataset, resolved, batch_size, shard_rows, n, tokens_column,
                     positions, stream_kwargs)
        bar.update(1)
    bar.close()
    return ActivationStore(root)


def _check_shard_tokens(root: pathlib.Path, i: int, dataset: Any, tokens_column: str, shard_rows: int, n: int) -> None:
    start, stop = i * shard_rows, min((i + 1) * shard_rows, n)
    stored = np.load(_shard_dir(root, i) / f"{_TOKENS}.npy", mmap_mode="r")
    given = _column(dataset, tokens_column, start, stop)
    if stored.shape != given.shape or not np.array_equal(stored, given):
        raise StoreMismatchError(f"{_shard_dir(root, i)} holds the activations of other token ids than dataset rows "
                                 f"{start}..{stop - 1}; this store was written from another dataset (or order). "
                                 "Write to a new path.")


def _write_shard(root: pathlib.Path, i: int, apply: Any, params: Any, dataset: Any, sites: list[str],
                 batch_size: int, shard_rows: int, n: int, tokens_column: str, positions: Any,
                 stream_kwargs: dict[str, Any]) -> None:
    start, stop = i * shard_rows, min((i + 1) * shard_rows, n)
    final, tmp = _shard_dir(root, i), root / f"shard-{i:05d}.tmp"
    if tmp.exists():  # left by an interrupted writer
        shutil.rmtree(tmp)
    tmp.mkdir()
    kwargs = dict(stream_kwargs)
    if positions is not None and not isinstance(positions, str) and not callable(positions):
        kwargs["positions"] = np.asarray(positions)[start:stop]
    rows = _dataset_rows(dataset, start, stop)
    np.save(tmp / f"{_TOKENS}.npy", _column(dataset, tokens_column, start, stop))
    writers: dict[str, _NpyWriter] = {}
    dtypes: dict[str, str] = {}
    columns = dataset.keys() if isinstance(dataset, Mapping) else dataset.column_names
    added_rows = "row" not in columns  # a boolean positions mask adds `row`, counted from this shard's start

    def write(batch: dict[str, np.ndarray]) -> None:
        for key, value in batch.items():
            if key not in writers:
                writers[key] = _NpyWriter(tmp / f"{key}.npy")
            array, dtypes[key] = _storable(value, key)
            writers[key].append(array)

    # Disk writes run on a thread while the next forward pass runs; at most two batches wait (bounded memory).
    pending: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def drain() -> None:
        while (batch := pending.get()) is not None:
            if not failure:
                try:
                    write(batch)
                except BaseException as e:  # re-raised on the main thread
                    failure.append(e)

    worker = threading.Thread(target=drain, daemon=True)
    if _WRITE_THREAD:
        worker.start()
    try:
        for batch in stream_activations(apply, params, rows, sites, batch_size=batch_size,
                                        tokens_column=tokens_column, progress=False, **kwargs):
            if added_rows and "row" in batch and "position" in batch:
                batch["row"] = batch["row"] + start  # rows of the whole dataset, not of this shard
            if _WRITE_THREAD:
                pending.put(batch)
            else:
                write(batch)
            if failure:
                break
    finally:
        if _WRITE_THREAD:
            pending.put(None)
            worker.join()
    if failure:
        raise failure[0]
    info = {"dataset_rows": [start, stop], "rows": None, "arrays": {}}
    for key, writer in writers.items():
        _, shape = writer.close()
        info["arrays"][key] = {"dtype": dtypes[key], "shape": list(shape)}
        info["rows"] = shape[0] if info["rows"] is None else info["rows"]
    _atomic_write_text(tmp / "shard.json", json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, final)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_meta(root: pathlib.Path) -> dict[str, Any]:
    path = root / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an activation store (no meta.json); write one with write_store.")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this library reads "
                         f"{FORMAT!r} version {VERSION}.")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Reading.


class ActivationStore:
    """A store on disk (see the module docstring): sizes, metadata, and batches read from memory-mapped shards.

    Build one with :func:`write_store` or :func:`open_store`. Keys are the stored sites and columns.

    Attributes:
      path: the store directory.
      meta: ``meta.json``: model identity, sites, options, ``n_shards``.
      n_shards: shards the finished store has.
      complete: whether every shard is written (reading batches needs it).

    >>> import tempfile, numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> path = tempfile.mkdtemp()
    >>> _ = ids.activation_store.write_store(path, apply, params, {'tokens': np.ones((5, 3), np.int32)}, 'embed',
    ...                                      batch_size=1, shard_rows=2, positions='last', progress=False)
    >>> store = ids.activation_store.ActivationStore(path)
    >>> len(store), store.n_shards, store.complete, store.sites
    (5, 3, True, ['embed'])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.meta = _read_meta(self.path)
        self.n_shards = int(self.meta["n_shards"])
        self._shards = [json.loads((_shard_dir(self.path, i) / "shard.json").read_text())
                        for i in range(self.n_shards) if _shard_dir(self.path, i).is_dir()]
        self.complete = len(self._shards) == self.n_shards
        self._offsets = np.cumsum([0] + [s["rows"] for s in self._shards])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def sites(self) -> list[str]:
        """The stored sites, in order (patterns resolved when the store was written).

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2))
        >>> path = tempfile.mkdtemp()
        >>> ids.activation_store.write_store(path, apply, params, {'tokens': np.ones((2, 3), np.int32)},
        ...                                  'blocks.*.resid_post', batch_size=2, progress=False).sites
        ['blocks.0.resid_post', 'blocks.1.resid_post']
        """
        return list(self.meta["sites"])

    @property
    def keys(self) -> list[str]:
        """Every stored array: sites, then the dataset's columns (its token ids too).

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> data = {'tokens': np.ones((2, 3), np.int32), 'label': np.array([0, 1])}
        >>> ids.activation_store.write_store(tempfile.mkdtemp(), apply, params, data, 'embed', batch_size=2,
        ...                                  positions='last', progress=False).keys
        ['embed', 'label', 'tokens']
        """
        return list(self._shards[0]["arrays"]) if self._shards else []

    def __len__(self) -> int:
        """Rows (activation rows: dataset rows, or marked tokens with a boolean ``positions`` mask).

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> mask = np.array([[True, False, True], [False, False, True]])          # 3 marked tokens in 2 rows
        >>> len(ids.activation_store.write_store(tempfile.mkdtemp(), apply, params, {'tokens': np.ones((2, 3), np.int32)},
        ...                                      'embed', batch_size=2, positions=mask, progress=False))
        3
        """
        return int(self._offsets[-1])

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` over the whole store (rows first), without reading it.

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> store = ids.activation_store.write_store(tempfile.mkdtemp(), apply, params, {'tokens': np.ones((4, 3), np.int32)},
        ...                                          'embed', batch_size=2, progress=False)
        >>> store.shape('embed')
        (4, 3, 8)
        """
        info = self._info(key)
        return (len(self), *info["shape"][1:])

    def dtype(self, key: str) -> Any:
        """The dtype ``key`` is read as (bfloat16 is stored as uint16 and read back as bfloat16).

        >>> import tempfile, numpy as np, jax.numpy as jnp, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> store = ids.activation_store.write_store(tempfile.mkdtemp(), apply, params, {'tokens': np.ones((2, 3), np.int32)},
        ...                                          'embed', batch_size=2, dtype=jnp.bfloat16, progress=False)
        >>> store.dtype('embed'), store.read('embed', [0]).dtype
        (dtype(bfloat16), dtype(bfloat16))
        """
        return jnp.dtype(self._info(key)["dtype"])

    def _info(self, key: str) -> dict[str, Any]:
        if not self._shards:
            raise ValueError(f"{self.path}: no shard is written yet.")
        if key not in self._shards[0]["arrays"]:
            raise KeyError(f"{key!r} is not in the store at {self.path}; it holds {self.keys}.")
        return self._shards[0]["arrays"][key]

    def _map(self, shard: int, key: str) -> np.ndarray:
        if (shard, key) not in self._maps:
            array = np.load(_shard_dir(self.path, shard) / f"{key}.npy", mmap_mode="r")
            self._maps[shard, key] = array
        return self._maps[shard, key]

    def _read(self, key: str, index: np.ndarray) -> np.ndarray:
        info = self._info(key)
        out = None
        shard_of = np.searchsorted(self._offsets, index, side="right") - 1
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            local = index[sel] - self._offsets[shard]
            mm = self._map(int(shard), key)
            # contiguous runs read as slices (one sequential read); shuffled ones gather sorted rows
            if len(local) and local[-1] - local[0] == len(local) - 1 and np.all(np.diff(local) == 1):
                rows = np.asarray(mm[local[0]:local[-1] + 1])
            else:
                order = np.argsort(local, kind="stable")
                rows = np.empty((len(local), *mm.shape[1:]), mm.dtype)
                rows[order] = mm[local[order]]
            if out is None:
                out = np.empty((len(index), *mm.shape[1:]), mm.dtype)
            out[sel] = rows
        if out is None:
            out = np.empty((0, *info["shape"][1:]), np.uint16 if info["dtype"] == "bfloat16" else info["dtype"])
        return out.view(jnp.bfloat16) if info["dtype"] == "bfloat16" else out

    def read(self, key: str, rows: Any) -> np.ndarray:
        """Rows ``rows`` (indices into the whole store) of ``key``, as a numpy array.

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> path = tempfile.mkdtemp()
        >>> store = ids.activation_store.write_store(path, apply, params, {'tokens': np.ones((6, 3), np.int32)},
        ...                                          'embed', batch_size=2, shard_rows=2, progress=False)
        >>> store.read('embed', [5, 0]).shape
        (2, 3, 8)
        """
        index = np.asarray(rows, np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)}) for the store at {self.path}.")
        return self._read(key, index)

    def batches(self, batch_size: int, *, keys: Sequence[str] | None = None, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yields ``{key: [batch, ...]}`` over the store; only the batch is in memory.

        Args:
          batch_size: rows per batch.
          keys: which sites and columns to read (default: all).
          shuffle: a permutation of all rows drawn from ``seed`` (the same seed, the same batches).
          seed: the permutation's seed.
          drop_last: skip a last, short batch.

        Raises:
          ValueError: the store is not complete (finish it with :func:`write_store`, which resumes).
          KeyError: a key that is not stored (the message lists the stored ones).

        >>> import tempfile, numpy as np, idesign as ids
        >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
        >>> data = {'tokens': np.ones((5, 3), np.int32), 'id': np.arange(5)}
        >>> store = ids.activation_store.write_store(tempfile.mkdtemp(), apply, params, data, 'embed', batch_size=1,
        ...                                          positions='last', progress=False)
        >>> [(b['embed'].shape, b['id'].tolist()) for b in store.batches(2)]
        [((2, 8), [0, 1]), ((2, 8), [2, 3]), ((1, 8), [4])]
        >>> [b['id'].tolist() for b in store.batches(2, keys=['id'], shuffle=True, seed=1, drop_last=True)]
        [[4, 0], [1, 2]]
        """
        if not self.complete:
            raise ValueError(f"{self.path}: {len(self._shards)} of {self.n_shards} shards are written; finish the store "
                             "with write_store(...) (it resumes) before reading it.")
        keys = self.keys if keys is None else list(keys)
        for key in keys:
            self._info(key)
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield {key: self._read(key, index) for key in keys}

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self._shards)}/{self.n_shards} shards"
        return f"ActivationStore({str(self.path)!r}, rows={len(self)}, sites={self.sites}, {state})"


def open_store(path: str | os.PathLike, *, apply: FunctionalModel | None = None, params: Any = None,
               sites: str | Sequence[str] | None = None, model_id: str | None = None,
               hooks: Any = None) -> ActivationStore:
    """Opens a store; checks it against a model and sites when given.

    Args:
      path: the store directory.
      apply, params: the model the caller expects (both, to check its identity; see :func:`model_identity`).
      sites: the sites (names or patterns, resolved against ``apply`` when given) the caller expects.
      model_id: the ``model_id`` given when writing.
      hooks: the hooks that opened sub-sites (an SAE splice), to resolve ``sites`` patterns.

    Raises:
      StoreMismatchError: another model or other sites than the store was written with; the message names what
        differs.

    >>> import tempfile, numpy as np, idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1)
    >>> apply, params = ids.init_transformer(cfg)
    >>> path = tempfile.mkdtemp()
    >>> _ = ids.activation_store.write_store(path, apply, params, {'tokens': np.ones((4, 3), np.int32)},
    ...                                      'blocks.*.resid_post', batch_size=2, progress=False)
    >>> open_store(path, apply=apply, params=params, sites='blocks.*.resid_post').shape('blocks.0.resid_post')
    (4, 3, 8)
    >>> _, other = ids.init_transformer(cfg, seed=1)                   # same config, other weights
    >>> try:
    ...     open_store(path, apply=apply, params=other)
    ... except StoreMismatchError as e:
    ...     print('param_values' in str(e))
    True
    """
    store = ActivationStore(path)
    model = model_identity(apply, params, model_id) if apply is not None and params is not None else None
    resolved = None
    if sites is not None:
        names = [sites] if isinstance(sites, str) else list(sites)
        resolved = (tree_lib.expand_patterns(names, with_sub_sites(hooks, apply.site_names), what="site")
                    if apply is not None else names)
    _check_meta(store.path, store.meta, model, resolved, None)
    return store


__all__ = ["ActivationStore", "StoreMismatchError", "model_identity", "open_store", "write_store"]
