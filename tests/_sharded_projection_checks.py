"""Run in a subprocess with 8 simulated CPU devices (see tests/optim/test_projection.py); prints a JSON report.

Projected training steps (SGD, which is linear in the gradient, so float-tolerance comparisons stay
meaningful) on sharded parameters equal the 1-device result and keep the parameters' layout.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids
from idesign import subspaces as sub
from idesign.optim import projection


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = ids.TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_len=32)
    apply, params = ids.init_transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, 64, dtype=jnp.int32)
    report = {}

    rng = np.random.default_rng(0)
    bases = {d: np.linalg.qr(rng.normal(size=(d, 4)))[0].T.astype(np.float32) for d in (32, 128)}
    spec = {site: sub.Subspace(bases[32 if not site.endswith("down") else 128])
            for site in apply.dense_layers if site != "unembed"}
    spec["blocks.0.mlp.up"] = (spec["blocks.0.mlp.up"], sub.Subspace(bases[128], "output"))
    tree = projection.subspaces_for(params, spec, dense_layers=apply.dense_layers)
    # PCGrad on the raw gradients against a protected loss's gradient (passed to the step), then SGD
    # with the projection on its final update: the update stays orthogonal to the bases.
    opt = optax.chain(projection.project_conflicting("pcgrad"),
                      projection.projected(optax.sgd(0.1), tree, others={"*.bias": "zero"}))
    # any tree with the parameters' structure serves as the protected gradient (no extra compilation)
    h = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)

    one = jax.devices()[0]
    mesh = ids.sharding.make_mesh(data=4, model=2)
    params_1 = jax.device_put(params, one)
    params_8 = ids.sharding.shard_params(params, mesh)
    report["kernel_spec"] = str(params_8["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    step = ids.make_train_step(ids.lm_loss(apply), opt)
    s1, s8 = ids.init_train_state(params_1, opt), ids.init_train_state(params_8, opt)
    h1, h8 = jax.device_put(h, one), ids.sharding.shard_params(h, mesh)
    for _ in range(2):
        s1, _ = step(s1, jax.device_put({"tokens": tokens}, one), protected_grads=h1)
        s8, _ = step(s8, ids.sharding.shard_batch({"tokens": tokens}, mesh), protected_grads=h8)
    report["param_max_diff"] = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(diff, s1.params, s8.params)))
    up0 = params["blocks"][0]["mlp"]["up"]["kernel"]
    delta = np.asarray(s8.params["blocks"][0]["mlp"]["up"]["kernel"]) - np.asarray(up0)
    report["orthogonality_8"] = max(float(np.abs(bases[32] @ delta).max()), float(np.abs(delta @ bases[128].T).max()))
    report["updated_kernel_spec"] = str(s8.params["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)

    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
