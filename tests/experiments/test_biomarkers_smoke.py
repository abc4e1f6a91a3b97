"""Smoke test: the biomarker study runs end to end on a tiny config (through the main job) and writes its outputs."""

import dataclasses
import json


from experiments import biomarkers, run_all

TINY = dataclasses.replace(biomarkers.QUICK, n_train=80, n_discovery=40, n_heldout=40, min_fragments=16,
                           max_fragments=32, d_hidden=8, d_embed=4, steps=40, batch_size=16, sae_features=8,
                           sae_k=2, sae_steps=60, n_motifs=4, n_permutations=1000, seeds=(0, 1), null_seeds=(0, 1),
                           alt_seeds=(0,))


def test_biomarkers_main_job_writes_metrics_plots_and_report(results, monkeypatch):
    monkeypatch.setattr(biomarkers, "QUICK", TINY)
    assert run_all.main(["--quick", "--only", "biomarkers"]) == 0
    metrics = json.loads((results / "biomarkers" / "metrics.json").read_text())
    for key in ("model_auroc_heldout", "distilled_auroc_heldout", "distilled_auroc_ratio", "oracle_auroc_heldout"):
        assert 0.0 <= metrics[key] <= (2.0 if "ratio" in key else 1.0) and f"{key}_std" in metrics
    shares = {"planted_rank1_fraction": 2, "planted_significant_fraction": 2, "null_false_discovery_fraction": 2,
              "alt_planted_rank1_fraction": 1, "label_baseline_rank1_fraction": 2, "probe_rank1_fraction": 2,
              "sae_rank1_fraction": 2, "attribution_rank1_fraction": 2}
    for key, n in shares.items():  # shares of seeds: multiples of 1/n in [0, 1]
        assert 0.0 <= metrics[key] <= 1.0 and abs(metrics[key] * n - round(metrics[key] * n)) < 1e-9, key
    assert 1.0 <= metrics["planted_rank_mean"] <= 30
    assert metrics["n_seeds"] == 2 and metrics["n_null_seeds"] == 2 and metrics["n_alt_seeds"] == 1
    for png in ("ranking.png", "length_distributions.png"):
        assert (results / "biomarkers" / png).stat().st_size > 0
    readme = (results / "biomarkers" / "README.md").read_text()
    assert "| rank | candidate |" in readme and "Targets" in readme
    assert "| biomarkers | ok |" in (results / "REPORT.md").read_text()


def test_same_seed_same_cohorts_and_arms_are_different_draws():
    a1, b1 = biomarkers.make_cohorts(TINY, "planted", 0)
    a2, _ = biomarkers.make_cohorts(TINY, "planted", 0)
    n1, _ = biomarkers.make_cohorts(TINY, "null", 0)
    assert (a1.lengths == a2.lengths).all() and not (a1.lengths == n1.lengths).all()
    assert set(b1.batch.tolist()) == {2} and b1.lengths.shape[1] == TINY.max_fragments
