"""Batched KV-cache sampling, monitors that watch tokens as they are produced, and token injection.

:func:`generate` prefills left-padded prompts into a KV cache and runs every decode step inside one
``jax.lax.scan``; the whole call is one compiled function, built once per (shapes, sampling config,
kind of hooks, kind of monitor). ``hooks`` act on the prefill and on every decode step, so steering
(``ids.Add``) or ablation holds throughout generation.

A :class:`Monitor` runs in lockstep with decoding. After each token is fed to the model it receives
a :class:`StepInfo` (the token, its position, the activations it asked for at that token, ...) and
may answer with an :class:`Injection`: tokens that are emitted next *instead of sampling*, fed to
the model like any other token and marked in ``GenerateOutput.injected``.

Monitor protocol (all methods are traced; the monitor is a pytree)::

    class MyMonitor(ids.Monitor):
        sites: tuple[str, ...]      # static: activation sites (names or glob patterns) to receive
        max_inject: int             # static: longest injection (0: never injects)
        def init(self, batch_size) -> state                                  # any pytree
        def prefill(self, state, info: PromptInfo) -> state                  # optional; default: identity
        def step(self, state, info: StepInfo) -> tuple[state, Injection]

Write a monitor as a pytree dataclass: arrays (probe weights, thresholds, a teacher's parameters)
are leaves, so changing them never recompiles; configuration (``sites``, ``max_inject``) is static
metadata (``static()`` with ``jax.tree_util.register_dataclass``,
or a property computed from static shapes, as in :class:`InjectAfterToken`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import tree as tree_lib
from idesign._pytree import pytree_class
from idesign._types import Array, PyTree
from idesign.hooks import Capture, Hooks, merge_hooks


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits. Hashable: a static argument of compiled code.

    Attributes:
      temperature: divides the logits; ``0`` means greedy (argmax; no key needed).
      top_k: keep only the ``k`` most likely tokens (``None``: all).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
        reaches ``top_p`` (``None``: all). Applied after ``top_k``, on the renormalised distribution.

    >>> import idesign as ids
    >>> ids.SamplingConfig(temperature=0.7, top_k=50, top_p=0.9).greedy
    False
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature!r}; expected >= 0 (0 means greedy).")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingConfig.top_k={self.top_k!r}; expected a positive integer or None.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p!r}; expected a number in (0, 1] or None.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Array, config: SamplingConfig) -> Array:
    """Temperature-scaled logits with everything outside top-k / top-p set to ``-inf``.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.filter_logits(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), ids.SamplingConfig(top_p=0.6))
    Array([[-0.6931472, -1.2039728,       -inf]], dtype=float32)
    """
    logits = logits.astype(jnp.float32)
    if config.temperature not in (0, 1):
        logits = logits / config.temperature
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, neg_inf)
    if config.top_p is not None and config.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of the strictly more likely tokens is below top_p; the most
        # likely token is always kept. Ties with the last kept logit are kept too.
        keep = (mass_before < config.top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, neg_inf)
    return logits


def sample_logits(key: Array | None, logits: Array, config: SamplingConfig = SamplingConfig()) -> Array:
    """Draws one token per row of ``logits`` [..., V]: top-k, then top-p, then a categorical draw.

    With ``config.temperature == 0`` it returns the argmax and ignores ``key``.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> ids.sample_logits(None, logits, ids.SamplingConfig(temperature=0.0))
    Array([1, 0], dtype=int32)
    >>> ids.sample_logits(jax.random.key(0), logits, ids.SamplingConfig(top_k=1))
    Array([1, 0], dtype=int32)
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample_logits: a PRNG key is needed unless temperature == 0 (greedy).")
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Monitors


class StepInfo(NamedTuple):
    """What a monitor sees after each decode step, for the token just appended.

    Attributes:
      token: [B] int32, the token just emitted (``pad_id`` for finished rows).
      step: [] int32, index of this token among the generated ones (0 for the first).
      position: [B] int32, the model position of the token (the number of real tokens before it).
      activations: ``{site: [B, ...]}``, the monitor's sites at this token, captured in the same
        decode forward pass that fed the token (after the user's hooks at that site). The token
        axis is removed (for ``*.attn.pattern`` sites, ``[B, H, S]`` over cache slots).
      valid: [B] bool, whether the token is real (False once a row has finished).
      injected: [B] bool, whether the token came from an injection rather than sampling.
      logits: [B, V] float32, the logits the token was chosen from (for injected tokens: the
        distribution the model would have sampled from).
    """

    token: Array
    step: Array
    position: Array
    activations: dict[str, Array]
    valid: Array
    injected: Array
    logits: Array


class PromptInfo(NamedTuple):
    """What a monitor sees once after the prompt is prefilled (e.g. to prefill a teacher model).

    Attributes:
      tokens: [B, P] int32, the left-padded prompts.
      valid: [B, P] bool, real prompt tokens.
      activations: ``{site: [B, P, ...]}``, the monitor's sites over the prompt (``[B, H, P, S]``
        for ``*.attn.pattern``).
    """

    tokens: Array
    valid: Array
    activations: dict[str, Array]


class Injection(NamedTuple):
    """A monitor's request to emit ``tokens[b, :length[b]]`` next in row ``b`` instead of sampling.

    Attributes:
      tokens: [B, max_inject] int32.
      length: [B] int32; 0 means no injection for that row.
    """

    tokens: Array
    length: Array

    @classmethod
    def none(cls, batch_size: int, max_inject: int = 0) -> "Injection":
        """No injection in any row.

        >>> import idesign as ids
        >>> ids.Injection.none(2, 3).length
        Array([0, 0], dtype=int32)
        """
        return cls(jnp.zeros((batch_size, max_inject), jnp.int32), jnp.zeros((batch_size,), jnp.int32))


class Monitor:
    """Base class of generation monitors (see the module docstring for the protocol).

    Subclasses are pytree dataclasses. ``sites`` and ``max_inject`` must be static (fields with
    ``metadata=dict(static=True)``, class attributes, or properties of static shapes).

    Injections are queued per row in a buffer of ``max_inject`` slots and emitted one per step.
    While a row's queue is non-empty (it is still emitting an earlier injection), new requests
    for that row are ignored; so are requests for rows that have finished (emitted ``eos_id``).
    An injected ``eos_id`` finishes its row like a sampled one. Injected tokens count against
    ``max_new_tokens``; an injection still queued when generation ends is cut off.

    A monitor that reads the residual stream and keeps the largest norm seen per row:

    >>> import dataclasses, jax, jax.numpy as jnp, idesign as ids
    >>> @jax.tree_util.register_dataclass
    ... @dataclasses.dataclass(frozen=True)
    ... class MaxNorm(ids.Monitor):
    ...     sites = ("blocks.1.resid_post",)
    ...     def init(self, batch_size):
    ...         return jnp.zeros((batch_size,))
    ...     def step(self, state, info):
    ...         norm = jnp.linalg.norm(info.activations["blocks.1.resid_post"], axis=-1)
    ...         return jnp.maximum(state, norm), ids.Injection.none(info.token.shape[0])
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=37, d_model=32, n_heads=4))
    >>> out = ids.generate(apply, params, jnp.ones((2, 3), jnp.int32), max_new_tokens=3,
    ...                    sampling=ids.SamplingConfig(temperature=0.0), monitor=MaxNorm())
    >>> out.monitor_state.shape
    (2,)
    """

    sites: tuple[str, ...] = ()
    max_inject: int = 0

    def init(self, batch_size: int) -> PyTree:
        """The monitor's initial state (any pytree), before the prompt is seen."""
        raise NotImplementedError

    def prefill(self, state: PyTree, info: PromptInfo) -> PyTree:
        """Updates the state with the prompt; the default ignores it."""
        del info
        return state

    def step(self, state: PyTree, info: StepInfo) -> tuple[PyTree, Injection]:
        """Updates the state with one generated token; returns it and an :class:`Injection`."""
        raise NotImplementedError


@pytree_class(eq=True)
class InjectAfterToken(Monitor):
    """Injects ``inject_ids`` right after a row samples ``trigger_id``, at most ``max_events`` times per row.

    Only *sampled* tokens trigger (an injected ``trigger_id`` does not), so an injection cannot
    trigger itself. The state is the number of injections requested per row, ``[B] int32``.
    ``trigger_id``, ``inject_ids`` and ``max_events`` are traced: changing them does not recompile
    (changing the length of ``inject_ids`` does).

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=37, d_model=32, n_heads=4))
    >>> prompts = jnp.array([[1, 2, 3]], jnp.int32)
    >>> plain = ids.generate(apply, params, prompts, max_new_tokens=4, sampling=ids.SamplingConfig(temperature=0.0))
    >>> monitor = ids.InjectAfterToken(trigger_id=plain.tokens[0, 0], inject_ids=jnp.array([7, 8]))
    >>> out = ids.generate(apply, params, prompts, max_new_tokens=4,
    ...                    sampling=ids.SamplingConfig(temperature=0.0), monitor=monitor)
    >>> out.tokens[0, 1:3].tolist(), out.injected[0].tolist()
    ([7, 8], [False, True, True, False])
    """

    trigger_id: Array | int
    inject_ids: Array
    max_events: Array | int = 1

    sites = ()  # class attribute (not a field): this monitor reads no activations

    @property
    def max_inject(self) -> int:  # type: ignore[override]
        return int(np.shape(self.inject_ids)[-1])

    def init(self, batch_size: int) -> Array:
        return jnp.zeros((batch_size,), jnp.int32)

    def step(self, state: Array, info: StepInfo) -> tuple[Array, Injection]:
        fire = (info.token == self.trigger_id) & info.valid & ~info.injected & (state < self.max_events)
        batch = info.token.shape[0]
        tokens = jnp.broadcast_to(jnp.asarray(self.inject_ids, jnp.int32), (batch, self.max_inject))
        length = jnp.where(fire, self.max_inject, 0).astype(jnp.int32)
        return state + fire.astype(jnp.int32), Injection(tokens, length)


# ----------------------------------------------------------------------------------------------
# Generation


class GenerateOutput(NamedTuple):
    """The result of :func:`generate`.

    Attributes:
      tokens: [B, N] int32 generated tokens (``pad_id`` after a row's EOS).
      valid: [B, N] bool, real generated tokens (including the EOS itself).
      injected: [B, N] bool, tokens that came from a monitor's injection.
      logits: [B, N, V] float32, the logits token ``t`` was chosen from (meaningless where
        ``valid`` is False), or None unless ``return_logits=True``.
      monitor_state: the monitor's final state, or None without a monitor.
      prompt: [B, P] int32, the prompts as given.
      prompt_valid: [B, P] bool.
    """

    tokens: Array
    valid: Array
    injected: Array
    logits: Array | None
    monitor_state: PyTree
    prompt: Array
    prompt_valid: Array

    def sequences(self) -> tuple[Array, Array]:
        """``(tokens [B, P + N], valid [B, P + N])``: prompts followed by generations.

        Feeding both to the model, ``apply(params, tokens, valid=valid)``, recomputes the
        generation in one pass: the logits at index ``P - 1 + t`` are ``logits[:, t]``.
        """
        return (jnp.concatenate([self.prompt, self.tokens], axis=1),
                jnp.concatenate([self.prompt_valid, self.valid], axis=1))


class _Queue(NamedTuple):
    tokens: Array  # [B, Q]
    head: Array    # [B] index of the next token to emit
    length: Array  # [B] tokens left to emit


def _at_token(site: str, x: Array, index: Any = 0) -> Array:
    """Removes the token axis of a captured activation (axis 2 for attention patterns)."""
    return x[:, :, index] if site.endswith("attn.pattern") else x[:, index]


def _monitor_hooks(hooks: Hooks | None, sites: tuple[str, ...]) -> dict:
    """The user's hooks plus a Capture (after the user's chain) at each monitor site not captured yet."""
    merged = merge_hooks(hooks)
    extra = {s: Capture() for s in sites if not any(isinstance(i, Capture) for i in merged.get(s, ()))}
    return merge_hooks(merged, extra)


def _select(captured: Mapping[str, Array], sites: tuple[str, ...]) -> dict[str, Array]:
    return {name: x for name, x in captured.items() if tree_lib.matches(name, sites)} if sites else {}


@functools.partial(jax.jit, static_argnames=("apply", "max_new_tokens", "sampling", "eos_id", "pad_id",
                                             "return_logits"))
def _generate(apply, params, prompts, prompt_valid, key, hooks, monitor, *, max_new_tokens: int,
              sampling: SamplingConfig, eos_id: int | None, pad_id: int, return_logits: bool) -> GenerateOutput:
    B, P = prompts.shape
    sites = tuple(monitor.sites) if monitor is not None else ()
    run_hooks = _monitor_hooks(hooks, sites) if sites else hooks
    cache = apply.init_cache(B, P + max_new_tokens)
    logits, captured, cache = apply.forward(params, prompts, hooks=run_hooks, valid=prompt_valid, cache=cache)
    last_logits = logits[:, -1].astype(jnp.float32)  # left padding: the last slot is real in every row

    mstate, queue = None, None
    if monitor is not None:
        mstate = monitor.init(B)
        mstate = monitor.prefill(mstate, PromptInfo(prompts, prompt_valid, _select(captured, sites)))
        Q = int(monitor.max_inject)
        queue = _Queue(jnp.zeros((B, Q), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))

    def step(carry, t):
        cache, logits, n_real, finished, queue, mstate = carry
        token = sample_logits(None if sampling.greedy else jax.random.fold_in(key, t), logits, sampling)
        valid = ~finished
        injected = jnp.zeros((B,), bool)
        if queue is not None and queue.tokens.shape[1] > 0:
            injected = (queue.length > 0) & valid
            queued = jnp.take_along_axis(queue.tokens, jnp.minimum(queue.head, queue.tokens.shape[1] - 1)[:, None],
                                         axis=1)[:, 0]
            token = jnp.where(injected, queued, token)
            queue = queue._replace(head=queue.head + injected, length=queue.length - injected)
        token = jnp.where(valid, token, pad_id).astype(jnp.int32)
        new_logits, captured, cache = apply.forward(params, token[:, None], hooks=run_hooks,
                                                    valid=valid[:, None], cache=cache)
        if eos_id is not None:
            finished = finished | (valid & (token == eos_id))
        if monitor is not None:
            acts = {name: _at_token(name, x) for name, x in _select(captured, sites).items()}
            info = StepInfo(token, t, n_real, acts, valid, injected, logits)
            mstate, injection = monitor.step(mstate, info)
            queue = _enqueue(queue, injection, accept=(queue.length == 0) & ~finished)
        out = (token, valid, injected, logits if return_logits else None)
        carry = (cache, new_logits[:, -1].astype(jnp.float32), n_real + valid, finished, queue, mstate)
        return carry, out

    carry = (cache, last_logits, prompt_valid.sum(1).astype(jnp.int32), jnp.zeros((B,), bool), queue, mstate)
    carry, (tokens, valid, injected, all_logits) = jax.lax.scan(step, carry, jnp.arange(max_new_tokens, dtype=jnp.int32))
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    return GenerateOutput(swap(tokens), swap(valid), swap(injected), swap(all_logits), carry[-1], prompts, prompt_valid)


def _enqueue(queue: _Queue, injection: Injection, accept: Array) -> _Queue:
    Q = queue.tokens.shape[1]
    tokens = jnp.asarray(injection.tokens, jnp.int32)
    if tokens.shape != queue.tokens.shape:
        raise ValueError(f"Monitor.step returned Injection.tokens of shape {tokens.shape}; expected "
                         f"[batch, max_inject] = {queue.tokens.shape}.")
    if Q == 0:
        return queue
    length = jnp.clip(jnp.asarray(injection.length, jnp.int32), 0, Q)
    accept = accept & (length > 0)
    return _Queue(jnp.where(accept[:, None], tokens, queue.tokens), jnp.where(accept, 0, queue.head),
                  jnp.where(accept, length, queue.length))


def generate(apply: Any, params: PyTree, prompts: Array, *, max_new_tokens: int, key: Array | None = None,
             prompt_valid: Array | None = None, sampling: SamplingConfig = SamplingConfig(),
             eos_id: int | None = None, pad_id: int = 0, hooks: Hooks | None = None,
             monitor: Monitor | None = None, return_logits: bool = False) -> GenerateOutput:
    """Samples ``max_new_tokens`` tokens after each prompt, with a KV cache, in one compiled call.

    The prompt is prefilled into a cache of ``P + max_new_tokens`` slots, then a ``lax.scan`` runs
    the decode steps. Compiled once per (shapes, ``apply``, ``max_new_tokens``, ``sampling``,
    ``eos_id``, ``pad_id``, ``return_logits``, kind of ``hooks`` and ``monitor``); new prompts,
    keys, parameters, steering directions or monitor arrays reuse the compiled code.

    Args:
      apply: the functional model (e.g. from :func:`idesign.init_transformer`); it must offer
        ``forward(params, tokens, *, hooks, valid, cache)`` and ``init_cache(batch, max_len)``.
      params: the model's parameters.
      prompts: [B, P] integer token ids, left-padded.
      max_new_tokens: number of decode steps N (injected tokens count against it).
      key: PRNG key; only needed when ``sampling.temperature > 0``. Step ``t`` uses
        ``fold_in(key, t)``, so the same key gives the same generation.
      prompt_valid: [B, P] bool, False at left padding; every row needs at least one real token.
        Default: all real.
      sampling: :class:`SamplingConfig` (temperature 0 is greedy).
      eos_id: once a row emits it, the rest of the row is ``pad_id`` with ``valid`` False, fed to
        the model as padding (not attended to). ``None``: rows never finish early.
      pad_id: token id written after EOS.
      hooks: interventions applied in the prefill and at every decode step (e.g. steering). They
        must broadcast against one-token activations ``[B, 1, ...]`` (per-feature ``[d]`` or
        per-row ``[B, 1, d]``). Captures requested here are discarded; use a monitor to read
        activations during generation.
      monitor: a :class:`Monitor` run after every decode step; it may inject tokens.
      return_logits: also return the logits each token was chosen from, ``[B, N, V]``.

    Returns:
      A :class:`GenerateOutput`.

    >>> import jax, jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=37, d_model=32, n_heads=4))
    >>> prompts = jnp.array([[0, 5, 6], [4, 5, 6]], jnp.int32)
    >>> out = ids.generate(apply, params, prompts, prompt_valid=prompts > 0, max_new_tokens=5,
    ...                    key=jax.random.key(0), sampling=ids.SamplingConfig(temperature=0.8, top_k=10))
    >>> out.tokens.shape, out.valid.all().item()
    ((2, 5), True)
    >>> tokens, valid = out.sequences()
    >>> tokens.shape
    (2, 8)
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected a positive integer.")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"generate: sampling must be a SamplingConfig; got {type(sampling).__name__}.")
    if monitor is not None and not isinstance(monitor, Monitor):
        raise TypeError(f"generate: monitor must be an idesign.Monitor; got {type(monitor).__name__}.")
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"generate: prompts must be integer token ids of shape [batch, prompt_len]; "
                         f"got shape {prompts.shape} and dtype {prompts.dtype}.")
    prompts = prompts.astype(jnp.int32)
    prompt_valid = jnp.ones(prompts.shape, bool) if prompt_valid is None else jnp.asarray(prompt_valid, bool)
    if prompt_valid.shape != prompts.shape:
        raise ValueError(f"generate: prompt_valid has shape {prompt_valid.shape}; expected the prompts' "
                         f"shape {prompts.shape}.")
    _check_left_padded(prompt_valid)
    config = getattr(apply, "config", None)
    total = prompts.shape[1] + max_new_tokens
    if getattr(config, "positions", None) == "learned" and total > config.max_len:
        raise ValueError(f"generate: prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds the model's max_len={config.max_len} (learned positions).")
    if not sampling.greedy and key is None:
        raise ValueError("generate: pass key=jax.random.key(...) to sample, or use "
                         "SamplingConfig(temperature=0.0) for greedy decoding.")
    if key is None:
        key = jax.random.key(0)  # unused by greedy decoding; keeps the compiled signature fixed
    return _generate(apply, params, prompts, prompt_valid, key, hooks, monitor,
                     max_new_tokens=int(max_new_tokens), sampling=sampling, eos_id=eos_id, pad_id=int(pad_id),
                     return_logits=bool(return_logits))


def _check_left_padded(valid: Array) -> None:
    if isinstance(valid, jax.core.Tracer):
        return
    v = np.asarray(valid)
    empty = np.flatnonzero(~v.any(1))
    if empty.size:
        raise ValueError(f"generate: prompt rows {empty.tolist()} have no valid token; every prompt needs one.")
    bad = np.flatnonzero((v[:, :-1] & ~v[:, 1:]).any(1))
    if bad.size:
        raise ValueError(f"generate: prompt rows {bad.tolist()} are not left-padded (a valid token is followed "
                         "by padding); put padding before the prompt.")
