"""K-FAC curvature of dense layers: Kronecker factors ``A``, ``G``, their eigenbases, the spectrum ``Π``.

For a dense layer ``y = x W`` (Flax kernel ``W``: ``[d_in, d_out]``) the K-FAC approximation of the
Fisher block of ``vec(W)`` is ``A ⊗ G`` with

* ``A = E[x xᵀ]``  (``[d_in, d_in]``), ``x`` the layer input at one token position;
* ``G = E[g gᵀ]``  (``[d_out, d_out]``), ``g = ∂L/∂y`` at the same position.

Conventions (Merullo et al. 2025, arXiv 2510.24256; ``docs/methods.md`` §3):

* **Which positions count.** A *forward* (:class:`LMForward`, :class:`ClassifierForward`) turns a
  batch into logits, gold targets and a weight per position; a position counts when its weight is
  ``> 0`` (weights act as a 0/1 mask). For a language model that is every input position whose next
  token is real (``valid``) and scored (``loss_mask``), i.e. exactly the positions ``lm_loss``
  averages over. ``A`` and ``G`` are averages over the same counted positions.
* **The loss** whose gradient gives ``g`` is the *sum* over counted positions of the per-position
  negative log-likelihood, ``L = Σ_t m_t · nll_t`` (not the mean), so ``g_t`` does not shrink with
  the batch size. In a sequence model ``g_t = ∂L/∂y_t`` includes the effect of ``y_t`` on later
  positions through attention (the standard K-FAC treatment of shared weights, as in kfac-jax).
* **True Fisher** (``fisher='true'``, the default): every counted position's target is drawn from
  the model's own softmax, ``jax.random.categorical(key_b, logits)`` with ``key_b =
  jax.random.fold_in(key, b)`` for the ``b``-th batch, one sample per position (teacher forcing:
  the context stays the real prefix). **Empirical Fisher** (``fisher='empirical'``): the gold targets.
* ``g`` is obtained by adding a zero perturbation ``ids.Add(zeros)`` of the output's shape at
  ``<layer>.out`` and differentiating ``L`` with respect to it; ``x`` is captured at ``<layer>.in``.
* Sums are float32 (``einsum`` at ``Precision.HIGHEST``) whatever the model's compute dtype, kept as
  running ``a_sum``, ``g_sum`` and ``count`` (:class:`KFACFactors`); ``A = a_sum / count``. Streaming
  has the library's one spelling: :func:`factors_init`, :func:`make_factors_update` (the update needs the
  model, so it is built once), :func:`factors_finalize`. Sums over
  a batch are global, so collection is correct when the batch is sharded over a mesh's ``data``
  axis (XLA inserts the reductions).

Layers are named by their site prefix: ``blocks.0.mlp.up`` has sites ``blocks.0.mlp.up.in`` /
``.out`` and kernel ``blocks.0.mlp.up.kernel``. This holds for the reference transformer
(``apply.dense_layers``) and for adaptor models (``ids.models.from_nnx`` / ``from_linen``) whose
dense layers are submodules with a 2-D ``kernel`` parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from idesign import tree as tree_lib
from idesign._types import Array, Batch, Params
from idesign.hooks import Add, Capture
from idesign.train import check_batch

Fisher = Literal["true", "empirical"]

__all__ = [
    "KFACFactors", "KFACEigen", "Spectrum", "LMForward", "ClassifierForward", "dense_layers",
    "resolve_layers", "factors_init", "make_factors_update", "factors_finalize", "collect_factors", "eigh_descending",
    "eigendecompose", "curvature_spectrum",
]


# --------------------------------------------------------------------------- containers


class KFACFactors(NamedTuple):
    """Running float32 sums for one dense layer: ``a_sum = Σ x xᵀ``, ``g_sum = Σ g gᵀ``, ``count``.

    Factors from different runs (or hosts) merge by adding: ``jax.tree.map(jnp.add, f1, f2)``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> f = ids.curvature.KFACFactors(2 * jnp.eye(2), 4 * jnp.eye(3), jnp.float32(2))
    >>> A, G = ids.curvature.factors_finalize(f)
    >>> A.tolist(), G[0, 0].item()
    ([[1.0, 0.0], [0.0, 1.0]], 2.0)
    """

    a_sum: Array  # [d_in, d_in]
    g_sum: Array  # [d_out, d_out]
    count: Array  # [] number of counted positions

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(A's shape, G's shape)``."""
        return tuple(np.shape(self.a_sum)), tuple(np.shape(self.g_sum))


class KFACEigen(NamedTuple):
    """Eigendecomposition of one layer's factors, eigenvalues descending.

    ``A = u_a diag(mu) u_aᵀ`` and ``G = u_g diag(lam) u_gᵀ`` (eigenvectors are columns).

    >>> import jax.numpy as jnp, idesign as ids
    >>> f = ids.curvature.KFACFactors(jnp.diag(jnp.array([1., 3.])), jnp.eye(2), jnp.float32(1))
    >>> ids.curvature.eigendecompose(f).mu.tolist()
    [3.0, 1.0]
    """

    mu: Array   # [d_in]
    u_a: Array  # [d_in, d_in]
    lam: Array  # [d_out]
    u_g: Array  # [d_out, d_out]

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(A's shape, G's shape)``."""
        return tuple(np.shape(self.u_a)), tuple(np.shape(self.u_g))


class Spectrum(NamedTuple):
    """Curvatures ``Π_ij = μ_i λ_j`` in descending order, with their eigen-indices ``i`` (A) and ``j`` (G).

    >>> import jax.numpy as jnp, idesign as ids
    >>> e = ids.curvature.KFACEigen(jnp.array([2., 1.]), jnp.eye(2), jnp.array([3., 1.]), jnp.eye(2))
    >>> s = ids.curvature.curvature_spectrum(e)
    >>> s.values.tolist(), s.i.tolist(), s.j.tolist()
    ([6.0, 3.0, 2.0, 1.0], [0, 1, 0, 1], [0, 0, 1, 1])
    """

    values: Array
    i: Array
    j: Array


# --------------------------------------------------------------------------- forwards


@dataclasses.dataclass(frozen=True)
class LMForward:
    """Next-token prediction: ``forward(params, batch, hooks) -> (logits, captured, targets, weights)``.

    The batch holds ``tokens`` [B, T] and optionally ``valid`` [B, T] (False for padding) and
    ``loss_mask`` [B, T] (1 where the token at that position is scored; position 0 never is), the
    columns :func:`idesign.train.lm_loss` reads. The model sees ``tokens[:, :-1]``; position ``t``
    counts when ``valid[t] & valid[t+1] & loss_mask[t+1]``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> batch = {'tokens': jnp.ones((2, 5), jnp.int32), 'valid': jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    >>> logits, _, targets, weights = ids.curvature.LMForward(apply)(params, batch, None)
    >>> weights.sum(-1).tolist()
    [4.0, 2.0]
    """

    apply: Callable[..., Any]

    def __call__(self, params: Params, batch: Batch, hooks: Any) -> tuple[Array, dict, Array, Array]:
        batch = check_batch(batch, "LMForward: batch")
        tokens = jnp.asarray(batch["tokens"])
        valid, loss_mask = batch.get("valid"), batch.get("loss_mask")
        kwargs = {} if valid is None else {"valid": jnp.asarray(valid)[:, :-1]}
        logits, captured = self.apply(params, tokens[:, :-1], hooks=hooks, **kwargs)
        weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        if loss_mask is not None:
            weights = weights * (jnp.asarray(loss_mask)[:, 1:] > 0)
        if valid is not None:
            valid = jnp.asarray(valid).astype(bool)
            weights = weights * (valid[:, 1:] & valid[:, :-1])
        return logits, captured, tokens[:, 1:], weights


@dataclasses.dataclass(frozen=True)
class ClassifierForward:
    """One prediction per example: ``logits = apply(params, batch[inputs])[0]`` of shape [B, C].

    ``labels`` (gold classes, [B]) are needed only for the empirical Fisher; an optional ``weight``
    column [B] masks examples (0 = not counted). A dense layer applied at several positions of an
    example (e.g. before pooling) counts each position of each counted example.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> from flax import nnx
    >>> apply, params = ids.models.from_nnx(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnp.zeros((1, 3)))
    >>> logits, _, labels, w = ids.curvature.ClassifierForward(apply)(params, {'inputs': jnp.ones((2, 3))}, None)
    >>> logits.shape, w.tolist()
    ((2, 4), [1.0, 1.0])
    """

    apply: Callable[..., Any]
    inputs: str = "inputs"
    labels: str = "labels"

    def __call__(self, params: Params, batch: Batch, hooks: Any) -> tuple[Array, dict, Array, Array]:
        if self.inputs not in batch:
            raise KeyError(f"ClassifierForward: the batch has no {self.inputs!r} column; it has {sorted(batch)}.")
        logits, captured = self.apply(params, batch[self.inputs], hooks=hooks)
        lead = logits.shape[:-1]
        labels = batch.get(self.labels)
        labels = jnp.zeros(lead, jnp.int32) if labels is None else jnp.asarray(labels)
        weights = jnp.asarray(batch.get("weight", jnp.ones(lead)), jnp.float32)
        return logits, captured, labels, (weights > 0).astype(jnp.float32)


def _default_forward(apply: Callable) -> Callable:
    return LMForward(apply)


# --------------------------------------------------------------------------- layers


def dense_layers(apply: Callable, params: Params) -> dict[str, str]:
    """``{layer: kernel_path}`` for every dense layer of a model behind the functional interface.

    The reference transformer lists them in ``apply.dense_layers``; for adaptor models, a layer is a
    site prefix ``p`` with sites ``p.in`` and ``p.out`` and a 2-D parameter ``p.kernel``.

    >>> import idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> [k for k in ids.curvature.dense_layers(apply, params) if '.mlp.' in k]
    ['blocks.0.mlp.up', 'blocks.0.mlp.down']
    """
    if hasattr(apply, "dense_layers"):
        return dict(apply.dense_layers)
    sites = set(getattr(apply, "site_names", ()))
    leaves = tree_lib.named_leaves(params)
    out = {}
    for site in getattr(apply, "site_names", ()):
        if site.endswith(".in"):
            prefix = site[:-3]
            kernel = f"{prefix}.kernel"
            if f"{prefix}.out" in sites and kernel in leaves and np.ndim(leaves[kernel]) == 2:
                out[prefix] = kernel
    return out


def resolve_layers(apply: Callable, params: Params, layers: str | Sequence[str]) -> dict[str, str]:
    """Expands layer names or glob patterns to ``{layer: kernel_path}``; clear errors otherwise.

    >>> import idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2))
    >>> list(ids.curvature.resolve_layers(apply, params, 'blocks.*.mlp.up'))
    ['blocks.0.mlp.up', 'blocks.1.mlp.up']
    """
    known = dense_layers(apply, params)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("no layers given; name dense layers such as " + repr(list(known)[:4]))
    try:
        found = tree_lib.resolve_kernels(params, patterns, known, layers_only=True, tied=False, ndim=2)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return {name: kernel.path for name, kernel in found.items()}


# --------------------------------------------------------------------------- collection


def factors_init(params: Params, layers: Mapping[str, str]) -> dict[str, KFACFactors]:
    """Zero running sums for ``{layer: kernel_path}`` (from :func:`resolve_layers`).

    >>> import jax.numpy as jnp, idesign as ids
    >>> f = ids.curvature.factors_init({'l': {'kernel': jnp.ones((2, 3))}}, {'l': 'l.kernel'})
    >>> f['l'].shapes
    ((2, 2), (3, 3))
    """
    leaves = tree_lib.named_leaves(params)
    out = {}
    for name, kernel in layers.items():
        d_in, d_out = np.shape(leaves[kernel])
        out[name] = KFACFactors(jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((d_out, d_out), jnp.float32),
                                jnp.zeros((), jnp.float32))
    return out


def factors_finalize(factors: KFACFactors) -> tuple[Array, Array]:
    """``(A, G) = (a_sum / count, g_sum / count)`` of one layer's running sums; raises if nothing was counted.

    The streaming spelling shared with :func:`idesign.subspaces.covariance_finalize` and
    :func:`idesign.probes.class_means_finalize`: ``factors_init`` → ``make_factors_update`` → ``factors_finalize``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.curvature.factors_finalize(ids.curvature.KFACFactors(jnp.eye(1), jnp.eye(1), jnp.float32(4)))[0].item()
    0.25
    """
    count = float(factors.count) if not isinstance(factors.count, jax.core.Tracer) else None
    if count is not None and count <= 0:
        raise ValueError("factors_finalize: count is 0 (no token positions were counted); "
                         "check the dataset, its valid / loss_mask columns, and num_batches.")
    return factors.a_sum / factors.count, factors.g_sum / factors.count


def _mask_for(weights: Array, lead: tuple[int, ...]) -> Array:
    """Broadcasts per-position weights [..] to an activation's leading shape (extra trailing axes)."""
    if weights.shape == lead:
        return weights
    if lead[:weights.ndim] != weights.shape:
        raise ValueError(f"the forward's weights have shape {weights.shape}, which is not a prefix of the "
                         f"layer activation's leading shape {lead}.")
    return jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (len(lead) - weights.ndim)), lead)


def _outer_sum(v: Array, mask: Array) -> Array:
    v = v.reshape(-1, v.shape[-1]).astype(jnp.float32)
    return jnp.einsum("nd,ne->de", v * mask.reshape(-1, 1), v, precision=jax.lax.Precision.HIGHEST)


def _batch_factors(forward: Callable, names: tuple[str, ...], fisher: str, params: Params, batch: Batch,
                   row_mask: Array, key: Array) -> dict[str, KFACFactors]:
    """One batch's sums: one forward pass, one backward pass to the layer outputs."""
    capture = {f"{n}.out": Capture() for n in names}
    _, out_shapes, _, _ = jax.eval_shape(lambda p, b: forward(p, b, capture), params, batch)
    zeros = {n: jnp.zeros(out_shapes[f"{n}.out"].shape, out_shapes[f"{n}.out"].dtype) for n in names}

    def loss(perturb):
        hooks = {**{f"{n}.in": Capture() for n in names}, **{f"{n}.out": Add(perturb[n]) for n in names}}
        logits, captured, targets, weights = forward(params, batch, hooks)
        logits = logits.astype(jnp.float32)
        mask = (weights > 0).astype(jnp.float32) * _mask_for(row_mask, weights.shape)
        if fisher == "true":
            targets = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (nll * mask).sum(), (captured, mask)

    grads, (captured, mask) = jax.grad(loss, has_aux=True)(zeros)
    out = {}
    for n in names:
        x, g = captured[f"{n}.in"], grads[n]
        m_x = _mask_for(mask, x.shape[:-1])
        m_g = _mask_for(mask, g.shape[:-1])
        out[n] = KFACFactors(_outer_sum(x, m_x), _outer_sum(g, m_g), m_x.sum())
    return out


def make_factors_update(apply: Callable, layers: Sequence[str], *, fisher: Fisher = "true",
                     forward: Callable | None = None, jit: bool = True) -> Callable:
    """``step(factors, params, batch, key) -> factors``: adds one batch's sums (for custom loops).

    ``layers`` are resolved layer names (see :func:`resolve_layers`). ``batch`` may carry a
    ``'_row_mask'`` [B] (0 = padding row). One compilation per batch shape.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> layers = ids.curvature.resolve_layers(apply, params, ['blocks.0.mlp.up'])
    >>> step = ids.curvature.make_factors_update(apply, list(layers))
    >>> f = step(ids.curvature.factors_init(params, layers), params, {'tokens': jnp.ones((2, 5), jnp.int32)},
    ...          jax.random.key(0))
    >>> float(f['blocks.0.mlp.up'].count)
    8.0
    """
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' (targets sampled from the model) or 'empirical' (gold "
                         f"targets); got {fisher!r}.")
    forward = forward or _default_forward(apply)
    names = tuple(layers)

    def step(factors, params, batch, key):
        batch = dict(batch)
        row_mask = batch.pop("_row_mask", None)
        n_rows = np.shape(next(iter(batch.values())))[0]
        row_mask = jnp.ones((n_rows,), jnp.float32) if row_mask is None else jnp.asarray(row_mask, jnp.float32)
        new = _batch_factors(forward, names, fisher, params, batch, row_mask, key)
        return {n: jax.tree.map(jnp.add, factors[n], new[n]) for n in names}

    return _jitted_step(step) if jit else step


def _jitted_step(step: Callable) -> Callable:
    return jax.jit(step, donate_argnums=(0,))


def _pad_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """Pads every column to ``rows`` rows with zeros and marks the padding in ``_row_mask``."""
    n = np.shape(next(iter(batch.values())))[0]
    if rows <= n:  # nothing to pad: keep the arrays where they are (no host round trip)
        return {**batch, "_row_mask": np.ones((n,), np.float32)}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
    out["_row_mask"] = (np.arange(rows) < n).astype(np.float32)
    return out


def collect_factors(apply: Callable, params: Params, batches: Iterable[Batch] | Any,
                    layers: str | Sequence[str], *, key: Array | int = 0, fisher: Fisher = "true",
                    forward: Callable | None = None, batch_size: int | None = None,
                    num_batches: int | None = None, mesh: Any = None, progress: bool = True,
                    desc: str = "kfac") -> dict[str, KFACFactors]:
    """Streams batches through the model and returns ``{layer: KFACFactors}`` (float32 running sums).

    Args:
      apply: the functional model.
      params: its parameters (may be sharded).
      batches: an iterable of batch dicts (e.g. :func:`idesign.train.iterate_batches`), or, with
        ``batch_size``, a ``datasets.Dataset`` / dict of arrays read once in order.
      layers: dense-layer names or glob patterns (``'blocks.*.mlp.*'``); see :func:`resolve_layers`.
      key: PRNG key or int seed for the true Fisher's sampled targets (batch ``b`` uses
        ``fold_in(key, b)``).
      fisher: ``'true'`` (targets sampled from the model; the default) or ``'empirical'`` (gold).
      forward: how a batch becomes logits, targets and weights; :class:`LMForward` by default,
        :class:`ClassifierForward` for one prediction per example, or any callable of that signature.
      batch_size: batch size when ``batches`` is a dataset.
      num_batches: stop after this many batches (required for endless iterators to end).
      mesh: a ``('data', ...)`` mesh; batches are placed on its ``data`` axis (rows padded to fit).
      progress: show a tqdm progress bar.
      desc: the progress bar's label.

    A batch with fewer rows than the first (a ragged last batch) is padded with masked rows, so the
    step compiles once; a different sequence length compiles again.

    >>> import jax.numpy as jnp, numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> data = {'tokens': np.ones((5, 6), np.int32)}
    >>> f = ids.curvature.collect_factors(apply, params, data, 'blocks.0.mlp.*', batch_size=2, progress=False)
    >>> {k: v.shapes for k, v in f.items()}
    {'blocks.0.mlp.up': ((8, 8), (32, 32)), 'blocks.0.mlp.down': ((32, 32), (8, 8))}
    >>> int(f['blocks.0.mlp.up'].count)
    25
    """
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical'; got {fisher!r}.")
    resolved = resolve_layers(apply, params, layers)
    key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    if batch_size is not None:
        from idesign.train import iterate_batches
        batches = iterate_batches(batches, batch_size, epochs=1, shuffle=False, drop_remainder=False)
    elif isinstance(batches, Mapping) or hasattr(batches, "column_names"):
        raise TypeError("collect_factors: batches looks like a whole dataset; pass batch_size=... to read it "
                        "in batches, or pass an iterable of batch dicts.")
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    iterator = iter(batches) if num_batches is None else itertools.islice(batches, num_batches)
    step = _cached_step(apply, tuple(resolved), fisher, forward or _default_forward(apply))
    factors = factors_init(params, resolved)
    data_size = 1 if mesh is None else mesh.shape["data"]
    rows = None
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    n_batches = 0
    for b, batch in enumerate(iterator):
        batch = {k: v for k, v in dict(batch).items()}
        n = np.shape(next(iter(batch.values())))[0]
        if rows is None:
            rows = -(-n // data_size) * data_size
        batch = _pad_rows(batch, max(rows, -(-n // data_size) * data_size))
        if mesh is not None:
            from idesign.sharding import shard_batch
            batch = shard_batch(batch, mesh)
        factors = step(factors, params, batch, jax.random.fold_in(key, b))
        n_batches += 1
        bar.update(1)
    bar.close()
    if n_batches == 0:
        raise ValueError("collect_factors: the dataset yielded no batches.")
    counts = {n: float(f.count) for n, f in factors.items()}
    if not any(counts.values()):
        raise ValueError(f"collect_factors: {n_batches} batches yielded no counted token positions (all padding "
                         "or masked by valid / loss_mask); the factors would be undefined.")
    return {n: factors[n] for n in resolved}


@functools.lru_cache(maxsize=32)
def _cached_step(apply: Callable, names: tuple[str, ...], fisher: str, forward: Callable) -> Callable:
    return make_factors_update(apply, names, fisher=fisher, forward=forward)


# --------------------------------------------------------------------------- eigenbases


def eigh_descending(matrix: Any, *, dtype: Any = jnp.float32, clip: bool = True) -> tuple[Array, Array]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric PSD matrix.

    The matrix is symmetrised (``(M + Mᵀ)/2``) first; ``clip`` sets rounding-negative eigenvalues to 0.
    Each eigenvector's sign is fixed so its largest-magnitude entry is positive (deterministic
    across devices). ``dtype=jnp.float64`` computes in float64 (with numpy on the host when
    ``jax_enable_x64`` is off; the result is then returned as float32 arrays).

    >>> import jax.numpy as jnp, idesign as ids
    >>> vals, vecs = ids.curvature.eigh_descending(jnp.array([[1., 0.], [0., 2.]]))
    >>> vals.tolist(), vecs.tolist()
    ([2.0, 1.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
        m = np.asarray(matrix, np.float64)
        vals, vecs = np.linalg.eigh((m + m.T) / 2)
        vals, vecs = vals[::-1], vecs[:, ::-1]
        idx = np.argmax(np.abs(vecs), axis=0)
        vecs = vecs * np.sign(vecs[idx, np.arange(vecs.shape[1])])
        vals = np.maximum(vals, 0) if clip else vals
        return jnp.asarray(vals, jnp.float32), jnp.asarray(vecs, jnp.float32)
    m = jnp.asarray(matrix, dtype)
    vals, vecs = jnp.linalg.eigh((m + m.T) / 2)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    idx = jnp.argmax(jnp.abs(vecs), axis=0)
    vecs = vecs * jnp.sign(vecs[idx, jnp.arange(vecs.shape[1])])
    return (jnp.maximum(vals, 0) if clip else vals), vecs


def eigendecompose(factors: KFACFactors | Mapping[str, KFACFactors], *, dtype: Any = jnp.float32
                   ) -> KFACEigen | dict[str, KFACEigen]:
    """:class:`KFACEigen` of one layer's factors, or ``{layer: KFACEigen}`` for a dict of them.

    >>> import jax.numpy as jnp, idesign as ids
    >>> f = ids.curvature.KFACFactors(jnp.eye(2), jnp.diag(jnp.array([1., 5.])), jnp.float32(1))
    >>> ids.curvature.eigendecompose({'l': f})['l'].lam.tolist()
    [5.0, 1.0]
    """
    if isinstance(factors, Mapping):
        return {k: eigendecompose(v, dtype=dtype) for k, v in factors.items()}
    if isinstance(factors, KFACEigen):
        return factors
    if not isinstance(factors, KFACFactors):
        raise TypeError(f"expected KFACFactors or KFACEigen; got {type(factors).__name__}.")
    A, G = factors_finalize(factors)
    mu, u_a = eigh_descending(A, dtype=dtype)
    lam, u_g = eigh_descending(G, dtype=dtype)
    return KFACEigen(mu, u_a, lam, u_g)


def curvature_spectrum(eigen: KFACEigen | KFACFactors, *, top_k: int | None = None) -> Spectrum:
    """All (or the ``top_k`` largest) curvatures ``Π_ij = μ_i λ_j``, descending, with indices.

    Without ``top_k`` the full outer product is formed and sorted: ``d_in · d_out`` values, about
    12 bytes each with the two int32 index arrays (256 × 1024 → 3 MB; 4096 × 11008 → 540 MB).
    With ``top_k`` a k-way merge over the sorted factors (a heap over the rows ``i``, on the host)
    enumerates the pairs in order in ``O(k log d_in)`` time and ``O(d_in + k)`` memory.

    >>> import jax.numpy as jnp, idesign as ids
    >>> e = ids.curvature.KFACEigen(jnp.array([3., 1.]), jnp.eye(2), jnp.array([2., 1.5]), jnp.eye(2))
    >>> ids.curvature.curvature_spectrum(e, top_k=3).values.tolist()
    [6.0, 4.5, 2.0]
    """
    eigen = eigendecompose(eigen)
    mu, lam = eigen.mu, eigen.lam
    if top_k is None:
        pi = (mu[:, None] * lam[None, :]).reshape(-1)
        order = jnp.argsort(-pi, stable=True)
        return Spectrum(pi[order], (order // lam.shape[0]).astype(jnp.int32), (order % lam.shape[0]).astype(jnp.int32))
    mu_h, lam_h = np.asarray(mu, np.float64), np.asarray(lam, np.float64)
    top_k = min(int(top_k), mu_h.size * lam_h.size)
    heap = [(-mu_h[i] * lam_h[0], i, 0) for i in range(mu_h.size)]
    heapq.heapify(heap)
    vals, ii, jj = [], [], []
    while len(vals) < top_k:
        v, i, j = heapq.heappop(heap)
        vals.append(-v), ii.append(i), jj.append(j)
        if j + 1 < lam_h.size:
            heapq.heappush(heap, (-mu_h[i] * lam_h[j + 1], i, j + 1))
    return Spectrum(jnp.asarray(vals, jnp.float32), jnp.asarray(ii, jnp.int32), jnp.asarray(jj, jnp.int32))
