"""Smoke test: the surgical-update study runs end to end on a tiny config; its masks and freezing do what they claim."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import idesign as ids
from experiments import surgical_update as su

TINY = dataclasses.replace(su.QUICK, t1="copy", t2="lookup", t3="reverse", length=3, n_symbols=4, n_train=64,
                           n_eval=32, n_attribution=32, d_model=16, n_layers=1, n_heads=2, batch_size=16,
                           pretrain_steps=30, warmup=5, finetune_steps=5, budget=0.1, budgets=(0.1, 0.5), seeds=(0, 1))


def test_main_writes_every_arm_budget_and_target(results):
    metrics = su.main(TINY, progress=False)
    saved = json.loads((results / "surgical_update" / "metrics.json").read_text())
    for arm in su.ARMS:
        for key in ("t1_acc", "t2_acc", "t3_acc", "t1_retention", "t2_retention", "t3_rel_full_ft", "frozen_fraction"):
            assert f"{arm}.{key}" in saved and f"{arm}.{key}_std" in saved
        for key in ("t1_acc", "t2_acc", "t3_acc"):
            assert 0.0 <= saved[f"{arm}.{key}"] <= 1.0
    for arm in su.FROZEN_ARMS:
        for budget in ("10", "50"):
            assert f"budget_{budget}.{arm}.t1_retention" in saved
    for key in ("baseline.t1_acc", "baseline.t2_acc", "baseline.t3_acc"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["n_seeds"] == 2 and set(saved[k] for k in saved if k.startswith("targets.")) <= {0.0, 1.0}
    # Frozen sizes: nothing for full_ft, the circuit within its budget, the random control exactly as large.
    assert saved["full_ft.frozen_fraction"] == 0.0
    assert 0.0 < saved["freeze_circuit.frozen_fraction"] <= 0.1
    assert saved["freeze_random.frozen_fraction"] == saved["freeze_circuit.frozen_fraction"]
    assert saved["budget_50.freeze_circuit.frozen_fraction"] > saved["budget_10.freeze_circuit.frozen_fraction"]
    # Retentions are ratios of accuracies (undefined, null in the JSON, when a seed's baseline accuracy is 0).
    for arm in su.ARMS:
        assert math.isnan(metrics[f"{arm}.t1_retention"]) or metrics[f"{arm}.t1_retention"] >= 0.0
    assert math.isnan(metrics["full_ft.t3_rel_full_ft"]) or metrics["full_ft.t3_rel_full_ft"] == 1.0
    readme = (results / "surgical_update" / "README.md").read_text()
    assert "| freeze_circuit |" in readme and ("met" in readme)
    assert (results / "surgical_update" / "retention_vs_t3.png").stat().st_size > 0


def test_masks_fill_their_budgets_and_freezing_is_bit_exact():
    apply, params = ids.init_transformer(su.model_config(TINY), seed=0)
    batch = next(su.batches(su.task_data(TINY, (TINY.t1,), 16, seed=0), TINY, 0))
    masks = su.arm_masks(TINY, apply, params, batch, seed=0)
    total = su.n_params(params)
    for budget, arms in masks.items():
        sizes = {arm: su.frozen_count(m, params) for arm, m in arms.items()}
        assert sizes["freeze_circuit"] <= budget * total and sizes["freeze_random"] == sizes["freeze_circuit"]
        assert sizes["freeze_elements"] == int(budget * total)
        # Whole layers: no single group added or removed would bring the size nearer the budget.
        report = ids.masks.size_report(arms["freeze_layers"], params).layers
        assert all(s in (0, t) for s, t in report.values())
        # Each group is added only when it brings the size nearer the budget: nearer than freezing nothing.
        assert abs(sizes["freeze_layers"] - budget * total) < budget * total
    # The masks in run_seed's order (the compiled fine-tuning step is shared with the test above).
    chosen = [ids.masks.full(params, False)] + [masks[b][arm] for b in sorted(masks) for arm in su.FROZEN_ARMS]
    tuned = su.finetune_arms(TINY, params, [su.dense(m, params) for m in chosen], seed=0, progress=False)
    for mask, new in zip(chosen, tuned):
        dense = su.dense(mask, params)
        for d, a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(new), jax.tree.leaves(params)):
            a, b = np.asarray(a), np.asarray(b)
            assert np.array_equal(a[d].view(np.uint32), b[d].view(np.uint32))   # frozen: same bits
        assert any((np.asarray(a) != np.asarray(b))[~d].any()
                   for d, a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(new), jax.tree.leaves(params)))


def test_budget_must_be_in_the_sweep():
    with pytest.raises(ValueError, match="must be one of Config.budgets"):
        su.main(dataclasses.replace(TINY, budget=0.3), progress=False)
