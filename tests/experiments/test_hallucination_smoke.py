"""Smoke test: the hallucination experiment runs end to end on a tiny config and writes its outputs."""

import dataclasses
import json
import math

import numpy as np

from experiments import hallucination
from idesign.data.tokenizer import ABSTAIN_ID, EOS_ID, RETRACT_ID

TINY = dataclasses.replace(hallucination.QUICK, n_known=30, n_unknown=10, n_documents=600, d_model=32, n_layers=1,
                           n_heads=2, pretrain_steps=200, warmup=10, probe_samples=2, probe_steps=30,
                           attention_steps=20, rl_steps=2, prompts_per_step=8, group_size=4, gen_batch=32, seeds=(0,))


def test_main_writes_every_documented_metric(results):
    hallucination.main(TINY, progress=False)
    metrics = json.loads((results / "hallucination" / "metrics.json").read_text())
    for key in ("probe.auc", "baselines.entropy_auc", "baselines.maxprob_auc", "monitor.precision", "monitor.recall"):
        assert key in metrics and f"{key}_std" in metrics, key
    for arm in hallucination.ARMS:
        for key in ("hallucination_rate", "known_acc", "abstain_rate", "probe_estimated_rate", "malformed_rate"):
            value = metrics[f"{arm}.{key}"]
            assert 0.0 <= value <= 1.0, (arm, key, value)
    assert 0.0 <= metrics["probe.auc_answer_only"] <= 1.0
    assert metrics["probe.reading"] in (1.0, 2.0)  # the prediction position is always read
    for reading in ("answer", "prediction", "both"):
        assert f"probe.val_auc_{reading}_layer0" in metrics
    for arm in hallucination.RL_ARMS:
        assert f"{arm}.probe_auc_on_student" in metrics
    assert metrics["base.relative_reduction"] == 0.0 and metrics["n_seeds"] == 1
    assert math.isfinite(metrics["rl_live_probe.estimate_gap"])
    for png in ("arms.png", "rl_curves.png"):
        assert (results / "hallucination" / png).stat().st_size > 0
    assert "rl_frozen_probe" in (results / "hallucination" / "README.md").read_text()


def test_answers_are_labelled_exactly():
    V = 10
    allowed = np.zeros((1, V), bool)
    allowed[0, [6, 7]] = True
    task = hallucination.Task(np.zeros((1, 2), np.int32), np.ones((1, 2), bool), np.array([6]), allowed,
                              np.array([False]), np.array([0]))
    rows = np.zeros(7, int)
    R, A, E = RETRACT_ID, ABSTAIN_ID, EOS_ID
    tokens = np.array([[6, E, 0, 0],      # correct
                       [7, E, 0, 0],      # wrong value: hallucinated
                       [7, R, 6, E],      # corrected after a retraction: supported
                       [7, R, E, 0],      # bare retraction: abstain
                       [A, E, 0, 0],      # abstain
                       [6, 7, E, 0],      # two answers: malformed
                       [6, 6, 6, 6]])     # no EOS: malformed
    valid = tokens != 0
    answers = hallucination.parse_answers(tokens, valid, task, rows)
    K = hallucination
    assert answers.kind.tolist() == [K.ASSERT, K.ASSERT, K.ASSERT, K.ABSTAIN, K.ABSTAIN, K.MALFORMED, K.MALFORMED]
    assert answers.hallucinated.tolist() == [False, True, False, False, False, False, False]
    assert answers.correct.tolist() == [True, False, True, False, False, False, False]
    assert answers.position.tolist() == [0, 0, 2, -1, -1, -1, -1]
    unknown = task._replace(unknown=np.array([True]))
    assert hallucination.parse_answers(tokens, valid, unknown, rows).hallucinated[0]  # a lucky guess still counts
