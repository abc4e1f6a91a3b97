"""What a knowledge world is made of: its attributes, name pools and vocabulary (:func:`make_knowledge_tokenizer`),
and :class:`KnowledgeWorldConfig` with its validation. Generation and the world itself are in
:mod:`idesign.data.knowledge`, which re-exports these names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NoReturn

import numpy as np

from idesign.data.tokenizer import WordTokenizer

@dataclasses.dataclass(frozen=True)
class _AttributeSpec:
    values: tuple[str, ...]
    statement: str  # bio sentence, with {name} and {value}
    question: str  # QA question, with {name}


_ATTRIBUTES: dict[str, _AttributeSpec] = {
    "birth_city": _AttributeSpec(
        values=("lisbon", "paris", "berlin", "madrid", "rome", "vienna", "prague", "oslo",
                "dublin", "athens", "cairo", "lima", "tokyo", "seoul", "delhi", "sydney",
                "toronto", "boston", "chicago", "denver", "nairobi", "lagos", "quito", "hanoi"),
        statement="{name} was born in {value} .",
        question="where was {name} born ?",
    ),
    "profession": _AttributeSpec(
        values=("baker", "teacher", "doctor", "lawyer", "pilot", "farmer", "nurse", "engineer",
                "chemist", "painter", "writer", "architect", "carpenter", "plumber", "dentist",
                "journalist", "musician", "librarian", "electrician", "tailor"),
        statement="{name} works as a {value} .",
        question="what does {name} do ?",
    ),
    "birth_year": _AttributeSpec(
        values=tuple(str(year) for year in range(1950, 1980)),
        # "in the year" rather than "in", so a bio sentence names the attribute it states.
        statement="{name} was born in the year {value} .",
        question="when was {name} born ?",
    ),
    "employer": _AttributeSpec(
        values=("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka",
                "cyberdyne", "tyrell", "soylent", "oscorp", "monarch", "dunder", "aperture",
                "nakatomi", "gringotts", "stark", "wayne", "zorg", "massive"),
        statement="{name} works for {value} .",
        question="who does {name} work for ?",
    ),
}

SUPPORTED_ATTRIBUTES: tuple[str, ...] = tuple(_ATTRIBUTES)
GROUPS: tuple[str, ...] = ("frequent", "rare", "unknown")
DOCUMENT_KINDS: tuple[str, ...] = ("bio", "qa")

FIRST_NAMES: tuple[str, ...] = (
    "ada", "alan", "alice", "amir", "anna", "arjun", "beatrix", "boris", "carla", "chen",
    "clara", "dmitri", "elena", "emil", "farah", "felix", "greta", "hana", "hugo", "ines",
    "ivan", "jonas", "julia", "kai", "karim", "lena", "leo", "lucia", "malik", "maria",
    "marta", "milo", "nadia", "nina", "omar", "oscar", "paula", "pedro", "petra", "quinn",
    "rafael", "rosa", "sami", "sara", "sofia", "tariq", "theo", "tomas", "una", "uri",
    "vera", "victor", "wanda", "xavier", "yara", "yusuf", "zara", "zoltan", "ingrid", "kenji",
)
SURNAMES: tuple[str, ...] = (
    "moreno", "smith", "tanaka", "kowalski", "novak", "garcia", "mueller", "rossi", "dubois",
    "silva", "jensen", "nakamura", "okafor", "petrov", "lindqvist", "haddad", "kim", "nguyen",
    "osei", "fischer", "bianchi", "costa", "horvat", "ivanova", "janssen", "kaur", "larsen",
    "mendez", "nilsson", "ortiz", "patel", "quintero", "reyes", "schmidt", "takahashi", "urban",
    "vargas", "weber", "yilmaz", "zhang", "abbott", "brennan", "castillo", "delgado", "eriksen",
    "fontaine", "gallo", "hoffman", "iqbal", "jovanovic", "keller", "lambert", "marsh", "ng",
    "olsen", "pereira", "ramos", "sato", "torres", "wong",
)

# Bump when generation changes, so caches written by older code are not reused.
_GENERATOR_VERSION = 1


def _qa_prompt(spec: _AttributeSpec, name: str) -> str:
    return f"<bos> q : {spec.question.format(name=name)} a :"


def _template_words() -> list[str]:
    words = "<bos> <eos> q : a :".split()
    for spec in _ATTRIBUTES.values():
        words += spec.statement.format(name="", value="").split()
        words += spec.question.format(name="").split()
    return words


def make_knowledge_tokenizer() -> WordTokenizer:
    """The knowledge world's vocabulary: special tokens, template words, names, attribute values.

    The vocabulary does not depend on the config, so every world shares one tokenizer.

    Example:
        >>> tok = make_knowledge_tokenizer()
        >>> tok.decode(tok.encode("q : where was ada moreno born ? a : lisbon"))
        'q : where was ada moreno born ? a : lisbon'
    """
    values = [v for spec in _ATTRIBUTES.values() for v in spec.values]
    return WordTokenizer.from_words([*_template_words(), *FIRST_NAMES, *SURNAMES, *values])


def max_names(n_known: int) -> int:
    """How many distinct names a world with ``n_known`` known entities can draw.

    Names combine the first names and surnames that known entities use; with fewer known entities
    than a pool holds, only ``n_known`` tokens of that pool are in use.

    Example:
        >>> max_names(10), max_names(1000)
        (100, 3600)
    """
    return min(len(FIRST_NAMES), n_known) * min(len(SURNAMES), n_known)


@dataclasses.dataclass(frozen=True)
class KnowledgeWorldConfig:
    """What world to generate; the world is a deterministic function of this config.

    Attributes:
        n_known: entities that appear in training documents.
        n_unknown: entities that never appear in training (queries only).
        attributes: which of :data:`SUPPORTED_ATTRIBUTES` each entity has.
        frequent_fraction: share of known entities, by document count, in the ``frequent`` group;
            the rest are ``rare``. Counts never increase with rank, so a frequent entity has at
            least as many documents as any rare one; with few documents or a flat power law the
            two groups can tie at the boundary (compare the means in ``summary()``).
        zipf_exponent: document counts fall off as ``1 / rank ** zipf_exponent`` (0 = uniform).
        n_documents: total training documents.
        min_mentions: every known entity gets at least this many documents.
        qa_fraction: expected share of QA documents (the rest are bios).
        seed: seeds every random choice.

    Example:
        >>> KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=50).n_known
        10
        >>> KnowledgeWorldConfig(frequent_fraction=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: KnowledgeWorldConfig.frequent_fraction = 1.5: expected a number strictly ...
    """

    n_known: int = 200
    n_unknown: int = 50
    attributes: tuple[str, ...] = SUPPORTED_ATTRIBUTES
    frequent_fraction: float = 0.2
    zipf_exponent: float = 1.0
    n_documents: int = 20000
    min_mentions: int = 2
    qa_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.attributes, str):
            _fail("attributes", self.attributes, "a tuple of attribute names, not a string")
        object.__setattr__(self, "attributes", tuple(self.attributes))
        _validate(self)
        # Plain Python numbers, so that 1 and 1.0 (or np.int64(1)) hash and cache alike.
        for field in dataclasses.fields(self):
            if field.name != "attributes":
                number_type = float if field.type == "float" else int
                object.__setattr__(self, field.name, number_type(getattr(self, field.name)))

    @property
    def n_frequent(self) -> int:
        """Known entities in the ``frequent`` group (at least one, and at least one rare)."""
        return int(np.clip(round(self.frequent_fraction * self.n_known), 1, self.n_known - 1))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values.

        Example:
            >>> KnowledgeWorldConfig().to_dict()["attributes"]
            ['birth_city', 'profession', 'birth_year', 'employer']
        """
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """A stable hash of the config (and generator version), used to name cache folders.

        Example:
            >>> KnowledgeWorldConfig().fingerprint() == KnowledgeWorldConfig().fingerprint()
            True
            >>> KnowledgeWorldConfig(seed=1).fingerprint() == KnowledgeWorldConfig().fingerprint()
            False
        """
        payload = json.dumps({"generator": _GENERATOR_VERSION, "config": self.to_dict()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _fail(field: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"KnowledgeWorldConfig.{field} = {value!r}: expected {expected}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)) and np.isfinite(value))


def _validate(c: KnowledgeWorldConfig) -> None:
    if not _is_int(c.n_known) or c.n_known < 2:
        _fail("n_known", c.n_known, "an integer >= 2 (at least one frequent and one rare entity)")
    if c.n_known > max_names(c.n_known):
        _fail("n_known", c.n_known,
              f"at most {max_names(c.n_known)}, the number of first-name x surname combinations")
    if not _is_int(c.n_unknown) or c.n_unknown < 0:
        _fail("n_unknown", c.n_unknown, "an integer >= 0")
    if c.n_known + c.n_unknown > max_names(c.n_known):
        _fail("n_unknown", c.n_unknown,
              f"at most {max_names(c.n_known) - c.n_known}: with n_known={c.n_known} the name "
              f"tokens in use form only {max_names(c.n_known)} distinct names")
    if not c.attributes:
        _fail("attributes", c.attributes, f"a non-empty tuple of names from {SUPPORTED_ATTRIBUTES}")
    for attribute in c.attributes:
        if attribute not in _ATTRIBUTES:
            _fail("attributes", c.attributes,
                  f"names from {SUPPORTED_ATTRIBUTES}; {attribute!r} is not one of them")
    if len(set(c.attributes)) != len(c.attributes):
        _fail("attributes", c.attributes, "no repeated attribute names")
    if not _is_number(c.frequent_fraction) or not 0 < c.frequent_fraction < 1:
        _fail("frequent_fraction", c.frequent_fraction, "a number strictly between 0 and 1")
    if not _is_number(c.zipf_exponent) or c.zipf_exponent < 0:
        _fail("zipf_exponent", c.zipf_exponent, "a finite number >= 0")
    if not _is_int(c.min_mentions) or c.min_mentions < 1:
        _fail("min_mentions", c.min_mentions, "an integer >= 1")
    if not _is_int(c.n_documents) or c.n_documents < c.n_known * c.min_mentions:
        _fail("n_documents", c.n_documents,
              f"an integer >= n_known * min_mentions = {c.n_known * c.min_mentions}")
    if not _is_number(c.qa_fraction) or not 0 <= c.qa_fraction <= 1:
        _fail("qa_fraction", c.qa_fraction, "a number between 0 and 1")
    if not _is_int(c.seed) or c.seed < 0:
        _fail("seed", c.seed, "an integer >= 0")
