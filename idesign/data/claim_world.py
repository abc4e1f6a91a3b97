"""A knowledge world with *confident* hallucinations, multi-token answers and claim spans labelled exactly.

The first knowledge world (:mod:`idesign.data.knowledge`) gives every unknown entity a flat answer
distribution, so entropy measures "hallucination" by construction. Real hallucinations are
confident: the model conflates an entity with similar ones it knows. This world builds that in:

* **Families.** A name is a first name plus a surname; entities sharing a surname form a family with
  a family profile (home city, employer, birth decade). Each member takes the family value of each of
  those attributes with probability ``family_share``, else a random one. A model that has not
  memorised a member falls back on the family value *confidently*, right or wrong.
* **Rare entities** appear in only ``rare_docs`` (1-3) documents; **unknown entities** never appear,
  and their names reuse parts of known names (every surname is a known family).
* **Multi-token answers**: cities are two words (``san lisbon``), years two tokens (``196 7``: the
  decade, then the digit), so a claim can be partly wrong. The last token of every value is a
  *closing* token (:data:`CLOSING_WORDS`): a claim is complete when one is emitted, which is when a
  monitor scores it.
* **Long-form prompts** ``<bos> about NAME :`` are answered with sentences, one claim each::

      from san lisbon . born 196 7 . works as baker . employed by acme . <eos>

  and QA prompts ``<bos> q : where was NAME born ? a :`` with the value alone (``san lisbon <eos>``).

Every claim is a token span with an exact label from ground truth (:func:`parse_completion`): it is
*supported* when the entity is known (it appears in training) and the span equals the true value;
otherwise it is a hallucination (any claim about an unknown entity, even a lucky one). After a
claim, the retraction marker ``<retract>`` takes it back; what follows is a correction (another
claim), ``unknown``, or nothing (a bare retraction). Training documents use the marker and the
abstain word rarely and at random (``marker_rate``), so a model can produce them but has no idea *when*.

Example:
    >>> world = make_claim_world(ClaimWorldConfig(n_known=40, n_unknown=10, n_families=6, n_first=12))
    >>> q = world.queries.filter(lambda r: r["kind"] == "qa")[0]
    >>> value = world.truth(q["entity_id"], q["attribute"])
    >>> ids = world.tokenizer.encode(" ".join(value) + " <eos>")
    >>> parsed = parse_completion(world, q["entity_id"], "qa", q["attribute"], ids)
    >>> parsed.claims[0].supported == (q["group"] != "unknown"), parsed.malformed
    (True, False)
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple, Sequence

import datasets
import numpy as np

from idesign.data.tokenizer import ABSTAIN, EOS, RETRACT, WordTokenizer

ATTRIBUTES: tuple[str, ...] = ("birth_city", "birth_year", "profession", "employer")
FAMILY_ATTRIBUTES: tuple[str, ...] = ("birth_city", "birth_year", "employer")
CUES: dict[str, tuple[str, ...]] = {"birth_city": ("from",), "birth_year": ("born",),
                                    "profession": ("works", "as"), "employer": ("employed", "by")}
QUESTIONS: dict[str, str] = {"birth_city": "where was {name} born ?", "birth_year": "when was {name} born ?",
                             "profession": "what does {name} do ?", "employer": "who does {name} work for ?"}
CITY_PREFIXES = ("san", "port", "new", "fort", "lake", "north", "east", "saint")
CITY_ROOTS = ("lisbon", "paris", "berlin", "madrid", "rome", "vienna", "prague", "oslo", "dublin", "athens",
              "cairo", "lima")
DECADES = ("195", "196", "197", "198")
DIGITS = tuple(str(d) for d in range(10))
PROFESSIONS = ("baker", "teacher", "doctor", "lawyer", "pilot", "farmer", "nurse", "engineer", "chemist", "painter",
               "writer", "architect", "carpenter", "plumber", "dentist", "journalist", "musician", "librarian",
               "electrician", "tailor")
EMPLOYERS = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka", "cyberdyne", "tyrell", "soylent",
             "oscorp", "monarch", "dunder", "aperture", "nakatomi", "gringotts", "stark", "wayne", "zorg", "massive")
FIRST_NAMES = ("ada", "alan", "alice", "amir", "anna", "arjun", "beatrix", "boris", "carla", "chen", "clara", "dmitri",
               "elena", "emil", "farah", "felix", "greta", "hana", "hugo", "ines", "ivan", "jonas", "julia", "kai",
               "karim", "lena", "leo", "lucia", "malik", "maria", "marta", "milo", "nadia", "nina", "omar", "oscar",
               "paula", "pedro", "petra", "quinn")
SURNAMES = ("moreno", "smith", "tanaka", "kowalski", "novak", "garcia", "mueller", "rossi", "dubois", "silva",
            "jensen", "nakamura", "okafor", "petrov", "lindqvist", "haddad", "kim", "nguyen", "osei", "fischer",
            "bianchi", "costa", "horvat", "ivanova", "janssen", "kaur", "larsen", "mendez", "nilsson", "ortiz")
GROUPS = ("frequent", "rare", "unknown")
PROMPT_KINDS = ("qa", "bio")


def make_claim_tokenizer() -> WordTokenizer:
    """The vocabulary of every claim world (it does not depend on the config).

    Example:
        >>> tok = make_claim_tokenizer()
        >>> tok.decode(tok.encode("about ada moreno : from san lisbon . born 196 7 ."))
        'about ada moreno : from san lisbon . born 196 7 .'
    """
    words = ["about", ":", ".", "q", "a", *DECADES, *DIGITS, *CITY_PREFIXES, *CITY_ROOTS, *PROFESSIONS, *EMPLOYERS,
             *FIRST_NAMES, *SURNAMES]
    for attribute in ATTRIBUTES:
        words += list(CUES[attribute]) + QUESTIONS[attribute].format(name="").split()
    return WordTokenizer.from_words(words)


@dataclasses.dataclass(frozen=True)
class ClaimWorldConfig:
    """What claim world to generate (a deterministic function of this config).

    Attributes:
        n_known: entities in training documents; ``n_unknown``: entities never in training.
        n_families: surnames in use (every unknown entity's surname is a known family).
        n_first: first names in use.
        frequent_fraction: share of known entities that are frequent; the rest are rare.
        frequent_docs, rare_docs: ``(low, high)`` documents per frequent / rare entity (inclusive).
        family_share: probability that a member's home city, employer and birth decade are the family's.
        qa_fraction: share of QA documents (the rest are long-form bios).
        marker_rate: share of claims in training documents written as a random retraction
            (``wrong <retract> right|unknown``) and, separately, of QA answers written as ``unknown``.
        correction_rate: share of claims written as a random retraction, when it should differ from the
            share of ``unknown`` answers (``None``, the default: ``marker_rate`` sets both). A corpus with more
            self-corrections teaches a model to notice a wrong value after stating it.
        cut_rate: chance, at each token of a true claim in a training document (before its first token
            too), that the claim is broken off there by ``<retract>`` (``san <retract> right|unknown``).
            Random, like the other marks, so a model learns to break off with probability ``cut_rate``
            *whatever the context*: its ``<retract>`` logit then tracks the softmax's normaliser, and a
            constant added to that logit makes greedy decoding break off exactly the claim tokens whose
            confidence (max-probability) is lowest (0, the default, leaves a world as it was).
        mark_passes: how many times the corpus holds each document, its random marks (retractions, cuts,
            ``unknown`` answers) drawn anew each time, its facts the same. A small model pretrained for many
            epochs on one marking memorises *which* documents carry a mark, so it learns the marks as facts
            about documents rather than as rates (measured: with one pass and ``cut_rate = 0.05`` the median
            ``P(<retract>)`` inside a held-out claim is below 1e-3). With about as many passes as pretraining makes
            epochs, no marked document is seen twice (1, the default, leaves a world as it was).
        n_obscure: people the corpus names but says nothing about: each appears in ``rare_docs``
            documents whose every answer is ``unknown`` (QA ``a : unknown``, bio ``from unknown .``).
            They are not entities of the world (no queries). Their names reuse known parts, so a model
            can only predict ``unknown`` for them by telling a name it has facts for from one it has not:
            the pressure that makes entity *familiarity* a feature of the model, as in real corpora
            (0, the default, leaves the world as it was).
        seed: seeds every random choice.

    Example:
        >>> ClaimWorldConfig(family_share=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ClaimWorldConfig.family_share = 1.5: expected a probability in [0, 1].
    """

    n_known: int = 400
    n_unknown: int = 160
    n_families: int = 24
    n_first: int = 40
    frequent_fraction: float = 0.3
    frequent_docs: tuple[int, int] = (6, 16)
    rare_docs: tuple[int, int] = (1, 3)
    family_share: float = 0.75
    qa_fraction: float = 0.5
    marker_rate: float = 0.03
    correction_rate: float | None = None
    cut_rate: float = 0.0
    mark_passes: int = 1
    n_obscure: int = 0
    seed: int = 0

    def __post_init__(self):
        def fail(field, expected):
            raise ValueError(f"ClaimWorldConfig.{field} = {getattr(self, field)!r}: expected {expected}.")
        if not 1 <= self.n_families <= len(SURNAMES):
            fail("n_families", f"an integer in 1..{len(SURNAMES)}")
        if not 1 <= self.n_first <= len(FIRST_NAMES):
            fail("n_first", f"an integer in 1..{len(FIRST_NAMES)}")
        if self.n_known < 2:
            fail("n_known", "an integer >= 2")
        if self.n_unknown < 0 or self.n_known + self.n_unknown > self.n_families * self.n_first:
            fail("n_unknown", f"an integer in 0..{self.n_families * self.n_first - self.n_known} "
                              f"(n_families * n_first = {self.n_families * self.n_first} names in all)")
        spare = self.n_families * self.n_first - self.n_known - self.n_unknown
        if self.mark_passes < 1:
            fail("mark_passes", "an integer >= 1")
        if not 0 <= self.n_obscure <= spare:
            fail("n_obscure", f"an integer in 0..{spare} (the names left after known and unknown entities)")
        for field in ("frequent_fraction", "family_share", "qa_fraction", "marker_rate", "correction_rate",
                      "cut_rate"):
            if field == "correction_rate" and self.correction_rate is None:
                continue
            if not 0 <= getattr(self, field) <= 1:
                fail(field, "a probability in [0, 1]")
        for field in ("frequent_docs", "rare_docs"):
            low, high = getattr(self, field)
            if not 1 <= low <= high:
                fail(field, "a pair (low, high) with 1 <= low <= high")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")])


def attribute_values(attribute: str) -> list[tuple[str, ...]]:
    """Every value of ``attribute`` as a tuple of tokens.

    Example:
        >>> attribute_values("birth_year")[0], len(attribute_values("birth_city"))
        (('195', '0'), 96)
    """
    if attribute == "birth_city":
        return [(p, r) for p in CITY_PREFIXES for r in CITY_ROOTS]
    if attribute == "birth_year":
        return [(d, y) for d in DECADES for y in DIGITS]
    if attribute == "profession":
        return [(v,) for v in PROFESSIONS]
    if attribute == "employer":
        return [(v,) for v in EMPLOYERS]
    raise KeyError(f"attribute {attribute!r}: expected one of {ATTRIBUTES}.")


_VALUE_SETS = {a: frozenset(attribute_values(a)) for a in ATTRIBUTES}
# Proper prefixes of each attribute's values, the empty one included: where a claim can be broken off.
_PREFIXES = {a: frozenset(v[:i] for v in values for i in range(len(v))) for a, values in _VALUE_SETS.items()}
# The last token of every value, and never any other token of one: a claim is complete when one is emitted.
CLOSING_WORDS: tuple[str, ...] = (*CITY_ROOTS, *DIGITS, *PROFESSIONS, *EMPLOYERS)
VALUE_WORDS: tuple[str, ...] = (*CITY_PREFIXES, *DECADES, *CLOSING_WORDS)


def _random_value(attribute: str, rng: np.random.Generator) -> tuple[str, ...]:
    values = attribute_values(attribute)
    return values[int(rng.integers(len(values)))]


def _sentence(attribute: str, value: Sequence[str]) -> str:
    return " ".join([*CUES[attribute], *value, "."])


def qa_prompt(name: str, attribute: str) -> str:
    """``<bos> q : <question> a :``.

    Example:
        >>> qa_prompt("ada moreno", "profession")
        '<bos> q : what does ada moreno do ? a :'
    """
    return f"<bos> q : {QUESTIONS[attribute].format(name=name)} a :"


def bio_prompt(name: str) -> str:
    """``<bos> about <name> :`` (the long-form prompt).

    Example:
        >>> bio_prompt("ada moreno")
        '<bos> about ada moreno :'
    """
    return f"<bos> about {name} :"


@dataclasses.dataclass(eq=False)
class ClaimWorld:
    """Entities, training documents and prompts of one claim world.

    Attributes:
        config: the :class:`ClaimWorldConfig`.
        tokenizer: :func:`make_claim_tokenizer`.
        entities: ``entity_id``, ``name``, ``family``, ``group``, ``n_documents`` and one column per
            attribute holding its value as a space-joined string.
        train_documents: ``text``, ``entity_id``, ``kind`` (``qa`` or ``bio``).
        queries: one QA prompt per (entity, attribute) and one long-form prompt per entity:
            ``prompt``, ``prompt_ids``, ``kind`` (``qa`` / ``bio``), ``attribute`` (``""`` for bio),
            ``entity_id``, ``group``, ``family``.
    """

    config: ClaimWorldConfig
    tokenizer: WordTokenizer
    entities: datasets.Dataset
    train_documents: datasets.Dataset
    queries: datasets.Dataset

    def __post_init__(self):
        table = self.entities.to_dict()
        self._group = table["group"]
        self._truth = {a: [tuple(v.split()) for v in table[a]] for a in ATTRIBUTES}

    def group(self, entity_id: int) -> str:
        """``frequent``, ``rare`` or ``unknown``."""
        return self._group[self._check(entity_id)]

    def truth(self, entity_id: int, attribute: str) -> tuple[str, ...]:
        """The entity's true value of ``attribute`` as tokens (hidden from training for unknown entities)."""
        if attribute not in self._truth:
            raise KeyError(f"attribute {attribute!r}: expected one of {ATTRIBUTES}.")
        return self._truth[attribute][self._check(entity_id)]

    def _check(self, entity_id: int) -> int:
        if not 0 <= int(entity_id) < len(self._group):
            raise IndexError(f"entity_id {entity_id!r} is not in this world (valid ids 0..{len(self._group) - 1}).")
        return int(entity_id)

    def is_supported(self, entity_id: int, attribute: str, value: Sequence[str]) -> bool:
        """A claim is supported iff the entity is known and ``value`` is its true value, token for token."""
        return self.group(entity_id) != "unknown" and tuple(value) == self.truth(entity_id, attribute)


def make_claim_world(config: ClaimWorldConfig = ClaimWorldConfig()) -> ClaimWorld:
    """Generates the claim world for ``config`` (same config, same datasets).

    Example:
        >>> world = make_claim_world(ClaimWorldConfig(n_known=40, n_unknown=10, n_families=6, n_first=12))
        >>> len(world.queries) == 50 * 5, world.entities["group"].count("unknown")
        (True, 10)
    """
    if not isinstance(config, ClaimWorldConfig):
        raise TypeError(f"config must be a ClaimWorldConfig, got {type(config).__name__}.")
    tok = make_claim_tokenizer()
    rng = _rng(config.seed, "entities")
    families = rng.permutation(len(SURNAMES))[: config.n_families]
    firsts = rng.permutation(len(FIRST_NAMES))[: config.n_first]
    # Names: a random set of (first, surname) pairs; known ones first. Every family has a known member, so
    # every unknown surname is a known family.
    codes = rng.permutation(config.n_families * config.n_first)
    cover = [f * config.n_first + int(rng.integers(config.n_first)) for f in range(config.n_families)]
    rest = [c for c in codes.tolist() if c not in set(cover)]
    n_extra = config.n_known - len(cover)
    known = cover + rest[:max(n_extra, 0)] if n_extra >= 0 else cover[: config.n_known]
    chosen = known + rest[max(n_extra, 0): max(n_extra, 0) + config.n_unknown]
    obscure = rest[max(n_extra, 0) + config.n_unknown: max(n_extra, 0) + config.n_unknown + config.n_obscure]
    profile = {f: {a: _random_value(a, rng) for a in FAMILY_ATTRIBUTES} for f in range(config.n_families)}
    n_frequent = int(np.clip(round(config.frequent_fraction * config.n_known), 1, config.n_known - 1))
    columns: dict[str, list] = {k: [] for k in ("entity_id", "name", "family", "group", "n_documents", *ATTRIBUTES)}
    for i, code in enumerate(chosen):
        f = code // config.n_first
        group = "frequent" if i < n_frequent else "rare" if i < config.n_known else "unknown"
        lo, hi = config.frequent_docs if group == "frequent" else config.rare_docs
        columns["entity_id"].append(i)
        columns["name"].append(f"{FIRST_NAMES[firsts[code % config.n_first]]} {SURNAMES[families[f]]}")
        columns["family"].append(int(f))
        columns["group"].append(group)
        columns["n_documents"].append(0 if group == "unknown" else int(rng.integers(lo, hi + 1)))
        for a in ATTRIBUTES:
            value = _random_value(a, rng)
            if a in FAMILY_ATTRIBUTES and rng.random() < config.family_share:
                value = profile[f][a]
                if a == "birth_year":  # the family fixes the decade; the year digit is the member's own
                    value = (value[0], DIGITS[int(rng.integers(10))])
            columns[a].append(" ".join(value))
    entities = datasets.Dataset.from_dict(columns)
    world = ClaimWorld(config, tok, entities, datasets.Dataset.from_dict({"text": [], "entity_id": [], "kind": []}),
                       datasets.Dataset.from_dict({"prompt": []}))
    obscure_names = [f"{FIRST_NAMES[firsts[c % config.n_first]]} {SURNAMES[families[c // config.n_first]]}"
                     for c in obscure]
    world.train_documents = _documents(world, obscure_names)
    world.queries = _queries(world)
    return world


def _documents(world: ClaimWorld, obscure_names: Sequence[str] = ()) -> datasets.Dataset:
    c, rng = world.config, _rng(world.config.seed, "documents")
    # Cuts, and the marks of every pass after the first, draw from their own streams, so cut_rate = 0 and
    # mark_passes = 1 leave every document as it was.
    cut = _Cutter(c.cut_rate, _rng(c.seed, "cuts"))
    out: dict[str, list] = {"text": [], "entity_id": [], "kind": []}
    _obscure_documents(c, obscure_names, out)
    contents, names = [], list(world.entities["name"])
    for e, n_docs in enumerate(world.entities["n_documents"]):
        for _ in range(n_docs):
            if rng.random() < c.qa_fraction:
                contents.append((e, "qa", (ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))],)))
            else:
                stated = [a for a in ATTRIBUTES if rng.random() < 0.6] or [ATTRIBUTES[int(rng.integers(4))]]
                contents.append((e, "bio", tuple(stated)))
            _append_document(world, names, *contents[-1], rng, cut, out)
    marks = _rng(c.seed, "marks")
    for _ in range(c.mark_passes - 1):
        for content in contents:
            _append_document(world, names, *content, marks, cut, out)
    order = rng.permutation(len(out["text"])).tolist()
    return datasets.Dataset.from_dict({k: [v[i] for i in order] for k, v in out.items()})


def _append_document(world: ClaimWorld, names: Sequence[str], e: int, kind: str, attributes: tuple[str, ...],
                     rng: np.random.Generator, cut: _Cutter, out: dict[str, list]) -> None:
    """Writes entity ``e``'s document stating ``attributes``, drawing its random marks from ``rng``."""
    c, name = world.config, names[e]
    corrections = c.marker_rate if c.correction_rate is None else c.correction_rate
    if kind == "qa":
        a = attributes[0]
        answer = ABSTAIN if rng.random() < c.marker_rate else _marked(a, world.truth(e, a), rng, corrections, cut)
        out["text"].append(f"{qa_prompt(name, a)} {answer} {EOS}")
    else:
        body = " ".join(" ".join([*CUES[a], _marked(a, world.truth(e, a), rng, corrections, cut), "."])
                        for a in attributes)
        out["text"].append(f"{bio_prompt(name)} {body} {EOS}")
    out["kind"].append(kind)
    out["entity_id"].append(e)


def _obscure_documents(c: ClaimWorldConfig, names: Sequence[str], out: dict[str, list]) -> None:
    """Appends the documents of the obscure people (entity_id -1): every answer ``unknown``.

    Drawn from their own random stream, so ``n_obscure = 0`` leaves every other document as it was.
    """
    rng = _rng(c.seed, "obscure")
    for name in names:
        for _ in range(int(rng.integers(c.rare_docs[0], c.rare_docs[1] + 1))):
            if rng.random() < c.qa_fraction:
                out["text"].append(f"{qa_prompt(name, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))])} {ABSTAIN} {EOS}")
                out["kind"].append("qa")
            else:
                stated = [a for a in ATTRIBUTES if rng.random() < 0.6] or [ATTRIBUTES[int(rng.integers(4))]]
                body = " ".join(f"{' '.join(CUES[a])} {ABSTAIN} ." for a in stated)
                out["text"].append(f"{bio_prompt(name)} {body} {EOS}")
                out["kind"].append("bio")
            out["entity_id"].append(-1)


class _Cutter(NamedTuple):
    """Breaks a true claim off at each of its tokens with probability ``rate`` (a constant hazard)."""

    rate: float
    rng: np.random.Generator

    def __call__(self, value: tuple[str, ...]) -> str:
        for j in range(len(value) if self.rate > 0 else 0):
            if self.rng.random() < self.rate:
                fix = " ".join(value) if self.rng.random() < 0.5 else ABSTAIN
                return " ".join([*value[:j], RETRACT, fix])
        return " ".join(value)


def _marked(attribute: str, value: tuple[str, ...], rng: np.random.Generator, rate: float,
            cut: _Cutter | None = None) -> str:
    """The value (broken off at random by ``cut``), or rarely ``wrong <retract> value|unknown`` (random, unrelated
    to what a model knows)."""
    if rng.random() >= rate:
        return cut(value) if cut is not None else " ".join(value)
    wrong = value
    while wrong == value:
        wrong = _random_value(attribute, rng)
    fix = " ".join(value) if rng.random() < 0.5 else ABSTAIN
    return f"{' '.join(wrong)} {RETRACT} {fix}"


def _queries(world: ClaimWorld) -> datasets.Dataset:
    out: dict[str, list] = {k: [] for k in ("prompt", "prompt_ids", "kind", "attribute", "entity_id", "group",
                                            "family")}
    ent = world.entities.to_dict()
    for e in range(len(ent["name"])):
        for kind, attribute in [("qa", a) for a in ATTRIBUTES] + [("bio", "")]:
            prompt = qa_prompt(ent["name"][e], attribute) if kind == "qa" else bio_prompt(ent["name"][e])
            out["prompt"].append(prompt)
            out["prompt_ids"].append(world.tokenizer.encode(prompt))
            out["kind"].append(kind)
            out["attribute"].append(attribute)
            out["entity_id"].append(e)
            out["group"].append(ent["group"][e])
            out["family"].append(ent["family"][e])
    return datasets.Dataset.from_dict(out)


# ----------------------------------------------------------------------------------------------
# Parsing completions into claims.


class Claim(NamedTuple):
    """One claim in a completion: tokens ``start:end`` (indices into the completion) state ``attribute``."""

    start: int
    end: int
    attribute: str
    supported: bool
    final: bool  # the last word on its attribute (not retracted or corrected later)


class Cut(NamedTuple):
    """A claim broken off by ``<retract>`` before it was complete: tokens ``start:end`` are a proper prefix of a
    value of ``attribute`` (empty when the retraction came before its first token). It has no label: what it would
    have said is unknown."""

    start: int
    end: int
    attribute: str


class ParsedCompletion(NamedTuple):
    """What a completion says, labelled from ground truth.

    Attributes:
      claims: every complete claim made, in order (including ones later retracted or corrected).
      outcome: per attribute addressed, ``"supported"``, ``"hallucinated"`` or ``"retracted"`` (the
        final word on it is a retraction or ``unknown``).
      retractions: how many times ``<retract>`` follows a claim or breaks one off.
      malformed: no ``<eos>``, or a sentence / answer that is not a well-formed claim.
      cuts: claims broken off by ``<retract>`` (:class:`Cut`), in order.
    """

    claims: list[Claim]
    outcome: dict[str, str]
    retractions: int
    malformed: bool
    cuts: Sequence[Cut] = ()


def parse_completion(world: ClaimWorld, entity_id: int, kind: str, attribute: str,
                     token_ids: Sequence[int]) -> ParsedCompletion:
    """Parses generated ``token_ids`` (the completion only) into labelled claims.

    QA (``kind="qa"``): the body before ``<eos>`` is ``claim (<retract> (claim | unknown)?)*``
    about ``attribute``, where a claim may also be broken off by ``<retract>`` before it is complete (a
    :class:`Cut`: a proper prefix of a value, possibly empty, with no label). Long-form (``kind="bio"``):
    sentences ending in ``.``, each a cue (``from``, ``born``, ``works as``, ``employed by``) then the same
    claim grammar.

    Example:
        >>> world = make_claim_world(ClaimWorldConfig(n_known=40, n_unknown=10, n_families=6, n_first=12))
        >>> ids = world.tokenizer.encode("works as baker <retract> unknown . <eos>")
        >>> p = parse_completion(world, 0, "bio", "", ids)
        >>> p.outcome, p.retractions, [(c.start, c.end, c.final) for c in p.claims]
        ({'profession': 'retracted'}, 1, [(2, 3, False)])
        >>> cut = parse_completion(world, 0, "qa", "birth_year", world.tokenizer.encode("197 <retract> <eos>"))
        >>> cut.outcome, cut.claims, cut.cuts
        ({'birth_year': 'retracted'}, [], [Cut(start=0, end=1, attribute='birth_year')])
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"parse_completion: kind={kind!r}; expected one of {PROMPT_KINDS}.")
    words = [world.tokenizer.id_to_token(int(t)) for t in token_ids]
    malformed = EOS not in words
    body = words[: words.index(EOS)] if EOS in words else words
    if kind == "qa":
        if attribute not in ATTRIBUTES:
            raise ValueError(f"parse_completion: attribute={attribute!r}; expected one of {ATTRIBUTES} for QA.")
        segments = [(0, len(body), attribute)] if body else []
        malformed |= not body
    else:
        segments, start = [], 0
        for i, w in enumerate(body + ["."]):
            if w != ".":
                continue
            if i == len(body) and start == i:
                break
            if i == len(body):  # an unterminated sentence
                malformed = True
                break
            sentence = body[start:i]
            found = [a for a in ATTRIBUTES if tuple(sentence[: len(CUES[a])]) == CUES[a]]
            if not found:
                malformed = True
            else:
                segments.append((start + len(CUES[found[0]]), i, found[0]))
            start = i + 1
    claims, cuts, outcome, retractions = [], [], {}, 0
    for lo, hi, a in segments:
        parts, part_start = [], lo
        for i in range(lo, hi + 1):
            if i == hi or body[i] == RETRACT:
                parts.append((part_start, i))
                part_start = i + 1
        final_state = None
        for j, (s, e) in enumerate(parts):
            value = tuple(body[s:e])
            if value in _VALUE_SETS[a]:
                claims.append(Claim(s, e, a, world.is_supported(entity_id, a, value), j == len(parts) - 1))
                final_state = "supported" if claims[-1].supported else "hallucinated"
                if j < len(parts) - 1:
                    retractions += 1
            elif j < len(parts) - 1 and value in _PREFIXES[a] and (value or j == 0):
                cuts.append(Cut(s, e, a))  # broken off before it was complete (a value's proper prefix)
                final_state = "retracted"
                retractions += 1
            elif j > 0 and value in ((), (ABSTAIN,)):
                final_state = "retracted"
            elif j == 0 and value == (ABSTAIN,) and len(parts) == 1:
                final_state = "retracted"  # abstained outright
            else:
                malformed = True
                final_state = None
                break
        if final_state is not None:
            outcome[a] = final_state
    return ParsedCompletion(claims, outcome, retractions, malformed, cuts)
