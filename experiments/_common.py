"""Shared plumbing for experiments: presets, CLI, results folder, seed statistics, report tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(os.environ.get("IDESIGN_RESULTS", "results"))


def results_dir(name: str) -> Path:
    path = RESULTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(description: str, quick: Any, full: Any, argv: Sequence[str] | None = None) -> Any:
    """Parses ``--quick`` / ``--full`` / ``--seeds N`` / ``--set key=value`` into a config dataclass."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CPU preset: a few minutes on 2 cores")
    group.add_argument("--full", action="store_true", help="GPU preset")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set steps=500")
    args = parser.parse_args(argv)
    config = full if args.full else quick
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(range(args.seeds))
    fields = {f.name: f for f in dataclasses.fields(config)}
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in fields:
            parser.error(f"--set {key}: unknown field; fields are {sorted(fields)}")
        current = getattr(config, key)
        changes[key] = type(current)(json.loads(raw)) if not isinstance(current, str) else raw
    return dataclasses.replace(config, **changes)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{key: mean}`` plus ``{key}_std`` (sample std over seeds) and ``n_seeds``."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        m, s = mean_std([r[key] for r in per_seed])
        out[key], out[f"{key}_std"] = m, s
    out["n_seeds"] = len(per_seed)
    return out


def write_metrics(name: str, metrics: Mapping[str, Any]) -> Path:
    """Writes flat ``results/<name>/metrics.json`` (non-finite floats become null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    path = results_dir(name) / "metrics.json"
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def pm(metrics: Mapping[str, float], key: str) -> str:
    """``mean ± std`` of an aggregated metric."""
    return f"{metrics[key]:.3f} ± {metrics.get(key + '_std', 0.0):.3f}"


def write_readme(name: str, text: str) -> Path:
    path = results_dir(name) / "README.md"
    path.write_text(text.strip() + "\n")
    return path
