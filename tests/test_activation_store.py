"""The on-disk activation store: exact round trips, resuming after an interruption, identity checks, batched reads
feeding a probe, a subspace and an SAE."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import idesign as ids
from idesign import activation_store as st
from idesign import sae as sae_lib

CFG = ids.TransformerConfig(vocab_size=17, d_model=8, n_heads=2, n_layers=2)
SITES = ["blocks.0.resid_post", "blocks.1.mlp_out"]


@pytest.fixture(scope="module")
def model():
    return ids.init_transformer(CFG, seed=0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 17, (22, 6)).astype(np.int32)
    return {"tokens": tokens, "label": (tokens[:, -1] % 2).astype(np.int64)}


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("positions", [None, "last", "mask"])
def test_store_holds_what_collect_activations_returns(tmp_path, model, data, positions):
    apply, params = model
    if positions == "mask":
        positions = np.random.default_rng(1).random(data["tokens"].shape) < 0.3
    store = st.write_store(tmp_path, apply, params, data, SITES, batch_size=4, shard_rows=8, positions=positions,
                           progress=False)
    expected = ids.collect_activations(apply, params, data, SITES, batch_size=4, positions=positions, progress=False)
    assert store.complete and store.n_shards == 3 and sorted(store.keys) == sorted(expected)
    got = next(store.batches(10_000))
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)   # bit-identical, rows in dataset order
    if isinstance(positions, np.ndarray):  # rows of the whole dataset, not of each shard
        assert len(store) == int(positions.sum()) and got["row"].max() > 8
    # the shards carry their token ids; the store its model and sites
    assert store.meta["sites"] == SITES and store.meta["model"]["config"]["d_model"] == 8
    np.testing.assert_array_equal(np.load(tmp_path / "shard-00001" / "_tokens.npy"), data["tokens"][8:16])


def test_shuffled_batches_are_a_seeded_permutation(tmp_path, model, data):
    apply, params = model
    store = st.write_store(tmp_path, apply, params, data, SITES[0], batch_size=4, shard_rows=8, positions="last",
                           progress=False)
    full = store.read(SITES[0], np.arange(len(store)))
    a = list(store.batches(5, shuffle=True, seed=3))
    b = list(store.batches(5, shuffle=True, seed=3))
    assert [len(x[SITES[0]]) for x in a] == [5, 5, 5, 5, 2]
    assert len(list(store.batches(5, drop_last=True))) == 4
    order = np.random.default_rng(3).permutation(len(store))
    np.testing.assert_array_equal(np.concatenate([x[SITES[0]] for x in a]), full[order])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["label"], y["label"])


def test_an_interrupted_writer_resumes_to_identical_files(tmp_path, model, data, monkeypatch):
    apply, params = model
    kwargs = dict(batch_size=4, shard_rows=8, positions="last", progress=False)
    st.write_store(tmp_path / "whole", apply, params, data, SITES, **kwargs)

    calls = {"n": 0}
    append = st._NpyWriter.append

    def crash_midway(self, array):
        calls["n"] += 1
        if calls["n"] == 12:   # inside shard 1: after shard 0 was renamed into place
            raise KeyboardInterrupt("simulated interruption")
        return append(self, array)

    monkeypatch.setattr(st._NpyWriter, "append", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        st.write_store(tmp_path / "resumed", apply, params, data, SITES, **kwargs)
    monkeypatch.setattr(st._NpyWriter, "append", append)
    partial = st.open_store(tmp_path / "resumed")
    assert not partial.complete and (tmp_path / "resumed" / "shard-00000").is_dir()
    assert (tmp_path / "resumed" / "shard-00001.tmp").is_dir()
    with pytest.raises(ValueError, match="1 of 3 shards"):
        next(partial.batches(4))
    # a budgeted call writes one more shard, the next finishes the store
    assert not st.write_store(tmp_path / "resumed", apply, params, data, SITES, max_shards=1, **kwargs).complete
    store = st.write_store(tmp_path / "resumed", apply, params, data, SITES, **kwargs)
    assert store.complete
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_mismatches_are_named(tmp_path, model, data):
    apply, params = model
    kwargs = dict(batch_size=4, shard_rows=8, positions="last", progress=False)
    st.write_store(tmp_path, apply, params, data, SITES, **kwargs)
    other_apply, other_params = ids.init_transformer(CFG, seed=1)   # same config, other weights
    with pytest.raises(st.StoreMismatchError, match="param_values"):
        st.write_store(tmp_path, other_apply, other_params, data, SITES, **kwargs)
    wider = ids.init_transformer(ids.TransformerConfig(vocab_size=17, d_model=16, n_heads=2, n_layers=2))
    with pytest.raises(st.StoreMismatchError, match="config.d_model: 8 vs 16"):
        st.open_store(tmp_path, apply=wider[0], params=wider[1])
    with pytest.raises(st.StoreMismatchError, match="not in the store: \\['blocks.1.resid_post'\\]"):
        st.open_store(tmp_path, apply=apply, params=params, sites=["blocks.0.resid_post", "blocks.1.resid_post"])
    with pytest.raises(st.StoreMismatchError, match="positions: 'last' vs None"):
        st.write_store(tmp_path, apply, params, data, SITES, **{**kwargs, "positions": None})
    with pytest.raises(st.StoreMismatchError, match="other token ids"):
        st.write_store(tmp_path, apply, params, {**data, "tokens": data["tokens"][::-1].copy()}, SITES, **kwargs)
    assert st.open_store(tmp_path, apply=apply, params=params, sites=SITES).complete


def test_batches_feed_a_probe_a_subspace_and_an_sae(tmp_path, model, data):
    apply, params = model
    site = SITES[0]
    big = {k: np.concatenate([v] * 8) for k, v in data.items()}   # 176 rows, 1056 tokens
    mask = np.ones(big["tokens"].shape, bool)
    store = st.write_store(tmp_path, apply, params, big, site, batch_size=16, shard_rows=32, positions=mask,
                           progress=False)
    acts = ids.collect_activations(apply, params, big, site, batch_size=16, positions=mask, progress=False)
    x, y = acts[site], acts["label"]
    # probe: mass-mean statistics accumulated batch by batch equal the in-memory fit
    stats = ids.probes.class_means_init(CFG.d_model)
    for batch in store.batches(100, keys=[site, "label"]):
        stats = ids.probes.class_means_update(stats, batch[site], batch["label"])
    streamed, direct = ids.probes.class_means_finalize(stats), ids.probes.fit_mass_mean(x, y)
    np.testing.assert_allclose(streamed.w, direct.w, rtol=1e-4, atol=1e-5)
    # subspace: the streamed covariance is the in-memory one, so is its principal subspace
    cov = ids.subspaces.covariance_init(CFG.d_model)
    for batch in store.batches(128, keys=[site], shuffle=True, seed=0):
        cov = ids.subspaces.covariance_update(cov, batch[site])
    np.testing.assert_allclose(ids.subspaces.covariance_finalize(cov, center=True), np.cov(x.T, bias=True),
                               rtol=1e-3, atol=1e-5)
    sub = ids.subspaces.from_covariance(ids.subspaces.covariance_finalize(cov, center=True), rank=3)
    ref = ids.subspaces.from_activations(x, rank=3, center=True)
    assert float(jnp.max(ids.subspaces.principal_angles(sub, ref))) < 1e-2
    # SAE: trained from shuffled batches over several epochs, deterministic, and better than the mean
    config = sae_lib.SAEConfig(n_features=16, k=3, steps=120, learning_rate=1e-2, resample_every=40, dead_after=30)
    epochs = lambda: (b[site] for e in range(4) for b in store.batches(64, keys=[site], shuffle=True, seed=e))
    params_a, info = sae_lib.train_sae_batches(epochs(), config, seed=0)
    params_b, _ = sae_lib.train_sae_batches(epochs(), config, seed=0)
    np.testing.assert_array_equal(params_a.w_dec, params_b.w_dec)
    assert info.loss.shape == (68,)  # 4 epochs of 17 batches, fewer than config.steps
    fvu = float(sae_lib.sae_metrics(params_a, x, 3)["fvu"])
    assert fvu < 0.5, fvu


def test_sae_features_and_bfloat16_are_stored(tmp_path, model, data):
    apply, params = model
    rng = np.random.default_rng(2)
    s = sae_lib.SAE(w_enc=jnp.asarray(rng.normal(size=(8, 12)), jnp.float32), b_enc=jnp.zeros(12),
                    w_dec=jnp.asarray(rng.normal(size=(12, 8)), jnp.float32), b_dec=jnp.zeros(8))
    hooks = {SITES[0]: sae_lib.Splice(s, error=True)}
    store = st.write_store(tmp_path, apply, params, data, SITES[0] + ".sae.features", batch_size=4, shard_rows=8,
                           positions="last", hooks=hooks, dtype=jnp.bfloat16, progress=False)
    expected = ids.collect_activations(apply, params, data, SITES[0] + ".sae.features", batch_size=4,
                                       positions="last", hooks=hooks, dtype=jnp.bfloat16, progress=False)
    got = store.read(SITES[0] + ".sae.features", np.arange(len(store)))
    assert got.dtype == jnp.bfloat16 and store.dtype(SITES[0] + ".sae.features") == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), expected[SITES[0] + ".sae.features"].astype(np.float32))
    with pytest.raises(st.StoreMismatchError, match="hooks"):
        st.write_store(tmp_path, apply, params, data, SITES[0] + ".sae.features", batch_size=4, shard_rows=8,
                       positions="last", hooks={SITES[0]: sae_lib.Splice(s)}, dtype=jnp.bfloat16, progress=False)


def test_bad_arguments(tmp_path, model, data):
    apply, params = model
    with pytest.raises(ValueError, match="multiple of batch_size"):
        st.write_store(tmp_path, apply, params, data, SITES, batch_size=4, shard_rows=6, progress=False)
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        st.open_store(tmp_path / "nothing")
    with pytest.raises(KeyError, match="unknown site"):
        st.write_store(tmp_path, apply, params, data, "blocks.9.resid_post", batch_size=4, progress=False)


def test_a_datasets_dataset_is_read_shard_by_shard(tmp_path, model, data):
    datasets = pytest.importorskip("datasets")
    apply, params = model
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()})
    store = st.write_store(tmp_path, apply, params, ds, SITES[0], batch_size=4, shard_rows=8, positions="last",
                           progress=False)
    expected = ids.collect_activations(apply, params, data, SITES[0], batch_size=4, positions="last", progress=False)
    np.testing.assert_array_equal(store.read(SITES[0], np.arange(len(store))), expected[SITES[0]])
    assert st.write_store(tmp_path, apply, params, ds, SITES[0], batch_size=4, shard_rows=8, positions="last",
                          progress=False).complete   # resuming a complete store checks its token ids and skips it
