"""Probes: idesign's observation system. Token-, span- and sequence-level probes on activations.

Every probe is a NamedTuple pytree of arrays scored by one pure function,
``score(probe, acts, mask=None) -> logits`` (jit- and vmap-compatible), with a fit function:

=========================  =====================================  ===========================================
family                     fit                                    how
=========================  =====================================  ===========================================
:class:`LogisticProbe`     :func:`fit_logistic`                   L2 logistic, full-batch preconditioned
                                                                  L-BFGS; ``C`` as scikit-learn; CV
:class:`SoftmaxProbe`      :func:`fit_softmax`                    multinomial, same solver
(stacks of the above)      :func:`fit_many`                       layers x targets in one vmapped call
:class:`MassMeanProbe`     :func:`class_means_init`,              class means (and shared covariance)
                           :func:`class_means_update`,            streamed over any number of tokens;
                           :func:`class_means_finalize`,          mass-mean or LDA direction
                           :func:`fit_mass_mean`
token probe, span-max      :func:`fit_span_probe`                 Obeso et al. span-max loss, minibatch Adam;
(a :class:`LogisticProbe`)                                        entity score = :func:`span_scores`
:class:`AttentionProbe`    :func:`fit_attention_probe`            learned query per head, pooled, linear
                                                                  readout; minibatch AdamW
:class:`RidgeProbe`        :func:`fit_ridge`                      ridge regression for continuous targets,
                                                                  closed form, cross-validated R²
=========================  =====================================  ===========================================

A layer sweep is one call: :func:`sweep` fits a probe per site on training rows and returns a
:class:`SweepTable` of held-out AUC (with a bootstrap interval) and accuracy, with :func:`plot_sweep`;
:func:`grouped_split` keeps every group (entity, document) on one side of the split.

Probes carry their input standardisation, so :func:`save_probe` / :func:`load_probe` round-trip
a self-contained probe with its site, layer and config. Inputs are checked: mismatched lengths,
a single class, NaN/inf activations (with their rows) and wrong shapes raise errors that say so.

Example:
  >>> import numpy as np
  >>> from idesign import probes
  >>> rng = np.random.default_rng(0)
  >>> acts = rng.normal(size=(300, 8)).astype(np.float32)
  >>> labels = (acts @ rng.normal(size=8) > 0).astype(np.int32)
  >>> probe = probes.fit_logistic(acts, labels, C=0.1)
  >>> float((probes.predict_proba(probe, acts).round() == labels).mean()) > 0.9
  True
"""

from idesign.probes._attention import (AttentionProbe, attention_logits, attention_weights, fit_attention_probe,
                                       init_attention_probe)
from idesign.probes._io import load_probe, save_probe
from idesign.probes._linear import (DEFAULT_CS, FitInfo, LogisticProbe, SoftmaxProbe, as_affine, fit_logistic,
                                    fit_many, fit_softmax, stratified_folds)
from idesign.probes._mass_mean import (ClassMeansState, MassMeanProbe, class_means_finalize, class_means_init,
                                       class_means_update, fit_mass_mean)
from idesign.probes._ridge import RidgeFit, RidgeProbe, fit_ridge, predict_ridge
from idesign.probes._scoring import predict_proba, score
from idesign.probes._span import (READINGS, fit_span_probe, omega_schedule, read_span, read_span_ids, span_masks,
                                  span_max_logits, span_max_loss,
                                  span_scores, token_targets)
from idesign.probes._sweep import SweepTable, grouped_split, plot_sweep, sweep

__all__ = [
    "DEFAULT_CS",
    "READINGS",
    "AttentionProbe",
    "ClassMeansState",
    "FitInfo",
    "LogisticProbe",
    "MassMeanProbe",
    "RidgeFit",
    "RidgeProbe",
    "SoftmaxProbe",
    "SweepTable",
    "as_affine",
    "attention_logits",
    "attention_weights",
    "class_means_finalize",
    "class_means_init",
    "class_means_update",
    "fit_attention_probe",
    "fit_logistic",
    "fit_many",
    "fit_mass_mean",
    "fit_ridge",
    "fit_softmax",
    "fit_span_probe",
    "grouped_split",
    "init_attention_probe",
    "load_probe",
    "omega_schedule",
    "plot_sweep",
    "predict_proba",
    "predict_ridge",
    "read_span",
    "read_span_ids",
    "save_probe",
    "score",
    "span_masks",
    "span_max_logits",
    "span_max_loss",
    "span_scores",
    "stratified_folds",
    "sweep",
    "token_targets",
]
