"""Knowledge LM: does a small transformer trained on the knowledge world hallucinate about strangers?

Hypothesis. A reference transformer pretrained on bios and QA pairs recalls the attributes of
*frequent* entities well, those of *rare* entities less well, and — because nothing in training
ever answers "unknown" — answers questions about *unknown* entities (never seen in training) with
a confident attribute anyway: a hallucination. This is the baseline that later work (probes,
monitors, RL on probe rewards) tries to reduce.

Controls and baselines.
- ``answer_acc_unknown_hidden_truth``: accuracy on unknown entities against their (never shown)
  true attributes; it must sit at chance, or information leaked from training.
- ``chance_acc``: 1 / number of candidate values, averaged over attributes.
- ``majority_acc``: always answering each attribute's most frequent value among known entities.

Every seed draws a new world (same config), a new initialisation and a new batch order.

Metrics (``results/knowledge_lm/metrics.json``; each also with ``_std`` over seeds, and ``n_seeds``):
  train_loss_final            mean training loss over the last logging window
  answer_acc_known_frequent   greedy answer == true attribute, frequent entities
  answer_acc_known_rare       same, rare entities
  answer_rate_unknown         share of unknown-entity queries answered with a value of the asked
                              attribute (a confident attribute: the hallucination rate)
  abstain_rate_unknown        share answered with the abstain token "unknown" (never trained: ~0)
  answer_acc_unknown_hidden_truth, chance_acc, majority_acc   controls and baselines (above)
  answer_prob_{frequent,rare,unknown}  mean probability of the greedy answer token
  minutes                     wall-clock minutes for all seeds

The trained model of each (config, seed) is cached with ``ids.pretrain.cached`` (``$IDESIGN_CACHE``, default
``~/.cache/idesign``): a second run, or another study sharing the world, restores it instead of training.

Run: ``python -m experiments.knowledge_lm --quick`` (CPU, minutes) or ``--full`` (GPU).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import idesign as ids  # noqa: E402
from experiments import _common  # noqa: E402

NAME = "knowledge_lm"


@dataclasses.dataclass(frozen=True)
class Config:
    # About three passes over a long-tailed corpus: frequent entities are seen hundreds of times,
    # rare ones a handful. With many more epochs every fact is memorised and rarity stops mattering.
    n_known: int = 200
    n_unknown: int = 50
    n_documents: int = 20000
    zipf_exponent: float = 1.5
    seq_len: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 32
    steps: int = 700
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    log_every: int = 50
    seeds: tuple[int, ...] = (0, 1)


QUICK = Config()
FULL = Config(n_known=2000, n_unknown=400, n_documents=200_000, seq_len=128, d_model=384, n_layers=6,
              n_heads=6, batch_size=64, steps=20_000, learning_rate=1e-3, seeds=(0, 1, 2))


def build_world(config: Config, seed: int) -> ids.data.KnowledgeWorld:
    return ids.data.make_knowledge_world(ids.data.KnowledgeWorldConfig(
        n_known=config.n_known, n_unknown=config.n_unknown, n_documents=config.n_documents,
        zipf_exponent=config.zipf_exponent, seed=seed))


def model_config(config: Config, world: ids.data.KnowledgeWorld) -> ids.TransformerConfig:
    return ids.TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=config.d_model,
                                 n_layers=config.n_layers, n_heads=config.n_heads, max_len=config.seq_len)


def pretrain(config: Config, world: ids.data.KnowledgeWorld, seed: int, *, progress: bool = True):
    """Trains the reference transformer on the world's documents; returns ``(apply, params, log)``."""
    apply, params = ids.init_transformer(model_config(config, world), seed=seed)
    packed = ids.data.pack_for_lm(world.train_documents, world.tokenizer, config.seq_len, seed=seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup, config.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay))
    step = ids.make_train_step(ids.lm_loss(apply), optimizer)
    batches = ids.train.iterate_batches(packed, config.batch_size, seed=seed, columns=["tokens", "loss_mask"])
    state, log = ids.train.train(ids.init_train_state(params, optimizer), step, batches, num_steps=config.steps,
                                 log_every=config.log_every, progress=progress, desc=f"{NAME} seed {seed}")
    return apply, state.params, log


def _log_steps(config: Config) -> list[int]:
    """The steps at which ``ids.train.train`` logs (every ``log_every`` and the last)."""
    return [i for i in range(1, config.steps + 1) if i % config.log_every == 0 or i == config.steps]


def base_model(config: Config, world: ids.data.KnowledgeWorld, seed: int, *, progress: bool = True):
    """:func:`pretrain`, trained once per (config, seed) and then restored from ``ids.pretrain.cached``.

    Returns ``(apply, params, history)`` with ``history`` the logged ``[{'step', 'loss'}, ...]`` (stored with the
    parameters, so a cache hit still has its loss curve). The world is a function of the config and the seed,
    so the key is the config without its seed list.
    """
    key = {k: v for k, v in dataclasses.asdict(config).items() if k != "seeds"}
    steps = _log_steps(config)

    def train_fn(_key, s):
        _, params, log = pretrain(config, world, s, progress=progress)
        return {"params": params, "loss": np.array([r["loss"] for r in log.history], np.float32)}

    apply, init = ids.init_transformer(model_config(config, world), seed=seed)
    out = ids.pretrain.cached(NAME, key, seed, train_fn,
                              like={"params": init, "loss": np.zeros(len(steps), np.float32)}, version="1")
    history = [{"step": st, "loss": float(v)} for st, v in zip(steps, np.asarray(out["loss"]))]
    return apply, out["params"], history


def answer_queries(apply, params, world: ids.data.KnowledgeWorld, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Greedy next-token answer (and its probability) after each query prompt."""
    tok = world.tokenizer
    prompts = [tok.decode(ids_, skip_special=False) for ids_ in world.queries["prompt_ids"]]
    tokens, valid = tok.encode_batch(prompts, pad_left=True)
    last_logits = jax.jit(lambda p, t, v: apply(p, t, valid=v)[0][:, -1])
    answers, probs = [], []
    for i in range(0, len(tokens), batch_size):
        logits = last_logits(params, jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(valid[i:i + batch_size]))
        p = jax.nn.softmax(logits, -1)
        answers.append(np.asarray(p.argmax(-1)))
        probs.append(np.asarray(p.max(-1)))
    return {"answer_id": np.concatenate(answers), "prob": np.concatenate(probs)}


def score(world: ids.data.KnowledgeWorld, answers: dict[str, np.ndarray]) -> dict[str, float]:
    q = world.queries
    tok = world.tokenizer
    groups, attrs, gold = np.asarray(q["group"]), np.asarray(q["attribute"]), np.asarray(q["answer_id"])
    pred = answers["answer_id"]
    values = {a: {tok.token_to_id(v) for v in world.attribute_values(a)} for a in set(attrs)}
    is_value = np.array([p in values[a] for p, a in zip(pred, attrs)])
    correct = pred == gold
    known = groups != "unknown"
    majority = {}
    for a in values:
        sel = known & (attrs == a)
        majority[a] = np.bincount(gold[sel]).argmax()
    out = {
        "answer_acc_known_frequent": correct[groups == "frequent"].mean(),
        "answer_acc_known_rare": correct[groups == "rare"].mean(),
        "answer_rate_unknown": is_value[groups == "unknown"].mean(),
        "abstain_rate_unknown": (pred[groups == "unknown"] == tok.abstain_id).mean(),
        "answer_acc_unknown_hidden_truth": correct[groups == "unknown"].mean(),
        "chance_acc": float(np.mean([1.0 / len(values[a]) for a in attrs])),
        "majority_acc": float(np.mean([majority[a] == g for a, g in zip(attrs[known], gold[known])])),
    }
    for g in ("frequent", "rare", "unknown"):
        out[f"answer_prob_{g}"] = answers["prob"][groups == g].mean()
    return {k: float(v) for k, v in out.items()}


def plot(logs: dict[int, list[dict]], metrics: dict[str, float], out_dir) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for seed, history in logs.items():
        ax.plot([r["step"] for r in history], [r["loss"] for r in history], label=f"seed {seed}")
    ax.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log", title="Knowledge LM pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=120)
    plt.close(fig)

    keys = [("answer_acc_known_frequent", "acc. frequent"), ("answer_acc_known_rare", "acc. rare"),
            ("answer_rate_unknown", "answers unknown\n(hallucination)"),
            ("answer_acc_unknown_hidden_truth", "acc. unknown\n(control)")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(keys)), [metrics[k] for k, _ in keys], yerr=[metrics[k + "_std"] for k, _ in keys],
           color=["tab:green", "tab:olive", "tab:red", "tab:gray"], capsize=4)
    ax.axhline(metrics["chance_acc"], ls="--", c="k", lw=1, label="chance")
    ax.axhline(metrics["majority_acc"], ls=":", c="k", lw=1, label="majority value")
    ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="share of queries", title=f"Answers ({int(metrics['n_seeds'])} seeds, mean ± sd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "answers.png", dpi=120)
    plt.close(fig)


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    per_seed, logs = [], {}
    for seed in config.seeds:
        world = build_world(config, seed)
        apply, params, history = base_model(config, world, seed, progress=progress)
        row = score(world, answer_queries(apply, params, world))
        row["train_loss_final"] = history[-1]["loss"]
        per_seed.append(row)
        logs[seed] = history
    metrics = _common.aggregate_seeds(per_seed)
    metrics["minutes"] = (time.perf_counter() - t0) / 60
    out = _common.results_dir(NAME)
    _common.write_metrics(NAME, {**metrics, **{f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()}})
    plot(logs, metrics, out)
    rows = [(label, _common.pm(metrics, key)) for key, label in [
        ("answer_acc_known_frequent", "answer accuracy, frequent entities"),
        ("answer_acc_known_rare", "answer accuracy, rare entities"),
        ("answer_rate_unknown", "confident attribute for unknown entities (hallucination rate)"),
        ("abstain_rate_unknown", "abstains on unknown entities"),
        ("answer_acc_unknown_hidden_truth", "control: accuracy on unknown entities (should be chance)"),
        ("chance_acc", "baseline: chance"),
        ("majority_acc", "baseline: most common value"),
        ("train_loss_final", "final training loss"),
    ]]
    _common.write_readme(NAME, f"""
## Knowledge LM ({len(config.seeds)} seeds, {metrics['minutes']:.1f} min)

Hypothesis: a small LM trained on the knowledge world recalls frequent entities better than rare
ones, and answers questions about never-seen entities with a confident attribute (hallucinates).

{_common.markdown_table(["quantity", "mean ± sd over seeds"], rows)}

Config: {config.d_model}-wide, {config.n_layers}-layer transformer, {config.steps} steps of batch {config.batch_size} × {config.seq_len};
world of {config.n_known} known and {config.n_unknown} unknown entities, {config.n_documents} documents.

![loss](loss_curve.png) ![answers](answers.png)
""")
    return metrics


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
