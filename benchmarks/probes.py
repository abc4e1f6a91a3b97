"""Linear probes against scikit-learn: accuracy, single-probe speed, and a 12-layer sweep.

Data (synthetic, deterministic from ``seed``): ``n_layers`` layers of ``n_rows x dim`` float32
activations that share one binary label. Each layer is ``(z + a_l s u) @ M_l + mu_l`` with ``z``
standard normal, ``s = +-1`` the true class, ``u`` a unit vector, ``a_l`` a signal strength that
rises and falls over the layers, ``M_l`` a random rotation scaled by a decaying spectrum
(singular values ``1/sqrt(1 + k)``, so features are correlated and badly scaled, as residual
streams are) and ``mu_l`` a random offset. The observed label is the true class flipped for
``label_noise`` of the rows. The first ``1 - test_fraction`` rows are for fitting, the rest held out.

Baseline: ``make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", C=C, tol=tol,
max_iter=max_iter))``, the same objective as :func:`idesign.probes.fit_logistic` with
``standardize=True`` (the ``C`` semantics are identical; see ``idesign/probes/_linear.py``),
run to convergence at the same gradient tolerance. Our activations are device arrays already (as
activations captured from a model are); scikit-learn gets numpy arrays.

Metrics (medians of timed runs after one untimed warm-up call; ours and sklearn's alternate):

* ``single_auc_diff`` = |AUC(ours) - AUC(sklearn)| on the held-out rows of the middle layer. Goal <= 0.002.
* ``single_time_ratio`` = our fit time / sklearn's, compilation excluded; ``single_compile_s`` is
  the first call's time minus the median run time. Goal <= 1.0.
* ``sweep_time_ratio`` = :func:`idesign.probes.fit_many` on all layers (one compiled, vmapped
  call, compilation excluded; ``sweep_compile_s``) / sklearn fitting the layers one after another.
  Goal <= 0.33. ``sweep_max_auc_diff`` is the largest held-out AUC difference over the layers.

Writes ``results/benchmarks/probes.json`` (values, goals, whether met, the sizes used, jax
version, device) and prints a table. ``--quick`` uses 20,000 rows instead of 100,000.

Usage: ``python -m benchmarks.probes [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks import _common
from idesign import probes

try:  # the project's own tie-aware AUC when present
    from idesign.metrics import roc_auc as _roc_auc
except ImportError:  # pragma: no cover
    from sklearn.metrics import roc_auc_score as _roc_auc

GOALS = {"single_auc_diff": ("<=", 0.002), "single_time_ratio": ("<=", 1.0), "sweep_time_ratio": ("<=", 0.33)}
DEFAULT_OUT = "results/benchmarks/probes.json"


@dataclasses.dataclass(frozen=True)
class Config:
    n_rows: int = 100_000
    dim: int = 512
    n_layers: int = 12
    test_fraction: float = 0.2
    label_noise: float = 0.1
    C: float = 1.0
    tol: float = 1e-6
    sklearn_max_iter: int = 10_000
    single_repeats: int = 3
    sweep_repeats: int = 1
    seed: int = 0
    preset: str = "full"


FULL = Config()
QUICK = dataclasses.replace(FULL, n_rows=20_000, preset="quick")


def make_data(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """``(acts [L, N, D] float32, labels [N] int32)`` as described in the module docstring."""
    rng = np.random.default_rng(config.seed)
    n, d, L = config.n_rows, config.dim, config.n_layers
    truth = rng.integers(0, 2, n)
    labels = np.where(rng.random(n) < config.label_noise, 1 - truth, truth).astype(np.int32)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(d))
    acts = np.empty((L, n, d), np.float32)
    for layer in range(L):
        strength = 0.3 + 0.9 * np.sin(np.pi * (layer + 1) / (L + 1))
        rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
        mix = (spectrum[:, None] * rotation).astype(np.float32)
        z = rng.standard_normal((n, d), dtype=np.float32)
        z += (strength * (2 * truth - 1))[:, None].astype(np.float32) * u.astype(np.float32)
        np.matmul(z, mix, out=acts[layer])
        acts[layer] += rng.normal(scale=2.0, size=d).astype(np.float32)
    return acts, labels


def _sklearn(config: Config):
    return make_pipeline(StandardScaler(), LogisticRegression(
        C=config.C, solver="lbfgs", tol=config.tol, max_iter=config.sklearn_max_iter))


def _fit_sklearn(config: Config, x: np.ndarray, y: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # "run to convergence" is checked, not assumed
        return _sklearn(config).fit(x, y)


def _auc(labels: np.ndarray, scores: Any) -> float:
    return float(_roc_auc(np.asarray(labels), np.asarray(scores, np.float64)))


def _time_first(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = _common.block(fn())
    return time.perf_counter() - start, out


def _alternate(fns: dict[str, Any], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times the functions in alternation (A B A B ...); also returns each one's last output."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, last[name] = _time_first(fn)
            times[name].append(seconds)
    return times, last


def bench_single(config: Config, acts: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    n_fit = int(round(config.n_rows * (1 - config.test_fraction)))
    layer = config.n_layers // 2
    x_np, y_fit, y_test = acts[layer, :n_fit], labels[:n_fit], labels[n_fit:]
    x_dev, y_dev = jax.device_put(x_np), jax.device_put(y_fit)
    ours = lambda: probes.fit_logistic(x_dev, y_dev, C=config.C, tol=config.tol, return_info=True)
    theirs = lambda: _fit_sklearn(config, x_np, y_fit)
    first_s, _ = _time_first(ours)
    times, last = _alternate({"ours": ours, "sklearn": theirs}, config.single_repeats)
    (probe, info), model = last["ours"], last["sklearn"]
    test = acts[layer, n_fit:]
    auc_ours = _auc(y_test, probes.score(probe, jnp.asarray(test)))
    auc_sklearn = _auc(y_test, model.decision_function(test))
    w_sklearn = model[-1].coef_[0]
    cosine = float(np.dot(probe.w, w_sklearn) / np.linalg.norm(probe.w) / np.linalg.norm(w_sklearn))
    ours_s, sklearn_s = _common.median(times["ours"]), _common.median(times["sklearn"])
    return {
        "single_auc_diff": abs(auc_ours - auc_sklearn),
        "single_time_ratio": ours_s / sklearn_s,
        "single_compile_s": max(first_s - ours_s, 0.0),
        "single_ours_s": ours_s,
        "single_sklearn_s": sklearn_s,
        "single_auc_ours": auc_ours,
        "single_auc_sklearn": auc_sklearn,
        "single_cosine_to_sklearn": cosine,
        "single_ours_iterations": int(info.n_iter),
        "single_ours_converged": bool(info.converged),
        "single_sklearn_iterations": int(model[-1].n_iter_[0]),
    }


def bench_sweep(config: Config, acts: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    n_fit = int(round(config.n_rows * (1 - config.test_fraction)))
    x_np, y_fit, y_test = acts[:, :n_fit], labels[:n_fit], labels[n_fit:]
    x_dev, y_dev = jax.device_put(x_np), jax.device_put(y_fit)
    ours = lambda: probes.fit_many(x_dev, y_dev, C=config.C, tol=config.tol, return_info=True)
    theirs = lambda: [_fit_sklearn(config, x_np[layer], y_fit) for layer in range(config.n_layers)]
    first_s, _ = _time_first(ours)
    times, last = _alternate({"ours": ours, "sklearn": theirs}, config.sweep_repeats)
    (stack, info), models = last["ours"], last["sklearn"]
    test = jnp.asarray(acts[:, n_fit:])
    scores = jax.vmap(probes.score)(stack, test)
    aucs_ours = [_auc(y_test, scores[layer]) for layer in range(config.n_layers)]
    aucs_sklearn = [_auc(y_test, m.decision_function(acts[layer, n_fit:])) for layer, m in enumerate(models)]
    ours_s, sklearn_s = _common.median(times["ours"]), _common.median(times["sklearn"])
    return {
        "sweep_time_ratio": ours_s / sklearn_s,
        "sweep_compile_s": max(first_s - ours_s, 0.0),
        "sweep_ours_s": ours_s,
        "sweep_sklearn_s": sklearn_s,
        "sweep_max_auc_diff": float(np.max(np.abs(np.subtract(aucs_ours, aucs_sklearn)))),
        "sweep_auc_by_layer": [round(a, 4) for a in aucs_ours],
        "sweep_ours_max_iterations": int(np.max(info.n_iter)),
        "sweep_ours_all_converged": bool(np.all(info.converged)),
    }


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    """Runs both comparisons, writes the JSON to ``out`` (unless None) and prints a table."""
    acts, labels = make_data(config)
    metrics = {**bench_single(config, acts, labels), **bench_sweep(config, acts, labels)}
    return _common.finish(metrics, GOALS, config, out,
                          sizes={"n_rows": config.n_rows, "n_fit": int(round(config.n_rows * (1 - config.test_fraction))),
                                 "dim": config.dim, "n_layers": config.n_layers, "dtype": "float32"},
                          baseline="sklearn StandardScaler + LogisticRegression(solver='lbfgs'), same C and tol")


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="20,000 rows instead of 100,000 (CPU minutes)")


if __name__ == "__main__":
    cli()
