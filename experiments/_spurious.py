"""The spurious-cue task of ``experiments/dont_fight_backprop.py``: data, answer accuracy, probe positions.

One row is ``<bos> <cue_s> x_1 … x_n <query> <ans_y>``:

* the **true feature** ``y`` is the majority class of the ``n`` body tokens (``n`` odd; each body token is
  one of ``n_class_tokens`` tokens of class A or of class B). Counting needs the whole body, and the
  count is drawn close to a tie (margin at most ``max_margin``), so the feature is slow to learn;
* the **spurious feature** ``s`` is the cue token at position 1 (``<cue_0>`` or ``<cue_1>``): one token
  at a fixed position, the easiest thing there is to read.

``correlation="train"`` sets ``s = y`` (perfectly correlated, the training distribution);
``correlation="independent"`` draws ``s`` as a fair coin independent of ``y`` (the OOD test set, and the
"concept" sets a user would build to find the cue's direction: labelled by ``s`` only).

A second task for the continual-learning section reuses the same bodies with another query token
(``<query_b>``) and asks for the class of the *first* body token; it answers with the same two answer
tokens, so the two tasks share the output head and must be told apart by the query.

Rows come with ``loss_mask`` (1 on the answer token only) in the layout of :func:`idesign.train.lm_loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

BOS = 0
CUE_POSITION = 1


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Sizes of the spurious-cue task (``n_body`` odd)."""

    n_body: int = 7
    n_class_tokens: int = 4
    max_margin: int = 3

    def __post_init__(self):
        if self.n_body % 2 == 0 or self.n_body < 1:
            raise ValueError(f"TaskSpec.n_body must be odd and positive (majority without ties); got {self.n_body}.")
        if self.max_margin < 1 or self.max_margin % 2 == 0 or self.max_margin > self.n_body:
            raise ValueError(f"TaskSpec.max_margin must be odd, in [1, n_body={self.n_body}]; got {self.max_margin}.")

    # token ids
    @property
    def class_a(self) -> np.ndarray:
        return np.arange(1, 1 + self.n_class_tokens)

    @property
    def class_b(self) -> np.ndarray:
        return np.arange(1 + self.n_class_tokens, 1 + 2 * self.n_class_tokens)

    @property
    def cue(self) -> tuple[int, int]:
        c = 1 + 2 * self.n_class_tokens
        return c, c + 1

    @property
    def query(self) -> int:
        return 3 + 2 * self.n_class_tokens

    @property
    def query_b(self) -> int:
        return 4 + 2 * self.n_class_tokens

    @property
    def answers(self) -> tuple[int, int]:
        a = 5 + 2 * self.n_class_tokens
        return a, a + 1

    @property
    def vocab_size(self) -> int:
        return 7 + 2 * self.n_class_tokens

    @property
    def seq_len(self) -> int:
        """Tokens per row, answer included (the model sees ``seq_len - 1``)."""
        return self.n_body + 4


def make_rows(spec: TaskSpec, n: int, seed: int, *, correlation: Literal["train", "independent"],
              task: Literal["majority", "first"] = "majority") -> dict[str, np.ndarray]:
    """``n`` rows of the task: ``tokens``, ``loss_mask`` ``[n, seq_len]`` and the features ``y``, ``s`` ``[n]``.

    ``task="majority"`` (the main task) answers the body's majority class; ``task="first"`` (the
    continual section's task B, query ``<query_b>``) answers the class of the first body token.
    """
    if correlation not in ("train", "independent"):
        raise ValueError(f"correlation must be 'train' or 'independent'; got {correlation!r}.")
    rng = np.random.default_rng(seed)
    half = spec.n_body // 2
    margins = np.arange(1, spec.max_margin + 1, 2)                 # |#A - #B| is odd
    margin = rng.choice(margins, size=n)
    majority_a = rng.integers(0, 2, size=n)                         # 1: class A is the majority
    count_a = np.where(majority_a == 1, half + (margin + 1) // 2, half - (margin - 1) // 2)
    is_a = np.zeros((n, spec.n_body), bool)
    for i in range(n):
        is_a[i, rng.permutation(spec.n_body)[:count_a[i]]] = True
    body = np.where(is_a, rng.choice(spec.class_a, size=is_a.shape), rng.choice(spec.class_b, size=is_a.shape))
    y = (majority_a if task == "majority" else is_a[:, 0]).astype(np.int32)
    s = y.copy() if correlation == "train" else rng.integers(0, 2, size=n).astype(np.int32)
    cue = np.asarray(spec.cue)[s]
    answer = np.asarray(spec.answers)[y]
    query = spec.query if task == "majority" else spec.query_b
    tokens = np.concatenate([np.full((n, 1), BOS), cue[:, None], body, np.full((n, 1), query), answer[:, None]], 1)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, -1] = 1
    return {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask.astype(np.int32), "y": y, "s": s}


def predict(apply, params, tokens: np.ndarray, spec: TaskSpec, *, hooks=None, batch_size: int = 512) -> np.ndarray:
    """The model's answer (0 or 1: the likelier of the two answer tokens) for each row of ``tokens``."""
    fn = _answer_fn(apply, spec.answers)
    out = [np.asarray(fn(params, jnp.asarray(tokens[i:i + batch_size, :-1]), hooks))
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)


_ANSWER_FNS: dict = {}


def _answer_fn(apply, answers: tuple[int, int]):
    key = (apply, answers)
    if key not in _ANSWER_FNS:
        idx = jnp.asarray(answers)

        def fn(params, tokens, hooks):
            logits, _ = apply(params, tokens, hooks=hooks)
            return jnp.argmax(logits[:, -1][:, idx], -1)

        _ANSWER_FNS[key] = jax.jit(fn)
    return _ANSWER_FNS[key]


def accuracy(apply, params, rows: dict[str, np.ndarray], spec: TaskSpec, *, target: str = "y", hooks=None) -> float:
    """Share of rows whose answer equals ``rows[target]`` (``"y"``: the true label; ``"s"``: the cue)."""
    return float((predict(apply, params, rows["tokens"], spec, hooks=hooks) == rows[target]).mean())
