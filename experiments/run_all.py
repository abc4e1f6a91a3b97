"""The main job: run every experiment (``--quick`` by default) and gather ``results/REPORT.md``.

    python -m experiments.run_all --quick      # CPU, minutes
    python -m experiments.run_all --full       # GPU presets
    python -m experiments.run_all --only knowledge_lm

An experiment is a module in ``experiments/`` (not starting with ``_``) with ``main(config)``,
``QUICK`` and ``FULL``. One failing experiment is reported in the report and the exit code; the
others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import experiments
from experiments import _common


def discover() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)
             if not m.name.startswith("_") and m.name != "run_all"]
    return sorted(n for n in names if hasattr(importlib.import_module(f"experiments.{n}"), "main"))


def write_report(outcomes: dict[str, dict], preset: str) -> Path:
    lines = [f"# idesign experiments ({preset} preset)", "",
             "Each section is written by its experiment; metrics are in `results/<name>/metrics.json`.", "",
             "| experiment | status | minutes |", "|---|---|---|"]
    lines += [f"| {n} | {o['status']} | {o['minutes']:.1f} |" for n, o in outcomes.items()]
    for name, outcome in outcomes.items():
        lines.append("")
        readme = _common.RESULTS / name / "README.md"
        if outcome["status"] == "ok" and readme.exists():
            # Images are linked relative to the experiment's folder; make them relative to results/.
            text = readme.read_text().replace("](", f"]({name}/").replace(f"]({name}/http", "](http")
            lines.append(text)
        else:
            lines += [f"## {name}: FAILED", "", "```", outcome.get("error", "").strip()[-3000:], "```"]
    path = _common.RESULTS / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CPU presets (default)")
    group.add_argument("--full", action="store_true", help="GPU presets")
    parser.add_argument("--only", nargs="*", help="run only these experiments")
    args = parser.parse_args(argv)
    preset = "full" if args.full else "quick"
    names = args.only or discover()
    outcomes: dict[str, dict] = {}
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        config = module.FULL if args.full else module.QUICK
        print(f"=== {name} ({preset})", flush=True)
        t0 = time.perf_counter()
        try:
            module.main(config)
            outcomes[name] = {"status": "ok"}
        except Exception:  # one broken study must not hide the others' results
            outcomes[name] = {"status": "failed", "error": traceback.format_exc()}
            print(outcomes[name]["error"], file=sys.stderr)
        outcomes[name]["minutes"] = (time.perf_counter() - t0) / 60
    report = write_report(outcomes, preset)
    (_common.RESULTS / "run_all.json").write_text(json.dumps(outcomes, indent=2) + "\n")
    print(f"report: {report}")
    return int(any(o["status"] != "ok" for o in outcomes.values()))


if __name__ == "__main__":
    sys.exit(main())
