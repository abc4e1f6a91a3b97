"""Forward, capture, a train step and generation on 8 simulated CPU devices equal the 1-device results."""

from pathlib import Path

import pytest

import idesign as ids
from tests.conftest import run_with_8_devices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    return run_with_8_devices("tests._sharded_checks")


def test_forward_and_capture_match_one_device(report):
    assert report["kernel_spec"] == "P(None, 'model')"
    assert report["logits_sharded_over"] > 1
    assert report["forward_max_diff"] < 1e-5
    assert report["capture_max_diff"] < 1e-5


def test_train_step_matches_one_device_and_keeps_the_layout(report):
    assert report["train_loss_diff"] < 1e-5
    assert report["train_step_param_max_diff"] < 1e-5
    assert report["grad_norm_rel_diff"] < 1e-5
    assert report["updated_kernel_still_sharded"] == "P(None, 'model')"


def test_generation_matches_one_device(report):
    if "generate_tokens_equal" not in report:
        pytest.skip("idesign.generate not available")
    assert report["generate_tokens_equal"]


def test_indivisible_shapes_are_refused_with_the_path():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    fake = type("M", (), {"shape": {"data": 1, "model": 3}})()
    with pytest.raises(ValueError, match=r"cannot shard blocks.0.mlp.up.kernel of shape \(4, 8\).*not divisible by the mesh axis size 3"):
        ids.sharding._check_divisible("blocks.0.mlp.up.kernel", (4, 8), P(None, "model"), fake)
    with pytest.raises(ValueError, match="leading dimension 3, not divisible"):
        ids.sharding.shard_batch({"tokens": jnp.zeros((3, 2))}, type("M", (), {"shape": {"data": 2}})())
