import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids
from tests.conftest import build


def test_masked_loss_equals_a_manual_cross_entropy(tiny_config):
    apply, params = build(tiny_config)
    toks = jax.random.randint(jax.random.key(0), (2, 6), 0, 37)
    mask = jnp.array([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]], jnp.float32)
    loss, aux = ids.lm_loss(apply)(params, {"tokens": toks, "loss_mask": mask})
    logp = jax.nn.log_softmax(apply(params, toks[:, :-1])[0])
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(toks[:, 1:])[..., None], -1)[..., 0]
    w = np.asarray(mask[:, 1:])
    assert float(loss) == pytest.approx(float((nll * w).sum() / w.sum()), rel=1e-5)
    assert float(aux["tokens"]) == w.sum()


def test_training_learns_a_repeated_sequence(tiny_config):
    apply, params = ids.init_transformer(tiny_config)
    opt = optax.adamw(3e-3)
    step = ids.make_train_step(ids.lm_loss(apply), opt)
    data = ids.train.iterate_batches({"tokens": np.tile(np.arange(12, dtype=np.int32), (16, 1))}, 8)
    state, log = ids.train.train(ids.init_train_state(params, opt), step, data, num_steps=60, log_every=20, progress=False)
    assert log.history[-1]["loss"] < 0.5 * log.history[0]["loss"]
    assert int(state.step) == 60


def test_extra_args_reach_the_optimizer(tiny_config):
    apply, params = build(tiny_config)
    seen = []

    def update(updates, state, params=None, *, scale):
        seen.append(scale)
        return jax.tree_util.tree_map(lambda g: -scale * g, updates), state

    opt = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    batch = {"tokens": jnp.ones((2, 4), jnp.int32)}
    state, _ = ids.make_train_step(ids.lm_loss(apply), opt, jit=False)(ids.init_train_state(params, opt), batch, scale=0.5)
    assert seen == [0.5]
    plain = optax.sgd(0.1)  # transforms without extra arguments ignore them, as in optax.chain
    ids.make_train_step(ids.lm_loss(apply), plain, jit=False)(ids.init_train_state(params, plain), batch, scale=1.0)


def test_hooks_can_depend_on_the_batch(tiny_config):
    apply, params = build(tiny_config)
    hooks = lambda b: {"blocks.1.resid_pre": ids.Route(b["route"][:, None, None])}
    batch = {"tokens": jnp.ones((2, 4), jnp.int32), "route": jnp.array([0.0, 0.0])}
    grads = jax.grad(lambda p: ids.lm_loss(apply, hooks=hooks)(p, batch)[0])(params)
    assert float(jnp.abs(grads["blocks"][0]["mlp"]["up"]["kernel"]).max()) == 0.0


def test_batches_are_deterministic_and_cover_each_epoch():
    data = {"x": np.arange(10)}
    a = [b["x"].tolist() for b in ids.train.iterate_batches(data, 5, seed=3, epochs=2)]
    b = [b["x"].tolist() for b in ids.train.iterate_batches(data, 5, seed=3, epochs=2)]
    assert a == b and len(a) == 4
    assert sorted(a[0] + a[1]) == list(range(10)) and a[:2] != a[2:]
    with pytest.raises(ValueError, match="different lengths"):
        next(ids.train.iterate_batches({"x": np.zeros(3), "y": np.zeros(4)}, 1))


def test_train_reports_when_batches_run_out(tiny_config):
    apply, params = build(tiny_config)
    opt = optax.sgd(0.1)
    step = ids.make_train_step(ids.lm_loss(apply), opt)
    with pytest.raises(ValueError, match="batches ran out after 1 of 5 steps"):
        ids.train.train(ids.init_train_state(params, opt), step, [{"tokens": jnp.ones((1, 3), jnp.int32)}],
                        num_steps=5, progress=False)


def test_lm_loss_never_counts_padded_targets():
    # Left padding: the loss of a padded row must equal the loss of the unpadded row alone.
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    row = jnp.array([[3, 4, 5, 6]], jnp.int32)
    padded = jnp.array([[0, 0, 3, 4, 5, 6]], jnp.int32)
    valid = jnp.array([[False, False, True, True, True, True]])
    loss_fn = ids.train.lm_loss(apply)
    loss_row, aux_row = loss_fn(params, {"tokens": row})
    loss_pad, aux_pad = loss_fn(params, {"tokens": padded, "valid": valid})
    assert int(aux_pad["tokens"]) == int(aux_row["tokens"]) == 3
    np.testing.assert_allclose(loss_pad, loss_row, rtol=1e-5, atol=1e-6)


def test_bad_batches_raise_clear_errors_before_jax(tiny_config):
    apply, params = build(tiny_config)
    opt = optax.sgd(0.1)
    step = ids.make_train_step(ids.lm_loss(apply), opt)
    state = ids.init_train_state(params, opt)
    toks = np.ones((2, 5), np.int32)
    with pytest.raises(TypeError, match=r"got a bare array of shape \(2, 5\). Wrap it: \{'tokens': x\}"):
        step(state, toks)
    with pytest.raises(KeyError, match=r"no 'tokens' entry; it has keys \['input_ids'\]"):
        step(state, {"input_ids": toks})
    with pytest.raises(ValueError, match=r"\['loss_mask'\]: expected the tokens' shape \(2, 5\).*got shape \(2, 4\)"):
        step(state, {"tokens": toks, "loss_mask": np.ones((2, 4))})
    with pytest.raises(ValueError, match=r"\['valid'\]: expected the tokens' shape"):
        step(state, {"tokens": toks, "valid": np.ones((5,), bool)})
    with pytest.raises(ValueError, match=r"\['tokens'\]: expected integer token ids of shape \[B, T\].*shape \(5,\)"):
        step(state, {"tokens": toks[0]})
    with pytest.raises(ValueError, match=r"dtype float32"):
        step(state, {"tokens": toks.astype(np.float32)})
    eval_step = ids.train.make_eval_step(ids.lm_loss(apply))
    with pytest.raises(TypeError, match="Wrap it"):
        ids.train.evaluate(eval_step, params, [toks])
    with pytest.raises(KeyError, match="LMForward: batch: no 'tokens' entry"):
        ids.curvature.LMForward(apply)(params, {"ids": toks}, None)
    # nested lists are accepted as tokens
    loss, _ = ids.lm_loss(apply)(params, {"tokens": [[1, 2, 3], [4, 5, 6]]})
    assert np.isfinite(float(loss))
    _, metrics = step(state, {"tokens": [[1, 2, 3], [4, 5, 6]]})       # also through the jitted step
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_checked_step_catches_out_of_range_ids_inside_jit(tiny_config):
    apply, params = build(tiny_config)
    opt = optax.sgd(0.1)
    checked = ids.make_train_step(ids.lm_loss(apply), opt, checked=True, donate=True)
    plain = ids.make_train_step(ids.lm_loss(apply), opt)
    fresh = lambda: ids.init_train_state(jax.tree.map(jnp.array, params), opt)  # copies: the step donates
    toks = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    ref, _ = plain(fresh(), {"tokens": toks})
    out, _ = checked(fresh(), {"tokens": toks})
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_array_equal(a, b)   # the checked step computes the same update
    # padding may hold anything: an out-of-range id where valid is False passes
    valid = jnp.array([[True] * 4, [False, True, True, True]])
    checked(fresh(), {"tokens": toks.at[1, 0].set(99), "valid": valid})
    with pytest.raises(ValueError, match=r"step 0: tokens: an id \(min -3, max 40\) is outside the vocabulary \[0, 37\)"):
        checked(fresh(), {"tokens": toks.at[0, 1].set(40).at[1, 2].set(-3)})
    with pytest.raises(ValueError, match="pass vocab_size="):
        ids.make_train_step(lambda p, b: (0.0, {}), opt, checked=True)
