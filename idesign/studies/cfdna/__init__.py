"""The cfDNA biomarker study (``experiments/biomarkers.py``, ``colab/biomarkers.ipynb``): synthetic
cell-free-DNA cohorts with a planted biomarker, a fragment-set model, and the bank of candidate statistics
that :mod:`idesign.discovery` ranks.

- ``_cohort``: :func:`make_cohort` (cohort simulation), :func:`heldout_config`, :func:`null_config`,
  :func:`pad_fragments`;
- ``_model``: :func:`featurize` (fragment features) and :class:`FragmentSetModel` (deep sets / attention pooling);
- ``_candidates``: :func:`candidate_bank` (a :class:`idesign.discovery.CandidateBank`), :func:`planted_candidate`.

Not imported by ``import idesign``: ``from idesign.studies import cfdna``.

Example:
  >>> from idesign.studies import cfdna
  >>> config = cfdna.CohortConfig(n_samples=20, min_fragments=16, max_fragments=32)
  >>> bank = cfdna.candidate_bank(cfdna.make_cohort(config, seed=0), n_motifs=2)
  >>> cfdna.planted_candidate(config.planted) in bank.names
  True
"""

from idesign.studies.cfdna._candidates import (LENGTH_BIN_EDGES, PLANTED_CANDIDATE, SHORT_THRESHOLD, candidate_bank,
                                               planted_candidate, top_motifs)
from idesign.studies.cfdna._cohort import (BASES, DOMINANT_MOTIFS, MOTIF_INDEX, MOTIFS, PLANTED_CHOICES,
                                           SUB_NUCLEOSOMAL_PEAKS, Cohort, CohortConfig, heldout_config, make_cohort,
                                           motif_profile, null_config, pad_fragments)
from idesign.studies.cfdna._model import FIELD_COLUMNS, LENGTH_PERIODS, N_CONTINUOUS, FragmentSetModel, featurize

__all__ = [
    "BASES",
    "DOMINANT_MOTIFS",
    "FIELD_COLUMNS",
    "LENGTH_BIN_EDGES",
    "LENGTH_PERIODS",
    "MOTIFS",
    "MOTIF_INDEX",
    "N_CONTINUOUS",
    "PLANTED_CANDIDATE",
    "PLANTED_CHOICES",
    "SHORT_THRESHOLD",
    "SUB_NUCLEOSOMAL_PEAKS",
    "Cohort",
    "CohortConfig",
    "FragmentSetModel",
    "candidate_bank",
    "featurize",
    "heldout_config",
    "make_cohort",
    "motif_profile",
    "null_config",
    "pad_fragments",
    "planted_candidate",
    "top_motifs",
]
