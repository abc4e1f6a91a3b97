"""Policy-gradient steps with group-normalised advantages, and probe rewards read on a frozen teacher.

The recipe of RLFR ("Features as Rewards", Prasad et al. 2026, arXiv 2602.10067) in pure functions:

* three weight sets start equal: the **student** (trained), a KL **reference**, and a **frozen
  teacher**. :func:`probe_scores` prefills the student's completion through the *teacher's*
  parameters and reads a probe there; ``stop_gradient`` on the teacher and the probe means no
  gradient ever reaches them (the reward is a constant to the policy gradient anyway).
  :func:`idesign.probes.read_span` (re-exported here) says *where* a span is read: at its tokens (``"answer"``), at the position
  each token was predicted from (``"prediction"``: the nearest real token before it, e.g. the
  last prompt token for the first answer token), or both (``"both"``). In a shallow model the
  residual stream at an answer token is dominated by that token's own embedding; the
  knowledge-vs-guess signal lives where the answer is predicted.
* :func:`group_advantages`: ``A = (r - mean_group) / (std_group + eps)`` over the samples of one
  prompt; groups whose rewards are all equal carry no signal and are dropped (``keep`` False).
* :func:`grpo_loss` / :func:`make_grpo_step`: the CISPO-style surrogate
  ``-sg(clip(rho, 1 - eps, 1 + eps)) * A * log pi`` per generated token (``rho = pi / pi_old``),
  plus ``kl_coef`` times the k3 estimator of ``KL(pi || pi_ref)``, averaged over action tokens.
  Tokens a monitor injected are not the policy's actions: leave them out of ``action_mask``.
  A binary decision whose two outcomes both have known values (e.g. retract a scored claim or keep it) can be
  taught at every position it was faced, not only where it was sampled: ``RLBatch.choice_tokens`` /
  ``choice_advantages`` add ``-A * pi(token)`` (its expected value's exact gradient) or, with
  ``GRPOConfig.choice_loss="classify"``, a cost-weighted log-loss of the better outcome.
* :class:`LagrangeState` / :func:`lagrange_update`: a multiplier ``lam`` on a rate constraint
  (e.g. "abstain on about a share ``target`` of prompts"), ``lam <- lam + lr * (rate - target)``
  from online statistics; subtract ``lam`` from the reward of the constrained action.
  :func:`pi_multiplier` adds a proportional term on the batch's own rate (a PI Lagrangian) so a
  sudden jump of the rate is penalised in the step it happens; :func:`retraction_multiplier`,
  :func:`retraction_gain` and :func:`neutral_retraction_multiplier` apply it to claim retractions.
* :func:`format_penalty`: a fixed reward for malformed completions.

Example (a GRPO step on a tiny model):

>>> import jax, jax.numpy as jnp, optax, idesign as ids
>>> from idesign import rl
>>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
>>> tokens = jnp.array([[1, 2, 3, 4], [1, 2, 5, 6]], jnp.int32)
>>> valid = jnp.ones_like(tokens, bool)
>>> actions = jnp.array([[0, 1, 1], [0, 1, 1]], bool)       # aligned with tokens[:, 1:]
>>> old = rl.token_logprobs(apply, params, tokens, valid)
>>> adv, keep = rl.group_advantages(jnp.array([1.0, 0.0]), group_size=2)
>>> batch = rl.RLBatch(tokens, valid, actions & keep[:, None], adv, old, old)
>>> opt = optax.adam(1e-2)
>>> step = rl.make_grpo_step(apply, opt, rl.GRPOConfig())
>>> state, metrics = step(ids.init_train_state(params, opt), batch)
>>> int(state.step), round(float(metrics["kl"]), 6)
(1, 0.0)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign._types import Array, PyTree
from idesign.hooks import Capture
from idesign.probes import score as probe_score
from idesign.probes._span import read_span, read_span_ids, span_scores
from idesign.train import TrainState


# ----------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: Array, group_size: int, *, eps: float = 1e-6,
                     min_std: float = 1e-6) -> tuple[Array, Array]:
    """Group-normalised advantages for rewards laid out as consecutive groups of ``group_size``.

    Args:
      rewards: ``[G * group_size]`` rewards; rows ``g * group_size ... (g + 1) * group_size - 1``
        are the samples of prompt ``g``.
      group_size: samples per prompt (``M``).
      eps: added to the group's standard deviation (population std, ``ddof=0``).
      min_std: a group whose std is at most this has no signal: it is dropped.

    Returns:
      ``(advantages [G * M], keep [G * M] bool)``; dropped groups have advantage 0 and keep False.

    >>> import jax.numpy as jnp
    >>> from idesign import rl
    >>> adv, keep = rl.group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2)
    >>> adv.round(3).tolist(), keep.tolist()
    ([1.0, -1.0, 0.0, 0.0], [True, True, False, False])
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"group_advantages: rewards must be [G * group_size] with group_size={group_size}; "
                         f"got shape {tuple(r.shape)}.")
    groups = r.reshape(-1, group_size)
    mean = groups.mean(1, keepdims=True)
    std = groups.std(1, keepdims=True)
    keep = jnp.broadcast_to(std > min_std, groups.shape)
    adv = jnp.where(keep, (groups - mean) / (std + eps), 0.0)
    return adv.reshape(-1), keep.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Policy-gradient loss and step


class RLBatch(NamedTuple):
    """One batch of sampled completions for :func:`grpo_loss`.

    Attributes:
      tokens: ``[B, T]`` int32 prompt + completion (left-padded prompts, as :func:`idesign.generate`'s
        ``GenerateOutput.sequences()``).
      valid: ``[B, T]`` bool, real tokens.
      action_mask: ``[B, T - 1]`` bool, aligned with ``tokens[:, 1:]``: True where that token was
        *sampled by the policy* (not prompt, padding or injected tokens) and its row is kept.
      advantages: ``[B]`` float, one per completion (see :func:`group_advantages`), or ``[B, T - 1]``
        per token (aligned with ``tokens[:, 1:]``), e.g. each claim's tokens get the advantage of its own reward.
      old_logprobs: ``[B, T - 1]`` log-probabilities of ``tokens[:, 1:]`` under the sampling policy.
      ref_logprobs: ``[B, T - 1]`` the same under the KL reference.
      choice_tokens: optional ``[B, T - 1]`` int, aligned with ``tokens[:, 1:]``: at a position where the
        policy decided whether to emit one particular token (e.g. ``<retract>`` after a claim), that token's
        id; ``-1`` elsewhere. With it, :func:`grpo_loss` adds the *expected* policy gradient of that
        binary decision (both outcomes' values are known, so no sample of it is needed); give the sampled
        token at such a position advantage 0 so that it is not credited twice.
      choice_advantages: ``[B, T - 1]`` float with ``choice_tokens``: how much more emitting the token is
        worth than not emitting it, on the scale of ``advantages``.
    """

    tokens: Array
    valid: Array
    action_mask: Array
    advantages: Array
    old_logprobs: Array
    ref_logprobs: Array
    choice_tokens: Array | None = None
    choice_advantages: Array | None = None


CHOICE_LOSSES = ("expected", "classify")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of :func:`grpo_loss` (hashable: static in compiled code).

    Attributes:
      clip_eps: importance weights are clipped to ``[1 - clip_eps, 1 + clip_eps]`` (and never
        differentiated), as in CISPO.
      kl_coef: weight of the k3 estimate of ``KL(pi || pi_ref)`` per action token (0.02 in RLFR).
      choice_loss: how :attr:`RLBatch.choice_tokens` decisions are taught. ``"expected"``: the exact gradient
        of their expected value, ``-A * pi(token)``; it vanishes where ``pi(token)`` is tiny (a token the
        policy never emits there is never learned). ``"classify"``: cost-sensitive classification of the
        better outcome, ``-|A| * log(pi(token) if A > 0 else 1 - pi(token))``; its gradient in the
        decision's log-odds is ``|A| * (y - pi)``, which does not vanish, and over decisions the policy cannot
        tell apart it settles where emitting the token is likelier exactly when ``sum(A) > 0``, the same greedy
        decision as the expected value's.

    >>> from idesign import rl
    >>> rl.GRPOConfig(kl_coef=0.05).clip_eps
    0.2
    """

    clip_eps: float = 0.2
    kl_coef: float = 0.02
    choice_loss: str = "expected"

    def __post_init__(self):
        if self.choice_loss not in CHOICE_LOSSES:
            raise ValueError(f"GRPOConfig.choice_loss={self.choice_loss!r}; expected one of {CHOICE_LOSSES}.")
        if not 0 <= self.clip_eps < 1:
            raise ValueError(f"GRPOConfig.clip_eps={self.clip_eps!r}; expected a number in [0, 1).")
        if not self.kl_coef >= 0:
            raise ValueError(f"GRPOConfig.kl_coef={self.kl_coef!r}; expected a number >= 0.")


def token_logprobs(apply: Callable, params: PyTree, tokens: Array, valid: Array | None = None) -> Array:
    """``[B, T - 1]``: ``log pi(tokens[:, t + 1] | tokens[:, :t + 1])`` under ``apply(params, ...)``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign import rl
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> rl.token_logprobs(apply, params, jnp.ones((2, 4), jnp.int32)).shape
    (2, 3)
    """
    return _gather(_next_token_logprobs(apply, params, tokens, valid), tokens[:, 1:])


def _next_token_logprobs(apply: Callable, params: PyTree, tokens: Array, valid: Array | None) -> Array:
    """``[B, T - 1, V]``: the log-softmax over the vocabulary at every position that predicts a next token."""
    kwargs = {} if valid is None else {"valid": valid}
    logits, _ = apply(params, tokens, **kwargs)
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


def _gather(logp: Array, ids: Array) -> Array:
    return jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def grpo_loss(params: PyTree, batch: RLBatch, *, apply: Callable,
              config: GRPOConfig = GRPOConfig()) -> tuple[Array, dict[str, Array]]:
    """The clipped importance-weighted policy-gradient loss with a KL penalty (module docstring).

    Args:
      params: the student's parameters (the only thing differentiated).
      batch: an :class:`RLBatch`.
      apply: the functional model.
      config: :class:`GRPOConfig`.

    Returns:
      ``(loss, metrics)`` with metrics ``pg_loss``, ``kl`` (mean k3 estimate over action tokens),
      ``clip_frac`` (share of action tokens whose weight was clipped) and ``n_actions``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign import rl
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> t = jnp.array([[1, 2, 3]], jnp.int32); v = jnp.ones_like(t, bool)
    >>> lp = rl.token_logprobs(apply, params, t, v)
    >>> loss, m = rl.grpo_loss(params, rl.RLBatch(t, v, jnp.array([[False, True]]), jnp.array([1.0]), lp, lp), apply=apply)
    >>> bool(jnp.isclose(loss, -lp[0, 1]))
    True
    """
    logp_all = _next_token_logprobs(apply, params, batch.tokens, batch.valid)
    logp = _gather(logp_all, batch.tokens[:, 1:])
    mask = jnp.asarray(batch.action_mask, jnp.float32)
    if mask.shape != logp.shape:
        raise ValueError(f"grpo_loss: action_mask has shape {tuple(mask.shape)}; expected {tuple(logp.shape)} "
                         "(aligned with tokens[:, 1:]).")
    count = jnp.maximum(mask.sum(), 1.0)
    # Masked positions may hold -inf log-probs (padding); keep them out of exp() and the gradient.
    old = jnp.where(mask > 0, batch.old_logprobs, logp)
    ref = jnp.where(mask > 0, batch.ref_logprobs, logp)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old))
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps))
    adv = jnp.asarray(batch.advantages, jnp.float32)
    if adv.ndim == 2 and adv.shape != logp.shape:
        raise ValueError(f"grpo_loss: per-token advantages have shape {tuple(adv.shape)}; expected "
                         f"{tuple(logp.shape)} (aligned with tokens[:, 1:]) or [B].")
    adv = adv[:, None] if adv.ndim == 1 else adv  # per-token advantages: credit each claim's own tokens
    pg = -(weight * adv * logp * mask).sum() / count
    log_ratio_ref = jax.lax.stop_gradient(ref) - logp
    kl = ((jnp.exp(log_ratio_ref) - log_ratio_ref - 1.0) * mask).sum() / count
    clipped = (jnp.abs(ratio - jax.lax.stop_gradient(weight)) > 0) & (mask > 0)
    metrics = {"pg_loss": pg, "kl": kl, "clip_frac": clipped.sum() / count, "n_actions": mask.sum()}
    if batch.choice_tokens is not None:
        choice = _choice_loss(logp_all, batch.choice_tokens, batch.choice_advantages, count, config.choice_loss)
        pg = pg + choice
        metrics["choice_loss"] = choice
    loss = pg + config.kl_coef * kl
    return loss, metrics


def _choice_loss(logp_all: Array, choice_tokens: Array, choice_advantages: Array | None, count: Array,
                 kind: str) -> Array:
    """``-sum(A * pi(token))`` over the decision positions (or its ``"classify"`` form, :class:`GRPOConfig`), on
    the same per-action scale as the sampled term.

    For a binary decision "emit this token or not" whose two outcomes have known values, the gradient of the
    expected value is exactly ``(v_emit - v_not) * grad pi(token)``: every decision teaches, whichever way it
    was sampled (the all-action policy gradient), where a sampled estimate learns only from the rare samples
    that emitted it. On-policy, so no importance weight.
    """
    ids = jnp.asarray(choice_tokens)
    if choice_advantages is None:
        raise ValueError("grpo_loss: RLBatch.choice_tokens is set but choice_advantages is None; give both.")
    adv = jnp.asarray(choice_advantages, jnp.float32)
    if ids.shape != logp_all.shape[:2] or adv.shape != ids.shape:
        raise ValueError(f"grpo_loss: choice_tokens {tuple(ids.shape)} and choice_advantages {tuple(adv.shape)} "
                         f"must both have shape {tuple(logp_all.shape[:2])} (aligned with tokens[:, 1:]).")
    at = ids >= 0
    logp = _gather(logp_all, jnp.where(at, ids, 0))
    if kind == "classify":
        # log(1 - pi) computed stably from log pi.
        log_not = jnp.log(-jnp.expm1(jnp.minimum(logp, -1e-7)))
        per = jnp.abs(adv) * jnp.where(adv > 0, logp, log_not)
    else:
        per = adv * jnp.exp(logp)
    return -(jnp.where(at, per, 0.0)).sum() / count


def make_grpo_step(apply: Callable, optimizer: optax.GradientTransformation,
                   config: GRPOConfig = GRPOConfig(), *, jit: bool = True
                   ) -> Callable[[TrainState, RLBatch], tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch) -> (state, metrics)``: one optimizer update on :func:`grpo_loss`.

    Args:
      apply: the functional model.
      optimizer: any optax transform (e.g. ``optax.adamw(1e-4)``).
      config: :class:`GRPOConfig`.
      jit: compile the step (one compilation per batch shape).

    Returns:
      The step function; ``metrics`` adds ``loss`` and ``grad_norm`` to :func:`grpo_loss`'s.

    See the module docstring for an example.
    """
    def step(state: TrainState, batch: RLBatch) -> tuple[TrainState, dict[str, Array]]:
        (loss, aux), grads = jax.value_and_grad(grpo_loss, has_aux=True)(state.params, batch, apply=apply,
                                                                          config=config)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step) if jit else step


# ----------------------------------------------------------------------------------------------
# Rate constraints


class LagrangeState(NamedTuple):
    """A Lagrange multiplier on a rate constraint and the online estimate of the rate.

    Attributes:
      lam: ``[]`` the multiplier; subtract it from the reward of the constrained action.
      rate: ``[]`` exponential moving average of the observed rate (what ``lam`` is updated from).
    """

    lam: Array
    rate: Array


def lagrange_init(lam: float = 0.0, rate: float = 0.0) -> LagrangeState:
    """A fresh :class:`LagrangeState`.

    >>> from idesign import rl
    >>> float(rl.lagrange_init(0.5).lam)
    0.5
    """
    return LagrangeState(jnp.asarray(lam, jnp.float32), jnp.asarray(rate, jnp.float32))


def lagrange_update(state: LagrangeState, observed_rate: Array | float, *, target: float, lr: float = 0.2,
                    ema: float = 0.0, bounds: tuple[float | None, float | None] | None = None) -> LagrangeState:
    """``rate <- ema * rate + (1 - ema) * observed``; ``lam <- lam + lr * (rate - target)`` (pure, jittable).

    A rate above ``target`` raises ``lam``, which lowers the reward of the constrained action and so
    its rate; below, ``lam`` falls. RLFR uses ``lr = 0.2`` on the retraction rate.

    Args:
      state: the current :class:`LagrangeState`.
      observed_rate: this step's rate (e.g. the share of sampled completions that abstained).
      target: the rate to hold.
      lr: step size of the multiplier.
      ema: smoothing of the rate estimate (0: use this step's rate as is).
      bounds: optional ``(low, high)`` clip of ``lam`` (either may be None); ``(0.0, None)`` for an
        inequality constraint such as "at most ``target``".

    Returns:
      The new :class:`LagrangeState`.

    >>> from idesign import rl
    >>> s = rl.lagrange_update(rl.lagrange_init(), 0.6, target=0.4, lr=0.5)
    >>> round(float(s.lam), 3), round(float(s.rate), 3)
    (0.1, 0.6)
    """
    if not 0 <= ema < 1:
        raise ValueError(f"lagrange_update: ema={ema!r}; expected a number in [0, 1).")
    rate = ema * state.rate + (1.0 - ema) * jnp.asarray(observed_rate, jnp.float32)
    lam = state.lam + lr * (rate - target)
    if bounds is not None:
        lam = jnp.clip(lam, *bounds)
    return LagrangeState(lam, rate)


def _check_gain(name: str, value: Any, meaning: str) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r}; expected a finite number >= 0 ({meaning}).")


def pi_multiplier(state: LagrangeState, observed_rate: Array | float, *, target: float, kp: float,
                  bounds: tuple[float | None, float | None] | None = (0.0, None)) -> Array:
    """The multiplier to apply to *this* batch: ``clip(state.lam + kp * (observed_rate - target), *bounds)``.

    The proportional-integral Lagrangian (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID
    Lagrangian Methods"): ``state.lam`` is the integral term (:func:`lagrange_update`, which moves only by
    ``lr`` per step and so reacts to a sudden jump of the rate many steps late); the proportional term
    ``kp * (rate - target)`` reacts in the same step. Call it with the rate of the batch just sampled,
    before its rewards are computed, so a batch that overshoots is penalised itself; then update the
    integral with :func:`lagrange_update` as before. ``kp = 0`` gives back ``state.lam`` (clipped).

    Args:
      state: the :class:`LagrangeState` whose ``lam`` is the integral term.
      observed_rate: the rate in the batch being rewarded.
      target: the rate to hold.
      kp: proportional gain, ``>= 0``.
      bounds: ``(low, high)`` clip of the result (either may be None; None: no clip). The default
        ``(0.0, None)`` is an inequality constraint ("at most ``target``").

    Returns:
      ``[]`` the multiplier for this batch.

    >>> from idesign import rl
    >>> round(float(rl.pi_multiplier(rl.lagrange_init(0.1), 0.6, target=0.4, kp=2.0)), 4)   # 0.1 + 2 * 0.2
    0.5
    >>> float(rl.pi_multiplier(rl.lagrange_init(0.1), 0.2, target=0.4, kp=2.0))             # under budget: 0
    0.0
    """
    _check_gain("pi_multiplier: kp", kp, "the proportional gain")
    lam = state.lam + kp * (jnp.asarray(observed_rate, jnp.float32) - target)
    if bounds is not None:
        lam = jnp.clip(lam, *bounds)
    return lam


# ----------------------------------------------------------------------------------------------
# Rewards


def probe_scores(teacher_apply: Callable, teacher_params: PyTree, probe: Any, site: str, tokens: Array,
                 valid: Array, span_mask: Array, *, reading: str = "answer") -> Array:
    """``[B]`` probe probability of each row's span, read on the *teacher's* activations (no gradient).

    The completion is prefilled through ``teacher_params`` (not the student's); the token-level
    probe scores every token at ``site`` and a row's score is ``sigmoid`` of the max logit over its
    span's read positions (:func:`read_span`; the span-max rule of Obeso et al.). Rows with an
    empty span score 0. Both the teacher's
    parameters and the probe are wrapped in ``stop_gradient``, so ``jax.grad`` of anything built on
    these scores is zero with respect to them.

    Args:
      teacher_apply: the teacher's functional model.
      teacher_params: its (frozen) parameters. Pass the student's to read the student's own
        activations instead (the "live probe" control).
      probe: a token-level probe (e.g. from :func:`idesign.probes.fit_span_probe`).
      site: the activation site the probe was fitted on, e.g. ``"blocks.1.resid_post"``.
      tokens, valid: ``[B, T]`` prompt + completion.
      span_mask: ``[B, T]`` bool, the tokens of the span to score.
      reading: where the span is read (:func:`read_span`): ``"answer"``, ``"prediction"`` or ``"both"``.

    Returns:
      ``[B]`` float32 in ``[0, 1]``.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> from idesign import rl, probes
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> probe = probes.LogisticProbe(jnp.zeros(8), jnp.array(0.0), jnp.zeros(8), jnp.ones(8))
    >>> t = jnp.ones((2, 4), jnp.int32)
    >>> rl.probe_scores(apply, params, probe, "blocks.0.resid_post", t, t > 0, jnp.array([[0, 0, 1, 0], [0] * 4], bool)).tolist()
    [0.5, 0.0]
    """
    teacher_params = jax.lax.stop_gradient(teacher_params)
    probe = jax.lax.stop_gradient(probe)
    _, captured = teacher_apply(teacher_params, tokens, hooks={site: Capture()}, valid=valid)
    if site not in captured:
        raise ValueError(f"probe_scores: site {site!r} was not captured; sites are e.g. 'blocks.0.resid_post'.")
    z = probe_score(probe, captured[site].astype(jnp.float32))
    span = jnp.asarray(span_mask, bool)
    if span.shape != z.shape:
        raise ValueError(f"probe_scores: span_mask has shape {tuple(span.shape)}; expected {tuple(z.shape)}.")
    span = read_span(span, valid, reading)
    zmax = jnp.max(jnp.where(span, z, -jnp.inf), axis=1)
    return jnp.where(span.any(1), jax.nn.sigmoid(zmax), 0.0)


def format_penalty(malformed: Array, penalty: float = -0.2) -> Array:
    """``penalty`` where a completion is malformed, 0 elsewhere (RLFR uses -0.2).

    >>> import jax.numpy as jnp
    >>> from idesign import rl
    >>> rl.format_penalty(jnp.array([True, False]), -0.5).tolist()
    [-0.5, 0.0]
    """
    return jnp.where(jnp.asarray(malformed, bool), jnp.float32(penalty), jnp.float32(0.0))


# ----------------------------------------------------------------------------------------------
# Claim-level rewards (RLFR): the frozen teacher reads the completion, the probe scores each claim.


def claim_scores(teacher_apply: Callable, teacher_params: PyTree, probe: Any, site: str, tokens: Array,
                 valid: Array, span_ids: Array, n_spans: int, *, completion_start: int,
                 reading: str = "both") -> Array:
    """``[B, S]`` P(hallucinated) of every claim, read by a token-level probe on the teacher's activations.

    The completion is prefilled through ``teacher_params``; claim ``s`` of row ``b`` is the tokens
    with ``span_ids[b, t] == s`` (1-based; 0 = no claim), read where ``reading`` says
    (:func:`idesign.probes.read_span_ids`), scored by the max token logit (span-max). Claims with no
    token score ``nan``. No gradient reaches the teacher or the probe.

    Args:
      teacher_apply, teacher_params: the frozen teacher (pass the student's parameters for the live-probe control).
      probe: a token-level probe whose width is the site's width.
      site: where the probe reads, e.g. ``"blocks.1.resid_post"``.
      tokens, valid: ``[B, T]`` prompt + completion.
      span_ids: ``[B, T]`` claim ids; every claim token must be a real token of the completion
        (index ``>= completion_start``).
      n_spans: ``S``, the largest claim id.
      completion_start: index where completions begin (the padded prompt length).
      reading: ``"answer"``, ``"prediction"`` or ``"both"``.

    Returns:
      ``[B, S]`` float32 probabilities (``nan`` for absent claims).

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign import rl, probes
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> probe = probes.LogisticProbe(jnp.zeros(8), jnp.array(0.0), jnp.zeros(8), jnp.ones(8))
    >>> t = jnp.ones((1, 5), jnp.int32)
    >>> rl.claim_scores(apply, params, probe, "blocks.0.resid_post", t, t > 0, jnp.array([[0, 0, 1, 1, 2]]), 2,
    ...                 completion_start=2).tolist()
    [[0.5, 0.5]]
    >>> rl.claim_scores(apply, params, probe, "blocks.0.resid_post", t, t > 0, jnp.array([[0, 1, 1, 0, 0]]), 1,
    ...                 completion_start=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: claim_scores: claim 1 of row 0 has tokens at positions [1], outside the completion ...
    """
    ids_host = np.asarray(span_ids)
    valid_host = np.asarray(valid, bool)
    if ids_host.shape != valid_host.shape or ids_host.ndim != 2:
        raise ValueError(f"claim_scores: span_ids {ids_host.shape} and valid {valid_host.shape} must both be [B, T].")
    outside = (ids_host > 0) & ((np.arange(ids_host.shape[1]) < completion_start)[None] | ~valid_host)
    if outside.any():
        b, t = np.argwhere(outside)[0]
        where = np.flatnonzero(outside[b] & (ids_host[b] == ids_host[b, t])).tolist()
        raise ValueError(f"claim_scores: claim {int(ids_host[b, t])} of row {int(b)} has tokens at positions {where}, "
                         f"outside the completion (real tokens from index completion_start={completion_start} "
                         f"to {ids_host.shape[1] - 1}).")
    if ids_host.max(initial=0) > n_spans:
        raise ValueError(f"claim_scores: span_ids go up to {int(ids_host.max())}, more than n_spans={n_spans}.")
    d_model = getattr(getattr(teacher_apply, "config", None), "d_model", None)
    width = np.shape(getattr(probe, "mean", getattr(probe, "w", None)))
    if d_model is not None and width and width[-1] != d_model:
        raise ValueError(f"claim_scores: the probe reads vectors of width {width[-1]}, but the teacher's site "
                         f"{site!r} has width d_model={d_model}.")
    return _claim_scores(teacher_apply, teacher_params, probe, site, jnp.asarray(tokens), jnp.asarray(valid_host),
                         jnp.asarray(ids_host, jnp.int32), n_spans, reading)


@functools.partial(jax.jit, static_argnums=(0, 3, 7, 8))
def _claim_scores(teacher_apply, teacher_params, probe, site, tokens, valid, span_ids, n_spans, reading):
    teacher_params = jax.lax.stop_gradient(teacher_params)
    probe = jax.lax.stop_gradient(probe)
    _, captured = teacher_apply(teacher_params, tokens, hooks={site: Capture()}, valid=valid)
    if site not in captured:
        raise ValueError(f"claim_scores: site {site!r} was not captured; sites are e.g. 'blocks.0.resid_post'.")
    read = read_span_ids(span_ids, valid, reading)
    z = span_scores(probe, captured[site].astype(jnp.float32), read, n_spans, valid)
    return jnp.where(jnp.isfinite(z), jax.nn.sigmoid(z), jnp.nan)


@dataclasses.dataclass(frozen=True)
class ClaimRewardConfig:
    """RLFR-style reward settings (Prasad et al. 2026), fixed before training.

    Attributes:
      clip: a kept claim (maintained or a correction) earns ``clip(1 - P(hallucinated), *clip)``.
      retract_cap: a retraction earns ``retract_cap * clip(P(hallucinated of the retracted claim) - lam, 0, 1)``;
        it must stay below ``clip[1]`` so retracting never beats a supported claim.
      format_penalty: added to a malformed completion's reward.
      retract_budget: the retraction rate the Lagrange multiplier holds (at most), in ``[0, 1]``.
      lagrange_lr: step size of the multiplier.
      multiplier: how ``lam`` enters a retraction's reward: ``"clip"`` (RLFR, ``retract_cap * clip(p - lam, 0, 1)``:
        0 already for a claim with p = 0, so ``lam`` only discourages retracting likely-wrong claims) or
        ``"cost"`` (``retract_cap * p - lam``, the Lagrangian of "retraction rate <= budget": every retraction pays).
      lagrange_kp: proportional gain of the multiplier (:func:`retraction_multiplier`), ``>= 0``; 0 (the
        default, RLFR) is the integral-only multiplier. :func:`retraction_gain` derives one from the reward.

    >>> from idesign import rl
    >>> rl.ClaimRewardConfig(retract_budget=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ClaimRewardConfig.retract_budget=1.5: expected a rate in [0, 1] ...
    """

    clip: tuple[float, float] = (0.1, 0.95)
    retract_cap: float = 0.65
    format_penalty: float = -0.2
    retract_budget: float = 0.4
    lagrange_lr: float = 0.2
    multiplier: str = "clip"
    lagrange_kp: float = 0.0

    def __post_init__(self):
        _check_gain("ClaimRewardConfig.lagrange_kp", self.lagrange_kp,
                    "the multiplier's proportional gain; 0 for the integral-only multiplier")
        if self.multiplier not in ("clip", "cost"):
            raise ValueError(f"ClaimRewardConfig.multiplier={self.multiplier!r}: expected 'clip' (RLFR: "
                             "retract_cap * clip(p - lam, 0, 1)) or 'cost' (retract_cap * p - lam).")
        if not 0 <= self.retract_budget <= 1:
            raise ValueError(f"ClaimRewardConfig.retract_budget={self.retract_budget!r}: expected a rate in [0, 1] "
                             "(the share of claims retracted), fixed before training.")
        lo, hi = self.clip
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"ClaimRewardConfig.clip={self.clip!r}: expected (low, high) with 0 <= low < high <= 1.")
        if not 0 <= self.retract_cap < hi:
            raise ValueError(f"ClaimRewardConfig.retract_cap={self.retract_cap!r}: expected a number in [0, clip[1]={hi}) "
                             "so that a retraction never earns more than a supported claim.")


def slot_rewards(p_kept: Array, p_retracted: Array, outcome: Array, lam: Array | float,
                 config: ClaimRewardConfig = ClaimRewardConfig()) -> Array:
    """Reward of each slot (an attribute a completion addresses) from the probe's claim probabilities.

    ``outcome`` is 0 where the slot ends in a kept claim (maintained, or a correction after a
    retraction) with probability ``p_kept``; 1 where it ends retracted, the retracted claim having
    probability ``p_retracted``; 2 where there is nothing to score (not addressed, or abstained
    without a claim): reward ``clip[0]``, what a sure hallucination earns, so that neither saying more
    nor saying less is rewarded for itself.

    >>> import jax.numpy as jnp
    >>> from idesign import rl
    >>> r = rl.slot_rewards(jnp.array([0.0, 1.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 1.0, 0.5]),
    ...                 jnp.array([0, 0, 1, 2]), 0.0)
    >>> [round(float(r), 3) for r in r]
    [0.95, 0.1, 0.65, 0.1]
    """
    lo, hi = config.clip
    kept = jnp.clip(1.0 - jnp.nan_to_num(p_kept), lo, hi)
    if config.multiplier == "cost":
        retract = config.retract_cap * jnp.clip(jnp.nan_to_num(p_retracted), 0.0, 1.0) - lam
    else:
        retract = config.retract_cap * jnp.clip(jnp.nan_to_num(p_retracted) - lam, 0.0, 1.0)
    outcome = jnp.asarray(outcome)
    return jnp.where(outcome == 0, kept, jnp.where(outcome == 1, retract, lo))


def retraction_lagrange_update(state: LagrangeState, retract_rate: Array | float,
                               config: ClaimRewardConfig = ClaimRewardConfig()) -> LagrangeState:
    """Moves the multiplier to hold the retraction rate at most ``config.retract_budget`` (``lam >= 0``).

    >>> from idesign import rl
    >>> round(float(rl.retraction_lagrange_update(rl.lagrange_init(), 0.9, rl.ClaimRewardConfig(retract_budget=0.4)).lam), 4)
    0.1
    """
    return lagrange_update(state, retract_rate, target=config.retract_budget, lr=config.lagrange_lr,
                           bounds=(0.0, None))


def retraction_multiplier(state: LagrangeState, retract_rate: Array | float,
                          config: ClaimRewardConfig = ClaimRewardConfig()) -> Array:
    """The multiplier for the batch whose retraction rate is ``retract_rate`` (:func:`pi_multiplier`, ``lam >= 0``).

    With ``config.lagrange_kp = 0`` this is ``state.lam``: the integral-only multiplier of RLFR.

    >>> from idesign import rl
    >>> c = rl.ClaimRewardConfig(retract_budget=0.4, lagrange_kp=5.0)
    >>> round(float(rl.retraction_multiplier(rl.lagrange_init(), 0.5, c)), 4)   # 5 * (0.5 - 0.4)
    0.5
    """
    return pi_multiplier(state, retract_rate, target=config.retract_budget, kp=config.lagrange_kp)


def neutral_retraction_multiplier(config: ClaimRewardConfig = ClaimRewardConfig()) -> float:
    """The ``lam`` at which retracting a sure hallucination (p = 1) earns what keeping it earns (``clip[0]``).

    Above it no retraction is worth more than keeping the claim, so the policy is pushed away from
    retracting at all. ``"clip"``: ``retract_cap * (1 - lam) = clip[0]``; ``"cost"``: ``retract_cap - lam = clip[0]``.

    >>> from idesign import rl
    >>> round(rl.neutral_retraction_multiplier(rl.ClaimRewardConfig(clip=(0.1, 0.95), retract_cap=0.5)), 4)
    0.8
    >>> round(rl.neutral_retraction_multiplier(rl.ClaimRewardConfig(clip=(0.1, 0.95), retract_cap=0.5,
    ...                                                               multiplier="cost")), 4)
    0.4
    """
    lo = config.clip[0]
    if config.retract_cap <= lo:
        return 0.0  # a retraction never beats keeping even a sure hallucination
    if config.multiplier == "cost":
        return float(config.retract_cap - lo)
    return float(1.0 - lo / config.retract_cap)


def retraction_gain(config: ClaimRewardConfig, overshoot: float) -> float:
    """A proportional gain fixed from the reward alone: ``neutral_retraction_multiplier(config) / overshoot``.

    With it, a batch whose retraction rate is ``overshoot`` above the budget gets (at least) the neutral
    multiplier from the proportional term alone: retracting is then worth no more than keeping even a
    sure hallucination, whatever the integral term has reached.

    >>> from idesign import rl
    >>> round(rl.retraction_gain(rl.ClaimRewardConfig(clip=(0.1, 0.95), retract_cap=0.5), 0.1), 4)
    8.0
    >>> rl.retraction_gain(rl.ClaimRewardConfig(), 0.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: retraction_gain: overshoot=0.0; expected a rate in (0, 1] ...
    """
    if not (isinstance(overshoot, (int, float)) and 0 < overshoot <= 1):
        raise ValueError(f"retraction_gain: overshoot={overshoot!r}; expected a rate in (0, 1] (how far above the "
                         "budget the retraction rate may go before retracting earns nothing extra).")
    return neutral_retraction_multiplier(config) / overshoot
