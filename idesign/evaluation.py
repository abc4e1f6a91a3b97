"""Evaluators of trained language models on the synthetic worlds, beside :func:`idesign.train.evaluate`.

:mod:`idesign.data` builds worlds and imports nothing above itself; what scores a *model* on a
world lives here, on top of :func:`idesign.generate` (greedy decoding with a KV cache) and
:func:`idesign.train.evaluate` (token-weighted loss over batches).

Sections (one per world; each keeps its own helpers):

- **Skill mixture** (:mod:`idesign.data.skills`): :func:`greedy_answers`, :func:`exact_match`,
  :func:`skill_accuracy`, :func:`perplexity`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax.numpy as jnp
import numpy as np

from idesign.data.skills import to_numpy
from idesign.generate import SamplingConfig, generate
from idesign.train import evaluate, iterate_batches, lm_loss, make_eval_step

__all__ = ["greedy_answers", "exact_match", "skill_accuracy", "perplexity"]

_GREEDY = SamplingConfig(temperature=0.0)


# ============================================================================================
# Skill mixture (idesign.data.skills): exact-match answers, per-skill accuracy, perplexity
# ============================================================================================


def greedy_answers(apply: Callable, params: Any, prompts: Any, answer_len: int, *, batch_size: int = 256
                   ) -> np.ndarray:
    """Greedy continuations ``[N, answer_len]`` of equal-length prompts ``[N, P]``, via :func:`idesign.generate`.

    Batches of ``batch_size`` rows (the last one padded by repeating its final row), so one prompt
    shape compiles once. ``apply`` must support KV-cache decoding (``forward`` and ``init_cache``, as
    the reference transformer's does), and ``P + answer_len`` must fit its ``max_len``.

    >>> import numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> greedy_answers(apply, params, np.ones((3, 4), np.int32), 2, batch_size=2).shape
    (3, 2)
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] < 1 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"greedy_answers: prompts must be integer token ids of shape [N, P >= 1]; got shape "
                         f"{prompts.shape} and dtype {prompts.dtype}.")
    if not isinstance(answer_len, (int, np.integer)) or answer_len < 1:
        raise ValueError(f"greedy_answers: answer_len must be an int >= 1; got {answer_len!r}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"greedy_answers: batch_size must be an int >= 1; got {batch_size!r}.")
    n = len(prompts)
    if n == 0:
        return np.zeros((0, int(answer_len)), np.int32)
    size = min(int(batch_size), n)
    out = []
    for i in range(0, n, size):
        chunk = prompts[i:i + size]
        pad = size - len(chunk)
        if pad:  # repeat the last row so the last batch has the compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        gen = generate(apply, params, jnp.asarray(chunk, jnp.int32), max_new_tokens=int(answer_len), sampling=_GREEDY)
        out.append(np.asarray(gen.tokens)[:size - pad])
    return np.concatenate(out)


def exact_match(apply: Callable, params: Any, items: datasets.Dataset | Mapping[str, Any], *,
                batch_size: int = 256) -> np.ndarray:
    """Per item: does greedy decoding after ``tokens[:prompt_len]`` reproduce the whole answer?

    Items are decoded in groups of equal ``(prompt_len, answer_len)`` (within a skill of
    :mod:`idesign.data.skills` every item has the same lengths), so nothing is padded.

    Args:
      apply, params: the model (with KV-cache decoding, see :func:`greedy_answers`).
      items: rows with ``tokens``, ``prompt_len``, ``answer_len`` (e.g. ``SkillCorpus.eval``);
        ``tokens`` must hold each answer (``prompt_len + answer_len <= seq_len``).
      batch_size: rows per decoding batch.

    Returns:
      a bool array, one entry per item, in the items' order.

    >>> import idesign as ids
    >>> from idesign.data import skills
    >>> c = skills.make_skill_corpus(skills.SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                                 n_text_docs=4, n_eval=4, n_heldout_text=6))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.tokenizer.vocab_size,
    ...                                      d_model=8, n_heads=2, n_layers=1, max_len=c.config.seq_len))
    >>> exact_match(apply, params, c.eval).shape
    (16,)
    """
    cols = _columns(items, ("tokens", "prompt_len", "answer_len"))
    tokens = np.asarray(cols["tokens"], np.int32)
    plen, alen = np.asarray(cols["prompt_len"], np.int64), np.asarray(cols["answer_len"], np.int64)
    if len(tokens) == 0:
        return np.zeros(0, bool)
    bad = (plen < 1) | (alen < 1) | (plen + alen > tokens.shape[1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"exact_match: item {i} has prompt_len={plen[i]}, answer_len={alen[i]} for tokens of "
                         f"length {tokens.shape[1]}; expected prompt_len >= 1, answer_len >= 1 and their sum <= length.")
    correct = np.zeros(len(tokens), bool)
    for p, a in sorted(set(zip(plen.tolist(), alen.tolist()))):
        rows = np.flatnonzero((plen == p) & (alen == a))
        pred = greedy_answers(apply, params, tokens[rows, :p], a, batch_size=batch_size)
        correct[rows] = np.all(pred == tokens[rows, p:p + a], axis=1)
    return correct


def skill_accuracy(correct: np.ndarray, items: datasets.Dataset | Mapping[str, Any]) -> dict[str, float]:
    """``{skill: share of items answered exactly}`` from :func:`exact_match`'s output.

    >>> skill_accuracy(np.array([True, False, True]), {'skill': ['logic', 'logic', 'arithmetic']})
    {'arithmetic': 1.0, 'logic': 0.5}
    """
    skills = np.asarray(_columns(items, ("skill",))["skill"])
    correct = np.asarray(correct, bool)
    if correct.shape != skills.shape:
        raise ValueError(f"skill_accuracy: {correct.shape[0]} results for {skills.shape[0]} items.")
    return {str(s): float(correct[skills == s].mean()) for s in sorted(set(skills.tolist()))}


def perplexity(apply: Callable, params: Any, docs: datasets.Dataset | Mapping[str, Any], *,
               batch_size: int = 256) -> float:
    """``exp`` of the mean next-token NLL over the scored tokens of ``docs`` (``lm_loss``'s positions).

    >>> import idesign as ids
    >>> from idesign.data import skills
    >>> c = skills.make_skill_corpus(skills.SkillConfig(n_strings=2, n_entities=4, fact_docs=20, n_pattern_train=10,
    ...                                                 n_text_docs=4, n_eval=4, n_heldout_text=6))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=c.tokenizer.vocab_size,
    ...                                      d_model=8, n_heads=2, n_layers=1, max_len=c.config.seq_len))
    >>> 20 < perplexity(apply, params, c.heldout_text) < 150
    True
    """
    step = _eval_step(apply) if _hashable(apply) else make_eval_step(lm_loss(apply))
    cols = _columns(docs, ("tokens", "valid", "loss_mask"))
    batches = iterate_batches({k: np.asarray(v) for k, v in cols.items()}, batch_size, epochs=1, shuffle=False,
                              drop_remainder=False)
    return float(np.exp(evaluate(step, params, batches)["loss"]))


def _hashable(x: Any) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


@functools.lru_cache(maxsize=8)
def _eval_step(apply: Callable) -> Callable:
    return make_eval_step(lm_loss(apply))


def _columns(items: Any, names: Sequence[str]) -> dict[str, Any]:
    if hasattr(items, "column_names"):
        return to_numpy(items, names)
    missing = [n for n in names if n not in items]
    if missing:
        raise ValueError(f"items lack the columns {missing}; they have {sorted(items)}.")
    return {n: items[n] for n in names}
