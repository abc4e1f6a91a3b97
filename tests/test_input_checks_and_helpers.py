"""ids.Apply and the measured-leak checks verify_frozen / verify_projected."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids


def test_apply_matches_manual_hook_in_model():
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    tokens = jnp.array([[1, 2, 3]], jnp.int32)
    zeroed, _ = apply(params, tokens, hooks={'blocks.0.mlp_out': ids.Apply(lambda h: 0.0 * h)})
    ablated, _ = apply(params, tokens, hooks={'blocks.0.mlp_out': ids.Replace(jnp.zeros(8))})
    np.testing.assert_allclose(zeroed, ablated, atol=1e-6)
    seen = []
    ids.Apply(lambda site, h: (seen.append(site), h)[1], with_site=True).apply('s', jnp.ones(2))
    assert seen == ['s']


def test_apply_bad_input():
    with pytest.raises(TypeError, match="fn must be a callable"):
        ids.Apply(3.0)
    with pytest.raises(ValueError, match=r"fn returned shape \(2,\).*\(1, 2\)"):
        ids.Apply(lambda h: h[0]).apply('x', jnp.ones((1, 2)))


def test_verify_frozen_zero_after_frozen_training_and_exact_otherwise():
    params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    mask = {'w': np.array([[True, False]] * 3), 'b': np.array([False, True])}
    opt = ids.optim.frozen(optax.adam(0.1), freeze_mask=mask)
    state, p = opt.init(params), params
    for _ in range(3):
        g = jax.tree_util.tree_map(jnp.ones_like, p)
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    leak = ids.optim.verify_frozen(params, p, mask)
    assert leak.max_abs == 0.0 and leak.norm == 0.0
    moved = {'w': params['w'].at[1, 0].add(0.25), 'b': params['b'] + 1.0}
    leak = ids.optim.verify_frozen(params, moved, mask)
    assert leak.by_path == {'b': 1.0, 'w': 0.25}
    np.testing.assert_allclose(leak.norm, np.sqrt(0.25 ** 2 + 1.0))


def test_verify_projected_exact_on_tiny_case():
    s = {'w': ids.subspaces.Subspace(jnp.eye(2)[:1])}
    before = {'w': jnp.zeros((2, 2))}
    after = {'w': jnp.array([[0.0, 3.0], [4.0, 0.0]])}
    leak = ids.optim.verify_projected(before, after, s)
    assert leak.max_abs == 3.0
    np.testing.assert_allclose(leak.relative, 3.0 / 5.0)
    projected = ids.optim.apply_projection(after['w'], s['w'])
    assert ids.optim.verify_projected(before, {'w': projected}, s).max_abs == 0.0


def test_verify_bad_input_names_the_leaf():
    with pytest.raises(ValueError, match=r"leaf w has shape \(2,\) before and \(3,\)"):
        ids.optim.verify_frozen({'w': jnp.zeros(2)}, {'w': jnp.zeros(3)}, {'w': np.zeros(2, bool)})
    with pytest.raises(ValueError, match="same tree structure"):
        ids.optim.verify_projected({'w': jnp.zeros(2)}, {'v': jnp.zeros(2)}, {'w': None})


def _tiny():
    return ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2))


def test_token_range_checked_and_lists_accepted():
    apply, params = _tiny()
    a, _ = apply(params, [[1, 2, 3]])
    b, _ = apply(params, jnp.array([[1, 2, 3]], jnp.int32))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"id 11 at \[0, 2\] is outside the vocabulary \[0, 11\)"):
        apply(params, jnp.array([[1, 2, 11]]))
    with pytest.raises(ValueError, match=r"id -1 at \[0, 0\]"):
        apply(params, jnp.array([[-1, 2, 3]]))
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]; got shape \(3,\)"):
        apply(params, jnp.array([1, 2, 3]))


def test_padding_slot_garbage_cannot_reach_valid_positions():
    apply, params = _tiny()
    valid = jnp.array([[True, True, False, False]])
    clean, _ = apply(params, jnp.array([[1, 2, 0, 0]]), valid=valid)
    # an out-of-range id in a pad slot is allowed (not checked) and gives a NaN embedding there
    dirty, _ = apply(params, jnp.array([[1, 2, 99, -5]]), valid=valid)
    np.testing.assert_allclose(dirty[:, :2], clean[:, :2], atol=1e-6)
    # NaN / inf written into the padded slots' embeddings by a hook
    poison = ids.Apply(lambda h: jnp.where(valid[..., None], h, jnp.array([jnp.nan, jnp.inf])[jnp.arange(8) % 2]))
    hooked, _ = apply(params, jnp.array([[1, 2, 0, 0]]), valid=valid, hooks={'embed': poison})
    np.testing.assert_allclose(hooked[:, :2], clean[:, :2], atol=1e-6)


def test_checkify_tokens_inside_jit():
    from jax.experimental import checkify
    f = checkify.checkify(jax.jit(lambda t: ids.models.checkify_tokens(t, 11)))
    err, _ = f(jnp.array([[1, 2]]))
    assert err.get() is None
    err, _ = f(jnp.array([[1, 12]]))
    assert 'max 12' in err.get()


def test_from_directions_catches_transposed_basis():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 2)))[0].T  # [2, 8]
    assert ids.subspaces.from_directions(basis).rank == 2
    with pytest.raises(ValueError, match=r"transposed \[d, n\] basis; pass vectors.T"):
        ids.subspaces.from_directions(basis.T)
    with pytest.raises(ValueError, match=r"shape \(8, 2\) but dim=8.*pass vectors.T"):
        ids.subspaces.from_directions(basis.T, dim=8)
    assert ids.subspaces.from_directions(np.eye(3)[[0, 1, 2, 0]], dim=3).rank == 3


@pytest.mark.parametrize('site', ['blocks.0.resid_post', 'blocks.1.attn.v', 'blocks.0.mlp.hidden'])
def test_nan_written_at_a_later_site_in_padding_cannot_reach_valid_positions(site):
    # 0 * NaN is NaN: an attention weight of 0 on a pad slot is not enough, its value must be masked.
    apply, params = _tiny()
    tokens = jnp.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]], jnp.int32)
    valid = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    clean, _ = apply(params, tokens, valid=valid)
    poison = ids.Apply(lambda h: jnp.where(valid.reshape(2, 5, *([1] * (h.ndim - 2))), h, jnp.nan))
    dirty, captured = apply(params, tokens, valid=valid, hooks={site: (poison, ids.Capture())})
    np.testing.assert_array_equal(np.asarray(dirty)[np.asarray(valid)], np.asarray(clean)[np.asarray(valid)])
    assert np.isnan(np.asarray(captured[site])[0, :2]).all()  # the poison did land in the padding
    # the same through the KV cache (prefill, then one decoded token reading the poisoned slots)
    cache = apply.init_cache(2, 6)
    _, _, cache = apply.forward(params, tokens, valid=valid, cache=cache, hooks={site: poison})
    step, _, _ = apply.forward(params, jnp.array([[6], [6]]), cache=cache)
    assert np.isfinite(np.asarray(step)).all()
    # and the loss value (masked positions may hold NaN logits)
    loss, _ = ids.lm_loss(apply, hooks={site: ids.Apply(
        lambda h: jnp.where(valid[:, :-1].reshape(2, 4, *([1] * (h.ndim - 2))), h, jnp.nan))})(
        params, {'tokens': tokens, 'valid': valid})
    assert np.isfinite(float(loss))


def test_nan_written_in_padding_by_a_hook_leaves_every_gradient_finite_and_unchanged():
    # the forward pass was already clean; the backward multiplied a zero cotangent by the NaN input of each dense
    # layer (dW = Σ x ⊗ g) and of the attention scores. Hooks now leave pad positions as they were.
    apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2,
                                                               max_len=8))
    batch = {'tokens': jnp.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]], jnp.int32),
             'valid': jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)}
    real = batch['valid'][:, :-1]  # lm_loss feeds tokens[:, :-1]
    clean = jax.grad(lambda p: ids.lm_loss(apply)(p, batch)[0])(params)
    poisons = {'blocks.0.resid_post': lambda h: jnp.where(real[..., None], h, jnp.nan),
               'blocks.0.mlp.hidden': lambda h: jnp.where(real[..., None], h, jnp.nan),
               'blocks.1.attn.pattern': lambda h: jnp.where(real[:, None, :, None], h, jnp.nan)}
    grads = jax.grad(lambda p: ids.lm_loss(apply, hooks={s: ids.Apply(f) for s, f in poisons.items()})(p, batch)[0])(
        params)
    for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(clean)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(c), rtol=1e-5, atol=1e-7, err_msg=ids.tree.path_str(path))
