"""Placing parameters and batches on a device mesh, through ``jax.sharding`` alone.

A mesh has a ``data`` axis (batch parallelism) and a ``model`` axis (tensor parallelism).
Parameters are laid out by *rules*: ``(glob pattern over dotted paths, PartitionSpec)``, first
match wins, unmatched leaves are replicated. The default rules shard the reference transformer
Megatron-style: q/k/v/up/gate kernels by output column, o_proj/down kernels by input row, so
each device holds whole heads and whole MLP neurons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idesign import tree as tree_lib

Rules = Sequence[tuple[str, P]]

TRANSFORMER_RULES: Rules = (
    ("blocks.*.attn.[qkv]_proj.kernel", P(None, "model")),
    ("blocks.*.attn.[qkv]_proj.bias", P("model")),
    ("blocks.*.attn.o_proj.kernel", P("model", None)),
    ("blocks.*.mlp.up.kernel", P(None, "model")),
    ("blocks.*.mlp.gate.kernel", P(None, "model")),
    ("blocks.*.mlp.up.bias", P("model")),
    ("blocks.*.mlp.gate.bias", P("model")),
    ("blocks.*.mlp.down.kernel", P("model", None)),
)


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh; ``data=None`` uses every device not taken by ``model``.

    >>> import idesign as ids
    >>> ids.sharding.make_mesh().axis_names
    ('data', 'model')
    """
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        if len(devices) % model:
            raise ValueError(f"make_mesh: {len(devices)} devices cannot be split into model={model} groups.")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} needs {data * model} devices; {len(devices)} available.")
    if jax.process_count() > 1 and data * model != len(devices):
        # On several processes every one must hold a part of the mesh, or some would wait forever in collectives.
        raise ValueError(f"make_mesh: data={data} x model={model} = {data * model} devices, but the {jax.process_count()} "
                         f"processes have {len(devices)} devices in all ({jax.local_device_count()} each); a "
                         "multi-process mesh must use every device. Choose data x model = "
                         f"{len(devices)}, or leave data=None.")
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), ("data", "model"))


def param_specs(params: Any, mesh: Mesh, rules: Rules = TRANSFORMER_RULES) -> Any:
    """A PartitionSpec per leaf, by the first matching rule; checks every sharded dim divides evenly.

    >>> import jax.numpy as jnp, idesign as ids
    >>> specs = ids.sharding.param_specs({'blocks': {0: {'mlp': {'up': {'kernel': jnp.ones((4, 8))}}}}},
    ...                                  ids.sharding.make_mesh())
    >>> specs['blocks'][0]['mlp']['up']['kernel']
    P(None, 'model')
    """

    def spec_for(path: str, leaf: Any) -> P:
        for pattern, spec in rules:
            if tree_lib.matches(path, pattern):
                _check_divisible(path, np.shape(leaf), spec, mesh)
                return spec
        return P()

    return tree_lib.map_with_path(spec_for, params)


def _check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {spec} for {path} has more axes than its shape {shape}.")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
        if dim % size:
            raise ValueError(f"cannot shard {path} of shape {shape} with {spec}: dimension {dim} is not "
                             f"divisible by the mesh axis size {size}.")


def shard_params(params: Any, mesh: Mesh, rules: Rules = TRANSFORMER_RULES) -> Any:
    """Places ``params`` on ``mesh`` according to ``rules`` (see :func:`param_specs`).

    >>> import jax.numpy as jnp, idesign as ids
    >>> p = ids.sharding.shard_params({'w': jnp.ones(3)}, ids.sharding.make_mesh())
    >>> p['w'].sharding.spec
    P()
    """
    specs = param_specs(params, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Splits every array's leading (batch) dimension over the mesh's ``data`` axis.

    >>> import numpy as np, idesign as ids
    >>> b = ids.sharding.shard_batch({'tokens': np.zeros((4, 3), np.int32)}, ids.sharding.make_mesh())
    >>> b['tokens'].sharding.spec
    P('data',)
    """
    size = mesh.shape[axis]

    def place(path: str, x: Any) -> jax.Array:
        if np.ndim(x) == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if np.shape(x)[0] % size:
            raise ValueError(f"batch leaf {path!r} has leading dimension {np.shape(x)[0]}, not divisible by "
                             f"the mesh's {axis!r} axis of size {size}.")
        return jax.device_put(x, NamedSharding(mesh, P(axis)))

    return tree_lib.map_with_path(place, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf fully replicated on ``mesh``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.sharding.replicate({'w': jnp.ones(2)}, ids.sharding.make_mesh())['w'].sharding.spec
    P()
    """
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)
