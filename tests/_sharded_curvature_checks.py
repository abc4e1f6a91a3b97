"""Run in a subprocess with 8 simulated CPU devices (see test_curvature.py); prints a JSON report."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import idesign as ids
from idesign import curvature, edit


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = ids.TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_len=16)
    apply, params = ids.init_transformer(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (14, 10), 0, 32, dtype=jnp.int32))
    valid = np.ones_like(tokens, bool)
    valid[3, 7:] = False
    batches = [{"tokens": tokens[:8], "valid": valid[:8]}, {"tokens": tokens[8:], "valid": valid[8:]}]  # ragged
    layers = "blocks.0.mlp.up"
    one = jax.devices()[0]
    params_1 = jax.device_put(params, one)
    mesh = ids.sharding.make_mesh(data=4, model=2)
    params_8 = ids.sharding.shard_params(params, mesh)
    report = {"devices": jax.device_count()}
    counts_equal = True
    for fisher in ("true",):  # sampled targets: also checks the draws do not depend on the layout
        f1 = curvature.collect_factors(apply, params_1, batches, layers, fisher=fisher, key=3, progress=False)
        f8 = curvature.collect_factors(apply, params_8, batches, layers, fisher=fisher, key=3, mesh=mesh,
                                       progress=False)
        report[f"{fisher}_max_rel_diff"] = max(rel_diff(getattr(f8[k], s), getattr(f1[k], s))
                                               for k in f1 for s in ("a_sum", "g_sum"))
        counts_equal &= all(float(f1[k].count) == float(f8[k].count) for k in f1)
    report["count_equal"] = bool(counts_equal)

    new_1, _ = edit.prune_low_curvature(params_1, f1, list(f1), 0.8)
    new_8, _ = edit.prune_low_curvature(params_8, f1, list(f1), 0.8)
    k8 = new_8["blocks"][0]["mlp"]["up"]["kernel"]
    report["pruned_kernel_spec"] = str(k8.sharding.spec)
    report["pruned_max_diff"] = float(np.abs(np.asarray(k8) - np.asarray(new_1["blocks"][0]["mlp"]["up"]["kernel"])).max())
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
