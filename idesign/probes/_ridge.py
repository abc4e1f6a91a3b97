"""Ridge-regression probes for continuous targets: closed form, ``K`` targets at once, cross-validated R²."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["RidgeFit", "RidgeProbe", "fit_ridge", "predict_ridge"]

class RidgeProbe(NamedTuple):
    """``K`` linear probes at once: ``targets ≈ ((x - mean) / scale) @ w + b``.

    Attributes:
      w: ``[D, K]``; b: ``[K]``; mean, scale: ``[D]`` input standardisation.
    """

    w: np.ndarray
    b: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> RidgeProbe:
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    y_mean = y.mean(0)
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y_mean))
    return RidgeProbe(w, y_mean, mean, scale)


def predict_ridge(probe: RidgeProbe, x: Any) -> np.ndarray:
    """Decoded targets ``[N, K]`` from activations ``[N, D]``.

    >>> p = RidgeProbe(np.array([[2.0]]), np.array([1.0]), np.array([0.0]), np.array([1.0]))
    >>> predict_ridge(p, np.array([[1.0], [0.0]])).ravel().tolist()
    [3.0, 1.0]
    """
    x = np.asarray(x, np.float64)
    return ((x - probe.mean) / probe.scale) @ probe.w + probe.b


class RidgeFit(NamedTuple):
    """Cross-validated ridge probes for every target.

    Attributes:
      r2: ``[K]`` out-of-fold R² (decodability; negative for undecodable targets).
      decoded: ``[N, K]`` out-of-fold decoded values.
      probe: :class:`RidgeProbe` refitted on all rows (to decode other cohorts).
    """

    r2: np.ndarray
    decoded: np.ndarray
    probe: RidgeProbe


def fit_ridge(acts: Any, targets: Any, *, alpha: float = 1.0, n_folds: int = 5, seed: int = 0) -> RidgeFit:
    """Ridge probes from activations ``[N, D]`` to each target ``[N, K]``, with K-fold CV.

    Inputs are standardised per fold; ``alpha`` is the ridge penalty on the standardised
    weights. For continuous targets (the logistic probes are for binary ones); the closed form fits
    all ``K`` at once.

    Args:
      acts: ``[N, D]`` activations (e.g. sample embeddings).
      targets: ``[N, K]`` continuous targets (e.g. candidate statistics).
      alpha: ridge penalty; n_folds: CV folds; seed: fold assignment.

    Returns:
      :class:`RidgeFit`.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(200, 5))
      >>> y = np.stack([x[:, 0], rng.normal(size=200)], 1)
      >>> fit = fit_ridge(x, y)
      >>> bool(fit.r2[0] > 0.95), bool(fit.r2[1] < 0.1)
      (True, True)
    """
    x = np.asarray(acts, np.float64)
    y = np.asarray(targets, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_ridge: need acts [N, D] and targets [N, K] with the same N; got shapes "
                         f"{x.shape} and {y.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit_ridge: activations and targets must be finite.")
    n = x.shape[0]
    if n < 2 * n_folds:
        raise ValueError(f"fit_ridge: {n} rows are too few for {n_folds}-fold cross-validation.")
    folds = np.random.default_rng(seed).permutation(n) % n_folds
    decoded = np.zeros_like(y)
    for f in range(n_folds):
        test = folds == f
        decoded[test] = predict_ridge(_ridge(x[~test], y[~test], alpha), x[test])
    ss = np.sum(np.square(y - y.mean(0)), 0)
    r2 = np.where(ss > 0, 1.0 - np.sum(np.square(y - decoded), 0) / np.where(ss > 0, ss, 1.0), 0.0)
    return RidgeFit(r2, decoded, _ridge(x, y, alpha))
