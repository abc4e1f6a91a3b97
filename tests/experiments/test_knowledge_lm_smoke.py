"""Smoke test: the experiment and the main job run end to end on a tiny config and write their outputs."""

import dataclasses
import json

import pytest

from experiments import _common, knowledge_lm, run_all

TINY = dataclasses.replace(knowledge_lm.QUICK, n_known=20, n_unknown=5, n_documents=300, d_model=32, n_layers=1,
                           n_heads=2, seq_len=64, batch_size=8, steps=20, log_every=10, warmup=5, seeds=(0, 1))


def test_main_job_writes_metrics_plots_and_report(results, monkeypatch):
    monkeypatch.setattr(knowledge_lm, "QUICK", TINY)
    assert run_all.main(["--quick", "--only", "knowledge_lm"]) == 0
    metrics = json.loads((results / "knowledge_lm" / "metrics.json").read_text())
    for key in ("train_loss_final", "answer_acc_known_frequent", "answer_acc_known_rare", "answer_rate_unknown"):
        assert key in metrics and f"{key}_std" in metrics
    for key in ("answer_acc_known_frequent", "answer_acc_known_rare", "answer_rate_unknown", "abstain_rate_unknown"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_seeds"] == 2
    assert (results / "knowledge_lm" / "loss_curve.png").stat().st_size > 0
    report = (results / "REPORT.md").read_text()
    assert "| knowledge_lm | ok |" in report and "](knowledge_lm/loss_curve.png)" in report
    # The trained models are cached: a second run restores them (no training) and measures the same.
    assert len(list((results / "cache" / "pretrained").iterdir())) == 2
    monkeypatch.setattr(knowledge_lm, "pretrain", lambda *a, **k: pytest.fail("trained again despite the cache"))
    again = knowledge_lm.main(TINY, progress=False)
    for key in ("train_loss_final", "answer_acc_known_frequent", "answer_rate_unknown"):
        assert again[key] == metrics[key]


def test_a_failing_experiment_is_reported_not_hidden(results, monkeypatch):
    def boom(config):
        raise RuntimeError("deliberate failure")
    monkeypatch.setattr(knowledge_lm, "main", boom)
    assert run_all.main(["--quick", "--only", "knowledge_lm"]) == 1
    assert "deliberate failure" in (results / "REPORT.md").read_text()


def test_cli_overrides_are_typed_and_checked():
    config = _common.cli("x", knowledge_lm.QUICK, knowledge_lm.FULL, ["--seeds", "3", "--set", "steps=5"])
    assert config.seeds == (0, 1, 2) and config.steps == 5
    with pytest.raises(SystemExit):
        _common.cli("x", knowledge_lm.QUICK, knowledge_lm.FULL, ["--set", "nope=1"])
