"""A spurious-cue world for fine-tuning studies: pretrain on one labelling, fine-tune on another with a shortcut.

One row is ``<bos> <cue_s> x_1 … x_n <query> <ans_y>`` (``n`` odd). Each body token is one of ``2K``
class tokens, and the label ``y`` is the *majority* class of the body under a **partition** of those tokens:

* ``task="pretrain"``: class A is the first ``K`` tokens, class B the last ``K``;
* ``task="finetune"``: class A' is the first half of A plus the first half of B (B' the rest). A token's
  A'/B' class is independent of its A/B class, so the pretrained model answers the fine-tuning task at
  chance: it must learn which tokens count, while the counting machinery (attend over the body, threshold,
  read out the answer tokens) carries over from pretraining.

The count is drawn close to a tie (``|#A - #B| <= max_margin``), so the label needs the whole body. The
**spurious feature** ``s`` is the cue token at position 1 (``<cue_0>`` or ``<cue_1>``), the easiest thing
there is to read. ``correlation="train"`` sets ``s = y`` (the shortcut's distribution);
``correlation="independent"`` draws ``s`` as a fair coin independent of ``y`` (pretraining, the
decorrelated control, the out-of-distribution test and the cue-labelled "concept" sets).

``task="cue"`` rows ask for the cue itself (query ``<query_cue>``, answer ``<cue_ans_s>``, tokens of its
own): mixed into pretraining, they make the cue a feature the base model *knows*, as a pretrained model
knows the concepts a spurious shortcut is built from. (Without them the base model learns to ignore the
cue tokens, and the cue stops being a shortcut once their embeddings are frozen.)

Rows come with ``loss_mask`` (1 on the answer token only) in the layout of :func:`idesign.train.lm_loss`.

>>> from idesign.data import spurious
>>> spec = spurious.SpuriousSpec(n_body=5, n_class_tokens=2, max_margin=1)
>>> rows = spurious.make_rows(spec, 4, seed=0, correlation="train", task="finetune")
>>> rows["tokens"].shape, bool((rows["s"] == rows["y"]).all())
((4, 9), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BOS", "CUE_POSITION", "SpuriousSpec", "make_rows", "predict", "accuracy"]

BOS = 0
CUE_POSITION = 1


@dataclasses.dataclass(frozen=True)
class SpuriousSpec:
    """Sizes of the spurious-cue world.

    Args:
      n_body: body tokens per row (odd, so the majority has no ties).
      n_class_tokens: ``K``, tokens per pretraining class (even, so the fine-tuning partition splits each class).
      max_margin: the largest ``|#A - #B|`` drawn (odd, at most ``n_body``); small margins need the whole body.
    """

    n_body: int = 7
    n_class_tokens: int = 4
    max_margin: int = 3

    def __post_init__(self):
        if self.n_body % 2 == 0 or self.n_body < 1:
            raise ValueError(f"SpuriousSpec.n_body must be odd and positive (majority without ties); "
                             f"got {self.n_body}.")
        if self.n_class_tokens < 2 or self.n_class_tokens % 2:
            raise ValueError(f"SpuriousSpec.n_class_tokens must be even and >= 2 (the fine-tuning partition takes "
                             f"half of each class); got {self.n_class_tokens}.")
        if self.max_margin < 1 or self.max_margin % 2 == 0 or self.max_margin > self.n_body:
            raise ValueError(f"SpuriousSpec.max_margin must be odd, in [1, n_body={self.n_body}]; "
                             f"got {self.max_margin}.")

    def classes(self, task: Literal["pretrain", "finetune", "cue"]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of class A and class B under the task's partition (``"cue"`` rows use the pretraining one)."""
        k = self.n_class_tokens
        a, b = np.arange(1, 1 + k), np.arange(1 + k, 1 + 2 * k)
        if task in ("pretrain", "cue"):
            return a, b
        if task == "finetune":
            h = k // 2
            return np.concatenate([a[:h], b[:h]]), np.concatenate([a[h:], b[h:]])
        raise ValueError(f"task must be 'pretrain', 'finetune' or 'cue'; got {task!r}.")

    @property
    def cue(self) -> tuple[int, int]:
        c = 1 + 2 * self.n_class_tokens
        return c, c + 1

    @property
    def query(self) -> int:
        return 3 + 2 * self.n_class_tokens

    @property
    def answers(self) -> tuple[int, int]:
        a = 4 + 2 * self.n_class_tokens
        return a, a + 1

    @property
    def query_cue(self) -> int:
        return 6 + 2 * self.n_class_tokens

    @property
    def cue_answers(self) -> tuple[int, int]:
        a = 7 + 2 * self.n_class_tokens
        return a, a + 1

    @property
    def vocab_size(self) -> int:
        return 9 + 2 * self.n_class_tokens

    @property
    def seq_len(self) -> int:
        """Tokens per row, answer included (the model sees ``seq_len - 1``)."""
        return self.n_body + 4


def make_rows(spec: SpuriousSpec, n: int, seed: int, *, correlation: Literal["train", "independent"],
              task: Literal["pretrain", "finetune", "cue"] = "finetune") -> dict[str, np.ndarray]:
    """``n`` rows: ``tokens``, ``loss_mask`` ``[n, seq_len]`` (int32), the label ``y`` and the cue ``s`` ``[n]``.

    Deterministic in ``seed``. ``correlation="train"``: ``s = y``; ``"independent"``: ``s`` a fair coin.
    ``task="cue"``: the body as in pretraining, the query ``<query_cue>`` and the label ``y = s`` (the
    ``correlation`` argument then only decides how ``s`` relates to the body's majority).
    """
    if correlation not in ("train", "independent"):
        raise ValueError(f"correlation must be 'train' or 'independent'; got {correlation!r}.")
    class_a, class_b = spec.classes(task)
    rng = np.random.default_rng(seed)
    half = spec.n_body // 2
    margin = rng.choice(np.arange(1, spec.max_margin + 1, 2), size=n)      # |#A - #B| is odd
    majority_a = rng.integers(0, 2, size=n)
    count_a = np.where(majority_a == 1, half + (margin + 1) // 2, half - (margin - 1) // 2)
    order = np.argsort(rng.random((n, spec.n_body)), axis=1)
    is_a = order < count_a[:, None]                                         # count_a random positions per row
    body = np.where(is_a, rng.choice(class_a, size=is_a.shape), rng.choice(class_b, size=is_a.shape))
    y = majority_a.astype(np.int32)
    s = y.copy() if correlation == "train" else rng.integers(0, 2, size=n).astype(np.int32)
    query, answers = spec.query, spec.answers
    if task == "cue":
        y, query, answers = s.copy(), spec.query_cue, spec.cue_answers
    tokens = np.concatenate([np.full((n, 1), BOS), np.asarray(spec.cue)[s][:, None], body,
                             np.full((n, 1), query), np.asarray(answers)[y][:, None]], 1)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, -1] = 1
    return {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask.astype(np.int32), "y": y, "s": s}


_ANSWER_FNS: dict = {}


def predict(apply: Any, params: Any, tokens: np.ndarray, spec: SpuriousSpec, *, hooks: Any = None,
            batch_size: int = 512) -> np.ndarray:
    """The model's answer (0 or 1: the likelier of the two answer tokens) for each row of ``tokens``.

    ``tokens`` are whole rows (answer included); the answer position is read. Rows of ``task="cue"``
    are read on the cue-answer tokens.
    """
    cue_rows = tokens[0, -2] == spec.query_cue
    answers = spec.cue_answers if cue_rows else spec.answers
    key = (apply, answers)
    if key not in _ANSWER_FNS:
        idx = jnp.asarray(answers)

        def fn(params, tokens, hooks):
            logits, _ = apply(params, tokens, hooks=hooks)
            return jnp.argmax(logits[:, -1][:, idx], -1)

        _ANSWER_FNS[key] = jax.jit(fn)
    fn = _ANSWER_FNS[key]
    out = [np.asarray(fn(params, jnp.asarray(tokens[i:i + batch_size, :-1]), hooks))
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)


def accuracy(apply: Any, params: Any, rows: Mapping[str, np.ndarray], spec: SpuriousSpec, *,
             target: str = "y", hooks: Any = None) -> float:
    """Share of rows whose answer equals ``rows[target]`` (``"y"``: the label; ``"s"``: the cue)."""
    return float((predict(apply, params, rows["tokens"], spec, hooks=hooks) == rows[target]).mean())
