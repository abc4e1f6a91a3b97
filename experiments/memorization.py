"""Memorization: does removing low-curvature weight components erase memorized data but keep skills?

Hypothesis (Merullo et al. 2025, arXiv 2510.24256; ``docs/methods.md`` §3). In the K-FAC eigenbasis
of a dense layer, memorized items are stored in *low-curvature* components (directions few examples
use), shared structure in high-curvature ones. Keeping components in descending curvature
``Π_ij = μ_i λ_j`` until a share ``ρ`` of the mass and zeroing the rest (``edit.prune_low_curvature``)
should (a) make a classifier forget noisy labels it memorized and fall back to the true labels,
and (b) in a language model, destroy verbatim recall of memorized strings while keeping skills in
the paper's order of retention: memorized text ≪ arithmetic < rare facts < frequent facts < logic.

Settings and arms.
- ``classification``: an MLP on a rule-governed task (label = argmax of a fixed linear teacher over
  Gaussian features), 10% of training labels replaced by a different random class, trained until
  the noisy labels are memorized (``train_acc_noisy`` reports how far). Arms: ``kfac``
  (``prune_low_curvature`` on the hidden layers, true Fisher on the training inputs), ``svd``
  (``prune_svd``, energy ``ρ``) and ``random`` (``prune_random``: at each ρ, K-FAC's kept component count
  per layer, components drawn at random — the control for the curvature *ranking*), with ``ρ=1`` (no edit)
  as the control.
- ``lm``: the reference transformer trained on the skill mixture of :mod:`idesign.data.skills` (once per
  pretraining config and seed: ``ids.pretrain.cached`` restores it on later runs). Its
  memorized strings are samples of the same Markov language as its training text and its held-out text
  (only the repetition differs), so the band diagnostic compares inputs of one distribution; the
  ``unseen_strings`` control scores fresh samples as if memorized (the language's chance recall). K-FAC
  on the MLP ``up``/``down`` layers of every candidate set in ``lm_layer_sets``; the same three arms,
  plus ``oracle``: the same training without the memorized strings (exact unlearning: what an edit could
  at best reach), on the first ``oracle_seeds`` seeds.

How ρ is chosen (one grid ``rhos`` per method, on *sweep* data only; all reported numbers are on
held-out *report* data; each sweep/report pair is a disjoint alternating split).
- classification: the ρ with the lowest memorized recall on the sweep half of the noisy training
  items, among those whose sweep-validation accuracy is at least the unedited one minus
  ``max_val_drop``; ties go to the larger ρ (the smaller edit); ρ = 1 is always admissible.
  Reported on the other half of the noisy items and on the report half of the validation set.
- lm: the (layer set, ρ) with the lowest exact recall of the sweep half of the memorized strings, among
  those whose held-out perplexity (sweep half of ``heldout_text``) grows by at most ``max_ppl_ratio``
  (the paper's 7B edit: 19.04 → 22.84, ×1.20); ties to the larger ρ, then the earlier set. Retention of the
  other skills is then *measured* there, on the report halves; it played no part in the choice.

Metrics (``results/memorization/metrics.json``; each also with ``_std`` over seeds, and ``n_seeds``):
  classification.train_acc_noisy, classification.train_acc_clean   before editing: share of noisy
                              items given their noisy label (memorization reached), clean train acc.
  classification.<m>.memorized_recall_before|after   share of held-out noisy training items still
                              given their noisy label, m in {kfac, svd, random}
  classification.<m>.true_label_recovery_before|after  share of those items given their true label
  classification.<m>.val_acc_before|after   accuracy on the report half of the clean validation set
  classification.<m>.rho      the chosen ρ
  classification.bands.ratio.<b>  band diagnostic on the first pruned layer: mean response of
                              curvature band b (0 = highest curvature, ``n_bands`` equal bands) to
                              noisy vs clean training inputs (>1: noisy items drive it harder)
  lm.before.acc.<skill>       exact-match accuracy before editing (report halves), skill in
                              memorized, arithmetic, facts_frequent, facts_rare, logic, unseen_strings
  lm.<a>.acc.<skill>          the same after arm a in {kfac, svd, random, oracle}
  lm.<a>.retention.<skill>    acc after / acc before (memorized: exact recall after / before)
  lm.<a>.gap.<s>.<t>          retention of t minus retention of s, per seed, for adjacent skills of the
                              paper's order memorized < arithmetic < facts_rare < facts_frequent < logic
                              (mean ± sd = the paired gap)
  lm.<a>.heldout_ppl_ratio    held-out perplexity after / before (report half)
  lm.<m>.rho, lm.<m>.layer_set  the chosen ρ and index into ``lm_layer_sets`` (edits only)
  lm.heldout_ppl_before       held-out perplexity of the unedited model
  lm.train_loss_final         mean LM training loss over the last logging window
  lm.bands.ratio.<b>          band diagnostic on ``band_layer``: unique memorized-string documents vs
                              held-out text documents of the same language
  minutes                     wall-clock minutes for everything

Plots: ``retention_vs_rho.png`` (sweep-split retention per skill against ρ, every edit, on the layer set K-FAC chose most),
``classification_vs_rho.png`` (memorized recall, true-label recovery and validation accuracy against ρ),
``band_ratios.png`` (band activation ratios, both settings).

Run: ``python -m experiments.memorization --quick`` (CPU, 5 seeds; see the README for the measured time) or ``--full`` (GPU preset,
larger models and corpora; not run on the CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import idesign as ids  # noqa: E402
from experiments import _common  # noqa: E402
from idesign import curvature, edit, evaluation  # noqa: E402
from idesign.data import skills  # noqa: E402

NAME = "memorization"
METHODS = ("kfac", "svd", "random")       # edits; random = the K-FAC edit's component counts, chosen at random
LM_COLUMNS = ["tokens", "loss_mask", "valid"]
PAPER_ORDER = ("memorized", "arithmetic", "facts_rare", "facts_frequent", "logic")   # ascending retention (paper)
EVAL_SKILLS = skills.SKILLS + skills.CONTROLS


@dataclasses.dataclass(frozen=True)
class Config:
    # classification
    cls_features: int = 16
    cls_classes: int = 4
    cls_train: int = 600
    cls_val: int = 2000
    cls_noise: float = 0.1
    cls_hidden: int = 128
    cls_steps: int = 1500
    cls_lr: float = 1e-3
    cls_layers: tuple[str, ...] = ("fc1", "fc2")
    max_val_drop: float = 0.02
    # lm
    corpus: skills.SkillConfig = skills.SkillConfig(n_strings=32, string_len=10, prefix_len=3, string_repeats=40,
                                                    min_fact_repeats=3, arithmetic_train_fraction=0.8)
    # candidate edit sites: (name, layers); the layer set is chosen with ρ on the sweep split
    # Single matrices too: the paper edits and measures weight matrices one at a time (issue 14.4, h14m).
    lm_layer_sets: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("block 0", ("blocks.0.mlp.up", "blocks.0.mlp.down")), ("block 1", ("blocks.1.mlp.up", "blocks.1.mlp.down")),
        ("both", ("blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.1.mlp.up", "blocks.1.mlp.down")),
        ("b0.up", ("blocks.0.mlp.up",)), ("b0.down", ("blocks.0.mlp.down",)),
        ("b1.up", ("blocks.1.mlp.up",)), ("b1.down", ("blocks.1.mlp.down",)))
    band_layer: str = "blocks.0.mlp.up"
    oracle_seeds: int = 2             # the retrain-without-memorized-strings oracle runs on the first seeds
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 64
    steps: int = 2000                 # 1,200 steps leave held-out addition unlearned (accuracy 0.14 over 5 seeds)
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    max_ppl_ratio: float = 1.2
    kfac_batch_size: int = 256
    # both
    fisher: str = "true"
    rhos: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)
    # LM ρ grid (None: ``rhos``): 0.01 steps where memorized recall falls from 1 to 0 (K-FAC, seed 0, 0.88-0.92).
    lm_rhos: tuple[float, ...] | None = (0.8, 0.86, 0.88, 0.89, 0.9, 0.91, 0.92, 0.95, 0.98)
    n_bands: int = 10
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


QUICK = Config()
FULL = Config(cls_features=32, cls_classes=10, cls_train=10_000, cls_val=10_000, cls_hidden=1024, cls_steps=10_000,
              corpus=skills.SkillConfig(n_symbols=48, n_strings=256, string_len=16, prefix_len=4, string_repeats=60,
                                        n_text_docs=30_000, n_entities=1000, n_cities=32, fact_docs=40_000, min_fact_repeats=3,
                                        n_pattern_train=40_000, n_eval=1000, n_heldout_text=2000),
              d_model=256, n_layers=6, n_heads=8, batch_size=128, steps=20_000, learning_rate=1e-3,
              lm_layer_sets=tuple((f"block {i}", (f"blocks.{i}.mlp.up", f"blocks.{i}.mlp.down")) for i in range(6)),
              oracle_seeds=5, lm_rhos=None,
              rhos=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99), seeds=(0, 1, 2, 3, 4))


# --------------------------------------------------------------------------- ρ selection


def choose_rho(rhos: Sequence[float], objective: Sequence[float], admissible: Sequence[bool]) -> float:
    """The ρ with the lowest ``objective`` among the admissible ones (ties → larger ρ); 1.0 if none is.

    >>> choose_rho([0.5, 0.8, 0.9], [0.1, 0.1, 0.4], [False, True, True])
    0.8
    """
    i = choose_setting(rhos, objective, admissible)
    return 1.0 if i is None else float(rhos[i])


def choose_setting(rhos: Sequence[float], objective: Sequence[float], admissible: Sequence[bool]) -> int | None:
    """Index of the admissible setting with the lowest ``objective``; ties → larger ρ, then the earlier one.

    ``None`` when nothing is admissible (the caller then leaves the model unedited).

    >>> choose_setting([0.5, 0.8, 0.8, 0.9], [0.1, 0.1, 0.1, 0.4], [False, True, True, True])
    1
    """
    best, best_i = (np.inf, 0.0), None
    for i, (rho, obj, ok) in enumerate(zip(rhos, objective, admissible)):
        if ok and (obj, -rho) < best:
            best, best_i = (obj, -rho), i
    return best_i


# --------------------------------------------------------------------------- classification


class MLP(nnx.Module):
    """``fc0 → relu → fc1 → relu → fc2``: logits over classes."""

    def __init__(self, d_in: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.fc0 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.fc1 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(nnx.relu(self.fc0(x)))))


def make_noisy_task(config: Config, seed: int) -> dict[str, np.ndarray]:
    """Gaussian features, labels from a fixed linear teacher; ``cls_noise`` of training labels flipped."""
    rng = np.random.default_rng([seed, 11])
    teacher = rng.normal(size=(config.cls_features, config.cls_classes))
    x_train = rng.normal(size=(config.cls_train, config.cls_features)).astype(np.float32)
    x_val = rng.normal(size=(config.cls_val, config.cls_features)).astype(np.float32)
    y_true, y_val = (x_train @ teacher).argmax(1), (x_val @ teacher).argmax(1)
    noisy = np.zeros(config.cls_train, bool)
    noisy[rng.choice(config.cls_train, int(round(config.cls_noise * config.cls_train)), replace=False)] = True
    shift = rng.integers(1, config.cls_classes, config.cls_train)       # always a *different* class
    y_train = np.where(noisy, (y_true + shift) % config.cls_classes, y_true)
    half = np.zeros(config.cls_train, bool)
    half[np.flatnonzero(noisy)[::2]] = True                              # sweep half of the noisy items
    return {"x_train": x_train, "y_train": y_train, "y_true": y_true, "noisy": noisy, "noisy_sweep": half,
            "x_val": x_val, "y_val": y_val, "val_sweep": np.arange(config.cls_val) % 2 == 0}


@functools.lru_cache(maxsize=4)
def _classifier_machinery(config: Config):
    """The functional MLP and its jitted full-batch trainer, built once per config so seeds share compilations."""
    model = MLP(config.cls_features, config.cls_hidden, config.cls_classes, nnx.Rngs(0))
    apply, _ = ids.models.from_nnx(model, jnp.zeros((1, config.cls_features)))
    optimizer = optax.adam(config.cls_lr)

    @jax.jit
    def run(params, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x)[0], y).mean()

        def body(_, carry):
            p, s = carry
            u, s = optimizer.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s
        return jax.lax.fori_loop(0, config.cls_steps, body, (params, optimizer.init(params)))[0]

    return apply, run


def train_classifier(config: Config, task: dict[str, np.ndarray], seed: int):
    """Full-batch Adam for ``cls_steps`` steps: long enough to memorize the flipped labels."""
    apply, run = _classifier_machinery(config)
    model = MLP(config.cls_features, config.cls_hidden, config.cls_classes, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return apply, run(params, jnp.asarray(task["x_train"]), jnp.asarray(task["y_train"]))


def _predict(apply, params, x) -> np.ndarray:
    return np.asarray(_jit_logits(apply)(params, jnp.asarray(x)).argmax(-1))


@functools.lru_cache(maxsize=8)
def _jit_logits(apply):
    return jax.jit(lambda p, x: apply(p, x)[0])


def _cls_scores(apply, params, task, noisy_rows: np.ndarray, val_rows: np.ndarray) -> dict[str, float]:
    pred_train = _predict(apply, params, task["x_train"][noisy_rows])
    pred_val = _predict(apply, params, task["x_val"][val_rows])
    return {"memorized_recall": float((pred_train == task["y_train"][noisy_rows]).mean()),
            "true_label_recovery": float((pred_train == task["y_true"][noisy_rows]).mean()),
            "val_acc": float((pred_val == task["y_val"][val_rows]).mean())}


def run_classification(config: Config, seed: int) -> tuple[dict[str, float], dict]:
    task = make_noisy_task(config, seed)
    apply, params = train_classifier(config, task, seed)
    pred = _predict(apply, params, task["x_train"])
    row = {"classification.train_acc_noisy": float((pred == task["y_train"])[task["noisy"]].mean()),
           "classification.train_acc_clean": float((pred == task["y_train"])[~task["noisy"]].mean())}
    data = {"inputs": task["x_train"], "labels": task["y_train"]}
    forward = curvature.ClassifierForward(apply)
    factors = curvature.collect_factors(apply, params, data, list(config.cls_layers), key=seed, fisher=config.fisher,
                                        forward=forward, batch_size=250, progress=False)
    eigen = curvature.eigendecompose(factors)
    sweep_noisy = task["noisy"] & task["noisy_sweep"]
    report_noisy = task["noisy"] & ~task["noisy_sweep"]
    sweep_val, report_val = task["val_sweep"], ~task["val_sweep"]
    before_sweep = _cls_scores(apply, params, task, sweep_noisy, sweep_val)
    before = _cls_scores(apply, params, task, report_noisy, report_val)
    curves = {}
    for method in METHODS:
        sweep = [_cls_scores(apply, _edit(method, params, eigen, config.cls_layers, rho, seed), task, sweep_noisy, sweep_val)
                 for rho in config.rhos]
        curves[method] = sweep
        rho = choose_rho(config.rhos, [s["memorized_recall"] for s in sweep],
                         [s["val_acc"] >= before_sweep["val_acc"] - config.max_val_drop for s in sweep])
        after = _cls_scores(apply, _edit(method, params, eigen, config.cls_layers, rho, seed), task, report_noisy, report_val)
        row[f"classification.{method}.rho"] = rho
        for k in ("memorized_recall", "true_label_recovery", "val_acc"):
            row[f"classification.{method}.{k}_before"] = before[k]
            row[f"classification.{method}.{k}_after"] = after[k]
    layer = config.cls_layers[0]
    bands = edit.curvature_band_activations(
        apply, params, eigen[layer], layer, {"inputs": task["x_train"][task["noisy"]]},
        {"inputs": task["x_train"][~task["noisy"]]}, config.n_bands, forward=forward)
    row.update({f"classification.bands.ratio.{b}": float(r) for b, r in enumerate(bands.ratio)})
    return row, {"curves": curves, "before_sweep": before_sweep}


def _edit(method: str, params, eigen, layers, rho: float, seed: int = 0):
    """The edited parameters: ``kfac``, ``svd`` (energy ρ), or ``random`` — K-FAC's kept count per layer at
    this ρ, components drawn at random (a fresh draw per seed, ρ and layer set)."""
    if rho >= 1.0:
        return params
    if method == "kfac":
        return edit.prune_low_curvature(params, eigen, list(layers), rho)[0]
    if method == "svd":
        return edit.prune_svd(params, list(layers), rho)[0]
    report = edit.prune_low_curvature(params, eigen, list(layers), rho)[1]
    key = jax.random.fold_in(jax.random.key(seed), int(round(rho * 1000)) + 1000 * len(layers))
    return edit.prune_random(params, eigen, {name: report[name]["kept"] for name in layers}, key=key)[0]


# --------------------------------------------------------------------------- language model


@functools.lru_cache(maxsize=4)
def _lm_machinery(config: Config, vocab_size: int, seq_len: int):
    """Model function, optimizer and jitted step, built once per config so seeds share compilations."""
    model_config = ids.TransformerConfig(vocab_size=vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                                         n_heads=config.n_heads, max_len=seq_len)
    apply, _ = ids.init_transformer(model_config, seed=0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup, config.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay))
    return model_config, apply, optimizer, ids.make_train_step(ids.lm_loss(apply), optimizer)


def lm_pretrain_config(config: Config, corpus: skills.SkillCorpus, without: tuple[str, ...] = ()) -> dict:
    """Everything that determines the skill-mixture LM's weights: the cache key (no edit or sweep settings)."""
    return {"corpus": corpus.config, "without": list(without), **{f: getattr(config, f) for f in (
        "d_model", "n_layers", "n_heads", "batch_size", "steps", "learning_rate", "weight_decay", "warmup")}}


def train_lm(config: Config, corpus: skills.SkillCorpus, seed: int, *, progress: bool = False,
             without: tuple[str, ...] = ()):
    """The reference transformer trained on the skill mixture (less the skills in ``without``): ``(apply, params,
    final training loss)``, trained once per pretraining config and seed and then restored (``ids.pretrain.cached``)."""
    model_config, apply, optimizer, step = _lm_machinery(config, corpus.tokenizer.vocab_size, corpus.config.seq_len)

    def train_fn(_, seed):
        params = ids.init_transformer(model_config, seed=seed)[1]
        docs = skills.to_numpy(corpus.train, LM_COLUMNS + ["skill"])
        keep = ~np.isin(docs.pop("skill"), without)
        batches = ids.train.iterate_batches({k: v[keep] for k, v in docs.items()}, config.batch_size, seed=seed)
        state, log = ids.train.train(ids.init_train_state(params, optimizer), step, batches, num_steps=config.steps,
                                     log_every=max(1, config.steps // 10), progress=progress,
                                     desc=f"{NAME} lm seed {seed}")
        return {"params": state.params, "train_loss": jnp.float32(log.history[-1]["loss"])}

    like = lambda: {"params": ids.init_transformer(model_config, seed=0)[1], "train_loss": jnp.float32(0)}
    out = ids.pretrain.cached("skills-lm", lm_pretrain_config(config, corpus, without), seed, train_fn, like=like)
    return apply, out["params"], float(out["train_loss"])


def _lm_scores(apply, params, items, text) -> dict[str, float]:
    acc = evaluation.skill_accuracy(evaluation.exact_match(apply, params, items), items)
    return {**acc, "ppl": evaluation.perplexity(apply, params, text)}


def _ratio(after: float, before: float) -> float:
    return after / before if before > 0 else float("nan")


def _report_arm(row: dict, arm: str, after: dict, before: dict) -> None:
    row[f"lm.{arm}.heldout_ppl_ratio"] = after["ppl"] / before["ppl"]
    for s in EVAL_SKILLS:
        row[f"lm.{arm}.acc.{s}"] = after[s]
    for s in skills.SKILLS:
        row[f"lm.{arm}.retention.{s}"] = _ratio(after[s], before[s])
    for a, b in zip(PAPER_ORDER[:-1], PAPER_ORDER[1:]):   # per-seed gaps, for paired statistics
        row[f"lm.{arm}.gap.{a}.{b}"] = row[f"lm.{arm}.retention.{b}"] - row[f"lm.{arm}.retention.{a}"]


def _lm_rhos(config: Config) -> tuple[float, ...]:
    return config.rhos if config.lm_rhos is None else config.lm_rhos


def run_lm(config: Config, seed: int, *, progress: bool = False) -> tuple[dict[str, float], dict]:
    corpus = skills.make_skill_corpus(dataclasses.replace(config.corpus, seed=seed))
    apply, params, train_loss = train_lm(config, corpus, seed, progress=progress)
    all_layers = list(dict.fromkeys(layer for _, layers in config.lm_layer_sets for layer in layers))
    train_docs = skills.to_numpy(corpus.train, LM_COLUMNS + ["skill"])
    factors = curvature.collect_factors(apply, params, {k: train_docs[k] for k in LM_COLUMNS}, all_layers, key=seed,
                                        fisher=config.fisher, batch_size=config.kfac_batch_size, progress=False)
    eigen = curvature.eigendecompose(factors)
    sweep_items, report_items = (skills.to_numpy(corpus.eval_split(s)) for s in ("sweep", "report"))
    sweep_text, report_text = (skills.to_numpy(corpus.heldout_split(s), LM_COLUMNS) for s in ("sweep", "report"))
    before_sweep = _lm_scores(apply, params, sweep_items, sweep_text)
    before = _lm_scores(apply, params, report_items, report_text)
    row = {"lm.train_loss_final": train_loss, "lm.heldout_ppl_before": before["ppl"]}
    row.update({f"lm.before.acc.{s}": before[s] for s in EVAL_SKILLS})
    grid = [(i, rho) for i in range(len(config.lm_layer_sets)) for rho in _lm_rhos(config)]
    curves, chosen = {}, {}
    for method in METHODS:
        sweep = [_lm_scores(apply, _edit(method, params, eigen, config.lm_layer_sets[i][1], rho, seed),
                            sweep_items, sweep_text) for i, rho in grid]
        curves[method] = sweep
        pick = choose_setting([rho for _, rho in grid], [s["memorized"] for s in sweep],
                              [s["ppl"] <= config.max_ppl_ratio * before_sweep["ppl"] for s in sweep])
        set_index, rho = (0, 1.0) if pick is None else grid[pick]
        after = _lm_scores(apply, _edit(method, params, eigen, config.lm_layer_sets[set_index][1], rho, seed),
                           report_items, report_text)
        row[f"lm.{method}.rho"] = rho
        row[f"lm.{method}.layer_set"] = set_index
        chosen[method] = set_index
        _report_arm(row, method, after, before)
    if seed in config.seeds[:config.oracle_seeds]:
        # Upper bound for any edit: the same training without the memorized strings (exact unlearning).
        _, oracle_params, _ = train_lm(config, corpus, seed, progress=progress, without=("memorized",))
        _report_arm(row, "oracle", _lm_scores(apply, oracle_params, report_items, report_text), before)
    mem_batch = _unique_rows({k: v[train_docs["skill"] == "memorized"] for k, v in train_docs.items()})
    held = skills.to_numpy(corpus.heldout_text, LM_COLUMNS + ["skill"])
    clean_batch = {k: held[k][held["skill"] == "text"] for k in LM_COLUMNS}   # same language, never trained on
    bands = edit.curvature_band_activations(apply, params, eigen[config.band_layer], config.band_layer, mem_batch,
                                            clean_batch, config.n_bands)
    row.update({f"lm.bands.ratio.{b}": float(r) for b, r in enumerate(bands.ratio)})
    return row, {"curves": curves, "grid": grid, "before_sweep": before_sweep, "chosen": chosen}


def _unique_rows(docs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per distinct memorized string (training repeats each many times)."""
    idx = np.sort(np.unique(docs["tokens"], axis=0, return_index=True)[1])
    return {k: docs[k][idx] for k in LM_COLUMNS}


# --------------------------------------------------------------------------- report


def ordering_verdict(metrics: dict[str, float], method: str) -> tuple[list[tuple[str, float]], list[str], int]:
    """Measured skills in ascending retention; one line per adjacent pair of the paper's order; how many are separated.

    A pair ``a < b`` is *separated* when the mean gap exceeds the larger of the two skills' seed standard
    deviations (the issue's criterion); the paired gap (mean ± sd over seeds) is printed beside it.
    """
    ret = {s: metrics.get(f"lm.{method}.retention.{s}", float("nan")) for s in skills.SKILLS}
    std = {s: metrics.get(f"lm.{method}.retention.{s}_std", 0.0) or 0.0 for s in skills.SKILLS}
    measured = sorted(((s, ret[s]) for s in skills.SKILLS), key=lambda t: (np.nan_to_num(t[1], nan=np.inf), t[0]))
    lines, n_sep = [], 0
    for a, b in zip(PAPER_ORDER[:-1], PAPER_ORDER[1:]):
        ra, rb = ret[a], ret[b]
        if not (np.isfinite(ra) and np.isfinite(rb)):
            lines.append(f"{a} < {b}: undefined (a skill was at 0 before editing)")
            continue
        gap, gap_sd = metrics.get(f"lm.{method}.gap.{a}.{b}", rb - ra), metrics.get(f"lm.{method}.gap.{a}.{b}_std", 0.0)
        separated = rb - ra > max(std[a], std[b])
        n_sep += separated
        verdict = ("agrees, separated" if separated else "agrees, within one seed sd") if ra < rb else "disagrees"
        lines.append(f"{a} ({ra:.2f} ± {std[a]:.2f}) < {b} ({rb:.2f} ± {std[b]:.2f}): {verdict}; "
                     f"paired gap {gap:+.2f} ± {gap_sd:.2f}")
    return measured, lines, n_sep


def plot(config: Config, cls_curves: list[dict], lm_curves: list[dict], metrics: dict[str, float], out_dir) -> None:
    rhos = np.asarray(_lm_rhos(config))
    # LM curves on the layer set the K-FAC arm chose most often (all arms on that set, for comparability).
    set_index = int(np.bincount([c["chosen"]["kfac"] for c in lm_curves]).argmax())
    cols = [k for k, (i, _) in enumerate(lm_curves[0]["grid"]) if i == set_index]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.8), sharey=True)
    for ax, method in zip(axes, METHODS):
        for s in skills.SKILLS:
            ret = np.array([[c["curves"][method][k][s] / c["before_sweep"][s] if c["before_sweep"][s] > 0 else np.nan
                             for k in cols] for c in lm_curves])
            if np.isnan(ret).all(0).any():  # a skill no seed learned has no retention to plot at some rho
                continue
            ax.errorbar(rhos, np.nanmean(ret, 0), yerr=np.nanstd(ret, 0), marker="o", ms=3, capsize=2, label=s)
        ppl = np.array([[c["curves"][method][k]["ppl"] / c["before_sweep"]["ppl"] for k in cols] for c in lm_curves])
        ax.plot(rhos, 1.0 / ppl.mean(0), "k--", lw=1, label="1 / held-out ppl ratio")
        ax.set(xlabel="ρ (energy kept)" if method == "svd" else "ρ (K-FAC mass kept)",
               title=f"LM, {method}, {config.lm_layer_sets[set_index][0]} (sweep split)")
    axes[0].set_ylabel("retention (after / before)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "retention_vs_rho.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.5), sharey=True)
    for ax, method in zip(axes, METHODS):
        for key, label in (("memorized_recall", "noisy label recalled"), ("true_label_recovery", "true label recovered"),
                           ("val_acc", "validation accuracy")):
            vals = np.array([[c["curves"][method][i][key] for i in range(len(config.rhos))] for c in cls_curves])
            ax.errorbar(config.rhos, vals.mean(0), yerr=vals.std(0), marker="o", ms=3, capsize=2, label=label)
        ax.axvline(metrics[f"classification.{method}.rho"], color="gray", lw=0.8, ls=":")
        ax.set(xlabel="ρ", title=f"classification, {method} (sweep split)", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "classification_vs_rho.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bands = np.arange(config.n_bands)
    for setting, label in (("classification", "classifier: noisy / clean items"),
                           ("lm", "LM: memorized strings / held-out text of the same language")):
        ax.errorbar(bands, [metrics[f"{setting}.bands.ratio.{b}"] for b in bands],
                    yerr=[metrics[f"{setting}.bands.ratio.{b}_std"] for b in bands], marker="o", capsize=3, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xlabel="curvature band (0 = highest curvature)", ylabel="response ratio", title="Band activation ratios")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "band_ratios.png", dpi=120)
    plt.close(fig)


def _readme(config: Config, m: dict[str, float]) -> str:
    pm = lambda k: _common.pm(m, k)
    cls_rows = []
    for method in METHODS:
        p = f"classification.{method}"
        cls_rows.append((method, pm(f"{p}.rho"), f"{pm(p + '.memorized_recall_before')} → {pm(p + '.memorized_recall_after')}",
                         f"{pm(p + '.true_label_recovery_before')} → {pm(p + '.true_label_recovery_after')}",
                         f"{pm(p + '.val_acc_before')} → {pm(p + '.val_acc_after')}"))
    arms = [a for a in METHODS + ("oracle",) if f"lm.{a}.heldout_ppl_ratio" in m]
    pmk = lambda k: pm(k) if k in m else "—"
    lm_rows = [(s, *(pmk(f"lm.{a}.retention.{s}") for a in arms), pm(f"lm.before.acc.{s}")) for s in skills.SKILLS]
    lm_rows.append(("unseen strings (accuracy; chance of the language)", *(pmk(f"lm.{a}.acc.unseen_strings") for a in arms),
                    pm("lm.before.acc.unseen_strings")))
    lm_rows.append(("held-out ppl ratio", *(pmk(f"lm.{a}.heldout_ppl_ratio") for a in arms),
                    f"ppl {pm('lm.heldout_ppl_before')}"))
    lm_rows.append(("chosen ρ", *(pmk(f"lm.{a}.rho") for a in arms), ""))
    names = [n for n, _ in config.lm_layer_sets]
    lm_rows.append(("chosen layer set (mean index)", *(pmk(f"lm.{a}.layer_set") for a in arms), " / ".join(
        f"{i} = {n}" for i, n in enumerate(names))))

    def drop(method, setting_key):
        return m[f"classification.{method}.{setting_key}_before"] - m[f"classification.{method}.{setting_key}_after"]

    k_rec, s_rec = drop("kfac", "memorized_recall"), drop("svd", "memorized_recall")
    k_val = -drop("kfac", "val_acc")
    cls_text = (f"K-FAC pruning lowered held-out memorized recall by {k_rec:.3f} (SVD: {s_rec:.3f}) while validation "
                f"accuracy changed by {k_val:+.3f} (SVD: {-drop('svd', 'val_acc'):+.3f}); "
                f"true-label recovery went {m['classification.kfac.true_label_recovery_before']:.3f} → "
                f"{m['classification.kfac.true_label_recovery_after']:.3f}. ")
    cls_text += (f"Random components at K-FAC's count lowered it by {drop('random', 'memorized_recall'):.3f} "
                 f"(validation {-drop('random', 'val_acc'):+.3f}). ")
    cls_text += ("K-FAC removed more memorization than SVD at the chosen ρ." if k_rec > s_rec else
                 "SVD removed at least as much memorization as K-FAC at the chosen ρ (the paper found SVD a strong baseline too).")
    if k_rec <= 0.05:
        cls_text += " The paper's effect did not reproduce at this scale."
    cls_text += (" (Paper, ViT-B/16 at ρ = 0.75: recall 81.6% → 3.5%, true labels 10.5% → 66.5%, "
                 "validation 67.0% → 71.7%.)")
    target_lines = []
    for a in METHODS:
        mem, logic = m[f"lm.{a}.retention.memorized"], m[f"lm.{a}.retention.logic"]
        met = mem <= 0.2 and logic >= 0.9
        target_lines.append(f"- **{a}**: memorized retention {mem:.2f}, logic {logic:.2f} at held-out ppl ratio "
                            f"{m[f'lm.{a}.heldout_ppl_ratio']:.2f} — target (≤ 0.2 with logic ≥ 0.9) "
                            + ("**met**" if met else "**not met**"))
    lm_text = "\n".join(target_lines)
    if "lm.oracle.retention.memorized" in m:
        lm_text += (f"\n- **oracle** (retrained without the memorized strings, "
                    f"first {config.oracle_seeds} seeds): memorized retention {m['lm.oracle.retention.memorized']:.2f} "
                    f"(accuracy {m['lm.oracle.acc.memorized']:.2f} vs {m['lm.oracle.acc.unseen_strings']:.2f} on unseen "
                    f"strings), logic {m['lm.oracle.retention.logic']:.2f}: what an ideal edit could reach.")
    lm_text += ("\n\n(Paper, 7B: memorized text kept 3–16%, perplexity ×1.20 for K-FAC and ×1.18 for SVD.)")
    blocks = []
    for method in ("kfac", "svd", "random"):
        measured, lines, n_sep = ordering_verdict(m, method)
        order = " < ".join(f"{s} ({r:.2f})" for s, r in measured)
        blocks.append(f"**{method}** measured order: {order}. Paper's order (memorized < arithmetic < rare facts < "
                      f"frequent facts < logic): {n_sep} of 4 adjacent relations agree and are separated by more "
                      "than a seed sd.\n" + "\n".join(f"- {line}" for line in lines))
    band_low = np.mean([m[f"lm.bands.ratio.{b}"] for b in range(config.n_bands // 2, config.n_bands)])
    band_top = m["lm.bands.ratio.0"]
    cband_low = np.mean([m[f"classification.bands.ratio.{b}"] for b in range(config.n_bands // 2, config.n_bands)])
    return f"""
## Memorization in the curvature spectrum ({len(config.seeds)} seeds, {m['minutes']:.1f} min)

Hypothesis (Merullo et al. 2025): removing the low-curvature K-FAC components of MLP weights erases
memorized data while keeping skills, in the order memorized ≪ arithmetic < rare facts < frequent facts < logic.
Arms: `kfac`, `svd` (energy ρ), `random` (the K-FAC edit's component count per layer at the same ρ, components
drawn at random: does the curvature *ranking* matter?), and in the LM an `oracle` retrained without the memorized
strings. ρ (and in the LM the edited layer set) is chosen per arm on sweep splits (classification: lowest
memorized recall with validation accuracy within {config.max_val_drop} of the unedited model; LM: lowest
memorized-string recall with held-out perplexity ratio ≤ {config.max_ppl_ratio}); every number below is on held-out
report splits, mean ± sd over seeds.

### Classification with {config.cls_noise:.0%} random labels (MLP, layers {', '.join(config.cls_layers)})

Before editing the MLP gives {pm('classification.train_acc_noisy')} of the noisy training items their noisy label
(memorization reached) and {pm('classification.train_acc_clean')} of the clean ones their label.

{_common.markdown_table(["method", "ρ", "memorized recall", "true-label recovery", "val. accuracy"], cls_rows)}

{cls_text}

### Skill retention in the LM (edited / original)

Memorized strings, training text and held-out text are samples of one Markov language; the memorized ones are
only repeated. `unseen strings` scores fresh samples like memorized ones: the recall the language alone gives.

{_common.markdown_table(["skill", *arms, "accuracy before"], lm_rows)}

{lm_text}

{blocks[0]}

{blocks[1]}

{blocks[2]}

Band diagnostic: the bottom half of components responds {band_low:.2f}× as strongly to
memorized strings as to held-out text (classifier, noisy vs clean items: {cband_low:.2f}×); the top band {band_top:.2f}×
(paper: ~1.23× in the bottom half, < 1 in the top 10%). In the LM both input sets are samples of the same language
(layer {config.band_layer}), so the ratio measures memorization, not token statistics. In the classifier the noise is
in the labels only, so noisy and clean items have the same input distribution and an input-side diagnostic should
read ≈ 1 by construction.

![retention](retention_vs_rho.png) ![classification](classification_vs_rho.png) ![bands](band_ratios.png)
"""


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    per_seed, cls_curves, lm_curves = [], [], []
    for seed in config.seeds:
        cls_row, cls_c = run_classification(config, seed)
        lm_row, lm_c = run_lm(config, seed, progress=progress)
        per_seed.append({**cls_row, **lm_row})
        cls_curves.append(cls_c)
        lm_curves.append(lm_c)
    metrics = _aggregate(per_seed)
    metrics["minutes"] = (time.perf_counter() - t0) / 60
    out = _common.results_dir(NAME)
    _common.write_metrics(NAME, {**metrics, **{f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()}})
    plot(config, cls_curves, lm_curves, metrics, out)
    _common.write_readme(NAME, _readme(config, metrics))
    return metrics


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds, ignoring seeds where a ratio is undefined (NaN)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for r in per_seed for k in r):   # the oracle runs on some seeds only
        vals = np.asarray([r[key] for r in per_seed if key in r], np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else float("nan")
        out[f"{key}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
    out["n_seeds"] = len(per_seed)
    return out


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
