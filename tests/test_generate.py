"""Tests of idesign.generate: KV-cache decoding against full recomputation, sampling, EOS, monitors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign.generate import (GenerateOutput, InjectAfterToken, Injection, Monitor, SamplingConfig, StepInfo,
                              generate, sample_logits)

VOCAB, B, P, N = 37, 3, 6, 10
GREEDY = SamplingConfig(temperature=0.0)
CONFIGS = {
    "gpt2": ids.TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4),
    "llama": ids.TransformerConfig.llama_like(VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
}


class CountingApply:
    """Delegates to a model and counts ``forward`` calls, which happen only while tracing."""

    def __init__(self, apply):
        self.apply, self.config, self.forward_calls = apply, apply.config, 0

    def __call__(self, *args, **kwargs):
        return self.apply(*args, **kwargs)

    def init_cache(self, *args, **kwargs):
        return self.apply.init_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        return self.apply.forward(*args, **kwargs)


@functools.cache
def model(name: str) -> tuple[CountingApply, dict]:
    """One model per config for the whole module, so tests share compilations."""
    apply, params = ids.init_transformer(CONFIGS[name], seed=1)
    return CountingApply(apply), params


def padded_prompts(lengths=(6, 4, 1), seed=0):
    """Left-padded prompts (pad id 0) of the given lengths, and their validity mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(1, VOCAB, n)
        valid[i, width - n:] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


def run(name, prompts=None, valid=None, *, sampling=GREEDY, key=0, **kw):
    """``generate`` with the settings most tests share, so they share one compilation."""
    apply, params = model(name)
    if prompts is None:
        prompts, valid = padded_prompts()
    return generate(apply, params, prompts, prompt_valid=valid, max_new_tokens=N, key=jax.random.key(key),
                    sampling=sampling, return_logits=True, **kw)


@functools.partial(jax.jit, static_argnums=0)
def full_forward(apply, params, tokens, valid, hooks=None):
    """One uncached forward pass (jitted: one compilation is cheaper than eager op-by-op dispatch)."""
    return apply(params, tokens, valid=valid, hooks=hooks)


def recomputed_logits(apply, params, out: GenerateOutput, hooks=None):
    """Logits for each generated token from one uncached forward over prompt + generation."""
    seq, valid = out.sequences()
    logits, _ = full_forward(apply, params, seq, valid, hooks)
    p = out.prompt.shape[1]
    return logits[:, p - 1:p - 1 + out.tokens.shape[1]]


def assert_matches_recompute(apply, params, out: GenerateOutput, hooks=None):
    full = recomputed_logits(apply, params, out, hooks)
    v = np.asarray(out.valid)
    np.testing.assert_allclose(np.asarray(out.logits)[v], np.asarray(full)[v], atol=1e-5, rtol=1e-5)
    return full


# Sampled generation on the Llama-like model is checked against a recompute in the monitor test below.
@pytest.mark.parametrize("name, sampling", [("gpt2", GREEDY), ("gpt2", SamplingConfig(temperature=1.0)),
                                            ("llama", GREEDY)], ids=["gpt2-greedy", "gpt2-sampled", "llama-greedy"])
def test_cached_logits_equal_full_recompute(name, sampling):
    apply, params = model(name)
    out = run(name, sampling=sampling, key=3)
    assert out.tokens.shape == (B, N) and out.logits.shape == (B, N, VOCAB)
    assert bool(out.valid.all()) and not bool(out.injected.any())
    full = assert_matches_recompute(apply, params, out)
    if sampling.greedy:
        np.testing.assert_array_equal(out.tokens, jnp.argmax(full, -1))


def test_left_padded_batch_matches_each_prompt_alone():
    # Learned positions: a position offset from the padding would change the logits (rotary would not).
    apply, params = model("gpt2")
    prompts, valid = padded_prompts()
    batched = run("gpt2", prompts, valid)
    row = 1  # a prompt of 4 tokens behind 2 pads (one row keeps the test to one extra compilation)
    alone = prompts[row][valid[row]][None]
    single = generate(apply, params, alone, max_new_tokens=N, sampling=GREEDY, return_logits=True)
    np.testing.assert_array_equal(batched.tokens[row], single.tokens[0])
    np.testing.assert_allclose(batched.logits[row], single.logits[0], atol=1e-5)


def test_eos_finishes_rows_with_padding():
    apply, params = model("llama")
    plain = run("llama")
    eos = int(plain.tokens[0, 3])
    out = run("llama", eos_id=eos, pad_id=0)
    plain_tokens = np.asarray(plain.tokens)
    for row in range(B):
        hits = np.flatnonzero(plain_tokens[row] == eos)
        end = hits[0] + 1 if hits.size else N  # tokens up to and including the EOS are real
        np.testing.assert_array_equal(out.tokens[row, :end], plain_tokens[row, :end])
        np.testing.assert_array_equal(out.valid[row], np.arange(N) < end)
        np.testing.assert_array_equal(out.tokens[row, end:], 0)
    assert not bool(out.valid[0].all())
    assert_matches_recompute(apply, params, out)  # padding after EOS is never attended to


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = jax.random.normal(jax.random.key(0), (512, VOCAB)) * 3
    greedy = sample_logits(None, logits, GREEDY)
    for config in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=2.0, top_p=1e-6)):
        for seed in range(3):
            np.testing.assert_array_equal(sample_logits(jax.random.key(seed), logits, config), greedy)


def test_sampling_is_deterministic_per_key():
    sampled = lambda key: run("gpt2", sampling=SamplingConfig(temperature=1.0), key=key).tokens
    np.testing.assert_array_equal(sampled(0), sampled(0))
    assert not np.array_equal(sampled(0), sampled(1))


def _reference_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The target distribution, computed independently in NumPy (float64)."""
    z = logits / config.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(p.shape, bool)
    if config.top_k is not None:
        keep[order[:config.top_k]] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    if config.top_p is not None:
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, config.top_p) + 1)  # smallest prefix with mass >= top_p
        keep = np.zeros(p.shape, bool)
        keep[order[:n_keep]] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


@pytest.mark.parametrize("config", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.5),
                                    SamplingConfig(temperature=1.0, top_k=3),
                                    SamplingConfig(temperature=1.0, top_p=0.7)],
                         ids=["t1", "t0.5", "top_k3", "top_p0.7"])
def test_sample_frequencies_follow_the_target_distribution(config):
    logits = np.array([1.2, -0.3, 0.4, 2.0, 0.0, -1.5, 0.9, 0.1], np.float32)
    n = 20_000
    samples = sample_logits(jax.random.key(42), jnp.broadcast_to(jnp.asarray(logits), (n, logits.size)), config)
    counts = np.bincount(np.asarray(samples), minlength=logits.size)
    p = _reference_probs(logits.astype(np.float64), config)
    # Each count is Binomial(n, p): a 5-sigma band fails a correct sampler with probability < 1e-5 overall.
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1e-9), (counts, n * p)
    assert np.all(counts[p == 0] == 0)


def test_greedy_ignores_key_and_sampling_needs_one():
    logits = jnp.array([[0.1, 2.0, -1.0]])
    assert sample_logits(None, logits, GREEDY).tolist() == [1]
    with pytest.raises(ValueError, match="key"):
        sample_logits(None, logits, SamplingConfig())
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def _expected_injections(tokens, trigger, n_inject, max_events):
    """Where InjectAfterToken's injections must land, replaying its rule on the emitted row."""
    injected, remaining, events = [], 0, 0
    for token in tokens:
        now = remaining > 0
        remaining -= now
        injected.append(now)
        if token == trigger and not now and events < max_events and remaining == 0:
            events, remaining = events + 1, n_inject
    return np.array(injected)


def test_inject_after_token():
    apply, params = model("llama")
    plain = run("llama")
    trigger, inject = int(plain.tokens[0, 0]), jnp.array([5, 6, 7], jnp.int32)
    out = run("llama", monitor=InjectAfterToken(trigger_id=trigger, inject_ids=inject, max_events=2))
    np.testing.assert_array_equal(out.tokens[0, :4], [trigger, 5, 6, 7])
    for row in range(B):
        expected = _expected_injections(np.asarray(out.tokens[row]), trigger, 3, max_events=2)
        np.testing.assert_array_equal(out.injected[row], expected)
        injected_tokens = np.asarray(out.tokens[row])[expected]
        np.testing.assert_array_equal(injected_tokens, np.resize([5, 6, 7], injected_tokens.size))
    assert int(out.monitor_state[0]) >= 1
    # The model continues conditioned on the injected tokens, exactly as a full recompute would.
    full = assert_matches_recompute(apply, params, out)
    sampled = ~np.asarray(out.injected)
    np.testing.assert_array_equal(np.asarray(out.tokens)[sampled], np.asarray(jnp.argmax(full, -1))[sampled])


SITE = "blocks.1.resid_post"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecordActivations(Monitor):
    """Stores its site's activation and position at every step, and the prompt's activations."""

    n_steps: int = dataclasses.field(metadata=dict(static=True))
    d_model: int = dataclasses.field(metadata=dict(static=True))
    sites: tuple[str, ...] = dataclasses.field(default=(SITE,), metadata=dict(static=True))

    def init(self, batch_size):
        return dict(acts=jnp.zeros((batch_size, self.n_steps, self.d_model)),
                    position=jnp.zeros((batch_size, self.n_steps), jnp.int32))

    def prefill(self, state, info):
        return dict(state, prompt=info.activations[SITE])

    def step(self, state, info: StepInfo):
        state = dict(state, acts=state["acts"].at[:, info.step].set(info.activations[SITE]),
                     position=state["position"].at[:, info.step].set(info.position))
        return state, Injection.none(info.token.shape[0])


def test_monitor_receives_activations_of_the_decode_forward():
    apply, params = model("llama")
    prompts, valid = padded_prompts()
    # The user also captures the monitor's site (no clash), and steers an earlier layer.
    hooks = {SITE: ids.Capture(), "blocks.0.mlp_out": ids.Add(jnp.full((32,), 0.1))}
    out = run("llama", sampling=SamplingConfig(temperature=1.0), key=1, hooks=hooks,
              monitor=RecordActivations(n_steps=N, d_model=32))
    assert_matches_recompute(apply, params, out, hooks=hooks)
    seq, seq_valid = out.sequences()
    _, captured = full_forward(apply, params, seq, seq_valid, hooks)
    full = np.asarray(captured[SITE])
    state = out.monitor_state
    np.testing.assert_allclose(state["acts"], full[:, P:], atol=1e-5)
    pv = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(state["prompt"])[pv], full[:, :P][pv], atol=1e-5)
    np.testing.assert_array_equal(state["position"], np.asarray(valid).sum(1)[:, None] + np.arange(N))


STEER_SITE = "blocks.0.resid_post"


def steer(seed: int, scale: float) -> dict:
    return {STEER_SITE: ids.Add(jax.random.normal(jax.random.key(seed), (32,)), scale)}


def test_steering_hooks_act_during_generation():
    apply, params = model("gpt2")
    sampled = SamplingConfig(temperature=1.0)
    hooks = steer(7, 3.0)
    plain, steered = run("gpt2", sampling=sampled, key=3), run("gpt2", sampling=sampled, key=3, hooks=hooks)
    assert not np.array_equal(plain.tokens, steered.tokens)
    assert_matches_recompute(apply, params, steered, hooks=hooks)


def test_compiles_once_per_shape_and_config():
    """New prompts, keys, steering vectors and monitor arrays reuse the compiled function."""
    sampled = SamplingConfig(temperature=1.0)
    other_prompts, valid = padded_prompts(seed=1)
    calls = [
        (lambda i: run("gpt2", None if i == 0 else other_prompts, valid, sampling=sampled, key=i,
                       hooks=steer(7 + i, 3.0 - i))),
        (lambda i: run("llama", None if i == 0 else other_prompts, valid,
                       monitor=InjectAfterToken(trigger_id=3 + i, inject_ids=jnp.array([5, 6, 7]) + i, max_events=2))),
    ]
    for name, call in zip(("gpt2", "llama"), calls):
        apply, _ = model(name)
        before = apply.forward_calls
        first = call(0)
        traced = apply.forward_calls - before
        assert traced in (0, 2)  # prefill and scan body once each (0: an earlier test compiled it)
        second = call(1)
        assert apply.forward_calls - before == traced
        assert not np.array_equal(first.tokens, second.tokens)


def test_input_errors_are_explained():
    apply, params = model("gpt2")
    prompts, valid = padded_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(apply, params, prompts, prompt_valid=valid[:, ::-1], max_new_tokens=2, sampling=GREEDY)
    with pytest.raises(ValueError, match="max_len"):
        generate(apply, params, prompts, max_new_tokens=CONFIGS["gpt2"].max_len, sampling=GREEDY)
    with pytest.raises(ValueError, match="key"):
        generate(apply, params, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="no valid token"):
        generate(apply, params, prompts, prompt_valid=jnp.zeros_like(valid), max_new_tokens=2, sampling=GREEDY)
