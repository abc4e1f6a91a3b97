"""A skill-mixture LM corpus: memorized strings, arithmetic, frequent and rare facts, a formal pattern.

The corpus exists to measure *which skills a weight edit keeps* (Merullo et al. 2025, arXiv
2510.24256; ``docs/methods.md`` §3). Every document is one short row in a closed word-level
vocabulary (:class:`~idesign.data.tokenizer.WordTokenizer`), and every skill has an exact-match
test: a prompt and a fixed-length answer, scored by greedy decoding.

======================  ==========================================  =====================================
skill                   training document                           evaluation
======================  ==========================================  =====================================
``memorized``           ``<bos> quote s7 s30 ... s2 <eos>``:        exact recall of the continuation
                        random symbol strings, each repeated        after the first ``prefix_len``
                        ``string_repeats`` times                    symbols (of the *trained* strings)
``arithmetic``          ``<bos> 4 7 + 0 8 = 0 5 5 <eos>``:           the 3-digit sum of *held-out* pairs
                        2-digit addition, zero padded
``facts_frequent``      ``<bos> e12 lives in c3 <eos>``: each       the city after ``e12 lives in``;
``facts_rare``          entity's fact repeated a Zipf-distributed    closed-book recall of trained facts
                        number of times; the more frequent half     (a fact cannot be held out and
                        of entities is ``facts_frequent``            still be known)
``logic``               ``<bos> pattern s4 s9 s4 s9 s4 s9 s4 s9 s4  the next ``pattern_answer`` symbols
                        <eos>``: a periodic sequence (period 2      of *held-out* motifs: the rule
                        or 3) over random motifs                    "repeat the motif" must generalise
======================  ==========================================  =====================================

Splits (:class:`SkillCorpus`): ``train`` (documents, shuffled), ``eval`` (one row per test item) and
``heldout_text`` (documents of the generalising skills, arithmetic and logic, built only from held-out
instances, for perplexity). ``eval`` and ``heldout_text`` rows carry a ``split`` column, ``'sweep'``
or ``'report'`` (alternating), so an experiment can choose a hyperparameter on one half and report
on the other.

Columns. ``train`` and ``heldout_text``: ``tokens`` [seq_len] (right-padded with ``<pad>``),
``valid`` (1 on real tokens), ``loss_mask`` (1 on every real token after ``<bos>``; the columns
:func:`idesign.train.lm_loss` reads), ``skill``. ``eval`` adds ``prompt_len`` and ``answer_len``:
``tokens[:prompt_len]`` is the prompt and ``tokens[prompt_len:prompt_len + answer_len]`` the answer.
Within a skill every item has the same prompt and answer lengths.

Everything is a deterministic function of :class:`SkillConfig` (its ``seed`` included).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from idesign.data.tokenizer import WordTokenizer

__all__ = ["SKILLS", "SkillConfig", "SkillCorpus", "make_skill_corpus", "make_skill_tokenizer",
           "to_numpy", "greedy_answers", "exact_match", "skill_accuracy", "perplexity"]

SKILLS: tuple[str, ...] = ("memorized", "arithmetic", "facts_frequent", "facts_rare", "logic")


@dataclasses.dataclass(frozen=True)
class SkillConfig:
    """Sizes of the skill mixture.

    Attributes:
      n_symbols: size of the symbol alphabet ``s0 ...`` shared by memorized strings and patterns.
      n_strings: memorized random strings; ``string_len`` symbols each, repeated ``string_repeats``
        times in training; recall is scored on the last ``string_len - prefix_len`` symbols.
      arithmetic_train_fraction: share of the 10,000 ordered 2-digit pairs used for training; the
        rest is the held-out pool.
      n_entities, n_cities: the fact table (entity ``e<k>`` lives in one of ``n_cities`` cities).
      fact_docs: total fact documents; entity ``k`` gets ``max(min_fact_repeats, ∝ (k+1)^-zipf_exponent)``.
      pattern_periods, pattern_shown, pattern_answer: motif periods, symbols shown, symbols to predict.
      pattern_train_fraction: share of the motifs used for training (the rest are held out).
      n_pattern_train: logic training documents (drawn from the training motifs, with repeats).
      n_eval: held-out test items for arithmetic and for logic (each).
      n_heldout_text: held-out perplexity documents (half arithmetic, half logic).
      seed: everything above is drawn from it.

    >>> SkillConfig(n_strings=4).seq_len
    15
    """

    n_symbols: int = 24
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
        positive = ("n_symbols", "n_strings", "string_len", "prefix_len", "string_repeats", "n_entities",
                    "n_cities", "fact_docs", "pattern_shown", "pattern_answer", "n_pattern_train", "n_eval",
                    "n_heldout_text", "min_fact_repeats")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SkillConfig.{name} must be a positive int; got {value!r}.")
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

    >>> tok = make_skill_tokenizer(SkillConfig(n_symbols=2, n_entities=2, n_cities=2))
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
    '1 9 + 9 8 = 1 1 7'
    >>> sorted(set(c.eval['skill'])) == sorted(SKILLS)
    True
    """
    tok = make_skill_tokenizer(config)
    train: list[tuple[str, list[str]]] = []            # (skill, words without <bos>/<eos>)
    evals: list[tuple[str, list[str], int]] = []       # (skill, words, answer_len)
    heldout: list[tuple[str, list[str]]] = []

    rng = _rng(config, 1)
    strings = rng.integers(0, config.n_symbols, (config.n_strings, config.string_len))
    for s in strings:
        words = ["quote"] + [f"s{int(x)}" for x in s]
        train += [("memorized", words)] * config.string_repeats
        evals.append(("memorized", words, config.string_len - config.prefix_len))

    rng = _rng(config, 2)
    pairs = rng.permutation(10_000)
    n_train = int(round(config.arithmetic_train_fraction * len(pairs)))
    def sum_words(p):
        a, b = divmod(int(p), 100)
        return _digits(a, 2) + ["+"] + _digits(b, 2) + ["="] + _digits(a + b, 3)
    train += [("arithmetic", sum_words(p)) for p in pairs[:n_train]]
    pool = pairs[n_train:]
    evals += [("arithmetic", sum_words(p), 3) for p in pool[:config.n_eval]]
    heldout += [("arithmetic", sum_words(p)) for p in pool[config.n_eval:][:config.n_heldout_text // 2]]

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
    for i in np.resize(rest, config.n_heldout_text - config.n_heldout_text // 2):
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
    if with_split:
        cols["split"] = [("sweep", "report")[i % 2] for i in range(len(docs))]
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


# --------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=16)
def _decoder(apply: Callable, answer_len: int) -> Callable:
    """``(params, buf [B, T], prompt_len [B]) -> [B, answer_len]``: ragged prompts, one compilation per shape."""
    def run(params, buf, prompt_len):
        rows = jnp.arange(buf.shape[0])
        last = buf.shape[1] - 1
        # Blank everything after each prompt; causal attention means the read position p-1+k only
        # ever sees the prompt and the k tokens written so far.
        buf = jnp.where(jnp.arange(buf.shape[1])[None] < prompt_len[:, None], buf, 0)

        def body(k, buf):
            logits, _ = apply(params, buf)
            nxt = jnp.argmax(logits[rows, jnp.clip(prompt_len - 1 + k, 0, last)], -1).astype(buf.dtype)
            return buf.at[rows, jnp.minimum(prompt_len + k, last)].set(nxt)

        buf = jax.lax.fori_loop(0, answer_len, body, buf)
        return buf[rows[:, None], jnp.minimum(prompt_len[:, None] + jnp.arange(answer_len)[None], last)]

    return jax.jit(run)


def _decode(apply: Callable, params: Any, buf: np.ndarray, prompt_len: np.ndarray, answer_len: int,
            batch_size: int) -> np.ndarray:
    n = len(buf)
    batch_size = max(1, min(batch_size, n))
    fn = _decoder(apply, int(answer_len))
    out = []
    for i in range(0, n, batch_size):
        chunk, plen = buf[i:i + batch_size], prompt_len[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:  # repeat the last row so the last batch has the compiled shape
            chunk, plen = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]), np.concatenate([plen, np.repeat(plen[-1:], pad)])
        out.append(np.asarray(fn(params, jnp.asarray(chunk, jnp.int32), jnp.asarray(plen, jnp.int32)))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, answer_len), np.int32)


def greedy_answers(apply: Callable, params: Any, prompts: Any, answer_len: int, *, batch_size: int = 256
                   ) -> np.ndarray:
    """Greedy continuations ``[N, answer_len]`` of equal-length prompts ``[N, P]`` (batched, jitted).

    The last batch is padded to ``batch_size`` rows, so one shape compiles once.

    >>> import numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> greedy_answers(apply, params, np.ones((3, 4), np.int32), 2, batch_size=2).shape
    (3, 2)
    """
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"greedy_answers: prompts must have shape [N, P >= 1]; got {prompts.shape}.")
    if answer_len < 1:
        raise ValueError(f"greedy_answers: answer_len must be >= 1; got {answer_len}.")
    n, p = prompts.shape
    buf = np.concatenate([prompts, np.zeros((n, answer_len), np.int32)], axis=1)
    return _decode(apply, params, buf, np.full(n, p), int(answer_len), batch_size)


def exact_match(apply: Callable, params: Any, items: datasets.Dataset | Mapping[str, Any], *,
                batch_size: int = 256) -> np.ndarray:
    """Per item: does greedy decoding after ``tokens[:prompt_len]`` reproduce the whole answer?

    All items are decoded together (ragged prompts, ``max(answer_len)`` steps), so a model
    compiles one decoder per batch shape whatever the mix of skills.

    Args:
      apply, params: the model.
      items: rows with ``tokens``, ``prompt_len``, ``answer_len`` (e.g. :attr:`SkillCorpus.eval`);
        ``tokens`` must have room for each answer (``prompt_len + answer_len <= seq_len``).
      batch_size: rows per decoding batch.

    Returns:
      a bool array, one entry per item, in the items' order.

    >>> import idesign as ids
    >>> c = make_skill_corpus(SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                   n_eval=4, n_heldout_text=4))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.tokenizer.vocab_size,
    ...                                      d_model=8, n_heads=2, n_layers=1, max_len=c.config.seq_len))
    >>> exact_match(apply, params, c.eval).shape
    (14,)
    """
    cols = _columns(items, ("tokens", "prompt_len", "answer_len"))
    tokens, plen, alen = np.asarray(cols["tokens"], np.int32), np.asarray(cols["prompt_len"]), np.asarray(cols["answer_len"])
    if len(tokens) == 0:
        return np.zeros(0, bool)
    if np.any(plen < 1) or np.any(alen < 1) or np.any(plen + alen > tokens.shape[1]):
        bad = int(np.flatnonzero((plen < 1) | (alen < 1) | (plen + alen > tokens.shape[1]))[0])
        raise ValueError(f"exact_match: item {bad} has prompt_len={plen[bad]}, answer_len={alen[bad]} for tokens of "
                         f"length {tokens.shape[1]}; expected prompt_len >= 1, answer_len >= 1 and their sum <= length.")
    a = int(alen.max())
    pred = _decode(apply, params, tokens, plen, a, batch_size)
    gold = tokens[np.arange(len(tokens))[:, None], np.minimum(plen[:, None] + np.arange(a)[None], tokens.shape[1] - 1)]
    return np.all((pred == gold) | (np.arange(a)[None] >= alen[:, None]), axis=1)


def skill_accuracy(correct: np.ndarray, items: datasets.Dataset | Mapping[str, Any]) -> dict[str, float]:
    """``{skill: share of items answered exactly}`` from :func:`exact_match`'s output.

    >>> skill_accuracy(np.array([True, False, True]), {'skill': ['logic', 'logic', 'arithmetic']})
    {'arithmetic': 1.0, 'logic': 0.5}
    """
    skills = np.asarray(_columns(items, ("skill",))["skill"])
    correct = np.asarray(correct, bool)
    if correct.shape != skills.shape:
        raise ValueError(f"skill_accuracy: {correct.shape[0]} results for {skills.shape[0]} items.")
    return {str(s): float(correct[skills == s].mean()) for s in sorted(set(skills.tolist()))}


def perplexity(apply: Callable, params: Any, docs: datasets.Dataset | Mapping[str, Any], *,
               batch_size: int = 256) -> float:
    """``exp`` of the mean next-token NLL over the scored tokens of ``docs`` (``lm_loss``'s positions).

    >>> import idesign as ids
    >>> c = make_skill_corpus(SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                   n_eval=4, n_heldout_text=4))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.tokenizer.vocab_size,
    ...                                      d_model=8, n_heads=2, n_layers=1, max_len=c.config.seq_len))
    >>> 20 < perplexity(apply, params, c.heldout_text) < 150
    True
    """
    from idesign.train import evaluate, iterate_batches, lm_loss, make_eval_step
    step = _eval_step(apply) if _hashable(apply) else make_eval_step(lm_loss(apply))
    cols = _columns(docs, ("tokens", "valid", "loss_mask"))
    batches = iterate_batches({k: np.asarray(v) for k, v in cols.items()}, batch_size, epochs=1, shuffle=False,
                              drop_remainder=False)
    return float(np.exp(evaluate(step, params, batches)["loss"]))


def _hashable(x: Any) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


@functools.lru_cache(maxsize=8)
def _eval_step(apply: Callable) -> Callable:
    from idesign.train import lm_loss, make_eval_step
    return make_eval_step(lm_loss(apply))


def to_numpy(ds: datasets.Dataset, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of a dataset as numpy arrays (``[rows, seq_len]`` for the token columns), in one Arrow read.

    Much faster than ``np.asarray(ds[column])``, which converts row by row; pass the result to
    :func:`idesign.train.iterate_batches` or :func:`idesign.curvature.collect_factors`.

    >>> c = make_skill_corpus(SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                   n_eval=4, n_heldout_text=4))
    >>> to_numpy(c.train, ['tokens'])['tokens'].shape
    (5085, 15)
    """
    columns = list(ds.column_names if columns is None else columns)
    missing = [n for n in columns if n not in ds.column_names]
    if missing:
        raise ValueError(f"the dataset lacks the columns {missing}; it has {ds.column_names}.")
    data = ds.select_columns(columns).with_format("numpy")[:]
    return {n: np.asarray(data[n]) for n in columns}


def _columns(items: Any, names: Sequence[str]) -> dict[str, Any]:
    if hasattr(items, "column_names"):
        return to_numpy(items, names)
    missing = [n for n in names if n not in items]
    if missing:
        raise ValueError(f"items lack the columns {missing}; they have {sorted(items)}.")
    return {n: items[n] for n in names}
