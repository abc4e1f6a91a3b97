"""Data attribution: gradient scores against a per-pair loop, probe scores against a hand computation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import idesign as ids
from idesign import data_attribution as da
from idesign import preference as pref

CFG = ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_len=8)
ROWS = {"prompt": [[1, 2], [3, 4, 5], [6], [2, 2]], "chosen": [[7, 8], [9], [10, 3, 4], [5]],
        "rejected": [[2], [4, 4, 4], [5, 6], [8, 9]]}


@pytest.fixture(scope="module")
def model():
    apply, ref = ids.init_transformer(CFG, seed=0)
    _, policy = ids.init_transformer(CFG, seed=1)
    return apply, ref, policy


def test_gradient_scores_match_a_per_pair_loop(model):
    apply, ref, policy = model
    behaviour = da.behaviour_nll(apply, [[1, 2], [6]], [[3, 3], [3, 3]], pad_id=0)
    g_b, _ = ravel_pytree(jax.grad(behaviour)(policy))
    want_dot, want_cos = [], []
    for i in range(4):
        one = pref.encode_pairs({k: v[i:i + 1] for k, v in ROWS.items()}, pad_id=0)

        def loss(p):
            c, r = pref._pair_logprobs(apply, p, one)
            rc, rr = pref._pair_logprobs(apply, ref, one)
            return pref.dpo_loss(c, r, rc, rr, beta=0.3)[0]

        g, _ = ravel_pytree(jax.grad(loss)(policy))
        want_dot.append(float(g @ g_b))
        want_cos.append(float(g @ g_b / (jnp.linalg.norm(g) * jnp.linalg.norm(g_b))))
    # batch_size 3 also exercises the padded last chunk
    got = da.gradient_pair_scores(apply, policy, ref, ROWS, behaviour, pad_id=0, beta=0.3, batch_size=3)
    np.testing.assert_allclose(got, want_dot, rtol=2e-4, atol=1e-7)
    cos = da.gradient_pair_scores(apply, policy, ref, ROWS, behaviour, pad_id=0, beta=0.3, batch_size=3, normalize=True)
    np.testing.assert_allclose(cos, want_cos, rtol=2e-4, atol=1e-7)


def test_response_activations_and_probe_scores_match_a_hand_computation(model):
    apply, params, _ = model
    site = "blocks.0.resid_post"
    acts = da.response_activations(apply, params, ROWS, site, pad_id=0)
    probe = ids.probes.MassMeanProbe(w=jnp.array(np.random.default_rng(0).normal(size=8), jnp.float32),
                                     b=jnp.array(0.3))
    want = []
    for p, c, r in zip(ROWS["prompt"], ROWS["chosen"], ROWS["rejected"]):
        means = []
        for resp in (c, r):
            _, cap = apply(params, jnp.asarray([p + resp], jnp.int32), hooks=ids.capture(site))
            means.append(np.asarray(cap[site][0, len(p):]).mean(0))
        np.testing.assert_allclose(acts["chosen"][len(want)], means[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts["rejected"][len(want)], means[1], rtol=1e-5, atol=1e-6)
        want.append(float(np.asarray(probe.w) @ (means[0] - means[1])))    # the bias cancels
    np.testing.assert_allclose(da.probe_pair_scores(probe, acts), want, rtol=1e-4, atol=1e-5)
    # The lean jitted scorer: chunks of 3 (the last one padded), from rows or from encoded arrays.
    scorer = da.probe_pair_scorer(apply, site, pad_id=0, batch_size=3)
    np.testing.assert_allclose(scorer(params, probe, ROWS), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scorer(params, probe, pref.encode_pairs(ROWS, pad_id=0)), want, rtol=1e-4, atol=1e-5)
    tok = da.response_activations(apply, params, ROWS, site, pad_id=0, tokens=True)
    assert tok["chosen"].shape == (sum(map(len, ROWS["chosen"])), 8)
    assert tok["chosen_row"].tolist() == [0, 0, 1, 2, 2, 2, 3]


def test_interventions_rankings_and_metrics():
    ds = pref.preference_dataset(ROWS["prompt"], ROWS["chosen"], ROWS["rejected"], source=["a", "b", "a", "c"])
    assert da.top_k([0.1, 3.0, 3.0, -1.0], 2).tolist() == [1, 2]
    assert da.filter_pairs(ds, [1, 3])["chosen"] == [[7, 8], [10, 3, 4]]
    swapped = da.swap_pairs(ds, [0])
    assert swapped[0]["chosen"] == [2] and swapped[0]["rejected"] == [7, 8] and swapped[1]["chosen"] == [9]
    assert da.drop_sources(ds, ["a"])["source"] == ["b", "c"]
    assert da.source_scores([1.0, 2.0, 3.0, 0.0], ds["source"]) == {"b": 2.0, "a": 2.0, "c": 0.0}
    assert da.precision_at_k([0, 2], [True, False, False, True]) == 0.5
    np.testing.assert_allclose(da.r2([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]), 0.36)


def test_feature_means_average_each_response():
    params = ids.sae.init_sae(jax.random.key(0), 3, 4)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    codes = np.asarray(ids.sae.encode(params, x, 2))
    got = da.response_feature_means(params, 2, x, [0, 0, 1, 1, 1], 2)
    np.testing.assert_allclose(got, [codes[:2].mean(0), codes[2:].mean(0)], rtol=1e-6)


def test_behaviour_rate_reads_generated_tokens(model):
    apply, params, _ = model
    always = da.behaviour_rate(apply, params, [[1, 2], [3, 4]], lambda t: np.ones(len(t), bool), max_new_tokens=2,
                               samples=3)
    first = da.behaviour_rate(apply, params, [[1, 2]], lambda t: t[:, 0] == 5, max_new_tokens=1, temperature=0.0)
    logits, _ = apply(params, jnp.asarray([[1, 2]]))
    assert always == 1.0 and first == float(int(jnp.argmax(logits[0, -1])) == 5)


def test_bad_input_is_refused(model):
    apply, ref, policy = model
    behaviour = da.behaviour_nll(apply, [[1]], [[3]], pad_id=0)
    _, bigger = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, max_len=8))
    with pytest.raises(ValueError, match=r"reference model's parameters do not have the policy's structure"):
        da.gradient_pair_scores(apply, policy, bigger, ROWS, behaviour, pad_id=0)
    with pytest.raises(ValueError, match=r"rejected responses of rows \[1\] are empty"):
        da.gradient_pair_scores(apply, policy, ref, {**ROWS, "rejected": [[2], [], [5], [8]]}, behaviour, pad_id=0)
    with pytest.raises(ValueError, match=r"chosen responses of rows \[0\] are empty"):
        da.response_activations(apply, ref, {**ROWS, "chosen": [[], [9], [1], [5]]}, "blocks.0.resid_post", pad_id=0)
    with pytest.raises(ValueError, match=r"lack the columns \['prompt'\]"):
        da.response_activations(apply, ref, {"chosen": [[1]], "rejected": [[2]]}, "blocks.0.resid_post", pad_id=0)
    # A pair's two responses always follow the row's one prompt; full sequences with different prompts are refused.
    with pytest.raises(ValueError, match="row 0 pairs responses to different prompts"):
        pref.pairs_from_sequences([[1, 2, 7]], [[1, 3, 7]], [2])
    with pytest.raises(ValueError, match=r"chosen activations \(2, 3\) and rejected \(1, 3\) differ"):
        da.probe_pair_scores(None, {"chosen": np.zeros((2, 3)), "rejected": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="k=5 for 2 scores"):
        da.top_k([1.0, 2.0], 5)
    with pytest.raises(ValueError, match="responses \\[1\\] have no token"):
        da.response_feature_means(ids.sae.init_sae(jax.random.key(0), 3, 4), 2, np.zeros((2, 3)), [0, 0], 2)


def test_a_fresh_behaviour_loss_does_not_recompile(model, monkeypatch):
    # behaviour_nll builds a new loss each call; the jitted gradients must take it as an argument (one trace)
    apply, ref, policy = model
    traces = []
    logprobs = pref.sequence_logprobs
    monkeypatch.setattr(pref, "sequence_logprobs", lambda *a, **k: traces.append(1) or logprobs(*a, **k))
    first = [da.gradient_pair_scores(apply, policy, ref, ROWS, da.behaviour_nll(apply, [[1]], [[t]], pad_id=0),
                                     pad_id=0, beta=0.7, batch_size=4) for t in (3, 3)]
    n = len(traces)
    third = da.gradient_pair_scores(apply, policy, ref, ROWS, da.behaviour_nll(apply, [[2]], [[5]], pad_id=0),
                                    pad_id=0, beta=0.7, batch_size=4)
    assert n > 0 and len(traces) == n, "a fresh behaviour_nll(...) retraced the gradient"
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.allclose(third, first[0])   # the new tokens were used, not a stale cached loss
    assert not hasattr(da, "_GRADIENT_FNS")


def test_first_order_feature_shift_matches_a_hand_computation():
    # Two pairs, two features, a per-prompt baseline. By hand, with p = exp(logprob):
    # pair 0: p_w 0.5, p_l 0.1, f_w (1, 0), f_l (0, 2), b (0.5, 1) -> 0.5*(0.5, -1) - 0.1*(-0.5, 1) = (0.30, -0.60)
    # pair 1: p_w 0.2, p_l 0.4, f_w (2, 1), f_l (1, 1), b (1, 0)   -> 0.2*(1, 1)    - 0.4*(0, 1)    = (0.20, -0.20)
    # mean: (0.25, -0.40)
    got = da.first_order_feature_shift([[1.0, 0.0], [2.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]], np.log([0.5, 0.2]),
                                       np.log([0.1, 0.4]), [[0.5, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(got, [0.25, -0.40], atol=1e-12)
    # A shared [M] baseline broadcasts; with both responses certain it is the plain feature difference.
    np.testing.assert_allclose(da.first_order_feature_shift([[1.0, 0.0]], [[0.0, 2.0]], [0.0], [0.0], [7.0, -3.0]),
                               da.feature_shift([[1.0, 0.0]], [[0.0, 2.0]]), atol=1e-12)


def test_first_order_feature_shift_is_the_derivative_of_a_tabular_softmax_policy():
    # One prompt, four responses with free logits z; E_pi[f] after a small DPO gradient step on the pair
    # (y_w = 0, y_l = 2) at the reference changes at the rate (beta / 2) * first_order_feature_shift.
    rng = np.random.default_rng(0)
    z, f, beta = jnp.asarray(rng.normal(size=4), jnp.float32), rng.normal(size=(4, 3)).astype(np.float32), 0.1

    def expected(logits):
        return jax.nn.softmax(logits) @ f

    def dpo(logits):
        lp = jax.nn.log_softmax(logits)
        ref = jax.lax.stop_gradient(jax.nn.log_softmax(z))
        return pref.dpo_loss(lp[0:1], lp[2:3], ref[0:1], ref[2:3], beta=beta)[0]

    # The exact rate of change of E_pi[f] along the descent direction -grad(dpo), by forward-mode AD.
    _, change = jax.jvp(expected, (z,), (-jax.grad(dpo)(z),))
    logp = np.asarray(jax.nn.log_softmax(z))
    predicted = da.first_order_feature_shift(f[[0]], f[[2]], logp[[0]], logp[[2]], np.asarray(expected(z)))
    np.testing.assert_allclose(np.asarray(change) / (beta / 2), predicted, rtol=1e-4, atol=1e-6)


def test_first_order_feature_shift_refuses_bad_input():
    with pytest.raises(ValueError, match=r"chosen \(1, 2\) and rejected \(1, 3\)"):
        da.first_order_feature_shift(np.zeros((1, 2)), np.zeros((1, 3)), [0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match=r"log-probabilities \(2,\) and \(1,\) for 1 pairs"):
        da.first_order_feature_shift(np.zeros((1, 2)), np.zeros((1, 2)), [0.0, 0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="log-probability is positive"):
        da.first_order_feature_shift(np.zeros((1, 2)), np.zeros((1, 2)), [0.5], [0.0], 0.0)
    with pytest.raises(ValueError, match=r"baseline \(2, 2\); expected \[M\] = \[2\] or \[N, M\] = \[1, 2\]"):
        da.first_order_feature_shift(np.zeros((1, 2)), np.zeros((1, 2)), [0.0], [0.0], np.zeros((2, 2)))


def test_earliest_good_site_and_the_scorer_stops_at_the_read_site():
    sites = ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert da.earliest_good_site(sites, [0.80, 0.995, 1.0]) == "blocks.1.resid_post"
    assert da.earliest_good_site(sites, [0.80, 0.95, 1.0]) == "blocks.2.resid_post"
    with pytest.raises(ValueError, match="one AUC per site"):
        da.earliest_good_site(sites, [1.0])
    # The probe scorer's compiled program holds only the blocks up to its read site (the later ones are dead).
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=3))
    probe = ids.probes.MassMeanProbe(w=np.ones(8, np.float32), b=np.array(0.0, np.float32))
    tok = np.ones((4, 5), np.int32)
    dots = {s: da._pair_score_difference.lower(apply, s, params, probe, tok, tok > 0, tok > 0).compile()
            .as_text().count(" dot(") for s in sites}
    assert dots[sites[0]] < dots[sites[1]] < dots[sites[2]], dots
