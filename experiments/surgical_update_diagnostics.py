"""Why does the T1 circuit protect T1 barely better than a random mask? Cheap diagnostics on one or two seeds.

For a seed of the surgical-update study (its cached, gated base model; the headline 2% replay group; the 10% budget):

* **gradient cancellation on T1**: ``|mean_n g_n|² / mean_n |g_n|²`` over the 256 attribution rows (1 = every
  example's gradient points one way, ~1/N = they cancel). At a trained minimum the mean gradient — the ``g`` in
  gradient × weight — is what is left after cancellation, so ``|g ⊙ w|`` ranks noise.
* **concentration**: share of the total score (non-shared elements) in the top 10% of elements, for
  ``|g ⊙ w|`` attribution on T1 and for the diagonal empirical Fisher ``mean_n g_n²`` on T1.
* **where the update falls**: full fine-tuning (shared frozen) at 2% replay; share of ``|Δθ|²`` and of the
  Fisher-weighted damage ``Σ F_T1 Δθ²`` (the second-order loss increase on T1 in the diagonal approximation)
  that lies on the circuit's elements, the random mask's, and the Fisher circuit's.
* **masks fine-tuned** (same data, same batches): circuit (|g ⊙ w| on T1), random, ``circuit_t1t2``
  (attribution on T1 ∪ unedited T2 rows), ``circuit_fisher`` (the Fisher diagonal on T1 summed per head/neuron,
  chosen by ``budget_circuit`` as the circuit is), ``circuit_interference`` (F_T1 × the edit gradient's squared
  signal-to-noise ratio per element, summed per component: the predicted T1 damage of the edit's Adam update). All
  at the same 10% budget, shared frozen in each.

Run: ``python -m experiments.surgical_update_diagnostics 0 4`` (seeds). Prints one JSON line per seed.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import idesign as ids
from experiments import surgical_update as su


def per_example_grads(config: su.Config, params, batch):
    loss = su._compiled(config)["loss"]
    one = lambda p, t, m: jax.tree_util.tree_leaves(jax.grad(lambda q: loss(q, {"tokens": t[None], "loss_mask": m[None]})[0])(p))
    grads = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(params, jnp.asarray(batch["tokens"]),
                                                          jnp.asarray(batch["loss_mask"]))
    return [np.asarray(g, np.float64) for g in grads]


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree_util.tree_leaves(tree)])


def seed_diagnostics(config: su.Config, seed: int) -> dict:
    model = su.model_config(config)
    params = su.base_model(config, seed, progress=False)["params"]
    treedef = jax.tree_util.tree_structure(params)
    t1 = next(su.batches(su.task_data(config, (config.t1,), config.n_attribution, seed=3000 + seed),
                         config.n_attribution, seed))
    table, keys = su.edit(config, seed)
    both = su.arrays(su.task_data(config, (config.t1, config.t2), config.n_attribution, seed=3000 + seed))
    keep = (both["tokens"][:, 1] != su.sequence_tasks.task_token_id(config.t2)) | ~su.sequence_tasks.rows_with_keys(
        both, keys, su.t2_config(config))
    t1t2 = su.take(both, keep, config.n_attribution)

    shared = su.dense(ids.circuits.shared_mask(params, model), params)
    inside = ~flat(shared).astype(bool)
    g = per_example_grads(config, params, t1)                                  # [N, ...] per leaf
    mean_g = np.concatenate([x.mean(0).reshape(-1) for x in g])
    mean_sq = np.concatenate([(x ** 2).mean(0).reshape(-1) for x in g])
    cancellation = float((mean_g ** 2).sum() / mean_sq.sum())
    fisher = jax.tree_util.tree_unflatten(treedef, [jnp.asarray((x ** 2).mean(0), jnp.float32) for x in g])
    attribution = ids.circuits.weight_attribution(su._compiled(config)["loss"], params, t1)
    # Interference (rule fixed after the first pass showed the Fisher circuit alone fails, before this arm ran):
    # predicted T1 damage of the edit's update per element, F_T1 × Δθ² with Adam's Δθ ∝ the edit gradient's
    # signal-to-noise ratio |mean g| / rms g over edit rows (a step Adam takes consistently), summed per component.
    edit_rows = {k: v[:config.n_attribution] for k, v in su.finetune_data(config, table, keys, seed)[0].items()}
    ge = per_example_grads(config, params, edit_rows)
    snr2 = [x.mean(0) ** 2 / np.maximum((x ** 2).mean(0), 1e-30) for x in ge]
    interference = jax.tree_util.tree_unflatten(treedef, [jnp.asarray((x ** 2).mean(0) * r, jnp.float32)
                                                          for x, r in zip(g, snr2)])

    def top_share(score: np.ndarray, q: float = 0.1) -> float:
        s = np.sort(score[inside])[::-1]
        return float(s[: int(q * s.size)].sum() / s.sum())

    budget = int(config.budget * su.n_params(params))
    circuit_of = lambda scores: su.dense(ids.circuits.budget_circuit(
        params, model, ids.circuits.component_scores(scores, model), budget)[0], params)
    circuit = circuit_of(attribution)
    masks = {"circuit": circuit,
             "random": su.dense(ids.circuits.matched_random_mask(circuit, params, seed=seed), params),
             "circuit_t1t2": circuit_of(ids.circuits.weight_attribution(su._compiled(config)["loss"], params, t1t2)),
             "circuit_fisher": circuit_of(fisher),
             "circuit_interference": circuit_of(interference)}
    with_shared = {k: jax.tree_util.tree_map(np.logical_or, m, shared) for k, m in masks.items()}
    overlap = {k: float((flat(m).astype(bool) & flat(circuit).astype(bool)).sum() / max(flat(m).sum(), 1))
               for k, m in masks.items()}

    new, old = su.finetune_data(config, table, keys, seed)
    data = {"r": su.mixture(new, old, config.replay, seed)}
    evals = su.eval_sets(config, table, keys)
    before = su.accuracies(config, su.stack([params]), evals)[0]
    plan = [("r", "full_ft", shared), *[("r", k, m) for k, m in with_shared.items()]]
    tuned, trajectory = su.finetune_runs(config, params, plan, data, lambda p: su.accuracies(config, p, evals),
                                         seed, progress=False)
    final = trajectory[-1][1]
    col = {n: i for i, n in enumerate(evals["names"])}
    delta = flat(jax.tree_util.tree_map(lambda a, b: np.asarray(a[0]) - np.asarray(b), tuned, params))
    f = flat(fisher)
    damage = f * delta ** 2
    share = lambda x, m: float(x[flat(m).astype(bool) & inside].sum() / x[inside].sum())
    order = np.argsort(-damage[inside])
    oracle = float(damage[inside][order[: int(flat(circuit)[inside].sum())]].sum() / damage[inside].sum())
    return {
        "seed": seed,
        "circuit_leaf_density": su.leaf_fractions(circuit, params),
        "t1_grad_cancellation": cancellation, "n_rows": int(config.n_attribution),
        "top10_share_attribution": top_share(flat(attribution)), "top10_share_fisher": top_share(f),
        "mask_share_of_circuit": overlap,
        "update_sq_share": {k: share(delta ** 2, m) for k, m in masks.items()},
        "fisher_damage_share": {k: share(damage, m) for k, m in masks.items()},
        "fisher_damage_share_best_possible_same_count": oracle,
        "t1_retention": {a: float(final[i, col["t1"]] / before[col["t1"]]) for i, (_, a, _) in enumerate(plan)},
        "t3_acc": {a: float(final[i, col["t3"]]) for i, (_, a, _) in enumerate(plan)},
    }


if __name__ == "__main__":
    for s in [int(a) for a in sys.argv[1:]] or [0]:
        print(json.dumps(seed_diagnostics(su.QUICK, s)), flush=True)
