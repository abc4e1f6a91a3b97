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
