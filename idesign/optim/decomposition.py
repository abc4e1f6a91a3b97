r"""Gradient decomposition onto concept directions: what does a training step teach?

For a dense layer ``y = x W`` (Flax kernel ``W: [d_in, d_out]``) and a unit concept direction ``c``
on its **input** side (a probe direction, a class-mean difference, an SAE decoder row in the layer's
input space), the layer's response to the concept is the row ``w = cᵀW ∈ R^{d_out}`` and a step
``ΔW`` changes it by ``a = cᵀΔW``. On the **output** side (``c ∈ R^{d_out}``), ``w = W c`` and
``a = ΔW c``: how strongly the layer writes the concept. The decomposition reports, per concept,

.. math::

    \text{coefficient}(c) \;=\; \operatorname{sign}\!\big(\|w + a\|^2 - \|w\|^2\big)\;
        \frac{\|a\|^2}{\|\Delta W\|_F^2}
      \;=\; \operatorname{sign}\!\big(2\langle a, w\rangle + \|a\|^2\big)\;\frac{\|c^\top \Delta W\|^2}{\|\Delta W\|_F^2}.

* The **magnitude** is the fraction of the step's squared norm that lies along the concept
  (in ``[0, 1]``; over an orthonormal set of concepts the fractions sum to at most 1, and to exactly 1
  for a complete basis).
* The **sign** says whether the step makes the layer's gain on the concept, ``‖w‖``, grow
  (``+``: the step *reinforces* the concept) or shrink (``−``: it *suppresses* it). The exact change
  ``‖w + a‖² − ‖w‖²`` is used, so a layer with no response yet (``w = 0``) is reinforced by any
  step along the concept.
* ``w`` comes from the current parameters (the optimizer's ``params``), or, when none are given,
  from the weights the :class:`Concepts` were built on (``Concepts.reference``).

Goodfire described watching the inner products of each update with concept directions to see what a
step teaches; this is that observation as an optax transform. :func:`observe_concepts` passes updates
through *bit-identically* and keeps the last step's decomposition in its state; chain it **last**
(after the learning rate, so it sees the parameter change itself) or wrap the optimizer with
:func:`observed`. :class:`ConceptLog` is a :func:`idesign.train.train` callback that records the state
every step, and :func:`plot_concept_log` draws it over training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idesign import tree as tree_lib
from idesign._pytree import pytree_class, static
from idesign._types import Array, PyTree
from idesign.optim._final import then_on_final_update
from idesign.subspaces import Subspace

ConceptSide = Literal["input", "output"]
CONCEPT_SIDES = ("input", "output")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@pytree_class
class Concepts:
    """Named concept directions per dense kernel, all on one side of their kernels.

    A pytree: ``directions`` and ``reference`` are traced leaves (new directions never recompile);
    ``names``, ``side`` and ``transposed`` are static. Build one with :func:`concepts_for`.

    Args:
      names: ``{kernel path: (name, ...)}``, one name per direction.
      directions: ``{kernel path: [k, d]}``; rows are normalised to unit length.
      side: ``"input"`` (``d = d_in``, the kernel's first axis in Flax layout) or ``"output"`` (``d_out``).
      reference: ``{kernel path: [k, m]}``, the components ``cᵀW`` (or ``W c``) of the weights the concepts
        were built on; the sign reference when :func:`decompose_update` gets no ``params``.
      transposed: kernel paths stored ``[d_out, d_in]`` (a tied unembedding's embedding table).

    >>> import jax.numpy as jnp
    >>> from idesign.optim import Concepts
    >>> c = Concepts({'w': ('x',)}, {'w': jnp.array([[3., 4.]])})
    >>> c.directions['w'].tolist(), c.side
    ([[0.6000000238418579, 0.800000011920929]], 'input')
    """

    names: Mapping[str, tuple[str, ...]] = static()
    directions: Mapping[str, Array]
    side: ConceptSide = static(default="input")
    reference: Mapping[str, Array] | None = None
    transposed: tuple[str, ...] = static(default=())

    def __post_init__(self):
        if self.side not in CONCEPT_SIDES:
            raise ValueError(f"Concepts: side must be one of {CONCEPT_SIDES}; got {self.side!r}.")
        names = {p: tuple(str(n) for n in ns) for p, ns in self.names.items()}
        if set(names) != set(self.directions):
            raise ValueError(f"Concepts: names and directions name different kernels: {sorted(names)} vs "
                             f"{sorted(self.directions)}.")
        directions = {}
        for path in names:
            d = self.directions[path]
            d = d if not _is_concrete(d) else jnp.asarray(d)
            if d.ndim == 1:
                d = d[None]
            if d.ndim != 2 or d.shape[0] != len(names[path]):
                raise ValueError(f"Concepts: directions for {path} have shape {tuple(jnp.shape(self.directions[path]))};"
                                 f" expected [k, d] with k = {len(names[path])} (one row per name {names[path]}).")
            if len(set(names[path])) != len(names[path]):
                raise ValueError(f"Concepts: duplicate concept names for {path}: {names[path]}.")
            if _is_concrete(d):
                d64 = np.asarray(d, np.float64)
                if not np.all(np.isfinite(d64)):
                    raise ValueError(f"Concepts: directions for {path} hold NaN or inf; directions must be finite.")
                norms = np.linalg.norm(d64, axis=1)
                if np.any(norms == 0):
                    zero = [names[path][i] for i in np.flatnonzero(norms == 0)]
                    raise ValueError(f"Concepts: direction(s) {zero} for {path} are zero; a concept needs a direction.")
                dtype = d.dtype if jnp.issubdtype(d.dtype, jnp.floating) else jnp.float32
                d = jnp.asarray(d64 / norms[:, None], dtype)
            else:
                d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
            directions[path] = d
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "transposed", tuple(self.transposed))

    def __repr__(self) -> str:
        return f"Concepts(side={self.side!r}, {', '.join(f'{p}: {list(n)}' for p, n in self.names.items())})"

    def axis(self, path: str) -> int:
        """The axis of ``path``'s kernel that the directions contract with (0 or -1)."""
        return 0 if (self.side == "input") != (path in self.transposed) else -1


def _as_matrix(x: Array, axis: int) -> Array:
    """``[d, m]``: the concept axis first, every other axis flattened."""
    x = x if axis == 0 else jnp.moveaxis(x, -1, 0)
    return x.reshape(x.shape[0], -1)


def _check_leaf(concepts: Concepts, path: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise ValueError(f"concepts for {path}: the parameter has shape {shape}; concepts attach to dense kernels "
                         "(at least 2 axes).")
    axis = concepts.axis(path)
    d = tuple(jnp.shape(concepts.directions[path]))
    if d[1] != shape[axis]:
        where = "first" if axis == 0 else "last"
        raise ValueError(f"concepts for {path}: directions have shape {d} (side {concepts.side!r}) but the kernel has "
                         f"shape {shape}; side {concepts.side!r} needs directions [k, {shape[axis]}] (the kernel's "
                         f"{where} axis).")


def check_concepts(concepts: Concepts, params: PyTree) -> None:
    """Checks that every concept kernel exists in ``params`` with a matching dimension.

    Raises:
      KeyError: a kernel path that is not in ``params`` (with the closest paths).
      ValueError: a direction width that does not match the kernel's axis, naming both shapes.

    >>> import jax.numpy as jnp
    >>> from idesign.optim import Concepts, check_concepts
    >>> check_concepts(Concepts({'w': ('x',)}, {'w': jnp.ones((1, 3))}), {'w': jnp.zeros((2, 5))})
    Traceback (most recent call last):
    ...
    ValueError: concepts for w: directions have shape (1, 3) (side 'input') but the kernel has shape (2, 5); side 'input' needs directions [k, 2] (the kernel's first axis).
    """
    leaves = _named(params)
    for path in concepts.names:
        if path not in leaves:
            raise KeyError(tree_lib.unknown_name_message(path, list(leaves), what="parameter path"))
        if not _held_out(leaves[path]):
            _check_leaf(concepts, path, tuple(jnp.shape(leaves[path])))


def _components(concepts: Concepts, path: str, update: Array, weight: Array | None,
                reference: Array | None) -> tuple[Array, Array]:
    """(coefficients [k], gain ‖w‖ [k]) for one kernel."""
    _check_leaf(concepts, path, tuple(update.shape))
    f32 = jnp.promote_types(update.dtype, jnp.float32)
    directions = concepts.directions[path].astype(f32)
    m = _as_matrix(update.astype(f32), concepts.axis(path))
    a = directions @ m                                            # [k, m]: the step along each concept
    w = directions @ _as_matrix(weight.astype(f32), concepts.axis(path)) if weight is not None else reference.astype(f32)
    total = jnp.sum(m * m)
    fraction = jnp.sum(a * a, axis=1) / jnp.where(total > 0, total, 1.0)
    change = 2 * jnp.sum(a * w, axis=1) + jnp.sum(a * a, axis=1)  # ‖w + a‖² − ‖w‖², exactly
    return jnp.sign(change) * fraction, jnp.linalg.norm(w, axis=1)


def _held_out(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _named(tree: PyTree) -> dict[str, Any]:
    """``named_leaves``, with the ``None`` / ``MaskedNode`` leaves optax's wrappers put in place of held-out leaves."""
    return {tree_lib.path_str(p): x for p, x in tree_lib.leaves_with_paths(tree, is_leaf=_held_out)}


def _decompose(updates: PyTree, concepts: Concepts, params: PyTree | None) -> tuple[dict[str, Array], dict[str, Array]]:
    ups = _named(updates)
    weights = _named(params) if params is not None else None
    if weights is None and concepts.reference is None:
        raise ValueError("decompose_update: the sign of a step (reinforce or suppress) is measured against the "
                         "weights; pass params=, or build the Concepts with concepts_for(params, ...) so they "
                         "carry reference weights.")
    coefficients, gains = {}, {}
    for path in concepts.names:
        if path not in ups:
            raise KeyError(tree_lib.unknown_name_message(path, list(ups), what="update path"))
        if _held_out(ups[path]):  # a kernel frozen entirely (inside ids.optim.frozen): it does not move
            k = len(concepts.names[path])
            ref = concepts.reference[path] if concepts.reference is not None else None
            coefficients[path] = jnp.zeros((k,), jnp.float32)
            gains[path] = (jnp.linalg.norm(ref.astype(jnp.float32), axis=1) if ref is not None
                           else jnp.full((k,), jnp.nan, jnp.float32))
            continue
        weight = None
        if weights is not None:
            if path not in weights:
                raise KeyError(tree_lib.unknown_name_message(path, list(weights), what="parameter path"))
            weight = weights[path]
        ref = None if weight is not None else concepts.reference[path]
        coefficients[path], gains[path] = _components(concepts, path, ups[path], weight, ref)
    return coefficients, gains


def decompose_update(updates: PyTree, concepts: Concepts, params: PyTree | None = None) -> dict[str, Array]:
    r"""The signed fraction of each kernel's update along each concept (module docstring: the equation).

    ``coefficient(c) = sign(‖w + a‖² − ‖w‖²) · ‖a‖² / ‖ΔW‖²_F`` with ``a = cᵀΔW`` and ``w = cᵀW`` on the
    input side (``ΔW c`` and ``W c`` on the output side). Positive: the step reinforces the concept
    (the layer's gain along it grows); negative: it suppresses it. A zero update gives 0.

    Args:
      updates: the parameter change (an optax update after the learning rate) with the params' structure.
      concepts: :class:`Concepts` (e.g. from :func:`concepts_for`).
      params: the weights ``W`` the update will be added to; default: ``concepts.reference``.

    Returns:
      ``{kernel path: [k] coefficients}`` in the order of ``concepts.names[path]``.

    >>> import jax.numpy as jnp
    >>> from idesign.optim import concepts_for, decompose_update
    >>> W = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> c = concepts_for(W, {'w': (('a', 'b'), jnp.eye(2))})
    >>> coefficients = decompose_update({'w': jnp.array([[0.3, 0.], [0., -0.1]])}, c, W)
    >>> [round(float(x), 4) for x in coefficients['w']]   # 0.09 / 0.1 reinforcing 'a', 0.01 / 0.1 suppressing 'b'
    [0.9, -0.1]
    """
    return _decompose(updates, concepts, params)[0]


def _as_names_and_directions(value: Any) -> tuple[tuple[str, ...] | None, Any]:
    """``(names, directions)`` or bare directions (names ``None``)."""
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (list, tuple))
            and all(isinstance(n, str) for n in value[0])):
        return tuple(value[0]), value[1]
    return None, value


def concepts_for(params: PyTree, spec: Mapping[str, Any], *, side: ConceptSide = "input",
                 dense_layers: Mapping[str, str] | None = None) -> Concepts:
    """Builds :class:`Concepts` from ``{kernel pattern: (names, directions [k, d])}``.

    Keys are glob patterns over parameter paths (``blocks.*.mlp.up.kernel``) or, given ``dense_layers``
    (``apply.dense_layers``), dense-layer site prefixes (``blocks.0.mlp.up``, ``unembed``; a tied
    unembedding's table is handled in its transposed layout). Values are ``(names, directions)``, or just
    the directions (an array or a :class:`~idesign.subspaces.Subspace`; named ``c0, c1, ...``).
    Directions need not be orthogonal; each is normalised to unit length. The current weights' components
    are stored as ``reference``.

    Args:
      params: the parameters (shapes are checked; ``reference`` is computed from them).
      spec: ``{pattern: (names, directions) | directions}``.
      side: ``"input"`` (directions in ``d_in``) or ``"output"`` (``d_out``).
      dense_layers: ``apply.dense_layers`` to accept site prefixes.

    Returns:
      :class:`Concepts`.

    Raises:
      KeyError: a pattern that matches nothing. ValueError: mismatched widths, NaN/inf or zero directions,
      a kernel named twice, names that do not match the number of directions.

    >>> import jax.numpy as jnp, idesign as ids
    >>> from idesign.optim import concepts_for
    >>> apply, params = ids.init_transformer(ids.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1))
    >>> concepts_for(params, {'blocks.0.mlp.up': (['x0', 'x1'], jnp.eye(8)[:2])}, dense_layers=apply.dense_layers)
    Concepts(side='input', blocks.0.mlp.up.kernel: ['x0', 'x1'])
    """
    if side not in CONCEPT_SIDES:
        raise ValueError(f"concepts_for: side must be one of {CONCEPT_SIDES}; got {side!r}.")
    leaves = tree_lib.named_leaves(params)
    names: dict[str, tuple[str, ...]] = {}
    directions: dict[str, Array] = {}
    transposed: list[str] = []
    for pattern, value in spec.items():
        given_names, d = _as_names_and_directions(value)
        d = d.basis if isinstance(d, Subspace) else jnp.asarray(d)
        d = d[None] if d.ndim == 1 else d
        if d.ndim != 2:
            raise ValueError(f"concepts_for: directions for {pattern!r} have shape {tuple(d.shape)}; expected [k, d].")
        these = given_names if given_names is not None else tuple(f"c{i}" for i in range(d.shape[0]))
        if len(these) != d.shape[0]:
            raise ValueError(f"concepts_for: {pattern!r} has {len(these)} names {list(these)} for {d.shape[0]} "
                             "directions; give one name per row.")
        for path, is_transposed in dict.fromkeys(tree_lib.resolve_kernels(params, pattern, dense_layers).values()):
            if path in names:
                raise ValueError(f"concepts_for: kernel {path} is named by more than one pattern; give each kernel "
                                 "its concepts once (stack the directions).")
            names[path], directions[path] = these, d
            if is_transposed:
                transposed.append(path)
    concepts = Concepts(names, directions, side, None, tuple(transposed))
    check_concepts(concepts, params)
    reference = {p: concepts.directions[p].astype(jnp.float32) @ _as_matrix(
        jnp.asarray(leaves[p], jnp.float32), concepts.axis(p)) for p in names}
    return dataclasses.replace(concepts, reference=reference)


class ObserveConceptsState(NamedTuple):
    """State of :func:`observe_concepts`: the concepts and the last step's decomposition.

    ``coefficients[path]`` is :func:`decompose_update` of the last update (zeros before the first);
    ``gain[path]`` is ``‖cᵀW‖`` per concept for the weights that update was applied to; ``count`` the
    number of updates seen.
    """

    concepts: Concepts
    coefficients: dict[str, Array]
    gain: dict[str, Array]
    count: Array


def observe_concepts(concepts: Concepts) -> optax.GradientTransformation:
    """Observes each update's decomposition onto concepts; the updates pass through unchanged (bit-identical).

    Chain it last (``optax.chain(optax.adamw(1e-3), observe_concepts(c))``) so it sees the parameter
    change, or use :func:`observed`. The concepts live in the state, so new directions can be swapped in
    with ``optax.tree_utils.tree_set(opt_state, concepts=...)`` without recompiling.

    Args:
      concepts: :class:`Concepts`; ``init`` checks them against the parameters.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ObserveConceptsState`. When ``update`` gets
      ``params`` the sign is measured against them, otherwise against ``concepts.reference``.

    >>> import jax.numpy as jnp, optax
    >>> from idesign.optim import concepts_for, observe_concepts
    >>> params = {'w': jnp.eye(2)}
    >>> opt = optax.chain(optax.sgd(0.1), observe_concepts(concepts_for(params, {'w': (['a'], jnp.array([1., 0.]))})))
    >>> updates, state = opt.update({'w': jnp.array([[-1., 0.], [0., 0.]])}, opt.init(params), params)
    >>> state[1].coefficients['w'].tolist()   # the whole step, and it grows the gain along 'a'
    [1.0]
    """
    if not isinstance(concepts, Concepts):
        raise TypeError(f"observe_concepts: expected Concepts (see concepts_for); got {type(concepts).__name__}.")

    def init_fn(params):
        check_concepts(concepts, params)
        zeros = {p: jnp.zeros((len(n),), jnp.float32) for p, n in concepts.names.items()}
        # copies: a train step that donates its state must not delete the caller's concept arrays
        own = jax.tree_util.tree_map(jnp.copy, concepts)
        return ObserveConceptsState(own, zeros, dict(zeros), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        coefficients, gain = _decompose(updates, state.concepts, params)
        return updates, ObserveConceptsState(state.concepts, coefficients, gain, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


class ObservedState(NamedTuple):
    """State of :func:`observed`: the wrapped optimizer's state and the observer's."""

    inner: optax.OptState
    observation: ObserveConceptsState


def observed(optimizer: optax.GradientTransformation, concepts: Concepts) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so :func:`observe_concepts` sees its final update; extra arguments reach the optimizer.

    >>> import jax.numpy as jnp, optax
    >>> from idesign.optim import concepts_for, observed
    >>> params = {'w': jnp.eye(2)}
    >>> opt = observed(optax.adam(0.1), concepts_for(params, {'w': jnp.array([[0., 1.]])}))
    >>> _, state = opt.update({'w': jnp.ones((2, 2))}, opt.init(params), params)
    >>> state.observation.coefficients['w'].round(3).tolist()   # Adam's first step: sign-like, half along row 1
    [-0.5]
    """
    return then_on_final_update(optimizer, observe_concepts(concepts), ObservedState)


def find_observations(opt_state: PyTree) -> list[ObserveConceptsState]:
    """Every :class:`ObserveConceptsState` inside an optimizer state, in flattening order.

    >>> import jax.numpy as jnp, optax
    >>> from idesign.optim import concepts_for, find_observations, observe_concepts
    >>> params = {'w': jnp.eye(2)}
    >>> opt = optax.chain(optax.sgd(0.1), observe_concepts(concepts_for(params, {'w': jnp.eye(2)})))
    >>> len(find_observations(opt.init(params)))
    1
    """
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ObserveConceptsState))
    return [x for x in found if isinstance(x, ObserveConceptsState)]


class ConceptLog:
    """Per-step history of the concept decomposition: a :func:`idesign.train.train` callback.

    Called as ``log(step, train_state, metrics)`` (or ``log.record(step, opt_state)``), it reads the
    :class:`ObserveConceptsState` in the optimizer state. Values stay on the device until read (no
    synchronisation per step); they are copied, so donated training states are safe.

    Args:
      every: record every ``every``-th step.
      index: which observer to read when the optimizer holds several.

    Attributes (read on access): ``steps`` ``[n]``; ``coefficients`` and ``gain``:
    ``{kernel path: [n, k]}``; ``names``: ``{kernel path: concept names}``.

    >>> import jax.numpy as jnp, optax
    >>> from idesign.optim import ConceptLog, concepts_for, observe_concepts
    >>> params = {'w': jnp.eye(2)}
    >>> opt = optax.chain(optax.sgd(0.1), observe_concepts(concepts_for(params, {'w': (['a', 'b'], jnp.eye(2))})))
    >>> state, log = opt.init(params), ConceptLog()
    >>> for step in (1, 2):
    ...     _, state = opt.update({'w': jnp.array([[1., 0.], [0., 0.]])}, state, params)
    ...     log.record(step, state)
    >>> log.steps.tolist(), log.coefficients['w'].tolist()
    ([1, 2], [[-1.0, 0.0], [-1.0, 0.0]])
    """

    def __init__(self, every: int = 1, index: int = 0):
        if every < 1:
            raise ValueError(f"ConceptLog: every must be >= 1; got {every}.")
        self.every, self.index = int(every), int(index)
        self._steps: list[int] = []
        self._pending: list[tuple[dict, dict]] = []
        self._host: list[tuple[dict, dict]] = []
        self.names: dict[str, tuple[str, ...]] = {}

    def __call__(self, step: int, state: Any, metrics: Mapping[str, Array] | None = None) -> None:
        self.record(step, state.opt_state if hasattr(state, "opt_state") else state)

    def record(self, step: int, opt_state: PyTree) -> None:
        """Records the decomposition held in ``opt_state`` for ``step`` (skipped unless ``step % every == 0``)."""
        if int(step) % self.every:
            return
        found = find_observations(opt_state)
        if not found:
            raise ValueError("ConceptLog: the optimizer state holds no ObserveConceptsState; chain "
                             "observe_concepts(concepts) last in the optimizer, or wrap it with observed(...).")
        if self.index >= len(found):
            raise ValueError(f"ConceptLog: index={self.index} but the optimizer state holds {len(found)} observers.")
        obs = found[self.index]
        self.names = dict(obs.concepts.names)
        self._steps.append(int(step))
        self._pending.append(jax.tree_util.tree_map(jnp.copy, (obs.coefficients, obs.gain)))

    def _fetch(self) -> None:
        if self._pending:
            self._host.extend(jax.device_get(self._pending))
            self._pending = []

    @property
    def steps(self) -> np.ndarray:
        """Recorded step numbers ``[n]``."""
        return np.asarray(self._steps, np.int64)

    def _stack(self, which: int) -> dict[str, np.ndarray]:
        self._fetch()
        return {p: np.stack([np.asarray(row[which][p]) for row in self._host]) if self._host
                else np.zeros((0, len(n)), np.float32) for p, n in self.names.items()}

    @property
    def coefficients(self) -> dict[str, np.ndarray]:
        """``{kernel path: [n, k]}`` signed fractions (see :func:`decompose_update`)."""
        return self._stack(0)

    @property
    def gain(self) -> dict[str, np.ndarray]:
        """``{kernel path: [n, k]}`` the layer's gain ``‖cᵀW‖`` on each concept before each recorded step."""
        return self._stack(1)

    def as_dict(self) -> dict[str, list[float]]:
        """Flat ``{"path/concept": [coefficient per recorded step]}`` (JSON-ready), plus ``"step"``."""
        out: dict[str, list[float]] = {"step": self.steps.tolist()}
        for path, values in self.coefficients.items():
            for i, name in enumerate(self.names[path]):
                out[f"{path}/{name}"] = values[:, i].astype(float).tolist()
        return out


def plot_concept_log(log: ConceptLog, *, paths: Sequence[str] | None = None, what: Literal["coefficient", "gain"] =
                     "coefficient", cumulative: bool = False, smooth: int = 1, axes: Any = None) -> Any:
    """Plots the decomposition over training: one panel per kernel, one line per concept.

    Args:
      log: a :class:`ConceptLog` with at least one recorded step.
      paths: the kernels to show (default: all).
      what: ``"coefficient"`` (signed fraction of each step along the concept) or ``"gain"`` (``‖cᵀW‖``).
      cumulative: plot the running sum of coefficients (how much of training, so far, pushed each concept).
      smooth: moving-average window in recorded steps (1 = raw).
      axes: a sequence of matplotlib axes to draw into (one per path); default: a new figure.

    Returns:
      The matplotlib ``Figure``.

    >>> import jax.numpy as jnp, optax
    >>> from idesign.optim import ConceptLog, concepts_for, observe_concepts, plot_concept_log
    >>> params = {'w': jnp.eye(2)}
    >>> opt = optax.chain(optax.sgd(0.1), observe_concepts(concepts_for(params, {'w': jnp.eye(2)})))
    >>> log, state = ConceptLog(), opt.init(params)
    >>> _, state = opt.update({'w': jnp.ones((2, 2))}, state, params); log.record(1, state)
    >>> fig = plot_concept_log(log)
    >>> len(fig.axes)
    1
    """
    import matplotlib.pyplot as plt

    if what not in ("coefficient", "gain"):
        raise ValueError(f"plot_concept_log: what must be 'coefficient' or 'gain'; got {what!r}.")
    if len(log.steps) == 0:
        raise ValueError("plot_concept_log: the log has no recorded steps.")
    data = log.coefficients if what == "coefficient" else log.gain
    paths = list(paths) if paths is not None else list(data)
    unknown = [p for p in paths if p not in data]
    if unknown:
        raise KeyError(tree_lib.unknown_name_message(unknown[0], list(data), what="logged kernel"))
    if axes is None:
        fig, axes = plt.subplots(len(paths), 1, figsize=(7, 2.6 * len(paths)), squeeze=False, sharex=True)
        axes = axes[:, 0]
    fig = axes[0].figure
    steps = log.steps
    for ax, path in zip(axes, paths):
        values = data[path]
        if cumulative and what == "coefficient":
            values = np.cumsum(values, axis=0)
        if smooth > 1 and len(values) >= smooth:
            kernel = np.ones(smooth) / smooth
            values = np.stack([np.convolve(v, kernel, mode="valid") for v in values.T], axis=1)
            x = steps[smooth - 1:]
        else:
            x = steps
        for i, name in enumerate(log.names[path]):
            ax.plot(x, values[:, i], label=name)
        if what == "coefficient":
            ax.axhline(0.0, color="k", lw=0.6)
        label = {"coefficient": "cumulative signed fraction" if cumulative else "signed fraction of step",
                 "gain": "gain ‖cᵀW‖"}[what]
        ax.set_ylabel(label)
        ax.set_title(f"{path} (+ reinforces, − suppresses)" if what == "coefficient" else path, fontsize=9)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


__all__ = ["Concepts", "concepts_for", "check_concepts", "decompose_update", "ObserveConceptsState",
           "observe_concepts", "ObservedState", "observed", "find_observations", "ConceptLog", "plot_concept_log"]
