"""Smoke test of ``experiments/dont_fight_backprop.py`` on a tiny config.

Each arm is a differently compiled training step, so ``main`` runs end to end with a few arms; the other
arms' own code paths run through ``run_arm`` in a second test on the same (cached) base model.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import dont_fight_backprop as dfb

TINY = dfb.Config(base=dfb.BaseConfig(n_body=5, n_class_tokens=2, d_model=16, n_layers=1, n_heads=2, n_pretrain=256,
                                      pretrain_steps=10, batch_size=32),
                  n_finetune=128, n_retain=32, n_test=64, n_concept=64, steps=6, batch_size=32, reestimate_every=3,
                  seeds=(0, 1))
MAIN_ARMS = ("plain", "control_decorrelated", "caft", "probe_penalty")


def test_main_writes_the_issue_keys_and_report(results):
    config = dataclasses.replace(TINY, arms=MAIN_ARMS)
    summary = dfb.main(config, progress=False)
    saved = json.loads((results / dfb.NAME / "metrics.json").read_text())
    for arm in MAIN_ARMS:
        for key in ("ood_acc_mean", "id_acc_mean", "ood_follows_cue"):
            assert 0.0 <= saved[f"{arm}.{key}"] <= 1.0, (arm, key)
        assert saved[f"{arm}.ood_follows_cue"] == saved[f"{arm}.ood_follows_cue_mean"]
    assert 0.0 <= saved["caft.direction_readout_cosine"] <= 1.0
    for key in ("frozen_probe_auc_after", "fresh_probe_auc_after"):
        assert 0.0 <= saved[f"probe_penalty.{key}"] <= 1.0
    assert saved["caft.cue_rows_change_mean"] == 0.0 and saved["plain.cue_rows_change_mean"] > 0.0
    assert saved["n_seeds"] == 2 and summary["plain.ood_acc_mean"] == saved["plain.ood_acc_mean"]
    assert (results / dfb.NAME / "ood_accuracy.png").stat().st_size > 0
    readme = (results / dfb.NAME / "README.md").read_text()
    assert "| caft |" in readme and "Evasion" in readme
    assert any(p.name.startswith("spurious-cue-base") for p in (results / "cache" / "pretrained").iterdir())


@pytest.mark.parametrize("arm", ["caft_pca", "preventative_steering", "gradient_routing", "project_one_layer"])
def test_other_arms_train_and_evaluate(arm, results):
    world = dfb.make_world(TINY, 0)
    plain_row, plain = dfb.run_arm("plain", world)
    row, params = dfb.run_arm(arm, world, plain)
    for key in ("id_acc", "ood_acc", "ood_follows_cue"):
        assert 0.0 <= row[key] <= 1.0
    assert row["cue_rows_change"] == 0.0                       # the shortcut is closed in every intervention arm
    if arm == "gradient_routing":
        assert 0.0 <= row["ablation_only_ood_acc"] <= 1.0
    else:
        assert 0.0 <= row["direction_readout_cosine"] <= 1.0


def test_orthogonalise_removes_the_readout_and_reports_the_cosine():
    r = np.array([1.0, 0.0, 0.0])
    d, cos = dfb.orthogonalise(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), r)
    np.testing.assert_allclose(d @ r, 0.0)
    np.testing.assert_allclose(cos, [1 / math.sqrt(2), 0.0])
