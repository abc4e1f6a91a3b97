"""Runs every benchmark module and writes one summary table, ``results/benchmarks/SUMMARY.md``.

Benchmark modules are found by listing the ``benchmarks`` package: every module whose name does not
start with ``_`` (and is not this runner) is a benchmark, so a new ``benchmarks/<name>.py`` is picked
up without registering it. Each runs in its own process, ``python -m benchmarks.<name> [--quick]
--out <dir>/<name>.json`` (separate processes: one benchmark's compilation caches, memory or crash do
not touch the next one's numbers), with a time limit. The summary has one row per goal of each
benchmark: value, goal, whether it is met, and the device it ran on; a benchmark that failed or timed
out gets a row that says so, with the end of its output in ``<dir>/<name>.log``.

Measured on a CPU, the summary says that the GPU figures are still to be measured: run the same
command on a machine with a GPU (``JAX_PLATFORMS`` unset) and copy its rows into the README's
benchmark table with the device name. Nothing in CI depends on a GPU.

Usage: ``python -m benchmarks.run_all [--quick] [--only NAME,...] [--skip NAME,...] [--out-dir DIR]
[--timeout SECONDS]``
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = "results/benchmarks"


def discover(package: str = "benchmarks") -> list[str]:
    """The benchmark modules of ``package``, sorted: every module not starting with ``_``, except this runner.

    >>> 'hooks' in discover() and 'run_all' not in discover()
    True
    """
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name != "run_all" and not m.ispkg)


def run_one(name: str, *, package: str, quick: bool, out_dir: pathlib.Path, timeout: float,
            cwd: pathlib.Path) -> dict[str, Any]:
    """Runs one benchmark in a subprocess; returns its JSON (or an ``error``) with ``seconds`` it took.

    A benchmark is a module run as ``python -m <package>.<name> [--quick] --out <json>``; here a fake one, in a
    package written to a temporary folder (no real benchmark runs):

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / 'fakebench').mkdir(); _ = (root / 'fakebench' / '__init__.py').write_text('')
    >>> _ = (root / 'fakebench' / 'ok.py').write_text(
    ...     'import json, sys; out = sys.argv[sys.argv.index("--out") + 1]; '
    ...     'json.dump({"speedup": 2.0, "goals": {"speedup": ">= 1.5"}, "goals_met": {"speedup": True}}, open(out, "w"))')
    >>> result = run_one('ok', package='fakebench', quick=True, out_dir=root, timeout=60, cwd=root)
    >>> result['speedup'], result['goals_met'], result['seconds'] > 0
    (2.0, {'speedup': True}, True)
    >>> run_one('missing', package='fakebench', quick=True, out_dir=root, timeout=60, cwd=root)['error'][:12]
    'exit code 1:'
    """
    out = out_dir / f"{name}.json"
    log = out_dir / f"{name}.log"
    out.unlink(missing_ok=True)  # a stale JSON from an earlier run must not pass for this one
    cmd = [sys.executable, "-m", f"{package}.{name}", *(["--quick"] if quick else []), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, code = output + f"\n[run_all] timed out after {timeout:.0f} s", None
    seconds = time.perf_counter() - start
    log.write_text(output)
    if code is None:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": seconds}
    if code != 0 or not out.exists():
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"exit code {code}: {last[0][:200]}", "seconds": seconds}
    return {**json.loads(out.read_text()), "seconds": seconds}


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(name: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    """``(benchmark, metric, value, goal, met, device, preset, seconds)`` rows for one benchmark's result.

    One row per goal; a failed benchmark gets one ``FAILED`` row, one without goals a row that says so.

    >>> result = {'device': 'cpu', 'backend': 'cpu', 'config': {'preset': 'quick'}, 'seconds': 12.3,
    ...           'ratio': 0.98765, 'goals': {'ratio': '<= 1.1'}, 'goals_met': {'ratio': True}}
    >>> summary_rows('compile', result)
    [('compile', 'ratio', '0.9877', '<= 1.1', 'True', 'cpu (cpu)', 'quick', '12')]
    >>> summary_rows('store', {'error': 'timed out after 60 s', 'seconds': 60})
    [('store', '—', 'FAILED: timed out after 60 s', '', '', '', '', '60')]
    """
    seconds = f"{result.get('seconds', 0):.0f}"
    if "error" in result:
        return [(name, "—", "FAILED: " + result["error"].replace("|", "/"), "", "", "", "", seconds)]
    device = f"{result.get('device', '?')} ({result.get('backend', '?')})"
    preset = str(result.get("config", {}).get("preset", "?")) if isinstance(result.get("config"), dict) else "?"
    goals = result.get("goals") or {}
    if not goals:
        return [(name, "(no goals: see the JSON)", "", "", "", device, preset, seconds)]
    met = result.get("goals_met") or {}
    return [(name, key, _fmt(result.get(key)), goal, _fmt(met.get(key)), device, preset, seconds)
            for key, goal in goals.items()]


def write_summary(results: dict[str, dict[str, Any]], path: pathlib.Path, *, quick: bool, total_s: float) -> str:
    """Writes the Markdown summary of ``results`` (benchmark name -> JSON) to ``path``; returns its text.

    >>> import pathlib, tempfile
    >>> results = {'hooks': {'backend': 'cpu', 'device': 'cpu', 'overhead': 1.02, 'goals': {'overhead': '<= 1.05'},
    ...                      'goals_met': {'overhead': True}, 'seconds': 3.0}}
    >>> text = write_summary(results, pathlib.Path(tempfile.mkdtemp()) / 'SUMMARY.md', quick=True, total_s=3.0)
    >>> print(text.splitlines()[-1])
    | hooks | overhead | 1.02 | <= 1.05 | True | cpu (cpu) | ? | 3 |
    >>> '1 of 1 measured goals met' in text, '**No GPU figures yet**' in text
    (True, True)
    """
    header = ("benchmark", "metric", "value", "goal", "met", "device", "preset", "seconds")
    rows = [r for name, result in results.items() for r in summary_rows(name, result)]
    backends = {r.get("backend") for r in results.values() if "error" not in r}
    n_goals = sum(1 for r in rows if r[4] in ("True", "False"))
    n_met = sum(1 for r in rows if r[4] == "True")
    lines = [
        "# Benchmark summary",
        "",
        f"Written by `python -m benchmarks.run_all{' --quick' if quick else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} in {total_s:.0f} s. "
        f"{n_met} of {n_goals} measured goals met; {sum('error' in r for r in results.values())} benchmark(s) failed. "
        "Each benchmark's JSON (sizes, environment, every measured key) and log lie next to this file.",
        "",
    ]
    if backends <= {"cpu", None}:
        lines += ["**No GPU figures yet**: every number here was measured on a CPU. The GPU figures wait for a "
                  "session that has a GPU: run this command there and record its rows, with the device name, "
                  "in the README's benchmark table.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: Sequence[str] | None = None, *, package: str = "benchmarks",
         cwd: pathlib.Path | None = None) -> dict[str, dict[str, Any]]:
    """Runs the chosen benchmarks, writes ``<out-dir>/SUMMARY.md``, prints it; returns ``{name: result}``.

    ``argv`` are the command line's arguments (see the module docstring); ``package`` and ``cwd`` let a test
    run a package of fake benchmarks, as here (a module that fails becomes a ``FAILED`` row, not an exception):

    >>> import contextlib, io, pathlib, sys, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / 'fakebench2').mkdir(); _ = (root / 'fakebench2' / '__init__.py').write_text('')
    >>> _ = (root / 'fakebench2' / 'broken.py').write_text('raise SystemExit("no device")')
    >>> sys.path.insert(0, str(root))                  # discovery imports the package here
    >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
    ...     results = main(['--quick', '--out-dir', 'out', '--timeout', '60'], package='fakebench2', cwd=root)
    >>> sys.path.remove(str(root))
    >>> results['broken']['error'], (root / 'out' / 'SUMMARY.md').exists()
    ('exit code 1: no device', True)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick preset")
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the JSONs, logs and SUMMARY.md go")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per benchmark")
    args = parser.parse_args(argv)
    cwd = pathlib.Path(cwd or ROOT)
    found = discover(package)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only + [n for n in args.skip.split(",") if n] if n not in found]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark(s) {unknown}; found {found}.")
    names = [n for n in (only or found) if n not in args.skip.split(",")]
    out_dir = pathlib.Path(args.out_dir)
    if not out_dir.is_absolute():
        out_dir = cwd / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for name in names:
        print(f"[run_all] {name} ...", flush=True)
        results[name] = run_one(name, package=package, quick=args.quick, out_dir=out_dir, timeout=args.timeout,
                                cwd=cwd)
        status = results[name].get("error", "ok")
        print(f"[run_all] {name}: {status} ({results[name]['seconds']:.0f} s)", flush=True)
    print(write_summary(results, out_dir / "SUMMARY.md", quick=args.quick, total_s=time.perf_counter() - start))
    return results


if __name__ == "__main__":
    main()
