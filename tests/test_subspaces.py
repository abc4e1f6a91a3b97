"""Subspace builders against explicit numpy computations; principal angles; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idesign import subspaces as sub


def random_basis(seed: int, k: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T.astype(np.float32)


def span_equal(a: sub.Subspace, b, tol: float = 1e-4) -> bool:
    pa, pb = np.asarray(sub.projector(a), np.float64), np.asarray(b, np.float64)
    return np.abs(pa - pb).max() < tol


# --- Subspace ------------------------------------------------------------------------------------

def test_subspace_validates_orthonormality_and_shape():
    with pytest.raises(ValueError, match=r"not orthonormal \(‖B Bᵀ - I‖₂ = 0.21"):
        sub.Subspace(np.array([[1.1, 0.0]], np.float32))
    with pytest.raises(ValueError, match=r"must be 2-D"):
        sub.Subspace(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="side must be one of"):
        sub.Subspace(np.eye(2, dtype=np.float32)[:1], side="left")
    s = sub.Subspace.orthonormalized(np.array([[1.1, 0.0], [1.0, 1.0]], np.float32))
    np.testing.assert_allclose(np.asarray(s.basis), np.eye(2), atol=1e-6)
    assert sub.Subspace(np.zeros((0, 4), np.float32)).rank == 0


def test_orthonormality_tolerance_bounds_the_leak_per_step():
    # the tolerance is on the spectral norm: k rows each off by δ in their cross terms deviate by (k-1)δ, not δ
    k, delta = 8, 3e-7
    g = np.eye(k) + delta * (np.ones((k, k)) - np.eye(k))       # Gram with max entry error δ, spectral (k-1)δ
    basis = np.linalg.cholesky(g).T @ np.eye(k, 16)               # rows with exactly that Gram matrix
    with pytest.raises(ValueError, match="not orthonormal"):
        sub.Subspace(basis)
    # at the tolerance, the worst-case leak of u - BᵀBu into span(B) stays at most MAX_LEAK
    rng = np.random.default_rng(0)
    e = sub.ORTHONORMAL_TOL
    b = np.linalg.qr(rng.normal(size=(16, 4)))[0].T
    b[0] *= np.sqrt(1 + e)                                       # one row stretched: ‖BBᵀ - I‖₂ = e
    assert abs(sub.orthonormality_error(b) - e) < 1e-12
    sub.Subspace(b)                                              # accepted
    u = b[0] / np.linalg.norm(b[0])                              # the worst direction
    u_out = u - b.T @ (b @ u)
    true_projector = b.T @ np.linalg.inv(b @ b.T) @ b
    assert np.linalg.norm(true_projector @ u_out) <= sub.MAX_LEAK * (1 + 1e-9)


def test_subspace_is_a_pytree_and_new_bases_do_not_recompile():
    traces = []

    @jax.jit
    def f(s, x):
        traces.append(1)
        return s.remove(x)

    x = jnp.ones(4)
    a, b = sub.Subspace(jnp.eye(4)[:2]), sub.Subspace(jnp.eye(4)[2:])
    np.testing.assert_allclose(f(a, x), [0, 0, 1, 1])
    np.testing.assert_allclose(f(b, x), [1, 1, 0, 0])
    assert len(traces) == 1
    assert jax.tree_util.tree_leaves(a)[0].shape == (2, 4)
    with pytest.raises(AttributeError):
        a.side = "output"  # type: ignore[misc]


# --- builders ------------------------------------------------------------------------------------

def test_from_activations_picks_the_smallest_rank_reaching_the_energy():
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(200, 6)) * np.array([5, 3, 1, 0.3, 0.1, 0.01])).astype(np.float32)
    s2 = np.linalg.svd(acts.astype(np.float64), compute_uv=False) ** 2
    frac = np.cumsum(s2) / s2.sum()
    for energy in (0.5, 0.9, 0.97, 0.999):
        want = int(np.argmax(frac >= energy)) + 1
        s = sub.from_activations(acts, energy=energy)
        assert s.rank == want, energy
        _, _, vt = np.linalg.svd(acts.astype(np.float64), full_matrices=False)
        assert span_equal(s, vt[:want].T @ vt[:want])
    assert sub.from_activations(acts, rank=3).rank == 3
    assert sub.from_activations(acts[:, None, :].repeat(2, 1), rank=2).dim == 6  # [N, T, d] flattens


def test_from_activations_center_is_pca():
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(300, 4)).astype(np.float32) * [2, 0.1, 0.1, 0.1] + [0, 50, 0, 0]
    assert abs(float(sub.from_activations(acts, rank=1).basis[0, 1])) > 0.99       # the mean dominates
    assert abs(float(sub.from_activations(acts, rank=1, center=True).basis[0, 0])) > 0.99


def test_streamed_covariance_matches_svd():
    rng = np.random.default_rng(2)
    acts = (rng.normal(size=(96, 8)) * np.linspace(3, 0.1, 8)).astype(np.float32)
    state = sub.covariance_init(8)
    update = jax.jit(sub.covariance_update)
    for chunk in np.split(acts, 4):
        state = update(state, jnp.asarray(chunk))
    for center in (False, True):
        a = sub.from_covariance(sub.covariance_finalize(state, center=center), energy=0.9)
        b = sub.from_activations(acts, energy=0.9, center=center)
        assert a.rank == b.rank
        assert float(jnp.max(sub.principal_angles(a, b))) < 1e-3


def test_from_directions_drops_dependent_vectors_and_keeps_order():
    v = np.array([[1, 1, 0, 0], [2, 2, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 2, 1, 0]], np.float32)
    s = sub.from_directions(v)
    assert s.rank == 2
    np.testing.assert_allclose(np.asarray(s.basis[0]), np.array([1, 1, 0, 0]) / np.sqrt(2), atol=1e-6)
    q, _ = np.linalg.qr(v[[0, 2]].T.astype(np.float64))
    assert span_equal(s, q @ q.T)
    assert sub.from_directions(np.array([[1, 0], [1, 1e-9]], np.float32)).rank == 1  # below DEPENDENCE_RTOL


def test_class_means_contrastive_pairs_and_probes():
    rng = np.random.default_rng(3)
    means = np.array([[0, 0, 0, 0, 0], [4, 0, 0, 0, 0], [0, 4, 0, 0, 0]], np.float64)
    labels = np.repeat([0, 1, 2], 200)
    acts = (means[labels] + rng.normal(size=(600, 5)) * 0.01).astype(np.float32)
    s = sub.from_class_means(acts, labels)
    assert s.rank == 2
    assert span_equal(s, np.diag([1, 1, 0, 0, 0.0]), tol=1e-3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        sub.from_class_means(acts, np.zeros(600))

    pos = rng.normal(size=(50, 5)).astype(np.float32)
    neg = pos - np.array([0, 0, 3, 0, 0], np.float32)
    np.testing.assert_allclose(np.abs(np.asarray(sub.from_contrastive_pairs(pos, neg).basis)),
                               [[0, 0, 1, 0, 0]], atol=1e-6)
    assert sub.from_contrastive_pairs(pos, neg, rank=1).rank == 1

    w = np.array([[1.0, 2, 0, 0, 0], [1.0, 2, 3, 0, 0], [1.0, 2, 0, 4, 0]], np.float32)
    p = sub.from_probe(w)  # the common row (1, 2, 0, 0, 0) does not change a softmax probe's output
    assert p.rank == 2 and span_equal(p, np.diag([0, 0, 1, 1, 0.0]))
    assert sub.from_probe(w[0]).rank == 1


def test_from_probe_reads_fitted_probes_in_raw_activation_space():
    from idesign import probes
    logistic = probes.LogisticProbe(w=jnp.array([2.0, 2.0, 0.0]), b=jnp.array(0.0), mean=jnp.zeros(3),
                                    scale=jnp.array([1.0, 4.0, 1.0]))
    np.testing.assert_allclose(np.asarray(sub.from_probe(logistic).basis), [[0.9701425, 0.2425356, 0]], atol=1e-6)
    softmax = probes.SoftmaxProbe(w=jnp.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]]), b=jnp.zeros(2),
                                  mean=jnp.zeros(3), scale=jnp.ones(3))
    s = sub.from_probe(softmax)   # w is [d, c]; rows w1 - w0 = (0, 2, 0) span it
    assert s.rank == 1 and span_equal(s, np.diag([0, 1, 0.0]))


def test_extend_grows_with_the_residual_as_in_gpm():
    rng = np.random.default_rng(4)
    old = sub.from_activations((rng.normal(size=(100, 8)) * [3, 2, 0, 0, 0, 0, 0, 0]).astype(np.float32), rank=2)
    new = (rng.normal(size=(100, 8)) * [1, 1, 2, 0.5, 0.01, 0, 0, 0]).astype(np.float32)
    grown = sub.extend(old, new, energy=0.97)
    np.testing.assert_array_equal(np.asarray(grown.basis[:2]), np.asarray(old.basis))   # old rows kept, first
    b = np.asarray(grown.basis, np.float64)
    np.testing.assert_allclose(b @ b.T, np.eye(grown.rank), atol=1e-5)
    captured = ((new @ b.T) ** 2).sum() / (new.astype(np.float64) ** 2).sum()
    assert captured >= 0.97
    smaller = sub.Subspace(jnp.asarray(b[:-1], jnp.float32))
    assert ((new @ b[:-1].T) ** 2).sum() / (new.astype(np.float64) ** 2).sum() < 0.97  # and it is the fewest
    assert sub.extend(grown, new, energy=0.97).rank == grown.rank                      # nothing left to add
    with pytest.raises(ValueError, match="dimension 3 but the subspace has dimension 8"):
        sub.extend(smaller, np.ones((2, 3), np.float32))


# --- principal angles ----------------------------------------------------------------------------

def test_principal_angles_known_values_and_small_angle_accuracy():
    a = sub.Subspace(jnp.eye(4)[:2])
    np.testing.assert_allclose(sub.principal_angles(a, a), [0, 0], atol=1e-6)
    np.testing.assert_allclose(sub.principal_angles(a, sub.Subspace(jnp.eye(4)[2:])), [np.pi / 2] * 2, atol=1e-6)
    theta = 1e-4  # arccos in float32 cannot resolve this; the sine branch can
    b = sub.Subspace(jnp.array([[1, 0, 0, 0], [0, np.cos(theta), np.sin(theta), 0]], jnp.float32))
    np.testing.assert_allclose(sub.principal_angles(a, b), [0, theta], rtol=1e-2, atol=1e-7)
    c = sub.Subspace(jnp.eye(4)[:1])
    assert sub.principal_angles(a, c).shape == (1,) and sub.principal_angles(c, a).shape == (1,)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4))
def test_principal_angles_match_numpy_and_are_ascending(seed, ka, kb):
    a, b = random_basis(seed, ka, 7), random_basis(seed + 1, kb, 7)
    got = np.asarray(sub.principal_angles(a, b))
    want = np.sort(np.arccos(np.clip(np.linalg.svd(a.astype(np.float64) @ b.T, compute_uv=False), -1, 1)))
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.all(np.diff(got) >= -1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 5))
def test_projector_is_symmetric_idempotent_with_trace_rank(seed, k):
    s = sub.Subspace(random_basis(seed, k, 6)) if k else sub.Subspace(np.zeros((0, 6), np.float32))
    p = np.asarray(sub.projector(s), np.float64)
    np.testing.assert_allclose(p, p.T, atol=1e-6)
    np.testing.assert_allclose(p @ p, p, atol=1e-5)
    assert abs(np.trace(p) - k) < 1e-4
    x = np.random.default_rng(seed).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(s.project(x)) + np.asarray(s.remove(x)), x, atol=1e-5)
