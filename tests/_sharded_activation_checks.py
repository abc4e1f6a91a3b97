"""Run in a subprocess with 8 simulated CPU devices (see test_activations.py); prints a JSON report.

Streams activations on a (data=4, model=2) mesh and on one device and compares them.
"""

import json
import sys

import jax
import numpy as np

import idesign as ids
from idesign import activations


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = ids.TransformerConfig.llama_like(64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_len=32)
    apply, params = ids.init_transformer(cfg)
    rng = np.random.default_rng(0)
    n, t = 20, 10  # 20 rows in batches of 8: the last batch is padded
    lengths = rng.integers(1, t + 1, n)
    data = {"tokens": rng.integers(0, 64, (n, t)).astype(np.int32), "valid": np.arange(t)[None] < lengths[:, None],
            "label": rng.integers(0, 2, n)}
    data["mask"] = data["valid"] & (rng.uniform(size=(n, t)) < 0.3)
    data["mask"][:, 0] = True

    mesh = ids.sharding.make_mesh(data=4, model=2)
    sharded = ids.sharding.shard_params(params, mesh)
    one = jax.device_put(params, jax.devices()[0])
    sites = ["blocks.0.resid_post", "blocks.0.mlp.hidden"]
    report = {"params_sharded": str(sharded["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)}
    # Per-row indices are split over the data axis; a token table's flat indices are replicated.
    for name, options in {"last": {"positions": "last"}, "mask": {"positions": "mask"}}.items():
        kwargs = dict(batch_size=8, valid_column="valid", progress=False, **options)
        a = activations.collect_activations(apply, one, data, sites, **kwargs)
        b = activations.collect_activations(apply, sharded, data, sites, mesh=mesh, **kwargs)
        report[f"{name}_max_diff"] = max(float(np.abs(a[k] - b[k]).max()) for k in a if k.startswith("blocks"))
        report.setdefault("columns_equal", True)
        report["columns_equal"] &= all(np.array_equal(a[k], b[k]) for k in a if not k.startswith("blocks"))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
