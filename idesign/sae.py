"""Sparse autoencoders (TopK) on any activations: sample embeddings, residual streams, MLP outputs.

A TopK SAE (Gao et al. 2024, arXiv 2406.04093) encodes ``x [..., D]`` into ``M`` features of
which only the ``k`` largest pre-activations are kept (and rectified)::

    pre   = (x - b_dec) @ w_enc + b_enc                  # [..., M]
    codes = relu(pre) where pre is among the top k, else 0
    x_hat = codes @ w_dec + b_dec                         # w_dec rows: unit-norm feature directions

Training minimises the *normalised* reconstruction error ``||x - x_hat||^2 / ||x - mean(x)||^2``
(the fraction of variance unexplained, FVU; scale-free, so one learning rate fits any
activations) with Adam. Two pieces keep the dictionary healthy:

- :func:`unit_norm_decoder`, an optax transform placed after the optimizer, projects every
  decoder row back to unit norm after each update, so feature magnitudes live in the codes and
  ``w_dec`` rows are comparable directions;
- **dead-feature resampling**: every ``resample_every`` steps, features that have not fired for
  ``dead_after`` steps are re-initialised on inputs the SAE reconstructs worst (drawn in
  proportion to their squared error), with their Adam moments reset (Bricken et al. 2023).

Training is one ``jax.jit``-compiled ``lax.scan`` over steps, pure in ``(x, key)``, so
:func:`train_sae_many` trains one SAE per slice of a stack (seeds, layers) with ``jax.vmap``.
The step itself is :func:`idesign.train.make_train_step` over :func:`sae_loss`.
:func:`train_sae_batches` trains the same SAE from an iterator of batches (an on-disk
:class:`idesign.activation_store.ActivationStore`), one jitted step per batch, when the activations do
not fit in memory.

**Pretrained SAEs** (``idesign/_sae_pretrained.py``, re-exported here): :func:`load_saelens` (SAELens
directories, pre-6.0 configs included), :func:`load_gemma_scope` (``params.npz``), and the :class:`SAE`
pytree they return (standard, JumpReLU, TopK and gated SAEs, with ``encode``/``decode`` matching each
format's formula). :class:`Splice` is the intervention that puts an SAE into a forward pass and opens its
features as the site ``<site>.sae.features`` for captures, probes, steering and CAFT.

Example:
  >>> import numpy as np
  >>> from idesign import sae
  >>> x = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
  >>> params, info = sae.train_sae(x, sae.SAEConfig(n_features=8, k=2, steps=20, batch_size=32))
  >>> metrics = sae.sae_metrics(params, x, k=2)
  >>> params.w_dec.shape, bool(metrics["l0"] <= 2), bool(metrics["fvu"] < 1)
  ((8, 4), True, True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import train as train_lib
from idesign._types import Array


class SAEParams(NamedTuple):
    """Parameters of a sparse autoencoder.

    Attributes:
      w_enc: ``[D, M]`` encoder.
      b_enc: ``[M]`` encoder bias.
      w_dec: ``[M, D]`` decoder; row ``m`` is feature ``m``'s direction (unit norm when trained).
      b_dec: ``[D]`` decoder bias, subtracted before encoding.
    """

    w_enc: Array
    b_enc: Array
    w_dec: Array
    b_dec: Array


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """How to train a TopK SAE.

    Attributes:
      n_features: dictionary size ``M``.
      k: active features per input.
      steps: optimisation steps; batch_size: rows per step (drawn with replacement).
      learning_rate: peak Adam step size (the loss is normalised, so this transfers across scales);
        warm-up over the first 5% of steps, cosine decay to 5% of the peak by the end.
      resample_every: steps between dead-feature checks (0: never resample).
      dead_after: a feature that has not fired for this many steps is dead.
      resample_until: no resampling after this fraction of ``steps`` (let the last ones settle).
      resample_pool: rows scored when choosing where to re-initialise dead features.
    """

    n_features: int = 64
    k: int = 4
    steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 3e-3
    resample_every: int = 200
    dead_after: int = 100
    resample_until: float = 0.7
    resample_pool: int = 1024


class SAETrainInfo(NamedTuple):
    """What training reports (stacked with a leading axis by :func:`train_sae_many`).

    Attributes:
      loss: ``[steps]`` normalised reconstruction error (FVU on the batch) per step.
      n_resampled: total dead features re-initialised.
      steps_since_fired: ``[M]`` steps since each feature last fired (at the end).
    """

    loss: Array
    n_resampled: Array
    steps_since_fired: Array


def init_sae(key: Array, d_in: int, n_features: int, *, b_dec: Any = None) -> SAEParams:
    """Random unit-norm decoder rows, the encoder tied to their transpose, zero biases.

    Args:
      key: PRNG key.
      d_in: input size ``D``.
      n_features: dictionary size ``M``.
      b_dec: ``[D]`` initial decoder bias (the data mean is a good choice); zeros if None.

    Returns:
      :class:`SAEParams`.

    >>> import jax
    >>> p = init_sae(jax.random.key(0), 4, 6)
    >>> p.w_enc.shape, bool(abs(jax.numpy.linalg.norm(p.w_dec, axis=1) - 1).max() < 1e-5)
    ((4, 6), True)
    """
    if d_in < 1 or n_features < 1:
        raise ValueError(f"init_sae: d_in and n_features must be positive; got {d_in}, {n_features}.")
    w_dec = jax.random.normal(key, (n_features, d_in))
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
    bias = jnp.zeros((d_in,)) if b_dec is None else jnp.asarray(b_dec, jnp.float32).reshape(d_in)
    return SAEParams(w_enc=w_dec.T, b_enc=jnp.zeros((n_features,)), w_dec=w_dec, b_dec=bias)


def pre_activations(params: SAEParams, x: Array) -> Array:
    """``(x - b_dec) @ w_enc + b_enc``: ``[..., M]``.

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.ones(2))
    >>> pre_activations(p, jnp.array([3.0, 1.0])).tolist()
    [2.0, 0.0]
    """
    return (x - params.b_dec) @ params.w_enc + params.b_enc


def encode(params: SAEParams, x: Array, k: int) -> Array:
    """TopK codes ``[..., M]``: the ``k`` largest pre-activations, rectified; the rest zero.

    Ties at the ``k``-th value keep every tied feature (exact ties have probability zero for real data).

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(3), jnp.zeros(3), jnp.eye(3), jnp.zeros(3))
    >>> encode(p, jnp.array([0.5, 2.0, -1.0]), k=2).tolist()
    [0.5, 2.0, 0.0]
    """
    if not 1 <= k <= params.w_enc.shape[1]:
        raise ValueError(f"encode: k={k} must be between 1 and the number of features {params.w_enc.shape[1]}.")
    pre = pre_activations(params, x)
    kth = jax.lax.top_k(pre, k)[0][..., -1:]
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def decode(params: SAEParams, codes: Array) -> Array:
    """``codes @ w_dec + b_dec``: ``[..., D]``.

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), 2 * jnp.eye(2), jnp.ones(2))
    >>> decode(p, jnp.array([1.0, 0.0])).tolist()
    [3.0, 1.0]
    """
    return codes @ params.w_dec + params.b_dec


def reconstruct(params: SAEParams, x: Array, k: int) -> Array:
    """``decode(encode(x))``.

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2))
    >>> reconstruct(p, jnp.array([3.0, 1.0]), k=1).tolist()
    [3.0, 0.0]
    """
    return decode(params, encode(params, x, k))


def sae_loss(k: int) -> train_lib.LossFn:
    """The normalised reconstruction loss as an idesign loss: ``loss_fn(params, {"x": [B, D]})``.

    ``loss = sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2`` (the batch's FVU). Aux metrics:
    ``loss``, ``l0`` (mean active features) and ``fired`` (``[M]`` bool, any row activated it).

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2))
    >>> loss, aux = sae_loss(k=2)(p, {"x": jnp.array([[1.0, 2.0], [3.0, 0.5]])})
    >>> float(loss), float(aux["l0"])
    (0.0, 2.0)
    """

    def loss_fn(params: SAEParams, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        x = batch["x"]
        codes = encode(params, x, k)
        err = jnp.sum(jnp.square(x - decode(params, codes)))
        total = jnp.sum(jnp.square(x - jax.lax.stop_gradient(x.mean(0))))
        loss = err / jnp.maximum(total, 1e-12)
        return loss, {"loss": loss, "l0": (codes > 0).sum(-1).mean(), "fired": (codes > 0).any(0)}

    return loss_fn


class UnitNormDecoderState(NamedTuple):
    """No state: the constraint only reads the parameters."""


def unit_norm_decoder() -> optax.GradientTransformation:
    """An optax transform that keeps SAE decoder rows at unit norm.

    Place it *last* in ``optax.chain``: it turns the incoming update ``u`` of ``w_dec`` into
    ``normalise(w_dec + u) - w_dec``, so the parameters after ``optax.apply_updates`` have unit
    rows; other leaves pass through. Requires ``params`` in ``update``.

    Returns:
      ``optax.GradientTransformation``.

    >>> import jax.numpy as jnp, optax
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2))
    >>> opt = optax.chain(optax.sgd(1.0), unit_norm_decoder())
    >>> g = p._replace(w_dec=-jnp.eye(2))  # a gradient that would double the rows
    >>> u, _ = opt.update(g, opt.init(p), p)
    >>> jnp.linalg.norm(optax.apply_updates(p, u).w_dec, axis=1).tolist()
    [1.0, 1.0]
    """

    def init_fn(params):
        del params
        return UnitNormDecoderState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("unit_norm_decoder: update needs params (the decoder rows to renormalise).")
        if not isinstance(params, SAEParams):
            raise TypeError(f"unit_norm_decoder: params must be SAEParams; got {type(params).__name__}.")
        new = params.w_dec + updates.w_dec
        new = new / jnp.maximum(jnp.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        return updates._replace(w_dec=new - params.w_dec), state

    return optax.GradientTransformation(init_fn, update_fn)


@functools.partial(jax.jit, static_argnames=("k",))
def sae_metrics(params: SAEParams, x: Any, k: int) -> dict[str, Array]:
    """Reconstruction and sparsity of an SAE on ``x [N, D]``.

    Returns:
      ``fvu`` (fraction of variance unexplained), ``mse`` (mean squared error per element),
      ``cosine`` (mean cosine of ``x - mean`` and ``x_hat - mean``), ``l0`` (mean active
      features), ``dead_fraction`` (features active on no row).

    >>> import jax.numpy as jnp
    >>> p = SAEParams(jnp.eye(2), jnp.zeros(2), jnp.eye(2), jnp.zeros(2))
    >>> m = sae_metrics(p, jnp.array([[1.0, 0.0], [0.0, 2.0]]), k=1)
    >>> float(m["fvu"]), float(m["dead_fraction"])
    (0.0, 0.0)
    """
    x = jnp.asarray(x, jnp.float32)
    codes = encode(params, x, k)
    x_hat = decode(params, codes)
    centred, centred_hat = x - x.mean(0), x_hat - x.mean(0)
    cos = jnp.sum(centred * centred_hat, -1) / jnp.maximum(
        jnp.linalg.norm(centred, axis=-1) * jnp.linalg.norm(centred_hat, axis=-1), 1e-12)
    return {"fvu": jnp.sum(jnp.square(x - x_hat)) / jnp.maximum(jnp.sum(jnp.square(centred)), 1e-12),
            "mse": jnp.mean(jnp.square(x - x_hat)), "cosine": cos.mean(),
            "l0": (codes > 0).sum(-1).mean(), "dead_fraction": 1.0 - (codes > 0).any(0).mean()}


@functools.partial(jax.jit, static_argnames=("k",))
def resample_dead(params: SAEParams, dead: Array, x: Array, k: int, key: Array) -> SAEParams:
    """Re-initialises ``dead`` features on the rows of ``x`` that the SAE reconstructs worst.

    Rows are drawn in proportion to their squared error; a dead feature's decoder row becomes
    the normalised residual of its row, its encoder column the same direction scaled to 0.2 of
    the mean live encoder norm, its encoder bias 0. Live features are unchanged.

    Args:
      params: the SAE.
      dead: ``[M]`` bool, the features to re-initialise.
      x: ``[P, D]`` candidate rows.
      k: TopK of the SAE.
      key: PRNG key.

    Returns:
      New :class:`SAEParams`.

    >>> import jax, jax.numpy as jnp
    >>> p = init_sae(jax.random.key(0), 3, 4)
    >>> q = resample_dead(p, jnp.array([True, False, False, False]), jnp.eye(3) * 5, 1, jax.random.key(1))
    >>> bool((q.w_dec[1:] == p.w_dec[1:]).all()), bool((q.w_dec[0] != p.w_dec[0]).any())
    (True, True)
    """
    residual = x - reconstruct(params, x, k)
    err = jnp.sum(jnp.square(residual), -1)
    p = err / jnp.maximum(err.sum(), 1e-12)
    p = jnp.where(err.sum() > 0, p, jnp.full_like(p, 1.0 / p.shape[0]))
    rows = jax.random.categorical(key, jnp.log(p), shape=(params.w_dec.shape[0],))
    direction = residual[rows]
    direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
    live = ~dead
    enc_norm = jnp.linalg.norm(params.w_enc, axis=0)
    scale = 0.2 * jnp.sum(enc_norm * live) / jnp.maximum(live.sum(), 1)
    scale = jnp.where(live.any(), scale, 1.0)
    return SAEParams(w_enc=jnp.where(dead[None, :], direction.T * scale, params.w_enc),
                     b_enc=jnp.where(dead, 0.0, params.b_enc),
                     w_dec=jnp.where(dead[:, None], direction, params.w_dec), b_dec=params.b_dec)


def _sae_optimizer(config: SAEConfig) -> optax.GradientTransformation:
    # A short warm-up, then cosine decay to 5%: the last steps settle the directions.
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(1, config.steps // 20),
                                                  max(2, config.steps), end_value=0.05 * config.learning_rate)
    return optax.chain(optax.adam(schedule), unit_norm_decoder())


def _check_inputs(x: Any, fn: str, ndim: int) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: activations must be floating point; got dtype {x.dtype}.")
    if x.ndim != ndim:
        layout = "[N, D] (rows, features)" if ndim == 2 else "[S, N, D] (stack, rows, features)"
        raise ValueError(f"{fn}: activations must be {layout}; got shape {tuple(x.shape)}.")
    return x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _train(x: Array, key: Array, config: SAEConfig) -> tuple[SAEParams, SAETrainInfo]:
    n, d = x.shape
    k_init, k_loop = jax.random.split(key)
    params = init_sae(k_init, d, config.n_features, b_dec=x.mean(0))
    optimizer = _sae_optimizer(config)
    step_fn = train_lib.make_train_step(sae_loss(config.k), optimizer, jit=False)
    state = train_lib.init_train_state(params, optimizer)
    last_resample = int(config.resample_until * config.steps)

    def body(carry, key_t):
        state, since, n_resampled = carry
        k_batch, k_pool, k_choice = jax.random.split(key_t, 3)
        batch = {"x": x[jax.random.randint(k_batch, (config.batch_size,), 0, n)]}
        state, metrics = step_fn(state, batch)
        since = jnp.where(metrics["fired"], 0, since + 1)
        t = state.step
        check = (config.resample_every > 0) & (t % max(config.resample_every, 1) == 0) & (t <= last_resample)
        dead = check & (since >= config.dead_after)

        def resample(args):
            state, since = args
            pool = x[jax.random.randint(k_pool, (config.resample_pool,), 0, n)]
            return _resample_state(state, optimizer, dead, pool, config.k, k_choice), jnp.where(dead, 0, since)

        state, since = jax.lax.cond(dead.any(), resample, lambda a: a, (state, since))
        return (state, since, n_resampled + dead.sum()), metrics["loss"]

    since0 = jnp.zeros((config.n_features,), jnp.int32)
    (state, since, n_resampled), losses = jax.lax.scan(body, (state, since0, jnp.zeros((), jnp.int32)),
                                                       jax.random.split(k_loop, config.steps))
    return state.params, SAETrainInfo(losses, n_resampled, since)


def _check_config(config: SAEConfig, d: int) -> None:
    if not 1 <= config.k <= config.n_features:
        raise ValueError(f"SAEConfig: need 1 <= k <= n_features; got k={config.k}, n_features={config.n_features}.")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"SAEConfig: steps and batch_size must be positive; got {config.steps}, {config.batch_size}.")
    del d


def train_sae(x: Any, config: SAEConfig = SAEConfig(), *, seed: int = 0) -> tuple[SAEParams, SAETrainInfo]:
    """Trains a TopK SAE on ``x [N, D]`` in one compiled call; deterministic in ``seed``.

    Args:
      x: ``[N, D]`` activations (rows are examples: tokens, samples).
      config: :class:`SAEConfig`.
      seed: seeds initialisation, batches and resampling.

    Returns:
      ``(params, info)``: :class:`SAEParams` and :class:`SAETrainInfo`.

    Raises:
      ValueError: ``x`` not 2-D, or a bad config.

    Example:
      >>> import numpy as np
      >>> from idesign import sae
      >>> x = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
      >>> params, info = sae.train_sae(x, sae.SAEConfig(n_features=8, k=2, steps=20, batch_size=32))
      >>> info.loss.shape
      (20,)
    """
    x = _check_inputs(x, "train_sae", 2)
    _check_config(config, x.shape[1])
    return _train(x, jax.random.key(seed), config)


def train_sae_many(xs: Any, config: SAEConfig = SAEConfig(), *, seeds: Any = None) -> tuple[SAEParams, SAETrainInfo]:
    """Trains one SAE per slice of ``xs [S, N, D]`` (seeds, layers, models) with one ``jax.vmap``.

    Args:
      xs: ``[S, N, D]`` activations.
      config: shared :class:`SAEConfig`.
      seeds: ``[S]`` integer seeds (default ``0..S-1``).

    Returns:
      Stacked ``(params, info)``; every leaf has a leading ``[S]`` axis. SAE ``s`` equals
      ``train_sae(xs[s], config, seed=seeds[s])`` up to float rounding.

    Example:
      >>> import numpy as np
      >>> from idesign import sae
      >>> xs = np.random.default_rng(0).normal(size=(2, 128, 4)).astype(np.float32)
      >>> params, _ = sae.train_sae_many(xs, sae.SAEConfig(n_features=8, k=2, steps=20, batch_size=32))
      >>> params.w_dec.shape
      (2, 8, 4)
    """
    xs = _check_inputs(xs, "train_sae_many", 3)
    _check_config(config, xs.shape[2])
    seeds = np.arange(xs.shape[0]) if seeds is None else np.asarray(seeds)
    if seeds.shape != (xs.shape[0],):
        raise ValueError(f"train_sae_many: seeds must have shape ({xs.shape[0]},); got {seeds.shape}.")
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda x, key: _train(x, key, config))(xs, keys)


def train_sae_batches(batches: Any, config: SAEConfig = SAEConfig(), *, seed: int = 0,
                      progress: bool = False) -> tuple[SAEParams, SAETrainInfo]:
    """Trains a TopK SAE on an iterator of ``[B, D]`` batches (e.g. an on-disk activation store), one step each.

    For activations that do not fit in memory: the same loss, optimizer and decoder constraint as
    :func:`train_sae`, one jitted step per batch (``config.batch_size`` is unused: the batches set it), at most
    ``config.steps`` steps. The decoder bias starts at the first batch's mean. Dead features (not fired for
    ``dead_after`` steps) are re-initialised every ``resample_every`` steps on the rows of the current batch the
    SAE reconstructs worst, with their Adam moments reset. Deterministic in ``seed`` and the batches.

    Args:
      batches: an iterable of ``[B, D]`` float arrays (every batch the same ``D``; ``B`` may vary).
      config: :class:`SAEConfig`.
      seed: seeds initialisation and resampling.
      progress: show a progress bar.

    Returns:
      ``(params, info)`` as :func:`train_sae`; ``info.loss`` has one entry per step taken.

    Example:
      >>> import numpy as np
      >>> from idesign import sae
      >>> x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
      >>> params, info = sae.train_sae_batches((x[i:i + 32] for i in range(0, 256, 32)),
      ...                                      sae.SAEConfig(n_features=8, k=2, steps=100))
      >>> info.loss.shape, params.w_dec.shape
      ((8,), (8, 4))
    """
    from tqdm.auto import tqdm

    optimizer = _sae_optimizer(config)
    step_fn = train_lib.make_train_step(sae_loss(config.k), optimizer)
    key_init, key_loop = jax.random.split(jax.random.key(seed))
    last_resample = int(config.resample_until * config.steps)
    state = since = None
    losses, n_resampled = [], 0
    bar = tqdm(total=config.steps, desc="sae", unit="step", disable=not progress)
    for t, batch in enumerate(batches):
        if t >= config.steps:
            break
        x = _check_inputs(batch, "train_sae_batches", 2)
        if state is None:
            _check_config(config, x.shape[1])
            params = init_sae(key_init, x.shape[1], config.n_features, b_dec=x.mean(0))
            state = train_lib.init_train_state(params, optimizer)
            since = np.zeros(config.n_features, np.int64)
        elif x.shape[1] != state.params.w_dec.shape[1]:
            raise ValueError(f"train_sae_batches: batch {t} has width {x.shape[1]}; earlier batches had "
                             f"{state.params.w_dec.shape[1]}.")
        state, metrics = step_fn(state, {"x": x})
        losses.append(metrics["loss"])
        since = np.where(np.asarray(metrics["fired"]), 0, since + 1)
        step = t + 1
        if config.resample_every > 0 and step % config.resample_every == 0 and step <= last_resample:
            dead = since >= config.dead_after
            if dead.any():
                state = _resample_state(state, optimizer, jnp.asarray(dead), x, config.k,
                                        jax.random.fold_in(key_loop, step))
                since[dead] = 0
                n_resampled += int(dead.sum())
        bar.update(1)
    bar.close()
    if state is None:
        raise ValueError("train_sae_batches: the iterator yielded no batch.")
    return state.params, SAETrainInfo(jnp.stack(losses), jnp.asarray(n_resampled), jnp.asarray(since))


def _resample_state(state: Any, optimizer: optax.GradientTransformation, dead: Array, pool: Array, k: int,
                    key: Array) -> Any:
    params = resample_dead(state.params, dead, pool, k, key)
    d = params.w_dec.shape[1]
    mask = SAEParams(dead[None, :], dead, dead[:, None], jnp.zeros((d,), bool))
    # Fresh Adam moments for the re-initialised features: old ones belong to a dead direction.
    opt_state = optax.tree_utils.tree_map_params(optimizer, lambda s, m: jnp.where(m, 0.0, s), state.opt_state, mask)
    return state._replace(params=params, opt_state=opt_state)


# Pretrained SAEs and the splice live in their own module; they are part of this one's API.
from idesign._sae_pretrained import (ARCHITECTURES, NORMALIZATIONS, SAE, Splice,  # noqa: E402,F401
                                     load_gemma_scope, load_saelens)
