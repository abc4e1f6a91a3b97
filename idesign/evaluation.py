"""Evaluators of trained language models on the synthetic worlds, beside :func:`idesign.train.evaluate`.

:mod:`idesign.data` builds worlds and imports nothing above itself; what scores a *model* on a
world lives here, on top of :func:`idesign.generate` (greedy decoding with a KV cache) and
:func:`idesign.train.evaluate` (token-weighted loss over batches).

Sections (one per world; each keeps its own helpers):

- **Skill mixture** (:mod:`idesign.data.skills`): :func:`greedy_answers`, :func:`exact_match`,
  :func:`skill_accuracy`, :func:`perplexity`.
- **Knowledge world** (:mod:`idesign.data.knowledge`): :func:`knowledge_answers` (greedy answer per
  query), :func:`knowledge_outcomes` and :func:`knowledge_metrics` (accuracy by frequency group,
  hallucination and abstain rates), :func:`evaluate_knowledge` (both).
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

__all__ = ["greedy_answers", "exact_match", "skill_accuracy", "perplexity", "knowledge_answers", "knowledge_outcomes",
           "knowledge_metrics", "evaluate_knowledge", "OUTCOMES"]

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

    An untrained model is close to uniform over its vocabulary:

    >>> import numpy as np, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=16, d_model=8, n_heads=2, n_layers=1))
    >>> ones = np.ones((2, 6), bool)
    >>> 12 < perplexity(apply, params, {'tokens': np.arange(12).reshape(2, 6), 'valid': ones, 'loss_mask': ones}) < 20
    True
    """
    step = _eval_step(apply) if _hashable(apply) else make_eval_step(lm_loss(apply))
    cols = _columns(docs, ("tokens", "valid", "loss_mask"))
    batches = iterate_batches({k: np.asarray(v) for k, v in cols.items()}, batch_size, epochs=1, shuffle=False,
                              drop_remainder=False)
    return float(np.exp(evaluate(step, params, batches)["loss"]))


# ============================================================================================
# Knowledge world (idesign.data.knowledge): accuracy by frequency group, hallucination, abstention
# ============================================================================================

OUTCOMES: tuple[str, ...] = ("correct", "hallucinated", "abstained", "other")
"""What a knowledge-world answer is (:func:`knowledge_outcomes`):

- ``correct``: the true value, for a *known* entity (frequent or rare);
- ``hallucinated``: a value of the asked attribute that is not supported -- a wrong value for a known
  entity, or *any* value for an unknown entity (the model cannot know it, so even the hidden truth is
  a guess; :func:`knowledge_metrics` reports that lucky share separately as a control);
- ``abstained``: the abstain word ``unknown``;
- ``other``: anything else (a value of another attribute, a template word, a special token).
"""


def knowledge_answers(apply: Callable, params: Any, world: Any, *, batch_size: int = 256) -> np.ndarray:
    """The greedy answer token after each query prompt of ``world.queries``, decoded with :func:`idesign.generate`.

    Every answer in the knowledge world is one token. Queries are decoded in groups of equal prompt
    length (:func:`greedy_answers`), so nothing is padded.

    Returns:
      ``[n_queries]`` int token ids, in the order of ``world.queries``.

    >>> import idesign as ids
    >>> world = ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=8,
    ...                                                            n_heads=2, n_layers=1, max_len=32))
    >>> ids.evaluation.knowledge_answers(apply, params, world).shape == (len(world.queries),)
    True
    """
    prompts = [np.asarray(p, np.int32) for p in world.queries["prompt_ids"]]
    lengths = np.array([len(p) for p in prompts])
    answers = np.zeros(len(prompts), np.int32)
    for length in sorted(set(lengths.tolist())):
        rows = np.flatnonzero(lengths == length)
        answers[rows] = greedy_answers(apply, params, np.stack([prompts[i] for i in rows]), 1,
                                       batch_size=batch_size)[:, 0]
    return answers


def knowledge_outcomes(world: Any, answer_ids: Any) -> np.ndarray:
    """Classifies each query's answer token into one of :data:`OUTCOMES` (a string array ``[n_queries]``).

    >>> import numpy as np, idesign as ids
    >>> world = ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40))
    >>> gold = np.asarray(world.queries['answer_id'])
    >>> sorted(set(ids.evaluation.knowledge_outcomes(world, gold).tolist()))     # gold answers everywhere
    ['correct', 'hallucinated']
    """
    q = world.queries
    pred = np.asarray(answer_ids)
    if pred.shape != (len(q),) or not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"knowledge_outcomes: expected one integer answer token per query, shape ({len(q)},); got "
                         f"shape {pred.shape} dtype {pred.dtype}. Pass knowledge_answers(...)'s output.")
    tok = world.tokenizer
    groups, attrs, gold = np.asarray(q["group"]), np.asarray(q["attribute"]), np.asarray(q["answer_id"])
    values = {a: np.array(sorted(tok.token_to_id(v) for v in world.attribute_values(a))) for a in set(attrs.tolist())}
    is_value = np.array([p in values[a] for p, a in zip(pred.tolist(), attrs.tolist())], bool)
    known = groups != "unknown"
    out = np.full(len(q), "other", dtype=object)
    out[is_value] = "hallucinated"
    out[is_value & known & (pred == gold)] = "correct"
    out[pred == tok.abstain_id] = "abstained"
    return out.astype(str)


def knowledge_metrics(world: Any, answer_ids: Any) -> dict[str, float]:
    """Flat metrics of knowledge-world answers, per frequency group (``frequent``, ``rare``, ``unknown``).

    For each group ``g``: ``accuracy_g`` (correct; 0 for unknown entities by definition),
    ``hallucination_rate_g``, ``abstain_rate_g`` and ``other_rate_g`` -- the four sum to 1 -- and
    ``n_g`` queries. Over all queries: ``hallucination_rate`` and ``abstain_rate``. Control:
    ``accuracy_unknown_hidden_truth``, the share of unknown-entity answers that equal the hidden truth
    (chance level for a model that cannot know them). Groups without queries are left out.

    >>> import numpy as np, idesign as ids
    >>> world = ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40))
    >>> answers = np.where(np.asarray(world.queries['group']) == 'unknown', world.tokenizer.abstain_id,
    ...                    np.asarray(world.queries['answer_id']))
    >>> m = ids.evaluation.knowledge_metrics(world, answers)
    >>> m['accuracy_rare'], m['abstain_rate_unknown'], m['hallucination_rate']
    (1.0, 1.0, 0.0)
    """
    outcomes = knowledge_outcomes(world, answer_ids)
    q = world.queries
    groups = np.asarray(q["group"])
    pred, gold = np.asarray(answer_ids), np.asarray(q["answer_id"])
    out: dict[str, float] = {}
    for g in ("frequent", "rare", "unknown"):
        sel = groups == g
        if not sel.any():
            continue
        for name, outcome in (("accuracy", "correct"), ("hallucination_rate", "hallucinated"),
                              ("abstain_rate", "abstained"), ("other_rate", "other")):
            out[f"{name}_{g}"] = float(np.mean(outcomes[sel] == outcome))
        out[f"n_{g}"] = float(sel.sum())
    out["hallucination_rate"] = float(np.mean(outcomes == "hallucinated"))
    out["abstain_rate"] = float(np.mean(outcomes == "abstained"))
    unknown = groups == "unknown"
    if unknown.any():
        out["accuracy_unknown_hidden_truth"] = float(np.mean(pred[unknown] == gold[unknown]))
    return out


def evaluate_knowledge(apply: Callable, params: Any, world: Any, *, batch_size: int = 256) -> dict[str, float]:
    """:func:`knowledge_metrics` of the model's greedy answers (:func:`knowledge_answers`).

    >>> import idesign as ids
    >>> world = ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(n_known=10, n_unknown=2, n_documents=40))
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=8,
    ...                                                            n_heads=2, n_layers=1, max_len=32))
    >>> m = ids.evaluation.evaluate_knowledge(apply, params, world)
    >>> round(m['accuracy_rare'] + m['hallucination_rate_rare'] + m['abstain_rate_rare'] + m['other_rate_rare'], 6)
    1.0
    """
    return knowledge_metrics(world, knowledge_answers(apply, params, world, batch_size=batch_size))


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
