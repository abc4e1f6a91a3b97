"""Smoke test of the generation benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import generation  # noqa: E402

TINY = generation.Config(vocab_size=37, d_model=16, n_layers=1, n_heads=2, batch=4, prompt_len=3, new_tokens=4,
                         group_size=2, repeats=1, preset="tiny")


def test_generation_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "generation.json"
    result = generation.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("monitor_throughput_ratio", "plain_tokens_per_s", "monitored_tokens_per_s", "rl_step_sampling_s",
                "rl_step_teacher_scoring_s", "rl_step_update_s", "goals", "goals_met", "sizes", "device"):
        assert key in written, key
    assert written["same_tokens"]  # a silent monitor changes nothing
    assert written["monitor_throughput_ratio"] > 0
    assert written["reward_time_ratio"] > 0
    shares = [written[f"rl_step_{k}_share"] for k in ("sampling", "teacher_scoring", "update")]
    assert abs(sum(shares) - 1) < 1e-6
