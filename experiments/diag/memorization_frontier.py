"""Diagnostic (issue 14.4): K-FAC memorized-recall / held-out-perplexity frontier per edited layer set, seed 0 only.

Run: ``python -m experiments.diag.memorization_frontier`` (uses the cached quick base of seed 0; seed 0 is a
looked-at seed already). Prints, per layer set and ρ, sweep-split memorized recall, logic, and the ppl ratio.
"""
import dataclasses
import time

from experiments import memorization as M
from idesign import curvature
from idesign.data import skills

SETS = (("b0.up", ("blocks.0.mlp.up",)), ("b0.down", ("blocks.0.mlp.down",)),
        ("block 0", ("blocks.0.mlp.up", "blocks.0.mlp.down")), ("block 1", ("blocks.1.mlp.up", "blocks.1.mlp.down")),
        ("both", ("blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.1.mlp.up", "blocks.1.mlp.down")))
RHOS = (0.86, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99)


def main(seed: int = 0) -> None:
    t0 = time.time()
    config = M.QUICK
    corpus = skills.make_skill_corpus(dataclasses.replace(config.corpus, seed=seed))
    apply, params, _ = M.train_lm(config, corpus, seed)
    print(f"base ready {time.time() - t0:.0f}s", flush=True)
    layers = [l for _, ls in SETS for l in ls]
    docs = skills.to_numpy(corpus.train, M.LM_COLUMNS + ["skill"])
    eigen = curvature.eigendecompose(curvature.collect_factors(
        apply, params, {k: docs[k] for k in M.LM_COLUMNS}, list(dict.fromkeys(layers)), key=seed,
        fisher=config.fisher, batch_size=config.kfac_batch_size, progress=False))
    items = skills.to_numpy(corpus.eval_split("sweep"))
    text = skills.to_numpy(corpus.heldout_split("sweep"), M.LM_COLUMNS)
    before = M._lm_scores(apply, params, items, text)
    print("before", {k: round(v, 3) for k, v in before.items()}, flush=True)
    for name, ls in SETS:
        for rho in RHOS:
            s = M._lm_scores(apply, M._edit("kfac", params, eigen, ls, rho, seed), items, text)
            print(f"{name:8s} rho={rho:.2f} mem={s['memorized']:.2f} arith={s['arithmetic']:.2f} "
                  f"logic={s['logic']:.2f} ppl_ratio={s['ppl'] / before['ppl']:.3f}", flush=True)
    print(f"done {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
