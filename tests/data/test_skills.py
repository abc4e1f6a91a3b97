"""The skill-mixture corpus: formats, splits, determinism, and the exact-match evaluator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign.data import skills

SMALL = skills.SkillConfig(n_symbols=8, n_strings=6, string_len=8, prefix_len=3, string_repeats=5, n_entities=10,
                           n_cities=4, fact_docs=80, min_fact_repeats=2, n_pattern_train=60, n_eval=20,
                           n_heldout_text=20)


@pytest.fixture(scope="module")
def corpus():
    return skills.make_skill_corpus(SMALL)


def _words(corpus, row):
    return corpus.tokenizer.decode(row["tokens"]).split()


def test_every_skill_has_train_and_eval_rows_and_lm_loss_columns(corpus):
    assert set(corpus.train["skill"]) == set(corpus.eval["skill"]) == set(skills.SKILLS)
    assert set(corpus.heldout_text["skill"]) == {"arithmetic", "logic"}
    for ds in (corpus.train, corpus.eval, corpus.heldout_text):
        tokens, valid, mask = (np.asarray(ds.with_format("numpy")[c]) for c in ("tokens", "valid", "loss_mask"))
        assert tokens.shape[1] == SMALL.seq_len
        assert np.all(tokens[:, 0] == corpus.tokenizer.bos_id)
        np.testing.assert_array_equal(mask[:, 1:], valid[:, 1:])
        assert np.all(mask[:, 0] == 0) and np.all(tokens[valid == 0] == corpus.tokenizer.pad_id)
    summary = corpus.summary()
    assert summary["train"]["memorized"] == SMALL.n_strings * SMALL.string_repeats


def test_arithmetic_is_correct_and_held_out_pairs_never_appear_in_training(corpus):
    train_text = {" ".join(_words(corpus, r)) for r in corpus.train}
    arith = [r for r in corpus.eval if r["skill"] == "arithmetic"]
    assert len(arith) == SMALL.n_eval
    for r in arith:
        w = _words(corpus, r)
        a, b, c = int("".join(w[0:2])), int("".join(w[3:5])), int("".join(w[6:9]))
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


class _Oracle:
    """A fake model that puts all mass on a fixed next token per position: ``table[tokens[t]]``."""

    def __init__(self, table):
        self.table = jnp.asarray(table)

    def __call__(self, params, tokens, hooks=None, valid=None):
        return jax.nn.one_hot(self.table[tokens], self.table.shape[0]) * 10.0, {}


def test_exact_match_against_a_model_with_known_greedy_outputs():
    # Successor model: after token v it predicts v + 1 (mod 6). Prompt [1, 2] → greedy [3, 4].
    apply = _Oracle((np.arange(6) + 1) % 6)
    items = {"tokens": np.array([[1, 2, 3, 4, 0], [1, 2, 3, 5, 0], [0, 1, 2, 3, 4]], np.int32),
             "prompt_len": np.array([2, 2, 3]), "answer_len": np.array([2, 2, 2])}
    correct = skills.exact_match(apply, None, items, batch_size=2)
    assert correct.tolist() == [True, False, True]
    np.testing.assert_array_equal(skills.greedy_answers(apply, None, np.array([[4]]), 3), [[5, 0, 1]])
    assert skills.skill_accuracy(correct, {"skill": ["a", "a", "b"]}) == {"a": 0.5, "b": 1.0}


@pytest.fixture(scope="module")
def model(corpus):
    cfg = ids.TransformerConfig(vocab_size=corpus.tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=1,
                                max_len=SMALL.seq_len)
    return ids.init_transformer(cfg, seed=3)


def test_exact_match_is_greedy_decoding_on_a_real_model(corpus, model):
    apply, params = model
    items = skills.to_numpy(corpus.eval)
    correct = skills.exact_match(apply, params, items, batch_size=16)
    rows = np.flatnonzero(items["skill"] == "logic")[:5]
    tokens, p, a = items["tokens"][rows], int(items["prompt_len"][rows[0]]), int(items["answer_len"][rows[0]])
    got = skills.greedy_answers(apply, params, tokens[:, :p], a, batch_size=2)
    # Greedy means: with the generated tokens appended, each one is the argmax after its prefix.
    seq = np.concatenate([tokens[:, :p], got], axis=1)
    logits = np.asarray(jax.jit(apply)(params, jnp.asarray(seq))[0])
    np.testing.assert_array_equal(logits[:, p - 1:p + a - 1].argmax(-1), got)
    np.testing.assert_array_equal(correct[rows], np.all(got == tokens[:, p:p + a], axis=1))
    with pytest.raises(ValueError, match="item 0 has prompt_len=12, answer_len=5 for tokens of length 12"):
        skills.exact_match(apply, params, {**items, "prompt_len": np.full(len(correct), 12)})


def test_perplexity_is_exp_of_the_lm_loss(corpus, model):
    apply, params = model
    data = skills.to_numpy(corpus.heldout_text, ["tokens", "loss_mask", "valid"])
    loss, _ = jax.jit(ids.lm_loss(apply))(params, {k: jnp.asarray(v) for k, v in data.items()})
    np.testing.assert_allclose(skills.perplexity(apply, params, corpus.heldout_text, batch_size=7),
                               float(jnp.exp(loss)), rtol=1e-4)
