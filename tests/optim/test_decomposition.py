"""Gradient decomposition onto concepts: explicit reference on tiny matrices, properties, the observer's
bit-identical pass-through, the training callback and plot, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idesign as ids
from tests.conftest import build

ONE_BLOCK = ids.TransformerConfig(vocab_size=37, d_model=32, n_layers=1, n_heads=4, max_len=64)  # as in test_projection


def reference_coefficients(update, weight, directions, side):
    """The documented definition, written out in float64 numpy."""
    u, w, c = (np.asarray(x, np.float64) for x in (update, weight, directions))
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    out = []
    for ci in c:
        a, wc = (ci @ u, ci @ w) if side == "input" else (u @ ci, w @ ci)
        change = np.sum((wc + a) ** 2) - np.sum(wc ** 2)
        out.append(np.sign(change) * np.sum(a ** 2) / np.sum(u ** 2))
    return np.array(out)


@pytest.mark.parametrize("side", ["input", "output"])
def test_matches_the_written_out_definition(side):
    rng = np.random.default_rng(0)
    W, dW = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    k_dim = 4 if side == "input" else 3
    directions = rng.normal(size=(2, k_dim)).astype(np.float32) * 3  # not unit, not orthogonal
    params = {"w": jnp.asarray(W), "b": jnp.zeros(3)}
    c = ids.optim.concepts_for(params, {"w": (["p", "q"], directions)}, side=side)
    got = ids.optim.decompose_update({"w": jnp.asarray(dW), "b": jnp.ones(3)}, c, params)
    np.testing.assert_allclose(got["w"], reference_coefficients(dW, W, directions, side), rtol=1e-5)
    # without params the sign comes from the weights the concepts were built on (the same here)
    np.testing.assert_allclose(ids.optim.decompose_update({"w": jnp.asarray(dW), "b": jnp.ones(3)}, c)["w"],
                               got["w"], rtol=1e-6)


def test_sign_reads_reinforce_versus_suppress():
    W = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    c = ids.optim.concepts_for(W, {"w": (["x"], jnp.array([[1.0, 0.0]]))})
    grow, shrink = {"w": jnp.array([[0.1, 0.0], [0.0, 0.0]])}, {"w": jnp.array([[-0.1, 0.0], [0.0, 0.0]])}
    assert float(ids.optim.decompose_update(grow, c, W)["w"][0]) == pytest.approx(1.0)
    assert float(ids.optim.decompose_update(shrink, c, W)["w"][0]) == pytest.approx(-1.0)
    # overshooting through zero gain is still "grow" when the new gain is larger (exact, not first order)
    assert float(ids.optim.decompose_update({"w": jnp.array([[-5.0, 0.0], [0.0, 0.0]])}, c, W)["w"][0]) > 0
    # a layer with no response yet is reinforced by any step along the concept; a zero update scores 0
    zero = {"w": jnp.zeros((2, 2))}
    c0 = ids.optim.concepts_for(zero, {"w": (["x"], jnp.array([[1.0, 0.0]]))})
    assert float(ids.optim.decompose_update(shrink, c0, zero)["w"][0]) == pytest.approx(1.0)
    assert float(ids.optim.decompose_update(zero, c0, zero)["w"][0]) == 0.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), side=st.sampled_from(["input", "output"]))
def test_fractions_over_a_complete_orthonormal_basis_sum_to_one(seed, side):
    rng = np.random.default_rng(seed)
    W, dW = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    d = 5 if side == "input" else 3
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    params = {"w": jnp.asarray(W, jnp.float32)}
    c = ids.optim.concepts_for(params, {"w": basis.T.astype(np.float32)}, side=side)
    got = np.asarray(ids.optim.decompose_update({"w": jnp.asarray(dW, jnp.float32)}, c, params)["w"])
    np.testing.assert_allclose(np.abs(got).sum(), 1.0, rtol=1e-4)
    assert np.all(np.abs(got) <= 1 + 1e-6)


def test_tied_unembedding_is_decomposed_in_its_transposed_layout():
    apply, params = build(ONE_BLOCK)
    d = jax.random.normal(jax.random.key(1), (2, ONE_BLOCK.d_model))
    c = ids.optim.concepts_for(params, {"unembed": d}, dense_layers=apply.dense_layers)
    assert list(c.names) == ["embed.embedding"]
    rng = np.random.default_rng(2)
    delta = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    got = ids.optim.decompose_update(delta, c, params)["embed.embedding"]
    want = reference_coefficients(delta["embed"]["embedding"].T, params["embed"]["embedding"].T, d, "input")
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_observer_passes_updates_through_bit_identically_and_stores_the_decomposition():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    c = ids.optim.concepts_for(params, {"w": (["p", "q"], rng.normal(size=(2, 4)).astype(np.float32))})
    plain = optax.adamw(0.1, weight_decay=0.3)
    chained = optax.chain(optax.adamw(0.1, weight_decay=0.3), ids.optim.observe_concepts(c))
    wrapped = ids.optim.observed(optax.adamw(0.1, weight_decay=0.3), c)
    states = [t.init(params) for t in (plain, chained, wrapped)]
    p = params
    for i in range(3):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)
        outs = [jax.jit(t.update)(g, s, p) for t, s in zip((plain, chained, wrapped), states)]
        states = [s for _, s in outs]
        for _, (u, _) in zip(range(2), outs[1:]):
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u, outs[0][0])
        obs = states[1][1]
        np.testing.assert_allclose(obs.coefficients["w"], reference_coefficients(outs[0][0]["w"], p["w"], c.directions["w"],
                                                                                 "input"), rtol=1e-5)
        np.testing.assert_allclose(obs.gain["w"], np.linalg.norm(np.asarray(c.directions["w"]) @ np.asarray(p["w"]), axis=1),
                                   rtol=1e-5)
        np.testing.assert_array_equal(states[2].observation.coefficients["w"], obs.coefficients["w"])
        assert int(obs.count) == i + 1
        p = optax.apply_updates(p, outs[0][0])


def test_concept_log_with_train_records_every_step_and_plots():
    apply, params = build(ONE_BLOCK)
    rng = np.random.default_rng(0)
    spec = {"blocks.0.mlp.up": (["a", "b"], rng.normal(size=(2, 32)).astype(np.float32)),
            "blocks.0.attn.o_proj": rng.normal(size=(1, 32)).astype(np.float32)}
    c = ids.optim.concepts_for(params, spec, dense_layers=apply.dense_layers)
    opt = optax.chain(optax.sgd(0.3), ids.optim.observe_concepts(c))
    step = ids.make_train_step(ids.lm_loss(apply), opt, donate=True)
    tokens = rng.integers(0, 37, size=(16, 8)).astype(np.int32)
    data = ids.train.iterate_batches({"tokens": tokens}, 4)
    state0 = ids.init_train_state(jax.tree_util.tree_map(jnp.copy, params), opt)  # donated below
    log = ids.optim.ConceptLog()
    state, _ = ids.train.train(state0, step, data, num_steps=5, progress=False, callbacks=[log])
    assert log.steps.tolist() == [1, 2, 3, 4, 5]
    # step 1's record is the decomposition of the first step (the same compiled step, run again by hand)
    first, _ = step(ids.init_train_state(jax.tree_util.tree_map(jnp.copy, params), opt),
                    next(ids.train.iterate_batches({"tokens": tokens}, 4)))
    want = ids.optim.find_observations(first.opt_state)[0].coefficients
    for path in want:
        np.testing.assert_array_equal(log.coefficients[path][0], want[path])
    assert not np.array_equal(log.coefficients["blocks.0.mlp.up.kernel"][1], want["blocks.0.mlp.up.kernel"])
    coefs = log.coefficients
    assert set(coefs) == {"blocks.0.mlp.up.kernel", "blocks.0.attn.o_proj.kernel"}
    assert coefs["blocks.0.mlp.up.kernel"].shape == (5, 2) and coefs["blocks.0.attn.o_proj.kernel"].shape == (5, 1)
    assert np.all(np.abs(coefs["blocks.0.mlp.up.kernel"]) <= 1) and np.any(coefs["blocks.0.mlp.up.kernel"] != 0)
    assert log.gain["blocks.0.mlp.up.kernel"].shape == (5, 2)
    flat = log.as_dict()
    assert flat["step"] == [1, 2, 3, 4, 5] and len(flat["blocks.0.mlp.up.kernel/a"]) == 5
    assert "blocks.0.attn.o_proj.kernel/c0" in flat
    fig = ids.optim.plot_concept_log(log, cumulative=True, smooth=2)
    assert len(fig.axes) == 2
    assert len(ids.optim.plot_concept_log(log, paths=["blocks.0.mlp.up.kernel"], what="gain").axes) == 1
    sparse = ids.optim.ConceptLog(every=2)
    for i in range(1, 5):
        sparse(i, state)
    assert sparse.steps.tolist() == [2, 4]


def test_bad_inputs_raise_clear_errors():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"w: directions have shape \(1, 3\).*kernel has shape \(4, 3\).*\[k, 4\]"):
        ids.optim.concepts_for(params, {"w": jnp.ones((1, 3))})
    with pytest.raises(KeyError, match="unknown parameter path or dense layer 'v'"):
        ids.optim.concepts_for(params, {"v": jnp.ones((1, 4))})
    with pytest.raises(ValueError, match="NaN or inf"):
        ids.optim.concepts_for(params, {"w": jnp.array([[1.0, jnp.nan, 0.0, 0.0]])})
    with pytest.raises(ValueError, match=r"\['z'\] for w are zero"):
        ids.optim.concepts_for(params, {"w": (["y", "z"], jnp.array([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]))})
    with pytest.raises(ValueError, match="2 names"):
        ids.optim.concepts_for(params, {"w": (["y", "z"], jnp.ones((3, 4)))})
    with pytest.raises(ValueError, match="dense kernels"):
        ids.optim.concepts_for(params, {"b": jnp.ones((1, 3))})
    with pytest.raises(ValueError, match="side must be"):
        ids.optim.concepts_for(params, {"w": jnp.ones((1, 4))}, side="flat")
    bare = ids.optim.Concepts({"w": ("y",)}, {"w": jnp.ones((1, 4))})
    with pytest.raises(ValueError, match="pass params="):
        ids.optim.decompose_update(params, bare)
    with pytest.raises(ValueError, match=r"\[k, 4\]"):
        ids.optim.observe_concepts(ids.optim.Concepts({"w": ("y",)}, {"w": jnp.ones((1, 3))})).init(params)
    with pytest.raises(ValueError, match="no ObserveConceptsState"):
        ids.optim.ConceptLog().record(1, optax.sgd(0.1).init(params))
