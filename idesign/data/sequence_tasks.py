"""Synthetic sequence tasks (reverse, sort, rotate, ...) that one model can learn side by side.

Each example is one fixed-length row: a task-id token says which rule to apply, the input is a random
sequence of symbols, and the answer is the rule applied to it::

    <bos> <reverse> s3 s1 s4 s1 -> s1 s4 s1 s3
    <bos> <sort>    s3 s1 s4 s1 -> s1 s1 s3 s4

Because the task token comes first, several tasks can share one model and one vocabulary, which is
what studies of interference need (learn T1 and T2, fine-tune on T3, measure what T1 kept). The
vocabulary does not depend on which tasks a dataset holds: every task has its own id, always.

=================  ===========================================================================
task               answer ``y`` for input ``x`` of length ``L``
=================  ===========================================================================
``copy``           ``x``
``reverse``        ``x[::-1]``
``sort``           ``x`` sorted ascending (by symbol index; repeats kept)
``rotate``         ``x`` rotated left by ``shift`` positions: ``y[i] = x[(i + shift) % L]``
``permute``        a fixed permutation of the positions: ``y[i] = x[perm[i]]``
``lookup``         a fixed bijection of the symbols, token by token: ``y[i] = table[x[i]]``
=================  ===========================================================================

``perm`` and ``table`` are drawn from ``rule_seed`` (not ``seed``), so a training set and a test set
drawn with different ``seed`` s follow the same rule. No task involves arithmetic on symbol values.

Token ids: ``0`` ``<pad>``, ``1`` ``<bos>``, ``2`` ``->`` (separator), then one id per task in the
order of :data:`TASKS`, then the symbols ``s0 .. s{n_symbols-1}``.

Rows have ``tokens`` and ``loss_mask`` (int32, length ``2 * length + 3``) in the layout of
:func:`idesign.train.lm_loss`: ``loss_mask[t] = 1`` exactly where ``tokens[t]`` is an answer token, so
the loss counts answer predictions only. :func:`answer_accuracy` scores exact match of the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import datasets
import jax
import jax.numpy as jnp
import numpy as np

TASKS: tuple[str, ...] = ("copy", "reverse", "sort", "rotate", "permute", "lookup")
PAD_ID, BOS_ID, SEP_ID = 0, 1, 2
FIRST_TASK_ID = 3
FIRST_SYMBOL_ID = FIRST_TASK_ID + len(TASKS)


def task_token_id(task: str) -> int:
    """The id of a task's task-id token (the same in every vocabulary).

    >>> task_token_id('copy'), task_token_id('reverse')
    (3, 4)
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}.")
    return FIRST_TASK_ID + TASKS.index(task)


def vocab_size(n_symbols: int) -> int:
    """Number of token ids for ``n_symbols`` symbols: 3 special tokens, one per task, the symbols.

    >>> vocab_size(16)
    25
    """
    if not _is_int(n_symbols) or n_symbols < 2:
        raise ValueError(f"n_symbols = {n_symbols!r}: expected an integer >= 2.")
    return FIRST_SYMBOL_ID + int(n_symbols)


def token_names(n_symbols: int) -> tuple[str, ...]:
    """A readable name for every token id (``<pad>``, ``<bos>``, ``->``, ``<copy>``, ..., ``s0``, ...).

    >>> token_names(2)
    ('<pad>', '<bos>', '->', '<copy>', '<reverse>', '<sort>', '<rotate>', '<permute>', '<lookup>', 's0', 's1')
    """
    vocab_size(n_symbols)
    return ("<pad>", "<bos>", "->", *(f"<{t}>" for t in TASKS), *(f"s{i}" for i in range(n_symbols)))


@dataclasses.dataclass(frozen=True)
class SequenceTaskConfig:
    """Which tasks, how many examples, and their shape; the dataset is a deterministic function of this.

    Attributes:
      tasks: names from :data:`TASKS`, each a task held by the dataset (no repeats).
      n_examples: examples *per task*.
      length: symbols in the input (and the answer), ``L``.
      n_symbols: size of the symbol alphabet.
      shift: rotation of ``rotate`` (``1 <= shift < length``).
      seed: seeds the inputs and the row order.
      rule_seed: seeds the fixed rules of ``permute`` and ``lookup``; keep it equal across the
        training and evaluation sets of one task.

    >>> SequenceTaskConfig(tasks=('reverse', 'sort'), length=4).seq_len
    11
    >>> SequenceTaskConfig(tasks=('add',))
    Traceback (most recent call last):
    ...
    ValueError: SequenceTaskConfig.tasks = ('add',): expected names from ('copy', 'reverse', 'sort', 'rotate', 'permute', 'lookup'); 'add' is not one of them.
    """

    tasks: tuple[str, ...] = ("reverse",)
    n_examples: int = 1000
    length: int = 6
    n_symbols: int = 16
    shift: int = 1
    seed: int = 0
    rule_seed: int = 0

    def __post_init__(self):
        if isinstance(self.tasks, str):
            _fail("tasks", self.tasks, "a tuple of task names, not a string (write ('reverse',))")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        _validate(self)
        for field in dataclasses.fields(self):
            if field.name != "tasks":
                object.__setattr__(self, field.name, int(getattr(self, field.name)))

    @property
    def seq_len(self) -> int:
        """Row length: ``<bos>``, task token, ``L`` inputs, ``->``, ``L`` answers."""
        return 2 * self.length + 3

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.n_symbols)

    @property
    def answer_slice(self) -> slice:
        """Where the answer sits in a row."""
        return slice(self.length + 3, 2 * self.length + 3)


def _fail(field: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"SequenceTaskConfig.{field} = {value!r}: expected {expected}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _validate(c: SequenceTaskConfig) -> None:
    if not c.tasks:
        _fail("tasks", c.tasks, f"a non-empty tuple of names from {TASKS}")
    for task in c.tasks:
        if task not in TASKS:
            _fail("tasks", c.tasks, f"names from {TASKS}; {task!r} is not one of them")
    if len(set(c.tasks)) != len(c.tasks):
        _fail("tasks", c.tasks, "no repeated task names")
    for name, low in (("n_examples", 1), ("length", 2), ("n_symbols", 2)):
        value = getattr(c, name)
        if not _is_int(value) or value < low:
            _fail(name, value, f"an integer >= {low}")
    if not _is_int(c.shift) or not 1 <= c.shift < c.length:
        _fail("shift", c.shift, f"an integer with 1 <= shift < length = {c.length}")
    for name in ("seed", "rule_seed"):
        if not _is_int(getattr(c, name)) or getattr(c, name) < 0:
            _fail(name, getattr(c, name), "an integer >= 0")


def _rng(seed: int, *purpose: str) -> np.random.Generator:
    # One stream per purpose, so adding a task to a config leaves the other tasks' examples alone.
    keys = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little") for p in purpose]
    return np.random.default_rng([seed, *keys])


def task_rules(config: SequenceTaskConfig) -> dict[str, np.ndarray]:
    """The fixed rules drawn from ``rule_seed``: ``permute`` (positions, ``[L]``), ``lookup`` (symbols, ``[n_symbols]``).

    Both are derangements (no position / symbol maps to itself), so no rule is the copy task in part.

    >>> rules = task_rules(SequenceTaskConfig(length=4, n_symbols=3))
    >>> sorted(rules), sorted(rules['permute'].tolist()), sorted(rules['lookup'].tolist())
    (['lookup', 'permute'], [0, 1, 2, 3], [0, 1, 2])
    """
    def derangement(n: int, purpose: str) -> np.ndarray:
        rng = _rng(config.rule_seed, "rule", purpose)
        while True:
            p = rng.permutation(n)
            if not np.any(p == np.arange(n)):
                return p
    return {"permute": derangement(config.length, "permute"), "lookup": derangement(config.n_symbols, "lookup")}


def solve(task: str, inputs: np.ndarray, config: SequenceTaskConfig) -> np.ndarray:
    """The answers of ``task`` for symbol indices ``inputs`` ``[N, L]`` (values ``0..n_symbols-1``).

    >>> c = SequenceTaskConfig(length=4, shift=1)
    >>> x = np.array([[3, 1, 4, 2]])
    >>> solve('reverse', x, c), solve('sort', x, c), solve('rotate', x, c)
    (array([[2, 4, 1, 3]]), array([[1, 2, 3, 4]]), array([[1, 4, 2, 3]]))
    """
    x = np.asarray(inputs)
    if x.ndim != 2 or x.shape[1] != config.length:
        raise ValueError(f"inputs must have shape [N, length={config.length}]; got {x.shape}.")
    if x.size and (x.min() < 0 or x.max() >= config.n_symbols):
        raise ValueError(f"inputs must be symbol indices in 0..{config.n_symbols - 1}; "
                         f"got values in {x.min()}..{x.max()}.")
    if task == "copy":
        return x.copy()
    if task == "reverse":
        return x[:, ::-1].copy()
    if task == "sort":
        return np.sort(x, axis=1)
    if task == "rotate":
        return np.roll(x, -config.shift, axis=1)
    if task == "permute":
        return x[:, task_rules(config)["permute"]]
    if task == "lookup":
        return task_rules(config)["lookup"][x]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}.")


def _rows(task: str, config: SequenceTaskConfig) -> np.ndarray:
    x = _rng(config.seed, "inputs", task).integers(0, config.n_symbols, (config.n_examples, config.length))
    y = solve(task, x, config)
    n = config.n_examples
    return np.concatenate([np.full((n, 1), BOS_ID), np.full((n, 1), task_token_id(task)),
                           x + FIRST_SYMBOL_ID, np.full((n, 1), SEP_ID), y + FIRST_SYMBOL_ID], axis=1)


def make_sequence_tasks(config: SequenceTaskConfig) -> datasets.Dataset:
    """``n_examples`` rows per task in ``config.tasks``, in a shuffled order; deterministic from the config.

    Args:
      config: a :class:`SequenceTaskConfig`.

    Returns:
      A ``datasets.Dataset`` with ``tokens`` and ``loss_mask`` (int32, length ``config.seq_len``) and
      ``task`` (the task name). Feed it to :func:`idesign.train.iterate_batches` with
      ``columns=['tokens', 'loss_mask']`` and train with :func:`idesign.train.lm_loss`.

    >>> data = make_sequence_tasks(SequenceTaskConfig(tasks=('reverse',), n_examples=2, length=3, n_symbols=4))
    >>> data.column_names, len(data)
    (['tokens', 'loss_mask', 'task'], 2)
    >>> describe(data[1]['tokens'], 4)
    '<bos> <reverse> s3 s0 s1 -> s1 s0 s3'
    >>> data[1]['loss_mask']
    [0, 0, 0, 0, 0, 0, 1, 1, 1]
    """
    tokens = np.concatenate([_rows(task, config) for task in config.tasks]).astype(np.int32)
    names = np.repeat(np.array(config.tasks), config.n_examples)
    order = _rng(config.seed, "order", *config.tasks).permutation(len(tokens))
    loss_mask = np.zeros(tokens.shape, np.int32)
    loss_mask[:, config.answer_slice] = 1
    features = datasets.Features({
        "tokens": datasets.List(datasets.Value("int32"), length=config.seq_len),
        "loss_mask": datasets.List(datasets.Value("int32"), length=config.seq_len),
        "task": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({"tokens": tokens[order].tolist(), "loss_mask": loss_mask[order].tolist(),
                                       "task": names[order].tolist()}, features=features)


def replay_mixture(new: datasets.Dataset, old: datasets.Dataset, fraction: float, *, seed: int = 0) -> datasets.Dataset:
    """All of ``new`` plus a random subset of ``old`` that makes up ``fraction`` of the result, shuffled.

    The fine-tuning set of a continual-learning update with a small replay buffer: ``fraction = 0.02``
    adds ``round(0.02 / 0.98 * len(new))`` old rows (the buffer is reused every epoch). ``fraction = 0``
    returns ``new`` shuffled.

    Raises:
      ValueError: ``fraction`` outside ``[0, 1)``, or more old rows asked for than ``old`` holds.

    >>> c = SequenceTaskConfig(tasks=('copy',), n_examples=98, length=3, n_symbols=4)
    >>> old = make_sequence_tasks(dataclasses.replace(c, tasks=('reverse', 'lookup'), n_examples=50))
    >>> mix = replay_mixture(make_sequence_tasks(c), old, 0.02)
    >>> len(mix), sorted(set(mix['task']))
    (100, ['copy', 'lookup', 'reverse'])
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction = {fraction!r}: expected 0 <= fraction < 1.")
    n_old = int(round(fraction / (1.0 - fraction) * len(new)))
    if n_old > len(old):
        raise ValueError(f"replay_mixture: {n_old} old rows needed for fraction {fraction} of {len(new)} new rows, "
                         f"but old holds {len(old)}.")
    rng = _rng(seed, "replay")
    picked = old.select(np.sort(rng.choice(len(old), size=n_old, replace=False)).tolist())
    if picked.features != new.features:
        picked = picked.cast(new.features)
    both = datasets.concatenate_datasets([new, picked]) if n_old else new
    return both.select(rng.permutation(len(both)).tolist())


def with_answers_of(data: Any, task: str, config: SequenceTaskConfig) -> dict[str, np.ndarray]:
    """The same prompts (task token included) with the answers ``task`` would give.

    Scoring a model on these rows with :func:`answer_correct` gives the share of prompts it answers *as*
    ``task``: e.g. T1 prompts answered as the new task T3 after fine-tuning (the "ignore the task token"
    shortcut). ``config`` supplies ``length``, ``n_symbols`` and the rules.

    >>> c = SequenceTaskConfig(tasks=('reverse',), n_examples=1, length=3, n_symbols=4)
    >>> row = with_answers_of(make_sequence_tasks(c), 'copy', c)
    >>> describe(make_sequence_tasks(c)[0]['tokens'], 4), describe(row['tokens'][0], 4)
    ('<bos> <reverse> s3 s0 s1 -> s1 s0 s3', '<bos> <reverse> s3 s0 s1 -> s3 s0 s1')
    """
    tokens, mask = _as_arrays(data)
    if tokens.shape[1] != config.seq_len:
        raise ValueError(f"rows have length {tokens.shape[1]}, but config.seq_len = {config.seq_len}.")
    inputs = tokens[:, 2:2 + config.length] - FIRST_SYMBOL_ID
    out = tokens.copy()
    out[:, config.answer_slice] = solve(task, inputs, config) + FIRST_SYMBOL_ID
    return {"tokens": out, "loss_mask": mask}


def edit_lookup(config: SequenceTaskConfig, n_edit: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fact edit of ``lookup``: ``n_edit`` keys (symbols) get new values; the other keys keep theirs.

    Returns ``(table, keys)``: the edited table ``[n_symbols]`` (every edited key maps to a value other than
    its old one, drawn from ``seed``) and the edited keys, sorted. Score a model on the edit with
    :func:`with_lookup_table` and :func:`rows_with_keys`.

    >>> c = SequenceTaskConfig(tasks=('lookup',), n_symbols=6)
    >>> table, keys = edit_lookup(c, 2, seed=0)
    >>> old = task_rules(c)['lookup']
    >>> len(keys), bool((table[keys] != old[keys]).all()), int((table != old).sum())
    (2, True, 2)
    """
    if not _is_int(n_edit) or not 1 <= n_edit <= config.n_symbols:
        raise ValueError(f"n_edit = {n_edit!r}: expected an integer in 1..n_symbols = {config.n_symbols}.")
    old = task_rules(config)["lookup"]
    rng = _rng(seed, "edit_lookup")
    keys = np.sort(rng.choice(config.n_symbols, size=n_edit, replace=False))
    table = old.copy()
    for k in keys:
        table[k] = rng.choice(np.delete(np.arange(config.n_symbols), old[k]))
    return table, keys


def with_lookup_table(data: Any, table: Any, config: SequenceTaskConfig) -> dict[str, np.ndarray]:
    """The same prompts answered token by token with ``table`` (``y[i] = table[x[i]]``), task token kept.

    On ``lookup`` rows with an edited table (:func:`edit_lookup`) these are the edited facts; on other
    tasks' prompts they measure the share answered as the edited lookup.

    >>> c = SequenceTaskConfig(tasks=('lookup',), n_examples=1, length=3, n_symbols=4)
    >>> describe(with_lookup_table(make_sequence_tasks(c), np.array([1, 2, 3, 0]), c)['tokens'][0], 4)
    '<bos> <lookup> s0 s1 s0 -> s1 s2 s1'
    """
    tokens, mask = _as_arrays(data)
    table = np.asarray(table)
    if table.shape != (config.n_symbols,) or table.min() < 0 or table.max() >= config.n_symbols:
        raise ValueError(f"table must have shape [n_symbols={config.n_symbols}] with values in "
                         f"0..{config.n_symbols - 1}; got shape {table.shape}.")
    if tokens.shape[1] != config.seq_len:
        raise ValueError(f"rows have length {tokens.shape[1]}, but config.seq_len = {config.seq_len}.")
    out = tokens.copy()
    out[:, config.answer_slice] = table[tokens[:, 2:2 + config.length] - FIRST_SYMBOL_ID] + FIRST_SYMBOL_ID
    return {"tokens": out, "loss_mask": mask}


def rows_with_keys(data: Any, keys: Any, config: SequenceTaskConfig) -> np.ndarray:
    """``[N]`` bool: does the row's input hold any of the symbols ``keys``?

    >>> c = SequenceTaskConfig(tasks=('lookup',), n_examples=2, length=3, n_symbols=4)
    >>> [describe(t, 4) for t in make_sequence_tasks(c)['tokens']], rows_with_keys(make_sequence_tasks(c), [2], c)
    (['<bos> <lookup> s1 s0 s2 -> s3 s1 s0', '<bos> <lookup> s0 s1 s0 -> s1 s3 s1'], array([ True, False]))
    """
    tokens, _ = _as_arrays(data)
    return np.isin(tokens[:, 2:2 + config.length] - FIRST_SYMBOL_ID, np.asarray(keys)).any(axis=1)


def describe(tokens: Any, n_symbols: int) -> str:
    """A row as readable text (see :func:`token_names`).

    >>> describe([1, 4, 9, 10, 2, 10, 9], 2)
    '<bos> <reverse> s0 s1 -> s1 s0'
    """
    names = token_names(n_symbols)
    ids = np.asarray(tokens).reshape(-1).tolist()
    bad = [i for i in ids if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{len(names) - 1} (n_symbols={n_symbols}).")
    return " ".join(names[i] for i in ids)


# --- evaluation ----------------------------------------------------------------------------------


def _as_arrays(data: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(data, "column_names"):  # datasets.Dataset
        missing = [c for c in ("tokens", "loss_mask") if c not in data.column_names]
        if missing:
            raise ValueError(f"data lacks column(s) {missing}; its columns are {data.column_names}.")
        data = data.select_columns(["tokens", "loss_mask"]).with_format("numpy")
    elif isinstance(data, Mapping):
        missing = [c for c in ("tokens", "loss_mask") if c not in data]
        if missing:
            raise ValueError(f"data lacks key(s) {missing}; its keys are {sorted(data)}.")
    else:
        raise TypeError(f"data must be a datasets.Dataset or a mapping with 'tokens' and 'loss_mask'; "
                        f"got {type(data).__name__}.")
    tokens, mask = np.asarray(data["tokens"]), np.asarray(data["loss_mask"])
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {mask.shape} must both be [N, T].")
    if not mask[:, 1:].any(axis=1).all():
        raise ValueError("every row needs at least one answer position (loss_mask = 1 at t >= 1).")
    return tokens.astype(np.int32), mask.astype(np.int32)


def _batch_correct(apply: Callable[..., Any], params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    logits, _ = apply(params, tokens[:, :-1])
    wrong = (logits.argmax(-1) != tokens[:, 1:]) & (mask[:, 1:] > 0)
    return ~wrong.any(axis=1)


# One compilation per (apply, batch shape): the last batch is padded to the same shape.
_batch_correct_jit = jax.jit(_batch_correct, static_argnums=(0,))


def answer_correct(apply: Callable[..., Any], params: Any, data: Any, *, batch_size: int = 256) -> np.ndarray:
    """Per row: does the greedy prediction get *every* answer token right?

    Scored in one teacher-forced forward pass per batch: each answer token is the argmax given the true
    tokens before it. All of them are right exactly when greedy decoding from the prompt reproduces
    the whole answer (the first wrong token is the first place the two runs differ), so this equals
    exact match of greedy generation without generating.

    Args:
      apply: ``apply(params, tokens) -> (logits, captured)`` (hashable, e.g. from
        :func:`idesign.init_transformer`; it is a static argument of the jitted scorer).
      params: its parameters.
      data: a dataset from :func:`make_sequence_tasks`, or a mapping with ``tokens`` and ``loss_mask`` ``[N, T]``.
      batch_size: rows per forward pass.

    Returns:
      ``[N]`` bool numpy array.

    >>> import idesign as ids
    >>> c = SequenceTaskConfig(n_examples=3, length=3, n_symbols=4)
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.vocab_size, d_model=8, n_heads=2, n_layers=1))
    >>> answer_correct(apply, params, make_sequence_tasks(c), batch_size=2).shape
    (3,)
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: expected an integer >= 1.")
    tokens, mask = _as_arrays(data)
    fn = _batch_correct_jit if _hashable(apply) else jax.jit(lambda p, t, m: _batch_correct(apply, p, t, m))
    size = min(batch_size, len(tokens))
    out = []
    for i in range(0, len(tokens), size):
        t, m = tokens[i:i + size], mask[i:i + size]
        n = len(t)
        if n < size:  # pad (padded rows are dropped below) so every batch has one shape
            t = np.concatenate([t, np.repeat(t[-1:], size - n, 0)])
            m = np.concatenate([m, np.repeat(m[-1:], size - n, 0)])
        args = (params, jnp.asarray(t), jnp.asarray(m))
        out.append(np.asarray(fn(apply, *args) if fn is _batch_correct_jit else fn(*args))[:n])
    return np.concatenate(out)


def answer_accuracy(apply: Callable[..., Any], params: Any, data: Any, *, batch_size: int = 256) -> float:
    """Share of rows whose whole answer the model gets right greedily (see :func:`answer_correct`).

    >>> import idesign as ids
    >>> c = SequenceTaskConfig(n_examples=4, length=3, n_symbols=4)
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.vocab_size, d_model=8, n_heads=2, n_layers=1))
    >>> 0.0 <= answer_accuracy(apply, params, make_sequence_tasks(c)) <= 1.0
    True
    """
    return float(answer_correct(apply, params, data, batch_size=batch_size).mean())


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
        return True
    except TypeError:
        return False
