"""Gradient-subspace projection: explicit projector matrices, properties, placement with AdamW,
function preservation, conflicting-gradient projection, bad input, and 8 simulated devices."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idesign as ids
from idesign import subspaces as sub
from idesign.optim import projection
from tests.conftest import run_with_8_devices

ROOT = Path(__file__).resolve().parents[2]
# one block keeps compilation short; everything tested here happens in blocks.0
ONE_BLOCK = ids.TransformerConfig(vocab_size=37, d_model=32, n_layers=1, n_heads=4, max_len=64)


def basis(seed: int, k: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T.astype(np.float32)


def run(transform, updates, params=None, **extra):
    params = updates if params is None else params
    out, _ = transform.update(updates, transform.init(params), params, **extra)
    return out


# --- against explicit projector matrices ---------------------------------------------------------

@pytest.mark.parametrize("onto", [False, True])
def test_each_side_matches_explicit_projectors(onto):
    rng = np.random.default_rng(0)
    g = {"in": rng.normal(size=(6, 5)), "out": rng.normal(size=(6, 5)), "both": rng.normal(size=(6, 5)),
         "flat": rng.normal(size=(3, 4)), "bias": rng.normal(size=(5,))}
    g = {k: v.astype(np.float32) for k, v in g.items()}
    u, v, f = basis(1, 2, 6), basis(2, 3, 5), basis(3, 4, 12)
    tree = {"in": sub.Subspace(u, "input"), "out": sub.Subspace(v, "output"),
            "both": (sub.Subspace(u, "input"), sub.Subspace(v, "output")), "flat": sub.Subspace(f, "flat"),
            "bias": None}
    t = projection.project_onto(tree) if onto else projection.project_out(tree)
    got = run(t, jax.tree_util.tree_map(jnp.asarray, g))
    pu, pv, pf = u.T @ u, v.T @ v, f.T @ f
    if not onto:
        pu, pv, pf = np.eye(6) - pu, np.eye(5) - pv, np.eye(12) - pf
    want = {"in": pu @ g["in"], "out": g["out"] @ pv, "both": pu @ g["both"] @ pv,
            "flat": (pf @ g["flat"].reshape(-1)).reshape(3, 4), "bias": g["bias"]}
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-5, err_msg=k)


def test_others_rule_by_pattern():
    g = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "ln": {"scale": jnp.ones(2)}}
    tree = {"w": sub.Subspace(jnp.eye(2)[:1]), "b": None, "ln": {"scale": None}}
    out = run(projection.project_out(tree, others="zero"), g)
    assert float(jnp.abs(out["b"]).sum()) == 0 and float(jnp.abs(out["ln"]["scale"]).sum()) == 0
    out = run(projection.project_out(tree, others={"ln.*": "zero"}), g)
    np.testing.assert_array_equal(out["b"], 1.0)
    np.testing.assert_array_equal(out["ln"]["scale"], 0.0)
    params = {"w": jnp.full((2, 2), 3.0)}
    zeroed = run(projection.project_out({"w": None}, others="zero"), {"w": jnp.ones((2, 2))}, params)
    np.testing.assert_array_equal(optax.apply_updates(params, zeroed)["w"], params["w"])  # bit for bit
    with pytest.raises(ValueError, match="rule must be one of"):
        projection.project_out(tree, others="freeze")


# --- properties (hypothesis) ---------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), side=st.sampled_from(["input", "output", "flat"]))
def test_projection_is_idempotent_orthogonal_and_complementary(seed, k, side):
    d_in, d_out = 5, 4
    dim = {"input": d_in, "output": d_out, "flat": d_in * d_out}[side]
    k = min(k, dim)
    s = sub.Subspace(basis(seed, k, dim), side)
    g = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(d_in, d_out)), jnp.float32)}
    out = projection.apply_projection(g, {"w": s})
    twice = projection.apply_projection(out, {"w": s})
    np.testing.assert_allclose(twice["w"], out["w"], atol=1e-5)
    b = s.basis
    inside = {"input": lambda w: b @ w, "output": lambda w: w @ b.T, "flat": lambda w: b @ w.reshape(-1)}[side](out["w"])
    assert float(jnp.abs(inside).max()) < 1e-5
    onto = projection.apply_projection(g, {"w": s}, onto=True)
    np.testing.assert_allclose(onto["w"] + out["w"], g["w"], atol=1e-5)


# --- placement with AdamW ------------------------------------------------------------------------

def _adamw_drift(optimizer, steps: int = 100):
    """Trains a [8, 6] kernel toward a random target; returns max |U ΔW_total| and max |U ΔW_step|."""
    rng = np.random.default_rng(0)
    u = basis(7, 3, 8)
    w0 = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    loss = lambda p: jnp.mean((x @ p["w"] - x @ target) ** 2)

    @jax.jit
    def step(p, s):
        upd, s = optimizer.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, upd), s, jnp.abs(u @ upd["w"]).max()

    p, s, worst = {"w": w0}, optimizer.init({"w": w0}), 0.0
    for _ in range(steps):
        p, s, m = step(p, s)
        worst = max(worst, float(m))
    return float(jnp.abs(u @ (p["w"] - w0)).max()), worst, float(jnp.abs(p["w"] - w0).max()), u


def test_projection_must_act_on_the_final_adamw_update():
    adamw = lambda: optax.adamw(1e-2, weight_decay=0.1)
    u = basis(7, 3, 8)
    tree = {"w": sub.Subspace(u)}
    naive = optax.chain(projection.project_out(tree), adamw())     # raw gradient, then Adam + decay
    wrapped = projection.projected(adamw(), tree)
    naive_total, naive_step, moved, _ = _adamw_drift(naive)
    total, per_step, moved_wrapped, _ = _adamw_drift(wrapped)
    assert moved > 0.1 and moved_wrapped > 0.1                       # both trained
    assert naive_total > 1e-2 and naive_step > 1e-4                  # not orthogonal
    assert total < 1e-5 and per_step < 1e-6                          # orthogonal to float32 tolerance
    # chaining project_out last is the same placement
    last = optax.chain(adamw(), projection.project_out(tree))
    assert _adamw_drift(last)[0] < 1e-5


def test_projected_forwards_extra_args_and_state_swaps_without_recompiling():
    seen = []

    def needs_extra():
        def update(updates, state, params=None, *, scale):
            seen.append(1)
            return jax.tree_util.tree_map(lambda g: g * scale, updates), state
        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    params = {"w": jnp.ones((2, 2))}
    opt = projection.projected(needs_extra(), {"w": sub.Subspace(jnp.eye(2)[:1])})
    step = jax.jit(lambda g, s: opt.update(g, s, params, scale=2.0))
    state = opt.init(params)
    out, _ = step(params, state)
    np.testing.assert_allclose(out["w"], [[0, 0], [2, 2]])
    new = optax.tree_utils.tree_set(state, subspaces={"w": sub.Subspace(jnp.eye(2)[1:])})
    out, _ = step(params, new)
    np.testing.assert_allclose(out["w"], [[2, 2], [0, 0]])
    assert len(seen) == 1  # one trace for both bases


# --- function preservation on the reference model ------------------------------------------------

def test_training_with_input_projection_preserves_outputs_inside_the_subspace():
    tiny_config = ONE_BLOCK
    apply, params = ids.init_transformer(tiny_config, seed=0)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, tiny_config.vocab_size, jnp.int32)
    _, cap = jax.jit(lambda p, t: apply(p, t, hooks=ids.capture("blocks.0.mlp.up.in")))(params, tokens)
    protected = sub.from_activations(cap["blocks.0.mlp.up.in"], rank=6)        # GPM's basis
    tree = projection.subspaces_for(params, {"blocks.0.mlp.up": protected}, dense_layers=apply.dense_layers)
    opt = projection.projected(optax.adamw(1e-2, weight_decay=0.1), tree,
                               others={"blocks.0.mlp.up.bias": "zero"})
    step = ids.make_train_step(ids.lm_loss(apply), opt)
    state = ids.init_train_state(params, opt)
    for i in range(10):
        batch = {"tokens": jax.random.randint(jax.random.key(i + 1), (8, 16), 0, tiny_config.vocab_size, jnp.int32)}
        state, _ = step(state, batch)
    x = jax.random.normal(jax.random.key(9), (50, protected.rank)) @ protected.basis   # inputs inside span(U)
    layer = lambda p: x @ p["blocks"][0]["mlp"]["up"]["kernel"] + p["blocks"][0]["mlp"]["up"]["bias"]
    before, after = layer(params), layer(state.params)
    assert float(jnp.abs(after - before).max()) < 1e-4 * float(jnp.abs(before).max())
    kernel_moved = float(jnp.abs(state.params["blocks"][0]["mlp"]["up"]["kernel"]
                                 - params["blocks"][0]["mlp"]["up"]["kernel"]).max())
    assert kernel_moved > 1e-3                                                  # the layer did train
    y = jax.random.normal(jax.random.key(10), (50, tiny_config.d_model))       # generic inputs do change
    assert float(jnp.abs((y @ state.params["blocks"][0]["mlp"]["up"]["kernel"])
                         - (y @ params["blocks"][0]["mlp"]["up"]["kernel"])).max()) > 1e-3


def test_tied_unembedding_projects_the_embedding_tables_model_axis(tiny_config):
    apply, params = ids.init_transformer(tiny_config, seed=0)
    u = sub.Subspace(basis(0, 4, tiny_config.d_model))
    tree = projection.subspaces_for(params, {"unembed": u}, dense_layers=apply.dense_layers)
    assert tree["embed"]["embedding"].side == "output"
    g = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
    out = projection.apply_projection(g, tree)
    assert float(jnp.abs(out["embed"]["embedding"] @ u.basis.T).max()) < 1e-5


# --- conflicting gradients -----------------------------------------------------------------------

def test_project_conflicting_modes_scopes_and_signs():
    g = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 1.0])}
    h = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([1.0, 0.0])}
    dot = lambda x, y: sum(float(jnp.vdot(x[k], y[k])) for k in x)
    leaf = run(projection.project_conflicting("pcgrad"), g, protected_grads=h)
    np.testing.assert_allclose(leaf["a"], [0.5, 0.5])                  # conflicting leaf: projected
    np.testing.assert_allclose(leaf["b"], [1.0, 1.0])                  # agreeing leaf: untouched
    orth = run(projection.project_conflicting("orthogonal"), g, protected_grads=h)
    assert abs(float(jnp.vdot(orth["b"], h["b"]))) < 1e-6
    glob = run(projection.project_conflicting("pcgrad", scope="global"), g, protected_grads=h)
    np.testing.assert_allclose(glob["a"], g["a"])                      # global dot is 0: no conflict
    h2 = {"a": jnp.array([-1.0, 0.0]), "b": jnp.array([-1.0, 0.0])}
    glob = run(projection.project_conflicting("pcgrad", scope="global"), g, protected_grads=h2)
    assert abs(dot(glob, h2)) < 1e-6
    # on final updates (u = -lr g) a conflict is <u, h> > 0
    u = jax.tree_util.tree_map(lambda x: -0.1 * x, g)
    upd = run(projection.project_conflicting("pcgrad", inputs="updates"), u, protected_grads=h)
    np.testing.assert_allclose(upd["a"], -0.1 * leaf["a"], atol=1e-7)
    zero = run(projection.project_conflicting("orthogonal"), g, protected_grads=jax.tree_util.tree_map(jnp.zeros_like, g))
    np.testing.assert_allclose(zero["a"], g["a"])
    with pytest.raises(TypeError, match="protected_grads="):
        run(projection.project_conflicting(), g)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        run(projection.project_conflicting(), g, protected_grads={"a": h["a"]})


def test_project_conflicting_through_make_train_step_keeps_the_protected_loss_flat():
    """The step forwards ``protected_grads=`` to the transform; the step is orthogonal to it."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "b": jnp.zeros(3)}
    x, y = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32), jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def loss(p, batch):
        value = jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
        return value, {"loss": value}

    keep = {"x": x[:8], "y": -y[:8]}
    protected_grads = jax.grad(lambda p: loss(p, keep)[0])(params)
    lr = 1e-2
    opt = optax.chain(optax.sgd(lr), projection.project_conflicting("orthogonal", scope="global", inputs="updates"))
    step = ids.make_train_step(loss, opt)
    state, _ = step(ids.init_train_state(params, opt), {"x": x[8:], "y": y[8:]}, protected_grads=protected_grads)
    delta = jax.tree_util.tree_map(lambda a, b: a - b, state.params, params)
    first_order = sum(float(jnp.vdot(d, h)) for d, h in zip(jax.tree_util.tree_leaves(delta),
                                                              jax.tree_util.tree_leaves(protected_grads)))
    assert float(optax.tree.norm(delta)) > 1e-3
    assert abs(first_order) < 1e-5 * lr * float(optax.tree.norm(protected_grads)) ** 2 + 1e-7


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_names_the_path_and_shapes(tiny_config):
    apply, params = ids.init_transformer(tiny_config, seed=0)
    wrong = sub.Subspace(basis(0, 2, 128))
    with pytest.raises(ValueError, match=r"subspace for blocks.0.mlp.up.kernel: basis has shape \(2, 128\).*"
                                         r"parameter has shape \(32, 128\).*needs a basis \[k, 32\]"):
        projection.subspaces_for(params, {"blocks.0.mlp.up": wrong}, dense_layers=apply.dense_layers)
    tree = projection.subspaces_for(params, {"blocks.0.mlp.up": wrong.with_side("output")},
                                    dense_layers=apply.dense_layers)
    del tree["blocks"][1]["mlp"]["up"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.up.bias', 'blocks.1.mlp.up.kernel'\]"):
        projection.projected(optax.adamw(1e-3), tree).init(params)
    with pytest.raises(KeyError, match="unknown parameter path or dense layer 'blocks.0.mlp.upp'"):
        projection.subspaces_for(params, {"blocks.0.mlp.upp": wrong}, dense_layers=apply.dense_layers)
    u = sub.Subspace(basis(0, 2, 32))
    with pytest.raises(ValueError, match="more than one subspace on side"):
        projection.subspaces_for(params, {"blocks.0.mlp.up": u, "blocks.0.mlp.up.kernel": u},
                                 dense_layers=apply.dense_layers)
    with pytest.raises(TypeError, match="leaf w is ndarray"):
        projection.check_subspaces({"w": np.eye(2)}, {"w": jnp.zeros((2, 2))})


# --- 8 simulated devices -------------------------------------------------------------------------

def test_projection_on_8_simulated_devices_matches_one_device():
    report = run_with_8_devices("tests._sharded_projection_checks")
    assert report["kernel_spec"] == "P(None, 'model')"
    assert report["param_max_diff"] < 1e-5
    assert report["orthogonality_8"] < 1e-5
    assert report["updated_kernel_spec"] == "P(None, 'model')"


def test_a_donating_train_step_leaves_the_callers_subspaces_alive():
    params = {"w": jnp.ones((3, 2))}
    u = sub.Subspace(jnp.eye(3)[:1])
    opt = projection.projected(optax.sgd(0.1), {"w": u})
    step = ids.make_train_step(lambda p, b: ((p["w"] ** 2).sum(), {}), opt, donate=True)
    state, _ = step(ids.init_train_state(jax.tree_util.tree_map(jnp.copy, params), opt), {})
    np.testing.assert_array_equal(u.basis, np.eye(3)[:1])  # not deleted by the donation
    np.testing.assert_array_equal(state.params["w"][0], 1.0)
