"""Don't fight backprop: does projecting a spurious feature's direction out of training stop a model using it?

Task (``experiments/_spurious.py``). Rows ``<bos> <cue_s> x_1 … x_7 <query> <ans_y>``: the *true* feature
``y`` is the majority class of the body tokens (close to a tie, so it needs the whole sequence); the
*spurious* feature ``s`` is the cue token at position 1 (one token at a fixed place: the easiest thing to
read). In training ``s = y`` always; at test ``s`` is an independent fair coin. A model that reads only the
cue scores ≈ 0.5 out of distribution (OOD).

Hypothesis (METHODS.md §4, "the warning in the title"). Projecting the cue's direction out of the first
layer's updates does not stop the model from using the cue: gradient descent reaches it by another route
(the embeddings, later layers) and the cue re-emerges downstream. The other arms say how much blocking
it everywhere, or shaping what the loss can use, does instead.

The cue's direction is found honestly: on a small *concept* set where ``s`` is independent of ``y`` — a set
a user could build by labelling the cue only — never from the test sets or from ``y``. At each site it is the
mass-mean probe direction (class-mean difference of ``s``, ``ids.subspaces.from_directions``) at the cue
position and at the answer position: a rank-≤2 subspace. (A standardised logistic probe's weights are a
read-out direction, not the direction the cue moves the activations along, and removing them leaves the
cue in place; logistic probes are used to *measure* decodability.)

Arms (same initialisation, data and batch order per seed; AdamW; the model is evaluated *without* any
training-time intervention unless said otherwise):

* ``plain`` — no intervention.
* ``project_one_layer`` — ``ids.optim.projected(adamw, subspaces_for(...))`` removes the cue subspace from
  the input side of the first block's kernels (q, k, v: subspace at ``blocks.0.attn.q_proj.in``; up:
  ``blocks.0.mlp.up.in``). The subspaces are re-estimated every ``reestimate_every`` steps (swapped into
  the optimizer state with ``optax.tree_utils.tree_set``: no recompilation), so a failure cannot be
  blamed on a stale direction — only on where the projection acts.
* ``project_all_layers`` — the same at every dense layer (q/k/v, o, up, down of every block, and the tied
  unembedding's input), plus the token embedding table on its input side: its input is a one-hot token,
  and the cue's direction there is the class-mean difference of one-hot cue tokens, so the two cue
  embeddings can only move together.
* ``project_all_but_embedding`` — ``project_all_layers`` without the embedding table: is the embedding
  the route the cue takes when every dense layer is blocked?
* ``caft`` — ``ids.shaping.caft``: during training only, the cue subspace (found once, at initialisation,
  as CAFT finds its concept directions before fine-tuning) is ablated from the residual stream entering
  the first block and leaving every block.
* ``caft_reestimated`` — the same with the subspaces re-found every ``reestimate_every`` steps on the
  current model (the training hooks are an argument of the compiled step: swapping them is free).
* ``preventative_steering`` — ``ids.shaping.preventative_steering``: during training only, the cue's
  direction ``v`` (class-mean difference of ``s`` at the cue position of the middle residual stream, at
  initialisation; scaled to ``steering_scale`` × that site's mean residual norm at the answer position) is
  added at the answer position with the sign of each row's cue, ``±v``: the concept the gradient would
  otherwise build is supplied for free, so the weights need not build it. (The per-row sign is the
  conditional analogue of Chen et al.'s constant persona vector: the unwanted behaviour here is
  "answer = cue", not a constant trait.)
* ``gradient_routing`` — ``ids.shaping.gradient_routing`` (Expand, Route, Ablate): head 0 of every block
  is the designated "cue region". At the cue position, gradient flows through the keys and values of
  head 0 only (``Route`` on ``blocks.*.attn.k`` / ``attn.v``), so only that head's weights learn from the
  cue token; at inference that head's value at the cue position is ablated (zeroed). This arm is the one
  evaluated *with* an inference-time intervention: the ablation is part of the method.
* ``control_decorrelated`` — plain training on rows where ``s`` is independent of ``y``: the upper bound.

Metrics (``results/dont_fight_backprop/metrics.json``; ``<arm>`` as above; each ``*_mean`` has a
``*_std``, the sample standard deviation over seeds):
  <arm>.id_acc_mean                  answer accuracy on held-out training-distribution rows (s = y)
  <arm>.ood_acc_mean / _std          answer accuracy against the true label y on rows with s independent
  <arm>.ood_cue_follow_mean          share of OOD answers equal to the cue s (1.0 = reads only the cue)
  <arm>.spurious_probe_acc_layer{l}  held-out accuracy of a logistic probe for s on the residual stream at
                                     the answer position, layer l (0 = embeddings, l = after block l),
                                     on concept rows (s independent of y), fitted on the model as deployed
  <arm>.spurious_probe_acc_max_layer max over layers of the above (mean over seeds of each seed's max):
                                     does the concept reach the answer position anywhere?
  reference.cue_only_ood_acc         OOD accuracy of the rule "answer = cue" (≈ 0.5)
  Continual learning (task A = majority with the cue uninformative; task B = class of the first body token,
  another query token, same answer tokens; B trained after A from the same A model):
  continual.acc_a_after_a            A accuracy after training A
  plain.forgetting_a, gpm.forgetting_a   acc_A(after A) − acc_A(after B); plain AdamW vs GPM (every dense
                                     layer's updates projected off the span of A's input activations,
                                     ``ids.subspaces.from_activations(energy=gpm_energy)``; the unembedding
                                     too, so the tied embeddings are protected; biases and norms are free)
  plain.acc_b, gpm.acc_b             B accuracy after training B (the price of protection)
  gpm.protected_fraction             mean over layers of (subspace rank / input width)
  minutes, n_seeds, config.*

Run: ``python -m experiments.dont_fight_backprop --quick`` (CPU, ≈ 3 min on 2 idle cores) or ``--full`` (GPU).
"""

from __future__ import annotations

import dataclasses
import time
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
from experiments import _common  # noqa: E402
from experiments import _spurious as sp  # noqa: E402
from idesign import shaping  # noqa: E402
from idesign.optim import projection  # noqa: E402

NAME = "dont_fight_backprop"
ARMS: tuple[str, ...] = ("plain", "project_one_layer", "project_all_layers", "project_all_but_embedding", "caft",
                         "caft_reestimated", "preventative_steering", "gradient_routing", "control_decorrelated")


@dataclasses.dataclass(frozen=True)
class Config:
    n_body: int = 7                 # body tokens (odd)
    n_class_tokens: int = 4         # token ids per class
    max_margin: int = 3             # |#A - #B| at most this (near ties make majority slow to learn)
    n_train: int = 4096
    n_test: int = 1024              # each of the ID and OOD test sets
    n_concept: int = 512            # cue-labelled rows (s independent of y): half find directions and fit
                                    # the measuring probes, half score those probes
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    batch_size: int = 64
    steps: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    reestimate_every: int = 50      # steps between re-estimations (projection arms, caft_reestimated)
    steering_scale: float = 1.0     # preventative steering strength, in units of the site's mean residual norm
    probe_C: float = 1.0            # inverse L2 strength of the measuring logistic probes
    continual_steps: int = 400      # steps of task A, then of task B
    gpm_energy: float = 0.97
    arms: tuple[str, ...] = ARMS
    continual: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Config()
FULL = Config(n_body=15, n_class_tokens=8, max_margin=3, n_train=65536, n_test=4096, n_concept=2048, d_model=128,
              n_layers=4, n_heads=4, batch_size=128, steps=4000, learning_rate=1e-3, reestimate_every=250,
              continual_steps=3000, seeds=(0, 1, 2, 3, 4))


# ----------------------------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Setup:
    """Everything an arm needs for one seed: the task, the model, its initial parameters and the data."""

    config: Config
    spec: sp.TaskSpec
    apply: Any
    init_params: Any
    train: dict[str, np.ndarray]
    train_decorrelated: dict[str, np.ndarray]
    test_id: dict[str, np.ndarray]
    test_ood: dict[str, np.ndarray]
    concept_fit: dict[str, np.ndarray]
    concept_eval: dict[str, np.ndarray]
    seed: int


def task_spec(config: Config) -> sp.TaskSpec:
    return sp.TaskSpec(n_body=config.n_body, n_class_tokens=config.n_class_tokens, max_margin=config.max_margin)


def model_config(config: Config, spec: sp.TaskSpec) -> ids.TransformerConfig:
    return ids.TransformerConfig(vocab_size=spec.vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                                 n_heads=config.n_heads, max_len=spec.seq_len)


_APPLY: dict[ids.TransformerConfig, Any] = {}


def make_setup(config: Config, seed: int) -> Setup:
    spec = task_spec(config)
    model = model_config(config, spec)
    apply, params = ids.init_transformer(model, seed=seed)
    # One apply object per architecture: jitted functions keyed on it then compile once for every seed.
    apply = _APPLY.setdefault(model, apply)
    rows = lambda n, k, corr: sp.make_rows(spec, n, 1000 * seed + k, correlation=corr)
    concept = rows(config.n_concept, 5, "independent")
    half = config.n_concept // 2
    return Setup(config, spec, apply, params, train=rows(config.n_train, 1, "train"),
                 train_decorrelated=rows(config.n_train, 2, "independent"), test_id=rows(config.n_test, 3, "train"),
                 test_ood=rows(config.n_test, 4, "independent"),
                 concept_fit={k: v[:half] for k, v in concept.items()},
                 concept_eval={k: v[half:] for k, v in concept.items()}, seed=seed)


def adamw(config: Config) -> optax.GradientTransformation:
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


def make_step(apply: Any, optimizer: optax.GradientTransformation) -> Callable:
    """A jitted ``step(state, batch, training_hooks)``.

    The training hooks are an *argument*: their bases and directions are traced leaves, so one
    compilation serves every seed and every re-estimated basis. The projection transforms read their
    subspaces from the optimizer state, so the same holds for them.
    """

    def step(state, batch, training_hooks):
        inner = ids.make_train_step(ids.lm_loss(apply, hooks=training_hooks), optimizer, jit=False)
        return inner(state, batch)

    return jax.jit(step)


def batches(rows: Mapping[str, np.ndarray], config: Config, seed: int):
    return ids.train.iterate_batches({k: rows[k] for k in ("tokens", "loss_mask", "s")}, config.batch_size,
                                     seed=seed)


# ------------------------------------------------------------------------------ the cue's directions

def observed_sites(config: Config) -> list[str]:
    """Every site an arm or a measurement reads: the residual stream and every dense layer's input."""
    sites = residual_sites(config)
    for i in range(config.n_layers):
        sites += [f"blocks.{i}.attn.q_proj.in", f"blocks.{i}.attn.o_proj.in", f"blocks.{i}.mlp.up.in",
                  f"blocks.{i}.mlp.down.in"]
    return sites + ["unembed.in"]


def cue_and_answer_acts(setup: Setup, params: Any, rows: Mapping[str, np.ndarray],
                        hooks: Any = None) -> dict[str, np.ndarray]:
    """``{site: [n, 2, d]}``: activations at the cue position and at the answer position of every observed site.

    One capture of all observed sites serves every caller, so the forward pass compiles once (per hooks).
    """
    n = len(rows["s"])
    pos = np.tile(np.asarray([sp.CUE_POSITION, setup.spec.seq_len - 2], np.int32), (n, 1))
    return ids.collect_activations(setup.apply, params, {"tokens": rows["tokens"][:, :-1]},
                                   observed_sites(setup.config), batch_size=256, positions=pos, progress=False,
                                   hooks=hooks)


def cue_subspaces(setup: Setup, params: Any, sites: Sequence[str]) -> dict[str, ids.subspaces.Subspace]:
    """Per site, the span of the cue's mass-mean directions at the cue position and at the answer position.

    A mass-mean probe's direction is the class-mean difference ``mean(h | s=1) - mean(h | s=0)`` (on the
    concept rows). It is the direction to *remove*: where the cue moves the activation. A standardised
    logistic probe's weights are a read-out direction, which can be far from it (with two distinct cue
    embeddings, ``w ∝ sign(δ) / |δ|`` elementwise instead of ``δ``). The first block's attention input is
    probed at the cue position only: before any attention the answer position holds the same
    activation in every row.
    """
    rows = setup.concept_fit
    acts = cue_and_answer_acts(setup, params, rows)
    out = {}
    for site in sites:
        which = (0,) if site == "blocks.0.attn.q_proj.in" else (0, 1)
        diffs = [acts[site][rows["s"] == 1, k].mean(0) - acts[site][rows["s"] == 0, k].mean(0) for k in which]
        out[site] = ids.subspaces.from_directions(np.stack(diffs))
    return out


def probe_accuracy_by_layer(setup: Setup, params: Any, hooks: Any = None) -> list[float]:
    """Held-out accuracy of a logistic probe for the cue on the residual stream at the answer position, layers 0..L.

    Fitted on the concept rows' first half, scored on the second (both have ``s`` independent of ``y``),
    on the model as deployed (with ``hooks``, for the arm that ablates at inference).
    """
    sites = residual_sites(setup.config)
    fit = cue_and_answer_acts(setup, params, setup.concept_fit, hooks)
    ev = cue_and_answer_acts(setup, params, setup.concept_eval, hooks)
    stack = ids.probes.fit_many(np.stack([fit[site][:, 1] for site in sites]), setup.concept_fit["s"],
                                C=setup.config.probe_C)
    out = []
    for i, site in enumerate(sites):
        probe = jax.tree.map(lambda x: x[i], stack)
        logits = np.asarray(ids.probes.score(probe, ev[site][:, 1]))
        out.append(float(((logits > 0) == setup.concept_eval["s"]).mean()))
    return out


def residual_sites(config: Config) -> list[str]:
    return ["blocks.0.resid_pre"] + [f"blocks.{i}.resid_post" for i in range(config.n_layers)]


def first_layer_projection(config: Config) -> dict[str, list[str]]:
    """``{activation site: dense layers that read it}`` for the first block (its input side)."""
    return {"blocks.0.attn.q_proj.in": [f"blocks.0.attn.{p}_proj" for p in "qkv"],
            "blocks.0.mlp.up.in": ["blocks.0.mlp.up"]}


def all_layer_projection(config: Config) -> dict[str, list[str]]:
    out = {}
    for i in range(config.n_layers):
        b = f"blocks.{i}"
        out[f"{b}.attn.q_proj.in"] = [f"{b}.attn.{p}_proj" for p in "qkv"]
        out[f"{b}.attn.o_proj.in"] = [f"{b}.attn.o_proj"]
        out[f"{b}.mlp.up.in"] = [f"{b}.mlp.up"]
        out[f"{b}.mlp.down.in"] = [f"{b}.mlp.down"]
    out["unembed.in"] = ["unembed"]   # the read-out: tied, so the embedding table's model-width side
    return out


def projection_tree(setup: Setup, params: Any, layout: Mapping[str, list[str]], *, embedding: bool = False) -> Any:
    """Subspace tree for ``projected``: each layer in ``layout`` gets the cue subspace of the site it reads.

    ``embedding=True`` also protects the token embedding table on its input (vocabulary) side: its input
    is a one-hot token, and the cue's direction there is the class-mean difference of the one-hot tokens
    at the cue position (``e_cue1 - e_cue0``), so the two cue embeddings cannot move apart.
    """
    subs = cue_subspaces(setup, params, list(layout))
    spec: dict[str, Any] = {layer: subs[site] for site, layers in layout.items() for layer in layers}
    if embedding:
        rows = setup.concept_fit
        onehot = np.eye(setup.spec.vocab_size, dtype=np.float32)[rows["tokens"][:, sp.CUE_POSITION]]
        spec["embed.embedding"] = ids.subspaces.from_class_means(onehot, rows["s"])
    return projection.subspaces_for(params, spec, dense_layers=setup.apply.dense_layers)


# ------------------------------------------------------------------------------------------------ arms

_STEPS: dict[tuple, Callable] = {}


def _step_for(setup: Setup, key: str, optimizer: optax.GradientTransformation) -> Callable:
    # One compiled step per (arm, architecture, optimizer settings), reused across seeds and configs.
    c = setup.config
    k = (key, model_config(c, setup.spec), c.learning_rate, c.weight_decay)
    if k not in _STEPS:
        _STEPS[k] = make_step(setup.apply, optimizer)
    return _STEPS[k]


def _train(setup: Setup, state: ids.TrainState, step: Callable, rows: Mapping[str, np.ndarray], num_steps: int,
           hooks_for: Callable[[dict], Any], *, on_chunk: Callable | None = None, every: int | None = None,
           seed_offset: int = 0) -> ids.TrainState:
    it = batches(rows, setup.config, setup.seed + seed_offset)
    fn = lambda s, b: step(s, {k: b[k] for k in ("tokens", "loss_mask")}, hooks_for(b))
    every = every or num_steps
    done = 0
    while done < num_steps:
        n = min(every, num_steps - done)
        state, _ = ids.train.train(state, fn, it, num_steps=n, log_every=n, progress=False)
        done += n
        if on_chunk is not None and done < num_steps:
            state = on_chunk(state)
    return state


def run_arm(arm: str, setup: Setup) -> tuple[Any, Any]:
    """Trains one arm for one seed; returns ``(params, inference_hooks)`` (hooks only for gradient routing)."""
    c, params = setup.config, setup.init_params
    none = lambda batch: None
    if arm in ("plain", "control_decorrelated"):
        opt = adamw(c)
        step = _step_for(setup, "plain", opt)
        rows = setup.train if arm == "plain" else setup.train_decorrelated
        return _train(setup, ids.init_train_state(params, opt), step, rows, c.steps, none).params, None

    if arm in ("project_one_layer", "project_all_layers", "project_all_but_embedding"):
        layout = first_layer_projection(c) if arm == "project_one_layer" else all_layer_projection(c)
        everywhere = arm == "project_all_layers"
        opt = projection.projected(adamw(c), projection_tree(setup, params, layout, embedding=everywhere))
        step = _step_for(setup, arm, opt)

        def reestimate(state):
            tree = projection_tree(setup, state.params, layout, embedding=everywhere)
            return state._replace(opt_state=optax.tree_utils.tree_set(state.opt_state, subspaces=tree))

        state = _train(setup, ids.init_train_state(params, opt), step, setup.train, c.steps, none,
                       on_chunk=reestimate, every=c.reestimate_every)
        return state.params, None

    if arm in ("caft", "caft_reestimated"):
        sites = caft_sites(c)
        current = [shaping.caft(cue_subspaces(setup, params, sites))]

        def reestimate(state):
            # probed on the model as it runs at inference (no ablation): where the cue lives now
            bases = cue_subspaces(setup, state.params, sites)
            current[0] = shaping.caft(bases)
            return state

        opt = adamw(c)
        step = _step_for(setup, "caft", opt)
        state = _train(setup, ids.init_train_state(params, opt), step, setup.train, c.steps, lambda b: current[0],
                       on_chunk=reestimate if arm == "caft_reestimated" else None, every=c.reestimate_every)
        return state.params, None

    if arm == "preventative_steering":
        site = steering_site(c)
        direction, norm = steering_vector(setup, params, site)
        opt = adamw(c)
        step = _step_for(setup, arm, opt)
        t_in = setup.spec.seq_len - 1
        at_answer = np.zeros((1, t_in, 1), np.float32)
        at_answer[:, -1] = 1.0

        def hooks_for(batch):
            sign = (2.0 * batch["s"] - 1.0).astype(np.float32)[:, None, None]
            return shaping.preventative_steering({site: direction}, scale=c.steering_scale * norm * sign * at_answer)

        return _train(setup, ids.init_train_state(params, opt), step, setup.train, c.steps, hooks_for).params, None

    if arm == "gradient_routing":
        th = routing_hooks(setup)
        opt = adamw(c)
        step = _step_for(setup, arm, opt)
        params = _train(setup, ids.init_train_state(params, opt), step, setup.train, c.steps, lambda b: th).params
        return params, routing_ablation(setup)

    raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}.")


def caft_sites(config: Config) -> list[str]:
    """The residual stream entering the first block and leaving every block."""
    return residual_sites(config)


def steering_site(config: Config) -> str:
    return f"blocks.{max(config.n_layers // 2 - 1, 0)}.resid_post"


def steering_vector(setup: Setup, params: Any, site: str) -> tuple[np.ndarray, float]:
    """Unit class-mean difference of the cue at the cue position, and the site's mean residual norm at the answer."""
    rows = setup.concept_fit
    acts = cue_and_answer_acts(setup, params, rows)[site]
    direction = ids.subspaces.from_class_means(acts[:, 0], rows["s"]).basis[0]
    norm = float(np.linalg.norm(acts[:, 1], axis=-1).mean())
    return np.asarray(direction), norm


def _routing_mask(setup: Setup) -> np.ndarray:
    """``[1, T, H, 1]``: 0 for the non-designated heads at the cue position, 1 everywhere else."""
    c = setup.config
    m = np.ones((1, setup.spec.seq_len - 1, c.n_heads, 1), np.float32)
    m[:, sp.CUE_POSITION, 1:] = 0.0
    return m


_ROUTING: dict[tuple, shaping.TrainingHooks] = {}


def routing_hooks(setup: Setup) -> shaping.TrainingHooks:
    """Route on the keys and values of every block: at the cue position only head 0 passes gradient."""
    # Cached per shape so the static masks function is the same object for every seed (one compilation).
    key = (setup.spec.seq_len, setup.config.n_heads)
    if key not in _ROUTING:
        mask = jnp.asarray(_routing_mask(setup))
        _ROUTING[key] = shaping.gradient_routing(lambda batch: {"blocks.*.attn.k": mask, "blocks.*.attn.v": mask})
    return _ROUTING[key]


def routing_ablation(setup: Setup) -> dict:
    """Inference hooks: zero the designated head's value at the cue position (the routed region)."""
    region = np.zeros((1, setup.spec.seq_len - 1, setup.config.n_heads, 1), bool)
    region[:, sp.CUE_POSITION, 0] = True
    return {"blocks.*.attn.v": ids.Replace(jnp.zeros((), jnp.float32), jnp.asarray(region))}


def evaluate_arm(setup: Setup, params: Any, hooks: Any) -> dict[str, float]:
    spec = setup.spec
    row = {"id_acc": sp.accuracy(setup.apply, params, setup.test_id, spec, hooks=hooks),
           "ood_acc": sp.accuracy(setup.apply, params, setup.test_ood, spec, hooks=hooks),
           "ood_cue_follow": sp.accuracy(setup.apply, params, setup.test_ood, spec, target="s", hooks=hooks)}
    by_layer = probe_accuracy_by_layer(setup, params, hooks)
    row.update({f"spurious_probe_acc_layer{l}": a for l, a in enumerate(by_layer)})
    row["spurious_probe_acc_max_layer"] = max(by_layer)
    return row


# ---------------------------------------------------------------------------------------- continual

def continual(setup: Setup) -> dict[str, float]:
    """Task A (majority, cue uninformative) then task B (first token's class): forgetting of A, plain vs GPM."""
    c, spec = setup.config, setup.spec
    seed = setup.seed
    task_a = sp.make_rows(spec, c.n_train, 1000 * seed + 11, correlation="independent")
    task_b = sp.make_rows(spec, c.n_train, 1000 * seed + 12, correlation="independent", task="first")
    test_a = sp.make_rows(spec, c.n_test, 1000 * seed + 13, correlation="independent")
    test_b = sp.make_rows(spec, c.n_test, 1000 * seed + 14, correlation="independent", task="first")
    none = lambda batch: None
    opt = adamw(c)
    step = _step_for(setup, "plain", opt)
    params_a = _train(setup, ids.init_train_state(setup.init_params, opt), step, task_a, c.continual_steps, none,
                      seed_offset=1).params
    acc_a0 = sp.accuracy(setup.apply, params_a, test_a, spec)
    out = {"acc_a_after_a": acc_a0}

    plain_b = _train(setup, ids.init_train_state(params_a, opt), step, task_b, c.continual_steps, none,
                     seed_offset=2).params
    out["plain.acc_b"] = sp.accuracy(setup.apply, plain_b, test_b, spec)
    out["plain.forgetting_a"] = acc_a0 - sp.accuracy(setup.apply, plain_b, test_a, spec)

    tree, fraction = gpm_tree(setup, params_a, task_a)
    gpm_opt = projection.projected(adamw(c), tree, others="zero")
    gpm_step = _step_for(setup, "gpm", gpm_opt)
    gpm_b = _train(setup, ids.init_train_state(params_a, gpm_opt), gpm_step, task_b, c.continual_steps, none,
                   seed_offset=2).params
    out["gpm.acc_b"] = sp.accuracy(setup.apply, gpm_b, test_b, spec)
    out["gpm.forgetting_a"] = acc_a0 - sp.accuracy(setup.apply, gpm_b, test_a, spec)
    out["gpm.protected_fraction"] = fraction
    return out


def gpm_tree(setup: Setup, params: Any, task_a: Mapping[str, np.ndarray], n_rows: int = 256) -> tuple[Any, float]:
    """GPM: per layer, the principal subspace (energy threshold) of task A's inputs to it, over all positions.

    Dense layers use their input activations (``<layer>.in``). The token and position embeddings are
    lookups whose input is a one-hot vector, so their protected subspace is spanned by the one-hots of
    the tokens (positions) task A uses; with the tied unembedding the table is protected on both sides.
    Biases and norm parameters see a constant input, which is always in A's span, so they are frozen
    (the projection's ``others="zero"``).
    """
    layers = list(setup.apply.dense_layers)
    sites = [f"{layer}.in" for layer in layers]
    tokens = task_a["tokens"][:n_rows, :-1]
    acts = ids.collect_activations(setup.apply, params, {"tokens": tokens}, sites, batch_size=256, progress=False)
    energy = setup.config.gpm_energy
    subs = {layer: ids.subspaces.from_activations(acts[f"{layer}.in"], energy=energy) for layer in layers}
    vocab, length = setup.spec.vocab_size, tokens.shape[1]
    lookups = {"embed.embedding": np.eye(vocab, dtype=np.float32)[tokens],
               "pos_embed.embedding": np.broadcast_to(np.eye(setup.spec.seq_len, dtype=np.float32)[:length],
                                                      (len(tokens), length, setup.spec.seq_len))}
    fraction = float(np.mean([s.rank / s.dim for s in subs.values()]))
    spec: dict[str, Any] = dict(subs)
    for path, onehot in lookups.items():
        spec[path] = ids.subspaces.from_activations(onehot, energy=energy)
    tree = projection.subspaces_for(params, spec, dense_layers=setup.apply.dense_layers)
    return tree, fraction


# ------------------------------------------------------------------------------------- report, main

LABELS = {"plain": "plain", "project_one_layer": "project\none layer", "project_all_layers": "project\nall layers",
          "project_all_but_embedding": "project all\nbut embed.",
          "caft": "CAFT", "caft_reestimated": "CAFT\nre-estimated", "preventative_steering": "preventative\nsteering",
          "gradient_routing": "gradient\nrouting",
          "control_decorrelated": "control\n(decorrelated)"}


def plot(metrics: dict[str, float], config: Config, out_dir) -> None:
    arms = list(config.arms)
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    ax.bar(x - 0.2, [metrics[f"{a}.id_acc_mean"] for a in arms], 0.4, yerr=[metrics[f"{a}.id_acc_std"] for a in arms],
           label="in distribution (cue = label)", color="tab:gray", capsize=3)
    ax.bar(x + 0.2, [metrics[f"{a}.ood_acc_mean"] for a in arms], 0.4,
           yerr=[metrics[f"{a}.ood_acc_std"] for a in arms], label="OOD (cue independent)", color="tab:blue", capsize=3)
    ax.axhline(metrics["reference.cue_only_ood_acc"], ls="--", c="k", lw=1, label="OOD of 'answer = cue'")
    ax.set_xticks(x, [LABELS.get(a, a) for a in arms], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="answer accuracy",
           title=f"Accuracy per arm ({int(metrics['n_seeds'])} seeds, mean ± sd)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "ood_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    layers = np.arange(config.n_layers + 1)
    for a in arms:
        means = [metrics[f"{a}.spurious_probe_acc_layer{l}"] for l in layers]
        stds = [metrics[f"{a}.spurious_probe_acc_layer{l}_std"] for l in layers]
        ax.errorbar(layers, means, yerr=stds, marker="o", capsize=3, label=LABELS.get(a, a).replace("\n", " "))
    ax.axhline(0.5, ls=":", c="k", lw=1)
    ax.set_xticks(layers, ["embed"] + [f"block {i}" for i in range(config.n_layers)])
    ax.set(ylim=(0.4, 1.02), ylabel="held-out probe accuracy for the cue",
           title="Is the cue decodable at the answer position?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "spurious_probe_by_layer.png", dpi=120)
    plt.close(fig)


def plot_continual(metrics: dict[str, float], out_dir) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    keys = [("forgetting_a", "forgetting of A"), ("acc_b", "accuracy on B")]
    for j, arm in enumerate(("plain", "gpm")):
        ax.bar(np.arange(2) + (j - 0.5) * 0.4, [metrics[f"{arm}.{k}"] for k, _ in keys], 0.4,
               yerr=[metrics[f"{arm}.{k}_std"] for k, _ in keys], capsize=3, label=arm)
    ax.set_xticks(range(2), [label for _, label in keys])
    ax.set(ylim=(0, 1.05), title="Task A then task B")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "continual.png", dpi=120)
    plt.close(fig)


def _metric_name(key: str) -> str:
    """Per-seed row key -> metrics key: ``id_acc`` -> ``id_acc_mean`` (``_std`` kept); probe keys unchanged."""
    if key.startswith("spurious_probe_acc"):
        return key
    return key if key.endswith("_std") else key + "_mean"


def _pm(metrics: Mapping[str, float], arm: str, name: str) -> str:
    return f"{metrics[f'{arm}.{name}_mean']:.3f} ± {metrics[f'{arm}.{name}_std']:.3f}"


def verdict(metrics: dict[str, float], arm: str) -> str:
    """Describes an arm by the share of the plain → control OOD gap it closes (thresholds 0.25 / 0.75).

    Without those arms in the run, the bottom is the "answer = cue" rule and the top is 1.0.
    """
    plain = metrics.get("plain.ood_acc_mean", metrics["reference.cue_only_ood_acc"])
    ood = metrics[f"{arm}.ood_acc_mean"]
    top = metrics.get("control_decorrelated.ood_acc_mean", 1.0)
    if top - plain < 0.05:
        # Plain training already generalises (tiny configs do): there is no gap for an arm to close.
        return (f"cannot be judged (plain OOD {plain:.3f} is within 0.05 of the control's {top:.3f}: "
                "no spurious shortcut was learned)")
    closed = (ood - plain) / (top - plain)
    word = "works" if closed >= 0.75 else "partly works" if closed >= 0.25 else "fails"
    return f"{word} (closes {closed:.0%} of the plain → control OOD gap)"


def conclusion(metrics: dict[str, float], config: Config) -> str:
    lines = []
    for arm in config.arms:
        if arm in ("plain", "control_decorrelated"):
            continue
        probe = metrics[f"{arm}.spurious_probe_acc_max_layer"]
        cue = metrics[f"{arm}.ood_cue_follow_mean"]
        where = "not decodable" if probe < 0.75 else "decodable but not used" if cue < 0.6 else "still decodable"
        idn = metrics[f"{arm}.id_acc_mean"]
        lines.append(f"- **{arm}** {verdict(metrics, arm)}: OOD {_pm(metrics, arm, 'ood_acc')}, "
                     f"follows the cue on {cue:.0%} of OOD rows, ID {idn:.2f}; the cue is {where} at the answer "
                     f"position (best layer's probe {probe:.2f}).")
    shaped = [a for a in config.arms if a not in ("plain", "control_decorrelated")]
    if "plain" in config.arms:
        working = [a for a in shaped if verdict(metrics, a).startswith("works")]
        lines.append(f"Arms that work (close ≥ 75% of the OOD gap): {', '.join(working) if working else 'none'}.")
    if "project_one_layer" in config.arms:
        head = verdict(metrics, "project_one_layer").split(" (")[0]
        lines.insert(0, f"Projection at one layer {head}.")
    if "plain" in config.arms:
        lines.insert(1 if lines and not lines[0].startswith("-") else 0,
                     f"Plain training follows the cue on {metrics['plain.ood_cue_follow_mean']:.0%} of OOD rows "
                     f"(OOD {_pm(metrics, 'plain', 'ood_acc')}; 'answer = cue' scores "
                     f"{metrics['reference.cue_only_ood_acc']:.3f}).")
    return "\n".join(lines)


def continual_conclusion(metrics: dict[str, float]) -> str:
    pf, gf = metrics["plain.forgetting_a"], metrics["gpm.forgetting_a"]
    pb, gb = metrics["plain.acc_b"], metrics["gpm.acc_b"]
    less = "less" if gf < pf else "no less"
    return (f"GPM forgets {less} of task A than plain training (forgetting {gf:.3f} vs {pf:.3f}) and reaches "
            f"{gb:.3f} on task B vs {pb:.3f}, protecting {metrics['gpm.protected_fraction']:.0%} of each layer's "
            "input space on average.")


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"Config.arms: unknown {unknown}; expected a subset of {ARMS}.")
    per_arm: dict[str, list[dict[str, float]]] = {a: [] for a in config.arms}
    per_seed_continual, reference = [], []
    for seed in config.seeds:
        setup = make_setup(config, seed)
        reference.append(float((setup.test_ood["s"] == setup.test_ood["y"]).mean()))
        for arm in config.arms:
            ta = time.perf_counter()
            params, hooks = run_arm(arm, setup)
            per_arm[arm].append(evaluate_arm(setup, params, hooks))
            if progress:
                r = per_arm[arm][-1]
                print(f"[{NAME}] seed {seed} {arm:22s} id {r['id_acc']:.3f} ood {r['ood_acc']:.3f} "
                      f"cue {r['ood_cue_follow']:.3f} probe {r['spurious_probe_acc_max_layer']:.3f} "
                      f"({time.perf_counter() - ta:.1f}s)", flush=True)
        if config.continual:
            per_seed_continual.append(continual(setup))
            if progress:
                print(f"[{NAME}] seed {seed} continual {per_seed_continual[-1]}", flush=True)

    metrics: dict[str, float] = {}
    for arm, rows in per_arm.items():
        for key, value in _common.aggregate_seeds(rows).items():
            if key != "n_seeds":
                metrics[f"{arm}.{_metric_name(key)}"] = value
    metrics["reference.cue_only_ood_acc"] = float(np.mean(reference))
    if per_seed_continual:
        for key, value in _common.aggregate_seeds(per_seed_continual).items():
            if key != "n_seeds":
                metrics[key if "." in key.replace("_std", "") else f"continual.{key}"] = value
    metrics["n_seeds"] = len(config.seeds)
    metrics["minutes"] = (time.perf_counter() - t0) / 60

    out = _common.results_dir(NAME)
    _common.write_metrics(NAME, {**metrics, **{f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()}})
    plot(metrics, config, out)
    rows = [(arm, _pm(metrics, arm, "id_acc"), _pm(metrics, arm, "ood_acc"),
             f"{metrics[f'{arm}.ood_cue_follow_mean']:.3f}", f"{metrics[f'{arm}.spurious_probe_acc_max_layer']:.3f}")
            for arm in config.arms]
    continual_text = ""
    if per_seed_continual:
        plot_continual(metrics, out)
        crow = [(arm, _common.pm(metrics, f"{arm}.forgetting_a"), _common.pm(metrics, f"{arm}.acc_b"))
                for arm in ("plain", "gpm")]
        continual_text = f"""
### Continual learning: task A, then task B (A accuracy after A: {_common.pm(metrics, 'continual.acc_a_after_a')})

{_common.markdown_table(["arm", "forgetting of A", "accuracy on B"], crow)}

{continual_conclusion(metrics)}

![continual](continual.png)
"""
    _common.write_readme(NAME, f"""
## Don't fight backprop ({len(config.seeds)} seeds, {metrics['minutes']:.1f} min)

Hypothesis: projecting a spurious cue's direction out of one layer's updates does not stop the model
from using the cue; it re-emerges downstream. Cue and label agree in training and are independent at test.

{_common.markdown_table(["arm", "ID accuracy", "OOD accuracy", "OOD answers = cue", "cue probe, best layer"], rows)}

{conclusion(metrics, config)}

Config: {config.d_model}-wide, {config.n_layers}-layer transformer, {config.steps} steps of batch {config.batch_size};
{config.n_body} body tokens, margin ≤ {config.max_margin}; cue directions (mass-mean) from {config.n_concept // 2}
cue-labelled rows, re-estimated every {config.reestimate_every} steps in the arms that re-estimate.

![ood](ood_accuracy.png) ![probe](spurious_probe_by_layer.png)
{continual_text}""")
    return metrics


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
