"""Hallucination, a fair test: confident hallucinations, claim-level probes, RLFR-style rewards on a frozen teacher.

Hypotheses (RLFR, Prasad et al. 2026; Obeso et al. 2025; docs/methods.md §1-2): (a) a claim-level probe on the
frozen model's activations detects hallucinated claims better than output-confidence baselines when the
model's wrong answers are *confident*; (b) RL where the frozen teacher reads the student's completion and
the probe scores each claim reduces the true hallucination rate; (c) reading a frozen teacher (not the
student) keeps the student from gaming the probe; (d) injecting a retraction marker when a claim scores
above threshold reduces hallucination further; (e) best-of-N by the probe approaches best-of-N by truth.

World (:mod:`idesign.data.claim_world`): families of entities share home city, employer and birth decade
with probability ``family_share``; rare entities appear 1-3 times, unknown ones never, and their names
reuse known parts; values are multi-token (``san lisbon``, ``196 7``); QA prompts ask one attribute,
long-form prompts (``about NAME :``) get one sentence per attribute. Every claim is a token span labelled
from ground truth (supported = known entity and exactly the true value). Entities are split in half: probes
and RL use one half, every reported number the other (held out). The base model is pretrained once per
(config, seed) and cached (:func:`idesign.pretrain.cached`).

Fairness checks, measured first: ``base.confident_hallucination_share`` (share of the base model's
hallucinated greedy claims whose least-confident token has max-probability >= 0.5: entropy cannot win by
definition when this is high) and the oracle RL arm (ground-truth claim labels in the same reward) reaching
``hallucination_rate <= 0.6 x base`` with known accuracy within 5 points (``rl_oracle.meets_target``).

Probes (all on the same held-out claims of base samples, read on the frozen base): the span-max token probe
(:func:`idesign.probes.fit_span_probe`) over the claim's tokens and their prediction positions (reading
``"both"``), with ``C`` (L2 strength ``1 / (C n)``) and layer chosen by entity-grouped cross-validation on the
probe half; the attention probe over the same positions at the chosen layer. Baselines: mean predictive
entropy over the claim's tokens, max-probability (of its least confident token), mean and min token
log-probability, sampled consistency (``consistency_k`` samples of the claim from the same prefix, entropy
over the distinct values: the semantic-entropy analogue), and a logistic on those logit features.

Rewards (:func:`idesign.rl.claim_scores`, :func:`idesign.rl.slot_rewards`): the teacher prefills the
student's completion; each claim gets P(hallucinated) from the probe. A slot (an asked attribute) that ends
in a kept claim (maintained, or a correction after ``<retract>``) earns ``clip(1 - p, 0.1, 0.95)``; one that
ends retracted earns ``0.65 * clip(p(retracted claim) - lam, 0, 1)``; an unaddressed slot (or ``unknown`` without a claim) ``0.1``, what a sure hallucination earns. A completion
earns the mean over the slots its prompt asks (1 for QA, 4 for long-form) plus ``-0.2`` if malformed. ``lam``
holds the retraction rate at most ``retract_budget`` (0.4, RLFR's value, fixed before the first run; run 2's 0.3 was
chosen after run 1 failed and is reverted). ``lam`` is a PI multiplier (:func:`idesign.rl.retraction_multiplier`,
issue 13 h13): the integral term moves by ``lagrange_lr`` per step as before, and a proportional term on the
batch's *own* retraction rate, with the gain :func:`idesign.rl.retraction_gain` fixed from the reward
(``pi_overshoot`` = 0.1 above the budget removes any reward for retracting), penalises an overshoot in the step
it happens; the integral-only multiplier reacted ~10 steps late. Credit (``credit="slot"``, issue 13 diagnosis): each claim's tokens,
its retraction and its correction get the advantage of *their own slot's* reward (normalised over the group's
samples of the prompt), not the completion mean; with one advantage per completion a long-form answer's decision to
retract a claim was credited with the luck of its three other claims, and the oracle policy retracted right claims
at half the rate of wrong ones. The oracle arm uses the true
labels as ``p``; the live arm reads the student's own activations. Options measured but not in the preset
(``experiments/README.md``): ``retract_choice`` teaches the retraction decision by its expected value at every claim
(:func:`choice_advantages`), after the claim or also inside it, where a claim broken off by ``<retract>``
(:class:`idesign.data.claim_world.Cut`) ends its slot retracted with no label and no reward signal.

Arms (greedy on held-out prompts): ``base``; ``base_monitor`` (:class:`idesign.monitoring.ProbeMonitor`
scores each claim when it completes and injects ``<retract>`` above ``threshold``, at most ``max_events``
times); ``rl_oracle``, ``rl_frozen_probe``, ``rl_live_probe``; ``rl_frozen_probe_monitor``; ``bon_probe``
(best of ``bon_n`` base samples by probe reward; ``bon_oracle`` by true reward, the upper bound).

Metrics (``results/hallucination/metrics.json``; every key with ``_std`` over seeds, and ``n_seeds``):
  probe.auc, probe.attention_auc, probe.layer, probe.C, probe.cv_auc     held-out claim AUCs; CV choice
  probe.train_auc            the span-max probe on its own training claims (a representation limit if low)
  probe.familiarity_auc      a logistic reading "unknown entity" from the same claim windows (held-out entities)
  baselines.{entropy,maxprob,logprob,logprob_min,consistency,logit_features}_auc
  base.confidence_ceiling_hallucination_rate   lowest rate reachable by retracting the base's low-confidence
                             claims with known accuracy within 5 points (is the oracle target reachable at all?)
  base.confident_hallucination_share, base.n_eval_claims, probe.n_train_claims, probe.n_train_prompts
  <arm>.hallucination_rate   hallucinated final claims / asked slots (held-out prompts)
  <arm>.known_acc            supported final claims / asked slots of known entities
  <arm>.abstain_rate         slots that end retracted (or ``unknown``) / asked slots
  <arm>.retract_rate         claims followed by ``<retract>`` / claims made
  <arm>.probe_estimated_rate mean over slots of the probe's P(hallucinated) of the final claim (on the
                             student for rl_live_probe, the teacher otherwise; 0 where no claim is kept)
  <arm>.retract_rate_{supported,hallucinated}  retract rate among right / wrong claims (can it tell them apart?)
  <arm>.malformed_rate, <arm>.relative_reduction, rl_oracle.meets_target
  <rl arm>.probe_auc_on_student   probe AUC on the held-out claims read on the student's activations
  rl_live_probe.estimate_gap      probe_estimated_rate - hallucination_rate
  monitor.{precision,recall,fixed_share,retracted_share,still_wrong_share}
  bon_probe.hallucination_rate_at_{1,2,4,8,16}, bon_oracle.hallucination_rate_at_{1,2,4,8,16}
  minutes
Plots: ``arms.png``, ``rl_curves.png``, ``best_of_n.png``.

Run: ``python -m experiments.hallucination --quick`` (CPU) or ``--full`` (GPU; not run here).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import idesign as ids  # noqa: E402
from experiments import _common  # noqa: E402
from idesign import probes, rl  # noqa: E402
from idesign.data import claim_world as cw  # noqa: E402
from idesign.data.tokenizer import EOS_ID, PAD_ID, RETRACT_ID  # noqa: E402
from idesign.monitoring import ProbeMonitor  # noqa: E402

NAME = "hallucination"
ARMS = ("base", "base_monitor", "rl_oracle", "rl_frozen_probe", "rl_live_probe", "rl_frozen_probe_monitor",
        "bon_probe")
RL_ARMS = ("rl_oracle", "rl_frozen_probe", "rl_live_probe")
BON_NS = (1, 2, 4, 8, 16)
READING = "both"  # the prediction position and the claim's tokens (see idesign.probes.read_span)
KEPT, RETRACTED, NOTHING = 0, 1, 2
CREDITS = ("slot", "claim", "completion")
RETRACT_CHOICES = ("sampled", "expected", "within", "inside")
_VERSION = "5"  # bump when the study's code changes what a seed computes


@dataclasses.dataclass(frozen=True)
class Config:
    # World and base model (everything here keys the pretrain cache).
    n_known: int = 400
    n_unknown: int = 160
    n_families: int = 16
    n_first: int = 40
    family_share: float = 0.75
    marker_rate: float = 0.1  # random retractions in pretraining: the base model can explore retracting
    correction_rate: float | None = None  # claims written "wrong <retract> right|unknown" (None: marker_rate)
    # Claims broken off at random at each token in pretraining (claim_world.ClaimWorldConfig.cut_rate): the base's
    # <retract> logit then tracks its softmax's normaliser inside a claim.
    cut_rate: float = 0.0
    # Copies of the corpus with its random marks drawn anew (claim_world.ClaimWorldConfig.mark_passes): about as many
    # as pretraining makes epochs, so the base learns the marks as rates instead of memorising marked documents.
    mark_passes: int = 1
    # Named people the corpus says nothing about (every answer "unknown"): pressure to represent familiarity. Tried
    # at 240 (with n_families 24): familiarity stayed unreadable (probe AUC 0.53) and the probe no better; off.
    n_obscure: int = 0
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    batch_size: int = 32
    pretrain_steps: int = 1200
    learning_rate: float = 3e-3
    warmup: int = 50
    # Probes.
    probe_samples: int = 2
    probe_steps: int = 200
    probe_Cs: tuple[float, ...] = (1.0, 10.0)
    cv_folds: int = 2
    attention_steps: int = 200
    consistency_k: int = 6
    # Generation, monitor, best-of-N.
    max_new_tokens: int = 22
    gen_batch: int = 128
    threshold: float = 0.7
    max_events: int = 2
    bon_n: int = 16
    bon_prompts: int = 128
    # RL.
    # RL (issue 13 diagnosis, seed 0 oracle only: 24 steps at 5e-4 with one advantage per completion retracted
    # 27% of right claims and 50% of wrong ones; see experiments/README.md).
    rl_steps: int = 48
    prompts_per_step: int = 16
    group_size: int = 8
    rl_learning_rate: float = 2e-4
    rl_temperature: float = 1.0  # sampling temperature of the RL rollouts (0.5 measured on seed 2: no better)
    kl_coef: float = 0.1
    clip_eps: float = 0.2
    retract_budget: float = 0.4
    lagrange_lr: float = 0.2
    multiplier: str = "clip"  # how lam enters a retraction's reward (idesign.rl.ClaimRewardConfig)
    # The multiplier's proportional gain (issue 13, h13, fixed before the run): kp = rl.retraction_gain(reward,
    # pi_overshoot), so a batch retracting pi_overshoot above the budget gets, from the P term alone, the multiplier
    # at which retracting even a sure hallucination earns no more than keeping it. 0: integral only (runs 1-5).
    pi_overshoot: float = 0.1
    # "slot": each claim's tokens get its own slot's advantage; "completion": one per completion; "claim": a claim's
    # own tokens get its kept-claim quality, the retraction decision the slot's (slot_token_advantages; measured by
    # experiments.diag.hallucination_oracle, not the preset: see experiments/README.md).
    credit: str = "slot"
    # "sampled": the decision to retract after a claim learns from the sampled token like any other; "expected": it
    # gets the exact gradient of its expected reward, (reward if retracted - reward if kept) * grad pi(<retract>), at
    # every claim whichever way it was sampled (choice_advantages; idesign.rl.grpo_loss's choice term); "within": the
    # same, and breaking a claim off in place of any of its tokens is taught the same way; "inside": in place of any
    # but its first. Measured by experiments.diag.hallucination_oracle, not the preset (experiments/README.md).
    retract_choice: str = "sampled"
    choice_loss: str = "expected"  # how choice_advantages teach the decision (idesign.rl.GRPOConfig.choice_loss)
    choice_coef: float = 1.0  # the choice term's weight against the sampled policy gradient
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Config()
FULL = Config(n_known=600, n_unknown=240, n_families=30, d_model=256, n_layers=6, n_heads=8, seq_len=64,
              batch_size=64, pretrain_steps=20_000, learning_rate=1e-3, warmup=500, probe_samples=4, probe_steps=600,
              attention_steps=600, rl_steps=360, prompts_per_step=64, group_size=16, rl_learning_rate=1e-4,
              gen_batch=1024, bon_prompts=1024)

_BASE_FIELDS = ("n_known", "n_unknown", "n_families", "n_first", "family_share", "marker_rate", "correction_rate",
                "cut_rate", "mark_passes", "n_obscure", "seq_len",
                "d_model", "n_layers", "n_heads", "batch_size", "pretrain_steps", "learning_rate", "warmup")


def world_config(config: Config, seed: int) -> cw.ClaimWorldConfig:
    return cw.ClaimWorldConfig(n_known=config.n_known, n_unknown=config.n_unknown, n_families=config.n_families,
                               n_first=config.n_first, family_share=config.family_share,
                               marker_rate=config.marker_rate, correction_rate=config.correction_rate,
                               cut_rate=config.cut_rate, mark_passes=config.mark_passes,
                               n_obscure=config.n_obscure, seed=seed)


# ---------------------------------------------------------------------------------------------- task


class Task(NamedTuple):
    """The prompts as arrays (left-padded)."""

    prompts: np.ndarray  # [Q, P]
    valid: np.ndarray
    kind: np.ndarray     # [Q] "qa" / "bio"
    attribute: np.ndarray
    entity: np.ndarray
    unknown: np.ndarray  # [Q] bool

    def asked(self, rows) -> np.ndarray:
        """Slots each prompt asks for: 1 for QA, every attribute for long-form."""
        return np.where(self.kind[rows] == "qa", 1, len(cw.ATTRIBUTES))


def make_task(world: cw.ClaimWorld) -> Task:
    q = world.queries
    prompts, valid = ids.pad_tokens(q["prompt_ids"], pad_id=PAD_ID)
    return Task(prompts, valid, np.asarray(q["kind"]), np.asarray(q["attribute"]), np.asarray(q["entity_id"]),
                np.asarray(q["group"]) == "unknown")


class Claims(NamedTuple):
    """Every claim of a batch of completions, flat; spans index prompt + completion."""

    row: np.ndarray        # [C] completion row
    start: np.ndarray      # [C]
    end: np.ndarray        # [C] exclusive
    supported: np.ndarray  # [C] bool
    final: np.ndarray      # [C] bool: not retracted or corrected later
    retracted: np.ndarray  # [C] bool: followed by <retract>
    slot: np.ndarray       # [C] attribute index

    def select(self, keep) -> "Claims":
        return Claims(*(a[keep] for a in self))


class Parsed(NamedTuple):
    """Per completion: slot outcomes and claims (from :func:`idesign.data.claim_world.parse_completion`)."""

    outcome: np.ndarray    # [B, A] 0 supported, 1 hallucinated, 2 retracted, 3 not addressed
    malformed: np.ndarray  # [B] bool
    claims: Claims
    # Claims broken off by <retract> before they were complete (no label): [N, 4] row, start, end (prompt +
    # completion positions), slot; and [B, A] bool, the slot ends retracted by a cut (what it would have said is
    # unknown).
    cut_spans: np.ndarray | None = None
    cut_final: np.ndarray | None = None

    def retract_rate(self) -> float:
        """Retractions (after a claim, or breaking one off) per claim begun."""
        cuts = 0 if self.cut_spans is None else len(self.cut_spans)
        n = len(self.claims.row) + cuts
        return float((self.claims.retracted.sum() + cuts) / n) if n else 0.0


def parse_batch(world: cw.ClaimWorld, task: Task, rows, tokens: np.ndarray, valid: np.ndarray) -> Parsed:
    P, states = task.prompts.shape[1], {"supported": 0, "hallucinated": 1, "retracted": 2}
    outcome = np.full((len(rows), len(cw.ATTRIBUTES)), 3)
    malformed = np.zeros(len(rows), bool)
    cl = {k: [] for k in Claims._fields}
    cut_final, spans = np.zeros(outcome.shape, bool), []
    for b, q in enumerate(rows):
        p = cw.parse_completion(world, task.entity[q], task.kind[q], task.attribute[q], tokens[b, :valid[b].sum()])
        malformed[b] = p.malformed
        for cut in p.cuts:
            spans.append((b, P + cut.start, P + cut.end, cw.ATTRIBUTES.index(cut.attribute)))
            if p.outcome.get(cut.attribute) == "retracted" and not any(
                    c.attribute == cut.attribute and c.start > cut.start for c in p.claims):
                cut_final[b, cw.ATTRIBUTES.index(cut.attribute)] = True
        for a, state in p.outcome.items():
            outcome[b, cw.ATTRIBUTES.index(a)] = states[state]
        for c in p.claims:
            for k, v in zip(Claims._fields, (b, P + c.start, P + c.end, c.supported, c.final, not c.final,
                                             cw.ATTRIBUTES.index(c.attribute))):
                cl[k].append(v)
    claims = Claims(*(np.asarray(cl[k], bool if k in ("supported", "final", "retracted") else np.int64)
                      for k in Claims._fields))
    return Parsed(outcome, malformed, claims, np.asarray(spans, np.int64).reshape(-1, 4), cut_final)


def slot_metrics(prefix: str, parsed: Parsed, task: Task, rows, p_read=None) -> dict[str, float]:
    asked = task.asked(rows)
    unknown = task.unknown[rows]
    n_slots, n_known_slots = asked.sum(), asked[~unknown].sum()
    hall = (parsed.outcome == 1).sum(1)
    m = {f"{prefix}.hallucination_rate": hall.sum() / n_slots,
         f"{prefix}.known_acc": (parsed.outcome[~unknown] == 0).sum() / max(n_known_slots, 1),
         f"{prefix}.abstain_rate": (parsed.outcome == 2).sum() / n_slots,
         f"{prefix}.retract_rate": parsed.retract_rate(),
         f"{prefix}.malformed_rate": parsed.malformed.mean()}
    # Does the policy retract the claims it gets wrong rather than the ones it gets right? (issue 13 diagnosis)
    c = parsed.claims
    m[f"{prefix}.retract_rate_supported"] = c.retracted[c.supported].mean() if c.supported.any() else 0.0
    m[f"{prefix}.retract_rate_hallucinated"] = c.retracted[~c.supported].mean() if (~c.supported).any() else 0.0
    if p_read is not None:
        kept = parsed.claims.final
        m[f"{prefix}.probe_estimated_rate"] = np.nansum(p_read[kept]) / n_slots
    return {k: float(v) for k, v in m.items()}


def span_id_array(claims: Claims, shape) -> tuple[np.ndarray, int]:
    """``[B, T]`` claim ids (1-based, in order within each row) and the largest id."""
    ids_ = np.zeros(shape, np.int32)
    order = np.zeros(len(claims.row), np.int64)
    counts = {}
    for i, r in enumerate(claims.row):
        counts[r] = counts.get(r, 0) + 1
        order[i] = counts[r]
        ids_[r, claims.start[i]:claims.end[i]] = counts[r]
    return ids_, order


# ---------------------------------------------------------------------------------------------- runtime


def _pad_rows(x, n):
    x = np.asarray(x)
    return x if x.shape[0] == n else np.concatenate([x, np.repeat(x[:1], n - x.shape[0], axis=0)])


class Runtime:
    """Compiled functions shared by every seed and arm (one architecture: one compilation each)."""

    def __init__(self, config: Config, vocab_size: int):
        self.config = config
        self.model_config = ids.TransformerConfig(vocab_size=vocab_size, d_model=config.d_model,
                                                  n_layers=config.n_layers, n_heads=config.n_heads,
                                                  max_len=config.seq_len)
        self.apply, _ = ids.init_transformer(self.model_config, seed=0)
        apply = self.apply
        self.sites = tuple(f"blocks.{i}.resid_post" for i in range(config.n_layers))
        self.pretrain_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup, config.pretrain_steps),
            weight_decay=0.01))
        self.pretrain_step = ids.make_train_step(ids.lm_loss(apply), self.pretrain_opt)
        self.rl_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.rl_learning_rate))
        self.rl_step = rl.make_grpo_step(apply, self.rl_opt, rl.GRPOConfig(config.clip_eps, config.kl_coef,
                                                                           config.choice_loss))
        self.logprobs = jax.jit(lambda p, t, v: rl.token_logprobs(apply, p, t, v))
        self.capture = jax.jit(lambda p, t, v: apply(p, t, hooks=ids.capture(*self.sites), valid=v))
        reward = rl.ClaimRewardConfig(retract_budget=config.retract_budget, lagrange_lr=config.lagrange_lr,
                                      multiplier=config.multiplier)
        kp = rl.retraction_gain(reward, config.pi_overshoot) if config.pi_overshoot else 0.0
        self.reward = dataclasses.replace(reward, lagrange_kp=kp)

    def init_params(self, seed: int):
        return ids.init_transformer(self.model_config, seed=seed)[1]

    def generate(self, params, prompts, valid, *, key=None, monitor=None, max_new_tokens=None, temperature=1.0):
        """Completions in fixed-size batches (one compiled shape); greedy without ``key``."""
        G, N = self.config.gen_batch, max_new_tokens or self.config.max_new_tokens
        sampling = ids.SamplingConfig(temperature=temperature if key is not None else 0.0)
        parts = {k: [] for k in ("tokens", "valid", "fired")}
        for i in range(0, len(prompts), G):
            n = min(G, len(prompts) - i)
            out = ids.generate(self.apply, params, _pad_rows(prompts[i:i + G], G),
                               prompt_valid=_pad_rows(valid[i:i + G], G), max_new_tokens=N,
                               key=None if key is None else jax.random.fold_in(key, i), sampling=sampling,
                               eos_id=EOS_ID, pad_id=PAD_ID, monitor=monitor)
            parts["tokens"].append(np.asarray(out.tokens)[:n])
            parts["valid"].append(np.asarray(out.valid)[:n])
            if monitor is not None:
                parts["fired"].append(np.asarray(out.monitor_state.fired)[:n])
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    def forward(self, params, tokens, valid, sites=None):
        """Logits ``[B, T, V]`` and activations per site, in fixed-size chunks (numpy float32)."""
        G, n, sites = self.config.gen_batch, tokens.shape[0], sites or self.sites
        logits, acts = [], {s: [] for s in sites}
        for i in range(0, n, G):
            lg, cap = self.capture(params, jnp.asarray(_pad_rows(tokens[i:i + G], G)),
                                   jnp.asarray(_pad_rows(valid[i:i + G], G)))
            m = min(G, n - i)
            logits.append(np.asarray(lg[:m], np.float32))
            for s in sites:
                acts[s].append(np.asarray(cap[s][:m], np.float32))
        return np.concatenate(logits), {s: np.concatenate(a) for s, a in acts.items()}

    def claim_probs(self, params, probe, site, tokens, valid, claims: Claims) -> np.ndarray:
        """P(hallucinated) of each claim read by ``probe`` on ``params`` (:func:`idesign.rl.claim_scores`)."""
        P = self.config_prompt_len
        ids_, order = span_id_array(claims, tokens.shape)
        S = max(int(order.max(initial=1)), 1)
        S = 8 if S <= 8 else S  # one compiled shape
        G, out = self.config.gen_batch, []
        for i in range(0, tokens.shape[0], G):
            n = min(G, tokens.shape[0] - i)
            out.append(np.asarray(rl.claim_scores(self.apply, params, probe, site, _pad_rows(tokens[i:i + G], G),
                                                  _pad_rows(valid[i:i + G], G), _pad_rows(ids_[i:i + G], G), S,
                                                  completion_start=P, reading=READING))[:n])
        scores = np.concatenate(out)
        return scores[claims.row, order - 1] if len(claims.row) else np.zeros(0)


def sequences(task: Task, rows, gen) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([task.prompts[rows], gen["tokens"]], 1), np.concatenate([task.valid[rows], gen["valid"]], 1))


# ---------------------------------------------------------------------------------------------- base model


def base_cache_config(config: Config) -> dict:
    """The fields that key the base model's pretrain cache.

    ``n_obscure``, ``correction_rate``, ``cut_rate`` and ``mark_passes`` key it only when they change the world, so
    bases pretrained before they existed stay valid.
    """
    optional = {"n_obscure": config.n_obscure, "correction_rate": config.correction_rate is not None,
                "cut_rate": config.cut_rate, "mark_passes": config.mark_passes != 1}
    return {k: getattr(config, k) for k in _BASE_FIELDS if optional.get(k, True)}


def pretrain(rt: Runtime, config: Config, seed: int, progress: bool):
    base_config = base_cache_config(config)

    def train(_, seed):
        world = cw.make_claim_world(world_config(config, seed))
        packed = ids.data.pack_for_lm(world.train_documents, world.tokenizer, config.seq_len, seed=seed)
        batches = ids.train.iterate_batches(packed, config.batch_size, seed=seed, columns=["tokens", "loss_mask"])
        state, _ = ids.train.train(ids.init_train_state(rt.init_params(seed), rt.pretrain_opt), rt.pretrain_step,
                                   batches, num_steps=config.pretrain_steps, log_every=100, progress=progress,
                                   desc=f"{NAME} pretrain seed {seed}")
        return state.params

    return ids.pretrain.cached(f"{NAME}-claims", base_config, seed, train, like=lambda: rt.init_params(0))


def token_stats(logits, tokens, claims: Claims) -> dict[str, np.ndarray]:
    """Per claim, from the logits its tokens were predicted from: confidence features (the baselines)."""
    out = {k: [] for k in ("maxprob_min", "logp_mean", "logp_min", "entropy_mean", "entropy_max", "margin_min",
                           "length")}
    for r, s, e in zip(claims.row, claims.start, claims.end):
        lg = logits[r, s - 1:e - 1].astype(np.float64)
        lp = lg - lg.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        p = np.exp(lp)
        tok_lp = lp[np.arange(e - s), tokens[r, s:e]]
        top2 = np.sort(p, -1)[:, -2:]
        ent = -(p * lp).sum(-1)
        for k, v in (("maxprob_min", p.max(-1).min()), ("logp_mean", tok_lp.mean()), ("logp_min", tok_lp.min()),
                     ("entropy_mean", ent.mean()), ("entropy_max", ent.max()),
                     ("margin_min", (top2[:, 1] - top2[:, 0]).min()), ("length", e - s)):
            out[k].append(v)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def claim_windows(acts: np.ndarray, valid: np.ndarray, claims: Claims, width: int = 3):
    """``[C, width, D]`` activations at each claim's prediction position and tokens, with their mask."""
    idx = claims.start[:, None] - 1 + np.arange(width)[None]
    mask = idx < claims.end[:, None]
    idx = np.minimum(idx, acts.shape[1] - 1)
    mask &= valid[claims.row[:, None], idx]
    return acts[claims.row[:, None], idx], mask


def auc(labels, scores) -> float:
    labels = np.asarray(labels, int)
    if labels.min() == labels.max():
        return float("nan")
    return float(ids.metrics.roc_auc(labels, np.asarray(scores, np.float64)))


def consistency_scores(rt: Runtime, params, tokens, valid, claims: Claims, k: int, key) -> np.ndarray:
    """Entropy over the distinct values of ``k`` claims sampled from each claim's prefix."""
    prefixes = [tokens[r, :s][valid[r, :s]] for r, s in zip(claims.row, claims.start)]
    pr, pv = ids.pad_tokens(prefixes, pad_id=PAD_ID, length=tokens.shape[1])
    gen = rt.generate(params, np.repeat(pr, k, 0), np.repeat(pv, k, 0), key=key, max_new_tokens=2)
    closing = set(cw.CLOSING_WORDS)
    tok = rt.tokenizer
    out = []
    for c in range(len(prefixes)):
        values = []
        for row in gen["tokens"][c * k:(c + 1) * k]:
            words = [tok.id_to_token(int(t)) for t in row]
            values.append(tuple(words[: 1 + (words[0] not in closing)]))
        _, counts = np.unique(np.asarray([" ".join(v) for v in values]), return_counts=True)
        q = counts / k
        out.append(-(q * np.log(q)).sum())
    return np.asarray(out)


def grouped_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row; every group (entity) in exactly one fold."""
    unique = np.unique(groups)
    fold_of = dict(zip(np.random.default_rng(seed).permutation(unique).tolist(), np.arange(len(unique)) % n_folds))
    return np.asarray([fold_of[g] for g in groups.tolist()])


def _fit_span(config: Config, x, mask, y, C, seed):
    # Row counts padded to a multiple of 256 (padding rows weigh nothing): one compiled trainer per seed and layer.
    n = len(y)
    pad = -n % 256
    x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    m = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    yy = np.concatenate([y, y[:1].repeat(pad)])
    return probes.fit_span_probe(x, m.astype(np.int32), yy[:, None], mask=m, num_steps=config.probe_steps,
                                 batch_size=128, l2=1.0 / (C * n), seed=seed, progress=False)


def _span_logit(probe, x, mask):
    return np.asarray(probes.span_scores(probe, x, mask.astype(np.int32), 1, mask))[:, 0]


class ProbeFit(NamedTuple):
    probe: probes.LogisticProbe
    site: str
    attention: probes.AttentionProbe
    logit_features: probes.LogisticProbe
    eval_data: tuple  # (tokens, valid, claims, labels) of the held-out base samples


def fit_probes(rt: Runtime, config: Config, world, base, task: Task, train_rows, eval_rows, seed: int, out: dict,
               progress: bool) -> ProbeFit:
    """Samples base completions, labels their claims, fits and compares the probes and baselines."""
    rows = np.repeat(np.concatenate([train_rows, eval_rows]), config.probe_samples)
    gen = rt.generate(base, task.prompts[rows], task.valid[rows], key=jax.random.key(seed + 100))
    tokens, valid = sequences(task, rows, gen)
    parsed = parse_batch(world, task, rows, tokens[:, task.prompts.shape[1]:], gen["valid"])
    claims = parsed.claims
    labels = (~claims.supported).astype(np.int32)
    logits, acts = rt.forward(base, tokens, valid)
    stats = token_stats(logits, tokens, claims)
    windows = {s: claim_windows(acts[s], valid, claims) for s in rt.sites}
    del acts
    entity = task.entity[rows][claims.row]
    is_train = np.isin(rows[claims.row], train_rows)
    tr, te = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    out["probe.n_train_claims"] = float(len(tr))
    out["probe.n_train_prompts"] = float(len(np.unique(rows[claims.row[tr]])))
    out["base.n_eval_claims"] = float(len(te))

    # C and layer by entity-grouped cross-validation on the probe half.
    folds = grouped_folds(entity[tr], config.cv_folds, seed)
    cv = {}
    for li, site in enumerate(rt.sites):
        x, mask = windows[site]
        for C in config.probe_Cs:
            scores = np.zeros(len(tr))
            for f in range(config.cv_folds):
                fit_i, val_i = tr[folds != f], tr[folds == f]
                p = _fit_span(config, x[fit_i], mask[fit_i], labels[fit_i], C, seed)
                scores[folds == f] = _span_logit(p, x[val_i], mask[val_i])
            cv[li, C] = auc(labels[tr], scores)
            out[f"probe.cv_auc_layer{li}_C{C:g}"] = cv[li, C]
    layer, C = max(cv, key=lambda k: cv[k] if np.isfinite(cv[k]) else -1)
    site = rt.sites[layer]
    x, mask = windows[site]
    probe = _fit_span(config, x[tr], mask[tr], labels[tr], C, seed)
    out.update({"probe.layer": float(layer), "probe.C": float(C), "probe.cv_auc": cv[layer, C],
                "probe.auc": auc(labels[te], _span_logit(probe, x[te], mask[te])),
                "probe.train_auc": auc(labels[tr], _span_logit(probe, x[tr], mask[tr]))})
    # Why a probe can or cannot beat confidence: is the entity's familiarity (known vs never seen) linearly
    # readable at the claim's positions? Held-out entities; chance is 0.5.
    unknown = task.unknown[rows][claims.row].astype(np.int32)
    flat = (x * mask[..., None]).reshape(len(x), -1)
    familiarity = probes.fit_logistic(flat[tr], unknown[tr], C=0.1)
    out["probe.familiarity_auc"] = auc(unknown[te], probes.score(familiarity, flat[te]))
    attention = probes.fit_attention_probe(x[tr], labels[tr], mask[tr], n_heads=2, num_steps=config.attention_steps,
                                           batch_size=128, class_weight="balanced", seed=seed, progress=False)
    out["probe.attention_auc"] = auc(labels[te], probes.score(attention, x[te], mask[te]))

    # Baselines on the same held-out claims.
    out["baselines.entropy_auc"] = auc(labels[te], stats["entropy_mean"][te])
    out["baselines.maxprob_auc"] = auc(labels[te], -stats["maxprob_min"][te])
    out["baselines.logprob_auc"] = auc(labels[te], -stats["logp_mean"][te])
    out["baselines.logprob_min_auc"] = auc(labels[te], -stats["logp_min"][te])
    feats = np.stack([stats[k] for k in ("maxprob_min", "logp_mean", "logp_min", "entropy_mean", "entropy_max",
                                         "margin_min", "length")], 1).astype(np.float32)
    logit_features = probes.fit_logistic(feats[tr], labels[tr], C=1.0)
    out["baselines.logit_features_auc"] = auc(labels[te], probes.score(logit_features, feats[te]))
    te_claims = claims.select(te)
    out["baselines.consistency_auc"] = auc(labels[te], consistency_scores(
        rt, base, tokens, valid, te_claims, config.consistency_k, jax.random.key(seed + 200)))
    return ProbeFit(probe, site, attention, logit_features, (tokens, valid, te_claims, labels[te]))


def confident_share(rt: Runtime, world, base, task: Task, rows) -> tuple[float, float]:
    """Share of the base model's hallucinated greedy claims whose least confident token has max-prob >= 0.5, and
    :func:`confidence_ceiling` of the same claims."""
    gen = rt.generate(base, task.prompts[rows], task.valid[rows])
    tokens, valid = sequences(task, rows, gen)
    claims = parse_batch(world, task, rows, gen["tokens"], gen["valid"]).claims
    logits, _ = rt.forward(base, tokens, valid, sites=rt.sites[:1])
    stats = token_stats(logits, tokens, claims)
    return float((stats["maxprob_min"][~claims.supported] >= 0.5).mean()), confidence_ceiling(
        claims, stats["maxprob_min"], task, rows)


def confidence_ceiling(claims: Claims, conf: np.ndarray, task: Task, rows, thresholds=None) -> float:
    """Lowest hallucination rate reachable by retracting the base's kept claims below a confidence threshold
    while keeping known accuracy within 5 points: is the oracle target reachable with the signal the model has?

    ``thresholds``: where to cut ``conf`` (default every 0.01 of a probability; give quantiles for any other score).
    """
    asked, unknown = task.asked(rows), task.unknown[rows]
    n_slots, n_known = asked.sum(), max(asked[~unknown].sum(), 1)
    fin, unk = claims.final, unknown[claims.row]
    known0 = (fin & claims.supported & ~unk).sum() / n_known
    best = (fin & ~claims.supported).sum() / n_slots
    for t in np.linspace(0.0, 1.0, 101) if thresholds is None else thresholds:
        keep = fin & (conf >= t)
        if (keep & claims.supported & ~unk).sum() / n_known >= known0 - 0.05:
            best = min(best, (keep & ~claims.supported).sum() / n_slots)
    return float(best)


# ---------------------------------------------------------------------------------------------- rewards and RL


def completion_rewards(rt: Runtime, parsed: Parsed, p: np.ndarray, task: Task, rows, lam: float, *,
                       return_slots: bool = False):
    """Mean slot reward over the slots each prompt asks, plus the format penalty (module docstring)."""
    B, A = parsed.outcome.shape
    c = parsed.claims
    p_kept = np.full((B, A), np.nan)
    p_retracted = np.full((B, A), np.nan)
    p_kept[c.row[c.final], c.slot[c.final]] = p[c.final]
    # The claim a bare retraction takes back: the last retracted claim of the slot (claims are in order).
    p_retracted[c.row[c.retracted], c.slot[c.retracted]] = p[c.retracted]
    outcome = np.where(parsed.outcome <= 1, KEPT, np.where(parsed.outcome == 2, RETRACTED, NOTHING))
    outcome = np.where((outcome == RETRACTED) & np.isnan(p_retracted), NOTHING, outcome)  # "unknown" without a claim
    slots = np.asarray(rl.slot_rewards(jnp.asarray(p_kept), jnp.asarray(p_retracted), jnp.asarray(outcome), lam,
                                       rt.reward))
    if parsed.cut_final is not None:
        # A slot retracted by breaking its claim off has no claim to score: no reward, so no signal (NaN; the
        # decision to break off is taught by choice_advantages on the claims that were completed).
        slots = np.where(parsed.cut_final, np.nan, slots)
    total = np.nansum(slots, 1) / task.asked(rows)
    penalty = np.asarray(rl.format_penalty(parsed.malformed, rt.reward.format_penalty))
    if return_slots:
        return total + penalty, slots + penalty[:, None]
    return total + penalty


def slot_token_advantages(parsed: Parsed, task: Task, rows, rewards: np.ndarray, slots: np.ndarray, group_size: int,
                          n_tokens: int, claim_quality: np.ndarray | None = None) -> np.ndarray:
    """``[B, T - 1]`` advantages: each claim's tokens (and its retraction / correction) get its slot's advantage.

    A long-form completion makes four claims; with one advantage per completion, the decision to retract a claim
    is credited with the other three claims' luck. Here a slot's reward is normalised over the group's samples of
    the same prompt (as :func:`idesign.rl.group_advantages` does for completions); tokens before the first claim
    keep the completion's advantage. For a QA prompt (one slot) this is the completion advantage.

    With ``claim_quality`` (``[C]``, what each claim would earn if kept: ``clip(1 - p)``; ``credit="claim"``), a
    claim's *own* tokens get the advantage of that quality, normalised over the group's claims on the same slot,
    and only the tokens after it (the decision to retract or go on, and a correction) get the slot's advantage. As
    in RLFR, where the retraction reward pays the intervention, not the claim: with slot credit the claim's tokens
    shared the retraction's 0.65, so for an unsure slot a deliberately wrong claim followed by ``<retract>`` paid
    more than an honest guess (issue 13: the oracle's first claims on known entities fell 0.376 -> 0.314).
    """
    B, A = slots.shape
    adv_c = np.asarray(rl.group_advantages(jnp.asarray(rewards, jnp.float32), group_size)[0])
    g = slots.reshape(-1, group_size, A)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group (every sample broke its claim off)
        std = np.nanstd(g, 1, keepdims=True)
        adv_s = np.where(std > 1e-6, (g - np.nanmean(g, 1, keepdims=True)) / (std + 1e-6), 0.0).reshape(B, A)
    adv_s = np.nan_to_num(adv_s)  # slots with no reward (NaN) carry no signal
    out = np.repeat(adv_c[:, None], n_tokens - 1, 1).astype(np.float32)
    c = parsed.claims
    adv_q = None if claim_quality is None else _claim_quality_advantages(c, claim_quality, group_size)
    order = np.lexsort((c.start, c.row))
    for i, k in enumerate(order):
        r = c.row[k]
        nxt = order[i + 1] if i + 1 < len(order) and c.row[order[i + 1]] == r else None
        stop = c.start[nxt] if nxt is not None else n_tokens
        out[r, c.start[k] - 1:stop - 1] = adv_s[r, c.slot[k]]  # index j predicts token j + 1
        if adv_q is not None:
            out[r, c.start[k] - 1:c.end[k] - 1] = adv_q[k]
    for r, start, end, slot in (() if parsed.cut_spans is None else parsed.cut_spans):
        # A broken-off claim and its <retract> have nothing to score them by; where the cut is the slot's last word,
        # neither has anything up to the next claim.
        later = c.start[(c.row == r) & (c.start > start)]
        stop = later.min() if parsed.cut_final[r, slot] and len(later) else (n_tokens if parsed.cut_final[r, slot]
                                                                             else end + 1)
        out[r, start - 1:stop - 1] = 0.0
    return out


def asked_slots(task: Task, rows) -> np.ndarray:
    """``[B, A]`` bool: the slots each prompt asks for (its attribute for QA, every one for long-form)."""
    col = np.asarray([cw.ATTRIBUTES.index(a) if a in cw.ATTRIBUTES else -1 for a in task.attribute[rows]])
    qa = task.kind[rows] == "qa"
    return ~qa[:, None] | (np.arange(len(cw.ATTRIBUTES))[None] == col[:, None])


def choice_advantages(rt: Runtime, parsed: Parsed, task: Task, rows, p: np.ndarray, lam: float, slots: np.ndarray,
                      valid: np.ndarray, *, where: str = "after") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``([B, T - 1] token ids, [B, T - 1] advantages, [B, T - 1] after)`` of the retraction decision after each claim.

    At the position that predicts the token after a claim the policy chooses between ``<retract>`` and going on;
    both outcomes' slot rewards are known from the claim's ``p`` (kept: ``clip(1 - p)``; retracted:
    ``0.65 * clip(p - lam)``, counting no correction), so their difference, scaled by the batch's standard
    deviation of slot rewards (the scale of the sampled advantages), is the decision's advantage. Claims that end
    the sequence (no decision was made) are left out. ``after`` marks those positions: the token sampled there is
    credited by this term alone (give it no sampled advantage).

    ``where="within"``: the policy may also break a claim off, emitting ``<retract>`` in place of any of its tokens
    (where the claim's confidence lives: in a softmax the retraction competes with the value tokens; a position
    after the claim cannot read that softmax back). Each such position gets ``retract - realised``: breaking off
    earns what retracting this claim would, going on earns what the claim then earned (kept or retracted after
    it). ``where="inside"``: the same except before the claim's first token.
    """
    if where not in ("after", "within", "inside"):
        raise ValueError(f"choice_advantages: where={where!r}; expected 'after', 'within' or 'inside'.")
    B, T = valid.shape
    ids_ = np.full((B, T - 1), -1, np.int32)
    adv = np.zeros((B, T - 1), np.float32)
    after = np.zeros((B, T - 1), bool)
    c = parsed.claims
    if not len(c.row):
        return ids_, adv, after
    nan = np.full(len(c.row), np.nan)
    keep = np.asarray(rl.slot_rewards(jnp.asarray(p), jnp.asarray(nan), jnp.zeros(len(nan), jnp.int32), lam,
                                      rt.reward))
    retract = np.asarray(rl.slot_rewards(jnp.asarray(nan), jnp.asarray(p), jnp.ones(len(nan), jnp.int32), lam,
                                         rt.reward))
    asked = asked_slots(task, rows) & ~np.isnan(slots)
    scale = max(float(slots[asked].std()) if asked.any() else 1.0, 1e-3)
    # After the claim: retracting vs going on (keeping it). The last position's decision is made only if a token
    # followed the claim.
    made = (c.end < T) & valid[c.row, np.minimum(c.end, T - 1)]
    after[c.row[made], c.end[made] - 1] = True
    if where in ("within", "inside"):
        # Before each of the claim's tokens: breaking it off (worth what retracting this claim would earn: the
        # claim is what the policy went on to say) vs going on (worth what this claim then earned).
        realised = np.where(c.retracted, retract, keep)
        for k in range(len(c.row)):
            pos = np.arange(c.start[k] - (0 if where == "inside" else 1), c.end[k] - 1)
            ids_[c.row[k], pos] = RETRACT_ID
            adv[c.row[k], pos] = (retract[k] - realised[k]) / scale
    ids_[after] = RETRACT_ID
    adv[c.row[made], c.end[made] - 1] = (retract[made] - keep[made]) / scale
    return ids_, adv, after


def _claim_quality_advantages(c: Claims, quality: np.ndarray, group_size: int) -> np.ndarray:
    """Each claim's quality normalised over the claims on the same slot in the same group (0 where they agree)."""
    key = (c.row // group_size) * len(cw.ATTRIBUTES) + c.slot
    adv = np.zeros(len(c.row), np.float32)
    for g in np.unique(key):
        m = key == g
        q = quality[m]
        sd = q.std()
        adv[m] = (q - q.mean()) / (sd + 1e-6) if sd > 1e-6 else 0.0
    return adv


def rewards_for(rt: Runtime, arm: str, student, base, probe, site, parsed: Parsed, tokens, valid) -> np.ndarray:
    """P(hallucinated) per claim as the arm's reward reads it: truth, the frozen teacher, or the student."""
    if arm == "rl_oracle":
        return (~parsed.claims.supported).astype(np.float64)
    reader = student if arm == "rl_live_probe" else base
    return rt.claim_probs(reader, probe, site, tokens, valid, parsed.claims)


def train_rl(rt: Runtime, config: Config, world, arm: str, base, probe, site, task: Task, rl_rows, seed: int,
             progress: bool):
    if config.credit not in CREDITS:
        raise ValueError(f"Config.credit must be one of {CREDITS}; got {config.credit!r}")
    if config.retract_choice not in RETRACT_CHOICES:
        raise ValueError(f"Config.retract_choice must be one of {RETRACT_CHOICES}; got {config.retract_choice!r}")
    state = ids.init_train_state(base, rt.rl_opt)
    lagrange = rl.lagrange_init()
    rng = np.random.default_rng([seed, 11, RL_ARMS.index(arm)])
    key = jax.random.key(seed * 1000 + RL_ARMS.index(arm))
    G, M, P = config.prompts_per_step, config.group_size, task.prompts.shape[1]
    history = []
    for t in range(config.rl_steps):
        rows = np.repeat(rng.choice(rl_rows, G, replace=False), M)
        gen = rt.generate(state.params, task.prompts[rows], task.valid[rows], key=jax.random.fold_in(key, t),
                          temperature=config.rl_temperature)
        tokens, valid = sequences(task, rows, gen)
        parsed = parse_batch(world, task, rows, gen["tokens"], gen["valid"])
        p = rewards_for(rt, arm, state.params, base, probe, site, parsed, tokens, valid)
        # The multiplier reads this batch's own retraction rate (P term) before rewarding it, so an overshoot is
        # penalised in the step it happens; the integral term is updated after, as before.
        retract_rate = parsed.retract_rate()
        lam = float(rl.retraction_multiplier(lagrange, retract_rate, rt.reward))
        rewards, slots = completion_rewards(rt, parsed, p, task, rows, lam, return_slots=True)
        if config.credit in ("slot", "claim"):
            quality = np.clip(1.0 - p, *rt.reward.clip) if config.credit == "claim" else None
            adv = jnp.asarray(slot_token_advantages(parsed, task, rows, rewards, slots, M, tokens.shape[1], quality))
        else:
            adv, _ = rl.group_advantages(jnp.asarray(rewards, jnp.float32), M)
        actions = jnp.asarray(valid[:, 1:] & (np.arange(1, tokens.shape[1]) >= P)[None])
        tj, vj = jnp.asarray(tokens), jnp.asarray(valid)
        choice = (None, None)
        if config.retract_choice != "sampled":
            where = "after" if config.retract_choice == "expected" else config.retract_choice
            *choice, after = choice_advantages(rt, parsed, task, rows, p, lam, slots, valid, where=where)
            adv = jnp.where(jnp.asarray(after), 0.0, jnp.broadcast_to(adv.reshape(adv.shape[0], -1), after.shape))
            choice = (jnp.asarray(choice[0]), jnp.asarray(choice[1] * config.choice_coef))
        batch = rl.RLBatch(tj, vj, actions, adv, rt.logprobs(state.params, tj, vj), rt.logprobs(base, tj, vj),
                           *choice)
        state, metrics = rt.rl_step(state, batch)
        lagrange = rl.retraction_lagrange_update(lagrange, retract_rate, rt.reward)
        m = slot_metrics("s", parsed, task, rows)
        history.append({"step": t, "reward": float(rewards.mean()), "true_rate": m["s.hallucination_rate"],
                        "known_acc": m["s.known_acc"], "retract_rate": retract_rate, "lam": lam,
                        "kl": float(metrics["kl"])})
        if progress and (t % 10 == 0 or t == config.rl_steps - 1):
            print(f"  {arm} step {t}: reward {rewards.mean():.3f} hall {m['s.hallucination_rate']:.3f} "
                  f"known {m['s.known_acc']:.3f} retract {retract_rate:.3f} lam {lam:.3f}", flush=True)
    return state.params, history


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(rt: Runtime, world, arm: str, params, reader, probe, site, task: Task, rows, *, monitor=None):
    gen = rt.generate(params, task.prompts[rows], task.valid[rows], monitor=monitor)
    tokens, valid = sequences(task, rows, gen)
    parsed = parse_batch(world, task, rows, gen["tokens"], gen["valid"])
    p = rt.claim_probs(reader, probe, site, tokens, valid, parsed.claims)
    m = slot_metrics(arm, parsed, task, rows, p)
    if monitor is not None:
        c = parsed.claims
        P = task.prompts.shape[1]
        flagged = gen["fired"][c.row, c.end - 1 - P]
        hall = ~c.supported
        m["_precision"] = float((flagged & hall).sum() / max(flagged.sum(), 1))
        m["_recall"] = float((flagged & hall).sum() / max(hall.sum(), 1))
        caught = flagged & hall
        fate = parsed.outcome[c.row[caught], c.slot[caught]]
        n = max(caught.sum(), 1)
        m["_fixed_share"] = float((fate == 0).sum() / n)
        m["_retracted_share"] = float((fate == 2).sum() / n)
        m["_still_wrong_share"] = float((fate == 1).sum() / n)
    return m


def best_of_n(rt: Runtime, config: Config, world, base, probe, site, task: Task, rows, seed: int) -> dict:
    """Best of N base samples by probe reward and by true reward, for N in BON_NS."""
    n = config.bon_n
    rep = np.repeat(rows, n)
    gen = rt.generate(base, task.prompts[rep], task.valid[rep], key=jax.random.key(seed + 300))
    tokens, valid = sequences(task, rep, gen)
    parsed = parse_batch(world, task, rep, gen["tokens"], gen["valid"])
    p = rt.claim_probs(base, probe, site, tokens, valid, parsed.claims)
    by = {"bon_probe": completion_rewards(rt, parsed, p, task, rep, 0.0),
          "bon_oracle": completion_rewards(rt, parsed, (~parsed.claims.supported).astype(float), task, rep, 0.0)}
    hall = (parsed.outcome == 1).sum(1).reshape(len(rows), n)
    known = ((parsed.outcome == 0).sum(1)).reshape(len(rows), n)
    asked, unknown = task.asked(rows), task.unknown[rows]
    out = {}
    for name, r in by.items():
        r = r.reshape(len(rows), n)
        for N in BON_NS:
            pick = r[:, :N].argmax(1)
            out[f"{name}.hallucination_rate_at_{N}"] = float(hall[np.arange(len(rows)), pick].sum() / asked.sum())
            if N == max(BON_NS):
                out[f"{name}.hallucination_rate"] = out[f"{name}.hallucination_rate_at_{N}"]
                out[f"{name}.known_acc"] = float(known[np.arange(len(rows)), pick][~unknown].sum()
                                                 / asked[~unknown].sum())
    return out


def entity_split(task: Task, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the probe / RL half of the entities and of the held-out half (every reported number)."""
    entities = np.unique(task.entity)
    train_entities = np.random.default_rng([seed, 5]).choice(entities, len(entities) // 2, replace=False)
    train = np.isin(task.entity, train_entities)
    return np.flatnonzero(train), np.flatnonzero(~train)


def run_seed(rt: Runtime, config: Config, seed: int, progress: bool):
    world = cw.make_claim_world(world_config(config, seed))
    task = make_task(world)
    rt.tokenizer = world.tokenizer
    rt.config_prompt_len = task.prompts.shape[1]
    base = pretrain(rt, config, seed, progress)
    train_rows, eval_rows = entity_split(task, seed)
    out: dict[str, float] = {}
    out["base.confident_hallucination_share"], ceiling = confident_share(rt, world, base, task, eval_rows)
    out["base.confidence_ceiling_hallucination_rate"] = ceiling
    fit = fit_probes(rt, config, world, base, task, train_rows, eval_rows, seed, out, progress)
    probe, site = fit.probe, fit.site
    if progress:
        print({k: round(v, 3) for k, v in out.items() if not k.startswith("probe.cv_auc_")}, flush=True)
    value_mask = np.zeros(world.tokenizer.vocab_size, bool)
    value_mask[[world.tokenizer.token_to_id(w) for w in cw.VALUE_WORDS]] = True
    close_mask = np.zeros(world.tokenizer.vocab_size, bool)
    close_mask[[world.tokenizer.token_to_id(w) for w in cw.CLOSING_WORDS]] = True
    monitor = ProbeMonitor(rt.apply, site, config.max_new_tokens, base, probe, jnp.asarray(value_mask),
                           jnp.array([RETRACT_ID], jnp.int32), threshold=config.threshold,
                           max_events=config.max_events, reading=READING, close_tokens=jnp.asarray(close_mask))

    out.update(evaluate(rt, world, "base", base, base, probe, site, task, eval_rows))
    m = evaluate(rt, world, "base_monitor", base, base, probe, site, task, eval_rows, monitor=monitor)
    for k in ("precision", "recall", "fixed_share", "retracted_share", "still_wrong_share"):
        out[f"monitor.{k}"] = m.pop(f"_{k}")
    out.update(m)
    tokens, valid, te_claims, labels = fit.eval_data
    histories = {}
    for arm in RL_ARMS:
        student, histories[arm] = train_rl(rt, config, world, arm, base, probe, site, task, train_rows, seed,
                                           progress)
        reader = student if arm == "rl_live_probe" else base
        out.update(evaluate(rt, world, arm, student, reader, probe, site, task, eval_rows))
        out[f"{arm}.probe_auc_on_student"] = auc(labels, rt.claim_probs(student, probe, site, tokens, valid, te_claims))
        if arm == "rl_frozen_probe":
            m = evaluate(rt, world, "rl_frozen_probe_monitor", student, base, probe, site, task, eval_rows,
                         monitor=monitor)
            out.update({k: v for k, v in m.items() if not k.startswith("_")})
        if progress:
            print({k: round(v, 3) for k, v in out.items() if k.startswith(arm)}, flush=True)
    bon_rows = np.random.default_rng([seed, 9]).choice(eval_rows, min(config.bon_prompts, len(eval_rows)),
                                                       replace=False)
    out.update(best_of_n(rt, config, world, base, probe, site, task, bon_rows, seed))
    base_on_bon = evaluate(rt, world, "_b", base, base, probe, site, task, bon_rows)
    for k in ("abstain_rate", "retract_rate", "probe_estimated_rate"):
        out[f"bon_probe.{k}"] = float("nan")  # the pick is a whole sampled completion; these are not tracked
    out["bon_probe.base_hallucination_rate"] = base_on_bon["_b.hallucination_rate"]
    for arm in ARMS:
        ref = out["bon_probe.base_hallucination_rate"] if arm == "bon_probe" else out["base.hallucination_rate"]
        out[f"{arm}.relative_reduction"] = 1.0 - out[f"{arm}.hallucination_rate"] / ref if ref > 0 else float("nan")
    out["rl_oracle.meets_target"] = float(out["rl_oracle.hallucination_rate"] <= 0.6 * out["base.hallucination_rate"]
                                          and out["rl_oracle.known_acc"] >= out["base.known_acc"] - 0.05)
    out["rl_live_probe.estimate_gap"] = (out["rl_live_probe.probe_estimated_rate"]
                                         - out["rl_live_probe.hallucination_rate"])
    return out, histories


# ---------------------------------------------------------------------------------------------- report


def plot(metrics, histories, out_dir) -> None:
    arms = [a for a in ARMS]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(arms))
    for offset, key, label, color in ((-0.2, "hallucination_rate", "hallucination rate (true)", "tab:red"),
                                      (0.2, "known_acc", "known-entity accuracy", "tab:green")):
        ax.bar(x + offset, [metrics[f"{a}.{key}"] for a in arms], 0.4,
               yerr=[metrics[f"{a}.{key}_std"] for a in arms], label=label, color=color, capsize=3)
    ax.set_xticks(x, [a.replace("_", "\n", 1) for a in arms], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="share of asked slots",
           title=f"Hallucination per arm, held-out entities ({int(metrics['n_seeds'])} seeds, mean ± sd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "arms.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for arm, color in (("rl_oracle", "tab:gray"), ("rl_frozen_probe", "tab:blue"), ("rl_live_probe", "tab:orange")):
        for ax, key in zip(axes, ("reward", "true_rate", "retract_rate")):
            curves = np.array([[r[key] for r in h[arm]] for h in histories])
            ax.plot(curves.mean(0), color=color, label=arm)
            ax.fill_between(np.arange(curves.shape[1]), curves.min(0), curves.max(0), color=color, alpha=0.15)
    for ax, title in zip(axes, ("mean reward (as trained)", "true hallucination rate of samples", "retraction rate")):
        ax.set(xlabel="RL step", title=title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "rl_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, color in (("bon_probe", "tab:blue"), ("bon_oracle", "tab:gray")):
        ys = [metrics[f"{name}.hallucination_rate_at_{n}"] for n in BON_NS]
        es = [metrics[f"{name}.hallucination_rate_at_{n}_std"] for n in BON_NS]
        ax.errorbar(BON_NS, ys, yerr=es, marker="o", color=color, label=name.replace("bon_", "picked by "), capsize=3)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="N (samples per prompt)", ylabel="true hallucination rate", title="Best-of-N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "best_of_n.png", dpi=120)
    plt.close(fig)


def conclusions(m) -> list[str]:
    def rate(arm):
        return m[f"{arm}.hallucination_rate"]

    base = rate("base")
    baselines = {k.split(".")[1][:-4]: m[k] for k in m if k.startswith("baselines.") and k.endswith("_auc")}
    best_name = max(baselines, key=baselines.get)
    lines = [f"World: {100 * m['base.confident_hallucination_share']:.0f}% of the base model's hallucinated claims "
             "are confident (least-confident token max-prob >= 0.5). Retracting its low-confidence claims (known "
             f"accuracy within 5 points) would reach {m['base.confidence_ceiling_hallucination_rate']:.3f} "
             f"(target {0.6 * base:.3f}).",
             f"Probe AUC {m['probe.auc']:.3f} (attention {m['probe.attention_auc']:.3f}) vs the best baseline "
             f"{best_name} {baselines[best_name]:.3f}: the span-max probe is "
             f"{'above' if m['probe.auc'] > baselines[best_name] else 'NOT above'} every baseline (means over seeds)."]
    oracle_red, oracle_acc = m["rl_oracle.relative_reduction"], m["rl_oracle.known_acc"] - m["base.known_acc"]
    lines.append(f"Oracle RL: hallucination {base:.3f} -> {rate('rl_oracle'):.3f} ({-100 * oracle_red:+.0f}% relative), "
                 f"known accuracy {100 * oracle_acc:+.1f} points: the fair-test target (<= 0.6 x base, within 5 "
                 f"points) was met in {m['rl_oracle.meets_target'] * 100:.0f}% of seeds; it retracts "
                 f"{100 * m['rl_oracle.retract_rate_supported']:.0f}% of its right claims and "
                 f"{100 * m['rl_oracle.retract_rate_hallucinated']:.0f}% of its wrong ones (base "
                 f"{100 * m['base.retract_rate_supported']:.0f}% / {100 * m['base.retract_rate_hallucinated']:.0f}%).")
    red = m["rl_frozen_probe.relative_reduction"]
    acc = m["rl_frozen_probe.known_acc"] - m["base.known_acc"]
    lines.append(f"rl_frozen_probe: {base:.3f} -> {rate('rl_frozen_probe'):.3f} ({-100 * red:+.0f}% relative) with known "
                 f"accuracy {100 * acc:+.1f} points; target (>= 40% lower, within 5 points) "
                 f"{'met' if red >= 0.4 and acc >= -0.05 else 'not met'}.")
    lines.append(f"Monitor: base {base:.3f} -> {rate('base_monitor'):.3f}; rl_frozen_probe "
                 f"{rate('rl_frozen_probe'):.3f} -> {rate('rl_frozen_probe_monitor'):.3f}. Precision "
                 f"{m['monitor.precision']:.2f}, recall {m['monitor.recall']:.2f}; caught hallucinations end fixed "
                 f"{100 * m['monitor.fixed_share']:.0f}% / retracted {100 * m['monitor.retracted_share']:.0f}% / "
                 f"still wrong {100 * m['monitor.still_wrong_share']:.0f}%.")
    lines.append(f"rl_live_probe: true {rate('rl_live_probe'):.3f}, probe-estimated "
                 f"{m['rl_live_probe.probe_estimated_rate']:.3f} (gap {m['rl_live_probe.estimate_gap']:+.3f}); probe "
                 f"AUC on its student {m['rl_live_probe.probe_auc_on_student']:.3f} vs "
                 f"{m['rl_frozen_probe.probe_auc_on_student']:.3f} (frozen-probe student), {m['probe.auc']:.3f} (teacher).")
    lines.append(f"Best-of-{max(BON_NS)}: by probe {m['bon_probe.hallucination_rate_at_1']:.3f} -> "
                 f"{m['bon_probe.hallucination_rate']:.3f}, by truth {m['bon_oracle.hallucination_rate']:.3f}.")
    return lines


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    rt = Runtime(config, cw.make_claim_tokenizer().vocab_size)
    per_seed, histories = [], []
    for seed in config.seeds:
        # A finished seed is kept (keyed by the config without `seeds`), so seeds can run in parallel processes.
        key = ids.pretrain.cache_key(NAME, dataclasses.replace(config, seeds=()), 0, version=_VERSION)[-12:]
        path = _common.results_dir(NAME) / f"seed{seed}-{key}.json"
        if path.exists():
            row, history = json.loads(path.read_text())
        else:
            t_seed = time.perf_counter()
            row, history = run_seed(rt, config, seed, progress)
            row["seed_minutes"] = (time.perf_counter() - t_seed) / 60
            path.write_text(json.dumps([row, history]))
        per_seed.append(row)
        histories.append(history)
    metrics = _common.aggregate_seeds(per_seed)
    metrics["minutes"] = (time.perf_counter() - t0) / 60
    out = _common.results_dir(NAME)
    _common.write_metrics(NAME, {**metrics, **{f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()}})
    plot(metrics, histories, out)
    rows = [(arm, _common.pm(metrics, f"{arm}.hallucination_rate"), _common.pm(metrics, f"{arm}.known_acc"),
             _common.pm(metrics, f"{arm}.abstain_rate"), _common.pm(metrics, f"{arm}.retract_rate"),
             _common.pm(metrics, f"{arm}.probe_estimated_rate")) for arm in ARMS]
    detectors = ["probe.auc", "probe.attention_auc"] + [f"baselines.{b}_auc" for b in (
        "entropy", "maxprob", "logprob", "logprob_min", "consistency", "logit_features")]
    _common.write_readme(NAME, f"""
## Hallucination: confident hallucinations, claim probes, probe rewards on a frozen teacher ({len(config.seeds)} seeds, {metrics['minutes']:.1f} min)

Held-out entities; greedy completions; rates per asked slot; mean ± sd over seeds.

{_common.markdown_table(["arm", "hallucination rate", "known accuracy", "abstain rate", "retract rate", "probe-estimated rate"], rows)}

{_common.markdown_table(["detector (held-out claims)", "AUC"], [(k, _common.pm(metrics, k)) for k in detectors])}

""" + "\n".join(f"- {line}" for line in conclusions(metrics)) + """

![arms](arms.png) ![rl](rl_curves.png) ![bon](best_of_n.png)
""")
    return metrics


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
