"""Monitored generation against plain generation, and where an RL step spends its time.

Model: the reference transformer at the benchmark size (``d_model``, ``n_layers``); the policy and
the frozen teacher have the same architecture and separate parameters.

* ``monitor_throughput_ratio`` = tokens/s of :func:`idesign.generate` with a
  :class:`idesign.monitoring.ProbeMonitor` (the teacher decodes in lockstep with its own KV cache,
  a linear probe scores every token, injections possible) / tokens/s of plain :func:`idesign.generate`
  of the same policy, same prompts, same sampling. Goal >= 0.45 (the teacher doubles the model's
  forward work, so about 0.5 is expected once that work dominates; small models sit above it, since
  sampling and the scan's per-step overhead are shared). The probe's threshold is set so it never fires:
  both runs then emit exactly the same tokens and the comparison is like for like.
* ``rl_step_*_s``: one GRPO step of :mod:`idesign.rl` split into sampling (``generate`` of
  ``batch`` completions), teacher scoring (:func:`idesign.rl.probe_scores`: the completions
  prefilled through the frozen teacher, probe read at the completion tokens, plus the reference
  model's log-probabilities) and the update (:func:`idesign.rl.make_grpo_step`). Medians of timed
  runs after a compiling warm-up; ``rl_step_*_share`` are fractions of their sum.
* ``reward_time_ratio`` = time to compute the probe rewards of a sampled batch (:func:`idesign.rl.claim_scores`:
  the completions prefilled through the frozen teacher, the probe read over every claim's tokens and prediction
  position, span-max per claim; claims are 2-token spans every 4 tokens of the completion) / time to sample that
  batch. Goal <= 0.5.

Writes ``results/benchmarks/generation.json``. Usage: ``python -m benchmarks.generation [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids
from benchmarks import _common
from idesign import probes, rl
from idesign.monitoring import ProbeMonitor

GOALS = {"monitor_throughput_ratio": (">=", 0.45), "reward_time_ratio": ("<=", 0.5)}
DEFAULT_OUT = "results/benchmarks/generation.json"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 512
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    batch: int = 64
    prompt_len: int = 32
    new_tokens: int = 128
    group_size: int = 8
    repeats: int = 5
    seed: int = 0
    preset: str = "full"


FULL = Config()
QUICK = dataclasses.replace(FULL, d_model=128, n_layers=4, n_heads=4, batch=32, prompt_len=16, new_tokens=48,
                            repeats=3, preset="quick")


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    max_len = config.prompt_len + config.new_tokens
    apply, policy = _common.reference_model(config, max_len)
    _, teacher = _common.reference_model(dataclasses.replace(config, seed=config.seed + 1), max_len)
    site = f"blocks.{config.n_layers - 1}.resid_post"
    rng = np.random.default_rng(config.seed)
    probe = probes.LogisticProbe(jnp.asarray(rng.normal(size=config.d_model), jnp.float32), jnp.float32(-1e4),
                                 jnp.zeros(config.d_model), jnp.ones(config.d_model))   # never fires
    prompts = jnp.asarray(rng.integers(1, config.vocab_size, (config.batch, config.prompt_len)), jnp.int32)
    sampling = ids.SamplingConfig(temperature=1.0)
    monitor = ProbeMonitor(apply, site, config.new_tokens, teacher, probe, jnp.ones(config.vocab_size, bool),
                           jnp.array([4], jnp.int32), threshold=0.7, max_events=1)
    key = jax.random.key(config.seed)
    plain = lambda: ids.generate(apply, policy, prompts, max_new_tokens=config.new_tokens, key=key,
                                 sampling=sampling).tokens
    watched = lambda: ids.generate(apply, policy, prompts, max_new_tokens=config.new_tokens, key=key,
                                   sampling=sampling, monitor=monitor).tokens
    times = _common.time_interleaved({"plain": plain, "monitored": watched}, config.repeats)
    same_tokens = bool(np.array_equal(plain(), watched()))
    plain_s, monitored_s = _common.median(times["plain"]), _common.median(times["monitored"])
    n_tokens = config.batch * config.new_tokens

    # One RL step, split into its three phases.
    optimizer = optax.adamw(1e-5)
    state = ids.init_train_state(policy, optimizer)
    step = rl.make_grpo_step(apply, optimizer, rl.GRPOConfig())
    P = config.prompt_len

    @jax.jit
    def score(tokens, valid):
        span = valid & (jnp.arange(tokens.shape[1]) >= P)
        p = rl.probe_scores(apply, teacher, probe, site, tokens, valid, span)
        return p, rl.token_logprobs(apply, teacher, tokens, valid), rl.token_logprobs(apply, state.params, tokens, valid)

    def sample():
        out = ids.generate(apply, state.params, prompts, max_new_tokens=config.new_tokens, key=key, sampling=sampling)
        return out.sequences()

    tokens, valid = _common.block(sample())
    p, ref_lp, old_lp = _common.block(score(tokens, valid))
    adv, keep = rl.group_advantages(1.0 - p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), config.group_size)
    actions = (valid[:, 1:] & (jnp.arange(1, tokens.shape[1]) >= P)) & keep[:, None]
    batch = rl.RLBatch(tokens, valid, actions, adv, old_lp, ref_lp)
    phases = _common.time_interleaved({"sampling": sample, "teacher_scoring": lambda: score(tokens, valid),
                                       "update": lambda: step(state, batch)[1]}, config.repeats)
    # Claim-level probe rewards for the sampled batch, against sampling it.
    span_ids = np.zeros(tokens.shape, np.int32)
    n_claims = config.new_tokens // 4
    for c in range(n_claims):
        span_ids[:, P + 4 * c + 1:P + 4 * c + 3] = c + 1
    span_ids = np.where(np.asarray(valid), span_ids, 0)
    reward = lambda: rl.claim_scores(apply, teacher, probe, site, tokens, valid, span_ids, n_claims,
                                     completion_start=P)
    _common.block(reward())
    reward_times = _common.time_interleaved({"sampling": sample, "reward": reward}, config.repeats)
    medians = {k: _common.median(v) for k, v in phases.items()}
    total = sum(medians.values())
    metrics = {
        "monitor_throughput_ratio": plain_s / monitored_s,
        "plain_tokens_per_s": n_tokens / plain_s,
        "monitored_tokens_per_s": n_tokens / monitored_s,
        "plain": _common.spread(times["plain"]),
        "monitored": _common.spread(times["monitored"]),
        "same_tokens": same_tokens,
        "reward_time_ratio": _common.median(reward_times["reward"]) / _common.median(reward_times["sampling"]),
        **{f"rl_step_{k}_s": v for k, v in medians.items()},
        **{f"rl_step_{k}_share": v / total for k, v in medians.items()},
    }
    sizes = {"batch": config.batch, "prompt_len": P, "new_tokens": config.new_tokens, "d_model": config.d_model,
             "n_layers": config.n_layers}
    return _common.finish(metrics, GOALS, config, out, sizes=sizes)


def cli(argv=None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="a smaller model (CPU minutes)")


if __name__ == "__main__":
    cli()
