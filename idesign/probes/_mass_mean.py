"""Mass-mean and LDA probes from streamed sufficient statistics.

The statistics are per-class weights and means and the pooled within-class scatter matrix,
merged batch by batch with the pairwise update of Chan, Golub & LeVeque (1979), which stays
accurate in float32 however many tokens are streamed (no raw second moments are summed). Memory is
``O(K D + D^2)`` whatever the number of tokens; ``covariance=False`` drops the ``D^2`` part when
only the mass-mean direction is wanted.

Direction: ``mu_1 - mu_0`` (mass-mean), or with ``whiten=True`` the LDA direction
``Sigma_s^-1 (mu_1 - mu_0)`` with ``Sigma`` the within-class covariance
``sum_k pi_k Sigma_k = scatter / n`` (as scikit-learn's ``LinearDiscriminantAnalysis``) shrunk
towards a multiple of the identity: ``Sigma_s = (1 - shrinkage) Sigma + shrinkage tr(Sigma)/D I``.
Bias: the threshold sits midway between the projected class means (``logit = 0`` there; class
priors ignored). With ``calibrate=True`` the logit is instead the log-odds of a 1-D Gaussian model
of the projections with the shared variance ``w^T Sigma w`` and the class priors, i.e. LDA in one
dimension, computed from the same statistics (no second pass over the data).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import _treescope
from idesign._types import Array
from idesign.probes import _checks


@_treescope.rendered
class MassMeanProbe(NamedTuple):
    """A direction probe on raw activations: ``logit(x) = x . w + b``.

    Attributes:
      w: ``[D]`` direction (difference of class means, or its whitened LDA version).
      b: ``[]`` bias.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.MassMeanProbe(w=jnp.array([1.0, 0.0]), b=jnp.array(-0.5))
      >>> probes.score(p, jnp.array([[1.0, 3.0]])).tolist()
      [0.5]
    """

    w: Array
    b: Array


class ClassMeansState(NamedTuple):
    """Streamed sufficient statistics for mass-mean / LDA probes.

    Attributes:
      count: ``[K]`` total weight of each class.
      mean: ``[K, D]`` weighted class means.
      scatter: ``[D, D]`` pooled within-class scatter ``sum_k sum_{i in k} w_i (x_i - mu_k)(x_i - mu_k)^T``,
        or ``None`` when created with ``covariance=False``.
    """

    count: Array
    mean: Array
    scatter: Array | None


def class_means_init(dim: int, *, n_classes: int = 2, covariance: bool = True,
                     dtype: Any = jnp.float32) -> ClassMeansState:
    """Empty statistics for ``dim``-dimensional activations.

    Example:
      >>> from idesign import probes
      >>> stats = probes.class_means_init(4)
      >>> stats.mean.shape, stats.scatter.shape
      ((2, 4), (4, 4))
    """
    if dim < 1 or n_classes < 2:
        raise ValueError(f"class_means_init: need dim >= 1 and n_classes >= 2, got dim={dim}, n_classes={n_classes}.")
    scatter = jnp.zeros((dim, dim), dtype) if covariance else None
    return ClassMeansState(jnp.zeros((n_classes,), dtype), jnp.zeros((n_classes, dim), dtype), scatter)


def class_means_update(stats: ClassMeansState, acts: Any, labels: Any, weights: Any = None) -> ClassMeansState:
    """Adds a batch to the statistics; jit-compatible.

    Args:
      stats: the running statistics.
      acts: ``[..., D]`` activations (e.g. ``[B, T, D]`` tokens).
      labels: ``[...]`` class ids ``0..K-1`` matching ``acts``' leading axes.
      weights: optional ``[...]`` non-negative weights; 0 drops a row (padding tokens).

    Returns:
      The statistics of everything seen so far.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> x = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 2.0]], np.float32)
      >>> stats = probes.class_means_update(probes.class_means_init(2), x, np.array([0, 0, 1]))
      >>> stats.count.tolist(), stats.mean.tolist()
      ([2.0, 1.0], [[1.0, 0.0], [4.0, 2.0]])
    """
    fn = "class_means_update"
    K, D = stats.mean.shape
    x = _checks.float_array(acts, fn=fn, name="activations")
    if x.ndim < 1 or x.shape[-1] != D:
        raise ValueError(f"{fn}: activations must be [..., {D}] to match the statistics, got shape {tuple(x.shape)}.")
    xp = np if _checks.is_concrete(x) and _checks.is_concrete(labels) and _checks.is_concrete(weights) else jnp
    y = xp.asarray(labels)
    if y.shape != x.shape[:-1]:
        raise ValueError(f"{fn}: labels have shape {tuple(y.shape)} but the activations' leading axes are "
                         f"{tuple(x.shape[:-1])}; they must match one to one.")
    if xp is np:
        _checks.check_finite(x.reshape(-1, D), fn=fn, name="activations", axes=("row",))
        if y.size and (y.min() < 0 or y.max() >= K):
            raise ValueError(f"{fn}: labels must be class ids 0..{K - 1}; got values in [{y.min()}, {y.max()}].")
    x = x.reshape(-1, D)
    y = y.reshape(-1).astype(xp.int32)
    w = xp.ones(y.shape, x.dtype) if weights is None else xp.asarray(weights, x.dtype).reshape(-1)
    if w.shape != y.shape:
        raise ValueError(f"{fn}: weights must match the labels' shape {tuple(np.shape(labels))}, "
                         f"got {tuple(np.shape(weights))}.")
    return _update(stats, x, y, w)


@jax.jit
def _update(stats: ClassMeansState, x: Array, y: Array, w: Array) -> ClassMeansState:
    K = stats.mean.shape[0]
    x, w = x.astype(stats.mean.dtype), w.astype(stats.mean.dtype)
    onehot = jax.nn.one_hot(y, K, dtype=x.dtype) * w[:, None]  # [N, K]
    n_b = onehot.sum(0)
    mean_b = jnp.einsum("nk,nd->kd", onehot, x) / jnp.where(n_b > 0, n_b, 1.0)[:, None]
    n = stats.count + n_b
    frac = jnp.where(n > 0, n_b / jnp.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - stats.mean
    mean = stats.mean + frac[:, None] * delta
    scatter = None
    if stats.scatter is not None:
        centred = x - mean_b[y]
        scatter_b = jnp.einsum("nd,ne->de", centred * w[:, None], centred)
        coef = stats.count * frac  # n_a n_b / n
        scatter = stats.scatter + scatter_b + jnp.einsum("k,kd,ke->de", coef, delta, delta)
    return ClassMeansState(n, mean, scatter)


def class_means_finalize(stats: ClassMeansState, *, whiten: bool = False, shrinkage: float = 0.1,
             calibrate: bool = False) -> MassMeanProbe:
    """The binary probe from the statistics: mass-mean, or LDA with ``whiten=True``.

    Args:
      stats: statistics of two classes (0 = negative, 1 = positive).
      whiten: multiply the mean difference by the inverse shrunk within-class covariance (LDA).
      shrinkage: in ``[0, 1]``; weight of the scaled identity in the shrunk covariance.
      calibrate: set the scale and bias so that the logit is the 1-D Gaussian log-odds of the
        projections (see the module docstring); otherwise the threshold is the midpoint.

    Returns:
      A :class:`MassMeanProbe`.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> x = np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]], np.float32)
      >>> stats = probes.class_means_update(probes.class_means_init(2), x, np.array([0, 0, 1, 1]))
      >>> probe = probes.class_means_finalize(stats)
      >>> probe.w.tolist(), float(probe.b)
      ([2.0, 0.0], -2.0)
    """
    fn = "class_means_finalize"
    K, D = stats.mean.shape
    if K != 2:
        raise ValueError(f"{fn}: a mass-mean probe is binary; the statistics have {K} classes.")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"{fn}: shrinkage must be in [0, 1], got {shrinkage}.")
    if (whiten or calibrate) and stats.scatter is None:
        raise ValueError(f"{fn}: whiten/calibrate need the within-class covariance; create the statistics with "
                         "class_means_init(..., covariance=True).")
    if _checks.is_concrete(stats.count):
        counts = np.asarray(stats.count)
        if np.any(counts <= 0):
            raise ValueError(f"{fn}: class weights seen are {counts.tolist()}; both classes need examples.")
    return _finalize(stats, whiten=whiten, shrinkage=float(shrinkage), calibrate=calibrate)


@functools.partial(jax.jit, static_argnames=("whiten", "shrinkage", "calibrate"))
def _finalize(stats: ClassMeansState, *, whiten: bool, shrinkage: float, calibrate: bool) -> MassMeanProbe:
    D = stats.mean.shape[1]
    mu0, mu1 = stats.mean[0], stats.mean[1]
    direction = mu1 - mu0
    if whiten or calibrate:
        cov = stats.scatter / stats.count.sum()
    if whiten:
        shrunk = (1.0 - shrinkage) * cov + shrinkage * jnp.trace(cov) / D * jnp.eye(D, dtype=cov.dtype)
        shrunk = shrunk + jnp.finfo(cov.dtype).eps * jnp.trace(shrunk) / D * jnp.eye(D, dtype=cov.dtype)
        direction = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(shrunk), direction)
    m0, m1 = direction @ mu0, direction @ mu1
    bias = -(m0 + m1) / 2
    if calibrate:
        a = (m1 - m0) / (direction @ cov @ direction)
        direction = a * direction
        bias = a * bias + jnp.log(stats.count[1] / stats.count[0])
    return MassMeanProbe(direction, bias)


def fit_mass_mean(acts: Any, labels: Any, *, weights: Any = None, whiten: bool = False,
                  shrinkage: float = 0.1, calibrate: bool = False) -> MassMeanProbe:
    """``class_means_finalize(class_means_update(class_means_init(D), acts, labels, weights), ...)`` in one call,
    for data that fits in memory.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> rng = np.random.default_rng(0)
      >>> y = rng.integers(0, 2, 400)
      >>> x = (rng.normal(size=(400, 3)) + np.outer(y, [2.0, 0.0, 0.0])).astype(np.float32)
      >>> probe = probes.fit_mass_mean(x, y, whiten=True)
      >>> float(((probes.score(probe, x) > 0) == y).mean()) > 0.8
      True
    """
    x = _checks.float_array(acts, fn="fit_mass_mean", name="activations")
    if x.ndim < 2:
        raise ValueError(f"fit_mass_mean: activations must be [..., D] with at least 2 axes, got shape {tuple(x.shape)}.")
    y_host = np.asarray(labels)
    _checks.check_rows(int(np.prod(y_host.shape)), int(np.prod(x.shape[:-1])), fn="fit_mass_mean", name="labels")
    _checks.class_labels(y_host.reshape(-1) if weights is None else y_host.reshape(-1)[np.asarray(weights).reshape(-1) > 0],
                         fn="fit_mass_mean", binary=True)
    stats = class_means_init(x.shape[-1], covariance=whiten or calibrate, dtype=x.dtype)
    stats = class_means_update(stats, x, y_host.reshape(x.shape[:-1]), weights)
    return class_means_finalize(stats, whiten=whiten, shrinkage=shrinkage, calibrate=calibrate)
