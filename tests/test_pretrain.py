"""Tests of the pretrain-once cache (``idesign.pretrain``)."""

import dataclasses
import json
import multiprocessing as mp
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import idesign as ids
from idesign import pretrain


@dataclasses.dataclass(frozen=True)
class Toy:
    width: int = 3
    lr: float = 0.1
    tasks: tuple[str, ...] = ("a", "b")


def _like(config: Toy):
    return {"blocks": {0: {"w": jnp.zeros((config.width, 2))}}, "b": np.zeros((), np.float32)}


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, config: Toy, seed: int):
        self.calls.append((config, seed))
        key = jax.random.key(seed)
        # float32 values with many significant bits, so a lossy round trip would show
        return {"blocks": {0: {"w": jax.random.normal(key, (config.width, 2)) * config.lr}},
                "b": np.float32(np.pi * seed)}


def _same_bits(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.asarray(x).dtype == np.asarray(y).dtype
               and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_hit_restores_bit_identical_without_training_again(tmp_path):
    train, config = Counter(), Toy()
    first = pretrain.cached("toy", config, 3, train, like=lambda: _like(config), directory=tmp_path)
    second = pretrain.cached("toy", config, 3, train, like=_like(config), directory=tmp_path)
    assert len(train.calls) == 1
    assert _same_bits(first, train(config, 3)) and _same_bits(first, second)
    assert list(first["blocks"]) == [0]  # int keys come back as ints


def test_changed_config_seed_or_version_is_a_new_entry(tmp_path):
    train = Counter()
    run = lambda c, s, v="1": pretrain.cached("toy", c, s, train, like=_like(c), version=v, directory=tmp_path)
    a = run(Toy(), 0)
    b = run(Toy(lr=0.2), 0)
    run(Toy(), 1)
    run(Toy(), 0, "2")
    run(Toy(), 0)
    assert len(train.calls) == 4
    np.testing.assert_allclose(np.asarray(b["blocks"][0]["w"]), 2 * np.asarray(a["blocks"][0]["w"]), rtol=1e-6)
    assert len(list((tmp_path / "pretrained").iterdir())) == 4


def test_env_var_sets_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("IDESIGN_CACHE", str(tmp_path))
    pretrain.cached("toy", Toy(), 0, Counter(), like=_like(Toy()))
    assert pretrain.cache_path("toy", Toy(), 0).parent == tmp_path / "pretrained"
    assert pretrain.cache_path("toy", Toy(), 0).is_dir()


def test_corrupt_entry_is_recomputed_not_trusted(tmp_path):
    train, config = Counter(), Toy()
    good = pretrain.cached("toy", config, 0, train, like=_like(config), directory=tmp_path)
    path = pretrain.cache_path("toy", config, 0, directory=tmp_path)
    for f in (path / "state").rglob("*"):  # truncate every array file
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name and f.suffix != ".json":
            f.write_bytes(b"")
    with pytest.warns(UserWarning, match="discarding the cache entry"):
        again = pretrain.cached("toy", config, 0, train, like=_like(config), directory=tmp_path)
    assert len(train.calls) == 2 and _same_bits(good, again)


def test_entry_with_wrong_structure_or_key_is_recomputed(tmp_path):
    train, config = Counter(), Toy()
    pretrain.cached("toy", config, 0, train, like=_like(config), directory=tmp_path)
    path = pretrain.cache_path("toy", config, 0, directory=tmp_path)
    # another key's checkpoint moved under this name (e.g. a hash collision or a hand-copied folder)
    other = pretrain.cache_path("toy", config, 1, directory=tmp_path)
    pretrain.cached("toy", config, 1, train, like=_like(config), directory=tmp_path)
    shutil.rmtree(path)
    shutil.copytree(other, path)
    with pytest.warns(UserWarning, match="differs from the requested key"):
        again = pretrain.cached("toy", config, 0, train, like=_like(config), directory=tmp_path)
    assert len(train.calls) == 3 and _same_bits(again, train(config, 0))


def test_partial_write_is_ignored(tmp_path):
    train, config = Counter(), Toy()
    path = pretrain.cache_path("toy", config, 0, directory=tmp_path)
    # what a crashed writer leaves: a staging folder, never the final name
    (path.parent / f"{path.name}.staging-1-abc").mkdir(parents=True)
    pretrain.cached("toy", config, 0, train, like=_like(config), directory=tmp_path)
    assert len(train.calls) == 1 and path.is_dir()


def test_lost_race_reads_the_winner(tmp_path):
    config = Toy()

    def train_and_sneak(c, s):
        # another process finishes the same key while this one trains
        pretrain.cached("toy", c, s, Counter(), like=_like(c), directory=tmp_path)
        return {"blocks": {0: {"w": jnp.ones((c.width, 2))}}, "b": np.float32(7)}

    out = pretrain.cached("toy", config, 0, train_and_sneak, like=_like(config), directory=tmp_path)
    assert _same_bits(out, Counter()(config, 0))  # the winner's entry, not ours
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == [pretrain.cache_key("toy", config, 0)]


def _worker(directory, queue):
    config = Toy(width=5)
    out = pretrain.cached("toy", config, 0, Counter(), like=_like(config), directory=directory)
    queue.put(np.asarray(out["blocks"][0]["w"]).tobytes())


def test_two_processes_computing_one_key(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len([p for p in (tmp_path / "pretrained").iterdir()]) == 1


def test_structure_mismatch_between_train_fn_and_like_is_a_clear_error(tmp_path):
    with pytest.raises(ids.CheckpointMismatchError, match=r"does not match `like`[\s\S]*blocks\.0\.w"):
        pretrain.cached("toy", Toy(), 0, Counter(), like=_like(Toy(width=4)), directory=tmp_path)
    assert not pretrain.cache_path("toy", Toy(), 0, directory=tmp_path).exists()


def test_unhashable_config_names_the_path():
    with pytest.raises(TypeError, match=r"config\.opt: cannot key on a function"):
        pretrain.cache_key("toy", Toy2(opt=lambda: 0), 0)
    with pytest.raises(TypeError, match=r"config\['x'\]\[1\]: cannot key on a ndarray"):
        pretrain.cache_key("toy", {"x": [1, np.zeros(2)]}, 0)
    with pytest.raises(TypeError, match="dict keys must be str"):
        pretrain.cache_key("toy", {1: 2}, 0)
    with pytest.raises(ValueError, match="name"):
        pretrain.cache_key("a/b", {}, 0)


@dataclasses.dataclass(frozen=True)
class Toy2:
    opt: object = None


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=10))
def test_key_is_deterministic_and_canonical_form_is_json(config):
    assert pretrain.cache_key("toy", config, 0) == pretrain.cache_key("toy", config, 0)
    canon = pretrain.canonical_config(config)
    assert json.loads(json.dumps(canon, allow_nan=False)) == canon  # plain JSON, no nan/inf literals


def test_key_distinguishes_types_and_values():
    keys = {pretrain.cache_key("toy", c, 0) for c in (1, 1.0, True, "1", [1], {"a": 1}, Toy(), Toy(width=4), None)}
    assert len(keys) == 9
    assert pretrain.cache_key("toy", {"a": 1, "b": 2}, 0) == pretrain.cache_key("toy", {"b": 2, "a": 1}, 0)
