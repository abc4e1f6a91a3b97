"""Diagnostic (issue 13): what a threshold on the base model's own confidence reaches, per threshold.

Run: ``python -m experiments.diag.hallucination_confidence`` (cached quick bases, seeds 0-2). For each threshold
``t`` on a claim's least-confident token max-probability, retracting the base's greedy held-out claims below it:
the hallucination rate, the known accuracy and the share of right claims retracted; then P(claim is right) and the
share of unknown-entity claims per confidence bin (how calibrated the base is and where unknown entities sit).
"""

from experiments import hallucination as H
from experiments.diag.hallucination_oracle import seed_setup

THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8)
BINS = ((0.0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))


def main(seeds=(0, 1, 2)) -> None:
    config, rt = H.QUICK, None
    for seed in seeds:
        world, task, rt, base, _, rows = seed_setup(config, seed, rt)  # rows: the study's held-out half
        gen = rt.generate(base, task.prompts[rows], task.valid[rows])
        tokens, valid = H.sequences(task, rows, gen)
        claims = H.parse_batch(world, task, rows, gen["tokens"], gen["valid"]).claims
        logits, _ = rt.forward(base, tokens, valid, sites=rt.sites[:1])
        conf = H.token_stats(logits, tokens, claims)["maxprob_min"]
        asked, unknown = task.asked(rows), task.unknown[rows]
        n_slots, n_known = asked.sum(), asked[~unknown].sum()
        final, unk, right = claims.final, unknown[claims.row], claims.supported
        print(f"seed {seed}: {final.sum()} final claims, {unk[final].mean():.2f} about unknown entities")
        for t in THRESHOLDS:
            keep = final & (conf >= t)
            print(f"  t={t:.2f} hallucination={(keep & ~right).sum() / n_slots:.3f} "
                  f"known_acc={(keep & right & ~unk).sum() / n_known:.3f} "
                  f"right_retracted={(final & right & (conf < t)).sum() / max((final & right).sum(), 1):.3f}")
        for lo, hi in BINS:
            m = final & (conf >= lo) & (conf < hi)
            if m.any():
                print(f"  max-prob in [{lo:.1f}, {min(hi, 1):.1f}): n={m.sum()} P(right)={right[m].mean():.3f} "
                      f"unknown share={unk[m].mean():.2f}")


if __name__ == "__main__":
    main()
