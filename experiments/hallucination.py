"""Hallucination (fair test): confident hallucinations, claim-level probes, probe rewards read by a frozen teacher.

STAGE-1 DRAFT: world + base model + confident-hallucination measurement.
"""

from __future__ import annotations

import dataclasses
import time
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
from idesign.data import claim_world as cw  # noqa: E402
from idesign.data.tokenizer import EOS_ID, PAD_ID  # noqa: E402

NAME = "hallucination"


@dataclasses.dataclass(frozen=True)
class Config:
    n_known: int = 400
    n_unknown: int = 160
    n_families: int = 24
    n_first: int = 40
    family_share: float = 0.75
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    batch_size: int = 32
    pretrain_steps: int = 400
    learning_rate: float = 3e-3
    warmup: int = 40
    max_new_tokens: int = 20
    gen_batch: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Config()
FULL = Config()


class Task(NamedTuple):
    prompts: np.ndarray  # [Q, P]
    valid: np.ndarray
    kind: np.ndarray     # [Q] str
    attribute: np.ndarray
    entity: np.ndarray
    group: np.ndarray


def make_task(world: cw.ClaimWorld) -> Task:
    q = world.queries
    prompts, valid = ids.pad_tokens(q["prompt_ids"], pad_id=PAD_ID)
    return Task(prompts, valid, np.asarray(q["kind"]), np.asarray(q["attribute"]), np.asarray(q["entity_id"]),
                np.asarray(q["group"]))


class Runtime:
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
        self.capture = jax.jit(lambda p, t, v: apply(p, t, hooks=ids.capture(*self.sites), valid=v))

    def init_params(self, seed):
        return ids.init_transformer(self.model_config, seed=seed)[1]

    def generate(self, params, task: Task, rows, *, key=None, monitor=None):
        c, G = self.config, self.config.gen_batch
        sampling = ids.SamplingConfig(temperature=1.0 if key is not None else 0.0)
        parts = {k: [] for k in ("tokens", "valid", "injected", "fired")}
        for i in range(0, len(rows), G):
            chunk = rows[i:i + G]
            padded = np.concatenate([chunk, np.full(G - len(chunk), chunk[0])])
            out = ids.generate(self.apply, params, task.prompts[padded], prompt_valid=task.valid[padded],
                               max_new_tokens=c.max_new_tokens, key=None if key is None else jax.random.fold_in(key, i),
                               sampling=sampling, eos_id=EOS_ID, pad_id=PAD_ID, monitor=monitor)
            n = len(chunk)
            parts["tokens"].append(np.asarray(out.tokens)[:n])
            parts["valid"].append(np.asarray(out.valid)[:n])
            parts["injected"].append(np.asarray(out.injected)[:n])
            if monitor is not None:
                parts["fired"].append(np.asarray(out.monitor_state.fired)[:n])
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    def forward(self, params, tokens, valid):
        """Logits [B, T, V] (as float32 numpy) and activations per site [B, T, D], in fixed-size chunks."""
        G, n = self.config.gen_batch, tokens.shape[0]
        logits, acts = [], {s: [] for s in self.sites}
        for i in range(0, n, G):
            t, v = _pad_rows(tokens[i:i + G], G), _pad_rows(valid[i:i + G], G)
            lg, cap = self.capture(params, jnp.asarray(t), jnp.asarray(v))
            m = min(G, n - i)
            logits.append(np.asarray(lg[:m], np.float32))
            for s in self.sites:
                acts[s].append(np.asarray(cap[s][:m], np.float32))
        return np.concatenate(logits), {s: np.concatenate(a) for s, a in acts.items()}


def _pad_rows(x, n):
    x = np.asarray(x)
    return x if x.shape[0] == n else np.concatenate([x, np.repeat(x[:1], n - x.shape[0], axis=0)])


def pretrain(rt: Runtime, config: Config, world, seed: int, progress: bool):
    packed = ids.data.pack_for_lm(world.train_documents, world.tokenizer, config.seq_len, seed=seed)
    batches = ids.train.iterate_batches(packed, config.batch_size, seed=seed, columns=["tokens", "loss_mask"])
    state, log = ids.train.train(ids.init_train_state(rt.init_params(seed), rt.pretrain_opt), rt.pretrain_step,
                                 batches, num_steps=config.pretrain_steps, log_every=100, progress=progress,
                                 desc=f"{NAME} pretrain seed {seed}")
    return state.params, log.history[-1]["loss"]


class Claims(NamedTuple):
    """Every claim of a batch of completions, flat: the completion row and the span in the full sequence."""

    row: np.ndarray        # [C] index into the batch
    start: np.ndarray      # [C] first claim token, index into prompt + completion
    end: np.ndarray        # [C] one past the last
    supported: np.ndarray  # [C] bool
    final: np.ndarray      # [C] bool
    attribute: np.ndarray  # [C] str


def parse_batch(world, task: Task, rows, gen):
    """Parses completions; returns the per-row parses and the flat claims (positions in prompt + completion)."""
    P = task.prompts.shape[1]
    parsed, cl = [], {k: [] for k in Claims._fields}
    for b, q in enumerate(rows):
        n = int(gen["valid"][b].sum())
        p = cw.parse_completion(world, task.entity[q], task.kind[q], task.attribute[q], gen["tokens"][b, :n])
        parsed.append(p)
        for c in p.claims:
            cl["row"].append(b)
            cl["start"].append(P + c.start)
            cl["end"].append(P + c.end)
            cl["supported"].append(c.supported)
            cl["final"].append(c.final)
            cl["attribute"].append(c.attribute)
    claims = Claims(*(np.asarray(cl[k], dtype=(int if k in ("row", "start", "end") else bool if k in
                                               ("supported", "final") else str)) for k in Claims._fields))
    return parsed, claims


def token_stats(logits, tokens, claims: Claims):
    """Per claim: min over its tokens of the max next-token probability, mean / min token log-prob, mean entropy."""
    out = {k: [] for k in ("maxprob_min", "logp_mean", "logp_min", "entropy_mean", "entropy_max", "margin_min")}
    for r, s, e in zip(claims.row, claims.start, claims.end):
        lg = logits[r, s - 1:e - 1]
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        p = np.exp(lp)
        tok_lp = lp[np.arange(e - s), tokens[r, s:e]]
        ent = -(p * lp).sum(-1)
        top2 = np.sort(p, -1)[:, -2:]
        out["maxprob_min"].append(p.max(-1).min())
        out["logp_mean"].append(tok_lp.mean())
        out["logp_min"].append(tok_lp.min())
        out["entropy_mean"].append(ent.mean())
        out["entropy_max"].append(ent.max())
        out["margin_min"].append((top2[:, 1] - top2[:, 0]).min())
    return {k: np.asarray(v) for k, v in out.items()}


def measure_base(config: Config, seed: int = 0, progress: bool = True):
    world = cw.make_claim_world(cw.ClaimWorldConfig(n_known=config.n_known, n_unknown=config.n_unknown,
                                                    n_families=config.n_families, n_first=config.n_first,
                                                    family_share=config.family_share, seed=seed))
    rt = Runtime(config, world.tokenizer.vocab_size)
    task = make_task(world)
    t0 = time.perf_counter()
    base, loss = pretrain(rt, config, world, seed, progress)
    print("pretrain", time.perf_counter() - t0, "loss", loss)
    rows = np.arange(len(task.prompts))
    t0 = time.perf_counter()
    gen = rt.generate(base, task, rows)
    print("generate", time.perf_counter() - t0)
    parsed, claims = parse_batch(world, task, rows, gen)
    tokens = np.concatenate([task.prompts[rows], gen["tokens"]], 1)
    valid = np.concatenate([task.valid[rows], gen["valid"]], 1)
    logits, _ = rt.forward(base, tokens, valid)
    st = token_stats(logits, tokens, claims)
    hall = ~claims.supported
    grp = task.group[rows][claims.row]
    print("malformed", np.mean([p.malformed for p in parsed]), "claims", len(hall), "hall", hall.mean())
    for g in cw.GROUPS:
        m = grp == g
        print(g, "n", m.sum(), "hall", hall[m].mean(), "conf_share(hall)", (st["maxprob_min"][m & hall] >= 0.5).mean())
    print("confident share", (st["maxprob_min"][hall] >= 0.5).mean())
    for attr in cw.ATTRIBUTES:
        m = claims.attribute == attr
        print(attr, "hall", hall[m].mean(), "conf", (st["maxprob_min"][m & hall] >= 0.5).mean())
    yl = hall.astype(int)
    for k, v in st.items():
        print(k, "auc", ids.metrics.roc_auc(yl, -v if k in ("maxprob_min", "logp_mean", "logp_min", "margin_min") else v))
    for i in range(8):
        print(task.kind[i], world.tokenizer.decode(tokens[i]))


if __name__ == "__main__":
    measure_base(_common.cli("x", QUICK, FULL))
