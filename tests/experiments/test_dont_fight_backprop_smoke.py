"""Smoke test of ``experiments/dont_fight_backprop.py`` on a tiny config.

Each arm is a differently compiled training step (~4 s of compilation each on one core), so ``main`` runs
end to end with four arms and the continual section; the other arms' own code paths (re-estimated CAFT,
per-row preventative steering) run through ``run_arm`` / ``evaluate_arm`` in a second test.
``project_one_layer``, ``caft`` and ``control_decorrelated`` differ from tested arms only in their sites,
in skipping re-estimation, or in their data.
"""

import dataclasses
import json

import numpy as np
import pytest

from experiments import _spurious, dont_fight_backprop as dfb

TINY = dataclasses.replace(dfb.QUICK, n_body=5, n_class_tokens=2, n_train=256, n_test=128, n_concept=128, d_model=16,
                           n_layers=1, n_heads=2, batch_size=32, steps=12, reestimate_every=6, continual_steps=8,
                           seeds=(0, 1))


def test_rows_follow_the_task_definition():
    spec = _spurious.TaskSpec(n_body=5, n_class_tokens=2, max_margin=3)
    train = _spurious.make_rows(spec, 400, 0, correlation="train")
    test = _spurious.make_rows(spec, 400, 1, correlation="independent")
    body = train["tokens"][:, 2:2 + spec.n_body]
    count_a = np.isin(body, spec.class_a).sum(1)
    assert np.array_equal(train["y"], (count_a > spec.n_body // 2).astype(int))
    assert np.all(np.abs(2 * count_a - spec.n_body) <= spec.max_margin)
    assert np.array_equal(train["s"], train["y"])                                    # perfectly correlated
    assert np.array_equal(train["tokens"][:, _spurious.CUE_POSITION], np.asarray(spec.cue)[train["s"]])
    assert 0.4 < (test["s"] == test["y"]).mean() < 0.6                               # decorrelated
    assert np.array_equal(train["loss_mask"].sum(1), np.ones(400))
    first = _spurious.make_rows(spec, 50, 2, correlation="independent", task="first")
    assert np.array_equal(first["y"], np.isin(first["tokens"][:, 2], spec.class_a).astype(int))


def test_project_all_layers_keeps_the_cue_embeddings_together():
    setup = dfb.make_setup(TINY, 0)
    params, hooks = dfb.run_arm("project_all_layers", setup)
    c0, c1 = setup.spec.cue
    before = np.asarray(setup.init_params["embed"]["embedding"])
    after = np.asarray(params["embed"]["embedding"])
    assert hooks is None
    assert not np.allclose(before, after)                                             # it trained
    np.testing.assert_allclose(after[c1] - after[c0], before[c1] - before[c0], atol=1e-5)


MAIN_ARMS = ("plain", "project_all_layers", "gradient_routing")


def test_main_writes_metrics_plots_and_report(results):
    config = dataclasses.replace(TINY, arms=MAIN_ARMS)
    metrics = dfb.main(config, progress=False)
    saved = json.loads((results / dfb.NAME / "metrics.json").read_text())
    for arm in config.arms:
        for key in ("id_acc_mean", "ood_acc_mean", "ood_acc_std", "spurious_probe_acc_max_layer"):
            assert 0.0 <= saved[f"{arm}.{key}"] <= 1.0, (arm, key)
        layers = [saved[f"{arm}.spurious_probe_acc_layer{l}"] for l in range(TINY.n_layers + 1)]
        assert saved[f"{arm}.spurious_probe_acc_max_layer"] >= max(layers) - 1e-9   # mean of maxima >= max of means
    for key in ("gpm.forgetting_a", "plain.forgetting_a", "gpm.acc_b", "plain.acc_b"):
        assert -1.0 <= saved[key] <= 1.0
    assert 0.3 < saved["reference.cue_only_ood_acc"] < 0.7 and saved["n_seeds"] == 2
    assert metrics["plain.ood_acc_mean"] == saved["plain.ood_acc_mean"]
    for png in ("ood_accuracy.png", "spurious_probe_by_layer.png", "continual.png"):
        assert (results / dfb.NAME / png).stat().st_size > 0
    readme = (results / dfb.NAME / "README.md").read_text()
    assert "| project_all_layers |" in readme and "GPM forgets" in readme


@pytest.mark.parametrize("arm", ["caft_reestimated", "preventative_steering"])
def test_other_arms_train_and_evaluate(arm):
    setup = dfb.make_setup(TINY, 1)
    params, hooks = dfb.run_arm(arm, setup)
    row = dfb.evaluate_arm(setup, params, hooks)
    assert hooks is None
    assert all(0.0 <= v <= 1.0 for v in row.values()), row
    assert row["spurious_probe_acc_max_layer"] == max(row[f"spurious_probe_acc_layer{l}"] for l in range(2))


def test_unknown_arm_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        dfb.main(dataclasses.replace(TINY, arms=("plain", "nope")), progress=False)
