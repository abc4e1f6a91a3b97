"""Circuits: the weights that carry a capability, as element masks, and attribution scores to find them.

A *circuit spec* names components of the reference transformer — attention heads ``(layer, head)``,
MLP neurons ``(layer, neuron)``, or parameter path patterns — and turns into an element mask
(:mod:`idesign.tree`: a boolean pytree with the parameters' structure) that ``idesign.optim.freeze``,
:func:`ablate_weights` and the mask algebra consume::

    scores = ids.circuits.component_scores(ids.circuits.weight_attribution(loss_fn, params, batch), config)
    mask = ids.circuits.circuit_mask(params, config, heads=ids.circuits.select_top_k(scores.heads, 3))

Which weights a component owns (kernels are ``[d_in, d_out]``):

=================  ==================================================================================
head ``(i, h)``    columns ``h*Dh:(h+1)*Dh`` of ``blocks.i.attn.q_proj`` (kernel and bias); rows
                   ``h*Dh:(h+1)*Dh`` of ``o_proj.kernel``; and the columns of its key/value head
                   ``j = h // (H / Hkv)`` in ``k_proj``/``v_proj`` (kernel and bias), subject to
                   ``shared_kv`` (below)
neuron ``(i, n)``  column ``n`` of ``blocks.i.mlp.up`` and ``mlp.gate`` (kernel and bias); row ``n`` of
                   ``mlp.down.kernel``
=================  ==================================================================================

The output biases (``o_proj.bias``, ``mlp.down.bias``) are shared by all heads / neurons of a layer and
belong to none.

**Grouped-query attention.** With ``Hkv < H`` one key/value head serves a group of ``H / Hkv`` query
heads, so its weights are shared. ``shared_kv`` decides whether a selection owns them:

* ``'any'`` (default): the kv head is included when *any* of its query heads is selected. The mask then
  covers every weight the selected heads read — what freezing a circuit needs to keep it intact.
* ``'all'``: included only when *all* its query heads are selected. The mask then holds only weights
  no unselected head uses — what ablation needs: zeroing the mask silences exactly the selected heads.

With ordinary multi-head attention (``Hkv == H``) the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign import masks as masks_lib
from idesign import tree as tree_lib
from idesign.hooks import Add, Capture
from idesign.models.config import TransformerConfig

Array = jax.Array
Params = Any
Mask = Any
Component = tuple[int, int]
SharedKV = Literal["any", "all"]


# --- circuit specs -> masks ----------------------------------------------------------------------


def _check_pairs(pairs: Iterable[Component], n_layers: int, n_per_layer: int, kind: str) -> list[Component]:
    out = []
    for item in pairs:
        try:
            layer, index = item
        except (TypeError, ValueError):
            raise TypeError(f"{kind}s are given as (layer, {kind}) pairs; got {item!r}.") from None
        for name, value, n, unit in (("layer", layer, n_layers, "layers"), (kind, index, n_per_layer, f"{kind}s")):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{kind} {item!r}: {name} index must be an integer; got {value!r}.")
            if not 0 <= value < n:
                raise IndexError(f"{kind} ({layer}, {index}): {name} index {value} is out of "
                                 f"range; the model has {n} {unit} (valid: 0..{n - 1}).")
        out.append((int(layer), int(index)))
    return out


def _leaf(params: Params, path: str) -> Any:
    node = params
    for key in path.split("."):
        k = int(key) if key.isdigit() and isinstance(node, Mapping) and int(key) in node else key
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(f"params have no {path}; expected the reference transformer's layout "
                             "(see idesign.models). Are these the params of this config's model?")
        node = node[k]
    return node


def _expect_shape(params: Params, path: str, shape: tuple[int, ...]) -> None:
    got = tuple(np.shape(_leaf(params, path)))
    if got != shape:
        raise ValueError(f"params do not match the config: {path} has shape {got}, the config implies {shape}.")


def _has(params: Params, path: str) -> bool:
    try:
        _leaf(params, path)
        return True
    except ValueError:
        return False


def _mask_from_slices(params: Params, parts: Mapping[str, list[tuple[int, slice]]]) -> Mask:
    """A mask selecting, per path, the given ``(axis, slice)`` pieces; leaves not named are ``False``.

    Leaves are compact: size 1 along every axis no piece cuts (``(1, d_out)`` for whole columns).
    """
    arrays: dict[str, np.ndarray] = {}
    for path, pieces in parts.items():
        full = np.shape(_leaf(params, path))
        cut = {axis for axis, _ in pieces}
        m = np.zeros([n if axis in cut else 1 for axis, n in enumerate(full)], bool)
        for axis, sl in pieces:
            index = [slice(None)] * m.ndim
            index[axis] = sl
            m[tuple(index)] = True
        arrays[path] = m
    return tree_lib.map_with_path(lambda p, _: arrays.get(p, False), params)


def _check_shared_kv(shared_kv: str) -> None:
    if shared_kv not in ("any", "all"):
        raise ValueError(f"shared_kv={shared_kv!r}; expected 'any' or 'all' (see idesign.circuits).")


def heads_mask(params: Params, config: TransformerConfig, heads: Iterable[Component], *,
               shared_kv: SharedKV = "any") -> Mask:
    """The weights of attention heads ``[(layer, head), ...]`` as an element mask.

    Args:
      params: the reference transformer's parameters.
      config: its :class:`~idesign.TransformerConfig`.
      heads: ``(layer, head)`` pairs, query-head indices ``0..n_heads-1``.
      shared_kv: with grouped-query attention, include a key/value head when ``'any'`` or only when
        ``'all'`` of its query heads are selected (see the module docstring).

    Returns:
      A mask with compact numpy bool arrays on the projections it cuts into (``(1, d_out)`` column flags,
      ``(d_in, 1)`` row flags; see :mod:`idesign.tree`) and ``False`` elsewhere.

    Raises:
      IndexError: a layer or head index out of range (the message names it and the valid range).

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig.llama_like(11, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> m = ids.circuits.heads_mask(params, cfg, [(0, 1)])
    >>> m['blocks'][0]['attn']['q_proj']['kernel'].shape, m['blocks'][0]['attn']['q_proj']['kernel'].any(0).nonzero()[0]
    ((1, 16), array([4, 5, 6, 7]))
    >>> m['blocks'][0]['attn']['k_proj']['kernel'].any(0).nonzero()[0]   # kv head 0 serves heads 0 and 1
    array([0, 1, 2, 3])
    >>> ids.circuits.heads_mask(params, cfg, [(0, 1)], shared_kv='all')['blocks'][0]['attn']['k_proj']['kernel']
    False
    """
    _check_shared_kv(shared_kv)
    c = config
    H, K, Dh, D = c.n_heads, c.kv_heads, c.head_dim, c.d_model
    G = H // K
    selected = _check_pairs(heads, c.n_layers, H, "head")
    parts: dict[str, list[tuple[int, slice]]] = {}
    for layer in sorted({l for l, _ in selected}):
        a = f"blocks.{layer}.attn"
        _expect_shape(params, f"{a}.q_proj.kernel", (D, H * Dh))
        _expect_shape(params, f"{a}.k_proj.kernel", (D, K * Dh))
        _expect_shape(params, f"{a}.o_proj.kernel", (H * Dh, D))
        chosen = {h for l, h in selected if l == layer}
        groups = {h // G for h in chosen}
        if shared_kv == "all":
            groups = {j for j in groups if all(j * G + g in chosen for g in range(G))}
        for proj, indices, axis in (("q_proj", chosen, 1), ("k_proj", groups, 1), ("v_proj", groups, 1),
                                    ("o_proj", chosen, 0)):
            cols = [(axis, slice(i * Dh, (i + 1) * Dh)) for i in sorted(indices)]
            if not cols:
                continue
            parts[f"{a}.{proj}.kernel"] = cols
            if proj != "o_proj" and _has(params, f"{a}.{proj}.bias"):
                parts[f"{a}.{proj}.bias"] = [(0, sl) for _, sl in cols]
    return _mask_from_slices(params, parts)


def neurons_mask(params: Params, config: TransformerConfig, neurons: Iterable[Component]) -> Mask:
    """The weights of MLP neurons ``[(layer, neuron), ...]``: columns of up/gate (and bias), rows of down.

    Raises:
      IndexError: a layer or neuron index out of range (the message names it and the valid range).

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> m = ids.circuits.neurons_mask(params, cfg, [(0, 3)])
    >>> m['blocks'][0]['mlp']['down']['kernel'].any(1).nonzero()[0], m['blocks'][0]['mlp']['up']['bias'].sum()
    (array([3]), np.int64(1))
    """
    c = config
    F, D = c.ff_dim, c.d_model
    selected = _check_pairs(neurons, c.n_layers, F, "neuron")
    parts: dict[str, list[tuple[int, slice]]] = {}
    for layer in sorted({l for l, _ in selected}):
        m = f"blocks.{layer}.mlp"
        _expect_shape(params, f"{m}.up.kernel", (D, F))
        _expect_shape(params, f"{m}.down.kernel", (F, D))
        chosen = [slice(n, n + 1) for n in sorted({n for l, n in selected if l == layer})]
        for proj in ("up", "gate") if c.mlp == "gated" else ("up",):
            parts[f"{m}.{proj}.kernel"] = [(1, sl) for sl in chosen]
            if _has(params, f"{m}.{proj}.bias"):
                parts[f"{m}.{proj}.bias"] = [(0, sl) for sl in chosen]
        parts[f"{m}.down.kernel"] = [(0, sl) for sl in chosen]
    return _mask_from_slices(params, parts)


def paths_mask(params: Params, patterns: str | Sequence[str]) -> Mask:
    """Whole leaves whose dotted path matches a glob pattern (``*`` spans dots); raises if none match.

    >>> import idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2))
    >>> m = ids.circuits.paths_mask(params, 'blocks.1.mlp.*')
    >>> sorted(p for p, v in ids.tree.named_leaves(m).items() if v)
    ['blocks.1.mlp.down.bias', 'blocks.1.mlp.down.kernel', 'blocks.1.mlp.up.bias', 'blocks.1.mlp.up.kernel']
    """
    return tree_lib.select(params, patterns)


def circuit_mask(params: Params, config: TransformerConfig, *, heads: Iterable[Component] = (),
                 neurons: Iterable[Component] = (), paths: str | Sequence[str] = (),
                 shared_kv: SharedKV = "any") -> Mask:
    """Union of :func:`heads_mask`, :func:`neurons_mask` and :func:`paths_mask` (each optional).

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> m = ids.circuits.circuit_mask(params, cfg, heads=[(0, 0)], neurons=[(0, 5)])
    >>> ids.masks.size_report(m, params).selected      # 3 * (8*4 + 4) + 4*8, plus 8 + 1 + 8
    157
    """
    masks = [heads_mask(params, config, heads, shared_kv=shared_kv), neurons_mask(params, config, neurons)]
    if paths:
        masks.append(paths_mask(params, paths))
    return masks_lib.union(*masks)


def ablate_weights(params: Params, mask: Mask, value: float | Array = 0.0) -> Params:
    """``params`` with the masked elements set to ``value`` (zero-ablation of a circuit's weights).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> ids.circuits.ablate_weights({'w': jnp.ones(3)}, {'w': np.array([True, False, True])})
    {'w': Array([0., 1., 0.], dtype=float32)}
    """
    masks_lib.check(params, mask)
    return jax.tree_util.tree_map(lambda m, p: jnp.where(m, jnp.asarray(value, p.dtype), p), mask, params)


# --- attribution ---------------------------------------------------------------------------------


class ComponentScores(NamedTuple):
    """Scores per component: ``heads`` ``[n_layers, n_heads]`` and ``neurons`` ``[n_layers, d_ff]``."""

    heads: Array
    neurons: Array


def _scalar_loss(loss_fn: Callable[..., Any]) -> Callable[..., Array]:
    """Accepts losses returning a scalar or ``(scalar, aux)`` (as :func:`idesign.lm_loss` does)."""

    def fn(*args):
        out = loss_fn(*args)
        return out[0] if isinstance(out, tuple) else out

    return fn


def weight_attribution(loss_fn: Callable[[Params, Any], Any], params: Params, batch: Any, *,
                       signed: bool = False) -> Params:
    """Gradient × weight for every parameter element: the first-order effect of zeroing it.

    Zeroing element ``w`` changes the loss by ``-g·w + O(w²)``. ``signed=True`` returns ``g ⊙ w``
    (negative where removing the element would *raise* the loss); the default returns ``|g ⊙ w|``, the
    Taylor importance used for pruning. Aggregate per head and neuron with :func:`component_scores`
    (a sum, so signed scores give the first-order effect of ablating the whole component).

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a scalar or ``(scalar, aux)``.
      params: the parameters.
      batch: passed to ``loss_fn``.
      signed: return ``g ⊙ w`` instead of ``|g ⊙ w|``.

    Returns:
      A pytree like ``params``. Compiled with ``jax.jit`` (``loss_fn`` static: pass the same function
      object to avoid recompiling).

    >>> import jax.numpy as jnp, idesign as ids
    >>> loss = lambda p, b: (p['w'] * b).sum() ** 2
    >>> ids.circuits.weight_attribution(loss, {'w': jnp.array([1., -2.])}, jnp.array([1., 1.]), signed=True)
    {'w': Array([-2.,  4.], dtype=float32)}
    """
    compute = _grad_times_weight_jit if _hashable(loss_fn) else _grad_times_weight
    products = compute(loss_fn, params, batch)
    return products if signed else jax.tree_util.tree_map(jnp.abs, products)


def _hashable(*objs: Any) -> bool:
    try:
        hash(objs)
        return True
    except TypeError:
        return False


def _grad_times_weight(loss_fn: Callable[[Params, Any], Any], params: Params, batch: Any) -> Params:
    grads = jax.grad(_scalar_loss(loss_fn))(params, batch)
    return jax.tree_util.tree_map(jnp.multiply, grads, params)


# One compilation per (loss_fn, shapes): pass the same loss function to reuse it.
_grad_times_weight_jit = jax.jit(_grad_times_weight, static_argnums=(0,))


def component_scores(attributions: Params, config: TransformerConfig, *,
                     shared_kv: SharedKV = "any") -> ComponentScores:
    """Sums element scores over each head's and each neuron's weights (the same elements as the masks).

    ``heads[i, h]`` is the sum of ``attributions`` over ``heads_mask(params, config, [(i, h)], shared_kv=...)``
    and ``neurons[i, n]`` over ``neurons_mask(params, config, [(i, n)])``. With ``shared_kv='any'`` a
    shared key/value head's score counts towards each query head it serves.

    >>> import jax, idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> ones = jax.tree.map(lambda p: p * 0 + 1, params)
    >>> s = ids.circuits.component_scores(ones, cfg)
    >>> s.heads.shape, s.neurons.shape, float(s.neurons[0, 0])     # 8 up + 1 bias + 8 down
    ((2, 2), (2, 32), 17.0)
    """
    _check_shared_kv(shared_kv)
    c = config
    H, K, Dh, F = c.n_heads, c.kv_heads, c.head_dim, c.ff_dim
    G = H // K
    get = lambda path: jnp.asarray(_leaf(attributions, path))
    opt = lambda path: get(path) if _has(attributions, path) else None
    heads, neurons = [], []
    for i in range(c.n_layers):
        a = f"blocks.{i}.attn"
        _expect_shape(attributions, f"{a}.q_proj.kernel", (c.d_model, H * Dh))
        per_q = get(f"{a}.q_proj.kernel").reshape(-1, H, Dh).sum((0, 2))
        per_q += get(f"{a}.o_proj.kernel").reshape(H, Dh, -1).sum((1, 2))
        per_kv = jnp.zeros(K, per_q.dtype)
        for proj in ("k_proj", "v_proj"):
            per_kv += get(f"{a}.{proj}.kernel").reshape(-1, K, Dh).sum((0, 2))
        for proj, dest in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")):
            bias = opt(f"{a}.{proj}.bias")
            if bias is None:
                continue
            if dest == "q":
                per_q += bias.reshape(H, Dh).sum(1)
            else:
                per_kv += bias.reshape(K, Dh).sum(1)
        if shared_kv == "any" or G == 1:
            per_q += jnp.repeat(per_kv, G)
        heads.append(per_q)

        m = f"blocks.{i}.mlp"
        _expect_shape(attributions, f"{m}.up.kernel", (c.d_model, F))
        per_n = get(f"{m}.down.kernel").sum(1)
        for proj in ("up", "gate") if c.mlp == "gated" else ("up",):
            per_n += get(f"{m}.{proj}.kernel").sum(0)
            bias = opt(f"{m}.{proj}.bias")
            if bias is not None:
                per_n += bias
        neurons.append(per_n)
    return ComponentScores(jnp.stack(heads), jnp.stack(neurons))


def _component_sites(config: TransformerConfig) -> tuple[list[str], list[str]]:
    return ([f"blocks.{i}.attn.z" for i in range(config.n_layers)],
            [f"blocks.{i}.mlp.hidden" for i in range(config.n_layers)])


def attribution_patching(apply: Callable[..., Any], params: Params, clean_tokens: Array,
                         corrupted_tokens: Array, metric: Callable[[Array], Array], *,
                         direction: Literal["denoise", "noise"] = "denoise") -> ComponentScores:
    """First-order estimates of activation patching for every head and MLP neuron, in one backward pass.

    Activation patching replaces one component's activation in a *base* run by its value from the other
    run and measures how ``metric(logits)`` changes. Attribution patching (Nanda, 2023; Syed et al.,
    2023) estimates all of those at once as ``∂metric/∂a |base · (a_other − a_base)``, with the gradient
    taken through an additive zero perturbation (``ids.Add(zeros)``) at the sites ``blocks.{i}.attn.z``
    (per head, summed over ``Dh``) and ``blocks.{i}.mlp.hidden`` (per neuron), summed over batch and
    positions — i.e. the estimate for patching that component at every position at once.

    Args:
      apply: the reference transformer's functional model (it has a ``config``).
      params: its parameters.
      clean_tokens, corrupted_tokens: ``[B, T]`` token ids of the two runs (same shape).
      metric: ``metric(logits) -> scalar``, e.g. a logit difference of the right and a wrong answer.
      direction: ``'denoise'`` (default): the base run is the corrupted one and the estimate is
        ``grad_corrupted · (clean − corrupted)``, i.e. how much patching the clean activation into the
        corrupted run restores the metric. ``'noise'``: the base run is the clean one,
        ``grad_clean · (corrupted − clean)``, i.e. how much patching in the corrupted activation hurts.

    Returns:
      :class:`ComponentScores` (``heads`` ``[n_layers, n_heads]``, ``neurons`` ``[n_layers, d_ff]``), signed,
      in units of the metric. Compiled with ``jax.jit`` (``apply`` and ``metric`` static, so pass the same
      ``metric`` object to avoid recompiling).

    >>> import jax.numpy as jnp, idesign as ids
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2))
    >>> clean, corrupted = jnp.array([[1, 2, 3]]), jnp.array([[1, 5, 3]])
    >>> s = ids.circuits.attribution_patching(apply, params, clean, corrupted, lambda lg: lg[0, -1, 4] - lg[0, -1, 7])
    >>> s.heads.shape, s.neurons.shape
    ((2, 2), (2, 32))
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction={direction!r}; expected 'denoise' or 'noise'.")
    _check_patching_inputs(apply, clean_tokens, corrupted_tokens)
    base, other = (corrupted_tokens, clean_tokens) if direction == "denoise" else (clean_tokens, corrupted_tokens)
    compute = _attribution_patching_jit if _hashable(apply, metric) else _attribution_patching
    return compute(apply, params, base, other, metric)


def _check_patching_inputs(apply: Callable[..., Any], clean_tokens: Array, corrupted_tokens: Array) -> None:
    config = getattr(apply, "config", None)
    if not isinstance(config, TransformerConfig):
        raise TypeError("attribution_patching needs the reference transformer's apply (with a `config`); "
                        f"got {type(apply).__name__}.")
    if np.shape(clean_tokens) != np.shape(corrupted_tokens):
        raise ValueError(f"clean_tokens {np.shape(clean_tokens)} and corrupted_tokens {np.shape(corrupted_tokens)} "
                         "must have the same shape.")


def _attribution_patching(apply: Callable[..., Any], params: Params, base: Array, other: Array,
                          metric: Callable[[Array], Array]) -> ComponentScores:
    """``∂metric/∂a |base · (a_other − a_base)`` per head and neuron."""
    z_sites, hidden_sites = _component_sites(apply.config)
    sites = z_sites + hidden_sites
    _, other_acts = apply(params, other, hooks={s: Capture() for s in sites})

    def metric_with_deltas(deltas):
        hooks = {s: (Add(deltas[s]), Capture()) for s in sites}
        logits, captured = apply(params, base, hooks=hooks)
        return jnp.asarray(metric(logits)).reshape(()), captured

    zeros = {s: jnp.zeros_like(other_acts[s]) for s in sites}
    grads, base_acts = jax.grad(metric_with_deltas, has_aux=True)(zeros)
    effect = {s: (grads[s] * (other_acts[s] - base_acts[s])).astype(jnp.float32) for s in sites}
    heads = jnp.stack([effect[s].sum((0, 1, 3)) for s in z_sites])
    neurons = jnp.stack([effect[s].sum((0, 1)) for s in hidden_sites])
    return ComponentScores(heads, neurons)


# One compilation per (apply, metric, shapes): pass the same metric function to reuse it.
_attribution_patching_jit = jax.jit(_attribution_patching, static_argnums=(0, 4))


# --- selection -----------------------------------------------------------------------------------


def _as_score_matrix(scores: Array) -> np.ndarray:
    s = np.asarray(jax.device_get(scores))
    if s.ndim != 2:
        raise ValueError(f"scores must be a [n_layers, n_components] array (e.g. ComponentScores.heads); "
                         f"got shape {s.shape}.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; cannot rank components.")
    return s


def _ranked(s: np.ndarray, keep: np.ndarray) -> list[Component]:
    flat = s.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    return [(int(i // s.shape[1]), int(i % s.shape[1])) for i in order if keep.reshape(-1)[i]]


def select_top_k(scores: Array, k: int) -> list[Component]:
    """The ``k`` highest-scoring ``(layer, index)`` pairs over all layers, best first (ties: lower index).

    Pass ``abs(scores)`` to rank by magnitude. Feed the result to :func:`heads_mask` / :func:`neurons_mask`.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.circuits.select_top_k(jnp.array([[0.1, 0.9], [0.5, 0.2]]), 2)
    [(0, 1), (1, 0)]
    """
    s = _as_score_matrix(scores)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= s.size:
        raise ValueError(f"select_top_k: k={k!r}; expected an integer in 0..{s.size} (the number of components).")
    return _ranked(s, np.ones(s.shape, bool))[:int(k)]


def select_threshold(scores: Array, threshold: float) -> list[Component]:
    """Every ``(layer, index)`` pair scoring at least ``threshold``, best first.

    >>> import jax.numpy as jnp, idesign as ids
    >>> ids.circuits.select_threshold(jnp.array([[0.1, 0.9], [0.5, 0.2]]), 0.3)
    [(0, 1), (1, 0)]
    """
    s = _as_score_matrix(scores)
    return _ranked(s, s >= threshold)
