"""The shared experiments runner: aggregation and paired statistics against hand computations."""

import doctest
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from experiments import _runner

# Three seeds, two arms. Hand computation:
#   a.acc = 0.9, 0.6, 0.6 -> mean 0.7, sd sqrt(((0.2)^2 + 2 (0.1)^2) / 2) = sqrt(0.03)
#   b.acc = 0.5, 0.5, 0.2 -> mean 0.4, sd sqrt((0.01 + 0.01 + 0.04) / 2) = sqrt(0.03)
#   a - b = 0.4, 0.1, 0.4 -> mean 0.3, sd sqrt((0.01 + 0.04 + 0.01) / 2) = sqrt(0.03), se sqrt(0.03) / sqrt(3) = 0.1
ROWS = [{"a": {"acc": 0.9, "loss": 1.0}, "b": {"acc": 0.5}},
        {"a": {"acc": 0.6, "loss": 2.0}, "b": {"acc": 0.5}},
        {"a": {"acc": 0.6, "loss": 3.0}, "b": {"acc": 0.2}}]


def test_summary_matches_hand_computation():
    s = _runner.summarize(ROWS, pairs=[("a", "b")])
    assert s["n_seeds"] == 3
    assert s["a.acc_mean"] == pytest.approx(0.7) and s["a.acc_std"] == pytest.approx(math.sqrt(0.03))
    assert s["b.acc_mean"] == pytest.approx(0.4) and s["b.acc_std"] == pytest.approx(math.sqrt(0.03))
    assert s["a.loss_mean"] == pytest.approx(2.0) and s["a.loss_std"] == pytest.approx(1.0)
    assert s["a_minus_b.acc_mean"] == pytest.approx(0.3)
    assert s["a_minus_b.acc_se"] == pytest.approx(0.1)
    assert s["a_minus_b.acc_n"] == 3
    assert "a_minus_b.loss_mean" not in s  # b has no loss: only shared metrics are paired


def test_one_seed_has_zero_spread_and_nan_propagates():
    s = _runner.summarize(ROWS[:1], pairs=[("a", "b")])
    assert s["a.acc_std"] == 0.0 and s["a_minus_b.acc_se"] == 0.0 and s["a_minus_b.acc_n"] == 1
    s = _runner.summarize([ROWS[0], {"a": {"acc": float("nan"), "loss": 1.0}, "b": {"acc": 0.1}}])
    assert math.isnan(s["a.acc_mean"])


def test_inconsistent_seeds_are_named():
    with pytest.raises(ValueError, match=r"seed #1 has arms \['a'\]"):
        _runner.summarize([ROWS[0], {"a": ROWS[1]["a"]}])
    with pytest.raises(ValueError, match=r"seed #1, arm 'b' has metrics \['acc', 'x'\]"):
        _runner.summarize([ROWS[0], {"a": ROWS[1]["a"], "b": {"acc": 1.0, "x": 0.0}}])
    with pytest.raises(KeyError, match="no arm 'c'"):
        _runner.summarize(ROWS, pairs=[("a", "c")])
    with pytest.raises(ValueError, match="equally long"):
        _runner.paired_difference([1.0], [1.0, 2.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=2, max_size=12))
def test_paired_se_is_the_sd_of_differences_over_sqrt_n(pairs):
    a, b = map(np.array, zip(*pairs))
    d = _runner.paired_difference(a, b)
    diff = a - b
    assert d.n == len(a)
    assert d.mean == pytest.approx(diff.mean(), abs=1e-9)
    assert d.se == pytest.approx(math.sqrt(((diff - diff.mean()) ** 2).sum() / (len(a) - 1) / len(a)), abs=1e-9)
    # swapping the arms flips the sign and keeps the error
    r = _runner.paired_difference(b, a)
    assert r.mean == pytest.approx(-d.mean, abs=1e-9) and r.se == pytest.approx(d.se, abs=1e-9)


def test_run_writes_metrics_per_seed_and_tables(results):
    calls = []

    def run_seed(seed):
        calls.append(seed)
        return ROWS[seed]

    out = _runner.run("toy", (0, 1, 2), run_seed, pairs=[("a", "b")], extra={"note": 1.0}, progress=False)
    assert calls == [0, 1, 2] and out.seeds == (0, 1, 2)
    metrics = json.loads((results / "toy" / "metrics.json").read_text())
    assert metrics["a_minus_b.acc_se"] == pytest.approx(0.1) and metrics["note"] == 1.0 and "minutes" in metrics
    per_seed = json.loads((results / "toy" / "per_seed.json").read_text())
    assert per_seed["2"]["b"]["acc"] == 0.2
    table = _runner.arm_table(out.summary, ["a", "b"], ["acc"])
    assert "| a | 0.700 ± 0.173 |" in table
    assert "| a − b | acc | 0.300 | 0.100 | 3.0 | 3 |" in _runner.paired_table(out.summary, [("a", "b")], ["acc"])


def test_docstring_examples():
    failures, _ = doctest.testmod(_runner)
    assert failures == 0
