"""Two processes x 4 CPU devices (jax.distributed, gloo) compute what one process x 8 devices computes.

Both runs build the same global ('data', 'model') = (4, 2) mesh and run tests/_multihost_checks.py: data
loading where each process reads only its rows, a sharded forward with captures, train steps with projected
and frozen optimizers, K-FAC factors, a probe fit, collect_activations, and an orbax checkpoint restored onto
the same and onto another mesh shape.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import idesign as ids
from tests.conftest import run_with_8_devices

ROOT = Path(__file__).resolve().parents[1]
ok, why = ids.distributed.has_cpu_collectives()
pytestmark = pytest.mark.skipif(not ok, reason=f"no CPU multi-process collectives: {why}")


def _last_json(text: str) -> dict:
    # raw_decode: Gloo's C++ logging can land on the same stdout line right after the JSON (seen in CI).
    return json.JSONDecoder().raw_decode([line for line in text.splitlines() if line.startswith("{")][-1])[0]


def _run_processes(args, timeout_s=240, **env):
    results = ids.distributed.run_local_processes(args, timeout_s=timeout_s, cwd=ROOT,
                                                  env={"PYTHONPATH": str(ROOT), **env})
    for r in results:
        assert r.returncode == 0, f"process {r.process_index} failed:\n{r.stderr[-4000:]}"
    return [_last_json(r.stdout) for r in results]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    reports = _run_processes(["-m", "tests._multihost_checks"], IDESIGN_MH_OUT=str(out))
    os.environ["IDESIGN_MH_OUT"] = str(out)
    try:
        single_report = run_with_8_devices("tests._multihost_checks")
    finally:
        del os.environ["IDESIGN_MH_OUT"]
    return reports, single_report, dict(np.load(out / "multi.npz")), dict(np.load(out / "single.npz"))


def _keys(arrays, prefix):
    keys = sorted(k for k in arrays if k.startswith(prefix))
    assert keys, f"no results under {prefix}"
    return keys


def _max_rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_every_process_joined_with_its_own_devices(runs):
    reports, single, _, _ = runs
    assert [r["process_index"] for r in reports] == [0, 1]
    assert all(r["process_count"] == 2 and r["local_device_count"] == 4 for r in reports)
    assert single["process_count"] == 1


def test_each_process_reads_only_its_rows_and_the_global_batches_match(runs):
    reports, _, multi, single = runs
    assert [r["local_rows"] for r in reports] == [4, 4]        # half of the global batch of 8
    for k in _keys(single, "data."):
        np.testing.assert_array_equal(multi[k], single[k])


def test_sharded_forward_and_captures_match_one_process(runs):
    _, _, multi, single = runs
    for k in _keys(single, "forward."):
        assert _max_rel_diff(multi[k], single[k]) < 1e-5, k


def test_projected_and_frozen_train_steps_match_one_process(runs):
    reports, _, multi, single = runs
    for k in _keys(single, "train."):
        assert _max_rel_diff(multi[k], single[k]) < 1e-4, k
    for r in reports:
        assert r["frozen_mask_nonempty"] and r["frozen_bit_identical"]
        assert r["projected_leak"] < 1e-5


def test_kfac_factors_are_reduced_across_processes(runs):
    _, _, multi, single = runs
    for k in _keys(single, "kfac."):
        assert _max_rel_diff(multi[k], single[k]) < 1e-5, k
    counts = [multi[k] for k in _keys(multi, "kfac.") if k.endswith(".count")]
    assert all(c == 4 * 8 * 11 for c in counts)                  # 4 batches x 8 rows x 11 predicted positions


def test_probe_on_activations_sharded_over_processes_matches(runs):
    _, _, multi, single = runs
    for k in _keys(single, "probe."):
        assert _max_rel_diff(multi[k], single[k]) < 1e-3, k


def test_collect_activations_gathers_every_row(runs):
    _, _, multi, single = runs
    k = "activations.blocks.1.resid_post"
    assert multi[k].shape == (40, 32)
    assert _max_rel_diff(multi[k], single[k]) < 1e-5


def test_checkpoint_restores_on_the_same_and_on_another_mesh(runs):
    reports, single, _, _ = runs
    for r in [*reports, single]:
        assert r["restore_same_mesh_equal"] and r["restore_same_mesh_spec"] == "P(None, 'model')"
        assert r["restore_other_mesh_equal"] and r["restore_other_mesh_shape"] == {"data": 2, "model": 4}


def test_a_mesh_that_leaves_devices_out_is_refused():
    reports = _run_processes(["-m", "tests._multihost_bad_input", "mesh"], timeout_s=120)
    for r in reports:
        assert r["error"]["type"] == "ValueError"
        assert "must use every device" in r["error"]["message"] and "8 devices in all" in r["error"]["message"]


def test_processes_with_different_configs_are_refused():
    reports = _run_processes(["-m", "tests._multihost_bad_input", "config"], timeout_s=120)
    for r in reports:
        assert r["error"]["type"] == "RuntimeError"
        assert "different configs" in r["error"]["message"]


def test_a_coordinator_that_never_comes_up_times_out_with_a_clear_message():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tests._multihost_bad_input", "coordinator"], cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True)
    error = _last_json(proc.stdout)["error"]
    assert error["type"] == "TimeoutError"
    assert "did not answer within 3 s" in error["message"] and "Start process 0" in error["message"]
