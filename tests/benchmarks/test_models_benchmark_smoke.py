"""Smoke test of the model-import benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers", reason="the benchmark's baseline is transformers (the test extra)")

from benchmarks import models as models_bench  # noqa: E402

TINY = models_bench.Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, batch=2, seq=8,
                           repeats=1, preset="tiny")


def test_models_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "models.json"
    result = models_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("forward_time_ratio", "forward_time_ratio_gpt2", "llama_ours_median_s", "llama_torch_median_s",
                "gpt2_logits_max_diff", "torch_threads", "transformers_version", "goals", "goals_met", "config"):
        assert key in written, key
    assert set(written["goals_met"]) == {"forward_time_ratio"}
    assert written["config"]["d_model"] == 32
    assert written["forward_time_ratio"] > 0 and written["forward_time_ratio_gpt2"] > 0
    assert written["llama_logits_max_diff"] <= 1e-4 and written["gpt2_logits_max_diff"] <= 1e-4
