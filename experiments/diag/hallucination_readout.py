"""Diagnostic (issue 13): can the position where a policy decides to retract read what the base model knows?

A policy retracts by emitting ``<retract>``: after a claim, its logit is a linear function of the residual stream at
the claim's last token; inside a claim (a cut) it competes with the value tokens in one softmax. This measures, on
the cached quick bases, how well each can tell a hallucinated claim from a supported one, and the lowest
hallucination rate each reaches as a retraction rule on the base's greedy held-out claims with known accuracy within
5 points (:func:`experiments.hallucination.confidence_ceiling`; the oracle's target is 0.6 x the base's rate):

* ``readout``: a logistic regression on the residual stream at the claim's last token (every layer concatenated),
  fitted on the probe half's sampled claims, scored on the held-out greedy claims: the best a retraction decided
  after the claim can do *without reshaping the representation*;
* ``maxlogit``: the least-confident claim token's largest logit (a ``<retract>`` of constant logit competing inside
  the claim's softmax, greedy);
* ``maxprob``: the base's own confidence (what :mod:`experiments.diag.hallucination_confidence` thresholds);
* ``shift``: the base's own ``<retract>`` logit against the best other token at each claim token, the least margin
  over the claim: exactly the greedy claims a policy retracts that differs from the base by a constant added to the
  ``<retract>`` logit (a cut before the claim token where the margin is first overtaken); what RL has to learn
  when the base already breaks claims off at a constant rate (``ClaimWorldConfig.cut_rate``).

Run: ``python -m experiments.diag.hallucination_readout [--set field=value ...]`` (any field of
:class:`experiments.hallucination.Config`, e.g. ``--set marker_rate=0.3``: a new base is pretrained and cached; seeds
0-2 by default, about 7 s each on cached bases).
"""

import numpy as np
import jax
from sklearn.linear_model import LogisticRegression

from experiments import hallucination as H
from experiments.diag.hallucination_oracle import config_from_cli, seed_setup
from idesign.data.tokenizer import RETRACT_ID

QUANTILES = np.linspace(0.0, 1.0, 201)


def claims_with_activations(rt: H.Runtime, world, base, task: H.Task, rows, key=None):
    """Claims of ``base``'s completions on ``rows`` (sampled with ``key``, greedy without), their logits and the
    residual stream at each claim's last token, every layer concatenated."""
    gen = rt.generate(base, task.prompts[rows], task.valid[rows], key=key)
    tokens, valid = H.sequences(task, rows, gen)
    claims = H.parse_batch(world, task, rows, gen["tokens"], gen["valid"]).claims
    logits, acts = rt.forward(base, tokens, valid)
    last = np.concatenate([acts[s][claims.row, claims.end - 1] for s in rt.sites], -1)
    return claims, logits, tokens, last


def least_confident_max_logit(logits, claims: H.Claims) -> np.ndarray:
    return np.asarray([logits[r, s - 1:e - 1].max(-1).min() for r, s, e in zip(claims.row, claims.start, claims.end)])


def retract_margin(logits, claims: H.Claims) -> np.ndarray:
    """Per claim, the least margin of the best non-``<retract>`` logit over the ``<retract>`` logit at its tokens."""
    rid = RETRACT_ID
    others = logits.copy()
    others[..., rid] = -np.inf
    margin = others.max(-1) - logits[..., rid]
    return np.asarray([margin[r, s - 1:e - 1].min() for r, s, e in zip(claims.row, claims.start, claims.end)])


def main() -> None:
    config, rt = config_from_cli(__doc__.splitlines()[0]), None
    for seed in config.seeds:
        world, task, rt, base, train_rows, eval_rows = seed_setup(config, seed, rt)
        fit_claims, _, _, fit_x = claims_with_activations(rt, world, base, task, np.repeat(train_rows, 2),
                                                          jax.random.key(seed))
        claims, logits, tokens, x = claims_with_activations(rt, world, base, task, eval_rows)
        readout = LogisticRegression(C=1.0, max_iter=3000).fit(fit_x, fit_claims.supported)
        scores = {"readout": readout.decision_function(x), "maxlogit": least_confident_max_logit(logits, claims),
                  "maxprob": H.token_stats(logits, tokens, claims)["maxprob_min"],
                  "shift": retract_margin(logits, claims)}
        base_rate = (claims.final & ~claims.supported).sum() / task.asked(eval_rows).sum()
        line = [f"seed {seed}: base hallucination {base_rate:.3f}, target {0.6 * base_rate:.3f}"]
        for name, score in scores.items():  # higher = more likely supported
            line.append(f"{name} AUC {H.auc(~claims.supported, -score):.3f} "
                        f"ceiling {H.confidence_ceiling(claims, score, task, eval_rows, np.quantile(score, QUANTILES)):.3f}")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
