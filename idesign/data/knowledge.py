"""A synthetic "knowledge world": entities with attributes, documents about them, and queries.

The world exists to measure hallucination exactly. Known entities are written about in training
documents, a few often (``frequent``) and most seldom (``rare``), following a power law; ``unknown``
entities never appear in training at all. Every (entity, attribute) query has a single-token gold
answer, so "what did the model say" is one comparison. Unknown entities have ground-truth
attributes too, but the model cannot have learned them: any confident attribute answer for an
unknown entity is a hallucination, whether or not it happens to equal the hidden truth.

Entity names are a first name plus a surname drawn from fixed pools. Every name token an unknown
entity uses also occurs in some known entity's name, so only the *combination* is new and a
model cannot spot unknown entities by token identity.

Documents are whitespace-tokenised lowercase words (see :mod:`idesign.data.tokenizer`)::

    bio: <bos> ada moreno works for acme . ada moreno was born in lisbon . <eos>
    qa:  <bos> q : where was ada moreno born ? a : lisbon <eos>

and a query prompt is a QA document cut after ``a :``. The abstain word ``unknown`` and the
retraction marker ``<retract>`` are in the vocabulary but never in a training document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np

from idesign.data._knowledge_config import (  # noqa: F401 - the public names are re-exported
    _ATTRIBUTES,
    DOCUMENT_KINDS,
    FIRST_NAMES,
    GROUPS,
    SUPPORTED_ATTRIBUTES,
    SURNAMES,
    KnowledgeWorldConfig,
    _is_int,
    _qa_prompt,
    make_knowledge_tokenizer,
    max_names,
)
from idesign.data.tokenizer import WordTokenizer

# ----------------------------------------------------------------------------------------------
# Generation. Each random choice draws from its own stream, keyed by what it is for, so changing
# one part of the config (say n_documents) leaves unrelated choices (names, attributes) alone.


def _rng(seed: int, *purpose: str) -> np.random.Generator:
    keys = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little") for p in purpose]
    return np.random.default_rng([seed, *keys])


def _sample_names(n_known: int, n_unknown: int, rng: np.random.Generator) -> list[str]:
    """Known names first, then unknown ones; every token used also occurs in a known name."""
    firsts = rng.permutation(len(FIRST_NAMES))[: min(len(FIRST_NAMES), n_known)]
    lasts = rng.permutation(len(SURNAMES))[: min(len(SURNAMES), n_known)]
    n_first, n_last = len(firsts), len(lasts)
    # A name is a code `f * n_last + l`. The cover pairs use every chosen token once.
    cover = [(i % n_first) * n_last + i % n_last for i in range(max(n_first, n_last))]
    rest = rng.permutation(np.setdiff1d(np.arange(n_first * n_last), cover))
    n_extra = n_known - len(cover)
    known = rng.permutation(np.concatenate([cover, rest[:n_extra]]).astype(int))
    unknown = rest[n_extra : n_extra + n_unknown]
    return [f"{FIRST_NAMES[firsts[code // n_last]]} {SURNAMES[lasts[code % n_last]]}"
            for code in [*known.tolist(), *unknown.tolist()]]


def _sample_values(values: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    return [values[i] for i in rng.integers(len(values), size=n).tolist()]


def _zipf_document_counts(config: KnowledgeWorldConfig) -> np.ndarray:
    """Documents per known entity by frequency rank: ``min_mentions`` plus a power-law share."""
    n = config.n_known
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** config.zipf_exponent
    spare = config.n_documents - n * config.min_mentions
    share = spare * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    # Largest remainders get the leftover documents; the stable sort breaks ties by rank, which
    # keeps counts non-increasing in rank.
    leftover = spare - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:leftover]] += 1
    return counts + config.min_mentions


def _plan_documents(n_documents: int, attributes: tuple[str, ...], qa_fraction: float,
                    rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """``(kind, attributes stated)`` per document of one entity; every attribute is stated."""
    smallest_bio = min(2, len(attributes))
    plans: list[tuple[str, list[str]]] = []
    for is_qa in rng.random(n_documents) < qa_fraction:
        if is_qa:
            plans.append(("qa", [attributes[rng.integers(len(attributes))]]))
        else:
            k = int(rng.integers(smallest_bio, len(attributes) + 1))
            plans.append(("bio", [str(a) for a in rng.permutation(attributes)[:k]]))
    stated = {a for _, attrs in plans for a in attrs}
    missing = [a for a in attributes if a not in stated]
    if missing:
        # Rare entities may get too few documents to cover every attribute by chance; fold the
        # missing ones into a bio (turning a QA document into one if there is no bio).
        bios = [i for i, (kind, _) in enumerate(plans) if kind == "bio"]
        target = bios[rng.integers(len(bios))] if bios else int(rng.integers(len(plans)))
        merged = plans[target][1] + missing
        plans[target] = ("bio", [merged[i] for i in rng.permutation(len(merged))])
    return plans


def _render(kind: str, name: str, attrs: list[str], truth: dict[str, str]) -> str:
    if kind == "qa":
        (attribute,) = attrs
        return f"{_qa_prompt(_ATTRIBUTES[attribute], name)} {truth[attribute]} <eos>"
    sentences = [_ATTRIBUTES[a].statement.format(name=name, value=truth[a]) for a in attrs]
    return f"<bos> {' '.join(sentences)} <eos>"


_ENTITY_FEATURES = {"entity_id": "int32", "name": "string", "group": "string",
                    "n_documents": "int32"}
_DOCUMENT_FEATURES = datasets.Features({
    "text": datasets.Value("string"),
    "entity_id": datasets.Value("int32"),
    "kind": datasets.Value("string"),
    "attributes": datasets.List(datasets.Value("string")),
})
_QUERY_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "answer": datasets.Value("string"),
    "answer_id": datasets.Value("int32"),
    "entity_id": datasets.Value("int32"),
    "group": datasets.Value("string"),
    "attribute": datasets.Value("string"),
    "n_mentions": datasets.Value("int32"),
    "seen_as_qa": datasets.Value("bool"),
})


def _entity_features(attributes: Sequence[str]) -> datasets.Features:
    columns = {k: datasets.Value(v) for k, v in _ENTITY_FEATURES.items()}
    columns.update({a: datasets.Value("string") for a in attributes})
    return datasets.Features(columns)


def _build_world(config: KnowledgeWorldConfig) -> KnowledgeWorld:
    tokenizer = make_knowledge_tokenizer()
    n_total = config.n_known + config.n_unknown
    names = _sample_names(config.n_known, config.n_unknown, _rng(config.seed, "names"))
    truth = {a: _sample_values(_ATTRIBUTES[a].values, n_total, _rng(config.seed, "attribute", a))
             for a in config.attributes}
    rank = _rng(config.seed, "rank").permutation(config.n_known)
    counts = np.concatenate([_zipf_document_counts(config)[rank],
                             np.zeros(config.n_unknown, np.int64)]).tolist()
    groups = ([("frequent" if r < config.n_frequent else "rare") for r in rank]
              + ["unknown"] * config.n_unknown)
    entities = {"entity_id": list(range(n_total)), "name": names, "group": groups,
                "n_documents": counts, **truth}
    documents = _make_documents(config, entities)
    return KnowledgeWorld(
        config=config,
        tokenizer=tokenizer,
        entities=datasets.Dataset.from_dict(entities, features=_entity_features(config.attributes)),
        train_documents=datasets.Dataset.from_dict(documents, features=_DOCUMENT_FEATURES),
        queries=datasets.Dataset.from_dict(_make_queries(config, entities, documents, tokenizer),
                                           features=_QUERY_FEATURES),
    )


def _make_documents(config: KnowledgeWorldConfig, entities: dict[str, list]) -> dict[str, list]:
    """Training documents as columns, in a seeded shuffled order."""
    rng = _rng(config.seed, "documents")
    columns: dict[str, list] = {k: [] for k in _DOCUMENT_FEATURES}
    for entity in range(config.n_known):  # known entities come first; unknown ones get none
        truth = {a: entities[a][entity] for a in config.attributes}
        for kind, attrs in _plan_documents(entities["n_documents"][entity], config.attributes,
                                           config.qa_fraction, rng):
            columns["text"].append(_render(kind, entities["name"][entity], attrs, truth))
            columns["entity_id"].append(entity)
            columns["kind"].append(kind)
            columns["attributes"].append(attrs)
    order = _rng(config.seed, "document_order").permutation(len(columns["text"])).tolist()
    return {k: [v[i] for i in order] for k, v in columns.items()}


def _make_queries(config: KnowledgeWorldConfig, entities: dict[str, list],
                  documents: dict[str, list], tokenizer: WordTokenizer) -> dict[str, list]:
    """One query per (entity, attribute) as columns, groups in the order of :data:`GROUPS`."""
    mentions: dict[tuple[int, str], int] = {}
    seen_as_qa: set[tuple[int, str]] = set()
    for entity, kind, attrs in zip(documents["entity_id"], documents["kind"],
                                   documents["attributes"]):
        for a in attrs:
            mentions[entity, a] = mentions.get((entity, a), 0) + 1
            if kind == "qa":
                seen_as_qa.add((entity, a))
    columns: dict[str, list] = {k: [] for k in _QUERY_FEATURES}
    for group in GROUPS:
        for entity in (e for e, g in enumerate(entities["group"]) if g == group):
            for a in config.attributes:
                prompt = _qa_prompt(_ATTRIBUTES[a], entities["name"][entity])
                answer = entities[a][entity]
                columns["prompt"].append(prompt)
                columns["prompt_ids"].append(tokenizer.encode(prompt))
                columns["answer"].append(answer)
                columns["answer_id"].append(tokenizer.token_to_id(answer))
                columns["entity_id"].append(entity)
                columns["group"].append(group)
                columns["attribute"].append(a)
                columns["n_mentions"].append(mentions.get((entity, a), 0))
                columns["seen_as_qa"].append((entity, a) in seen_as_qa)
    return columns


# ----------------------------------------------------------------------------------------------
# The world.


@dataclasses.dataclass(eq=False)
class KnowledgeWorld:
    """Entities, training documents and evaluation queries of one generated world.

    Attributes:
        config: the config it was generated from.
        tokenizer: the word tokenizer (shared by all worlds, see :func:`make_knowledge_tokenizer`).
        entities: one row per entity: ``entity_id`` (= row index), ``name``, ``group``
            (``frequent``, ``rare`` or ``unknown``), ``n_documents`` (0 for unknown) and one
            column per attribute holding its true value.
        train_documents: ``text``, ``entity_id``, ``kind`` (``bio`` or ``qa``) and ``attributes``
            (the attributes the document states), in a shuffled order.
        queries: one row per (entity, attribute), groups in the order frequent, rare, unknown:
            ``prompt`` (ending in ``a :``), ``prompt_ids``, gold ``answer`` and ``answer_id``,
            ``entity_id``, ``group``, ``attribute``, ``n_mentions`` (training documents stating this
            fact) and ``seen_as_qa`` (whether the exact QA pair is in training).

    Example:
        >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
        >>> world = make_knowledge_world(config)
        >>> q = world.queries[0]
        >>> q["prompt"].endswith("a :"), world.truth(q["entity_id"], q["attribute"]) == q["answer"]
        (True, True)
    """

    config: KnowledgeWorldConfig
    tokenizer: WordTokenizer
    entities: datasets.Dataset
    train_documents: datasets.Dataset
    queries: datasets.Dataset

    def __post_init__(self):
        table = self.entities.select_columns(["entity_id", "group", *self.config.attributes])
        table = table.to_dict()
        if table["entity_id"] != list(range(len(self.entities))):
            raise ValueError("entities must be sorted by entity_id, with entity_id == row index.")
        self._groups: list[str] = table["group"]
        self._truth: dict[str, list[str]] = {a: table[a] for a in self.config.attributes}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"KnowledgeWorld(frequent={s['n_frequent']}, rare={s['n_rare']}, "
                f"unknown={s['n_unknown']}, documents={s['n_documents']}, "
                f"queries={s['n_queries']}, vocab_size={s['vocab_size']}, seed={self.config.seed})")

    def _check_entity(self, entity_id: int) -> int:
        if not _is_int(entity_id) or not 0 <= entity_id < len(self._groups):
            raise IndexError(f"entity_id {entity_id!r} is not in this world "
                             f"(valid ids are 0..{len(self._groups) - 1}).")
        return int(entity_id)

    def _check_attribute(self, attribute: str) -> str:
        if attribute not in self._truth:
            raise KeyError(f"Attribute {attribute!r} is not in this world; its attributes are "
                           f"{self.config.attributes}.")
        return attribute

    def group(self, entity_id: int) -> str:
        """``frequent``, ``rare`` or ``unknown``.

        Example:
            >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
            >>> world = make_knowledge_world(config)
            >>> world.group(11)
            'unknown'
        """
        return self._groups[self._check_entity(entity_id)]

    def truth(self, entity_id: int, attribute: str) -> str:
        """The true value of ``attribute`` for the entity (hidden from training if it is unknown).

        Example:
            >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
            >>> world = make_knowledge_world(config)
            >>> world.truth(0, "birth_city") in world.attribute_values("birth_city")
            True
        """
        return self._truth[self._check_attribute(attribute)][self._check_entity(entity_id)]

    def is_supported(self, entity_id: int, attribute: str, answer_token: str) -> bool:
        """Whether ``answer_token`` is the entity's true value of ``attribute``.

        This is a fact check only. For ``unknown`` entities the training data holds no evidence,
        so a model cannot have *known* the answer: treat any attribute answer for them as a
        hallucination even when this returns True (a lucky guess). The abstain word ``unknown``
        is never supported.

        Example:
            >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
            >>> world = make_knowledge_world(config)
            >>> world.is_supported(0, "profession", world.truth(0, "profession"))
            True
            >>> world.is_supported(0, "profession", "unknown")
            False
        """
        return answer_token == self.truth(entity_id, attribute)

    def attribute_values(self, attribute: str) -> list[str]:
        """The candidate answer tokens for ``attribute``.

        Example:
            >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
            >>> world = make_knowledge_world(config)
            >>> world.attribute_values("birth_year")[:3]
            ['1950', '1951', '1952']
        """
        return list(_ATTRIBUTES[self._check_attribute(attribute)].values)

    def summary(self) -> dict[str, Any]:
        """Flat counts for logs and ``metrics.json``.

        Example:
            >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
            >>> world = make_knowledge_world(config)
            >>> s = world.summary()
            >>> s["n_frequent"], s["n_rare"], s["n_unknown"], s["n_documents"]
            (2, 8, 2, 40)
        """
        counts = np.asarray(self.entities["n_documents"])
        groups = np.asarray(self._groups)
        kinds = list(self.train_documents["kind"])
        out: dict[str, Any] = {}
        for g in GROUPS:
            out[f"n_{g}"] = int((groups == g).sum())
        for g in GROUPS:
            out[f"documents_{g}"] = int(counts[groups == g].sum())
        for g in ("frequent", "rare"):
            out[f"mean_documents_{g}"] = float(counts[groups == g].mean())
        out.update(n_documents=len(kinds), n_bio=kinds.count("bio"), n_qa=kinds.count("qa"),
                   n_queries=len(self.queries), n_attributes=len(self.config.attributes),
                   vocab_size=self.tokenizer.vocab_size)
        return out


# ----------------------------------------------------------------------------------------------
# Construction and caching.


def make_knowledge_world(config: KnowledgeWorldConfig, *,
                         cache_dir: str | Path | None = None) -> KnowledgeWorld:
    """Generates the world for ``config``; the same config always gives identical datasets.

    Args:
        config: what to generate.
        cache_dir: if given, the world is saved under ``cache_dir/knowledge_world-<fingerprint>``
            (with ``Dataset.save_to_disk``) and loaded from there on later calls.

    Returns:
        The :class:`KnowledgeWorld`.

    Example:
        >>> config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
        >>> world = make_knowledge_world(config)
        >>> len(world.train_documents), len(world.queries)
        (40, 48)
    """
    if not isinstance(config, KnowledgeWorldConfig):
        raise TypeError(f"config must be a KnowledgeWorldConfig, got {type(config).__name__}.")
    if cache_dir is None:
        return _build_world(config)
    folder = Path(cache_dir) / f"knowledge_world-{config.fingerprint()}"
    if folder.is_dir():
        return _load_world(folder, config)
    world = _build_world(config)
    _save_world_atomically(world, folder)
    return world


_SPLITS = ("entities", "train_documents", "queries")


def _save_world_atomically(world: KnowledgeWorld, folder: Path) -> None:
    # Write everything into a temporary sibling, then rename: a crash leaves no half-written
    # folder under the final name, and a concurrent writer of the same world simply loses the race.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with _quiet_progress_bars():
            for split in _SPLITS:
                getattr(world, split).save_to_disk(str(tmp / split))
        world.tokenizer.save(tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(world.config.to_dict(), indent=1))
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_world(folder: Path, config: KnowledgeWorldConfig) -> KnowledgeWorld:
    stored = json.loads((folder / "config.json").read_text())
    if stored != config.to_dict():
        raise ValueError(f"Cached world at {folder} was made from config {stored}, "
                         f"not {config.to_dict()}; delete the folder to regenerate it.")
    splits = {s: datasets.Dataset.load_from_disk(str(folder / s)) for s in _SPLITS}
    return KnowledgeWorld(config=config, tokenizer=WordTokenizer.load(folder / "tokenizer.json"),
                          **splits)


class _quiet_progress_bars:
    """Silences `datasets` progress bars inside the block, restoring the caller's setting."""

    def __enter__(self):
        self._was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        if not self._was_disabled:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------------------------
# Language-model rows.


def pack_for_lm(documents: datasets.Dataset, tokenizer: WordTokenizer, seq_len: int, *,
                seed: int = 0) -> datasets.Dataset:
    """Packs whole documents, in a seeded shuffled order, into rows of exactly ``seq_len`` tokens.

    Documents are placed greedily: a document that does not fit in what is left of the current
    row starts a new one, so no document loses its start. Rows end in ``<pad>`` where they are not
    full.

    Args:
        documents: a dataset with a ``text`` column (e.g. ``world.train_documents``).
        tokenizer: encodes the texts (they carry their own ``<bos>``/``<eos>``).
        seq_len: the row length; a document longer than this raises.
        seed: seeds the document order.

    Returns:
        A dataset with ``tokens`` (int32, length ``seq_len``) and ``loss_mask`` (int32, 1 on real
        tokens, 0 on padding), aligned position by position: a next-token loss predicting
        ``tokens[t + 1]`` is weighted by ``loss_mask[t + 1]``.

    Example:
        >>> from idesign.data.tokenizer import WordTokenizer
        >>> tok = WordTokenizer.from_words(["a", "b"])
        >>> docs = datasets.Dataset.from_dict({"text": ["<bos> a <eos>", "<bos> a b <eos>"]})
        >>> rows = pack_for_lm(docs, tok, seq_len=5)
        >>> len(rows), [len(t) for t in rows["tokens"]], sum(sum(m) for m in rows["loss_mask"])
        (2, [5, 5], 7)
    """
    if "text" not in documents.column_names:
        raise ValueError(
            f"documents need a 'text' column; its columns are {documents.column_names}."
        )
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len = {seq_len!r}: expected an integer >= 1.")
    texts = list(documents["text"])
    rows: list[list[int]] = []
    current: list[int] = []
    for index in np.random.default_rng(seed).permutation(len(texts)).tolist():
        ids = tokenizer.encode(texts[index])
        if len(ids) > seq_len:
            raise ValueError(f"Document {index} has {len(ids)} tokens, more than "
                             f"seq_len={seq_len}; raise seq_len or shorten the document.")
        if len(current) + len(ids) > seq_len:
            rows.append(current)
            current = []
        current.extend(ids)
    if current:
        rows.append(current)

    tokens = np.full((len(rows), seq_len), tokenizer.pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        tokens[r, : len(row)] = row
        loss_mask[r, : len(row)] = 1
    features = datasets.Features({
        "tokens": datasets.List(datasets.Value("int32"), length=seq_len),
        "loss_mask": datasets.List(datasets.Value("int32"), length=seq_len),
    })
    return datasets.Dataset.from_dict({"tokens": tokens.tolist(), "loss_mask": loss_mask.tolist()},
                                      features=features)
