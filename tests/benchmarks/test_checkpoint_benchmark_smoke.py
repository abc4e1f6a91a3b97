"""Smoke test of the checkpoint benchmark: runs end to end on a tiny state and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import checkpoint as checkpoint_bench  # noqa: E402

TINY = checkpoint_bench.Config(n_params=4096, n_leaves=4, repeats=2, preset="tiny")


def test_checkpoint_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "checkpoint.json"
    result = checkpoint_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("save_time_ratio", "restore_time_ratio", "save_checked_median_s", "restore_unchecked_median_s",
                "hash_gb_per_s", "async_save_blocking_ratio", "goals", "goals_met", "config", "jax_version", "device"):
        assert key in written, key
    assert set(written["goals_met"]) == {"save_time_ratio", "restore_time_ratio"}
    assert written["n_params"] == 4096 and written["state_bytes"] == 4 * 4096
    assert written["save_time_ratio"] > 0 and written["restore_time_ratio"] > 0
