"""Don't fight backprop: shaping what fine-tuning can learn vs fighting the gradient, on a pretrained model.

World (``idesign.data.spurious``). Rows ``<bos> <cue_s> x_1 … x_7 <query> <ans_y>``; the label ``y`` is the
majority class of the body under a token partition, close to a tie; the cue ``s`` is one token at position 1.
A base model is **pretrained** on one partition with the cue independent of the label (it learns to count and
to ignore the cue), cached with ``ids.pretrain.cached``. Every arm **fine-tunes** that base model on a *new*
partition (the base answers it at chance) where the cue equals the label (``s = y``), so the cue is a perfect
shortcut; the test is out of distribution (OOD): the same task with ``s`` independent of ``y``. A model that
reads only the cue scores 0.5 OOD; one that learned the partition scores 1.0. The directions arms use are
found on a *concept* set (``s`` independent of ``y``, labelled by the cue only), never on test rows.

Hypothesis (docs/methods.md §4). Shaping what the loss can use (CAFT, preventative steering, gradient routing)
keeps the cue out of the fine-tuned model; fighting the gradient (training against a frozen cue probe,
projecting the cue out of one layer's updates) does not: gradient descent reaches the cue by another route,
and evades the probe.

Arms (same base model, data and batch order per seed; AdamW; evaluated without any training-time
intervention, except gradient routing, whose inference ablation is part of the method):

* ``plain`` — fine-tune on ``s = y`` rows.  ``control_decorrelated`` — fine-tune on ``s ⊥ y`` rows (upper bound).
* Every other arm **freezes the two cue-token embedding rows** (``ids.optim.frozen``): trainable cue rows
  can move the cue off any fixed direction (the shortcut that defeated CAFT before). ``freeze_cue_rows``
  is that freezing alone, the baseline of every intervention; ``cue_rows_change`` (max |Δ| of the rows)
  measures that the shortcut is closed.
* Shaping: ``caft`` — ``ids.shaping.caft`` ablates, during fine-tuning only, the cue's mass-mean direction
  at the **cue position** (on the base model, concept rows) at the residual stream entering block 0 and
  leaving every block, orthogonalised to the readout ``r`` (the answer tokens' unembedding difference times
  the final norm's scale, centred) so the ablation cannot remove the output channel.
  ``caft_pca`` — CAFT's other recipe: at the same sites, the top ``caft_pcs`` principal components of the
  activation differences *plain fine-tuned minus base* over every position of the concept rows, orthogonalised
  to ``r``. ``direction_readout_cosine``: mean over sites of |cos| of each direction with ``r`` *before*
  the orthogonalisation (a direction near 1 would have been the readout).
  ``preventative_steering`` — ``ids.shaping.preventative_steering`` adds one **unsigned** vector to every
  row during fine-tuning: the mean activation difference *plain fine-tuned minus base* at the answer
  position of ``blocks.0.resid_post`` (Chen et al.'s persona vector: mean activation with the trait minus
  without), times ``steering_scale``. The same vector for every row, so it cannot carry the label.
  ``gradient_routing`` — Expand-Route-Ablate on a designated region, head 0's value at the cue position in
  every block: on the ``s = y`` rows, gradient reaches the values at the cue position through head 0 only;
  on ``n_retain`` extra **decorrelated** retain rows it reaches them through the other heads only; at
  inference head 0's value at the cue position is mean-ablated (replaced by its mean over concept
  rows). ``plain_mixed`` trains on the same mixture
  without routing (the retain rows' own value), and ``gradient_routing.ablation_only_ood_acc`` evaluates the
  *plain* model with the same inference ablation (the ablation's own value).
* Fighting backprop: ``probe_penalty`` — a logistic cue probe fitted on the plain fine-tuned model
  (answer position of ``blocks.{probe_layer}.resid_post``, concept rows) is frozen, and the loss adds
  ``probe_penalty_weight × (log 2 − H(σ(probe)))``: the probe's confidence. Evasion: the frozen probe's AUC
  after training vs a fresh probe's AUC at the same layer on the trained model (held-out concept rows).
  ``project_one_layer`` — ``ids.optim.projected`` removes the cue's mass-mean directions (cue and answer
  positions, re-estimated every ``reestimate_every`` steps, orthogonalised to ``r`` at residual-width
  sites) from the input side of block 0's q/k/v and up kernels.
* ``project_all_layers`` — the same at every dense layer, the tied unembedding included.

Metrics (``results/dont_fight_backprop/metrics.json``; ``experiments._runner`` keys: ``<arm>.<m>_mean``,
``_std`` over seeds; ``<a>_minus_plain.<m>_mean/_se/_n`` paired over seeds):
  <arm>.id_acc, .ood_acc          answer accuracy on s = y rows / against y on s ⊥ y rows (OOD)
  <arm>.ood_follows_cue           share of OOD answers equal to the cue
  <arm>.gap_closed                (ood - plain ood) / (control ood - plain ood), per seed
  <arm>.cue_rows_change           max |Δ| of the cue-token embedding rows (0: frozen)
  <arm>.direction_readout_cosine  where the arm has a direction (see above)
  probe_penalty.frozen_probe_auc_before / _after, .fresh_probe_auc_after
  gradient_routing.ablation_only_ood_acc, world.base_acc_pretrain_task / base_ood_acc
  caft.train_view_id_acc / _ood_acc (and caft_pca.)  accuracy with the training-time ablation left on: did the
                                  model learn the task while the cue was out of reach?
  Exact names asked by issue 14 (means over seeds): <arm>.ood_acc_mean, <arm>.id_acc_mean,
  <arm>.ood_follows_cue, <arm>.direction_readout_cosine, probe_penalty.frozen_probe_auc_after,
  probe_penalty.fresh_probe_auc_after.

Run: ``python -m experiments.dont_fight_backprop --quick`` (CPU) or ``--full`` (GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import idesign as ids  # noqa: E402
from experiments import _common, _runner  # noqa: E402
from idesign import shaping  # noqa: E402
from idesign.data import spurious as sp  # noqa: E402
from idesign.optim import projection  # noqa: E402

NAME = "dont_fight_backprop"
SHAPING = ("caft", "caft_pca", "preventative_steering", "gradient_routing", "freeze_cue_rows")
FIGHTING = ("probe_penalty", "project_one_layer")
ARMS: tuple[str, ...] = ("plain", "control_decorrelated", *SHAPING, "plain_mixed", *FIGHTING, "project_all_layers")
# Arms that read the plain arm's fine-tuned model (directions, probe, or a control evaluated on it).
NEEDS_PLAIN = ("caft_pca", "preventative_steering", "gradient_routing", "probe_penalty")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Everything that determines the pretrained base model (its cache key)."""

    n_body: int = 7
    n_class_tokens: int = 4
    max_margin: int = 3
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    n_pretrain: int = 8192
    cue_task_fraction: float = 0.25   # pretraining rows that ask for the cue (so the base model knows it)
    pretrain_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01


@dataclasses.dataclass(frozen=True)
class Config:
    base: BaseConfig = BaseConfig()
    n_finetune: int = 4096
    n_retain: int = 512            # decorrelated retain rows of gradient routing (and plain_mixed)
    n_test: int = 1024             # each of the ID and OOD test sets
    n_concept: int = 512           # cue-labelled rows (s ⊥ y): half find directions / fit probes, half score probes
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    reestimate_every: int = 100    # projection arms
    caft_pcs: int = 2
    steering_scale: float = 1.0
    probe_layer: int = 0
    probe_penalty_weight: float = 1.0
    probe_C: float = 1.0
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Config()
FULL = Config(base=BaseConfig(n_body=15, n_class_tokens=8, d_model=128, n_layers=4, n_heads=4, n_pretrain=65536,
                              pretrain_steps=3000, batch_size=128, learning_rate=1e-3),
              n_finetune=32768, n_retain=4096, n_test=4096, n_concept=2048, steps=2000, batch_size=128,
              learning_rate=1e-3, reestimate_every=250, probe_layer=1, seeds=(0, 1, 2, 3, 4))


# ------------------------------------------------------------------------------------------------ world

def world_spec(base: BaseConfig) -> sp.SpuriousSpec:
    return sp.SpuriousSpec(n_body=base.n_body, n_class_tokens=base.n_class_tokens, max_margin=base.max_margin)


def model_config(base: BaseConfig) -> ids.TransformerConfig:
    spec = world_spec(base)
    return ids.TransformerConfig(vocab_size=spec.vocab_size, d_model=base.d_model, n_layers=base.n_layers,
                                 n_heads=base.n_heads, max_len=spec.seq_len)


_APPLY: dict[ids.TransformerConfig, Any] = {}
_STEPS: dict[tuple, Callable] = {}


def apply_for(base: BaseConfig) -> Any:
    # One apply object per architecture, so jitted functions keyed on it compile once for every seed.
    cfg = model_config(base)
    if cfg not in _APPLY:
        _APPLY[cfg] = ids.init_transformer(cfg, seed=0)[0]
    return _APPLY[cfg]


def adamw(lr: float, wd: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=wd)


def train_steps(apply: Any, key: tuple, optimizer: optax.GradientTransformation, loss: Callable | None = None):
    """A jitted ``step(state, batch, training_hooks)``, cached by ``key`` (one compilation per arm and config)."""
    if key not in _STEPS:
        def step(state, batch, training_hooks):
            fn = loss if loss is not None else ids.lm_loss(apply, hooks=training_hooks)
            return ids.make_train_step(fn, optimizer, jit=False)(state, batch)
        _STEPS[key] = jax.jit(step)
    return _STEPS[key]


def run_training(state: ids.TrainState, step: Callable, rows: Mapping[str, np.ndarray], num_steps: int,
                 batch_size: int, seed: int, hooks_for: Callable[[dict], Any] = lambda b: None, *,
                 extra: Mapping[str, Any] | None = None, on_chunk: Callable | None = None,
                 every: int | None = None) -> ids.TrainState:
    cols = [k for k in ("tokens", "loss_mask", "s", "retain") if k in rows]
    it = ids.train.iterate_batches({k: rows[k] for k in cols}, batch_size, seed=seed)
    fn = lambda s, b: step(s, {**{k: b[k] for k in cols if k != "s"}, **(extra or {})}, hooks_for(b))
    every = every or num_steps
    done = 0
    while done < num_steps:
        n = min(every, num_steps - done)
        state, _ = ids.train.train(state, fn, it, num_steps=n, log_every=n, progress=False)
        done += n
        if on_chunk is not None and done < num_steps:
            state = on_chunk(state)
    return state


def pretrain(base: BaseConfig, seed: int) -> Any:
    """The base model: trained on the pretraining partition with the cue independent of the label."""
    spec, apply = world_spec(base), apply_for(base)
    params = ids.init_transformer(model_config(base), seed=seed)[1]
    n_cue = int(round(base.cue_task_fraction * base.n_pretrain))
    majority = sp.make_rows(spec, base.n_pretrain - n_cue, 1000 * seed + 99, correlation="independent", task="pretrain")
    cue = sp.make_rows(spec, n_cue, 1000 * seed + 98, correlation="independent", task="cue")
    rows = {k: np.concatenate([majority[k], cue[k]]) for k in majority}
    opt = adamw(base.learning_rate, base.weight_decay)
    step = train_steps(apply, ("pretrain", base), opt)
    return run_training(ids.init_train_state(params, opt), step, rows, base.pretrain_steps, base.batch_size,
                        seed).params


def base_model(base: BaseConfig, seed: int) -> Any:
    return ids.pretrain.cached("spurious-cue-base", base, seed, pretrain,
                               like=lambda: ids.init_transformer(model_config(base), seed=0)[1], version="2")


@dataclasses.dataclass
class World:
    config: Config
    spec: sp.SpuriousSpec
    apply: Any
    base: Any
    seed: int
    finetune: dict[str, np.ndarray]
    decorrelated: dict[str, np.ndarray]
    mixed: dict[str, np.ndarray]
    test_id: dict[str, np.ndarray]
    test_ood: dict[str, np.ndarray]
    concept_fit: dict[str, np.ndarray]
    concept_eval: dict[str, np.ndarray]


def make_world(config: Config, seed: int) -> World:
    spec = world_spec(config.base)
    rows = lambda n, k, corr: sp.make_rows(spec, n, 1000 * seed + k, correlation=corr, task="finetune")
    finetune = rows(config.n_finetune, 1, "train")
    retain = rows(config.n_retain, 6, "independent")
    mixed = {k: np.concatenate([finetune[k], retain[k]]) for k in finetune}
    mixed["retain"] = np.concatenate([np.zeros(config.n_finetune), np.ones(config.n_retain)]).astype(np.float32)
    concept = rows(config.n_concept, 5, "independent")
    half = config.n_concept // 2
    return World(config, spec, apply_for(config.base), base_model(config.base, seed), seed, finetune=finetune,
                 decorrelated=rows(config.n_finetune, 2, "independent"), mixed=mixed,
                 test_id=rows(config.n_test, 3, "train"), test_ood=rows(config.n_test, 4, "independent"),
                 concept_fit={k: v[:half] for k, v in concept.items()},
                 concept_eval={k: v[half:] for k, v in concept.items()})


# ---------------------------------------------------------------------------------- directions, readout

def residual_sites(n_layers: int) -> list[str]:
    return ["blocks.0.resid_pre"] + [f"blocks.{i}.resid_post" for i in range(n_layers)]


def dense_input_sites(n_layers: int, layers: Sequence[int] | None = None) -> dict[str, list[str]]:
    """``{activation site: dense layers reading it}`` for the given blocks (all, plus the unembedding, if None)."""
    out: dict[str, list[str]] = {}
    for i in (range(n_layers) if layers is None else layers):
        b = f"blocks.{i}"
        out[f"{b}.attn.q_proj.in"] = [f"{b}.attn.{p}_proj" for p in "qkv"]
        out[f"{b}.mlp.up.in"] = [f"{b}.mlp.up"]
        if layers is None:
            out[f"{b}.attn.o_proj.in"] = [f"{b}.attn.o_proj"]
            out[f"{b}.mlp.down.in"] = [f"{b}.mlp.down"]
    if layers is None:
        out["unembed.in"] = ["unembed"]
    return out


# Sites whose basis is the residual stream's (or a norm of it): the readout is defined there.
_RESIDUAL_LIKE = ("resid_pre", "resid_post", "q_proj.in", "mlp.up.in", "unembed.in")


def readout_direction(world: World, params: Any) -> np.ndarray:
    """Unit residual direction that moves the answer logit difference: ``(e_a1 - e_a0) ⊙ γ``, centred."""
    emb = np.asarray(params["embed"]["embedding"], np.float64)
    a0, a1 = world.spec.answers
    r = (emb[a1] - emb[a0]) * np.asarray(params["final_norm"]["scale"], np.float64)
    r = r - r.mean()     # the final LayerNorm removes the mean, so only the centred part is read
    return r / np.linalg.norm(r)


def orthogonalise(directions: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Removes ``r`` from each direction; returns the result and each direction's |cos| with ``r`` before."""
    d = np.atleast_2d(np.asarray(directions, np.float64))
    cos = [float(abs(v @ r) / max(np.linalg.norm(v), 1e-12)) for v in d]
    return d - np.outer(d @ r, r), cos


def acts_at(world: World, params: Any, rows: Mapping[str, np.ndarray], sites: Sequence[str],
            positions: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``{site: [n, len(positions), d]}`` (every input position if ``positions`` is None)."""
    n = len(rows["s"])
    kwargs = {}
    if positions is not None:
        kwargs["positions"] = np.tile(np.asarray(positions, np.int32), (n, 1))
    return ids.collect_activations(world.apply, params, {"tokens": rows["tokens"][:, :-1]}, list(sites),
                                   batch_size=256, progress=False, **kwargs)


def mass_mean(acts: np.ndarray, s: np.ndarray) -> np.ndarray:
    return acts[s == 1].mean(0) - acts[s == 0].mean(0)


def cue_directions(world: World, params: Any, sites: Sequence[str], positions: Sequence[int],
                   r: np.ndarray) -> tuple[dict[str, ids.subspaces.Subspace], list[float]]:
    """Per site, the span of the cue's mass-mean directions at ``positions`` (orthogonalised to ``r`` where defined)."""
    rows = world.concept_fit
    acts = acts_at(world, params, rows, sites, positions)
    out, cosines = {}, []
    for site in sites:
        d = np.stack([mass_mean(acts[site][:, k], rows["s"]) for k in range(len(positions))])
        if site.endswith(_RESIDUAL_LIKE):
            d, cos = orthogonalise(d, r)
            cosines += cos
        out[site] = ids.subspaces.from_directions(d)
    return out, cosines


def pca_directions(world: World, tuned: Any, sites: Sequence[str], k: int,
                   r: np.ndarray) -> tuple[dict[str, np.ndarray], list[float]]:
    """CAFT's PCA recipe: top ``k`` principal components of (fine-tuned − base) activations, every position."""
    rows = world.concept_fit
    after, before = acts_at(world, tuned, rows, sites), acts_at(world, world.base, rows, sites)
    out, cosines = {}, []
    for site in sites:
        diff = (after[site] - before[site]).reshape(-1, after[site].shape[-1]).astype(np.float64)
        pcs = np.linalg.svd(diff - diff.mean(0), full_matrices=False)[2][:k]
        d, cos = orthogonalise(pcs, r)
        cosines += cos
        out[site] = ids.subspaces.from_directions(d).basis
    return out, cosines


# -------------------------------------------------------------------------------------------- the arms

def cue_rows_mask(world: World, params: Any) -> Any:
    """Freeze mask: the two cue tokens' embedding rows."""
    rows = np.zeros(params["embed"]["embedding"].shape, bool)
    rows[list(world.spec.cue)] = True
    mask = jax.tree.map(lambda _: False, params)
    mask["embed"]["embedding"] = rows
    return mask


def cue_rows_change(world: World, params: Any) -> float:
    c = list(world.spec.cue)
    before, after = np.asarray(world.base["embed"]["embedding"])[c], np.asarray(params["embed"]["embedding"])[c]
    return float(np.abs(after - before).max())


def probe_confidence_loss(apply: Any, site: str, weight: float) -> Callable:
    """Answer cross-entropy + ``weight ×`` the frozen probe's confidence ``log 2 − H(σ(z))`` at the answer position.

    The probe is ``batch["probe"]`` (traced, so one compilation serves every seed).
    """
    def loss_fn(params, batch):
        logits, captured = apply(params, batch["tokens"][:, :-1], hooks=ids.capture(site))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1].astype(jnp.float32),
                                                              batch["tokens"][:, -1]).mean()
        p = jax.nn.sigmoid(ids.probes.score(batch["probe"], captured[site][:, -1]))
        eps = 1e-7
        confidence = jnp.log(2.0) + p * jnp.log(p + eps) + (1 - p) * jnp.log(1 - p + eps)
        return nll + weight * confidence.mean(), {"loss": nll, "probe_confidence": confidence.mean()}

    return loss_fn


def probe_site(config: Config) -> str:
    return f"blocks.{config.probe_layer}.resid_post"


def fit_cue_probe(world: World, params: Any) -> Any:
    acts = acts_at(world, params, world.concept_fit, [probe_site(world.config)], [world.spec.seq_len - 2])
    return ids.probes.fit_logistic(acts[probe_site(world.config)][:, 0], world.concept_fit["s"], C=world.config.probe_C)


def probe_auc(world: World, params: Any, probe: Any) -> float:
    acts = acts_at(world, params, world.concept_eval, [probe_site(world.config)], [world.spec.seq_len - 2])
    scores = np.asarray(ids.probes.score(probe, acts[probe_site(world.config)][:, 0]))
    return float(ids.metrics.roc_auc(world.concept_eval["s"], scores))


def routing_masks(world: World) -> tuple[np.ndarray, np.ndarray]:
    """``[1, T, H, 1]`` masks at the cue position: head 0 only (routed rows), the other heads only (retain rows)."""
    t, h = world.spec.seq_len - 1, world.config.base.n_heads
    head0 = np.ones((1, t, h, 1), np.float32)
    head0[:, sp.CUE_POSITION, 1:] = 0.0
    others = np.ones((1, t, h, 1), np.float32)
    others[:, sp.CUE_POSITION, 0] = 0.0
    return head0, others


_ROUTING: dict[tuple, shaping.TrainingHooks] = {}


def routing_hooks(world: World) -> shaping.TrainingHooks:
    """Route k and v of every block: routed rows through head 0 at the cue position, retain rows around it."""
    key = (world.spec.seq_len, world.config.base.n_heads)
    if key not in _ROUTING:   # the static function must be one object for one compilation
        head0, others = (jnp.asarray(m) for m in routing_masks(world))

        def masks(batch):
            retain = batch["retain"][:, None, None, None]
            m = retain * others + (1 - retain) * head0
            return {"blocks.*.attn.k": m, "blocks.*.attn.v": m}

        _ROUTING[key] = shaping.gradient_routing(masks)
    return _ROUTING[key]


def routing_ablation(world: World, params: Any) -> dict:
    """Inference hooks: head 0's value at the cue position, in every block, replaced by its mean over concept rows.

    Mean ablation removes what the routed region carries about the cue without feeding later positions a
    value they never saw (zeroing it shifts every attention output that reads the cue position).
    """
    n_layers, t = world.config.base.n_layers, world.spec.seq_len - 1
    sites = [f"blocks.{i}.attn.v" for i in range(n_layers)]
    acts = acts_at(world, params, world.concept_fit, sites, [sp.CUE_POSITION])
    region = np.zeros((1, t, world.config.base.n_heads, 1), bool)
    region[:, sp.CUE_POSITION, 0] = True
    return {site: ids.Replace(jnp.asarray(acts[site][:, 0].mean(0)), jnp.asarray(region)) for site in sites}


def evaluate(world: World, params: Any, hooks: Any = None) -> dict[str, float]:
    spec = world.spec
    return {"id_acc": sp.accuracy(world.apply, params, world.test_id, spec, hooks=hooks),
            "ood_acc": sp.accuracy(world.apply, params, world.test_ood, spec, hooks=hooks),
            "ood_follows_cue": sp.accuracy(world.apply, params, world.test_ood, spec, target="s", hooks=hooks),
            "cue_rows_change": cue_rows_change(world, params)}


def run_arm(arm: str, world: World, plain: Any = None) -> tuple[dict[str, float], Any]:
    """Fine-tunes one arm from the base model; returns its metrics and parameters.

    ``plain`` is the plain arm's fine-tuned parameters (needed by the arms in ``NEEDS_PLAIN``).
    """
    c, base, apply = world.config, world.base, world.apply
    lr, wd = c.learning_rate, c.weight_decay
    opt = adamw(lr, wd)
    key = lambda name: (name, c.base, lr, wd, c.batch_size)
    train = lambda state, step, rows, **kw: run_training(state, step, rows, c.steps, c.batch_size,
                                                         world.seed + 1, **kw)
    extra: dict[str, float] = {}
    if arm in ("plain", "control_decorrelated"):
        rows = world.finetune if arm == "plain" else world.decorrelated
        params = train(ids.init_train_state(base, opt), train_steps(apply, key("plain"), opt), rows).params
        return {**evaluate(world, params), **extra}, params

    if arm in NEEDS_PLAIN and plain is None:
        raise ValueError(f"arm {arm!r} needs the plain arm's fine-tuned parameters (run 'plain' first).")
    frozen = ids.optim.frozen(opt, freeze_mask=cue_rows_mask(world, base))
    r = readout_direction(world, base)
    sites = residual_sites(c.base.n_layers)
    hooks_for = lambda b: None
    rows = world.finetune
    inference_hooks = None
    step = train_steps(apply, key("frozen"), frozen)
    state = ids.init_train_state(base, frozen)

    if arm == "freeze_cue_rows":
        pass
    elif arm in ("caft", "caft_pca"):
        if arm == "caft":
            subs, cosines = cue_directions(world, base, sites, [sp.CUE_POSITION], r)
            bases = {s: v.basis for s, v in subs.items()}
        else:
            bases, cosines = pca_directions(world, plain, sites, c.caft_pcs, r)
        # Zero ablation, as the paper. (Mean ablation, caft(..., centers=...), was worse on seed 0: ID 0.52.)
        th = shaping.caft(bases)
        hooks_for = lambda b: th
        step = train_steps(apply, key(arm), frozen)
        extra["direction_readout_cosine"] = float(np.mean(cosines))
    elif arm == "preventative_steering":
        site = "blocks.0.resid_post"
        answer = [world.spec.seq_len - 2]
        diff = (acts_at(world, plain, world.concept_fit, [site], answer)[site]
                - acts_at(world, base, world.concept_fit, [site], answer)[site])[:, 0]
        v = diff.mean(0)
        extra["direction_readout_cosine"] = float(abs(v @ r) / np.linalg.norm(v))
        at_answer = np.zeros((1, world.spec.seq_len - 1, 1), np.float32)
        at_answer[:, -1] = c.steering_scale
        th = shaping.preventative_steering({site: jnp.asarray(v, jnp.float32)}, scale=jnp.asarray(at_answer))
        hooks_for = lambda b: th
        step = train_steps(apply, key(arm), frozen)
    elif arm in ("gradient_routing", "plain_mixed"):
        rows = world.mixed
        if arm == "gradient_routing":
            th = routing_hooks(world)
            hooks_for = lambda b: th
            step = train_steps(apply, key(arm), frozen)
            extra["ablation_only_ood_acc"] = sp.accuracy(apply, plain, world.test_ood, world.spec,
                                                          hooks=routing_ablation(world, plain))
    elif arm == "probe_penalty":
        probe = fit_cue_probe(world, plain)
        loss = probe_confidence_loss(apply, probe_site(c), c.probe_penalty_weight)
        step = train_steps(apply, key(arm), frozen, loss)
        state = train(state, step, rows, extra={"probe": probe})
        params = state.params
        fresh = fit_cue_probe(world, params)
        extra.update(frozen_probe_auc_before=probe_auc(world, plain, probe),
                     frozen_probe_auc_after=probe_auc(world, params, probe),
                     fresh_probe_auc_after=probe_auc(world, params, fresh))
        return {**evaluate(world, params), **extra}, params
    elif arm in ("project_one_layer", "project_all_layers"):
        layout = dense_input_sites(c.base.n_layers, [0] if arm == "project_one_layer" else None)
        positions = [sp.CUE_POSITION, world.spec.seq_len - 2]
        cosines: list[float] = []

        def tree_for(params):
            subs, cos = cue_directions(world, params, list(layout), positions, readout_direction(world, params))
            cosines.extend(cos)
            spec = {layer: subs[site] for site, layers in layout.items() for layer in layers}
            return projection.subspaces_for(params, spec, dense_layers=apply.dense_layers)

        popt = ids.optim.frozen(projection.projected(opt, tree_for(base)), freeze_mask=cue_rows_mask(world, base))
        step = train_steps(apply, key(arm), popt)

        def reestimate(state):
            tree = tree_for(state.params)
            return state._replace(opt_state=optax.tree_utils.tree_set(state.opt_state, subspaces=tree))

        params = train(ids.init_train_state(base, popt), step, rows, on_chunk=reestimate,
                       every=c.reestimate_every).params
        extra["direction_readout_cosine"] = float(np.mean(cosines))
        return {**evaluate(world, params), **extra}, params
    else:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}.")

    params = train(state, step, rows, hooks_for=hooks_for).params
    if arm == "gradient_routing":
        inference_hooks = routing_ablation(world, params)
    if arm in ("caft", "caft_pca"):
        # The model as it ran in training (ablation on): did it learn the task, with the cue out of reach?
        view = th.resolve({})
        extra["train_view_ood_acc"] = sp.accuracy(apply, params, world.test_ood, world.spec, hooks=view)
        extra["train_view_id_acc"] = sp.accuracy(apply, params, world.test_id, world.spec, hooks=view)
    return {**evaluate(world, params, inference_hooks), **extra}, params


def run_seed(config: Config, seed: int, progress: bool = False) -> dict[str, dict[str, float]]:
    world = make_world(config, seed)
    pre = sp.make_rows(world.spec, config.n_test, 1000 * seed + 7, correlation="independent", task="pretrain")
    out = {"world": {"base_acc_pretrain_task": sp.accuracy(world.apply, world.base, pre, world.spec),
                     "base_ood_acc": sp.accuracy(world.apply, world.base, world.test_ood, world.spec),
                     "cue_only_ood_acc": float((world.test_ood["s"] == world.test_ood["y"]).mean())}}
    arms = list(config.arms)
    if any(a in NEEDS_PLAIN for a in arms) and "plain" not in arms:
        arms.insert(0, "plain")
    arms.sort(key=lambda a: a != "plain")    # plain first: other arms read its parameters
    plain = None
    for arm in arms:
        out[arm], params = run_arm(arm, world, plain)
        if arm == "plain":
            plain = params
        if progress:
            r = out[arm]
            print(f"[{NAME}] seed {seed} {arm:22s} id {r['id_acc']:.3f} ood {r['ood_acc']:.3f} "
                  f"cue {r['ood_follows_cue']:.3f}", flush=True)
    if "plain" in out and "control_decorrelated" in out:
        p, top = out["plain"]["ood_acc"], out["control_decorrelated"]["ood_acc"]
        for arm in arms:
            out[arm]["gap_closed"] = (out[arm]["ood_acc"] - p) / (top - p) if top - p > 0.05 else math.nan
    return out


# ------------------------------------------------------------------------------------------------ report

def verdict(summary: Mapping[str, float], arm: str) -> str:
    closed = summary.get(f"{arm}.gap_closed_mean", math.nan)
    if not math.isfinite(closed):
        return "cannot be judged (no plain → control OOD gap in this run)"
    idn = summary[f"{arm}.id_acc_mean"]
    word = "reaches the target" if closed >= 0.75 and idn >= 0.95 else "partly" if closed >= 0.25 else "fails"
    return f"{word}: closes {closed:.0%} of the plain → control OOD gap at ID {idn:.3f}"


def conclusion(summary: Mapping[str, float], arms: Sequence[str]) -> str:
    lines = []
    if "plain.ood_acc_mean" in summary:
        lines.append(f"Plain fine-tuning follows the cue on {summary['plain.ood_follows_cue_mean']:.0%} of OOD rows "
                     f"(OOD {_runner.pm(summary, 'plain', 'ood_acc')}); the decorrelated control reaches "
                     f"{_runner.pm(summary, 'control_decorrelated', 'ood_acc')}. The base model answers the "
                     f"pretraining task at {summary['world.base_acc_pretrain_task_mean']:.3f} and the fine-tuning "
                     f"task at {summary['world.base_ood_acc_mean']:.3f}.")
    for arm in arms:
        if arm in ("plain", "control_decorrelated"):
            continue
        kind = "shaping" if arm in SHAPING else "fighting" if arm in FIGHTING else "other"
        line = f"- **{arm}** ({kind}) {verdict(summary, arm)}; follows the cue on " \
               f"{summary[f'{arm}.ood_follows_cue_mean']:.0%} of OOD rows"
        if f"{arm}.direction_readout_cosine_mean" in summary:
            line += f"; its directions' |cos| with the readout {summary[f'{arm}.direction_readout_cosine_mean']:.2f}"
        lines.append(line + ".")
    if "probe_penalty.frozen_probe_auc_after_mean" in summary:
        before = summary["probe_penalty.frozen_probe_auc_before_mean"]
        lines.append(f"Evasion: the frozen cue probe's AUC is {before:.3f} "
                     f"on the plain model and {summary['probe_penalty.frozen_probe_auc_after_mean']:.3f} after "
                     f"training against it; a fresh probe at the same layer finds the cue at "
                     f"{summary['probe_penalty.fresh_probe_auc_after_mean']:.3f}.")
    for arm in ("caft", "caft_pca"):
        if f"{arm}.train_view_ood_acc_mean" in summary:
            idn, ood = summary[f"{arm}.train_view_id_acc_mean"], summary[f"{arm}.train_view_ood_acc_mean"]
            lines.append(f"{arm} with its ablation left on (the model as trained): ID {idn:.3f}, OOD {ood:.3f}.")
    if "gradient_routing.ablation_only_ood_acc_mean" in summary:
        lines.append(f"Routing's ablation alone on the plain model: OOD "
                     f"{summary['gradient_routing.ablation_only_ood_acc_mean']:.3f}; the same retain rows without "
                     f"routing (plain_mixed): {_runner.pm(summary, 'plain_mixed', 'ood_acc')}.")
    frozen = [a for a in arms if a not in ("plain", "control_decorrelated")]
    if frozen:
        worst = max(summary[f"{a}.cue_rows_change_mean"] for a in frozen)
        lines.append(f"Shortcut checks: the cue-token rows move by at most {worst:.1e} in every intervention arm "
                     f"(plain: {summary.get('plain.cue_rows_change_mean', math.nan):.2f}); the steering vector is "
                     "one vector for every row (not signed by the label); CAFT's directions are orthogonal to the "
                     "readout after the cosines above are removed.")
    return "\n".join(lines)


def plot(summary: Mapping[str, float], arms: Sequence[str], out_dir) -> None:
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for off, m, label, color in ((-0.2, "id_acc", "ID (cue = label)", "tab:gray"),
                                 (0.2, "ood_acc", "OOD (cue independent)", "tab:blue")):
        ax.bar(x + off, [summary[f"{a}.{m}_mean"] for a in arms], 0.4,
               yerr=[summary[f"{a}.{m}_std"] for a in arms], label=label, color=color, capsize=3)
    ax.axhline(0.5, ls="--", c="k", lw=1, label="'answer = cue' OOD")
    ax.set_xticks(x, [a.replace("_", "\n", 1) for a in arms], fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="answer accuracy",
           title=f"Fine-tuning arms ({int(summary['n_seeds'])} seeds, mean ± sd)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "ood_accuracy.png", dpi=120)
    plt.close(fig)


ISSUE_KEYS = ("ood_follows_cue", "direction_readout_cosine", "frozen_probe_auc_after", "fresh_probe_auc_after")


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, float]:
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"Config.arms: unknown {unknown}; expected a subset of {ARMS}.")
    arms = [a for a in ARMS if a in config.arms]
    pairs = [(a, "plain") for a in arms if a != "plain"] if "plain" in arms else []
    result = _runner.run(NAME, config.seeds, lambda s: run_seed(config, s, progress), pairs=pairs, progress=progress)
    summary = dict(result.summary)
    # The names issue 14 asks for, without the runner's _mean suffix (the same numbers).
    for key in list(summary):
        arm, _, metric = key.partition(".")
        if metric.endswith("_mean") and metric[:-5] in ISSUE_KEYS:
            summary[f"{arm}.{metric[:-5]}"] = summary[key]
    summary.update({f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()})
    _common.write_metrics(NAME, summary)
    out = _common.results_dir(NAME)
    plot(summary, arms, out)
    table = _runner.arm_table(summary, arms, ["id_acc", "ood_acc", "ood_follows_cue", "gap_closed"],
                              labels={"id_acc": "ID accuracy", "ood_acc": "OOD accuracy",
                                      "ood_follows_cue": "OOD answers = cue", "gap_closed": "gap closed"})
    paired = _runner.paired_table(summary, [p for p in pairs if p[0] != "control_decorrelated"], ["ood_acc"])
    b = config.base
    _common.write_readme(NAME, f"""
## Don't fight backprop ({len(config.seeds)} seeds, {summary['minutes']:.1f} min)

Hypothesis: shaping what fine-tuning can use (CAFT, preventative steering, gradient routing) keeps a spurious
cue out of a pretrained model; fighting the gradient (a probe penalty, projecting one layer) does not.
The base model is pretrained with the cue uninformative; fine-tuning data have cue = label; the test has them
independent. Targets: shaping arms close ≥ 75% of the plain → control OOD gap at ID ≥ 0.95; fighting arms < 25%.

{table}

{conclusion(summary, arms)}

Paired differences against plain (over seeds):

{paired}

Config: {b.d_model}-wide, {b.n_layers}-layer transformer pretrained {b.pretrain_steps} steps (cached), fine-tuned
{config.steps} steps of batch {config.batch_size}; {b.n_body} body tokens, margin ≤ {b.max_margin}.

![ood](ood_accuracy.png)
""")
    return summary


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
