"""Smoke test of the attribution benchmark: runs end to end on tiny sizes and writes its JSON keys.

Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import attribution as attribution_bench  # noqa: E402

TINY = attribution_bench.Config(preset="tiny", sizes=((1, 16),), n_pairs=6, prompt_len=3, response_len=2,
                                vocab_size=20, grad_batch=4, repeats=1)


def test_attribution_benchmark_writes_its_metrics(tmp_path):
    out = tmp_path / "attribution.json"
    result = attribution_bench.main(TINY, out=str(out))
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("1x16.ratio", "1x16.ratio_first_block", "1x16.probe_s", "1x16.gradient_s", "1x16.n_params",
                "goals_met", "config", "device"):
        assert key in written, key
    assert written["1x16.ratio"] > 0 and set(written["goals_met"]) == {"1x16.ratio"}
