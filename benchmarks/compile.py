"""Compile time and step time of scanned blocks (``scan_layers=True``) against the unrolled model.

For each depth in ``config.depths`` (4, 16, 32 layers) and each jitted function in ``config.functions``, on the
same per-layer parameters:

* ``forward``: ``apply(params, tokens)`` logits;
* ``capture``: the forward pass capturing ``blocks.*.resid_post`` (every layer);
* ``grad``: the gradient of the LM loss alone (the train step without the optimizer: per-layer leaves
  make the optimizer's part of the program grow with depth even when the blocks are scanned);
* ``train``: one :func:`idesign.train.make_train_step` step with ``optax.adamw`` on the per-layer parameters (the
  default layout);
* ``train_layer_stacked`` (scanned only): the same step, per-layer parameters, with the optimizer wrapped in
  :func:`idesign.optim.layer_stacked` (it stacks the blocks of updates, parameters and state inside the step);
* ``train_stacked`` (scanned only): the same step on parameters stacked once by
  :func:`idesign.models.stack_blocks`, the layout the docs recommend for *training* a scanned model at depth;

(the two scanned-only train steps are compared with the unrolled ``train``), it measures the compile time (trace +
lower + XLA compile of a fresh ``jax.jit``, as CPU time of the process, which other processes on a shared machine
hardly change; the least of ``compile_repeats`` compilations) and the step time (median of repeated calls after
compilation, unrolled and scanned alternating so load drifts hit both alike). The goals, for the recommended path
(``train_stacked``):

* ``scan_compile_ratio_32_vs_4``: the scanned train step's compile time at the deepest depth divided by its
  compile time at the shallowest. Goal: <= 1.5 (flat in depth).
* ``scan_runtime_ratio``: the scanned train step's step time divided by the unrolled one's, at the deepest
  depth. Goal: <= 1.1.

The same two for the other layouts, with the same goals, reported whether met or not:
``scan_per_layer_compile_ratio_32_vs_4`` / ``scan_per_layer_runtime_ratio`` (``train``: per-layer parameters and
optimizer; the program of the optimizer, of the stack in the forward and of its gradient's slices grows with
depth) and ``scan_layer_stacked_compile_ratio_32_vs_4`` / ``scan_layer_stacked_runtime_ratio``
(``train_layer_stacked``: the optimizer's program is flat, the per-layer stacking, unstacking and
``apply_updates`` are not). Why the stacked layout is the recommendation: NOTES.md, "Scanned blocks".

It also reports ``stack_params_s``: the time of stacking the block parameters alone (what a scanned forward on
per-layer parameters adds), and its share of a scanned forward at the deepest depth.

Writes ``results/benchmarks/compile.json`` and prints a table. ``--quick`` uses a narrower model, fewer
repeats, one compilation each, and only ``forward`` and the three train steps (the JSON's ``config``
records the sizes).

Usage: ``python -m benchmarks.compile [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import idesign as ids
from benchmarks import _common

GOALS = {"scan_compile_ratio_32_vs_4": ("<=", 1.5), "scan_runtime_ratio": ("<=", 1.1),
         "scan_per_layer_compile_ratio_32_vs_4": ("<=", 1.5), "scan_per_layer_runtime_ratio": ("<=", 1.1),
         "scan_layer_stacked_compile_ratio_32_vs_4": ("<=", 1.5), "scan_layer_stacked_runtime_ratio": ("<=", 1.1)}
# The headline goals measure this function: the train step on blocks stacked once (the recommended training path).
HEADLINE = "train_stacked"
DEFAULT_OUT = "results/benchmarks/compile.json"
FUNCTIONS = ("forward", "capture", "grad", "train", "train_layer_stacked", "train_stacked")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 1000
    d_model: int = 256
    n_heads: int = 4
    depths: tuple[int, ...] = (4, 16, 32)
    functions: tuple[str, ...] = FUNCTIONS
    batch: int = 8
    seq: int = 128
    repeats: int = 10
    compile_repeats: int = 2
    seed: int = 0
    preset: str = "full"


FULL = Config()
# Quick: the goals' functions only (forward for scale), a narrow model, one compilation each.
QUICK = dataclasses.replace(FULL, vocab_size=256, d_model=64, batch=4, seq=32, repeats=5, compile_repeats=1,
                            functions=("forward", "train", "train_layer_stacked", "train_stacked"), preset="quick")


def _functions(apply, params, tokens, stacked: bool = False) -> dict[str, tuple[Any, tuple]]:
    """name -> (function to jit, its arguments); with ``stacked``, also the train step on stacked blocks."""
    opt = optax.adamw(1e-3)
    step = ids.train.make_train_step(ids.train.lm_loss(apply), opt, jit=False)
    state = ids.train.init_train_state(params, opt)
    hooks = ids.capture("blocks.*.resid_post")
    loss = ids.train.lm_loss(apply)
    out = {
        "forward": (lambda p, t: apply(p, t)[0], (params, tokens)),
        "capture": (lambda p, t: apply(p, t, hooks=hooks), (params, tokens)),
        "grad": (lambda p, b: jax.grad(lambda q: loss(q, b)[0])(p), (params, {"tokens": tokens})),
        "train": (lambda s, b: step(s, b), (state, {"tokens": tokens})),
    }
    if stacked:  # per-layer params, the optimizer run on them stacked by ids.optim.layer_stacked
        ls_opt = ids.optim.layer_stacked(opt)
        ls_step = ids.train.make_train_step(ids.train.lm_loss(apply), ls_opt, jit=False)
        out["train_layer_stacked"] = (lambda s, b: ls_step(s, b), (ids.train.init_train_state(params, ls_opt),
                                                                 {"tokens": tokens}))
    if stacked:  # the recommended training layout: ids.models.stack_blocks(params) once, one leaf per block parameter
        stacked_state = ids.train.init_train_state(ids.models.stack_blocks(params), opt)
        out["train_stacked"] = (lambda s, b: step(s, b), (stacked_state, {"tokens": tokens}))
    return out


def _compile(fn, args, repeats: int) -> tuple[Any, float]:
    """A compiled ``fn`` and the least CPU time, over ``repeats`` fresh ``jax.jit`` wrappers, to trace, lower and compile it.

    CPU time of this process (all its threads), not wall time: on a shared machine other processes stretch
    the wall time of a compilation several-fold but hardly its CPU time. The minimum: noise only adds.
    """
    times = []
    for _ in range(repeats):
        start = time.process_time()
        compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()  # a new function: no cache hit
        times.append(time.process_time() - start)
    return compiled, min(times)


def bench_depth(config: Config, n_layers: int) -> dict[str, Any]:
    model_config = ids.TransformerConfig(vocab_size=config.vocab_size, d_model=config.d_model, n_layers=n_layers,
                                         n_heads=config.n_heads, max_len=config.seq)
    apply, params = ids.init_transformer(model_config, seed=config.seed)
    scanned, _ = ids.init_transformer(model_config.replace(scan_layers=True), seed=config.seed)
    tokens = jax.random.randint(jax.random.key(config.seed), (config.batch, config.seq), 0, config.vocab_size,
                                jnp.int32)
    out: dict[str, Any] = {}
    baselines = _functions(apply, params, tokens)
    compiled_baselines: dict[str, tuple[Any, float]] = {}
    for name, (s_fn, s_args) in _functions(scanned, params, tokens, stacked=True).items():
        if name not in config.functions:
            continue
        base = name if name in baselines else "train"  # the stacked train steps is compared with the unrolled one
        fn, args = baselines[base]
        if base not in compiled_baselines:
            compiled_baselines[base] = _compile(fn, args, config.compile_repeats)
        compiled, compile_s = compiled_baselines[base]
        s_compiled, s_compile_s = _compile(s_fn, s_args, config.compile_repeats)
        times = _common.time_interleaved({"unrolled": lambda: compiled(*args), "scanned": lambda: s_compiled(*s_args)},
                                         config.repeats)
        out[name] = {"unrolled_compile_s": compile_s, "scanned_compile_s": s_compile_s,
                     "unrolled_step_s": _common.median(times["unrolled"]),
                     "scanned_step_s": _common.median(times["scanned"]),
                     "runtime_ratio": _common.median(_common.pair_ratios(times, "scanned", "unrolled"))}
    # What the scanned forward adds: one stack of the per-layer block parameters.
    stack = jax.jit(lambda blocks: jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(n_layers)]))
    _common.block(stack(params["blocks"]))
    out["stack_params_s"] = _common.median(_common.time_calls(lambda: stack(params["blocks"]), config.repeats))
    return out


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs every depth, writes the JSON to ``out`` (unless None) and prints a table."""
    shallow, deep = min(config.depths), max(config.depths)
    per_depth = {}
    for n in config.depths:
        per_depth[n] = bench_depth(config, n)
        print(f"  {n} layers: " + "  ".join(
            f"{f} compile {per_depth[n][f]['unrolled_compile_s']:.2f}s/{per_depth[n][f]['scanned_compile_s']:.2f}s "
            f"step x{per_depth[n][f]['runtime_ratio']:.2f}" for f in config.functions), flush=True)
    def compile_ratio(f: str) -> float:
        return per_depth[deep][f]["scanned_compile_s"] / per_depth[shallow][f]["scanned_compile_s"]

    metrics: dict[str, Any] = {
        "scan_compile_ratio_32_vs_4": compile_ratio(HEADLINE),
        "scan_runtime_ratio": per_depth[deep][HEADLINE]["runtime_ratio"],
        "scan_per_layer_compile_ratio_32_vs_4": compile_ratio("train"),
        "scan_per_layer_runtime_ratio": per_depth[deep]["train"]["runtime_ratio"],
        "scan_layer_stacked_compile_ratio_32_vs_4": compile_ratio("train_layer_stacked"),
        "scan_layer_stacked_runtime_ratio": per_depth[deep]["train_layer_stacked"]["runtime_ratio"],
    }
    for f in config.functions:
        d, s = per_depth[deep][f], per_depth[shallow][f]
        metrics[f"{f}_scanned_compile_ratio_deep_vs_shallow"] = d["scanned_compile_s"] / s["scanned_compile_s"]
        metrics[f"{f}_unrolled_compile_ratio_deep_vs_shallow"] = d["unrolled_compile_s"] / s["unrolled_compile_s"]
        metrics[f"{f}_runtime_ratio_deep"] = d["runtime_ratio"]
        metrics[f"{f}_compile_speedup_deep"] = d["unrolled_compile_s"] / d["scanned_compile_s"]
    metrics["stack_params_s_deep"] = per_depth[deep]["stack_params_s"]
    metrics["stack_share_of_scanned_forward_deep"] = (per_depth[deep]["stack_params_s"]
                                                      / per_depth[deep]["forward"]["scanned_step_s"])
    return _common.finish(metrics, GOALS, config, out, headline_function=HEADLINE, shallow_depth=shallow,
                          deep_depth=deep, per_depth={str(n): v for n, v in per_depth.items()})


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv,
                       quick_help="d_model 64, 4 x 32 tokens, forward and train steps only (CPU minutes)")


if __name__ == "__main__":
    cli()
