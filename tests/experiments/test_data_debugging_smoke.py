"""Smoke test of ``experiments/data_debugging.py`` on a tiny world (two seeds, a few DPO steps)."""

import json

from experiments import data_debugging as dd
from idesign.data import preference_world as pw

TINY = dd.Config(base=dd.BaseConfig(world=pw.PreferenceWorldSpec(n_entities=16, n_values=4, n_styles=2,
                                                                 pairs_per_source=20),
                                    d_model=16, n_layers=1, n_heads=2, n_pretrain=256, pretrain_steps=10, batch_size=32),
                 dpo_steps=3, dpo_batch=16, n_concept=32, samples=1, sae_features=8, sae_k=2, sae_steps=10, timing_repeats=1,
                 seeds=(0, 1))


def test_main_writes_the_issue_keys(results):
    summary = dd.main(TINY, progress=False)
    saved = json.loads((results / dd.NAME / "metrics.json").read_text())
    for arm in dd.ARMS:
        assert 0.0 <= saved[f"behaviour_rate.{arm}"] <= 1.0, arm
        assert saved[f"behaviour_rate.{arm}"] == saved[f"{arm}.behaviour_rate_mean"]
        assert f"behaviour_rate.{arm}_std" in saved
    for key in ("probe_precision_at_k", "gradient_precision_at_k"):
        assert 0.0 <= saved[f"attribution.{key}"] <= 1.0
    assert saved["attribution.probe_time_ratio"] > 0 and saved["attribution.k_mean"] == 8.0
    assert saved["attribution.probe_layer_mean"] == 0.0   # one block: the only candidate read site
    for key in ("r2", "oracle_r2", "r2_all", "oracle_r2_all", "r2_weighted", "r2_weighted_all"):
        value = saved[f"prediction.{key}_mean"]
        assert value is None or value != value or 0.0 <= value <= 1.0, key
    assert 0 <= saved["prediction.n_studied_mean"] <= saved["prediction.n_alive_mean"] <= 8
    assert saved["n_seeds"] == 2 and summary["dpo.behaviour_rate_mean"] == saved["dpo.behaviour_rate_mean"]
    assert set(saved["dropped_sources"]) == {"0", "1"} and len(saved["top_features"]["0"]) == 5
    assert "| dpo_probe_filtered |" in (results / dd.NAME / "README.md").read_text()
    assert any(p.name.startswith("preference-world-base") for p in (results / "cache" / "pretrained").iterdir())
