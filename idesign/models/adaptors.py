"""Adaptors: any Flax model as ``apply(params, *inputs, hooks=None) -> (outputs, captured)``.

``from_nnx`` and ``from_linen`` wrap a Flax NNX or Linen module in idesign's functional model
interface, so every idesign tool (probes, steering, ablation, gradient routing) works on it
without changes to the model's code.

Site names
----------
Both adaptors name activation sites the same way; ``<path>`` is a submodule's dotted path
(NNX: its attribute path, e.g. ``layers.0``; Linen: its scope path, e.g. ``encoder.layers_1``):

- ``<path>.in``  -- the first positional argument of the submodule's ``__call__``;
- ``<path>.out`` -- what the submodule's ``__call__`` returns;
- ``in`` / ``out`` -- the same for the root module's called method (``method``);
- ``<path>.<name>`` -- a value the module sows (NNX: ``self.sow(nnx.Intermediate, name, v)``,
  Linen: ``self.sow('intermediates', name, v)``); at the root, just ``<name>``.
  Sown values are read-only: the model never reads them back, so only ``Capture`` applies;
- NNX only: ``<path>.<name>`` -- a value passed through ``self.perturb(name, v)``, a full
  site (every intervention applies, and the model continues with the result).

A value that is a pytree rather than one array (a tuple of outputs, a dict input) gives one site
per array leaf, suffixed by its pytree path: ``attn.out.0``, ``attn.out.1``. Only modules that
run in the example forward pass are sites; ``apply.site_names`` lists them in execution order
and ``apply.site_shapes`` gives their shapes for the example inputs.

A submodule called more than once per forward pass (weight sharing, a loop) is one site:
interventions apply at every call, and ``Capture`` keeps the last call's value. A submodule
called inside a transform the model applies itself (``nn.scan``, ``nn.remat``,
``jax.checkpoint``) is a site for interventions, but ``Capture`` there raises: its value lives
in the inner trace and cannot leave it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import tracers as flax_tracers

from idesign import hooks as hooks_lib
from idesign import tree as tree_lib
from idesign._types import Array, Params, PyTree

Runner = Callable[[str, Array], Array]

__all__ = ["NNXApply", "LinenApply", "from_nnx", "from_linen"]


# --------------------------------------------------------------------------- shared pieces


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _site(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _hook_value(runner: Runner, site: str, value: PyTree) -> PyTree:
    """Runs a site's chain on a value: one site for an array, one per array leaf of a pytree."""
    if _is_array(value):
        return runner(site, value)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: runner(f"{site}.{tree_lib.path_str(p)}", x) if _is_array(x) else x, value)


def _observe(runner: Runner, site: str, value: PyTree) -> None:
    """Offers a read-only value (a sown intermediate) to the runner: Capture works, others raise."""

    def one(name: str, x: Array) -> None:
        # Capture (and the discovery recorder) return the activation itself; any other
        # intervention returns a new array, which the model would silently ignore.
        if runner(name, x) is not x:
            raise ValueError(
                f"site {name!r} is a sown value, which the model never reads back, so only "
                "Capture applies there. To change it, hook the producing module's '.out' site "
                "(or, in NNX, pass the value through self.perturb(name, value)).")

    if _is_array(value):
        one(site, value)
    else:
        for p, x in tree_lib.leaves_with_paths(value):
            if _is_array(x):
                one(f"{site}.{tree_lib.path_str(p)}", x)


class _SiteRecorder:
    """A stand-in runner that records every site reached, in order, with its shape."""

    def __init__(self):
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def wants(self, site: str) -> bool:
        return False

    def __call__(self, site: str, h: Array) -> Array:
        self.shapes.setdefault(site, jax.ShapeDtypeStruct(np.shape(h), jnp.result_type(h)))
        return h


class _TraceGuard:
    """Wraps a runner; refuses a Capture whose value belongs to a trace inside the forward pass.

    Inside a transform the model applies itself (``nn.scan``, ``nn.vmap``, ``jax.checkpoint``),
    values live in an inner trace: interventions there are fine, but a captured value would
    escape it as a leaked tracer.
    """

    def __init__(self, runner: Runner):
        self._runner = runner
        self._captured = getattr(runner, "captured", None)
        self._outer_trace = flax_tracers.current_trace()

    def __call__(self, site: str, h: Array) -> Array:
        before = None if self._captured is None else self._captured.get(site)
        out = self._runner(site, h)
        if (self._captured is not None and self._captured.get(site) is not before
                and flax_tracers.current_trace() != self._outer_trace):
            raise ValueError(
                f"Capture at site {site!r}: this module runs inside a transform the model applies "
                "itself (nn.scan, nn.vmap, nn.remat, jax.checkpoint, ...), whose values cannot "
                "leave it. Capture a site of the enclosing module instead.")
        return out


def _discover_sites(run: Callable[[Runner, Any, tuple, dict], Any], params: PyTree,
                    args: tuple, kwargs: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """Traces one abstract forward pass (no FLOPs) and returns the sites it reaches."""
    recorder = _SiteRecorder()
    leaves, treedef = jax.tree.flatten((params, args, kwargs))
    traced = [_is_array(x) for x in leaves]

    # Non-array arguments (flags such as ``deterministic=True``) stay static Python values.
    def forward(arrays: list[Array]) -> Any:
        it = iter(arrays)
        full = [next(it) if t else x for x, t in zip(leaves, traced)]
        p, a, k = jax.tree.unflatten(treedef, full)
        return run(recorder, p, a, k)

    jax.eval_shape(forward, [x for x, t in zip(leaves, traced) if t])
    return recorder.shapes


def _check_params(params: Params, template: Mapping[tuple, tuple[int, ...]], *,
                  hint: str = "") -> dict[tuple, Any]:
    """Flattens ``params`` and checks its paths and shapes against the model's parameters."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a nested dict of arrays; got {type(params).__name__}.{hint}")
    flat = traverse_util.flatten_dict(dict(params))
    # Checkpoints restore integer keys (list indices) as strings; accept both spellings.
    by_str = {tuple(map(str, k)): v for k, v in flat.items()}
    known = {tuple(map(str, k)) for k in template}
    if set(by_str) != known:
        raise ValueError(tree_lib.structure_diff(sorted(".".join(k) for k in known), sorted(".".join(k) for k in by_str),
                                                 what="params", against="the model's parameters") + f".{hint}")
    out = {}
    for key, shape in template.items():
        value = by_str[tuple(map(str, key))]
        if np.shape(value) != shape:
            raise ValueError(
                f"params {'.'.join(map(str, key))!r} has shape {np.shape(value)}; the model's "
                f"parameter has shape {shape}.")
        out[key] = value
    return out


class _Adaptor:
    """Shared behaviour: hook resolution, capture collection and the site list."""

    site_names: tuple[str, ...]
    site_shapes: Mapping[str, jax.ShapeDtypeStruct]

    def _run(self, runner: Runner, params: PyTree, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _set_sites(self, params: PyTree, args: tuple, kwargs: dict) -> None:
        shapes = _discover_sites(self._run, params, args, kwargs)
        self.site_names = tuple(shapes)
        self.site_shapes = types.MappingProxyType(shapes)

    def _apply(self, params: PyTree, args: tuple, kwargs: dict,
               hooks: hooks_lib.Hooks | None) -> tuple[Any, dict[str, Array]]:
        runner = hooks_lib.SiteRunner(hooks, self.site_names)
        out = self._run(runner, params, args, kwargs)
        runner.check_all_visited()
        return out, runner.captured

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name}, {len(self.site_names)} sites)"


# --------------------------------------------------------------------------- NNX


@dataclasses.dataclass(frozen=True)
class _ActiveCall:
    paths: Mapping[int, str]  # id(submodule of the merged copy) -> dotted path ('' = root)
    runner: Runner


_ACTIVE: contextvars.ContextVar[_ActiveCall | None] = contextvars.ContextVar(
    "idesign_nnx_active_call", default=None)


def _active_path(module: nnx.Module) -> tuple[_ActiveCall, str] | None:
    ctx = _ACTIVE.get()
    if ctx is None or id(module) not in ctx.paths:
        return None
    return ctx, ctx.paths[id(module)]


def _is_sown_intermediate(variable_type: Any) -> bool:
    if isinstance(variable_type, str):
        return variable_type == "intermediates"
    return (isinstance(variable_type, type) and issubclass(variable_type, nnx.Intermediate)
            and not issubclass(variable_type, nnx.Perturbation))


@functools.cache
def _hooked_class(cls: type[nnx.Module]) -> type[nnx.Module]:
    """A subclass of ``cls`` whose ``__call__``, ``sow`` and ``perturb`` report to the active call.

    Instances behave exactly like ``cls`` unless they belong to the merged copy of an ``apply``
    call in progress; one subclass per class is created and reused.
    """
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    original_sow, original_perturb = cls.sow, cls.perturb

    def sow(self, variable_type, name, value, *args, **kwargs):
        active = _active_path(self)
        if active is None or not _is_sown_intermediate(variable_type):
            return original_sow(self, variable_type, name, value, *args, **kwargs)
        ctx, path = active
        _observe(ctx.runner, _site(path, name), value)
        return True

    def perturb(self, name, value, *args, **kwargs):
        active = _active_path(self)
        if active is None:
            return original_perturb(self, name, value, *args, **kwargs)
        ctx, path = active
        return _hook_value(ctx.runner, _site(path, name), value)

    namespace.update(sow=sow, perturb=perturb)

    if callable(getattr(cls, "__call__", None)):
        original_call = cls.__call__

        @functools.wraps(original_call)
        def __call__(self, *args, **kwargs):
            active = _active_path(self)
            if active is None or not active[1]:  # not ours, or the root (hooked by apply itself)
                return original_call(self, *args, **kwargs)
            ctx, path = active
            if args:
                args = (_hook_value(ctx.runner, f"{path}.in", args[0]), *args[1:])
            return _hook_value(ctx.runner, f"{path}.out", original_call(self, *args, **kwargs))

        namespace["__call__"] = __call__

    return types.new_class(cls.__name__, (cls,), {"pytree": cls._pytree__is_pytree},
                           lambda ns: ns.update(namespace))


@contextlib.contextmanager
def _hooking(model: nnx.Module, runner: Runner) -> Iterator[None]:
    """Routes the submodule calls of ``model`` (a private copy) through ``runner``."""
    paths = {}
    for path, module in nnx.iter_modules(model):
        object.__setattr__(module, "__class__", _hooked_class(type(module)))
        paths[id(module)] = ".".join(map(str, path))
    token = _ACTIVE.set(_ActiveCall(paths, runner))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class NNXApply(_Adaptor):
    """``apply(params, *args, hooks=None, **kwargs) -> (outputs, captured)`` for an NNX module.

    Made by :func:`from_nnx`. Attributes: ``site_names`` (execution order) and ``site_shapes``
    (for the example inputs).
    """

    def __init__(self, module: nnx.Module, args: tuple, kwargs: dict, method: str):
        if not isinstance(module, nnx.Module):
            raise TypeError(f"from_nnx expects an nnx.Module; got {type(module).__name__}.")
        if not callable(getattr(module, method, None)):
            raise AttributeError(f"{type(module).__name__} has no method {method!r}.")
        self._name = type(module).__name__
        self._method = method
        self._graphdef, param_state, self._rest = nnx.split(module, nnx.Param, ...)
        flat = dict(nnx.to_flat_state(param_state))
        self._param_shapes = {k: np.shape(v.get_value()) for k, v in flat.items()}
        # Keep each Param's type and metadata (e.g. sharding names), not the caller's arrays.
        self._param_vars = {k: v.replace(None) for k, v in flat.items()}
        self._set_sites(nnx.to_pure_dict(param_state), args, kwargs)

    def _merge(self, params: Params | nnx.State) -> nnx.Module:
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        flat = _check_params(params, self._param_shapes)
        state = nnx.from_flat_state([(k, v.replace(flat[k])) for k, v in self._param_vars.items()])
        # copy=True: the model may write to its non-Param state (counters, stats) during the
        # call; those writes must land on the copy, never on the constants held here.
        return nnx.merge(self._graphdef, state, self._rest, copy=True)

    def _run(self, runner: Runner, params: PyTree, args: tuple, kwargs: dict) -> Any:
        runner = _TraceGuard(runner)
        model = self._merge(params)
        with _hooking(model, runner):
            if args:
                args = (_hook_value(runner, "in", args[0]), *args[1:])
            out = getattr(model, self._method)(*args, **kwargs)
        return _hook_value(runner, "out", out)

    def __call__(self, params: Params | nnx.State, *args: Any, hooks: hooks_lib.Hooks | None = None,
                 **kwargs: Any) -> tuple[Any, dict[str, Array]]:
        return self._apply(params, args, kwargs, hooks)


def from_nnx(module: nnx.Module, *example_args: Any, method: str = "__call__",
             **example_kwargs: Any) -> tuple[NNXApply, Params]:
    """Turns an NNX module into ``apply(params, *args, hooks=None, **kwargs) -> (out, captured)``.

    ``params`` is ``nnx.to_pure_dict(nnx.state(module, nnx.Param))``: a plain nested dict (list
    indices are int keys; an ``nnx.State`` of the same Params is accepted too). All non-``Param``
    state -- ``BatchStat``s, RNG keys and counters, any other ``Variable`` -- is held constant at
    its value when ``from_nnx`` is called: write to it during a call (BatchNorm in training mode,
    a Dropout drawing from its own ``Rngs``) and the write is discarded, so every call sees the
    same statistics and the same random draws. Pass fresh randomness as an argument (e.g. an
    ``nnx.Rngs``/key argument of your ``__call__``) if each call needs its own.

    ``apply`` is pure: each call merges a private copy of the module and never touches ``module``
    or its submodules. Hooks are pytree arguments, so ``jax.jit(apply)`` and jitted functions
    calling ``apply`` compile once per hooked site set and intervention kind, not per direction.
    Site names follow the scheme in this module's docstring (``layers.0.out``, ``in``, ...).

    Interventions reach submodule calls because, on the private copy only, each submodule's class
    is swapped for a cached subclass whose ``__call__`` passes the call's first positional
    argument and its result through the hooks (and whose ``sow``/``perturb`` report their values).
    Submodules that lifted NNX transforms re-create inside the forward pass (``nnx.scan``,
    ``nnx.vmap``, ``nnx.remat``, ``nnx.jit``) are fresh objects: their calls are not sites (the
    module that calls the transform still is). Code that tests ``type(self) is SomeClass``
    inside the model sees the subclass.

    Args:
      module: the NNX module; left unchanged.
      *example_args: example inputs; one abstract forward pass (``jax.eval_shape``, no FLOPs)
        on them discovers ``apply.site_names``. Non-array arguments are passed as they are.
      method: the module's method that ``apply`` calls.
      **example_kwargs: example keyword inputs.

    Returns:
      ``(apply, params)``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from idesign.hooks import Add, Capture
    >>> from idesign.models.adaptors import from_nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(2, 4, rngs=rngs)
    ...     self.down = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.down(nnx.relu(self.up(x)))
    >>> apply, params = from_nnx(MLP(nnx.Rngs(0)), jnp.ones((1, 2)))
    >>> apply.site_names
    ('in', 'up.in', 'up.out', 'down.in', 'down.out', 'out')
    >>> hooks = {'up.out': (Add(jnp.ones(4)), Capture())}
    >>> out, captured = apply(params, jnp.ones((1, 2)), hooks=hooks)
    >>> captured['up.out'].shape
    (1, 4)
    """
    return (NNXApply(module, example_args, example_kwargs, method),
            nnx.to_pure_dict(nnx.state(module, nnx.Param)))


# --------------------------------------------------------------------------- Linen


def _sown_values(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, PyTree]]:
    """``(site, value)`` for each sown intermediate; the default tuple reduction gives its last."""
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _sown_values(value, path)
        else:
            yield ".".join(path), value[-1] if isinstance(value, tuple) and value else value


class LinenApply(_Adaptor):
    """``apply(params, *args, hooks=None, rngs=None, **kwargs) -> (outputs, captured)``.

    Made by :func:`from_linen`. Attributes: ``site_names`` (execution order; sown values last)
    and ``site_shapes`` (for the example inputs).
    """

    def __init__(self, module: nn.Module, params: Params, args: tuple, kwargs: dict,
                 method: str | Callable[..., Any] | None,
                 other_collections: Mapping[str, Any] | None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"from_linen expects a flax.linen Module; got {type(module).__name__}.")
        self._name = type(module).__name__
        self._module = module  # Linen modules are frozen dataclasses: nothing here can mutate it
        self._method = method
        self._constants = dict(other_collections or {})
        if "params" in self._constants:
            raise ValueError("other_collections must not contain 'params'; pass them as params.")
        flat = traverse_util.flatten_dict(dict(params))
        self._param_shapes = {k: np.shape(v) for k, v in flat.items()}
        self._set_sites(params, args, kwargs)

    def _run(self, runner: Runner, params: PyTree, args: tuple, kwargs: dict) -> Any:
        runner = _TraceGuard(runner)
        hint = ""
        if (isinstance(params, Mapping) and set(params) == {"params"}
                and ("params",) not in {k[:1] for k in self._param_shapes}):
            hint = " Pass the 'params' collection itself, not {'params': ...}."
        _check_params(params, self._param_shapes, hint=hint)

        def interceptor(next_fun, args, kwargs, context):
            path = ".".join(context.module.path)
            if context.method_name != "__call__" or not path:  # the root is hooked below
                return next_fun(*args, **kwargs)
            if args:
                args = (_hook_value(runner, f"{path}.in", args[0]), *args[1:])
            return _hook_value(runner, f"{path}.out", next_fun(*args, **kwargs))

        if args:
            args = (_hook_value(runner, "in", args[0]), *args[1:])
        with nn.intercept_methods(interceptor):
            out, state = self._module.apply(
                {**self._constants, "params": params}, *args, method=self._method,
                mutable=["intermediates"], **kwargs)
        out = _hook_value(runner, "out", out)
        for site, value in _sown_values(state.get("intermediates", {})):
            _observe(runner, site, value)
        return out

    def __call__(self, params: Params, *args: Any, hooks: hooks_lib.Hooks | None = None,
                 rngs: Any = None, **kwargs: Any) -> tuple[Any, dict[str, Array]]:
        if rngs is not None:
            kwargs = {**kwargs, "rngs": rngs}  # forwarded to Linen's Module.apply
        return self._apply(params, args, kwargs, hooks)


def from_linen(module: nn.Module, params: Params, *example_args: Any,
               method: str | Callable[..., Any] | None = None,
               other_collections: Mapping[str, Any] | None = None,
               **example_kwargs: Any) -> LinenApply:
    """Turns a Linen module into ``apply(params, *args, hooks=None, **kwargs) -> (out, captured)``.

    ``params`` is the Linen ``params`` collection itself -- ``variables['params']`` from
    ``module.init`` -- not ``{'params': ...}``. Other collections (e.g. ``batch_stats``) go in
    ``other_collections`` and are held constant (use the model in its inference mode for them);
    ``apply(..., rngs={'dropout': key})`` is forwarded to ``Module.apply`` for stochastic layers.

    Sites are reached with ``flax.linen.intercept_methods`` on every submodule's ``__call__``
    (``<path>.in``/``<path>.out``, paths from ``module.path``, e.g. ``Dense_0.out``,
    ``encoder.layers_1.out``) and from the ``intermediates`` collection for sown values
    (``<path>.<name>``, read-only). See this module's docstring for the full scheme. Hooks are
    pytree arguments, so ``jax.jit(apply)`` compiles once per hooked site set and intervention
    kind.

    Args:
      module: the Linen module (unbound).
      params: its ``params`` collection; checked against every call's ``params`` for paths and
        shapes.
      *example_args: example inputs; one abstract forward pass (``jax.eval_shape``, no FLOPs)
        discovers ``apply.site_names``. Non-array arguments are passed as they are.
      method: the method to apply (name or function, as in ``Module.apply``); default ``__call__``.
      other_collections: non-``params`` variable collections, held constant.
      **example_kwargs: example keyword inputs.

    Returns:
      ``apply``.

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from idesign.hooks import Capture
    >>> from idesign.models.adaptors import from_linen
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.relu(nn.Dense(4)(x))
    ...     self.sow('intermediates', 'hidden', h)
    ...     return nn.Dense(2)(h)
    >>> x = jnp.ones((1, 2))
    >>> params = MLP().init(jax.random.key(0), x)['params']
    >>> apply = from_linen(MLP(), params, x)
    >>> apply.site_names
    ('in', 'Dense_0.in', 'Dense_0.out', 'Dense_1.in', 'Dense_1.out', 'out', 'hidden')
    >>> out, captured = apply(params, x, hooks={'*.out': Capture()})
    >>> sorted(captured)
    ['Dense_0.out', 'Dense_1.out']
    """
    return LinenApply(module, params, example_args, example_kwargs, method, other_collections)
