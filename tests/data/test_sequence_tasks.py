"""Sequence tasks: deterministic rows, correct answers, masks on the answers, clear errors, exact-match scoring."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

import idesign as ids
from idesign.data import sequence_tasks as st

ALL = st.SequenceTaskConfig(tasks=st.TASKS, n_examples=40, length=5, n_symbols=7, shift=2, seed=3, rule_seed=1)


def _split(data, config):
    tokens = np.asarray(data["tokens"])
    x = tokens[:, 2:2 + config.length] - st.FIRST_SYMBOL_ID
    y = tokens[:, config.answer_slice] - st.FIRST_SYMBOL_ID
    return tokens, x, y


def test_same_config_same_rows_and_seed_changes_them():
    a, b = st.make_sequence_tasks(ALL), st.make_sequence_tasks(ALL)
    assert a["tokens"] == b["tokens"] and a["task"] == b["task"]
    c = st.make_sequence_tasks(st.SequenceTaskConfig(**{**ALL.__dict__, "seed": 4}))
    assert a["tokens"] != c["tokens"]


def test_adding_a_task_leaves_the_other_tasks_examples_alone():
    one = st.make_sequence_tasks(st.SequenceTaskConfig(tasks=("reverse",), n_examples=20, seed=5))
    two = st.make_sequence_tasks(st.SequenceTaskConfig(tasks=("reverse", "sort"), n_examples=20, seed=5))
    rev = lambda d: sorted(map(tuple, np.asarray(d["tokens"])[np.asarray(d["task"]) == "reverse"].tolist()))
    assert rev(one) == rev(two)


def test_answers_follow_each_rule():
    data = st.make_sequence_tasks(ALL)
    tokens, x, y = _split(data, ALL)
    task = np.asarray(data["task"])
    rules = st.task_rules(ALL)
    expected = {
        "copy": lambda v: v,
        "reverse": lambda v: v[::-1],
        "sort": lambda v: np.array(sorted(v)),
        "rotate": lambda v: np.array([v[(i + 2) % 5] for i in range(5)]),
        "permute": lambda v: np.array([v[rules["permute"][i]] for i in range(5)]),
        "lookup": lambda v: np.array([rules["lookup"][s] for s in v]),
    }
    for i in range(len(data)):
        np.testing.assert_array_equal(y[i], expected[task[i]](x[i]), err_msg=f"row {i} ({task[i]})")
    assert (tokens[:, 0] == st.BOS_ID).all() and (tokens[:, ALL.length + 2] == st.SEP_ID).all()
    assert [st.TASKS[t - st.FIRST_TASK_ID] for t in tokens[:, 1]] == task.tolist()
    assert ((x >= 0) & (x < ALL.n_symbols)).all()
    assert {t: int((task == t).sum()) for t in st.TASKS} == {t: 40 for t in st.TASKS}


def test_rules_are_derangements_and_follow_rule_seed_not_seed():
    rules = st.task_rules(ALL)
    assert not (rules["permute"] == np.arange(5)).any() and not (rules["lookup"] == np.arange(7)).any()
    other_seed = st.task_rules(st.SequenceTaskConfig(**{**ALL.__dict__, "seed": 9}))
    other_rule = st.task_rules(st.SequenceTaskConfig(**{**ALL.__dict__, "rule_seed": 2}))
    assert all((rules[k] == other_seed[k]).all() for k in rules)
    assert any((rules[k] != other_rule[k]).any() for k in rules)


def test_loss_mask_marks_exactly_the_answer_positions_and_trains_only_them():
    data = st.make_sequence_tasks(ALL)
    mask = np.asarray(data["loss_mask"])
    want = np.zeros(ALL.seq_len, np.int32)
    want[ALL.length + 3:] = 1
    assert (mask == want).all() and mask.shape[1] == ALL.seq_len == 13
    # Through lm_loss, the counted targets are the answer tokens and nothing else.
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=ALL.vocab_size, d_model=8, n_heads=2,
                                                               n_layers=1, max_len=16))
    batch = next(ids.train.iterate_batches(data, 8, columns=["tokens", "loss_mask"]))
    _, aux = ids.lm_loss(apply)(params, batch)
    assert int(aux["tokens"]) == 8 * ALL.length


def test_bad_configs_name_the_field():
    for kwargs, field in [({"tasks": "reverse"}, "tasks"), ({"tasks": ()}, "tasks"), ({"tasks": ("add",)}, "tasks"),
                          ({"tasks": ("sort", "sort")}, "tasks"), ({"n_examples": 0}, "n_examples"),
                          ({"length": 1}, "length"), ({"n_symbols": 1}, "n_symbols"), ({"shift": 6}, "shift"),
                          ({"length": 3.0}, "length"), ({"seed": -1}, "seed"), ({"rule_seed": True}, "rule_seed")]:
        with pytest.raises(ValueError, match=f"SequenceTaskConfig.{field} ="):
            st.SequenceTaskConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown task 'add'"):
        st.task_token_id("add")
    with pytest.raises(ValueError, match=r"shape \[N, length=5\]"):
        st.solve("sort", np.zeros((2, 4), int), ALL)
    with pytest.raises(ValueError, match="symbol indices in 0..6"):
        st.solve("sort", np.full((1, 5), 7), ALL)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        st.describe([99], 2)


def test_answer_accuracy_is_exact_match_of_the_answer():
    config = st.SequenceTaskConfig(tasks=("reverse",), n_examples=10, length=3, n_symbols=4)
    data = st.make_sequence_tasks(config)
    tokens = np.asarray(data["tokens"])

    def model(params, inputs):
        # Predicts the true next token everywhere, except one answer token in the rows params marks.
        target = np.asarray(tokens[:, 1:])
        rows = jnp.arange(inputs.shape[0])
        wrong = params["wrong"][params["offset"] + rows]
        pred = jnp.asarray(target)[params["offset"] + rows]
        pred = pred.at[:, -1].set(jnp.where(wrong, (pred[:, -1] + 1) % config.vocab_size, pred[:, -1]))
        return jnp.eye(config.vocab_size)[pred], {}

    wrong = np.zeros(10, bool)
    wrong[[2, 7]] = True
    params = {"wrong": jnp.asarray(wrong), "offset": 0}
    got = st.answer_correct(model, params, data, batch_size=10)
    np.testing.assert_array_equal(got, ~wrong)
    assert st.answer_accuracy(model, params, data, batch_size=10) == pytest.approx(0.8)


def test_scores_agree_with_greedy_generation_and_batching():
    config = st.SequenceTaskConfig(tasks=("copy", "reverse"), n_examples=6, length=3, n_symbols=4)
    tokens = np.asarray(st.make_sequence_tasks(config)["tokens"])
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=config.vocab_size, d_model=16, n_heads=2,
                                                               n_layers=1, max_len=16), seed=1)
    # Make the model's own greedy continuation the "truth" of every row, then spoil one answer token
    # (first, middle or last) in some rows: exactly the untouched rows must score as correct.
    out = ids.generate(apply, params, jnp.asarray(tokens[:, :config.length + 3]), max_new_tokens=config.length,
                       sampling=ids.SamplingConfig(temperature=0.0))
    tokens[:, config.answer_slice] = np.asarray(out.tokens)[:, -config.length:]
    spoil = {1: 0, 2: 1, 4: 2, 11: 1}
    for row, pos in spoil.items():
        col = config.length + 3 + pos
        tokens[row, col] = st.FIRST_SYMBOL_ID + (tokens[row, col] - st.FIRST_SYMBOL_ID + 1) % config.n_symbols
    data = {"tokens": tokens, "loss_mask": np.asarray(st.make_sequence_tasks(config)["loss_mask"])}
    expected = ~np.isin(np.arange(12), list(spoil))
    for batch_size in (5, 12, 50):   # a padded last batch, an exact fit, one larger than the data
        np.testing.assert_array_equal(st.answer_correct(apply, params, data, batch_size=batch_size), expected)


def test_evaluator_rejects_bad_data():
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=20, d_model=8, n_heads=2, n_layers=1))
    with pytest.raises(ValueError, match="lacks key"):
        st.answer_accuracy(apply, params, {"tokens": np.ones((2, 5), np.int32)})
    with pytest.raises(ValueError, match="at least one answer position"):
        st.answer_accuracy(apply, params, {"tokens": np.ones((2, 5), np.int32), "loss_mask": np.zeros((2, 5))})
    with pytest.raises(TypeError, match="datasets.Dataset or a mapping"):
        st.answer_accuracy(apply, params, [1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        st.answer_accuracy(apply, params, st.make_sequence_tasks(st.SequenceTaskConfig(n_examples=2)), batch_size=0)


@settings(max_examples=20, deadline=None)
@given(length=st_.integers(2, 6), shift=st_.integers(1, 5), seed=st_.integers(0, 50))
def test_rows_are_well_formed_for_any_valid_config(length, shift, seed):
    shift = 1 + (shift - 1) % (length - 1)
    config = st.SequenceTaskConfig(tasks=("sort", "rotate", "lookup"), n_examples=3, length=length, n_symbols=5,
                                   shift=shift, seed=seed)
    tokens, x, y = _split(st.make_sequence_tasks(config), config)
    assert tokens.shape == (9, 2 * length + 3) and tokens.max() < config.vocab_size
    # Every task's answer is a rearrangement or a bijective image of its input: the multiset size is kept.
    assert ((y >= 0) & (y < 5)).all() and sorted(map(len, x)) == sorted(map(len, y))


def test_replay_mixture_holds_the_new_rows_and_the_asked_share_of_old_ones():
    c = st.SequenceTaskConfig(tasks=("copy",), n_examples=196, length=3, n_symbols=4)
    new = st.make_sequence_tasks(c)
    old = st.make_sequence_tasks(st.SequenceTaskConfig(tasks=("reverse", "lookup"), n_examples=100, length=3,
                                                       n_symbols=4, seed=1))
    mix = st.replay_mixture(new, old, 0.02, seed=0)
    tasks = mix["task"]
    assert len(mix) == 200 and tasks.count("copy") == 196
    assert sorted(map(tuple, mix.filter(lambda r: r["task"] == "copy")["tokens"])) == sorted(map(tuple, new["tokens"]))
    assert mix["tokens"] == st.replay_mixture(new, old, 0.02, seed=0)["tokens"]   # deterministic
    assert len(st.replay_mixture(new, old, 0.0)) == 196
    with pytest.raises(ValueError, match="fraction"):
        st.replay_mixture(new, old, 1.0)
    with pytest.raises(ValueError, match="old holds"):
        st.replay_mixture(new, old, 0.9)


def test_with_answers_of_scores_prompts_answered_as_another_task():
    c = st.SequenceTaskConfig(tasks=("reverse",), n_examples=20, length=3, n_symbols=4)
    rows = st.make_sequence_tasks(c)
    as_copy = st.with_answers_of(rows, "copy", c)
    tokens = np.asarray(rows["tokens"])
    np.testing.assert_array_equal(as_copy["tokens"][:, :6], tokens[:, :6])              # same prompts
    np.testing.assert_array_equal(as_copy["tokens"][:, 6:], tokens[:, 2:5])             # copied answers
    with pytest.raises(ValueError, match="seq_len"):
        st.with_answers_of(rows, "copy", st.SequenceTaskConfig(length=4))


@settings(max_examples=25, deadline=None)
@given(n_symbols=st_.integers(2, 12), n_edit=st_.integers(1, 12), seed=st_.integers(0, 50))
def test_edit_lookup_changes_exactly_the_edited_keys(n_symbols, n_edit, seed):
    c = st.SequenceTaskConfig(tasks=("lookup",), n_examples=40, length=3, n_symbols=n_symbols)
    if n_edit > n_symbols:
        with pytest.raises(ValueError, match="n_edit"):
            st.edit_lookup(c, n_edit, seed=seed)
        return
    table, keys = st.edit_lookup(c, n_edit, seed=seed)
    old = st.task_rules(c)["lookup"]
    assert sorted(np.flatnonzero(table != old).tolist()) == keys.tolist() and len(keys) == n_edit
    assert table.min() >= 0 and table.max() < n_symbols
    assert np.array_equal(st.edit_lookup(c, n_edit, seed=seed)[0], table)          # deterministic
    rows = st.make_sequence_tasks(c)
    edited = st.rows_with_keys(rows, keys, c)
    relabelled = st.with_lookup_table(rows, table, c)
    # Rows without an edited key keep their answer; rows with one change it; the prompt is untouched.
    same = (relabelled["tokens"] == np.asarray(rows["tokens"])).all(axis=1)
    assert np.array_equal(same, ~edited)
    assert np.array_equal(relabelled["tokens"][:, :c.length + 3], np.asarray(rows["tokens"])[:, :c.length + 3])
    with pytest.raises(ValueError, match="table must have shape"):
        st.with_lookup_table(rows, table[:-1], c)
