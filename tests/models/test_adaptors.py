"""Adaptors from NNX and Linen modules to ``apply(params, x, hooks=...) -> (out, captured)``.

Every hooked forward pass is checked against a hand-written jnp recomputation of the same model
from its parameter dict, with the intervention applied by hand at the same activation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idesign.hooks import Ablate, Add, Capture, Replace, Route
from idesign.models.adaptors import LinenApply, NNXApply, from_linen, from_nnx

D_IN, D_HID, D_OUT = 4, 8, 2
X = jax.random.normal(jax.random.key(1), (2, 3, D_IN))


# --------------------------------------------------------------------------- one MLP, two APIs


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.l2 = nnx.Linear(D_HID, D_HID, rngs=rngs)
        self.l3 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.l3(nnx.relu(self.l2(h)))


class LinenMLP(nn.Module):
    def setup(self):
        self.l1 = nn.Dense(D_HID)
        self.l2 = nn.Dense(D_HID)
        self.l3 = nn.Dense(D_OUT)

    def __call__(self, x):
        h = nn.relu(self.l1(x))
        self.sow("intermediates", "hidden", h)
        return self.l3(nn.relu(self.l2(h)))


MLP_SITES = ("in", "l1.in", "l1.out", "l2.in", "l2.out", "l3.in", "l3.out", "out")


def manual_mlp(params, x, edits=None):
    """The MLP by hand; ``edits[site](h)`` replaces the activation at ``site``."""
    edits = edits or {}
    acts = {}

    def at(site, h):
        acts[site] = edits.get(site, lambda v: v)(h)
        return acts[site]

    def dense(name, h):
        h = at(f"{name}.in", h)
        return at(f"{name}.out", h @ params[name]["kernel"] + params[name]["bias"])

    h = jax.nn.relu(dense("l1", at("in", x)))
    acts["hidden"] = h
    out = at("out", dense("l3", jax.nn.relu(dense("l2", h))))
    return out, acts


def make_mlp(kind: str):
    if kind == "nnx":
        return from_nnx(NNXMLP(nnx.Rngs(0)), X)
    params = LinenMLP().init(jax.random.key(0), X)["params"]
    return from_linen(LinenMLP(), params, X), params


@pytest.fixture(scope="module", params=["nnx", "linen"])
def mlp(request):
    return make_mlp(request.param)


def unit(v):
    return v / jnp.linalg.norm(v)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- shared behaviour


def test_site_names_in_execution_order(mlp):
    apply, _ = mlp
    if isinstance(apply, LinenApply):  # Linen reports sown values after the forward pass
        assert apply.site_names == (*MLP_SITES, "hidden")
    else:
        assert apply.site_names == (*MLP_SITES[:3], "hidden", *MLP_SITES[3:])
    assert apply.site_shapes["l2.out"].shape == (2, 3, D_HID)


def test_no_hooks_matches_manual_forward(mlp):
    apply, params = mlp
    out, captured = apply(params, X)
    close(out, manual_mlp(params, X)[0])
    assert captured == {}


def test_capture_in_out_and_sown_equal_manual_activations(mlp):
    apply, params = mlp
    _, acts = manual_mlp(params, X)
    _, captured = apply(params, X, hooks={s: Capture() for s in apply.site_names})
    assert set(captured) == set(apply.site_names)
    for site in apply.site_names:
        close(captured[site], acts[site])


def test_add_changes_output_as_manual_recomputation(mlp):
    apply, params = mlp
    direction = jax.random.normal(jax.random.key(2), (D_HID,))
    out, captured = apply(params, X, hooks={"l2.out": (Add(direction, 3.0), Capture())})
    want, acts = manual_mlp(params, X, {"l2.out": lambda h: h + 3.0 * direction})
    close(out, want)
    close(captured["l2.out"], acts["l2.out"])
    assert not np.allclose(out, manual_mlp(params, X)[0])


def test_ablate_removes_the_subspace(mlp):
    apply, params = mlp
    basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (D_HID, 2)))
    basis = basis.T  # [2, D_HID], orthonormal rows
    out, captured = apply(params, X, hooks={"l1.out": (Ablate(basis), Capture())})
    want, _ = manual_mlp(params, X, {"l1.out": lambda h: h - (h @ basis.T) @ basis})
    close(out, want)
    close(captured["l1.out"] @ basis.T, jnp.zeros((2, 3, 2)))


def test_replace_with_mask_patches_chosen_positions(mlp):
    apply, params = mlp
    value = jnp.full((2, 3, D_HID), 7.0)
    mask = jnp.array([True, False, True])[None, :, None]  # positions 0 and 2
    out, _ = apply(params, X, hooks={"l2.in": Replace(value, mask)})
    want, _ = manual_mlp(params, X, {"l2.in": lambda h: jnp.where(mask, value, h)})
    close(out, want)


def test_route_keeps_forward_and_blocks_upstream_gradients(mlp):
    apply, params = mlp

    def loss(p, hooks=None, x=X):
        return jnp.sum(apply(p, x, hooks=hooks)[0] ** 2)

    grad = jax.jit(jax.grad(loss))
    zeros = {"l2.out": Route(jnp.zeros(D_HID))}
    close(apply(params, X, hooks=zeros)[0], apply(params, X)[0])
    g_plain, g_routed = grad(params), grad(params, zeros)
    for name in ("l1", "l2"):
        for leaf in jax.tree.leaves(g_routed[name]):
            assert np.all(np.asarray(leaf) == 0)
    close(g_routed["l3"]["kernel"], g_plain["l3"]["kernel"])

    # Per-example routing: upstream layers learn only from example 0.
    per_example = {"l2.out": Route(jnp.array([1.0, 0.0])[:, None, None])}
    g = grad(params, per_example)
    g0 = jax.jit(jax.grad(lambda p: loss(p, x=X[:1])))(params)
    close(g["l1"]["kernel"], g0["l1"]["kernel"])
    close(g["l3"]["kernel"], g_plain["l3"]["kernel"])


def test_glob_patterns_expand_to_all_matching_sites(mlp):
    apply, params = mlp
    _, captured = apply(params, X, hooks={"*.out": Capture()})
    assert sorted(captured) == ["l1.out", "l2.out", "l3.out"]
    direction = jnp.ones(D_HID)
    out, _ = apply(params, X, hooks={"l[12].out": Add(direction)})
    want, _ = manual_mlp(params, X, {s: (lambda h: h + direction) for s in ("l1.out", "l2.out")})
    close(out, want)


def test_unknown_site_raises_key_error_naming_it(mlp):
    apply, params = mlp
    with pytest.raises(KeyError, match=r"l2\.outt.*l2\.out"):
        apply(params, X, hooks={"l2.outt": Capture()})


def test_wrong_shape_add_names_site_and_both_shapes(mlp):
    apply, params = mlp
    with pytest.raises(ValueError, match=r"'l2\.out'.*\(5,\).*\(2, 3, 8\)"):
        apply(params, X, hooks={"l2.out": Add(jnp.ones(5))})


def test_sown_values_are_read_only(mlp):
    apply, params = mlp
    with pytest.raises(ValueError, match=r"'hidden' is a sown value"):
        apply(params, X, hooks={"hidden": Add(jnp.ones(D_HID))})


def test_changing_intervention_arrays_does_not_retrace(mlp):
    apply, params = mlp
    traces = 0

    @jax.jit
    def steered(params, x, hooks):
        nonlocal traces
        traces += 1
        return apply(params, x, hooks=hooks)

    d1, d2 = jax.random.normal(jax.random.key(4), (2, D_HID))
    out1, cap1 = steered(params, X, {"l2.out": (Add(d1, 1.0), Capture())})
    out2, cap2 = steered(params, X, {"l2.out": (Add(d2, 2.0), Capture())})
    assert traces == 1
    close(out2, manual_mlp(params, X, {"l2.out": lambda h: h + 2.0 * d2})[0])
    close(cap1["l2.out"], manual_mlp(params, X, {"l2.out": lambda h: h + d1})[1]["l2.out"])


def test_jit_of_apply_itself(mlp):
    apply, params = mlp
    hooks = {"l1.out": Add(jnp.ones(D_HID)), "l3.in": Capture()}
    out, captured = jax.jit(apply)(params, X, hooks=hooks)
    want, acts = manual_mlp(params, X, {"l1.out": lambda h: h + 1.0})
    close(out, want)
    close(captured["l3.in"], acts["l3.in"])
    assert hash(apply) == hash(apply)


def test_params_must_match_the_model(mlp):
    apply, params = mlp
    bad = {**params, "l1": {**params["l1"], "kernel": jnp.ones((3, D_HID))}}
    with pytest.raises(ValueError, match=r"'l1\.kernel' has shape \(3, 8\).*\(4, 8\)"):
        apply(bad, X)
    with pytest.raises(ValueError, match=r"missing \['l3\.bias'\]"):
        apply({**params, "l3": {"kernel": params["l3"]["kernel"]}}, X)


# --------------------------------------------------------------------------- NNX specifics


class Counter(nnx.Variable):
    pass


class Attention(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        scores = self.q(x) @ self.k(x).swapaxes(-1, -2) / jnp.sqrt(x.shape[-1])
        pattern = jax.nn.softmax(scores, axis=-1)
        self.sow(nnx.Intermediate, "pattern", pattern)
        return self.o(self.perturb("mix", pattern @ self.v(x)))


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.attn = Attention(d, rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(nnx.gelu(self.up(x)))


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(D_IN, rngs) for _ in range(2)])
        self.head = nnx.Linear(D_IN, D_OUT, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1  # non-Param state written in the forward pass
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def manual_tiny(p, x, edits=None):
    edits = edits or {}
    acts = {}

    def at(site, h):
        acts[site] = edits.get(site, lambda v: v)(h)
        return acts[site]

    def lin(q, h):
        return h @ q["kernel"] + q["bias"]

    for i in range(2):
        b = p["layers"][i]
        x = at(f"layers.{i}.in", x)
        a = b["attn"]
        pattern = jax.nn.softmax(lin(a["q"], x) @ lin(a["k"], x).swapaxes(-1, -2) / 2.0, axis=-1)
        acts[f"layers.{i}.attn.pattern"] = pattern
        mix = at(f"layers.{i}.attn.mix", pattern @ lin(a["v"], x))
        x = x + at(f"layers.{i}.attn.out", lin(a["o"], mix))
        up = at(f"layers.{i}.up.out", lin(b["up"], x))
        x = at(f"layers.{i}.out", x + lin(b["down"], jax.nn.gelu(up)))
    return lin(p["head"], x), acts


@pytest.fixture(scope="module")
def tiny():
    return from_nnx(Tiny(nnx.Rngs(0)), X)


def test_nnx_site_names_and_params_layout(tiny):
    apply, params = tiny
    assert isinstance(apply, NNXApply)
    assert sorted(params["layers"]) == [0, 1]
    names = apply.site_names
    assert names[0] == "in" and names[-1] == "out"
    for site in ("layers.0.in", "layers.1.attn.q.out", "layers.0.attn.pattern",
                 "layers.0.attn.mix", "layers.1.up.out", "head.out"):
        assert site in names
    assert names.index("layers.0.out") < names.index("layers.1.in")
    assert apply.site_shapes["layers.0.attn.pattern"].shape == (2, 3, 3)


def test_nnx_attention_captures_and_steering_match_manual(tiny):
    apply, params = tiny
    sites = ["layers.0.attn.pattern", "layers.1.attn.mix", "layers.0.up.out", "layers.1.out"]
    _, acts = manual_tiny(params, X)
    _, captured = apply(params, X, hooks={s: Capture() for s in sites})
    for s in sites:
        close(captured[s], acts[s])

    d = unit(jnp.arange(1.0, D_IN + 1))
    out, _ = apply(params, X, hooks={"layers.0.out": Add(d, 2.0)})
    close(out, manual_tiny(params, X, {"layers.0.out": lambda h: h + 2.0 * d})[0])


def test_nnx_perturb_values_take_every_intervention(tiny):
    apply, params = tiny
    basis = unit(jnp.ones(D_IN))[None]
    out, captured = apply(params, X, hooks={"layers.1.attn.mix": (Ablate(basis), Capture())})
    edit = {"layers.1.attn.mix": lambda h: h - (h @ basis.T) @ basis}
    want, acts = manual_tiny(params, X, edit)
    close(out, want)
    close(captured["layers.1.attn.mix"], acts["layers.1.attn.mix"])


def test_nnx_caller_module_is_untouched():
    model = Tiny(nnx.Rngs(0))
    apply, params = from_nnx(model, X)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    classes = {path: type(m) for path, m in nnx.iter_modules(model)}
    hooks = {"*.out": Capture(), "layers.0.out": (Add(jnp.ones(D_IN)), Capture())}
    out1, _ = apply(params, X, hooks=hooks)
    out2, _ = jax.jit(apply)(params, X, hooks=hooks)
    routed = {"layers.0.out": Route(jnp.zeros(D_IN))}
    jax.jit(jax.grad(lambda p: apply(p, X, hooks=routed)[0].sum()))(params)
    close(out1, out2)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(model.calls.get_value()) == 0
    assert {path: type(m) for path, m in nnx.iter_modules(model)} == classes
    assert type(model.layers[0].attn) is Attention
    out, sown = nnx.capture(model, nnx.Intermediate)(X)  # the caller's model still runs, unhooked
    close(out, apply(params, X)[0])
    assert "pattern" in sown["layers"][0]["attn"]
    assert int(model.calls.get_value()) == 1


def test_nnx_apply_uses_the_params_it_is_given(tiny):
    apply, params = tiny
    doubled = jax.tree.map(lambda w: 2 * w, params)
    close(apply(doubled, X)[0], manual_tiny(doubled, X)[0])
    close(apply(nnx.state(Tiny(nnx.Rngs(0)), nnx.Param), X)[0], manual_tiny(params, X)[0])


def test_nnx_other_method_and_tuple_outputs():
    class TwoHeads(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(D_IN, 2, rngs=rngs)
            self.b = nnx.Linear(D_IN, 3, rngs=rngs)

        def both(self, x):
            return self.a(x), {"b": self.b(x)}

    apply, params = from_nnx(TwoHeads(nnx.Rngs(0)), X, method="both")
    assert apply.site_names == ("in", "a.in", "a.out", "b.in", "b.out", "out.0", "out.1.b")
    (ya, yb), captured = apply(params, X, hooks={"out.1.b": (Add(jnp.ones(3)), Capture())})
    close(yb["b"], X @ params["b"]["kernel"] + params["b"]["bias"] + 1.0)
    close(captured["out.1.b"], yb["b"])


# --------------------------------------------------------------------------- Linen specifics


class Encoder(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(D_HID), nn.Dense(D_HID)]

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        self.sow("intermediates", "last", x)
        return x


class Seq(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT)(Encoder(name="encoder")(x))


def test_linen_nested_paths_match_capture_intermediates():
    params = Seq().init(jax.random.key(0), X)["params"]
    apply = from_linen(Seq(), params, X)
    assert apply.site_names == (
        "in", "encoder.in", "encoder.layers_0.in", "encoder.layers_0.out", "encoder.layers_1.in",
        "encoder.layers_1.out", "encoder.out", "Dense_0.in", "Dense_0.out", "out",
        "encoder.last")
    out, captured = apply(params, X, hooks={"*.out": Capture(), "encoder.last": Capture()})
    ref_out, state = Seq().apply({"params": params}, X, capture_intermediates=True,
                                 mutable=["intermediates"])
    ref = state["intermediates"]
    close(out, ref_out)
    close(captured["encoder.layers_1.out"], ref["encoder"]["layers_1"]["__call__"][0])
    close(captured["Dense_0.out"], ref["Dense_0"]["__call__"][0])
    close(captured["encoder.last"], ref["encoder"]["last"][0])


def test_linen_params_wrapped_in_collection_get_a_hint():
    apply, params = make_mlp("linen")
    with pytest.raises(ValueError, match="not {'params': ...}"):
        apply({"params": params}, X)


def test_linen_other_collections_and_rngs():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(D_HID)(x))
            return nn.Dropout(0.5, deterministic=not train)(x)

    variables = Net().init(jax.random.key(0), X, train=False)
    apply = from_linen(Net(), variables["params"], X, train=False,
                       other_collections={"batch_stats": variables["batch_stats"]})
    assert "BatchNorm_0.out" in apply.site_names and "Dropout_0.out" in apply.site_names
    out, captured = apply(variables["params"], X, train=True, rngs={"dropout": jax.random.key(5)},
                          hooks={"BatchNorm_0.out": Capture()})
    dropped = np.asarray(out) == 0
    assert dropped.any() and not dropped.all()
    close(np.where(dropped, 0.0, 2.0 * captured["BatchNorm_0.out"]), out)


def test_capture_inside_a_model_applied_transform_raises_but_interventions_work():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(D_IN)(x)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=2)()(x, None)
            return x

    params = Scanned().init(jax.random.key(0), X)["params"]
    apply = from_linen(Scanned(), params, X)
    site = "ScanLayer_0.Dense_0.out"
    assert site in apply.site_names
    steered, _ = apply(params, X, hooks={site: Add(jnp.ones(D_IN))})
    assert not np.allclose(steered, apply(params, X)[0])
    with pytest.raises(ValueError, match=r"Capture at site 'ScanLayer_0\.Dense_0\.out'.*inside"):
        apply(params, X, hooks={site: Capture()})
    _, captured = apply(params, X, hooks={"out": Capture()})  # the enclosing sites still capture
    assert captured["out"].shape == X.shape
