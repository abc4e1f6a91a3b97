"""The same computations on 2 processes x 4 CPU devices and on 1 process x 8 (see test_multihost.py).

Run by ``ids.distributed.run_local_processes`` (the multi-process mode: it sets IDESIGN_COORDINATOR …) or
in one process with 8 simulated devices. Both build the same global ('data', 'model') = (4, 2) mesh and run
the same code; process 0 writes every result, gathered to the host, to ``$IDESIGN_MH_OUT/<mode>.npz``, and
a JSON report of what each process itself checked.
"""

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idesign as ids

CONFIG = {"model": {"vocab": 64, "d_model": 32, "layers": 2}, "global_batch": 8, "seed": 0}


def main() -> None:
    config = dict(CONFIG, **json.loads(os.environ.get("IDESIGN_MH_CONFIG_OVERRIDE", "{}")))
    info = ids.distributed.initialize_from_env(timeout_s=60, config=config)
    mode = "multi" if info.process_count > 1 else "single"
    assert jax.device_count() == 8, jax.devices()
    out: dict[str, np.ndarray] = {}
    report: dict[str, object] = {"process_index": info.process_index, "process_count": info.process_count,
                                 "local_device_count": info.local_device_count}

    cfg = ids.TransformerConfig.llama_like(64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
    apply, params = ids.init_transformer(cfg, seed=0)          # the same seed on every process: the same values
    mesh = ids.sharding.make_mesh(data=4, model=2)
    params_on_mesh = ids.sharding.shard_params(params, mesh)

    # Data: each process reads only its rows; the global batches must equal the one-process ones.
    import datasets
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(40, 12)).astype(np.int32)
    dataset = datasets.Dataset.from_dict({"tokens": tokens, "label": (tokens[:, 0] % 2).astype(np.int32)})
    local = ids.distributed.process_batch(dataset, 0, 8, seed=0)
    report["local_rows"] = int(local["tokens"].shape[0])
    batches = list(ids.distributed.process_batches(dataset, 8, mesh, seed=0, num_steps=4))
    for s, b in enumerate(batches):
        out[f"data.step{s}.tokens"] = ids.distributed.to_host(b["tokens"])

    # A sharded forward with captured sites.
    fwd = jax.jit(lambda p, t: apply(p, t, hooks=ids.capture("blocks.1.resid_post", "blocks.0.attn.pattern")))
    logits, captured = fwd(params_on_mesh, batches[0]["tokens"])
    out["forward.logits"] = ids.distributed.to_host(logits)
    for site, x in captured.items():
        out[f"forward.{site}"] = ids.distributed.to_host(x)

    # Train steps with a projected and a frozen optimizer (SGD: linear in the gradient, so float tolerance is meaningful).
    _, probe_acts = jax.jit(lambda p, t: apply(p, t, hooks=ids.capture("blocks.0.mlp.down.in")))(params, tokens[:16])
    down_in = np.asarray(probe_acts["blocks.0.mlp.down.in"])
    basis = ids.subspaces.from_activations(down_in.reshape(-1, down_in.shape[-1]), rank=8)
    mask = ids.circuits.heads_mask(params, cfg, [(0, 1), (1, 3)])
    optimizers = {
        "projected": ids.optim.projected(optax.sgd(0.1), ids.optim.subspaces_for(params, {"blocks.0.mlp.down.kernel": basis})),
        "frozen": ids.optim.frozen(optax.sgd(0.1, momentum=0.9), freeze_mask=mask),
    }
    for name, opt in optimizers.items():
        step = ids.make_train_step(ids.lm_loss(apply), opt)
        state = ids.init_train_state(params_on_mesh, opt)
        for b in batches:
            state, metrics = step(state, {"tokens": b["tokens"]})
        out[f"train.{name}.loss"] = np.asarray(metrics["loss"])
        for path, leaf in ids.tree.named_leaves(ids.distributed.to_host(state.params)).items():
            out[f"train.{name}.{path}"] = leaf
        if name == "frozen":
            q = ids.distributed.to_host(state.params["blocks"][0]["attn"]["q_proj"]["kernel"])
            q0 = np.asarray(params["blocks"][0]["attn"]["q_proj"]["kernel"])
            m = np.broadcast_to(np.asarray(mask["blocks"][0]["attn"]["q_proj"]["kernel"]), q.shape)
            report["frozen_bit_identical"] = bool(np.array_equal(q[m].view(np.uint32), q0[m].view(np.uint32)))
            report["frozen_mask_nonempty"] = bool(m.any())
        if name == "projected":
            delta = (ids.distributed.to_host(state.params["blocks"][0]["mlp"]["down"]["kernel"])
                     - np.asarray(params["blocks"][0]["mlp"]["down"]["kernel"]))
            v = np.asarray(basis.basis if hasattr(basis, "basis") else basis)
            report["projected_leak"] = float(np.linalg.norm(v @ delta) / max(np.linalg.norm(delta), 1e-30))
        trained_state = state

    # K-FAC factors over batches that each process loaded only its part of (XLA reduces across processes).
    factors = ids.curvature.collect_factors(apply, params_on_mesh, [{"tokens": b["tokens"]} for b in batches],
                                            "blocks.0.mlp.*", mesh=mesh, progress=False)
    for layer, f in factors.items():
        for field, value in ids.distributed.to_host(f)._asdict().items():
            out[f"kfac.{layer}.{field}"] = np.asarray(value)

    # A probe fitted on activations sharded over the processes.
    last = jax.jit(lambda p, t: apply(p, t, hooks=ids.capture("blocks.1.resid_post"))[1]["blocks.1.resid_post"][:, -1])
    acts = jnp.concatenate([last(params_on_mesh, b["tokens"]) for b in batches])           # [32, 32], rows over 'data'
    labels = jnp.concatenate([jnp.asarray(b["label"]) for b in batches])
    probe = ids.probes.fit_logistic(acts, labels, C=1.0)
    out["probe.scores"] = ids.distributed.to_host(ids.probes.predict_proba(probe, acts))
    for field, value in probe._asdict().items():
        if hasattr(value, "shape"):
            out[f"probe.{field}"] = ids.distributed.to_host(value)

    # collect_activations over the whole dataset, batches placed on the global mesh.
    collected = ids.collect_activations(apply, params_on_mesh, {"tokens": tokens}, ["blocks.1.resid_post"],
                                        batch_size=8, positions="last", mesh=mesh, progress=False)
    out["activations.blocks.1.resid_post"] = np.asarray(collected["blocks.1.resid_post"])

    # Orbax: each process writes its shards; restore onto the same mesh and onto another mesh shape.
    shared = Path(os.environ["IDESIGN_MH_OUT"]) / f"ckpt-{mode}"
    ids.save_checkpoint(shared, trained_state, step=4, overwrite=True)
    restored, _ = ids.restore_checkpoint(shared, ids.abstract_like(trained_state))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(ids.distributed.to_host(a), ids.distributed.to_host(b))),
                                  trained_state, restored)
    report["restore_same_mesh_equal"] = all(jax.tree_util.tree_leaves(same))
    report["restore_same_mesh_spec"] = str(restored.params["blocks"][0]["mlp"]["up"]["kernel"].sharding.spec)
    other = ids.sharding.make_mesh(data=2, model=4)
    target = jax.tree_util.tree_map(
        lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(other, spec)),
        trained_state.params, ids.sharding.param_specs(trained_state.params, other))
    restored_other, _ = ids.restore_checkpoint(shared, ids.abstract_like(trained_state)._replace(params=target))
    restored_params = restored_other.params
    kernel = restored_params["blocks"][0]["mlp"]["up"]["kernel"]
    report["restore_other_mesh_shape"] = dict(kernel.sharding.mesh.shape)
    report["restore_other_mesh_equal"] = bool(np.array_equal(
        ids.distributed.to_host(kernel), ids.distributed.to_host(trained_state.params["blocks"][0]["mlp"]["up"]["kernel"])))

    if info.process_index == 0:
        np.savez(Path(os.environ["IDESIGN_MH_OUT"]) / f"{mode}.npz", **out)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
