"""Cost of hooks and benefit of the KV cache on the reference model.

Two measurements, each against a named baseline, as medians of repeated runs after compilation:

* ``capture_overhead_ratio``: time of a jitted forward pass that captures three sites
  (``blocks.1.resid_post``, ``blocks.2.mlp.hidden``, ``blocks.3.attn_out``, returned as outputs)
  divided by the same forward pass without hooks. Runs alternate (A B A B ...) and the reported
  ratio is the median of the per-pair ratios, which is robust to drifts in machine load.
  Goal: <= 1.05.
* ``kv_cache_speedup``: time of greedy :func:`idesign.generate.generate` (prefill + ``lax.scan``
  over one-token decode steps with a KV cache) divided into the time of a jitted baseline that,
  at each step, runs the whole padded ``[batch, prompt + new]`` sequence through ``apply`` with no
  cache inside a ``lax.fori_loop``. Both produce the same greedy tokens (``tokens_agree`` records
  the fraction that agree). Goal: >= 5.

Writes ``results/benchmarks/hooks.json`` (flat measured keys, goals, whether each is met, the sizes
used, jax version and device) and prints a table. ``--quick`` uses fewer repeats and 64 new tokens
instead of 256 (the JSON's ``config`` records the sizes used).

Usage: ``python -m benchmarks.hooks [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import idesign as ids
from benchmarks import _common
from idesign.generate import SamplingConfig, generate

CAPTURE_SITES = ("blocks.1.resid_post", "blocks.2.mlp.hidden", "blocks.3.attn_out")
GOALS = {"capture_overhead_ratio": ("<=", 1.05), "kv_cache_speedup": (">=", 5.0)}
DEFAULT_OUT = "results/benchmarks/hooks.json"


@dataclasses.dataclass(frozen=True)
class Config(_common.ReferenceSize):
    forward_batch: int = 32
    forward_seq: int = 128
    forward_repeats: int = 20
    gen_batch: int = 8
    gen_prompt: int = 16
    gen_new: int = 256
    gen_repeats: int = 3
    seed: int = 0
    preset: str = "full"


FULL = Config()  # one recompute-baseline run of 256 tokens takes about a minute on 2 CPU cores
QUICK = dataclasses.replace(FULL, forward_repeats=10, gen_new=64, gen_repeats=3, preset="quick")


def _model(config: Config):
    return _common.reference_model(config, max_len=max(256, config.forward_seq, config.gen_prompt + config.gen_new))


def bench_capture(apply, params, config: Config) -> dict[str, Any]:
    tokens = jax.random.randint(jax.random.key(config.seed), (config.forward_batch, config.forward_seq),
                                0, config.vocab_size, jnp.int32)
    hooks = ids.capture(*CAPTURE_SITES)
    plain = jax.jit(lambda p, t: apply(p, t)[0])
    captured = jax.jit(lambda p, t: apply(p, t, hooks=hooks))
    times = _common.time_interleaved({"plain": lambda: plain(params, tokens),
                                      "capture": lambda: captured(params, tokens)}, config.forward_repeats)
    return _common.ratio_record(times, "capture", "plain", "capture_overhead_ratio",
                                medians={"forward_plain_median_s": "plain", "forward_capture_median_s": "capture"},
                                bounds=("capture_ratio_min", "capture_ratio_max"))


@functools.partial(jax.jit, static_argnums=(0, 1))
def recompute_generate(apply, max_new_tokens: int, params, prompts: jax.Array) -> jax.Array:
    """Greedy decoding without a cache: every step reruns the whole padded sequence (the baseline)."""
    B, P = prompts.shape
    buf = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompts)

    def step(i, buf):
        logits, _ = apply(params, buf)  # causal: slots after P + i - 1 do not affect its logits
        last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(buf, token, P + i, axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, step, buf)[:, P:]


def bench_kv_cache(apply, params, config: Config) -> dict[str, Any]:
    prompts = jax.random.randint(jax.random.key(config.seed + 1), (config.gen_batch, config.gen_prompt),
                                 0, config.vocab_size, jnp.int32)
    greedy = SamplingConfig(temperature=0.0)
    cached = lambda: generate(apply, params, prompts, max_new_tokens=config.gen_new, sampling=greedy).tokens
    baseline = lambda: recompute_generate(apply, config.gen_new, params, prompts)
    # The untimed first calls (compilation) also check that both decode the same tokens.
    agree = float(np.mean(np.asarray(cached()) == np.asarray(baseline())))
    times = _common.time_interleaved({"kv_cache": cached, "recompute": baseline}, config.gen_repeats, warmup=0)
    kv, full = _common.median(times["kv_cache"]), _common.median(times["recompute"])
    n_tokens = config.gen_batch * config.gen_new
    return {
        "kv_cache_speedup": full / kv,
        "generate_kv_cache_median_s": kv,
        "generate_recompute_median_s": full,
        "kv_cache_tokens_per_s": n_tokens / kv,
        "recompute_tokens_per_s": n_tokens / full,
        "tokens_agree": agree,
    }


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs both benchmarks, writes the JSON to ``out`` (unless None) and prints a table."""
    apply, params = _model(config)
    metrics = {**bench_capture(apply, params, config), **bench_kv_cache(apply, params, config)}
    return _common.finish(metrics, GOALS, config, out, capture_sites=list(CAPTURE_SITES))


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="fewer repeats, 64 new tokens (CPU minutes)")


if __name__ == "__main__":
    cli()
