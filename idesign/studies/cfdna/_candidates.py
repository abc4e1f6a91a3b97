"""The bank of interpretable candidate statistics of a cfDNA cohort (fragment lengths, end motifs,
methylation, GC, depth), as a :class:`idesign.discovery.CandidateBank`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from idesign.discovery import CandidateBank
from idesign.studies.cfdna._cohort import MOTIF_INDEX, MOTIFS

LENGTH_BIN_EDGES: tuple[int, ...] = (40, 80, 100, 120, 140, 160, 180, 200, 260, 451)
SHORT_THRESHOLD = 150
# The candidate that measures each planted property of a cohort.
PLANTED_CANDIDATE = {"short_fraction": "short_fraction", "methylation": "methylation_mean", "gc": "gc_mean"}


def planted_candidate(planted: str) -> str:
    """The name of the bank's candidate that measures a cohort's planted property.

    >>> planted_candidate("short_fraction"), planted_candidate("motif:CCCA")
    ('short_fraction', 'motif:CCCA')
    """
    if planted.startswith("motif:"):
        return planted
    if planted not in PLANTED_CANDIDATE:
        raise ValueError(f"planted_candidate: unknown planted property {planted!r}; expected one of "
                         f"{sorted(PLANTED_CANDIDATE)} or 'motif:XXXX'.")
    return PLANTED_CANDIDATE[planted]


# ----------------------------------------------------------------------------------------------
# Candidate statistics


def top_motifs(motifs: np.ndarray, mask: np.ndarray, n: int = 12) -> tuple[str, ...]:
    """The ``n`` end motifs most frequent over all real fragments (ties by motif id).

    >>> top_motifs(np.array([[5, 5, 7, 0]]), np.array([[True, True, True, False]]), n=2)
    ('AACC', 'AACT')
    """
    counts = np.bincount(np.asarray(motifs)[np.asarray(mask)], minlength=len(MOTIFS))
    order = np.lexsort((np.arange(len(counts)), -counts))[:n]
    return tuple(MOTIFS[i] for i in order)


def candidate_bank(cohort: Any, *, motifs: Sequence[str] | None = None, n_motifs: int = 12,
                     with_fragments: bool = False) -> CandidateBank:
    """The candidate bank for a cfDNA cohort (:class:`Cohort`).

    Candidates: the length histogram over :data:`LENGTH_BIN_EDGES` (``length[a,b)``), the
    short-fragment fraction (``< 150 bp``), mean, median and sd of length, the amplitude of the
    10 bp periodicity among 90–160 bp fragments, the frequencies of ``motifs`` (default: the
    ``n_motifs`` most frequent in this cohort — pass the discovery cohort's list when building the
    bank of another cohort, so the columns match), motif diversity (normalised Shannon entropy of
    the sample's 256 motif counts), mean methylation, mean GC and log depth.

    Args:
      cohort: a :class:`Cohort`.
      motifs: end motifs to count; n_motifs: how many to take when ``motifs`` is None.
      with_fragments: also return the per-fragment values (``fragment_values``).

    Returns:
      A :class:`CandidateBank`.

    Example:
      >>> from idesign.studies import cfdna
      >>> c = cfdna.make_cohort(cfdna.CohortConfig(n_samples=20, min_fragments=32, max_fragments=64), seed=0)
      >>> bank = cfdna.candidate_bank(c, n_motifs=4)
      >>> bank.values.shape, bank.names[9], bank.names[-1]
      ((20, 22), 'short_fraction', 'log_depth')
    """
    mask = np.asarray(cohort.mask, bool)
    n_frag = np.maximum(mask.sum(1), 1)
    length = np.asarray(cohort.lengths, np.float64)
    motif_ids = np.asarray(cohort.motifs)
    if motifs is None:
        motifs = top_motifs(motif_ids, mask, n_motifs)
    unknown = [m for m in motifs if m not in MOTIF_INDEX]
    if unknown:
        raise ValueError(f"candidate_bank: unknown motifs {unknown}; expected 4-mers over ACGT.")

    names: list[str] = []
    families: list[str] = []
    values: list[np.ndarray] = []
    fragments: list[np.ndarray | None] = []

    def add(name: str, family: str, value: np.ndarray, per_fragment: np.ndarray | None = None) -> None:
        names.append(name)
        families.append(family)
        values.append(value.astype(np.float64))
        fragments.append(per_fragment)

    def mean_of(per_fragment: np.ndarray) -> np.ndarray:
        return np.where(mask, per_fragment, 0.0).sum(1) / n_frag

    edges = LENGTH_BIN_EDGES
    for lo, hi in zip(edges[:-1], edges[1:]):
        ind = ((length >= lo) & (length < hi)).astype(np.float64)
        add(f"length[{lo},{hi})", "length", mean_of(ind), ind)
    short = (length < SHORT_THRESHOLD).astype(np.float64)
    add("short_fraction", "length", mean_of(short), short)
    add("mean_length", "length", mean_of(length), length)
    masked = np.where(mask, length, np.nan)
    add("median_length", "length", np.nan_to_num(np.nanmedian(masked, axis=1)))
    add("length_sd", "length", np.nan_to_num(np.nanstd(masked, axis=1)))
    window = mask & (length >= 90) & (length < 160)
    phase = np.exp(2j * np.pi * length / 10.0)
    add("periodicity_10bp", "length", np.abs(np.where(window, phase, 0).sum(1)) / np.maximum(window.sum(1), 1))

    for m in motifs:
        ind = (motif_ids == MOTIF_INDEX[m]).astype(np.float64)
        add(f"motif:{m}", "motif", mean_of(ind), ind)
    counts = np.zeros((mask.shape[0], len(MOTIFS)))
    np.add.at(counts, (np.repeat(np.arange(mask.shape[0]), mask.sum(1)), motif_ids[mask]), 1.0)
    freq = counts / n_frag[:, None]
    entropy = -np.sum(np.where(freq > 0, freq * np.log(np.where(freq > 0, freq, 1.0)), 0.0), 1)
    add("motif_diversity", "motif", entropy / np.log(len(MOTIFS)))
    meth = np.asarray(cohort.methylation, np.float64)
    add("methylation_mean", "methylation", mean_of(meth), meth)
    gc = np.asarray(cohort.gc, np.float64)
    add("gc_mean", "gc", mean_of(gc), gc)
    add("log_depth", "depth", np.log(n_frag.astype(np.float64)))

    frag = None
    if with_fragments:
        nan = np.full(mask.shape, np.nan, np.float32)
        frag = np.stack([nan if v is None else v.astype(np.float32) for v in fragments], axis=-1)
    return CandidateBank(tuple(names), tuple(families), np.stack(values, 1), frag, mask)
