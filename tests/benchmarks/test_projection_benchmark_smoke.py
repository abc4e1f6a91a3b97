"""Smoke test of the projection benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import projection as projection_bench  # noqa: E402

TINY = projection_bench.Config(vocab_size=50, d_model=32, n_layers=1, n_heads=4, batch=2, seq=8, rank=4,
                               repeats=2, preset="tiny")


def test_projection_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "projection.json"
    result = projection_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("step_time_ratio", "adamw_step_median_s", "projected_step_median_s", "goals", "goals_met",
                "config", "jax_version", "device", "n_projected_kernels"):
        assert key in written, key
    assert set(written["goals_met"]) == {"step_time_ratio"}
    assert written["config"]["rank"] == 4 and written["config"]["d_model"] == 32
    assert written["n_projected_kernels"] == 7  # q, k, v, o, up, down and the tied unembedding
    assert written["step_time_ratio"] > 0
