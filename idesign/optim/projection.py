"""Gradient-subspace projection as optax transforms (GPM, OGD, PCGrad-style protection).

**Per-leaf subspaces.** A *subspace tree* has the parameters' structure; each leaf is ``None`` (no
subspace), a :class:`~idesign.subspaces.Subspace`, or a tuple of them (at most one per side). Build
one from ``{pattern: Subspace}`` with :func:`subspaces_for`, which also understands dense-layer site
prefixes (``blocks.0.mlp.up``) through ``apply.dense_layers``. Sides refer to the leaf's axes:

* ``"input"``: the first axis — a Flax ``[d_in, d_out]`` kernel's input: ``ΔW ← (I - UᵀU) ΔW``;
* ``"output"``: the last axis: ``ΔW ← ΔW (I - VᵀV)``; both sides together: ``(I - UᵀU) ΔW (I - VᵀV)``;
* ``"flat"``: the flattened leaf (OGD): ``g ← g - Vᵀ(V g)``.

:func:`project_onto` keeps the component inside instead (``UᵀU ΔW`` ...).

**Leaves without a subspace** (biases, norms, embeddings, or kernels you did not give one) follow the
``others`` rule: ``"pass"`` (unchanged, the default) or ``"zero"`` (no update: frozen), or a dict
``{glob pattern: "pass" | "zero"}`` where the first matching pattern wins and unmatched leaves pass.
A bias changes a layer's output on every input, so "function preservation" on a subspace needs the
layer's bias frozen too (``others={"blocks.0.mlp.up.bias": "zero"}``).

**Placement with adaptive optimizers.** Projecting the raw gradient before Adam does not keep the
*update* orthogonal: Adam rescales each element, and weight decay adds ``λ·W``, which has components
inside the subspace. The projection must act on the final update: wrap the optimizer with
:func:`projected` (or chain :func:`project_out` *last*). See Adam-NSCL (Wang et al. 2021).

The subspaces live in the transform's state (:class:`ProjectionState`), so re-estimated bases can be
swapped in without recompiling, e.g. ``optax.tree_utils.tree_set(opt_state, subspaces=new_tree)``.
All operations are jnp contractions, so they run on sharded parameters unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import tree as tree_lib
from idesign._types import Array, PyTree
from idesign.optim._final import then_on_final_update
from idesign.subspaces import Subspace

Rule = Literal["pass", "zero"]
Others = Rule | Mapping[str, Rule]
RULES = ("pass", "zero")


class ProjectionState(NamedTuple):
    """State of :func:`project_out` / :func:`project_onto`: the subspace tree (``None`` leaves = no subspace)."""

    subspaces: PyTree


class ProjectedState(NamedTuple):
    """State of :func:`projected`: the wrapped optimizer's state and the projection's."""

    inner: optax.OptState
    projection: ProjectionState


class ConflictState(NamedTuple):
    """State of :func:`project_conflicting` (empty; the protected gradient arrives with each step)."""


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, Subspace) or (
        isinstance(x, tuple) and len(x) > 0 and all(isinstance(s, Subspace) for s in x))


def _as_tuple(spec: Any) -> tuple[Subspace, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, Subspace) else tuple(spec)


def _flatten_specs(subspaces: PyTree, params: PyTree) -> list[Any]:
    """Subspace specs in the order of ``params``' leaves; raises naming paths on a structure mismatch."""
    want = [tree_lib.path_str(p) for p, _ in tree_lib.leaves_with_paths(params)]
    pairs = jax.tree_util.tree_flatten_with_path(subspaces, is_leaf=_is_spec)[0]
    got = {tree_lib.path_str(p): s for p, s in pairs}
    bad = [p for p, s in got.items() if not _is_spec(s)]
    if bad:
        raise TypeError(f"subspace tree leaf {bad[0]} is {type(got[bad[0]]).__name__}; expected a Subspace, a "
                        "tuple of Subspaces (one per side) or None.")
    problem = tree_lib.structure_diff(want, list(got), what="the subspace tree")
    if problem:
        raise ValueError(problem + ". Build it with subspaces_for(params, {pattern: Subspace}), with None for "
                         "leaves that have no subspace.")
    return [got[p] for p in want]


def _check_leaf(path: str, shape: tuple[int, ...], spec: Any) -> None:
    sides = [s.side for s in _as_tuple(spec)]
    if len(set(sides)) != len(sides):
        raise ValueError(f"subspace for {path}: more than one subspace on side {sides}; combine them into one "
                         "basis (from_directions on the stacked rows, or extend).")
    for s in _as_tuple(spec):
        b = tuple(s.basis.shape)
        if s.side == "flat":
            need, what = math.prod(shape), "the leaf's size"
        elif len(shape) < 1:
            raise ValueError(f"subspace for {path}: side {s.side!r} needs a leaf with at least 1 axis; the leaf "
                             f"has shape {shape}.")
        else:
            need, what = (shape[0], "the leaf's first axis") if s.side == "input" else (shape[-1], "its last axis")
        if b[1] != need:
            raise ValueError(f"subspace for {path}: basis has shape {b} (side {s.side!r}) but the parameter has "
                             f"shape {shape}; side {s.side!r} needs a basis [k, {need}] ({what}).")


def check_subspaces(subspaces: PyTree, params: PyTree) -> None:
    """Validates a subspace tree against parameters: structure, one subspace per side, basis dimensions.

    Raises:
      ValueError: naming the pytree path and both shapes (or the missing / unexpected paths).

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import projection
    >>> params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
    >>> projection.check_subspaces({'w': ids.subspaces.Subspace(jnp.eye(2)[:1]), 'b': None}, params)
    Traceback (most recent call last):
    ...
    ValueError: subspace for w: basis has shape (1, 2) (side 'input') but the parameter has shape (3, 2); side 'input' needs a basis [k, 3] (the leaf's first axis).
    """
    # inside optax.partition / optax.masked, leaves the wrapper holds out arrive as MaskedNode: no shape to check
    is_leaf = lambda x: x is None or isinstance(x, optax.MaskedNode)
    specs = _flatten_specs(subspaces, params) if not _has_masked(params) else _flatten_specs_loose(subspaces, params)
    for (path, leaf), spec in zip(tree_lib.leaves_with_paths(params, is_leaf=is_leaf), specs):
        if not is_leaf(leaf):
            _check_leaf(tree_lib.path_str(path), tuple(jnp.shape(leaf)), spec)


def _check_others(others: Others) -> None:
    rules = [others] if isinstance(others, str) else list(others.values())
    for r in rules:
        if r not in RULES:
            raise ValueError(f"others: rule must be one of {RULES}; got {r!r}.")


def _rule_for(path: str, others: Others) -> Rule:
    if isinstance(others, str):
        return others
    for pattern, rule in others.items():
        if tree_lib.matches(path, pattern):
            return rule
    return "pass"


def _apply_side(x: Array, basis: Array, side: str, onto: bool) -> Array:
    shape = x.shape
    if side == "input":
        m = x.reshape(shape[0], -1)
        inside = basis.T @ (basis @ m)
    elif side == "output":
        m = x.reshape(-1, shape[-1])
        inside = (m @ basis.T) @ basis
    else:
        m = x.reshape(-1)
        inside = basis.T @ (basis @ m)
    return (inside if onto else m - inside).reshape(shape)


def _masked_side(m: Array, basis: Array, free: Array, onto: bool) -> Array:
    """Projection of ``m [d, n]`` (basis ``[k, d]`` acting on axis 0, each column on its own) onto the
    updates that leave the frozen elements (``free == 0``) at zero: the closest such update, exactly.

    Out of the subspace, column ``g`` with free set ``M``: ``y = M (g - Uᵀ λ)`` with ``(U M Uᵀ) λ = U M g``, the
    orthogonal projection onto ``{y : y_frozen = 0, U y = 0}`` (computed per column through an orthonormal basis of
    the row space of ``U M``). Onto it: ``y = Uᵀ a``
    with ``a = (I - H⁺H) U g``, ``H = U (I - M) Uᵀ``, the closest update inside the span that is zero where frozen.
    """
    if onto:
        h = jnp.einsum("ai,in,bi->nab", basis, 1.0 - free, basis)
        a = (basis @ m).T                                           # [n, k]
        a = a - jnp.einsum("nab,nbc,nc->na", jnp.linalg.pinv(h, hermitian=True), h, a)
        return basis.T @ a.T
    # The constraint rows restricted to a column's free elements, ``U M``, span the directions ``y`` must avoid.
    # An orthonormal basis of that row space (the right singular vectors) projects them out with rounding at eps
    # level whatever the conditioning of ``U M Uᵀ`` (its pseudo-inverse squares the condition number: a nearly
    # pinned column leaked 4e-4 of its update into the subspace). A singular value at rounding level (≤ 10 eps;
    # the basis is orthonormal, so every one is ≤ 1) is not a constraint: dropping it leaks at most that much.
    _, sv, vt = jnp.linalg.svd(jnp.einsum("ai,in->nai", basis, free), full_matrices=False)   # vt: [n, k, d]
    vt = vt * (sv > 10 * jnp.finfo(m.dtype).eps)[..., None]
    solve = lambda g: free * (g - jnp.einsum("nai,na->in", vt, jnp.einsum("nai,in->na", vt, g)))
    y = solve(solve(m))  # one step of iterative refinement: the second pass removes the first one's rounding
    # A column whose result is at rounding level (a dot product of length d is exact to about d·eps relative)
    # is one the constraints pin to zero (e.g. fewer free elements than directions): return it exactly, or
    # its rounding noise, all of it inside the subspace, would be the whole update.
    eps = jnp.finfo(m.dtype).eps
    noise = m.shape[0] * eps * jnp.linalg.norm(m, axis=0)
    return jnp.where(jnp.linalg.norm(y, axis=0) <= noise, 0.0, y)


def _project_masked(x: Array, basis: Array, side: str, fixed: Array, onto: bool) -> Array:
    """``_apply_side`` for a leaf some of whose elements are frozen (``fixed`` broadcasts to ``x``)."""
    shape = x.shape
    free = 1.0 - jnp.broadcast_to(jnp.asarray(fixed, bool), shape).astype(x.dtype)
    if side == "input":
        y = _masked_side(x.reshape(shape[0], -1), basis, free.reshape(shape[0], -1), onto)
    elif side == "output":
        y = _masked_side(x.reshape(-1, shape[-1]).T, basis, free.reshape(-1, shape[-1]).T, onto).T
    else:
        y = _masked_side(x.reshape(-1, 1), basis, free.reshape(-1, 1), onto)
    return y.reshape(shape)


#: :func:`_project_masked_sides`' conjugate gradients stop at this residual ``‖F y‖ / ‖g‖`` (per pass).
SIDES_CG_TOL = 1e-7
#: Iteration cap of each conjugate-gradient pass.
SIDES_CG_MAXITER = 1000
#: A two-sided joint projection whose measured protected share exceeds this returns a zero update for the leaf.
SIDES_MAX_SHARE = 1e-6


def _project_masked_sides(x: Array, bases: Sequence[tuple[Array, str]], fixed: Array,
                          onto: bool) -> tuple[Array, Array, Array]:
    """The joint projection for a partly frozen leaf with subspaces on its input *and* output sides.

    ``P`` (both sides at once: ``(I - UᵀU) X (I - VᵀV)``, or ``UᵀU X VᵀV`` onto) is an orthogonal projector
    because the two sides commute. The closest update ``y`` with ``y = P y`` and ``y_frozen = 0`` is
    ``y = P(g - F μ)`` where ``F`` keeps the frozen elements and ``(F P F) μ = F P g``: a symmetric PSD system
    on the frozen elements, singular but consistent, solved by conjugate gradients. The iterate kept is the one
    with the smallest *measured* residual ``‖F P(g - F μ)‖`` (recomputed, not the recurrence's: in float32 the
    singular directions make the recurrence drift). A second pass on the first result removes most of what the
    first left. The measured share of the masked result inside the protected subspace is checked at the end: above
    :data:`SIDES_MAX_SHARE` (the iteration cap reached on an ill-conditioned frozen pattern) the leaf's update is
    zero, which keeps both guarantees.

    Returns ``(y, iterations of both passes, measured share of y after zeroing its frozen elements)``.
    """
    frozen = jnp.broadcast_to(jnp.asarray(fixed, bool), x.shape).astype(x.dtype)

    def proj(y):
        for basis, side in bases:  # input- and output-side projectors commute: their product is the joint one
            y = _apply_side(y, basis, side, onto)
        return y

    # in exact arithmetic CG ends within min(#frozen, rank P⊥ + 1) iterations: F P F = F - F P⊥ F has at most
    # rank P⊥ + 1 distinct eigenvalues on the frozen elements. rank P⊥ = size - (kept per side) x (axes between)
    kept = math.prod(b.shape[0] if onto else b.shape[1] - b.shape[0] for b, _ in bases)
    rank_perp = x.size - kept * (x.size // math.prod(b.shape[1] for b, _ in bases))
    n_frozen = x.size if isinstance(fixed, jax.core.Tracer) else int(np.broadcast_to(np.asarray(fixed, bool),
                                                                                       x.shape).sum())
    maxiter = min(2 * min(n_frozen, rank_perp + 1) + 10, SIDES_CG_MAXITER)
    safe_div = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)  # noqa: E731

    def solve(g):  # conjugate gradients on (F P F) μ = F P g, keeping the best measured iterate
        pg = proj(g)
        b = frozen * pg
        stop = SIDES_CG_TOL * jnp.linalg.norm(g)

        def body(c):
            mu, r, d, rs, best, i, best_mu = c
            ad = frozen * proj(frozen * d)
            alpha = safe_div(rs, jnp.vdot(d, ad))
            mu, r = mu + alpha * d, r - alpha * ad
            rs_new = jnp.vdot(r, r)
            measured = jnp.linalg.norm(frozen * proj(g - frozen * mu))
            better = measured < best
            return (mu, r, r + safe_div(rs_new, rs) * d, rs_new, jnp.where(better, measured, best), i + 1,
                    jnp.where(better, mu, best_mu))

        zero = jnp.zeros_like(b)
        init = (zero, b, b, jnp.vdot(b, b), jnp.linalg.norm(b), 0, zero)
        *_, i, mu = jax.lax.while_loop(lambda c: (c[5] < maxiter) & (c[4] > stop), body, init)
        return proj(g - frozen * mu), i

    y1, i1 = solve(x)
    y, i2 = solve(y1)
    y = jnp.where(frozen > 0, 0.0, y)
    norm = jnp.linalg.norm(y)
    share = safe_div(jnp.linalg.norm(y - proj(y)), norm)
    # a result at rounding level is one the constraints pin to zero (as for one side); a share above the bound
    # is a pattern the capped iterations did not resolve: both return the zero update, which keeps both guarantees
    keep = (norm > x.size * jnp.finfo(x.dtype).eps * jnp.linalg.norm(x)) & (share <= SIDES_MAX_SHARE)
    return jnp.where(keep, y, 0.0), i1 + i2, share


def _whole(fixed: Any) -> bool | None:
    """``True``/``False`` for a mask leaf known at trace time to cover the whole leaf, else ``None``."""
    if fixed is None:
        return False
    if isinstance(fixed, jax.core.Tracer):
        return None
    f = np.asarray(fixed)
    return bool(f.all()) if f.all() or not f.any() else None


def _project_leaf(path: str, update: Any, spec: Any, onto: bool, others: Others, fixed: Any = None) -> Any:
    if update is None or isinstance(update, optax.MaskedNode):
        return update
    whole = _whole(fixed)
    if whole:  # frozen entirely: freezing wins, and a zero update satisfies every projection
        return jnp.full_like(update, -0.0)
    specs = _as_tuple(spec)
    if not specs:
        out = update if _rule_for(path, others) == "pass" else jnp.full_like(update, -0.0)
        return out if whole is False else jnp.where(fixed, jnp.asarray(-0.0, update.dtype), out)
    _check_leaf(path, tuple(update.shape), spec)
    compute = jnp.promote_types(update.dtype, jnp.float32)
    x = update.astype(compute)
    if whole is False:
        for s in specs:  # input- and output-side projectors commute; "flat" is one leaf-wide projector
            x = _apply_side(x, s.basis.astype(compute), s.side, onto)
        return x.astype(update.dtype)
    if len(specs) == 1:
        x = _project_masked(x, specs[0].basis.astype(compute), specs[0].side, fixed, onto)
    elif "flat" in [s.side for s in specs] or x.ndim < 2:  # the projectors do not commute: no joint projector
        raise NotImplementedError(
            f"subspace for {path}: the leaf (shape {update.shape}) has subspaces {[s.side for s in specs]} that act on "
            "one axis, and some, not all, of its elements are frozen; the joint projection needs commuting "
            "projectors (input and output sides of a leaf with 2 or more axes). Freeze the whole leaf, or protect "
            "it on one side.")
    else:
        x = _project_masked_sides(x, [(s.basis.astype(compute), s.side) for s in specs], fixed, onto)[0]
    x = x.astype(update.dtype)
    # bit-exact zeros: -0.0 leaves p + u == p for every p (see idesign.optim._freezing)
    return jnp.where(jnp.broadcast_to(jnp.asarray(fixed, bool), x.shape), jnp.asarray(-0.0, x.dtype), x)


def apply_projection(updates: PyTree, subspaces: PyTree, *, onto: bool = False, others: Others = "pass",
                     freeze_mask: PyTree | None = None) -> PyTree:
    """Projects each leaf of ``updates`` out of (or onto) its subspace: the function behind the transforms.

    With ``freeze_mask`` (an element mask, ``True`` = frozen), the result is the closest update that is
    both projected and zero (``-0.0``) on the frozen elements, so freezing and projection hold at once.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import projection
    >>> u = {'w': jnp.ones((2, 3)), 'b': jnp.ones(3)}
    >>> s = {'w': ids.subspaces.Subspace(jnp.eye(2)[:1]), 'b': None}
    >>> out = projection.apply_projection(u, s, others='zero')
    >>> out['w'].tolist(), out['b'].tolist()
    ([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [-0.0, -0.0, -0.0])

    A frozen element stays put and the update still has no component along the protected direction:

    >>> s = {'w': ids.subspaces.Subspace(jnp.array([[0.6, 0.8]])), 'b': None}
    >>> m = {'w': jnp.array([[True, False, False], [False, False, False]]), 'b': False}
    >>> out = projection.apply_projection(u, s, freeze_mask=m)['w']
    >>> out[0, 0].item(), abs(jnp.array([0.6, 0.8]) @ out).max() < 1e-6
    (-0.0, Array(True, dtype=bool))
    """
    _check_others(others)
    is_leaf = lambda x: x is None or isinstance(x, optax.MaskedNode)
    specs = _flatten_specs(subspaces, updates) if not _has_masked(updates) else _flatten_specs_loose(subspaces, updates)
    leaves = tree_lib.leaves_with_paths(updates, is_leaf=is_leaf)
    treedef = jax.tree_util.tree_structure(updates, is_leaf=is_leaf)
    fixed = [None] * len(leaves) if freeze_mask is None else _flatten_mask(freeze_mask, updates)
    out = [_project_leaf(tree_lib.path_str(p), u, s, onto, others, f)
           for (p, u), s, f in zip(leaves, specs, fixed)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _flatten_mask(mask: PyTree, updates: PyTree) -> list[Any]:
    """Mask leaves in the order of ``updates``' leaves (``None`` / ``MaskedNode`` updates count as leaves)."""
    is_leaf = lambda x: x is None or isinstance(x, optax.MaskedNode)
    want = [tree_lib.path_str(p) for p, _ in tree_lib.leaves_with_paths(updates, is_leaf=is_leaf)]
    got = {tree_lib.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    problem = tree_lib.structure_diff(want, list(got), what="the freeze mask")
    if problem:
        raise ValueError(problem + ".")
    return [got[p] for p in want]


def _has_masked(tree: PyTree) -> bool:
    return any(x is None or isinstance(x, optax.MaskedNode) for x in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode)))


def _flatten_specs_loose(subspaces: PyTree, updates: PyTree) -> list[Any]:
    # updates with None / MaskedNode leaves (inside optax.masked): treat those as leaves too
    placeholder = jax.tree_util.tree_map(lambda x: 0 if (x is None or isinstance(x, optax.MaskedNode)) else x,
                                         updates, is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))
    return _flatten_specs(subspaces, placeholder)


def _projection(subspaces: PyTree, onto: bool, others: Others) -> optax.GradientTransformationExtraArgs:
    _check_others(others)

    def init_fn(params):
        check_subspaces(subspaces, params)
        # copies: a train step that donates its state must not delete the caller's basis arrays
        return ProjectionState(jax.tree_util.tree_map(jnp.copy, subspaces))

    def update_fn(updates, state, params=None, *, freeze_mask=None, **extra_args):
        # freeze_mask arrives from an enclosing ids.optim.frozen (or a frozen optimizer inside projected):
        # the projection then also keeps the frozen elements at zero, so both guarantees hold at once
        del params, extra_args
        return apply_projection(updates, state.subspaces, onto=onto, others=others, freeze_mask=freeze_mask), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_out(subspaces: PyTree, *, others: Others = "pass") -> optax.GradientTransformation:
    """Removes each leaf's subspace from the updates: ``(I - UᵀU) ΔW``, ``ΔW (I - VᵀV)``, or OGD's flat rule.

    Chain it *last* (after the optimizer, weight decay and learning rate), or use :func:`projected`.

    Args:
      subspaces: a subspace tree with the parameters' structure (see :func:`subspaces_for`).
      others: the rule for leaves without a subspace: ``"pass"``, ``"zero"``, or ``{pattern: rule}``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ProjectionState` (holding the subspaces).
      ``init`` validates the tree against the parameters.

    >>> import jax.numpy as jnp, optax, idesign as ids
    >>> from idesign.optim import projection
    >>> params = {'w': jnp.zeros((2, 2))}
    >>> opt = optax.chain(optax.sgd(1.0), projection.project_out({'w': ids.subspaces.Subspace(jnp.eye(2)[:1])}))
    >>> updates, _ = opt.update({'w': jnp.ones((2, 2))}, opt.init(params))
    >>> updates['w'].tolist()
    [[0.0, 0.0], [-1.0, -1.0]]
    """
    return _projection(subspaces, False, others)


def project_onto(subspaces: PyTree, *, others: Others = "pass") -> optax.GradientTransformation:
    """Restricts each leaf's updates to its subspace: ``UᵀU ΔW``, ``ΔW VᵀV``, ``Vᵀ(V g)``.

    Same arguments as :func:`project_out`. With ``others="zero"`` only the given subspaces move.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import projection
    >>> t = projection.project_onto({'w': ids.subspaces.Subspace(jnp.eye(2)[:1], 'output')})
    >>> t.update({'w': jnp.ones((2, 2))}, t.init({'w': jnp.zeros((2, 2))}))[0]['w'].tolist()
    [[1.0, 0.0], [1.0, 0.0]]
    """
    return _projection(subspaces, True, others)


def projected(optimizer: optax.GradientTransformation, subspaces: PyTree, *, onto: bool = False,
              others: Others = "pass") -> optax.GradientTransformationExtraArgs:
    """Wraps any optimizer so the projection acts on its *final* update (after scaling, decay and lr).

    This is the placement that keeps the parameter change orthogonal to the subspaces with Adam(W):
    projecting the raw gradient before Adam does not (per-element rescaling and weight decay
    reintroduce components inside the subspace). Extra keyword arguments reach the inner optimizer.

    Args:
      optimizer: any optax transform (e.g. ``optax.adamw(1e-3, weight_decay=0.1)``).
      subspaces: a subspace tree (see :func:`subspaces_for`).
      onto: restrict onto the subspaces instead of projecting out of them.
      others: rule for leaves without a subspace (see the module docstring).

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`ProjectedState`.

    >>> import jax.numpy as jnp, optax, idesign as ids
    >>> from idesign.optim import projection
    >>> params = {'w': jnp.ones((2, 2))}
    >>> opt = projection.projected(optax.adamw(0.1, weight_decay=0.5), {'w': ids.subspaces.Subspace(jnp.eye(2)[:1])})
    >>> updates, _ = opt.update({'w': jnp.ones((2, 2))}, opt.init(params), params)
    >>> updates['w'][0].tolist()   # no change along the protected input direction
    [0.0, 0.0]
    """
    return then_on_final_update(optimizer, _projection(subspaces, onto, others), ProjectedState)


def project_conflicting(mode: Literal["pcgrad", "orthogonal"] = "pcgrad", *,
                        scope: Literal["leaf", "global"] = "leaf",
                        inputs: Literal["gradients", "updates"] = "gradients",
                        arg_name: str = "protected_grads") -> optax.GradientTransformationExtraArgs:
    """Projects off the gradient ``h`` of a protected loss, given at each step as a keyword argument.

    ``x ← x - (⟨x, h⟩ / ‖h‖²) h`` — always (``mode="orthogonal"``), or only where the step would
    *increase* the protected loss to first order (``mode="pcgrad"``, PCGrad, Yu et al. 2020). With
    ``scope="leaf"`` each parameter leaf is tested and projected on its own (per-layer PCGrad, stronger
    protection); ``scope="global"`` uses one inner product over the whole tree (the original PCGrad).
    A leaf (or tree) whose ``h`` is zero is left unchanged.

    ``inputs`` says what the transform receives, which fixes the sign of a conflict: ``"gradients"``
    (chained *before* the optimizer, as in PCGrad: conflict when ``⟨g, h⟩ < 0``) or ``"updates"``
    (chained *after* it, on the final step ``u = -lr·(...)``: conflict when ``⟨u, h⟩ > 0``). After an
    adaptive optimizer only ``"updates"`` guarantees the step does not increase the protected loss to
    first order.

    The step passes ``h`` as ``step(state, batch, protected_grads=h)`` (:func:`idesign.train.make_train_step`
    forwards keyword arguments to ``update``); ``h`` has the parameters' structure.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import projection
    >>> t = projection.project_conflicting()
    >>> g = {'w': jnp.array([1., -1.])}
    >>> t.update(g, t.init(g), protected_grads={'w': jnp.array([0., 1.])})[0]['w'].tolist()
    [1.0, 0.0]
    >>> t.update(g, t.init(g), protected_grads={'w': jnp.array([0., -1.])})[0]['w'].tolist()  # no conflict
    [1.0, -1.0]
    """
    if mode not in ("pcgrad", "orthogonal"):
        raise ValueError(f"project_conflicting: mode must be 'pcgrad' or 'orthogonal'; got {mode!r}.")
    if scope not in ("leaf", "global"):
        raise ValueError(f"project_conflicting: scope must be 'leaf' or 'global'; got {scope!r}.")
    if inputs not in ("gradients", "updates"):
        raise ValueError(f"project_conflicting: inputs must be 'gradients' or 'updates'; got {inputs!r}.")
    sign = 1.0 if inputs == "gradients" else -1.0

    def coefficient(dot: Array, sq: Array) -> Array:
        safe = jnp.where(sq > 0, sq, 1.0)
        c = jnp.where(sq > 0, dot / safe, 0.0)
        return c if mode == "orthogonal" else jnp.where(sign * dot < 0, c, 0.0)

    def init_fn(params):
        del params
        return ConflictState()

    def update_fn(updates, state, params=None, **extra_args):
        del params
        if arg_name not in extra_args:
            raise TypeError(f"project_conflicting: the step must pass the protected loss's gradient as the keyword "
                            f"argument {arg_name}= (got {sorted(extra_args)}).")
        protected = extra_args[arg_name]
        problem = tree_lib.structure_diff(updates, protected, what=f"project_conflicting: {arg_name}",
                                          against="the updates' structure")
        if problem:
            raise ValueError(problem + ".")
        f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if scope == "leaf":
            def leaf(u, h):
                u32, h32 = f32(u), f32(h).astype(f32(u).dtype)
                c = coefficient(jnp.vdot(u32, h32), jnp.vdot(h32, h32))
                return (u32 - c * h32).astype(u.dtype)
            return jax.tree_util.tree_map(leaf, updates, protected), state
        dot = sum(jnp.vdot(f32(u), f32(h)) for u, h in zip(jax.tree_util.tree_leaves(updates),
                                                           jax.tree_util.tree_leaves(protected)))
        sq = sum(jnp.vdot(f32(h), f32(h)) for h in jax.tree_util.tree_leaves(protected))
        c = coefficient(dot, sq)
        return jax.tree_util.tree_map(lambda u, h: (f32(u) - c * f32(h)).astype(u.dtype), updates, protected), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def subspaces_for(params: PyTree, spec: Mapping[str, Subspace | Sequence[Subspace]], *,
                  dense_layers: Mapping[str, str] | None = None) -> PyTree:
    """Builds a subspace tree from ``{pattern: Subspace or tuple of Subspaces}``.

    Keys are glob patterns over parameter paths (``blocks.*.mlp.up.kernel``) or, given
    ``dense_layers`` (``apply.dense_layers``), over dense-layer site prefixes (``blocks.*.mlp.up``,
    ``unembed``), which resolve to their kernels. A tied unembedding's kernel is the embedding table
    in ``[d_out, d_in]`` layout, so its subspace's side is swapped (``"input"`` acts on the table's last
    axis). Leaves that no pattern names get ``None``.

    Raises:
      KeyError: a pattern that matches no parameter path or site prefix.
      ValueError: two patterns giving a leaf a subspace on the same side, or dimension mismatches.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import projection
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> u = ids.subspaces.Subspace(jnp.eye(8)[:2])
    >>> tree = projection.subspaces_for(params, {'blocks.*.attn.*_proj': u, 'unembed': u}, dense_layers=apply.dense_layers)
    >>> tree['blocks'][0]['attn']['q_proj']['kernel'], tree['embed']['embedding'], tree['blocks'][0]['attn']['q_proj']['bias']
    (Subspace(rank=2, dim=8, side='input'), Subspace(rank=2, dim=8, side='output'), None)
    """
    chosen: dict[str, list[Subspace]] = {}
    for pattern, value in spec.items():
        subs = _as_tuple(value if not isinstance(value, list) else tuple(value))
        # a pattern like '*' may name a kernel both by its path and by its layer: dedupe
        for path, transposed in dict.fromkeys(tree_lib.resolve_kernels(params, pattern, dense_layers).values()):
            for s in subs:
                if transposed and s.side != "flat":
                    s = s.with_side("output" if s.side == "input" else "input")
                chosen.setdefault(path, []).append(s)
    out = tree_lib.map_with_path(lambda p, _: None if p not in chosen else (
        chosen[p][0] if len(chosen[p]) == 1 else tuple(chosen[p])), params)
    check_subspaces(out, params)
    return out


__all__ = ["ProjectionState", "ProjectedState", "ConflictState", "project_out", "project_onto", "projected",
           "project_conflicting", "subspaces_for", "check_subspaces", "apply_projection"]
