"""Run in a subprocess with 8 simulated CPU devices (see test_sharding.py); prints a JSON report."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = ids.TransformerConfig.llama_like(64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
    apply, params = ids.init_transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, 64, dtype=jnp.int32)
    batch = {"tokens": tokens}
    report = {}

    one = jax.devices()[0]
    params_1 = jax.device_put(params, one)
    mesh = ids.sharding.make_mesh(data=4, model=2)
    params_8 = ids.sharding.shard_params(params, mesh)
    batch_8 = ids.sharding.shard_batch(batch, mesh)
    report["kernel_spec"] = str(params_8["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    fwd = jax.jit(lambda p, t: apply(p, t, hooks=ids.capture("blocks.1.resid_post", "blocks.0.attn.pattern")))
    logits_1, cap_1 = fwd(params_1, jax.device_put(tokens, one))
    logits_8, cap_8 = fwd(params_8, batch_8["tokens"])
    report["forward_max_diff"] = diff(logits_1, logits_8)
    report["capture_max_diff"] = max(diff(cap_1[k], cap_8[k]) for k in cap_1)
    report["logits_sharded_over"] = len(logits_8.sharding.device_set)

    # SGD is linear in the gradient, so a float-tolerance comparison stays meaningful; Adam's first
    # step g / (|g| + eps) amplifies reduction-order noise wherever |g| is near eps.
    opt = optax.sgd(0.1)
    step = ids.make_train_step(ids.lm_loss(apply), opt)
    s1, m1 = step(ids.init_train_state(params_1, opt), jax.device_put(batch, one))
    s8, m8 = step(ids.init_train_state(params_8, opt), batch_8)
    diffs = jax.tree_util.tree_map(diff, s1.params, s8.params)
    report["train_step_param_max_diff"] = max(jax.tree_util.tree_leaves(diffs))
    report["grad_norm_rel_diff"] = abs(float(m1["grad_norm"]) - float(m8["grad_norm"])) / float(m1["grad_norm"])
    report["train_loss_diff"] = abs(float(m1["loss"]) - float(m8["loss"]))
    report["updated_kernel_still_sharded"] = str(s8.params["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    if hasattr(ids, "generate"):
        key = jax.random.key(1)
        g1 = ids.generate(apply, params_1, jax.device_put(tokens[:, :4], one), max_new_tokens=6, key=key,
                          sampling=ids.SamplingConfig(temperature=0.0))
        g8 = ids.generate(apply, params_8, batch_8["tokens"][:, :4], max_new_tokens=6, key=key,
                          sampling=ids.SamplingConfig(temperature=0.0))
        report["generate_tokens_equal"] = bool(np.array_equal(np.asarray(g1.tokens), np.asarray(g8.tokens)))

    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
