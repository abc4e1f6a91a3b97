"""``ids.optim.layer_stacked``: the inner optimizer on stacked blocks gives the per-layer optimizer's updates,
and per-layer masks wrapped around it hit the right layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import idesign as ids

CFG = ids.TransformerConfig.gpt2_like(vocab_size=17, d_model=8, n_layers=3, n_heads=2, max_len=16)


def _params():
    return ids.init_transformer(CFG, seed=1)[1]


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _run(opt, params, steps=3):
    state = opt.init(params)
    for t in range(steps):
        updates, state = opt.update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_equal(a, b, atol=1e-6):
    named_b = ids.tree.named_leaves(b)
    for path, leaf in ids.tree.named_leaves(a).items():
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(named_b[path]), atol=atol, rtol=0, err_msg=path)


@pytest.mark.parametrize("make", [lambda: optax.adamw(1e-2, weight_decay=0.1), lambda: optax.sgd(0.1, momentum=0.9),
                                  lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))],
                         ids=["adamw", "sgd-momentum", "clip-adam"])
def test_updates_equal_the_per_layer_optimizer_over_several_steps(make):
    params = _params()
    ref, _ = _run(make(), params)
    got, state = _run(ids.optim.layer_stacked(make()), params)
    assert jax.tree.structure(got) == jax.tree.structure(params)  # the params stay per layer
    _assert_equal(got, ref)
    # The state is stacked: one leaf per block parameter, whatever the depth.
    n_per_layer = len(jax.tree.leaves(make().init(params)))
    assert len(jax.tree.leaves(state)) < n_per_layer


def test_a_per_layer_freeze_mask_around_it_hits_the_right_layer_slice():
    params = _params()
    mask = jax.tree.map(lambda _: False, params)
    mask["blocks"][1] = jax.tree.map(lambda _: True, mask["blocks"][1])  # block 1 frozen whole (partitioned out)
    up = np.zeros(params["blocks"][2]["mlp"]["up"]["kernel"].shape, bool)
    up[:, :5] = True  # five neurons of block 2
    mask["blocks"][2]["mlp"]["up"]["kernel"] = up
    mask["blocks"][0]["attn"] = jax.tree.map(lambda _: True, mask["blocks"][0]["attn"])  # block 0's attention
    ref, _ = _run(ids.optim.frozen(optax.adamw(1e-2), freeze_mask=mask), params)
    got, _ = _run(ids.optim.frozen(ids.optim.layer_stacked(optax.adamw(1e-2)), freeze_mask=mask), params)
    _assert_equal(got, ref)
    chained, _ = _run(optax.chain(ids.optim.layer_stacked(optax.adamw(1e-2)), ids.optim.freeze(mask)), params)
    for tree in (got, chained):
        for path, frozen in ids.tree.named_leaves(mask).items():
            before, after = ids.tree.named_leaves(params)[path], ids.tree.named_leaves(tree)[path]
            np.testing.assert_array_equal(np.where(frozen, after, before), before, err_msg=path)  # bit for bit
        # ...and only there: the other layers' slices moved.
        assert not np.allclose(tree["blocks"][0]["mlp"]["up"]["kernel"], params["blocks"][0]["mlp"]["up"]["kernel"])
        assert not np.allclose(tree["blocks"][2]["mlp"]["up"]["kernel"][:, 5:], params["blocks"][2]["mlp"]["up"]["kernel"][:, 5:])


def test_a_scanned_train_step_with_frozen_and_projected_matches_the_per_layer_optimizer():
    apply = ids.init_transformer(CFG.replace(scan_layers=True), seed=1)[0]
    params = _params()
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 17, jnp.int32)
    u = ids.subspaces.Subspace(jnp.eye(8)[:2])
    subspaces = ids.optim.projection.subspaces_for(params, {"blocks.2.attn.*_proj": u}, dense_layers=apply.dense_layers)
    mask = jax.tree.map(lambda _: False, params)
    mask["blocks"][0] = jax.tree.map(lambda _: True, mask["blocks"][0])
    finals = []
    for inner in (optax.adamw(1e-2), ids.optim.layer_stacked(optax.adamw(1e-2))):
        opt = ids.optim.frozen(ids.optim.projection.projected(inner, subspaces), freeze_mask=mask)
        step = ids.train.make_train_step(ids.train.lm_loss(apply), opt)
        state = ids.train.init_train_state(params, opt)
        for _ in range(2):
            state, _ = step(state, {"tokens": tokens})
        finals.append(state.params)
    _assert_equal(finals[1], finals[0], atol=1e-6)
    np.testing.assert_array_equal(finals[1]["blocks"][0]["mlp"]["up"]["kernel"], params["blocks"][0]["mlp"]["up"]["kernel"])


def test_trees_without_per_layer_blocks_pass_through_and_unequal_blocks_are_refused():
    p = {"w": jnp.ones(3)}
    got, _ = _run(ids.optim.layer_stacked(optax.sgd(0.5)), p, steps=1)
    ref, _ = _run(optax.sgd(0.5), p, steps=1)
    _assert_equal(got, ref)
    stacked = ids.models.stack_blocks(_params())  # already stacked: the inner optimizer sees it as it is
    got, _ = _run(ids.optim.layer_stacked(optax.sgd(0.5)), stacked, steps=1)
    _assert_equal(got, _run(optax.sgd(0.5), stacked, steps=1)[0])
    bad = {"blocks": {0: {"w": jnp.ones(2)}, 1: {"w": jnp.ones(2), "b": jnp.ones(2)}}}
    with pytest.raises(ValueError, match="blocks differ in structure"):
        ids.optim.layer_stacked(optax.sgd(0.1)).init(bad)
    with pytest.raises(ValueError, match=r"keys \[0, 2\]"):
        ids.optim.layer_stacked(optax.sgd(0.1)).init({"blocks": {0: {"w": jnp.ones(2)}, 2: {"w": jnp.ones(2)}}})
