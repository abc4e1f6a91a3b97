"""Probe-based data attribution against gradient attribution: the time ratio as the model grows.

Scores the same preference pairs (random tokens) two ways on one model, both jitted once and timed warm,
interleaved (A B A B ...) so load drifts hit both alike; the pairs are tokenised once, untimed:

* ``probe``: :func:`idesign.data_attribution.probe_pair_scorer`, one forward pass over chosen and rejected
  together with a capture at the last block's ``resid_post``, the masked mean and the probe's dot product in
  the same jit (the unembedding is dead code);
* ``gradient``: :func:`idesign.data_attribution.gradient_pair_scores`, per-pair DPO gradients with
  ``vmap(grad)`` (policy and reference forward passes, one backward) dotted with a behaviour loss's gradient,
  in chunks of ``grad_batch`` pairs (the per-pair gradients are ``grad_batch`` copies of the parameters).

``<layers>x<width>.ratio`` = probe median / gradient median. ``<layers>x<width>.ratio_first_block`` reads the
probe at ``blocks.0.resid_post`` instead: the scorer's compiled forward stops at its read site (the later blocks
are dead code), so this is the ratio when validation picks the earliest block (as the data_debugging study's
rule may). The issue's target for the experiment is
``probe_time_ratio ≤ 0.1``; this records how the ratio depends on the model's size (on a tiny model a
backward pass costs only a few forward passes; per-pair gradients grow with the parameter count).

Writes ``results/benchmarks/attribution.json`` and prints a table.

Usage: ``python -m benchmarks.attribution [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

import idesign as ids
from benchmarks import _common
from idesign import data_attribution as da

DEFAULT_OUT = "results/benchmarks/attribution.json"


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "full"
    sizes: tuple[tuple[int, int], ...] = ((2, 32), (2, 256), (8, 32), (8, 256))   # (layers, width)
    n_pairs: int = 256
    prompt_len: int = 8
    response_len: int = 4
    vocab_size: int = 128
    grad_batch: int = 16
    repeats: int = 5
    seed: int = 0


FULL = Config()
QUICK = Config(preset="quick", n_pairs=64, repeats=3)


def pairs(config: Config) -> dict[str, list]:
    rng = np.random.default_rng(config.seed)
    draw = lambda n, size: rng.integers(3, config.vocab_size, (n, size)).tolist()
    return {"prompt": draw(config.n_pairs, config.prompt_len), "chosen": draw(config.n_pairs, config.response_len),
            "rejected": draw(config.n_pairs, config.response_len)}


def measure(config: Config, n_layers: int, width: int) -> dict[str, float]:
    model = ids.TransformerConfig(vocab_size=config.vocab_size, d_model=width, n_layers=n_layers,
                                  n_heads=max(2, width // 32), max_len=config.prompt_len + config.response_len)
    apply, params = ids.init_transformer(model, seed=config.seed)
    rows = pairs(config)
    encoded = ids.preference.encode_pairs(rows, pad_id=0)
    rng = np.random.default_rng(config.seed + 1)
    probe = ids.probes.MassMeanProbe(w=rng.normal(size=width).astype(np.float32), b=np.array(0.0, np.float32))
    scorer = da.probe_pair_scorer(apply, f"blocks.{n_layers - 1}.resid_post", pad_id=0)
    n_behaviour = min(16, config.n_pairs)      # the behaviour loss: a fixed two-token answer to a few prompts
    behaviour = da.behaviour_nll(apply, rows["prompt"][:n_behaviour], [[3, 4]] * n_behaviour, pad_id=0)
    first = da.probe_pair_scorer(apply, "blocks.0.resid_post", pad_id=0)
    fns = {"probe": lambda: scorer(params, probe, encoded), "probe_first": lambda: first(params, probe, encoded),
           "gradient": lambda: da.gradient_pair_scores(apply, params, params, encoded, behaviour, pad_id=0,
                                                       batch_size=config.grad_batch, normalize=True)}
    times = _common.time_interleaved(fns, config.repeats)
    probe_s, grad_s = _common.median(times["probe"]), _common.median(times["gradient"])
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    first_s = _common.median(times["probe_first"])
    return {"n_params": n_params, "probe_s": probe_s, "probe_first_block_s": first_s, "gradient_s": grad_s,
            "ratio": probe_s / grad_s, "ratio_first_block": first_s / grad_s}


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for n_layers, width in config.sizes:
        for k, v in measure(config, n_layers, width).items():
            metrics[f"{n_layers}x{width}.{k}"] = v
    largest = "{}x{}".format(*config.sizes[-1])
    return _common.finish(metrics, {f"{largest}.ratio": ("<=", 0.1)}, config, out)


if __name__ == "__main__":
    _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT)
