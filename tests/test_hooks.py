import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import idesign as ids
from tests.conftest import build, random_tokens


def _orthonormal_rows(key, k, d):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, k)))
    return q.T


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5))
def test_ablate_is_an_orthogonal_projection(seed, k):
    d = 6
    basis = _orthonormal_rows(jax.random.key(seed), k, d)
    h = jax.random.normal(jax.random.key(seed + 1), (3, d))
    once = ids.Ablate(basis).apply("x", h)
    np.testing.assert_allclose(ids.Ablate(basis).apply("x", once), once, atol=1e-5)  # idempotent
    np.testing.assert_allclose(once @ basis.T, 0.0, atol=1e-5)                        # removes the subspace
    np.testing.assert_allclose(((h - once) * once).sum(-1), 0.0, atol=1e-4)          # orthogonal split
    explicit = np.eye(d) - np.asarray(basis).T @ np.asarray(basis)                    # explicit projector
    np.testing.assert_allclose(once, np.asarray(h) @ explicit, atol=1e-5)


def test_route_keeps_values_and_routes_gradients():
    h = jnp.arange(4.0)
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    f = lambda x: (ids.Route(mask).apply("x", x) ** 2).sum()
    assert f(h) == (h ** 2).sum()
    np.testing.assert_allclose(jax.grad(f)(h), 2 * h * mask)


def test_add_at_a_site_equals_replacing_the_next_site_with_the_shifted_value(tiny_config):
    apply, params = build(tiny_config)
    toks = random_tokens(0, (2, 5))
    v = jax.random.normal(jax.random.key(1), (tiny_config.d_model,))
    steered, _ = apply(params, toks, hooks={"blocks.0.resid_post": ids.Add(v, 3.0)})
    _, cap = apply(params, toks, hooks=ids.capture("blocks.0.resid_post"))
    patched, _ = apply(params, toks, hooks={"blocks.1.resid_pre": ids.Replace(cap["blocks.0.resid_post"] + 3.0 * v)})
    np.testing.assert_allclose(steered, patched, atol=1e-5)
    assert not np.allclose(steered, apply(params, toks)[0], atol=1e-3)


def test_replace_with_a_mask_patches_only_masked_positions(tiny_config):
    apply, params = build(tiny_config)
    toks = random_tokens(2, (1, 6))
    source = jnp.full((1, 6, tiny_config.d_model), 0.5)
    mask = (jnp.arange(6) == 4)[None, :, None]
    _, cap = apply(params, toks, hooks={"blocks.1.resid_pre": (ids.Replace(source, mask), ids.Capture())})
    got, clean = cap["blocks.1.resid_pre"], apply(params, toks, hooks=ids.capture("blocks.1.resid_pre"))[1]["blocks.1.resid_pre"]
    np.testing.assert_allclose(got[:, 4], 0.5)
    np.testing.assert_allclose(got[:, :4], clean[:, :4], atol=1e-6)


def test_ablating_one_head_through_z_equals_dropping_its_head_output(tiny_config):
    apply, params = build(tiny_config)
    toks = random_tokens(3, (2, 5))
    H, Dh = tiny_config.n_heads, tiny_config.head_dim
    head_mask = (jnp.arange(H) != 2)[:, None]
    via_z, _ = apply(params, toks, hooks={"blocks.0.attn.z": ids.Replace(jnp.zeros((H, Dh)), ~head_mask)})
    via_head_out, _ = apply(params, toks, hooks={"blocks.0.attn.head_out": ids.Replace(jnp.zeros((H, tiny_config.d_model)), ~head_mask)})
    np.testing.assert_allclose(via_z, via_head_out, atol=1e-5)


def test_route_on_the_residual_stops_gradient_to_earlier_blocks(tiny_config):
    apply, params = build(tiny_config)
    toks = random_tokens(4, (2, 5))

    def loss(p, m):
        return apply(p, toks, hooks={"blocks.1.resid_pre": ids.Route(m)})[0].sum()

    g_closed = jax.grad(loss)(params, jnp.zeros(()))
    g_open = jax.grad(loss)(params, jnp.ones(()))
    assert float(jnp.abs(g_closed["blocks"][0]["mlp"]["up"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(g_open["blocks"][0]["mlp"]["up"]["kernel"]).max()) > 0.0
    np.testing.assert_allclose(g_closed["blocks"][1]["mlp"]["up"]["kernel"], g_open["blocks"][1]["mlp"]["up"]["kernel"], atol=1e-6)


def test_changing_intervention_arrays_does_not_recompile(tiny_config):
    apply, params = ids.init_transformer(tiny_config)
    traces = []

    @jax.jit
    def run(params, toks, hooks):
        traces.append(1)
        return apply(params, toks, hooks=hooks)[0]

    toks = random_tokens(5, (1, 4))
    for seed in range(3):
        direction = jax.random.normal(jax.random.key(seed), (tiny_config.d_model,))
        basis = _orthonormal_rows(jax.random.key(seed + 10), 2, tiny_config.d_model)
        run(params, toks, {"blocks.0.resid_post": ids.Add(direction, float(seed)),
                           "blocks.1.mlp_out": ids.Ablate(basis)})
    assert len(traces) == 1
    run(params, toks, {"blocks.0.resid_post": ids.Ablate(basis)})  # a different kind does recompile
    assert len(traces) == 2


def test_glob_patterns_expand_to_every_matching_site(tiny_config):
    apply, params = build(tiny_config)
    _, cap = apply(params, random_tokens(6, (1, 3)), hooks={"blocks.*.resid_post": ids.Capture()})
    assert sorted(cap) == ["blocks.0.resid_post", "blocks.1.resid_post"]


def test_chains_apply_in_order_and_capture_sees_the_value_at_its_position(tiny_config):
    apply, params = build(tiny_config)
    v = jnp.ones(tiny_config.d_model)
    _, before = apply(params, random_tokens(7, (1, 3)), hooks={"embed": (ids.Capture(), ids.Add(v))})
    _, after = apply(params, random_tokens(7, (1, 3)), hooks={"embed": (ids.Add(v), ids.Capture())})
    np.testing.assert_allclose(after["embed"] - before["embed"], 1.0, atol=1e-6)


def test_unknown_site_suggests_close_names(tiny_config):
    apply, params = build(tiny_config)
    with pytest.raises(KeyError, match=r"unknown site 'blocks.0.resid_pots'.*Did you mean.*blocks.0.resid_post"):
        apply(params, random_tokens(0, (1, 3)), hooks={"blocks.0.resid_pots": ids.Capture()})


@pytest.mark.parametrize("hook, match", [
    (ids.Add(jnp.ones(5)), r"Add at site 'blocks.0.resid_post': direction has shape \(5,\).*\(1, 3, 32\)"),
    (ids.Ablate(jnp.eye(5)[:2]), r"Ablate at site 'blocks.0.resid_post': basis has shape \(2, 5\); expected \[k, 32\]"),
    (ids.Route(jnp.ones((4, 1, 1))), r"Route at site 'blocks.0.resid_post': mask has shape \(4, 1, 1\)"),
])
def test_interventions_that_do_not_fit_the_site_are_explained(tiny_config, hook, match):
    apply, params = build(tiny_config)
    with pytest.raises(ValueError, match=match):
        apply(params, random_tokens(0, (1, 3)), hooks={"blocks.0.resid_post": hook})


def test_hooks_must_be_interventions():
    with pytest.raises(TypeError, match=r"hooks\['x'\] holds ndarray"):
        ids.merge_hooks({"x": np.ones(3)})
    with pytest.raises(ValueError, match="more than one Capture"):
        ids.merge_hooks({"x": (ids.Capture(), ids.Capture())})


def test_ablate_checks_its_basis_as_subspace_does():
    with pytest.raises(ValueError, match=r"Ablate: basis rows are not orthonormal .*‖B Bᵀ - I‖₂ = 9"):
        ids.Ablate(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Ablate: basis must be 2-D"):
        ids.Ablate(jnp.ones(5))
    # a deviation of 2e-6 could leave 2e-6 of an update inside the span: refused; rounding-level error passes
    with pytest.raises(ValueError, match="not orthonormal"):
        ids.Ablate(np.array([[np.sqrt(1 + 2e-6), 0.0]]))
    ids.Ablate(np.array([[np.sqrt(1 + 5e-7), 0.0]]))
    # rebuilt by JAX with tracers or placeholders: no check at unflatten
    jax.tree_util.tree_map(lambda _: object(), ids.Ablate(jnp.eye(3)[:1]))
