"""Biomarker discovery from a trained model's internals: candidates, evidence, ranking, validation.

The workflow (docs/methods.md §5): train a model on samples, open it up, distil a human-readable
biomarker, validate it on an independent cohort. Given a model whose forward pass yields a
sample **embedding** and a disease **logit**:

1. **Candidates** (a :class:`CandidateBank`): interpretable sample statistics, built by the study
   (for cfDNA, ``idesign.studies.cfdna.candidate_bank``: fragment-length bins and summaries, end-motif
   frequencies, GC, methylation, depth). Statistics that are a mean of a per-fragment value also keep
   that value, so fragment-level attributions can be compared with them.
2. **Evidence from the model, never from the labels** (all computed on a discovery split held out
   from training, with the labels unused):

   - *probes* (:func:`probe_evidence`): a ridge probe (:func:`idesign.probes.fit_ridge`) decodes each candidate from the embedding
     (cross-validated R²), and its decoded value is correlated with the model's logit; the score
     ``R² · corr(decoded, logit)²`` is the share of the candidate's variance that the embedding
     carries *along the disease readout* (for a linear readout and an in-sample least-squares
     probe it is exactly ``corr(candidate, logit)²``);
   - *SAE features* (:func:`sae_evidence`): a TopK SAE on the embeddings; each feature's share
     of the logit (``code · (decoder row · readout)``, its spread over samples) weights the
     feature's squared correlation with each candidate;
   - *attribution* (:func:`fragment_attribution`, :func:`attribution_evidence`): the gradient of
     the logit with respect to each fragment's pooling weight, times the weight, correlated over
     fragments with the per-fragment value behind each candidate.

   :func:`rank_candidates` averages the three lines (each scaled to its own maximum; a line a
   candidate has no value for is skipped) into one ranking.
3. **Significance** (:func:`idesign.metrics.permutation_pvalues`): a label-permutation test, on the independent
   cohort, of whether each candidate statistic separates cases from controls there (statistic
   ``|AUROC - 1/2|``). The ranking says *which* statistic the model points to; the test asks
   whether that statistic is a biomarker in new samples. p-values ``(1 + #{T_perm >= T}) / (1 + B)``
   are exact and valid at any sample size; they are corrected for testing every candidate by
   **Holm's step-down method** (:func:`idesign.metrics.holm`, controlling the family-wise error rate:
   the chance of *any* false discovery) — Benjamini–Hochberg (:func:`idesign.metrics.benjamini_hochberg`)
   is available for larger banks. The raw statistic is tested, not the probe's decoding of it:
   a probe's decoded value on new embeddings carries part of the disease readout direction
   whatever the candidate, so it would "validate" candidates unrelated to the disease.
4. **Distillation** (:func:`distill`): a logistic classifier on the top-ranked statistic(s) only,
   fitted on the discovery cohort and scored on the independent one, against the full model.

:func:`label_association` (``|AUROC - 1/2|`` of each raw candidate against the labels) is the
direct label-correlation baseline a model-free analysis would use; it is a control, not part of
the ranking.

Example:
  >>> import numpy as np
  >>> from idesign import discovery
  >>> r = discovery.rank_candidates(["a", "b"], {"probe": np.array([0.2, 0.6]), "sae": np.array([0.1, np.nan])})
  >>> r.names, r.score.round(2).tolist()
  (('b', 'a'), [1.0, 0.67])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import metrics as metrics_lib
from idesign import probes as probes_lib
from idesign import sae as sae_lib
from idesign._types import Array


EVIDENCE_LINES = ("probe", "sae", "attribution")


class CandidateBank(NamedTuple):
    """Interpretable candidate statistics of ``N`` samples, each a set of up to ``F`` elements ("fragments").

    Built by a study (e.g. ``idesign.studies.cfdna.candidate_bank``).

    Attributes:
      names: ``K`` candidate names (for cfDNA: ``short_fraction``, ``length[140,160)``, ``motif:CCCA``, ...).
      families: ``K`` families (for cfDNA: ``length``, ``motif``, ``methylation``, ``gc``, ``depth``).
      values: ``[N, K]`` float64 statistics.
      fragment_values: ``[N, F, K]`` float32 per-element value whose masked mean is the candidate,
        NaN for candidates that are not such a mean (``None`` unless asked for).
      mask: ``[N, F]`` bool, the real elements.
    """

    names: tuple[str, ...]
    families: tuple[str, ...]
    values: np.ndarray
    fragment_values: np.ndarray | None
    mask: np.ndarray


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of ``a [N, K]`` with ``b [N]`` or ``[N, K]``; 0 for constants."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    if b.ndim == 1:
        b = b[:, None]
    den = np.sqrt(np.sum(a * a, 0) * np.sum(b * b, 0))
    return np.where(den > 1e-300, np.sum(a * b, 0) / np.where(den > 1e-300, den, 1.0), 0.0)


def readout_direction(embeddings: Any, logits: Any) -> tuple[np.ndarray, float]:
    """The disease readout ``u, c`` with ``logit ≈ embedding @ u + c`` (least squares).

    Exact for a linear head; for any other head it is the best linear summary of what the
    logit reads from the embedding.

    >>> e = np.random.default_rng(0).normal(size=(50, 3))
    >>> u, c = readout_direction(e, e @ np.array([1.0, -2.0, 0.0]) + 0.5)
    >>> np.round(u, 6).tolist(), round(c, 6)
    ([1.0, -2.0, 0.0], 0.5)
    """
    e = np.asarray(embeddings, np.float64)
    design = np.concatenate([e, np.ones((e.shape[0], 1))], 1)
    coef = np.linalg.lstsq(design, np.asarray(logits, np.float64), rcond=None)[0]
    return coef[:-1], float(coef[-1])


def probe_evidence(fit: probes_lib.RidgeFit, logits: Any) -> np.ndarray:
    """Probe line: ``max(R², 0) · corr(decoded candidate, logit)²`` per candidate, in ``[0, 1]``.

    How much of each candidate the embedding carries along the direction the model reads its
    disease logit from. No labels are involved.

    >>> fit = probes_lib.RidgeFit(np.array([0.9, 0.9]), np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]), None)
    >>> probe_evidence(fit, np.array([0.0, 1.0, 2.0])).round(3).tolist()
    [0.9, 0.675]
    """
    return np.maximum(fit.r2, 0.0) * np.square(_corr(fit.decoded, np.asarray(logits, np.float64)))


# ----------------------------------------------------------------------------------------------
# SAE features


def sae_evidence(codes: Any, w_dec: Any, readout: Any, candidates: Any) -> tuple[np.ndarray, np.ndarray]:
    """SAE line: candidates' squared correlation with SAE features, weighted by each feature's logit share.

    Feature ``m`` contributes ``codes[:, m] * (w_dec[m] @ readout)`` to the logit; its weight is
    the spread (sd over samples) of that contribution. The score of candidate ``c`` is
    ``sum_m weight_m corr(codes_m, c)² / sum_m weight_m``.

    Args:
      codes: ``[N, M]`` SAE codes of the embeddings.
      w_dec: ``[M, D]`` decoder rows.
      readout: ``[D]`` the logit's direction in embedding space (:func:`readout_direction`).
      candidates: ``[N, K]``.

    Returns:
      ``(score [K], feature_weight [M])``.

    >>> codes = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    >>> score, weight = sae_evidence(codes, np.eye(2), np.array([1.0, 0.0]), codes[:, :1])
    >>> score.round(3).tolist(), weight.round(3).tolist()
    ([1.0], [0.816, 0.0])
    """
    codes = np.asarray(codes, np.float64)
    contribution = codes * (np.asarray(w_dec, np.float64) @ np.asarray(readout, np.float64))[None, :]
    weight = contribution.std(0)
    cand = np.asarray(candidates, np.float64)
    r2 = np.stack([np.square(_corr(cand, codes[:, m])) for m in range(codes.shape[1])])  # [M, K]
    total = weight.sum()
    score = weight @ r2 / total if total > 0 else np.zeros(cand.shape[1])
    return score, weight


# ----------------------------------------------------------------------------------------------
# Attribution to fragments


def fragment_attribution(logit_fn: Callable[[Mapping[str, Array]], Array], inputs: Mapping[str, Any], *,
                         weights_key: str = "weights", fields: Mapping[str, tuple[str, Any]] | None = None
                         ) -> tuple[Array, dict[str, Array]]:
    """Attribution of each sample's logit to its fragments (and to input fields).

    Fragment attribution is ``w_j · ∂logit/∂w_j`` for each fragment's pooling weight ``w_j``
    (gradient × input on the set-membership weight: how much the logit moves as the fragment is
    up-weighted; with mean pooling they sum to zero within a sample). Field attribution is
    gradient × input, summed in absolute value over a field's columns and over fragments.
    Samples must be independent (the logit of sample i depends on its own inputs only). Pure
    JAX: wrap it in ``jax.jit`` / ``jax.vmap`` (e.g. over a stack of models).

    Args:
      logit_fn: ``inputs -> logits [N]``, differentiable in ``inputs[weights_key]`` (``[N, F]``).
      inputs: dict of arrays; ``weights_key`` holds the fragment weights (1 real, 0 padding).
      weights_key: the key of the fragment weights.
      fields: optional ``{field: (input key, column index or slice)}`` for field attribution.

    Returns:
      ``(fragment attribution [N, F], {field: [N] attribution mass})``.

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda b: (b["weights"] * b["x"]).sum(-1) / b["weights"].sum(-1)   # mean of x
      >>> attr, _ = fragment_attribution(fn, {"x": jnp.array([[1.0, 3.0, 0.0]]), "weights": jnp.array([[1.0, 1.0, 0.0]])})
      >>> (attr + 0.0).round(3).tolist()
      [[-0.5, 0.5, 0.0]]
    """
    if weights_key not in inputs:
        raise KeyError(f"fragment_attribution: inputs have no {weights_key!r} (the fragment weights); "
                       f"keys are {sorted(inputs)}.")
    arrays = {k: jnp.asarray(v) for k, v in inputs.items()}
    float_keys = [k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating)]

    def total(float_inputs):
        return jnp.sum(logit_fn({**arrays, **float_inputs}))

    grads = jax.grad(total)({k: arrays[k] for k in float_keys})
    frag = grads[weights_key] * arrays[weights_key]
    out: dict[str, Array] = {}
    for name, (key, cols) in (fields or {}).items():
        gx = (grads[key] * arrays[key])[..., cols]
        out[name] = jnp.abs(gx).reshape(gx.shape[0], -1).sum(-1)
    return frag, out


def attribution_evidence(attribution: Any, bank: CandidateBank) -> np.ndarray:
    """Attribution line: ``corr(fragment attribution, per-fragment candidate value)²`` over real fragments.

    Both are centred within each sample first, so the score says which fragments *within* a
    sample push its logit, not which samples have large logits. NaN for candidates that are not
    a mean over fragments (depth, sd, periodicity, diversity).

    >>> bank = CandidateBank(("a",), ("x",), np.zeros((1, 1)), np.array([[[1.0], [0.0], [1.0]]]), np.ones((1, 3), bool))
    >>> attribution_evidence(np.array([[0.4, -0.8, 0.4]]), bank).round(3).tolist()
    [1.0]
    """
    if bank.fragment_values is None:
        raise ValueError("attribution_evidence: the bank has no fragment values; build it with with_fragments=True.")
    mask = bank.mask
    n_frag = np.maximum(mask.sum(1, keepdims=True), 1)
    a = np.where(mask, np.asarray(attribution, np.float64), 0.0)
    a = np.where(mask, a - a.sum(1, keepdims=True) / n_frag, 0.0)[mask]
    out = np.full(len(bank.names), np.nan)
    for k in range(len(bank.names)):
        v = bank.fragment_values[..., k].astype(np.float64)
        if np.isnan(v[mask]).any():
            continue
        v = np.where(mask, v, 0.0)
        v = np.where(mask, v - v.sum(1, keepdims=True) / n_frag, 0.0)[mask]
        out[k] = float(np.square(_corr(v[:, None], a))[0])
    return out


# ----------------------------------------------------------------------------------------------
# Ranking and significance


def label_association(values: Any, labels: Any) -> np.ndarray:
    """The model-free control: ``|AUROC(labels, candidate) - 1/2|`` of each raw candidate ``[N, K]``.

    >>> label_association(np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([0, 1])).tolist()
    [0.5, 0.0]
    """
    return np.abs(metrics_lib.column_auroc(labels, values) - 0.5)


class Ranking(NamedTuple):
    """Candidates ranked by the model's evidence, with their significance on an independent cohort.

    Attributes:
      names: candidate names, best first.
      score: ``[K]`` combined evidence (mean of the available lines, each scaled to its maximum).
      lines: ``{line: [K]}`` raw evidence per line (``probe``, ``sae``, ``attribution``; NaN where a
        line does not apply), in ranked order.
      pvalues, adjusted: ``[K]`` permutation p-values and their multiple-testing adjustment
        (NaN if no test was run).
      auroc: ``[K]`` held-out AUROC of each candidate (NaN without a test).
      significant: ``[K]`` bool, ``adjusted <= alpha``.
      correction: ``"holm"`` or ``"bh"``; alpha: the threshold.
    """

    names: tuple[str, ...]
    score: np.ndarray
    lines: dict[str, np.ndarray]
    pvalues: np.ndarray
    adjusted: np.ndarray
    auroc: np.ndarray
    significant: np.ndarray
    correction: str
    alpha: float

    def rank_of(self, name: str) -> int:
        """1-based rank of a candidate."""
        return self.names.index(name) + 1

    def table(self, top: int = 10) -> str:
        """The top rows as a markdown table."""
        head = "| rank | candidate | score | " + " | ".join(self.lines) + " | held-out AUROC | p | adjusted p |"
        rows = [head, "|" + "---|" * (6 + len(self.lines))]
        for i in range(min(top, len(self.names))):
            line_vals = " | ".join(f"{self.lines[k][i]:.3f}" for k in self.lines)
            rows.append(f"| {i + 1} | {self.names[i]} | {self.score[i]:.3f} | {line_vals} | {self.auroc[i]:.3f} | "
                        f"{self.pvalues[i]:.4f} | {self.adjusted[i]:.4f}{' *' if self.significant[i] else ''} |")
        return "\n".join(rows)


def combine_evidence(lines: Mapping[str, Any]) -> np.ndarray:
    """Mean over lines of each line's score divided by that line's maximum (NaN entries skipped).

    >>> combine_evidence({"a": np.array([1.0, 0.5]), "b": np.array([np.nan, 2.0])}).tolist()
    [1.0, 0.75]
    """
    scaled = []
    for name, v in lines.items():
        v = np.asarray(v, np.float64)
        top = np.nanmax(v) if np.isfinite(v).any() else np.nan
        scaled.append(v / top if np.isfinite(top) and top > 0 else np.where(np.isnan(v), np.nan, 0.0))
    stack = np.stack(scaled)
    counts = np.isfinite(stack).sum(0)
    return np.where(counts > 0, np.nansum(stack, 0) / np.maximum(counts, 1), 0.0)


def rank_candidates(names: Sequence[str], lines: Mapping[str, Any], *, test_labels: Any = None,
                    test_scores: Any = None, n_permutations: int = 2000, alpha: float = 0.05,
                    correction: str = "holm", seed: int = 0) -> Ranking:
    """Ranks candidates by the model's evidence and tests each on an independent cohort.

    Args:
      names: ``K`` candidate names.
      lines: ``{line: [K] evidence}`` (from :func:`probe_evidence`, :func:`sae_evidence`,
        :func:`attribution_evidence`); combined by :func:`combine_evidence`. Ties keep bank order.
      test_labels, test_scores: ``[N']`` labels and ``[N', K]`` scores (the candidates of the
        independent cohort) for :func:`idesign.metrics.permutation_pvalues`; omit both to rank without testing.
      n_permutations, seed: the permutation test.
      alpha: significance threshold after correction.
      correction: ``"holm"`` (family-wise error, default) or ``"bh"`` (false discovery rate).

    Returns:
      :class:`Ranking`.

    Example:
      >>> r = rank_candidates(["a", "b"], {"probe": np.array([0.1, 0.4])})
      >>> r.names, r.rank_of("a")
      (('b', 'a'), 2)
    """
    k = len(names)
    for line, v in lines.items():
        if np.shape(v) != (k,):
            raise ValueError(f"rank_candidates: evidence line {line!r} has shape {np.shape(v)}; expected ({k},).")
    if correction not in ("holm", "bh"):
        raise ValueError(f"rank_candidates: correction must be 'holm' or 'bh'; got {correction!r}.")
    if (test_labels is None) != (test_scores is None):
        raise ValueError("rank_candidates: pass both test_labels and test_scores, or neither.")
    score = combine_evidence(lines)
    order = np.lexsort((np.arange(k), -score))
    if test_labels is not None:
        p, auroc = metrics_lib.permutation_pvalues(test_labels, test_scores, n_permutations=n_permutations, seed=seed)
        adjusted = metrics_lib.holm(p) if correction == "holm" else metrics_lib.benjamini_hochberg(p)
    else:
        p = adjusted = auroc = np.full(k, np.nan)
    return Ranking(names=tuple(names[i] for i in order), score=score[order],
                   lines={n: np.asarray(v, np.float64)[order] for n, v in lines.items()},
                   pvalues=p[order], adjusted=adjusted[order], auroc=auroc[order],
                   significant=adjusted[order] <= alpha, correction=correction, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Distillation


class Distilled(NamedTuple):
    """A classifier on a few human-readable statistics.

    Attributes:
      names: the statistics used.
      probe: the fitted :class:`idesign.probes.LogisticProbe` (standardisation included).
      auroc: AUROC on the evaluation cohort.
    """

    names: tuple[str, ...]
    probe: probes_lib.LogisticProbe
    auroc: float


def distill(names: Sequence[str], train_values: Any, train_labels: Any, test_values: Any, test_labels: Any, *,
            C: float = 1.0) -> Distilled:
    """Fits a logistic classifier on the chosen statistics and scores it on another cohort.

    Args:
      names: the statistics (columns of ``*_values``).
      train_values, test_values: ``[N, k]`` statistics of the discovery and evaluation cohorts.
      train_labels, test_labels: ``[N]`` binary labels.
      C: inverse L2 strength (scikit-learn's meaning; inputs are standardised).

    Returns:
      :class:`Distilled`.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> y = np.array([0, 1] * 100)
      >>> x = (y + rng.normal(size=200))[:, None]
      >>> d = distill(["x"], x[:100], y[:100], x[100:], y[100:])
      >>> bool(0.7 < d.auroc < 0.9)
      True
    """
    xtr = np.asarray(train_values, np.float32).reshape(len(train_labels), -1)
    xte = np.asarray(test_values, np.float32).reshape(len(test_labels), -1)
    if xtr.shape[1] != len(names) or xte.shape[1] != len(names):
        raise ValueError(f"distill: {len(names)} names but values with {xtr.shape[1]} and {xte.shape[1]} columns.")
    probe = probes_lib.fit_logistic(xtr, np.asarray(train_labels, np.int32), C=C)
    auroc = metrics_lib.roc_auc(np.asarray(test_labels), np.asarray(probes_lib.score(probe, xte)))
    return Distilled(tuple(names), probe, float(auroc))


def sae_codes(params: sae_lib.SAEParams, acts: Any, k: int) -> np.ndarray:
    """SAE codes of activations as a float64 numpy array ``[N, M]`` (for the evidence functions).

    >>> import jax.numpy as jnp
    >>> p = sae_lib.SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2))
    >>> sae_codes(p, np.array([[1.0, 2.0]]), k=1).tolist()
    [[0.0, 2.0]]
    """
    return np.asarray(sae_lib.encode(params, jnp.asarray(acts, jnp.float32), k), np.float64)


# ----------------------------------------------------------------------------------------------
# The whole workflow for one model


class Discovery(NamedTuple):
    """Everything :func:`discover` found, for inspection.

    Attributes:
      ranking: the :class:`Ranking` (with held-out p-values).
      probes: the :class:`idesign.probes.RidgeFit` on the discovery embeddings.
      sae_params: the SAE trained on the discovery embeddings.
      readout: ``[E]`` the logit's direction in embedding space.
      attribution: ``[N, F]`` fragment attribution on the discovery samples.
      field_attribution: ``{field: [N]}`` attribution mass per input field.
      heldout_decoded: ``[N', K]`` the candidates as the probes decode them from the held-out embeddings.
    """

    ranking: Ranking
    probes: probes_lib.RidgeFit
    sae_params: sae_lib.SAEParams
    readout: np.ndarray
    attribution: np.ndarray
    field_attribution: dict[str, np.ndarray]
    heldout_decoded: np.ndarray


@functools.partial(jax.jit, static_argnames=("model_fn", "fields"))
def _attribute(model_fn, params, inputs, fields):
    # Static arguments must hash; slices do not (before Python 3.12), so they travel as triples.
    unpacked = {name: (key, slice(*cols) if isinstance(cols, tuple) else cols) for name, key, cols in fields}
    return fragment_attribution(lambda x: model_fn(params, x)[0], inputs, fields=unpacked)


def _hashable_fields(fields: Mapping[str, tuple[str, Any]] | None) -> tuple:
    pack = lambda c: (c.start, c.stop, c.step) if isinstance(c, slice) else c
    return tuple((name, key, pack(cols)) for name, (key, cols) in sorted((fields or {}).items()))


def discover(model_fn: Callable[[Any, Mapping[str, Array]], tuple[Array, Array]], params: Any,
             discovery_inputs: Mapping[str, Any],
             discovery_bank: CandidateBank, heldout_inputs: Mapping[str, Any], heldout_bank: CandidateBank,
             heldout_labels: Any, *, sae_config: sae_lib.SAEConfig | None = None,
             fields: Mapping[str, tuple[str, Any]] | None = None, n_permutations: int = 2000, alpha: float = 0.05,
             correction: str = "holm", seed: int = 0) -> Discovery:
    """Opens a trained model and ranks candidate biomarkers: probes, SAE features, attribution, tests.

    The labels of the discovery samples are never used: every evidence line reads the model
    (its embedding, its logit, its gradients). Only the held-out cohort's labels enter, in the
    permutation test of each candidate on that cohort.

    Args:
      model_fn: ``(params, inputs) -> (logit [N], embedding [N, E])``, differentiable in
        ``inputs["weights"]`` (the fragment weights). Pass the same function for several models
        (only ``params`` changing) and its compilations are reused.
      params: the trained parameters.
      discovery_inputs: model inputs of the discovery samples (held out from training).
      discovery_bank: their candidates, with ``fragment_values``.
      heldout_inputs, heldout_bank, heldout_labels: the independent cohort (bank with the same
        columns); its embeddings are decoded by the probes for inspection (``heldout_decoded``).
      sae_config: the SAE on the embeddings (default: ``4 x E`` features, ``k = 4``, 500 steps).
      fields: input fields for field attribution (see :func:`fragment_attribution`).
      n_permutations, alpha, correction, seed: the significance test (:func:`rank_candidates`).

    Returns:
      :class:`Discovery`.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from idesign import discovery, sae
      >>> rng = np.random.default_rng(0)
      >>> def cohort(n):   # sets of 16 elements with a value x (larger in cases) and an unrelated z
      ...     y = np.arange(n) % 2
      ...     x, z = rng.normal(size=(n, 16)) + 0.8 * y[:, None], rng.normal(size=(n, 16))
      ...     bank = discovery.CandidateBank(("x_mean", "z_mean"), ("x", "z"), np.stack([x.mean(1), z.mean(1)], 1),
      ...                                    np.stack([x, z], -1).astype(np.float32), np.ones((n, 16), bool))
      ...     return {"x": x.astype(np.float32), "z": z.astype(np.float32), "weights": np.ones((n, 16), np.float32)}, bank, y
      >>> def model_fn(params, inputs):   # a hand-made "model" whose logit is the mean of x
      ...     mean = lambda v: (inputs["weights"] * v).sum(-1) / inputs["weights"].sum(-1)
      ...     return params * mean(inputs["x"]), jnp.stack([mean(inputs["x"]), mean(inputs["z"])], -1)
      >>> (inputs_a, bank_a, _), (inputs_b, bank_b, y_b) = cohort(60), cohort(60)
      >>> found = discovery.discover(model_fn, 1.0, inputs_a, bank_a, inputs_b, bank_b, y_b, n_permutations=199,
      ...                            sae_config=sae.SAEConfig(n_features=4, k=1, steps=20, batch_size=32))
      >>> found.ranking.names[0], found.ranking.significant.tolist()
      ('x_mean', [True, False])
    """
    d_inputs = {k: jnp.asarray(v) for k, v in discovery_inputs.items()}
    h_inputs = {k: jnp.asarray(v) for k, v in heldout_inputs.items()}
    if heldout_bank.names != discovery_bank.names:
        raise ValueError("discover: the held-out bank's candidates differ from the discovery bank's; build it with "
                         "the discovery bank's motif list.")
    forward = jax.jit(model_fn)
    logit, emb = (np.asarray(a, np.float64) for a in forward(params, d_inputs))
    _, emb_h = forward(params, h_inputs)
    fit = probes_lib.fit_ridge(emb, discovery_bank.values, seed=seed)
    readout, _ = readout_direction(emb, logit)
    config = sae_config or sae_lib.SAEConfig(n_features=4 * emb.shape[1], k=min(4, 4 * emb.shape[1]), steps=500,
                                              batch_size=min(256, emb.shape[0]))
    sae_params, _ = sae_lib.train_sae(emb.astype(np.float32), config, seed=seed)
    sae_score, _ = sae_evidence(sae_codes(sae_params, emb, config.k), sae_params.w_dec, readout, discovery_bank.values)
    attr, field_attr = _attribute(model_fn, params, d_inputs, _hashable_fields(fields))
    lines = {"probe": probe_evidence(fit, logit), "sae": sae_score,
             "attribution": attribution_evidence(np.asarray(attr), discovery_bank)}
    ranking = rank_candidates(discovery_bank.names, lines, test_labels=heldout_labels,
                              test_scores=heldout_bank.values, n_permutations=n_permutations,
                              alpha=alpha, correction=correction, seed=seed)
    return Discovery(ranking, fit, sae_params, readout, np.asarray(attr),
                     {k: np.asarray(v) for k, v in field_attr.items()}, probes_lib.predict_ridge(fit.probe, emb_h))
