"""Smoke test of benchmarks.store: it runs end to end on tiny sizes and writes its JSON keys (timings not asserted)."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import store as store_bench  # noqa: E402

TINY = store_bench.Config(vocab_size=50, d_model=32, n_layers=4, n_heads=4, seq=16, batch_size=4, batches_per_shard=2,
                          throughput_rows=16, repeats=2, memory_budget_mb=0.25, preset="tiny")


def test_store_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "store.json"
    result = store_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("store_write_ratio", "store_memory_ratio", "memory_budget_mb", "written_mb", "peak_rss_mb",
                "store_memory_budget_ratio", "small_rss_growth_mb", "small_written_mb", "goals_met", "config", "device"):
        assert key in written, key
    assert set(written["goals_met"]) == {"store_write_ratio", "store_memory_ratio"}
    assert written["written_mb"] >= 10 * TINY.memory_budget_mb * 0.9   # ten times the budget went to disk
    assert TINY.memory_budget_mb * 0.9 <= written["small_written_mb"] < written["written_mb"] / 5  # the 1x run
    assert written["store_write_ratio"] > 0 and written["store_memory_ratio"] > 0
