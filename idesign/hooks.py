"""Interventions on named activation sites, and the runner a model calls at each site.

A *hooks* pytree maps site names (or glob patterns such as ``blocks.*.resid_post``) to an
intervention or a tuple of interventions applied in order::

    hooks = {
        'blocks.1.resid_post': ids.Capture(),
        'blocks.0.mlp.hidden': (ids.Ablate(basis), ids.Capture()),
    }
    logits, captured = apply(params, tokens, hooks=hooks)

Interventions are pytree classes (:mod:`idesign._pytree`: frozen dataclasses whose checks run at
construction, not when JAX rebuilds them): their arrays are traced leaves and their class is part of
the static tree structure, so a jitted ``apply`` compiles once per *kind* of intervention and
never again when only a direction, basis or mask changes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from idesign import _treescope
from idesign import tree as tree_lib
from idesign._orthonormal import check_orthonormal
from idesign._pytree import pytree_class, static
from idesign._types import Array



def _broadcast_error(kind: str, site: str, field: str, shape: tuple, site_shape: tuple) -> ValueError:
    return ValueError(
        f"{kind} at site {site!r}: {field} has shape {shape}, which does not broadcast to the "
        f"site's activation shape {site_shape}. Expected trailing dimensions matching "
        f"{site_shape[-len(shape):] if shape else ()} (e.g. {site_shape[-1:]} for one vector per feature).")


def _check_broadcast(kind: str, site: str, field: str, x: Array, site_shape: tuple) -> None:
    shape = tuple(jnp.shape(x))
    try:
        out = jnp.broadcast_shapes(shape, site_shape)
    except ValueError:
        raise _broadcast_error(kind, site, field, shape, site_shape) from None
    if out != tuple(site_shape):
        raise _broadcast_error(kind, site, field, shape, site_shape)


@_treescope.rendered
class Intervention:
    """Base class: ``intervention.apply(site, h) -> h'`` on an activation ``h``.

    A new kind of intervention is a pytree dataclass with an ``apply`` method:

    >>> import dataclasses, jax, jax.numpy as jnp, idesign as ids
    >>> @jax.tree_util.register_dataclass
    ... @dataclasses.dataclass(frozen=True)
    ... class Scale(ids.Intervention):
    ...     factor: jax.Array
    ...     def apply(self, site, h):
    ...         return h * self.factor
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2))
    >>> logits, _ = apply(params, jnp.ones((1, 3), jnp.int32), hooks={'blocks.0.mlp_out': Scale(jnp.float32(0.0))})
    """

    def apply(self, site: str, h: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def sub_sites(self, site: str) -> tuple[str, ...]:
        """Sites this intervention exposes *inside* ``site`` (none by default).

        An intervention that computes intermediate activations of its own (an SAE splice's features) names them
        here and runs them through the model's :class:`SiteRunner` in :meth:`apply_in`, so hooks can capture,
        steer or ablate them like any model site.
        """
        del site
        return ()

    def apply_in(self, site: str, h: Array, sites: "SiteRunner") -> Array:
        """``apply`` with access to the runner, for interventions that expose :meth:`sub_sites`."""
        del sites
        return self.apply(site, h)


@pytree_class(eq=True)
class Capture(Intervention):
    """Records the activation at its position in the site's chain; changes nothing.

    >>> import idesign as ids
    >>> hooks = {'blocks.0.resid_post': ids.Capture()}
    """

    def apply(self, site: str, h: Array) -> Array:
        return h


@pytree_class(eq=True)
class Apply(Intervention):
    """A one-off hook without subclassing: ``fn(h) -> h'`` (or ``fn(site, h)`` with ``with_site=True``).

    ``fn`` is static (part of the compiled program): a new function recompiles, so pass arrays that
    change between calls through a pytree intervention (:class:`Add`, :class:`Replace`) instead.
    The result must keep the activation's shape.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.Apply(lambda h: 2 * h).apply('x', jnp.ones((1, 2)))
    Array([[2., 2.]], dtype=float32)
    """

    fn: Callable[..., Array] = static()
    with_site: bool = static(default=False)

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Apply: fn must be a callable h -> h' (e.g. `ids.Apply(lambda h: 0.5 * h)`); "
                            f"got {type(self.fn).__name__} {self.fn!r}.")

    def apply(self, site: str, h: Array) -> Array:
        out = self.fn(site, h) if self.with_site else self.fn(h)
        if getattr(out, "shape", None) != h.shape:
            raise ValueError(f"Apply at {site}: fn returned shape {getattr(out, 'shape', type(out).__name__)} but the "
                             f"activation has shape {h.shape}; return an array of the same shape.")
        return out.astype(h.dtype)


@pytree_class(eq=True)
class Add(Intervention):
    """Adds ``scale * direction`` (steering; preventative steering during training).

    ``direction`` broadcasts against the site's activation, usually shape ``[d]``; ``scale``
    is a scalar or broadcasts likewise (e.g. ``[batch, 1, 1]`` for per-example strength).

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.Add(jnp.ones(3), 2.0).apply('x', jnp.zeros((1, 3)))
    Array([[2., 2., 2.]], dtype=float32)
    """

    direction: Array
    scale: Array | float = 1.0

    def apply(self, site: str, h: Array) -> Array:
        _check_broadcast("Add", site, "direction", self.direction, h.shape)
        return h + (jnp.asarray(self.scale) * self.direction).astype(h.dtype)


@pytree_class(eq=True)
class Ablate(Intervention):
    """Removes a subspace: ``h - (h Vᵀ) V`` for a basis ``V`` of shape ``[k, d]`` with orthonormal rows.

    Used for concept-ablation fine-tuning (CAFT). The basis acts on the last axis.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.Ablate(jnp.array([[1., 0.]])).apply('x', jnp.array([[3., 4.]]))
    Array([[0., 4.]], dtype=float32)
    """

    basis: Array

    def __post_init__(self):
        # checked as Subspace checks its basis (construction only; a traced basis is not checked)
        if not isinstance(self.basis, jax.core.Tracer):
            object.__setattr__(self, "basis", jnp.asarray(self.basis))
        if jnp.ndim(self.basis) != 2:
            raise ValueError(f"Ablate: basis must be 2-D [k, d] (rows are directions); got shape "
                             f"{tuple(jnp.shape(self.basis))}.")
        check_orthonormal(self.basis, "Ablate")

    def apply(self, site: str, h: Array) -> Array:
        basis = jnp.asarray(self.basis)
        if basis.ndim != 2 or basis.shape[-1] != h.shape[-1]:
            raise ValueError(
                f"Ablate at site {site!r}: basis has shape {basis.shape}; expected [k, {h.shape[-1]}] "
                f"(k orthonormal rows in the last dimension of the site's activation, shape {tuple(h.shape)}).")
        basis = basis.astype(h.dtype)
        return h - (h @ basis.T) @ basis


@pytree_class(eq=True)
class Replace(Intervention):
    """Patches values: ``where(mask, value, h)`` (activation patching from another run).

    ``mask`` is optional (replace everywhere); both broadcast against the site's activation.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.Replace(jnp.ones(2), jnp.array([True, False])).apply('x', jnp.zeros(2))
    Array([1., 0.], dtype=float32)
    """

    value: Array
    mask: Array | None = None

    def apply(self, site: str, h: Array) -> Array:
        _check_broadcast("Replace", site, "value", self.value, h.shape)
        value = jnp.broadcast_to(jnp.asarray(self.value, h.dtype), h.shape)
        if self.mask is None:
            return value
        _check_broadcast("Replace", site, "mask", self.mask, h.shape)
        return jnp.where(jnp.asarray(self.mask, bool), value, h)


@pytree_class(eq=True)
class Route(Intervention):
    """Gradient routing: ``m ⊙ h + (1 − m) ⊙ stop_gradient(h)``.

    The forward value is unchanged; gradient flows only where ``mask`` is 1, so chosen data
    (e.g. a per-example mask of shape ``[batch, 1, 1]``) updates only chosen parameters.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> f = lambda h: ids.Route(jnp.array([1., 0.])).apply('x', h).sum()
    >>> jax.grad(f)(jnp.ones(2))
    Array([1., 0.], dtype=float32)
    """

    mask: Array

    def apply(self, site: str, h: Array) -> Array:
        _check_broadcast("Route", site, "mask", self.mask, h.shape)
        m = jnp.asarray(self.mask, h.dtype)
        return m * h + (1 - m) * jax.lax.stop_gradient(h)


Hooks = Mapping[str, "Intervention | Sequence[Intervention]"]


class TrainingOnly:
    """Base class of hook collections that only a training loss may apply (:class:`idesign.shaping.TrainingHooks`).

    Every consumer of hooks normalises them through :func:`merge_hooks`, which refuses these with a
    ``TypeError``; a training loss (``idesign.train.lm_loss``) calls :meth:`resolve` for each batch instead.
    """

    def resolve(self, batch: Any) -> dict[str, tuple[Intervention, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError


def _training_only_error(where: str) -> TypeError:
    return TypeError(
        f"{where} is a TrainingHooks (idesign.shaping: caft, preventative_steering, gradient_routing, combine): "
        "these interventions are training-only and are refused at inference (apply, generate, "
        "collect_activations). Use them through the training loss, ids.train.lm_loss(apply, hooks=training_hooks); "
        "run inference without them, or call training_hooks.resolve(batch) explicitly if you really want the "
        "training-time forward pass.")


def capture(*sites: str) -> dict[str, Capture]:
    """``{site: Capture()}`` for each name or glob pattern.

    >>> import idesign as ids
    >>> ids.capture('blocks.0.resid_post', 'logits')
    {'blocks.0.resid_post': Capture(), 'logits': Capture()}
    """
    return {s: Capture() for s in sites}


def _as_chain(value: Any, key: str) -> tuple[Intervention, ...]:
    chain = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for item in chain:
        if isinstance(item, TrainingOnly):
            raise _training_only_error(f"hooks[{key!r}]")
        if not isinstance(item, Intervention):
            raise TypeError(
                f"hooks[{key!r}] holds {type(item).__name__}; expected an intervention "
                "(Capture, Add, Ablate, Replace, Route) or a tuple of them.")
    if sum(isinstance(i, Capture) for i in chain) > 1:
        raise ValueError(f"hooks[{key!r}] has more than one Capture; one capture per site.")
    return chain


def merge_hooks(*hooks: Hooks | None) -> dict[str, tuple[Intervention, ...]]:
    """Combines hook dicts; chains at the same site are concatenated in argument order.

    >>> import jax.numpy as jnp, idesign as ids
    >>> h = ids.merge_hooks({'a': ids.Add(jnp.ones(2))}, {'a': ids.Capture()})
    >>> [type(i).__name__ for i in h['a']]
    ['Add', 'Capture']
    """
    out: dict[str, tuple[Intervention, ...]] = {}
    for h in hooks:
        if isinstance(h, TrainingOnly):
            raise _training_only_error("hooks")
        for key, value in (h or {}).items():
            out[key] = out.get(key, ()) + _as_chain(value, key)
    return out


def with_sub_sites(hooks: Hooks | None, site_names: Sequence[str]) -> list[str]:
    """``site_names`` plus the sub-sites that interventions in ``hooks`` open (e.g. an SAE splice's features).

    What hooks and ``sites=`` arguments may name when these hooks are in place.

    >>> import jax.numpy as jnp, idesign as ids
    >>> s = ids.sae.SAE.topk(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2), k=1)
    >>> ids.hooks.with_sub_sites({'b.*': ids.sae.Splice(s)}, ['a', 'b.0'])
    ['a', 'b.0', 'b.0.sae.features', 'b.0.sae.error']
    """
    names = list(site_names)
    for key, chain in merge_hooks(hooks).items():
        bases = [n for n in site_names if fnmatch.fnmatchcase(n, key)]
        for intervention in chain:
            for base in bases:
                names += [n for n in intervention.sub_sites(base) if n not in names]
    return names


class SiteRunner:
    """What a model calls at each activation site while it is traced.

    It resolves glob patterns against the model's site list once, applies each site's chain of
    interventions, and collects captures. It is a trace-time helper, not a pytree: create one
    per call of ``apply``. A model author calls ``sites(name, value)`` wherever an activation
    should be observable:

    >>> import jax.numpy as jnp, idesign as ids
    >>> sites = ids.SiteRunner({'h*': ids.Capture()}, site_names=['h1', 'h2'])
    >>> x = sites('h2', sites('h1', jnp.ones(2)) * 2)
    >>> sorted(sites.captured), sites.wants('h1')
    (['h1', 'h2'], True)
    """

    def __init__(self, hooks: Hooks | None, site_names: Sequence[str]):
        chains = merge_hooks(hooks)
        self._chains: dict[str, tuple[Intervention, ...]] = {}
        names = with_sub_sites(chains, site_names)
        for key, chain in chains.items():
            # A chain that opens sub-sites (an SAE splice) resolves against the model's own sites only, so a
            # pattern such as `blocks.0.*` never applies the splice to its own features.
            nests = any(type(i).sub_sites is not Intervention.sub_sites for i in chain)
            for site in tree_lib.expand_patterns([key], site_names if nests else names, what="site"):
                self._chains[site] = self._chains.get(site, ()) + chain
        self.captured: dict[str, Array] = {}
        self.visited: set[str] = set()
        #: ``[B, T]`` bool, real positions (set by a model that pads): at the others a hooked site keeps its
        #: value from before the hooks, so a NaN a hook writes into padding cannot reach any gradient.
        self.valid: Array | None = None

    def wants(self, site: str) -> bool:
        """Whether anything is hooked at ``site`` (so optional activations must be materialised)."""
        return site in self._chains

    def chain(self, site: str) -> tuple[Intervention, ...]:
        """The interventions applied at ``site`` (patterns resolved), in order; ``()`` if none."""
        return self._chains.get(site, ())

    def __call__(self, site: str, h: Array) -> Array:
        self.visited.add(site)
        before = h
        for intervention in self._chains.get(site, ()):
            h = intervention.apply_in(site, h, self)
            if isinstance(intervention, Capture):
                self.captured[site] = h
        real = self._real(site, before, h)
        # The second `where` of the double-where trick: padding is masked in the forward pass by `where` (attention
        # values, the loss), whose backward sends 0 there; but a dense layer's dW = Σ x ⊗ g still multiplies that
        # 0 by the NaN input (0 * NaN = NaN). Keeping the pre-hook value at pad positions keeps every x finite.
        return h if real is None else jnp.where(real, h, before)

    def _real(self, site: str, before: Array, after: Array) -> Array | None:
        """``valid`` broadcast to the site's layout (``[B, H, T, S]`` for attention patterns, else ``[B, T, ...]``)."""
        if self.valid is None or after is before or getattr(after, "shape", None) != getattr(before, "shape", None):
            return None
        B, T = self.valid.shape
        if site.endswith("pattern") and before.ndim == 4 and (before.shape[0], before.shape[2]) == (B, T):
            return self.valid[:, None, :, None]
        if before.ndim >= 2 and before.shape[:2] == (B, T):
            return self.valid.reshape(B, T, *([1] * (before.ndim - 2)))
        return None

    def check_all_visited(self) -> None:
        """Raises if a hooked site was never reached (e.g. a cache-only path skipped it)."""
        missing = [s for s in self._chains if s not in self.visited]
        if missing:
            raise ValueError(f"hooked sites {missing} were not reached by this forward pass.")
