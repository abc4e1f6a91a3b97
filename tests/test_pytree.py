"""The one pytree-class pattern (idesign/_pytree.py) and the classes ported to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import subspaces as sub
from idesign._pytree import Static, pytree_class, static
from idesign.optim import Concepts
from idesign.shaping import TrainingHooks


@pytree_class
class _Checked:
    x: jax.Array
    tag: str = static(default="a")

    def __post_init__(self):
        if jnp.ndim(self.x) != 1:
            raise ValueError("x must be 1-D")


def test_checks_run_at_construction_not_at_unflatten():
    with pytest.raises(ValueError, match="1-D"):
        _Checked(jnp.ones((2, 2)))
    obj = _Checked(jnp.ones(3))
    rebuilt = jax.tree_util.tree_map(lambda _: None, obj)  # a placeholder that would fail the check
    assert rebuilt.x is None and rebuilt.tag == "a"
    with pytest.raises(AttributeError):
        obj.x = jnp.zeros(3)  # type: ignore[misc]


def test_leaves_are_traced_and_static_fields_recompile():
    traces = []

    @jax.jit
    def f(o):
        traces.append(o.tag)
        return o.x.sum()

    f(_Checked(jnp.ones(3)))
    f(_Checked(jnp.zeros(3)))
    assert traces == ["a"]
    f(_Checked(jnp.ones(3), tag="b"))
    assert traces == ["a", "b"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(_Checked(jnp.ones(2)))[0]]
    assert paths == [".x"]


def _steer(batch):
    return {"y": ids.Add(batch["v"])}


@pytest.mark.parametrize("make", [
    lambda: sub.Subspace(jnp.eye(4)[:2], "output"),
    lambda: ids.Ablate(jnp.eye(4)[:1]),
    lambda: Concepts({"w": ("a", "b")}, {"w": jnp.eye(4)[:2]}),
    lambda: TrainingHooks(({"x": ids.Add(jnp.ones(4))}, _steer)),  # the same function: no recompilation
])
def test_ported_classes_round_trip_through_jit_without_recompiling(make):
    traces = []

    @jax.jit
    def f(o):
        traces.append(1)
        return jax.tree_util.tree_map(lambda x: x * 1, o)

    a, b = make(), make()
    out = f(a)
    f(b)
    assert type(out) is type(a) and len(traces) == 1
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(a)):
        np.testing.assert_array_equal(x, y)


def test_static_holds_a_function_by_value():
    fn = lambda batch: {}  # noqa: E731
    assert Static(fn) == Static(fn) and hash(Static(fn)) == hash(Static(fn))
    assert jax.tree_util.tree_leaves(Static(fn)) == []
    th = TrainingHooks(fn)
    assert th.resolve({}) == {}
