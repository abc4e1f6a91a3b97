"""Per-process data, config hashes and start-up checks, in one process (test_multihost.py runs several)."""

import dataclasses

import datasets
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import idesign as ids

dist = ids.distributed


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 60), per=st.integers(1, 4), processes=st.sampled_from([1, 2, 4]), step=st.integers(0, 40),
       seed=st.one_of(st.none(), st.integers(0, 5)))
def test_process_slices_concatenate_to_the_one_process_batch(n, per, processes, step, seed):
    batch = per * processes
    if batch > n:
        return
    data = {"x": np.arange(n) * 10}
    whole = dist.process_batch(data, step, batch, seed=seed, process_index=0, process_count=1)["x"]
    parts = [dist.process_batch(data, step, batch, seed=seed, process_index=i, process_count=processes)["x"]
             for i in range(processes)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_batches_depend_only_on_seed_and_step_and_cover_each_epoch_once():
    data = datasets.Dataset.from_dict({"x": np.arange(12), "y": np.arange(12) % 3})
    epoch0 = np.concatenate([dist.process_batch(data, s, 4, seed=3)["x"] for s in range(3)])
    assert sorted(epoch0.tolist()) == list(range(12)) and epoch0.tolist() != list(range(12))
    resumed = dist.process_batch(data, 2, 4, seed=3)["x"]            # a run resumed at step 2 sees the same rows
    np.testing.assert_array_equal(resumed, epoch0[8:])
    assert dist.process_batch(data, 3, 4, seed=3)["x"].tolist() != epoch0[:4].tolist()   # a new epoch reshuffles
    assert set(dist.process_batch(data, 0, 4, seed=3, columns=["y"])) == {"y"}


def test_global_batches_on_one_process_equal_the_sharded_batch():
    mesh = ids.sharding.make_mesh()
    got = list(dist.process_batches({"x": np.arange(10)}, 4, mesh, seed=None, start_step=1, num_steps=2))
    assert [b["x"].tolist() for b in got] == [[4, 5, 6, 7], [0, 1, 2, 3]]   # 2 batches per epoch: step 2 wraps
    assert dist.to_host(got[0])["x"].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("call, match", [
    (lambda: dist.process_batch({"x": np.arange(4)}, 0, 8), "larger than the dataset"),
    (lambda: dist.process_batch({"x": np.arange(8)}, -1, 4), r"step = -1"),
    (lambda: dist.process_rows(6, process_index=0, process_count=4), "not divisible by the 4 processes"),
    (lambda: dist.global_batch({"x": np.float32(1)}, ids.sharding.make_mesh()), "'x' is a scalar"),
    (lambda: dist.initialize("localhost", 2, 0), "expected 'host:port'"),
    (lambda: dist.initialize("127.0.0.1:1", 0, 0), "num_processes = 0"),
    (lambda: dist.initialize("127.0.0.1:1", 2, 2), r"process_id = 2: expected an integer in \[0, 2\)"),
    (lambda: dist.config_hash({"f": object()}), r"config\['f'\]: cannot key on a object"),
])
def test_bad_input_is_refused_with_the_value(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_config_hash_sees_dataclasses_and_nothing_of_key_order():
    @dataclasses.dataclass
    class Config:
        lr: float
        sizes: tuple

    a = dist.config_hash({"model": Config(1e-3, (2, 3)), "w": 1.0})
    assert a == dist.config_hash({"w": 1.0, "model": Config(1e-3, (2, 3))})
    assert a != dist.config_hash({"model": Config(1e-3, (2, 4)), "w": 1.0})
    assert a != dist.config_hash({"model": Config(2e-3, (2, 3)), "w": 1.0})
    assert dist.check_same_config({"x": 1}) == dist.config_hash({"x": 1})


def test_initialize_from_env_without_a_coordinator_is_one_process(monkeypatch):
    monkeypatch.delenv("IDESIGN_COORDINATOR", raising=False)
    info = dist.initialize_from_env(config={"x": 1})
    assert (info.process_index, info.process_count) == (0, 1) and info.config_hash == dist.config_hash({"x": 1})


def test_a_hung_process_is_stopped_at_the_deadline_and_its_stack_is_in_the_error():
    # A stand-in for a process stuck in a collective: the error must say where each one was, not only that it hung.
    code = "import time; print('started', flush=True); time.sleep(600)"
    with pytest.raises(TimeoutError) as caught:
        ids.distributed.run_local_processes(["-c", code], num_processes=2, timeout_s=3)
    message = str(caught.value)
    assert "within 3 s" in message and message.count("started") == 2
    assert "time.sleep" in message or "<string>" in message      # faulthandler's stack of the sleeping line
    assert "process 1 stderr" in message
