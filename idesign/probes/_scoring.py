"""One scorer for every probe family: ``score(probe, acts, mask=None) -> logits``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from idesign._types import Array
from idesign.probes._attention import AttentionProbe, attention_logits
from idesign.probes._linear import LogisticProbe, SoftmaxProbe, linear_logits
from idesign.probes._mass_mean import MassMeanProbe

PROBE_TYPES = (LogisticProbe, SoftmaxProbe, MassMeanProbe, AttentionProbe)
Probe = LogisticProbe | SoftmaxProbe | MassMeanProbe | AttentionProbe


@jax.jit
def _direction_logits(probe: MassMeanProbe, acts: Array) -> Array:
    return jnp.einsum("...d,d->...", acts, probe.w, precision=jax.lax.Precision.HIGHEST) + probe.b


def _check_dim(probe: Any, acts: Array, dim: int) -> None:
    if acts.ndim < 1 or acts.shape[-1] != dim:
        raise ValueError(f"score: the {type(probe).__name__} expects activations [..., {dim}], "
                         f"got shape {tuple(acts.shape)}.")


def score(probe: Probe, acts: Any, mask: Any = None) -> Array:
    """The probe's logits for activations; pure and jit/vmap-compatible.

    Token-level probes (:class:`LogisticProbe`, :class:`SoftmaxProbe`, :class:`MassMeanProbe`) score
    every row of ``acts [..., D]``: ``[...]`` (binary) or ``[..., K]``. An :class:`AttentionProbe`
    pools ``acts [..., T, D]`` over ``mask [..., T]`` and returns one logit (or ``C``) per sequence.
    For probes stacked by :func:`fit_many`, ``jax.vmap`` this function.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.MassMeanProbe(w=jnp.array([1.0, -1.0]), b=jnp.array(0.0))
      >>> probes.score(p, jnp.array([[3.0, 1.0], [0.0, 2.0]])).tolist()
      [2.0, -2.0]
    """
    acts = jnp.asarray(acts)
    if isinstance(probe, AttentionProbe):
        return attention_logits(probe, acts, mask)
    if not isinstance(probe, PROBE_TYPES):
        raise TypeError(f"score: expected a probe ({', '.join(t.__name__ for t in PROBE_TYPES)}), "
                        f"got {type(probe).__name__}.")
    if mask is not None:
        raise ValueError(f"score: a {type(probe).__name__} scores each token; mask applies only to AttentionProbe "
                         "(use span_scores for span-level scores of a token probe).")
    if isinstance(probe, MassMeanProbe):
        _check_dim(probe, acts, probe.w.shape[-1])
        return _direction_logits(probe, acts)
    _check_dim(probe, acts, probe.mean.shape[-1])
    return linear_logits(probe, acts)


def predict_proba(probe: Probe, acts: Any, mask: Any = None) -> Array:
    """Probabilities: ``sigmoid`` of a binary probe's logit (P(class 1)), ``softmax`` over classes otherwise.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.MassMeanProbe(w=jnp.array([1.0]), b=jnp.array(0.0))
      >>> probes.predict_proba(p, jnp.array([[0.0]])).tolist()
      [0.5]
    """
    logits = score(probe, acts, mask)
    multiclass = isinstance(probe, SoftmaxProbe) or (isinstance(probe, AttentionProbe) and probe.w.shape[-1] > 1)
    return jax.nn.softmax(logits, axis=-1) if multiclass else jax.nn.sigmoid(logits)
