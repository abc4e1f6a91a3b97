"""Streaming activations equals one full forward; position selection, pooling, padding, sharding, errors."""

from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import activations
from tests.conftest import run_with_8_devices, build, random_tokens

ROOT = Path(__file__).resolve().parents[1]
N, T = 10, 12
SITES = ("blocks.*.resid_post", "blocks.0.attn.pattern")


class CountingApply:
    """A functional model that counts how often it is traced."""

    def __init__(self, apply):
        self.apply, self.traces = apply, 0

    @property
    def site_names(self):
        return self.apply.site_names

    def __call__(self, params, tokens, *, hooks=None, valid=None):
        self.traces += 1
        return self.apply(params, tokens, hooks=hooks, valid=valid)


@pytest.fixture(scope="module")
def model(tiny_config):
    return build(tiny_config)


@pytest.fixture(scope="module")
def data():
    tokens = np.asarray(random_tokens(0, (N, T)))
    lengths = np.array([12, 5, 9, 12, 3, 7, 12, 1, 8, 10])
    valid = np.arange(T)[None] < lengths[:, None]  # right padding
    rng = np.random.default_rng(0)
    return {"tokens": tokens, "valid": valid, "length": lengths, "label": rng.integers(0, 2, N),
            "answer_pos": (lengths - 1).astype(np.int64), "pair": np.stack([np.zeros(N, int), lengths - 1], 1),
            "span": valid & (np.arange(T)[None] < 3),
            "token_label": rng.integers(0, 3, (N, T))}


@pytest.fixture(scope="module")
def full(model, data):
    """Every site's activations from one forward over all rows (the reference)."""
    apply, params = model
    _, captured = apply(params, jnp.asarray(data["tokens"]), hooks=ids.capture(*SITES), valid=jnp.asarray(data["valid"]))
    return jax.device_get(captured)


def collect(model, data, **kwargs):
    apply, params = model
    kwargs.setdefault("valid_column", "valid")
    return activations.collect_activations(apply, params, data, kwargs.pop("sites", SITES),
                                           batch_size=kwargs.pop("batch_size", 4), progress=False, **kwargs)


def test_stream_equals_one_full_forward_on_a_dataset(model, data, full):
    dataset = datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()})
    apply, params = model
    batches = list(activations.stream_activations(apply, params, dataset, SITES, batch_size=4,
                                                  valid_column="valid", columns=["label"], progress=True))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"blocks.0.resid_post", "blocks.1.resid_post", "blocks.0.attn.pattern", "label"}
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for site, x in full.items():
        np.testing.assert_allclose(got[site], x, atol=1e-5, err_msg=site)
    np.testing.assert_array_equal(got["label"], data["label"])


def test_last_batch_padding_compiles_once_and_changes_nothing(model, data, full):
    jitted, params = model
    counting = CountingApply(jitted._apply)
    kwargs = dict(batch_size=4, valid_column="valid", positions="answer_pos", progress=False)
    first = activations.collect_activations(counting, params, data, "blocks.1.resid_post", **kwargs)
    assert counting.traces == 1  # three batches, the last one padded from 2 rows to 4
    again = activations.collect_activations(counting, params, data, "blocks.1.resid_post", **kwargs)
    assert counting.traces == 1  # reused across calls
    np.testing.assert_array_equal(first["blocks.1.resid_post"], again["blocks.1.resid_post"])
    expected = full["blocks.1.resid_post"][np.arange(N), data["answer_pos"]]
    np.testing.assert_allclose(first["blocks.1.resid_post"], expected, atol=1e-5)


def test_position_selection(model, data, full):
    resid = full["blocks.1.resid_post"]
    rows = np.arange(N)
    last = collect(model, data, positions="last")
    np.testing.assert_allclose(last["blocks.1.resid_post"], resid[rows, data["length"] - 1], atol=1e-5)
    # Attention patterns select along their query axis: [B, H, T, S] -> [B, H, S].
    np.testing.assert_allclose(last["blocks.0.attn.pattern"],
                               full["blocks.0.attn.pattern"][rows, :, data["length"] - 1], atol=1e-5)
    k = collect(model, data, positions="pair", sites=["blocks.1.resid_post"])
    assert k["blocks.1.resid_post"].shape == (N, 2, 32)
    np.testing.assert_allclose(k["blocks.1.resid_post"], resid[rows[:, None], data["pair"]], atol=1e-5)
    with pytest.warns(UserWarning, match="valid_column=None, so padding counts as real tokens"):
        negative = collect(model, data, positions=lambda b: np.full(len(b["tokens"]), -1),
                           sites=["blocks.1.resid_post"], valid_column=None)
    np.testing.assert_allclose(negative["blocks.1.resid_post"][0], resid[0, -1], atol=1e-5)  # row 0 is unpadded
    as_array = collect(model, data, positions=data["answer_pos"], sites=["blocks.1.resid_post"], columns=[])
    np.testing.assert_allclose(as_array["blocks.1.resid_post"], last["blocks.1.resid_post"], atol=1e-6)


def test_boolean_mask_gives_a_token_table(model, data, full):
    got = collect(model, data, positions="span", sites=["blocks.1.resid_post"], batch_size=3)
    row, pos = np.nonzero(data["span"])
    np.testing.assert_array_equal(got["row"], row)
    np.testing.assert_array_equal(got["position"], pos)
    np.testing.assert_allclose(got["blocks.1.resid_post"], full["blocks.1.resid_post"][row, pos], atol=1e-5)
    np.testing.assert_array_equal(got["label"], data["label"][row])  # per-row column, repeated
    np.testing.assert_array_equal(got["token_label"], data["token_label"][row, pos])  # per-token column, read
    np.testing.assert_array_equal(got["tokens"], data["tokens"][row, pos])


def test_pooling_over_valid_tokens_spans_and_indices(model, data, full):
    resid = full["blocks.1.resid_post"]
    site = ["blocks.1.resid_post"]
    valid = data["valid"][..., None]
    mean = collect(model, data, reduce="mean", sites=site)["blocks.1.resid_post"]
    np.testing.assert_allclose(mean, (resid * valid).sum(1) / valid.sum(1), atol=1e-5)
    span = data["span"][..., None]
    span_max = collect(model, data, positions="span", reduce="max", sites=site, columns=["label"])
    np.testing.assert_allclose(span_max["blocks.1.resid_post"], np.where(span, resid, -np.inf).max(1), atol=1e-5)
    assert set(span_max) == {"blocks.1.resid_post", "label"}
    pair_sum = collect(model, data, positions="pair", reduce="sum", sites=site)["blocks.1.resid_post"]
    np.testing.assert_allclose(pair_sum, resid[np.arange(N)[:, None], data["pair"]].sum(1), atol=1e-5)
    norm = lambda x, mask: jnp.linalg.norm(jnp.where(mask[..., None], x, 0.0), axis=-1).sum(1)
    custom = collect(model, data, reduce=norm, sites=site)["blocks.1.resid_post"]
    np.testing.assert_allclose(custom, (np.linalg.norm(resid, axis=-1) * data["valid"]).sum(1), rtol=1e-5)


def test_left_padded_prompts_read_at_the_last_token_equal_unpadded_runs(model):
    apply, params = model
    prompts = [[3, 5, 7, 9, 11], [4, 6, 8]]
    tokens, valid = activations.pad_tokens(prompts, pad_id=0)
    assert tokens.tolist() == [[3, 5, 7, 9, 11], [0, 0, 4, 6, 8]]
    got = activations.collect_activations(apply, params, {"tokens": tokens, "valid": valid}, "blocks.1.resid_post",
                                          batch_size=2, valid_column="valid", positions="last", progress=False)
    _, alone = apply(params, jnp.asarray([prompts[1]]), hooks=ids.capture("blocks.1.resid_post"))
    np.testing.assert_allclose(got["blocks.1.resid_post"][1], alone["blocks.1.resid_post"][0, -1], atol=1e-5)
    right, right_valid = activations.pad_tokens(prompts, pad_id=0, length=6, side="right")
    assert right[1].tolist() == [4, 6, 8, 0, 0, 0] and right_valid.sum(1).tolist() == [5, 3]
    with pytest.raises(ValueError, match="sequence 0 has 5 tokens, more than length=4"):
        activations.pad_tokens(prompts, pad_id=0, length=4)


def test_hooks_and_dtype(model, data):
    apply, params = model
    steer = {"blocks.0.resid_post": ids.Add(jnp.ones(32), 3.0)}
    with pytest.warns(UserWarning, match="valid_column=None"):  # the reference below attends to padding too
        got = collect(model, data, hooks=steer, sites=["blocks.1.resid_post"], dtype=jnp.float16, valid_column=None)
    _, ref = apply(params, jnp.asarray(data["tokens"]), hooks={**steer, "blocks.1.resid_post": ids.Capture()})
    assert got["blocks.1.resid_post"].dtype == np.float16
    np.testing.assert_allclose(got["blocks.1.resid_post"], ref["blocks.1.resid_post"], atol=2e-2, rtol=2e-3)


def test_one_device_mesh_equals_unsharded(model, data, full):
    apply, params = model
    mesh = ids.sharding.make_mesh(data=1, model=1)
    got = activations.collect_activations(apply, ids.sharding.shard_params(params, mesh), data, SITES,
                                          batch_size=4, valid_column="valid", mesh=mesh, progress=False)
    for site, x in full.items():
        np.testing.assert_allclose(got[site], x, atol=1e-5)


@pytest.mark.filterwarnings("ignore:stream_activations. the dataset has a 'valid' column")  # about errors, not padding
def test_bad_input_is_named(model, data):
    apply, params = model
    run = lambda sites="blocks.1.resid_post", d=data, **kw: activations.collect_activations(
        apply, params, d, sites, **{"batch_size": 4, "progress": False, **kw})
    with pytest.raises(KeyError, match="unknown site 'blocks.9.resid_post'.*Did you mean"):
        run("blocks.9.resid_post")
    with pytest.raises(KeyError, match="tokens_column='ids' is not a column.*'tokens'"):
        run(tokens_column="ids")
    ragged = {"tokens": [[1, 2, 3], [1, 2], [4, 5, 6, 7]]}
    with pytest.raises(ValueError, match="different lengths.*valid_column"):
        run(d=ragged)
    with pytest.raises(ValueError, match="outside \\[-12, 12\\)"):
        run(positions=lambda b: np.full(len(b["tokens"]), 12))
    with pytest.raises(ValueError, match="positions='last' selects one per row"):
        run(positions="last", reduce="mean")
    with pytest.raises(ValueError, match="one entry per dataset row \\(10\\)"):
        run(positions=np.zeros(3, int))
    with pytest.raises(ValueError, match="reduce = 'median'"):
        run(reduce="median")
    with pytest.raises(ValueError, match="same names as captured sites"):
        run(sites="logits", d={**data, "logits": data["label"]})
    with pytest.raises(ValueError, match="row 7 marks no valid token"):
        run(positions=lambda b: b["valid"] & (np.arange(T) >= 1), reduce="mean", valid_column="valid")
    fake_mesh = type("M", (), {"shape": {"data": 3}})()
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the mesh's 'data' axis of size 3"):
        run(mesh=fake_mesh)
    with pytest.raises(TypeError, match="site_names"):
        activations.collect_activations(lambda p, t: t, params, data, "x", batch_size=2)


def test_eight_simulated_devices_match_one_device():
    report = run_with_8_devices("tests._sharded_activation_checks")
    assert report["params_sharded"] == "P(None, 'model')"
    for key in ("last_max_diff", "mask_max_diff"):
        assert report[key] < 1e-5, (key, report)
    assert report["columns_equal"]


def test_right_padded_rows_without_valid_read_their_last_real_token_with_pad_id(model):
    apply, params = model
    prompts = [[3, 5, 7, 9, 11], [4, 6, 0, 8]]            # an interior pad id stays a real token
    right, right_valid = activations.pad_tokens(prompts, pad_id=0, length=7, side="right")
    left, left_valid = activations.pad_tokens(prompts, pad_id=0, length=7)
    site = "blocks.1.resid_post"
    alone = [apply(params, jnp.asarray([p]), hooks=ids.capture(site))[1][site][0, -1] for p in prompts]
    for tokens, valid in ((right, right_valid), (left, left_valid)):
        np.testing.assert_array_equal(activations.valid_from_pad(tokens, 0), valid)
        got = activations.collect_activations(apply, params, {"tokens": tokens}, site, batch_size=2, pad_id=0,
                                              positions="last", progress=False)[site]
        for row in range(2):
            np.testing.assert_allclose(got[row], alone[row], atol=1e-5)
    # without valid or pad_id the final column is read: for a right-padded row, the pad token (documented)
    naive = activations.collect_activations(apply, params, {"tokens": right}, site, batch_size=2, positions="last",
                                            progress=False)[site]
    assert not np.allclose(naive[1], alone[1], atol=1e-3)
    # an unused 'valid' column is flagged
    with pytest.warns(UserWarning, match="has a 'valid' column but valid_column=None.*Pass valid_column='valid'"):
        activations.collect_activations(apply, params, {"tokens": right, "valid": right_valid}, site, batch_size=2,
                                        positions="last", progress=False)
    with pytest.raises(ValueError, match="give valid_column .* or pad_id .*, not both"):
        activations.collect_activations(apply, params, {"tokens": right, "valid": right_valid}, site, batch_size=2,
                                        valid_column="valid", pad_id=0, progress=False)
    with pytest.raises(ValueError, match="positions='last': row 1 has no valid token"):
        activations.collect_activations(apply, params, {"tokens": np.array([[1, 2], [0, 0]])}, site, batch_size=2,
                                        pad_id=0, positions="last", progress=False)
