"""Tests for idesign.data.knowledge."""

import collections
import doctest
import json

import datasets
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from idesign.data import _knowledge_config
from idesign.data import knowledge as knowledge_module
from idesign.data.knowledge import (
    FIRST_NAMES,
    GROUPS,
    SUPPORTED_ATTRIBUTES,
    SURNAMES,
    KnowledgeWorld,
    KnowledgeWorldConfig,
    make_knowledge_tokenizer,
    make_knowledge_world,
    max_names,
    pack_for_lm,
)
from idesign.data.tokenizer import ABSTAIN, BOS_ID, EOS_ID, PAD_ID, RETRACT, UNK_ID

SMALL = KnowledgeWorldConfig(n_known=30, n_unknown=10, n_documents=400, seed=0)
# Steep power law with one guaranteed mention: most rare entities get a single document, which
# exercises the path that folds every attribute into it.
SPARSE = KnowledgeWorldConfig(n_known=40, n_unknown=5, n_documents=200, min_mentions=1,
                              zipf_exponent=2.0, qa_fraction=0.8, seed=3)


@pytest.fixture(scope="module")
def world() -> KnowledgeWorld:
    return make_knowledge_world(SMALL)


@pytest.fixture(scope="module")
def sparse_world() -> KnowledgeWorld:
    return make_knowledge_world(SPARSE)


def _all_worlds(world, sparse_world):
    return [world, sparse_world]


def _documents_by_entity(world: KnowledgeWorld) -> dict[int, list[dict]]:
    by_entity = collections.defaultdict(list)
    for doc in world.train_documents:
        by_entity[doc["entity_id"]].append(doc)
    return by_entity


def _stated_attributes(world: KnowledgeWorld, entity_id: int, text: str) -> set[str]:
    """Attributes whose true value `text` states, read from the text itself."""
    name = world.entities[entity_id]["name"]
    stated = set()
    for attribute in world.config.attributes:
        spec = knowledge_module._ATTRIBUTES[attribute]
        value = world.truth(entity_id, attribute)
        qa = f"q : {spec.question.format(name=name)} a : {value} <eos>"
        if spec.statement.format(name=name, value=value) in text or qa in text:
            stated.add(attribute)
    return stated


# --- vocabulary ---------------------------------------------------------------------------------


def test_word_pools_are_disjoint_single_tokens():
    template = set(_knowledge_config._template_words())
    values = [v for s in knowledge_module._ATTRIBUTES.values() for v in s.values]
    pools = [set(FIRST_NAMES), set(SURNAMES), set(values), template]
    assert len(FIRST_NAMES) == len(set(FIRST_NAMES)) and len(SURNAMES) == len(set(SURNAMES))
    assert len(values) == len(set(values))
    for i, a in enumerate(pools):
        for b in pools[i + 1:]:
            assert not a & b, a & b
    for word in set().union(*pools):
        assert word.split() == [word]
        assert word not in (ABSTAIN, RETRACT)


def test_tokenizer_covers_every_document_and_query(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        assert w.tokenizer == make_knowledge_tokenizer()
        for text in [*w.train_documents["text"], *w.queries["prompt"]]:
            assert UNK_ID not in w.tokenizer.encode(text)


# --- determinism --------------------------------------------------------------------------------


def _contents(w: KnowledgeWorld) -> dict:
    return {name: getattr(w, name).to_dict() for name in ("entities", "train_documents", "queries")}


def test_same_seed_gives_identical_world(world):
    again = make_knowledge_world(KnowledgeWorldConfig(**SMALL.to_dict()))
    assert _contents(again) == _contents(world)
    assert again.tokenizer == world.tokenizer


def test_different_seed_gives_different_world(world):
    other = make_knowledge_world(KnowledgeWorldConfig(**{**SMALL.to_dict(), "seed": 1}))
    assert other.entities["name"] != world.entities["name"]
    assert other.train_documents["text"] != world.train_documents["text"]


def test_more_documents_keep_names_and_attributes():
    base = make_knowledge_world(SMALL)
    more = make_knowledge_world(KnowledgeWorldConfig(**{**SMALL.to_dict(), "n_documents": 500}))
    columns = ["name", *SMALL.attributes]
    assert base.entities.select_columns(columns).to_dict() == (
        more.entities.select_columns(columns).to_dict())


# --- entities and documents ---------------------------------------------------------------------


def test_entities_table(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        c = w.config
        table = w.entities.to_dict()
        assert table["entity_id"] == list(range(c.n_known + c.n_unknown))
        assert len(set(table["name"])) == len(table["name"])
        assert collections.Counter(table["group"]) == {
            "frequent": c.n_frequent, "rare": c.n_known - c.n_frequent, "unknown": c.n_unknown}
        assert set(table) >= {"entity_id", "name", "group", "n_documents", *c.attributes}
        for attribute in c.attributes:
            assert set(table[attribute]) <= set(w.attribute_values(attribute))


def test_document_counts_follow_the_config(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        c = w.config
        assert len(w.train_documents) == c.n_documents
        actual = collections.Counter(w.train_documents["entity_id"])
        for row in w.entities:
            assert actual.get(row["entity_id"], 0) == row["n_documents"]
            if row["group"] == "unknown":
                assert row["n_documents"] == 0
            else:
                assert row["n_documents"] >= c.min_mentions


def test_frequent_entities_have_more_documents_than_rare(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        counts = np.asarray(w.entities["n_documents"])
        groups = np.asarray(w.entities["group"])
        assert counts[groups == "frequent"].min() > counts[groups == "rare"].max()


def test_documents_are_bios_or_qa_in_expected_proportion(world):
    kinds = collections.Counter(world.train_documents["kind"])
    assert set(kinds) == {"bio", "qa"}
    assert 0.4 < kinds["qa"] / len(world.train_documents) < 0.6
    for doc in world.train_documents:
        assert doc["text"].startswith("<bos> ") and doc["text"].endswith(" <eos>")
        if doc["kind"] == "qa":
            assert doc["text"].startswith("<bos> q : ") and len(doc["attributes"]) == 1
        else:
            assert len(doc["attributes"]) >= 2


def test_documents_state_exactly_the_true_attributes_they_list(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        for doc in w.train_documents:
            assert _stated_attributes(w, doc["entity_id"], doc["text"]) == set(doc["attributes"])


def test_every_known_entity_has_every_attribute_stated(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        by_entity = _documents_by_entity(w)
        for row in w.entities:
            if row["group"] == "unknown":
                continue
            stated = set().union(*(_stated_attributes(w, row["entity_id"], d["text"])
                                   for d in by_entity[row["entity_id"]]))
            assert stated == set(w.config.attributes), row


def test_sparse_world_has_single_document_entities(sparse_world):
    # Guards the setup of the coverage test above: it must see entities with one document.
    assert min(sparse_world.entities.filter(lambda r: r["group"] == "rare")["n_documents"]) == 1


def test_unknown_entities_never_appear_in_training(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        unknown_names = w.entities.filter(lambda r: r["group"] == "unknown")["name"]
        known_names = w.entities.filter(lambda r: r["group"] != "unknown")["name"]
        known_tokens = {t for name in known_names for t in name.split()}
        texts = [f" {t} " for t in w.train_documents["text"]]
        for name in unknown_names:
            assert not any(f" {name} " in t for t in texts), name
            # Only the combination is new: both name tokens occur in training.
            assert set(name.split()) <= known_tokens, name


def test_abstain_and_retract_never_in_training(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        for text in w.train_documents["text"]:
            ids = w.tokenizer.encode(text)
            assert w.tokenizer.abstain_id not in ids and w.tokenizer.retract_id not in ids
            assert ABSTAIN not in text.split() and RETRACT not in text.split()


# --- queries ------------------------------------------------------------------------------------


def test_queries_agree_with_truth(world, sparse_world):
    for w in _all_worlds(world, sparse_world):
        c = w.config
        assert len(w.queries) == (c.n_known + c.n_unknown) * len(c.attributes)
        seen = set()
        for q in w.queries:
            assert q["answer"] == w.truth(q["entity_id"], q["attribute"])
            assert w.is_supported(q["entity_id"], q["attribute"], q["answer"])
            assert q["answer_id"] == w.tokenizer.token_to_id(q["answer"])
            assert q["answer"] in w.attribute_values(q["attribute"])
            assert q["group"] == w.group(q["entity_id"])
            assert q["prompt_ids"] == w.tokenizer.encode(q["prompt"])
            assert q["prompt"].startswith("<bos> q : ") and q["prompt"].endswith(" a :")
            assert w.entities[q["entity_id"]]["name"] in q["prompt"]
            seen.add((q["entity_id"], q["attribute"]))
        assert len(seen) == len(w.queries)
        assert list(dict.fromkeys(w.queries["group"])) == list(GROUPS)


def test_query_mention_counts_match_documents(world):
    stated = collections.Counter()
    as_qa = set()
    for doc in world.train_documents:
        for attribute in doc["attributes"]:
            stated[doc["entity_id"], attribute] += 1
            if doc["kind"] == "qa":
                as_qa.add((doc["entity_id"], attribute))
    for q in world.queries:
        key = (q["entity_id"], q["attribute"])
        assert q["n_mentions"] == stated[key]
        assert q["seen_as_qa"] == (key in as_qa)
        if q["group"] == "unknown":
            assert q["n_mentions"] == 0


def test_qa_documents_are_query_prompts_plus_answer(world):
    prompts = {(q["entity_id"], q["attribute"]): q for q in world.queries}
    for doc in world.train_documents.filter(lambda d: d["kind"] == "qa"):
        q = prompts[doc["entity_id"], doc["attributes"][0]]
        assert doc["text"] == f"{q['prompt']} {q['answer']} <eos>"


def test_is_supported_rejects_wrong_answers_and_abstain(world):
    for attribute in world.config.attributes:
        true = world.truth(0, attribute)
        wrong = next(v for v in world.attribute_values(attribute) if v != true)
        assert not world.is_supported(0, attribute, wrong)
        assert not world.is_supported(0, attribute, ABSTAIN)


def test_lookups_name_bad_arguments(world):
    with pytest.raises(IndexError, match="entity_id 999"):
        world.truth(999, "birth_city")
    with pytest.raises(KeyError, match="'hair_colour'"):
        world.truth(0, "hair_colour")
    with pytest.raises(KeyError, match="'hair_colour'"):
        world.attribute_values("hair_colour")


def test_summary_and_repr(world):
    s = world.summary()
    c = world.config
    assert (s["n_frequent"], s["n_rare"], s["n_unknown"]) == (
        c.n_frequent, c.n_known - c.n_frequent, c.n_unknown)
    assert s["documents_frequent"] + s["documents_rare"] == s["n_documents"] == c.n_documents
    assert s["documents_unknown"] == 0
    assert s["n_bio"] + s["n_qa"] == s["n_documents"]
    assert s["mean_documents_frequent"] > s["mean_documents_rare"]
    assert s["vocab_size"] == world.tokenizer.vocab_size
    assert s["n_queries"] == len(world.queries)
    json.dumps(s)  # flat and JSON-able, for metrics.json
    assert f"frequent={c.n_frequent}" in repr(world)


def test_default_config_world():
    w = make_knowledge_world(KnowledgeWorldConfig())
    s = w.summary()
    assert (s["n_frequent"], s["n_rare"], s["n_unknown"]) == (40, 160, 50)
    assert s["n_documents"] == 20000 and s["n_queries"] == 250 * 4
    counts = np.asarray(w.entities["n_documents"])
    groups = np.asarray(w.entities["group"])
    assert counts[groups == "frequent"].min() > counts[groups == "rare"].max()


def test_subset_of_attributes():
    w = make_knowledge_world(KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40,
                                                  attributes=("employer", "birth_year")))
    assert set(w.queries["attribute"]) == {"employer", "birth_year"}
    assert "birth_city" not in w.entities.column_names
    assert all("born in lisbon" not in t for t in w.train_documents["text"])


@settings(max_examples=15, deadline=None)
@given(n_known=st.integers(2, 40), n_unknown=st.integers(0, 5), extra=st.integers(0, 200),
       min_mentions=st.integers(1, 3), zipf=st.floats(0.0, 2.5),
       qa_fraction=st.sampled_from([0.0, 0.5, 1.0]),
       attributes=st.lists(st.sampled_from(SUPPORTED_ATTRIBUTES), min_size=1, unique=True),
       seed=st.integers(0, 10))
def test_any_valid_config_keeps_the_invariants(n_known, n_unknown, extra, min_mentions, zipf,
                                               qa_fraction, attributes, seed):
    assume(n_known + n_unknown <= max_names(n_known))
    c = KnowledgeWorldConfig(n_known=n_known, n_unknown=n_unknown, min_mentions=min_mentions,
                             n_documents=n_known * min_mentions + extra, zipf_exponent=zipf,
                             qa_fraction=qa_fraction, attributes=tuple(attributes), seed=seed)
    w = make_knowledge_world(c)
    counts = np.asarray(w.entities["n_documents"])
    groups = np.asarray(w.entities["group"])
    assert counts.sum() == c.n_documents == len(w.train_documents)
    assert counts[groups == "frequent"].min() >= counts[groups == "rare"].max()
    assert (counts[groups != "unknown"] >= min_mentions).all()
    mentions = np.asarray(w.queries["n_mentions"])
    query_groups = np.asarray(w.queries["group"])
    assert (mentions[query_groups != "unknown"] >= 1).all()
    assert (mentions[query_groups == "unknown"] == 0).all()
    assert len(set(w.entities["name"])) == len(w.entities)


# --- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"n_known": 1}, "n_known"),
    ({"n_known": 4000, "n_documents": 8000}, "n_known"),
    ({"n_known": 10, "n_unknown": 91}, "n_unknown"),
    ({"n_unknown": -1}, "n_unknown"),
    ({"attributes": ("birth_city", "hair_colour")}, "attributes"),
    ({"attributes": ()}, "attributes"),
    ({"attributes": ("employer", "employer")}, "attributes"),
    ({"attributes": "employer"}, "attributes"),
    ({"frequent_fraction": 0.0}, "frequent_fraction"),
    ({"frequent_fraction": 1.0}, "frequent_fraction"),
    ({"zipf_exponent": -0.5}, "zipf_exponent"),
    ({"zipf_exponent": float("nan")}, "zipf_exponent"),
    ({"n_documents": 399}, "n_documents"),
    ({"min_mentions": 0}, "min_mentions"),
    ({"qa_fraction": 1.5}, "qa_fraction"),
    ({"seed": -1}, "seed"),
    ({"n_known": 2.5}, "n_known"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"KnowledgeWorldConfig\.{field} = "):
        KnowledgeWorldConfig(**kwargs)


def test_config_numbers_are_normalised():
    a = KnowledgeWorldConfig(n_known=np.int64(10), n_documents=100, zipf_exponent=1,
                             attributes=["employer"])
    b = KnowledgeWorldConfig(n_known=10, n_documents=100, zipf_exponent=1.0,
                             attributes=("employer",))
    assert a == b and hash(a) == hash(b) and a.fingerprint() == b.fingerprint()
    assert type(a.n_known) is int and type(a.zipf_exponent) is float


def test_unknown_attribute_error_lists_the_supported_ones():
    with pytest.raises(ValueError, match="hair_colour") as info:
        KnowledgeWorldConfig(attributes=("hair_colour",))
    assert all(a in str(info.value) for a in SUPPORTED_ATTRIBUTES)


def test_make_knowledge_world_wants_a_config():
    with pytest.raises(TypeError, match="KnowledgeWorldConfig"):
        make_knowledge_world({"n_known": 10})


# --- cache --------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path, monkeypatch):
    config = KnowledgeWorldConfig(n_known=12, n_unknown=3, n_documents=60, seed=5)
    first = make_knowledge_world(config, cache_dir=tmp_path)
    folders = list(tmp_path.iterdir())
    assert [f.name for f in folders] == [f"knowledge_world-{config.fingerprint()}"]  # no temp left

    def no_build(_):
        raise AssertionError("the second call should load from the cache")

    monkeypatch.setattr(knowledge_module, "_build_world", no_build)
    second = make_knowledge_world(config, cache_dir=str(tmp_path))
    assert _contents(second) == _contents(first)
    assert second.entities.features == first.entities.features
    assert second.queries.features == first.queries.features
    assert second.tokenizer == first.tokenizer and second.config == config
    assert second.summary() == first.summary()


def test_cache_separates_configs(tmp_path):
    a = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40, seed=0)
    b = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40, seed=1)
    make_knowledge_world(a, cache_dir=tmp_path)
    world_b = make_knowledge_world(b, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert _contents(world_b) == _contents(make_knowledge_world(b))


def test_cache_refuses_a_folder_from_another_config(tmp_path):
    config = KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40)
    make_knowledge_world(config, cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "seed": 9}))
    with pytest.raises(ValueError, match="delete the folder"):
        make_knowledge_world(config, cache_dir=tmp_path)


# --- packing ------------------------------------------------------------------------------------


def test_pack_for_lm_rows(world):
    seq_len = 64
    rows = pack_for_lm(world.train_documents, world.tokenizer, seq_len, seed=0)
    tokens = np.asarray(rows["tokens"])
    mask = np.asarray(rows["loss_mask"])
    assert tokens.shape == mask.shape == (len(rows), seq_len)
    assert rows.features["tokens"] == datasets.List(datasets.Value("int32"), length=seq_len)
    np.testing.assert_array_equal(mask, tokens != PAD_ID)
    for row, m in zip(tokens, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # padding only at the end
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID  # whole documents only
    # Nothing is lost or invented: the same documents, once each.
    packed = world.tokenizer.decode(tokens.reshape(-1), skip_special=False).split("<eos>")
    packed = sorted(d.replace("<pad>", "").strip() + " <eos>" for d in packed if "<bos>" in d)
    assert packed == sorted(world.train_documents["text"])


def test_pack_for_lm_is_deterministic_in_seed(world):
    a = pack_for_lm(world.train_documents, world.tokenizer, 64, seed=0)
    b = pack_for_lm(world.train_documents, world.tokenizer, 64, seed=0)
    c = pack_for_lm(world.train_documents, world.tokenizer, 64, seed=1)
    assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=0, max_size=12), st.integers(10, 16),
       st.integers(0, 3))
def test_pack_for_lm_keeps_every_token(lengths, seq_len, seed):
    tok = make_knowledge_tokenizer()
    texts = [" ".join(["<bos>", *["ada"] * n, "<eos>"]) for n in lengths]
    docs = datasets.Dataset.from_dict({"text": texts}, features=datasets.Features(
        {"text": datasets.Value("string")}))
    rows = pack_for_lm(docs, tok, seq_len, seed=seed)
    tokens = np.asarray(rows["tokens"]).reshape(-1, seq_len)
    assert int(np.asarray(rows["loss_mask"]).sum()) == sum(n + 2 for n in lengths)
    assert (tokens == BOS_ID).sum() == (tokens == EOS_ID).sum() == len(lengths)
    # Greedy packing: each row's first document did not fit in the previous row's padding.
    used = (tokens != PAD_ID).sum(axis=1)
    first_document = np.argmax(tokens == EOS_ID, axis=1) + 1
    assert (used[:-1] + first_document[1:] > seq_len).all()


def test_pack_for_lm_errors(world):
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than seq_len=8"):
        pack_for_lm(world.train_documents, world.tokenizer, 8)
    with pytest.raises(ValueError, match="'text' column"):
        pack_for_lm(world.entities, world.tokenizer, 64)
    with pytest.raises(ValueError, match="seq_len"):
        pack_for_lm(world.train_documents, world.tokenizer, 0)


def test_docstring_examples():
    result = doctest.testmod(knowledge_module)
    assert result.attempted > 0 and result.failed == 0
