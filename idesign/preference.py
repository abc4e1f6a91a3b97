"""Preference training: DPO against a frozen reference copy, over any optax transform.

Direct preference optimisation (Rafailov et al., 2023) trains a policy ``π`` on pairs (prompt, chosen,
rejected) to prefer the chosen response *relative to a frozen reference* ``π_ref``:

    L = −log σ(β · [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

where ``log π(y|x)`` sums the log-probabilities of the response tokens only (the prompt is context,
padding is nothing). The reference's log-probabilities are computed once per batch inside the jitted
step, under ``stop_gradient``, so the reference can never be trained by mistake.

Data: :func:`preference_dataset` builds a ``datasets.Dataset`` with ``prompt``, ``chosen`` and
``rejected`` token-id columns (plus any metadata columns, e.g. the source of each pair);
:func:`encode_pairs` turns rows of it into the padded arrays the step reads.

>>> import jax, optax, idesign as ids
>>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1))
>>> data = ids.preference.preference_dataset([[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]])
>>> batch = ids.preference.encode_pairs(data[:2], pad_id=0)
>>> step = ids.preference.make_dpo_step(apply, params, optax.adam(1e-2), beta=0.1)
>>> state, metrics = step(ids.init_train_state(params, optax.adam(1e-2)), batch)
>>> round(float(metrics['loss']), 3)      # log 2 at the start: the policy equals the reference
0.693
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import tree as tree_lib
from idesign._types import Array, PyTree
from idesign.train import TrainState


_SIDES = ("chosen", "rejected")


# --- data -------------------------------------------------------------------------------------------


def _as_id_list(value: Any, where: str) -> list[int]:
    ids = np.asarray(value).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{where} must hold integer token ids; got dtype {ids.dtype}.")
    return ids.astype(np.int64).tolist()


def preference_dataset(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                       rejected: Sequence[Sequence[int]], **columns: Sequence[Any]):
    """A ``datasets.Dataset`` of preference pairs: ``prompt``, ``chosen``, ``rejected`` token ids (+ ``columns``).

    ``chosen`` and ``rejected`` are the *responses* only; both follow the same prompt of their row.

    Raises:
      ValueError: columns of different lengths, or an empty response (named by row).

    >>> import idesign as ids
    >>> ds = ids.preference.preference_dataset([[1, 2]], [[3]], [[4, 5]], source=['a'])
    >>> ds[0]
    {'prompt': [1, 2], 'chosen': [3], 'rejected': [4, 5], 'source': 'a'}
    """
    import datasets

    lengths = {"prompts": len(prompts), "chosen": len(chosen), "rejected": len(rejected),
               **{name: len(v) for name, v in columns.items()}}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"preference_dataset: columns have different lengths {lengths}; one entry per pair expected.")
    rows = {"prompt": [_as_id_list(p, f"prompts[{i}]") for i, p in enumerate(prompts)],
            "chosen": [_as_id_list(c, f"chosen[{i}]") for i, c in enumerate(chosen)],
            "rejected": [_as_id_list(r, f"rejected[{i}]") for i, r in enumerate(rejected)]}
    for side in _SIDES:
        empty = [i for i, r in enumerate(rows[side]) if not r]
        if empty:
            raise ValueError(f"preference_dataset: {side} responses of rows {empty[:8]} are empty; every pair needs "
                             "a non-empty chosen and rejected response.")
    return datasets.Dataset.from_dict({**rows, **{k: list(v) for k, v in columns.items()}})


def pairs_from_sequences(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                         prompt_lengths: Sequence[int]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Splits full sequences (prompt + response) into ``(prompts, chosen responses, rejected responses)``.

    Raises:
      ValueError: a pair whose chosen and rejected sequences do not start with the same prompt (named
        by row, with both prompts), or a response that would be empty.

    >>> import idesign as ids
    >>> ids.preference.pairs_from_sequences([[1, 2, 3]], [[1, 2, 4, 5]], [2])
    ([[1, 2]], [[3]], [[4, 5]])
    """
    if not len(chosen) == len(rejected) == len(prompt_lengths):
        raise ValueError(f"pairs_from_sequences: {len(chosen)} chosen, {len(rejected)} rejected sequences and "
                         f"{len(prompt_lengths)} prompt lengths; one of each per pair expected.")
    prompts, chosen_out, rejected_out = [], [], []
    for i, (c, r, n) in enumerate(zip(chosen, rejected, prompt_lengths)):
        c, r, n = _as_id_list(c, f"chosen[{i}]"), _as_id_list(r, f"rejected[{i}]"), int(n)
        if c[:n] != r[:n]:
            raise ValueError(f"pairs_from_sequences: row {i} pairs responses to different prompts: chosen starts "
                             f"{c[:n]}, rejected starts {r[:n]}. A preference pair compares two answers to one prompt.")
        if len(c) <= n or len(r) <= n:
            raise ValueError(f"pairs_from_sequences: row {i} has an empty {'chosen' if len(c) <= n else 'rejected'} "
                             f"response (prompt length {n}).")
        prompts.append(c[:n]), chosen_out.append(c[n:]), rejected_out.append(r[n:])
    return prompts, chosen_out, rejected_out


def encode_pairs(rows: Mapping[str, Sequence[Any]], *, pad_id: int, length: int | None = None) -> dict[str, np.ndarray]:
    """Padded arrays for a batch of pairs: ``{side}_tokens``, ``{side}_valid``, ``{side}_mask`` for each side.

    ``rows`` is a dict of columns (a slice of :func:`preference_dataset`, e.g. ``ds[0:32]``); each
    sequence is prompt + response, right-padded to ``length`` (default: the longest). ``{side}_mask``
    is 1 at the response tokens, the positions whose log-probability the loss sums.

    Raises:
      ValueError: a missing column, an empty response, or a pair longer than ``length`` (named by row).

    >>> import idesign as ids
    >>> b = ids.preference.encode_pairs({'prompt': [[1, 2]], 'chosen': [[3]], 'rejected': [[4, 5]]}, pad_id=0)
    >>> b['chosen_tokens'].tolist(), b['chosen_mask'].tolist(), b['rejected_mask'].tolist()
    ([[1, 2, 3, 0]], [[0.0, 0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]])
    """
    missing = [c for c in ("prompt", *_SIDES) if c not in rows]
    if missing:
        raise ValueError(f"encode_pairs: rows lack the columns {missing}; expected 'prompt', 'chosen' and 'rejected' "
                         "(e.g. a slice of ids.preference.preference_dataset).")
    prompts = [_as_id_list(p, f"prompt[{i}]") for i, p in enumerate(rows["prompt"])]
    sides = {side: [_as_id_list(r, f"{side}[{i}]") for i, r in enumerate(rows[side])] for side in _SIDES}
    if any(len(v) != len(prompts) for v in sides.values()):
        raise ValueError(f"encode_pairs: {len(prompts)} prompts but {len(sides['chosen'])} chosen and "
                         f"{len(sides['rejected'])} rejected responses.")
    longest = max(len(p) + len(r) for side in _SIDES for p, r in zip(prompts, sides[side]))
    length = longest if length is None else int(length)
    out: dict[str, np.ndarray] = {}
    for side in _SIDES:
        tokens = np.full((len(prompts), length), pad_id, np.int32)
        valid = np.zeros((len(prompts), length), bool)
        mask = np.zeros((len(prompts), length), np.float32)
        for i, (p, r) in enumerate(zip(prompts, sides[side])):
            if not r:
                raise ValueError(f"encode_pairs: the {side} response of row {i} is empty.")
            if len(p) + len(r) > length:
                raise ValueError(f"encode_pairs: row {i} ({side}) has {len(p) + len(r)} tokens, more than length={length}.")
            tokens[i, :len(p) + len(r)] = p + r
            valid[i, :len(p) + len(r)] = True
            mask[i, len(p):len(p) + len(r)] = 1.0
        if len(prompts) and not (mask[:, 0] == 0).all():
            raise ValueError(f"encode_pairs: rows {np.flatnonzero(mask[:, 0]).tolist()[:8]} have an empty prompt; the "
                             "first token of a sequence is never predicted, so a response needs at least one prompt token.")
        out.update({f"{side}_tokens": tokens, f"{side}_valid": valid, f"{side}_mask": mask})
    return out


# --- the loss -----------------------------------------------------------------------------------------


def sequence_logprobs(apply: Callable, params: PyTree, tokens: Array, mask: Array, valid: Array | None = None, *,
                      hooks: Any = None) -> Array:
    """``Σ_t mask[t] · log p(tokens[t] | tokens[:t])`` per row: the log-probability of the masked tokens.

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=7, d_model=8, n_heads=2, n_layers=1))
    >>> lp = ids.preference.sequence_logprobs(apply, params, jnp.array([[1, 2, 3]]), jnp.array([[0., 1., 1.]]))
    >>> lp.shape, bool(lp[0] < 0)
    ((1,), True)
    """
    kwargs = {} if valid is None else {"valid": valid[:, :-1]}
    logits, _ = apply(params, tokens[:, :-1], hooks=hooks, **kwargs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return (picked * jnp.asarray(mask, jnp.float32)[:, 1:]).sum(-1)


def _pair_logprobs(apply: Callable, params: PyTree, batch: Mapping[str, Array]) -> tuple[Array, Array]:
    return tuple(sequence_logprobs(apply, params, batch[f"{s}_tokens"], batch[f"{s}_mask"], batch.get(f"{s}_valid"))
                 for s in _SIDES)


def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, *,
             beta: float = 0.1) -> tuple[Array, dict[str, Array]]:
    """The DPO loss from per-pair sequence log-probabilities, and its diagnostics.

    Returns ``(loss, aux)`` with ``aux``: ``loss``, ``accuracy`` (share of pairs whose implicit reward margin
    is positive), ``margin``, ``chosen_reward`` and ``rejected_reward`` (β-scaled log-ratios, batch means).

    >>> import jax.numpy as jnp, idesign as ids
    >>> loss, aux = ids.preference.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]), beta=0.5)
    >>> round(float(loss), 4), float(aux['margin'])        # -log σ(0.5 · (1 - (-1)))
    (0.3133, 1.0)
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -jax.nn.log_sigmoid(margin).mean()
    return loss, {"loss": loss, "accuracy": (margin > 0).mean(), "margin": margin.mean(),
                  "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}


def _check_reference(params: PyTree, ref_params: PyTree) -> None:
    got, expected = tree_lib.named_leaves(ref_params), tree_lib.named_leaves(params)
    missing, extra = [p for p in expected if p not in got], [p for p in got if p not in expected]
    shapes = [f"{p}: reference {np.shape(got[p])} vs policy {np.shape(expected[p])}"
              for p in expected if p in got and np.shape(got[p]) != np.shape(expected[p])]
    if missing or extra or shapes:
        parts = ([f"missing {missing[:6]}"] if missing else []) + ([f"unexpected {extra[:6]}"] if extra else [])
        parts += shapes[:6]
        raise ValueError("make_dpo_step: the reference model's parameters do not have the policy's structure ("
                         + "; ".join(parts) + "). The reference must be a frozen copy of the policy's starting point.")


def make_dpo_step(apply: Callable, ref_params: PyTree, optimizer: optax.GradientTransformation, *,
                  beta: float = 0.1, jit: bool = True) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch, **extra_args) -> (state, metrics)``: one DPO update of ``state.params``.

    Args:
      apply: the functional model (policy and reference share it).
      ref_params: the frozen reference parameters (usually the policy's starting point); closed over
        as a jit argument, never differentiated (``stop_gradient``).
      optimizer: any optax transform (freezing, projection and observation wrappers included).
      beta: the DPO temperature β > 0.
      jit: compile the step.

    The batch is :func:`encode_pairs`' output. The reference's log-probabilities are computed once
    per batch inside the step. Metrics: those of :func:`dpo_loss` and ``grad_norm``.
    """
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta = {beta!r}: expected a number > 0.")
    optimizer = optax.with_extra_args_support(optimizer)
    checked: list[bool] = []

    def step(state: TrainState, batch: Mapping[str, Array], ref: PyTree, **extra_args):
        ref_chosen, ref_rejected = jax.lax.stop_gradient(_pair_logprobs(apply, ref, batch))

        def loss_fn(params):
            chosen, rejected = _pair_logprobs(apply, params, batch)
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra_args)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), {**aux, "grad_norm": optax.tree.norm(grads)}

    compiled = jax.jit(step) if jit else step

    def run(state: TrainState, batch: Mapping[str, Array], **extra_args):
        if not checked:
            _check_reference(state.params, ref_params)
            checked.append(True)
        missing = [k for s in _SIDES for k in (f"{s}_tokens", f"{s}_mask") if k not in batch]
        if missing:
            raise ValueError(f"DPO step: the batch lacks {missing}; build it with ids.preference.encode_pairs.")
        return compiled(state, batch, ref_params, **extra_args)

    return run
