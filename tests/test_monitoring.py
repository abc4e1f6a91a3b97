"""Tests of idesign.monitoring.ProbeMonitor: the teacher decodes in lockstep (its logged scores equal a
full recomputation), injections land where the monitor asked, at most K per row, and a silent monitor
leaves generation unchanged."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import probes, rl
from idesign.monitoring import ProbeMonitor

VOCAB, D, N = 23, 16, 8
SITE = "blocks.1.resid_post"
RETRACT = 4


@functools.cache
def models():
    config = ids.TransformerConfig(vocab_size=VOCAB, d_model=D, n_heads=2, n_layers=2)
    apply, policy = ids.init_transformer(config, seed=0)
    _, teacher = ids.init_transformer(config, seed=1)   # a different teacher: lockstep must use *its* cache
    return apply, policy, teacher


def prompts():
    tokens = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]], np.int32)
    return jnp.asarray(tokens), jnp.asarray(tokens > 0)


def make_monitor(probe, span_tokens, *, threshold=0.7, max_events=1, inject=(RETRACT,)):
    apply, _, teacher = models()
    return ProbeMonitor(apply, SITE, N, teacher, probe, jnp.asarray(span_tokens), jnp.asarray(inject, jnp.int32),
                        threshold=threshold, max_events=max_events)


def random_probe(seed=0, bias=0.0):
    rng = np.random.default_rng(seed)
    return probes.LogisticProbe(jnp.asarray(rng.normal(size=D), jnp.float32), jnp.float32(bias),
                                jnp.zeros(D, jnp.float32), jnp.ones(D, jnp.float32))


def run(monitor, key=0):
    apply, policy, _ = models()
    tokens, valid = prompts()
    return ids.generate(apply, policy, tokens, prompt_valid=valid, max_new_tokens=N, key=jax.random.key(key),
                        sampling=ids.SamplingConfig(temperature=1.0), monitor=monitor)


@pytest.mark.parametrize("reading", ["answer", "prediction", "both"])
def test_logged_scores_equal_the_teacher_recomputed_on_the_whole_sequence(reading):
    apply, _, teacher = models()
    probe = random_probe(1)
    span_tokens = np.arange(VOCAB) % 2 == 1
    monitor = dataclasses.replace(make_monitor(probe, span_tokens, threshold=0.5, max_events=3), reading=reading)
    out = run(monitor)
    tokens, valid = out.sequences()
    acts = apply(teacher, tokens, hooks=ids.capture(SITE), valid=valid)[1][SITE]
    z = np.asarray(probes.score(probe, acts))
    # Recomputed by hand: a generated token's prediction position is the previous real token (the
    # prompt's last token for the first one; prompts are left-padded, so that is column P - 1).
    own, before = z[:, -N:], z[:, -N - 1:-1]
    expected = {"answer": own, "prediction": before, "both": np.maximum(own, before)}[reading]
    in_span = span_tokens[np.asarray(out.tokens)] & np.asarray(out.valid) & ~np.asarray(out.injected)
    got = np.asarray(out.monitor_state.scores)
    assert in_span.any()
    np.testing.assert_allclose(got[in_span], expected[in_span], rtol=1e-4, atol=1e-4)
    assert np.all(np.isneginf(got[~in_span]))
    # And span by span: the lockstep span-max is rl.probe_scores (the RL reward) on the finished sequence.
    P = tokens.shape[1] - N
    for b in range(in_span.shape[0]):
        runs = np.split(np.flatnonzero(in_span[b]), np.flatnonzero(np.diff(np.flatnonzero(in_span[b])) > 1) + 1)
        for span in (r for r in runs if len(r)):
            mask = np.zeros(tokens.shape, bool)
            mask[b, P + span] = True
            full = rl.probe_scores(apply, teacher, probe, SITE, tokens, valid, jnp.asarray(mask), reading=reading)[b]
            np.testing.assert_allclose(float(full), float(jax.nn.sigmoid(got[b, span].max())), rtol=1e-4, atol=1e-5)


def _replay(tokens, injected, scores, span_tokens, threshold, max_events, n_inject):
    """Where injections must land, replaying the monitor's rule on an emitted row."""
    want, remaining, events, span_max, fired_span = [], 0, 0, -np.inf, False
    for t, token in enumerate(tokens):
        now = remaining > 0
        remaining -= now
        want.append(now)
        in_span = span_tokens[token] and not now
        if not in_span:
            span_max, fired_span = -np.inf, False
            continue
        span_max = max(span_max, scores[t])
        if not fired_span and 1 / (1 + np.exp(-span_max)) > threshold and events < max_events and remaining == 0:
            events, remaining, fired_span = events + 1, n_inject, True
    return np.array(want)


@pytest.mark.parametrize("max_events", [1, 2])
def test_injections_land_right_after_the_token_that_fired(max_events):
    probe = random_probe(2)
    span_tokens = np.arange(VOCAB) >= 6
    inject = (RETRACT, 5)
    for key in range(3):
        out = run(make_monitor(probe, span_tokens, threshold=0.5, max_events=max_events, inject=inject), key=key)
        tokens, injected = np.asarray(out.tokens), np.asarray(out.injected)
        scores, fired = np.asarray(out.monitor_state.scores), np.asarray(out.monitor_state.fired)
        for b in range(tokens.shape[0]):
            np.testing.assert_array_equal(injected[b], _replay(tokens[b], injected[b], scores[b], span_tokens, 0.5,
                                                               max_events, len(inject)))
            for t in np.flatnonzero(fired[b]):
                if t + 2 < N:
                    assert tokens[b, t + 1:t + 3].tolist() == list(inject) and injected[b, t + 1:t + 3].all()
        assert (np.asarray(out.monitor_state.events) <= max_events).all()
        assert np.asarray(out.monitor_state.events).sum() == fired.sum() > 0


def test_a_monitor_that_never_fires_leaves_generation_unchanged():
    apply, policy, _ = models()
    silent = make_monitor(random_probe(3, bias=-50.0), np.ones(VOCAB, bool))
    tokens, valid = prompts()
    plain = ids.generate(apply, policy, tokens, prompt_valid=valid, max_new_tokens=N, key=jax.random.key(0),
                         sampling=ids.SamplingConfig(temperature=1.0))
    watched = run(silent)
    np.testing.assert_array_equal(plain.tokens, watched.tokens)
    assert not np.asarray(watched.injected).any() and not np.asarray(watched.monitor_state.fired).any()


def test_bad_configuration_is_refused():
    apply, _, teacher = models()
    with pytest.raises(ValueError, match="max_steps"):
        ProbeMonitor(apply, SITE, 0, teacher, random_probe(), jnp.ones(VOCAB, bool), jnp.array([RETRACT]))
    with pytest.raises(ValueError, match="reading"):
        ProbeMonitor(apply, SITE, N, teacher, random_probe(), jnp.ones(VOCAB, bool), jnp.array([RETRACT]),
                     reading="after")
    with pytest.raises(ValueError, match="inject_ids"):
        ProbeMonitor(apply, SITE, N, teacher, random_probe(), jnp.ones(VOCAB, bool), jnp.array([[RETRACT]]))


def test_with_close_tokens_a_claim_fires_only_once_it_is_complete():
    apply, _, teacher = models()
    span_tokens = np.arange(VOCAB) >= 6
    close = np.arange(VOCAB) % 2 == 1  # odd tokens complete a claim
    monitor = ProbeMonitor(apply, SITE, N, teacher, random_probe(2, bias=50.0), jnp.asarray(span_tokens),
                           jnp.array([RETRACT]), threshold=0.5, max_events=N, close_tokens=jnp.asarray(close))
    for key in range(3):
        out = run(monitor, key=key)
        tokens, fired, injected = (np.asarray(out.tokens), np.asarray(out.monitor_state.fired),
                                   np.asarray(out.injected))
        assert fired.any()
        # Every firing is at a sampled closing token of a span, and every such token fires (the probe always does).
        want = span_tokens[tokens] & close[tokens] & ~injected & np.asarray(out.valid)
        np.testing.assert_array_equal(fired, want)


def test_a_probe_of_the_wrong_width_is_refused():
    apply, _, teacher = models()
    narrow = probes.LogisticProbe(jnp.zeros(D + 1), jnp.float32(0.0), jnp.zeros(D + 1), jnp.ones(D + 1))
    with pytest.raises(ValueError, match=f"width {D + 1}.*d_model={D}"):
        ProbeMonitor(apply, SITE, N, teacher, narrow, jnp.ones(VOCAB, bool), jnp.array([RETRACT]))
