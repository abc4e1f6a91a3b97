"""Cost of gradient-subspace projection in a training step of the reference model.

One measurement against a named baseline, as medians after compilation:

* ``step_time_ratio``: time of a jitted :func:`idesign.train.make_train_step` step with
  ``projection.projected(optax.adamw(...), subspaces)`` — input-side projection ``(I - UᵀU) ΔW`` of a
  rank-``rank`` basis on every dense kernel (q/k/v/o, MLP up/down and the tied unembedding) — divided
  by the same step with plain ``optax.adamw``. Runs alternate (A B A B ...) and the ratio is the median
  of the per-pair ratios, robust to drifts in machine load. Goal: <= 1.10.

Writes ``results/benchmarks/projection.json`` (measured keys, goals, whether met, the sizes used, jax
version and device) and prints a table. ``--quick`` uses fewer repeats (same sizes; the JSON's
``config`` records them).

Usage: ``python -m benchmarks.projection [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import idesign as ids
from benchmarks import _common
from idesign import subspaces
from idesign.optim import projection

GOALS = {"step_time_ratio": ("<=", 1.10)}
DEFAULT_OUT = "results/benchmarks/projection.json"


@dataclasses.dataclass(frozen=True)
class Config(_common.ReferenceSize):
    batch: int = 32
    seq: int = 128
    rank: int = 16
    repeats: int = 20
    seed: int = 0
    preset: str = "full"


FULL = Config()
QUICK = dataclasses.replace(FULL, repeats=8, preset="quick")


def _random_subspace(key: jax.Array, dim: int, rank: int) -> subspaces.Subspace:
    q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, rank)))
    return subspaces.Subspace(q.T)


def build(config: Config) -> dict[str, Any]:
    """The model, a batch, both optimizers and their jitted steps and initial states."""
    apply, params = _common.reference_model(config, max_len=max(256, config.seq))
    shapes = ids.tree.named_leaves(params)
    keys = jax.random.split(jax.random.key(config.seed + 1), len(apply.dense_layers))
    spec = {}
    for key, (site, kernel) in zip(keys, apply.dense_layers.items()):
        d_in = shapes[kernel].shape[0] if kernel.endswith(".kernel") else shapes[kernel].shape[1]
        spec[site] = _random_subspace(key, d_in, config.rank)
    tree = projection.subspaces_for(params, spec, dense_layers=apply.dense_layers)
    tokens = jax.random.randint(jax.random.key(config.seed), (config.batch, config.seq + 1), 0,
                                config.vocab_size, jnp.int32)
    loss = ids.lm_loss(apply)
    plain = optax.adamw(1e-3, weight_decay=0.1)
    wrapped = projection.projected(optax.adamw(1e-3, weight_decay=0.1), tree)
    return {
        "batch": {"tokens": tokens},
        "steps": {"adamw": ids.make_train_step(loss, plain), "projected": ids.make_train_step(loss, wrapped)},
        "states": {"adamw": ids.init_train_state(params, plain), "projected": ids.init_train_state(params, wrapped)},
        "n_projected_kernels": len(spec),
    }


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs the benchmark, writes the JSON to ``out`` (unless None) and prints a table."""
    parts = build(config)
    batch, steps, states = parts["batch"], parts["steps"], parts["states"]
    # Each call steps from the same initial state (no donation), so every timed call does equal work.
    fns = {name: (lambda name=name: steps[name](states[name], batch)) for name in steps}
    times = _common.time_interleaved(fns, config.repeats, warmup=2)
    metrics = _common.ratio_record(times, "projected", "adamw", "step_time_ratio",
                                   medians={"adamw_step_median_s": "adamw", "projected_step_median_s": "projected"},
                                   bounds=("ratio_min", "ratio_max"))
    return _common.finish(metrics, GOALS, config, out, n_projected_kernels=parts["n_projected_kernels"])


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="fewer repeats (CPU minutes)")


if __name__ == "__main__":
    cli()
