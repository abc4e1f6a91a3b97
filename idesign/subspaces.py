"""Subspaces: orthonormal bases of activation or parameter directions, and how to build them.

A :class:`Subspace` is a basis ``[k, d]`` with orthonormal rows plus the side of a weight it acts on:

* ``"input"``: the first axis of a parameter leaf, i.e. a dense kernel's input dimension in Flax's
  ``[d_in, d_out]`` layout (GPM's activation space: the update becomes ``(I - UᵀU) ΔW``);
* ``"output"``: the last axis (``ΔW (I - VᵀV)``);
* ``"flat"``: the flattened leaf (OGD's stored gradient directions).

Builders: :func:`from_activations` (SVD, smallest rank whose captured energy reaches a threshold, as in
GPM), the streamed covariance (:func:`covariance_init` / :func:`covariance_update` /
:func:`covariance_finalize` then :func:`from_covariance`), :func:`from_directions` (Gram–Schmidt QR),
:func:`from_class_means`, :func:`from_contrastive_pairs`, :func:`from_probe`, and :func:`extend`
(GPM's task-by-task growth). :func:`principal_angles` compares two subspaces; :func:`projector` gives
the explicit ``[d, d]`` matrix.

**Orthonormality policy.** ``Subspace(basis)`` *validates*: a concrete basis whose rows are not
orthonormal (``‖B Bᵀ - I‖₂`` above :data:`ORTHONORMAL_TOL`, derived so that at most :data:`MAX_LEAK` of an
update stays inside the subspace per step) raises, naming the deviation. Arbitrary vectors go through :meth:`Subspace.orthonormalized` (= :func:`from_directions`),
which orthonormalises and drops dependent vectors. Inside ``jit`` (traced bases) nothing is checked.

Builders that choose a rank from data (an energy threshold) run eagerly on the host; with a fixed
``rank`` the SVD itself is ordinary jnp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import _treescope
from idesign._orthonormal import MAX_LEAK, ORTHONORMAL_TOL, check_orthonormal, orthonormality_error
from idesign._pytree import pytree_class, static
from idesign._types import Array

Side = Literal["input", "output", "flat"]
SIDES: tuple[str, ...] = ("input", "output", "flat")

#: :func:`from_directions` drops a vector whose residual, after removing the directions kept so far,
#: has norm at most ``DEPENDENCE_RTOL`` times the vector's own norm (computed in float64).
DEPENDENCE_RTOL = 1e-6


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer) and isinstance(x, (np.ndarray, jax.Array))


@_treescope.rendered
@pytree_class
class Subspace:
    """An orthonormal basis ``[k, d]`` (rows) and the side of a parameter it acts on.

    A pytree: ``basis`` is a traced leaf (changing it never recompiles), ``side`` is static.

    Args:
      basis: ``[k, d]`` array with orthonormal rows (``k = 0`` is the empty subspace).
      side: ``"input"`` (first axis of a leaf), ``"output"`` (last axis) or ``"flat"`` (flattened leaf).

    Raises:
      ValueError: if ``basis`` is not 2-D, ``side`` is unknown, or a concrete basis is not orthonormal
        (the message gives the maximum deviation; use :meth:`orthonormalized` for arbitrary vectors).

    >>> import jax.numpy as jnp, idesign as ids
    >>> s = ids.subspaces.Subspace(jnp.array([[1., 0., 0.]]))
    >>> s.rank, s.dim, s.side
    (1, 3, 'input')
    >>> ids.subspaces.Subspace(jnp.array([[1., 1., 0.]]))
    Traceback (most recent call last):
    ...
    ValueError: Subspace: basis rows are not orthonormal (‖B Bᵀ - I‖₂ = 1, tolerance 1e-06, which bounds the share of an update left inside the subspace per step at 1e-06). Use Subspace.orthonormalized(vectors) to orthonormalise arbitrary vectors.
    """

    basis: Array
    side: Side = static(default="input")

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"Subspace: side must be one of {SIDES}; got {self.side!r}.")
        basis = self.basis if isinstance(self.basis, jax.core.Tracer) else jnp.asarray(self.basis)
        if basis.ndim != 2:
            raise ValueError(f"Subspace: basis must be 2-D [k, d] (rows are directions); got shape {basis.shape}.")
        check_orthonormal(basis, "Subspace")
        object.__setattr__(self, "basis", basis)

    def __repr__(self) -> str:
        shape = getattr(self.basis, "shape", None)
        return f"Subspace(rank={shape[0] if shape else '?'}, dim={shape[1] if shape else '?'}, side={self.side!r})"

    @property
    def rank(self) -> int:
        """Number of basis directions ``k``."""
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        """Ambient dimension ``d``."""
        return int(self.basis.shape[1])

    def with_side(self, side: Side) -> "Subspace":
        """The same basis acting on another side.

        >>> import jax.numpy as jnp, idesign as ids
        >>> ids.subspaces.Subspace(jnp.eye(2)[:1]).with_side('output').side
        'output'
        """
        return dataclasses.replace(self, side=side)

    @classmethod
    def orthonormalized(cls, vectors: Any, side: Side = "input", *, rtol: float = DEPENDENCE_RTOL) -> "Subspace":
        """A subspace spanned by arbitrary vectors ``[n, d]``: same as :func:`from_directions`.

        >>> import jax.numpy as jnp, idesign as ids
        >>> ids.subspaces.Subspace.orthonormalized(jnp.array([[1., 1., 0.], [2., 2., 0.]])).rank
        1
        """
        return from_directions(vectors, side=side, rtol=rtol)

    def project(self, x: Array) -> Array:
        """Component of ``x`` inside the subspace, along ``x``'s last axis: ``(x Bᵀ) B``.

        >>> import jax.numpy as jnp, idesign as ids
        >>> ids.subspaces.Subspace(jnp.eye(2)[:1]).project(jnp.array([3., 4.]))
        Array([3., 0.], dtype=float32)
        """
        b = jnp.asarray(self.basis, jnp.result_type(x.dtype, self.basis.dtype))
        return ((x @ b.T) @ b).astype(x.dtype)

    def remove(self, x: Array) -> Array:
        """Component of ``x`` orthogonal to the subspace, along the last axis: ``x - (x Bᵀ) B``.

        >>> import jax.numpy as jnp, idesign as ids
        >>> ids.subspaces.Subspace(jnp.eye(2)[:1]).remove(jnp.array([3., 4.]))
        Array([0., 4.], dtype=float32)
        """
        return x - self.project(x)


def projector(subspace: Subspace) -> Array:
    """The explicit projection matrix ``Bᵀ B`` (``[d, d]``, symmetric, idempotent).

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.subspaces.projector(ids.subspaces.Subspace(jnp.eye(2)[:1]))
    Array([[1., 0.],
           [0., 0.]], dtype=float32)
    """
    return subspace.basis.T @ subspace.basis


def _rows(acts: Any, what: str) -> np.ndarray:
    a = np.asarray(acts)
    if a.ndim < 2:
        raise ValueError(f"{what}: expected activations [..., d] with at least 2 dims; got shape {a.shape}.")
    return a.reshape(-1, a.shape[-1])


def _rank_for_energy(energies: np.ndarray, energy: float, base: float = 0.0, total: float | None = None) -> int:
    """Smallest r with (base + sum(energies[:r])) / total >= energy (energies sorted descending)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}.")
    total = float(energies.sum()) + base if total is None else total
    if total <= 0:
        return 0
    captured = base + np.concatenate([[0.0], np.cumsum(energies)])
    # a relative slack so that energy=1.0 is reachable despite float rounding
    reached = np.nonzero(captured / total >= energy - 1e-12)[0]
    return int(reached[0]) if reached.size else len(energies)


def _fix_signs(rows: np.ndarray) -> np.ndarray:
    """Deterministic signs for singular/eigen vectors: each row's largest-magnitude entry is positive."""
    if rows.size == 0:
        return rows
    idx = np.argmax(np.abs(rows), axis=1)
    signs = np.sign(rows[np.arange(rows.shape[0]), idx])
    return rows * np.where(signs == 0, 1.0, signs)[:, None] + 0.0  # + 0.0 turns -0.0 into 0.0


def _from_svd(a: np.ndarray, energy: float | None, rank: int | None, side: Side, dtype: Any) -> Subspace:
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    if rank is None:
        rank = _rank_for_energy(s ** 2, 0.97 if energy is None else energy)
    rank = min(int(rank), int(np.sum(s > s.max(initial=0.0) * 1e-10)) if s.size else 0)
    return Subspace(jnp.asarray(_fix_signs(vt[:rank]), dtype), side)


def from_activations(acts: Any, energy: float | None = 0.97, rank: int | None = None, *, center: bool = False,
                     side: Side = "input") -> Subspace:
    """Principal subspace of activations ``[..., d]`` by SVD (GPM's basis).

    With ``rank=None`` keeps the smallest rank whose captured energy ``sum(s_i²) / sum(s²)`` reaches
    ``energy`` (GPM's threshold, ≈0.97); with ``rank`` given, exactly that many directions (fewer if the
    activations have lower rank). ``center=True`` subtracts the mean first (PCA); GPM uses the raw
    activations (``center=False``), since the layer sees the mean too. Each direction's sign is fixed
    so that its largest-magnitude entry is positive. Computed in float64 on the host;
    the basis has the activations' float dtype.

    >>> import numpy as np, idesign as ids
    >>> acts = np.random.default_rng(0).normal(size=(100, 2)) @ np.eye(2, 5)   # lives in 2 of 5 dims
    >>> s = ids.subspaces.from_activations(acts.astype('float32'), energy=0.999)
    >>> s.rank, bool(np.allclose(np.asarray(s.basis)[:, 2:], 0, atol=1e-6))
    (2, True)
    """
    a = _rows(acts, "from_activations").astype(np.float64)
    if center:
        a = a - a.mean(0)
    return _from_svd(a, energy, rank, side, _float_dtype(acts))


def _float_dtype(x: Any) -> Any:
    dtype = np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    # float64 input becomes float32 unless jax_enable_x64 is on
    return jax.dtypes.canonicalize_dtype(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


class CovarianceState(NamedTuple):
    """Running sums for a streamed activation covariance: ``sum xᵀx`` ``[d, d]``, ``sum x`` ``[d]``, count."""

    outer: Array
    total: Array
    count: Array


def covariance_init(dim: int, dtype: Any = jnp.float32) -> CovarianceState:
    """Empty running sums for ``dim``-dimensional activations.

    >>> import idesign as ids
    >>> ids.subspaces.covariance_init(3).outer.shape
    (3, 3)
    """
    return CovarianceState(jnp.zeros((dim, dim), dtype), jnp.zeros((dim,), dtype), jnp.zeros((), dtype))


def covariance_update(state: CovarianceState, acts: Array) -> CovarianceState:
    """Adds a batch of activations ``[..., d]`` to the running sums (jit-compatible).

    >>> import jax.numpy as jnp, idesign as ids
    >>> st = ids.subspaces.covariance_update(ids.subspaces.covariance_init(2), jnp.ones((4, 3, 2)))
    >>> float(st.count), float(st.outer[0, 1])
    (12.0, 12.0)
    """
    x = jnp.asarray(acts).reshape(-1, acts.shape[-1]).astype(state.outer.dtype)
    return CovarianceState(state.outer + x.T @ x, state.total + x.sum(0), state.count + x.shape[0])


def covariance_finalize(state: CovarianceState, *, center: bool = False) -> Array:
    """The second-moment matrix ``E[xᵀx]`` (``center=False``, as GPM) or the covariance (``center=True``).

    >>> import jax.numpy as jnp, idesign as ids
    >>> st = ids.subspaces.covariance_update(ids.subspaces.covariance_init(2), jnp.array([[1., 0.], [3., 0.]]))
    >>> ids.subspaces.covariance_finalize(st)[0, 0].item(), ids.subspaces.covariance_finalize(st, center=True)[0, 0].item()
    (5.0, 1.0)
    """
    n = jnp.maximum(state.count, 1)
    m = state.outer / n
    if center:
        mu = state.total / n
        m = m - jnp.outer(mu, mu)
    return m


def from_covariance(cov: Any, energy: float | None = 0.97, rank: int | None = None, *,
                    side: Side = "input") -> Subspace:
    """Principal subspace from a (second-moment or covariance) matrix ``[d, d]``, by eigendecomposition.

    The eigenvalues are the squared singular values of the activations, so the energy rule is the
    same as :func:`from_activations`'s; streamed over batches, the two give the same subspace.

    >>> import numpy as np, idesign as ids
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype('float32') * [3, 2, 0.01, 0.01]
    >>> st = ids.subspaces.covariance_update(ids.subspaces.covariance_init(4), x)
    >>> ids.subspaces.from_covariance(ids.subspaces.covariance_finalize(st), energy=0.99).rank
    2
    """
    c = np.asarray(cov, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"from_covariance: expected a square matrix [d, d]; got shape {c.shape}.")
    w, v = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    if rank is None:
        rank = _rank_for_energy(w, 0.97 if energy is None else energy)
    rank = min(int(rank), int(np.sum(w > w.max(initial=0.0) * 1e-12)) if w.size else 0)
    return Subspace(jnp.asarray(_fix_signs(v[:, :rank].T), _float_dtype(cov)), side)


def _gram_schmidt(vectors: np.ndarray, basis: np.ndarray | None, rtol: float) -> np.ndarray:
    """Orthonormal rows spanning ``basis`` rows then ``vectors`` (in order), dropping dependent vectors."""
    kept = [] if basis is None else list(basis)
    for v in vectors:
        norm0 = np.linalg.norm(v)
        if norm0 == 0 or not np.isfinite(norm0):
            continue
        r = v.copy()
        for _ in range(2):  # re-orthogonalise once: classical "twice is enough"
            if kept:
                q = np.stack(kept)
                r = r - q.T @ (q @ r)
        norm = np.linalg.norm(r)
        if norm > rtol * norm0:
            kept.append(r / norm)
    d = vectors.shape[-1] if basis is None else basis.shape[-1]
    return np.stack(kept) if kept else np.zeros((0, d))


def from_directions(vectors: Any, *, side: Side = "input", rtol: float = DEPENDENCE_RTOL,
                    dim: int | None = None) -> Subspace:
    """Orthonormal basis of the span of ``vectors`` ``[n, d]`` (or one vector ``[d]``), in order.

    Gram–Schmidt QR in float64: the first kept direction is the first vector, normalised. A vector
    whose residual after removing the directions kept so far is at most ``rtol`` times its own norm is
    dropped as dependent (so is a zero vector). ``dim`` (optional) states the vectors' dimension; without it,
    more vectors than dimensions that span the whole space are refused as a likely transposed ``[d, n]`` basis.

    >>> import jax.numpy as jnp, idesign as ids
    >>> s = ids.subspaces.from_directions(jnp.array([[3., 4., 0.], [6., 8., 0.], [0., 1., 0.]]))
    >>> s.rank, s.basis[0].tolist()
    (2, [0.6000000238418579, 0.800000011920929, 0.0])
    """
    v = np.asarray(vectors, np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2:
        raise ValueError(f"from_directions: expected vectors [n, d] or [d]; got shape {v.shape}.")
    if dim is not None and v.shape[1] != dim:
        hint = " It looks transposed: pass vectors.T." if v.shape[0] == dim else ""
        raise ValueError(f"from_directions: vectors have shape {v.shape} but dim={dim}; expected [n, {dim}].{hint}")
    basis = _gram_schmidt(v, None, rtol)
    if dim is None and v.shape[0] > v.shape[1] and basis.shape[0] == v.shape[1]:
        # More vectors than dimensions spanning the whole space: almost always a [d, n] basis passed as [n, d].
        raise ValueError(f"from_directions: {v.shape[0]} vectors of dimension {v.shape[1]} span the whole space, "
                         f"which usually means a transposed [d, n] basis; pass vectors.T, or dim={v.shape[1]} "
                         "to confirm that the full space is meant.")
    return Subspace(jnp.asarray(basis, _float_dtype(vectors)), side)


def from_class_means(acts: Any, labels: Any, *, side: Side = "input") -> Subspace:
    """Subspace spanned by the class means' differences ``mean(c) - mean(first class)`` (``≤ C - 1`` directions).

    Classes are sorted; two classes give the single direction ``mean(class 1) - mean(class 0)``, normalised.

    >>> import numpy as np, idesign as ids
    >>> acts = np.array([[1., 0., 0.], [1., 0., 1.], [3., 0., 0.], [3., 0., 1.]], np.float32)
    >>> ids.subspaces.from_class_means(acts, np.array([0, 0, 1, 1])).basis.tolist()
    [[1.0, 0.0, 0.0]]
    """
    a = _rows(acts, "from_class_means").astype(np.float64)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != a.shape[0]:
        raise ValueError(f"from_class_means: {a.shape[0]} activation rows but {y.shape[0]} labels.")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(f"from_class_means: need at least 2 classes; got {classes.tolist()}.")
    means = np.stack([a[y == c].mean(0) for c in classes])
    return from_directions((means[1:] - means[0]).astype(_float_dtype(acts)), side=side, dim=means.shape[1])


def from_contrastive_pairs(positive: Any, negative: Any, *, rank: int | None = None,
                           side: Side = "input") -> Subspace:
    """Directions from paired activations ``positive[i] - negative[i]`` (``[..., d]`` each).

    ``rank=None``: the mean difference (one direction, as for persona / steering vectors); ``rank=k``:
    the top ``k`` principal directions of the (uncentred) differences.

    >>> import numpy as np, idesign as ids
    >>> pos, neg = np.array([[2., 1.], [2., 3.]], np.float32), np.array([[0., 1.], [0., 3.]], np.float32)
    >>> ids.subspaces.from_contrastive_pairs(pos, neg).basis.tolist()
    [[1.0, 0.0]]
    """
    p, n = _rows(positive, "from_contrastive_pairs"), _rows(negative, "from_contrastive_pairs")
    if p.shape != n.shape:
        raise ValueError(f"from_contrastive_pairs: positive {p.shape} and negative {n.shape} differ in shape.")
    diff = p.astype(np.float64) - n.astype(np.float64)
    if rank is None:
        return from_directions(diff.mean(0).astype(_float_dtype(positive)), side=side)
    return _from_svd(diff, None, rank, side, _float_dtype(positive))


def from_probe(weights: Any, *, side: Side = "input") -> Subspace:
    """Subspace read by a linear probe: a fitted probe object, or weight rows ``[d]`` / ``[c, d]``.

    A probe object with fields ``w``, ``mean`` and ``scale`` (``idesign.probes.LogisticProbe`` with
    ``w [d]``, ``SoftmaxProbe`` with ``w [d, c]``) is read in raw activation space, ``w / scale`` (its
    weights act on standardised activations; see ``probes.as_affine``). Raw arrays are *rows*: pass a
    Flax kernel ``[d, c]`` transposed. One row (a logistic probe) gives its normalised direction. With
    ``c ≥ 2`` rows (a softmax probe) the predictions are unchanged by adding one vector to every row, so
    the subspace is the span of the rows' deviations from their mean (``c - 1`` directions).

    >>> import numpy as np, idesign as ids
    >>> ids.subspaces.from_probe(np.array([0., 2., 0.], np.float32)).basis.tolist()
    [[0.0, 1.0, 0.0]]
    >>> ids.subspaces.from_probe(np.array([[1., 5., 0.], [3., 5., 0.]], np.float32)).basis.tolist()
    [[-1.0, 0.0, 0.0]]
    """
    if all(hasattr(weights, f) for f in ("w", "mean", "scale")):
        w = np.asarray(weights.w, np.float64)
        scale = np.asarray(weights.scale, np.float64)
        dtype = _float_dtype(weights.w)
        w = (w / scale) if w.ndim == 1 else (w / scale[..., None]).T   # [d, c] -> rows [c, d]
        weights = w.astype(dtype)
    w = np.asarray(weights)
    if w.ndim == 1 or (w.ndim == 2 and w.shape[0] == 1):
        return from_directions(w.reshape(1, -1), side=side)
    if w.ndim != 2:
        raise ValueError(f"from_probe: expected weights [d] or [c, d]; got shape {w.shape}.")
    w64 = w.astype(np.float64)
    return from_directions((w64 - w64.mean(0)).astype(_float_dtype(weights)), side=side, dim=w64.shape[-1])


def extend(subspace: Subspace, new_acts: Any, energy: float = 0.97) -> Subspace:
    """GPM's growth step: add residual directions of new activations ``[..., d]`` to a basis.

    The new activations' energy already captured by ``subspace`` counts toward the threshold; the
    fewest top singular directions of the residual ``A - A BᵀB`` are added so that the total captured
    fraction of ``‖A‖²`` reaches ``energy`` (none if it already does). Existing directions are kept
    unchanged, first.

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> s = ids.subspaces.Subspace(jnp.eye(3)[:1])
    >>> acts = np.array([[1., 1., 0.], [1., -1., 0.]], np.float32)
    >>> ids.subspaces.extend(s, acts, energy=0.99).basis.tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    >>> ids.subspaces.extend(s, acts, energy=0.5).rank   # already captures half the energy
    1
    """
    a = _rows(new_acts, "extend").astype(np.float64)
    b = np.asarray(subspace.basis, np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"extend: activations have dimension {a.shape[1]} but the subspace has dimension {b.shape[1]}.")
    total = float((a ** 2).sum())
    captured = float(((a @ b.T) ** 2).sum())
    residual = a - (a @ b.T) @ b
    _, s, vt = np.linalg.svd(residual, full_matrices=False)
    r = _rank_for_energy(s ** 2, energy, base=captured, total=total) if total > 0 else 0
    r = min(r, int(np.sum(s > max(s.max(initial=0.0), 1e-300) * 1e-10)) if s.size else 0)
    grown = _gram_schmidt(_fix_signs(vt[:r]), b, DEPENDENCE_RTOL)
    return Subspace(jnp.asarray(grown, subspace.basis.dtype), subspace.side)


def _basis(x: Subspace | Any) -> Array:
    return x.basis if isinstance(x, Subspace) else jnp.asarray(x)


def principal_angles(a: Subspace | Any, b: Subspace | Any) -> Array:
    """Principal angles between two subspaces (or orthonormal bases ``[k, d]``), radians, ascending.

    ``min(k_a, k_b)`` angles. Cosines come from the singular values of ``A Bᵀ``; angles below π/4 are
    taken from sines (singular values of the residual of the smaller basis), which stay accurate
    for nearly equal subspaces where ``arccos`` loses half the digits (Björck & Golub 1973).

    >>> import jax.numpy as jnp, idesign as ids
    >>> a = ids.subspaces.Subspace(jnp.eye(3)[:2])
    >>> b = ids.subspaces.from_directions(jnp.array([[1., 0., 0.], [0., 1., 1.]]))
    >>> [round(float(x), 4) for x in ids.subspaces.principal_angles(a, b)]
    [0.0, 0.7854]
    """
    qa, qb = _basis(a), _basis(b)
    if qa.shape[-1] != qb.shape[-1]:
        raise ValueError(f"principal_angles: dimensions differ ({qa.shape[-1]} vs {qb.shape[-1]}).")
    if qb.shape[0] > qa.shape[0]:
        qa, qb = qb, qa
    dtype = jnp.promote_types(jnp.result_type(qa.dtype, qb.dtype), jnp.float32)
    qa, qb = qa.astype(dtype), qb.astype(dtype)
    cos = jnp.linalg.svd(qb @ qa.T, compute_uv=False)             # descending, k_b values
    sin = jnp.linalg.svd(qb - (qb @ qa.T) @ qa, compute_uv=False)[::-1]  # ascending
    from_cos = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    from_sin = jnp.arcsin(jnp.clip(sin, 0.0, 1.0))
    return jnp.where(cos ** 2 >= 0.5, from_sin, from_cos)


__all__ = ["Subspace", "CovarianceState", "ORTHONORMAL_TOL", "MAX_LEAK", "orthonormality_error", "check_orthonormal", "DEPENDENCE_RTOL", "projector", "from_activations",
           "covariance_init", "covariance_update", "covariance_finalize", "from_covariance", "from_directions",
           "from_class_means", "from_contrastive_pairs", "from_probe", "extend", "principal_angles"]
