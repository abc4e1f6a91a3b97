"""treescope renderings of idesign's pytrees: interventions, subspaces, probes and masks.

treescope is the ``notebook`` extra (flax 0.12 installs it too, since ``flax.nnx`` imports it); idesign
imports it only inside these functions. The classes are decorated with :func:`rendered`, whose
``__treescope_repr__`` is :func:`render`: each object renders as its constructor (arrays shown by
treescope as usual) followed by a one-line summary comment: what the intervention does, a subspace's
rank, a probe's family and width. A mask is a plain dict of bool leaves, so it has no class to hook:
:func:`mask_view` wraps one for display, with the frozen (selected) fraction of every leaf and
of the whole mask.

>>> import numpy as np, idesign as ids
>>> ids.masks.view({'w': np.array([[True, False, False, False]])}).summary()
'frozen 1 of 4 elements (25.00%)'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _fraction(x: Any) -> str:
    a = np.asarray(x)
    return f"{100 * float(a.astype(bool).mean()):.1f}%" if a.size else "0%"


def summary(obj: Any) -> str:
    """A one-line description of an idesign pytree (the comment its treescope rendering carries).

    >>> import jax.numpy as jnp, idesign as ids
    >>> summary(ids.Ablate(jnp.eye(4)[:2]))
    'removes a rank-2 subspace of a 4-dim site'
    >>> summary(ids.subspaces.Subspace(jnp.eye(3)[:1], side='output'))
    'rank 1 of 3 (output side)'
    """
    from idesign import hooks
    from idesign.subspaces import Subspace
    name = type(obj).__name__
    if isinstance(obj, hooks.Capture):
        return "records the site's activation"
    if isinstance(obj, hooks.Add):
        norm = float(np.linalg.norm(np.asarray(obj.direction, np.float64)))
        return f"adds scale x direction (|direction| = {norm:.3g}, shape {_shape(obj.direction)})"
    if isinstance(obj, hooks.Ablate):
        k, d = _shape(obj.basis)[-2:] if len(_shape(obj.basis)) >= 2 else (1, _shape(obj.basis)[-1])
        return f"removes a rank-{k} subspace of a {d}-dim site"
    if isinstance(obj, hooks.Replace):
        where = "everywhere" if obj.mask is None else f"where mask is set ({_fraction(obj.mask)} of its entries)"
        return f"patches in value {_shape(obj.value)} {where}"
    if isinstance(obj, hooks.Route):
        return f"gradient flows where mask is 1 ({_fraction(obj.mask)} of its entries); the forward value is unchanged"
    if isinstance(obj, hooks.Apply):
        fn = getattr(obj.fn, "__qualname__", type(obj.fn).__name__)
        return f"applies {fn}" + (" (site, h)" if obj.with_site else "")
    if isinstance(obj, Subspace):
        k, d = _shape(obj.basis)
        return f"rank {k} of {d} ({obj.side} side)"
    if name in ("LogisticProbe", "SoftmaxProbe"):
        w = _shape(obj.w)
        lead = w[:-1] if name == "LogisticProbe" else w[:-2]
        stacked = f", stacked {lead}" if lead else ""
        classes = "binary" if name == "LogisticProbe" else f"{w[-1]} classes"
        width = w[-1] if name == "LogisticProbe" else w[-2]
        return f"linear probe, {classes}, on {width} standardised features{stacked}"
    if name == "MassMeanProbe":
        return f"direction probe on {_shape(obj.w)[-1]} raw features"
    if name == "AttentionProbe":
        h, d, c = _shape(obj.w)[-3:]
        return f"attention-pooling probe, {h} heads on {d} features, " + ("binary" if c == 1 else f"{c} classes")
    return name


def _fields(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):  # NamedTuple probes
        return dict(obj._asdict())
    if hasattr(obj, "__slots__"):  # Subspace
        return {s: getattr(obj, s) for s in obj.__slots__}
    raise TypeError(f"_treescope.render: no fields to render for {type(obj).__name__}.")


def render(obj: Any, path: str | None, subtree_renderer: Callable[..., Any]) -> Any:
    """``__treescope_repr__`` of idesign's classes: the constructor with a summary comment."""
    from treescope import rendering_parts, repr_lib
    body = repr_lib.render_object_constructor(type(obj), _fields(obj), path, subtree_renderer, roundtrippable=True)
    comment = rendering_parts.comment_color(rendering_parts.text("  # " + summary(obj)))
    return rendering_parts.siblings_with_annotations(body, extra_annotations=[comment])


T = TypeVar("T", bound=type)


def rendered(cls: T) -> T:
    """Class decorator: treescope renders instances with :func:`render` (constructor + :func:`summary`).

    >>> from typing import NamedTuple
    >>> @rendered
    ... class Pair(NamedTuple):
    ...     a: int
    >>> Pair.__treescope_repr__ is render
    True
    """
    cls.__treescope_repr__ = render
    return cls


@dataclasses.dataclass(frozen=True)
class MaskView:
    """A mask wrapped for display: ``treescope.show(mask_view(mask))`` or the notebook's repr.

    Every leaf carries a comment with its frozen (selected) count and fraction; the whole view carries
    the total. Compact leaves (``(1, d_out)`` column flags) count as the elements they stand for, which
    needs ``params`` only for whole-leaf ``bool`` leaves (as :func:`idesign.masks.size_report`).
    """

    mask: Any
    params: Any = None

    def _report(self):
        from idesign.masks import size_report
        return size_report(self.mask, self.params)

    def summary(self) -> str:
        r = self._report()
        return f"frozen {r.selected:,} of {r.total:,} elements ({r.fraction:.2%})"

    def leaf_summaries(self) -> dict[str, str]:
        """``{leaf path: 'frozen s of t (f%)'}``, per parameter leaf."""
        from idesign.masks import size_report
        params = None if self.params is None else _named(self.params)
        out = {}
        for path, leaf in _named(self.mask).items():
            r = size_report({"x": leaf}, None if params is None else {"x": params[path]})
            out[path] = f"frozen {r.selected:,} of {r.total:,} ({r.fraction:.2%})"
        return out

    def __treescope_repr__(self, path: str | None, subtree_renderer: Callable[..., Any]) -> Any:
        from treescope import rendering_parts
        leaves = self.leaf_summaries()
        children = []
        for leaf_path, leaf in _named(self.mask).items():
            line = rendering_parts.siblings_with_annotations(
                f"{leaf_path!r}: ", subtree_renderer(leaf, path=None if path is None else f"{path}[{leaf_path!r}]"),
                extra_annotations=[rendering_parts.comment_color(rendering_parts.text("  # " + leaves[leaf_path]))])
            children.append(rendering_parts.build_full_line_with_annotations(line, ","))
        body = rendering_parts.build_foldable_tree_node_from_children(
            prefix=rendering_parts.text("mask_view({"), children=children, suffix=rendering_parts.text("})"),
            path=path)
        comment = rendering_parts.comment_color(rendering_parts.text("  # " + self.summary()))
        return rendering_parts.siblings_with_annotations(body, extra_annotations=[comment])

    def __repr__(self) -> str:
        lines = [f"mask_view: {self.summary()}"] + [f"  {p}: {s}" for p, s in self.leaf_summaries().items()]
        return "\n".join(lines)


def _named(mask: Any) -> Mapping[str, Any]:
    from idesign.tree import named_leaves
    return named_leaves(mask)


def mask_view(mask: Any, params: Any = None) -> MaskView:
    """Wraps a mask for display with its frozen fraction per leaf and in total (treescope or plain repr).

    >>> import numpy as np, jax.numpy as jnp, idesign as ids
    >>> params = {'w': jnp.zeros((2, 4)), 'b': jnp.zeros(4)}
    >>> print(ids.masks.view({'w': np.array([[True, False, False, False]]), 'b': True}, params))
    mask_view: frozen 6 of 12 elements (50.00%)
      b: frozen 4 of 4 (100.00%)
      w: frozen 2 of 8 (25.00%)
    """
    if params is not None:
        from idesign.masks import check
        check(params, mask)
    return MaskView(mask, params)
