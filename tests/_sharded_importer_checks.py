"""Run in a subprocess with 8 simulated CPU devices (see test_importers.py); prints a JSON report."""

import json
import sys

import jax
import numpy as np

import idesign as ids


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    apply, params = ids.models.load_pretrained(path)
    mesh = ids.sharding.make_mesh(data=2, model=4)
    _, on_mesh = ids.models.load_pretrained(path, mesh=mesh)
    up = on_mesh["blocks"][0]["mlp"]["up"]["kernel"]
    report = {
        "param_max_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                              for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(on_mesh))),
        "up_spec": repr(up.sharding.spec),
        "down_spec": repr(on_mesh["blocks"][0]["mlp"]["down"]["kernel"].sharding.spec),
        "up_shard_shape": list(up.addressable_shards[0].data.shape),
        "devices_per_kernel": len(up.sharding.device_set),
    }
    json.dump(report, sys.stdout)
    print()
