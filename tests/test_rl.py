"""Tests of idesign.rl: advantages, the GRPO loss against a hand computation, no gradient into the
probe or the teacher, a bit-identical teacher after RL, and the Lagrange multiplier on a toy reward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idesign as ids
from idesign import probes, rl

VOCAB, D = 13, 16
SITE = "blocks.0.resid_post"


@functools.cache
def model():
    return ids.init_transformer(ids.TransformerConfig(vocab_size=VOCAB, d_model=D, n_heads=2, n_layers=1), seed=3)


def batch_tokens(seed=0, B=4, T=6):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[0, :2] = False  # a left-padded row
    tokens[0, :2] = 0
    actions = np.zeros((B, T - 1), bool)
    actions[:, -2:] = True  # the last two tokens are the "completion"
    return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(actions)


def assert_same_tree(got, want, *, atol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol)


def random_probe(seed=0):
    rng = np.random.default_rng(seed)
    return probes.LogisticProbe(jnp.asarray(rng.normal(size=D), jnp.float32), jnp.float32(0.3),
                                jnp.asarray(rng.normal(size=D) * 0.1, jnp.float32), jnp.ones(D, jnp.float32))


# --------------------------------------------------------------------------------------------- advantages


def test_group_advantages_match_a_hand_computation():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 3.0, 3.0, 3.0, 3.0, -1.0, 2.0, 0.0, 1.0], np.float32)
    adv, keep = rl.group_advantages(jnp.asarray(rewards), group_size=4, eps=0.0)
    expected, kept = [], []
    for g in rewards.reshape(-1, 4):
        mean = sum(g) / 4
        std = (sum((x - mean) ** 2 for x in g) / 4) ** 0.5
        expected += [(x - mean) / std if std > 0 else 0.0 for x in g]
        kept += [std > 0] * 4
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-6)
    assert keep.tolist() == kept == [True] * 4 + [False] * 4 + [True] * 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=6, max_size=6), st.sampled_from([2, 3, 6]))
def test_kept_groups_are_centred_and_scaled(values, group_size):
    adv, keep = rl.group_advantages(jnp.asarray(values, jnp.float32), group_size=group_size)
    groups = np.asarray(values, np.float32).reshape(-1, group_size)
    for r, a, k in zip(groups, np.asarray(adv).reshape(-1, group_size), np.asarray(keep).reshape(-1, group_size)):
        assert k.all() or not k.any()
        if k.all():
            # Unit std up to the eps added to the group's std, which matters only for near-constant groups.
            assert abs(a.mean()) < 1e-4 and abs(a.std() - r.std() / (r.std() + 1e-6)) < 1e-2
        else:
            assert (a == 0).all()


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        rl.group_advantages(jnp.zeros(6), group_size=4)


# --------------------------------------------------------------------------------------------- loss


def _reference_loss(params, batch, clip_eps, kl_coef):
    """The surrogate recomputed in float64 NumPy from the model's logits."""
    apply, _ = model()
    logits = np.asarray(apply(params, batch.tokens, valid=batch.valid)[0], np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.asarray(batch.tokens)[:, 1:]
    total, count = 0.0, 0
    for b in range(tok.shape[0]):
        for t in range(tok.shape[1]):
            if not batch.action_mask[b, t]:
                continue
            lp = logp_all[b, t, tok[b, t]]
            ratio = np.exp(lp - float(batch.old_logprobs[b, t]))
            w = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            d = float(batch.ref_logprobs[b, t]) - lp
            total += -w * float(batch.advantages[b]) * lp + kl_coef * (np.exp(d) - d - 1)
            count += 1
    return total / count


def test_grpo_loss_matches_a_hand_computation_with_clipping_and_kl():
    apply, params = model()
    tokens, valid, actions = batch_tokens()
    current = rl.token_logprobs(apply, params, tokens, valid)
    rng = np.random.default_rng(1)
    old = current + jnp.asarray(rng.normal(0, 0.5, current.shape), jnp.float32)   # some weights get clipped
    ref = current + jnp.asarray(rng.normal(0, 0.3, current.shape), jnp.float32)
    batch = rl.RLBatch(tokens, valid, actions, jnp.array([1.0, -0.5, 2.0, -1.0]), old, ref)
    config = rl.GRPOConfig(clip_eps=0.2, kl_coef=0.1)
    loss, metrics = rl.grpo_loss(params, batch, apply=apply, config=config)
    assert float(loss) == pytest.approx(_reference_loss(params, batch, 0.2, 0.1), rel=1e-4, abs=1e-5)
    assert 0 < float(metrics["clip_frac"]) < 1 and int(metrics["n_actions"]) == 8


def test_on_policy_gradient_is_advantage_weighted_score_function():
    apply, params = model()
    tokens, valid, actions = batch_tokens(seed=2)
    lp = rl.token_logprobs(apply, params, tokens, valid)
    adv = jnp.array([1.0, -1.0, 0.5, 0.0])
    batch = rl.RLBatch(tokens, valid, actions, adv, lp, lp)
    grads = jax.grad(lambda p: rl.grpo_loss(p, batch, apply=apply, config=rl.GRPOConfig(kl_coef=0.3))[0])(params)
    # On policy the importance weight is 1 and the k3 KL has zero gradient at pi = pi_ref.
    expected = jax.grad(lambda p: -(rl.token_logprobs(apply, p, tokens, valid) * actions * adv[:, None]).sum()
                        / actions.sum())(params)
    assert_same_tree(grads, expected, atol=1e-6)


def test_grpo_step_raises_the_likelihood_of_advantaged_completions():
    apply, params = model()
    tokens, valid, actions = batch_tokens(seed=4)
    lp = rl.token_logprobs(apply, params, tokens, valid)
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    opt = optax.adam(3e-3)
    step = rl.make_grpo_step(apply, opt, rl.GRPOConfig(kl_coef=0.0))
    state = ids.init_train_state(params, opt)
    for _ in range(5):
        state, metrics = step(state, rl.RLBatch(tokens, valid, actions, adv, lp, lp))
    after = rl.token_logprobs(apply, state.params, tokens, valid)
    change = np.asarray(((after - lp) * actions).sum(1))
    assert change[:2].min() > 0 > change[2:].max()
    assert int(state.step) == 5 and np.isfinite(float(metrics["grad_norm"]))


def _choice_arrays(shape, positions, token, values):
    ids_ = np.full(shape, -1, np.int32)
    adv = np.zeros(shape, np.float32)
    for (b, t), v in zip(positions, values):
        ids_[b, t], adv[b, t] = token, v
    return jnp.asarray(ids_), jnp.asarray(adv)


def test_choice_term_is_the_exact_gradient_of_the_decisions_expected_value():
    apply, params = model()
    tokens, valid, actions = batch_tokens(seed=3)
    lp = rl.token_logprobs(apply, params, tokens, valid)
    zero = jnp.zeros(tokens.shape[0])
    positions, token, values = [(0, 3), (2, 2), (3, 1)], 5, [0.7, -1.2, 0.3]
    ids_, adv = _choice_arrays(lp.shape, positions, token, values)
    batch = rl.RLBatch(tokens, valid, actions, zero, lp, lp, ids_, adv)
    count = float(actions.sum())

    def expected_value(p):
        # Emitting ``token`` is worth v more than not emitting it: E = sum_d pi_d(token) * v_d (+ const).
        logits = apply(p, tokens, valid=valid)[0][:, :-1]
        prob = jax.nn.softmax(logits.astype(jnp.float32), -1)[..., token]
        return sum(v * prob[b, t] for (b, t), v in zip(positions, values)) / count

    loss, metrics = rl.grpo_loss(params, batch, apply=apply, config=rl.GRPOConfig(kl_coef=0.0))
    assert float(loss) == pytest.approx(-float(expected_value(params)), rel=1e-5)
    assert float(metrics["choice_loss"]) == pytest.approx(float(loss), rel=1e-6)
    grads = jax.grad(lambda p: rl.grpo_loss(p, batch, apply=apply, config=rl.GRPOConfig(kl_coef=0.0))[0])(params)
    expected = jax.grad(lambda p: -expected_value(p))(params)
    assert_same_tree(grads, expected, atol=1e-7)


def test_classify_choice_loss_is_cost_weighted_log_loss_of_the_better_outcome():
    apply, params = model()
    tokens, valid, actions = batch_tokens(seed=3)
    lp = rl.token_logprobs(apply, params, tokens, valid)
    positions, token, values = [(0, 3), (2, 2), (3, 1)], 5, [0.7, -1.2, 0.3]
    ids_, adv = _choice_arrays(lp.shape, positions, token, values)
    batch = rl.RLBatch(tokens, valid, actions, jnp.zeros(4), lp, lp, ids_, adv)
    logits = np.asarray(apply(params, tokens, valid=valid)[0], np.float64)[:, :-1]
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob = (prob / prob.sum(-1, keepdims=True))[..., token]
    reference = -sum(abs(v) * np.log(prob[b, t] if v > 0 else 1 - prob[b, t])
                     for (b, t), v in zip(positions, values)) / float(actions.sum())
    config = rl.GRPOConfig(kl_coef=0.0, choice_loss="classify")
    loss, _ = rl.grpo_loss(params, batch, apply=apply, config=config)
    assert float(loss) == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ValueError, match="choice_loss='sometimes'"):
        rl.GRPOConfig(choice_loss="sometimes")


def test_choice_steps_move_the_decision_toward_its_better_outcome_where_it_was_not_sampled():
    apply, params = model()
    tokens, valid, actions = batch_tokens(seed=5)
    lp = rl.token_logprobs(apply, params, tokens, valid)
    token = 7
    ids_, adv = _choice_arrays(lp.shape, [(0, 3), (1, 3)], token, [1.0, -1.0])
    opt = optax.adam(3e-3)
    step = rl.make_grpo_step(apply, opt, rl.GRPOConfig(kl_coef=0.0))
    state = ids.init_train_state(params, opt)
    for _ in range(5):
        state, _ = step(state, rl.RLBatch(tokens, valid, actions, jnp.zeros(4), lp, lp, ids_, adv))

    def prob(p, b):
        return float(jax.nn.softmax(apply(p, tokens, valid=valid)[0][b, 3])[token])

    assert prob(state.params, 0) > prob(params, 0) and prob(state.params, 1) < prob(params, 1)


def test_choice_term_refuses_misaligned_or_missing_advantages():
    apply, params = model()
    tokens, valid, actions = batch_tokens()
    lp = rl.token_logprobs(apply, params, tokens, valid)
    ids_, adv = _choice_arrays(lp.shape, [(0, 1)], 5, [1.0])
    zero = jnp.zeros(4)
    with pytest.raises(ValueError, match="choice_advantages is None"):
        rl.grpo_loss(params, rl.RLBatch(tokens, valid, actions, zero, lp, lp, ids_), apply=apply)
    with pytest.raises(ValueError, match=r"must both have shape \(4, 5\)"):
        rl.grpo_loss(params, rl.RLBatch(tokens, valid, actions, zero, lp, lp, ids_[:, :2], adv[:, :2]), apply=apply)


# --------------------------------------------------------------------------------------------- rewards


def test_rewards_carry_no_gradient_into_the_probe_or_the_teacher():
    apply, teacher = model()
    tokens, valid, actions = batch_tokens(seed=5)
    span = jnp.concatenate([jnp.zeros((4, 1), bool), actions], axis=1)
    probe = random_probe()

    def reward(teacher_params, probe):
        return (1.0 - rl.probe_scores(apply, teacher_params, probe, SITE, tokens, valid, span)).sum()

    g_teacher, g_probe = jax.grad(reward, argnums=(0, 1))(teacher, probe)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves((g_teacher, g_probe)))
    # The scores do depend on both (so the zero gradient is the stop_gradient, not a constant function).
    other = jax.tree_util.tree_map(lambda x: x * 1.1, teacher)
    assert not np.allclose(reward(teacher, probe), reward(other, probe))
    assert not np.allclose(reward(teacher, probe), reward(teacher, random_probe(1)))


def test_probe_scores_are_the_span_max_of_token_probabilities():
    apply, teacher = model()
    tokens, valid, _ = batch_tokens(seed=6)
    probe = random_probe(2)
    span = np.zeros(tokens.shape, bool)
    span[:, 3:5] = True
    span[3] = False
    got = rl.probe_scores(apply, teacher, probe, SITE, tokens, valid, jnp.asarray(span))
    acts = apply(teacher, tokens, hooks=ids.capture(SITE), valid=valid)[1][SITE]
    p = np.asarray(jax.nn.sigmoid(probes.score(probe, acts)))
    np.testing.assert_allclose(got[:3], p[:3, 3:5].max(1), rtol=1e-5)
    assert float(got[3]) == 0.0
    # Read where the span was predicted from: the real token before each span token.
    before = np.asarray(rl.probe_scores(apply, teacher, probe, SITE, tokens, valid, jnp.asarray(span),
                                        reading="prediction"))
    both = np.asarray(rl.probe_scores(apply, teacher, probe, SITE, tokens, valid, jnp.asarray(span), reading="both"))
    v = np.asarray(valid)
    for b in range(3):
        reals = np.flatnonzero(v[b])
        prev = [reals[reals < t].max() for t in (3, 4) if (reals < t).any()]
        np.testing.assert_allclose(before[b], p[b, prev].max(), rtol=1e-5)
        np.testing.assert_allclose(both[b], p[b, prev + [3, 4]].max(), rtol=1e-5)
    assert float(before[3]) == float(both[3]) == 0.0


def test_frozen_teacher_is_bit_identical_after_rl():
    apply, params = model()
    teacher = jax.tree_util.tree_map(jnp.array, params)           # same values, separate buffers
    before = jax.tree_util.tree_map(np.array, teacher)
    probe = random_probe(3)
    opt = optax.adam(1e-2)
    step = rl.make_grpo_step(apply, opt, rl.GRPOConfig())
    state = ids.init_train_state(params, opt)
    prompts = jnp.tile(jnp.array([[1, 2, 3]], jnp.int32), (8, 1))
    for i in range(3):
        out = ids.generate(apply, state.params, prompts, max_new_tokens=2, key=jax.random.key(i))
        tokens, valid = out.sequences()
        span = jnp.zeros(tokens.shape, bool).at[:, 3].set(True)
        rewards = 1.0 - rl.probe_scores(apply, teacher, probe, SITE, tokens, valid, span)
        adv, keep = rl.group_advantages(rewards, group_size=4)
        actions = jnp.zeros((8, tokens.shape[1] - 1), bool).at[:, 2:].set(True) & keep[:, None]
        lp = rl.token_logprobs(apply, state.params, tokens, valid)
        state, _ = step(state, rl.RLBatch(tokens, valid, actions, adv, lp, rl.token_logprobs(apply, teacher, tokens, valid)))
    for path, a in ids.tree.named_leaves(before).items():
        b = np.asarray(ids.tree.named_leaves(teacher)[path])
        assert a.tobytes() == b.tobytes(), path
    moved = [not np.array_equal(a, np.asarray(ids.tree.named_leaves(state.params)[p]))
             for p, a in ids.tree.named_leaves(before).items()]
    assert any(moved)  # the student did train


# --------------------------------------------------------------------------------------------- Lagrange


@functools.partial(jax.jit, static_argnames=("steps", "kp"))
def _toy_run(lagrange_lr: float, target: float, steps: int = 200, seed: int = 0, kp: float = 0.0):
    """A one-parameter policy choosing "abstain" with probability sigmoid(theta), trained by group-normalised PG.

    Answering earns 0.3 on average, abstaining 0.5 - lam: without the multiplier the policy learns to
    always abstain; with it, the abstain rate should be pulled to ``target``. Returns the rates per step.
    """
    def step(carry, t):
        theta, state = carry
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), t))
        abstain = jax.random.bernoulli(k1, jax.nn.sigmoid(theta), (64,))
        answer_reward = jax.random.bernoulli(k2, 0.3, (64,)).astype(jnp.float32)
        rate = abstain.mean()
        lam = rl.pi_multiplier(state, rate, target=target, kp=kp, bounds=None)  # kp = 0: state.lam
        rewards = jnp.where(abstain, 0.5 - lam, answer_reward)
        adv, _ = rl.group_advantages(rewards, group_size=64)
        grad = jax.grad(lambda th: (adv * jnp.where(abstain, jax.nn.log_sigmoid(th), jax.nn.log_sigmoid(-th))).mean())(theta)
        return (theta + 0.5 * grad, rl.lagrange_update(state, rate, target=target, lr=lagrange_lr)), rate

    _, rates = jax.lax.scan(step, (jnp.float32(-2.0), rl.lagrange_init()), jnp.arange(steps))
    return rates


def test_lagrange_multiplier_moves_the_rate_toward_its_target():
    late = lambda rates: float(rates[-100:].mean())
    free = late(_toy_run(0.0, 0.4))
    low, mid, high = (late(_toy_run(0.2, target)) for target in (0.2, 0.4, 0.6))
    assert free > 0.9, free                     # without the constraint the policy abstains almost always
    assert abs(mid - 0.4) < 0.15, mid           # with it, the rate oscillates around the target
    assert low < mid < high, (low, mid, high)   # and follows the target when it moves


def test_a_proportional_term_holds_the_rate_closer_than_the_integral_alone():
    # Abstaining beats answering by 0.2 (0.5 vs 0.3); kp = 0.2 / 0.1 removes that edge at 0.1 above the target.
    integral = np.asarray(_toy_run(0.2, 0.4))
    pi = np.asarray(_toy_run(0.2, 0.4, kp=2.0))
    assert pi.max() < integral.max(), (pi.max(), integral.max())  # the overshoot is caught as it happens
    assert np.abs(pi[50:] - 0.4).mean() < np.abs(integral[50:] - 0.4).mean()


def test_pi_multiplier_is_the_integral_plus_the_gain_times_the_batch_error():
    state = rl.LagrangeState(jnp.float32(0.25), jnp.float32(0.0))
    for rate, want in ((0.5, 0.25 + 3 * 0.1), (0.4, 0.25), (0.3, 0.0), (0.1, 0.0)):  # (0.0, None): lam >= 0
        assert float(rl.pi_multiplier(state, rate, target=0.4, kp=3.0)) == pytest.approx(want, abs=1e-6)
    assert float(rl.pi_multiplier(state, 0.1, target=0.4, kp=3.0, bounds=None)) == pytest.approx(-0.65, abs=1e-6)
    assert float(rl.pi_multiplier(state, 0.9, target=0.4, kp=0.0)) == pytest.approx(0.25)  # kp = 0: the integral
    jitted = jax.jit(lambda s, r: rl.pi_multiplier(s, r, target=0.4, kp=3.0))(state, 0.5)
    assert float(jitted) == pytest.approx(0.55, abs=1e-6)
    for kp in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="kp="):
            rl.pi_multiplier(state, 0.5, target=0.4, kp=kp)


def test_the_neutral_multiplier_makes_retracting_a_sure_hallucination_worth_keeping_it():
    for multiplier in ("clip", "cost"):
        config = rl.ClaimRewardConfig(multiplier=multiplier)
        lam = rl.neutral_retraction_multiplier(config)
        kept, retracted = (float(r) for r in rl.slot_rewards(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
                                                             jnp.array([0, 1]), lam, config))
        assert retracted == pytest.approx(kept, abs=1e-6) and kept == pytest.approx(config.clip[0])
    # RLFR's numbers by hand: 0.65 * (1 - lam) = 0.1 -> lam = 1 - 0.1 / 0.65; the gain reaches it 0.1 over budget.
    assert rl.retraction_gain(rl.ClaimRewardConfig(), 0.1) == pytest.approx((1 - 0.1 / 0.65) / 0.1)
    config = rl.ClaimRewardConfig(retract_budget=0.4, lagrange_kp=rl.retraction_gain(rl.ClaimRewardConfig(), 0.1))
    assert float(rl.retraction_multiplier(rl.lagrange_init(), 0.5, config)) == pytest.approx(1 - 0.1 / 0.65, abs=1e-5)
    assert float(rl.retraction_multiplier(rl.lagrange_init(0.2), 0.9, rl.ClaimRewardConfig())) == pytest.approx(0.2)
    for overshoot in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"overshoot={overshoot}"):
            rl.retraction_gain(rl.ClaimRewardConfig(), overshoot)
    with pytest.raises(ValueError, match="lagrange_kp=-1.0"):
        rl.ClaimRewardConfig(lagrange_kp=-1.0)


def test_lagrange_update_is_jittable_and_checks_ema():
    s = jax.jit(lambda s, r: rl.lagrange_update(s, r, target=0.5, lr=1.0))(rl.lagrange_init(), 0.25)
    assert float(s.lam) == -0.25
    clipped = rl.lagrange_update(rl.lagrange_init(), 0.25, target=0.5, lr=1.0, bounds=(0.0, None))
    assert float(clipped.lam) == 0.0  # an inequality constraint's multiplier never goes negative
    with pytest.raises(ValueError, match="ema"):
        rl.lagrange_update(rl.lagrange_init(), 0.1, target=0.5, ema=1.0)


def test_claim_scores_are_the_span_max_over_each_claim_read_with_its_prediction_position():
    apply, teacher = model()
    tokens, valid, _ = batch_tokens(seed=7, T=8)
    probe = random_probe(4)
    span_ids = np.zeros(tokens.shape, np.int32)
    span_ids[:, 4:6], span_ids[:, 7] = 1, 2
    span_ids[2, 7] = 0  # row 2 has one claim only
    got = np.asarray(rl.claim_scores(apply, teacher, probe, SITE, tokens, valid, span_ids, 3, completion_start=4))
    acts = apply(teacher, tokens, hooks=ids.capture(SITE), valid=valid)[1][SITE]
    p = np.asarray(jax.nn.sigmoid(probes.score(probe, acts)))
    for b in range(tokens.shape[0]):
        np.testing.assert_allclose(got[b, 0], p[b, 3:6].max(), rtol=1e-5)   # position 3 predicts the claim
        if b != 2:
            np.testing.assert_allclose(got[b, 1], p[b, 6:8].max(), rtol=1e-5)
    assert np.isnan(got[2, 1]) and np.isnan(got[:, 2]).all()


def test_claim_scores_refuse_spans_outside_the_completion_and_probes_of_the_wrong_width():
    apply, teacher = model()
    tokens, valid, _ = batch_tokens(seed=7, T=8)
    span_ids = np.zeros(tokens.shape, np.int32)
    span_ids[1, 2:5] = 1
    with pytest.raises(ValueError, match=r"claim 1 of row 1 has tokens at positions \[2, 3\], outside"):
        rl.claim_scores(apply, teacher, random_probe(), SITE, tokens, valid, span_ids, 1, completion_start=4)
    span_ids[:] = 0
    span_ids[0, 0] = 1  # padding
    with pytest.raises(ValueError, match="outside the completion"):
        rl.claim_scores(apply, teacher, random_probe(), SITE, tokens, valid, span_ids, 1, completion_start=0)
    wide = probes.LogisticProbe(jnp.zeros(D + 2), jnp.float32(0.0), jnp.zeros(D + 2), jnp.ones(D + 2))
    span_ids[:] = 0
    with pytest.raises(ValueError, match=f"width {D + 2}.*d_model={D}"):
        rl.claim_scores(apply, teacher, wide, SITE, tokens, valid, span_ids, 1, completion_start=4)


@settings(deadline=None, max_examples=30)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 2))
def test_a_retraction_never_earns_more_than_a_supported_claim(p_kept, p_retracted, lam):
    config = rl.ClaimRewardConfig()
    supported = float(rl.slot_rewards(jnp.array([0.0]), jnp.array([0.0]), jnp.array([0]), lam, config)[0])
    kept, retracted = (float(r) for r in rl.slot_rewards(jnp.array([p_kept, 0.0]), jnp.array([0.0, p_retracted]),
                                                         jnp.array([0, 1]), lam, config))
    assert config.clip[0] - 1e-6 <= kept <= config.clip[1] + 1e-6
    assert 0.0 <= retracted <= config.retract_cap * 1.0 + 1e-6 < supported


def test_claim_reward_config_refuses_a_budget_outside_the_unit_interval_and_an_uncapped_retraction():
    for budget in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"retract_budget={budget}"):
            rl.ClaimRewardConfig(retract_budget=budget)
    with pytest.raises(ValueError, match="retract_cap"):
        rl.ClaimRewardConfig(retract_cap=0.95)
    state = rl.lagrange_init()
    for _ in range(50):
        state = rl.retraction_lagrange_update(state, 0.1, rl.ClaimRewardConfig(retract_budget=0.4))
    assert float(state.lam) == 0.0  # an inequality: under budget, no penalty
