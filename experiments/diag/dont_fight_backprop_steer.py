"""Issue 14.3 (h14d) cue-conditional preventative-steering diagnostic.

Not part of the package or the study. Run from the repo root:
``python -m experiments.diag.dont_fight_backprop_steer SEED``
"""

import sys, time, numpy as np, jax.numpy as jnp
from experiments import dont_fight_backprop as d
from idesign import shaping
import idesign as ids


def main(argv: list[str]) -> None:
    seed = int(argv[0]); t = time.time()
    w = d.make_world(d.QUICK, seed)
    c, base, apply = w.config, w.base, w.apply
    plain = d.run_arm("plain", w)[1]
    opt = d.adamw(c.learning_rate, c.weight_decay)
    frozen = ids.optim.frozen(opt, freeze_mask=d.cue_rows_mask(w, base))
    site, ans = "blocks.0.resid_post", [w.spec.seq_len - 2]
    s = w.concept_fit["s"]
    v = d.mass_mean(d.acts_at(w, plain, w.concept_fit, [site], ans)[site][:, 0], s) \
        - d.mass_mean(d.acts_at(w, base, w.concept_fit, [site], ans)[site][:, 0], s)
    T = w.spec.seq_len - 1
    def hooks_for(b):
        sc = np.zeros((len(b["s"]), T, 1), np.float32); sc[:, -1, 0] = np.asarray(b["s"]) - 0.5
        return shaping.preventative_steering({site: jnp.asarray(v, jnp.float32)}, scale=jnp.asarray(sc))
    step = d.train_steps(apply, ("steer_cond", seed), frozen)
    p = d.run_training(ids.init_train_state(base, frozen), step, w.finetune, c.steps, c.batch_size, seed + 1,
                       hooks_for=hooks_for).params
    e = d.evaluate(w, p)
    print(seed, "cue-conditional steering id/ood %.3f/%.3f follows cue %.3f" % (e["id_acc"], e["ood_acc"], e["ood_follows_cue"]),
          "|v| %.2f" % np.linalg.norm(v), "%.0fs" % (time.time() - t), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
