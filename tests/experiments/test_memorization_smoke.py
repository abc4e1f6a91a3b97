"""Smoke test: the memorization study runs end to end on a tiny config and writes metrics, plots and a README."""

import dataclasses
import json
import math


from experiments import memorization
from idesign.data import skills

TINY = dataclasses.replace(
    memorization.QUICK, cls_train=200, cls_val=200, cls_hidden=32, cls_steps=200, cls_layers=("fc1",),
    corpus=skills.SkillConfig(n_symbols=8, n_strings=6, string_len=6, prefix_len=2, string_repeats=4, n_entities=10,
                              n_cities=4, fact_docs=40, min_fact_repeats=2, n_pattern_train=100, n_text_docs=60,
                              n_eval=20, n_heldout_text=30),
    d_model=16, n_layers=1, n_heads=2, lm_layer_sets=(("block 0", ("blocks.0.mlp.up",)),), band_layer="blocks.0.mlp.up",
    oracle_seeds=1, batch_size=16, steps=30, warmup=5, kfac_batch_size=128,
    rhos=(0.5, 0.9), n_bands=4, seeds=(0, 1))


def test_main_writes_every_documented_key_with_sane_values(results):
    metrics = memorization.main(TINY, progress=False)
    saved = json.loads((results / "memorization" / "metrics.json").read_text())
    assert saved["n_seeds"] == 2
    for method in memorization.METHODS:
        for k in ("memorized_recall", "true_label_recovery", "val_acc"):
            for when in ("before", "after"):
                key = f"classification.{method}.{k}_{when}"
                assert 0.0 <= saved[key] <= 1.0 and f"{key}_std" in saved
        assert saved[f"classification.{method}.rho"] in (0.5, 0.9, 1.0)
        for s in skills.SKILLS:
            key = f"lm.{method}.retention.{s}"
            assert key in saved
            assert saved[key] is None or saved[key] >= 0.0       # None: the skill was at 0 before editing
            assert 0.0 <= saved[f"lm.{method}.acc.{s}"] <= 1.0
        assert saved[f"lm.{method}.heldout_ppl_ratio"] > 0 and saved[f"lm.{method}.layer_set"] == 0
        assert 0.0 <= saved[f"lm.{method}.acc.unseen_strings"] <= 1.0
        for a, b in zip(memorization.PAPER_ORDER[:-1], memorization.PAPER_ORDER[1:]):
            assert f"lm.{method}.gap.{a}.{b}_std" in saved
    assert "lm.oracle.retention.memorized" in saved and saved["lm.oracle.retention.memorized_std"] == 0.0  # one seed
    # the noisy items start out with their noisy label more often than with their (never shown) true one
    assert saved["classification.kfac.memorized_recall_before"] >= saved["classification.kfac.true_label_recovery_before"]
    assert all(math.isfinite(saved[f"lm.bands.ratio.{b}"]) and saved[f"lm.bands.ratio.{b}"] > 0 for b in range(4))
    assert metrics["minutes"] > 0
    # one cached base model per seed, and one oracle (retrained without memorized strings) for the first seed
    assert len(list((results / "cache" / "pretrained").glob("skills-lm-*"))) == 3
    for png in ("retention_vs_rho.png", "classification_vs_rho.png", "band_ratios.png"):
        assert (results / "memorization" / png).stat().st_size > 0
    readme = (results / "memorization" / "README.md").read_text()
    assert "measured order" in readme and "| kfac |" in readme and "memorized ≪ arithmetic" in readme


def test_choose_rho_picks_the_lowest_admissible_objective_and_falls_back_to_no_edit():
    assert memorization.choose_rho([0.5, 0.9], [0.2, 0.1], [True, True]) == 0.9
    assert memorization.choose_rho([0.5, 0.9], [0.1, 0.1], [True, True]) == 0.9      # tie: the smaller edit
    assert memorization.choose_rho([0.5, 0.9], [0.1, 0.5], [True, False]) == 0.5
    assert memorization.choose_rho([0.5, 0.9], [0.1, 0.5], [False, False]) == 1.0
    assert memorization.choose_setting([0.5, 0.9, 0.9], [0.1, 0.1, 0.1], [True, True, True]) == 1   # then the earlier
    assert memorization.choose_setting([0.5], [0.1], [False]) is None
