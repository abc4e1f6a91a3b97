"""A tiny resumable training run for tests/test_resume.py: ``python -m tests._resume_run DIR UNTIL_STEP``.

Prints ``step N`` after every step, so the test can kill it (SIGKILL) at chosen moments and start it again.
"""

from __future__ import annotations

import sys

import numpy as np
import optax

import idesign as ids
from idesign.checkpoint import CheckpointManager


def main(directory: str, until_step: int) -> None:
    config = ids.TransformerConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=16)
    apply, params = ids.init_transformer(config, seed=0)
    optimizer = optax.adamw(3e-3, weight_decay=0.1)
    step_fn = ids.make_train_step(ids.lm_loss(apply), optimizer)
    data = {"tokens": np.random.default_rng(0).integers(0, 13, (20, 9)).astype(np.int32)}
    batches = ids.train.iterate_batches(data, 4, seed=1)  # 5 batches per epoch: the run crosses epochs
    report = lambda step, state, metrics: print(f"step {step}", flush=True)
    with CheckpointManager(directory, keep=2, save_every=3) as checkpoints:
        ids.train.train(ids.init_train_state(params, optimizer), step_fn, batches, until_step=until_step,
                        checkpoints=checkpoints, resume=True, metadata={"config": {"d_model": 16}},
                        progress=False, log_every=4, callbacks=[report])
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
