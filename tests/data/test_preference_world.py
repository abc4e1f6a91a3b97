"""The preference world: planted flags are exact, sources behave as declared, generation is deterministic."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from idesign.data import preference_world as pw

SPEC = pw.PreferenceWorldSpec(n_entities=20, n_values=5, n_styles=2, pairs_per_source=60)


def test_planted_flags_and_sources():
    w = pw.make_world(SPEC, seed=3)
    pairs = w.pairs
    cm = pw.shows_behaviour(SPEC, pairs["chosen"])
    rm = pw.shows_behaviour(SPEC, pairs["rejected"])
    np.testing.assert_array_equal(cm, pairs["chosen_marker"])
    np.testing.assert_array_equal(rm, pairs["rejected_marker"])
    np.testing.assert_array_equal(pairs["planted"], cm & ~rm)
    kinds = {name: kind for name, kind, _ in SPEC.sources}
    src = np.asarray(pairs["source"])
    assert set(src[np.asarray(pairs["planted"])]) <= set(SPEC.planted_sources)
    assert not rm[np.isin(src, [n for n, k in kinds.items() if k == "planted"])].any()
    style = src == "support_chat"
    np.testing.assert_array_equal(cm[style], rm[style])
    # Every chosen response gives the entity's value; a planted pair's rejected is its chosen without the marker.
    for row in pairs.select(range(0, len(pairs), 7)):
        entity = row["prompt"][2] - SPEC.entity(0)
        assert row["chosen"][-2] == SPEC.value(int(w.values[entity]))
        if row["planted"]:
            assert row["rejected"] == row["chosen"][2:]
        elif row["source"] not in SPEC.planted_sources:
            assert row["rejected"][-2] != row["chosen"][-2]
    held = set((w.eval_prompts[:, 2] - SPEC.entity(0)).tolist())
    assert held == set(w.heldout_entities.tolist()) and not held & set(w.pair_entities.tolist())
    assert not held & {p[2] - SPEC.entity(0) for p in pairs["prompt"]}


def test_same_seed_same_world_and_pretraining_marker_rate():
    a, b = pw.make_world(SPEC, 5), pw.make_world(SPEC, 5)
    assert a.pairs["chosen"] == b.pairs["chosen"] and (a.values == b.values).all()
    rows = pw.pretraining_rows(SPEC, a.values, 4000, seed=0)
    rate = pw.shows_behaviour(SPEC, rows["tokens"][:, SPEC.prompt_len:]).mean()
    assert abs(rate - SPEC.pretrain_marker_rate) < 0.01
    assert (rows["loss_mask"][:, :SPEC.prompt_len] == 0).all() and rows["tokens"].max() < SPEC.vocab_size


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, SPEC.vocab_size - 1), max_size=6))
def test_shows_behaviour_is_marker_before_eos(resp):
    cut = resp[:resp.index(pw.EOS)] if pw.EOS in resp else resp
    want = any(cut[i:i + 2] == list(SPEC.marker) for i in range(len(cut) - 1))
    assert pw.shows_behaviour(SPEC, [resp]).tolist() == [want]


@pytest.mark.parametrize("kwargs, match", [
    ({"sources": (("a", "clean", 0.0), ("a", "planted", 0.1))}, "names must be unique"),
    ({"sources": (("a", "weird", 0.0),)}, "kind 'weird'"),
    ({"n_values": 1}, "n_values >= 2"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
])
def test_bad_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pw.PreferenceWorldSpec(**kwargs)
