"""Tests for idesign.checkpoint: round trips, exact resume, the manager, mismatch errors, atomicity."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from idesign.checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointMismatchError,
    abstract_like,
    restore_checkpoint,
    save_checkpoint,
)


# Orbax leaves the coroutines of a failed read behind; their garbage collection warns, sometimes during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array


def _params(seed: int = 0, width: int = 8) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "blocks": {
            0: {"attn": {"q_proj": {"kernel": jax.random.normal(k[0], (4, width))}}},
            1: {"attn": {"q_proj": {"kernel": jax.random.normal(k[1], (4, width))}}},
        },
        "embed": jax.random.normal(k[2], (5, 4)).astype(jnp.bfloat16),
        "count": jnp.arange(3, dtype=jnp.int32),
    }


def _train_state(seed: int = 0, width: int = 8) -> TrainState:
    params = _params(seed, width)
    opt_state = optax.adamw(1e-3, weight_decay=0.1).init(params)
    return TrainState(params, opt_state, jnp.asarray(seed + 3, jnp.int32))


def _assert_trees_identical(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if isinstance(e, jax.Array) and jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


# ---------------------------------------------------------------------------------------------
# One-off save / restore


def test_round_trip_int_keys_optax_state_step_and_metadata(tmp_path):
    state = _train_state(seed=0)
    metadata = {"config": {"lr": 1e-3, "layers": [0, 1]}, "loss": np.float32(0.5), "name": "run"}
    path = save_checkpoint(tmp_path / "ckpt", state, metadata=metadata)
    assert path == (tmp_path / "ckpt").absolute()

    fresh = _train_state(seed=1)  # same structure, different values
    for target in (fresh, abstract_like(fresh)):
        restored, restored_metadata = restore_checkpoint(path, target)
        assert isinstance(restored, TrainState)
        assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
        assert list(restored.params["blocks"]) == [0, 1]  # int keys survive
        _assert_trees_identical(restored, state)
        assert restored_metadata == {
            "config": {"lr": 1e-3, "layers": [0, 1]},
            "loss": 0.5,
            "name": "run",
        }


def test_round_trip_of_scalars_numpy_and_prng_keys(tmp_path):
    tree = {
        "py_int": 7,
        "py_float": 2.5,
        "np_scalar": np.float32(1.5),
        "np_array": np.arange(4, dtype=np.int16),
        "key": jax.random.key(3),
        "raw_key": jax.random.PRNGKey(4),
        "empty": optax.EmptyState(),
        "nothing": None,
    }
    save_checkpoint(tmp_path, tree, step=2)
    restored, metadata = restore_checkpoint(tmp_path, tree)
    assert metadata == {}
    assert restored["py_int"] == 7 and isinstance(restored["py_int"], int)
    assert restored["py_float"] == 2.5
    assert isinstance(restored["np_scalar"], np.float32) and restored["np_scalar"] == 1.5
    assert restored["empty"] == optax.EmptyState() and restored["nothing"] is None
    _assert_trees_identical(restored, tree)


def test_restore_without_target_returns_tree_as_stored(tmp_path):
    save_checkpoint(tmp_path, {"blocks": {0: {"w": jnp.ones(2)}}})
    raw, _ = restore_checkpoint(tmp_path, None)
    assert list(raw["blocks"]) == ["0"]  # orbax stores every dict key as a string


def test_steps_layout_and_latest(tmp_path):
    for step in (3, 10, 7):
        save_checkpoint(tmp_path, {"w": jnp.full((2,), step)}, step=step, metadata={"s": step})
    assert _entries(tmp_path) == ["10", "3", "7"]
    target = {"w": jnp.zeros((2,), jnp.int32)}
    assert restore_checkpoint(tmp_path, target)[1] == {"s": 10}
    restored, metadata = restore_checkpoint(tmp_path, target, step=3)
    assert metadata == {"s": 3} and restored["w"].tolist() == [3, 3]
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[3, 7, 10\]"):
        restore_checkpoint(tmp_path, target, step=4)
    with pytest.raises(FileNotFoundError):
        restore_checkpoint(tmp_path / "nowhere", target)


def test_overwrite_rules(tmp_path):
    path = save_checkpoint(tmp_path, {"w": jnp.zeros(2)})  # an empty directory may be used
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, {"w": jnp.ones(2)})
    save_checkpoint(path, {"w": jnp.ones(2)}, metadata={"v": 2}, overwrite=True)
    restored, metadata = restore_checkpoint(path, {"w": jnp.zeros(2)})
    assert restored["w"].tolist() == [1.0, 1.0] and metadata == {"v": 2}
    assert (path / "state").is_dir() and (path / "metadata").is_dir()
    assert not list(tmp_path.parent.glob(tmp_path.name + ".*"))  # no staging or old copy left

    not_a_checkpoint = tmp_path.parent / (tmp_path.name + "_other")
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_checkpoint(not_a_checkpoint, {"w": jnp.zeros(2)}, overwrite=True)
    assert (not_a_checkpoint / "notes.txt").read_text() == "keep me"


def test_unsavable_values_name_their_path(tmp_path):
    with pytest.raises(TypeError, match=r"blocks\.0\.name: .*str"):
        save_checkpoint(tmp_path / "a", {"blocks": {0: {"name": "x", "w": jnp.ones(1)}}})
    with pytest.raises(TypeError, match=r"metadata\.cfg\.fn"):
        save_checkpoint(tmp_path / "b", {"w": jnp.ones(1)}, metadata={"cfg": {"fn": print}})
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Sharding


def test_restore_uses_target_sharding(tmp_path):
    devices = jax.devices()
    rows = 2 * len(devices)
    tree = {"w": jnp.arange(rows * 3, dtype=jnp.float32).reshape(rows, 3), "b": jnp.ones(3)}
    save_checkpoint(tmp_path, tree)

    single = jax.sharding.SingleDeviceSharding(devices[0])
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    concrete = {"w": jax.device_put(jnp.zeros((rows, 3)), single), "b": jnp.zeros(3)}
    restored, _ = restore_checkpoint(tmp_path, concrete)
    assert restored["w"].sharding == single

    abstract = abstract_like(
        {
            "w": jax.device_put(jnp.zeros((rows, 3)), row_sharded),
            "b": jax.device_put(jnp.zeros(3), replicated),
        }
    )
    assert abstract["w"].sharding == row_sharded
    restored, _ = restore_checkpoint(tmp_path, abstract)
    assert restored["w"].sharding == row_sharded and restored["b"].sharding == replicated
    _assert_trees_identical(restored, tree)


# ---------------------------------------------------------------------------------------------
# Mismatch errors


def test_mismatch_wrong_shape_names_dotted_path_and_both_shapes(tmp_path):
    save_checkpoint(tmp_path, _train_state(width=8))
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, _train_state(width=16))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "params.blocks.0.attn.q_proj.kernel: shape mismatch" in message
    assert "expected (4, 16), checkpoint has (4, 8)" in message
    # NamedTuple fields render by name, sequence entries by index.
    assert "opt_state.0.mu.blocks.1.attn.q_proj.kernel" in message
    assert len(info.value.problems) == 6  # params, mu and nu of both blocks


def test_mismatch_missing_and_unexpected_leaves(tmp_path):
    state = _train_state()
    save_checkpoint(tmp_path, state)

    params = dict(state.params, extra={"bias": jnp.zeros((4,))})
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, state._replace(params=params))
    message = str(info.value)
    assert "params.extra.bias: missing from checkpoint" in message
    assert "(4,)" in message

    params = {k: v for k, v in state.params.items() if k != "embed"}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, state._replace(params=params))
    message = str(info.value)
    assert "params.embed: unexpected in checkpoint" in message
    assert "bfloat16 array of shape (5, 4)" in message


def test_mismatch_dtype(tmp_path):
    save_checkpoint(tmp_path, {"w": jnp.zeros((2,), jnp.float32)})
    with pytest.raises(CheckpointMismatchError, match="w: dtype mismatch: expected bfloat16"):
        restore_checkpoint(tmp_path, {"w": jnp.zeros((2,), jnp.bfloat16)})


def test_manager_restore_reports_mismatch(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, _train_state(width=8))
        with pytest.raises(CheckpointMismatchError, match=r"params\.blocks\.1\.attn\.q_proj"):
            manager.restore(_train_state(width=4))


# ---------------------------------------------------------------------------------------------
# Manager


def test_manager_keep_save_every_latest_and_specific_step(tmp_path):
    state = {"w": jnp.zeros(3), "step": 0}
    with CheckpointManager(tmp_path, keep=2, save_every=3) as manager:
        assert manager.latest_step() is None
        saved = []
        for step in range(1, 11):
            state = {"w": jnp.full((3,), float(step)), "step": step}
            saved.append(manager.save(step, state, metadata={"loss": 1.0 / step}))
        assert [s for s, did in zip(range(1, 11), saved) if did] == [3, 6, 9]
        assert manager.all_steps() == [6, 9]
        assert manager.latest_step() == 9
        assert manager.save(10, state, metadata={"loss": 0.1}, force=True)
        assert manager.all_steps() == [9, 10]

        restored, metadata = manager.restore(state)
        assert restored["step"] == 10 and metadata == {"loss": 0.1}
        restored, metadata = manager.restore(state, step=9)
        assert restored["w"].tolist() == [9.0] * 3 and metadata == {"loss": 1.0 / 9}
        with pytest.raises(FileNotFoundError, match="available steps: \\[9, 10\\]"):
            manager.restore(state, step=3)
    assert _entries(tmp_path) == ["10", "9"]

    # A new manager (a restarted job) sees the same checkpoints; the one-off reader too.
    with CheckpointManager(tmp_path, keep=2, save_every=3) as manager:
        assert manager.latest_step() == 10
        assert manager.restore(state)[0]["step"] == 10
    assert restore_checkpoint(tmp_path, state)[0]["step"] == 10


def test_manager_restore_on_empty_directory(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            manager.restore({"w": jnp.zeros(1)})


def test_manager_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(tmp_path, save_every=0)


def _mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["layers"][0]["w"] + params["layers"][0]["b"])
    out = h @ params["layers"][1]["w"] + params["layers"][1]["b"]
    return jnp.mean((out - y) ** 2)


_optimizer = optax.adamw(1e-2, weight_decay=0.1)


@jax.jit
def _train_step(state: TrainState) -> TrainState:
    # The batch is a function of the step, so a resumed run sees the same data.
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(42), state.step))
    x = jax.random.normal(kx, (16, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True)) + 0.1 * jax.random.normal(ky, (16, 1))
    grads = jax.grad(_mlp_loss)(state.params, x, y)
    updates, opt_state = _optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


def _init_mlp_state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {
        "layers": {
            0: {"w": rng.normal(size=(3, 8)).astype(np.float32), "b": np.zeros(8, np.float32)},
            1: {"w": rng.normal(size=(8, 1)).astype(np.float32), "b": np.zeros(1, np.float32)},
        }
    }
    state = TrainState(params, _optimizer.init(params), np.int32(0))
    # Committed, like restored arrays, so both runs share one compiled step.
    return jax.device_put(state, jax.devices()[0])


def test_exact_resume_is_bit_identical(tmp_path):
    n = 6
    uninterrupted = _init_mlp_state(seed=0)
    for _ in range(2 * n):
        uninterrupted = _train_step(uninterrupted)

    state = _init_mlp_state(seed=0)
    with CheckpointManager(tmp_path, keep=1, save_every=n) as manager:
        for _ in range(n):
            state = _train_step(state)
            manager.save(int(state.step), state)
    del state

    with CheckpointManager(tmp_path, keep=1, save_every=n) as manager:
        # A fresh state with other values: everything must come from the checkpoint.
        resumed, _ = manager.restore(_init_mlp_state(seed=1))
    assert int(resumed.step) == n
    for _ in range(n):
        resumed = _train_step(resumed)

    _assert_trees_identical(resumed, uninterrupted)
    assert not np.array_equal(
        resumed.params["layers"][0]["w"], _init_mlp_state(seed=0).params["layers"][0]["w"]
    )


# ---------------------------------------------------------------------------------------------
# No half-written checkpoints


def _fail_finalize(self, directory):
    raise RuntimeError("simulated crash before commit")


def test_failed_save_leaves_no_final_directory(tmp_path, monkeypatch):
    # All data is written to orbax's temporary directory, then the commit fails.
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", _fail_finalize)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, {"w": jnp.ones(2)}, step=5)
    assert _entries(tmp_path) == []  # neither `5` nor `5.orbax-checkpoint-tmp`


def test_failed_overwrite_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, {"w": jnp.zeros(2)}, step=1, metadata={"v": 1})
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", _fail_finalize)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, {"w": jnp.ones(2)}, step=1, overwrite=True)
    monkeypatch.undo()
    assert _entries(tmp_path) == ["1"]
    restored, metadata = restore_checkpoint(path, {"w": jnp.ones(2)})
    assert restored["w"].tolist() == [0.0, 0.0] and metadata == {"v": 1}


def test_failed_async_save_in_manager_is_not_listed(tmp_path, monkeypatch):
    state = {"w": jnp.ones(2)}
    with CheckpointManager(tmp_path, keep=3) as manager:
        manager.save(1, state)
        manager.wait()
        monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", _fail_finalize)
        manager.save(2, state)  # returns at once; the failure happens in the background
        with pytest.raises(RuntimeError, match="simulated crash"):
            manager.wait()
        monkeypatch.undo()
        assert manager.all_steps() == [1]
        assert manager.latest_step() == 1
        assert _entries(tmp_path) == ["1"]
        assert manager.save(3, state)
        assert manager.all_steps() == [1, 3]


def test_unsupported_leaf_fails_before_writing(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match=r"params\.0\.f: .*object"):
            manager.save(1, {"params": {0: {"f": object()}}})
        assert manager.all_steps() == []
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Corruption: every damaged checkpoint raises CheckpointCorruptError or restores bit-identical


def _corrupt(path: Path, mode: str) -> None:
    data = bytearray(path.read_bytes())
    if mode == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif mode == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


def _corruptible_state() -> dict:
    # Random float32 values do not compress, so w's bytes sit in the largest data file as they are; mu is small
    # enough to be stored inline in orbax's index (so the largest file holds w alone).
    k = jax.random.split(jax.random.key(0), 2)
    return {"params": {"w": jax.random.normal(k[0], (128, 64))}, "opt": {"mu": jax.random.normal(k[1], (4, 4))},
            "step": jnp.int32(7), "lr": 0.5}


@pytest.mark.parametrize("mode", ["flip", "truncate", "delete"])
def test_any_damaged_file_is_detected_or_harmless(tmp_path, mode):
    state = _corruptible_state()
    source = save_checkpoint(tmp_path / "src", state, step=4, metadata={"note": "x"})
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    detected = set()
    for i, rel in enumerate(files):
        copy = tmp_path / f"c{i}"
        shutil.copytree(source.parent, copy)
        _corrupt(copy / "4" / rel, mode)
        try:
            restored, metadata = restore_checkpoint(copy, state)
        except CheckpointCorruptError as e:
            assert e.step == 4 and "step 4" in str(e) and e.where and e.reason, str(e)
            detected.add(str(rel))
            continue
        _assert_trees_identical(restored, state)  # not detected: then nothing read back changed
        assert metadata == {"note": "x"}
    # The array data, the tree metadata and both JSON items are always checked.
    assert {"metadata/metadata", "checksums/metadata", "state/_METADATA"} <= detected
    assert any(r.startswith("state/ocdbt.process_0/d/") for r in detected)


def test_flipped_byte_names_the_leaf_and_the_checksum(tmp_path):
    state = _corruptible_state()
    path = save_checkpoint(tmp_path, state, step=2)
    biggest = max(path.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)  # params.w's bytes
    _corrupt(biggest, "flip")
    with pytest.raises(CheckpointCorruptError, match=r"step 2 .*params\.w: xxh3_64 differs") as info:
        restore_checkpoint(tmp_path, state)
    assert info.value.where == "params.w"
    # Without verification the damage goes through silently: what the checksum is for.
    restored, _ = restore_checkpoint(tmp_path, state, verify=False)
    assert not np.array_equal(restored["params"]["w"], state["params"]["w"])


def test_truncated_array_file_names_the_leaf(tmp_path):
    state = _corruptible_state()
    path = save_checkpoint(tmp_path, state, step=2)
    _corrupt(max(path.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size), "truncate")
    with pytest.raises(CheckpointCorruptError, match="reading failed") as info:
        restore_checkpoint(tmp_path, state)
    assert info.value.where == "params.w"


def test_corrupt_metadata_names_the_item(tmp_path):
    path = save_checkpoint(tmp_path, {"w": jnp.ones(3)}, step=1, metadata={"a": 1})
    (path / "metadata" / "metadata").write_text('{"a": ')
    with pytest.raises(CheckpointCorruptError, match=r"step 1 .*metadata: unreadable \(JSONDecodeError") as info:
        restore_checkpoint(tmp_path, {"w": jnp.ones(3)})
    assert isinstance(info.value.__cause__, ValueError)


def test_renamed_leaf_in_tree_metadata_is_corruption_not_a_mismatch(tmp_path):
    path = save_checkpoint(tmp_path, {"kernel": jnp.ones(3)}, step=1)
    meta = path / "state" / "_METADATA"
    meta.write_text(meta.read_text().replace("kernel", "kernfl"))
    with pytest.raises(CheckpointCorruptError, match=r"state/ tree metadata: (disagrees|unreadable)"):
        restore_checkpoint(tmp_path, {"kernel": jnp.ones(3)})


def test_checkpoint_without_checksums_restores_unchecked(tmp_path):
    path = save_checkpoint(tmp_path, {"w": jnp.arange(3.0)})
    shutil.rmtree(path / "checksums")  # as written before checksums existed
    assert restore_checkpoint(tmp_path, {"w": jnp.zeros(3)})[0]["w"].tolist() == [0.0, 1.0, 2.0]


def test_manager_fallback_restores_newest_intact_step_and_warns(tmp_path):
    target = {"w": jnp.zeros((64, 64))}
    with CheckpointManager(tmp_path, keep=3) as manager:
        for step in (1, 2, 3):
            manager.save(step, {"w": jax.random.normal(jax.random.key(step), (64, 64))}, metadata={"s": step})
        manager.wait()
        _corrupt(max((tmp_path / "3").glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size), "flip")
        (tmp_path / "2" / "checksums" / "metadata").write_text("garbage")
        with pytest.raises(CheckpointCorruptError, match="step 3"):
            manager.restore(target)
        with pytest.warns(UserWarning) as record:
            restored, metadata = manager.restore(target, fallback=True)
        assert metadata == {"s": 1}
        np.testing.assert_array_equal(restored["w"], jax.random.normal(jax.random.key(1), (64, 64)))
        messages = [str(w.message) for w in record]
        assert any("step 3" in m and "restored step 1" in m for m in messages)
        assert any("step 2" in m and "checksums" in m for m in messages)
        # Mismatches are not corruption: no fallback past them.
        with pytest.raises(CheckpointMismatchError):
            manager.restore({"w": jnp.zeros((2, 2))}, fallback=True)
    _corrupt(tmp_path / "1" / "metadata" / "metadata", "delete")
    shutil.rmtree(tmp_path / "1" / "metadata")
    (tmp_path / "1" / "state" / "_METADATA").write_text("{")
    with pytest.raises(CheckpointCorruptError, match="step 3"):  # none intact: the newest's error
        restore_checkpoint(tmp_path, target, fallback=True)


def test_mismatch_lists_parameters_before_optimizer_state(tmp_path):
    save_checkpoint(tmp_path, _train_state(width=8))
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, _train_state(width=16))
    paths = [p.split(":")[0] for p in info.value.problems]
    assert paths[0].startswith("params.") and paths[-1].startswith("opt_state.")
    assert max(i for i, p in enumerate(paths) if p.startswith("params.")) < min(
        i for i, p in enumerate(paths) if p.startswith("opt_state."))


def test_mismatch_lists_parameter_paths_before_optimizer_state_paths(tmp_path):
    # a dict state flattens in sorted key order ('opt_state' < 'params'); the message still leads with params
    state = _train_state(width=8)
    save_checkpoint(tmp_path, {"opt_state": state.opt_state, "params": state.params})
    wider = _train_state(width=16)
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, {"opt_state": wider.opt_state, "params": wider.params})
    paths = [line.split(":")[0] for line in info.value.problems]
    in_state = [p.startswith("opt_state") for p in paths]
    assert in_state == sorted(in_state) and not in_state[0] and in_state[-1], paths
