"""Surgical update: does freezing the weights that carry an old task protect it while the model learns an edit?

Hypothesis. A reference transformer pretrained on two synthetic sequence tasks T1 (``reverse``) and T2 (``lookup``,
a fixed table of symbol → symbol facts; :mod:`idesign.data.sequence_tasks`) gets a realistic **edit**: T3 = new
values for ``n_edit`` of T2's keys, the other T2 facts unchanged. Freezing the *T1 circuit* — the attention heads
and MLP neurons that gradient × weight attribution on T1 rows ranks highest per parameter, up to a budget of k% of
the parameters, frozen element by element with ``ids.optim.frozen`` — keeps T1 (target: retention ≥ 0.95) while
T3 still reaches ≥ 0.90 of full fine-tuning, and protects T1 better than a random mask of the same size in the
same tensors (by more than 2 paired standard errors).

A fair test (METHODS.md §8):
- **Pretrain once.** The base model is trained on T1 + T2 once per (config, seed) and cached with
  ``ids.pretrain.cached``; every arm of a seed starts from the same checkpoint.
- **The base must know T1 and T2** (a gate fixed before any fine-tuning is judged): pretraining runs in rounds of
  ``pretrain_steps`` (warmup + cosine, restarted) until held-out T1 and T2 exact match both reach ``base_gate``
  (0.95), at most ``max_pretrain_rounds`` (3). A seed whose base misses it is refused ("world not fair on seed
  k", printed and in the report) and no arm is run on it; ``gate.seed<k>.{t1,t2,steps,passed}`` are saved.
- **The update needs the task token.** T3 lives under T2's task token and *contradicts* what the model knows
  (an earlier version used T3 = copy, T1's format with another token: "copy whatever the token" was the
  cheapest update, and even 50% replay could not keep T1). ``t1_as_t3`` (T1 prompts answered as the edited
  lookup) measures the task-token shortcut; ``t3_old`` the share of edited prompts still answered the old way.
- **The upper bound reaches the target** (measured before the arms were run): ``kl_full_ft_unfrozen`` fine-tunes
  on the edit with nothing frozen, plus ``kl_weight`` × KL(old model ‖ model) at the answer positions of
  *unlabelled* T1 prompts and T2 prompts without an edited key (answered greedily by the old model). The
  ``joint`` group (50% labelled replay) is a second reference.
- **Shared parameters frozen in every masked arm.** Embeddings (tied with the unembedding), positions, norms and
  the output biases (``ids.circuits.shared_mask``: no head or neuron owns them) are frozen in every masked arm and
  in ``full_ft``; the report prints per-leaf frozen fractions.
- **The mask's own value is visible**: ``full_ft`` (shared frozen, nothing else) and ``full_ft_unfrozen``
  (nothing frozen) see the same data (and KL) as the masked arms.
- **Fine-tuning lr** is warmup + cosine decay to a peak of ``finetune_lr``, chosen on the upper bound only (a
  constant 1e-3 from fresh Adam moments erased T1 within 20 steps in an earlier world).

Groups (data) and arms (all runs of a seed start from the same base model; runs in one group see the same batches):
- ``edit``: the edit rows alone (T2 prompts answered with the edited table). ``r1``, ``r2``, ``r5``: + a fixed
  replay buffer of 1, 2, 5% old rows (T1 and unedited T2 pretraining rows; ``Config.replays``; ``r2`` is the
  headline). ``joint``: 50% replay. ``kl``: the edit rows + the KL term.
- ``full_ft_unfrozen``: nothing frozen. ``full_ft``: the shared parameters frozen.
- ``circuit``: shared + heads and neurons of the T1 circuit within ``Config.budget`` of all parameters
  (``ids.circuits.budget_circuit``: by attribution per parameter, greedily while they fit).
- ``random``: shared + exactly as many random elements as the circuit *in every leaf*
  (``ids.circuits.matched_random_mask``).
- ``layers``: shared + whole parameter groups of the blocks (e.g. ``blocks.0.attn.q_proj``) by attribution per
  parameter, added while they bring the size nearer the circuit's.
- ``elements``: shared + the single block elements with the highest attribution, as many as the circuit.
- ``circuit_b<p>``, ``random_b<p>``: the same at the other budgets of ``Config.budgets`` (the budget curve, in the
  headline replay group only).
``edit`` and the non-headline replay groups run full_ft_unfrozen, full_ft, circuit and random; the headline group
and ``kl`` run all six arms; ``joint`` runs full_ft_unfrozen.

Metrics (``results/surgical_update/metrics.json``, written by ``experiments/_runner.py``; every
``<group>_<arm>.<metric>`` has ``_mean`` and ``_std`` over seeds):
  world.base_t1_acc, world.base_t2_acc, world.base_t3_acc   exact-match accuracy of the pretrained base model
  world.base_t3_old, world.base_t1_as_t3                      its old answers to edited prompts; T1 answered as T3
  <group>_<arm>.t1_acc, .t2_acc, .t3_acc                      after fine-tuning (t2: unedited facts; t3: the edit)
  <group>_<arm>.t3_old                                        edited prompts still answered with the old fact
  <group>_<arm>.t3_rel_edit_full_ft                           T3 / edit_full_ft_unfrozen's T3 (same seed)
  <group>_<arm>.t1_retention, .t2_retention                   accuracy after / before (same seed)
  <group>_<arm>.t3_rel_full_ft                                T3 / the group's full_ft_unfrozen T3 (same seed)
  <group>_<arm>.t1_as_t3                                      share of T1 prompts answered as T3 (the shortcut)
  <group>_<arm>.t1_retention_at_matched_t3                    T1 retention when T3 first reaches the group's matched
                                                              level (interpolated between evaluations; null if never)
  <group>_<arm>.matched_t3_level                              that level: the lowest final T3 of the group's main arms
                                                              (not the budget curve), so every main arm reaches it
  <group>_<arm>.reached_matched_t3                            1 if it reached that T3 level, else 0
  <group>_<arm>.frozen_fraction                               frozen elements / all elements (shared included)
  <a>_minus_<b>.<metric>_mean, _se, _n                        paired differences over seeds (see the pairs below)
  targets.t1_retention_met, targets.t3_rel_met, targets.beats_random   1.0 / 0.0 at the headline replay and budget
  targets.upper_bound_met                                     kl_full_ft_unfrozen: T1 ret. ≥ 0.95, T3 ≥ 0.9 × edit
  gate.seed<k>.t1, .t2, .steps, .passed, gate.n_unfair        the base-quality gate (held-out rows, seed 98)
  n_seeds, minutes

Accuracy is exact match of the whole answer under greedy decoding (``sequence_tasks.answer_correct``) on held-out
rows. Every seed draws new pretraining and fine-tuning rows, a new edit, a new initialisation and batch order;
evaluation prompts and task rules are fixed.

Run: ``python -m experiments.surgical_update --quick`` (CPU, minutes; the base models are cached in
``$IDESIGN_CACHE``, default ``~/.cache/idesign``) or ``--full`` (GPU preset).
"""

from __future__ import annotations

import dataclasses
import json
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm.auto import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import idesign as ids  # noqa: E402
from experiments import _common, _runner  # noqa: E402
from idesign.data import sequence_tasks  # noqa: E402

NAME = "surgical_update"
MASKED = ("circuit", "random", "layers", "elements")
T1_TARGET, T3_TARGET = 0.95, 0.90
BASE_VERSION = "2"      # 2: the base-quality gate (rounds of the pretraining schedule until T1, T2 >= base_gate)


@dataclasses.dataclass(frozen=True)
class Config:
    t1: str = "reverse"
    t2: str = "lookup"
    n_edit: int = 4                  # T3: new values for this many of T2's (lookup's) keys
    length: int = 6
    n_symbols: int = 16
    n_train: int = 4000              # training rows per task
    n_eval: int = 200                # held-out rows per task
    n_attribution: int = 256         # T1 rows the attribution is computed on
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 64
    pretrain_steps: int = 700        # one round of the pretraining schedule (warmup + cosine decay to 0)
    base_gate: float = 0.95          # the base must reach this exact-match accuracy on held-out T1 *and* T2 prompts,
    max_pretrain_rounds: int = 3     # checked at the end of every round (fixed before any fine-tuning was judged);
                                     # a base still below it after this many rounds makes its seed unfair (refused)
    pretrain_lr: float = 3e-3
    warmup: int = 100
    finetune_batch: int = 32
    finetune_steps: int = 150
    finetune_lr: float = 1e-3        # peak; warmup then cosine decay. Chosen on the upper bound (kl_full_ft_unfrozen)
    finetune_warmup: int = 20        # alone, seeds 0-1: peak 3e-4 kept T1 (0.97, 0.96) but learned the edit to only
                                     # 0.67 / 0.33; 1e-3 kept T1 (0.99, 0.96) and learned it to 0.99 / 0.70
    eval_every: int = 15
    replays: tuple[float, ...] = (0.01, 0.02, 0.05)
    replay: float = 0.02             # the headline group
    joint_replay: float = 0.5        # an upper-bound group (labelled replay)
    kl_weight: float = 3.0           # the ``kl`` group: + kl_weight × KL(old model || model) on unlabelled prompts
                                     # (chosen on the upper bound alone: 1.0 kept T1 at 0.94 on seed 0, 3.0 at 0.97)
    kl_batch: int = 32               # anchor prompts per step (T1 and unedited T2 prompts, answered by the old model)
    n_anchor: int = 512              # the anchor pool
    budgets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    budget: float = 0.1              # the headline arms' share of parameters in the mask (beyond the shared ones)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


QUICK = Config(budgets=(0.01, 0.05, 0.1, 0.5), seeds=(0, 1))     # 2 seeds, a 4-point budget curve: minutes on CPU
FULL = Config(length=10, n_symbols=32, n_train=50_000, n_eval=2000, n_attribution=2000, d_model=256, n_layers=4,
              n_heads=8, batch_size=128, pretrain_steps=10_000, finetune_steps=2000, finetune_batch=128,
              finetune_warmup=100, eval_every=100,
              seeds=tuple(range(10)))


def group_name(replay: float) -> str:
    return "edit" if replay == 0 else f"r{100 * replay:g}".replace(".", "p")


def budget_name(arm: str, budget: float, config: Config) -> str:
    return arm if budget == config.budget else f"{arm}_b{100 * budget:g}".replace(".", "p")


def check_config(config: Config) -> None:
    if not 0 <= config.finetune_warmup < config.finetune_steps:
        raise ValueError(f"Config.finetune_warmup={config.finetune_warmup} must be in [0, finetune_steps="
                         f"{config.finetune_steps}).")
    if config.replay not in config.replays:
        raise ValueError(f"Config.replay={config.replay} must be one of Config.replays={config.replays}.")
    if config.budget not in config.budgets:
        raise ValueError(f"Config.budget={config.budget} must be one of Config.budgets={config.budgets}.")
    if not 0.0 <= config.base_gate <= 1.0 or config.max_pretrain_rounds < 1:
        raise ValueError(f"Config.base_gate={config.base_gate} must be in [0, 1] and Config.max_pretrain_rounds="
                         f"{config.max_pretrain_rounds} at least 1.")
    if not 1 <= config.n_edit < config.n_symbols:
        raise ValueError(f"Config.n_edit={config.n_edit} must be in [1, n_symbols={config.n_symbols}): some "
                         "T2 facts must stay unedited.")


# --- data and base model -------------------------------------------------------------------------


def task_config(config: Config, tasks: tuple[str, ...], n: int, seed: int) -> sequence_tasks.SequenceTaskConfig:
    return sequence_tasks.SequenceTaskConfig(tasks=tasks, n_examples=n, length=config.length,
                                             n_symbols=config.n_symbols, seed=seed)


def task_data(config: Config, tasks: tuple[str, ...], n: int, seed: int) -> Any:
    """``n`` rows per task (a ``datasets.Dataset``); the task rules are the same for every seed."""
    return sequence_tasks.make_sequence_tasks(task_config(config, tasks, n, seed))


def model_config(config: Config) -> ids.TransformerConfig:
    return ids.TransformerConfig(vocab_size=sequence_tasks.vocab_size(config.n_symbols), d_model=config.d_model,
                                 n_layers=config.n_layers, n_heads=config.n_heads, max_len=2 * config.length + 3)


def base_key(config: Config) -> dict[str, Any]:
    """What determines the base model (the cache key): fine-tuning settings are left out on purpose."""
    fields = ("t1", "t2", "length", "n_symbols", "n_train", "d_model", "n_layers", "n_heads", "batch_size",
              "pretrain_steps", "pretrain_lr", "warmup", "base_gate", "max_pretrain_rounds", "n_eval")
    return {f: getattr(config, f) for f in fields}


def batches(data: Any, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    return ids.train.iterate_batches(data, batch_size, seed=seed, columns=["tokens", "loss_mask"])


@functools.lru_cache(maxsize=4)
def _compiled(config: Config) -> dict[str, Any]:
    """One model function, loss and compiled steps per config, shared by every seed (no recompiling)."""
    apply, _ = ids.init_transformer(model_config(config), seed=0)
    loss = ids.lm_loss(apply)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.finetune_lr, config.finetune_warmup,
                                                  config.finetune_steps)
    ft_opt = frozen_by_argument(optax.adam(schedule))
    ft_step = ids.make_train_step(loss, ft_opt, jit=False)

    def correct(params, tokens, mask):
        logits, _ = apply(params, tokens[:, :-1])
        wrong = (logits.argmax(-1) != tokens[:, 1:]) & (mask[:, 1:] > 0)
        return ~wrong.any(axis=1)

    def kl_loss(params, batch):
        """The edit's loss + kl_weight × KL(old || new) at the answer positions of the anchor prompts."""
        value, aux = loss(params, batch)
        anchor = batch["anchor"]
        logits, _ = apply(params, anchor["tokens"][:, :-1])
        logq = jax.nn.log_softmax(logits.astype(jnp.float32))
        weights = anchor["loss_mask"][:, 1:].astype(jnp.float32)
        kl = (jnp.exp(anchor["logp"]) * (anchor["logp"] - logq)).sum(-1)
        kl = (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        return value + config.kl_weight * kl, {**aux, "kl": kl}

    kl_step = ids.make_train_step(kl_loss, ft_opt, jit=False)
    batch_axes = {"tokens": 0, "loss_mask": 0, "anchor": None}   # every run of the kl group sees one anchor batch

    @jax.jit
    def old_logp(params, tokens):
        return jax.nn.log_softmax(apply(params, tokens[:, :-1])[0].astype(jnp.float32))

    return {"apply": apply, "loss": loss, "ft_opt": ft_opt, "old_logp": old_logp,
            "ft_step": jax.jit(jax.vmap(lambda s, b, m: ft_step(s, b, frozen=m))),
            "kl_step": jax.jit(jax.vmap(lambda s, b, m: kl_step(s, b, frozen=m), in_axes=(0, batch_axes, 0))),
            "correct": jax.jit(jax.vmap(correct, in_axes=(0, None, None)))}


# --- the edit ------------------------------------------------------------------------------------


def t2_config(config: Config) -> sequence_tasks.SequenceTaskConfig:
    return task_config(config, (config.t2,), 1, 0)


def edit(config: Config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(table, keys)``: T2's lookup table with ``n_edit`` keys given new values (a new edit every seed)."""
    return sequence_tasks.edit_lookup(t2_config(config), config.n_edit, seed=5000 + seed)


def arrays(data: Any) -> dict[str, np.ndarray]:
    tokens, mask = sequence_tasks._as_arrays(data)
    return {"tokens": tokens, "loss_mask": mask}


def take(rows: dict[str, np.ndarray], where: np.ndarray, n: int | None = None) -> dict[str, np.ndarray]:
    index = np.flatnonzero(where)[:n]
    return {k: v[index] for k, v in rows.items()}


def mixture(new: dict[str, np.ndarray], old: dict[str, np.ndarray], fraction: float,
            seed: int) -> dict[str, np.ndarray]:
    """All of ``new`` plus a fixed random buffer of ``old`` rows making up ``fraction`` of the result, shuffled."""
    rng = np.random.default_rng([seed, 11])
    n_old = int(round(fraction / (1.0 - fraction) * len(new["tokens"])))
    if n_old > len(old["tokens"]):
        raise ValueError(f"{n_old} replay rows needed for fraction {fraction}, but only {len(old['tokens'])} exist.")
    picked = rng.choice(len(old["tokens"]), size=n_old, replace=False)
    both = {k: np.concatenate([new[k], old[k][picked]]) for k in new}
    order = rng.permutation(len(both["tokens"]))
    return {k: v[order] for k, v in both.items()}


def finetune_data(config: Config, table: np.ndarray, keys: np.ndarray, seed: int) -> tuple[dict, dict]:
    """``(edit rows, old rows)``: T2 prompts answered with the edited table; T1 + unedited T2 pretraining rows."""
    t2c = t2_config(config)
    new = sequence_tasks.with_lookup_table(task_data(config, (config.t2,), config.n_train, 2000 + seed), table, t2c)
    old = arrays(task_data(config, (config.t1, config.t2), config.n_train, seed=1000 + seed))  # the pretraining rows
    keep = (old["tokens"][:, 1] != sequence_tasks.task_token_id(config.t2)) | ~sequence_tasks.rows_with_keys(
        old, keys, t2c)                                  # an old answer to an edited key would contradict the edit
    return new, take(old, keep)


def greedy_answers(config: Config, params: Any, prompts: dict[str, np.ndarray]) -> np.ndarray:
    """The prompts completed with the model's own greedy answer (the old model labels the anchor prompts)."""
    tokens = np.array(prompts["tokens"])
    start = config.length + 3
    tokens[:, start:] = 0
    for i in range(start, tokens.shape[1]):
        tokens[:, i] = np.asarray(_compiled(config)["old_logp"](params, jnp.asarray(tokens))[:, i - 1].argmax(-1))
    return tokens


def anchor_pool(config: Config, params: Any, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Unlabelled T1 prompts and T2 prompts without an edited key, answered and scored by the old model."""
    rows = arrays(task_data(config, (config.t1, config.t2), 4 * config.n_anchor, seed=4000 + seed))
    keep = (rows["tokens"][:, 1] != sequence_tasks.task_token_id(config.t2)) | ~sequence_tasks.rows_with_keys(
        rows, keys, t2_config(config))
    rows = take(rows, keep, config.n_anchor)
    rows["tokens"] = greedy_answers(config, params, rows)
    rows["logp"] = np.asarray(_compiled(config)["old_logp"](params, jnp.asarray(rows["tokens"])))
    return rows


def gate_accuracy(config: Config, params: Any) -> dict[str, float]:
    """Exact-match accuracy on the gate's held-out T1 and T2 prompts (``n_eval`` each; not the study's eval rows)."""
    out = {}
    for name, task in (("t1", config.t1), ("t2", config.t2)):
        rows = arrays(task_data(config, (task,), config.n_eval, seed=98))
        correct = _compiled(config)["correct"](stack([params]), jnp.asarray(rows["tokens"]),
                                               jnp.asarray(rows["loss_mask"]))
        out[name] = float(np.asarray(correct).mean())
    return out


def pretrain_base(key: dict[str, Any], seed: int, *, progress: bool = True) -> dict[str, Any]:
    """T1 and T2 together from scratch (called by the cache only on a miss), gated on the base's quality.

    Trains rounds of ``pretrain_steps`` (each a warmup + cosine decay to 0, Adam moments kept; the first round is
    the old single schedule) until held-out T1 and T2 accuracy both reach ``base_gate``, for at most
    ``max_pretrain_rounds`` rounds. Returns ``{"params", "steps", "t1", "t2", "passed"}``: a base that missed the
    gate is cached too (so the refusal is reproducible), and :func:`main` refuses its seed.
    """
    config = dataclasses.replace(QUICK, **key)
    apply, params = ids.init_transformer(model_config(config), seed=seed)
    one = optax.warmup_cosine_decay_schedule(0.0, config.pretrain_lr, config.warmup, config.pretrain_steps)
    schedule = lambda step: one(step % config.pretrain_steps)      # warm restarts at every round
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    data = task_data(config, (config.t1, config.t2), config.n_train, seed=1000 + seed)
    state = ids.init_train_state(params, opt)
    step_fn, it = ids.make_train_step(ids.lm_loss(apply), opt), batches(data, config.batch_size, seed)
    for round_ in range(1, config.max_pretrain_rounds + 1):
        state, _ = ids.train.train(state, step_fn, it, num_steps=config.pretrain_steps, log_every=100,
                                   progress=progress, desc=f"{NAME} pretrain seed {seed} round {round_}")
        acc = gate_accuracy(config, state.params)
        if min(acc.values()) >= config.base_gate:
            break
    passed = min(acc.values()) >= config.base_gate
    return {"params": state.params, "steps": jnp.asarray(round_ * config.pretrain_steps, jnp.int32),
            "t1": jnp.asarray(acc["t1"], jnp.float32), "t2": jnp.asarray(acc["t2"], jnp.float32),
            "passed": jnp.asarray(passed)}


def base_model(config: Config, seed: int, *, progress: bool = True) -> dict[str, Any]:
    """The pretrained base for ``seed`` (``{"params", "steps", "t1", "t2", "passed"}``, see :func:`pretrain_base`):
    trained once per (base config, seed), then restored from the cache."""
    like = lambda: {"params": ids.init_transformer(model_config(config))[1], "steps": jnp.zeros((), jnp.int32),
                    "t1": jnp.zeros((), jnp.float32), "t2": jnp.zeros((), jnp.float32),
                    "passed": jnp.zeros((), bool)}
    return ids.pretrain.cached(f"{NAME}-base", base_key(config), seed,
                               functools.partial(pretrain_base, progress=progress), like=like, version=BASE_VERSION)


def base_gate(config: Config, *, progress: bool = True) -> dict[int, dict[str, float]]:
    """``{seed: {"steps", "t1", "t2", "passed"}}``: every seed's base, pretrained (or restored) before any arm runs."""
    out = {}
    for seed in config.seeds:
        base = base_model(config, seed, progress=progress)
        out[seed] = {k: float(base[k]) for k in ("steps", "t1", "t2", "passed")}
    return out


# --- masks ---------------------------------------------------------------------------------------


def n_params(params: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def frozen_count(mask: Any, params: Any) -> int:
    return ids.masks.size_report(mask, params).selected


def top_elements(attributions: Any, within: Any, count: int) -> Any:
    """The ``count`` elements of ``within`` with the highest attribution (ties: earlier in flattening order)."""
    leaves, treedef = jax.tree_util.tree_flatten(attributions)
    allowed = [np.broadcast_to(np.asarray(m, bool), np.shape(x)).reshape(-1)
               for x, m in zip(leaves, treedef.flatten_up_to(within))]
    flat = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in leaves])
    flat[~np.concatenate(allowed)] = -np.inf
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(-flat, kind="stable")[:count]] = True
    offsets = np.cumsum([0] + [x.size for x in leaves])
    return jax.tree_util.tree_unflatten(treedef, [chosen[a:b].reshape(np.shape(x))
                                                  for a, b, x in zip(offsets[:-1], offsets[1:], leaves)])


def whole_layers(params: Any, attributions: Any, shared: Any, count: int) -> Any:
    """Whole parameter groups outside ``shared``, by attribution per parameter, added while they bring the size nearer ``count``."""
    shared_leaves = ids.tree.named_leaves(shared)
    groups: dict[str, list[str]] = {}
    for path in ids.tree.named_leaves(params):
        if shared_leaves[path] is not True:
            groups.setdefault(path.rsplit(".", 1)[0], []).append(path)
    leaves, scores = ids.tree.named_leaves(params), ids.tree.named_leaves(attributions)
    size = {g: sum(int(np.size(leaves[p])) for p in ps) for g, ps in groups.items()}
    density = {g: sum(float(jnp.sum(scores[p])) for p in ps) / size[g] for g, ps in groups.items()}
    total, chosen = 0, set()
    for g in sorted(groups, key=lambda g: -density[g]):
        if abs(total + size[g] - count) < abs(total - count):
            chosen.add(g)
            total += size[g]
    return ids.tree.map_with_path(lambda p, _: p.rsplit(".", 1)[0] in chosen and shared_leaves[p] is not True, params)


def arm_masks(config: Config, params: Any, t1_batch: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """``{arm: mask}`` for every arm of a replay group (the shared parameters included); attribution on T1 rows."""
    model = model_config(config)
    attributions = ids.circuits.weight_attribution(_compiled(config)["loss"], params, t1_batch)
    scores = ids.circuits.component_scores(attributions, model)
    shared = ids.circuits.shared_mask(params, model)
    within = ids.masks.complement(shared)
    with_shared = lambda m: ids.masks.union(shared, m)
    masks = {"full_ft_unfrozen": ids.masks.full(params, False), "full_ft": shared}
    for budget in config.budgets:
        circuit, _, _ = ids.circuits.budget_circuit(params, model, scores, int(budget * n_params(params)))
        masks[budget_name("circuit", budget, config)] = with_shared(circuit)
        masks[budget_name("random", budget, config)] = with_shared(
            ids.circuits.matched_random_mask(circuit, params, seed=seed))
        if budget == config.budget:
            count = frozen_count(circuit, params)
            masks["layers"] = with_shared(whole_layers(params, attributions, shared, count))
            masks["elements"] = with_shared(top_elements(attributions, within, count))
    return masks


def dense(mask: Any, params: Any) -> Any:
    """Full-shape numpy bool arrays, so every arm's mask has one structure and can be stacked."""
    return jax.tree_util.tree_map(lambda m, p: np.broadcast_to(np.asarray(m, bool), np.shape(p)).copy(), mask, params)


def leaf_fractions(mask: Any, params: Any) -> dict[str, float]:
    """Frozen fraction per leaf kind, pooled over blocks (``attn.q_proj.kernel``, ``embed.embedding``, ...)."""
    pooled: dict[str, list[int]] = {}
    for path, m in ids.tree.named_leaves(dense(mask, params)).items():
        kind = ".".join(path.split(".")[2:]) if path.startswith("blocks.") else path
        s = pooled.setdefault(kind, [0, 0])
        s[0], s[1] = s[0] + int(m.sum()), s[1] + m.size
    return {k: s / t for k, (s, t) in pooled.items()}


# --- fine-tuning every run at once ---------------------------------------------------------------


def frozen_by_argument(optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``frozen(optimizer, freeze_mask=frozen)`` with the mask given to ``update`` as ``frozen=``.

    A traced mask freezes exactly as a static one does (it only keeps state for every leaf), and one
    compiled step then serves every run: the runs are vmapped over their masks, parameters and batches.
    """
    def init_fn(params):
        return ids.optim.frozen(optimizer, freeze_mask=ids.masks.full(params, False)).init(params)

    def update_fn(updates, state, params=None, *, frozen, **extra):
        return ids.optim.frozen(optimizer, freeze_mask=frozen).update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def finetune_runs(config: Config, params: Any, runs: Sequence[tuple[str, str, Any]], data: dict[str, Any],
                  evaluate: Any, seed: int, *, anchor: dict[str, np.ndarray] | None = None,
                  progress: bool = True) -> tuple[list[Any], list[tuple[int, np.ndarray]]]:
    """Fine-tunes one copy of ``params`` per ``(group, arm, dense mask)``, all in one vmapped step.

    Runs of one group see the same batches (``data[group]``). With ``anchor`` (:func:`anchor_pool`), every run
    adds the KL term on one anchor batch per step. Returns the final parameters of every run and the
    trajectory ``[(step, evaluate(stacked params))]`` (evaluated every ``eval_every`` steps and at step 0).
    """
    c = _compiled(config)
    anchors = None if anchor is None else ids.train.iterate_batches(anchor, config.kl_batch, seed=seed)
    groups = sorted(data)
    index = np.array([groups.index(g) for g, _, _ in runs])
    state = jax.vmap(lambda p: ids.init_train_state(p, c["ft_opt"]))(stack([params] * len(runs)))
    masks = stack([m for _, _, m in runs])
    its = [batches(data[g], config.finetune_batch, seed) for g in groups]
    trajectory = [(0, evaluate(state.params))]
    for step in tqdm(range(1, config.finetune_steps + 1), disable=not progress, desc=f"{NAME} fine-tune seed {seed}"):
        per_group = [next(it) for it in its]
        batch = {k: np.stack([b[k] for b in per_group])[index] for k in ("tokens", "loss_mask")}
        if anchors is None:
            state, _ = c["ft_step"](state, batch, masks)
        else:
            state, _ = c["kl_step"](state, {**batch, "anchor": next(anchors)}, masks)
        if step % config.eval_every == 0 or step == config.finetune_steps:
            trajectory.append((step, evaluate(state.params)))
    return state.params, trajectory


def at_matched(t3: np.ndarray, t1: np.ndarray, level: float) -> float:
    """``t1`` where ``t3`` first reaches ``level`` along a trajectory, linearly interpolated; nan if never.

    >>> at_matched(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.8, 0.2]), 0.75)
    0.5
    """
    hit = np.flatnonzero(t3 >= level)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0 or t3[i] == t3[i - 1]:
        return float(t1[i])
    w = (level - t3[i - 1]) / (t3[i] - t3[i - 1])
    return float(t1[i - 1] + w * (t1[i] - t1[i - 1]))


# --- one seed ------------------------------------------------------------------------------------


def eval_sets(config: Config, table: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
    """Held-out prompts (fixed rows; which T2 prompts are edited depends on the seed's edit), ``n_eval`` per set:

    ``t1`` T1; ``t2`` T2 prompts without an edited key (the facts kept); ``t3`` T2 prompts with an edited key,
    answered with the new table (the edit); ``t3_old`` the same prompts with the old answers (the old fact
    kept); ``t1_as_t3`` T1 prompts answered as the edited lookup (the "ignore the task token" shortcut).
    """
    t2c, n = t2_config(config), config.n_eval
    t1 = arrays(task_data(config, (config.t1,), n, seed=99))
    pool = arrays(task_data(config, (config.t2,), 40 * n, seed=99))
    edited = sequence_tasks.rows_with_keys(pool, keys, t2c)
    if min(edited.sum(), (~edited).sum()) < n:
        raise ValueError(f"only {edited.sum()} edited and {(~edited).sum()} unedited T2 prompts among {40 * n}; "
                         f"n_edit={config.n_edit} of n_symbols={config.n_symbols} leaves too few of one kind.")
    sets = {"t1": t1, "t2": take(pool, ~edited, n),
            "t3": sequence_tasks.with_lookup_table(take(pool, edited, n), table, t2c),
            "t3_old": take(pool, edited, n), "t1_as_t3": sequence_tasks.with_lookup_table(t1, table, t2c)}
    return {"names": list(sets), "tokens": jnp.asarray(np.concatenate([v["tokens"] for v in sets.values()])),
            "mask": jnp.asarray(np.concatenate([v["loss_mask"] for v in sets.values()])), "n": n}


def accuracies(config: Config, stacked_params: Any, evals: dict[str, Any]) -> np.ndarray:
    """``[n_runs, n_sets]`` exact-match accuracy of every run on every evaluation set."""
    correct = np.asarray(_compiled(config)["correct"](stacked_params, evals["tokens"], evals["mask"]))
    return correct.reshape(correct.shape[0], len(evals["names"]), evals["n"]).mean(-1)


FOUR = ("full_ft_unfrozen", "full_ft", "circuit", "random")


def run_plan(config: Config, masks: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``[(group, arm, mask)]``: every arm and the budget curve at the headline replay, the KL group's
    headline arms, four arms elsewhere, and the 50%-replay upper bound."""
    headline = ("full_ft_unfrozen", "full_ft", *MASKED)
    plan = [("edit", arm, masks[arm]) for arm in FOUR]
    plan += [(group_name(r), arm, m) for r in config.replays for arm, m in masks.items()
             if arm in FOUR or r == config.replay]       # the other arms and the budget curve: headline only
    plan.append(("joint", "full_ft_unfrozen", masks["full_ft_unfrozen"]))
    plan += [("kl", arm, masks[arm]) for arm in headline]
    return plan


def run_seed(config: Config, seed: int, *, progress: bool = True,
             keep: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    params = base_model(config, seed, progress=progress)["params"]
    table, keys = edit(config, seed)
    evals = eval_sets(config, table, keys)
    names = evals["names"]
    before = dict(zip(names, accuracies(config, stack([params]), evals)[0]))
    t1_batch = next(batches(task_data(config, (config.t1,), config.n_attribution, seed=3000 + seed),
                            config.n_attribution, seed))
    masks = {arm: dense(m, params) for arm, m in arm_masks(config, params, t1_batch, seed).items()}
    plan = run_plan(config, masks)
    new, old = finetune_data(config, table, keys, seed)
    data = {"edit": mixture(new, old, 0.0, seed), "joint": mixture(new, old, config.joint_replay, seed),
            "kl": mixture(new, old, 0.0, seed)}
    data.update({group_name(r): mixture(new, old, r, seed) for r in config.replays})
    evaluate = lambda p: accuracies(config, p, evals)
    plain = [run for run in plan if run[0] != "kl"]
    _, trajectory = finetune_runs(config, params, plain, {g: data[g] for g in {r[0] for r in plain}}, evaluate,
                                  seed, progress=progress)
    with_kl = [run for run in plan if run[0] == "kl"]
    _, kl_trajectory = finetune_runs(config, params, with_kl, {"kl": data["kl"]}, evaluate, seed,
                                     anchor=anchor_pool(config, params, keys, seed), progress=progress)
    plan = plain + with_kl
    curve = np.concatenate([np.stack([acc for _, acc in trajectory]),
                            np.stack([acc for _, acc in kl_trajectory])], axis=1)   # [n_evals, n_runs, n_sets]
    col = {name: i for i, name in enumerate(names)}
    total = n_params(params)
    out: dict[str, dict[str, float]] = {"world": {f"base_{k}_acc" if k in ("t1", "t2", "t3") else f"base_{k}": float(v)
                                                  for k, v in before.items()}}
    reference = {g: i for i, (g, arm, _) in enumerate(plan) if arm == "full_ft_unfrozen"}
    level: dict[str, float] = {}     # a T3 level every main arm of the group reaches: compare T1 there
    for i, (group, arm, _) in enumerate(plan):
        if not arm.startswith(("circuit_b", "random_b")):
            level[group] = min(level.get(group, np.inf), float(curve[-1, i, col["t3"]]))
    ratio = lambda a, b: float(a / b) if b > 0 else float("nan")
    for i, (group, arm, mask) in enumerate(plan):
        final = curve[-1, i]
        full_t3 = curve[-1, reference[group], col["t3"]]
        t1_ret = curve[:, i, col["t1"]] / before["t1"] if before["t1"] > 0 else np.full(len(curve), np.nan)
        matched = at_matched(curve[:, i, col["t3"]], t1_ret, level[group])
        out[f"{group}_{arm}"] = {
            "t1_acc": float(final[col["t1"]]), "t2_acc": float(final[col["t2"]]), "t3_acc": float(final[col["t3"]]),
            "t3_old": float(final[col["t3_old"]]),
            "t1_retention": ratio(final[col["t1"]], before["t1"]),
            "t2_retention": ratio(final[col["t2"]], before["t2"]),
            "t3_rel_full_ft": ratio(final[col["t3"]], full_t3),
            "t3_rel_edit_full_ft": ratio(final[col["t3"]], curve[-1, reference["edit"], col["t3"]]),
            "t1_as_t3": float(final[col["t1_as_t3"]]),
            "t1_retention_at_matched_t3": matched, "reached_matched_t3": float(np.isfinite(matched)),
            "matched_t3_level": level[group],
            "frozen_fraction": frozen_count(mask, params) / total}
    if keep is not None:
        keep.setdefault("leaf_fractions", {arm: leaf_fractions(masks[arm], params)
                                           for arm in ("full_ft", "circuit", "random", "layers", "elements")})
        keep.setdefault("trajectories", {})[seed] = {
            "steps": [s for s, _ in trajectory], "runs": [f"{g}_{a}" for g, a, _ in plan], "sets": names,
            "acc": curve.tolist()}
    return out


# --- report --------------------------------------------------------------------------------------


def pairs(config: Config) -> list[tuple[str, str]]:
    g = group_name(config.replay)
    out = []
    for group in ("edit", *(group_name(r) for r in config.replays), "kl"):
        others = ("random", "layers", "elements") if group in (g, "kl") else ("random",)
        out += [(f"{group}_circuit", f"{group}_{b}") for b in (*others, "full_ft", "full_ft_unfrozen")]
        out.append((f"{group}_full_ft", f"{group}_full_ft_unfrozen"))
    out += [(f"{g}_{budget_name('circuit', b, config)}", f"{g}_{budget_name('random', b, config)}")
            for b in config.budgets if b != config.budget]
    return out


def targets(config: Config, s: dict[str, Any]) -> dict[str, float]:
    """The issue's targets at the headline replay and budget, from the seed means and paired errors."""
    g = group_name(config.replay)
    key = f"{g}_circuit_minus_{g}_random.t1_retention"
    gain, se = s[f"{key}_mean"], s[f"{key}_se"]
    ok = lambda x: bool(x is not None and np.isfinite(x))
    upper = "kl_full_ft_unfrozen"
    up_t1, up_t3 = s[f"{upper}.t1_retention_mean"], s[f"{upper}.t3_rel_edit_full_ft_mean"]
    return {"targets.upper_bound_met": float(ok(up_t1) and ok(up_t3) and up_t1 >= T1_TARGET and up_t3 >= T3_TARGET),
            "targets.t1_retention_met": float(ok(s[f"{g}_circuit.t1_retention_mean"])
                                              and s[f"{g}_circuit.t1_retention_mean"] >= T1_TARGET),
            "targets.t3_rel_met": float(ok(s[f"{g}_circuit.t3_rel_full_ft_mean"])
                                        and s[f"{g}_circuit.t3_rel_full_ft_mean"] >= T3_TARGET),
            "targets.beats_random": float(ok(gain) and gain > 0 and gain > 2 * se)}


def plot(config: Config, s: dict[str, Any], out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    g = group_name(config.replay)
    for arm, c in (("circuit", "tab:red"), ("random", "tab:gray")):
        keys = [f"{g}_{budget_name(arm, b, config)}" for b in config.budgets]
        for metric, ls, what in (("t1_retention", "-o", "T1 retention"), ("t3_rel_full_ft", "--s", "T3 / full FT")):
            ax.errorbar(config.budgets, [s[f"{k}.{metric}_mean"] for k in keys],
                        yerr=[s[f"{k}.{metric}_std"] for k in keys], fmt=ls, c=c, capsize=2, label=f"{arm}: {what}")
    for arm, c in (("full_ft_unfrozen", "k"), ("full_ft", "tab:purple")):
        ax.axhline(s[f"{g}_{arm}.t1_retention_mean"], c=c, ls=":", lw=1, label=f"{arm}: T1 retention")
    ax.axhline(T1_TARGET, ls="--", c="tab:green", lw=1, label=f"T1 target {T1_TARGET}")
    ax.set(xscale="log", xlim=(min(config.budgets) / 1.5, max(config.budgets) * 1.5),
           xlabel="share of parameters in the mask (shared parameters frozen on top)", ylim=(-0.03, 1.05),
           title=f"budget curve, {100 * config.replay:g}% replay")
    ax.legend(fontsize=6)
    ax = axes[1]
    markers = {"full_ft_unfrozen": ("k", "*"), "full_ft": ("tab:purple", "s"), "circuit": ("tab:red", "o"),
               "random": ("tab:gray", "o"), "layers": ("tab:blue", "^"), "elements": ("tab:orange", "v")}
    for arm, (c, m) in markers.items():
        k = f"{g}_{arm}"
        ax.errorbar(s[f"{k}.t3_acc_mean"], s[f"{k}.t1_retention_mean"], xerr=s[f"{k}.t3_acc_std"],
                    yerr=s[f"{k}.t1_retention_std"], fmt=m, c=c, ms=8, capsize=3, label=arm)
    for k, label in (("edit_full_ft_unfrozen", "edit only, full FT"),
                     ("kl_full_ft_unfrozen", "KL, full FT (upper bound)"),
                     ("joint_full_ft_unfrozen", "50% replay, full FT")):
        ax.errorbar(s[f"{k}.t3_acc_mean"], s[f"{k}.t1_retention_mean"], fmt="P", ms=9, label=label)
    ax.axhline(T1_TARGET, ls="--", c="tab:green", lw=1)
    ax.axvline(T3_TARGET * s[f"{g}_full_ft_unfrozen.t3_acc_mean"], ls=":", c="tab:green", lw=1)
    ax.set(xlabel=f"T3 (the {config.n_edit} edited {config.t2} facts) accuracy", ylabel="T1 retention",
           xlim=(-0.03, 1.03), ylim=(-0.03, 1.05),
           title=f"{100 * config.replay:g}% replay, {100 * config.budget:g}% budget ({int(s['n_seeds'])} seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "retention_vs_t3.png", dpi=120)
    plt.close(fig)


def report(config: Config, s: dict[str, Any], leaf: dict[str, dict[str, float]],
           gate: dict[int, dict[str, float]] | None = None) -> str:
    g = group_name(config.replay)
    pm = lambda k, m: _runner.pm(s, k, m)
    yes = lambda flag: "met" if s[flag] else "NOT met"
    metrics = ["frozen_fraction", "t1_retention", "t1_retention_at_matched_t3", "t2_retention", "t3_acc",
               "t3_rel_full_ft", "t3_old", "t1_as_t3"]
    groups = ["edit", *(group_name(r) for r in config.replays), "joint", "kl"]
    headline = [f"{g}_{a}" for a in ("full_ft_unfrozen", "full_ft", *MASKED)]
    kl = [f"kl_{a}" for a in ("full_ft_unfrozen", "full_ft", *MASKED)]
    others = [f"edit_{a}" for a in FOUR]
    others += [f"{group_name(r)}_{a}" for r in config.replays if r != config.replay for a in FOUR]
    others += ["joint_full_ft_unfrozen"]
    curve_rows = []
    for b in config.budgets:
        c_, r_ = f"{g}_{budget_name('circuit', b, config)}", f"{g}_{budget_name('random', b, config)}"
        d = f"{c_}_minus_{r_}.t1_retention"
        curve_rows.append([f"{100 * b:g}%", pm(c_, "frozen_fraction"), pm(c_, "t1_retention"), pm(r_, "t1_retention"),
                           f"{s[d + '_mean']:.3f} ± {s[d + '_se']:.3f}", pm(c_, "t3_rel_full_ft"),
                           pm(r_, "t3_rel_full_ft")])
    kinds = list(next(iter(leaf.values())))
    leaf_rows = [[k, *(f"{leaf[a][k]:.3f}" for a in leaf)] for k in kinds]
    c = f"{g}_circuit"
    gain = f"{g}_circuit_minus_{g}_random.t1_retention"
    lines = [
        f"## Surgical update ({int(s['n_seeds'])} seeds, {s['minutes']:.1f} min)",
        "",
        f"T1 = {config.t1}, T2 = {config.t2}; T3 = an edit of T2: new values for {config.n_edit} of its "
        f"{config.n_symbols} keys (a new edit per seed), the other T2 facts kept. Base model (pretrained once per "
        f"seed, cached): T1 {pm('world', 'base_t1_acc')}, T2 (unedited facts) {pm('world', 'base_t2_acc')}, "
        f"T3 {pm('world', 'base_t3_acc')} (old answers to edited prompts: {pm('world', 'base_t3_old')}); T1 prompts "
        f"already answered as the edited lookup: {pm('world', 'base_t1_as_t3')}.",
        "",
        *(gate_lines(config, gate) if gate else []),
        "**Is the world fair?**",
        f"- Upper bound (`kl_full_ft_unfrozen`: nothing frozen, the edit + {config.kl_weight:g} × KL to the old "
        f"model on unlabelled T1 and unedited T2 prompts): T1 retention {pm('kl_full_ft_unfrozen', 't1_retention')}, "
        f"T3 {pm('kl_full_ft_unfrozen', 't3_acc')} = {pm('kl_full_ft_unfrozen', 't3_rel_edit_full_ft')} of the "
        f"unconstrained edit's T3 ({pm('edit_full_ft_unfrozen', 't3_acc')}): "
        f"{yes('targets.upper_bound_met')} (T1 ≥ {T1_TARGET}, T3 ≥ {T3_TARGET:.0%}). 50% labelled replay "
        f"(`joint`): T1 retention {pm('joint_full_ft_unfrozen', 't1_retention')}, T3 "
        f"{pm('joint_full_ft_unfrozen', 't3_acc')}.",
        f"- What the masks have to protect: the edit alone (`edit_full_ft_unfrozen`) leaves T1 retention "
        f"{pm('edit_full_ft_unfrozen', 't1_retention')}; with {100 * config.replay:g}% replay "
        f"{pm(f'{g}_full_ft_unfrozen', 't1_retention')}.",
        f"- Shortcut, measured: T1 prompts answered as the edited lookup (ignoring the task token): "
        f"{pm('edit_full_ft_unfrozen', 't1_as_t3')} (edit only, full FT), {pm(f'{g}_circuit', 't1_as_t3')} "
        f"({100 * config.replay:g}% replay, circuit). T1 is lost to interference, not to the shortcut.",
        "",
        f"**Headline: {100 * config.replay:g}% replay, masks of {100 * config.budget:g}% of the parameters** "
        "(frozen fraction includes the shared parameters):",
        "",
        _runner.arm_table(s, headline, metrics),
        "",
        f"- Circuit T1 retention ≥ {T1_TARGET}: {yes('targets.t1_retention_met')} ({pm(c, 't1_retention')}).",
        f"- Circuit T3 ≥ {T3_TARGET:.0%} of full FT: {yes('targets.t3_rel_met')} ({pm(c, 't3_rel_full_ft')}).",
        f"- Circuit beats random (paired gain in T1 retention > 2 SE): {yes('targets.beats_random')} (gain "
        f"{s[f'{gain}_mean']:.3f} ± {s[f'{gain}_se']:.3f} SE, n = {s[f'{gain}_n']}).",
        "",
        "Paired differences (same seed, same batches):",
        "",
        _runner.paired_table(s, [p for p in pairs(config) if p[0].startswith(f"{g}_circuit") and "_b" not in p[0]]
                             + [(f"{g}_full_ft", f"{g}_full_ft_unfrozen")],
                             ["t1_retention", "t1_retention_at_matched_t3", "t3_acc"]),
        "",
        f"Budget curve at {100 * config.replay:g}% replay (T1 retention; circuit − random paired, ± SE; T3 / full FT):",
        "",
        _common.markdown_table(["mask budget", "frozen fraction", "circuit T1", "random T1", "circuit − random",
                                "circuit T3 rel", "random T3 rel"], curve_rows),
        "",
        f"KL group (the edit + KL to the old model; `kl_full_ft_unfrozen` is the upper bound), masks of "
        f"{100 * config.budget:g}%:",
        "",
        _runner.arm_table(s, kl, metrics),
        "",
        _runner.paired_table(s, [p for p in pairs(config) if p[0].startswith("kl_")], ["t1_retention", "t3_acc"]),
        "",
        "Other groups (the edit alone, the other replay sizes, 50% replay):",
        "",
        _runner.arm_table(s, others, metrics),
        "",
        _runner.paired_table(s, [p for p in pairs(config) if p[0].split("_")[0] not in (g, "kl")],
                             ["t1_retention", "t3_acc"]),
        "",
        f"Frozen fraction per leaf kind (pooled over blocks; headline masks, seed {config.seeds[0]}):",
        "",
        _common.markdown_table(["leaf", *leaf], leaf_rows),
        "",
        f"Config: {config.d_model}-wide, {config.n_layers}-layer transformer; pretraining {config.pretrain_steps} "
        f"steps on T1 + T2; fine-tuning {config.finetune_steps} steps (Adam, peak {config.finetune_lr:g}, warmup "
        f"{config.finetune_warmup}, cosine decay), batch {config.finetune_batch}; KL: {config.kl_batch} anchor prompts "
        f"per step from a pool of {config.n_anchor}; groups {', '.join(groups)}.",
        "",
        "![retention vs T3](retention_vs_t3.png)",
    ]
    return "\n".join(lines)


def gate_lines(config: Config, gate: dict[int, dict[str, float]]) -> list[str]:
    rows = [[str(seed), f"{g['t1']:.3f}", f"{g['t2']:.3f}", f"{int(g['steps'])}", "yes" if g["passed"] else "**NO**"]
            for seed, g in gate.items()]
    unfair = [seed for seed, g in gate.items() if not g["passed"]]
    return [f"**Base-quality gate** (fixed before fine-tuning is judged): the base must reach {config.base_gate} on "
            f"held-out T1 *and* T2 prompts ({config.n_eval} each), checked after every round of {config.pretrain_steps} "
            f"pretraining steps, at most {config.max_pretrain_rounds} rounds.", "",
            _common.markdown_table(["seed", "base T1 (gate rows)", "base T2 (gate rows)", "pretraining steps",
                                    "passed"], rows), "",
            *([f"**World not fair on seed {', '.join(map(str, unfair))}**: the base missed the gate at the step cap; "
               "that seed is refused (no arm is run or judged on it)."] if unfair else
              ["Every seed's base passed the gate."]), ""]


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, Any]:
    check_config(config)
    gate = base_gate(config, progress=progress)       # every base first: an unfair seed is refused, not judged
    fair = tuple(seed for seed in config.seeds if gate[seed]["passed"])
    for seed in config.seeds:
        if not gate[seed]["passed"]:
            print(f"{NAME}: world not fair on seed {seed} (base T1 {gate[seed]['t1']:.3f}, T2 {gate[seed]['t2']:.3f} "
                  f"after {int(gate[seed]['steps'])} steps, gate {config.base_gate}); refusing that seed.")
    gate_metrics = {f"gate.seed{seed}.{k}": v for seed, g in gate.items() for k, v in g.items()}
    gate_metrics["gate.n_unfair"] = float(len(config.seeds) - len(fair))
    if not fair:
        _common.write_metrics(NAME, gate_metrics)
        _common.write_readme(NAME, "\n".join(["## Surgical update: refused", "", *gate_lines(config, gate)]))
        return gate_metrics
    config = dataclasses.replace(config, seeds=fair)
    keep: dict[str, Any] = {}
    result = _runner.run(NAME, config.seeds, lambda seed: run_seed(config, seed, progress=progress, keep=keep),
                         pairs=pairs(config), progress=progress, extra=gate_metrics)
    s = dict(result.summary)
    s.update(targets(config, s))
    _common.write_metrics(NAME, s)
    out = _common.results_dir(NAME)
    (out / "trajectories.json").write_text(json.dumps(keep["trajectories"]) + "\n")
    plot(config, s, out)
    _common.write_readme(NAME, report(config, s, keep["leaf_fractions"], gate))
    return s


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
