"""Cost of per-leaf checksums on checkpoint save and restore of a 100M-parameter state.

A state of ``n_params`` float32 parameters (random values, which do not compress: the realistic case)
in ``n_leaves`` equal leaves is saved and restored through :mod:`idesign.checkpoint`'s one orbax
path, with and without checksums, alternating (A B A B ...) so drifts in machine load hit both alike:

* ``save_time_ratio``: a synchronous save (what :func:`~idesign.checkpoint.save_checkpoint` does) with
  checksums (hashing every leaf's host bytes with xxh3-64) over the same save without. Goal: <= 1.15.
* ``restore_time_ratio``: :func:`~idesign.checkpoint.restore_checkpoint` with ``verify=True`` (hashing
  the restored leaves) over ``verify=False``. Goal: <= 1.15.

Ratios are medians of the per-pair ratios. Also reported, without a goal: ``async_save_blocking_ratio``, the
time :class:`~idesign.checkpoint.CheckpointManager`'s asynchronous ``save`` blocks the caller (hashing happens
there, writing in the background) with over without checksums. And the time to hash the whole state once and
its throughput, and the times themselves. Each save writes a fresh directory (deleted afterwards), so
the file system's page cache is in the same state for both arms.

Writes ``results/benchmarks/checkpoint.json`` and prints a table. ``--quick``: a 4M-parameter state and
fewer repeats (CPU seconds; the ratio there is dominated by fixed costs, not hashing).

Usage: ``python -m benchmarks.checkpoint [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import _common
from idesign import _checkpoint_integrity, checkpoint

GOALS = {"save_time_ratio": ("<=", 1.15), "restore_time_ratio": ("<=", 1.15)}
DEFAULT_OUT = "results/benchmarks/checkpoint.json"


@dataclasses.dataclass(frozen=True)
class Config:
    n_params: int = 100_000_000
    n_leaves: int = 50
    repeats: int = 5
    seed: int = 0
    preset: str = "full"


FULL = Config()
QUICK = Config(n_params=4_000_000, n_leaves=20, repeats=3, preset="quick")


def make_state(config: Config) -> dict[str, Any]:
    """``{'params': {'layer_i': float32[rows, 1024]}}`` with ``n_params`` parameters in all."""
    width = 1024 if config.n_params >= 1024 * config.n_leaves else 16
    rows = max(1, config.n_params // (config.n_leaves * width))
    keys = jax.random.split(jax.random.key(config.seed), config.n_leaves)
    return {"params": {f"layer_{i}": jax.random.normal(k, (rows, width), jnp.float32) for i, k in enumerate(keys)}}


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs the benchmark, writes the JSON to ``out`` (unless None) and prints a table."""
    state = _common.block(make_state(config))
    n_params = sum(x.size for x in jax.tree.leaves(state))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    root = Path(tempfile.mkdtemp(prefix="idesign_ckpt_bench_"))
    writer, async_writer = checkpoint._checkpointer(), checkpoint._checkpointer(async_save=True)
    counter = iter(range(10**9))

    def save(checksums: bool) -> None:
        path = root / f"save_{next(counter)}"
        checkpoint._write(writer, path, state, {"n": 1}, checksums=checksums)
        shutil.rmtree(path)

    def async_blocking(checksums: bool) -> float:
        # What a training loop waits for with CheckpointManager: until save() returns (hashing included).
        path = root / f"async_{next(counter)}"
        start = time.perf_counter()
        checkpoint._write(async_writer, path, state, {"n": 1}, checksums=checksums)
        blocking = time.perf_counter() - start
        async_writer.wait_until_finished()
        shutil.rmtree(path)
        return blocking

    try:
        source = checkpoint.save_checkpoint(root / "source", state)
        target = checkpoint.abstract_like(state)
        restore = lambda verify: checkpoint.restore_checkpoint(source, target, verify=verify)[0]
        times = _common.time_interleaved({"save_unchecked": lambda: save(False), "save_checked": lambda: save(True),
                                          "restore_unchecked": lambda: restore(False),
                                          "restore_checked": lambda: restore(True)}, config.repeats, warmup=1)
        blocking = {True: [], False: []}
        for _ in range(config.repeats + 1):  # the first pair warms up
            for checksums in (False, True):
                blocking[checksums].append(async_blocking(checksums))
        start = time.perf_counter()
        for leaf in jax.tree.leaves(state):
            _checkpoint_integrity.fingerprint(leaf)
        hash_s = time.perf_counter() - start
    finally:
        writer.close()
        async_writer.close()
        shutil.rmtree(root, ignore_errors=True)
    ratio = lambda a, b: _common.median(_common.pair_ratios(times, a, b))
    metrics = {
        "save_time_ratio": ratio("save_checked", "save_unchecked"),
        "restore_time_ratio": ratio("restore_checked", "restore_unchecked"),
        **{f"{name}_median_s": _common.median(ts) for name, ts in times.items()},
        "async_save_blocking_ratio": _common.median([x / y for x, y in zip(blocking[True][1:], blocking[False][1:])]),
        "async_save_blocking_unchecked_s": _common.median(blocking[False][1:]),
        "async_save_blocking_checked_s": _common.median(blocking[True][1:]),
        "hash_state_s": hash_s,
        "hash_gb_per_s": nbytes / hash_s / 1e9,
        "n_params": int(n_params),
        "state_bytes": int(nbytes),
    }
    return _common.finish(metrics, GOALS, config, out)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv,
                       quick_help="a 4M-parameter state, fewer repeats (CPU seconds)")


if __name__ == "__main__":
    cli()
