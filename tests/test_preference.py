"""DPO: the loss and its gradient against a hand computation; data checks; the reference stays frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids
from idesign import preference as pref

CFG = ids.TransformerConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=16)


@pytest.fixture(scope="module")
def model():
    apply, params = ids.init_transformer(CFG, seed=0)
    _, other = ids.init_transformer(CFG, seed=1)     # a policy different from the reference
    data = pref.preference_dataset([[1, 2], [3, 4, 5], [6]], [[7, 8], [9], [10, 11, 12]], [[2], [4, 4, 4], [5, 6]])
    return apply, params, other, pref.encode_pairs(data[:3], pad_id=0)


def hand_logprob(apply, params, prompt, response):
    """log p(response | prompt) from one forward pass over the unpadded sequence, indexed by hand."""
    seq = list(prompt) + list(response)
    logp = jax.nn.log_softmax(apply(params, jnp.asarray([seq], jnp.int32))[0][0].astype(jnp.float32))
    return sum(logp[len(prompt) - 1 + i, token] for i, token in enumerate(response))


def hand_dpo(apply, params, ref, rows, beta):
    losses = []
    for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
        m = beta * ((hand_logprob(apply, params, p, c) - hand_logprob(apply, ref, p, c))
                    - (hand_logprob(apply, params, p, r) - hand_logprob(apply, ref, p, r)))
        losses.append(jnp.log1p(jnp.exp(-m)))
    return jnp.mean(jnp.stack(losses))


ROWS = {"prompt": [[1, 2], [3, 4, 5], [6]], "chosen": [[7, 8], [9], [10, 11, 12]], "rejected": [[2], [4, 4, 4], [5, 6]]}


def test_sequence_logprobs_sum_only_the_response_tokens(model):
    apply, params, _, batch = model
    got = pref.sequence_logprobs(apply, params, batch["chosen_tokens"], batch["chosen_mask"], batch["chosen_valid"])
    want = jax.jit(lambda q: jnp.stack([hand_logprob(apply, q, p, c) for p, c in zip(ROWS["prompt"], ROWS["chosen"])]))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dpo_loss_and_gradient_match_a_hand_computation(model):
    apply, ref, policy, batch = model
    beta = 0.3

    def ours(params):
        c, r = pref._pair_logprobs(apply, params, batch)
        rc, rr = pref._pair_logprobs(apply, ref, batch)
        return pref.dpo_loss(c, r, rc, rr, beta=beta)[0]

    loss, grad = jax.jit(jax.value_and_grad(ours))(policy)
    # One compilation of the unrolled per-token loops (eagerly they take minutes on a CPU).
    hand_loss, hand_grad = jax.jit(jax.value_and_grad(lambda p: hand_dpo(apply, p, ref, ROWS, beta)))(policy)
    np.testing.assert_allclose(loss, hand_loss, rtol=1e-5)
    for path, g in ids.tree.named_leaves(grad).items():
        np.testing.assert_allclose(g, ids.tree.named_leaves(hand_grad)[path], rtol=1e-4, atol=1e-6, err_msg=path)
    assert float(loss) != pytest.approx(np.log(2))          # the policy differs from the reference


def test_the_step_trains_toward_chosen_and_never_moves_the_reference(model):
    apply, ref, _, batch = model
    ref_copy = jax.tree.map(jnp.array, ref)
    opt = optax.adam(3e-2)
    step = pref.make_dpo_step(apply, ref, opt, beta=0.5)
    state = ids.init_train_state(ref, opt)
    first = None
    for _ in range(15):
        state, metrics = step(state, batch)
        first = first if first is not None else metrics
    assert float(first["loss"]) == pytest.approx(np.log(2), abs=1e-6)       # policy == reference at the start
    assert float(metrics["loss"]) < 0.3 and float(metrics["accuracy"]) == 1.0
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ref_copy)):
        np.testing.assert_array_equal(a, b)


def test_the_step_composes_with_freezing(model):
    apply, ref, _, batch = model
    mask = ids.masks.full(ref, False)
    mask["embed"]["embedding"] = True
    opt = ids.optim.frozen(optax.adam(1e-2), freeze_mask=mask)
    state, _ = pref.make_dpo_step(apply, ref, opt)(ids.init_train_state(ref, opt), batch)
    np.testing.assert_array_equal(state.params["embed"]["embedding"], ref["embed"]["embedding"])


@pytest.mark.parametrize("call, match", [
    (lambda: pref.preference_dataset([[1]], [[2]], [[]]), r"rejected responses of rows \[0\] are empty"),
    (lambda: pref.preference_dataset([[1]], [[2], [3]], [[4]]), "different lengths"),
    (lambda: pref.pairs_from_sequences([[1, 2, 3]], [[1, 9, 3]], [2]), "row 0 pairs responses to different prompts"),
    (lambda: pref.pairs_from_sequences([[1, 2]], [[1, 2, 3]], [2]), "row 0 has an empty chosen response"),
    (lambda: pref.encode_pairs({"prompt": [[1]], "chosen": [[2]]}, pad_id=0), r"lack the columns \['rejected'\]"),
    (lambda: pref.encode_pairs({"prompt": [[]], "chosen": [[2]], "rejected": [[3]]}, pad_id=0), "empty prompt"),
    (lambda: pref.encode_pairs(ROWS, pad_id=0, length=3), "row 0 .* more than length=3"),
    (lambda: pref.make_dpo_step(None, {}, optax.sgd(1.0), beta=0.0), "beta = 0.0"),
])
def test_bad_input_is_refused_with_the_value(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_a_reference_of_another_shape_is_refused(model):
    apply, ref, _, batch = model
    _, bigger = ids.init_transformer(ids.TransformerConfig(vocab_size=13, d_model=32, n_heads=2, n_layers=1, max_len=16))
    step = pref.make_dpo_step(apply, bigger, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"not have the policy's structure \(blocks.0.attn.k_proj.bias: reference \(32,\) vs policy \(16,\)"):
        step(ids.init_train_state(ref, optax.sgd(0.1)), batch)
