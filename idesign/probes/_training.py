"""Minibatch optax training shared by the span-max and attention probes.

Steps run on the device in chunks (one ``lax.scan`` per chunk) with a tqdm bar updated per chunk.
Batches are drawn without replacement, epoch by epoch, from a numpy generator seeded with
``seed``, so a fit is deterministic from its seed. The compiled chunk is cached on the loss
function, the optimizer's name and the shapes: the learning rate and the other hyperparameters
live in the optimizer state (``optax.inject_hyperparams``) and the loss's constants are traced
arguments, so refitting with other data of the same shapes, or other hyperparameters, does not
recompile.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from idesign._types import Array

# (params, batch, consts, step, **static) -> scalar loss
LossFn = Callable[..., Array]

_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.inject_hyperparams(optax.adam),
    "adamw": optax.inject_hyperparams(optax.adamw),
}


def batch_indices(n_rows: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """``[num_steps, batch_size]`` row indices: shuffled epochs, each epoch reshuffled, no repeats within one.

    >>> batch_indices(5, 2, 3, seed=0).shape
    (3, 2)
    """
    rng = np.random.default_rng(seed)
    per_epoch = n_rows // batch_size
    epochs = -(-num_steps // per_epoch)
    rows = np.concatenate([rng.permutation(n_rows)[: per_epoch * batch_size] for _ in range(epochs)])
    return rows[: num_steps * batch_size].reshape(num_steps, batch_size).astype(np.int32)


@jax.jit
def masked_standardization(x: Array, mask: Array) -> tuple[Array, Array]:
    """Mean and population std over the positions where ``mask`` ``[..., T]`` is true; constant features get 1."""
    m = mask.astype(x.dtype)[..., None]
    count = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum(tuple(range(x.ndim - 1))) / count
    std = jnp.sqrt((jnp.square(x - mean) * m).sum(tuple(range(x.ndim - 1))) / count)
    return mean, jnp.where(std > 100 * jnp.finfo(x.dtype).eps * jnp.maximum(jnp.abs(mean), 1.0), std, 1.0)


@functools.lru_cache(maxsize=64)
def _chunk_runner(loss_fn: LossFn, loss_static: tuple[tuple[str, Any], ...], optimizer: str) -> Callable:
    loss = functools.partial(loss_fn, **dict(loss_static))
    opt = _OPTIMIZERS[optimizer](learning_rate=0.0)  # the real hyperparameters are in the state

    @jax.jit
    def run_chunk(params, opt_state, data, consts, idx, start, num_steps):
        def step(carry, inputs):
            params, opt_state = carry
            i, rows = inputs
            batch = {k: v[rows] for k, v in data.items()}
            value, grads = jax.value_and_grad(loss)(params, batch, consts, i)
            updates, new_state = opt.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            active = i < num_steps  # the last chunk is padded; its extra steps change nothing
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
            return (keep(new_params, params), keep(new_state, opt_state)), value

        steps = start + jnp.arange(idx.shape[0])
        return jax.lax.scan(step, (params, opt_state), (steps, idx))

    return opt, run_chunk


def train_minibatch(loss_fn: LossFn, params: Any, data: Mapping[str, Any], consts: Any, *, num_steps: int,
                    batch_size: int, optimizer: str, hyperparams: Mapping[str, float], seed: int,
                    progress: bool, desc: str, loss_static: Mapping[str, Any] | None = None,
                    chunk: int = 50) -> tuple[Any, np.ndarray]:
    """Minimises ``loss_fn(params, batch, consts, step, **loss_static)`` over minibatches of ``data``.

    ``data`` holds arrays with a shared leading axis (rows); ``consts`` is a pytree of arrays the
    loss needs besides the batch; ``loss_fn`` and ``loss_static`` must be hashable (module-level
    functions, plain values). Returns the final parameters and the loss of every step.
    """
    if num_steps < 1:
        raise ValueError(f"{desc}: num_steps must be positive, got {num_steps}.")
    opt, run_chunk = _chunk_runner(loss_fn, tuple(sorted((loss_static or {}).items())), optimizer)
    data = {k: jnp.asarray(v) for k, v in data.items()}
    n_rows = len(next(iter(data.values())))
    batch_size = int(min(batch_size, n_rows))
    chunk = int(min(chunk, num_steps))
    n_chunks = -(-num_steps // chunk)
    idx = batch_indices(n_rows, batch_size, n_chunks * chunk, seed).reshape(n_chunks, chunk, batch_size)

    opt_state = opt.init(params)
    opt_state.hyperparams.update({k: jnp.asarray(v, jnp.float32) for k, v in hyperparams.items()})
    losses = []
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    for c in range(n_chunks):
        (params, opt_state), chunk_losses = run_chunk(params, opt_state, data, consts, idx[c], c * chunk, num_steps)
        chunk_losses = np.asarray(chunk_losses)[: max(0, min(chunk, num_steps - c * chunk))]
        losses.append(chunk_losses)
        bar.update(len(chunk_losses))
        bar.set_postfix(loss=f"{float(chunk_losses.mean()):.4g}")
    bar.close()
    return params, np.concatenate(losses)
