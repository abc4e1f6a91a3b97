"""treescope renderings (idesign/_treescope.py): every pytree class renders with its summary; treescope stays optional."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import _treescope

treescope = pytest.importorskip("treescope", reason="treescope is the optional `notebook` extra")


def _objects():
    key = jax.random.key(0)
    return {
        "capture": (ids.Capture(), "records the site's activation"),
        "add": (ids.Add(jnp.array([3.0, 4.0]), scale=2.0), "|direction| = 5"),
        "ablate": (ids.Ablate(jnp.eye(6)[:2]), "rank-2 subspace of a 6-dim site"),
        "replace": (ids.Replace(jnp.zeros(4), jnp.array([True, False, False, False])), "25.0% of its entries"),
        "route": (ids.Route(jnp.array([1.0, 0.0])), "50.0% of its entries"),
        "apply": (ids.Apply(jnp.tanh), "applies tanh"),
        "subspace": (ids.subspaces.Subspace(jnp.eye(5)[:3], side="output"), "rank 3 of 5 (output side)"),
        "logistic": (ids.probes.LogisticProbe(jnp.ones(7), jnp.zeros(()), jnp.zeros(7), jnp.ones(7)),
                     "binary, on 7 standardised features"),
        "softmax": (ids.probes.SoftmaxProbe(jnp.ones((7, 3)), jnp.zeros(3), jnp.zeros(7), jnp.ones(7)),
                    "3 classes, on 7 standardised"),
        "mass_mean": (ids.probes.MassMeanProbe(jnp.ones(4), jnp.zeros(())), "direction probe on 4 raw features"),
        "attention": (ids.probes.init_attention_probe(key, 8, n_heads=2), "2 heads on 8 features, binary"),
    }


@pytest.mark.parametrize("name", list(_objects()))
def test_every_pytree_class_renders_with_its_summary(name):
    obj, expected = _objects()[name]
    text = treescope.render_to_text(obj)
    assert text.startswith(type(obj).__name__ + "(") and expected in text, text
    assert treescope.render_to_html(obj)            # the notebook path renders too
    # nested in a hooks dict, each entry keeps its comment (a field-less Capture collapses to one line, without it)
    if name != "capture":
        assert expected in treescope.render_to_text({"blocks.0.resid_post": obj})


def test_stacked_probes_say_so():
    acts = np.random.default_rng(0).normal(size=(2, 40, 3)).astype(np.float32)
    stack = ids.probes.fit_many(acts, (acts[0, :, 0] > 0).astype(np.int32))
    assert "stacked (2,)" in treescope.render_to_text(stack)


def test_mask_view_shows_frozen_fraction_per_leaf_and_total():
    params = {"attn": {"kernel": jnp.zeros((2, 4)), "bias": jnp.zeros(4)}, "ln": {"scale": jnp.zeros(4)}}
    mask = {"attn": {"kernel": np.array([[True, False, False, False]]), "bias": True}, "ln": {"scale": False}}
    view = ids.masks.view(mask, params)
    text = treescope.render_to_text(view)
    assert "'attn.kernel': np.array([[ True, False, False, False]]),  # frozen 2 of 8 (25.00%)" in text
    assert "'attn.bias': True,  # frozen 4 of 4 (100.00%)" in text
    assert "'ln.scale': False,  # frozen 0 of 4 (0.00%)" in text
    assert text.rstrip().endswith("# frozen 6 of 16 elements (37.50%)")
    assert view.summary() == "frozen 6 of 16 elements (37.50%)"
    assert treescope.render_to_html(view)
    # the fraction agrees with masks.size_report, compact leaves counted as the elements they stand for
    assert ids.masks.size_report(mask, params).fraction == 6 / 16
    with pytest.raises(ValueError):
        ids.masks.view({"attn": {"kernel": np.ones((3, 3), bool), "bias": True}, "ln": {"scale": False}}, params)


def test_no_idesign_module_imports_treescope_at_import_time():
    # flax.nnx itself imports treescope today, so it is installed wherever idesign is; idesign still keeps it
    # optional (the `notebook` extra): only function bodies import it, so a flax without it would not break us.
    root = Path(ids.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "treescope" for n in names), f"{path} imports treescope at module level"
    assert _treescope.summary(ids.Capture()) == "records the site's activation"
    assert "frozen 1 of 2 elements (50.00%)" in repr(ids.masks.view({"w": np.array([True, False])}))  # no treescope
