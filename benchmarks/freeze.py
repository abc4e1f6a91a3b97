"""Optimizer-state memory saved by ``idesign.optim.frozen`` against plain ``optax.adamw``.

The baseline is ``optax.adamw`` on every parameter (what ``optax.chain(adamw, ids.optim.freeze(mask))``
also holds: freezing last changes updates, not state). ``frozen(adamw, freeze_mask=mask)`` partitions out
the leaves a mask freezes *entirely*, so Adam keeps no ``mu``/``nu`` for them; a leaf frozen only in
part (a head inside a fused kernel) still needs its full state. The scenarios show both:

* ``circuit``: 10% of the heads and 2% of the neurons of every layer frozen (element-level; no savings expected);
* ``freeze_bottom_half``: embeddings and the first half of the blocks frozen;
* ``train_last_block``: everything frozen but the last block (``frozen(adamw, train_mask=...)``).

Bytes are computed from shapes with ``jax.eval_shape`` (exact, nothing allocated), so the full preset
measures a GPT-2-small-shaped model (124M parameters) on any machine. The quick preset also initialises
a small model for real and checks that the allocated state's bytes equal the shape-based count.
Also reported: the host bytes of each mask (bool arrays for partly frozen leaves; whole leaves cost nothing).

Writes ``results/benchmarks/freeze.json`` (``<scenario>.bytes_without``, ``.bytes_with``, ``.bytes_saved``,
``.fraction_saved``, ``.frozen_fraction``, ``.mask_host_bytes``) and prints a table.

Usage: ``python -m benchmarks.freeze [--quick] [--out PATH]``
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

import idesign as ids
import idesign.circuits as circuits
import idesign.optim as optim
from benchmarks import _common
from idesign import masks

DEFAULT_OUT = "results/benchmarks/freeze.json"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    max_len: int = 1024
    allocate: bool = False  # also initialise for real and compare allocated bytes
    preset: str = "full"


FULL = Config()
QUICK = Config(vocab_size=1000, d_model=128, n_layers=4, n_heads=4, max_len=256, allocate=True, preset="quick")


def scenarios(params: Any, cfg: ids.TransformerConfig) -> dict[str, tuple[str, Any]]:
    """``{name: ('frozen' | 'trainable', mask)}``."""
    L, H, F = cfg.n_layers, cfg.n_heads, cfg.ff_dim
    rng = np.random.default_rng(0)
    heads = [(l, int(h)) for l in range(L) for h in rng.choice(H, max(1, H // 10), replace=False)]
    neurons = [(l, int(n)) for l in range(L) for n in rng.choice(F, max(1, F // 50), replace=False)]
    bottom = ["embed.*", "pos_embed.*"] + [f"blocks.{i}.*" for i in range(L // 2)]
    return {
        "circuit": ("frozen", circuits.circuit_mask(params, cfg, heads=heads, neurons=neurons)),
        "freeze_bottom_half": ("frozen", circuits.paths_mask(params, bottom)),
        "train_last_block": ("trainable", circuits.paths_mask(params, f"blocks.{L - 1}.*")),
    }


def mask_host_bytes(mask: Any) -> int:
    return int(sum(np.asarray(m).nbytes for m in jax.tree.leaves(mask) if not isinstance(m, bool)))


def main(config: Config = FULL, out: str | None = DEFAULT_OUT) -> dict[str, Any]:
    cfg = ids.TransformerConfig(vocab_size=config.vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                                n_heads=config.n_heads, max_len=config.max_len)
    if config.allocate:
        params = ids.init_transformer(cfg)[1]
    else:
        params = jax.eval_shape(lambda: ids.init_transformer(cfg)[1])
    adamw = optax.adamw(1e-4, weight_decay=0.1)
    result: dict[str, Any] = {"n_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
    rows = []
    for name, (kind, mask) in scenarios(params, cfg).items():
        frozen = mask if kind == "frozen" else masks.complement(mask)
        saving = optim.frozen_state_savings(adamw, params, frozen)
        entry = {**saving, "frozen_fraction": masks.size_report(frozen, params).fraction,
                 "mask_host_bytes": mask_host_bytes(frozen)}
        if config.allocate:
            real = optim.frozen(adamw, freeze_mask=frozen).init(params)
            entry["allocated_bytes_with"] = int(sum(x.nbytes for x in jax.tree.leaves(real)))
            entry["allocated_matches_shapes"] = entry["allocated_bytes_with"] == saving["bytes_with"]
        result.update({f"{name}.{k}": v for k, v in entry.items()})
        rows.append((name, entry["frozen_fraction"], saving["bytes_without"] / 2**20, saving["bytes_with"] / 2**20,
                     saving["fraction_saved"], entry["mask_host_bytes"] / 2**20))
    result.update({"config": dataclasses.asdict(config), **_common.environment()})
    if out is not None:
        _common.write_json(out, result)
    _common.print_table(rows, header=("scenario", "frozen frac", "adamw MiB", "frozen MiB", "saved frac",
                                      "mask MiB"))
    print(f"preset={config.preset}  params={result['n_params']:,}" + (f"  -> {out}" if out else ""))
    return result


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return _common.cli(__doc__, main, QUICK, FULL, DEFAULT_OUT, argv, quick_help="a small model, also allocated for real")


if __name__ == "__main__":
    cli()
