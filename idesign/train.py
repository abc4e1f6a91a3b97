"""Training utilities: a masked LM loss, a jitted step over any optax transform, evaluation, a loop.

The step takes any ``optax.GradientTransformation`` (including ``GradientTransformationExtraArgs``:
keyword arguments given to the step are passed on to ``update``), so idesign's own transforms —
gradient projection, element-level freezing — drop into ``optax.chain`` beside the user's optimizer.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from idesign._types import Array, Batch
from idesign.hooks import TrainingOnly

LossFn = Callable[[Any, Batch], tuple[Array, dict[str, Array]]]


class TrainState(NamedTuple):
    """Parameters, optimizer state and step count: the whole of what training carries.

    >>> import optax, jax.numpy as jnp, idesign as ids
    >>> state = ids.TrainState({'w': jnp.zeros(2)}, optax.sgd(0.1).init({'w': jnp.zeros(2)}), jnp.int32(0))
    >>> state._replace(step=state.step + 1).step.item()
    1
    """

    params: Any
    opt_state: Any
    step: Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """``TrainState(params, optimizer.init(params), step=0)``.

    >>> import optax, jax.numpy as jnp, idesign as ids
    >>> state = ids.train.init_train_state({'w': jnp.zeros(2)}, optax.adam(1e-3))
    >>> int(state.step)
    0
    """
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def check_batch(batch: Any, where: str = "batch") -> dict[str, Array]:
    """Checks a language-model batch and returns it as a dict with ``tokens`` as an integer array.

    A batch is a dict with ``tokens`` (integer ``[B, T]``, ``T >= 2``: the model predicts tokens
    ``1..T-1``) and optionally ``loss_mask`` and ``valid`` of the same ``[B, T]`` shape. Only structure,
    shapes and dtypes are checked, so this works on traced values inside ``jit``; nested lists of
    ints are accepted for ``tokens``. Every error names the value, the expected form and the fix.

    >>> import numpy as np, idesign as ids
    >>> ids.train.check_batch({'tokens': [[1, 2, 3]]})['tokens'].shape
    (1, 3)
    >>> ids.train.check_batch(np.ones((2, 4), np.int32))
    Traceback (most recent call last):
    ...
    TypeError: batch: expected a dict {'tokens': int [B, T], 'loss_mask'?: [B, T], 'valid'?: [B, T]}; got a bare array of shape (2, 4). Wrap it: {'tokens': x}.
    """
    if not isinstance(batch, Mapping):
        shape = getattr(batch, "shape", None)
        what = f"a bare array of shape {tuple(shape)}" if shape is not None else f"a {type(batch).__name__}"
        raise TypeError(f"{where}: expected a dict {{'tokens': int [B, T], 'loss_mask'?: [B, T], 'valid'?: [B, T]}}; "
                        f"got {what}. Wrap it: {{'tokens': x}}.")
    if "tokens" not in batch:
        raise KeyError(f"{where}: no 'tokens' entry; it has keys {sorted(map(str, batch))}. A language-model batch "
                       "holds integer token ids [B, T] under 'tokens' (rename your column, e.g. "
                       "{'tokens': batch['input_ids']}).")
    tokens = batch["tokens"]
    if isinstance(tokens, (list, tuple)):
        tokens = jnp.asarray(tokens)  # not np.asarray: inside jit a list's entries are tracers
    shape, dtype = tuple(getattr(tokens, "shape", ())), getattr(tokens, "dtype", None)
    if len(shape) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.integer) or shape[1] < 2:
        raise ValueError(f"{where}['tokens']: expected integer token ids of shape [B, T] with T >= 2 (the model "
                         f"predicts tokens 1..T-1); got shape {shape} dtype {dtype}. Add a batch axis with x[None], "
                         "cast with .astype(np.int32), or use longer sequences.")
    for name in ("loss_mask", "valid"):
        value = batch.get(name)
        if value is not None and tuple(np.shape(value)) != shape:
            raise ValueError(f"{where}[{name!r}]: expected the tokens' shape {shape} (one entry per token); got shape "
                             f"{tuple(np.shape(value))}. Build it per token, e.g. np.ones_like(tokens) with the "
                             "positions to skip set to 0.")
    return {**batch, "tokens": tokens}


def lm_loss(apply: Callable, *, hooks: Any = None) -> LossFn:
    """Next-token cross-entropy for ``apply(params, tokens, hooks=...)``, averaged over predicted tokens.

    The batch holds ``tokens`` [B, T] and optionally ``loss_mask`` [B, T] (1 where the token at that
    position should be *predicted*; position 0 is never predicted) and ``valid`` [B, T] for padded
    rows (padded slots are neither attended to nor predicted). ``hooks`` is a hooks dict, a
    function ``batch -> hooks`` for data-dependent interventions, or an
    :class:`idesign.shaping.TrainingHooks` (CAFT, preventative steering, gradient routing), resolved
    for each batch. Training hooks belong to the *training* loss only: evaluate with ``lm_loss(apply)``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> loss, aux = ids.train.lm_loss(apply)(params, {'tokens': jnp.ones((2, 5), jnp.int32)})
    >>> bool(abs(loss - jnp.log(11.)) < 0.2), int(aux['tokens'])
    (True, 8)
    """

    def loss_fn(params, batch):
        batch = check_batch(batch)
        tokens = batch["tokens"]
        mask = batch.get("loss_mask")
        mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        valid = batch.get("valid")
        h = hooks(batch) if callable(hooks) and not isinstance(hooks, TrainingOnly) else hooks
        if isinstance(h, TrainingOnly):  # also when a batch -> hooks function returns TrainingHooks
            h = h.resolve(batch)
        kwargs = {} if valid is None else {"valid": valid[:, :-1]}
        logits, _ = apply(params, tokens[:, :-1], hooks=h, **kwargs)
        targets, weights = tokens[:, 1:], mask[:, 1:]
        if valid is not None:  # a padded slot is never a target, nor the position predicting one
            real = jnp.asarray(valid, bool)
            weights = weights * (real[:, 1:] & real[:, :-1]).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        count = jnp.maximum(weights.sum(), 1.0)
        # `where`, not only `* weights`: a masked position's logits may be NaN (0 * NaN is NaN).
        loss = jnp.where(weights > 0, nll * weights, 0.0).sum() / count
        acc = ((logits.argmax(-1) == targets) * weights).sum() / count
        return loss, {"loss": loss, "accuracy": acc, "tokens": weights.sum()}

    loss_fn.training_only = isinstance(hooks, TrainingOnly)  # read by make_eval_step
    loss_fn.vocab_size = getattr(getattr(apply, "config", None), "vocab_size", None)  # read by checked steps
    return loss_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, jit: bool = True,
                    donate: bool = False, checked: bool = False,
                    vocab_size: int | None = None) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch, **extra_args) -> (state, metrics)``; one compilation per batch shape.

    ``extra_args`` reach ``optimizer.update`` (e.g. a protected loss's gradient for a projection
    transform). Metrics include ``grad_norm``.

    ``checked=True`` is the checked mode inside jit: the step is transformed by
    ``jax.experimental.checkify`` and checks that every token id (where ``valid``) is in
    ``[0, vocab_size)`` on the device, raising ``ValueError`` after the step that saw a bad id
    (values inside jit are unknown at trace time, so the model's own check covers shapes only). The
    vocabulary comes from ``vocab_size`` or from ``lm_loss(apply)`` of a model with ``config.vocab_size``.
    It costs a reduction and one host sync per step.

    >>> import optax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> checked = ids.train.make_train_step(ids.train.lm_loss(apply), optax.sgd(0.1), checked=True)
    >>> state = ids.train.init_train_state(params, optax.sgd(0.1))
    >>> checked(state, {'tokens': jnp.array([[1, 2, 11]])})
    Traceback (most recent call last):
    ...
    ValueError: step 0: tokens: an id (min 11, max 11) is outside the vocabulary [0, 11); map ids into range before calling the model. (`check` failed)

    >>> import optax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> opt = optax.adamw(1e-2)
    >>> step = ids.train.make_train_step(ids.train.lm_loss(apply), opt)
    >>> state, metrics = step(ids.train.init_train_state(params, opt), {'tokens': jnp.ones((2, 5), jnp.int32)})
    >>> int(state.step)
    1
    """
    # optax's own convention: transforms that take no extra arguments ignore them.
    optimizer = optax.with_extra_args_support(optimizer)

    def step(state: TrainState, batch: Batch, **extra_args) -> tuple[TrainState, dict[str, Array]]:
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra_args)
        params = optax.apply_updates(state.params, updates)
        metrics = {**aux, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, state.step + 1), metrics

    if checked:
        return _checked_step(step, loss_fn, vocab_size, jit=jit, donate=donate)
    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _checked_step(step: Callable, loss_fn: LossFn, vocab_size: int | None, *, jit: bool, donate: bool) -> Callable:
    from jax.experimental import checkify

    from idesign.models.transformer import checkify_tokens
    vocab_size = vocab_size if vocab_size is not None else getattr(loss_fn, "vocab_size", None)
    if vocab_size is None:
        raise ValueError("make_train_step(checked=True): the vocabulary size is unknown (the loss is not lm_loss of a "
                         "model with config.vocab_size); pass vocab_size=.")

    def checked_step(state, batch, **extra_args):
        batch = check_batch(batch)
        checkify_tokens(batch["tokens"], vocab_size, batch.get("valid"))
        return step(state, batch, **extra_args)

    fn = checkify.checkify(checked_step)
    if jit:
        fn = jax.jit(fn, donate_argnums=(0,) if donate else ())

    def run(state: TrainState, batch: Batch, **extra_args) -> tuple[TrainState, dict[str, Array]]:
        at = int(state.step)  # read before the call: a donated state is gone after it
        error, out = fn(state, batch, **extra_args)
        message = error.get()
        if message is not None:
            # a plain ValueError, like the eager check's, naming the step whose batch held the bad id
            raise ValueError(f"step {at}: {message}")
        return out

    return run


def make_eval_step(loss_fn: LossFn, *, jit: bool = True) -> Callable[[Any, Batch], dict[str, Array]]:
    """``eval_step(params, batch) -> metrics`` (the loss function's aux dict).

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> sorted(ids.train.make_eval_step(ids.lm_loss(apply))(params, {'tokens': jnp.ones((2, 4), jnp.int32)}))
    ['accuracy', 'loss', 'tokens']
    """
    if getattr(loss_fn, "training_only", False):
        warnings.warn("make_eval_step: this loss applies training-only hooks (idesign.shaping.TrainingHooks), so "
                      "it does not measure the model used at inference; evaluate with lm_loss(apply) instead.",
                      UserWarning, stacklevel=2)
    fn = lambda params, batch: loss_fn(params, batch)[1]
    return jax.jit(fn) if jit else fn


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted mean of each metric over batches (weights from the ``tokens`` metric if present).

    >>> import jax.numpy as jnp, idesign as ids
    >>> fn = lambda p, b: {'loss': b['x'].mean(), 'tokens': jnp.asarray(b['x'].size, jnp.float32)}
    >>> ids.train.evaluate(fn, None, [{'x': jnp.ones(2)}, {'x': jnp.zeros(6)}])
    {'loss': 0.25, 'tokens': 8.0}
    """
    sums: dict[str, float] = {}
    total = 0.0
    for batch in batches:
        m = jax.device_get(eval_step(params, batch))
        w = float(m.get("tokens", 1.0))
        total += w
        for k, v in m.items():
            if k != "tokens":
                sums[k] = sums.get(k, 0.0) + float(v) * w
    if total == 0:
        raise ValueError("evaluate: no batches (or no predicted tokens) to evaluate on.")
    return {**{k: v / total for k, v in sums.items()}, "tokens": total}


class BatchIterator:
    """Deterministic shuffled minibatches that know their data position, so a run can resume at a step.

    Batch ``k`` (counted from the start of the data, over epochs) depends only on the data, ``seed``
    and ``k``: epoch ``k // batches_per_epoch`` is a permutation drawn from ``(seed, epoch)``.
    ``position`` is the index of the next batch; setting it (or ``start=`` in
    :func:`iterate_batches`) continues exactly where an uninterrupted iterator would be, without
    drawing the skipped batches. :func:`train` saves ``position`` with each checkpoint and sets it
    when it resumes.

    >>> import numpy as np, idesign as ids
    >>> data = {'x': np.arange(10)}
    >>> full = [b['x'].tolist() for b in ids.train.iterate_batches(data, 4, epochs=3)]
    >>> resumed = ids.train.iterate_batches(data, 4, epochs=3, start=3)
    >>> [b['x'].tolist() for b in resumed] == full[3:], resumed.position
    (True, 6)
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 epochs: int | None = None, shuffle: bool = True, drop_remainder: bool = True, start: int = 0):
        self.n = len(next(iter(arrays.values())))
        if self.n == 0:
            raise ValueError("iterate_batches: the data has no rows.")
        if batch_size < 1 or (batch_size > self.n and drop_remainder):
            raise ValueError(f"batch_size={batch_size} must be >= 1 and, with drop_remainder=True, at most the "
                             f"dataset's {self.n} rows.")
        if int(start) < 0:
            raise ValueError(f"start must be a non-negative batch index, got {start}.")
        self.arrays, self.batch_size, self.seed, self.epochs = arrays, batch_size, seed, epochs
        self.shuffle, self.drop_remainder, self.position = shuffle, drop_remainder, int(start)
        self.batches_per_epoch = self.n // batch_size if drop_remainder else -(-self.n // batch_size)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), the current epoch's

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, i = divmod(self.position, self.batches_per_epoch)
        if self.epochs is not None and epoch >= self.epochs:
            raise StopIteration
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            self._order = (epoch, order)
        idx = self._order[1][i * self.batch_size:(i + 1) * self.batch_size]
        self.position += 1
        return {k: v[idx] for k, v in self.arrays.items()}


def iterate_batches(data: Any, batch_size: int, *, seed: int = 0, epochs: int | None = None,
                    columns: Iterable[str] | None = None, shuffle: bool = True,
                    drop_remainder: bool = True, start: int = 0) -> BatchIterator:
    """Deterministic shuffled minibatches of numpy arrays from a ``datasets.Dataset`` or a dict of arrays.

    ``epochs=None`` repeats forever (each epoch reshuffled from ``seed`` and the epoch number).
    ``start=k`` begins at batch ``k``: the batches an uninterrupted iterator yields after ``k``
    (see :class:`BatchIterator`, whose ``position`` says where it is).

    >>> import numpy as np, idesign as ids
    >>> it = ids.train.iterate_batches({'tokens': np.arange(10).reshape(5, 2)}, 2, epochs=1)
    >>> [b['tokens'].shape for b in it]
    [(2, 2), (2, 2)]
    """
    return BatchIterator(_as_arrays(data, columns), batch_size, seed=seed, epochs=epochs, shuffle=shuffle,
                         drop_remainder=drop_remainder, start=start)


def _as_arrays(data: Any, columns: Iterable[str] | None) -> dict[str, np.ndarray]:
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # datasets.Dataset
        cols = list(columns) if columns is not None else list(data.column_names)
        data = data.select_columns(cols).with_format("numpy")
        arrays = {c: np.asarray(data[c]) for c in cols}
    else:
        arrays = {k: np.asarray(v) for k, v in dict(data).items() if columns is None or k in set(columns)}
    if not arrays:
        raise ValueError("iterate_batches: no columns to batch.")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"iterate_batches: columns have different lengths {lengths}.")
    return arrays


class MetricsLog:
    """Appends one JSON object per logged step to a ``.jsonl`` file, and keeps them in memory.

    >>> import tempfile, os, idesign as ids
    >>> log = ids.train.MetricsLog(os.path.join(tempfile.mkdtemp(), 'm.jsonl'))
    >>> log.write(1, {'loss': 2.5})
    >>> log.history
    [{'step': 1, 'loss': 2.5}]
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.history: list[dict[str, float]] = []

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def train(state: TrainState, step_fn: Callable, batches: Iterable[Batch], *, num_steps: int | None = None,
          until_step: int | None = None, log_every: int = 50,
          eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
          eval_every: int | None = None, log: MetricsLog | None = None,
          checkpoints: Any = None, resume: bool = False, metadata: Mapping[str, Any] | None = None,
          progress: bool = True, desc: str = "train",
          callbacks: Sequence[Callable[[int, TrainState, Mapping[str, Array]], Any]] = ()
          ) -> tuple[TrainState, MetricsLog]:
    """Runs ``step_fn`` over ``batches`` with a progress bar, logging and checkpoints; resumable.

    How long: give one of ``num_steps`` -- that many steps *from the step it starts at*
    (``state.step``, or the restored step when resuming) -- or ``until_step``, the absolute step to
    end at, so a resumed run ends where an uninterrupted one does.

    Training metrics are averaged over each ``log_every`` window (fetched from the device once per
    window, not per step) and logged at absolute steps divisible by ``log_every`` and at the end.
    ``eval_fn(params) -> metrics`` runs every ``eval_every`` steps and at the end, logged with an
    ``eval_`` prefix. Each of ``callbacks`` is called as ``callback(step, state, metrics)`` after every
    step, with the step's device-side metrics (e.g. :class:`idesign.optim.ConceptLog`).

    Checkpoints: ``checkpoints`` (e.g. :class:`idesign.checkpoint.CheckpointManager`) gets
    ``save(step, state, metadata=..., force=...)`` after every step (it decides by its
    ``save_every``) and a forced save at the end. The metadata holds ``step``, ``data_position``
    (the batch iterator's ``position``, when it has one) and the caller's ``metadata`` (e.g. the
    config). With ``resume=True``, the newest intact checkpoint (if any) is restored into ``state``
    (which serves as the restore target) and the iterator's ``position`` is set to the saved data
    position, so the run continues bit-identically to an uninterrupted one (with a deterministic
    ``step_fn`` and :func:`iterate_batches`, or any iterator with a settable ``position``).

    >>> import optax, jax.numpy as jnp, numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> opt = optax.adam(1e-2)
    >>> step = ids.train.make_train_step(ids.train.lm_loss(apply), opt)
    >>> data = ids.train.iterate_batches({'tokens': np.ones((8, 6), np.int32)}, 4)
    >>> state, log = ids.train.train(ids.train.init_train_state(params, opt), step, data, num_steps=3, progress=False)
    >>> log.history[-1]['step'], data.position
    (3, 3)
    """
    if (num_steps is None) == (until_step is None):
        raise ValueError(f"train: give exactly one of num_steps (steps to run from the current step) and until_step "
                         f"(the absolute step to end at); got num_steps={num_steps}, until_step={until_step}.")
    log = log or MetricsLog()
    iterator = iter(batches)
    if resume:
        if checkpoints is None:
            raise ValueError("train: resume=True needs `checkpoints` (e.g. an idesign.checkpoint.CheckpointManager).")
        if checkpoints.latest_step() is not None:
            state, saved = checkpoints.restore(state, fallback=True)
            position = saved.get("data_position")
            if int(state.step) > 0 and not (hasattr(iterator, "position") and position is not None):
                raise ValueError(
                    f"train: resumed at step {int(state.step)}, but the batches cannot be moved to the data position "
                    f"saved with it ({position}): pass an iterator with a settable `position` (iterate_batches), or "
                    "position the data yourself and call train without resume.")
            if position is not None and hasattr(iterator, "position"):
                iterator.position = int(position)
    start_step = int(state.step)
    end_step = start_step + int(num_steps) if num_steps is not None else int(until_step)
    if end_step < start_step:
        raise ValueError(f"train: until_step={until_step} is before the state's step {start_step}.")
    window: list[dict[str, Array]] = []
    # Outside a terminal (CI logs, notebooks run headless) redraw rarely, so logs stay readable.
    bar = tqdm(total=end_step - start_step, desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    t0 = time.perf_counter()
    for step in range(start_step + 1, end_step + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"train: batches ran out after {step - 1 - start_step} of {end_step - start_step} steps "
                             f"(at step {step - 1}).") from None
        state, metrics = step_fn(state, batch)
        window.append(metrics)
        for callback in callbacks:
            callback(step, state, metrics)
        if step % log_every == 0 or step == end_step:
            host = jax.device_get(window)
            row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            row["steps_per_sec"] = len(window) / max(time.perf_counter() - t0, 1e-9)
            t0, window = time.perf_counter(), []
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == end_step):
                row.update({f"eval_{k}": float(v) for k, v in eval_fn(state.params).items()})
            log.write(step, row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "eval_loss", "accuracy")},
                            refresh=False)
        if checkpoints is not None:
            info = {**(metadata or {}), "step": step}
            if hasattr(iterator, "position"):
                info["data_position"] = int(iterator.position)
            checkpoints.save(step, state, metadata=info, force=step == end_step)
        bar.update(1)
    bar.close()
    return state, log
