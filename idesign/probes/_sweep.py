"""Probe sweeps: one linear probe per site, fitted on training rows, scored on held-out rows.

:func:`grouped_split` splits rows so that no group (an entity, a document, a prompt template) has rows on
both sides: rows of one group are near-duplicates, and a probe scored on a group it was fitted on measures
memorisation, not a readout. :func:`sweep` fits the probes (one vmapped :func:`fit_many` call per
activation width) and returns a :class:`SweepTable` of held-out AUC with a bootstrap interval and accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from idesign import metrics
from idesign.probes._linear import fit_many
from idesign.probes._scoring import predict_proba

Split = float | tuple[Any, Any]


def grouped_split(groups: Any, test_size: float = 0.5, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits rows into ``(train, test)`` index arrays so that every group lies wholly on one side.

    The distinct groups are shuffled by ``seed`` and the first ``round(test_size * n_groups)`` of them
    (at least one, and at most all but one) go to the test side: ``test_size`` is a fraction of the
    groups, not of the rows. Both index arrays are sorted. The same groups and seed give the same split.

    Args:
      groups: ``[N]`` group ids (any hashable values numpy can compare: ints, strings).
      test_size: fraction of the groups held out, strictly between 0 and 1.
      seed: seeds the shuffle of the groups.

    Returns:
      ``(train_idx, test_idx)``, int64 arrays that partition ``range(N)``.

    >>> import idesign as ids
    >>> train, test = ids.probes.grouped_split(['a', 'a', 'b', 'c', 'c', 'd'], 0.5, seed=0)
    >>> sorted(train.tolist() + test.tolist())
    [0, 1, 2, 3, 4, 5]
    >>> {['a', 'a', 'b', 'c', 'c', 'd'][i] for i in train} & {['a', 'a', 'b', 'c', 'c', 'd'][i] for i in test}
    set()
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"grouped_split: groups must be one id per row, shape [N]; got shape {g.shape}.")
    if not 0 < test_size < 1:
        raise ValueError(f"grouped_split: test_size = {test_size!r}; expected a fraction of the groups strictly "
                         "between 0 and 1 (e.g. 0.25).")
    unique, inverse = np.unique(g, return_inverse=True)
    if len(unique) < 2:
        raise ValueError(f"grouped_split: {len(unique)} distinct group(s) in {len(g)} rows; a grouped split needs at "
                         "least 2 (one per side). Pass finer groups, or split without groups.")
    n_test = int(min(max(round(test_size * len(unique)), 1), len(unique) - 1))
    order = np.random.default_rng(seed).permutation(len(unique))
    is_test = np.zeros(len(unique), bool)
    is_test[order[:n_test]] = True
    test_rows = is_test[inverse]
    return np.flatnonzero(~test_rows), np.flatnonzero(test_rows)


@dataclasses.dataclass(frozen=True)
class SweepTable:
    """One row per site: held-out AUC, its bootstrap interval, accuracy, and the split's sizes.

    ``rows()`` gives a list of dicts (``pandas.DataFrame(table.rows())`` for a data frame); ``str(table)``
    a text table; :meth:`plot` (or :func:`plot_sweep`) a figure. ``probes`` maps each site to its probe.
    """

    sites: tuple[str, ...]
    auc: np.ndarray
    auc_low: np.ndarray
    auc_high: np.ndarray
    accuracy: np.ndarray
    n_train: int
    n_test: int
    alpha: float
    probes: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    def rows(self) -> list[dict[str, Any]]:
        return [{"site": s, "auc": float(a), "auc_low": float(lo), "auc_high": float(hi), "accuracy": float(acc),
                 "n_train": self.n_train, "n_test": self.n_test}
                for s, a, lo, hi, acc in zip(self.sites, self.auc, self.auc_low, self.auc_high, self.accuracy)]

    def best(self) -> str:
        """The site with the highest held-out AUC."""
        return self.sites[int(np.argmax(self.auc))]

    def __str__(self) -> str:
        width = max(len("site"), *(len(s) for s in self.sites))
        level = f"{100 * (1 - self.alpha):g}% CI"
        lines = [f"{'site':<{width}}  {'AUC':>6}  {level:>14}  {'accuracy':>8}"]
        for r in self.rows():
            lines.append(f"{r['site']:<{width}}  {r['auc']:6.3f}  [{r['auc_low']:.3f}, {r['auc_high']:.3f}]  "
                         f"{r['accuracy']:8.3f}")
        lines.append(f"({self.n_train} training rows, {self.n_test} held-out rows)")
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """See :func:`plot_sweep`."""
        return plot_sweep(self, ax=ax)


def _as_rows(name: str, x: Any, n: int | None) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    if a.ndim != 2:
        raise ValueError(f"sweep: acts_by_site[{name!r}] must be [N, D] (one vector per row); got shape {a.shape}. "
                         "Select one position per row first (collect_activations(..., positions='last') or reduce=).")
    if n is not None and len(a) != n:
        raise ValueError(f"sweep: acts_by_site[{name!r}] has {len(a)} rows but labels has {n}; every site needs one "
                         "row per label.")
    return a


def _split_indices(split: Split, groups: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(split, tuple):
        if groups is not None:
            raise ValueError("sweep: give groups= or an explicit split=(train, test), not both (the explicit split "
                             "decides the sides; check it with grouped_split's rule yourself).")
        train, test = (np.asarray(s) for s in split)
        train, test = (np.flatnonzero(s) if s.dtype == bool else s.astype(np.int64) for s in (train, test))
        if np.intersect1d(train, test).size:
            raise ValueError(f"sweep: split=(train, test) shares rows {np.intersect1d(train, test)[:5].tolist()}; "
                             "held-out rows must not be fitted on.")
        if train.size == 0 or test.size == 0 or min(train.min(), test.min()) < 0 or max(train.max(), test.max()) >= n:
            raise ValueError(f"sweep: split=(train, test) must hold non-empty row indices in [0, {n}) (or boolean "
                             "masks of length N).")
        return train, test
    if isinstance(split, (float, int)) and not isinstance(split, bool):
        g = np.arange(n) if groups is None else np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"sweep: groups has shape {g.shape}; expected one group id per row, shape ({n},).")
        return grouped_split(g, float(split), seed=seed)
    raise TypeError(f"sweep: split = {split!r}; expected the held-out fraction (a float in (0, 1)) or a pair "
                    "(train_idx, test_idx).")


def _group_bootstrap(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int, alpha: float,
                     seed: int) -> tuple[float, float]:
    # Rows of one group are correlated, so a row bootstrap would give too narrow an interval: resample groups.
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(unique))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        index = np.concatenate([members[k] for k in rng.integers(0, len(unique), len(unique))])
        y = labels[index]
        if y.min() != y.max():  # a resample with one class has no AUC
            values.append(metrics.roc_auc(y, scores[index]))
    if len(values) < n_boot // 2:
        raise ValueError(f"sweep: only {len(values)} of {n_boot} group resamples of the held-out rows hold both "
                         "classes; hold out more groups (a larger split fraction) for a meaningful interval.")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sweep(acts_by_site: Mapping[str, Any], labels: Any, *, groups: Any = None, split: Split = 0.5, seed: int = 0,
          C: Any = 1.0, n_boot: int = 1000, alpha: float = 0.05, **fit_kwargs: Any) -> SweepTable:
    """Fits a logistic probe per site on training rows and scores it on held-out rows.

    Sites of the same width are fitted together by one :func:`fit_many` call. On the held-out rows
    the table reports ROC AUC (:func:`idesign.metrics.roc_auc`) with a percentile bootstrap interval
    (:func:`idesign.metrics.bootstrap_ci`, class-stratified; with ``groups``, whole groups are
    resampled instead, since rows of one group are not independent) and accuracy at probability 0.5.

    Args:
      acts_by_site: ``{site: [N, D_site]}``, the same ``N`` rows for every site.
      labels: ``[N]`` binary labels.
      groups: optional ``[N]`` group ids: no group is on both sides of the split (:func:`grouped_split`).
      split: the held-out fraction (of the groups, or of the rows without ``groups``), or an explicit
        ``(train_idx, test_idx)`` pair of index arrays or boolean masks.
      seed: seeds the split and the bootstrap.
      C: inverse L2 strength, as scikit-learn (``"cv"`` chooses it per site on the training rows).
      n_boot, alpha: bootstrap resamples and the interval's level ``1 - alpha``.
      **fit_kwargs: passed to :func:`fit_many` (``class_weight``, ``standardize``, ``max_iter``, ...).

    Returns:
      A :class:`SweepTable`, sites in the order given.

    >>> import numpy as np, idesign as ids
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 200)
    >>> acts = {'noise': rng.normal(size=(200, 4)), 'signal': rng.normal(size=(200, 4)) + 2.0 * y[:, None]}
    >>> table = ids.probes.sweep(acts, y, groups=np.arange(200) // 4, n_boot=100)
    >>> table.best(), table.n_train + table.n_test
    ('signal', 200)
    """
    if not isinstance(acts_by_site, Mapping) or not acts_by_site:
        raise TypeError("sweep: acts_by_site must be a non-empty dict {site: [N, D] activations}; got "
                        f"{type(acts_by_site).__name__}.")
    y = np.asarray(jax.device_get(labels))
    if y.ndim != 1:
        raise ValueError(f"sweep: labels must be [N] binary labels; got shape {y.shape}.")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"sweep: labels must be binary 0/1; got values {np.unique(y)[:5].tolist()}.")
    y = y.astype(np.int32)
    acts = {str(site): _as_rows(str(site), x, len(y)) for site, x in acts_by_site.items()}
    train, test = _split_indices(split, groups, len(y), seed)
    for side, idx in (("training", train), ("held-out", test)):
        if np.unique(y[idx]).size < 2:
            raise ValueError(f"sweep: the {side} rows ({idx.size}) hold only class {int(y[idx][0])}; both classes are "
                             "needed on each side. Change seed or split, or check the labels.")
    probes: dict[str, Any] = {}
    probs: dict[str, np.ndarray] = {}
    by_width: dict[int, list[str]] = {}
    for site, x in acts.items():
        by_width.setdefault(x.shape[1], []).append(site)
    for sites in by_width.values():
        X = np.stack([acts[s] for s in sites]).astype(np.float32)                # [L, N, D]
        stack = fit_many(X[:, train], y[train], C=C, seed=seed, **fit_kwargs)
        p = np.asarray(jax.vmap(predict_proba)(stack, X[:, test]))                # [L, n_test]
        for k, site in enumerate(sites):
            probes[site] = jax.tree.map(lambda leaf, k=k: leaf[k], stack)
            probs[site] = p[k].astype(np.float64)
    order = tuple(acts)
    auc, low, high, acc = [], [], [], []
    for site in order:
        auc.append(metrics.roc_auc(y[test], probs[site]))
        if groups is None:
            _, lo, hi = metrics.bootstrap_ci(metrics.roc_auc, y[test], probs[site], n_boot=n_boot, alpha=alpha, seed=seed)
        else:
            lo, hi = _group_bootstrap(y[test], probs[site], np.asarray(groups)[test], n_boot, alpha, seed)
        low.append(lo)
        high.append(hi)
        acc.append(metrics.accuracy(y[test], probs[site]))
    return SweepTable(order, np.array(auc), np.array(low), np.array(high), np.array(acc), int(train.size),
                      int(test.size), alpha, probes)


def plot_sweep(table: SweepTable, ax: Any = None) -> Any:
    """Held-out AUC per site with its bootstrap interval, and accuracy, against chance (0.5).

    Args:
      table: a :class:`SweepTable` from :func:`sweep`.
      ax: a matplotlib axes to draw into; default: a new figure.

    Returns:
      The matplotlib ``Figure``.

    >>> import numpy as np, idesign as ids
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 100)
    >>> table = ids.probes.sweep({'a': rng.normal(size=(100, 3)) + y[:, None]}, y, n_boot=50)
    >>> fig = ids.probes.plot_sweep(table)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['a']
    """
    import matplotlib.pyplot as plt
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(table.sites) + 2), 3.5))
    else:
        fig = ax.figure
    x = np.arange(len(table.sites))
    ax.errorbar(x, table.auc, yerr=[table.auc - table.auc_low, table.auc_high - table.auc], fmt="o-", capsize=3,
                label=f"AUC ({100 * (1 - table.alpha):g}% CI)")
    ax.plot(x, table.accuracy, "s--", label="accuracy")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xticks(x, table.sites, rotation=45 if len(table.sites) > 4 else 0, ha="right" if len(table.sites) > 4 else "center")
    ax.set_ylim(min(0.4, float(np.min(table.auc_low)) - 0.05), 1.02)
    ax.set_ylabel(f"held out ({table.n_test} rows)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
