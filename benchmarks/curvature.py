"""Cost of K-FAC factor collection on the reference model, against a training step and kfac-jax.

Measurements (medians after compilation, runs alternated A B A B ... so load drifts hit both):

* ``collection_vs_train_step_ratio``: one batch of :func:`idesign.curvature.make_factors_update`
  (true Fisher, every MLP dense layer: forward with captures, sampled targets, backward to the layer
  outputs, float32 ``x xᵀ`` / ``g gᵀ`` sums) divided by one plain jitted training step on the same
  batch (forward + backward + ``optax.adamw`` update, :func:`idesign.train.make_train_step`).
  The reported ratio is the median of per-pair ratios. Goal: ``<= 2.0``.
* ``vs_kfac_jax_ratio``: our collection time / kfac-jax's curvature-estimator update for the same
  MLP layers on the same batch, with ``vs_kfac_jax_max_rel_diff`` the factors' relative difference.
  kfac-jax (google-deepmind) is an optional, benchmark-only dependency: when it cannot be imported
  or run, both keys are ``null`` and ``kfac_jax_status`` says why.

Writes ``results/benchmarks/curvature.json`` (values, goals, whether met, sizes, jax version,
device) and prints a table. ``--quick`` uses fewer repeats.

Usage: ``python -m benchmarks.curvature [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import pathlib
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids
from benchmarks import _common
from idesign import curvature

GOALS = {"collection_vs_train_step_ratio": ("<=", 2.0), "vs_kfac_jax_ratio": ("<=", 1.0)}
DEFAULT_OUT = "results/benchmarks/curvature.json"
MLP_LAYERS = "blocks.*.mlp.*"


@dataclasses.dataclass(frozen=True)
class Config(_common.ReferenceSize):
    batch: int = 32
    seq: int = 128
    repeats: int = 15
    seed: int = 0
    kfac_jax: bool = True
    preset: str = "full"


FULL = Config()
QUICK = dataclasses.replace(FULL, repeats=5, preset="quick")


def _model(config: Config):
    return _common.reference_model(config, max_len=max(256, config.seq + 1))


def bench_collection(apply, params, batch, config: Config) -> dict[str, Any]:
    layers = curvature.resolve_layers(apply, params, MLP_LAYERS)
    step = curvature.make_factors_update(apply, list(layers))
    key = jax.random.key(config.seed)
    holder = {"factors": curvature.factors_init(params, layers)}

    def collect():
        holder["factors"] = step(holder["factors"], params, batch, key)  # factors are donated
        return holder["factors"]

    optimizer = optax.adamw(1e-3)
    train_step = ids.make_train_step(ids.lm_loss(apply), optimizer)
    state = ids.init_train_state(params, optimizer)
    train = lambda: train_step(state, batch)
    times = _common.time_interleaved({"collect": collect, "train": train}, config.repeats)
    return {
        **_common.ratio_record(times, "collect", "train", "collection_vs_train_step_ratio",
                               medians={"collection_median_s": "collect", "train_step_median_s": "train"},
                               bounds=("collection_ratio_min", "collection_ratio_max")),
        "layers": list(layers),
    }


def _kfac_jax_run(apply, params, batch, layers: dict[str, str], config: Config, ours_time_s: float) -> dict[str, Any]:
    """kfac-jax's factors for the same MLP layers on the same batch: timing and relative difference.

    Only the MLP kernels and biases are kfac-jax's parameters (everything else is closed over), so
    its graph matcher registers exactly these dense layers. Timing uses true-Fisher sampling
    (``fisher_gradients``) like ours; the difference uses gold targets on both sides
    (``fisher_empirical`` vs ``fisher='empirical'``), compared after normalising each factor by its
    trace (the two libraries scale A and G differently; the product is what matters).
    """
    import kfac_jax  # optional, benchmark-only

    leaves = ids.tree.named_leaves(params)
    mlp = {n: {"kernel": leaves[k], "bias": leaves[f"{n}.bias"]} for n, k in layers.items()}

    def full_params(mlp_params):
        by_path = {f"{n}.{leaf}": v for n, d in mlp_params.items() for leaf, v in d.items()}
        return ids.tree.map_with_path(lambda path, leaf: by_path.get(path, leaf), params)

    def loss_fn(mlp_params, b):
        logits, _ = apply(full_params(mlp_params), b["tokens"][:, :-1])
        kfac_jax.register_softmax_cross_entropy_loss(logits.reshape(-1, logits.shape[-1]),
                                                     b["tokens"][:, 1:].reshape(-1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["tokens"][:, 1:]).mean()

    n_tokens = config.batch * config.seq
    results = {}
    for mode in ("fisher_gradients", "fisher_empirical"):
        est = kfac_jax.curvature_estimator.BlockDiagonalCurvature(func=loss_fn, default_estimation_mode=mode)
        rng = jax.random.key(config.seed)
        state = est.init(rng, (mlp, batch), exact_powers_to_cache=None, approx_powers_to_cache=None,
                         cache_eigenvalues=False)
        update = jax.jit(lambda s, r: est.update_curvature_matrix_estimate(s, 0.0, 1.0, 0.0, n_tokens, r, (mlp, batch)))
        if mode == "fisher_gradients":
            times = _common.time_interleaved({"kfac_jax": lambda: update(state, rng)}, config.repeats)
            results["kfac_jax_median_s"] = _common.median(times["kfac_jax"])
        else:
            results["states"] = update(state, rng)
    ours = curvature.collect_factors(apply, params, [batch], list(layers), fisher="empirical", progress=False)
    theirs = [jnp.asarray(getattr(f, "value", f)) for bs in results["states"].blocks_states for f in bs.factors]
    mine = [m for n in layers for m in curvature.factors_finalize(ours[n])]
    norm = lambda m: np.asarray(m, np.float64) / np.trace(np.asarray(m, np.float64))
    diffs = [np.abs(norm(a) - norm(b)).max() / np.abs(norm(b)).max() for a, b in zip(mine, theirs)]
    if len(theirs) != len(mine) or any(np.shape(a) != np.shape(b) for a, b in zip(mine, theirs)):
        raise RuntimeError(f"kfac-jax registered blocks {[np.shape(t) for t in theirs]}, expected {[np.shape(m) for m in mine]}")
    return {"vs_kfac_jax_ratio": ours_time_s / results["kfac_jax_median_s"], "vs_kfac_jax_max_rel_diff": float(max(diffs)),
            "kfac_jax_median_s": results["kfac_jax_median_s"], "kfac_jax_status": f"ok (kfac-jax {kfac_jax.__version__})"}


def bench_kfac_jax(apply, params, batch, layers: dict[str, str], ours_time_s: float, config: Config) -> dict[str, Any]:
    null = {"vs_kfac_jax_ratio": None, "vs_kfac_jax_max_rel_diff": None}
    if not config.kfac_jax:
        return {**null, "kfac_jax_status": "disabled in this config"}
    try:
        import kfac_jax  # noqa: F401
    except Exception as e:  # ImportError, or a dependency broken against this jax
        return {**null, "kfac_jax_status": f"kfac-jax not importable: {type(e).__name__}: {str(e)[:300]}"}
    try:
        return _kfac_jax_run(apply, params, batch, layers, config, ours_time_s)
    except Exception as e:  # an incompatible kfac-jax / jax pair: record why, do not fail the benchmark
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{pathlib.Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        return {**null, "kfac_jax_status": f"kfac-jax {getattr(kfac_jax, '__version__', '?')} failed on jax "
                f"{jax.__version__} at {where}: {type(e).__name__}: {str(e)[:300]}"}


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs the benchmark, writes the JSON to ``out`` (unless None) and prints a table."""
    apply, params = _model(config)
    tokens = jax.random.randint(jax.random.key(config.seed + 1), (config.batch, config.seq + 1), 0,
                                config.vocab_size, jnp.int32)
    batch = {"tokens": tokens}
    metrics = bench_collection(apply, params, batch, config)
    layers = curvature.resolve_layers(apply, params, MLP_LAYERS)
    metrics.update(bench_kfac_jax(apply, params, batch, layers, metrics["collection_median_s"], config))
    return _common.finish(metrics, GOALS, config, out, fisher="true", tokens_per_batch=config.batch * config.seq)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="fewer repeats (CPU minutes)")


if __name__ == "__main__":
    cli()
