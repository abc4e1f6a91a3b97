"""Data debugging: probe-based attribution of preference pairs, and predicting what DPO will amplify.

World (``idesign.data.preference_world``). Prompts ask for an entity's attribute value; eight named sources
of (chosen, rejected) pairs prefer the right value to a wrong one. Two sources (``flattery_forum``,
``fan_mail``) at 15% of their pairs prefer the right value *with* a sycophantic marker phrase
(``<great> <question>``) to the same value without it (``planted``, ~3.75% of all pairs); a style source puts
the marker in both responses (pushes nothing), a counter source in the rejected one. A base model is
pretrained on plain text (marker in 3% of answers) and cached with ``ids.pretrain.cached``; every arm runs
DPO from it with the same optimizer, steps and batch order (per seed).

Fairness precondition: the behaviour (a sampled response to a held-out-entity prompt contains the marker)
is rare in the base model and DPO on the planted data raises it clearly; the oracle arm (drop exactly the
planted pairs) shows what removing the cause achieves.

Arms (``behaviour_rate.<arm>``): ``base`` (no DPO), ``dpo`` (all pairs), ``dpo_oracle_filtered`` (planted
pairs dropped: the upper bound), ``dpo_probe_filtered`` / ``dpo_probe_swapped`` (the top ``budget`` share of
pairs by probe score removed / their labels swapped), ``dpo_sources_dropped`` (the ``n_drop_sources``
sources with the highest mean probe score dropped), ``dpo_random_filtered`` (``budget`` random pairs removed),
``dpo_gradient_filtered`` (the top ``budget`` by TracIn-style gradient score removed).

Attribution: the probe is a logistic probe on the base model's mean response activation, fitted on
behaviour-labelled *concept* responses (not preference pairs), read at the earliest block's ``resid_post`` whose
held-out AUC on the concept rows (half the prompts held out) is within ``site_tolerance`` of the best block's
(``attribution.probe_layer``; the scorer's forward stops at its read site); a pair's score is
probe(chosen) − probe(rejected), scored by ``probe_pair_scorer`` (one jitted forward per chunk). The gradient baseline dots each pair's DPO gradient (at the base model,
``vmap(grad)``) with the gradient of the marker's NLL on the same concept prompts (the same information),
normalised to a cosine (``gradient_cosine``; raw dot products rank by gradient size: their precision is
reported as ``attribution.gradient_raw_precision_at_k``).
``precision_at_k``: share of the top ``budget`` pairs that are planted (at most planted / k when k exceeds
the planted count); ``probe_time_ratio``: probe scoring time / gradient attribution time (warm, compile
excluded, the fastest of ``timing_repeats`` runs, the pairs tokenised once untimed; timings on a shared CPU are noisy).

Prediction: a TopK SAE on the base model's response-token activations (last ``resid_post``); predicted
shift per feature = mean over pairs of (chosen − rejected) mean code; actual shift = mean code on the DPO
model's sampled responses to held-out prompts minus on the base model's, both read through the base model.
``prediction.r2`` is the squared correlation across the *studied* features, a set fixed from the base model's
codes before any DPO (fire on >= ``min_firing`` of pair response tokens; the token a feature fires on most is not
an entity value: a value feature's predicted shift is which entities the pairs ask about). ``prediction.oracle_r2``
is the upper bound: the same actual-shift measurement on an independent DPO run (the random-filtered arm, every
batch different, fresh samples) against the actual shift. ``prediction.r2_weighted`` is the same R² for
``data_attribution.first_order_feature_shift`` (each response weighted by the base model's probability of
producing it, measured against the base's own sampled mean at the pair's prompt: the first-order change of the
sampled feature mean under a DPO step, docs/methods.md §7); ``corr`` / ``corr_weighted`` / ``oracle_corr`` are
the signed correlations (an R² with a free slope cannot tell a prediction of the wrong sign). Also ``r2_all`` / ``oracle_r2_all`` (every feature) and
``*_train_prompts`` (actual shift read on the pairs' prompts). The top predicted studied features are named by the
token they fire on most and its planted meaning, with the part of the prediction from value-only pairs (a diagnostic
that reads the world's marker flags).

Metrics (``results/data_debugging/metrics.json``; ``_runner`` keys ``<arm>.<m>_mean/_std``, plus the names
of issue 18 as the means over seeds): ``behaviour_rate.<arm>``, ``attribution.probe_precision_at_k``,
``attribution.gradient_precision_at_k``, ``attribution.probe_time_ratio``, ``prediction.r2``, ``prediction.oracle_r2``,
``behaviour_rate.probe_filtered_relative_cut`` (1 − probe_filtered / dpo).

Run: ``python -m experiments.data_debugging --quick``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
import optax

import idesign as ids
from experiments import _common, _runner
from idesign import data_attribution as da
from idesign import preference as pref
from idesign.data import preference_world as pw

NAME = "data_debugging"
ARMS = ("base", "dpo", "dpo_oracle_filtered", "dpo_probe_filtered", "dpo_probe_swapped", "dpo_sources_dropped",
        "dpo_random_filtered", "dpo_gradient_filtered")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Everything that determines the pretrained base model (its cache key)."""

    world: pw.PreferenceWorldSpec = pw.PreferenceWorldSpec()
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    n_pretrain: int = 8192
    pretrain_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3


@dataclasses.dataclass(frozen=True)
class Config:
    base: BaseConfig = BaseConfig()
    dpo_steps: int = 300
    dpo_batch: int = 64
    dpo_lr: float = 1e-3
    beta: float = 0.1
    budget: float = 0.05            # share of pairs removed / swapped by the pair-level interventions
    n_drop_sources: int = 2
    n_concept: int = 512
    probe_C: float = 1.0
    samples: int = 8                # sampled responses per held-out prompt
    sae_features: int = 64
    sae_k: int = 4
    sae_steps: int = 1000
    min_firing: float = 0.01        # studied features fire on at least this share of pair response tokens
    timing_repeats: int = 3
    site_tolerance: float = 0.01    # the probe reads the earliest block output within this AUC of the best
    gradient_cosine: bool = True    # the gradient baseline's stronger variant (raw dots: precision reported too)
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Config()
FULL = Config(base=BaseConfig(world=pw.PreferenceWorldSpec(n_entities=256, pairs_per_source=1000), d_model=64,
                              n_layers=4, n_heads=4, n_pretrain=65536, pretrain_steps=3000),
              dpo_steps=1500, samples=16, sae_features=256, sae_k=8, sae_steps=4000, seeds=(0, 1, 2, 3, 4))


def model_config(base: BaseConfig) -> ids.TransformerConfig:
    w = base.world
    return ids.TransformerConfig(vocab_size=w.vocab_size, d_model=base.d_model, n_layers=base.n_layers,
                                 n_heads=base.n_heads, max_len=w.prompt_len + w.max_response_len)


def pretrain(base: BaseConfig, seed: int) -> Any:
    apply, params = ids.init_transformer(model_config(base), seed=seed)
    values = pw.make_world(base.world, seed).values
    rows = pw.pretraining_rows(base.world, values, base.n_pretrain, seed)
    opt = optax.adamw(base.learning_rate, weight_decay=0.01)
    step = ids.train.make_train_step(ids.train.lm_loss(apply), opt)
    state, _ = ids.train.train(ids.init_train_state(params, opt), step,
                               ids.train.iterate_batches(rows, base.batch_size, seed=seed),
                               num_steps=base.pretrain_steps, log_every=base.pretrain_steps, progress=False)
    return state.params


def base_model(base: BaseConfig, seed: int) -> tuple[Any, Any]:
    apply = ids.init_transformer(model_config(base), seed=0)[0]
    params = ids.pretrain.cached("preference-world-base", base, seed, pretrain,
                                 like=lambda: ids.init_transformer(model_config(base))[1])
    return apply, params


def run_dpo(step, base_params, pairs, config: Config, seed: int, length: int) -> Any:
    """DPO from the base model; batches drawn with a per-seed generator (the same order for every arm)."""
    opt = optax.adam(config.dpo_lr)
    state = ids.init_train_state(base_params, opt)
    enc = pref.encode_pairs(pairs[:], pad_id=pw.PAD, length=length)
    rng = np.random.default_rng([seed, 7])
    n = len(pairs)
    for _ in range(config.dpo_steps):
        idx = rng.choice(n, min(config.dpo_batch, n), replace=False)
        state, _ = step(state, {k: v[idx] for k, v in enc.items()})
    return state.params


def token_name(spec: pw.PreferenceWorldSpec, t: int) -> str:
    names = {pw.PAD: "<pad>", pw.BOS: "<bos>", pw.EOS: "<eos>", spec.great: "<great>", spec.question: "<question>",
             spec.ask: "<ask>"}
    if t in names:
        return names[t]
    if t < spec.entity(0):
        return f"<style_{t - spec.style(0)}>"
    if t < spec.value(0):
        return f"<entity_{t - spec.entity(0)}>"
    return f"<value_{t - spec.value(0)}>"


def meaning(spec: pw.PreferenceWorldSpec, t: int) -> str:
    """The planted meaning of a response token."""
    if t in spec.marker:
        return "sycophantic marker"
    if t == pw.EOS:
        return "end of answer"
    return "entity value" if t >= spec.value(0) else "other"


def run_seed(config: Config, seed: int, info: dict) -> dict[str, dict[str, float]]:
    spec = config.base.world
    world = pw.make_world(spec, seed, n_concept=config.n_concept)
    apply, base = base_model(config.base, seed)
    site = f"blocks.{config.base.n_layers - 1}.resid_post"
    length = spec.prompt_len + spec.max_response_len
    shows = lambda toks: pw.shows_behaviour(spec, toks)
    rate = lambda p: da.behaviour_rate(apply, p, world.eval_prompts, shows, max_new_tokens=spec.max_response_len,
                                       samples=config.samples, seed=seed, eos_id=pw.EOS)
    pairs = world.pairs
    planted = np.asarray(pairs["planted"], bool)
    k = int(np.floor(config.budget * len(pairs)))
    rows = {c: pairs[c] for c in ("prompt", "chosen", "rejected")}

    # --- attribution -----------------------------------------------------------------------------
    concept = {"prompt": world.concept["prompt"], "chosen": world.concept["response"],
               "rejected": world.concept["response"]}
    # The probe's read site, chosen by validation with a rule fixed in advance: the earliest block output whose
    # held-out AUC on the concept rows (half the prompts held out) is within `site_tolerance` of the best.
    sites = [f"blocks.{layer}.resid_post" for layer in range(config.base.n_layers)]
    concept_acts = {s: da.response_activations(apply, base, concept, s, pad_id=pw.PAD)["chosen"] for s in sites}
    groups = [" ".join(map(str, p)) for p in world.concept["prompt"]]
    table = ids.probes.sweep(concept_acts, world.concept["behaviour"], groups=groups, split=0.5, seed=seed,
                             C=config.probe_C, n_boot=200)
    probe_site = da.earliest_good_site(list(table.sites), table.auc, tolerance=config.site_tolerance)
    probe = ids.probes.fit_logistic(concept_acts[probe_site], world.concept["behaviour"], C=config.probe_C)

    # The lean path: one jitted forward over chosen and rejected together, capture at the read site only, mean
    # and dot product inside the jit (the layers after the read site are dead code: XLA drops them). Checked
    # against the collect path below.
    scorer = da.probe_pair_scorer(apply, probe_site, pad_id=pw.PAD)

    encoded = pref.encode_pairs(rows, pad_id=pw.PAD)   # tokenisation is shared by both methods: not timed

    def probe_scores():
        return scorer(base, probe, encoded)

    marked = world.concept["behaviour"] == 1
    behaviour_loss = da.behaviour_nll(apply, [p for p, m in zip(world.concept["prompt"], marked) if m],
                                      [list(spec.marker)] * int(marked.sum()), pad_id=pw.PAD)

    def gradient_scores():
        return da.gradient_pair_scores(apply, base, base, encoded, behaviour_loss, pad_id=pw.PAD, beta=config.beta,
                                       normalize=config.gradient_cosine)

    timings = {}
    for name, fn in (("probe", probe_scores), ("gradient", gradient_scores)):
        fn()                                  # compile
        times = []
        for _ in range(config.timing_repeats):   # the fastest of a few warm runs: the least disturbed by other load
            t0 = time.perf_counter()
            timings[name + "_scores"] = fn()
            times.append(time.perf_counter() - t0)
        timings[name] = min(times)
    p_scores, g_scores = timings["probe_scores"], timings["gradient_scores"]
    reference = da.probe_pair_scores(probe, da.response_activations(apply, base, rows, probe_site, pad_id=pw.PAD))
    np.testing.assert_allclose(p_scores, reference, rtol=1e-3, atol=1e-3)
    p_top, g_top = da.top_k(p_scores, k), da.top_k(g_scores, k)
    ranked_sources = list(da.source_scores(p_scores, pairs["source"]))
    dropped = ranked_sources[:config.n_drop_sources]
    random_top = np.sort(np.random.default_rng([seed, 11]).choice(len(pairs), k, replace=False))

    # --- DPO arms ----------------------------------------------------------------------------------
    step = pref.make_dpo_step(apply, base, optax.adam(config.dpo_lr), beta=config.beta)
    datasets_by_arm = {
        "dpo": pairs, "dpo_oracle_filtered": da.filter_pairs(pairs, np.flatnonzero(planted)),
        "dpo_probe_filtered": da.filter_pairs(pairs, p_top), "dpo_probe_swapped": da.swap_pairs(pairs, p_top),
        "dpo_sources_dropped": da.drop_sources(pairs, dropped),
        "dpo_random_filtered": da.filter_pairs(pairs, random_top),
        "dpo_gradient_filtered": da.filter_pairs(pairs, g_top)}
    out = {"base": {"behaviour_rate": rate(base)}}
    trained = {}
    for arm, data in datasets_by_arm.items():
        trained[arm] = run_dpo(step, base, data, config, seed, length)
        out[arm] = {"behaviour_rate": rate(trained[arm])}
    for arm in ARMS[1:]:
        out[arm]["relative_cut"] = 1.0 - out[arm]["behaviour_rate"] / max(out["dpo"]["behaviour_rate"], 1e-12)

    # --- prediction --------------------------------------------------------------------------------
    token_acts = da.response_activations(apply, base, rows, site, pad_id=pw.PAD, tokens=True)
    sae_params, _ = ids.sae.train_sae(np.concatenate([token_acts["chosen"], token_acts["rejected"]]),
                                      ids.sae.SAEConfig(n_features=config.sae_features, k=config.sae_k,
                                                        steps=config.sae_steps), seed=seed)
    feats = {s: da.response_feature_means(sae_params, config.sae_k, token_acts[s], token_acts[f"{s}_row"], len(pairs))
             for s in ("chosen", "rejected")}
    predicted = da.feature_shift(feats["chosen"], feats["rejected"])

    # The studied feature set, fixed from the base model's codes on the pairs before any DPO: features that
    # fire on >= `min_firing` of response tokens, minus those tied to entity values (the token a feature fires on
    # most is a value token). A value feature's predicted shift is P(chosen has v) - P(rejected has v), a fact
    # about which entities the pairs ask about, which cannot carry over to other prompts.
    codes = np.asarray(ids.sae.encode(sae_params, np.concatenate([token_acts["chosen"], token_acts["rejected"]]),
                                      config.sae_k))
    tok = np.asarray([t for side in ("chosen", "rejected") for r in rows[side] for t in r])
    present = np.unique(tok)
    top_token = present[np.argmax(np.stack([codes[tok == t].mean(0) for t in present]), axis=0)]
    alive = (codes > 0).mean(0) >= config.min_firing
    value_tied = top_token >= spec.value(0)
    studied = alive & ~value_tied

    def generated_features(params, prompts, key, per_prompt=False):
        n_prompts = len(prompts)
        prompts = np.repeat(prompts, config.samples, 0)
        gen = ids.generate(apply, params, prompts, max_new_tokens=spec.max_response_len, key=jax.random.key(key),
                           sampling=ids.SamplingConfig(temperature=1.0), eos_id=pw.EOS)
        responses = [[int(t) for t in r[:list(r).index(pw.EOS) + 1]] if pw.EOS in r else [int(t) for t in r]
                     for r in np.asarray(gen.tokens)]
        g_rows = {"prompt": prompts.tolist(), "chosen": responses, "rejected": responses}
        acts = da.response_activations(apply, base, g_rows, site, pad_id=pw.PAD, tokens=True)
        means = da.response_feature_means(sae_params, config.sae_k, acts["chosen"], acts["chosen_row"], len(prompts))
        return means.reshape(n_prompts, config.samples, -1).mean(1) if per_prompt else means.mean(0)

    held = world.eval_prompts
    train_prompts = np.unique(np.asarray(rows["prompt"], np.int32), axis=0)
    base_held = generated_features(base, held, seed + 1)
    actual = generated_features(trained["dpo"], held, seed + 1) - base_held
    # Oracle (upper bound): the shift measured by an independent DPO run (random 95% of the pairs, so every batch
    # differs) on fresh samples; it shows how far the actual shift itself is reproducible.
    oracle = generated_features(trained["dpo_random_filtered"], held, seed + 2) - generated_features(base, held, seed + 2)
    actual_train = (generated_features(trained["dpo"], train_prompts, seed + 3)
                    - generated_features(base, train_prompts, seed + 3))
    # The weighted predictor (docs/methods.md §7; rule fixed before any outcome was read): the first-order change
    # of the base model's *sampled* feature means under a DPO step, each response weighted by the base model's
    # probability of producing it, the feature measured against the base's own mean at that prompt (fresh
    # samples, key seed + 4). Computed from the base model and the pairs only.
    enc = pref.encode_pairs(rows, pad_id=pw.PAD)
    logprob = {s: np.asarray(pref.sequence_logprobs(apply, base, enc[f"{s}_tokens"], enc[f"{s}_mask"],
                                                    enc[f"{s}_valid"])) for s in ("chosen", "rejected")}
    base_train = generated_features(base, train_prompts, seed + 4, per_prompt=True)
    prompt_index = {tuple(p): i for i, p in enumerate(train_prompts.tolist())}
    baseline = base_train[[prompt_index[tuple(p)] for p in rows["prompt"]]]
    predicted_weighted = da.first_order_feature_shift(feats["chosen"], feats["rejected"], logprob["chosen"],
                                                      logprob["rejected"], baseline)
    r2 = lambda x, y, m: da.r2(x[m], y[m]) if m.sum() >= 3 else float("nan")
    corr = lambda x, y, m: (float(np.corrcoef(x[m], y[m])[0, 1]) if m.sum() >= 3 and x[m].std() > 0 and y[m].std() > 0
                            else float("nan"))
    everything = np.ones_like(studied)
    prediction = {"r2": r2(predicted, actual, studied), "oracle_r2": r2(oracle, actual, studied),
                  "r2_train_prompts": r2(predicted, actual_train, studied),
                  "oracle_r2_train_prompts": r2(oracle, actual_train, studied),
                  "r2_weighted": r2(predicted_weighted, actual, studied),
                  # R² is a squared correlation (free slope): the signed correlations say whether a predictor
                  # gets the direction right.
                  "corr": corr(predicted, actual, studied), "corr_weighted": corr(predicted_weighted, actual, studied),
                  "oracle_corr": corr(oracle, actual, studied),
                  "r2_weighted_all": r2(predicted_weighted, actual, everything),
                  "r2_weighted_train_prompts": r2(predicted_weighted, actual_train, studied),
                  "base_p_chosen": float(np.exp(logprob["chosen"]).mean()),
                  "base_p_rejected": float(np.exp(logprob["rejected"]).mean()),
                  "r2_all": r2(predicted, actual, everything), "oracle_r2_all": r2(oracle, actual, everything),
                  "r2_alive": r2(predicted, actual, alive), "n_studied": float(studied.sum()),
                  "n_alive": float(alive.sum())}
    top = [int(f) for f in np.argsort(-np.abs(np.where(studied, predicted, 0.0)))[:5]]
    # Diagnostic (reads the world's marker flags, never used by the predictor): the part of each predicted shift
    # that comes from pairs without the marker on either side, i.e. from right-vs-wrong value alone.
    plain = ~(np.asarray(pairs["chosen_marker"], bool) | np.asarray(pairs["rejected_marker"], bool))
    from_plain = (feats["chosen"][plain] - feats["rejected"][plain]).sum(0) / len(pairs)
    named = [f"{f}:{token_name(spec, int(top_token[f]))}={meaning(spec, int(top_token[f]))} "
             f"(pred {predicted[f]:+.3f} of which value-only pairs {from_plain[f]:+.3f}, weighted "
             f"{predicted_weighted[f]:+.4f}, actual {actual[f]:+.3f}, "
             f"oracle {oracle[f]:+.3f})" for f in top]
    info.setdefault("top_features", {})[seed] = named
    info.setdefault("dropped_sources", {})[seed] = dropped
    return {**out,
            "attribution": {"probe_precision_at_k": da.precision_at_k(p_top, planted),
                            "gradient_precision_at_k": da.precision_at_k(g_top, planted),
                            "random_precision_at_k": da.precision_at_k(random_top, planted),
                            "gradient_raw_precision_at_k": da.precision_at_k(da.top_k(da.gradient_pair_scores(
                                apply, base, base, rows, behaviour_loss, pad_id=pw.PAD, beta=config.beta), k), planted),
                            "probe_recall": float(planted[p_top].sum() / max(planted.sum(), 1)),
                            "sources_dropped_planted": float(np.mean([s in spec.planted_sources for s in dropped])),
                            "probe_time_ratio": timings["probe"] / timings["gradient"],
                            "probe_seconds": timings["probe"], "gradient_seconds": timings["gradient"],
                            "k": float(k), "planted": float(planted.sum()),
                            "probe_layer": float(sites.index(probe_site)),
                            **{f"probe_site_auc_{i}": float(a) for i, a in enumerate(table.auc)}},
            "prediction": prediction}


ISSUE_KEYS = {**{f"behaviour_rate.{a}": f"{a}.behaviour_rate_mean" for a in ARMS},
              "attribution.probe_precision_at_k": "attribution.probe_precision_at_k_mean",
              "attribution.gradient_precision_at_k": "attribution.gradient_precision_at_k_mean",
              "attribution.probe_time_ratio": "attribution.probe_time_ratio_mean",
              "prediction.r2": "prediction.r2_mean", "prediction.oracle_r2": "prediction.oracle_r2_mean",
              "prediction.r2_weighted": "prediction.r2_weighted_mean"}


def main(config: Config = QUICK, *, progress: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {}
    pairs = [(a, "dpo") for a in ARMS if a != "dpo"]
    result = _runner.run(NAME, config.seeds, lambda s: run_seed(config, s, info), pairs=pairs, progress=progress)
    summary = dict(result.summary)
    for key, source in ISSUE_KEYS.items():
        summary[key] = summary[source]
        summary[key + "_std"] = summary[source.replace("_mean", "_std")]
    summary["top_features"] = {str(s): v for s, v in info["top_features"].items()}
    summary["dropped_sources"] = {str(s): v for s, v in info["dropped_sources"].items()}
    summary.update({f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()})
    _common.write_metrics(NAME, summary)
    table = _runner.arm_table(summary, list(ARMS), ["behaviour_rate"])
    cut = _runner.arm_table(summary, list(ARMS[2:]), ["relative_cut"],
                            labels={"relative_cut": "cut relative to plain DPO"})
    attr = _runner.arm_table(summary, ["attribution"], ["probe_precision_at_k", "gradient_precision_at_k",
                                                        "random_precision_at_k", "probe_time_ratio", "probe_layer"])
    paired = _runner.paired_table(summary, [(a, "dpo") for a in ARMS[2:]], ["behaviour_rate"])
    feats = "\n".join(f"- seed {s}: " + "; ".join(v) for s, v in summary["top_features"].items())
    _common.write_readme(NAME, f"""
## Data debugging ({len(config.seeds)} seeds, {summary['minutes']:.1f} min)

Hypothesis: a behaviour probe on the base model ranks preference pairs by how much they push the behaviour,
as well as gradient attribution at a fraction of its cost, and base-model SAE features on chosen minus rejected
responses predict which features DPO amplifies. Targets: probe filtering at ≤ {config.budget:.0%} of pairs cuts
the behaviour ≥ 50% relative to plain DPO and beats random filtering; probe_time_ratio ≤ 0.1; prediction R² ≥ 0.8.

Behaviour rate (sampled responses to held-out prompts containing the sycophantic marker):

{table}

{cut}

Attribution (top k = {config.budget:.0%} of pairs; precision is capped at planted / k):

{attr}

Prediction R² over the studied features (firing on ≥ {config.min_firing:.0%} of pair response tokens, not tied to
an entity value), predicted vs actual shift on held-out prompts:

{_runner.arm_table(summary, ["prediction"], ["r2", "r2_weighted", "oracle_r2", "corr", "corr_weighted", "oracle_corr",
                                             "r2_train_prompts",
                                             "r2_weighted_train_prompts", "oracle_r2_train_prompts",
                                             "r2_all", "oracle_r2_all", "n_studied"])}

Sources dropped by probe score: {summary['dropped_sources']}. Top predicted studied features (token they fire on
most = planted meaning):

{feats}

Paired differences against plain DPO:

{paired}
""")
    return summary


if __name__ == "__main__":
    main(_common.cli(__doc__.splitlines()[0], QUICK, FULL))
