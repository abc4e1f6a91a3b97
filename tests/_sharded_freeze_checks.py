"""Run in a subprocess with 8 simulated CPU devices (see tests/optim/test_freeze.py); prints a JSON report.

Trains a circuit-frozen model on one device and on a (data=4, model=2) mesh, and computes weight
attribution on both.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids
import idesign.circuits as circuits
import idesign.optim as optim


def frozen_unchanged(before, after, mask) -> bool:
    for p0, p1, m in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(mask)):
        m = np.broadcast_to(np.asarray(m), np.shape(p0))
        if not np.array_equal(np.asarray(p0).view(np.uint32)[m], np.asarray(p1).view(np.uint32)[m]):
            return False
    return True


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = ids.TransformerConfig.llama_like(64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_len=32)
    apply, params = ids.init_transformer(cfg)
    params = jax.device_get(params)
    batch = {"tokens": jax.random.randint(jax.random.key(0), (8, 12), 0, 64, dtype=jnp.int32)}
    mask = circuits.circuit_mask(params, cfg, heads=[(0, 1), (0, 2)], neurons=[(0, 5), (0, 60)], paths="embed.*")
    report = {"devices": jax.device_count()}

    one = jax.devices()[0]
    mesh = ids.sharding.make_mesh(data=4, model=2)
    params_1, batch_1 = jax.device_put(params, one), jax.device_put(batch, one)
    params_8, batch_8 = ids.sharding.shard_params(params, mesh), ids.sharding.shard_batch(batch, mesh)
    report["kernel_spec"] = str(params_8["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    # SGD with momentum keeps the comparison linear in the gradient (Adam's first step g/|g| amplifies
    # reduction-order noise); weight decay and clipping still act on frozen elements if misplaced.
    opt = optim.frozen(optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(0.1),
                                   optax.sgd(optax.linear_schedule(0.5, 0.1, 3), momentum=0.9)), freeze_mask=mask)
    step = ids.make_train_step(ids.lm_loss(apply), opt, jit=False)
    # Three steps inside one compiled loop: one compilation per layout.
    train = jax.jit(lambda state, b: jax.lax.fori_loop(0, 3, lambda _, s: step(s, b)[0], state))
    s1 = train(ids.init_train_state(params_1, opt), batch_1)
    s8 = train(ids.init_train_state(params_8, opt), batch_8)
    host_1, host_8 = jax.device_get(s1.params), jax.device_get(s8.params)
    report["frozen_bit_identical_1"] = frozen_unchanged(params, host_1, mask)
    report["frozen_bit_identical_8"] = frozen_unchanged(params, host_8, mask)
    free = [~np.broadcast_to(np.asarray(m), np.shape(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
    changed = sum(int((np.asarray(a)[f] != np.asarray(b)[f]).sum())
                  for a, b, f in zip(jax.tree.leaves(params), jax.tree.leaves(host_8), free))
    report["trainable_changed_fraction_8"] = changed / sum(int(f.sum()) for f in free)
    report["param_max_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                   for a, b in zip(jax.tree.leaves(host_1), jax.tree.leaves(host_8)))
    report["opt_state_bytes_equal"] = optim.opt_state_nbytes(s1.opt_state) == optim.opt_state_nbytes(s8.opt_state)
    report["updated_kernel_still_sharded"] = str(s8.params["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    loss_fn = ids.lm_loss(apply)
    a1 = circuits.component_scores(circuits.weight_attribution(loss_fn, params_1, batch_1), cfg)
    a8 = circuits.component_scores(circuits.weight_attribution(loss_fn, params_8, batch_8), cfg)
    report["attribution_max_rel_diff"] = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / np.abs(np.asarray(x)).max()) for x, y in zip(a1, a8))

    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
