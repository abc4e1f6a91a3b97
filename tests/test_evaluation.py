"""Evaluators beside train.evaluate: exact-match answers by greedy KV-cache decoding, per-skill accuracy, perplexity;
the knowledge world's accuracy by frequency group, hallucination and abstain rates."""

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


# ---------------------------------------------------------------------------------------------
# Knowledge world: accuracy by frequency group, hallucination and abstain rates


@pytest.fixture(scope="module")
def knowledge_world():
    return ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(n_known=12, n_unknown=4, n_documents=60))


def _constant_model(world, token_id):
    """A transformer whose greedy next token is always ``token_id``: the final LayerNorm outputs e_0 whatever its
    input (scale 0, bias e_0) and row 0 of the unembedding puts all the weight on ``token_id``."""
    cfg = ids.TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=8, n_heads=2, n_layers=1, max_len=32,
                                tie_embeddings=False)
    apply, params = ids.init_transformer(cfg, seed=0)
    params["final_norm"]["scale"] = jnp.zeros(8)
    params["final_norm"]["bias"] = jnp.eye(8)[0]
    params["unembed"]["kernel"] = jnp.zeros((8, cfg.vocab_size)).at[0, token_id].set(10.0)
    return apply, params


def test_knowledge_evaluator_on_models_whose_answers_are_known(knowledge_world):
    world, tok = knowledge_world, knowledge_world.tokenizer
    q = world.queries
    groups, attrs, gold = np.asarray(q["group"]), np.asarray(q["attribute"]), np.asarray(q["answer_id"])
    lisbon = tok.token_to_id("lisbon")
    m = evaluation.evaluate_knowledge(*_constant_model(world, lisbon), world, batch_size=7)
    for g in ("frequent", "rare", "unknown"):
        sel = groups == g
        city = sel & (attrs == "birth_city")
        expected_correct = (city & (gold == lisbon)).sum() / sel.sum() if g != "unknown" else 0.0
        assert m[f"accuracy_{g}"] == pytest.approx(expected_correct, abs=1e-12)
        assert m[f"hallucination_rate_{g}"] == pytest.approx(city.sum() / sel.sum() - expected_correct, abs=1e-12)
        assert m[f"other_rate_{g}"] == pytest.approx(1 - city.sum() / sel.sum(), abs=1e-12)   # not a city question
        assert m[f"abstain_rate_{g}"] == 0.0 and m[f"n_{g}"] == sel.sum()
    unknown = groups == "unknown"
    assert m["accuracy_unknown_hidden_truth"] == pytest.approx(np.mean(gold[unknown] == lisbon), abs=1e-12)
    m = evaluation.evaluate_knowledge(*_constant_model(world, tok.abstain_id), world)
    assert m["abstain_rate"] == 1.0 and m["hallucination_rate"] == 0.0 and m["accuracy_frequent"] == 0.0


def test_knowledge_metrics_count_each_outcome_exactly(knowledge_world):
    world, tok = knowledge_world, knowledge_world.tokenizer
    q = world.queries
    groups, attrs, gold = np.asarray(q["group"]), np.asarray(q["attribute"]), np.asarray(q["answer_id"])
    answers = gold.copy()
    rare = np.flatnonzero(groups == "rare")
    unknown = np.flatnonzero(groups == "unknown")
    # rare: first 3 wrong values of the asked attribute, next 2 abstain, next 1 a template word
    for i in rare[:3]:
        answers[i] = next(tok.token_to_id(v) for v in world.attribute_values(attrs[i]) if tok.token_to_id(v) != gold[i])
    answers[rare[3:5]] = tok.abstain_id
    answers[rare[5]] = tok.token_to_id("born")
    # unknown: half the gold (hidden truth), the rest abstain
    answers[unknown[len(unknown) // 2:]] = tok.abstain_id
    outcomes = evaluation.knowledge_outcomes(world, answers)
    assert set(outcomes.tolist()) <= set(evaluation.OUTCOMES)
    m = evaluation.knowledge_metrics(world, answers)
    n_rare, n_unknown = len(rare), len(unknown)
    assert m["accuracy_frequent"] == 1.0 and m["hallucination_rate_frequent"] == 0.0
    assert m["accuracy_rare"] == pytest.approx((n_rare - 6) / n_rare)
    assert m["hallucination_rate_rare"] == pytest.approx(3 / n_rare)
    assert m["abstain_rate_rare"] == pytest.approx(2 / n_rare)
    assert m["other_rate_rare"] == pytest.approx(1 / n_rare)
    # a right guess about an unknown entity is still a hallucination; the control counts it
    assert m["accuracy_unknown"] == 0.0
    assert m["hallucination_rate_unknown"] == pytest.approx((n_unknown // 2) / n_unknown)
    assert m["accuracy_unknown_hidden_truth"] == m["hallucination_rate_unknown"]
    assert m["hallucination_rate"] == pytest.approx((3 + n_unknown // 2) / len(gold))
    with pytest.raises(ValueError, match=r"one integer answer token per query, shape \(\d+,\); got shape \(3,\)"):
        evaluation.knowledge_metrics(world, answers[:3])
