"""Shared helpers for benchmarks: timing medians, environment facts, JSON output, a printed table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ReferenceSize:
    """The reference transformer's size (:func:`reference_model`), the first fields of several benchmarks' configs.

    A benchmark's ``Config`` subclasses it (frozen too) and adds its own fields after these four, so
    ``dataclasses.asdict(config)`` lists them first, as when each config spelled them out.
    """
    vocab_size: int = 1000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4


def block(tree: Any) -> Any:
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (already compiled), each waited for."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times several functions in alternation (A B A B ...), so drifts in machine load hit them alike.

    Each function is called ``warmup`` times first (compilation), untimed.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += time_calls(fn, 1)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of timings, in seconds."""
    return {"median_s": median(xs), "min_s": float(min(xs)), "max_s": float(max(xs)), "n": len(xs)}


def pair_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Per-round ratios ``times[num][i] / times[den][i]`` of interleaved timings (each pair ran back to back).

    >>> pair_ratios({"a": [2.0, 3.0], "b": [1.0, 2.0]}, "a", "b")
    [2.0, 1.5]
    """
    return [n / d for n, d in zip(times[num], times[den], strict=True)]


def ratio_record(times: dict[str, list[float]], num: str, den: str, ratio_key: str, *,
                 medians: dict[str, str] | None = None, bounds: tuple[str, str] | None = None) -> dict[str, float]:
    """The "ratio against a named baseline" record: the median per-round ratio ``num / den`` under
    ``ratio_key``, each ``medians`` key's median time (``{key: timing name}``), and the ratio's min and
    max under ``bounds = (min_key, max_key)``.

    >>> ratio_record({"ours": [2.0, 4.0, 3.0], "base": [1.0, 2.0, 2.0]}, "ours", "base", "ratio",
    ...              medians={"ours_s": "ours"}, bounds=("lo", "hi"))
    {'ratio': 2.0, 'ours_s': 3.0, 'lo': 1.5, 'hi': 2.0}
    """
    ratios = pair_ratios(times, num, den)
    record = {ratio_key: median(ratios)}
    record.update({key: median(times[name]) for key, name in (medians or {}).items()})
    if bounds is not None:
        record.update({bounds[0]: float(min(ratios)), bounds[1]: float(max(ratios))})
    return record


def environment() -> dict[str, Any]:
    """Versions and hardware the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        # Other processes compete for the CPU on shared machines; this says how much when we started.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Prints rows as a fixed-width text table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def goal_met(goals: dict[str, tuple[str, float]], key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets ``goals[key] = (op, target)``; None when the value could not be measured."""
    if value is None:
        return None
    op, target = goals[key]
    return bool(value <= target) if op == "<=" else bool(value >= target)


def finish(metrics: dict[str, Any], goals: dict[str, tuple[str, float]], config: Any, out: str | None,
           **extra: Any) -> dict[str, Any]:
    """The shared end of every benchmark: goals, config and environment into the JSON, and a printed table."""
    result = {
        **metrics,
        "goals": {k: f"{op} {target}" for k, (op, target) in goals.items()},
        "goals_met": {k: goal_met(goals, k, metrics.get(k)) for k in goals},
        **extra,
        "config": dataclasses.asdict(config),
        **environment(),
    }
    if out is not None:
        write_json(out, result)
    print_table(
        [(k, "null" if metrics.get(k) is None else metrics[k], f"{goals[k][0]} {goals[k][1]}", result["goals_met"][k])
         for k in goals]
        + [(k, v, "", "") for k, v in metrics.items() if k not in goals and not isinstance(v, (list, dict))],
        header=("metric", "value", "goal", "met"))
    print(f"preset={getattr(config, 'preset', '?')}  device={result['device']}  jax={result['jax_version']}  "
          f"load_1m={result.get('load_average_1m')}" + (f"  -> {out}" if out else ""))
    return result


def cli(doc: str, main: Callable[..., dict[str, Any]], quick: Any, full: Any, default_out: str,
        argv: Sequence[str] | None = None, quick_help: str = "fewer repeats (CPU minutes)") -> dict[str, Any]:
    """``--quick`` / ``--out`` for a benchmark module's ``main(config, out=...)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=default_out, help="where to write the JSON")
    args = parser.parse_args(argv)
    return main(quick if args.quick else full, out=args.out)


def reference_model(config: Any, max_len: int) -> tuple[Any, Any]:
    """The reference transformer every benchmark measures: ``config``'s size fields, ``max_len`` positions."""
    import idesign as ids
    model_config = ids.TransformerConfig(vocab_size=config.vocab_size, d_model=config.d_model,
                                         n_layers=config.n_layers, n_heads=config.n_heads, max_len=max_len)
    return ids.init_transformer(model_config, seed=config.seed)
