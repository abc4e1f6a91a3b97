"""Diagnostic (issue 13): the oracle RL arm alone, on cached base models, under config overrides.

Run: ``python -m experiments.diag.hallucination_oracle --set 'rl_steps=96' --set 'seeds=[0]'`` (any field of
:class:`experiments.hallucination.Config`). Prints, per seed, the base's and the oracle's held-out hallucination
rate and known accuracy, whether the oracle meets its target (hallucination <= 0.6 x base, known accuracy within
5 points), how often it retracts right vs wrong claims, and (:func:`first_claim_stats`) what it does with the first
claim on each slot: how often that claim is right for known entities, how often right, wrong and unknown-entity first
claims are retracted, and how retracted slots end.
"""
import argparse
import ast
import dataclasses
import time

import numpy as np

from experiments import hallucination as H
from idesign.data import claim_world as cw


def first_claim_stats(prefix: str, parsed: H.Parsed, task: H.Task, rows) -> dict[str, float]:
    """What a policy does with the first claim on each slot (before any retraction).

    ``known_first_claim_acc``: known-entity slots whose first claim is right (a policy that answers known entities
    worse than the base, then retracts, is exploiting the retraction reward rather than learning which claims to
    take back); ``first_retract_{right,wrong,unknown}``: how often right and wrong known-entity first claims, and
    unknown-entity ones, are retracted; ``after_retract_{fixed,retracted,wrong}``: how slots whose first claim was
    retracted end (supported, retracted, or a wrong correction).
    """
    c = parsed.claims
    first = np.ones(len(c.row), bool)
    seen = set()
    for i in np.lexsort((c.start, c.row)):
        first[i] = (c.row[i], c.slot[i]) not in seen
        seen.add((c.row[i], c.slot[i]))
    rows = np.asarray(rows)
    known = ~task.unknown[rows[c.row]]
    n_known_slots = max(int(task.asked(rows)[~task.unknown[rows]].sum()), 1)
    fk = first & known
    fate = parsed.outcome[c.row[first & c.retracted], c.slot[first & c.retracted]]

    def share(x):
        return float(np.mean(x)) if np.size(x) else float("nan")

    return {f"{prefix}.known_first_claim_acc": float((fk & c.supported).sum() / n_known_slots),
            f"{prefix}.first_retract_right": share(c.retracted[fk & c.supported]),
            f"{prefix}.first_retract_wrong": share(c.retracted[fk & ~c.supported]),
            f"{prefix}.first_retract_unknown": share(c.retracted[first & ~known]),
            f"{prefix}.after_retract_fixed": share(fate == 0),
            f"{prefix}.after_retract_retracted": share(fate == 2),
            f"{prefix}.after_retract_wrong": share(fate == 1)}


def seed_setup(config: H.Config, seed: int, rt: H.Runtime | None = None):
    """The seed's world, task, runtime, cached base model and the study's entity split (as in the study)."""
    world = cw.make_claim_world(H.world_config(config, seed))
    task = H.make_task(world)
    rt = rt or H.Runtime(config, world.tokenizer.vocab_size)
    rt.tokenizer, rt.config_prompt_len = world.tokenizer, task.prompts.shape[1]
    base = H.pretrain(rt, config, seed, progress=False)
    return world, task, rt, base, *H.entity_split(task, seed)


def greedy_stats(name: str, params, world, task: H.Task, rt: H.Runtime, rows) -> dict[str, float]:
    """The study's slot metrics and :func:`first_claim_stats` of ``params``' greedy completions on ``rows``."""
    gen = rt.generate(params, task.prompts[rows], task.valid[rows])
    parsed = H.parse_batch(world, task, rows, gen["tokens"], gen["valid"])
    return {**H.slot_metrics(name, parsed, task, rows), **first_claim_stats(name, parsed, task, rows)}


def oracle_on_seed(config: H.Config, seed: int, rt: H.Runtime | None = None) -> tuple[dict[str, float], H.Runtime]:
    """The base's and the RL oracle's held-out metrics on one seed, and the runtime (reused across seeds)."""
    world, task, rt, base, train_rows, eval_rows = seed_setup(config, seed, rt)
    out = greedy_stats("base", base, world, task, rt, eval_rows)
    t0 = time.time()
    student, _ = H.train_rl(rt, config, world, "rl_oracle", base, None, None, task, train_rows, seed, True)
    out["rl_seconds"] = time.time() - t0
    out.update(greedy_stats("oracle", student, world, task, rt, eval_rows))
    out["target"] = 0.6 * out["base.hallucination_rate"]
    out["meets"] = float(out["oracle.hallucination_rate"] <= out["target"]
                         and out["oracle.known_acc"] >= out["base.known_acc"] - 0.05)
    return out, rt


def config_from_cli(description: str) -> H.Config:
    """The quick preset with ``--set field=python-literal`` overrides from the command line."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--set", action="append", default=[], help="field=python-literal")
    args = ap.parse_args()
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    return dataclasses.replace(H.QUICK, **overrides)


def main() -> None:
    config = config_from_cli(__doc__.splitlines()[0])
    rt = None
    for seed in config.seeds:
        out, rt = oracle_on_seed(config, seed, rt)
        keys = ("base.hallucination_rate", "base.known_acc", "target", "oracle.hallucination_rate",
                "oracle.known_acc", "oracle.retract_rate_supported", "oracle.retract_rate_hallucinated",
                "oracle.abstain_rate", "oracle.malformed_rate", "meets", "rl_seconds",
                "base.known_first_claim_acc", "oracle.known_first_claim_acc", "oracle.first_retract_right",
                "oracle.first_retract_wrong", "oracle.after_retract_fixed", "oracle.after_retract_retracted",
                "oracle.after_retract_wrong", "base.after_retract_wrong", "oracle.first_retract_unknown",
                "base.first_retract_unknown", "base.first_retract_right", "base.first_retract_wrong")
        print(f"seed {seed}: " + " ".join(f"{k}={out[k]:.3f}" for k in keys), flush=True)


if __name__ == "__main__":
    main()
