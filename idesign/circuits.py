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
from idesign._types import Array, Mask, Params
from idesign.hooks import Add, Capture
from idesign.models.config import TransformerConfig

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


def shared_mask(params: Params, config: TransformerConfig) -> Mask:
    """The elements no head or neuron owns: embeddings, positions, norms and the output biases.

    Every component reads or writes through them (the tied embedding is also the unembedding), so an
    update that changes them changes every task at once. A fair comparison of circuit masks freezes them
    in every arm (a head/neuron circuit cannot reach them; a random mask would hit them by chance).

    >>> import idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> sorted(p for p, m in ids.tree.named_leaves(ids.circuits.shared_mask(params, cfg)).items() if m is True)
    ['blocks.0.attn.o_proj.bias', 'blocks.0.ln1.bias', 'blocks.0.ln1.scale', 'blocks.0.ln2.bias', 'blocks.0.ln2.scale', 'blocks.0.mlp.down.bias', 'embed.embedding', 'final_norm.bias', 'final_norm.scale', 'pos_embed.embedding']
    """
    every = [(i, j) for i in range(config.n_layers) for j in range(config.n_heads)]
    owned = circuit_mask(params, config, heads=every,
                         neurons=[(i, n) for i in range(config.n_layers) for n in range(config.ff_dim)])

    def leaf(m: Any) -> Any:
        # Whole-leaf answers stay Python bools (compact); partially owned leaves cannot happen: a
        # component owns whole rows/columns and all of them together own the whole leaf.
        if isinstance(m, (bool, np.bool_)):
            return not bool(m)
        dense = np.asarray(m, bool)
        return True if not dense.any() else (False if dense.all() else ~dense)

    return jax.tree_util.tree_map(leaf, owned)


def budget_circuit(params: Params, config: TransformerConfig, scores: ComponentScores, max_elements: int, *,
                   shared_kv: SharedKV = "any") -> tuple[Mask, list[Component], list[Component]]:
    """The best-scoring heads and neurons per parameter, each added while the mask stays within ``max_elements``.

    Components are ranked by score divided by their size (a head owns far more weights than a neuron, so
    raw scores would spend the budget on heads), and taken greedily in that order while they fit.

    Returns:
      ``(mask, heads, neurons)``: the :func:`circuit_mask` and the chosen components.

    >>> import jax.numpy as jnp, idesign as ids
    >>> cfg = ids.TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2)
    >>> _, params = ids.init_transformer(cfg)
    >>> scores = ids.circuits.ComponentScores(jnp.array([[1.0, 0.0]]), jnp.arange(32.0)[None])
    >>> mask, heads, neurons = ids.circuits.budget_circuit(params, cfg, scores, 40)
    >>> heads, neurons, ids.masks.size_report(mask, params).selected     # 17 weights per neuron
    ([], [(0, 31), (0, 30)], 34)
    """
    if max_elements < 0:
        raise ValueError(f"max_elements = {max_elements}: expected >= 0.")
    size = lambda m: masks_lib.size_report(m, params).selected
    head_size = size(heads_mask(params, config, [(0, 0)], shared_kv=shared_kv))
    neuron_size = size(neurons_mask(params, config, [(0, 0)]))
    h, n = np.asarray(scores.heads, np.float64), np.asarray(scores.neurons, np.float64)
    candidates = ([("head", c, h[c] / head_size, head_size) for c in select_top_k(h, h.size)]
                  + [("neuron", c, n[c] / neuron_size, neuron_size) for c in select_top_k(n, n.size)])
    candidates.sort(key=lambda c: -c[2])   # stable: ties keep select_top_k's order
    room, chosen = int(max_elements), {"head": [], "neuron": []}
    for kind, component, _, cost in candidates:
        if cost <= room:
            chosen[kind].append(component)
            room -= cost
    mask = circuit_mask(params, config, heads=chosen["head"], neurons=chosen["neuron"], shared_kv=shared_kv)
    return mask, chosen["head"], chosen["neuron"]


def matched_random_mask(mask: Mask, params: Params, *, seed: int) -> Mask:
    """A random mask with exactly as many elements as ``mask`` *in every leaf*, drawn uniformly within the leaf.

    The control for a circuit: the same budget spent on the same parameter tensors, without the choice of
    which rows and columns. (``ids.masks.random`` spreads one total count over all leaves instead.)

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'a': jnp.zeros((4, 4)), 'b': jnp.zeros(3)}
    >>> m = ids.circuits.matched_random_mask({'a': np.array([[True, False, False, False]]), 'b': True}, params, seed=0)
    >>> int(m['a'].sum()), m['b']
    (4, True)
    """
    masks_lib.check(params, mask)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for p, m in zip(leaves, treedef.flatten_up_to(mask)):
        dense = np.broadcast_to(np.asarray(m, bool), np.shape(p))
        count = int(dense.sum())
        if count in (0, dense.size):
            out.append(bool(count))   # nothing or everything: nothing to draw
            continue
        flat = np.zeros(dense.size, bool)
        flat[rng.choice(dense.size, size=count, replace=False)] = True
        out.append(flat.reshape(dense.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


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
