"""Data-side intentional design: which preference pairs push a behaviour, and which features DPO will amplify.

Two readings of a *base* model, before any preference training:

* **Probe-based data attribution** (Goodfire, 2026): a behaviour probe read on the base model's activations
  of each pair's responses scores the pair by ``probe(chosen) − probe(rejected)``, the amount the pair asks
  DPO to move the behaviour; pairs and sources are ranked by it (:func:`probe_pair_scores`,
  :func:`source_scores`), then filtered, relabelled or dropped (:func:`filter_pairs`, :func:`swap_pairs`,
  :func:`drop_sources`). One forward pass per response.
* **Gradient attribution** (TracIn-style baseline, :func:`gradient_pair_scores`): the dot product of each
  pair's DPO-loss gradient with the gradient of a behaviour loss, per pair with ``jax.vmap(jax.grad(...))``:
  a step on the pair changes the behaviour loss by ``−η ⟨∇L_pair, ∇L_behaviour⟩`` to first order.
* **Predictive data debugging** (arXiv 2606.12360): base-model SAE features averaged over chosen minus
  rejected responses predict which features preference training will amplify (:func:`feature_shift`);
  :func:`first_order_feature_shift` weights each response by the base model's probability of producing it
  (the first-order change of the *sampled* feature mean under a DPO step, docs/methods.md §7).

Responses are read at their own tokens (:func:`response_activations`): the mean over a response's tokens of
one site, with the prompt as context. :func:`behaviour_rate` measures a behaviour on generated responses.

>>> import numpy as np, idesign as ids
>>> from idesign import data_attribution as da
>>> probe = ids.probes.MassMeanProbe(w=np.array([1.0, 0.0]), b=np.array(0.0))
>>> da.probe_pair_scores(probe, {'chosen': np.array([[2.0, 5.0]]), 'rejected': np.array([[0.5, 1.0]])}).tolist()
[1.5]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import activations, hooks, probes, sae
from idesign import preference as pref
from idesign._pytree import pytree_class, static
from idesign._types import Array, PyTree
from idesign.generate import SamplingConfig, generate

__all__ = ["response_activations", "probe_pair_scores", "probe_pair_scorer", "gradient_pair_scores", "behaviour_nll",
           "BehaviourNLL", "source_scores", "top_k", "filter_pairs", "swap_pairs", "drop_sources", "precision_at_k",
           "behaviour_rate",
           "response_feature_means", "feature_shift", "first_order_feature_shift", "earliest_good_site", "r2"]


def _check_pairs(rows: Mapping[str, Sequence[Any]], fn: str) -> None:
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in rows]
    if missing:
        raise ValueError(f"{fn}: the pairs lack the columns {missing}; expected 'prompt', 'chosen' and 'rejected' "
                         "(a slice of ids.preference.preference_dataset).")
    for side in ("chosen", "rejected"):
        empty = [i for i, r in enumerate(rows[side]) if len(r) == 0]
        if empty:
            raise ValueError(f"{fn}: the {side} responses of rows {empty[:8]} are empty; every pair needs a "
                             "non-empty chosen and rejected response.")


def _encoded(rows: Mapping[str, Any], pad_id: int, fn: str) -> Mapping[str, Any]:
    """``rows`` as :func:`idesign.preference.encode_pairs` arrays; already encoded rows pass through (so a
    timing can leave the shared tokenisation out)."""
    if "chosen_tokens" in rows:
        return rows
    _check_pairs(rows, fn)
    return pref.encode_pairs(rows, pad_id=pad_id)


def response_activations(apply: Callable, params: PyTree, rows: Mapping[str, Sequence[Any]], site: str, *,
                         pad_id: int, batch_size: int = 256, tokens: bool = False) -> dict[str, np.ndarray]:
    """Activations of ``site`` at each pair's response tokens (prompt as context), for both sides.

    Returns ``{'chosen': [N, D], 'rejected': [N, D]}``, each response's mean over its tokens; with
    ``tokens=True``, ``{side: [tokens, D], f'{side}_row': [tokens]}`` (every response token, and its pair).

    >>> import idesign as ids
    >>> from idesign import data_attribution as da
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=1))
    >>> acts = da.response_activations(apply, params, {'prompt': [[1, 2]], 'chosen': [[3]], 'rejected': [[4, 5]]},
    ...                                'blocks.0.resid_post', pad_id=0)
    >>> acts['chosen'].shape, acts['rejected'].shape
    ((1, 8), (1, 8))
    """
    _check_pairs(rows, "response_activations")
    batch = pref.encode_pairs(rows, pad_id=pad_id)
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        data = {"tokens": batch[f"{side}_tokens"], "valid": batch[f"{side}_valid"],
                "response": batch[f"{side}_mask"] > 0}
        got = activations.collect_activations(apply, params, data, site, batch_size=batch_size, valid_column="valid",
                                               positions="response", reduce=None if tokens else "mean",
                                               columns=[], progress=False)
        out[side] = got[site]
        if tokens:
            out[f"{side}_row"] = got["row"]
    return out


def probe_pair_scores(probe: Any, acts: Mapping[str, Any]) -> np.ndarray:
    """``[N]`` probe logit on the chosen response minus on the rejected one: how far each pair pushes the behaviour."""
    if np.shape(acts["chosen"]) != np.shape(acts["rejected"]):
        raise ValueError(f"probe_pair_scores: chosen activations {np.shape(acts['chosen'])} and rejected "
                         f"{np.shape(acts['rejected'])} differ; expected one row per pair on each side.")
    return np.asarray(probes.score(probe, acts["chosen"]) - probes.score(probe, acts["rejected"]))


@pytree_class
class BehaviourNLL:
    """``loss(params)``: mean ``−log p(behaviour tokens | prompt)`` over the rows (built by :func:`behaviour_nll`).

    A pytree whose leaves are the encoded rows and whose static part is the model, so a jitted function that
    takes it as an argument compiles once per model and row shapes, however many losses are built.

    >>> import jax, idesign as ids
    >>> from idesign import data_attribution as da
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=1))
    >>> loss = da.behaviour_nll(apply, [[1, 2]], [[3]], pad_id=0)
    >>> isinstance(loss, da.BehaviourNLL), [x.shape for x in jax.tree.leaves(loss)]
    (True, [(1, 3), (1, 3), (1, 3)])
    """

    tokens: Array
    mask: Array
    valid: Array
    apply: Callable = static()

    def __call__(self, params: PyTree) -> Array:
        return -pref.sequence_logprobs(self.apply, params, self.tokens, self.mask, self.valid).mean()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pair_score_difference(apply: Callable, site: str, params: PyTree, probe: Any, tokens: Array, valid: Array,
                           response: Array) -> Array:
    """Probe score of the chosen half's mean response activation minus the rejected half's (rows stacked)."""
    _, captured = apply(params, tokens, hooks={site: hooks.Capture()}, valid=valid)
    acts = captured[site].astype(jnp.float32)
    w = response.astype(jnp.float32)
    mean = (acts * w[..., None]).sum(1) / jnp.maximum(w.sum(1), 1.0)[:, None]
    logits = probes.score(probe, mean)
    n = tokens.shape[0] // 2
    return logits[:n] - logits[n:]


def probe_pair_scorer(apply: Callable, site: str, *, pad_id: int,
                      batch_size: int = 256) -> Callable[[PyTree, Any, Mapping[str, Any]], np.ndarray]:
    """``scorer(params, probe, rows) -> [N]``: :func:`probe_pair_scores` of the pairs' mean response activations
    as one jitted forward pass, the lean path for scoring a whole dataset. ``rows`` are pair columns or their
    :func:`idesign.preference.encode_pairs` arrays.

    Chosen and rejected sequences are padded to one length and run as a single batch with a capture at
    ``site`` only; the mean over response tokens and the probe's dot product happen inside the same jitted
    function, so nothing but the ``[N]`` scores returns to the host. The logits are not returned, so XLA
    drops the layers after ``site`` and the unembedding (dead code). One compilation per ``(apply, site)``
    and shape (jax's own cache: ``apply`` and ``site`` are static arguments). Pairs go through in chunks of ``batch_size`` (the last padded to the compiled shape): on a CPU,
    one batch of every pair was measured 2x slower than chunks of 256. Equal to
    ``probe_pair_scores(probe, response_activations(...))`` up to float rounding.

    >>> import numpy as np, idesign as ids
    >>> from idesign import data_attribution as da
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=1))
    >>> probe = ids.probes.MassMeanProbe(w=np.ones(8, np.float32), b=np.array(0.0, np.float32))
    >>> rows = {'prompt': [[1, 2]], 'chosen': [[3]], 'rejected': [[4, 5]]}
    >>> scorer = da.probe_pair_scorer(apply, 'blocks.0.resid_post', pad_id=0)
    >>> acts = da.response_activations(apply, params, rows, 'blocks.0.resid_post', pad_id=0)
    >>> bool(np.allclose(scorer(params, probe, rows), da.probe_pair_scores(probe, acts), atol=1e-5))
    True
    """
    def scorer(params: PyTree, probe: Any, rows: Mapping[str, Sequence[Any]]) -> np.ndarray:
        b = _encoded(rows, pad_id, "probe_pair_scorer")
        n, out = len(b["chosen_tokens"]), []
        for start in range(0, n, batch_size):
            chunk = {k: v[start:start + batch_size] for k, v in b.items()}
            size = len(chunk["chosen_tokens"])
            if size < batch_size and n > batch_size:   # pad the last chunk to the compiled shape
                chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - size, 0)]) for k, v in chunk.items()}
            cat = lambda k: np.concatenate([chunk[f"chosen_{k}"], chunk[f"rejected_{k}"]])
            out.append(np.asarray(_pair_score_difference(apply, site, params, probe, cat("tokens"), cat("valid"),
                                                          cat("mask") > 0))[:size])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    return scorer


def behaviour_nll(apply: Callable, prompts: Sequence[Sequence[int]], behaviour: Sequence[Sequence[int]], *,
                  pad_id: int) -> BehaviourNLL:
    """The behaviour's loss: mean ``−log p(behaviour tokens | prompt)`` over the rows, as a function of params.

    >>> import idesign as ids
    >>> from idesign import data_attribution as da
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=1))
    >>> bool(da.behaviour_nll(apply, [[1, 2]], [[3, 4]], pad_id=0)(params) > 0)
    True
    """
    b = pref.encode_pairs({"prompt": prompts, "chosen": behaviour, "rejected": behaviour}, pad_id=pad_id)
    return BehaviourNLL(*(jnp.asarray(b[f"chosen_{k}"]) for k in ("tokens", "mask", "valid")), apply=apply)


@jax.jit
def _behaviour_grad(loss: BehaviourNLL, params: PyTree) -> PyTree:
    return jax.grad(loss)(params)


@functools.partial(jax.jit, static_argnames=("apply", "beta", "normalize"))
def _pair_scores(params: PyTree, ref: PyTree, g_b: PyTree, chunk: Mapping[str, Array], *, apply: Callable,
                 beta: float, normalize: bool) -> Array:
    def pair_loss(p, one):
        one = jax.tree.map(lambda x: x[None], one)
        chosen, rejected = pref._pair_logprobs(apply, p, one)
        ref_c, ref_r = jax.lax.stop_gradient(pref._pair_logprobs(apply, ref, one))
        return pref.dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta)[0]

    grads = jax.vmap(jax.grad(pair_loss), in_axes=(None, 0))(params, chunk)
    dots = sum(jax.tree.leaves(jax.tree.map(lambda g, h: jnp.tensordot(g, h, axes=h.ndim), grads, g_b)))
    if not normalize:
        return dots
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    return dots / jnp.maximum(norms * optax.tree.norm(g_b), 1e-30)


def gradient_pair_scores(apply: Callable, params: PyTree, ref_params: PyTree, rows: Mapping[str, Sequence[Any]],
                         behaviour_loss: Callable[[PyTree], Array], *, pad_id: int, beta: float = 0.1,
                         batch_size: int = 64, normalize: bool = False) -> np.ndarray:
    """TracIn-style scores ``⟨∇_θ L_DPO(pair_i), ∇_θ L_behaviour⟩`` at ``params``, one per pair.

    ``rows`` are pair columns or their :func:`idesign.preference.encode_pairs` arrays.
    Positive: a gradient step on the pair lowers the behaviour's loss (amplifies the behaviour). The per-pair
    gradients are ``jax.vmap(jax.grad(pair_loss))`` over a batch of pairs; the reference is held fixed.
    ``normalize=True`` divides by both gradients' norms (the cosine): raw dot products are dominated by the
    pairs with the largest gradients whatever their direction (measured in the preference world: the top
    clean pairs' raw scores exceed the planted pairs' mean).

    Compiles once per model, ``beta``, ``normalize`` and shapes (jax's own bounded cache): a
    :func:`behaviour_nll` loss is an argument of the jitted gradient, not part of its key. Any other callable
    ``behaviour_loss`` is differentiated under a fresh ``jax.jit`` (one compilation per call).

    Raises:
      ValueError: a reference whose structure differs from ``params``', or malformed pairs.

    >>> import idesign as ids
    >>> from idesign import data_attribution as da
    >>> apply, ref = ids.init_transformer(ids.TransformerConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=1))
    >>> pairs = {'prompt': [[1, 2], [3]], 'chosen': [[4], [5, 6]], 'rejected': [[7], [8]]}
    >>> loss = da.behaviour_nll(apply, [[1, 2]], [[4]], pad_id=0)
    >>> da.gradient_pair_scores(apply, ref, ref, pairs, loss, pad_id=0, batch_size=2, normalize=True).shape
    (2,)
    """
    pref._check_reference(params, ref_params)
    batch = _encoded(rows, pad_id, "gradient_pair_scores")
    if isinstance(behaviour_loss, BehaviourNLL):
        g_b = _behaviour_grad(behaviour_loss, params)
    else:
        g_b = jax.jit(jax.grad(behaviour_loss))(params)
    scores = functools.partial(_pair_scores, params, ref_params, g_b, apply=apply, beta=float(beta),
                               normalize=bool(normalize))
    n = len(batch["chosen_tokens"])
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
        size = len(chunk["chosen_tokens"])
        if size < batch_size:   # pad the last chunk to the compiled shape (copies of row 0, dropped after)
            chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - size, 0)]) for k, v in chunk.items()}
        out.append(np.asarray(scores(chunk))[:size])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def source_scores(scores: Any, sources: Sequence[str]) -> dict[str, float]:
    """Mean pair score per source, highest first.

    >>> from idesign import data_attribution as da
    >>> da.source_scores([1.0, 3.0, 0.0], ['a', 'b', 'b'])
    {'b': 1.5, 'a': 1.0}
    """
    scores, sources = np.asarray(scores, np.float64), np.asarray(sources)
    if scores.shape != sources.shape:
        raise ValueError(f"source_scores: {scores.shape[0]} scores for {sources.shape[0]} sources; one each expected.")
    means = {str(s): float(scores[sources == s].mean()) for s in np.unique(sources)}
    return dict(sorted(means.items(), key=lambda kv: -kv[1]))


def top_k(scores: Any, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores (ties broken by index, so the result is deterministic).

    >>> from idesign import data_attribution as da
    >>> da.top_k([0.1, 0.9, 0.5, 0.9], 2).tolist()
    [1, 3]
    """
    scores = np.asarray(scores)
    if not 0 <= k <= len(scores):
        raise ValueError(f"top_k: k={k} for {len(scores)} scores; expected 0 <= k <= {len(scores)}.")
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def filter_pairs(pairs: Any, flagged: Sequence[int]) -> Any:
    """The dataset without the ``flagged`` rows.

    >>> import datasets
    >>> from idesign import data_attribution as da
    >>> ds = datasets.Dataset.from_dict({'chosen': [[1], [2], [3]], 'rejected': [[4], [5], [6]]})
    >>> list(da.filter_pairs(ds, [1])['chosen'])
    [[1], [3]]
    """
    drop = set(int(i) for i in flagged)
    return pairs.select([i for i in range(len(pairs)) if i not in drop])


def swap_pairs(pairs: Any, flagged: Sequence[int]) -> Any:
    """The dataset with chosen and rejected exchanged in the ``flagged`` rows.

    >>> import datasets
    >>> from idesign import data_attribution as da
    >>> ds = datasets.Dataset.from_dict({'chosen': [[1], [2]], 'rejected': [[4], [5]]})
    >>> swapped = da.swap_pairs(ds, [0])
    >>> list(swapped['chosen']), list(swapped['rejected'])
    ([[4], [2]], [[1], [5]])
    """
    import datasets

    cols = pairs.to_dict()
    for i in set(int(i) for i in flagged):
        cols["chosen"][i], cols["rejected"][i] = cols["rejected"][i], cols["chosen"][i]
    return datasets.Dataset.from_dict(cols, features=pairs.features)


def drop_sources(pairs: Any, sources: Sequence[str]) -> Any:
    """The dataset without the pairs of the given sources.

    >>> import datasets
    >>> from idesign import data_attribution as da
    >>> ds = datasets.Dataset.from_dict({'chosen': [[1], [2], [3]], 'source': ['forum', 'wiki', 'forum']})
    >>> list(da.drop_sources(ds, ['forum'])['chosen'])
    [[2]]
    """
    drop = set(sources)
    return pairs.select([i for i, s in enumerate(pairs["source"]) if s not in drop])


def precision_at_k(flagged: Sequence[int], truth: Any) -> float:
    """Share of ``flagged`` rows whose ``truth`` flag is set.

    >>> from idesign import data_attribution as da
    >>> da.precision_at_k([0, 2], [True, False, False])
    0.5
    """
    flagged = np.asarray(flagged, int)
    return float(np.asarray(truth, bool)[flagged].mean()) if flagged.size else float("nan")


def behaviour_rate(apply: Callable, params: PyTree, prompts: Any, shows: Callable[[np.ndarray], np.ndarray], *,
                   max_new_tokens: int, samples: int = 1, temperature: float = 1.0, seed: int = 0,
                   eos_id: int | None = None) -> float:
    """Share of sampled responses to ``prompts`` (``[N, P]``, no padding) that show a behaviour.

    ``shows(tokens [M, max_new_tokens]) -> [M]`` bool decides; each prompt is sampled ``samples`` times at
    ``temperature`` (0: greedy) with the KV-cache decoder :func:`idesign.generate`.
    """
    prompts = np.repeat(np.asarray(prompts, np.int32), samples, axis=0)
    out = generate(apply, params, jnp.asarray(prompts), max_new_tokens=max_new_tokens, key=jax.random.key(seed),
                   sampling=SamplingConfig(temperature=temperature), eos_id=eos_id)
    return float(np.mean(shows(np.asarray(out.tokens))))


def response_feature_means(sae_params: sae.SAEParams, k: int, token_acts: Any, rows: Any, n_rows: int) -> np.ndarray:
    """``[n_rows, M]``: the mean TopK-SAE code over each response's tokens (``rows`` names each token's response).

    >>> import numpy as np, idesign as ids
    >>> from idesign import data_attribution as da
    >>> sae_params = ids.sae.SAEParams(w_enc=np.eye(2, dtype=np.float32), b_enc=np.zeros(2, np.float32),
    ...                                w_dec=np.eye(2, dtype=np.float32), b_dec=np.zeros(2, np.float32))
    >>> da.response_feature_means(sae_params, 1, [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], [0, 0, 1], 2).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """
    codes = np.asarray(sae.encode(sae_params, jnp.asarray(token_acts), k))
    rows = np.asarray(rows, int)
    total = np.zeros((n_rows, codes.shape[1]), np.float64)
    np.add.at(total, rows, codes)
    count = np.bincount(rows, minlength=n_rows)[:, None]
    if (count == 0).any():
        raise ValueError(f"response_feature_means: responses {np.flatnonzero(count[:, 0] == 0)[:8].tolist()} have no "
                         "token; every response needs at least one.")
    return total / count


def feature_shift(chosen: Any, rejected: Any) -> np.ndarray:
    """Predicted shift per feature: mean over pairs of (chosen response's feature mean − rejected's).

    >>> from idesign import data_attribution as da
    >>> da.feature_shift([[1.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]).tolist()
    [2.0, -1.0]
    """
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if chosen.shape != rejected.shape:
        raise ValueError(f"feature_shift: chosen {chosen.shape} and rejected {rejected.shape}; one row per pair each.")
    return (chosen - rejected).mean(0)


def first_order_feature_shift(chosen: Any, rejected: Any, chosen_logprob: Any, rejected_logprob: Any,
                              baseline: Any) -> np.ndarray:
    """Predicted shift per feature of the *sampled* responses: the first-order change of ``E_{y∼π}[f(y)]``
    under a DPO step at the base model, with each response weighted by the base's probability of producing it.

    ``mean_i [p_w,i · (f_w,i − b_i) − p_l,i · (f_l,i − b_i)]`` with ``p = exp(logprob)`` the base model's
    probability of the whole response (its ``[N]`` sequence log-probabilities, e.g. from
    :func:`idesign.preference.sequence_logprobs`), ``f`` the responses' ``[N, M]`` feature means and ``b`` the
    base model's expected feature under its own samples at each pair's prompt (``[N, M]``, or ``[M]`` for
    one value shared by every prompt). Derivation (docs/methods.md §7): for a policy with one free logit per
    response, the DPO gradient at the reference is ``−β/2 (e_w − e_l)`` and
    ``∂E_π[f]/∂z_y = π(y)(f(y) − E_π[f])``, so a step moves the sampled mean by the bracket above (up to the
    step size). A pair whose responses the base rarely produces, or whose preferred response it already
    produces with a typical feature value, moves what is sampled little, whatever its feature difference.
    :func:`feature_shift` is the unweighted ``mean_i (f_w,i − f_l,i)``.

    >>> import numpy as np
    >>> from idesign import data_attribution as da
    >>> # pair 0: chosen p = 0.5, feature 1.0; rejected p = 0.25, feature 0.0; base mean 0.5 -> 0.25 + 0.125
    >>> shift = da.first_order_feature_shift([[1.0]], [[0.0]], np.log([0.5]), np.log([0.25]), [0.5])
    >>> round(float(shift[0]), 6)
    0.375
    """
    f_w, f_l = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    lp_w, lp_l = np.asarray(chosen_logprob, np.float64), np.asarray(rejected_logprob, np.float64)
    if f_w.shape != f_l.shape or f_w.ndim != 2:
        raise ValueError(f"first_order_feature_shift: chosen {f_w.shape} and rejected {f_l.shape}; expected two "
                         "equal [N, M] arrays (one row of feature means per pair).")
    if lp_w.shape != (f_w.shape[0],) or lp_l.shape != (f_w.shape[0],):
        raise ValueError(f"first_order_feature_shift: log-probabilities {lp_w.shape} and {lp_l.shape} for "
                         f"{f_w.shape[0]} pairs; expected one [N] sequence log-probability per pair and side.")
    if np.any(lp_w > 1e-6) or np.any(lp_l > 1e-6):
        raise ValueError("first_order_feature_shift: a log-probability is positive; expected the base model's "
                         "log p(response | prompt) <= 0.")
    b = np.broadcast_to(np.asarray(baseline, np.float64), f_w.shape) if np.ndim(baseline) <= 1 else \
        np.asarray(baseline, np.float64)
    if b.shape != f_w.shape:
        raise ValueError(f"first_order_feature_shift: baseline {np.shape(baseline)}; expected [M] = "
                         f"[{f_w.shape[1]}] or [N, M] = {list(f_w.shape)}.")
    p_w, p_l = np.exp(lp_w)[:, None], np.exp(lp_l)[:, None]
    return (p_w * (f_w - b) - p_l * (f_l - b)).mean(0)


def earliest_good_site(sites: Sequence[str], auc: Any, *, tolerance: float = 0.01) -> str:
    """The first of ``sites`` (ordered from the input up) whose validation AUC is within ``tolerance`` of the best.

    The rule for choosing a probe's read site when an earlier site reads as well: a probe read there needs
    the forward pass only up to it (:func:`probe_pair_scorer` drops the later layers).

    >>> from idesign import data_attribution as da
    >>> da.earliest_good_site(['blocks.0.resid_post', 'blocks.1.resid_post'], [0.995, 1.0])
    'blocks.0.resid_post'
    >>> da.earliest_good_site(['blocks.0.resid_post', 'blocks.1.resid_post'], [0.9, 1.0])
    'blocks.1.resid_post'
    """
    auc = np.asarray(auc, np.float64)
    if auc.shape != (len(sites),) or not len(sites):
        raise ValueError(f"earliest_good_site: {len(sites)} sites and AUC of shape {auc.shape}; one AUC per site "
                         "(at least one) expected.")
    if np.isnan(auc).any():
        raise ValueError(f"earliest_good_site: the AUC of {[s for s, a in zip(sites, auc) if np.isnan(a)]} is NaN.")
    return str(sites[int(np.flatnonzero(auc >= auc.max() - tolerance)[0])])


def r2(predicted: Any, actual: Any) -> float:
    """R² of the least-squares line of ``actual`` on ``predicted`` (the squared Pearson correlation).

    Predicted and actual shifts are on different scales (a dataset average against a change after a finite
    amount of training), so the fit has a free slope and intercept.

    >>> from idesign import data_attribution as da
    >>> round(da.r2([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]), 6)
    1.0
    """
    x, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"r2: predicted {x.shape} and actual {y.shape}; expected two equal 1-D arrays of >= 3 values.")
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1] ** 2)
