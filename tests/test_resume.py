"""Resuming is exact: a training process killed (SIGKILL) at several moments and restarted ends
bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import idesign as ids

from idesign.checkpoint import CheckpointManager, restore_checkpoint
from tests._resume_run import main

ROOT = Path(__file__).resolve().parents[1]
UNTIL = 14


def test_batch_iterator_resumes_at_any_batch():
    data = {"x": np.arange(10), "y": -np.arange(10)}
    for drop_remainder in (True, False):
        full = [b["x"].tolist() for b in ids.train.iterate_batches(data, 4, seed=5, epochs=3,
                                                                   drop_remainder=drop_remainder)]
        assert len(full) == (6 if drop_remainder else 9)
        for start in range(len(full) + 1):
            it = ids.train.iterate_batches(data, 4, seed=5, epochs=3, drop_remainder=drop_remainder, start=start)
            assert [b["x"].tolist() for b in it] == full[start:] and it.position == len(full)
    it = ids.train.iterate_batches(data, 4, seed=5)
    first = [next(it)["x"].tolist() for _ in range(7)]
    it.position = 2  # moved back: the same batches again
    assert [next(it)["x"].tolist() for _ in range(5)] == first[2:]
    with pytest.raises(ValueError, match="start"):
        ids.train.iterate_batches(data, 4, start=-1)
    with pytest.raises(ValueError, match="no rows"):
        ids.train.iterate_batches({"x": np.zeros(0)}, 4, drop_remainder=False)


@pytest.fixture(scope="module")
def tiny_run():
    config = ids.TransformerConfig(vocab_size=13, d_model=8, n_heads=2, n_layers=1, max_len=16)
    apply, params = ids.init_transformer(config, seed=0)
    optimizer = optax.adam(1e-2)
    step_fn = ids.make_train_step(ids.lm_loss(apply), optimizer)
    data = {"tokens": np.random.default_rng(0).integers(0, 13, (12, 7)).astype(np.int32)}
    fresh = lambda: ids.init_train_state(params, optimizer)
    return step_fn, data, fresh


def test_train_counts_num_steps_from_the_state_and_until_step_absolutely(tiny_run, tmp_path):
    step_fn, data, fresh = tiny_run
    batches = lambda: ids.train.iterate_batches(data, 4, seed=1)
    uninterrupted, log = ids.train.train(fresh(), step_fn, batches(), until_step=9, log_every=3, progress=False)
    assert [row["step"] for row in log.history] == [3, 6, 9]

    with CheckpointManager(tmp_path, save_every=3, async_save=False) as checkpoints:
        first, _ = ids.train.train(fresh(), step_fn, batches(), num_steps=5, checkpoints=checkpoints,
                                   progress=False)
        assert int(first.step) == 5 and checkpoints.all_steps() == [3, 5]  # the end is always saved
        # num_steps counts from the restored step (5): 2 more steps; until_step=9 from there too.
        resumed, _ = ids.train.train(fresh(), step_fn, batches(), num_steps=2, checkpoints=checkpoints,
                                     resume=True, progress=False)
        assert int(resumed.step) == 7
        resumed, log = ids.train.train(fresh(), step_fn, batches(), until_step=9, checkpoints=checkpoints,
                                       resume=True, log_every=3, progress=False)
        assert [row["step"] for row in log.history] == [9]  # logged at absolute steps
        assert checkpoints.restore(fresh())[1] == {"step": 9, "data_position": 9}
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_rejects_ambiguous_lengths_and_unpositionable_resume(tiny_run, tmp_path):
    step_fn, data, fresh = tiny_run
    batches = ids.train.iterate_batches(data, 4)
    for kwargs in ({}, {"num_steps": 2, "until_step": 2}):
        with pytest.raises(ValueError, match="exactly one of num_steps"):
            ids.train.train(fresh(), step_fn, batches, progress=False, **kwargs)
    with pytest.raises(ValueError, match="needs `checkpoints`"):
        ids.train.train(fresh(), step_fn, batches, num_steps=1, resume=True, progress=False)
    with CheckpointManager(tmp_path, async_save=False) as checkpoints:
        ids.train.train(fresh(), step_fn, batches, num_steps=1, checkpoints=checkpoints, progress=False)
        with pytest.raises(ValueError, match="cannot be moved to the data position saved with it"):
            ids.train.train(fresh(), step_fn, [next(batches)] * 3, num_steps=1, checkpoints=checkpoints,
                            resume=True, progress=False)
        with pytest.raises(ValueError, match="until_step=0 is before"):
            ids.train.train(fresh(), step_fn, batches, until_step=0, checkpoints=checkpoints, resume=True,
                            progress=False)


def _run(directory: Path, kill_after: int | None = None) -> list[int]:
    """Runs tests._resume_run; kills it with SIGKILL once it reports step ``kill_after``. Returns the steps it ran."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests._resume_run", str(directory), str(UNTIL)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    steps, deadline = [], time.monotonic() + 300
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                steps.append(int(line.split()[1]))
                if steps[-1] == kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            assert time.monotonic() < deadline, "the training subprocess took too long"
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if kill_after is None:
        assert proc.returncode == 0, f"exit code {proc.returncode}"
    else:
        assert proc.returncode == -signal.SIGKILL
    return steps


@pytest.mark.slow
def test_killed_and_restarted_training_is_bit_identical(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    main(str(reference), UNTIL)  # uninterrupted, in this process

    # Killed before the first checkpoint, then just after the save of step 6 started (async: likely mid-write).
    runs = [_run(interrupted, kill_after=2), _run(interrupted, kill_after=7), _run(interrupted)]
    assert runs[0] == [1, 2] and runs[1] == list(range(1, 8))  # nothing was saved before step 3
    assert runs[2][0] in (4, 7) and runs[2][-1] == UNTIL  # resumed after step 3, or 6 if its save finished

    for step in (12, UNTIL):  # the last periodic save and the final (forced) one
        expected, meta_expected = restore_checkpoint(reference, None, step=step)
        got, meta = restore_checkpoint(interrupted, None, step=step)
        assert meta == meta_expected == {"config": {"d_model": 16}, "step": step, "data_position": step}
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(int(p.name) for p in interrupted.iterdir()) == [12, UNTIL]  # keep=2, no temporaries left
