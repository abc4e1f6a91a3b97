"""Element masks (idesign.tree), circuit specs -> masks, attribution and selection (idesign.circuits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
import idesign.circuits as circuits
from idesign import masks, tree
from tests.conftest import build, random_tokens


def dense(mask, params):
    """Every leaf as a bool array of the parameter's shape, keyed by dotted path."""
    masks.check(params, mask)
    return {p: np.broadcast_to(np.asarray(m, bool), np.shape(params_leaf))
            for (p, m), params_leaf in zip(tree.named_leaves(mask).items(), tree.named_leaves(params).values())}


def hand_built(params, selections):
    """``{path: [(axis, start, stop), ...]}`` -> dense masks, all other leaves False."""
    out = {p: np.zeros(np.shape(x), bool) for p, x in tree.named_leaves(params).items()}
    for path, pieces in selections.items():
        for axis, start, stop in pieces:
            index = [slice(None)] * out[path].ndim
            index[axis] = slice(start, stop)
            out[path][tuple(index)] = True
    return out


def assert_masks_equal(got, expected):
    assert list(got) == list(expected)
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


# --- mask slicing against hand-built masks ------------------------------------------------------


def test_heads_mask_mha_matches_hand_built(tiny_config):
    _, params = build(tiny_config)
    Dh = tiny_config.head_dim  # 8
    got = dense(circuits.heads_mask(params, tiny_config, [(0, 1), (1, 3), (1, 0)]), params)
    sel = {}
    for layer, heads in ((0, [1]), (1, [0, 3])):
        a = f"blocks.{layer}.attn"
        for h in heads:
            cols = (h * Dh, (h + 1) * Dh)
            for proj in ("q_proj", "k_proj", "v_proj"):
                sel.setdefault(f"{a}.{proj}.kernel", []).append((1, *cols))
                sel.setdefault(f"{a}.{proj}.bias", []).append((0, *cols))
            sel.setdefault(f"{a}.o_proj.kernel", []).append((0, *cols))
    assert_masks_equal(got, hand_built(params, sel))
    # With one kv head per query head the GQA rule does not matter.
    assert_masks_equal(dense(circuits.heads_mask(params, tiny_config, [(0, 1), (1, 3), (1, 0)], shared_kv="all"),
                             params), got)


@pytest.mark.parametrize("heads, shared_kv, kv_heads", [
    ([(0, 1)], "any", [0]),            # kv head 0 serves query heads 0 and 1
    ([(0, 1)], "all", []),             # ... but head 0 is not selected
    ([(0, 0), (0, 1)], "all", [0]),    # the whole group
    ([(0, 1), (0, 2)], "any", [0, 1]),
    ([(0, 1), (0, 2)], "all", []),
    ([(0, 2), (0, 3)], "all", [1]),
])
def test_heads_mask_gqa_matches_hand_built(tiny_llama_config, heads, shared_kv, kv_heads):
    cfg = tiny_llama_config  # H=4, Hkv=2, Dh=8, no biases
    _, params = build(cfg)
    Dh = cfg.head_dim
    a = "blocks.0.attn"
    sel = {f"{a}.q_proj.kernel": [(1, h * Dh, (h + 1) * Dh) for _, h in heads],
           f"{a}.o_proj.kernel": [(0, h * Dh, (h + 1) * Dh) for _, h in heads]}
    if kv_heads:
        sel[f"{a}.k_proj.kernel"] = [(1, j * Dh, (j + 1) * Dh) for j in kv_heads]
        sel[f"{a}.v_proj.kernel"] = sel[f"{a}.k_proj.kernel"]
    got = dense(circuits.heads_mask(params, cfg, heads, shared_kv=shared_kv), params)
    assert_masks_equal(got, hand_built(params, sel))


def test_neurons_mask_matches_hand_built(tiny_config, tiny_llama_config):
    for cfg, projs, biased in ((tiny_config, ("up",), True), (tiny_llama_config, ("up", "gate"), False)):
        _, params = build(cfg)
        got = dense(circuits.neurons_mask(params, cfg, [(1, 5), (1, 127), (0, 0)]), params)
        sel = {}
        for layer, n in ((1, 5), (1, 127), (0, 0)):
            m = f"blocks.{layer}.mlp"
            for proj in projs:
                sel.setdefault(f"{m}.{proj}.kernel", []).append((1, n, n + 1))
                if biased:
                    sel.setdefault(f"{m}.{proj}.bias", []).append((0, n, n + 1))
            sel.setdefault(f"{m}.down.kernel", []).append((0, n, n + 1))
        assert_masks_equal(got, hand_built(params, sel))


def test_masks_of_heads_and_neurons_are_compact_and_broadcast(tiny_config):
    _, params = build(tiny_config)
    m = circuits.circuit_mask(params, tiny_config, heads=[(0, 1)], neurons=[(0, 2)])
    attn, mlp = m["blocks"][0]["attn"], m["blocks"][0]["mlp"]
    assert attn["q_proj"]["kernel"].shape == (1, 32) and attn["o_proj"]["kernel"].shape == (32, 1)
    assert mlp["up"]["kernel"].shape == (1, 128) and mlp["down"]["kernel"].shape == (128, 1)
    assert attn["q_proj"]["bias"].shape == (32,) and m["blocks"][1]["attn"]["q_proj"]["kernel"] is False
    assert masks.fits((1, 32), (32, 32)) and not masks.fits((32,), (32, 32))
    # A union with an element mask on the same leaf broadcasts to the full shape.
    elem = masks.full(params, False, dense=True)
    elem["blocks"][0]["attn"]["q_proj"]["kernel"][3, 0] = True
    u = masks.union(m, elem)["blocks"][0]["attn"]["q_proj"]["kernel"]
    assert u.shape == (32, 32) and u.sum() == 32 * 8 + 1
    bad = jax.tree.map(lambda x: x, m)
    bad["blocks"][0]["attn"]["q_proj"]["kernel"] = np.zeros(32, bool)   # rank 1 for a rank-2 kernel: ambiguous
    with pytest.raises(ValueError, match=r"q_proj\.kernel has shape \(32,\)"):
        masks.check(params, bad)


def test_paths_mask_and_circuit_mask(tiny_config):
    _, params = build(tiny_config)
    m = circuits.paths_mask(params, ["blocks.1.mlp.*", "embed.*"])
    on = sorted(p for p, v in tree.named_leaves(m).items() if v)
    assert on == ["blocks.1.mlp.down.bias", "blocks.1.mlp.down.kernel", "blocks.1.mlp.up.bias",
                  "blocks.1.mlp.up.kernel", "embed.embedding"]
    union = circuits.circuit_mask(params, tiny_config, heads=[(0, 2)], neurons=[(1, 4)], paths="final_norm.*")
    expected = masks.union(circuits.heads_mask(params, tiny_config, [(0, 2)]),
                               circuits.neurons_mask(params, tiny_config, [(1, 4)]),
                               circuits.paths_mask(params, "final_norm.*"))
    assert_masks_equal(dense(union, params), dense(expected, params))
    with pytest.raises(ValueError, match="no leaf matches"):
        circuits.paths_mask(params, "blocks.9.*")


# --- ablation through weights equals ablation through activations --------------------------------


def _z_ablation_hooks(cfg, heads):
    hooks = {}
    for layer in {l for l, _ in heads}:
        off = np.isin(np.arange(cfg.n_heads), [h for l, h in heads if l == layer])[:, None]
        hooks[f"blocks.{layer}.attn.z"] = ids.Replace(jnp.zeros((cfg.n_heads, cfg.head_dim)), off)
    return hooks


@pytest.mark.parametrize("which, heads, shared_kv", [
    ("gpt2", [(0, 1), (1, 0), (1, 3)], "any"),
    ("llama", [(0, 1), (1, 2), (1, 3)], "all"),   # a partial group (layer 0) and a whole group (layer 1)
])
def test_zeroing_the_heads_weights_equals_zeroing_their_z(tiny_config, tiny_llama_config, which, heads, shared_kv):
    cfg = tiny_config if which == "gpt2" else tiny_llama_config
    apply, params = build(cfg)
    toks = random_tokens(11, (2, 9))
    ablated = circuits.ablate_weights(params, circuits.heads_mask(params, cfg, heads, shared_kv=shared_kv))
    via_weights, _ = apply(ablated, toks)
    via_z, _ = apply(params, toks, hooks=_z_ablation_hooks(cfg, heads))
    np.testing.assert_allclose(via_weights, via_z, atol=1e-5)
    assert not np.allclose(via_z, apply(params, toks)[0], atol=1e-4)   # the ablation does something
    if which == "llama":
        # 'any' also zeroes kv head 0, which unselected head 0 reads: no longer a pure head ablation.
        over, _ = apply(circuits.ablate_weights(params, circuits.heads_mask(params, cfg, heads, shared_kv="any")), toks)
        assert not np.allclose(over, via_z, atol=1e-4)


def test_zeroing_the_neurons_weights_equals_zeroing_their_hidden(any_config):
    apply, params = build(any_config)
    toks = random_tokens(12, (2, 9))
    neurons = [(0, 3), (0, 90), (1, 17)]
    via_weights, _ = apply(circuits.ablate_weights(params, circuits.neurons_mask(params, any_config, neurons)), toks)
    hooks = {}
    for layer in (0, 1):
        off = np.isin(np.arange(any_config.ff_dim), [n for l, n in neurons if l == layer])
        hooks[f"blocks.{layer}.mlp.hidden"] = ids.Replace(jnp.zeros(any_config.ff_dim), off)
    via_hidden, _ = apply(params, toks, hooks=hooks)
    np.testing.assert_allclose(via_weights, via_hidden, atol=1e-5)


# --- mask algebra, validation, reports ----------------------------------------------------------


def test_mask_algebra_with_whole_leaf_and_element_leaves():
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4), "c": jnp.zeros(2)}
    x = {"a": np.array([[1, 0, 1], [0, 0, 1]], bool), "b": True, "c": False}
    y = {"a": np.array([[1, 1, 0], [0, 0, 0]], bool), "b": np.array([1, 0, 0, 1], bool), "c": False}
    d = lambda m: dense(m, params)
    dx, dy = d(x), d(y)
    for op, expect in ((masks.union, np.logical_or), (masks.intersection, np.logical_and)):
        got = d(op(x, y))
        for p in dx:
            np.testing.assert_array_equal(got[p], expect(dx[p], dy[p]))
    got = d(masks.difference(x, y))
    for p in dx:
        np.testing.assert_array_equal(got[p], dx[p] & ~dy[p])
    got = d(masks.complement(x))
    for p in dx:
        np.testing.assert_array_equal(got[p], ~dx[p])
    # De Morgan, and whole-leaf bools stay bools.
    lhs, rhs = masks.complement(masks.union(x, y)), masks.intersection(masks.complement(x), masks.complement(y))
    assert_masks_equal(d(lhs), d(rhs))
    assert masks.union(x, y)["b"] is True and masks.union(x, y)["c"] is False
    assert masks.full(params, True) == {"a": True, "b": True, "c": True}
    assert d(masks.full(params, False, dense=True))["a"].shape == (2, 3)
    # jax arrays combine too.
    j = masks.union({"a": jnp.asarray(x["a"]), "b": False, "c": False}, y)
    np.testing.assert_array_equal(j["a"], dx["a"] | dy["a"])


def test_check_mask_names_the_offending_path(tiny_config):
    _, params = build(tiny_config)
    good = circuits.heads_mask(params, tiny_config, [(0, 0)])
    masks.check(params, good)
    bad = jax.tree.map(lambda m: m, good)
    bad["blocks"][0]["attn"]["q_proj"]["kernel"] = np.zeros((3, 3), bool)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.kernel has shape \(3, 3\); expected .*\(32, 32\)"):
        masks.check(params, bad)
    floats = jax.tree.map(lambda m: m, good)
    floats["blocks"][0]["attn"]["o_proj"]["kernel"] = np.ones((32, 32), np.float32)
    with pytest.raises(TypeError, match=r"blocks\.0\.attn\.o_proj\.kernel has dtype float32; masks must be boolean"):
        masks.check(params, floats)
    missing = jax.tree.map(lambda m: m, good)
    del missing["blocks"][1]["mlp"]
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\.mlp\.down\.bias'"):
        masks.check(params, missing)
    extra = {**good, "lm_head": True}
    with pytest.raises(ValueError, match=r"unexpected \['lm_head'\]"):
        masks.check(params, extra)
    with pytest.raises(ValueError, match="structure"):
        masks.union(good, missing)
    with pytest.raises(ValueError, match="shape"):
        circuits.ablate_weights(params, bad)


def test_mask_size_report(tiny_config):
    _, params = build(tiny_config)
    D, Dh = tiny_config.d_model, tiny_config.head_dim
    report = masks.size_report(circuits.heads_mask(params, tiny_config, [(0, 1)]), params)
    assert report.layers["blocks.0.attn.q_proj"] == (D * Dh + Dh, D * D + D)
    assert report.layers["blocks.0.attn.o_proj"] == (Dh * D, D * D + D)
    assert report.layers["blocks.1.attn.q_proj"] == (0, D * D + D)
    assert report.fractions()["blocks.0.attn.k_proj"] == pytest.approx(1 / 4)
    assert report.selected == 3 * (D * Dh + Dh) + Dh * D
    assert report.total == sum(x.size for x in jax.tree.leaves(params))
    text = str(report)
    assert "blocks.0.attn.q_proj" in text and "25.00%" in text and text.splitlines()[-1].startswith("total")
    with pytest.raises(ValueError, match="pass `params`"):
        masks.size_report(circuits.heads_mask(params, tiny_config, [(0, 1)]))


def test_random_mask_has_the_requested_size_within_the_allowed_region(tiny_config):
    _, params = build(tiny_config)
    within = circuits.paths_mask(params, "blocks.*.mlp.*.kernel")
    m = masks.random(params, 500, seed=3, within=within)
    report = masks.size_report(m, params)
    assert report.selected == 500
    assert masks.size_report(masks.difference(m, within), params).selected == 0
    assert masks.size_report(masks.random(params, 500, seed=3, within=within), params).layers == report.layers
    with pytest.raises(ValueError, match="only"):
        masks.random(params, 10**9, seed=0)


# --- bad circuit specs ---------------------------------------------------------------------------


def test_out_of_range_indices_name_the_index_and_the_range(tiny_config, tiny_llama_config):
    _, params = build(tiny_config)
    with pytest.raises(IndexError, match=r"layer index 2 is out of range; the model has 2 layers \(valid: 0\.\.1\)"):
        circuits.heads_mask(params, tiny_config, [(2, 0)])
    with pytest.raises(IndexError, match=r"head index 4 is out of range; the model has 4 heads \(valid: 0\.\.3\)"):
        circuits.heads_mask(params, tiny_config, [(0, 4)])
    with pytest.raises(IndexError, match=r"head index -1"):
        circuits.heads_mask(params, tiny_config, [(0, -1)])
    with pytest.raises(IndexError, match=r"neuron index 128 is out of range; the model has 128 neurons \(valid: 0\.\.127\)"):
        circuits.neurons_mask(params, tiny_config, [(1, 128)])
    with pytest.raises(TypeError, match="must be an integer"):
        circuits.heads_mask(params, tiny_config, [(0, 1.0)])
    with pytest.raises(TypeError, match=r"\(layer, head\) pairs"):
        circuits.heads_mask(params, tiny_config, [3])
    with pytest.raises(ValueError, match="shared_kv"):
        circuits.heads_mask(params, tiny_config, [(0, 0)], shared_kv="some")
    # Params of another model: the error names the mismatching path.
    _, llama_params = build(tiny_llama_config)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.k_proj\.kernel has shape \(32, 16\), the config implies \(32, 32\)"):
        circuits.heads_mask(llama_params, tiny_config, [(0, 0)])


# --- attribution ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_attribution(tiny_config):
    apply, params = build(tiny_config)
    batch = {"tokens": random_tokens(5, (4, 12))}
    loss_fn = ids.lm_loss(apply)
    signed = circuits.weight_attribution(loss_fn, params, batch, signed=True)
    return apply, params, batch, loss_fn, signed


def test_weight_attribution_is_gradient_times_weight(gpt2_attribution):
    apply, params, batch, loss_fn, signed = gpt2_attribution
    absolute = circuits.weight_attribution(loss_fn, params, batch)   # same loss_fn: no recompilation
    for a, s in zip(jax.tree.leaves(absolute), jax.tree.leaves(signed)):
        np.testing.assert_array_equal(a, np.abs(s))
    # On a loss with a known gradient: L = (w . x)^2, g = 2 (w . x) x.
    w, x = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.1, -1.0])
    got = circuits.weight_attribution(lambda p, b: (p["w"] @ b) ** 2, {"w": w}, x, signed=True)["w"]
    np.testing.assert_allclose(got, 2 * (w @ x) * x * w, rtol=1e-6)
    # (loss, aux) outputs, as ids.lm_loss returns, are accepted.
    got_aux = circuits.weight_attribution(lambda p, b: ((p["w"] @ b) ** 2, {}), {"w": w}, x, signed=True)["w"]
    np.testing.assert_array_equal(got_aux, got)


def test_component_attribution_matches_finite_differences(gpt2_attribution, tiny_config):
    """A component's signed score is the directional derivative of the loss along its own weights."""
    apply, params, batch, loss_fn, signed = gpt2_attribution
    scores = circuits.component_scores(signed, tiny_config)
    loss = jax.jit(lambda p, d, t: loss_fn(jax.tree.map(lambda x, y: x + t * y, p, d), batch)[0])
    t = 0.05
    top_heads = circuits.select_top_k(np.abs(scores.heads), 2)
    top_neurons = circuits.select_top_k(np.abs(scores.neurons), 2)
    checks = [(scores.heads[c], circuits.heads_mask(params, tiny_config, [c])) for c in top_heads]
    checks += [(scores.neurons[c], circuits.neurons_mask(params, tiny_config, [c])) for c in top_neurons]
    for score, mask in checks:
        direction = jax.tree.map(lambda m, p: jnp.where(m, p, 0.0), mask, params)
        fd = (loss(params, direction, t) - loss(params, direction, -t)) / (2 * t)
        np.testing.assert_allclose(float(score), float(fd), rtol=0.03)


@pytest.mark.parametrize("shared_kv", ["any", "all"])
def test_component_scores_sum_the_elements_of_each_components_mask(tiny_llama_config, shared_kv):
    cfg = tiny_llama_config
    _, params = build(cfg)
    rng = np.random.default_rng(0)
    fake = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    scores = circuits.component_scores(fake, cfg, shared_kv=shared_kv)
    assert scores.heads.shape == (2, 4) and scores.neurons.shape == (2, cfg.ff_dim)
    masked_sum = lambda m: sum(float(np.where(mm, x, 0.0).sum()) for mm, x in zip(jax.tree.leaves(m), jax.tree.leaves(fake)))
    for layer, head in [(0, 0), (1, 3)]:
        expected = masked_sum(circuits.heads_mask(params, cfg, [(layer, head)], shared_kv=shared_kv))
        np.testing.assert_allclose(float(scores.heads[layer, head]), expected, rtol=1e-4, atol=1e-4)
    for layer, n in [(0, 7), (1, 100)]:
        expected = masked_sum(circuits.neurons_mask(params, cfg, [(layer, n)]))
        np.testing.assert_allclose(float(scores.neurons[layer, n]), expected, rtol=1e-4, atol=1e-4)


def test_attribution_patching_approximates_activation_patching(tiny_llama_config):
    """Per head and per neuron, the estimate tracks the true effect of patching clean into corrupted."""
    cfg = tiny_llama_config
    apply, params = build(cfg)
    clean = random_tokens(1, (2, 8))
    corrupted = clean.at[:, 3].set((clean[:, 3] + 5) % 37)
    metric = lambda logits: (logits[:, -1, 4] - logits[:, -1, 7]).sum()
    est = circuits.attribution_patching(apply, params, clean, corrupted, metric)
    assert est.heads.shape == (2, 4) and est.neurons.shape == (2, cfg.ff_dim)

    _, clean_acts = apply(params, clean, hooks=ids.capture("blocks.*.attn.z", "blocks.*.mlp.hidden"))
    base = metric(apply(params, corrupted)[0])
    no_patch = {s: (np.zeros((4, 1), bool) if s.endswith(".z") else np.zeros(cfg.ff_dim, bool)) for s in clean_acts}

    def true_effect(site, mask):
        # Every site hooked, all but one with an empty patch mask: one compilation for all runs.
        masks = {**no_patch, site: mask}
        hooks = {s: ids.Replace(clean_acts[s], masks[s]) for s in clean_acts}
        logits, _ = apply(params, corrupted, hooks=hooks)
        return float(metric(logits) - base)

    true_heads = np.array([[true_effect(f"blocks.{l}.attn.z", (np.arange(4) == h)[:, None]) for h in range(4)]
                           for l in range(2)])
    est_heads = np.asarray(est.heads)
    assert np.corrcoef(est_heads.ravel(), true_heads.ravel())[0, 1] > 0.99
    np.testing.assert_allclose(est_heads, true_heads, atol=0.1 * np.abs(true_heads).max())

    neurons = circuits.select_top_k(np.abs(est.neurons), 6) + [(0, 0), (1, 50)]
    true_n = np.array([true_effect(f"blocks.{l}.mlp.hidden", np.arange(cfg.ff_dim) == n) for l, n in neurons])
    est_n = np.array([float(est.neurons[l, n]) for l, n in neurons])
    np.testing.assert_allclose(est_n, true_n, atol=0.1 * np.abs(true_n).max())

    # 'noise' is the same estimate seen from the clean run: patching corrupted into clean.
    noise = circuits.attribution_patching(apply, params, corrupted, clean, metric, direction="noise")
    np.testing.assert_allclose(noise.heads, est.heads, rtol=1e-5, atol=1e-7)


def test_attribution_patching_bad_input(tiny_config):
    apply, params = build(tiny_config)
    with pytest.raises(ValueError, match="same shape"):
        circuits.attribution_patching(apply, params, random_tokens(0, (1, 4)), random_tokens(0, (1, 5)), jnp.sum)
    with pytest.raises(ValueError, match="direction"):
        circuits.attribution_patching(apply, params, random_tokens(0, (1, 4)), random_tokens(0, (1, 4)), jnp.sum,
                                      direction="both")
    with pytest.raises(TypeError, match="reference transformer"):
        circuits.attribution_patching(lambda p, t, hooks=None: None, params, random_tokens(0, (1, 4)),
                                      random_tokens(0, (1, 4)), jnp.sum)


# --- selection -----------------------------------------------------------------------------------


def test_selection_by_top_k_and_threshold_feeds_the_masks(tiny_config):
    _, params = build(tiny_config)
    scores = jnp.array([[0.1, 0.7, 0.3, 0.0], [0.9, 0.2, 0.7, 0.4]])
    assert circuits.select_top_k(scores, 3) == [(1, 0), (0, 1), (1, 2)]
    assert circuits.select_top_k(scores, 0) == []
    assert circuits.select_threshold(scores, 0.4) == [(1, 0), (0, 1), (1, 2), (1, 3)]
    m = circuits.heads_mask(params, tiny_config, circuits.select_top_k(scores, 3))
    assert masks.size_report(m, params).layers["blocks.1.attn.o_proj"][0] == 2 * 8 * 32
    with pytest.raises(ValueError, match=r"k=9; expected an integer in 0\.\.8"):
        circuits.select_top_k(scores, 9)
    with pytest.raises(ValueError, match="NaN"):
        circuits.select_top_k(scores.at[0, 0].set(jnp.nan), 1)
    with pytest.raises(ValueError, match=r"\[n_layers, n_components\]"):
        circuits.select_threshold(scores[0], 0.1)


# --- shared parameters, budgeted circuits, matched random controls --------------------------------


def test_shared_mask_is_exactly_what_no_component_owns(tiny_config, tiny_llama_config):
    for config in (tiny_config, tiny_llama_config):
        _, params = build(config)
        every = circuits.circuit_mask(params, config, heads=[(i, h) for i in range(config.n_layers)
                                                             for h in range(config.n_heads)],
                                      neurons=[(i, n) for i in range(config.n_layers) for n in range(config.ff_dim)])
        shared, owned = dense(circuits.shared_mask(params, config), params), dense(every, params)
        for path in shared:
            np.testing.assert_array_equal(shared[path], ~owned[path], err_msg=path)
        assert shared["embed.embedding"].all() and not shared["blocks.0.attn.q_proj.kernel"].any()


def test_budget_circuit_ranks_per_parameter_and_fits_the_budget(tiny_config):
    _, params = build(tiny_config)
    c = tiny_config
    size = lambda m: masks.size_report(m, params).selected
    head, neuron = (size(circuits.heads_mask(params, c, [(0, 0)])), size(circuits.neurons_mask(params, c, [(0, 0)])))
    # one head with a large total score but a low score per parameter, and two neurons worth more per parameter
    heads = jnp.zeros((c.n_layers, c.n_heads)).at[1, 0].set(10.0 * head / neuron)
    neurons = jnp.zeros((c.n_layers, c.ff_dim)).at[0, 3].set(20.0).at[1, 5].set(15.0)
    scores = circuits.ComponentScores(heads, neurons)
    mask, chosen_heads, chosen_neurons = circuits.budget_circuit(params, c, scores, head + 2 * neuron)
    assert chosen_neurons[:2] == [(0, 3), (1, 5)] and chosen_heads == [(1, 0)]
    assert size(mask) <= head + 2 * neuron
    mask, chosen_heads, _ = circuits.budget_circuit(params, c, scores, head - 1)
    assert chosen_heads == [] and size(mask) <= head - 1
    with pytest.raises(ValueError, match="max_elements"):
        circuits.budget_circuit(params, c, scores, -1)


def test_matched_random_mask_has_the_same_count_in_every_leaf(tiny_config):
    _, params = build(tiny_config)
    circuit = circuits.circuit_mask(params, tiny_config, heads=[(0, 1)], neurons=[(1, 2), (1, 7)])
    random = circuits.matched_random_mask(circuit, params, seed=0)
    a, b = dense(circuit, params), dense(random, params)
    assert {p: int(m.sum()) for p, m in a.items()} == {p: int(m.sum()) for p, m in b.items()}
    assert any((a[p] != b[p]).any() for p in a)          # a different choice of elements
    again = dense(circuits.matched_random_mask(circuit, params, seed=0), params)
    assert all((again[p] == b[p]).all() for p in b)       # deterministic in the seed
