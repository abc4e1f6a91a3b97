"""The spurious-cue world: labels follow the partition, the cue follows the correlation, partitions are independent."""

import numpy as np
import pytest

from idesign.data import spurious

SPEC = spurious.SpuriousSpec(n_body=5, n_class_tokens=4, max_margin=3)


def _count(rows, task):
    a, _ = SPEC.classes(task)
    return np.isin(rows["tokens"][:, 2:2 + SPEC.n_body], a).sum(1)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_label_is_the_majority_under_the_tasks_partition(task):
    rows = spurious.make_rows(SPEC, 400, 0, correlation="train", task=task)
    count = _count(rows, task)
    assert np.array_equal(rows["y"], (count > SPEC.n_body // 2).astype(int))
    assert np.all(np.abs(2 * count - SPEC.n_body) <= SPEC.max_margin)
    assert np.array_equal(rows["s"], rows["y"])
    assert np.array_equal(rows["tokens"][:, spurious.CUE_POSITION], np.asarray(SPEC.cue)[rows["s"]])
    assert np.array_equal(rows["tokens"][:, -1], np.asarray(SPEC.answers)[rows["y"]])
    assert np.array_equal(rows["loss_mask"].sum(1), np.ones(400))
    assert rows["tokens"].max() < SPEC.vocab_size and rows["tokens"].shape[1] == SPEC.seq_len


def test_independent_cue_and_independent_partitions():
    rows = spurious.make_rows(SPEC, 4000, 1, correlation="independent", task="finetune")
    assert 0.45 < (rows["s"] == rows["y"]).mean() < 0.55
    # the pretraining partition's majority says nothing about the fine-tuning label
    pre_majority = _count(rows, "pretrain") > SPEC.n_body // 2
    assert 0.45 < (pre_majority == rows["y"]).mean() < 0.55
    a, b = SPEC.classes("finetune")
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(1, 1 + 2 * SPEC.n_class_tokens))


def test_cue_task_asks_for_the_cue_on_its_own_answer_tokens():
    rows = spurious.make_rows(SPEC, 200, 2, correlation="independent", task="cue")
    assert np.array_equal(rows["y"], rows["s"])
    assert np.all(rows["tokens"][:, -2] == SPEC.query_cue)
    assert np.array_equal(rows["tokens"][:, -1], np.asarray(SPEC.cue_answers)[rows["s"]])


def test_same_seed_same_rows():
    a = spurious.make_rows(SPEC, 50, 3, correlation="train")
    b = spurious.make_rows(SPEC, 50, 3, correlation="train")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, match", [({"n_body": 4}, "n_body must be odd"),
                                           ({"n_class_tokens": 3}, "n_class_tokens must be even"),
                                           ({"max_margin": 2}, "max_margin must be odd")])
def test_bad_spec_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spurious.SpuriousSpec(**kwargs)


def test_bad_task_and_correlation_are_refused():
    with pytest.raises(ValueError, match="correlation"):
        spurious.make_rows(SPEC, 4, 0, correlation="sometimes")
    with pytest.raises(ValueError, match="task"):
        spurious.make_rows(SPEC, 4, 0, correlation="train", task="parity")
