"""Activations at scale: run a model over a dataset in batches and stream chosen sites to the host.

:func:`stream_activations` yields one dict of numpy arrays per batch — the captured sites plus the
batch's other columns — so a caller that only accumulates sufficient statistics (class means,
covariances) never holds every activation. :func:`collect_activations` concatenates the stream
when everything fits in memory. Both work with any functional model that has ``site_names`` and
``__call__(params, tokens, *, hooks=None, valid=None)``, such as the reference transformer from
:func:`idesign.init_transformer`.

The forward pass is compiled once: the last, short batch is padded to a full batch by repeating
its rows and the padding is dropped on the host. Positions are selected — and optionally pooled —
on the device, before anything is transferred, so only the rows a probe needs leave it:

==========================  ============================================================  ======================
``positions``               selects                                                       site output
==========================  ============================================================  ======================
``None``                    every position                                                ``[B, T, ...]`` as captured
``"last"``                  the last valid token of each row (see ``pad_id``)             ``[B, ...]``
int column / array ``[B]``  one position per row (negative counts from the end)           ``[B, ...]``
int ``[B, K]``              ``K`` positions per row                                       ``[B, K, ...]``
bool ``[B, T]`` mask        the marked tokens, flattened into a token table               ``[n_marked, ...]``
==========================  ============================================================  ======================

``positions`` may name a column, be an array over the whole dataset (sliced per batch), or be a
function ``batch -> array`` computed on the host from the batch's columns. In the mask case every row-level column is repeated per marked token,
columns shaped ``[B, T, ...]`` (e.g. per-token labels, ``tokens`` itself) are read at the marked
tokens, and two columns are added: ``row`` (the dataset row) and ``position``.

``reduce`` pools over the selected positions instead (``"mean"``, ``"max"``, ``"sum"`` or a
function ``(x [B, P, ...], mask [B, P]) -> [B, ...]``): with ``positions=None`` over the valid
tokens, with a mask over the marked valid tokens (span pooling), with ``[B, K]`` indices over the
``K`` positions. The result is one vector per row.

The token axis is axis 1 of every site except attention patterns (``*.attn.pattern``,
``[B, H, T, S]``), where it is the query axis 2; selecting positions removes that axis.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from idesign import distributed
from idesign import sharding as sharding_lib
from idesign import tree as tree_lib
from idesign._types import Array
from idesign.hooks import Capture, Hooks, merge_hooks, with_sub_sites

Positions = None | str | np.ndarray | Callable[[dict[str, np.ndarray]], np.ndarray]
Reduce = None | Literal["mean", "max", "sum"] | Callable[[Array, Array], Array]
_ADDED_COLUMNS = ("row", "position")


class FunctionalModel(Protocol):
    """What :func:`stream_activations` needs of a model."""

    site_names: Sequence[str]

    def __call__(self, params: Any, tokens: Array, *, hooks: Hooks | None = None,
                 valid: Array | None = None) -> tuple[Array, dict[str, Array]]: ...


# ----------------------------------------------------------------------------------------------
# Reading the dataset batch by batch.


class _Source:
    """Row slices of a ``datasets.Dataset`` (read lazily, batch by batch) or a dict of arrays."""

    def __init__(self, data: Any):
        if hasattr(data, "with_format") and hasattr(data, "column_names"):
            self.columns = list(data.column_names)
            self.n = len(data)
            self._dataset, self._arrays = data, None
        elif isinstance(data, Mapping):
            self._arrays = {str(k): _column_array(v) for k, v in data.items()}
            self.columns = list(self._arrays)
            lengths = {k: len(v) for k, v in self._arrays.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"stream_activations: columns have different lengths {lengths}.")
            self.n = next(iter(lengths.values()), 0)
        else:
            raise TypeError(f"dataset must be a datasets.Dataset or a dict of arrays; got {type(data).__name__}.")
        self._read = self.columns

    def read_only(self, columns: Sequence[str]) -> None:
        """Restricts what :meth:`rows` reads (a Dataset then decodes only these columns)."""
        self._read = list(columns)
        if self._arrays is None:
            self._dataset = self._dataset.select_columns(self._read).with_format("numpy")

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return {c: self._arrays[c][start:stop] for c in self._read}
        batch = self._dataset[start:stop]
        return {c: np.asarray(batch[c]) for c in self._read}


def _column_array(values: Any) -> np.ndarray:
    try:
        return np.asarray(values)
    except ValueError:  # ragged rows
        out = np.empty(len(values), object)
        out[:] = [np.asarray(v) for v in values]
        return out


def _check_column(name: str, role: str, columns: Sequence[str]) -> None:
    if name not in columns:
        raise KeyError(f"{role}={name!r} is not a column of the dataset; its columns are {list(columns)}.")


def _tokens(batch: Mapping[str, np.ndarray], column: str, start: int, seq_len: int | None) -> np.ndarray:
    tokens = batch[column]
    if tokens.dtype == object or tokens.ndim != 2:
        raise ValueError(f"column {column!r} must hold token ids of one fixed length ([rows, seq]); rows "
                         f"{start}.. have {'different lengths' if tokens.dtype == object else f'shape {tokens.shape}'}. "
                         "Pad them to one length and pass valid_column= to mark the real tokens.")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"column {column!r} must hold integer token ids; got dtype {tokens.dtype}.")
    if seq_len is not None and tokens.shape[1] != seq_len:
        raise ValueError(f"column {column!r} has sequences of length {tokens.shape[1]} from row {start}, but "
                         f"{seq_len} before; a stream needs one fixed length (pad every row to it).")
    return tokens.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Positions: resolved on the host into what the device gathers.


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Host arrays for one batch: ``index`` to gather (per row, or flat over B*T), ``mask`` to pool over."""

    mode: Literal["all", "index", "pool", "flat"]
    index: np.ndarray | None = None
    mask: np.ndarray | None = None
    count: int | None = None  # flat mode: real entries of ``index`` before bucket padding


def _resolve_positions(positions: Positions, batch: dict[str, np.ndarray], valid: np.ndarray | None,
                       seq_len: int, start: int, reduce: Reduce) -> _Selection:
    rows = len(next(iter(batch.values())))
    where = f"rows {start}..{start + rows - 1}"
    if positions is None:
        if reduce is None:
            return _Selection("all")
        return _pooled(np.ones((rows, seq_len), bool) if valid is None else valid, "valid_column", start)
    if isinstance(positions, str) and positions == "last":
        if reduce is not None:
            raise ValueError("reduce= pools over several positions, but positions='last' selects one per row.")
        if valid is None:
            return _Selection("index", np.full(rows, seq_len - 1))
        empty = ~valid.any(axis=1)
        if empty.any():
            raise ValueError(f"positions='last': row {start + int(np.argmax(empty))} has no valid token.")
        return _Selection("index", seq_len - 1 - np.argmax(valid[:, ::-1], axis=1))
    if isinstance(positions, str):
        chosen, name = batch[positions], f"positions {positions!r}"
    elif callable(positions):
        chosen, name = np.asarray(positions(batch)), "positions(batch)"
    else:
        chosen, name = np.asarray(positions)[start:start + rows], "positions"
    if chosen.dtype == bool:
        if chosen.shape != (rows, seq_len):
            raise ValueError(f"{name} is a boolean mask of shape {chosen.shape}; expected [rows, seq] = {(rows, seq_len)}.")
        mask = chosen if valid is None else chosen & valid
        if reduce is not None:
            return _pooled(mask, name, start)
        flat = np.flatnonzero(mask)
        return _Selection("flat", flat, count=len(flat))
    if not np.issubdtype(chosen.dtype, np.integer) or chosen.ndim not in (1, 2) or len(chosen) != rows:
        raise ValueError(f"{name} must be integer indices [rows] or [rows, K], or a boolean mask [rows, seq]; "
                         f"got dtype {chosen.dtype} and shape {chosen.shape} for {rows} rows ({where}).")
    if (chosen < -seq_len).any() or (chosen >= seq_len).any():
        raise ValueError(f"{name} holds indices outside [-{seq_len}, {seq_len}) in {where} (sequence length {seq_len}).")
    chosen = chosen % seq_len
    if reduce is not None:
        if chosen.ndim == 1:
            raise ValueError(f"reduce= pools over several positions, but {name} selects one per row.")
        return _Selection("index", chosen, np.ones(chosen.shape, bool))
    return _Selection("index", chosen)


def _pooled(mask: np.ndarray, name: str, start: int) -> _Selection:
    empty = ~mask.any(axis=1)
    if empty.any():
        raise ValueError(f"{name}: row {start + int(np.argmax(empty))} marks no valid token to pool over.")
    return _Selection("pool", mask=mask)


def _bucket(count: int, cap: int) -> int:
    """Pads flat selections to powers of two, so a stream compiles O(log(B·T)) times at most."""
    return min(cap, 1 << max(count - 1, 0).bit_length())


# ----------------------------------------------------------------------------------------------
# The device side.


def _token_axis(site: str) -> int:
    return 2 if site.endswith("attn.pattern") else 1


def _pool(x: Array, mask: Array, reduce: Reduce) -> Array:
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    if callable(reduce):
        return reduce(x, mask)
    if reduce == "max":
        return jnp.where(m, x, jnp.finfo(x.dtype).min).max(axis=1)
    total = jnp.where(m, x, 0).sum(axis=1)
    return total if reduce == "sum" else total / m.sum(axis=1).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("apply", "sites", "mode", "reduce", "dtype"))
def _forward(params, tokens, valid, index, mask, hooks, *, apply, sites, mode, reduce, dtype):
    kwargs = {} if valid is None else {"valid": valid}
    _, captured = apply(params, tokens, hooks=hooks, **kwargs)
    out = {}
    for site in sites:
        x = captured[site]
        if mode != "all":
            axis = _token_axis(site)
            if x.ndim <= axis or x.shape[axis] != tokens.shape[1]:
                raise ValueError(f"site {site!r} has shape {x.shape}; positions need a token axis {axis} of "
                                 f"length {tokens.shape[1]}. Use positions=None for this site.")
            x = jnp.moveaxis(x, axis, 1)
            if mode == "flat":
                x = x.reshape((-1,) + x.shape[2:])[index]
            elif mode == "index":
                per_row = index if index.ndim == 2 else index[:, None]
                x = x[jnp.arange(x.shape[0])[:, None], per_row]
                x = x if index.ndim == 2 else x[:, 0]
            if mask is not None:
                x = _pool(x, mask, reduce)
        out[site] = x if dtype is None else x.astype(dtype)
    return out


def _with_captures(hooks: Hooks | None, sites: Sequence[str]) -> dict:
    chains = merge_hooks(hooks)
    for site in sites:
        chain = chains.get(site, ())
        if not any(isinstance(i, Capture) for i in chain):
            chains[site] = chain + (Capture(),)
    return chains


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    return x if len(x) == size else x[np.arange(size) % len(x)]


# ----------------------------------------------------------------------------------------------
# Public API.


def stream_activations(apply: FunctionalModel, params: Any, dataset: Any, sites: str | Sequence[str], *,
                       batch_size: int, tokens_column: str = "tokens", valid_column: str | None = None,
                       pad_id: int | None = None, positions: Positions = None, reduce: Reduce = None, columns: Sequence[str] | None = None,
                       dtype: Any = None, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                       hooks: Hooks | None = None, desc: str = "activations") -> Iterator[dict[str, np.ndarray]]:
    """Runs ``apply`` over ``dataset`` in batches and yields each batch's activations as numpy arrays.

    Everything is validated before the first batch runs; the forward pass is jitted once per batch
    shape (the last batch is padded to ``batch_size`` and the padding dropped), and reused across
    calls with the same ``apply``, sites and options. See the module docstring for ``positions``
    and ``reduce``.

    Args:
      apply: a functional model with ``site_names`` and ``__call__(params, tokens, *, hooks, valid)``.
      params: its parameters (already sharded when ``mesh`` is given).
      dataset: a ``datasets.Dataset`` (read one batch at a time) or a dict of arrays.
      sites: site names or glob patterns, e.g. ``"blocks.*.resid_post"``; checked against ``apply.site_names``.
      batch_size: rows per forward pass (divisible by the mesh's ``data`` axis when ``mesh`` is given).
      tokens_column: the ``[rows, seq]`` integer token ids.
      valid_column: optional ``[rows, seq]`` mask of real tokens, passed to ``apply`` as ``valid=``.
      pad_id: the padding token id, for data without a ``valid_column``: the leading and trailing runs of
        ``pad_id`` in each row are padding (so right-padded rows read their last real token with
        ``positions="last"``, and left padding is masked). A sequence that really begins or ends with
        that id loses those tokens; pass ``valid_column`` to be exact. Without either, every token is
        real: ``positions="last"`` reads the final column, which is a pad in a right-padded row.
      positions: which token positions to keep: ``None``, ``"last"``, a column name, an array with one
        entry per dataset row, or an array-valued function of the batch.
      reduce: pool the selected positions into one vector per row.
      columns: dataset columns to yield alongside the activations (default: all of them).
      dtype: cast activations on the device before the transfer (e.g. ``jnp.float16`` to halve it).
      mesh: place each batch with :func:`idesign.sharding.shard_batch` (data parallel).
      progress: show a progress bar over rows.
      hooks: interventions applied during the forward pass (e.g. steering), beside the captures.
      desc: the progress bar's label.

    Yields:
      ``{site: activations, column: values}`` for each batch (plus ``row`` and ``position`` when a
      boolean mask selects tokens).

    >>> import numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> data = {'tokens': np.ones((5, 6), np.int32), 'label': np.arange(5)}
    >>> for b in ids.activations.stream_activations(apply, params, data, 'blocks.0.resid_post', batch_size=4,
    ...                                             positions='last', progress=False):
    ...     print(b['blocks.0.resid_post'].shape, b['label'])
    (4, 8) [0 1 2 3]
    (1, 8) [4]
    """
    if not (hasattr(apply, "site_names") and callable(apply)):
        raise TypeError("apply must be a functional model with `site_names` and "
                        "`__call__(params, tokens, *, hooks=None, valid=None)`, e.g. from ids.init_transformer.")
    # with_sub_sites: sites opened by hooked interventions (an SAE splice's `<site>.sae.features`) count too
    resolved = tuple(tree_lib.expand_patterns([sites] if isinstance(sites, str) else list(sites),
                                              with_sub_sites(hooks, apply.site_names), what="site"))
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size = {batch_size!r}: expected an integer >= 1.")
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's 'data' axis of size {mesh.shape['data']}.")
    if reduce is not None and not callable(reduce) and reduce not in ("mean", "max", "sum"):
        raise ValueError(f"reduce = {reduce!r}: expected None, 'mean', 'max', 'sum' or a function (x, mask) -> pooled.")
    source = _Source(dataset)
    if source.n == 0:
        raise ValueError("stream_activations: the dataset has no rows.")
    _check_column(tokens_column, "tokens_column", source.columns)
    if valid_column is not None:
        _check_column(valid_column, "valid_column", source.columns)
        if pad_id is not None:
            raise ValueError(f"stream_activations: give valid_column ({valid_column!r}) or pad_id ({pad_id}), not both: "
                             "the valid column already says which tokens are padding.")
    elif pad_id is None:
        unused = [c for c in ("valid", "attention_mask") if c in source.columns]
        if unused:
            warnings.warn(f"stream_activations: the dataset has a {unused[0]!r} column but valid_column=None, so padding "
                          "counts as real tokens (attended to; positions='last' reads the final column, a pad in a "
                          f"right-padded row). Pass valid_column={unused[0]!r} (or pad_id=).", UserWarning, stacklevel=2)
    if pad_id is not None and not isinstance(pad_id, (int, np.integer)):
        raise TypeError(f"stream_activations: pad_id = {pad_id!r}; expected an integer token id (or None).")
    if isinstance(positions, str) and positions != "last":
        _check_column(positions, "positions", source.columns)
    elif positions is not None and not isinstance(positions, str) and not callable(positions):
        if not hasattr(positions, "shape") or not np.shape(positions) or len(positions) != source.n:
            raise ValueError(f"positions must be None, 'last', a column name, a function of the batch, or an array with "
                             f"one entry per dataset row ({source.n}); got {type(positions).__name__} of shape "
                             f"{np.shape(positions) if hasattr(positions, 'shape') else '?'}.")
        positions = np.asarray(positions)
    out_columns = list(source.columns if columns is None else columns)
    for c in out_columns:
        _check_column(c, "columns", source.columns)
    clashes = sorted(set(resolved) & set(out_columns))
    if clashes:
        raise ValueError(f"columns {clashes} have the same names as captured sites; leave them out with columns=.")
    read = list(dict.fromkeys([tokens_column, *([valid_column] if valid_column else []),
                               *([positions] if isinstance(positions, str) and positions != "last" else []),
                               *out_columns]))
    source.read_only(read)
    chains = _with_captures(hooks, resolved)
    static = dict(apply=apply, sites=resolved, reduce=reduce, dtype=None if dtype is None else np.dtype(dtype))
    return _stream(source, params, out_columns, static, chains, batch_size=int(batch_size),
                   tokens_column=tokens_column, valid_column=valid_column, pad_id=pad_id, positions=positions,
                   reduce=reduce,
                   mesh=mesh, progress=progress, desc=desc)


def _stream(source: _Source, params: Any, out_columns: list[str], static: dict, chains: dict, *,
            batch_size: int, tokens_column: str, valid_column: str | None, pad_id: int | None,
            positions: Positions, reduce: Reduce,
            mesh: Any, progress: bool, desc: str) -> Iterator[dict[str, np.ndarray]]:
    # Outside a terminal (CI logs, notebooks run headless) redraw rarely, so logs stay readable.
    bar = tqdm(total=source.n, desc=desc, unit="row", disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    seq_len = None
    try:
        for start in range(0, source.n, batch_size):
            batch = source.rows(start, min(start + batch_size, source.n))
            rows = len(batch[tokens_column])
            tokens = _tokens(batch, tokens_column, start, seq_len)
            seq_len = tokens.shape[1]
            valid = None
            if valid_column is not None:
                valid = np.asarray(batch[valid_column]).astype(bool)
                if valid.shape != tokens.shape:
                    raise ValueError(f"valid_column {valid_column!r} has shape {valid.shape} in rows {start}..; "
                                     f"expected the tokens' shape {tokens.shape}.")
            elif pad_id is not None:
                valid = valid_from_pad(tokens, pad_id)
            selection = _resolve_positions(positions, batch, valid, seq_len, start, reduce)
            device = {"tokens": _pad_rows(tokens, batch_size),
                      "valid": None if valid is None else _pad_rows(valid, batch_size),
                      "index": None, "mask": None}
            if selection.mode == "index":
                device["index"] = _pad_rows(np.asarray(selection.index, np.int32), batch_size)
            if selection.mask is not None:
                device["mask"] = _pad_rows(selection.mask, batch_size)
            if selection.mode == "flat":
                size = _bucket(selection.count, batch_size * seq_len)
                device["index"] = np.zeros(size, np.int32)
                device["index"][:selection.count] = selection.index
            placed = _place(device, mesh, flat=selection.mode == "flat")
            acts = _forward(params, placed["tokens"], placed["valid"], placed["index"], placed["mask"], chains,
                            mode=selection.mode, **static)
            acts = distributed.to_host(acts)   # a plain device_get, or a gather when rows live on other processes
            keep = selection.count if selection.mode == "flat" else rows
            out = {site: np.asarray(x)[:keep] for site, x in acts.items()}
            out.update(_columns_for(batch, out_columns, selection, start, seq_len, rows))
            bar.update(rows)
            yield out
    finally:
        bar.close()


def _place(device: dict[str, np.ndarray | None], mesh: Any, flat: bool) -> dict[str, Any]:
    if mesh is None:
        return device
    present = {k: v for k, v in device.items() if v is not None}
    rowwise = {k: v for k, v in present.items() if not (flat and k == "index")}
    placed = {**dict.fromkeys(device), **sharding_lib.shard_batch(rowwise, mesh)}
    if flat:
        placed["index"] = sharding_lib.replicate(present["index"], mesh)
    return placed


def _columns_for(batch: dict[str, np.ndarray], names: Sequence[str], selection: _Selection, start: int,
                 seq_len: int, rows: int) -> dict[str, np.ndarray]:
    if selection.mode != "flat":
        return {c: batch[c] for c in names}
    flat = selection.index
    row, position = flat // seq_len, flat % seq_len
    out = {}
    for c in names:
        x = batch[c]
        per_token = x.dtype != object and x.ndim >= 2 and x.shape[:2] == (rows, seq_len)
        out[c] = x.reshape((rows * seq_len,) + x.shape[2:])[flat] if per_token else x[row]
    clashes = sorted(set(_ADDED_COLUMNS) & set(out))
    if clashes:
        raise ValueError(f"a boolean positions mask adds the columns {list(_ADDED_COLUMNS)}, but the dataset already has "
                         f"{clashes}; leave them out with columns=.")
    out["row"], out["position"] = start + row, position
    return out


def collect_activations(apply: FunctionalModel, params: Any, dataset: Any, sites: str | Sequence[str], *,
                        batch_size: int, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`stream_activations` concatenated over batches: ``{site or column: array over all rows}``.

    Takes the same keyword arguments. Use it when every activation fits in host memory.

    Any functional model works, e.g. a bare embedding lookup with one site:

    >>> import numpy as np, idesign as ids
    >>> class Embed:
    ...     site_names = ('embed',)
    ...     def __call__(self, params, tokens, *, hooks=None, valid=None):
    ...         sites = ids.SiteRunner(hooks, self.site_names)
    ...         h = sites('embed', params[tokens])
    ...         return h, sites.captured
    >>> tokens, valid = ids.activations.pad_tokens([[1, 2, 3], [4]], pad_id=0)
    >>> acts = ids.activations.collect_activations(Embed(), np.eye(5), {'tokens': tokens, 'valid': valid}, 'embed',
    ...                                            batch_size=2, valid_column='valid', reduce='mean', progress=False)
    >>> acts['embed'].shape, acts['embed'][1]  # the mean over row 1's one real token
    ((2, 5), array([0., 0., 0., 0., 1.], dtype=float32))
    """
    parts: dict[str, list[np.ndarray]] = {}
    for batch in stream_activations(apply, params, dataset, sites, batch_size=batch_size, **kwargs):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def valid_from_pad(tokens: Any, pad_id: int) -> np.ndarray:
    """``valid [N, T]``: False on the leading and trailing runs of ``pad_id`` in each row (left or right padding).

    An id equal to ``pad_id`` inside a sequence stays valid; a sequence that really begins or ends with
    it cannot be told from padding (keep :func:`pad_tokens`' ``valid`` for that).

    >>> import idesign as ids
    >>> ids.activations.valid_from_pad([[5, 6, 0, 0], [0, 7, 0, 8]], pad_id=0).astype(int).tolist()
    [[1, 1, 0, 0], [0, 1, 1, 1]]
    """
    is_pad = np.asarray(tokens) == pad_id
    if is_pad.ndim != 2:
        raise ValueError(f"valid_from_pad: tokens must be [N, T]; got shape {is_pad.shape}.")
    leading = np.cumprod(is_pad, axis=1).astype(bool)
    trailing = np.cumprod(is_pad[:, ::-1], axis=1)[:, ::-1].astype(bool)
    return ~(leading | trailing)


def pad_tokens(sequences: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None,
               side: Literal["left", "right"] = "left") -> tuple[np.ndarray, np.ndarray]:
    """Pads token sequences of different lengths into ``(tokens [N, length] int32, valid [N, length] bool)``.

    Left padding (the default) puts every sequence's last token at the final position, so
    ``positions="last"`` and next-token logits line up across rows; the reference transformer
    neither attends to padding nor counts it as a position when given ``valid``.

    >>> import idesign as ids
    >>> tokens, valid = ids.activations.pad_tokens([[5, 6, 7], [8]], pad_id=0)
    >>> tokens.tolist(), valid.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[True, True, True], [False, False, True]])
    """
    if side not in ("left", "right"):
        raise ValueError(f"side = {side!r}: expected 'left' or 'right'.")
    rows = [np.asarray(s, np.int64).reshape(-1) for s in sequences]
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"sequence {int(np.argmax([len(r) for r in rows]))} has {longest} tokens, more than length={length}.")
    tokens = np.full((len(rows), length), pad_id, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        tokens[i, span], valid[i, span] = r, True
    return tokens, valid
