"""Metrics for probes and monitors: ROC AUC, accuracy, recall at a false-positive rate, calibration,
bootstrap confidence intervals, the uncertainty baselines a probe should beat, and multiple testing
(label-permutation p-values of many scores, Holm and Benjamini–Hochberg adjustments).

Every metric accepts numpy or JAX arrays. With concrete inputs (numpy, or JAX arrays outside a
trace) it validates them — equal lengths, both classes present, finite scores — computes in float64
and returns a Python ``float``. Inside ``jax.jit`` or ``jax.vmap`` the same formula runs on
``jax.numpy`` (by sorting, so shapes stay static); values cannot be checked there, so an undefined
metric (a single class) comes out NaN instead of raising. That is what lets :func:`bootstrap_ci`
evaluate a metric on many resamples in one vmapped call.

Conventions (all tie-aware; a tie between a positive and a negative score counts one half):

- **ROC AUC** is the Mann–Whitney statistic with midranks, ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` under the
  sample weights; it equals scikit-learn's ``roc_auc_score``.
- **Recall at FPR** reads the ROC curve without interpolation: the best true-positive rate among
  thresholds ``score >= t`` (tied scores enter together) whose false-positive rate is ``<= fpr``.
- **ECE** sums ``|Σ labels − Σ confidences| / N`` over bins of the confidence; binary inputs are
  calibrated as ``P(y = 1)``, multi-class inputs by their top label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

ArrayLike = Any


# ----------------------------------------------------------------------------------------------
# Input handling.


def _is_traced(*arrays: ArrayLike) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _as_1d(name: str, x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per example); got shape {x.shape}.")
    return x.astype(dtype)


def _check_lengths(**arrays: np.ndarray | None) -> None:
    present = [(name, len(a)) for name, a in arrays.items() if a is not None]
    first_name, first_len = present[0]
    for name, n in present[1:]:
        if n != first_len:
            raise ValueError(f"{first_name} has {first_len} rows but {name} has {n}; they must have one row per example.")
    if first_len == 0:
        raise ValueError(f"{first_name} is empty; a metric needs at least one example.")


def _check_finite(name: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(f"{name} contain {int(bad.sum())} NaN or inf value(s) (first at index "
                         f"{tuple(int(i) for i in where) if len(where) > 1 else int(where[0])}).")


def _binary_labels(labels: ArrayLike) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional; got shape {y.shape}.")
    values = np.unique(y)
    if not np.isin(values, [0, 1]).all():
        raise ValueError(f"labels must be binary (0/1 or bool); got values {values[:10].tolist()}"
                         f"{' ...' if len(values) > 10 else ''}.")
    return y.astype(np.float64)


def _weights(sample_weight: ArrayLike | None, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = _as_1d("sample_weight", sample_weight)
    _check_finite("sample_weight", w)
    if (w < 0).any():
        raise ValueError(f"sample_weight must be non-negative; {int((w < 0).sum())} value(s) are negative.")
    return w


def _binary_inputs(labels, scores, sample_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 ``(labels, scores, weights)`` with both classes carrying weight."""
    y = _binary_labels(labels)
    s = _as_1d("scores", scores)
    w = None if sample_weight is None else np.asarray(sample_weight)
    _check_lengths(labels=y, scores=s, sample_weight=w)
    _check_finite("scores", s)
    w = _weights(sample_weight, len(y))
    for cls, name in ((1.0, "positive (1)"), (0.0, "negative (0)")):
        if not ((y == cls) & (w > 0)).any():
            other = "negative (0)" if cls else "positive (1)"
            raise ValueError(f"only the {other} class is present in labels (with nonzero weight); the metric "
                             f"is undefined without {name} examples.")
    return y, s, w


def _bin_sum(xp, index, values, n: int):
    if xp is np:
        return np.bincount(index, weights=values, minlength=n)
    return jax.ops.segment_sum(values, index, num_segments=n)


# ----------------------------------------------------------------------------------------------
# Ranking metrics.


def _weight_below_and_equal(xp, scores, weights):
    """For each example, the total ``weights`` of examples scoring strictly below it and equal to it."""
    order = xp.argsort(scores)
    sorted_scores = scores[order]
    cumulative = xp.concatenate([xp.zeros(1, weights.dtype), xp.cumsum(weights[order])])
    below = cumulative[xp.searchsorted(sorted_scores, scores, side="left")]
    at_or_below = cumulative[xp.searchsorted(sorted_scores, scores, side="right")]
    return below, at_or_below - below


def _tie_groups(s: np.ndarray, *weights: np.ndarray) -> list[np.ndarray]:
    """Each weight summed within groups of equal score, groups in ascending score order (numpy)."""
    order = np.argsort(s)
    sorted_scores = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    return [np.add.reduceat(w[order], starts) for w in weights]


def _auc(xp, y, s, w):
    pos, neg = w * y, w * (1 - y)
    if xp is np:  # the same sum, over tie groups: no per-example binary searches
        pos, neg = _tie_groups(s, pos, neg)
        below, equal = np.cumsum(neg) - neg, neg
    else:
        below, equal = _weight_below_and_equal(xp, s, neg)
    return xp.sum(pos * (below + 0.5 * equal)) / (xp.sum(pos) * xp.sum(neg))


def roc_auc(labels: ArrayLike, scores: ArrayLike, sample_weight: ArrayLike | None = None) -> float | jax.Array:
    """Area under the ROC curve, exact and tie-aware (Mann–Whitney with midranks).

    ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` over (positive, negative) pairs weighted by ``w⁺ w⁻``; equal to
    scikit-learn's ``roc_auc_score`` with ties and sample weights. O(n log n).

    Args:
      labels: ``[N]`` binary labels (0/1 or bool); 1 is the positive class.
      scores: ``[N]`` scores, higher meaning more likely positive (logits, probabilities, entropies).
      sample_weight: optional ``[N]`` non-negative weights.

    Returns:
      A float; a JAX scalar when traced (NaN if a class is missing, since a trace cannot raise).

    >>> import idesign as ids
    >>> ids.metrics.roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
    0.875
    """
    if _is_traced(labels, scores, sample_weight):
        s = jnp.asarray(scores, jnp.result_type(float))
        y = jnp.asarray(labels, s.dtype)
        w = jnp.ones_like(s) if sample_weight is None else jnp.asarray(sample_weight, s.dtype)
        return _auc(jnp, y, s, w)
    return float(_auc(np, *_binary_inputs(labels, scores, sample_weight)))


def _recall_at_fpr(xp, y, s, w, fpr):
    pos, neg = w * y, w * (1 - y)
    # Threshold t = each observed score, predicting positive when score >= t.
    if xp is np:
        pos, neg = _tie_groups(s, pos, neg)
        pos_below, neg_below = np.cumsum(pos) - pos, np.cumsum(neg) - neg
    else:
        pos_below, _ = _weight_below_and_equal(xp, s, pos)
        neg_below, _ = _weight_below_and_equal(xp, s, neg)
    total_pos, total_neg = xp.sum(pos), xp.sum(neg)
    tpr = (total_pos - pos_below) / total_pos
    false_rate = (total_neg - neg_below) / total_neg
    return xp.max(xp.where(false_rate <= fpr, tpr, 0.0))


def recall_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float = 0.1,
                  sample_weight: ArrayLike | None = None) -> float | jax.Array:
    """Recall (true-positive rate) at the operating point whose false-positive rate is at most ``fpr``.

    Among the thresholds "predict positive when ``score >= t``" for ``t`` an observed score (and
    ``t = +inf``, which predicts nothing), takes those with false-positive rate ``<= fpr`` and
    returns the highest recall among them — the most permissive admissible threshold. Tied scores
    cross a threshold together, and there is no interpolation between ROC points (which would
    describe a randomised classifier). This equals ``max(tpr[fpr_curve <= fpr])`` from
    scikit-learn's ``roc_curve(..., drop_intermediate=False)``.

    Args:
      labels: ``[N]`` binary labels (0/1 or bool).
      scores: ``[N]`` scores, higher meaning more likely positive.
      fpr: the largest false-positive rate allowed, in (0, 1).
      sample_weight: optional ``[N]`` non-negative weights.

    >>> import idesign as ids
    >>> ids.metrics.recall_at_fpr([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.7, 0.9], fpr=0.25)
    1.0
    >>> ids.metrics.recall_at_fpr([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.7, 0.9], fpr=0.2)
    0.5
    """
    if not (isinstance(fpr, (int, float, np.floating, np.integer)) and 0 < fpr < 1):
        raise ValueError(f"fpr = {fpr!r}: expected a false-positive rate strictly between 0 and 1.")
    if _is_traced(labels, scores, sample_weight):
        s = jnp.asarray(scores, jnp.result_type(float))
        y = jnp.asarray(labels, s.dtype)
        w = jnp.ones_like(s) if sample_weight is None else jnp.asarray(sample_weight, s.dtype)
        return _recall_at_fpr(jnp, y, s, w, fpr)
    return float(_recall_at_fpr(np, *_binary_inputs(labels, scores, sample_weight), float(fpr)))


# ----------------------------------------------------------------------------------------------
# Accuracy and calibration.


def _predictions(xp, scores, threshold):
    if scores.ndim == 1:
        return (scores > threshold).astype(xp.int32)
    return xp.argmax(scores, axis=-1)


def accuracy(labels: ArrayLike, scores_or_probs: ArrayLike, threshold: float = 0.5,
             sample_weight: ArrayLike | None = None) -> float | jax.Array:
    """Fraction of correct predictions (weighted if ``sample_weight`` is given).

    Binary when ``scores_or_probs`` is ``[N]``: predicts 1 where ``score > threshold`` (use
    ``threshold=0`` for logits), as scikit-learn's ``predict`` does. Multi-class when it is
    ``[N, C]``: predicts the argmax, and ``labels`` are class indices in ``[0, C)``.

    >>> import idesign as ids
    >>> ids.metrics.accuracy([0, 1, 1], [0.2, 0.7, 0.4])
    0.6666666666666666
    >>> ids.metrics.accuracy([2, 0], [[0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    0.5
    """
    if _is_traced(labels, scores_or_probs, sample_weight):
        s = jnp.asarray(scores_or_probs)
        correct = (_predictions(jnp, s, threshold) == jnp.asarray(labels)).astype(jnp.result_type(float))
        w = jnp.ones_like(correct) if sample_weight is None else jnp.asarray(sample_weight, correct.dtype)
        return jnp.sum(w * correct) / jnp.sum(w)
    s = np.asarray(scores_or_probs, np.float64)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional; got shape {y.shape}.")
    if s.ndim not in (1, 2) or (s.ndim == 2 and s.shape[1] < 2):
        raise ValueError(f"scores_or_probs must be [N] (binary) or [N, C] with C >= 2 (multi-class); got shape {s.shape}.")
    _check_lengths(labels=y, scores_or_probs=s, sample_weight=None if sample_weight is None else np.asarray(sample_weight))
    _check_finite("scores_or_probs", s)
    if s.ndim == 1:
        _binary_labels(y)
    elif not (np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and y.max() < s.shape[1]):
        raise ValueError(f"labels must be integer class indices in [0, {s.shape[1]}) for {s.shape[1]}-class scores; "
                         f"got dtype {y.dtype} with range [{y.min()}, {y.max()}].")
    w = _weights(sample_weight, len(y))
    if w.sum() <= 0:
        raise ValueError("sample_weight sums to zero; accuracy is undefined.")
    return float(np.sum(w * (_predictions(np, s, threshold) == y)) / np.sum(w))


def _confidence_and_outcome(xp, labels, probs):
    if probs.ndim == 1:
        return probs, labels.astype(probs.dtype)
    return xp.max(probs, axis=-1), (xp.argmax(probs, axis=-1) == labels).astype(probs.dtype)


def _ece(xp, labels, probs, n_bins, strategy):
    confidence, outcome = _confidence_and_outcome(xp, labels, probs)
    n = confidence.shape[0]
    if strategy == "uniform":
        # Right-closed bins ((b-1)/M, b/M] as in Guo et al. (2017); a confidence of 0 joins the first.
        index = xp.clip(xp.ceil(confidence * n_bins).astype(xp.int32) - 1, 0, n_bins - 1)
    else:
        rank = xp.argsort(xp.argsort(confidence, stable=True), stable=True)
        index = (rank * n_bins) // n
    gap = _bin_sum(xp, index, outcome, n_bins) - _bin_sum(xp, index, confidence, n_bins)
    return xp.sum(xp.abs(gap)) / n


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 15,
                               strategy: Literal["uniform", "quantile"] = "uniform") -> float | jax.Array:
    """Expected calibration error: ``Σ_bins (n_b / N) · |mean outcome_b − mean confidence_b|``.

    Binary (``probs`` is ``[N]``, the probability of class 1): the confidence is ``probs`` and the
    outcome is the label, i.e. the reliability diagram of ``P(y = 1)``. Multi-class (``probs`` is
    ``[N, C]``, rows summing to 1): top-label calibration — the confidence is the largest
    probability and the outcome is whether its class is the label.

    Bins: ``"uniform"`` splits [0, 1] into ``n_bins`` right-closed intervals ``((b-1)/M, b/M]``
    (Guo et al., 2017); ``"quantile"`` makes equal-count bins by the rank of the confidence, ties
    broken by input order (adaptive ECE, Nixon et al., 2019). Empty bins contribute nothing.

    >>> import idesign as ids
    >>> ids.metrics.expected_calibration_error([0, 1, 1, 1], [0.25, 0.25, 0.75, 0.75], n_bins=2)
    0.25
    """
    if strategy not in ("uniform", "quantile"):
        raise ValueError(f"strategy = {strategy!r}: expected 'uniform' or 'quantile'.")
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise ValueError(f"n_bins = {n_bins!r}: expected an integer >= 1.")
    if _is_traced(labels, probs):
        p = jnp.asarray(probs, jnp.result_type(float))
        return _ece(jnp, jnp.asarray(labels), p, int(n_bins), strategy)
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim not in (1, 2):
        raise ValueError(f"probs must be [N] (binary) or [N, C] (multi-class); got shape {p.shape}.")
    _check_lengths(labels=y, probs=p)
    _check_finite("probs", p)
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1]; got range [{p.min():.4g}, {p.max():.4g}] "
                         "(pass probabilities, e.g. jax.nn.sigmoid or softmax of logits).")
    if p.ndim == 1:
        y = _binary_labels(y)
    else:
        sums = p.sum(axis=1)
        if np.abs(sums - 1).max() > 1e-3:
            raise ValueError(f"multi-class probs must sum to 1 over the last axis; row {int(np.abs(sums - 1).argmax())} "
                             f"sums to {sums[np.abs(sums - 1).argmax()]:.4g} (pass a softmax, not logits).")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be [N] integer class indices for multi-class probs; got {y.dtype} {y.shape}.")
    return float(_ece(np, y, p, int(n_bins), strategy))


# ----------------------------------------------------------------------------------------------
# Bootstrap.


class BootstrapCI(NamedTuple):
    """A point estimate on the full data and a percentile bootstrap interval around it."""

    estimate: float
    low: float
    high: float


def _resample_indices(rng: np.random.Generator, strata: list[np.ndarray], n_rows: int, n: int) -> np.ndarray:
    out = np.empty((n_rows, n), np.int64)
    offset = 0
    for members in strata:
        out[:, offset:offset + len(members)] = members[rng.integers(0, len(members), (n_rows, len(members)))]
        offset += len(members)
    return out


def bootstrap_ci(metric_fn: Callable[..., Any], *arrays: ArrayLike, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, stratified: bool = True, batched: bool = False) -> BootstrapCI:
    """Percentile bootstrap confidence interval of ``metric_fn(*arrays)``.

    Rows (the leading axis of every array) are resampled with replacement ``n_boot`` times; the
    resampling indices are drawn as whole index matrices from ``np.random.default_rng(seed)``, so
    the result is deterministic given ``seed``. With ``stratified=True`` the first array is taken to
    hold class labels and each class is resampled within itself, keeping its count — so every
    resample contains every class and AUC stays defined.

    Args:
      metric_fn: e.g. :func:`roc_auc`; called as ``metric_fn(*resampled_arrays)``.
      *arrays: arrays with equal leading dimension, labels first (e.g. ``labels, scores``).
      n_boot: number of resamples.
      alpha: the interval covers ``1 - alpha`` (quantiles ``alpha/2`` and ``1 - alpha/2``).
      seed: seeds the resampling.
      stratified: resample within each distinct value of ``arrays[0]`` (integer or bool labels).
      batched: ``metric_fn`` takes arrays with a leading resample axis and returns ``[n_boot]``
        values in one call, e.g. ``jax.jit(jax.vmap(ids.metrics.roc_auc))``; otherwise it is
        called once per resample.

    Returns:
      ``BootstrapCI(estimate, low, high)``, where ``estimate`` is the metric on the full data.

    >>> import numpy as np, idesign as ids
    >>> y = np.array([0, 1] * 50); s = y + np.random.default_rng(0).normal(size=100)
    >>> est, low, high = ids.metrics.bootstrap_ci(ids.metrics.roc_auc, y, s, n_boot=200)
    >>> bool(low < est < high)
    True
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample.")
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 2):
        raise ValueError(f"n_boot = {n_boot!r}: expected an integer >= 2.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha = {alpha!r}: expected a value strictly between 0 and 1.")
    host = [np.asarray(a) for a in arrays]
    if any(a.ndim == 0 for a in host):
        raise ValueError("bootstrap_ci: every array needs a leading row axis; got a scalar.")
    _check_lengths(**{f"arrays[{i}]": a for i, a in enumerate(host)})
    n = len(host[0])
    if stratified:
        labels = host[0]
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ValueError(f"stratified=True resamples within each class of arrays[0], which must hold integer or "
                             f"bool labels; got dtype {labels.dtype}. Pass labels first, or stratified=False.")
        strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    else:
        strata = [np.arange(n)]
    if batched:
        estimate = float(np.asarray(metric_fn(*[a[None] for a in host])).reshape(-1)[0])
    else:
        estimate = float(metric_fn(*arrays))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2 ** 24 // max(n, 1)))  # bounds the index matrix's memory
    values: list[np.ndarray] = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        index = _resample_indices(rng, strata, rows, n)
        if batched:
            values.append(np.asarray(metric_fn(*[a[index] for a in host]), np.float64).reshape(rows))
        else:
            for k in range(rows):
                try:
                    values.append(np.asarray(metric_fn(*[a[index[k]] for a in host]), np.float64).reshape(1))
                except ValueError as e:
                    raise ValueError(f"bootstrap_ci: metric_fn failed on resample {start + k}: {e}"
                                     + ("" if stratified else " (stratified=True keeps every class in every resample)")
                                     ) from e
    boot = np.concatenate(values)
    bad = int((~np.isfinite(boot)).sum())
    if bad:
        raise ValueError(f"bootstrap_ci: metric_fn returned NaN or inf on {bad} of {n_boot} resamples"
                         + ("" if stratified else " (stratified=True keeps every class in every resample)") + ".")
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate, float(low), float(high))


# ----------------------------------------------------------------------------------------------
# Uncertainty baselines from the model's own next-token distribution.


def _log_softmax(xp, logits, axis):
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _float_logits(logits: ArrayLike):
    if isinstance(logits, jax.Array):
        return jnp, jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))
    x = np.asarray(logits)
    return np, x.astype(np.promote_types(x.dtype, np.float32))


def predictive_entropy(logits: ArrayLike, axis: int = -1) -> np.ndarray | jax.Array:
    """Entropy ``-Σ p log p`` (nats) of ``softmax(logits)`` over ``axis``, computed stably from logits.

    A classic uncertainty baseline: score hallucination risk by the entropy of the model's own
    next-token distribution at the answer position, and compare its :func:`roc_auc` with a probe's.
    Entries with ``-inf`` logits (masked tokens) contribute zero. JAX in, JAX out; numpy in, numpy out.

    >>> import numpy as np, idesign as ids
    >>> ids.metrics.predictive_entropy(np.zeros((2, 4))).round(4)  # uniform over 4: log 4
    array([1.3863, 1.3863])
    """
    xp, x = _float_logits(logits)
    log_p = _log_softmax(xp, x, axis)
    p = xp.exp(log_p)
    return -xp.sum(p * xp.where(p > 0, log_p, 0.0), axis=axis)


def max_probability(logits: ArrayLike, axis: int = -1) -> np.ndarray | jax.Array:
    """The largest probability of ``softmax(logits)`` over ``axis``: ``1 / Σ exp(x - max x)``.

    Use ``-max_probability(logits)`` (or ``1 - ...``) as a score where higher means less confident.

    >>> import numpy as np, idesign as ids
    >>> ids.metrics.max_probability(np.log(np.array([[0.2, 0.5, 0.3]])))
    array([0.5])
    """
    xp, x = _float_logits(logits)
    return 1.0 / xp.sum(xp.exp(x - xp.max(x, axis=axis, keepdims=True)), axis=axis)


# ----------------------------------------------------------------------------------------------
# Multiple testing: permutation p-values of many scores at once and their family-wise (Holm) or
# false-discovery-rate (Benjamini–Hochberg) adjustment.


def _in_input_order(pvalues: ArrayLike, adjust: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    # Both adjustments work on the ascending p-values and their ranks 1..m; results go back to input order.
    p = np.asarray(pvalues, np.float64)
    order = np.argsort(p, kind="stable")
    out = np.empty(p.size)
    out[order] = np.minimum(1.0, adjust(p[order], p.size))
    return out


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate); reject where ``adjusted <= alpha``.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    return _in_input_order(pvalues, lambda p, m: np.maximum.accumulate(p * (m - np.arange(m))))


def benjamini_hochberg(pvalues: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate).

    >>> benjamini_hochberg([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.04, 0.04]
    """
    return _in_input_order(pvalues, lambda p, m: np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1])


def _auc_from_ranks(labels: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """AUROC of each column from midranks: ``(sum of positive ranks - n1 (n1+1)/2) / (n1 n0)``."""
    n1 = labels.sum(-1, keepdims=True)
    n0 = labels.shape[-1] - n1
    return (labels @ ranks - n1 * (n1 + 1) / 2) / (n1 * n0)


def column_auroc(labels: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """ROC AUC of every column of ``scores [N, K]`` against binary ``labels [N]`` (midranks, ties count ½).

    >>> column_auroc(np.array([0, 1, 1]), np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])).tolist()
    [1.0, 0.25]
    """
    ranks = scipy.stats.rankdata(np.asarray(scores, np.float64), axis=0)
    return _auc_from_ranks(np.asarray(labels, np.float64)[None], ranks)[0]


def permutation_pvalues(labels: ArrayLike, scores: ArrayLike, *, n_permutations: int = 2000, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided label-permutation p-values of ``|AUROC(labels, score) - 1/2|`` for each score column.

    The same ``B`` permutations serve every column (so the p-values of correlated candidates
    stay coherent); ``p = (1 + #{b: T_b >= T}) / (1 + B)``, valid at any sample size.

    Args:
      labels: ``[N]`` binary labels.
      scores: ``[N, K]`` (or ``[N]``) scores, e.g. candidates or their decoded values.
      n_permutations: ``B``; the smallest attainable p-value is ``1 / (1 + B)``.
      seed: seeds the permutations.

    Returns:
      ``(pvalues [K], auroc [K])``.

    >>> rng = np.random.default_rng(0)
    >>> y = np.array([0, 1] * 50)
    >>> s = np.stack([y + 0.5 * rng.normal(size=100), rng.normal(size=100)], 1)
    >>> p, auc = permutation_pvalues(y, s, n_permutations=999)
    >>> bool(p[0] == 0.001), bool(p[1] > 0.05)
    (True, True)
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not set(np.unique(y).tolist()) <= {0, 1} or len(np.unique(y)) != 2:
        raise ValueError(f"permutation_pvalues: labels must be [N] with both classes 0 and 1; got shape {y.shape}, "
                         f"values {np.unique(y)[:5].tolist()}.")
    s = np.asarray(scores, np.float64)
    s = s[:, None] if s.ndim == 1 else s
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"permutation_pvalues: scores must be [N, K] with N={y.shape[0]}; got shape {s.shape}.")
    if not np.isfinite(s).all():
        raise ValueError("permutation_pvalues: scores must be finite.")
    if n_permutations < 1:
        raise ValueError(f"permutation_pvalues: n_permutations must be positive; got {n_permutations}.")
    ranks = scipy.stats.rankdata(s, axis=0)
    y = y.astype(np.float64)
    observed = _auc_from_ranks(y[None], ranks)[0]
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(y) for _ in range(n_permutations)])
    null = _auc_from_ranks(perms, ranks)
    stat, null_stat = np.abs(observed - 0.5), np.abs(null - 0.5)
    exceed = (null_stat >= stat[None] - 1e-12).sum(0)
    return (1.0 + exceed) / (1.0 + n_permutations), observed
