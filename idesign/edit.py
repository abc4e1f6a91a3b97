"""Weight edits: curvature-ranked removal of low-curvature components, an SVD baseline, band diagnostics.

Merullo et al. 2025 (arXiv 2510.24256; ``docs/methods.md`` §3): in the K-FAC eigenbasis of a
dense layer, ``C = U_Aᵀ W U_G`` (Flax layout ``W: [d_in, d_out]``) and component ``(i, j)`` has
curvature ``Π_ij = μ_i λ_j``. Keeping the high-curvature components and zeroing the rest removes
what the model memorised while keeping shared structure: ``W' = U_A (C ⊙ M) U_Gᵀ``.

**Keep rule** (both methods): sort components by their score (``Π`` for K-FAC, squared singular
value — *energy* — for SVD), descending, and keep the shortest prefix whose summed score is at least
``ρ`` times the total; the component that crosses the threshold is kept, so the kept mass is
``≥ ρ``. ``ρ = 1`` keeps every component (also those with zero score) and returns the weights
unchanged up to float rounding; as ``ρ → 0`` only the single top component remains.

``layers`` is a list of layer names (kernel at ``<name>.kernel``, the site-prefix convention of
:mod:`idesign.curvature`) or a ``{name: kernel_path}`` mapping (e.g. ``resolve_layers(...)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import curvature as curv
from idesign import tree as tree_lib
from idesign._types import Array, Params
from idesign.hooks import Capture


__all__ = ["EditReport", "prune_low_curvature", "prune_svd", "prune_random", "keep_mask_by_mass", "BandActivations",
           "curvature_band_activations"]


class EditReport(dict):
    """``{layer: {'kept', 'total', 'kept_fraction', 'mass_kept', 'rel_weight_change'}}``; ``str()`` is a table.

    >>> import idesign as ids
    >>> r = ids.edit.EditReport({'l': {'kept': 1, 'total': 4, 'kept_fraction': 0.25, 'mass_kept': 0.9,
    ...                                'rel_weight_change': 0.1}}, method='svd', rho=0.9)
    >>> print(r)  # doctest: +NORMALIZE_WHITESPACE
    svd pruning, rho = 0.9
    layer  kept / total  kept %  mass kept  rel. weight change
    l      1 / 4         25.0%   0.9000     0.1000
    """

    def __init__(self, rows: Mapping[str, Mapping[str, float]], *, method: str, rho: float):
        super().__init__(rows)
        self.method, self.rho = method, rho

    def table(self) -> str:
        """A readable fixed-width table, one row per layer."""
        header = ("layer", "kept / total", "kept %", "mass kept", "rel. weight change")
        rows = [(name, f"{r['kept']} / {r['total']}", f"{100 * r['kept_fraction']:.1f}%", f"{r['mass_kept']:.4f}",
                 f"{r['rel_weight_change']:.4f}") for name, r in self.items()]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([f"{self.method} pruning, rho = {self.rho:g}", line(header)] + [line(r) for r in rows])

    def __str__(self) -> str:
        return self.table()


def _check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float, np.floating, np.integer)) or not 0.0 < float(rho) <= 1.0:
        raise ValueError(f"rho must be in (0, 1] (the share of the total mass to keep); got {rho!r}.")
    return float(rho)


def keep_mask_by_mass(scores: Array, rho: float) -> Array:
    """Boolean mask of the highest scores whose sum first reaches ``rho`` of the total (ties by position).

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.edit.keep_mask_by_mass(jnp.array([1., 6., 3.]), 0.6).tolist()
    [False, True, False]
    >>> ids.edit.keep_mask_by_mass(jnp.array([1., 6., 3.]), 0.7).tolist()
    [False, True, True]
    """
    rho = _check_rho(rho)
    flat = jnp.asarray(scores, jnp.float32).reshape(-1)
    if rho == 1.0:
        return jnp.ones(jnp.shape(scores), bool)
    order = jnp.argsort(-flat, stable=True)
    csum = jnp.cumsum(flat[order])
    n_keep = jnp.minimum(jnp.searchsorted(csum, rho * csum[-1], side="left") + 1, flat.size)
    keep_sorted = jnp.arange(flat.size) < n_keep
    return jnp.zeros(flat.size, bool).at[order].set(keep_sorted).reshape(jnp.shape(scores))


def _kernels(params: Params, layers: Sequence[str] | Mapping[str, str] | str) -> dict[str, tuple[str, Any]]:
    """``{layer: (kernel_path, kernel)}`` for layer names (kernel at ``<name>.kernel``) or a mapping; untied 2-D
    kernels only (tied embeddings such as ``'unembed' -> 'embed.embedding'`` are refused)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    paths = dict(layers) if isinstance(layers, Mapping) else {name: f"{name}.kernel" for name in names}
    found = tree_lib.resolve_kernels(params, list(paths), paths, layers_only=True, tied=False, ndim=2)
    leaves = tree_lib.named_leaves(params)
    return {name: (k.path, leaves[k.path]) for name, k in found.items()}


def _replace_leaves(params: Params, new: Mapping[str, Array]) -> Params:
    def put(path: str, leaf: Any) -> Any:
        if path not in new:
            return leaf
        value = new[path].astype(leaf.dtype)
        if isinstance(leaf, jax.Array) and hasattr(leaf, "sharding"):
            value = jax.device_put(value, leaf.sharding)
        return value

    return tree_lib.map_with_path(put, params)


def _colocate(x: Array, like: Any) -> Array:
    """Places ``x`` where ``like`` lives (replicated over its mesh), so factors from one device can
    edit kernels sharded over many."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    if sharding is not None and len(sharding.device_set) == 1:
        return jax.device_put(x, next(iter(sharding.device_set)))
    return x


def _rel_change(w: Array, w_new: Array) -> float:
    return float(jnp.linalg.norm(w_new - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))


def prune_low_curvature(params: Params, factors: Mapping[str, curv.KFACFactors | curv.KFACEigen],
                        layers: Sequence[str] | Mapping[str, str] | str | None, rho: float
                        ) -> tuple[Params, EditReport]:
    """Keeps each layer's highest-curvature components (``Π_ij = μ_i λ_j``) until mass ``rho``; zeroes the rest.

    Per layer: ``C = U_Aᵀ W U_G``, ``M`` = :func:`keep_mask_by_mass` of ``Π``, ``W' = U_A (C ⊙ M) U_Gᵀ``.

    Args:
      params: the parameter pytree (not modified; sharded kernels keep their sharding).
      factors: ``{layer: KFACFactors}`` from :func:`idesign.curvature.collect_factors`, or
        ``{layer: KFACEigen}`` (eigendecompose once, prune at many ``rho``).
      layers: layer names (kernels at ``<name>.kernel``), a ``{name: kernel_path}`` mapping, or
        ``None`` for every layer in ``factors``.
      rho: share of the total curvature mass ``(Σμ)(Σλ)`` to keep, in (0, 1].

    Returns:
      ``(new_params, report)``; the report maps each layer to ``kept`` / ``total`` components,
      ``kept_fraction``, ``mass_kept`` (kept Π / total Π) and ``rel_weight_change``
      (``‖W' − W‖_F / ‖W‖_F``); ``print(report)`` shows a table.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> w = jax.random.normal(jax.random.key(0), (3, 2))
    >>> f = {'l': ids.curvature.KFACFactors(jnp.diag(jnp.array([3., 2., 1.])), jnp.eye(2), jnp.float32(1))}
    >>> new, report = ids.edit.prune_low_curvature({'l': {'kernel': w}}, f, ['l'], rho=0.75)
    >>> report['l']['kept'], report['l']['total'], float(jnp.abs(new['l']['kernel'][2]).max())
    (4, 6, 0.0)
    """
    rho = _check_rho(rho)
    layers = list(factors) if layers is None else layers
    for name in [layers] if isinstance(layers, str) else layers:
        if name not in factors:
            raise ValueError(tree_lib.unknown_name_message(name, list(factors), what="layer with factors"))
    new, rows = {}, {}
    for name, (path, kernel) in _kernels(params, layers).items():
        d_in, d_out = np.shape(kernel)
        f = factors[name]
        got_a, got_g = f.shapes
        if got_a != (d_in, d_in) or got_g != (d_out, d_out):
            raise ValueError(f"factors for layer {name!r} have A {list(got_a)} and G {list(got_g)}, but its kernel "
                             f"{path!r} has shape {(d_in, d_out)}: expected A [{d_in}, {d_in}] and G [{d_out}, {d_out}].")
        eig = jax.tree.map(lambda x: _colocate(x, kernel), curv.eigendecompose(f))
        w = jnp.asarray(kernel, jnp.float32)
        c = eig.u_a.T @ w @ eig.u_g
        pi = eig.mu[:, None] * eig.lam[None, :]
        keep = keep_mask_by_mass(pi, rho)
        w_new = eig.u_a @ jnp.where(keep, c, 0.0) @ eig.u_g.T
        total_mass = float(pi.sum())
        new[path] = w_new
        kept = int(keep.sum())
        rows[name] = {"kept": kept, "total": int(keep.size), "kept_fraction": kept / keep.size,
                      "mass_kept": float(jnp.where(keep, pi, 0).sum()) / total_mass if total_mass > 0 else 1.0,
                      "rel_weight_change": _rel_change(w, w_new)}
    return _replace_leaves(params, new), EditReport(rows, method="kfac", rho=rho)


def prune_svd(params: Params, layers: Sequence[str] | Mapping[str, str] | str, rho: float
              ) -> tuple[Params, EditReport]:
    """SVD-truncation baseline: keep the top singular components of each kernel until energy ``rho``.

    Energy is the squared singular value (``Σ s_k² = ‖W‖_F²``), so ``mass_kept`` is the share of
    ``‖W‖_F²`` kept; ``W' = U_k diag(s_k) V_kᵀ``. Same interface and report as
    :func:`prune_low_curvature` (``total`` = ``min(d_in, d_out)`` components).

    >>> import jax.numpy as jnp, idesign as ids
    >>> new, report = ids.edit.prune_svd({'l': {'kernel': jnp.diag(jnp.array([3., 1.]))}}, ['l'], rho=0.9)
    >>> new['l']['kernel'].tolist(), report['l']['kept']
    ([[3.0, 0.0], [0.0, 0.0]], 1)
    """
    rho = _check_rho(rho)
    new, rows = {}, {}
    for name, (path, kernel) in _kernels(params, layers).items():
        w = jnp.asarray(kernel, jnp.float32)
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        energy = s ** 2
        keep = keep_mask_by_mass(energy, rho)
        w_new = (u * jnp.where(keep, s, 0.0)) @ vt
        new[path] = w_new
        total = float(energy.sum())
        kept = int(keep.sum())
        rows[name] = {"kept": kept, "total": int(s.size), "kept_fraction": kept / s.size,
                      "mass_kept": float(jnp.where(keep, energy, 0).sum()) / total if total > 0 else 1.0,
                      "rel_weight_change": _rel_change(w, w_new)}
    return _replace_leaves(params, new), EditReport(rows, method="svd", rho=rho)


def prune_random(params: Params, factors: Mapping[str, curv.KFACFactors | curv.KFACEigen],
                 keep: Mapping[str, int], *, key: Array | int) -> tuple[Params, EditReport]:
    """Control for :func:`prune_low_curvature`: keep ``keep[layer]`` K-FAC components chosen at random.

    Same eigenbasis and the same number of kept components as a curvature-ranked edit, but *which*
    components survive is uniform at random, so any effect of the ranking shows as a difference.
    Pass the ``kept`` counts of a :func:`prune_low_curvature` report to match it exactly.

    Args:
      params: the parameter pytree (not modified).
      factors: ``{layer: KFACFactors | KFACEigen}`` for every layer in ``keep`` (kernels at ``<layer>.kernel``).
      keep: ``{layer: number of components to keep}``, each in ``[0, d_in * d_out]``.
      key: a PRNG key or an int seed; layers draw from ``fold_in(key, i)`` in ``keep``'s order.

    Returns:
      ``(new_params, report)`` as :func:`prune_low_curvature` (``rho`` in the report is ``nan``).

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> f = {'l': ids.curvature.KFACFactors(jnp.diag(jnp.array([3., 2., 1.])), jnp.eye(2), jnp.float32(1))}
    >>> new, report = ids.edit.prune_random({'l': {'kernel': jnp.ones((3, 2))}}, f, {'l': 4}, key=0)
    >>> report['l']['kept'], int((new['l']['kernel'] == 0).sum())
    (4, 2)
    """
    key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    kernels = _kernels(params, list(keep))
    new, rows = {}, {}
    for i, (name, n_keep) in enumerate(keep.items()):
        if name not in factors:
            raise ValueError(tree_lib.unknown_name_message(name, list(factors), what="layer with factors"))
        path, kernel = kernels[name]
        d_in, d_out = np.shape(kernel)
        if not isinstance(n_keep, (int, np.integer)) or not 0 <= n_keep <= d_in * d_out:
            raise ValueError(f"keep[{name!r}] = {n_keep!r}: expected an int in [0, {d_in * d_out}] (d_in * d_out).")
        eig = curv.eigendecompose(factors[name])
        if eig.shapes != ((d_in, d_in), (d_out, d_out)):
            raise ValueError(f"factors for layer {name!r} have A {list(eig.shapes[0])} and G {list(eig.shapes[1])}, "
                             f"but its kernel {path!r} has shape {(d_in, d_out)}.")
        order = jax.random.permutation(jax.random.fold_in(key, i), d_in * d_out)
        mask = jnp.zeros(d_in * d_out, bool).at[order[:int(n_keep)]].set(True).reshape(d_in, d_out)
        w = jnp.asarray(kernel, jnp.float32)
        w_new = eig.u_a @ jnp.where(mask, eig.u_a.T @ w @ eig.u_g, 0.0) @ eig.u_g.T
        pi = eig.mu[:, None] * eig.lam[None, :]
        total = float(pi.sum())
        new[path] = w_new
        rows[name] = {"kept": int(n_keep), "total": d_in * d_out, "kept_fraction": int(n_keep) / (d_in * d_out),
                      "mass_kept": float(jnp.where(mask, pi, 0).sum()) / total if total > 0 else 1.0,
                      "rel_weight_change": _rel_change(w, w_new)}
    return _replace_leaves(params, new), EditReport(rows, method="random", rho=float("nan"))


class BandActivations(NamedTuple):
    """Per curvature band (band 0 = highest curvature): mean component response on two input sets.

    ``ratio = memorized / clean``; ``band_mass`` is each band's share of the total curvature.

    >>> import jax.numpy as jnp, idesign as ids
    >>> b = ids.edit.BandActivations(jnp.array([1., 2.]), jnp.array([1., 1.]), jnp.array([1., 2.]), jnp.array([.9, .1]))
    >>> b.ratio.tolist()
    [1.0, 2.0]
    """

    memorized: Array
    clean: Array
    ratio: Array
    band_mass: Array


@functools.partial(jax.jit, static_argnums=(0, 3))
def _abs_projection_sums(forward: Callable, params: Params, batch: Mapping[str, Any], layer: str,
                         u_a: Array) -> tuple[Array, Array]:
    _, captured, _, weights = forward(params, batch, {f"{layer}.in": Capture()})
    x = captured[f"{layer}.in"].astype(jnp.float32)
    mask = curv._mask_for((weights > 0).astype(jnp.float32), x.shape[:-1]).reshape(-1)
    proj = jnp.abs(x.reshape(-1, x.shape[-1]) @ u_a)
    return (proj * mask[:, None]).sum(0), mask.sum()


def _mean_abs_projection(forward: Callable, params: Params, batch: Mapping[str, Any], layer: str,
                         u_a: Array) -> Array:
    sums, count = _abs_projection_sums(forward, params, dict(batch), layer, u_a)
    if float(count) == 0:
        raise ValueError(f"curvature_band_activations: a batch has no counted positions for layer {layer!r}.")
    return sums / count


def curvature_band_activations(apply: Callable, params: Params, factors: curv.KFACFactors | curv.KFACEigen,
                               layer: str, batch_memorized: Mapping[str, Any], batch_clean: Mapping[str, Any],
                               n_bands: int = 10, *, forward: Callable | None = None) -> BandActivations:
    """The paper's diagnostic: how strongly memorized vs clean inputs drive each curvature band.

    Definition. For an input ``x`` the weight component ``(i, j)`` contributes
    ``(x·u_a_i) C_ij`` to the output along ``u_g_j``; its *response* is the magnitude
    ``|x·u_a_i| · |C_ij|``. Averaged over the counted positions of a batch this is
    ``E|x·u_a_i| · |C_ij|``. Components are ranked by ``Π_ij`` (descending) and split into
    ``n_bands`` bands of equal component count (band 0 = highest curvature); a band's strength is
    the mean response over its components. ``ratio > 1`` means memorized inputs drive that band
    harder. (Merullo et al.: the bottom half responds ~23% more to memorized inputs, the top 10%
    more to clean ones.)

    Args:
      apply, params: the model; ``factors``: the layer's :class:`KFACFactors` or :class:`KFACEigen`.
      layer: the dense layer's name (kernel at ``<layer>.kernel``).
      batch_memorized, batch_clean: batches in the ``forward``'s format (:class:`LMForward` by default).
      n_bands: number of equal-size bands.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> b = {'tokens': jax.random.randint(jax.random.key(0), (2, 6), 0, 11)}
    >>> f = ids.curvature.collect_factors(apply, params, [b], 'blocks.0.mlp.up', progress=False)
    >>> bands = ids.edit.curvature_band_activations(apply, params, f['blocks.0.mlp.up'], 'blocks.0.mlp.up', b, b, 4)
    >>> bands.ratio.round(3).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    forward = forward or curv.LMForward(apply)
    (_, kernel), = _kernels(params, layer).values()
    d_in, d_out = np.shape(kernel)
    eig = curv.eigendecompose(factors)
    if eig.shapes != ((d_in, d_in), (d_out, d_out)):
        raise ValueError(f"factors for layer {layer!r} have A {list(eig.shapes[0])} and G {list(eig.shapes[1])}, "
                         f"but its kernel has shape {(d_in, d_out)}.")
    if not 1 <= int(n_bands) <= d_in * d_out:
        raise ValueError(f"n_bands must be in [1, {d_in * d_out}] (the number of components); got {n_bands}.")
    c_abs = jnp.abs(eig.u_a.T @ jnp.asarray(kernel, jnp.float32) @ eig.u_g)
    pi = (eig.mu[:, None] * eig.lam[None, :]).reshape(-1)
    order = jnp.argsort(-pi, stable=True)
    band_of = jnp.zeros(pi.size, jnp.int32).at[order].set(jnp.arange(pi.size) * n_bands // pi.size)
    sizes = jax.ops.segment_sum(jnp.ones(pi.size), band_of, n_bands)

    def strength(batch):
        resp = (_mean_abs_projection(forward, params, batch, layer, eig.u_a)[:, None] * c_abs).reshape(-1)
        return jax.ops.segment_sum(resp, band_of, n_bands) / sizes

    mem, clean = strength(batch_memorized), strength(batch_clean)
    band_mass = jax.ops.segment_sum(pi, band_of, n_bands) / jnp.maximum(pi.sum(), 1e-30)
    return BandActivations(mem, clean, mem / jnp.maximum(clean, 1e-30), band_mass)
