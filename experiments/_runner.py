"""The experiments runner shared by the studies: seeds × arms, mean ± sd, paired differences, tables.

A study states its world, its arms and its metrics as one function ``run_seed(seed) -> {arm: {metric: value}}``
(every arm of a seed sees the same data and the same base model, which is what makes the differences
*paired*). :func:`run` calls it for every seed, aggregates, and writes ``results/<study>/metrics.json`` with
flat keys and ``results/<study>/per_seed.json`` with the raw values:

    <arm>.<metric>_mean, <arm>.<metric>_std       mean and sample sd (ddof=1; 0 with one seed) over seeds
    <a>_minus_<b>.<metric>_mean                     mean over seeds of the paired difference a - b
    <a>_minus_<b>.<metric>_se                       its paired standard error: sd(a - b, ddof=1) / sqrt(n)
    <a>_minus_<b>.<metric>_n                        n, the number of seeds
    n_seeds, minutes                                and whatever ``extra`` the study adds

Non-finite values propagate (a nan in one seed makes the mean nan; JSON writes null), so a broken seed is
visible rather than averaged away. :func:`arm_table` and :func:`paired_table` render the Markdown tables of
the study's README section (and so of ``results/REPORT.md``).

Example (a study in a few lines)::

    from experiments import _common, _runner

    def run_seed(seed):
        base = ...  # e.g. ids.pretrain.cached(...): one base model per seed, shared by the arms
        return {"full_ft": {"t1_acc": ...}, "freeze_circuit": {"t1_acc": ...}}

    result = _runner.run("my_study", config.seeds, run_seed, pairs=[("freeze_circuit", "full_ft")])
    _common.write_readme("my_study", "## my_study\\n\\n" + _runner.arm_table(result.summary, ["full_ft",
                         "freeze_circuit"], ["t1_acc"]) + "\\n\\n" + _runner.paired_table(result.summary,
                         [("freeze_circuit", "full_ft")], ["t1_acc"]))
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from experiments import _common

PerSeed = Mapping[str, Mapping[str, float]]   # {arm: {metric: value}}


class Paired(NamedTuple):
    """A paired difference over seeds: mean of ``a - b``, its standard error, and the number of pairs."""
    mean: float
    se: float
    n: int


class Result(NamedTuple):
    """What :func:`run` returns: the seeds, the raw ``{arm: {metric: value}}`` per seed, the flat summary."""
    seeds: tuple[int, ...]
    per_seed: tuple[dict[str, dict[str, float]], ...]
    summary: dict[str, Any]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of ``a[i] - b[i]``, its standard error ``sd(a - b, ddof=1) / sqrt(n)`` (0 for n = 1), and n.

    >>> d = paired_difference([0.9, 0.8, 0.7], [0.5, 0.6, 0.4])   # differences 0.4, 0.2, 0.3
    >>> round(d.mean, 4), round(d.se, 4), d.n                      # sd 0.1, se 0.1 / sqrt(3)
    (0.3, 0.0577, 3)
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired_difference needs two equally long non-empty 1-D sequences; got shapes "
                         f"{x.shape} and {y.shape}.")
    d = x - y
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return Paired(float(d.mean()), se, int(d.size))


def _values(per_seed: Sequence[PerSeed], arm: str, metric: str) -> list[float]:
    out = []
    for i, row in enumerate(per_seed):
        if arm not in row:
            raise KeyError(f"seed #{i} has no arm {arm!r}; its arms are {sorted(row)}.")
        if metric not in row[arm]:
            raise KeyError(f"seed #{i}, arm {arm!r} has no metric {metric!r}; its metrics are {sorted(row[arm])}.")
        out.append(float(row[arm][metric]))
    return out


def summarize(per_seed: Sequence[PerSeed], *, pairs: Iterable[tuple[str, str]] = ()) -> dict[str, float]:
    """Flat ``{key: value}`` from per-seed ``{arm: {metric: value}}`` (keys in the module docstring).

    Every seed must report the same arms and metrics (the first seed's set is the reference). For each
    pair ``(a, b)``, every metric the two arms share gets a paired difference.

    >>> rows = [{'x': {'acc': 0.9}, 'y': {'acc': 0.5}}, {'x': {'acc': 0.7}, 'y': {'acc': 0.6}}]
    >>> s = summarize(rows, pairs=[('x', 'y')])
    >>> round(s['x.acc_mean'], 3), round(s['x.acc_std'], 4), round(s['x_minus_y.acc_mean'], 3), s['x_minus_y.acc_n']
    (0.8, 0.1414, 0.25, 2)
    """
    if not per_seed:
        raise ValueError("summarize needs at least one seed.")
    reference = per_seed[0]
    for i, row in enumerate(per_seed[1:], 1):
        if set(row) != set(reference):
            raise ValueError(f"seed #{i} has arms {sorted(row)}, seed #0 has {sorted(reference)}.")
        for arm in row:
            if set(row[arm]) != set(reference[arm]):
                raise ValueError(f"seed #{i}, arm {arm!r} has metrics {sorted(row[arm])}, "
                                 f"seed #0 has {sorted(reference[arm])}.")
    out: dict[str, float] = {"n_seeds": len(per_seed)}
    for arm, metrics in reference.items():
        for metric in metrics:
            mean, sd = _common.mean_std(_values(per_seed, arm, metric))
            out[f"{arm}.{metric}_mean"], out[f"{arm}.{metric}_std"] = mean, sd
    for a, b in pairs:
        for arm in (a, b):
            if arm not in reference:
                raise KeyError(f"pair ({a!r}, {b!r}): no arm {arm!r}; the arms are {sorted(reference)}.")
        for metric in reference[a]:
            if metric in reference[b]:
                d = paired_difference(_values(per_seed, a, metric), _values(per_seed, b, metric))
                out[f"{a}_minus_{b}.{metric}_mean"] = d.mean
                out[f"{a}_minus_{b}.{metric}_se"] = d.se
                out[f"{a}_minus_{b}.{metric}_n"] = d.n
    return out


def run(study: str, seeds: Sequence[int], run_seed: Callable[[int], PerSeed], *,
        pairs: Iterable[tuple[str, str]] = (), extra: Mapping[str, Any] | None = None,
        progress: bool = True) -> Result:
    """Runs ``run_seed`` for every seed, aggregates (:func:`summarize`) and writes the study's metrics.

    Writes ``results/<study>/metrics.json`` (the summary plus ``minutes`` and ``extra``) and
    ``results/<study>/per_seed.json`` (``{seed: {arm: {metric: value}}}``).
    """
    pairs = list(pairs)
    t0 = time.perf_counter()
    per_seed = []
    for seed in tqdm(list(seeds), desc=f"{study} seeds", disable=not progress):
        row = run_seed(int(seed))
        per_seed.append({arm: {m: float(v) for m, v in metrics.items()} for arm, metrics in row.items()})
    summary = summarize(per_seed, pairs=pairs)
    summary["minutes"] = (time.perf_counter() - t0) / 60
    summary.update(extra or {})
    _common.write_metrics(study, summary)
    raw = {str(s): row for s, row in zip(seeds, per_seed)}
    (_common.results_dir(study) / "per_seed.json").write_text(
        json.dumps(raw, indent=2, sort_keys=True, default=lambda x: None) + "\n")
    return Result(tuple(int(s) for s in seeds), tuple(per_seed), summary)


def pm(summary: Mapping[str, Any], arm: str, metric: str, digits: int = 3) -> str:
    """``mean ± sd`` of ``<arm>.<metric>`` (``n/a`` where it is missing or not finite).

    >>> pm({'x.acc_mean': 0.8, 'x.acc_std': 0.1414}, 'x', 'acc')
    '0.800 ± 0.141'
    """
    mean, sd = summary.get(f"{arm}.{metric}_mean"), summary.get(f"{arm}.{metric}_std")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None and math.isfinite(sd) else f"{mean:.{digits}f}"


def arm_table(summary: Mapping[str, Any], arms: Sequence[str], metrics: Sequence[str], *,
              labels: Mapping[str, str] | None = None) -> str:
    """A Markdown table, one row per arm, one ``mean ± sd`` column per metric.

    >>> print(arm_table({'x.acc_mean': 0.8, 'x.acc_std': 0.1}, ['x'], ['acc']))
    | arm | acc |
    |---|---|
    | x | 0.800 ± 0.100 |
    """
    labels = labels or {}
    header = ["arm", *(labels.get(m, m) for m in metrics)]
    return _common.markdown_table(header, [[arm, *(pm(summary, arm, m) for m in metrics)] for arm in arms])


def paired_table(summary: Mapping[str, Any], pairs: Sequence[tuple[str, str]], metrics: Sequence[str]) -> str:
    """A Markdown table of paired differences: ``a − b``, metric, mean, paired SE, mean / SE, n.

    >>> s = {'x_minus_y.acc_mean': 0.25, 'x_minus_y.acc_se': 0.15, 'x_minus_y.acc_n': 2}
    >>> print(paired_table(s, [('x', 'y')], ['acc']))
    | difference | metric | mean | paired SE | mean / SE | n |
    |---|---|---|---|---|---|
    | x − y | acc | 0.250 | 0.150 | 1.7 | 2 |
    """
    rows = []
    for a, b in pairs:
        for m in metrics:
            key = f"{a}_minus_{b}.{m}"
            if f"{key}_mean" not in summary:
                continue
            mean, se, n = summary[f"{key}_mean"], summary[f"{key}_se"], summary[f"{key}_n"]
            ratio = f"{mean / se:.1f}" if se and math.isfinite(se) and math.isfinite(mean) else "n/a"
            rows.append([f"{a} − {b}", m, float(mean), float(se), ratio, n])
    return _common.markdown_table(["difference", "metric", "mean", "paired SE", "mean / SE", "n"], rows)
