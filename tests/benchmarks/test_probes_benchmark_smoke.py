"""Smoke test of the probes benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import probes as probes_bench  # noqa: E402

# 300 fitted rows x 8 features: the shapes of tests/test_probes.py, whose compilation this can reuse.
TINY = probes_bench.Config(n_rows=375, dim=8, n_layers=3, single_repeats=1, sweep_repeats=1, preset="tiny")


def test_probes_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "probes.json"
    result = probes_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("single_auc_diff", "single_time_ratio", "single_compile_s", "sweep_time_ratio", "sweep_compile_s",
                "sweep_max_auc_diff", "goals", "goals_met", "sizes", "config", "jax_version", "device"):
        assert key in written, key
    assert set(written["goals_met"]) == {"single_auc_diff", "single_time_ratio", "sweep_time_ratio"}
    assert written["sizes"] == {"n_rows": 375, "n_fit": 300, "dim": 8, "n_layers": 3, "dtype": "float32"}
    assert written["single_auc_diff"] < 0.01 and written["sweep_max_auc_diff"] < 0.01  # same optimum as sklearn
    assert written["single_ours_converged"] and written["sweep_ours_all_converged"]
    assert len(written["sweep_auc_by_layer"]) == 3
