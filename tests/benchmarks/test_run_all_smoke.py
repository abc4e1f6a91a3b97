"""Smoke tests of the benchmark runner, ``python -m benchmarks.run_all``, on a tiny package of fake benchmarks.

The real benchmarks take minutes each; the runner's logic (discovery, one subprocess per benchmark,
failures reported instead of raised, the summary table) is exercised on three modules that finish in
well under a second: one meets its goal, one has no goals, one crashes.
"""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `idesign`
    sys.path.insert(0, str(ROOT))

from benchmarks import run_all  # noqa: E402

GOOD = '''
import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--quick", action="store_true"); p.add_argument("--out")
a = p.parse_args()
json.dump({"speed_ratio": 0.5, "goals": {"speed_ratio": "<= 1.0"}, "goals_met": {"speed_ratio": True},
           "config": {"preset": "quick" if a.quick else "full"}, "device": "cpu", "backend": "cpu"}, open(a.out, "w"))
'''
NO_GOALS = GOOD.replace('"goals": {"speed_ratio": "<= 1.0"}', '"goals": {}')
CRASH = 'raise RuntimeError("boom")\n'


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_helpers.py").write_text("")  # private: not a benchmark
    for name, source in (("alpha", GOOD), ("beta", NO_GOALS), ("gamma", CRASH)):
        (pkg / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_runner_runs_every_module_and_summarises_goals_and_failures(fake_package):
    assert run_all.discover("fakebench") == ["alpha", "beta", "gamma"]
    results = run_all.main(["--quick", "--out-dir", "out", "--timeout", "60"], package="fakebench", cwd=fake_package)
    assert set(results) == {"alpha", "beta", "gamma"}
    assert results["alpha"]["speed_ratio"] == 0.5 and results["alpha"]["config"]["preset"] == "quick"
    assert "RuntimeError: boom" in results["gamma"]["error"]
    assert "boom" in (fake_package / "out" / "gamma.log").read_text()
    summary = (fake_package / "out" / "SUMMARY.md").read_text()
    assert "| alpha | speed_ratio | 0.5 | <= 1.0 | True | cpu (cpu) | quick |" in summary
    assert "| beta | (no goals: see the JSON)" in summary
    assert "| gamma | — | FAILED: exit code 1" in summary
    assert "1 of 1 measured goals met; 1 benchmark(s) failed" in summary
    assert "No GPU figures yet" in summary
    assert json.loads((fake_package / "out" / "alpha.json").read_text())["speed_ratio"] == 0.5


def test_only_and_skip_choose_a_subset_and_unknown_names_are_refused(fake_package):
    results = run_all.main(["--only", "alpha,beta", "--skip", "beta", "--out-dir", "out"], package="fakebench",
                           cwd=fake_package)
    assert list(results) == ["alpha"] and results["alpha"]["config"]["preset"] == "full"
    with pytest.raises(SystemExit, match=r"unknown benchmark\(s\) \['delta'\]"):
        run_all.main(["--only", "delta"], package="fakebench", cwd=fake_package)


def test_every_real_benchmark_module_is_discovered_and_runnable_by_the_runner():
    import importlib
    names = run_all.discover()
    assert {"hooks", "compile", "projection", "checkpoint"} <= set(names) and "run_all" not in names
    for name in names:  # the interface the runner relies on: `python -m benchmarks.<name> [--quick] --out PATH`
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert "--quick" in source or "_common.cli" in source, name
        assert 'if __name__ == "__main__":' in source, name
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.main), name


def test_run_all_examples_run():
    """The runner's ``>>>`` examples (pytest's doctest collection covers ``idesign/`` and ``tests/``, not ``benchmarks/``)."""
    import doctest
    failures, attempted = doctest.testmod(run_all, optionflags=doctest.ELLIPSIS)
    assert attempted >= 10 and failures == 0, (attempted, failures)
