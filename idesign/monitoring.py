"""A hallucination monitor: a frozen teacher decodes in lockstep with the policy and a probe reads it.

:class:`ProbeMonitor` is an :class:`idesign.Monitor` for :func:`idesign.generate`. It keeps the
*teacher's* own KV cache: the prompt is prefilled into it (``prefill``) and every token the policy
emits, sampled or injected, is fed to the teacher in the same decode step (``step``). A token-level
probe scores the teacher's activation at ``site`` for each token that can belong to an answer
span (``span_tokens``); a span is a maximal run of such tokens that the policy *sampled*, and its
score is the running max of the token logits (the span-max rule of Obeso et al. 2025), read where
``reading`` says (:func:`idesign.probes.read_span`): at the token itself (``"answer"``), at the position
it was predicted from (``"prediction"``: the teacher's activation at the previous real token, which
for the first generated token is the last prompt token, captured during ``prefill``), or the max of
both (``"both"``). The monitor therefore reads exactly what :func:`idesign.rl.probe_scores` reads on
the finished sequence with the same ``reading``. When a
span's probability first exceeds ``threshold`` — at a *closing* token (``close_tokens``, e.g. the last word
of a multi-word value) when one is given, so a claim is judged once it is complete — the monitor injects ``inject_ids`` (e.g. the
``<retract>`` marker) right after that token, at most ``max_events`` times per row; the policy
then continues from the injected context (maintain, correct or abstain) — RLFR's "inline" runtime
token injection (Prasad et al. 2026, arXiv 2602.10067).

Reading the teacher, not the policy, is the point: a policy that has been trained against the
probe cannot move the activations the monitor reads.

The final state (:class:`ProbeMonitorState`) logs the probe logit of every generated token
(``scores``, ``-inf`` outside spans) and where the monitor fired (``fired``), so precision and
recall of the monitor can be computed against ground truth afterwards.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign._pytree import pytree_class, static
from idesign._types import Array, PyTree
from idesign.generate import Injection, Monitor, PromptInfo, StepInfo
from idesign.hooks import Capture
from idesign.probes import READINGS
from idesign.probes import score as probe_score


class ProbeMonitorState(NamedTuple):
    """The state :class:`ProbeMonitor` carries through generation.

    Attributes:
      cache: the teacher's :class:`idesign.KVCache` (None before ``prefill``).
      span_max: ``[B]`` running max probe logit of the current span (``-inf`` outside a span).
      span_fired: ``[B]`` bool, whether the current span has already triggered an injection.
      events: ``[B]`` int32, injections requested so far.
      scores: ``[B, max_steps]`` probe logit of each generated span token as read under the
        monitor's ``reading`` (``-inf`` elsewhere); a span's score is the max over its tokens.
      previous: ``[B]`` teacher probe logit at the last real token fed so far (the prompt's last
        token after ``prefill``): the prediction position of the next token.
      fired: ``[B, max_steps]`` bool, True at the generated token after which an injection was requested.
    """

    cache: Any
    span_max: Array
    span_fired: Array
    events: Array
    scores: Array
    fired: Array
    previous: Array


@pytree_class(eq=True)
class ProbeMonitor(Monitor):
    """Runs a frozen teacher in lockstep with generation; injects tokens when a probe fires (module docstring).

    Attributes:
      teacher_apply: the teacher's functional model (static; needs ``forward`` and ``init_cache``).
      site: the activation site the probe reads, e.g. ``"blocks.1.resid_post"`` (static).
      max_steps: the ``max_new_tokens`` of the generation it monitors (static; sizes the logs).
      teacher_params: the teacher's parameters (leaves: swapping them never recompiles).
      probe: a token-level probe (:class:`idesign.probes.LogisticProbe` or ``MassMeanProbe``).
      span_tokens: ``[V]`` bool, which token ids can be part of an answer span.
      inject_ids: ``[L]`` int32, the tokens injected when the probe fires.
      threshold: probability above which a span fires (0.7 in RLFR).
      max_events: at most this many injections per row.
      reading: where a span token is read, ``"answer"``, ``"prediction"`` or ``"both"``
        (:func:`idesign.probes.read_span`; static).
      close_tokens: ``[V]`` bool or None: the tokens that complete a span (a claim). When given, a span
        can fire only at one of them, after its whole value is out; None: at any span token.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign import probes
    >>> from idesign.monitoring import ProbeMonitor
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=37, d_model=32, n_heads=4))
    >>> always = probes.LogisticProbe(jnp.zeros(32), jnp.array(5.0), jnp.zeros(32), jnp.ones(32))  # p = 0.99
    >>> monitor = ProbeMonitor(apply, "blocks.1.resid_post", 4, params, always, jnp.ones(37, bool),
    ...                        inject_ids=jnp.array([4]), threshold=0.7, max_events=1)
    >>> out = ids.generate(apply, params, jnp.array([[1, 2, 3]]), max_new_tokens=4,
    ...                    sampling=ids.SamplingConfig(temperature=0.0), monitor=monitor)
    >>> out.tokens[0, 1].item(), out.injected[0].tolist(), out.monitor_state.fired[0].tolist()
    (4, [False, True, False, False], [True, False, False, False])
    """

    teacher_apply: Any = static()
    site: str = static()
    max_steps: int = static()
    teacher_params: PyTree = None
    probe: Any = None
    span_tokens: Array = None
    inject_ids: Array = None
    threshold: Array | float = 0.7
    max_events: Array | int = 1
    reading: str = static(default="answer")
    close_tokens: Array | None = None

    sites = ()  # reads no activations of the policy: the teacher computes its own

    def __post_init__(self):
        if not isinstance(self.max_steps, (int, np.integer)) or self.max_steps < 1:
            raise ValueError(f"ProbeMonitor.max_steps={self.max_steps!r}; expected the generation's "
                             "max_new_tokens (a positive integer).")
        if self.reading not in READINGS:
            raise ValueError(f"ProbeMonitor.reading={self.reading!r}; expected one of {READINGS}.")
        arrays = (np.ndarray, jax.Array)  # fields left as None (or other non-arrays) are not checked here
        if isinstance(self.inject_ids, arrays) and np.ndim(self.inject_ids) != 1:
            raise ValueError(f"ProbeMonitor.inject_ids must be [L] token ids; got shape {np.shape(self.inject_ids)}.")
        for field in ("span_tokens", "close_tokens"):
            value = getattr(self, field)
            if isinstance(value, arrays) and np.ndim(value) != 1:
                raise ValueError(f"ProbeMonitor.{field} must be a [vocab_size] bool mask; got shape {np.shape(value)}.")
        probe_width = np.shape(getattr(self.probe, "mean", None))
        d_model = getattr(getattr(self.teacher_apply, "config", None), "d_model", None)
        if isinstance(getattr(self.probe, "mean", None), arrays) and d_model is not None and probe_width != (d_model,):
            raise ValueError(f"ProbeMonitor: the probe reads vectors of width {probe_width[-1] if probe_width else '?'}, "
                             f"but the teacher's site {self.site!r} has width d_model={d_model}.")

    @property
    def max_inject(self) -> int:  # type: ignore[override]
        return int(np.shape(self.inject_ids)[-1])

    def init(self, batch_size: int) -> ProbeMonitorState:
        """An empty state; the teacher's cache is made in :meth:`prefill`, once the prompt length is known."""
        B, N = batch_size, self.max_steps
        return ProbeMonitorState(None, jnp.full((B,), -jnp.inf), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
                                 jnp.full((B, N), -jnp.inf), jnp.zeros((B, N), bool), jnp.full((B,), -jnp.inf))

    def prefill(self, state: ProbeMonitorState, info: PromptInfo) -> ProbeMonitorState:
        """Prefills the prompts into a fresh teacher cache of ``P + max_steps`` slots.

        The probe logit at each prompt's last real token is kept: it is the prediction position of
        the first generated token.
        """
        B, P = info.tokens.shape
        cache = self.teacher_apply.init_cache(B, P + self.max_steps)
        _, captured, cache = self.teacher_apply.forward(self.teacher_params, info.tokens, hooks={self.site: Capture()},
                                                        valid=info.valid, cache=cache)
        last = jnp.max(jnp.where(info.valid, jnp.arange(P), -1), axis=1)
        acts = captured[self.site][jnp.arange(B), jnp.maximum(last, 0)].astype(jnp.float32)
        previous = jnp.where(last >= 0, probe_score(self.probe, acts), -jnp.inf)
        return state._replace(cache=cache, previous=previous)

    def step(self, state: ProbeMonitorState, info: StepInfo) -> tuple[ProbeMonitorState, Injection]:
        """Feeds the token to the teacher, scores it, and requests an injection when its span fires."""
        _, captured, cache = self.teacher_apply.forward(self.teacher_params, info.token[:, None],
                                                        hooks={self.site: Capture()}, valid=info.valid[:, None],
                                                        cache=state.cache)
        own = probe_score(self.probe, captured[self.site][:, 0].astype(jnp.float32))
        z = {"answer": own, "prediction": state.previous, "both": jnp.maximum(own, state.previous)}[self.reading]
        in_span = jnp.asarray(self.span_tokens, bool)[info.token] & info.valid & ~info.injected
        starts = in_span & ~jnp.isfinite(state.span_max)
        span_max = jnp.where(in_span, jnp.maximum(jnp.where(starts, -jnp.inf, state.span_max), z), -jnp.inf)
        span_fired = jnp.where(starts, False, state.span_fired) & in_span
        closes = True if self.close_tokens is None else jnp.asarray(self.close_tokens, bool)[info.token]
        fire = (in_span & closes & ~span_fired & (jax.nn.sigmoid(span_max) > self.threshold)
                & (state.events < self.max_events))
        B = info.token.shape[0]
        new_state = ProbeMonitorState(
            cache, span_max, span_fired | fire, state.events + fire.astype(jnp.int32),
            state.scores.at[:, info.step].set(jnp.where(in_span, z, -jnp.inf)),
            state.fired.at[:, info.step].set(fire), jnp.where(info.valid, own, state.previous))
        tokens = jnp.broadcast_to(jnp.asarray(self.inject_ids, jnp.int32), (B, self.max_inject))
        return new_state, Injection(tokens, jnp.where(fire, self.max_inject, 0).astype(jnp.int32))
