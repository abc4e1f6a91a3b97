"""Smoke test of the curvature benchmark: it runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import curvature as curvature_bench  # noqa: E402

TINY = curvature_bench.Config(vocab_size=40, d_model=16, n_layers=2, n_heads=2, batch=2, seq=8, repeats=2,
                              kfac_jax=False, preset="tiny")


def test_curvature_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "curvature.json"
    result = curvature_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("collection_vs_train_step_ratio", "vs_kfac_jax_ratio", "vs_kfac_jax_max_rel_diff", "kfac_jax_status",
                "goals", "goals_met", "config", "jax_version", "device", "layers"):
        assert key in written, key
    assert written["collection_vs_train_step_ratio"] > 0
    assert written["layers"] == ["blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.1.mlp.up", "blocks.1.mlp.down"]
    assert written["vs_kfac_jax_ratio"] is None and written["goals_met"]["vs_kfac_jax_ratio"] is None
    assert written["config"]["seq"] == 8
