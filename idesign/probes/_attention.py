"""Attention probes: learned attention pooling over a span or sequence, then a linear readout.

Architecture (as the attention probes of RLFR, Prasad et al. 2026, and EleutherAI's attention
probes): the activations ``x_t`` of the positions in the span are standardised,
``x~_t = (x_t - mean) / scale``; each head ``h`` has one learned query ``q_h`` in activation space
and scores the positions by ``a_ht = q_h . x~_t`` (keys are the standardised activations
themselves: no key projection, so a head is ``D`` parameters and stays cheap on small data);
``alpha_h = softmax_t(a_ht)`` over the positions where ``mask`` is true; the head pools the
standardised activations (values = the activations, no value projection) into ``pooled_h =
sum_t alpha_ht x~_t``, the ``H`` pooled vectors are concatenated and read out linearly:
``logits = sum_h pooled_h @ w_h + b``. ``C = 1`` output is a binary probe (one logit); ``C >= 3``
outputs a multi-class one (softmax).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import _treescope
from idesign._types import Array
from idesign.probes import _checks
from idesign.probes._training import masked_standardization, train_minibatch


@_treescope.rendered
class AttentionProbe(NamedTuple):
    """Attention-pooling probe over a span or sequence (see the module docstring).

    Attributes:
      query: ``[H, D]`` one query per head, in standardised activation space.
      w: ``[H, D, C]`` readout of the concatenated pooled heads; ``C = 1`` means binary.
      b: ``[C]`` readout bias.
      mean: ``[D]`` activation mean used for standardisation.
      scale: ``[D]`` activation scale used for standardisation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.init_attention_probe(jax.random.key(0), 8, n_heads=2)
      >>> probes.score(p, jnp.ones((3, 5, 8)), jnp.ones((3, 5), bool)).shape
      (3,)
    """

    query: Array
    w: Array
    b: Array
    mean: Array
    scale: Array


def init_attention_probe(key: Array, dim: int, *, n_heads: int = 4, n_classes: int = 2,
                         mean: Array | None = None, scale: Array | None = None) -> AttentionProbe:
    """A fresh probe: small random queries (they break the symmetry between heads), zero readout.

    ``n_classes=2`` gives a binary probe (one logit).

    Example:
      >>> import jax
      >>> from idesign import probes
      >>> p = probes.init_attention_probe(jax.random.key(0), 16, n_heads=4, n_classes=3)
      >>> p.query.shape, p.w.shape
      ((4, 16), (4, 16, 3))
    """
    if n_heads < 1 or n_classes < 2:
        raise ValueError(f"init_attention_probe: need n_heads >= 1 and n_classes >= 2, got {n_heads}, {n_classes}.")
    out = 1 if n_classes == 2 else n_classes
    query = jax.random.normal(key, (n_heads, dim), jnp.float32) / np.sqrt(dim)
    mean = jnp.zeros(dim, jnp.float32) if mean is None else jnp.asarray(mean, jnp.float32)
    scale = jnp.ones(dim, jnp.float32) if scale is None else jnp.asarray(scale, jnp.float32)
    return AttentionProbe(query, jnp.zeros((n_heads, dim, out), jnp.float32), jnp.zeros((out,), jnp.float32),
                          mean, scale)


def _standardised(probe: AttentionProbe, acts: Array) -> Array:
    if acts.ndim < 2 or acts.shape[-1] != probe.query.shape[-1]:
        raise ValueError(f"score: the attention probe expects activations [..., T, {probe.query.shape[-1]}], "
                         f"got shape {tuple(acts.shape)}.")
    return (acts - probe.mean) / probe.scale


@jax.jit
def attention_weights(probe: AttentionProbe, acts: Array, mask: Array | None = None) -> Array:
    """Each head's attention over the positions: ``[..., H, T]``, zero where ``mask`` is false.

    ``acts`` is ``[..., T, D]`` and ``mask`` ``[..., T]`` (broadcast against each other: e.g. acts
    ``[B, 1, T, D]`` with span masks ``[B, S, T]``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.init_attention_probe(jax.random.key(0), 4, n_heads=2)
      >>> a = probes.attention_weights(p, jnp.ones((5, 4)), jnp.array([1, 1, 0, 0, 0], bool))
      >>> a.tolist()
      [[0.5, 0.5, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]]
    """
    x = _standardised(probe, jnp.asarray(acts))
    logits = jnp.einsum("...td,hd->...ht", x, probe.query)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    m = jnp.asarray(mask, bool)[..., None, :]
    logits = jnp.where(m, logits, jnp.finfo(logits.dtype).min)
    return jnp.where(m, jax.nn.softmax(logits, axis=-1), 0.0)


@jax.jit
def attention_logits(probe: AttentionProbe, acts: Array, mask: Array | None = None) -> Array:
    """Logits for ``acts [..., T, D]`` pooled over ``mask [..., T]``: ``[...]`` (binary) or ``[..., C]``.

    A span with no position in ``mask`` pools nothing and scores the bias ``b``.
    """
    x = _standardised(probe, jnp.asarray(acts))
    alpha = attention_weights(probe, acts, mask)
    pooled = jnp.matmul(alpha, x)  # [..., H, D]; broadcasts [B, S, H, T] @ [B, 1, T, D]
    out = jnp.einsum("...hd,hdc->...c", pooled, probe.w) + probe.b
    return out[..., 0] if probe.w.shape[-1] == 1 else out


def fit_attention_probe(acts: Any, labels: Any, mask: Any = None, *, n_heads: int = 4,
                        n_classes: int | None = None, num_steps: int = 300, batch_size: int = 32,
                        learning_rate: float = 3e-3, weight_decay: float = 1e-3,
                        class_weight: None | str | dict = None, sample_weight: Any = None,
                        standardize: bool = True, seed: int = 0, progress: bool = True) -> AttentionProbe:
    """Trains an attention probe with minibatch AdamW (optax), deterministic from ``seed``.

    Args:
      acts: ``[N, T, D]``: ``N`` sequences (or spans, padded to ``T`` positions).
      labels: ``[N]`` class ids; two classes give a binary probe.
      mask: ``[N, T]`` positions to attend to (the span, or the non-padding tokens); default all.
      n_heads: number of heads (queries).
      n_classes: number of classes (default: the largest label + 1).
      num_steps, batch_size, learning_rate, weight_decay: the optimisation (``optax.adamw``).
      class_weight: ``None``, ``"balanced"`` or ``{class: weight}``; multiplies ``sample_weight``.
      sample_weight: ``[N]`` non-negative weights; the loss is their weighted mean.
      standardize: standardise with the mean and std of the masked positions (stored in the probe).
      seed: seeds the initial queries and the batch order.
      progress: show a tqdm progress bar.

    Returns:
      The trained :class:`AttentionProbe`.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(192, 10, 6)).astype(np.float32)
      >>> y = (x[:, :, 0].max(1) > 1.5).astype(np.int32)
      >>> p = probes.fit_attention_probe(x, y, n_heads=2, num_steps=50, progress=False)
      >>> probes.score(p, x).shape
      (192,)
    """
    fn = "fit_attention_probe"
    x, m = _checks.sequence_inputs(acts, mask, fn=fn, position="position")
    N, T, D = x.shape
    labels_host = np.asarray(labels)
    _checks.check_ndim(labels_host, 1, fn=fn, name="labels", layout="[N] (one label per sequence)")
    _checks.check_rows(len(labels_host), N, fn=fn, name="labels", what="sequences")
    y, K = _checks.class_labels(labels_host, fn=fn, n_classes=n_classes)
    empty = np.flatnonzero(~np.asarray(m).any(1))
    if empty.size:
        raise ValueError(f"{fn}: mask selects no position in {empty.size} sequences (rows {empty[:10].tolist()}); "
                         "an empty span has nothing to pool.")
    sw = np.ones((N,), np.float32) if sample_weight is None else _checks.sample_weights(sample_weight, N, fn=fn)
    cw, balanced = _checks.class_weight_vector(class_weight, K, fn=fn)
    if balanced:
        counts = np.bincount(np.asarray(y), weights=np.asarray(sw), minlength=K)
        cw = np.where(counts > 0, counts.sum() / ((counts > 0).sum() * np.maximum(counts, 1e-30)), 0.0)
    weights = np.asarray(sw if cw is None else sw * np.asarray(cw)[y], np.float32)

    if standardize:
        mean, scale = masked_standardization(x, m)
    else:
        mean, scale = jnp.zeros(D, x.dtype), jnp.ones(D, x.dtype)
    init = init_attention_probe(jax.random.key(seed), D, n_heads=n_heads, n_classes=K, mean=mean, scale=scale)
    trainable = {"query": init.query, "w": init.w, "b": init.b}
    data = {"x": x, "mask": m, "y": y, "weight": weights}
    params, _ = train_minibatch(_attention_loss, trainable, data, {"mean": init.mean, "scale": init.scale},
                                num_steps=num_steps, batch_size=batch_size, optimizer="adamw",
                                hyperparams={"learning_rate": learning_rate, "weight_decay": weight_decay},
                                seed=seed, progress=progress, desc=fn)
    return init._replace(**params)


def _attention_loss(params: dict[str, Array], batch: dict[str, Array], consts: dict[str, Array], step: Array) -> Array:
    probe = AttentionProbe(params["query"], params["w"], params["b"], consts["mean"], consts["scale"])
    logits = attention_logits(probe, batch["x"], batch["mask"])
    if probe.w.shape[-1] == 1:
        terms = optax.sigmoid_binary_cross_entropy(logits, batch["y"].astype(logits.dtype))
    else:
        terms = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(batch["weight"] * terms) / jnp.maximum(batch["weight"].sum(), 1e-12)
