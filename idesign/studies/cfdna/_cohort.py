"""Synthetic cell-free-DNA cohorts with a planted biomarker.

Each sample is a *set* of cfDNA fragments (padded to ``max_fragments`` with a mask). A fragment has

- a **length** in bp, drawn from a mixture: a mono-nucleosomal peak near 167 bp, a
  sub-nucleosomal component with peaks every 10 bp below it (147, 137, ..., 77: the ~10 bp
  periodicity of DNA wrapped on a histone) and a small di-nucleosomal peak near 334 bp;
- a 4-mer **end motif** (one of 256), from a profile dominated by C-rich motifs (``CCCA`` ...);
- a CpG **methylation** fraction and a **GC content**, each around the sample's own mean.

Sample-level parameters vary from sample to sample; the disease label shifts exactly one of them,
the *planted property*, by ``effect`` (in that property's own units):

==================  =============================================================================
``planted``         the sample-level parameter that cases shift by ``effect``
==================  =============================================================================
``short_fraction``  weight of the sub-nucleosomal component (default)
``motif:XXXX``      probability of end motif ``XXXX`` (the other motifs shrink proportionally)
``methylation``     mean CpG methylation
``gc``              mean GC content
==================  =============================================================================

Confounders and nuisances: a **batch** effect on GC content (and, with ``batch_label_skew``,
batches unevenly split between cases and controls, so GC is associated with the label inside a
cohort without being a biomarker), an **age**-linked methylation drift independent of the label,
and varying **sequencing depth** (fragments per sample, log-uniform). :func:`heldout_config` gives
the independent validation cohort: a new batch, lower depth, no batch–label skew. ``effect=0`` is
the null setting (:func:`null_config`).

Example:
  >>> from idesign.studies import cfdna
  >>> cohort = cfdna.make_cohort(cfdna.CohortConfig(n_samples=40, min_fragments=16, max_fragments=64), seed=0)
  >>> cohort.lengths.shape, cohort.mask.dtype.name, sorted(set(cohort.label.tolist()))
  ((40, 64), 'bool', [0, 1])
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import numpy as np

BASES = "ACGT"
MOTIFS: tuple[str, ...] = tuple("".join(m) for m in itertools.product(BASES, repeat=4))
MOTIF_INDEX = {m: i for i, m in enumerate(MOTIFS)}
# End motifs that dominate real plasma cfDNA (C-rich, from nuclease preferences); their shares here
# are invented, only the shape of the profile (a few dominant motifs, a long tail) matters.
DOMINANT_MOTIFS: tuple[str, ...] = ("CCCA", "CCAG", "CCTG", "CCAA", "CCCT", "CCAT", "CCTT", "CAAA",
                                    "TGGG", "CTGG", "AAAA", "TTTT")
SUB_NUCLEOSOMAL_PEAKS: tuple[float, ...] = tuple(167.0 - 10.0 * k for k in range(2, 10))  # 147 ... 77 bp
PLANTED_CHOICES = ("short_fraction", "methylation", "gc", "motif:XXXX")


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """Parameters of a synthetic cohort (all defaults are the planted short-fragment setting).

    Attributes:
      n_samples: samples in the cohort.
      case_fraction: expected share of cases (label 1).
      min_fragments, max_fragments: depth range (log-uniform); arrays are padded to ``max_fragments``.
      planted: the property the label shifts (module table); ``effect`` its shift in cases.
      short_fraction, short_fraction_sd: mean and between-sample sd of the sub-nucleosomal weight.
      di_fraction: weight of the di-nucleosomal peak.
      mono_peak, mono_sd: the mono-nucleosomal peak (bp).
      sub_peak_sd: width of each sub-nucleosomal peak (bp); sub_peak_decay: geometric weight decay
        from the 147 bp peak down.
      motif_concentration: Dirichlet concentration of a sample's motif profile around the population
        profile (larger: samples vary less).
      methylation_mean, methylation_sd, age_drift: mean methylation is ``methylation_mean +
        age_drift * (age - 60)`` plus between-sample noise; ages are uniform on ``age_range``.
      gc_mean, gc_sd: mean GC content and its between-sample sd.
      batches: batch ids present in this cohort; batch ``b`` shifts GC by ``b * batch_gc_shift``.
      batch_label_skew: ``P(last batch | case) - P(last batch | control)`` (0: no confounding).
      fragment_methylation_concentration, fragment_gc_concentration: Beta concentrations of a
        fragment's value around its sample's mean.
    """

    n_samples: int = 400
    case_fraction: float = 0.5
    min_fragments: int = 64
    max_fragments: int = 192
    planted: str = "short_fraction"
    effect: float = 0.08
    short_fraction: float = 0.22
    short_fraction_sd: float = 0.03
    di_fraction: float = 0.03
    mono_peak: float = 167.0
    mono_sd: float = 7.0
    sub_peak_sd: float = 2.5
    sub_peak_decay: float = 0.75
    motif_concentration: float = 3000.0
    methylation_mean: float = 0.70
    methylation_sd: float = 0.02
    age_drift: float = -0.003
    age_range: tuple[float, float] = (40.0, 80.0)
    gc_mean: float = 0.42
    gc_sd: float = 0.01
    batches: tuple[int, ...] = (0, 1)
    batch_gc_shift: float = 0.01
    batch_label_skew: float = 0.2
    fragment_methylation_concentration: float = 20.0
    fragment_gc_concentration: float = 60.0


class Cohort(NamedTuple):
    """A cohort as numpy arrays; fragment arrays are ``[N, F]`` with ``mask`` marking real fragments.

    Attributes:
      lengths: ``[N, F]`` int32 fragment lengths (bp; 0 where masked).
      motifs: ``[N, F]`` int32 end-motif ids (index into :data:`MOTIFS`).
      methylation: ``[N, F]`` float32 CpG methylation fraction.
      gc: ``[N, F]`` float32 GC content.
      mask: ``[N, F]`` bool, True for real fragments (a prefix of each row).
      label: ``[N]`` int32 disease label.
      batch: ``[N]`` int32 batch id.
      age: ``[N]`` float32 age in years.
      depth: ``[N]`` int32 fragments per sample.
      planted_value: ``[N]`` float32 the sample-level parameter the label shifts (the truth).
    """

    lengths: np.ndarray
    motifs: np.ndarray
    methylation: np.ndarray
    gc: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    batch: np.ndarray
    age: np.ndarray
    depth: np.ndarray
    planted_value: np.ndarray


def null_config(config: CohortConfig) -> CohortConfig:
    """The same cohort with no planted effect (``effect=0``): the null setting.

    >>> null_config(CohortConfig()).effect
    0.0
    """
    return dataclasses.replace(config, effect=0.0)


def heldout_config(config: CohortConfig, *, n_samples: int | None = None) -> CohortConfig:
    """The independent validation cohort: a new batch, lower depth, no batch–label skew.

    >>> h = heldout_config(CohortConfig(max_fragments=192))
    >>> h.batches, h.batch_label_skew, h.max_fragments
    ((2,), 0.0, 96)
    """
    return dataclasses.replace(config, n_samples=n_samples or config.n_samples // 2, batches=(max(config.batches) + 1,),
                               batch_label_skew=0.0, min_fragments=max(8, config.min_fragments // 2),
                               max_fragments=max(16, config.max_fragments // 2))


def motif_profile() -> np.ndarray:
    """The population end-motif distribution ``[256]`` (fixed: a property of the biology, not a seed).

    >>> p = motif_profile()
    >>> p.shape, bool(abs(p.sum() - 1) < 1e-9), MOTIFS[int(p.argmax())]
    ((256,), True, 'CCCA')
    """
    rng = np.random.default_rng(20260101)
    tail = rng.gamma(2.0, 1.0, len(MOTIFS))
    p = 0.75 * tail / tail.sum()
    dominant = 0.8 ** np.arange(len(DOMINANT_MOTIFS))
    for motif, w in zip(DOMINANT_MOTIFS, 0.25 * dominant / dominant.sum()):
        p[MOTIF_INDEX[motif]] += w
    return p / p.sum()


def _check_config(config: CohortConfig) -> None:
    planted = config.planted
    if planted.startswith("motif:"):
        if planted[6:] not in MOTIF_INDEX:
            raise ValueError(f"CohortConfig.planted={planted!r}: the motif must be a 4-mer over ACGT, e.g. 'motif:CCCA'.")
    elif planted not in PLANTED_CHOICES:
        raise ValueError(f"CohortConfig.planted={planted!r}: expected one of {PLANTED_CHOICES} "
                         "(motif:XXXX with a 4-mer).")
    if not 0 < config.min_fragments <= config.max_fragments:
        raise ValueError(f"CohortConfig: need 0 < min_fragments <= max_fragments; got {config.min_fragments}, "
                         f"{config.max_fragments}.")
    if config.n_samples < 2 or not 0 < config.case_fraction < 1:
        raise ValueError(f"CohortConfig: need n_samples >= 2 and 0 < case_fraction < 1; got {config.n_samples}, "
                         f"{config.case_fraction}.")
    if not config.batches:
        raise ValueError("CohortConfig.batches: at least one batch id.")


def _beta(rng: np.random.Generator, mean: np.ndarray, concentration: float, size) -> np.ndarray:
    mean = np.clip(mean, 1e-3, 1 - 1e-3)
    return rng.beta(mean * concentration, (1 - mean) * concentration, size)


def make_cohort(config: CohortConfig, seed: int) -> Cohort:
    """Draws a cohort; deterministic in ``(config, seed)``.

    Args:
      config: the cohort's parameters.
      seed: seeds everything (labels, sample parameters, fragments).

    Returns:
      A :class:`Cohort`.

    Raises:
      ValueError: an unknown ``planted`` property or inconsistent sizes.

    Example:
      >>> from idesign.studies import cfdna
      >>> c = cfdna.make_cohort(cfdna.CohortConfig(n_samples=200, min_fragments=16, max_fragments=32, effect=0.1), seed=1)
      >>> shift = c.planted_value[c.label == 1].mean() - c.planted_value[c.label == 0].mean()
      >>> bool(abs(shift - 0.1) < 0.02)
      True
    """
    _check_config(config)
    rng = np.random.default_rng([seed, 0xCFD])
    n, f = config.n_samples, config.max_fragments
    label = (rng.random(n) < config.case_fraction).astype(np.int32)
    label[:2] = (0, 1)  # both classes, always
    shift = config.effect * label

    # Batches: uniform, except the last batch is over-represented among cases by the skew.
    batches = np.asarray(config.batches)
    p_last = np.full(n, 1.0 / len(batches)) if len(batches) > 1 else np.ones(n)
    if len(batches) > 1:
        p_last = p_last + config.batch_label_skew * (label - 0.5)
    last = rng.random(n) < p_last
    others = batches[:-1] if len(batches) > 1 else batches
    batch = np.where(last, batches[-1], rng.choice(others, n)).astype(np.int32)
    age = rng.uniform(*config.age_range, n).astype(np.float32)
    depth = np.round(np.exp(rng.uniform(np.log(config.min_fragments), np.log(config.max_fragments + 0.5), n)))
    depth = np.clip(depth, config.min_fragments, config.max_fragments).astype(np.int32)

    planted = config.planted
    short = config.short_fraction + config.short_fraction_sd * rng.normal(size=n)
    short = np.clip(short + (shift if planted == "short_fraction" else 0.0), 0.0, 1.0 - config.di_fraction)
    meth = config.methylation_mean + config.age_drift * (age - 60.0) + config.methylation_sd * rng.normal(size=n)
    meth = meth + (shift if planted == "methylation" else 0.0)
    gc = config.gc_mean + config.batch_gc_shift * batch + config.gc_sd * rng.normal(size=n)
    gc = gc + (shift if planted == "gc" else 0.0)
    profile = motif_profile()
    motif_p = rng.dirichlet(config.motif_concentration * profile, n)
    if planted.startswith("motif:"):
        m = MOTIF_INDEX[planted[6:]]
        target = np.clip(motif_p[:, m] + shift, 0.0, 1.0)
        rest = 1.0 - motif_p[:, m]
        motif_p = motif_p * ((1.0 - target) / np.where(rest > 0, rest, 1.0))[:, None]
        motif_p[:, m] = target
    values = {"short_fraction": short, "methylation": meth, "gc": gc}
    planted_value = motif_p[:, MOTIF_INDEX[planted[6:]]] if planted.startswith("motif:") else values[planted]

    # Fragments: component per fragment, then its length.
    u = rng.random((n, f))
    is_short = u < short[:, None]
    is_di = (u >= short[:, None]) & (u < short[:, None] + config.di_fraction)
    peak_w = config.sub_peak_decay ** np.arange(len(SUB_NUCLEOSOMAL_PEAKS))
    peaks = np.asarray(SUB_NUCLEOSOMAL_PEAKS)[rng.choice(len(peak_w), (n, f), p=peak_w / peak_w.sum())]
    length = np.where(is_short, peaks + config.sub_peak_sd * rng.normal(size=(n, f)),
                      np.where(is_di, 2 * config.mono_peak + 12.0 * rng.normal(size=(n, f)),
                               config.mono_peak + config.mono_sd * rng.normal(size=(n, f))))
    length = np.clip(np.round(length), 40, 450).astype(np.int32)
    cdf = np.cumsum(motif_p, axis=1)
    motifs = np.minimum((rng.random((n, f, 1)) > cdf[:, None, :]).sum(-1), len(MOTIFS) - 1).astype(np.int32)
    frag_meth = _beta(rng, meth[:, None], config.fragment_methylation_concentration, (n, f)).astype(np.float32)
    frag_gc = _beta(rng, gc[:, None], config.fragment_gc_concentration, (n, f)).astype(np.float32)

    mask = np.arange(f)[None, :] < depth[:, None]
    return Cohort(lengths=np.where(mask, length, 0).astype(np.int32), motifs=np.where(mask, motifs, 0).astype(np.int32),
                  methylation=np.where(mask, frag_meth, 0).astype(np.float32),
                  gc=np.where(mask, frag_gc, 0).astype(np.float32), mask=mask, label=label, batch=batch, age=age,
                  depth=depth, planted_value=planted_value.astype(np.float32))


def pad_fragments(cohort: Cohort, max_fragments: int) -> Cohort:
    """Pads (or keeps) the fragment axis to ``max_fragments``, so cohorts of different depth stack.

    >>> c = make_cohort(CohortConfig(n_samples=4, min_fragments=8, max_fragments=16), seed=0)
    >>> pad_fragments(c, 32).lengths.shape
    (4, 32)
    """
    f = cohort.lengths.shape[1]
    if max_fragments < f:
        raise ValueError(f"pad_fragments: max_fragments={max_fragments} is below the cohort's {f} fragments.")
    pad = lambda a: np.pad(a, ((0, 0), (0, max_fragments - f)))
    return cohort._replace(lengths=pad(cohort.lengths), motifs=pad(cohort.motifs), methylation=pad(cohort.methylation),
                           gc=pad(cohort.gc), mask=pad(cohort.mask))
