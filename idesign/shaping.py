"""Shaping what training learns with training-only interventions: CAFT, preventative steering, gradient routing.

Each tool returns a :class:`TrainingHooks`: interventions that act inside the *training loss* and
nowhere else. Pass them to the loss, never to the model::

    shaping_hooks = ids.shaping.caft({"blocks.0.resid_post": concept_basis})
    step = ids.make_train_step(ids.lm_loss(apply, hooks=shaping_hooks), optax.adamw(1e-3))
    ...
    apply(params, tokens)                            # inference: no ablation, as intended
    apply(params, tokens, hooks=shaping_hooks)       # TypeError: training-only hooks

Every consumer of hooks (a model's ``apply``, :func:`idesign.generate.generate`,
:func:`idesign.activations.collect_activations`) normalises them through
:func:`idesign.hooks.merge_hooks`, which refuses a ``TrainingHooks``; only
:func:`idesign.train.lm_loss` resolves them, batch by batch. So "on during training, off at inference"
is the only way they can be used.

* :func:`caft` — concept-ablation fine-tuning (Casademunt et al. 2025, arXiv 2507.16795):
  ``h ← h − (h Vᵀ) V`` at chosen sites, so the concept's directions carry no signal the loss could use.
* :func:`preventative_steering` — (Chen et al. 2025, arXiv 2507.21509): ``h ← h + α v``, so the
  gradient has no reason to move the model along ``v`` itself.
* :func:`gradient_routing` — (Cloud et al. 2024, arXiv 2410.04332): ``h ← m ⊙ h + (1 − m) ⊙ sg(h)`` with
  masks computed from the batch, so chosen data updates only the parameters upstream of chosen sites.
* :func:`combine` — several of them, in order.

Site names and glob patterns are resolved by the model when the loss is traced: an unknown name, or
a basis / direction whose width does not match the site, raises there (at the first training step),
naming the site and both shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idesign import subspaces as sub
from idesign._pytree import Static, pytree_class
from idesign._types import Array, Batch
from idesign.hooks import Ablate, Add, Hooks, Intervention, Route, TrainingOnly, merge_hooks

HooksFn = Callable[[Batch], Hooks]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@pytree_class
class TrainingHooks(TrainingOnly):
    """Interventions for the training loss only: a hooks dict, a ``batch -> hooks`` function, or a chain of them.

    A pytree: the arrays of dict parts are traced leaves; function parts are static (held as
    :class:`idesign._pytree.Static`, compared by identity of the function).
    Build one with :func:`caft`, :func:`preventative_steering`, :func:`gradient_routing` or
    :func:`combine`, or directly from any hooks. Give it to :func:`idesign.train.lm_loss`; every inference
    path (a model's ``apply``, ``generate``, ``collect_activations``) refuses it with a ``TypeError``.

    Args:
      parts: a hooks dict (``{site or pattern: intervention(s)}``), a function ``batch -> hooks dict``, or a
        tuple of these, applied in order (chains at the same site are concatenated).

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.shaping import TrainingHooks
    >>> th = TrainingHooks(lambda batch: {'blocks.0.resid_post': ids.Add(batch['v'])})
    >>> th.resolve({'v': jnp.ones(8)})
    {'blocks.0.resid_post': (Add(direction=Array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32), scale=1.0),)}
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> apply(params, jnp.ones((1, 3), jnp.int32), hooks=th)
    Traceback (most recent call last):
    ...
    TypeError: hooks is a TrainingHooks (idesign.shaping: caft, preventative_steering, gradient_routing, combine): these interventions are training-only and are refused at inference (apply, generate, collect_activations). Use them through the training loss, ids.train.lm_loss(apply, hooks=training_hooks); run inference without them, or call training_hooks.resolve(batch) explicitly if you really want the training-time forward pass.
    """

    parts: tuple[Hooks | HooksFn, ...]

    def __post_init__(self):
        parts = self.parts if isinstance(self.parts, tuple) else (self.parts,)
        for i, part in enumerate(parts):
            if isinstance(part, TrainingOnly):
                raise TypeError(f"TrainingHooks: part {i} is already a TrainingHooks; chain them with "
                                "idesign.shaping.combine(a, b).")
            if isinstance(part, Mapping):
                merge_hooks(part)  # validates the interventions now rather than at the first step
            elif not callable(part):
                raise TypeError(f"TrainingHooks: part {i} is {type(part).__name__}; expected a hooks dict "
                                "{site: intervention} or a function batch -> hooks dict.")
        # a function is static data of the tree, a dict's arrays are leaves
        parts = tuple(p if isinstance(p, (Mapping, Static)) else Static(p) for p in parts)
        object.__setattr__(self, "parts", parts)

    def resolve(self, batch: Batch) -> dict[str, tuple[Intervention, ...]]:
        """The plain hooks for one batch (what the training loss passes to the model).

        Args:
          batch: the training batch (any mapping; function parts read from it).

        Returns:
          ``{site or pattern: tuple of interventions}``, the parts merged in order.

        >>> import jax.numpy as jnp, idesign as ids
        >>> th = ids.shaping.preventative_steering({'embed': jnp.ones(4)}, scale=2.0)
        >>> [type(i).__name__ for i in th.resolve({})['embed']]
        ['Add']
        """
        resolved = []
        for i, part in enumerate(self.parts):
            hooks = part if isinstance(part, Mapping) else part(batch)
            if not isinstance(hooks, Mapping):
                raise TypeError(f"TrainingHooks: function part {i} returned {type(hooks).__name__}; expected a "
                                "hooks dict {site: intervention}.")
            resolved.append(hooks)
        return merge_hooks(*resolved)

    def __repr__(self) -> str:
        static = [k for p in self.parts if isinstance(p, Mapping) for k in p]
        dynamic = sum(not isinstance(p, Mapping) for p in self.parts)
        return f"TrainingHooks(sites={static}, batch_dependent_parts={dynamic})"


def _check_finite(what: str, site: str, x: Any) -> None:
    if _is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x, np.float64)))):
        bad = int(np.size(x) - np.isfinite(np.asarray(x, np.float64)).sum())
        raise ValueError(f"{what} for site {site!r} has {bad} non-finite value(s) (NaN or inf); directions must be finite.")


def _orthonormal_basis(site: str, basis: Array | sub.Subspace) -> Array:
    if isinstance(basis, sub.Subspace):
        b = basis.basis
    else:
        b = basis if isinstance(basis, jax.core.Tracer) else jnp.asarray(basis)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[0] == 0:
        raise ValueError(f"caft: basis for site {site!r} has shape {tuple(jnp.shape(basis))}; expected [k, d] with "
                         "k >= 1 directions (rows) in the site's last dimension d.")
    _check_finite("caft: basis", site, b)
    if not _is_concrete(b) or isinstance(basis, sub.Subspace):
        return b  # a Subspace is orthonormal by construction; a traced basis cannot be checked
    dtype = b.dtype if jnp.issubdtype(b.dtype, jnp.floating) else jnp.float32
    b64 = np.asarray(b, np.float64)
    dev = sub.orthonormality_error(b64)
    if dev <= sub.ORTHONORMAL_TOL:
        return b.astype(dtype)
    ortho = sub.from_directions(b64).basis
    if ortho.shape[0] == 0:
        raise ValueError(f"caft: basis for site {site!r} has no nonzero direction.")
    warnings.warn(f"caft: basis for site {site!r} (shape {tuple(b.shape)}) does not have orthonormal rows "
                  f"(‖B Bᵀ - I‖₂ = {dev:.3g}); ablating the span of its orthonormalised rows "
                  f"(rank {ortho.shape[0]}).", UserWarning, stacklevel=3)
    return jnp.asarray(ortho, dtype)


def caft(bases: Mapping[str, Array | sub.Subspace], centers: Mapping[str, Array] | None = None) -> TrainingHooks:
    """Concept-ablation fine-tuning: removes the span of each basis at its sites, during training only.

    At each site (name or glob pattern), ``h ← h − (h Vᵀ) V`` where ``V`` is the basis ``[k, d]``. Rows
    that are not orthonormal are orthonormalised (Gram–Schmidt, dependent rows dropped) with a warning,
    so the *span* of the given directions is what is ablated. A 1-D array is one direction.

    With a center ``μ`` for the site (mean ablation), ``h ← h − ((h − μ) Vᵀ) V``: only the deviation from
    ``μ`` along the span is removed, and ``μ``'s own component stays. Zero ablation also removes the
    mean component, which then *reappears* at inference, where the ablation is gone: an input shift the
    fine-tuned weights never saw. Give ``μ`` as the mean activation where the concept lives (e.g. over
    concept examples at the concept's position) when that shift matters.

    Args:
      bases: ``{site or pattern: basis [k, d] or Subspace}``.
      centers: optional ``{site or pattern: center [d]}`` for mean ablation; keys must be keys of ``bases``.

    Returns:
      A :class:`TrainingHooks` for :func:`idesign.train.lm_loss`.

    Raises:
      ValueError: a basis that is not 1-D/2-D, is empty, or holds NaN/inf; a center with NaN/inf or for a
        site that has no basis. Unknown sites and widths that do not match the site raise when the
        training loss is first traced.

    >>> import jax, jax.numpy as jnp, optax, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> th = ids.shaping.caft({'blocks.0.resid_post': jnp.eye(8)[:2]})
    >>> step = ids.make_train_step(ids.lm_loss(apply, hooks=th), optax.sgd(0.1))
    >>> state, _ = step(ids.init_train_state(params, optax.sgd(0.1)), {'tokens': jnp.ones((2, 4), jnp.int32)})
    >>> mean_ablated = ids.shaping.caft({'x': jnp.eye(2)[:1]}, centers={'x': jnp.array([5., 0.])})
    >>> ids.merge_hooks(mean_ablated.resolve({}))  # doctest: +ELLIPSIS
    {'x': (Add(..., scale=-1.0), Ablate(...), Add(..., scale=1.0))}
    """
    if not isinstance(bases, Mapping):
        raise TypeError(f"caft: bases must be a mapping {{site: basis [k, d]}}; got {type(bases).__name__}.")
    centers = dict(centers or {})
    unknown = [site for site in centers if site not in bases]
    if unknown:
        raise ValueError(f"caft: centers given for {unknown}, which have no basis; expected keys of bases "
                         f"{list(bases)}.")
    hooks: dict[str, Any] = {}
    for site, b in bases.items():
        ablate = Ablate(_orthonormal_basis(site, b))
        if site not in centers:
            hooks[site] = ablate
            continue
        mu = centers[site] if isinstance(centers[site], jax.core.Tracer) else jnp.asarray(centers[site])
        _check_finite("caft: center", site, mu)
        hooks[site] = (Add(mu, -1.0), ablate, Add(mu, 1.0))
    return TrainingHooks(hooks)


def preventative_steering(vectors: Mapping[str, Array], scale: float | Array = 1.0) -> TrainingHooks:
    """Preventative steering: adds ``scale * v`` at each site during training only.

    With the concept already supplied by the steering vector, the loss gains nothing by moving the
    weights along ``v``; at inference the vector is absent.

    Args:
      vectors: ``{site or pattern: direction [d]}`` (any shape broadcasting to the site's activation).
      scale: the steering strength ``α``: a scalar, or an array broadcasting against the activation
        (e.g. ``[batch, 1, 1]``).

    Returns:
      A :class:`TrainingHooks` for :func:`idesign.train.lm_loss`.

    Raises:
      ValueError: a vector or scale with NaN/inf, or a 0-d vector.

    >>> import jax.numpy as jnp, idesign as ids
    >>> th = ids.shaping.preventative_steering({'blocks.*.resid_post': jnp.ones(8)}, scale=4.0)
    >>> th.resolve({})['blocks.*.resid_post'][0].scale
    4.0
    """
    if not isinstance(vectors, Mapping):
        raise TypeError(f"preventative_steering: vectors must be a mapping {{site: direction [d]}}; got "
                        f"{type(vectors).__name__}.")
    hooks = {}
    for site, v in vectors.items():
        v = v if isinstance(v, jax.core.Tracer) else jnp.asarray(v)
        if v.ndim == 0:
            raise ValueError(f"preventative_steering: vector for site {site!r} is a scalar; expected a direction [d].")
        _check_finite("preventative_steering: vector", site, v)
        _check_finite("preventative_steering: scale", site, scale)
        hooks[site] = Add(v, scale)
    return TrainingHooks(hooks)


def gradient_routing(masks: Callable[[Batch], Mapping[str, Array]]) -> TrainingHooks:
    """Gradient routing: ``h ← m ⊙ h + (1 − m) ⊙ stop_gradient(h)`` with masks computed from each batch.

    The forward pass is unchanged; where ``m = 0`` no gradient flows back through the site, so those
    rows (tokens, examples) do not update any parameter upstream of it. Masks broadcast against the
    site's activation: ``[B, 1, 1]`` per example, ``[B, T, 1]`` per token, ``[d]`` per feature.

    Args:
      masks: a function ``batch -> {site or pattern: mask}``.

    Returns:
      A :class:`TrainingHooks` for :func:`idesign.train.lm_loss`.

    >>> import jax.numpy as jnp, idesign as ids
    >>> th = ids.shaping.gradient_routing(lambda b: {'blocks.0.resid_mid': b['is_forget'][:, None, None]})
    >>> th.resolve({'is_forget': jnp.array([1., 0.])})['blocks.0.resid_mid'][0].mask.shape
    (2, 1, 1)
    """
    if not callable(masks):
        raise TypeError(f"gradient_routing: masks must be a function batch -> {{site: mask}}; got "
                        f"{type(masks).__name__} (for fixed masks write lambda batch: masks).")

    def route(batch: Batch) -> dict[str, Route]:
        got = masks(batch)
        if not isinstance(got, Mapping):
            raise TypeError(f"gradient_routing: the masks function returned {type(got).__name__}; expected a "
                            "mapping {site: mask}.")
        return {site: Route(m) for site, m in got.items()}

    return TrainingHooks(route)


def combine(*training_hooks: TrainingHooks) -> TrainingHooks:
    """Chains several :class:`TrainingHooks`; at a shared site their interventions apply in argument order.

    >>> import jax.numpy as jnp, idesign as ids
    >>> th = ids.shaping.combine(ids.shaping.preventative_steering({'embed': jnp.ones(4)}),
    ...                          ids.shaping.caft({'embed': jnp.eye(4)[:1]}))
    >>> [type(i).__name__ for i in th.resolve({})['embed']]
    ['Add', 'Ablate']
    """
    for i, th in enumerate(training_hooks):
        if not isinstance(th, TrainingHooks):
            raise TypeError(f"combine: argument {i} is {type(th).__name__}; expected a TrainingHooks (wrap plain "
                            "hooks as TrainingHooks(hooks)).")
    return TrainingHooks(tuple(p for th in training_hooks for p in th.parts))


__all__ = ["TrainingHooks", "caft", "preventative_steering", "gradient_routing", "combine"]
