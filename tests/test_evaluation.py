"""Evaluators beside train.evaluate: exact-match answers by greedy KV-cache decoding, per-skill accuracy, perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import evaluation
from idesign.data import skills

SMALL = skills.SkillConfig(n_symbols=8, n_strings=6, string_len=8, prefix_len=3, string_repeats=5, n_entities=10,
                           n_cities=4, fact_docs=80, min_fact_repeats=2, n_pattern_train=60, n_eval=20,
                           n_heldout_text=20)


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
    """Eval items whose answers are the model's own greedy answers in even rows and a wrong token in odd rows."""
    items = skills.to_numpy(corpus.eval)
    tokens = items["tokens"].copy()
    for p, a in set(zip(items["prompt_len"].tolist(), items["answer_len"].tolist())):
        rows = np.flatnonzero((items["prompt_len"] == p) & (items["answer_len"] == a))
        tokens[rows, p:p + a] = _reference_greedy(apply, params, tokens[rows, :p], a)
    odd = np.arange(len(tokens)) % 2 == 1
    last = items["prompt_len"] + items["answer_len"] - 1           # change the last answer token only
    tokens[odd, last[odd]] = (tokens[odd, last[odd]] + 1) % corpus.tokenizer.vocab_size
    return {**items, "tokens": tokens}, ~odd


def test_exact_match_equals_the_old_private_decoder(corpus, model):
    # Kept only until the private decoder in idesign.data.skills is deleted.
    apply, params = model
    items, _ = _items_with_known_answers(corpus, apply, params)
    np.testing.assert_array_equal(evaluation.exact_match(apply, params, items, batch_size=16),
                                  skills.exact_match(apply, params, items, batch_size=16))
    real = skills.to_numpy(corpus.eval)
    np.testing.assert_array_equal(evaluation.exact_match(apply, params, real), skills.exact_match(apply, params, real))
    rows = np.flatnonzero(real["skill"] == "memorized")
    p, a = int(real["prompt_len"][rows[0]]), int(real["answer_len"][rows[0]])
    np.testing.assert_array_equal(evaluation.greedy_answers(apply, params, real["tokens"][rows, :p], a, batch_size=4),
                                  skills.greedy_answers(apply, params, real["tokens"][rows, :p], a))
