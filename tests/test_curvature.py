"""K-FAC factors against explicit per-token computations and the exact Fisher of small models."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import idesign as ids
from idesign import curvature
from tests.conftest import run_with_8_devices, build

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("blocks.0.attn.q_proj", "blocks.1.mlp.down")


def _batch():
    tokens = jax.random.randint(jax.random.key(3), (3, 7), 0, 37, dtype=jnp.int32)
    valid = np.ones((3, 7), bool)
    valid[2, 5:] = False                                     # right padding
    loss_mask = np.ones((3, 7), np.float32)
    loss_mask[1, :3] = 0                                     # an unscored prompt
    return {"tokens": tokens, "valid": jnp.asarray(valid), "loss_mask": jnp.asarray(loss_mask)}


def _explicit_sums(apply, params, batch, layers, targets_fn):
    """Σ m x xᵀ and Σ m g gᵀ per layer, with x captured and g = ∂L/∂y through a Replace at each output."""
    tokens, valid = batch["tokens"], np.asarray(batch["valid"])
    m = np.asarray(batch["loss_mask"])[:, 1:] * valid[:, 1:] * valid[:, :-1]
    sites = [f"{n}.{s}" for n in layers for s in ("in", "out")]
    logits, cap = apply(params, tokens[:, :-1], valid=batch["valid"][:, :-1], hooks=ids.capture(*sites))
    targets = targets_fn(logits)

    def loss(y, layer):  # one Replace at a time: a Replace also cuts the gradient to earlier layers
        lg, _ = apply(params, tokens[:, :-1], valid=batch["valid"][:, :-1], hooks={f"{layer}.out": ids.Replace(y)})
        return (optax.softmax_cross_entropy_with_integer_labels(lg, targets) * m).sum()

    out = {}
    for n in layers:
        g = np.asarray(jax.grad(loss)(cap[f"{n}.out"], n), np.float64)
        x = np.asarray(cap[f"{n}.in"], np.float64)
        a_sum = np.einsum("bt,btd,bte->de", m, x, x)
        g_sum = np.einsum("bt,btd,bte->de", m, g, g)
        out[n] = (a_sum, g_sum, m.sum())
    return out


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_factors_match_explicit_per_token_sums(tiny_config, fisher):
    apply, params = build(tiny_config)
    batch, key = _batch(), jax.random.key(7)
    factors = curvature.collect_factors(apply, params, [batch], LAYERS, key=key, fisher=fisher, progress=False)
    if fisher == "empirical":
        targets_fn = lambda logits: batch["tokens"][:, 1:]
    else:  # documented: batch b samples jax.random.categorical(fold_in(key, b), logits)
        targets_fn = lambda logits: jax.random.categorical(jax.random.fold_in(key, 0), logits)
    explicit = _explicit_sums(apply, params, batch, LAYERS, targets_fn)
    for layer in LAYERS:
        a_sum, g_sum, count = explicit[layer]
        f = factors[layer]
        assert float(f.count) == count == 3 * 6 - 2 - 2
        np.testing.assert_allclose(f.a_sum, a_sum, rtol=1e-4, atol=1e-6 * np.abs(a_sum).max())
        np.testing.assert_allclose(f.g_sum, g_sum, rtol=1e-4, atol=1e-5 * np.abs(g_sum).max())
        A, G = curvature.factors_finalize(f)
        np.testing.assert_allclose(A, a_sum / count, rtol=1e-4, atol=1e-6 * np.abs(a_sum).max())


def test_ragged_batches_and_datasets_give_the_same_sums(tiny_config):
    apply, params = build(tiny_config)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (5, 6), 0, 37, dtype=jnp.int32))
    whole = curvature.collect_factors(apply, params, [{"tokens": tokens}], "blocks.*.mlp.up", fisher="empirical",
                                      progress=False)
    streamed = curvature.collect_factors(apply, params, {"tokens": tokens}, "blocks.*.mlp.up", fisher="empirical",
                                         batch_size=2, progress=False)
    assert list(whole) == ["blocks.0.mlp.up", "blocks.1.mlp.up"]
    for layer in whole:
        for a, b in zip(whole[layer], streamed[layer]):
            # float32 sums in another order: entries that nearly cancel are exact only to the matrix's scale.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(np.asarray(a)).max()))


# --- a single dense layer + softmax, where the exact Fisher is computable --------------------------


class _Linear(nnx.Module):
    def __init__(self, d_in, d_out, rngs):
        self.fc = nnx.Linear(d_in, d_out, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


D_IN, C, N = 4, 3, 64


def _single_layer(kernel, bias):
    apply, params = ids.models.from_nnx(_Linear(D_IN, C, nnx.Rngs(0)), jnp.zeros((1, D_IN)))
    params = {"fc": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    return apply, params


def _exact_fisher(apply, params, x):
    """(1/N) Σ_n Σ_y p(y|x_n) vec ∇_W(−log p(y|x_n)) vec(·)ᵀ by brute-force per-example gradients."""

    def nll(p, xn, y):
        logits, _ = apply(p, xn[None])
        return -jax.nn.log_softmax(logits[0])[y]

    ys = jnp.arange(C)
    grads = jax.vmap(lambda xn: jax.vmap(lambda y: jax.grad(nll)(params, xn, y)["fc"]["kernel"])(ys))(x)
    probs = jax.nn.softmax(apply(params, x)[0], -1)                     # [N, C]
    flat = np.asarray(grads, np.float64).reshape(N, C, -1)
    return np.einsum("ny,nyk,nyl->kl", np.asarray(probs, np.float64), flat, flat) / N


def _subspace_case():
    """Inputs live on the first two coordinates and the kernel reads only the last two, so the
    logits equal the bias for every input: g's law does not depend on x, hence E[x xᵀ ⊗ g gᵀ] = A ⊗ G."""
    rng = np.random.default_rng(0)
    x = np.zeros((N, D_IN), np.float32)
    x[:, :2] = rng.normal(size=(N, 2)) * [2.0, 0.5] + [1.0, 0.0]
    kernel = np.zeros((D_IN, C), np.float32)
    kernel[2:] = rng.normal(size=(2, C))
    return x, kernel, np.array([0.5, -0.3, 1.0], np.float32)


def _kfac_block(apply, params, x, repeats, seed=0):
    batches = [{"inputs": x}] * repeats  # every repeat draws fresh targets (fold_in(key, b))
    f = curvature.collect_factors(apply, params, batches, "fc", key=seed, forward=curvature.ClassifierForward(apply),
                                  progress=False)["fc"]
    A, G = curvature.factors_finalize(f)
    return np.kron(np.asarray(A, np.float64), np.asarray(G, np.float64)), A


def test_kfac_block_equals_the_exact_fisher_when_inputs_and_gradients_are_independent():
    x, kernel, bias = _subspace_case()
    apply, params = _single_layer(kernel, bias)
    exact = _exact_fisher(apply, params, jnp.asarray(x))
    p = np.asarray(jax.nn.softmax(bias), np.float64)
    g_expected = np.diag(p) - np.outer(p, p)             # E_y[(p − e_y)(p − e_y)ᵀ]
    A = x.astype(np.float64).T @ x / N
    np.testing.assert_allclose(np.kron(A, g_expected), exact, atol=1e-6)
    kfac, A_est = _kfac_block(apply, params, jnp.asarray(x), repeats=64)
    np.testing.assert_allclose(A_est, A, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(kfac - exact) / np.linalg.norm(exact) < 0.1

    # Control: with a kernel that reads the inputs, x and g are dependent and K-FAC is only approximate.
    dep_kernel = np.random.default_rng(1).normal(size=(D_IN, C)).astype(np.float32) * 2
    apply, params = _single_layer(dep_kernel, bias)
    x_full = np.random.default_rng(2).normal(size=(N, D_IN)).astype(np.float32) * 2
    exact_dep = _exact_fisher(apply, params, jnp.asarray(x_full))
    probs = np.asarray(jax.nn.softmax(x_full @ dep_kernel + bias, -1), np.float64)
    g_mean = np.mean([np.diag(q) - np.outer(q, q) for q in probs], axis=0)
    kron = np.kron(x_full.astype(np.float64).T @ x_full / N, g_mean)
    assert np.linalg.norm(kron - exact_dep) / np.linalg.norm(exact_dep) > 0.05


def test_true_fisher_estimate_converges_to_the_exact_fisher():
    x, kernel, bias = _subspace_case()
    apply, params = _single_layer(kernel, bias)
    exact = _exact_fisher(apply, params, jnp.asarray(x))
    errors = {}
    for repeats in (1, 16, 256):
        errs = [np.linalg.norm(_kfac_block(apply, params, jnp.asarray(x), repeats, seed)[0] - exact)
                for seed in range(3)]
        errors[repeats] = float(np.mean(errs)) / np.linalg.norm(exact)
    # Monte-Carlo error ~ 1/sqrt(samples): 16x more samples should shrink it about 4x.
    assert errors[1] > errors[16] > errors[256], errors
    assert errors[256] < errors[1] / 4, errors


# --- eigenbases and spectrum -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_eigh_descending_sorts_and_reconstructs(dtype):
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 3))
    psd = (m @ m.T).astype(np.float32)                     # rank 3: three (rounding-)zero eigenvalues
    vals, vecs = curvature.eigh_descending(psd, dtype=dtype)
    vals, vecs = np.asarray(vals), np.asarray(vecs)
    assert np.all(np.diff(vals) <= 0) and np.all(vals >= 0)
    np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, psd, atol=1e-4)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(vals, np.sort(np.linalg.eigvalsh(psd.astype(np.float64)))[::-1].clip(0), atol=1e-4)


def test_spectrum_full_and_merge_agree():
    rng = np.random.default_rng(1)
    mu, lam = np.sort(rng.exponential(size=5))[::-1], np.sort(rng.exponential(size=7))[::-1]
    eig = curvature.KFACEigen(jnp.asarray(mu, jnp.float32), jnp.eye(5), jnp.asarray(lam, jnp.float32), jnp.eye(7))
    full = curvature.curvature_spectrum(eig)
    assert full.values.shape == (35,) and np.all(np.diff(np.asarray(full.values)) <= 0)
    np.testing.assert_allclose(full.values, mu[np.asarray(full.i)] * lam[np.asarray(full.j)], rtol=1e-6)
    top = curvature.curvature_spectrum(eig, top_k=10)
    np.testing.assert_allclose(top.values, full.values[:10], rtol=1e-6)
    np.testing.assert_allclose(mu[np.asarray(top.i)] * lam[np.asarray(top.j)], top.values, rtol=1e-6)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors(tiny_config):
    apply, params = build(tiny_config)
    batch = {"tokens": jnp.ones((2, 5), jnp.int32)}
    with pytest.raises(ValueError, match=r"unknown dense layer 'blocks.0.mlp.hidden'.*Did you mean"):
        curvature.collect_factors(apply, params, [batch], "blocks.0.mlp.hidden", progress=False)
    with pytest.raises(ValueError, match="fisher must be"):
        curvature.collect_factors(apply, params, [batch], "blocks.0.mlp.up", fisher="gold", progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        curvature.collect_factors(apply, params, [], "blocks.0.mlp.up", progress=False)
    masked = {**batch, "loss_mask": jnp.zeros((2, 5))}
    with pytest.raises(ValueError, match="no counted token positions"):
        curvature.collect_factors(apply, params, [masked], "blocks.0.mlp.up", progress=False)
    with pytest.raises(TypeError, match="batch_size"):
        curvature.collect_factors(apply, params, {"tokens": np.ones((4, 5), np.int32)}, "blocks.0.mlp.up")
    tied_apply, tied_params = build(ids.TransformerConfig(vocab_size=37, d_model=32, n_layers=1, n_heads=4,
                                                          max_len=64, tie_embeddings=True))
    with pytest.raises(ValueError, match="tied parameter 'embed.embedding'"):
        curvature.resolve_layers(tied_apply, tied_params, "unembed")
    with pytest.raises(ValueError, match="count is 0"):
        empty = curvature.factors_init(params, {"blocks.0.mlp.up": "blocks.0.mlp.up.kernel"})
        curvature.factors_finalize(empty["blocks.0.mlp.up"])


# --- 8 simulated devices ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_report():
    return run_with_8_devices("tests._sharded_curvature_checks")


def test_factors_on_8_devices_equal_one_device(sharded_report):
    assert sharded_report["devices"] == 8
    assert sharded_report["true_max_rel_diff"] < 1e-5
    assert sharded_report["count_equal"]


def test_pruning_sharded_params_keeps_layout_and_values(sharded_report):
    assert sharded_report["pruned_kernel_spec"] == "P(None, 'model')"
    assert sharded_report["pruned_max_diff"] < 1e-5
