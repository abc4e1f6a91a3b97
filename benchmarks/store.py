"""Write throughput and host memory of the on-disk activation store (``idesign.activation_store``).

Two measurements on the reference model, every position of two residual sites captured in float32:

* ``store_write_ratio``: rows per second of :func:`idesign.activation_store.write_store` divided by rows per
  second of the forward pass alone (the same jitted forward capturing the same sites, waited for, nothing
  transferred or written), over the same dataset. Runs alternate (A B A B ...) and the ratio is the median of
  the per-pair ratios. Goal: >= 0.8.
* ``store_memory_ratio``: how resident memory grows with the amount written, with no budget in the ratio:
  the growth of resident memory while writing ``memory_factor x memory_budget_mb`` (640 MB) of activations
  divided by the growth while writing ``memory_budget_mb`` (64 MB), each in a fresh subprocess. Growth is the
  highest RSS seen by a thread sampling ``/proc/self/statm`` every 5 ms, minus the RSS just before writing,
  taken after the model is built, its forward pass compiled and the token ids made, so it is what the store
  itself holds (a few batches in flight, allocator retention). A store that streams has a growth that does not
  depend on how much it writes. Goal: <= 1.5 (flat in the amount written; 10 would be linear).
  ``store_memory_budget_ratio`` (informational, the former ``store_memory_ratio``): the growth while writing
  640 MB divided by the 64 MB budget. The JSON also records the budget, the bytes written, the baselines and
  ``ru_maxrss`` before and after (a high-water mark, which compilation usually sets higher than writing);
  the small run's keys start with ``small_``.

Writes ``results/benchmarks/store.json`` and prints a table. ``--quick`` times fewer rows and repeats.

Usage: ``python -m benchmarks.store [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

import idesign as ids
from benchmarks import _common

SITES = ("blocks.1.resid_post", "blocks.3.resid_post")
GOALS = {"store_write_ratio": (">=", 0.8), "store_memory_ratio": ("<=", 1.5)}
DEFAULT_OUT = "results/benchmarks/store.json"


@dataclasses.dataclass(frozen=True)
class Config(_common.ReferenceSize):
    seq: int = 128
    batch_size: int = 16
    batches_per_shard: int = 4
    throughput_rows: int = 256
    repeats: int = 3
    memory_budget_mb: float = 64.0
    memory_factor: float = 10.0
    seed: int = 0
    preset: str = "full"


FULL = Config()
# One budget for both presets (64 MB, so 640 MB written): the writer's growth is a roughly constant ~25-55 MB
# (forward working set, batches in flight, allocator retention), so a smaller budget measures the allocator.
QUICK = dataclasses.replace(FULL, throughput_rows=128, repeats=2, preset="quick")


def _model(config: Config):
    return _common.reference_model(config, max_len=config.seq)


def _tokens(config: Config, rows: int) -> np.ndarray:
    return np.random.default_rng(config.seed).integers(0, config.vocab_size, (rows, config.seq)).astype(np.int32)


def _row_bytes(config: Config) -> int:
    return len(SITES) * config.seq * config.d_model * 4


def bench_throughput(apply, params, config: Config) -> dict[str, Any]:
    tokens = _tokens(config, config.throughput_rows)
    hooks = ids.capture(*SITES)
    forward = jax.jit(lambda p, t: apply(p, t, hooks=hooks)[1])
    batches = [tokens[i:i + config.batch_size] for i in range(0, len(tokens), config.batch_size)]
    root = tempfile.mkdtemp(prefix="idesign-store-bench-")

    def forward_only():
        return [_common.block(forward(params, b)) for b in batches]

    def write():
        path = os.path.join(root, "store")
        shutil.rmtree(path, ignore_errors=True)
        ids.activation_store.write_store(path, apply, params, {"tokens": tokens}, list(SITES),
                                         batch_size=config.batch_size,
                                         shard_rows=config.batch_size * config.batches_per_shard, progress=False)

    try:
        times = _common.time_interleaved({"forward": forward_only, "write": write}, config.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = config.throughput_rows
    return {
        **_common.ratio_record(times, "forward", "write", "store_write_ratio",
                               bounds=("write_ratio_min", "write_ratio_max")),
        "forward_rows_per_s": rows / _common.median(times["forward"]),
        "write_rows_per_s": rows / _common.median(times["write"]),
        "write_mb_per_s": rows * _row_bytes(config) / 2**20 / _common.median(times["write"]),
    }


def _maxrss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    """Resident memory now (Linux /proc; ru_maxrss is a high-water mark that compilation already set)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler:
    """Samples the resident memory every 5 ms on a thread; ``peak`` is the highest value seen."""

    def __init__(self):
        import threading
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def memory_child(config: Config, factor: float | None = None) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS before and after writing ``factor x budget`` of activations
    (``factor`` defaults to ``config.memory_factor``)."""
    factor = config.memory_factor if factor is None else factor
    apply, params = _model(config)
    rows = int(factor * config.memory_budget_mb * 2**20 / _row_bytes(config))
    rows -= rows % config.batch_size
    shard_rows = config.batch_size * config.batches_per_shard
    root = tempfile.mkdtemp(prefix="idesign-store-mem-")
    try:
        # compile the forward pass (same shapes) and the store's own small functions first
        ids.activation_store.write_store(os.path.join(root, "warm"), apply, params,
                                         {"tokens": _tokens(config, config.batch_size)}, list(SITES),
                                         batch_size=config.batch_size, shard_rows=config.batch_size, progress=False)
        data = {"tokens": _tokens(config, rows)}
        baseline, maxrss_before = _rss_mb(), _maxrss_mb()
        start = time.perf_counter()
        with _PeakSampler() as sampler:
            store = ids.activation_store.write_store(os.path.join(root, "big"), apply, params, data, list(SITES),
                                                     batch_size=config.batch_size, shard_rows=shard_rows,
                                                     progress=False)
        seconds = time.perf_counter() - start
        peak = sampler.peak
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store.path) for f in fs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"memory_budget_mb": config.memory_budget_mb, "written_mb": written / 2**20, "rows_written": rows,
            "baseline_rss_mb": baseline, "peak_rss_mb": peak, "rss_growth_mb": peak - baseline,
            "maxrss_before_mb": maxrss_before, "maxrss_after_mb": _maxrss_mb(),
            "batch_mb": config.batch_size * _row_bytes(config) / 2**20, "memory_write_s": seconds}


def _memory_run(config: Config, factor: float) -> dict[str, Any]:
    """:func:`memory_child` in a fresh subprocess (its own allocator, compile caches and RSS)."""
    code = ("import json, sys; from benchmarks import store; cfg = store.Config(**json.loads(sys.argv[1])); "
            "print('RESULT' + json.dumps(store.memory_child(cfg, float(sys.argv[2]))))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(config)), str(factor)],
                          capture_output=True, text=True, env=env, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def bench_memory(config: Config) -> dict[str, Any]:
    """Growth of resident memory writing ``memory_factor x`` the budget, and writing the budget once; their ratio."""
    result = _memory_run(config, config.memory_factor)
    small = _memory_run(config, 1.0)
    result.update({f"small_{k}": v for k, v in small.items() if k != "memory_budget_mb"})
    # A floor of one page keeps the ratio defined if the small run's growth is within sampling noise of zero.
    floor = os.sysconf("SC_PAGE_SIZE") / 2**20
    result["store_memory_ratio"] = result["rss_growth_mb"] / max(small["rss_growth_mb"], floor)
    result["store_memory_budget_ratio"] = result["rss_growth_mb"] / config.memory_budget_mb
    return result


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs both measurements, writes the JSON to ``out`` (unless None) and prints a table."""
    apply, params = _model(config)
    metrics = {**bench_throughput(apply, params, config), **bench_memory(config)}
    return _common.finish(metrics, GOALS, config, out, sites=list(SITES))


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="fewer rows and repeats for the throughput ratio")


if __name__ == "__main__":
    cli()
