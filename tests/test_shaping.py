"""Training-only shaping hooks: CAFT, preventative steering, gradient routing against hand-written
references on a toy model; on during training and refused at inference; bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids
from idesign import shaping
from idesign.hooks import Capture, merge_hooks
from tests.conftest import build

ONE_BLOCK = ids.TransformerConfig(vocab_size=37, d_model=32, n_layers=1, n_heads=4, max_len=64)
V, D, H = 7, 5, 6  # toy vocabulary, embedding and hidden widths


class Toy:
    """logits = tanh(E[tokens] W1) W2, with sites on the hidden pre-activation and the logits."""

    site_names = ("hidden", "logits")

    def __call__(self, params, tokens, *, hooks=None, valid=None):
        sites = ids.SiteRunner(hooks, self.site_names)
        hidden = sites("hidden", params["embed"][tokens] @ params["w1"])
        logits = sites("logits", jnp.tanh(hidden) @ params["w2"])
        sites.check_all_visited()
        return logits, sites.captured


def toy_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"embed": jax.random.normal(k[0], (V, D)), "w1": jax.random.normal(k[1], (D, H)) / 2,
            "w2": jax.random.normal(k[2], (H, V)) / 2}


def toy_batch(seed=1, b=3, t=4):
    return {"tokens": jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)}


def manual_loss(params, tokens, transform_hidden):
    """Mean next-token cross-entropy of the toy model with ``hidden ← transform_hidden(hidden)``, written out."""
    x, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = transform_hidden(params["embed"][x] @ params["w1"])
    logits = jnp.tanh(hidden) @ params["w2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, targets[..., None], -1).mean()


def orthonormal_rows(seed, k, d):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return jnp.asarray(q.T, jnp.float32)


def assert_trees_close(a, b, **kw):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# --- against hand-written training losses ------------------------------------------------------

def test_caft_loss_and_gradients_match_the_ablated_reference():
    params, batch, basis = toy_params(), toy_batch(), orthonormal_rows(0, 2, H)
    loss = ids.lm_loss(Toy(), hooks=shaping.caft({"hidden": basis}))
    reference = lambda p: manual_loss(p, batch["tokens"], lambda h: h - (h @ basis.T) @ basis)
    (got, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    want, want_grads = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # nothing upstream can move the ablated directions: W1's output-side gradient along them is zero
    np.testing.assert_allclose(grads["w1"] @ basis.T, 0.0, atol=1e-6)
    plain = jax.grad(lambda p: ids.lm_loss(Toy())(p, batch)[0])(params)
    assert np.abs(plain["w1"] @ basis.T).max() > 1e-3


def test_caft_with_centers_is_mean_ablation():
    params, batch, basis = toy_params(), toy_batch(), orthonormal_rows(1, 2, H)
    mu = jax.random.normal(jax.random.key(5), (H,))
    loss = ids.lm_loss(Toy(), hooks=shaping.caft({"hidden": basis}, centers={"hidden": mu}))
    reference = lambda p: manual_loss(p, batch["tokens"], lambda h: h - ((h - mu) @ basis.T) @ basis)
    (got, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    want, want_grads = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # mean ablation keeps the center's component, zero ablation removes it: the two losses differ
    zero = ids.lm_loss(Toy(), hooks=shaping.caft({"hidden": basis}))(params, batch)[0]
    assert abs(float(zero) - float(got)) > 1e-4
    np.testing.assert_allclose(np.asarray(grads["w1"]) @ np.asarray(basis).T, 0.0, atol=1e-6)


def test_caft_refuses_a_center_without_a_basis_or_with_nan():
    with pytest.raises(ValueError, match="no basis"):
        shaping.caft({"hidden": jnp.eye(H)[:1]}, centers={"logits": jnp.zeros(V)})
    with pytest.raises(ValueError, match="non-finite"):
        shaping.caft({"hidden": jnp.eye(H)[:1]}, centers={"hidden": jnp.full(H, jnp.nan)})


def test_preventative_steering_loss_and_gradients_match_the_steered_reference():
    params, batch = toy_params(), toy_batch()
    v = jax.random.normal(jax.random.key(3), (H,))
    loss = ids.lm_loss(Toy(), hooks=shaping.preventative_steering({"hidden": v}, scale=2.5))
    (got, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    want, want_grads = jax.value_and_grad(lambda p: manual_loss(p, batch["tokens"], lambda h: h + 2.5 * v))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_gradient_routing_gives_zero_upstream_gradient_for_routed_off_rows():
    params, batch = toy_params(), toy_batch(b=3)
    keep = jnp.array([1.0, 0.0, 1.0])  # row 1 must not update anything upstream of "hidden"
    batch = {**batch, "keep": keep}
    loss = ids.lm_loss(Toy(), hooks=shaping.gradient_routing(lambda b: {"hidden": b["keep"][:, None, None]}))
    (got, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    plain_loss, plain = jax.value_and_grad(lambda p: manual_loss(p, batch["tokens"], lambda h: h))(params)
    np.testing.assert_allclose(got, plain_loss, rtol=1e-6)  # the forward value is unchanged

    # manual: upstream parameters see only rows 0 and 2 (still divided by the full token count)
    def kept_rows_loss(p):
        tokens = batch["tokens"]
        x, targets = tokens[:, :-1], tokens[:, 1:]
        logp = jax.nn.log_softmax(jnp.tanh(p["embed"][x] @ p["w1"]) @ p["w2"])
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return (nll * keep[:, None]).sum() / nll.size

    kept = jax.grad(kept_rows_loss)(params)
    np.testing.assert_allclose(grads["w1"], kept["w1"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["embed"], kept["embed"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["w2"], plain["w2"], rtol=1e-4, atol=1e-6)  # downstream: every row
    only_row_1 = set(np.asarray(batch["tokens"][1, :-1]).tolist()) - set(np.asarray(batch["tokens"][[0, 2], :-1]).ravel().tolist())
    for token in only_row_1:  # embedding rows used only by the routed-off example get exactly zero
        np.testing.assert_array_equal(grads["embed"][token], 0.0)


def test_combine_keeps_order_and_matches_the_composed_reference():
    params, batch, basis = toy_params(), toy_batch(), orthonormal_rows(1, 1, H)
    v = jax.random.normal(jax.random.key(4), (H,))
    steer_then_ablate = shaping.combine(shaping.preventative_steering({"hidden": v}), shaping.caft({"hidden": basis}))
    ablate_then_steer = shaping.combine(shaping.caft({"hidden": basis}), shaping.preventative_steering({"hidden": v}))
    ablate = lambda h: h - (h @ basis.T) @ basis
    for th, fn in ((steer_then_ablate, lambda h: ablate(h + v)), (ablate_then_steer, lambda h: ablate(h) + v)):
        got = ids.lm_loss(Toy(), hooks=th)(params, batch)[0]
        np.testing.assert_allclose(got, manual_loss(params, batch["tokens"], fn), rtol=1e-5)
    assert [type(i).__name__ for i in steer_then_ablate.resolve(batch)["hidden"]] == ["Add", "Ablate"]


# --- on in training, off at inference, on the reference transformer ------------------------------

def test_caft_during_training_only_on_the_reference_transformer():
    apply, params = build(ONE_BLOCK)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 37, dtype=jnp.int32)
    basis = orthonormal_rows(2, 3, ONE_BLOCK.d_model)
    th = shaping.caft({"blocks.0.resid_post": basis})
    # the training forward pass: the ablated directions carry nothing at the site
    _, cap = apply(params, tokens, hooks=merge_hooks(th.resolve({"tokens": tokens}), {"blocks.0.resid_post": Capture()}))
    np.testing.assert_allclose(cap["blocks.0.resid_post"] @ basis.T, 0.0, atol=1e-5)
    # and the gradient reaching the MLP's output projection has no component along them
    step = ids.make_train_step(ids.lm_loss(apply, hooks=th), optax.sgd(0.5))
    state = ids.init_train_state(params, optax.sgd(0.5))
    new, metrics = step(state, {"tokens": tokens})
    delta = new.params["blocks"][0]["mlp"]["down"]["kernel"] - params["blocks"][0]["mlp"]["down"]["kernel"]
    assert np.abs(delta).max() > 1e-4
    np.testing.assert_allclose(delta @ basis.T, 0.0, atol=1e-6)
    # inference is untouched: the same parameters run without any ablation
    _, cap_inf = apply(new.params, tokens, hooks=ids.capture("blocks.0.resid_post"))
    assert np.abs(cap_inf["blocks.0.resid_post"] @ basis.T).max() > 1e-2
    plain_loss = ids.lm_loss(apply)(new.params, {"tokens": tokens})[0]
    assert float(abs(plain_loss - ids.lm_loss(apply, hooks=th)(new.params, {"tokens": tokens})[0])) > 1e-5


def test_training_hooks_are_refused_by_apply_generate_and_collect_activations():
    apply, params = build(ONE_BLOCK)
    tokens = jnp.ones((2, 4), jnp.int32)
    th = shaping.preventative_steering({"blocks.0.resid_post": jnp.ones(ONE_BLOCK.d_model)})
    for call in (lambda: apply(params, tokens, hooks=th),
                 lambda: apply(params, tokens, hooks={"blocks.0.resid_post": th}),
                 lambda: jax.jit(lambda p: apply(p, tokens, hooks=th))(params),
                 lambda: ids.generate(apply, params, tokens, max_new_tokens=2, hooks=th,
                                      sampling=ids.SamplingConfig(temperature=0.0)),
                 lambda: ids.collect_activations(apply, params, {"tokens": tokens}, ["blocks.0.resid_post"],
                                                 batch_size=2, hooks=th, progress=False)):
        with pytest.raises(TypeError, match="training-only.*lm_loss"):
            call()
    with pytest.warns(UserWarning, match="training-only"):
        ids.train.make_eval_step(ids.lm_loss(apply, hooks=th))


def test_training_hooks_go_through_jit_and_batch_dependent_parts_see_each_batch():
    params = toy_params()
    th = shaping.gradient_routing(lambda b: {"hidden": b["keep"][:, None, None]})
    step = ids.make_train_step(ids.lm_loss(Toy(), hooks=th), optax.sgd(1.0))
    state = ids.init_train_state(params, optax.sgd(1.0))
    batch = toy_batch(b=2)
    off, _ = step(state, {**batch, "keep": jnp.zeros(2)})
    on, _ = step(state, {**batch, "keep": jnp.ones(2)})
    np.testing.assert_array_equal(off.params["w1"], params["w1"])     # routed off: upstream frozen
    assert np.abs(on.params["w1"] - params["w1"]).max() > 1e-4
    # a batch -> TrainingHooks function is resolved by the loss too
    per_batch = ids.lm_loss(Toy(), hooks=lambda b: shaping.preventative_steering({"hidden": b["v"]}))
    v = jnp.arange(H, dtype=jnp.float32)
    np.testing.assert_allclose(per_batch(params, {**batch, "v": v})[0],
                               manual_loss(params, batch["tokens"], lambda h: h + v), rtol=1e-5)
    leaves, treedef = jax.tree_util.tree_flatten(shaping.caft({"hidden": orthonormal_rows(0, 1, H)}))
    assert len(leaves) == 1 and isinstance(jax.tree_util.tree_unflatten(treedef, leaves), shaping.TrainingHooks)


# --- bad input -----------------------------------------------------------------------------------

def test_non_orthonormal_basis_is_orthonormalised_with_a_warning():
    rows = jnp.array([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    with pytest.warns(UserWarning, match="orthonormal.*rank 2"):
        th = shaping.caft({"hidden": rows})
    basis = th.resolve({})["hidden"][0].basis
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-6)
    ortho = orthonormal_rows(5, 2, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shaping.caft({"hidden": ortho, "logits": ids.subspaces.Subspace(orthonormal_rows(6, 1, V))})


def test_bad_inputs_raise_clear_errors():
    params, batch = toy_params(), toy_batch()
    with pytest.raises(ValueError, match="non-finite"):
        shaping.caft({"hidden": jnp.array([[jnp.nan] * H])})
    with pytest.raises(ValueError, match="non-finite"):
        shaping.preventative_steering({"hidden": jnp.full(H, jnp.inf)})
    with pytest.raises(ValueError, match="non-finite"):
        shaping.preventative_steering({"hidden": jnp.ones(H)}, scale=float("nan"))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        shaping.caft({"hidden": jnp.ones((2, 2, 2))})
    with pytest.raises(TypeError, match="function batch"):
        shaping.gradient_routing({"hidden": jnp.ones(H)})
    with pytest.raises(TypeError, match="TrainingHooks"):
        shaping.combine({"hidden": ids.Capture()})
    # unknown sites and mismatched widths surface when the training loss is traced, naming the site
    with pytest.raises(KeyError, match="unknown site 'hiden'.*hidden"):
        ids.lm_loss(Toy(), hooks=shaping.caft({"hiden": orthonormal_rows(0, 1, H)}))(params, batch)
    with pytest.raises(ValueError, match=r"site 'hidden': basis has shape \(1, 4\); expected \[k, 6\].*\(3, 3, 6\)"):
        ids.lm_loss(Toy(), hooks=shaping.caft({"hidden": orthonormal_rows(0, 1, 4)}))(params, batch)
    with pytest.raises(ValueError, match=r"site 'hidden'.*shape \(4,\).*\(3, 3, 6\)"):
        ids.lm_loss(Toy(), hooks=shaping.preventative_steering({"hidden": jnp.ones(4)}))(params, batch)
    with pytest.raises(ValueError, match=r"Route at site 'hidden'.*\(3, 3, 6\)"):
        ids.lm_loss(Toy(), hooks=shaping.gradient_routing(lambda b: {"hidden": jnp.ones((5, 1, 1))}))(params, batch)
