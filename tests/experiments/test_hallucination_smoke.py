"""Smoke test: the hallucination experiment runs end to end on a tiny config and writes its outputs."""

import dataclasses
import json
import math

import numpy as np

from experiments import hallucination
from idesign.data import claim_world as cw

TINY = dataclasses.replace(hallucination.QUICK, n_known=40, n_unknown=12, n_families=6, n_first=12, n_obscure=12, d_model=32,
                           n_layers=1, n_heads=2, pretrain_steps=300, learning_rate=1e-2, warmup=10, probe_samples=1, probe_steps=20,
                           probe_Cs=(1.0,), cv_folds=2, attention_steps=10, consistency_k=2, rl_steps=2,
                           prompts_per_step=4, group_size=4, gen_batch=32, bon_n=2, bon_prompts=16, seeds=(0,))


def test_main_writes_every_documented_metric(results):
    hallucination.main(TINY, progress=False)
    metrics = json.loads((results / "hallucination" / "metrics.json").read_text())
    keys = ["probe.auc", "probe.attention_auc", "base.confident_hallucination_share", "monitor.precision",
            "monitor.recall", "monitor.fixed_share", "monitor.retracted_share"]
    keys += [f"baselines.{b}_auc" for b in ("entropy", "maxprob", "logprob", "consistency", "logit_features")]
    keys += [f"{name}.hallucination_rate_at_{n}" for name in ("bon_probe", "bon_oracle") for n in hallucination.BON_NS]
    keys += [f"{arm}.probe_auc_on_student" for arm in hallucination.RL_ARMS]
    for key in keys:
        assert key in metrics and f"{key}_std" in metrics, key
    for arm in hallucination.ARMS:
        for key in ("hallucination_rate", "known_acc"):
            assert 0.0 <= metrics[f"{arm}.{key}"] <= 1.0, (arm, key)
        for key in ("abstain_rate", "retract_rate", "probe_estimated_rate"):
            assert f"{arm}.{key}" in metrics, (arm, key)
    assert metrics["base.relative_reduction"] == 0.0 and metrics["n_seeds"] == 1
    assert math.isfinite(metrics["rl_live_probe.estimate_gap"])
    for png in ("arms.png", "rl_curves.png", "best_of_n.png"):
        assert (results / "hallucination" / png).stat().st_size > 0
    assert "rl_frozen_probe" in (results / "hallucination" / "README.md").read_text()


def test_claims_and_slots_are_labelled_exactly():
    world = cw.make_claim_world(cw.ClaimWorldConfig(n_known=40, n_unknown=12, n_families=6, n_first=12))
    task = hallucination.make_task(world)
    row = int(np.flatnonzero((task.kind == "qa") & (task.attribute == "profession") & ~task.unknown)[0])
    truth = world.truth(task.entity[row], "profession")[0]
    wrong = next(p for p in cw.PROFESSIONS if p != truth)
    texts = [f"{truth} <eos>", f"{wrong} <eos>", f"{wrong} <retract> {truth} <eos>", f"{wrong} <retract> <eos>",
             "unknown <eos>", f"{truth} {truth} <eos>"]
    encoded = [world.tokenizer.encode(t) for t in texts]
    tokens, valid = (np.zeros((6, 5), np.int32), np.zeros((6, 5), bool))
    for i, e in enumerate(encoded):
        tokens[i, :len(e)], valid[i, :len(e)] = e, True
    parsed = hallucination.parse_batch(world, task, np.full(6, row), tokens, valid)
    slot = cw.ATTRIBUTES.index("profession")
    # 0 supported, 1 hallucinated, 2 retracted, 3 not addressed (malformed)
    assert parsed.outcome[:, slot].tolist() == [0, 1, 0, 2, 2, 3]
    assert parsed.malformed.tolist() == [False] * 5 + [True]
    c = parsed.claims
    assert c.row.tolist() == [0, 1, 2, 2, 3]
    assert c.supported.tolist() == [True, False, False, True, False]
    assert c.retracted.tolist() == [False, False, True, False, True]
    P = task.prompts.shape[1]
    assert (c.start - P).tolist() == [0, 0, 0, 2, 0] and (c.end - c.start).tolist() == [1] * 5


def test_slot_token_advantages_credit_each_claim_with_its_own_slot():
    from experiments.hallucination import Claims, Parsed, slot_token_advantages
    # Two samples of one long-form prompt (group of 2), 2 slots each; tokens 0-2 prompt, claims in 3..9.
    claims = Claims(row=np.array([0, 0, 1, 1]), start=np.array([4, 7, 4, 7]), end=np.array([5, 8, 5, 8]),
                    supported=np.array([True, False, True, True]), final=np.ones(4, bool),
                    retracted=np.zeros(4, bool), slot=np.array([0, 1, 0, 1]))
    parsed = Parsed(np.zeros((2, 4), int), np.zeros(2, bool), claims)
    slots = np.array([[0.95, 0.1, 0.1, 0.1], [0.95, 0.95, 0.1, 0.1]])
    rewards = slots.mean(1)
    adv = slot_token_advantages(parsed, None, None, rewards, slots, group_size=2, n_tokens=10)
    assert adv.shape == (2, 9)
    # Before the first claim: the completion advantage (-1 / +1); slot 0 equal in both samples: 0; slot 1: -1 / +1.
    np.testing.assert_allclose(adv[0], [-1, -1, -1, 0, 0, 0, -1, -1, -1], atol=1e-4)
    np.testing.assert_allclose(adv[1], [1, 1, 1, 0, 0, 0, 1, 1, 1], atol=1e-4)


def test_claim_credit_pays_a_claim_for_itself_and_the_retraction_for_what_follows():
    from experiments.hallucination import Claims, Parsed, slot_token_advantages
    # Two QA samples of one prompt, both making the same wrong claim (tokens 3-4); sample 0 keeps it (slot reward
    # 0.1), sample 1 retracts it (0.65). Index j of the advantages predicts token j + 1: the claim's tokens are
    # predicted at 2-3, the decision after it at 4-5.
    claims = Claims(row=np.array([0, 1]), start=np.array([3, 3]), end=np.array([5, 5]),
                    supported=np.array([False, False]), final=np.array([True, False]),
                    retracted=np.array([False, True]), slot=np.array([0, 0]))
    parsed = Parsed(np.zeros((2, 4), int), np.zeros(2, bool), claims)
    slots = np.array([[0.1, 0, 0, 0], [0.65, 0, 0, 0]])
    slot = slot_token_advantages(parsed, None, None, slots[:, 0], slots, group_size=2, n_tokens=7)
    claim = slot_token_advantages(parsed, None, None, slots[:, 0], slots, group_size=2, n_tokens=7,
                                  claim_quality=np.array([0.1, 0.1]))
    np.testing.assert_allclose(slot[1, 2:4], [1, 1], atol=1e-4)   # slot credit rewards making the wrong claim
    np.testing.assert_allclose(claim[1, 2:4], [0, 0], atol=1e-4)  # claim credit: both claims equally wrong
    np.testing.assert_allclose(claim[1, 4:6], [1, 1], atol=1e-4)  # the retraction decision is still paid
    np.testing.assert_allclose(claim[0, 4:6], [-1, -1], atol=1e-4)  # and keeping the wrong claim is not
    # A right claim against a wrong one on the same slot: the right claim's own tokens are paid for it.
    right = claims._replace(supported=np.array([True, False]))
    claim2 = slot_token_advantages(Parsed(parsed.outcome, parsed.malformed, right), None, None, slots[:, 0], slots,
                                   group_size=2, n_tokens=7, claim_quality=np.array([0.95, 0.1]))
    np.testing.assert_allclose(claim2[:, 2:4], [[1, 1], [-1, -1]], atol=1e-4)


def test_grpo_loss_per_token_advantages_match_broadcast():
    import jax.numpy as jnp
    import idesign as ids
    from idesign import rl
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    t = jnp.array([[1, 2, 3, 4], [4, 3, 2, 1]], jnp.int32)
    v = jnp.ones_like(t, bool)
    lp = rl.token_logprobs(apply, params, t, v)
    mask = jnp.array([[False, True, True], [False, True, True]])
    a = jnp.array([1.0, -0.5])
    one = rl.grpo_loss(params, rl.RLBatch(t, v, mask, a, lp, lp), apply=apply)[0]
    per = rl.grpo_loss(params, rl.RLBatch(t, v, mask, jnp.repeat(a[:, None], 3, 1), lp, lp), apply=apply)[0]
    assert jnp.allclose(one, per)
    import pytest
    with pytest.raises(ValueError, match="per-token advantages"):
        rl.grpo_loss(params, rl.RLBatch(t, v, mask, jnp.ones((2, 2)), lp, lp), apply=apply)


def test_cost_multiplier_charges_every_retraction():
    import jax.numpy as jnp
    import pytest
    from idesign import rl
    p_kept, p_ret, outcome = jnp.array([0.0, 0.0]), jnp.array([1.0, 0.0]), jnp.array([1, 1])
    clip = rl.slot_rewards(p_kept, p_ret, outcome, 0.2, rl.ClaimRewardConfig())
    cost = rl.slot_rewards(p_kept, p_ret, outcome, 0.2, rl.ClaimRewardConfig(multiplier="cost"))
    np.testing.assert_allclose(clip, [0.65 * 0.8, 0.0], atol=1e-6)  # RLFR: a right claim's retraction is already 0
    np.testing.assert_allclose(cost, [0.65 - 0.2, -0.2], atol=1e-6)
    with pytest.raises(ValueError, match="multiplier='x'"):
        rl.ClaimRewardConfig(multiplier="x")


def test_an_unknown_credit_scheme_is_refused_by_name():
    import pytest
    bad = dataclasses.replace(hallucination.QUICK, credit="token")
    with pytest.raises(ValueError, match="credit must be one of .*'token'"):
        hallucination.train_rl(None, bad, None, "rl_oracle", None, None, None, None, None, 0, False)


def test_first_claim_stats_count_first_claims_and_what_follows_a_retraction():
    from experiments.diag.hallucination_oracle import first_claim_stats
    from experiments.hallucination import Claims, Parsed, Task
    # Three QA rows: known (wrong, retracted, then a right correction), unknown (wrong, kept), known (right, kept).
    task = Task(np.zeros((3, 2), np.int32), np.ones((3, 2), bool), np.array(["qa"] * 3), np.array(["city"] * 3),
                np.arange(3), np.array([False, True, False]))
    claims = Claims(row=np.array([0, 0, 1, 2]), start=np.array([2, 5, 2, 2]), end=np.array([3, 6, 3, 3]),
                    supported=np.array([False, True, False, True]), final=np.array([False, True, True, True]),
                    retracted=np.array([True, False, False, False]), slot=np.zeros(4, np.int64))
    outcome = np.full((3, 4), 3)
    outcome[:, 0] = [0, 1, 0]
    s = first_claim_stats("x", Parsed(outcome, np.zeros(3, bool), claims), task, np.arange(3))
    assert s["x.known_first_claim_acc"] == 0.5  # of 2 known slots, only row 2's first claim is right
    assert s["x.first_retract_wrong"] == 1.0 and s["x.first_retract_right"] == 0.0
    assert s["x.first_retract_unknown"] == 0.0
    assert s["x.after_retract_fixed"] == 1.0 and s["x.after_retract_wrong"] == 0.0


def test_every_diagnostic_module_imports_without_running():
    import importlib
    import pkgutil
    import experiments.diag as diag
    for m in pkgutil.iter_modules(diag.__path__):
        assert callable(importlib.import_module(f"experiments.diag.{m.name}").main), m.name


def _two_qa_samples(supported, retracted=(False, False)):
    from types import SimpleNamespace
    from experiments.hallucination import Claims, Parsed
    # Two QA samples of one birth_city prompt (tokens 0-2), each claiming tokens 3-4 then a token at 5.
    claims = Claims(row=np.array([0, 1]), start=np.array([3, 3]), end=np.array([5, 5]),
                    supported=np.asarray(supported), final=~np.asarray(retracted), retracted=np.asarray(retracted),
                    slot=np.array([0, 0]))
    task = SimpleNamespace(kind=np.array(["qa"]), attribute=np.array(["birth_city"]))
    return Parsed(np.zeros((2, 4), int), np.zeros(2, bool), claims), task


def test_choice_advantages_price_retracting_each_claim_against_keeping_it():
    from types import SimpleNamespace
    from experiments.hallucination import choice_advantages
    from idesign import rl
    from idesign.data.tokenizer import RETRACT_ID
    parsed, task = _two_qa_samples([False, True])
    rt = SimpleNamespace(reward=rl.ClaimRewardConfig())
    p = np.array([1.0, 0.0])  # the oracle: the first claim is wrong, the second right
    slots = np.array([[0.1, 0, 0, 0], [0.95, 0, 0, 0]])  # both kept
    valid = np.ones((2, 7), bool)
    scale = np.std([0.1, 0.95])
    ids_, adv, after = choice_advantages(rt, parsed, task, np.zeros(2, int), p, 0.0, slots, valid)
    assert np.argwhere(ids_ >= 0).tolist() == [[0, 4], [1, 4]] and (ids_[ids_ >= 0] == RETRACT_ID).all()
    assert after.sum() == 2 and after[:, 4].all()
    np.testing.assert_allclose(adv[:, 4], [(0.65 - 0.1) / scale, (0.0 - 0.95) / scale], rtol=1e-5)
    # A retraction is worth less as the multiplier rises.
    assert choice_advantages(rt, parsed, task, np.zeros(2, int), p, 0.5, slots, valid)[1][0, 4] < adv[0, 4]
    # Within: breaking the claim off before either of its tokens is priced the same way; "inside" skips the first.
    ids_w, adv_w, _ = choice_advantages(rt, parsed, task, np.zeros(2, int), p, 0.0, slots, valid, where="within")
    assert np.argwhere(ids_w[0] >= 0).ravel().tolist() == [2, 3, 4]
    np.testing.assert_allclose(adv_w[:, 2:5], np.repeat(adv[:, 4:5], 3, 1), rtol=1e-5)
    ids_i = choice_advantages(rt, parsed, task, np.zeros(2, int), p, 0.0, slots, valid, where="inside")[0]
    assert np.argwhere(ids_i[0] >= 0).ravel().tolist() == [3, 4]
    # A claim that ends the sequence made no decision after it.
    short = np.ones((2, 5), bool)
    assert not choice_advantages(rt, parsed, task, np.zeros(2, int), p, 0.0, slots, short)[2].any()


def test_a_slot_broken_off_carries_no_reward_signal():
    from experiments.hallucination import Parsed, slot_token_advantages
    parsed, _ = _two_qa_samples([True, True])
    # Sample 0 broke its claim off at tokens 3-4 (no claim: NaN reward); sample 1 kept a right claim.
    parsed = Parsed(parsed.outcome, parsed.malformed, parsed.claims.select(np.array([False, True])),
                    np.array([[0, 3, 4, 0]]), np.array([[True, False, False, False], [False] * 4]))
    slots = np.array([[np.nan, 0, 0, 0], [0.95, 0, 0, 0]])
    adv = slot_token_advantages(parsed, None, None, np.array([0.0, 0.95]), slots, group_size=2, n_tokens=7)
    np.testing.assert_allclose(adv[0, 2:], 0.0)   # the cut, its <retract> and what follows: nothing to score them by
    np.testing.assert_allclose(adv[1, 2:], 0.0)   # one sample with a reward: no spread, no signal
    assert parsed.retract_rate() == 0.5           # one retraction (the cut) per two claims begun


def test_an_unknown_retraction_choice_is_refused_by_name():
    import pytest
    bad = dataclasses.replace(hallucination.QUICK, retract_choice="sometimes")
    with pytest.raises(ValueError, match="retract_choice must be one of .*'sometimes'"):
        hallucination.train_rl(None, bad, None, "rl_oracle", None, None, None, None, None, 0, False)


def test_world_options_reach_the_world_and_key_the_base_cache_only_when_used():
    plain = hallucination.base_cache_config(hallucination.QUICK)
    assert not {"cut_rate", "mark_passes", "correction_rate", "n_obscure"} & set(plain)  # cached bases stay valid
    config = dataclasses.replace(hallucination.QUICK, cut_rate=0.05, mark_passes=3)
    keyed = hallucination.base_cache_config(config)
    assert keyed == {**plain, "cut_rate": 0.05, "mark_passes": 3}
    world = hallucination.world_config(config, seed=4)
    assert (world.cut_rate, world.mark_passes, world.seed) == (0.05, 3, 4)
