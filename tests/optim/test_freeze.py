"""Element-level freezing: bit-exact frozen elements, no state for frozen leaves, placement-proof wrapper."""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import idesign.circuits as circuits
import idesign.optim as optim
from idesign import masks
from tests.conftest import run_with_8_devices, build

ROOT = Path(__file__).resolve().parents[2]
STEPS = 200


def bits(x):
    """The raw bits of a float32 array: equality here means bit-identical (-0.0 differs from +0.0)."""
    return np.asarray(x, np.float32).view(np.uint32)


def schedule_adamw():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=20, decay_steps=STEPS, end_value=0.005)
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=0.1))


def loss(params, targets):
    # Couples every element (through the squared total) so freezing one leaf changes the others' gradients.
    leaves, target_leaves = jax.tree.leaves(params), jax.tree.leaves(targets)
    fit = sum(((p - t) ** 2).sum() for p, t in zip(leaves, target_leaves))
    return fit + 0.01 * sum(p.sum() for p in leaves) ** 2


@functools.partial(jax.jit, static_argnames=("kinds",))
def train_three_ways(params, targets, partial_masks, kinds):
    """200 steps under three placements of the same freezing; ``kinds`` marks leaves frozen entirely (True),
    trained entirely (False) or element-wise (None, mask from ``partial_masks``)."""
    mask = [k if k is not None else m for k, m in zip(kinds, partial_masks)]
    opts = {
        "chained": optax.chain(schedule_adamw(), optim.freeze(mask)),
        "wrapped": optim.frozen(schedule_adamw(), freeze_mask=mask),
        "reference": optax.chain(optim.freeze(mask), schedule_adamw(), optim.freeze(mask)),
    }
    out = {}
    for name, opt in opts.items():
        def step(_, carry, opt=opt):
            p, s = carry
            updates, s = opt.update(jax.grad(loss)(p, targets), s, p)
            return optax.apply_updates(p, updates), s
        out[name] = jax.lax.fori_loop(0, STEPS, step, (params, opt.init(params)))[0]
    return out


SHAPES = [(3,), (4, 5), (2, 3, 4), (7, 1), (1,)]


@st.composite
def frozen_problems(draw):
    n = draw(st.integers(1, 3))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
    kinds = tuple(draw(st.sampled_from([True, False, None, None])) for _ in range(n))
    # Element masks of the full shape, or compact ones with size-1 axes that broadcast (as heads_mask makes).
    mask_shapes = [tuple(d if draw(st.booleans()) else 1 for d in s) for s in shapes]
    seed = draw(st.integers(0, 2**16))
    density = draw(st.floats(0.0, 1.0))
    return shapes, mask_shapes, kinds, seed, density


@settings(max_examples=15, deadline=None)
@given(frozen_problems())
def test_frozen_elements_stay_bit_identical_through_200_adamw_steps(problem):
    shapes, mask_shapes, kinds, seed, density = problem
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    for p in params:  # signed zeros are where a naive `+ 0.0` update would flip bits
        p[rng.random(p.shape) < 0.1] = -0.0
        p[rng.random(p.shape) < 0.05] = 0.0
    targets = [rng.normal(size=s).astype(np.float32) for s in shapes]
    partial = [rng.random(s) < density for s in mask_shapes]
    frozen = [np.full(s, k) if k is not None else np.broadcast_to(m, s) for s, k, m in zip(shapes, kinds, partial)]

    out = train_three_ways(params, targets, partial, kinds)
    for name, trained in out.items():
        for p0, p1, f in zip(params, trained, frozen):
            np.testing.assert_array_equal(bits(p1)[f], bits(p0)[f], err_msg=f"{name}: a frozen element moved")
            assert np.all(np.asarray(p1)[~f] != p0[~f]), f"{name}: a trainable element did not move"
    # The wrapper equals freezing both before and after the optimizer (it drops state, not behaviour).
    for a, b in zip(out["wrapped"], out["reference"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_wrapped_equals_chained_when_the_optimizer_is_elementwise():
    """Without a cross-element statistic (no global-norm clipping), zeroing gradients first changes nothing."""
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 6)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    targets = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    mask = {"a": rng.random((4, 6)) < 0.5, "b": True}
    adamw = optax.adamw(optax.cosine_decay_schedule(0.05, 50), weight_decay=0.1)

    @jax.jit
    def run(params):
        outs = []
        for opt in (optax.chain(adamw, optim.freeze(mask)), optim.frozen(adamw, freeze_mask=mask)):
            def step(_, carry, opt=opt):
                p, s = carry
                updates, s = opt.update(jax.grad(loss)(p, targets), s, p)
                return optax.apply_updates(p, updates), s
            outs.append(jax.lax.fori_loop(0, 50, step, (params, opt.init(params)))[0])
        return outs

    chained, wrapped = run(params)
    for path in ("a", "b"):
        frozen = np.broadcast_to(mask[path], params[path].shape)
        # Frozen elements: bit-identical to the start in both placements.
        np.testing.assert_array_equal(bits(chained[path])[frozen], bits(params[path])[frozen])
        np.testing.assert_array_equal(bits(wrapped[path])[frozen], bits(params[path])[frozen])
        # Trained elements: the same arithmetic, but XLA may fuse the two graphs differently (seen: 1 ulp
        # after 50 steps with optax 0.2.8), so equal to float32 rounding rather than bit for bit.
        np.testing.assert_allclose(chained[path], wrapped[path], rtol=1e-6, atol=1e-7)


def test_fully_frozen_leaves_keep_no_optimizer_state(tiny_config):
    _, params = build(tiny_config)
    mask = masks.union(circuits.paths_mask(params, ["embed.*", "pos_embed.*", "blocks.0.*"]),
                           circuits.heads_mask(params, tiny_config, [(1, 2)]))
    opt = optim.frozen(optax.adamw(1e-3), freeze_mask=mask)
    state = opt.init(params)
    assert isinstance(state, optim.FrozenState)
    adam_state = state.inner_state.inner_states["train"].inner_state[0]
    assert isinstance(adam_state.mu["embed"]["embedding"], optax.MaskedNode)
    assert isinstance(adam_state.nu["blocks"][0]["attn"]["q_proj"]["kernel"], optax.MaskedNode)
    assert adam_state.mu["blocks"][1]["attn"]["q_proj"]["kernel"].shape == (32, 32)  # partly frozen: keeps state

    fully_frozen = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                       if isinstance(m, bool) and m)
    savings = optim.frozen_state_savings(optax.adamw(1e-3), params, mask)
    assert savings["bytes_saved"] == 2 * 4 * fully_frozen          # Adam's mu and nu, float32
    assert savings["bytes_with"] == optim.opt_state_nbytes(state)
    assert savings["bytes_without"] == optim.opt_state_nbytes(optax.adamw(1e-3).init(params))
    assert 0.3 < savings["fraction_saved"] < 0.9


def test_train_mask_is_the_freeze_mask_complement():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(jnp.ones_like, params)
    keep = {"w": np.array([[True, False, True], [False, False, True]]), "b": False}
    by_train = optim.frozen(optax.sgd(1.0), train_mask=keep)
    by_freeze = optim.frozen(optax.sgd(1.0), freeze_mask=masks.complement(keep))
    a, _ = by_train.update(grads, by_train.init(params), params)
    b, _ = by_freeze.update(grads, by_freeze.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(bits(x), bits(y))
    np.testing.assert_array_equal(a["w"] != 0, keep["w"])
    np.testing.assert_array_equal(a["b"], 0.0)


@pytest.mark.parametrize("masks", [{}, {"freeze_mask": {"w": True}, "train_mask": {"w": False}}])
def test_frozen_needs_exactly_one_mask(masks):
    with pytest.raises(TypeError, match="exactly one of freeze_mask= .* and train_mask="):
        optim.frozen(optax.sgd(1.0), **masks)


def test_bad_masks_are_refused_with_the_path():
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    with pytest.raises(TypeError, match="mask leaf w has float32"):
        optim.freeze({"w": np.ones((2, 3), np.float32), "b": False})
    with pytest.raises(TypeError, match="mask leaf w has float32"):
        optim.frozen(optax.sgd(1.0), freeze_mask={"w": np.ones((2, 3), np.float32), "b": False})
    with pytest.raises(ValueError, match=r"mask leaf w has shape \(3, 2\)"):
        optim.freeze({"w": np.ones((3, 2), bool), "b": False}).init(params)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        optim.frozen(optax.sgd(1.0), freeze_mask={"w": True}).init(params)
    with pytest.raises(ValueError, match=r"mask leaf w has shape \(3, 2\) but the update has shape \(2, 3\)"):
        optim.freeze({"w": np.ones((3, 2), bool), "b": False}).update(params, optax.EmptyState())


@pytest.fixture(scope="module")
def sharded_report():
    return run_with_8_devices("tests._sharded_freeze_checks")


def test_freezing_and_attribution_on_8_devices_match_one_device(sharded_report):
    """A circuit mask frozen through ``make_train_step`` (clipping, weight decay, schedule, momentum) on one
    device and on a (data=4, model=2) mesh: bit-identical frozen elements on both, equal trained params."""
    r = sharded_report
    assert r["devices"] == 8 and r["kernel_spec"] == "P(None, 'model')"
    assert r["frozen_bit_identical_1"] and r["frozen_bit_identical_8"]
    assert r["trainable_changed_fraction_8"] > 0.99
    assert r["param_max_diff"] < 1e-4
    assert r["opt_state_bytes_equal"]
    assert r["updated_kernel_still_sharded"] == "P(None, 'model')"
    assert r["attribution_max_rel_diff"] < 1e-4


def test_memory_benchmark_runs_and_reports_savings(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import freeze as freeze_bench

    tiny = freeze_bench.Config(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=16, preset="tiny")
    out = tmp_path / "freeze.json"
    result = freeze_bench.main(tiny, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["circuit.bytes_saved"] == 0                       # partly frozen leaves keep their state
    assert 0 < result["freeze_bottom_half.bytes_saved"] < result["train_last_block.bytes_saved"]
    # Adam's state is two copies of what it trains (plus a step count), so the saving tracks the frozen share.
    assert result["train_last_block.fraction_saved"] == pytest.approx(result["train_last_block.frozen_fraction"], abs=1e-3)
