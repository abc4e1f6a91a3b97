"""Evaluators beside train.evaluate: exact-match answers by greedy KV-cache decoding, per-skill accuracy, perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import evaluation
from idesign.data import skills

SMALL = skills.SkillConfig(n_symbols=8, n_strings=6, string_len=8, prefix_len=3, string_repeats=5, n_entities=10,
                           n_cities=4, fact_docs=80, min_fact_repeats=2, n_pattern_train=60, n_text_docs=50,
                           n_eval=20, n_heldout_text=30)


@pytest.fixture(scope="module")
def corpus():
    return skills.make_skill_corpus(SMALL)


@pytest.fixture(scope="module")
def model(corpus):
    cfg = ids.TransformerConfig(vocab_size=corpus.tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=1,
                                max_len=SMALL.seq_len)
    return ids.init_transformer(cfg, seed=3)


def _reference_greedy(apply, params, prompts, answer_len):
    """Greedy decoding by full recomputation: append the argmax after the whole prefix, answer_len times."""
    seq = np.asarray(prompts, np.int32)
    for _ in range(answer_len):
        logits = np.asarray(apply(params, jnp.asarray(seq))[0])
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], axis=1)
    return seq[:, prompts.shape[1]:]


def _items_with_known_answers(corpus, apply, params):
    """Eval items whose answers are the model's own greedy answers in even rows and one wrong token in odd rows."""
    items = skills.to_numpy(corpus.eval)
    tokens = items["tokens"].copy()
    for p, a in set(zip(items["prompt_len"].tolist(), items["answer_len"].tolist())):
        rows = np.flatnonzero((items["prompt_len"] == p) & (items["answer_len"] == a))
        tokens[rows, p:p + a] = _reference_greedy(apply, params, tokens[rows, :p], a)
    odd = np.arange(len(tokens)) % 2 == 1
    last = items["prompt_len"] + items["answer_len"] - 1           # change the last answer token only
    tokens[odd, last[odd]] = (tokens[odd, last[odd]] + 1) % corpus.tokenizer.vocab_size
    return {**items, "tokens": tokens}, ~odd


def test_exact_match_is_greedy_decoding_by_full_recomputation(corpus, model):
    # Mixed prompt and answer lengths (every skill), a ragged last batch, and wrong final tokens.
    apply, params = model
    items, expected = _items_with_known_answers(corpus, apply, params)
    assert len(set(items["answer_len"].tolist())) >= 3
    np.testing.assert_array_equal(evaluation.exact_match(apply, params, items, batch_size=16), expected)
    rows = np.flatnonzero(items["skill"] == "memorized")
    p, a = int(items["prompt_len"][rows[0]]), int(items["answer_len"][rows[0]])
    np.testing.assert_array_equal(evaluation.greedy_answers(apply, params, items["tokens"][rows, :p], a, batch_size=4),
                                  _reference_greedy(apply, params, items["tokens"][rows, :p], a))


def test_bad_items_and_prompts_are_refused(model):
    apply, params = model
    tokens = np.ones((2, 6), np.int32)
    with pytest.raises(ValueError, match="item 1 has prompt_len=5, answer_len=2 for tokens of length 6"):
        evaluation.exact_match(apply, params, {"tokens": tokens, "prompt_len": np.array([2, 5]),
                                               "answer_len": np.array([2, 2])})
    with pytest.raises(ValueError, match="items lack the columns \\['answer_len'\\]"):
        evaluation.exact_match(apply, params, {"tokens": tokens, "prompt_len": np.array([2, 2])})
    with pytest.raises(ValueError, match="prompts must be integer token ids of shape \\[N, P >= 1\\]"):
        evaluation.greedy_answers(apply, params, np.ones(4, np.int32), 2)
    with pytest.raises(ValueError, match="answer_len must be an int >= 1"):
        evaluation.greedy_answers(apply, params, tokens, 0)
    assert evaluation.exact_match(apply, params, {"tokens": tokens[:0], "prompt_len": np.zeros(0, int),
                                                  "answer_len": np.zeros(0, int)}).shape == (0,)


def test_skill_accuracy_groups_by_skill():
    assert evaluation.skill_accuracy(np.array([True, False, True]), {"skill": ["a", "a", "b"]}) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="2 results for 3 items"):
        evaluation.skill_accuracy(np.array([True, False]), {"skill": ["a", "a", "b"]})


def test_perplexity_is_exp_of_the_lm_loss(corpus, model):
    apply, params = model
    data = skills.to_numpy(corpus.heldout_text, ["tokens", "loss_mask", "valid"])
    loss, _ = jax.jit(ids.lm_loss(apply))(params, {k: jnp.asarray(v) for k, v in data.items()})
    np.testing.assert_allclose(evaluation.perplexity(apply, params, corpus.heldout_text, batch_size=7),
                               float(jnp.exp(loss)), rtol=1e-4)
