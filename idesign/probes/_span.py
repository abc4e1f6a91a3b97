"""Token-level probes trained with the span-max loss of Obeso et al. (2025, arXiv 2509.03531).

Span encoding (jit-friendly, static shapes): ``span_ids [B, T]`` int, 0 for a token outside every
span and ``s`` in ``1..S`` for a token of the ``s``-th span of its sequence; ``span_labels [B, S]``
with ``span_labels[b, s - 1]`` the label (1 = hallucinated) of span ``s`` of sequence ``b``. Spans
may be numbered sparsely: a span id with no token is simply absent (its label is ignored), so a
batch pads to a common ``S``. ``mask [B, T]`` (optional) marks real tokens; padding tokens count
nowhere.

Loss, for token logits ``z_i`` and ``p_i = sigmoid(z_i)``::

    L = (1 - omega) * sum_i m_i w_i BCE(y_i, p_i) / sum_i m_i  +  omega * mean_spans BCE(y_s, max_{i in s} p_i)

with ``y_i`` the label of the token's span (0 outside every span), ``w_i = span_weight`` (10)
inside spans and 1 outside, ``m_i`` the token mask; the span term averages over the spans present.
``max_i p_i = sigmoid(max_i z_i)``, so the span term is computed on the max logit (stable).
``omega`` is annealed linearly from 0 at the first step to 1 at the last (:func:`omega_schedule`).
An entity's score is the max token logit over its span (:func:`span_scores`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign._types import Array
from idesign.probes import _checks
from idesign.probes._linear import LogisticProbe, linear_logits
from idesign.probes._scoring import score
from idesign.probes._training import masked_standardization, train_minibatch


def omega_schedule(num_steps: int) -> optax.Schedule:
    """Linear annealing of the span-loss weight: ``omega = 0`` at step 0, 1 at step ``num_steps - 1``.

    Example:
      >>> from idesign import probes
      >>> omega = probes.omega_schedule(5)
      >>> [float(omega(t)) for t in range(6)]
      [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return optax.linear_schedule(0.0, 1.0, transition_steps=max(int(num_steps) - 1, 1))


def span_masks(span_ids: Array, n_spans: int) -> Array:
    """``[B, S, T]`` boolean: which tokens belong to each span (for attention probes over spans).

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> probes.span_masks(jnp.array([[0, 1, 1, 2]]), 2).astype(int).tolist()
      [[[0, 1, 1, 0], [0, 0, 0, 1]]]
    """
    ids = jnp.asarray(span_ids)
    return ids[..., None, :] == jnp.arange(1, n_spans + 1)[:, None]


@functools.partial(jax.jit, static_argnames=("n_spans",))
def span_max_logits(token_logits: Array, span_ids: Array, n_spans: int, mask: Array | None = None) -> Array:
    """``[B, S]``: the max token logit of each span; ``-inf`` for a span with no token.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> z = jnp.array([[0.5, 2.0, -1.0, 3.0]])
      >>> probes.span_max_logits(z, jnp.array([[0, 1, 1, 0]]), 2).tolist()
      [[2.0, -inf]]
    """
    z = jnp.asarray(token_logits)
    ids = jnp.asarray(span_ids, jnp.int32)
    if mask is not None:
        ids = jnp.where(jnp.asarray(mask, bool), ids, 0)
    B = z.shape[0]
    segments = ids + (n_spans + 1) * jnp.arange(B, dtype=jnp.int32)[:, None]
    maxima = jax.ops.segment_max(z.reshape(-1), segments.reshape(-1), num_segments=B * (n_spans + 1))
    return maxima.reshape(B, n_spans + 1)[:, 1:]


def token_targets(span_ids: Array, span_labels: Array, *, span_weight: float = 10.0,
                  mask: Array | None = None) -> tuple[Array, Array]:
    """Per-token labels and loss weights: the span's label and ``span_weight`` inside spans, 0 and 1 outside.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> y, w = probes.token_targets(jnp.array([[0, 1, 2]]), jnp.array([[1.0, 0.0]]))
      >>> y.tolist(), w.tolist()
      ([[0.0, 1.0, 0.0]], [[1.0, 10.0, 10.0]])
    """
    ids = jnp.asarray(span_ids, jnp.int32)
    labels = jnp.asarray(span_labels, jnp.float32)
    inside = ids > 0
    y = jnp.where(inside, jnp.take_along_axis(labels, jnp.clip(ids - 1, 0, labels.shape[1] - 1), axis=1), 0.0)
    w = jnp.where(inside, span_weight, 1.0)
    if mask is not None:
        w = w * jnp.asarray(mask, w.dtype)
    return y, w


@jax.jit
def span_max_loss(token_logits: Array, span_ids: Array, span_labels: Array, *, omega: float | Array,
                  span_weight: float = 10.0, mask: Array | None = None) -> Array:
    """The span-max loss (module docstring) for token logits ``[B, T]``.

    Args:
      token_logits: ``[B, T]`` probe logits ``z_i``.
      span_ids: ``[B, T]`` int, 0 outside spans, ``1..S`` inside.
      span_labels: ``[B, S]`` 0/1 label per span.
      omega: weight of the span term, in ``[0, 1]``.
      span_weight: token weight inside spans.
      mask: ``[B, T]`` real tokens (default all).

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> z = jnp.zeros((1, 3))
      >>> loss = probes.span_max_loss(z, jnp.array([[0, 1, 1]]), jnp.array([[1.0]]), omega=1.0)
      >>> round(float(loss), 4)   # BCE(1, sigmoid(0)) = log 2
      0.6931
    """
    z = jnp.asarray(token_logits)
    m = jnp.ones(z.shape, z.dtype) if mask is None else jnp.asarray(mask, z.dtype)
    y, w = token_targets(span_ids, span_labels, span_weight=span_weight, mask=m)
    token_term = jnp.sum(w * optax.sigmoid_binary_cross_entropy(z, y)) / jnp.maximum(m.sum(), 1.0)
    labels = jnp.asarray(span_labels, z.dtype)
    span_z = span_max_logits(z, span_ids, labels.shape[1], m > 0)
    present = jnp.isfinite(span_z)
    span_bce = optax.sigmoid_binary_cross_entropy(jnp.where(present, span_z, 0.0), labels)
    span_term = jnp.sum(jnp.where(present, span_bce, 0.0)) / jnp.maximum(present.sum(), 1)
    return (1.0 - omega) * token_term + omega * span_term


def span_scores(probe: Any, acts: Array, span_ids: Array, n_spans: int, mask: Array | None = None) -> Array:
    """Entity scores ``[B, S]``: the max token logit of a token-level probe over each span.

    ``probe`` is any token-level probe (:class:`LogisticProbe`, :class:`MassMeanProbe`); spans with
    no token score ``-inf``. ``sigmoid`` of a score is the span's probability.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.LogisticProbe(jnp.array([1.0]), jnp.array(0.0), jnp.zeros(1), jnp.ones(1))
      >>> acts = jnp.array([[[0.0], [2.0], [1.0], [5.0]]])
      >>> probes.span_scores(p, acts, jnp.array([[1, 1, 2, 0]]), 2).tolist()
      [[2.0, 1.0]]
    """
    return span_max_logits(score(probe, acts), span_ids, n_spans, mask)


def _check_spans(span_ids: Any, span_labels: Any, B: int, T: int, fn: str) -> tuple[Array, Array]:
    ids = np.asarray(span_ids)
    if ids.shape != (B, T) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: span_ids must be integers of shape {(B, T)} (one span id per token), "
                         f"got shape {ids.shape}, dtype {ids.dtype}.")
    labels = np.asarray(span_labels)
    if labels.ndim != 2 or labels.shape[0] != B:
        raise ValueError(f"{fn}: span_labels must be [B, S] = [{B}, n_spans], got shape {labels.shape}.")
    S = labels.shape[1]
    if ids.min() < 0 or ids.max() > S:
        raise ValueError(f"{fn}: span_ids must be in 0..{S} (0 = no span, S = span_labels.shape[1]); "
                         f"got values in [{ids.min()}, {ids.max()}].")
    present = span_masks(ids, S).any(-1)
    used = np.asarray(labels)[np.asarray(present)]
    if not set(np.unique(used).tolist()) <= {0, 1}:
        raise ValueError(f"{fn}: span_labels of present spans must be 0 or 1, got {np.unique(used)[:10].tolist()}.")
    if len(np.unique(used)) < 2:
        raise ValueError(f"{fn}: all present spans have the label {np.unique(used).tolist()}; the probe needs "
                         "spans of both classes.")
    return jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.float32)


def fit_span_probe(acts: Any, span_ids: Any, span_labels: Any, *, mask: Any = None, span_weight: float = 10.0,
                   omega: Callable[[Array], Array] | float | None = None, num_steps: int = 500,
                   batch_size: int = 32, learning_rate: float = 1e-2, l2: float = 1e-4,
                   standardize: bool = True, seed: int = 0, progress: bool = True) -> LogisticProbe:
    """Trains a token-level linear probe with the span-max loss (minibatch Adam, deterministic from ``seed``).

    Args:
      acts: ``[B, T, D]`` token activations of ``B`` sequences.
      span_ids: ``[B, T]`` span id of each token (0 = none; see the module docstring).
      span_labels: ``[B, S]`` 0/1 label of each span.
      mask: ``[B, T]`` real (non-padding) tokens; default all.
      span_weight: token-loss weight of tokens inside spans (10 in the paper).
      omega: schedule ``step -> omega`` or a constant; default :func:`omega_schedule` (0 -> 1 linearly).
      num_steps, batch_size, learning_rate: Adam over minibatches of sequences.
      l2: adds ``l2 / 2 * ||w||^2`` to the loss.
      standardize: standardise with the mean and std of the real tokens (stored in the probe).
      seed: seeds the batch order (the loss is convex and the probe starts at zero).
      progress: show a tqdm progress bar.

    Returns:
      A :class:`LogisticProbe` scoring tokens; :func:`span_scores` turns it into entity scores.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> rng = np.random.default_rng(0)
      >>> acts = rng.normal(size=(96, 12, 6)).astype(np.float32)
      >>> ids = np.tile([0, 1, 1, 0, 2, 2, 0, 0, 0, 0, 0, 0], (96, 1)).astype(np.int32)
      >>> labels = rng.integers(0, 2, (96, 2))
      >>> p = probes.fit_span_probe(acts, ids, labels, num_steps=50, batch_size=16, progress=False)
      >>> probes.span_scores(p, acts, ids, 2).shape
      (96, 2)
    """
    fn = "fit_span_probe"
    x, m = _checks.sequence_inputs(acts, mask, fn=fn, position="token")
    B, T, D = x.shape
    ids, labels = _check_spans(span_ids, span_labels, B, T, fn)
    if standardize:
        mean, scale = masked_standardization(x, m)
    else:
        mean, scale = jnp.zeros(D, x.dtype), jnp.ones(D, x.dtype)
    if omega is None:
        omega_fn, omega_value = _linear_omega, float(num_steps)
    elif callable(omega):
        omega_fn, omega_value = omega, 0.0
    else:
        omega_fn, omega_value = _constant_omega, float(omega)
    consts = {"mean": mean, "scale": scale, "omega": jnp.asarray(omega_value, jnp.float32),
              "span_weight": jnp.asarray(span_weight, jnp.float32), "l2": jnp.asarray(l2, jnp.float32)}
    params = {"w": jnp.zeros(D, x.dtype), "b": jnp.zeros((), x.dtype)}
    data = {"x": x, "ids": ids, "labels": labels, "mask": m}
    params, _ = train_minibatch(_span_loss, params, data, consts, num_steps=num_steps, batch_size=batch_size,
                                optimizer="adam", hyperparams={"learning_rate": learning_rate}, seed=seed,
                                progress=progress, desc=fn, loss_static={"omega_fn": omega_fn})
    return LogisticProbe(params["w"], params["b"], mean, scale)


def _linear_omega(step: Array, num_steps: Array) -> Array:
    return jnp.clip(step / jnp.maximum(num_steps - 1.0, 1.0), 0.0, 1.0)  # = omega_schedule(num_steps)(step)


def _constant_omega(step: Array, value: Array) -> Array:
    return value


def _span_loss(params: dict[str, Array], batch: dict[str, Array], consts: dict[str, Array], step: Array, *,
               omega_fn: Callable) -> Array:
    probe = LogisticProbe(params["w"], params["b"], consts["mean"], consts["scale"])
    omega = omega_fn(step, consts["omega"]) if omega_fn in (_linear_omega, _constant_omega) else omega_fn(step)
    loss = span_max_loss(linear_logits(probe, batch["x"]), batch["ids"], batch["labels"], omega=omega,
                         span_weight=consts["span_weight"], mask=batch["mask"])
    return loss + 0.5 * consts["l2"] * jnp.sum(jnp.square(params["w"]))


# ----------------------------------------------------------------------------------------------
# Where a span is read.


READINGS = ("answer", "prediction", "both")


def _prediction_positions(x: Array, valid: Array, fn: str, name: str) -> tuple[Array, Any]:
    """``(before, at)``: ``before[b, t]``, the last real position before ``t`` in row ``b`` (-1: none), and an
    int32 ``[B, T]`` zeros' ``.at[...]`` indexer placing each token's value at that position (0 where none)."""
    valid = jnp.asarray(valid, bool)
    if x.ndim != 2 or valid.shape != x.shape:
        raise ValueError(f"{fn}: {name} {tuple(x.shape)} and valid {tuple(valid.shape)} must both be [B, T].")
    B, T = x.shape
    last_real = jax.lax.cummax(jnp.where(valid, jnp.arange(T), -1), axis=1)
    before = jnp.concatenate([jnp.full((B, 1), -1, last_real.dtype), last_real[:, :-1]], axis=1)
    return before, jnp.zeros((B, T), jnp.int32).at[jnp.arange(B)[:, None], jnp.maximum(before, 0)]


def read_span(span_mask: Array, valid: Array, reading: str = "answer") -> Array:
    """``[B, T]`` bool: the positions a probe reads for the span ``span_mask`` under ``reading``.

    The *prediction position* of a span token is the nearest real (``valid``) position before it:
    the activation there is the one the token was sampled from. ``"answer"`` reads the span's
    tokens, ``"prediction"`` their prediction positions, ``"both"`` the union (for a contiguous
    span: the position before it plus its tokens). A span token with no real token before it has
    no prediction position.

    Args:
      span_mask: ``[B, T]`` bool, the span's tokens.
      valid: ``[B, T]`` bool, real tokens (padding is skipped when looking back).
      reading: one of :data:`READINGS`.

    Returns:
      ``[B, T]`` bool.

    >>> import jax.numpy as jnp
    >>> from idesign import probes
    >>> span = jnp.array([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], bool)
    >>> valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]], bool)   # row 1: a hole before its span
    >>> probes.read_span(span, valid, "prediction").astype(int).tolist()
    [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    >>> probes.read_span(span, valid, "both").astype(int).tolist()
    [[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]]
    """
    if reading not in READINGS:
        raise ValueError(f"read_span: reading={reading!r}; expected one of {READINGS}.")
    span = jnp.asarray(span_mask, bool)
    if reading == "answer":
        return span
    before, at = _prediction_positions(span, valid, "read_span", "span_mask")
    predicted_from = at.add((span & (before >= 0)).astype(jnp.int32)) > 0
    return predicted_from if reading == "prediction" else predicted_from | span


def read_span_ids(span_ids: Array, valid: Array, reading: str = "answer") -> Array:
    """Span ids ``[B, T]`` extended to the positions ``reading`` reads (:func:`read_span`), span by span.

    With ``"prediction"`` or ``"both"``, the prediction position of each span token takes the span's
    id (for ``"prediction"`` the span's own tokens then keep it only where they predict a later span
    token). Where two spans would claim one position, the later span wins. Scoring
    :func:`span_scores` on the result reads every span where :func:`read_span` reads it.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> ids = jnp.array([[0, 0, 1, 1, 0, 2]])
      >>> probes.read_span_ids(ids, jnp.ones((1, 6), bool), "both").tolist()
      [[0, 1, 1, 1, 2, 2]]
      >>> probes.read_span_ids(ids, jnp.ones((1, 6), bool), "prediction").tolist()
      [[0, 1, 1, 0, 2, 0]]
    """
    if reading not in READINGS:
        raise ValueError(f"read_span_ids: reading={reading!r}; expected one of {READINGS}.")
    ids = jnp.asarray(span_ids, jnp.int32)
    if reading == "answer":
        return ids
    before, at = _prediction_positions(ids, valid, "read_span_ids", "span_ids")
    # Scatter each token's id onto its prediction position (max: the later span wins a shared position).
    predicted = at.max(jnp.where((ids > 0) & (before >= 0), ids, 0))
    return predicted if reading == "prediction" else jnp.where(ids > 0, ids, predicted)
