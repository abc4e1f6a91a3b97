"""The claim world: deterministic, names reuse known parts, families share values, claims parsed exactly."""

import numpy as np
import pytest

from idesign.data import claim_world as cw

SMALL = cw.ClaimWorldConfig(n_known=60, n_unknown=20, n_families=6, n_first=16)


def test_same_config_same_world_and_unknown_names_reuse_known_parts():
    a, b = cw.make_claim_world(SMALL), cw.make_claim_world(SMALL)
    assert a.train_documents["text"] == b.train_documents["text"] and a.entities["name"] == b.entities["name"]
    names, groups = a.entities["name"], a.entities["group"]
    known_parts = {p for n, g in zip(names, groups) if g != "unknown" for p in n.split()}
    unknown_names = [n for n, g in zip(names, groups) if g == "unknown"]
    assert len(set(names)) == len(names)
    assert all(n.split()[1] in known_parts for n in unknown_names)  # every unknown surname is a known family
    mentioned = {e for e in a.train_documents["entity_id"]}
    assert not mentioned & {i for i, g in enumerate(groups) if g == "unknown"}
    counts = np.asarray(a.entities["n_documents"])
    assert counts[np.asarray(groups) == "rare"].max() <= 3


def test_families_share_values_at_about_the_family_share():
    world = cw.make_claim_world(cw.ClaimWorldConfig(n_known=400, n_unknown=100, family_share=0.75))
    fam = np.asarray(world.entities["family"])
    for attr in ("birth_city", "employer"):
        values = np.asarray(world.entities[attr])
        modal = np.mean([np.unique(values[fam == f], return_counts=True)[1].max() / (fam == f).sum()
                         for f in np.unique(fam)])
        assert 0.65 < modal < 0.9, (attr, modal)


@pytest.mark.parametrize("text, outcome, supported, malformed", [
    ("from {city} . <eos>", {"birth_city": "supported"}, [True], False),
    ("from {wrong} <retract> {city} . born {year} . <eos>", {"birth_city": "supported", "birth_year": "supported"},
     [False, True, True], False),
    ("from {wrong} <retract> . <eos>", {"birth_city": "retracted"}, [False], False),
    ("from {city} . flies to {city} . <eos>", {"birth_city": "supported"}, [True], True),
    ("from {city} .", {"birth_city": "supported"}, [True], True),
])
def test_long_form_completions_are_parsed_into_labelled_claims(text, outcome, supported, malformed):
    world = cw.make_claim_world(SMALL)
    e = 0
    city, year = " ".join(world.truth(e, "birth_city")), " ".join(world.truth(e, "birth_year"))
    wrong = next(" ".join(v) for v in cw.attribute_values("birth_city") if " ".join(v) != city)
    ids = world.tokenizer.encode(text.format(city=city, wrong=wrong, year=year))
    parsed = cw.parse_completion(world, e, "bio", "", ids)
    assert parsed.outcome == outcome and parsed.malformed == malformed
    assert [c.supported for c in parsed.claims] == supported
    for c in parsed.claims:
        assert tuple(world.tokenizer.id_to_token(t) for t in ids[c.start:c.end]) in cw.attribute_values(c.attribute)


def test_every_claim_about_an_unknown_entity_is_a_hallucination_even_a_lucky_one():
    world = cw.make_claim_world(SMALL)
    e = world.entities["group"].index("unknown")
    ids = world.tokenizer.encode(" ".join(world.truth(e, "employer")) + " <eos>")
    assert not cw.parse_completion(world, e, "qa", "employer", ids).claims[0].supported


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_unknown"):
        cw.ClaimWorldConfig(n_known=10, n_unknown=100, n_families=2, n_first=5)
    with pytest.raises(ValueError, match="rare_docs"):
        cw.ClaimWorldConfig(rare_docs=(3, 1))


def test_obscure_people_are_named_with_known_parts_and_only_ever_unknown():
    import dataclasses
    plain = cw.make_claim_world(SMALL)
    world = cw.make_claim_world(dataclasses.replace(SMALL, n_obscure=10))
    docs = world.train_documents.to_dict()
    # The entities' own documents are unchanged; the obscure ones are extra, with entity_id -1.
    own = sorted(t for t, e in zip(docs["text"], docs["entity_id"]) if e >= 0)
    assert own == sorted(plain.train_documents["text"]) and world.entities["name"] == plain.entities["name"]
    obscure = [t for t, e in zip(docs["text"], docs["entity_id"]) if e < 0]
    assert 10 <= len(obscure) <= 30
    entity_names = set(world.entities["name"])
    known_parts = {p for n, g in zip(world.entities["name"], world.entities["group"]) if g != "unknown"
                   for p in n.split()}
    for text in obscure:
        words = text.split()
        name = " ".join(words[2:4]) if words[1] == "about" else next(
            " ".join(words[i:i + 2]) for i in range(len(words) - 1) if " ".join(words[i:i + 2]) not in entity_names
            and words[i] in known_parts and words[i + 1] in known_parts)
        assert name not in entity_names and set(name.split()) <= known_parts | set(cw.FIRST_NAMES)
        values = [w for w in words if w in {v for a in cw.ATTRIBUTES for val in cw.attribute_values(a) for v in val}]
        assert not values and "unknown" in words, text
    with pytest.raises(ValueError, match="n_obscure"):
        cw.ClaimWorldConfig(n_known=60, n_unknown=20, n_families=6, n_first=16, n_obscure=17)


@pytest.mark.parametrize("text, kind, outcome, n_claims, cuts, malformed", [
    ("<retract> <eos>", "qa", {"birth_city": "retracted"}, 0, [(0, 0)], False),             # before its first token
    ("{prefix} <retract> <eos>", "qa", {"birth_city": "retracted"}, 0, [(0, 1)], False),     # inside the value
    ("{prefix} <retract> {city} <eos>", "qa", {"birth_city": "supported"}, 1, [(0, 1)], False),  # then corrected
    ("{prefix} <retract> unknown <eos>", "qa", {"birth_city": "retracted"}, 0, [(0, 1)], False),
    ("from <retract> . <eos>", "bio", {"birth_city": "retracted"}, 0, [(1, 1)], False),
    ("from {prefix} <retract> {city} . <eos>", "bio", {"birth_city": "supported"}, 1, [(1, 2)], False),
    ("baker <retract> <eos>", "qa", {}, 0, [], True),      # not a city's prefix: not a cut
    ("{city} {prefix} <retract> <eos>", "qa", {}, 0, [], True),
])
def test_a_claim_broken_off_by_a_retraction_is_a_cut_with_no_label(text, kind, outcome, n_claims, cuts, malformed):
    world = cw.make_claim_world(SMALL)
    e = next(i for i in range(len(world.entities["group"])) if len(world.truth(i, "birth_city")) == 2)
    city = world.truth(e, "birth_city")
    ids = world.tokenizer.encode(text.format(prefix=city[0], city=" ".join(city)))
    parsed = cw.parse_completion(world, e, kind, "birth_city" if kind == "qa" else "", ids)
    assert parsed.outcome == outcome and parsed.malformed == malformed
    assert len(parsed.claims) == n_claims and all(c.supported for c in parsed.claims)
    assert [(c.start, c.end) for c in parsed.cuts] == cuts
    assert parsed.retractions == len(cuts)


def test_correction_rate_sets_self_corrections_apart_from_unknown_answers():
    import dataclasses
    same = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.2, correction_rate=0.2))
    plain = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.2))
    assert same.train_documents["text"] == plain.train_documents["text"]  # None: marker_rate sets both
    world = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.0, correction_rate=0.5))
    texts = world.train_documents["text"]
    assert sum(t.count(cw.RETRACT) for t in texts) > len(texts) // 4
    assert not any(t.endswith(f": {cw.ABSTAIN} {cw.EOS}") for t in texts)  # no QA answered "unknown" outright
    with pytest.raises(ValueError, match="correction_rate"):
        cw.ClaimWorldConfig(correction_rate=1.5)


def _parsed_documents(world):
    """Each training document's body parsed as a completion of its own prompt."""
    names = world.entities["name"]
    for text, e, kind in zip(*(world.train_documents[k] for k in ("text", "entity_id", "kind"))):
        if kind == "qa":
            a = next(a for a in cw.ATTRIBUTES if text.startswith(cw.qa_prompt(names[e], a)))
            prompt = cw.qa_prompt(names[e], a)
        else:
            a, prompt = "", cw.bio_prompt(names[e])
        yield e, kind, cw.parse_completion(world, e, kind, a, world.tokenizer.encode(text[len(prompt):]))


def test_cut_rate_breaks_true_claims_off_at_a_constant_rate_per_token_and_changes_nothing_else():
    import dataclasses
    plain = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.0))
    world = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.0, cut_rate=0.3))
    for column in ("entity_id", "kind"):  # cuts draw from their own stream: the same documents, in the same order
        assert world.train_documents[column] == plain.train_documents[column]
    offered = cut = 0
    for _, _, parsed in _parsed_documents(world):
        assert not parsed.malformed and "hallucinated" not in parsed.outcome.values()
        assert all(c.supported for c in parsed.claims)  # a cut is a prefix of the true value; its fix is true
        offered += len(parsed.outcome)  # every claim is offered a cut before its first token
        cut += sum(c.start == c.end for c in parsed.cuts)
    share = cut / offered
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / offered), share
    assert sum(len(p.cuts) for *_, p in _parsed_documents(world)) > cut  # and before later tokens too


def test_mark_passes_repeat_each_document_with_its_marks_drawn_anew():
    import dataclasses
    one = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.4))
    assert cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.4, mark_passes=1)).train_documents[
        "text"] == one.train_documents["text"]
    world = cw.make_claim_world(dataclasses.replace(SMALL, marker_rate=0.4, mark_passes=5))
    assert len(world.train_documents) == 5 * len(one.train_documents)
    assert set(one.train_documents["text"]) <= set(world.train_documents["text"])  # the first pass is the old corpus

    def content(e, kind, parsed):  # what a document states, whatever its marks
        return e, kind, tuple(sorted(parsed.outcome))

    from collections import Counter
    base = Counter(content(*d) for d in _parsed_documents(one))
    assert Counter(content(*d) for d in _parsed_documents(world)) == Counter({k: 5 * n for k, n in base.items()})
    marked = {}
    for e, kind, parsed in _parsed_documents(world):
        marked.setdefault(content(e, kind, parsed), set()).add(parsed.retractions > 0 or "retracted" in
                                                              parsed.outcome.values())
    assert sum(len(v) == 2 for v in marked.values()) > len(marked) // 4  # one content, marked in some passes only
    with pytest.raises(ValueError, match="mark_passes"):
        cw.ClaimWorldConfig(mark_passes=0)
    with pytest.raises(ValueError, match="cut_rate"):
        cw.ClaimWorldConfig(cut_rate=-0.1)
