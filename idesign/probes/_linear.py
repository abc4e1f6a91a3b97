"""Linear probes: binary logistic and multinomial (softmax), fitted full-batch, one or many at once.

Objective (the same as scikit-learn's ``LogisticRegression(penalty="l2", C=C)``)::

    minimise   C * sum_i s_i * loss(y_i, x~_i . w + b)  +  1/2 * ||w||^2

with ``x~ = (x - mean) / scale`` the standardised activations, ``s_i`` the sample weight times the class weight
of row ``i``, ``loss`` the logistic (binary) or softmax cross-entropy (multinomial, ``w`` of shape ``[D, K]``, all
``K`` columns penalised as scikit-learn does) and the intercept ``b`` not penalised. It is solved in the equivalent
normalised form ``mean_s(loss) + ||w||^2 / (2 C sum_i s_i)``, so ``C`` here *is* scikit-learn's ``C``: with
``standardize=True`` a probe equals ``make_pipeline(StandardScaler(), LogisticRegression(C=C))`` fitted on the same
rows (the scaler unweighted), with ``standardize=False`` it equals ``LogisticRegression(C=C)`` on the raw
activations. ``class_weight="balanced"`` gives class ``k`` the weight ``sum(s) / (n_present_classes * sum_{y_i = k}
s_i)`` as scikit-learn does.

Solver: L-BFGS with a backtracking (Armijo) line search inside ``lax.while_loop``, stopping when the largest
gradient entry of the normalised objective is below ``tol`` (scikit-learn's ``tol`` means the same; its default is
1e-4, ours 1e-5). It runs in coordinates *whitened* by a fixed preconditioner ``P = c * E_s[x~ x~^T] + lambda I``
(``c`` = the largest curvature of the loss, 1/4 for the logistic loss; ``E_s`` over a random subsample of
``precondition_rows`` rows): ``P`` is the Hessian at ``p = 1/2``, so L-BFGS starts from a Newton-like metric and
converges in tens of iterations however correlated the activations are. The preconditioner changes the path, not
the optimum.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idesign._types import Array
from idesign.distributed import to_host
from idesign import _treescope
from idesign.probes import _checks

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 10))  # as LogisticRegressionCV(Cs=10)
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: the stopping rule needs float32 gradients


@_treescope.rendered
class LogisticProbe(NamedTuple):
    """A binary linear probe: ``logit(x) = ((x - mean) / scale) . w + b``.

    The input standardisation it was fitted with (``mean``, ``scale``) is part of the probe, so a
    saved probe is self-contained. Also the parameters of a token-level span-max probe.

    Attributes:
      w: ``[D]`` weights on the standardised activations.
      b: ``[]`` intercept.
      mean: ``[D]`` activation mean subtracted before scoring.
      scale: ``[D]`` activation scale divided by before scoring.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.LogisticProbe(w=jnp.array([2.0, 0.0]), b=jnp.array(-1.0), mean=jnp.zeros(2), scale=jnp.ones(2))
      >>> probes.score(p, jnp.array([[1.0, 5.0], [0.0, 5.0]])).tolist()
      [1.0, -1.0]
    """

    w: Array
    b: Array
    mean: Array
    scale: Array


@_treescope.rendered
class SoftmaxProbe(NamedTuple):
    """A multinomial linear probe: ``logits(x) = ((x - mean) / scale) @ w + b``, one per class.

    Attributes:
      w: ``[D, K]`` weights on the standardised activations.
      b: ``[K]`` intercepts.
      mean: ``[D]`` activation mean.
      scale: ``[D]`` activation scale.

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.SoftmaxProbe(w=jnp.eye(3), b=jnp.zeros(3), mean=jnp.zeros(3), scale=jnp.ones(3))
      >>> probes.score(p, jnp.array([[0.0, 2.0, 1.0]])).argmax(-1).tolist()
      [1]
    """

    w: Array
    b: Array
    mean: Array
    scale: Array


class FitInfo(NamedTuple):
    """Diagnostics of a full-batch fit (stacked like the probes for :func:`fit_many`).

    Attributes:
      n_iter: L-BFGS iterations of the final fit.
      converged: whether the largest gradient entry fell below ``tol``.
      grad_max: the largest absolute gradient entry of the normalised objective at the end.
      loss: the normalised objective ``mean_s(loss) + ||w||^2 / (2 C sum s)`` at the end.
      C: the inverse L2 strength used (the cross-validated choice when ``C`` was a list or "cv").
      cv_loss: ``[M]`` mean held-out log loss of each candidate ``C`` (empty without CV).
    """

    n_iter: Array
    converged: Array
    grad_max: Array
    loss: Array
    C: Array
    cv_loss: Array


# -- Scoring ----------------------------------------------------------------------------------


@jax.jit
def linear_logits(probe: LogisticProbe | SoftmaxProbe, acts: Array) -> Array:
    """Logits of a linear probe for activations ``[..., D]``: ``[...]`` (binary) or ``[..., K]``."""
    x = (acts - probe.mean) / probe.scale
    if isinstance(probe, LogisticProbe):
        return jnp.einsum("...d,d->...", x, probe.w, precision=_HIGHEST) + probe.b
    return jnp.einsum("...d,dk->...k", x, probe.w, precision=_HIGHEST) + probe.b


def as_affine(probe: LogisticProbe | SoftmaxProbe) -> tuple[Array, Array]:
    """The probe as one affine map on raw activations: ``logits = acts @ weight + bias``.

    Folds the standardisation in: ``weight = w / scale`` and ``bias = b - mean @ weight``.
    ``weight`` is the probe's direction in activation space (for steering, ablation, subspaces).

    Example:
      >>> import jax.numpy as jnp
      >>> from idesign import probes
      >>> p = probes.LogisticProbe(w=jnp.array([2.0]), b=jnp.array(0.0), mean=jnp.array([1.0]), scale=jnp.array([4.0]))
      >>> weight, bias = probes.as_affine(p)
      >>> weight.tolist(), float(bias)
      ([0.5], -0.5)
    """
    if isinstance(probe, LogisticProbe):
        weight = probe.w / probe.scale
        bias = probe.b - jnp.sum(probe.mean * weight, axis=-1)
    else:
        weight = probe.w / probe.scale[..., None]
        bias = probe.b - jnp.einsum("...d,...dk->...k", probe.mean, weight, precision=_HIGHEST)
    return weight, bias


# -- The jitted core: standardisation, class weights, folds, preconditioned L-BFGS, CV ---------


def _standardization(X: Array, include: Array) -> tuple[Array, Array]:
    """Unweighted mean and population std over the included rows; constant features get scale 1."""
    m = include.astype(X.dtype)
    count = jnp.maximum(m.sum(), 1.0)
    mean = jnp.matmul(m, X, precision=_HIGHEST) / count
    var = jnp.sum(m[:, None] * jnp.square(X - mean), axis=0) / count
    scale = jnp.sqrt(var)
    tiny = 100 * jnp.finfo(X.dtype).eps * jnp.maximum(jnp.abs(mean), 1.0)
    return mean, jnp.where(scale > tiny, scale, 1.0)


def _row_weights(y: Array, sw: Array, cw: Array, balanced: Array, n_classes: int) -> Array:
    """Sample weight times class weight; ``balanced`` (traced) replaces ``cw`` by scikit-learn's rule."""
    counts = jax.ops.segment_sum(sw, y, num_segments=n_classes)
    present = (counts > 0).sum()
    auto = jnp.where(counts > 0, sw.sum() / (present * jnp.where(counts > 0, counts, 1.0)), 0.0)
    return sw * jnp.where(balanced, auto, cw.astype(sw.dtype))[y]


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per row: rows are shuffled within each class and dealt round-robin to the folds.

    >>> stratified_folds(np.array([0, 0, 0, 1, 1, 1]), 3, seed=0).tolist().count(0)
    2
    """
    labels = np.asarray(labels)
    order = np.lexsort((np.random.default_rng(seed).random(labels.shape[0]), labels))
    folds = np.empty(labels.shape[0], np.int32)
    folds[order] = np.arange(labels.shape[0]) % n_folds
    return folds


def _loss_terms(z: Array, y: Array, n_out: int) -> Array:
    if n_out == 1:
        z = z[..., 0]
        return jax.nn.softplus(z) - y.astype(z.dtype) * z
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]


def _logits(theta: Array, X: Array, mean: Array, scale: Array) -> Array:
    # Standardisation folded into the weights: the data is read as it is, never copied.
    w = theta[:-1] / scale[:, None]
    return jnp.matmul(X, w, precision=_HIGHEST) + (theta[-1] - jnp.matmul(mean, w, precision=_HIGHEST))


def _preconditioner_gram(X: Array, mean: Array, scale: Array, s: Array, rows: int, key: Array) -> Array:
    n = X.shape[0]
    idx = jax.random.permutation(key, n)[:rows] if rows < n else jnp.arange(n)
    A = (X[idx] - mean) / scale
    A = jnp.concatenate([A, jnp.ones((A.shape[0], 1), A.dtype)], axis=1)
    sw = s[idx]
    return jnp.einsum("nd,ne->de", A * sw[:, None], A) / jnp.maximum(sw.sum(), jnp.finfo(A.dtype).tiny)


def _solve(X: Array, mean: Array, scale: Array, y: Array, s: Array, C: Array, gram: Array, *,
           n_out: int, tol: float, max_iter: int, memory: int) -> tuple[Array, tuple[Array, ...]]:
    """Minimises the normalised objective; returns ``theta [D+1, n_out]`` (last row: intercepts)."""
    d = X.shape[1]
    dt = X.dtype
    S = s.sum()
    lam = (1.0 / (C * S)).astype(dt)
    curvature = 0.25 if n_out == 1 else (n_out - 1) / n_out**2
    P = curvature * gram + jnp.diag(jnp.concatenate([jnp.full((d,), lam, dt), jnp.zeros((1,), dt)]))
    P = P + (1e-6 * jnp.trace(P) / (d + 1) + jnp.finfo(dt).tiny) * jnp.eye(d + 1, dtype=dt)
    chol = jnp.linalg.cholesky(P)

    def theta_of(v: Array) -> Array:  # v are whitened coordinates: theta = chol^-T v
        return jax.scipy.linalg.solve_triangular(chol, v, lower=True, trans="T")

    def objective(theta: Array) -> Array:
        terms = _loss_terms(_logits(theta, X, mean, scale), y, n_out)
        return jnp.dot(s, terms, precision=_HIGHEST) / S + 0.5 * lam * jnp.sum(jnp.square(theta[:-1]))

    f = lambda v: objective(theta_of(v))
    grad_max = lambda g: jnp.abs(chol @ g).max()  # in the original coordinates: g_theta = chol @ g_v
    v, value, g, n_iter = _lbfgs(jax.value_and_grad(f), jnp.zeros((d + 1, n_out), dt), grad_max,
                                 tol=tol, max_iter=max_iter, memory=memory)
    gm = grad_max(g)
    return theta_of(v), (n_iter, gm <= tol, gm, value)


class _LbfgsState(NamedTuple):
    x: Array
    f: Array
    g: Array
    s: Array  # [memory, n] past steps (a ring buffer)
    y: Array  # [memory, n] past gradient differences
    rho: Array  # [memory] 1 / (s . y); 0 marks an empty slot
    k: Array  # iterations done
    stored: Array  # pairs stored so far
    failed: Array  # the last line search found no acceptable step


def _two_loop(g: Array, state: _LbfgsState, memory: int) -> Array:
    """``H g`` for the L-BFGS inverse-Hessian estimate ``H`` (Nocedal & Wright, Algorithm 7.4)."""
    newest = (state.stored - 1) % memory

    def backward(j, carry):
        q, alpha = carry
        i = (newest - j) % memory
        a = state.rho[i] * jnp.vdot(state.s[i], q)
        return q - a * state.y[i], alpha.at[i].set(a)

    q, alpha = jax.lax.fori_loop(0, memory, backward, (g, jnp.zeros((memory,), g.dtype)))
    sy, yy = jnp.vdot(state.s[newest], state.y[newest]), jnp.vdot(state.y[newest], state.y[newest])
    # Before any pair, H0 = I: in whitened coordinates that is a Newton step at p = 1/2.
    gamma = jnp.where(state.stored > 0, sy / jnp.where(yy > 0, yy, 1.0), 1.0)

    def forward(j, r):
        i = (newest - (memory - 1) + j) % memory
        beta = state.rho[i] * jnp.vdot(state.y[i], r)
        return r + (alpha[i] - beta) * state.s[i]

    return jax.lax.fori_loop(0, memory, forward, gamma * q)


def _lbfgs(value_and_grad: Any, x0: Array, grad_max: Any, *, tol: float, max_iter: int, memory: int):
    """L-BFGS with a backtracking Armijo line search, inside ``lax.while_loop``.

    The objective is convex, so Armijo backtracking from the unit step is enough; pairs with
    non-positive curvature are not stored. A decrease within a few float ulps of ``f`` counts as
    sufficient, so that the last iterations, whose decrease is below float32 resolution, still
    move on the gradient. Stops at ``grad_max(g) <= tol``, ``max_iter`` or a failed line search.
    """
    shape, n = x0.shape, x0.size
    dt = x0.dtype
    flat_vg = lambda x: (lambda fg: (fg[0], fg[1].reshape(-1)))(value_and_grad(x.reshape(shape)))
    f0, g0 = flat_vg(x0.reshape(-1))
    zeros = jnp.zeros((memory, n), dt)
    init = _LbfgsState(x0.reshape(-1), f0, g0, zeros, zeros, jnp.zeros((memory,), dt), jnp.asarray(0),
                       jnp.asarray(0), jnp.asarray(False))
    noise = 8 * jnp.finfo(dt).eps

    def body(st: _LbfgsState) -> _LbfgsState:
        d = -_two_loop(st.g, st, memory)
        slope = jnp.vdot(st.g, d)
        d = jnp.where(slope < 0, d, -st.g)  # not a descent direction (rounding): fall back to the gradient
        slope = jnp.where(slope < 0, slope, -jnp.vdot(st.g, st.g))

        def accepted(t, f_t):
            return jnp.isfinite(f_t) & (f_t <= st.f + 1e-4 * t * slope + noise * jnp.abs(st.f))

        def unacceptable(ls):
            t, f_t, _, j = ls
            return ~accepted(t, f_t) & (j < 40)

        def halve(ls):
            t, _, _, j = ls
            f_t, g_t = flat_vg(st.x + 0.5 * t * d)
            return 0.5 * t, f_t, g_t, j + 1

        # Starting "before" t = 2 makes the first pass evaluate the unit step: one copy of the objective.
        start = (jnp.asarray(2.0, dt), jnp.asarray(jnp.inf, dt), st.g, jnp.asarray(0))
        t, f_t, g_t, j = jax.lax.while_loop(unacceptable, halve, start)
        failed = ~accepted(t, f_t)
        step, change = t * d, g_t - st.g
        sy = jnp.vdot(step, change)
        store = ~failed & (sy > jnp.finfo(dt).eps * jnp.vdot(change, change))
        slot = st.stored % memory
        new = _LbfgsState(
            x=st.x + step, f=f_t, g=g_t,
            s=jnp.where(store, st.s.at[slot].set(step), st.s),
            y=jnp.where(store, st.y.at[slot].set(change), st.y),
            rho=jnp.where(store, st.rho.at[slot].set(1.0 / jnp.where(store, sy, 1.0)), st.rho),
            k=st.k + 1, stored=st.stored + store, failed=failed)
        # A failed search keeps the old point.
        return jax.tree.map(lambda a, b: jnp.where(failed, b, a), new, st._replace(k=st.k + 1, failed=failed))

    def cond(st: _LbfgsState) -> Array:
        return (st.k < max_iter) & ~st.failed & (grad_max(st.g.reshape(shape)) > tol)

    st = jax.lax.while_loop(cond, body, init)
    return st.x.reshape(shape), st.f, st.g.reshape(shape), st.k


def _heldout_loss(theta: Array, X: Array, mean: Array, scale: Array, y: Array, s: Array, n_out: int) -> Array:
    terms = _loss_terms(_logits(theta, X, mean, scale), y, n_out)
    return jnp.dot(s, terms) / jnp.maximum(s.sum(), jnp.finfo(s.dtype).tiny)


def _fit_target(X, mean, scale, y, sw, cw, balanced, Cs, fold_ids, key, *, n_out, n_classes, n_folds,
                tol, max_iter, memory, precond_rows):
    s = _row_weights(y, sw, cw, balanced, n_classes)
    gram = _preconditioner_gram(X, mean, scale, s, precond_rows, key)
    solve = functools.partial(_solve, X, mean, scale, y, n_out=n_out, tol=tol, max_iter=max_iter, memory=memory)
    if n_folds == 0:
        theta, (n_iter, converged, g, loss) = solve(s, Cs[0], gram)
        return theta, FitInfo(n_iter, converged, g, loss, Cs[0], jnp.zeros((0,), X.dtype))
    folds = fold_ids
    # Fold index n_folds trains on every row: the refits of all candidates ride in the same batch
    # as the CV fits, so the graph holds one solver (half the compilation) for ~1/n_folds more work.
    M, F = Cs.shape[0], n_folds + 1
    pairs_C, pairs_f = jnp.repeat(Cs, F), jnp.tile(jnp.arange(F), M)  # one flat batch of (C, fold) problems
    out = jax.vmap(lambda C, f: solve(s * (folds != f), C, gram))(pairs_C, pairs_f)
    theta, (n_iter, converged, g, loss) = jax.tree.map(lambda a: a.reshape((M, F) + a.shape[1:]), out)
    heldout = jax.vmap(jax.vmap(lambda th, f: _heldout_loss(th, X, mean, scale, y, s * (folds == f), n_out),
                                in_axes=(0, 0)), in_axes=(0, None))(theta[:, :n_folds], jnp.arange(n_folds))
    cv_loss = heldout.mean(axis=1)
    best = jnp.argmin(cv_loss)  # the first best: the strongest regularisation among ties
    pick = lambda a: a[best, n_folds]
    return pick(theta), FitInfo(pick(n_iter), pick(converged), pick(g), pick(loss), Cs[best], cv_loss)


def _fit_layer(X, Y, SW, cw, balanced, standardize, Cs, folds, key, **static):
    """One activation matrix ``[N, D]`` against ``K`` targets ``Y [K, N]`` (with CV fold ids ``folds [K, N]``).

    ``balanced`` and ``standardize`` are traced flags, so that these options share one compilation.
    """
    mean, scale = _standardization(X, (SW > 0).any(axis=0))
    mean = jnp.where(standardize, mean, 0.0)
    scale = jnp.where(standardize, scale, 1.0)
    fit = lambda y, sw, f: _fit_target(X, mean, scale, y, sw, cw, balanced, Cs, f, key, **static)
    if Y.shape[0] == 1:  # no batching: a single probe compiles about twice as fast
        theta, info = jax.tree.map(lambda a: a[None], fit(Y[0], SW[0], folds[0]))
    else:
        theta, info = jax.vmap(fit)(Y, SW, folds)
    K = Y.shape[0]
    mean_k, scale_k = (jnp.broadcast_to(a, (K,) + a.shape) for a in (mean, scale))
    if static["n_out"] == 1:
        return LogisticProbe(theta[:, :-1, 0], theta[:, -1, 0], mean_k, scale_k), info
    return SoftmaxProbe(theta[:, :-1, :], theta[:, -1, :], mean_k, scale_k), info


@functools.partial(jax.jit, static_argnames=("layers", "targets", "n_out", "n_classes", "n_folds", "tol",
                                             "max_iter", "memory", "precond_rows"))
def _fit_jit(X, Y, SW, cw, balanced, standardize, Cs, folds, seed, *, layers: bool, targets: bool, **static):
    """Fits ``X [L, N, D]`` (or ``[N, D]``) against ``Y [K, N]``; drops the axes the caller did not have."""
    args = (Y, SW, cw, balanced, standardize, Cs, folds, jax.random.key(seed))
    fit = functools.partial(_fit_layer, **static)
    if layers:
        out = jax.vmap(fit, in_axes=(0,) + (None,) * len(args))(X, *args)
        return out if targets else jax.tree.map(lambda a: a[:, 0], out)
    out = fit(X, *args)
    return out if targets else jax.tree.map(lambda a: a[0], out)


# -- Public fitting functions ------------------------------------------------------------------


def _candidates(C: float | Sequence[float] | str, fn: str) -> tuple[np.ndarray, bool]:
    if isinstance(C, str):
        if C != "cv":
            raise ValueError(f"{fn}: C must be a positive number, a list of candidates or 'cv'; got {C!r}.")
        return np.asarray(DEFAULT_CS), True
    values = np.atleast_1d(np.asarray(C, np.float64))
    if values.ndim != 1 or values.size == 0 or not np.all(values > 0):
        raise ValueError(f"{fn}: C must be positive (the inverse L2 strength, as in scikit-learn); got {C!r}.")
    return values, np.ndim(C) > 0


def _fold_ids(cv: int | Any, labels: np.ndarray | Array, seed: int, fn: str) -> tuple[int, np.ndarray]:
    """``(n_folds, fold ids [K, N])``: stratified per target from ``seed``, or the caller's ids per row."""
    K, n_rows = labels.shape
    if isinstance(cv, (int, np.integer)):
        if cv < 2:
            raise ValueError(f"{fn}: cv must be at least 2 folds, got {cv}.")
        host = to_host(labels)
        return int(cv), np.stack([stratified_folds(host[k], int(cv), seed) for k in range(K)])
    ids = np.asarray(cv)
    if ids.shape != (n_rows,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: cv must be a number of folds or one integer fold id per row "
                         f"(shape ({n_rows},)); got shape {ids.shape}, dtype {ids.dtype}.")
    distinct, ids = np.unique(ids, return_inverse=True)  # any integer ids: renumbered 0..F-1
    if len(distinct) < 2:
        raise ValueError(f"{fn}: cv fold ids name a single fold; cross-validation needs at least 2.")
    return len(distinct), np.broadcast_to(ids.reshape(-1).astype(np.int32), (K, n_rows))


def _fit(fn: str, family: str, acts: Any, labels: Any, *, many: bool, C, class_weight, sample_weight,
         standardize: bool, cv, n_classes: int | None, tol: float, max_iter: int, memory: int, seed: int,
         precondition_rows: int | None, return_info: bool):
    if family not in ("logistic", "softmax"):
        raise ValueError(f"{fn}: family must be 'logistic' or 'softmax', got {family!r}.")
    binary = family == "logistic"
    X = _checks.float_array(acts, fn=fn, name="activations")
    if many:
        _checks.check_ndim(X, (2, 3), fn=fn, name="activations", layout="[L, N, D] (layers, rows, features) or [N, D]")
    else:
        _checks.check_ndim(X, 2, fn=fn, name="activations", layout="[N, D] (rows, features)")
    has_layers = X.ndim == 3
    L, N, D = X.shape if has_layers else (1, *X.shape)
    if N == 0 or D == 0:
        raise ValueError(f"{fn}: activations are empty (shape {tuple(X.shape)}).")
    _checks.check_finite(X, fn=fn, name="activations",
                         axes=("layer", "row") if has_layers else ("row",))

    labels_arr = labels if isinstance(labels, (np.ndarray, jax.Array)) else np.asarray(labels)
    if many:
        _checks.check_ndim(labels_arr, (1, 2), fn=fn, name="labels", layout="[K, N] (targets, rows) or [N]")
    else:
        _checks.check_ndim(labels_arr, 1, fn=fn, name="labels", layout="[N] (one label per row)")
    has_targets = labels_arr.ndim == 2
    Y = labels_arr if has_targets else labels_arr[None]
    _checks.check_rows(Y.shape[1], N, fn=fn, name="labels")
    checked = [_checks.class_labels(Y[k], fn=fn, binary=binary, n_classes=n_classes,
                                    target=f" (target {k})" if has_targets else "") for k in range(Y.shape[0])]
    K_classes = 2 if binary else max(k for _, k in checked)
    for k, (y, _) in enumerate(checked):
        absent = np.setdiff1d(np.arange(K_classes), y) if isinstance(y, np.ndarray) else []
        if len(absent):  # its intercept would run off to -inf: no optimum to converge to
            raise ValueError(f"{fn}: class ids {absent.tolist()} have no examples in labels"
                             f"{f' (target {k})' if has_targets else ''}; use class ids 0..K-1 with every class "
                             "present.")
    Y = np.stack([y for y, _ in checked]) if all(isinstance(y, np.ndarray) for y, _ in checked) else \
        jnp.stack([y for y, _ in checked])

    dtype = np.dtype(X.dtype)
    if sample_weight is None:
        SW = np.ones(Y.shape, dtype)
    else:
        sw_shape = tuple(np.shape(sample_weight))
        SW = _checks.sample_weights(sample_weight, N, fn=fn, shape=sw_shape if sw_shape == Y.shape else (N,))
        SW = np.broadcast_to(np.asarray(SW, dtype), Y.shape)
    cw, balanced = _checks.class_weight_vector(class_weight, K_classes, fn=fn)
    Cs, use_cv = _candidates(C, fn)
    n_folds, folds = _fold_ids(cv, Y, seed, fn) if use_cv else (0, np.zeros((Y.shape[0], 0), np.int32))
    if precondition_rows is None:
        precondition_rows = max(4096, 2 * (D + 1))
    static = dict(n_out=1 if binary else K_classes, n_classes=K_classes, n_folds=n_folds, tol=float(tol),
                  max_iter=int(max_iter), memory=int(memory), precond_rows=int(min(precondition_rows, N)))
    cw = np.ones(K_classes, dtype) if cw is None else np.asarray(cw, dtype)
    probe, info = _fit_jit(X, Y, SW, cw, np.bool_(balanced), np.bool_(standardize), np.asarray(Cs, dtype), folds,
                           np.int32(seed), layers=has_layers, targets=has_targets, **static)
    return (probe, info) if return_info else probe


def fit_logistic(acts: Any, labels: Any, *, C: float | Sequence[float] | Literal["cv"] = 1.0,
                 class_weight: None | str | dict | Sequence[float] = None, sample_weight: Any = None,
                 standardize: bool = True, cv: int | Any = 5, tol: float = 1e-5, max_iter: int = 500,
                 memory: int = 10, seed: int = 0, precondition_rows: int | None = None,
                 return_info: bool = False) -> LogisticProbe | tuple[LogisticProbe, FitInfo]:
    """Fits an L2-regularised binary logistic probe, full-batch, in one jitted call.

    Args:
      acts: ``[N, D]`` activations (float32, float64; other dtypes are cast to float32).
      labels: ``[N]`` binary labels (0/1 or bool).
      C: inverse L2 strength with scikit-learn's meaning (see the module docstring); a list of
        candidates, or ``"cv"`` for ``np.logspace(-4, 4, 10)``, chooses it by ``cv``-fold
        cross-validation on the held-out log loss (weighted like the fit), then refits on all rows.
      class_weight: ``None``, ``"balanced"``, ``{class: weight}`` or one weight per class.
      sample_weight: ``[N]`` non-negative weights; rows of weight 0 are ignored (also by the
        standardisation, which is otherwise unweighted).
      standardize: fit on ``(x - mean) / scale`` (stored in the probe); else mean 0, scale 1.
      cv: number of stratified folds (:func:`stratified_folds` with ``seed``), or a fold id per row
        ``[N]`` (e.g. the sequence of each token, so that no sequence is split across folds).
      tol: stop when the largest gradient entry of the normalised objective is below this.
      max_iter: L-BFGS iteration limit.
      memory: L-BFGS memory size.
      seed: seeds the CV folds and the preconditioner's row subsample (the optimum does not depend on it).
      precondition_rows: rows used to build the preconditioner (default ``max(4096, 2 (D + 1))``).
      return_info: also return a :class:`FitInfo`.

    Returns:
      A :class:`LogisticProbe` (and a :class:`FitInfo` if asked).

    Raises:
      ValueError: mismatched lengths, a single class, non-finite activations (with their rows),
        wrong shapes, bad weights or ``C``.
      TypeError: non-numeric activations or labels.

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
      >>> y = (x[:, 0] + 0.1 * x[:, 1] > 0).astype(np.int32)
      >>> probe = probes.fit_logistic(x, y, C=1.0)
      >>> float(((probes.score(probe, x) > 0) == y).mean()) > 0.95
      True
    """
    return _fit("fit_logistic", "logistic", acts, labels, many=False, C=C, class_weight=class_weight,
                sample_weight=sample_weight, standardize=standardize, cv=cv, n_classes=None, tol=tol,
                max_iter=max_iter, memory=memory, seed=seed, precondition_rows=precondition_rows,
                return_info=return_info)


def fit_softmax(acts: Any, labels: Any, *, n_classes: int | None = None,
                C: float | Sequence[float] | Literal["cv"] = 1.0,
                class_weight: None | str | dict | Sequence[float] = None, sample_weight: Any = None,
                standardize: bool = True, cv: int | Any = 5, tol: float = 1e-5, max_iter: int = 500,
                memory: int = 10, seed: int = 0, precondition_rows: int | None = None,
                return_info: bool = False) -> SoftmaxProbe | tuple[SoftmaxProbe, FitInfo]:
    """Fits an L2-regularised multinomial (softmax) probe; arguments as :func:`fit_logistic`.

    ``labels`` are class ids ``0..K-1`` with ``K = n_classes`` (default: the largest id + 1). The
    objective is scikit-learn's multinomial ``LogisticRegression`` (all ``K`` weight columns
    penalised, intercepts not).

    Example:
      >>> import numpy as np
      >>> from idesign import probes
      >>> rng = np.random.default_rng(0)
      >>> y = rng.integers(0, 3, 300)
      >>> x = (np.eye(3, 8)[y] * 3 + rng.normal(size=(300, 8))).astype(np.float32)
      >>> probe = probes.fit_softmax(x, y)
      >>> probe.w.shape, float((probes.score(probe, x).argmax(-1) == y).mean()) > 0.9
      ((8, 3), True)
    """
    return _fit("fit_softmax", "softmax", acts, labels, many=False, C=C, class_weight=class_weight,
                sample_weight=sample_weight, standardize=standardize, cv=cv, n_classes=n_classes, tol=tol,
                max_iter=max_iter, memory=memory, seed=seed, precondition_rows=precondition_rows,
                return_info=return_info)


def fit_many(acts: Any, labels: Any, *, family: Literal["logistic", "softmax"] = "logistic",
             n_classes: int | None = None, C: float | Sequence[float] | Literal["cv"] = 1.0,
             class_weight: None | str | dict | Sequence[float] = None, sample_weight: Any = None,
             standardize: bool = True, cv: int | Any = 5, tol: float = 1e-5, max_iter: int = 500,
             memory: int = 10, seed: int = 0, precondition_rows: int | None = None,
             return_info: bool = False):
    """Fits many linear probes at once: every layer against every target, in one compiled call.

    The fit of :func:`fit_logistic` (or :func:`fit_softmax`, ``family="softmax"``) is
    ``jax.vmap``-ped over layers and targets, so a layer sweep compiles once and runs as one XLA
    program; each probe equals the one fitted alone (its L-BFGS loop stops at its own tolerance).

    Args:
      acts: ``[L, N, D]`` activations of ``L`` layers (or sites) for the same ``N`` rows, or
        ``[N, D]`` for one.
      labels: ``[K, N]`` labels of ``K`` targets, or ``[N]`` for one.
      sample_weight: ``[N]`` shared, or ``[K, N]`` per target. The standardisation of a layer
        uses the rows whose weight is positive for any target.
      family, n_classes: ``"logistic"`` (binary) or ``"softmax"`` with ``n_classes`` classes.
      Other arguments: as :func:`fit_logistic`; CV chooses ``C`` per probe.

    Returns:
      One probe whose leaves have leading axes ``[L, K]`` (an axis is dropped when ``acts`` was
      2-D or ``labels`` 1-D), and a stacked :class:`FitInfo` if ``return_info``. Score the stack
      with ``jax.vmap``.

    Example:
      >>> import jax, numpy as np
      >>> from idesign import probes
      >>> rng = np.random.default_rng(0)
      >>> acts = rng.normal(size=(3, 300, 8)).astype(np.float32)   # 3 layers
      >>> targets = np.stack([acts[1, :, 0] > 0, acts[2, :, 1] > 0]).astype(np.int32)  # 2 targets
      >>> stack = probes.fit_many(acts, targets)
      >>> stack.w.shape
      (3, 2, 8)
      >>> logits = jax.vmap(lambda p, x: jax.vmap(probes.score, (0, None))(p, x))(stack, acts)
      >>> logits.shape
      (3, 2, 300)
    """
    return _fit("fit_many", family, acts, labels, many=True, C=C, class_weight=class_weight,
                sample_weight=sample_weight, standardize=standardize, cv=cv, n_classes=n_classes, tol=tol,
                max_iter=max_iter, memory=memory, seed=seed, precondition_rows=precondition_rows,
                return_info=return_info)
