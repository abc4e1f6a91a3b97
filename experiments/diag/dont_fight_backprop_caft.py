"""Issue 14.3 (h14d) CAFT diagnostic, kept for reproduction; not part of the package or the study.

Run from the repo root: ``python -m experiments.diag.dont_fight_backprop_caft SEED VARIANT[,VARIANT]``.
VARIANT: orth (the study's caft), raw (no readout orthogonalisation), 2pos (cue + answer position),
allsites (+ mlp.hidden), post (every site but blocks.0.resid_pre).
"""

import sys, time, numpy as np
from experiments import dont_fight_backprop as d
from idesign import shaping
import idesign as ids
from idesign.data import spurious as sp


def main(argv: list[str]) -> None:
    seed = int(argv[0])
    t = time.time()
    w = d.make_world(d.QUICK, seed)
    c, base, apply = w.config, w.base, w.apply
    opt = d.adamw(c.learning_rate, c.weight_decay)
    frozen = ids.optim.frozen(opt, freeze_mask=d.cue_rows_mask(w, base))
    r = d.readout_direction(w, base)
    sites = d.residual_sites(c.base.n_layers)
    for variant in argv[1].split(","):
        ss = sites + ([f"blocks.{i}.mlp.hidden" for i in range(c.base.n_layers)] if variant == "allsites" else [])
        ss = [x for x in ss if not (variant == "post" and x.endswith("resid_pre"))]
        pos = [sp.CUE_POSITION, w.spec.seq_len - 2] if variant == "2pos" else [sp.CUE_POSITION]
        acts = d.acts_at(w, base, w.concept_fit, ss, pos)
        bases = {}
        for s in ss:
            v = np.stack([d.mass_mean(acts[s][:, k], w.concept_fit["s"]) for k in range(len(pos))])
            if s.endswith(d._RESIDUAL_LIKE) and variant != "raw":
                v, _ = d.orthogonalise(v, r)
            bases[s] = ids.subspaces.from_directions(v).basis
        th = shaping.caft(bases)
        step = d.train_steps(apply, ("diag", variant, seed), frozen)
        p = d.run_training(ids.init_train_state(base, frozen), step, w.finetune, c.steps, c.batch_size, seed + 1,
                           hooks_for=lambda b: th).params
        e = d.evaluate(w, p); v = th.resolve({})
        tv = (sp.accuracy(apply, p, w.test_id, w.spec, hooks=v), sp.accuracy(apply, p, w.test_ood, w.spec, hooks=v))
        print(seed, variant, "infer id/ood %.3f/%.3f" % (e["id_acc"], e["ood_acc"]), "train-view %.3f/%.3f" % tv,
              "%.0fs" % (time.time() - t), flush=True)
        for only in [x for x in sites if x in bases][:1]:
            th1 = shaping.caft({only: bases[only]}).resolve({})
            print("   ablate only", only, "id/ood %.3f/%.3f" % (sp.accuracy(apply, p, w.test_id, w.spec, hooks=th1), sp.accuracy(apply, p, w.test_ood, w.spec, hooks=th1)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
