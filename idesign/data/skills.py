"""A skill-mixture LM corpus: memorized strings, arithmetic, frequent and rare facts, a formal pattern.

The corpus exists to measure *which skills a weight edit keeps* (Merullo et al. 2025, arXiv
2510.24256; ``docs/methods.md`` §3). Every document is one short row in a closed word-level
vocabulary (:class:`~idesign.data.tokenizer.WordTokenizer`), and every skill has an exact-match
test: a prompt and a fixed-length answer (scored by greedy decoding in :mod:`idesign.evaluation`).

**Text and memorized strings come from one language.** A random sparse Markov chain over the symbol
alphabet (each symbol has ``text_branching`` possible successors with random probabilities) generates
``text`` documents, each seen once in training. The memorized strings are ``n_strings`` further samples
of the *same* chain, each repeated ``string_repeats`` times; held-out text contains fresh samples of it.
So a memorized string differs from held-out text only in having been repeated — not in its tokens,
length or format — and a diagnostic that compares the two inputs measures memorization, not token
statistics. Recalling a memorized continuation needs the string itself: the language alone gives the
``unseen_strings`` control (fresh samples scored the same way), a few percent.

======================  ==========================================  =====================================
skill                   training document                           evaluation
======================  ==========================================  =====================================
``memorized``           ``<bos> quote s7 s3 ... s2 <eos>``: samples  exact recall of the continuation
                        of the Markov language, each repeated       after the first ``prefix_len``
                        ``string_repeats`` times                    symbols (of the *trained* strings)
(``text``)              ``<bos> quote s1 s5 ... <eos>``: fresh       not scored by exact match; part of
                        samples of the same language, seen once     ``heldout_text`` (perplexity)
``arithmetic``          ``<bos> 4 7 + 0 8 = 5 5 0 <eos>``:           the 3-digit sum of *held-out* pairs
                        2-digit addition, zero padded, the sum
                        written least significant digit first
``facts_frequent``      ``<bos> e12 lives in c3 <eos>``: each       the city after ``e12 lives in``;
``facts_rare``          entity's fact repeated a Zipf-distributed    closed-book recall of trained facts
                        number of times; the more frequent half     (a fact cannot be held out and
                        of entities is ``facts_frequent``            still be known)
``logic``               ``<bos> pattern s4 s9 s4 s9 s4 s9 s4 s9 s4  the next ``pattern_answer`` symbols
                        <eos>``: a periodic sequence (period 2      of *held-out* motifs: the rule
                        or 3) over random motifs                    "repeat the motif" must generalise
``unseen_strings``      (none: a control)                           memorized-string scoring on fresh
                                                                    samples of the language (chance)
======================  ==========================================  =====================================

Splits (:class:`SkillCorpus`): ``train`` (documents, shuffled), ``eval`` (one row per test item) and
``heldout_text`` (documents never trained on, for perplexity: a third each of fresh ``text``,
held-out ``arithmetic`` and held-out ``logic``). ``eval`` and ``heldout_text`` rows carry a ``split``
column, ``'sweep'`` or ``'report'`` (alternating within each skill), so an experiment can choose a
hyperparameter on one half and report on the other.

Columns. ``train`` and ``heldout_text``: ``tokens`` [seq_len] (right-padded with ``<pad>``),
``valid`` (1 on real tokens), ``loss_mask`` (1 on every real token after ``<bos>``; the columns
:func:`idesign.train.lm_loss` reads), ``skill``. ``eval`` adds ``prompt_len`` and ``answer_len``:
``tokens[:prompt_len]`` is the prompt and ``tokens[prompt_len:prompt_len + answer_len]`` the answer.
Within a skill every item has the same prompt and answer lengths.

Everything is a deterministic function of :class:`SkillConfig` (its ``seed`` included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from idesign.data.tokenizer import WordTokenizer

__all__ = ["SKILLS", "CONTROLS", "SkillConfig", "SkillCorpus", "make_skill_corpus", "make_skill_tokenizer",
           "markov_language", "to_numpy"]

SKILLS: tuple[str, ...] = ("memorized", "arithmetic", "facts_frequent", "facts_rare", "logic")
CONTROLS: tuple[str, ...] = ("unseen_strings",)   # scored like ``memorized``, on strings never trained on


@dataclasses.dataclass(frozen=True)
class SkillConfig:
    """Sizes of the skill mixture.

    Attributes:
      n_symbols: size of the symbol alphabet ``s0 ...`` shared by the text language and patterns.
      text_branching: successors each symbol may have in the Markov text language (>= 2, so a
        continuation cannot be recalled without the string); their probabilities are Dirichlet(1).
      n_text_docs: fresh text documents in training, each a sample of ``string_len`` symbols, seen once.
      n_strings: memorized strings: samples of the same language, ``string_len`` symbols each (distinct
        first ``prefix_len`` symbols), repeated ``string_repeats`` times in training; recall is scored
        on the last ``string_len - prefix_len`` symbols.
      arithmetic_train_fraction: share of the 10,000 ordered 2-digit pairs used for training; the
        rest is the held-out pool.
      n_entities, n_cities: the fact table (entity ``e<k>`` lives in one of ``n_cities`` cities).
      fact_docs: total fact documents; entity ``k`` gets ``max(min_fact_repeats, ∝ (k+1)^-zipf_exponent)``.
      pattern_periods, pattern_shown, pattern_answer: motif periods, symbols shown, symbols to predict.
      pattern_train_fraction: share of the motifs used for training (the rest are held out).
      n_pattern_train: logic training documents (drawn from the training motifs, with repeats).
      n_eval: held-out test items for arithmetic and for logic (each); the ``unseen_strings`` control has
        ``n_strings`` items, as many as ``memorized``.
      n_heldout_text: held-out perplexity documents (a third each: text, arithmetic, logic).
      seed: everything above is drawn from it.

    >>> SkillConfig(n_strings=4).seq_len
    15
    """

    n_symbols: int = 24
    text_branching: int = 3
    n_text_docs: int = 3000
    n_strings: int = 48
    string_len: int = 12
    prefix_len: int = 4
    string_repeats: int = 24
    arithmetic_train_fraction: float = 0.5
    n_entities: int = 120
    n_cities: int = 16
    fact_docs: int = 2400
    zipf_exponent: float = 1.0
    min_fact_repeats: int = 6
    pattern_periods: tuple[int, ...] = (2, 3)
    pattern_shown: int = 6
    pattern_answer: int = 3
    pattern_train_fraction: float = 0.5
    n_pattern_train: int = 3000
    n_eval: int = 200
    n_heldout_text: int = 400
    seed: int = 0

    def __post_init__(self):
        positive = ("n_symbols", "text_branching", "n_text_docs", "n_strings", "string_len", "prefix_len", "string_repeats", "n_entities",
                    "n_cities", "fact_docs", "pattern_shown", "pattern_answer", "n_pattern_train", "n_eval",
                    "n_heldout_text", "min_fact_repeats")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SkillConfig.{name} must be a positive int; got {value!r}.")
        if not 2 <= self.text_branching <= self.n_symbols:
            raise ValueError(f"SkillConfig.text_branching={self.text_branching} must be in [2, n_symbols={self.n_symbols}] "
                             "(with one successor a string is predictable, not memorized).")
        if self.prefix_len >= self.string_len:
            raise ValueError(f"SkillConfig.prefix_len={self.prefix_len} must be < string_len={self.string_len} "
                             "(something must be left to recall).")
        for name in ("arithmetic_train_fraction", "pattern_train_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"SkillConfig.{name} must be in (0, 1); got {getattr(self, name)!r}.")
        if not self.pattern_periods or any(p < 1 or self.pattern_shown % p for p in self.pattern_periods):
            raise ValueError(f"SkillConfig.pattern_periods={self.pattern_periods!r}: each period must be >= 1 and "
                             f"divide pattern_shown={self.pattern_shown}, so every shown prefix holds whole motifs.")
        if self.n_entities < 2:
            raise ValueError(f"SkillConfig.n_entities must be >= 2 (a frequent and a rare half); got {self.n_entities}.")

    @property
    def seq_len(self) -> int:
        """Length of every row: the longest document (``<bos>`` … ``<eos>``)."""
        return max(self.string_len + 3, 11, 6, self.pattern_shown + self.pattern_answer + 3)


def make_skill_tokenizer(config: SkillConfig) -> WordTokenizer:
    """The closed vocabulary of a corpus: specials, digits, ``+ = quote pattern lives in``, symbols, entities, cities.

    >>> tok = make_skill_tokenizer(SkillConfig(n_symbols=2, text_branching=2, n_entities=2, n_cities=2))
    >>> tok.encode("e1 lives in c0")
    [25, 20, 21, 26]
    """
    words = [str(d) for d in range(10)] + ["+", "=", "quote", "pattern", "lives", "in"]
    words += [f"s{i}" for i in range(config.n_symbols)]
    words += [f"e{i}" for i in range(config.n_entities)]
    words += [f"c{i}" for i in range(config.n_cities)]
    return WordTokenizer.from_words(words, strict=True)


@dataclasses.dataclass(frozen=True)
class SkillCorpus:
    """A built corpus: ``train``, ``eval`` and ``heldout_text`` datasets, the tokenizer and the config.

    ``fact_counts[k]`` is how many training documents state entity ``k``'s fact.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    heldout_text: datasets.Dataset
    tokenizer: WordTokenizer
    config: SkillConfig
    fact_counts: np.ndarray

    def eval_split(self, split: str) -> datasets.Dataset:
        """The ``'sweep'`` or ``'report'`` half of ``eval``."""
        return _filter_split(self.eval, split)

    def heldout_split(self, split: str) -> datasets.Dataset:
        """The ``'sweep'`` or ``'report'`` half of ``heldout_text``."""
        return _filter_split(self.heldout_text, split)

    def summary(self) -> dict[str, Any]:
        """Row counts per split and skill, and the fact frequency range of each half.

        >>> c = make_skill_corpus(SkillConfig(n_strings=4, n_entities=6, fact_docs=60, n_pattern_train=50,
        ...                                   n_eval=10, n_heldout_text=10))
        >>> c.summary()['train']['memorized']
        96
        """
        def counts(ds):
            skills, n = np.unique(np.asarray(ds["skill"]), return_counts=True)
            return {str(s): int(k) for s, k in zip(skills, n)}
        half = self.config.n_entities // 2
        return {"train": counts(self.train), "eval": counts(self.eval), "heldout_text": counts(self.heldout_text),
                "fact_repeats_frequent": (int(self.fact_counts[:half].min()), int(self.fact_counts[:half].max())),
                "fact_repeats_rare": (int(self.fact_counts[half:].min()), int(self.fact_counts[half:].max())),
                "vocab_size": self.tokenizer.vocab_size, "seq_len": self.config.seq_len}


def _filter_split(ds: datasets.Dataset, split: str) -> datasets.Dataset:
    if split not in ("sweep", "report"):
        raise ValueError(f"split must be 'sweep' or 'report'; got {split!r}.")
    idx = np.flatnonzero(np.asarray(ds["split"]) == split)
    return ds.select(idx)


def _rng(config: SkillConfig, purpose: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, purpose])


def _digits(n: int, width: int) -> list[str]:
    return list(str(n).zfill(width))


def _zipf_counts(config: SkillConfig) -> np.ndarray:
    weights = (np.arange(config.n_entities) + 1.0) ** -config.zipf_exponent
    counts = np.floor(config.fact_docs * weights / weights.sum()).astype(np.int64)
    return np.maximum(counts, config.min_fact_repeats)


def _motifs(config: SkillConfig, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every motif of each period with no two adjacent symbols equal (so the period is unambiguous)."""
    out = []
    for p in config.pattern_periods:
        grid = np.stack(np.meshgrid(*[np.arange(config.n_symbols)] * p, indexing="ij"), -1).reshape(-1, p)
        ok = np.all(grid != np.roll(grid, 1, axis=1), axis=1) if p > 1 else np.ones(len(grid), bool)
        out += [tuple(int(s) for s in row) for row in grid[ok]]
    return [out[i] for i in rng.permutation(len(out))]


def _pattern_words(motif: tuple[int, ...], length: int) -> list[str]:
    return [f"s{motif[i % len(motif)]}" for i in range(length)]


def markov_language(config: SkillConfig) -> tuple[np.ndarray, np.ndarray]:
    """The text language: ``(successors, probs)``, each ``[n_symbols, text_branching]``.

    Symbol ``s`` is followed by ``successors[s, k]`` with probability ``probs[s, k]`` (distinct successors;
    probabilities Dirichlet(1), drawn from the config's seed). A string starts at a uniform symbol.

    >>> succ, probs = markov_language(SkillConfig(n_symbols=5, text_branching=2))
    >>> succ.shape, bool(np.allclose(probs.sum(1), 1.0))
    ((5, 2), True)
    """
    rng = _rng(config, 7)
    successors = np.stack([rng.choice(config.n_symbols, config.text_branching, replace=False)
                           for _ in range(config.n_symbols)])
    return successors, rng.dirichlet(np.ones(config.text_branching), config.n_symbols)


def _sample_text(successors: np.ndarray, probs: np.ndarray, n: int, length: int, rng: np.random.Generator
                 ) -> np.ndarray:
    """``[n, length]`` symbol ids: ``n`` independent walks of the Markov chain (vectorised over walks)."""
    out = np.empty((n, length), np.int64)
    out[:, 0] = rng.integers(0, len(successors), n)
    cum = np.cumsum(probs, axis=1)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        k = np.minimum((u > cum[out[:, t - 1]]).sum(1), successors.shape[1] - 1)
        out[:, t] = successors[out[:, t - 1], k]
    return out


def _sample_excluding(successors: np.ndarray, probs: np.ndarray, n: int, length: int, rng: np.random.Generator,
                      exclude: np.ndarray) -> np.ndarray:
    """``n`` walks none of which equals a row of ``exclude`` (rejection sampling)."""
    banned = {tuple(row) for row in np.asarray(exclude).tolist()}
    out = np.zeros((0, length), np.int64)
    for _ in range(100):
        draw = _sample_text(successors, probs, 2 * (n - len(out)) + 8, length, rng)
        draw = draw[[tuple(row) not in banned for row in draw.tolist()]]
        out = np.concatenate([out, draw])[:n]
        if len(out) == n:
            return out
    raise ValueError(f"SkillConfig: the text language has too few distinct strings of length {length} to hold "
                     f"{len(banned)} out; raise n_symbols or text_branching.")


def _distinct_prefix_samples(successors: np.ndarray, probs: np.ndarray, config: SkillConfig, n: int,
                             rng: np.random.Generator) -> np.ndarray:
    """``n`` samples whose first ``prefix_len`` symbols all differ, so a prompt names one string."""
    chosen: dict[tuple[int, ...], np.ndarray] = {}
    for _ in range(100):
        for s in _sample_text(successors, probs, 2 * n, config.string_len, rng):
            chosen.setdefault(tuple(s[:config.prefix_len].tolist()), s)
            if len(chosen) == n:
                return np.stack(list(chosen.values()))
    raise ValueError(f"SkillConfig: could not draw {n} strings (2 n_strings) with distinct {config.prefix_len}-"
                     f"symbol prefixes from the text language; raise n_symbols, text_branching or prefix_len.")


def _text_words(symbols: np.ndarray) -> list[str]:
    return ["quote"] + [f"s{int(x)}" for x in symbols]


def make_skill_corpus(config: SkillConfig) -> SkillCorpus:
    """Builds the corpus (deterministic in ``config``); see the module docstring for the formats.

    Args:
      config: sizes and the seed.

    Returns:
      a :class:`SkillCorpus`.

    >>> c = make_skill_corpus(SkillConfig(n_strings=4, n_entities=6, fact_docs=60, n_pattern_train=50,
    ...                                   n_eval=10, n_heldout_text=10))
    >>> items = to_numpy(c.eval)
    >>> i = list(items['skill']).index('arithmetic')
    >>> c.tokenizer.decode(items['tokens'][i][:items['prompt_len'][i] + items['answer_len'][i]])
    '1 9 + 9 8 = 7 1 1'
    >>> sorted(set(c.eval['skill'])) == sorted(SKILLS + CONTROLS)
    True
    """
    tok = make_skill_tokenizer(config)
    train: list[tuple[str, list[str]]] = []            # (skill, words without <bos>/<eos>)
    evals: list[tuple[str, list[str], int]] = []       # (skill, words, answer_len)
    heldout: list[tuple[str, list[str]]] = []

    successors, probs = markov_language(config)
    rng = _rng(config, 1)
    n_third = config.n_heldout_text // 3
    strings = _distinct_prefix_samples(successors, probs, config, 2 * config.n_strings, rng)
    memorized, unseen = strings[:config.n_strings], strings[config.n_strings:]
    answer = config.string_len - config.prefix_len
    for s in memorized:
        train += [("memorized", _text_words(s))] * config.string_repeats
        evals.append(("memorized", _text_words(s), answer))
    evals += [("unseen_strings", _text_words(s), answer) for s in unseen]
    # Held out means never trained on: held-out text avoids the memorized strings, training text avoids
    # the held-out text and the unseen strings (exact repeats are likely in a low-entropy language).
    rng = _rng(config, 6)
    heldout_text = _sample_excluding(successors, probs, n_third, config.string_len, rng, memorized)
    text = _sample_excluding(successors, probs, config.n_text_docs, config.string_len, rng,
                             np.concatenate([unseen, heldout_text]))
    train += [("text", _text_words(s)) for s in text]
    heldout += [("text", _text_words(s)) for s in heldout_text]

    rng = _rng(config, 2)
    pairs = rng.permutation(10_000)
    n_train = int(round(config.arithmetic_train_fraction * len(pairs)))
    def sum_words(p):
        a, b = divmod(int(p), 100)
        # The sum is written least significant digit first, so each answer digit depends on two shown
        # digits and the carry just written: a rule a small transformer learns in a few epochs.
        return _digits(a, 2) + ["+"] + _digits(b, 2) + ["="] + _digits(a + b, 3)[::-1]
    train += [("arithmetic", sum_words(p)) for p in pairs[:n_train]]
    pool = pairs[n_train:]
    evals += [("arithmetic", sum_words(p), 3) for p in pool[:config.n_eval]]
    heldout += [("arithmetic", sum_words(p)) for p in pool[config.n_eval:][:n_third]]

    rng = _rng(config, 3)
    cities = rng.integers(0, config.n_cities, config.n_entities)
    counts = _zipf_counts(config)
    half = config.n_entities // 2
    for k in range(config.n_entities):
        skill = "facts_frequent" if k < half else "facts_rare"
        words = [f"e{k}", "lives", "in", f"c{int(cities[k])}"]
        train += [(skill, words)] * int(counts[k])
        evals.append((skill, words, 1))

    rng = _rng(config, 4)
    motifs = _motifs(config, rng)
    n_train_motifs = max(1, int(round(config.pattern_train_fraction * len(motifs))))
    train_motifs, pool_motifs = motifs[:n_train_motifs], motifs[n_train_motifs:]
    if len(pool_motifs) < 2:
        raise ValueError(f"SkillConfig: only {len(pool_motifs)} held-out motifs; raise n_symbols or lower "
                         "pattern_train_fraction.")
    total = config.pattern_shown + config.pattern_answer
    for i in rng.integers(0, len(train_motifs), config.n_pattern_train):
        train.append(("logic", ["pattern"] + _pattern_words(train_motifs[i], total)))
    picks = rng.permutation(len(pool_motifs))
    for i in picks[:config.n_eval]:
        evals.append(("logic", ["pattern"] + _pattern_words(pool_motifs[i], total), config.pattern_answer))
    rest = picks[config.n_eval:] if len(picks) > config.n_eval else picks
    for i in np.resize(rest, config.n_heldout_text - 2 * n_third):
        heldout.append(("logic", ["pattern"] + _pattern_words(pool_motifs[i], total)))

    order = _rng(config, 5).permutation(len(train))
    train = [train[i] for i in order]
    return SkillCorpus(_documents(train, tok, config.seq_len), _eval_items(evals, tok, config.seq_len),
                       _documents(heldout, tok, config.seq_len, with_split=True), tok, config, counts)


def _encode(words: Sequence[str], tok: WordTokenizer, seq_len: int) -> tuple[list[int], list[int], int]:
    ids = [tok.bos_id] + [tok.token_to_id(w) for w in words] + [tok.eos_id]
    n = len(ids)
    return ids + [tok.pad_id] * (seq_len - n), [1] * n + [0] * (seq_len - n), n


def _documents(docs: Sequence[tuple[str, list[str]]], tok: WordTokenizer, seq_len: int, *,
               with_split: bool = False) -> datasets.Dataset:
    cols: dict[str, list] = {"tokens": [], "valid": [], "loss_mask": [], "skill": []}
    for skill, words in docs:
        ids, valid, _ = _encode(words, tok, seq_len)
        cols["tokens"].append(ids)
        cols["valid"].append(valid)
        cols["loss_mask"].append([0] + valid[1:])
        cols["skill"].append(skill)
    if with_split:  # alternate within each skill, so both halves hold every skill
        seen: dict[str, int] = {}
        cols["split"] = []
        for skill, _ in docs:
            cols["split"].append(("sweep", "report")[seen.get(skill, 0) % 2])
            seen[skill] = seen.get(skill, 0) + 1
    return datasets.Dataset.from_dict(cols, features=_features(with_split, eval_items=False))


def _eval_items(items: Sequence[tuple[str, list[str], int]], tok: WordTokenizer, seq_len: int) -> datasets.Dataset:
    cols: dict[str, list] = {"tokens": [], "valid": [], "loss_mask": [], "skill": [], "split": [],
                             "prompt_len": [], "answer_len": []}
    seen: dict[str, int] = {}
    for skill, words, answer_len in items:
        ids, valid, n = _encode(words, tok, seq_len)
        cols["tokens"].append(ids)
        cols["valid"].append(valid)
        cols["loss_mask"].append([0] + valid[1:])
        cols["skill"].append(skill)
        cols["split"].append(("sweep", "report")[seen.get(skill, 0) % 2])
        seen[skill] = seen.get(skill, 0) + 1
        cols["prompt_len"].append(n - 1 - answer_len)   # <eos> is not part of the answer
        cols["answer_len"].append(answer_len)
    return datasets.Dataset.from_dict(cols, features=_features(True, eval_items=True))


def _features(with_split: bool, *, eval_items: bool) -> datasets.Features:
    f = {"tokens": datasets.Sequence(datasets.Value("int32")), "valid": datasets.Sequence(datasets.Value("int8")),
         "loss_mask": datasets.Sequence(datasets.Value("int8")), "skill": datasets.Value("string")}
    if with_split:
        f["split"] = datasets.Value("string")
    if eval_items:
        f["prompt_len"] = datasets.Value("int32")
        f["answer_len"] = datasets.Value("int32")
    return datasets.Features(f)


def to_numpy(ds: datasets.Dataset, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of a dataset as numpy arrays (``[rows, seq_len]`` for the token columns), in one Arrow read.

    Much faster than ``np.asarray(ds[column])``, which converts row by row; pass the result to
    :func:`idesign.train.iterate_batches` or :func:`idesign.curvature.collect_factors`.

    >>> c = make_skill_corpus(SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                   n_text_docs=10, n_eval=4, n_heldout_text=6))
    >>> to_numpy(c.train, ['tokens'])['tokens'].shape
    (5095, 15)
    """
    columns = list(ds.column_names if columns is None else columns)
    missing = [n for n in columns if n not in ds.column_names]
    if missing:
        raise ValueError(f"the dataset lacks the columns {missing}; it has {ds.column_names}.")
    data = ds.select_columns(columns).with_format("numpy")[:]
    return {n: np.asarray(data[n]) for n in columns}
