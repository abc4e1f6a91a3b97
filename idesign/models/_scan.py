"""Running the transformer's blocks with ``jax.lax.scan`` (``TransformerConfig(scan_layers=True)``).

A scanned model reads either parameter layout. The per-layer one (``blocks.{i}.attn.q_proj.kernel``, what
``init_transformer``, the importers and checkpoints give) is stacked here, inside the traced forward
pass, into one ``[n_layers, ...]`` array per block parameter, so every tool that addresses one layer by
its path (masks, projections, K-FAC, checkpoints, importers) works unchanged. The stacked one
(:func:`stack_blocks`) is read as it is, and is the layout to *train* a scanned model in: an optimizer
over per-layer leaves, the stack and its gradient's slices make a train step's program grow with depth
(``benchmarks/compile.py``: 4 -> 32 layers, compile 3.5x per layer, 1.2x stacked). Helpers address one
layer of the stacked layout: :func:`layer_params`, :func:`stack_mask`, :func:`unstack_blocks`.

Hooks are per site, and a site inside a block names one layer (``blocks.17.resid_post``). Inside the
scan the body is traced once for a traced layer index ``i``, so for each block-local site
(``resid_post``) the layers' chains of interventions are grouped by structure (pytree structure, leaf
shapes and dtypes): the leaves of each group are stacked across its layers and indexed by ``i``; when
layers differ (steering at one layer, nothing at the others) ``lax.switch`` on ``i`` picks the group's
branch. Captures come back as stacked outputs and are split per layer. Interventions are told a site
name that covers their group (``blocks.{3,5}.resid_post``), except :class:`idesign.Apply` with
``with_site=True``, which gets a group (and the exact name) of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idesign._stacking import stack_layers, unstack_layers
from idesign._types import Array
from idesign.hooks import Apply, Capture, Intervention, SiteRunner

PREFIX = "blocks.#"  # the block prefix the scanned body is traced with; "#" is never a real layer index


def _group_key(chain: tuple[Intervention, ...], layer: int) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(chain)
    shapes = tuple((tuple(np.shape(leaf)), str(jnp.result_type(leaf))) for leaf in leaves)
    # An Apply that reads the site name must see its own layer's name: it cannot share a branch.
    own = any(isinstance(item, Apply) and item.with_site for item in chain)
    return (treedef, shapes, layer if own else None)


class _SitePlan:
    """How one block-local site (e.g. ``attn.z``) is hooked across the layers."""

    def __init__(self, suffix: str, chains: list[tuple[Intervention, ...]]):
        n = len(chains)
        self.suffix = suffix
        self.captures = [any(isinstance(item, Capture) for item in chain) for chain in chains]
        keys, groups = [], []  # groups: (treedef, layers, stacked leaves)
        index = np.zeros(n, np.int32)
        position = np.zeros(n, np.int32)
        for layer, chain in enumerate(chains):
            try:
                key = _group_key(chain, layer)
            except TypeError as e:
                raise TypeError(
                    f"scan_layers: the hooks at blocks.{layer}.{suffix} hold a leaf that is not an array ({e}); "
                    "scanned blocks stack hook leaves across layers. Make the intervention's fields arrays "
                    "(or static), or use scan_layers=False.") from e
            if key not in keys:
                keys.append(key)
                groups.append([])
            g = keys.index(key)
            index[layer], position[layer] = g, len(groups[g])
            groups[g].append(layer)
        self.groups = []
        for layers in groups:
            treedef = jax.tree_util.tree_structure(chains[layers[0]])
            per_layer = [jax.tree_util.tree_leaves(chains[j]) for j in layers]
            stacked = []
            for k in range(treedef.num_leaves):
                try:
                    stacked.append(jnp.stack([jnp.asarray(leaves[k]) for leaves in per_layer]))
                except TypeError as e:
                    raise TypeError(
                        f"scan_layers: the hooks at {self.name(layers)} hold a leaf that is not an array "
                        f"({type(per_layer[0][k]).__name__}); scanned blocks stack hook leaves across layers. "
                        "Make the intervention's fields arrays, or use scan_layers=False.") from e
            self.groups.append((treedef, tuple(layers), stacked))
        self.index, self.position = jnp.asarray(index), jnp.asarray(position)

    def name(self, layers: Sequence[int]) -> str:
        if len(layers) == 1:
            return f"blocks.{layers[0]}.{self.suffix}"
        return "blocks.{" + ",".join(str(j) for j in layers) + "}." + self.suffix

    def run(self, layer: Array, h: Array) -> tuple[Array, Array | None]:
        """Applies layer ``layer``'s chain to ``h``; returns ``(h', captured or None)``."""
        capturing = any(self.captures)

        def branch(group):
            treedef, layers, stacked = group
            site = self.name(layers)

            def fn(h):
                pos = self.position[layer]
                chain = jax.tree_util.tree_unflatten(treedef, [leaf[pos] for leaf in stacked])
                seen = None
                for item in chain:
                    # Sub-sites (an SAE splice's features) are refused when hooked (run_blocks), so they pass through.
                    h = item.apply_in(site, h, _PASSTHROUGH) if _opens_sub_sites(item) else item.apply(site, h)
                    if isinstance(item, Capture):
                        seen = h
                if not capturing:
                    return h, None
                return h, (jnp.zeros_like(h) if seen is None else seen.astype(h.dtype))
            return fn

        fns = [branch(g) for g in self.groups]
        if len(fns) == 1:
            return fns[0](h)
        return jax.lax.switch(self.index[layer], fns, h)


class _Passthrough:
    """A site runner with nothing hooked: what an intervention's own sub-sites see inside the scan."""

    captured: dict = {}

    def wants(self, site: str) -> bool:
        return False

    def __call__(self, site: str, h: Array) -> Array:
        return h


_PASSTHROUGH = _Passthrough()


def _opens_sub_sites(item: Intervention) -> bool:
    sub_sites = getattr(type(item), "sub_sites", None)
    return sub_sites is not None and sub_sites is not getattr(Intervention, "sub_sites", None)


class _ScanSites:
    """The :class:`SiteRunner` stand-in a scanned block calls: sites are ``blocks.#.<suffix>``."""

    def __init__(self, plans: dict[str, _SitePlan], layer: Array, outer: SiteRunner):
        self._plans, self.layer, self._outer = plans, layer, outer
        self.captured: dict[str, Array] = {}

    def wants(self, site: str) -> bool:
        return _suffix(site) in self._plans

    def __call__(self, site: str, h: Array) -> Array:
        suffix = _suffix(site)
        plan = self._plans.get(suffix)
        if plan is None:
            return h
        before = h
        h, seen = plan.run(self.layer, h)
        if seen is not None:
            self.captured[suffix] = seen
        # As SiteRunner does: at padding positions a hooked site keeps its value from before the hooks.
        real_of = getattr(self._outer, "_real", None)
        real = None if real_of is None else real_of(suffix, before, h)
        return h if real is None else jnp.where(real, h, before)


def _suffix(site: str) -> str:
    if not site.startswith(PREFIX + "."):
        raise ValueError(f"scan_layers: a block called site {site!r}, outside its prefix {PREFIX!r}.")
    return site[len(PREFIX) + 1:]


def stack_cache(layers: Any) -> Any:
    """Per-layer caches (a tuple of ``LayerCache``) as one ``LayerCache`` with a leading layer axis."""
    if isinstance(layers, tuple) and layers and isinstance(layers[0], tuple):
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return layers


def is_stacked(params: Any) -> bool:
    """Whether ``params['blocks']`` is stacked (named by the block's fields) rather than per layer (keyed 0, 1, ...).

    >>> import idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2))
    >>> ids.models.is_stacked(params), ids.models.is_stacked(ids.models.stack_blocks(params))
    (False, True)
    """
    blocks = params.get("blocks") if isinstance(params, dict) else None
    return isinstance(blocks, dict) and bool(blocks) and all(isinstance(k, str) for k in blocks)


def stack_blocks(tree: Any) -> Any:
    """``tree`` with its per-layer ``blocks`` ({0: ..., 1: ...}) stacked into one subtree of ``[n_layers, ...]`` leaves.

    For the parameters of a ``scan_layers`` model (and anything of their structure with array leaves):
    a scanned ``apply`` takes them as they are, without stacking them on every call, and an optimizer
    over them has one leaf per block parameter instead of one per layer, so a train step's compile
    time stays flat in depth: the recommended way to train a scanned model is
    ``init_train_state(stack_blocks(params), opt)``. Masks go through :func:`stack_mask`; per-layer
    tools (projections, K-FAC) read :func:`unstack_blocks`'s per-layer layout, one layer is
    :func:`layer_params`.

    >>> import idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=3))
    >>> stacked = ids.models.stack_blocks(params)
    >>> stacked['blocks']['mlp']['up']['kernel'].shape
    (3, 8, 32)
    >>> ids.models.unstack_blocks(stacked)['blocks'][2]['mlp']['up']['kernel'].shape
    (8, 32)
    """
    if is_stacked(tree):
        return tree
    blocks = tree["blocks"]
    return {**tree, "blocks": stack_layers([blocks[i] for i in range(len(blocks))])}


def unstack_blocks(tree: Any) -> Any:
    """The per-layer layout (``blocks.{i}....``) of a tree :func:`stack_blocks` stacked; a per-layer tree is returned as it is.

    >>> import idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2))
    >>> stacked = ids.models.stack_blocks(params)
    >>> stacked['blocks']['attn']['q_proj']['kernel'].shape
    (2, 8, 8)
    >>> back = ids.models.unstack_blocks(stacked)
    >>> sorted(back['blocks']), back['blocks'][1]['attn']['q_proj']['kernel'].shape
    ([0, 1], (8, 8))
    >>> bool((back['blocks'][1]['attn']['q_proj']['kernel'] == params['blocks'][1]['attn']['q_proj']['kernel']).all())
    True
    """
    if not is_stacked(tree):
        return tree
    blocks = tree["blocks"]
    n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    return {**tree, "blocks": unstack_layers(blocks, n)}


def layer_params(tree: Any, i: int) -> Any:
    """Layer ``i``'s block subtree, from either layout (per layer: ``tree['blocks'][i]``; stacked: each leaf's row ``i``).

    >>> import idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=3))
    >>> stacked = ids.models.stack_blocks(params)
    >>> one = ids.models.layer_params(stacked, 2)
    >>> bool((one['mlp']['up']['kernel'] == params['blocks'][2]['mlp']['up']['kernel']).all())
    True
    """
    blocks = tree["blocks"]
    if not is_stacked(tree):
        if i not in blocks:
            raise IndexError(f"layer_params: layer {i} of a model with blocks {sorted(blocks)}.")
        return blocks[i]
    n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    if not -n <= i < n:
        raise IndexError(f"layer_params: layer {i} of a model with {n} stacked layers.")
    return jax.tree_util.tree_map(lambda x: x[i], blocks)


def stack_mask(mask: Any, params: Any) -> Any:
    """A per-layer element mask (``blocks.{i}....``, as :mod:`idesign.masks` and ``ids.optim.frozen`` take it) in
    the stacked layout of :func:`stack_blocks`, so it freezes the same elements of stacked parameters.

    Layer ``i``'s mask leaf becomes row ``i`` of a ``[n_layers, ...]`` mask leaf: a whole-leaf bool is
    broadcast to the parameter's rank first (``True`` -> ``[[True]]`` for a kernel). A leaf that is the
    same whole-leaf bool in every layer stays a bool, so ``frozen`` still drops the optimizer state of a
    block parameter frozen in every layer. ``params`` (either layout) gives the ranks.

    >>> import numpy as np, jax, idesign as ids
    >>> _, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=3))
    >>> mask = jax.tree.map(lambda _: False, params)
    >>> mask['blocks'][1]['mlp'] = jax.tree.map(lambda _: True, mask['blocks'][1]['mlp'])  # block 1's MLP frozen
    >>> stacked = ids.models.stack_mask(mask, params)
    >>> np.asarray(stacked['blocks']['mlp']['up']['kernel']).reshape(3).tolist()
    [False, True, False]
    >>> stacked['blocks']['attn']['q_proj']['kernel']   # frozen in no layer: still one bool
    False
    """
    if is_stacked(mask):
        return mask
    blocks = mask["blocks"]
    n = len(blocks)
    one = layer_params(params, 0)

    def stack(param, *leaves):
        rank = np.ndim(param)
        if all(np.ndim(m) == 0 and not isinstance(m, jax.core.Tracer) for m in leaves):
            values = [bool(m) for m in leaves]
            if len(set(values)) == 1:
                return values[0]
        xp = jnp if any(isinstance(m, jax.core.Tracer) for m in leaves) else np
        rows = [xp.reshape(xp.asarray(m), (1,) * rank) if np.ndim(m) == 0 else xp.asarray(m) for m in leaves]
        for i, row in enumerate(rows):
            if np.ndim(row) != rank:
                raise ValueError(f"stack_mask: the mask leaf of blocks.{i} has shape {tuple(np.shape(row))}, the "
                                 f"parameter {tuple(np.shape(param))}; a mask leaf is a bool or of the parameter's rank.")
        shape = tuple(max(np.shape(r)[k] for r in rows) for k in range(rank))
        return xp.stack([xp.broadcast_to(r, shape) for r in rows])

    stacked = jax.tree_util.tree_map(stack, one, *[blocks[i] for i in range(n)])
    return {**mask, "blocks": stacked}


def run_blocks(blocks: Sequence[nnx.Module], x: Array, sites: SiteRunner, site_names: Sequence[str],
               call: Any, cache_layers: Any, stacked_params: Any = None) -> tuple[Array, Any]:
    """Runs ``call(block, x, sites, prefix, layer_cache, layer)`` over the blocks with ``lax.scan``.

    ``cache_layers`` is ``None``, a tuple of per-layer caches, or one stacked cache; the new caches come
    back stacked (one ``LayerCache`` with a leading layer axis). Captures land in ``sites.captured``
    under each layer's own site name. ``stacked_params`` (the ``blocks`` subtree already stacked) is
    used instead of stacking the blocks' parameters.

    A toy block that adds its weight and exposes one site, three layers scanned, every layer captured:

    >>> import jax.numpy as jnp, idesign as ids
    >>> from flax import nnx
    >>> from idesign.models._scan import run_blocks
    >>> class Block(nnx.Module):
    ...     def __init__(self, k):
    ...         self.w = nnx.Param(jnp.full((2,), float(k)))
    ...     def __call__(self, x, sites, prefix):
    ...         return sites(f"{prefix}.resid_post", x + self.w[...])
    >>> names = [f"blocks.{i}.resid_post" for i in range(3)]
    >>> sites = ids.SiteRunner(ids.capture("blocks.*.resid_post"), site_names=names)
    >>> call = lambda block, x, sites, prefix, cache, i: (block(x, sites, prefix), cache)
    >>> x, _ = run_blocks([Block(k) for k in range(3)], jnp.zeros(2), sites, names, call, None)
    >>> x.tolist(), sites.captured["blocks.1.resid_post"].tolist()
    ([3.0, 3.0], [1.0, 1.0])
    """
    n = len(blocks)
    graphdef = nnx.graphdef(blocks[0])
    for i, block in enumerate(blocks[1:], 1):
        if nnx.graphdef(block) != graphdef:
            raise ValueError(f"scan_layers: block {i} differs in structure from block 0; a scanned model needs "
                             "identical blocks (give per-layer differences as data indexed by the layer, as "
                             "layer_types and the rotary table are). Use scan_layers=False for this model.")
    chain_of = getattr(sites, "chain", None)
    if chain_of is None:
        raise TypeError(f"scan_layers: the site runner {type(sites).__name__} has no chain(site) method; scanned "
                        "blocks need an idesign.SiteRunner to stack per-layer hooks.")
    prefix0 = "blocks.0."
    suffixes = [s[len(prefix0):] for s in site_names if s.startswith(prefix0)]
    plans = {}
    for suffix in suffixes:
        names = [f"blocks.{i}.{suffix}" for i in range(n)]
        chains = [tuple(chain_of(name)) for name in names]
        for name, chain in zip(names, chains):
            sites.visited.add(name)
            for item in chain:
                if not _opens_sub_sites(item):
                    continue
                hooked = [sub for sub in item.sub_sites(name) if chain_of(sub)]
                if hooked:
                    raise ValueError(
                        f"scan_layers: hooks on {hooked}, the sub-sites {type(item).__name__} opens at {name}, are not "
                        "supported inside scanned blocks (the splice itself is). Capture, steer or ablate them with "
                        "the unrolled model: apply.with_config(scan_layers=False) takes the same params.")
                sites.visited.update(item.sub_sites(name))
        if any(chains):
            plans[suffix] = _SitePlan(suffix, chains)
    # The stack: one copy of the block parameters per call, inside the jitted function.
    if stacked_params is None:
        params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[nnx.to_pure_dict(nnx.state(b)) for b in blocks])
    else:
        params = stacked_params

    def body(x, xs):
        layer, layer_params, layer_cache = xs
        block = nnx.merge(graphdef, layer_params)
        scan_sites = _ScanSites(plans, layer, sites)
        x, layer_cache = call(block, x, scan_sites, PREFIX, layer_cache, layer)
        return x, (layer_cache, scan_sites.captured)

    x, (new_cache, captured) = jax.lax.scan(body, x, (jnp.arange(n, dtype=jnp.int32), params,
                                                      stack_cache(cache_layers)))
    for i in range(n):
        for suffix in suffixes:
            if suffix in captured and plans[suffix].captures[i]:
                sites.captured[f"blocks.{i}.{suffix}"] = captured[suffix][i]
    return x, new_cache
