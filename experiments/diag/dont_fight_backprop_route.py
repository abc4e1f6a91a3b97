"""Issue 14.3 (h14d) gradient-routing diagnostic: the arm's metrics with and without its inference ablation.

Not part of the package or the study. Run from the repo root:
``python -m experiments.diag.dont_fight_backprop_route SEED``
"""

import sys
from experiments import dont_fight_backprop as d


def main(argv: list[str]) -> None:
    seed = int(argv[0])
    w = d.make_world(d.QUICK, seed)
    plain = d.run_arm("plain", w)[1]
    m, p = d.run_arm("gradient_routing", w, plain)
    off = d.evaluate(w, p)
    print(seed, "routing: region ablated id/ood %.3f/%.3f; not ablated id/ood %.3f/%.3f follows cue %.3f" % (
        m["id_acc"], m["ood_acc"], off["id_acc"], off["ood_acc"], off["ood_follows_cue"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
