"""The skill-mixture corpus: formats, the shared text language, splits, determinism (evaluators: tests/test_evaluation.py)."""

import numpy as np
import pytest

from idesign.data import skills

SMALL = skills.SkillConfig(n_symbols=8, n_strings=6, string_len=8, prefix_len=3, string_repeats=5, n_entities=10,
                           n_cities=4, fact_docs=80, min_fact_repeats=2, n_pattern_train=60, n_text_docs=200,
                           n_eval=20, n_heldout_text=30)


@pytest.fixture(scope="module")
def corpus():
    return skills.make_skill_corpus(SMALL)


def _words(corpus, row):
    return corpus.tokenizer.decode(row["tokens"]).split()


def test_every_skill_has_train_and_eval_rows_and_lm_loss_columns(corpus):
    assert set(corpus.train["skill"]) == set(skills.SKILLS) | {"text"}
    assert set(corpus.eval["skill"]) == set(skills.SKILLS + skills.CONTROLS)
    assert set(corpus.heldout_text["skill"]) == {"text", "arithmetic", "logic"}
    for ds in (corpus.train, corpus.eval, corpus.heldout_text):
        tokens, valid, mask = (np.asarray(ds.with_format("numpy")[c]) for c in ("tokens", "valid", "loss_mask"))
        assert tokens.shape[1] == SMALL.seq_len
        assert np.all(tokens[:, 0] == corpus.tokenizer.bos_id)
        np.testing.assert_array_equal(mask[:, 1:], valid[:, 1:])
        assert np.all(mask[:, 0] == 0) and np.all(tokens[valid == 0] == corpus.tokenizer.pad_id)
    summary = corpus.summary()
    assert summary["train"]["memorized"] == SMALL.n_strings * SMALL.string_repeats
    assert summary["train"]["text"] == SMALL.n_text_docs
    assert summary["heldout_text"] == {"text": 10, "arithmetic": 10, "logic": 10}


def test_arithmetic_is_correct_and_held_out_pairs_never_appear_in_training(corpus):
    train_text = {" ".join(_words(corpus, r)) for r in corpus.train}
    arith = [r for r in corpus.eval if r["skill"] == "arithmetic"]
    assert len(arith) == SMALL.n_eval
    for r in arith:
        w = _words(corpus, r)
        a, b, c = int("".join(w[0:2])), int("".join(w[3:5])), int("".join(w[6:9][::-1]))     # sum written least significant digit first
        assert w[2] == "+" and w[5] == "=" and a + b == c
        assert r["prompt_len"] == 7 and r["answer_len"] == 3     # <bos> a1 a0 + b1 b0 =
        assert " ".join(w) not in train_text
    for r in corpus.heldout_text:
        assert " ".join(_words(corpus, r)) not in train_text


def test_held_out_patterns_use_unseen_motifs_and_follow_the_period(corpus):
    def motif(words):
        seq = words[1:]
        period = next(p for p in SMALL.pattern_periods if seq[p:] == seq[:-p])
        return tuple(seq[:period])
    train_motifs = {motif(_words(corpus, r)) for r in corpus.train if r["skill"] == "logic"}
    for r in corpus.eval:
        if r["skill"] == "logic":
            w = _words(corpus, r)
            assert w[0] == "pattern" and motif(w) not in train_motifs
            assert r["answer_len"] == SMALL.pattern_answer


def test_memorized_strings_are_repeated_and_recall_targets_the_continuation(corpus):
    mem_eval = [r for r in corpus.eval if r["skill"] == "memorized"]
    assert len(mem_eval) == SMALL.n_strings
    train_tokens = [tuple(r["tokens"]) for r in corpus.train if r["skill"] == "memorized"]
    for r in mem_eval:
        assert train_tokens.count(tuple(r["tokens"])) == SMALL.string_repeats
        assert r["prompt_len"] == 2 + SMALL.prefix_len and r["answer_len"] == SMALL.string_len - SMALL.prefix_len
    unseen = [r for r in corpus.eval if r["skill"] == "unseen_strings"]
    all_train = {tuple(t) for t in corpus.train["tokens"]}
    assert len(unseen) == SMALL.n_strings and all(tuple(r["tokens"]) not in all_train for r in unseen)
    assert {(r["prompt_len"], r["answer_len"]) for r in unseen} == {(mem_eval[0]["prompt_len"], mem_eval[0]["answer_len"])}
    prefixes = [tuple(r["tokens"][:r["prompt_len"]]) for r in mem_eval + unseen]
    assert len(set(prefixes)) == len(prefixes)          # a prompt names exactly one string


def _symbols(corpus, rows, skill):
    """Symbol ids of the string documents of one skill (after ``<bos> quote``)."""
    words = [_words(corpus, r) for r in rows if r["skill"] == skill]
    assert words and all(w[0] == "quote" and len(w) == SMALL.string_len + 1 for w in words)
    return np.array([[int(x[1:]) for x in w[1:]] for w in words])


def test_memorized_strings_text_and_held_out_text_come_from_one_markov_language(corpus):
    successors, probs = skills.markov_language(SMALL)
    allowed = np.zeros((SMALL.n_symbols, SMALL.n_symbols), bool)
    allowed[np.arange(SMALL.n_symbols)[:, None], successors] = True
    samples = {name: _symbols(corpus, rows, skill) for name, rows, skill in (
        ("memorized", corpus.eval, "memorized"), ("unseen", corpus.eval, "unseen_strings"),
        ("text", corpus.train, "text"), ("heldout", corpus.heldout_text, "text"))}
    for name, s in samples.items():
        assert allowed[s[:, :-1], s[:, 1:]].all(), f"{name}: a transition outside the language"
    # The training text's transition frequencies estimate the language's probabilities.
    s = samples["text"]
    counts = np.zeros((SMALL.n_symbols, SMALL.n_symbols))
    np.add.at(counts, (s[:, :-1].ravel(), s[:, 1:].ravel()), 1)
    est = counts / counts.sum(1, keepdims=True)
    truth = np.zeros_like(est)
    truth[np.arange(SMALL.n_symbols)[:, None], successors] = probs
    assert np.abs(est - truth).max() < 0.15           # ~175 transitions per symbol: sd of a share <= 0.04
    # Memorized and held-out text rows have the same format and length: only repetition sets them apart.
    mem_len = {int(v.sum()) for r, v in ((r, np.asarray(r["valid"])) for r in corpus.train) if r["skill"] == "memorized"}
    held_len = {int(np.sum(r["valid"])) for r in corpus.heldout_text if r["skill"] == "text"}
    assert mem_len == held_len == {SMALL.string_len + 3}


def test_facts_follow_a_zipf_law_and_split_into_frequent_and_rare_halves(corpus):
    counts = corpus.fact_counts
    assert np.all(np.diff(counts) <= 0) and counts.min() >= SMALL.min_fact_repeats
    half = SMALL.n_entities // 2
    assert counts[:half].mean() > counts[half:].mean()
    for skill, lo, hi in (("facts_frequent", 0, half), ("facts_rare", half, SMALL.n_entities)):
        entities = {_words(corpus, r)[0] for r in corpus.eval if r["skill"] == skill}
        assert entities == {f"e{k}" for k in range(lo, hi)}
    n_train = sum(r["skill"].startswith("facts") for r in corpus.train)
    assert n_train == counts.sum()


def test_sweep_and_report_halves_partition_each_skill(corpus):
    sweep, report = corpus.eval_split("sweep"), corpus.eval_split("report")
    assert len(sweep) + len(report) == len(corpus.eval)
    for s in skills.SKILLS:
        a, b = sum(x == s for x in sweep["skill"]), sum(x == s for x in report["skill"])
        assert abs(a - b) <= 1 and a > 0 and b > 0
    assert not {tuple(t) for t in sweep["tokens"]} & {tuple(t) for t in report["tokens"]}
    with pytest.raises(ValueError, match="split must be 'sweep' or 'report'"):
        corpus.eval_split("test")


def test_the_corpus_is_deterministic_in_its_seed():
    a, b = skills.make_skill_corpus(SMALL), skills.make_skill_corpus(SMALL)
    c = skills.make_skill_corpus(skills.SkillConfig(**{**SMALL.__dict__, "seed": 1}))
    assert a.train["tokens"] == b.train["tokens"] and a.eval["tokens"] == b.eval["tokens"]
    assert a.train["tokens"] != c.train["tokens"]


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="prefix_len=8 must be < string_len=8"):
        skills.SkillConfig(string_len=8, prefix_len=8)
    with pytest.raises(ValueError, match="pattern_periods"):
        skills.SkillConfig(pattern_periods=(4,), pattern_shown=6)
    with pytest.raises(ValueError, match="n_strings must be a positive int"):
        skills.SkillConfig(n_strings=0)
    with pytest.raises(ValueError, match="text_branching=1 must be in"):
        skills.SkillConfig(text_branching=1)
    with pytest.raises(ValueError, match="distinct 3-symbol prefixes"):
        skills.make_skill_corpus(skills.SkillConfig(n_symbols=3, text_branching=2, n_strings=7, n_eval=4, prefix_len=3,
                                                    string_len=5, pattern_periods=(2,), pattern_shown=4))
