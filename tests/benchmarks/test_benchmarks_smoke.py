"""Smoke tests of the benchmarks: they run end to end on tiny sizes and write their JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import hooks as hooks_bench  # noqa: E402

TINY = hooks_bench.Config(vocab_size=50, d_model=32, n_layers=4, n_heads=4, forward_batch=2, forward_seq=16,
                          forward_repeats=2, gen_batch=2, gen_prompt=4, gen_new=8, gen_repeats=2, preset="tiny")


def test_hooks_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "hooks.json"
    result = hooks_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("capture_overhead_ratio", "kv_cache_speedup", "goals", "goals_met", "config",
                "jax_version", "device", "tokens_agree"):
        assert key in written, key
    assert set(written["goals_met"]) == {"capture_overhead_ratio", "kv_cache_speedup"}
    assert written["config"]["gen_new"] == 8
    assert written["capture_overhead_ratio"] > 0 and written["kv_cache_speedup"] > 0
    assert written["tokens_agree"] == 1.0  # cached and uncached greedy decoding agree
