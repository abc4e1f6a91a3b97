"""Curvature-ranked pruning, the SVD baseline and the band diagnostic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import idesign as ids
from idesign import curvature, edit
from tests.conftest import build


def _factors(d_in, d_out, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d_in, rank or d_in)) * np.linspace(2, 0.1, rank or d_in)
    g = rng.normal(size=(d_out, d_out)) * np.linspace(1, 0.05, d_out)
    return curvature.KFACFactors(jnp.asarray(a @ a.T, jnp.float32), jnp.asarray(g @ g.T, jnp.float32), jnp.float32(1))


def _params(d_in=6, d_out=5, seed=0):
    w = np.random.default_rng(seed + 10).normal(size=(d_in, d_out)).astype(np.float32)
    return {"layer": {"kernel": jnp.asarray(w), "bias": jnp.zeros(d_out)}}


def test_rho_one_keeps_the_weights_and_rho_to_zero_keeps_one_component():
    params, f = _params(), {"layer": _factors(6, 5, rank=3)}   # rank-deficient A: zero-curvature components
    new, report = edit.prune_low_curvature(params, f, ["layer"], 1.0)
    np.testing.assert_allclose(new["layer"]["kernel"], params["layer"]["kernel"], atol=1e-5)
    assert report["layer"]["kept"] == report["layer"]["total"] == 30 and report["layer"]["mass_kept"] == 1.0
    assert new["layer"]["bias"] is params["layer"]["bias"]

    new, report = edit.prune_low_curvature(params, f, ["layer"], 1e-9)
    eig = curvature.eigendecompose(f["layer"])
    w = np.asarray(params["layer"]["kernel"])
    c00 = float(eig.u_a[:, 0] @ w @ eig.u_g[:, 0])
    np.testing.assert_allclose(new["layer"]["kernel"], c00 * np.outer(eig.u_a[:, 0], eig.u_g[:, 0]), atol=1e-5)
    assert report["layer"]["kept"] == 1
    assert report["layer"]["rel_weight_change"] > 0.8


def _numpy_prune(w, A, G, rho):
    mu, ua = np.linalg.eigh(A.astype(np.float64))
    lam, ug = np.linalg.eigh(G.astype(np.float64))
    mu, ua, lam, ug = mu[::-1].clip(0), ua[:, ::-1], lam[::-1].clip(0), ug[:, ::-1]
    pi = np.outer(mu, lam)
    order = np.argsort(-pi, axis=None, kind="stable")
    csum = np.cumsum(pi.reshape(-1)[order])
    k = int(np.searchsorted(csum, rho * csum[-1])) + 1
    keep = np.zeros(pi.size, bool)
    keep[order[:k]] = True
    c = ua.T @ w @ ug
    return ua @ (c * keep.reshape(pi.shape)) @ ug.T, k, csum[k - 1] / csum[-1], (csum[k - 2] / csum[-1] if k > 1 else 0.0)


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_pruning_matches_a_numpy_reference_and_keeps_the_minimal_prefix(rho):
    params, f = _params(seed=1), {"layer": _factors(6, 5, seed=2)}
    new, report = edit.prune_low_curvature(params, f, ["layer"], rho)
    A, G = (np.asarray(m) for m in ids.curvature.factors_finalize(f["layer"]))
    w_ref, k, mass, mass_without_last = _numpy_prune(np.asarray(params["layer"]["kernel"], np.float64), A, G, rho)
    assert report["layer"]["kept"] == k
    assert mass >= rho > mass_without_last
    np.testing.assert_allclose(report["layer"]["mass_kept"], mass, rtol=1e-5)
    np.testing.assert_allclose(new["layer"]["kernel"], w_ref, atol=1e-4)
    w = np.asarray(params["layer"]["kernel"])
    np.testing.assert_allclose(report["layer"]["rel_weight_change"],
                               np.linalg.norm(w_ref - w) / np.linalg.norm(w), rtol=1e-4)
    text = str(report)
    assert "layer" in text and f"{k} / 30" in text and "kfac" in text


def test_eigen_factors_can_be_reused_and_layers_given_as_a_mapping():
    params, f = _params(), _factors(6, 5)
    eig = curvature.eigendecompose({"fc": f})
    a, _ = edit.prune_low_curvature(params, {"fc": f}, {"fc": "layer.kernel"}, 0.7)
    b, _ = edit.prune_low_curvature(params, eig, {"fc": "layer.kernel"}, 0.7)
    np.testing.assert_allclose(a["layer"]["kernel"], b["layer"]["kernel"], atol=1e-6)


def test_svd_baseline_matches_numpy():
    params = _params(7, 4, seed=3)
    w = np.asarray(params["layer"]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for rho in (0.5, 0.8, 0.99):
        k = int(np.searchsorted(energy, rho)) + 1
        new, report = edit.prune_svd(params, ["layer"], rho)
        np.testing.assert_allclose(new["layer"]["kernel"], (u[:, :k] * s[:k]) @ vt[:k], atol=1e-5)
        assert report["layer"]["kept"] == k and report["layer"]["total"] == 4
        np.testing.assert_allclose(report["layer"]["mass_kept"], energy[k - 1], rtol=1e-5)
    new, report = edit.prune_svd(params, "layer", 1.0)
    np.testing.assert_allclose(new["layer"]["kernel"], w, atol=1e-5)


def test_bad_input_errors():
    params, f = _params(), {"layer": _factors(6, 5)}
    for rho in (0.0, -0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
            edit.prune_low_curvature(params, f, ["layer"], rho)
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
            edit.prune_svd(params, ["layer"], rho)
    with pytest.raises(ValueError, match=r"factors for layer 'layer' have A \[5, 5\] and G \[5, 5\].*\(6, 5\).*"
                                         r"expected A \[6, 6\] and G \[5, 5\]"):
        edit.prune_low_curvature(params, {"layer": _factors(5, 5)}, ["layer"], 0.5)
    with pytest.raises(ValueError, match="unknown kernel 'layr.kernel'.*Did you mean"):
        edit.prune_svd(params, ["layr"], 0.5)
    with pytest.raises(ValueError, match="unknown layer with factors 'other'"):
        edit.prune_low_curvature(params, f, ["other"], 0.5)


def test_end_to_end_on_the_reference_model(tiny_config):
    apply, params = build(tiny_config)
    tokens = jax.random.randint(jax.random.key(0), (4, 9), 0, 37, dtype=jnp.int32)
    layers = curvature.resolve_layers(apply, params, "blocks.*.mlp.up")
    f = curvature.collect_factors(apply, params, [{"tokens": tokens}], list(layers), progress=False)
    new, report = edit.prune_low_curvature(params, f, layers, 0.6)
    assert list(report) == list(layers)
    assert all(0 < r["kept"] < r["total"] and r["mass_kept"] >= 0.6 for r in report.values())
    untouched = ids.tree.named_leaves(new)["blocks.0.attn.q_proj.kernel"]
    assert untouched is ids.tree.named_leaves(params)["blocks.0.attn.q_proj.kernel"]
    bands = edit.curvature_band_activations(apply, params, f["blocks.0.mlp.up"], "blocks.0.mlp.up",
                                            {"tokens": tokens}, {"tokens": tokens}, n_bands=5)
    np.testing.assert_allclose(bands.ratio, 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(bands.band_mass.sum()), 1.0, rtol=1e-5)
    assert np.all(np.diff(np.asarray(bands.band_mass)) <= 1e-7)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def test_band_activations_see_inputs_along_low_curvature_directions():
    """Clean inputs vary mostly along x0; 'memorized' ones along x3, a direction of low input
    curvature: they must drive the low-curvature bands harder than the top band."""
    apply, params = ids.models.from_nnx(_Linear(nnx.Rngs(0)), jnp.zeros((1, 4)))
    rng = np.random.default_rng(0)
    clean = (rng.normal(size=(256, 4)) * [3.0, 1.0, 0.5, 0.1]).astype(np.float32)
    memorized = (rng.normal(size=(64, 4)) * [0.1, 0.5, 1.0, 3.0]).astype(np.float32)
    fwd = curvature.ClassifierForward(apply)
    f = curvature.collect_factors(apply, params, [{"inputs": clean}], "fc", forward=fwd, progress=False)
    bands = edit.curvature_band_activations(apply, params, f["fc"], "fc", {"inputs": memorized},
                                            {"inputs": clean}, n_bands=4, forward=fwd)
    assert bands.ratio[-1] > 1.0 > bands.ratio[0]
    with pytest.raises(ValueError, match="n_bands"):
        edit.curvature_band_activations(apply, params, f["fc"], "fc", {"inputs": memorized}, {"inputs": clean},
                                        n_bands=0, forward=fwd)


def test_prune_random_keeps_the_requested_count_of_eigenbasis_components():
    import idesign as ids
    kx, kw = jax.random.split(jax.random.key(7))
    a = jax.random.normal(kx, (5, 5))
    f = {"l": ids.curvature.KFACFactors(a @ a.T + jnp.eye(5), jnp.diag(jnp.array([2.0, 1.0, 0.5])), jnp.float32(1))}
    w = jax.random.normal(kw, (5, 3))
    eig = ids.curvature.eigendecompose(f["l"])
    new, report = ids.edit.prune_random({"l": {"kernel": w}}, f, {"l": 6}, key=1)
    c_old = eig.u_a.T @ w @ eig.u_g
    c_new = eig.u_a.T @ new["l"]["kernel"] @ eig.u_g
    kept = np.abs(np.asarray(c_new)) > 1e-5
    assert report["l"]["kept"] == 6 == kept.sum()
    np.testing.assert_allclose(np.asarray(c_new)[kept], np.asarray(c_old)[kept], atol=1e-5)   # survivors unchanged
    again, _ = ids.edit.prune_random({"l": {"kernel": w}}, f, {"l": 6}, key=1)
    other, _ = ids.edit.prune_random({"l": {"kernel": w}}, f, {"l": 6}, key=2)
    np.testing.assert_array_equal(again["l"]["kernel"], new["l"]["kernel"])
    assert not np.array_equal(other["l"]["kernel"], new["l"]["kernel"])
    with pytest.raises(ValueError, match=r"keep\['l'\] = 16: expected an int in \[0, 15\]"):
        ids.edit.prune_random({"l": {"kernel": w}}, f, {"l": 16}, key=0)
