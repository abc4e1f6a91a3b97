"""Smoke test of the scanned-blocks compile benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import compile as compile_bench  # noqa: E402

TINY = compile_bench.Config(vocab_size=23, d_model=8, n_heads=2, depths=(1, 2), batch=2, seq=4, repeats=2,
                            compile_repeats=1, preset="tiny")


def test_compile_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "compile.json"
    result = compile_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("scan_compile_ratio_32_vs_4", "scan_runtime_ratio", "train_unrolled_compile_ratio_deep_vs_shallow",
                "grad_runtime_ratio_deep", "stack_params_s_deep", "goals", "goals_met", "config", "device",
                "per_depth"):
        assert key in written, key
    assert set(written["goals_met"]) == {"scan_compile_ratio_32_vs_4", "scan_runtime_ratio",
                                         "scan_per_layer_compile_ratio_32_vs_4", "scan_per_layer_runtime_ratio",
                                         "scan_layer_stacked_compile_ratio_32_vs_4", "scan_layer_stacked_runtime_ratio"}
    assert written["headline_function"] == "train_stacked"  # the headline measures the recommended training path
    depth = written["per_depth"]
    assert written["scan_compile_ratio_32_vs_4"] == (depth["2"]["train_stacked"]["scanned_compile_s"]
                                                     / depth["1"]["train_stacked"]["scanned_compile_s"])
    assert set(written["per_depth"]) == {"1", "2"}
    assert set(written["per_depth"]["2"]) == {"forward", "capture", "grad", "train", "train_layer_stacked", "train_stacked",
                                                "stack_params_s"}
    assert written["scan_compile_ratio_32_vs_4"] > 0 and written["scan_runtime_ratio"] > 0
