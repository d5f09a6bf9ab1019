"""DoRA (Zhu et al., NeurIPS 2025) and its ablations on ShiftBench ``synthetic_shift``.

Most training lists are generated and judged by biased synthetic sources (a sycophantic and a
verbose LLM), a minority (α = 0.2) by the target ("human") distribution; the coarse source of
every list is known. Per seed: build the scenario, SFT a tiny Llama on the mixture corpus (=
the reference), precompute reference log-probs for the pairs and the K-candidate lists, train
the source classifier on mean-pooled reference hidden states (held-out calibration report and
reliability plot per seed), store ``p`` per response, then train every method from the
reference and evaluate on the TARGET distribution: implicit-reward accuracy on held-out target
pairs (all, and the pairs whose responses differ in flattery, where the biased sycophant judge
and the target disagree most), and the target reward / flattery count / win rate / KL of
sampled responses.

Methods (``experiments/configs/dora.yaml``), for DPO and for Plackett–Luce DPO (K = 4): ERM,
robust DPO, DR-DPO (pairwise only), vanilla DRO ``λ·log mean exp(ℓ/λ)``, reweighting only
``mean(h̃·ℓ)``, and DoRA ``λ·log mean exp(h̃·ℓ/λ)`` (λ = 1; the log-mean-exp runs over each
training micro-batch = the global batch of 32 prompts here). Writes ``summary.json`` (design
schema, mean and ``_sem`` over seeds, plus ``diagnostics``: classifier reports and the mean
calibration weight per source), ``results.md``, ``metrics.jsonl``, ``training_curves.png`` and
``seed_<s>/reliability.png``.

    python experiments/dora.py --config experiments/configs/dora.yaml --out results/dora [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from alignshift.cli import experiment_parser, parse_experiment_args, prepare_out_dir
from alignshift.config import ConfigError, ExperimentConfig, to_dict
from alignshift.data import encode_pairs, encode_prompts, make_scenario
from alignshift.data.encode import encode_lists
from alignshift.eval.report import aggregate_seeds, format_table, plot_training_curves, read_jsonl, write_json_atomic
from alignshift.eval.shift_eval import implicit_rewards, sample_and_score, win_rate
from alignshift.losses.dora import dora_calibration
from alignshift.rewards.source_classifier import (
    ClassifierConfig,
    SourceClassifier,
    attach_source_probs,
    plot_reliability,
    reference_features,
)
from alignshift.train.metrics import JsonlWriter
from alignshift.train.runner import add_lora, build_policy, objective_for, precompute_reference_logps, \
    run_preference, run_sft
from alignshift.train.steps import make_logits_fn, split_model

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "dora.yaml")
CALIBRATED = ("dora", "dora_reweight")  # rules that read the classifier's p

COLUMNS = [
    ("target_pref_acc", "target pref. acc."),
    ("target_pref_acc_flat", "acc. (flattery differs)"),
    ("target_reward", "target reward (sampled)"),
    ("n_flat", "flattery words (sampled)"),
    ("win_rate_vs_ref", "win rate vs ref"),
    ("kl_to_ref", "KL to ref"),
]


@dataclasses.dataclass
class ClassifierSettings:
    """The DoRA source classifier (alignshift/rewards/source_classifier.py)."""

    mode: str = "pooled"  # pooled (target vs all sources) | per_source (one per source, the paper)
    features: str = "reference"  # reference (mean-pooled frozen-reference hidden states) | hf (model.hf_encoder)
    hf_encoder: str = ""  # local HF encoder folder when features == "hf"
    pool: str = "response"  # response | all (prompt tokens too)
    hidden: int = 0  # 0 = logistic regression
    steps: int = 300
    lr: float = 0.05
    l2: float = 1e-3
    holdout: float = 0.2


@dataclasses.dataclass
class DoraExperimentConfig(ExperimentConfig):
    classifier: ClassifierSettings = dataclasses.field(default_factory=ClassifierSettings)


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/dora")
    args, cfg = parse_experiment_args(parser, argv, cls=DoraExperimentConfig)
    try:
        if cfg.data.scenario != "synthetic_shift":
            raise ConfigError(f"dora needs data.scenario=synthetic_shift, got {cfg.data.scenario!r}")
        c = cfg.classifier
        if c.mode not in ("pooled", "per_source") or c.features not in ("reference", "hf") or \
                c.pool not in ("response", "all") or (c.features == "hf" and not c.hf_encoder):
            raise ConfigError(f"config key 'classifier' is invalid: {c}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


# ------------------------------------------------------------------------------ data


def _list_reference(logits_fn, ref_params, lists: dict) -> np.ndarray:
    n, k, t = lists["cand_input_ids"].shape
    flat = {f"cand_{f}": lists[f"cand_{f}"].reshape(n * k, t) for f in ("input_ids", "attention_mask", "loss_mask")}
    return precompute_reference_logps(logits_fn, ref_params, flat, groups=("cand",))["reference_cand_logps"].reshape(n, k)


def _pair_columns(data) -> np.ndarray:
    """For each training pair, the list columns of its chosen and rejected response, ``[N, 2]``."""
    cols = []
    for le, ex in zip(data.train_lists, data.train):
        c = le.candidates
        cols.append((c.index(ex.chosen), max(j for j in range(len(c)) if c[j] == ex.rejected)))
    return np.asarray(cols, np.int64)


def _fit_classifier(cfg, data, graphdef, rest, ref_params, lists, seed, seed_dir):
    c = cfg.classifier
    n, k, t = lists["cand_input_ids"].shape
    if c.features == "hf":
        from alignshift.rewards.source_classifier import hf_encoder_features

        feats = hf_encoder_features(c.hf_encoder, [le.prompt for le in data.train_lists for _ in le.candidates],
                                    [x for le in data.train_lists for x in le.candidates])
    else:
        flat = {f: lists[f"cand_{f}"].reshape(n * k, t) for f in ("input_ids", "attention_mask", "loss_mask")}
        feats = reference_features(graphdef, rest, ref_params, flat, pool=c.pool)
    sources = [le.meta["source"] for le in data.train_lists for _ in range(k)]
    clf = SourceClassifier(mode=c.mode, holdout=c.holdout,
                           config=ClassifierConfig(hidden=c.hidden, steps=c.steps, lr=c.lr, l2=c.l2))
    clf.fit(feats, sources, mixture=data.mixture, seed=seed)
    plot_reliability(clf.reports, os.path.join(seed_dir, "reliability.png"))
    p, a = clf.predict(feats)
    return clf, p, a, np.asarray(sources)


@dataclasses.dataclass
class Ctx:
    cfg: DoraExperimentConfig
    seed: int
    data: object
    graphdef: object
    rest: object
    ref_params: object
    init_params: object
    logits_fn: object
    pairs: dict
    lists: dict
    test: dict
    prompts: list
    prompt_arrays: dict
    flat_diff: np.ndarray
    oracle: dict | None = None  # {"pairs", "lists"}: n_train lists drawn from the TARGET distribution


def _encode(tok, data, enc):
    pairs = encode_pairs(tok, data.train, **enc)
    lists = encode_lists(tok, [le.prompt for le in data.train_lists], [list(le.candidates) for le in data.train_lists],
                         [list(le.scores) for le in data.train_lists], **enc)
    return pairs, lists


def _with_reference(logits_fn, ref_params, pairs, lists):
    pairs.update(precompute_reference_logps(logits_fn, ref_params, pairs))
    lists["reference_cand_logps"] = _list_reference(logits_fn, ref_params, lists)
    # run_preference checks that precomputed pairwise reference log-probs are present; for the
    # list arrays they are those of the best / worst-scored candidates (unused by listwise steps)
    order = np.argsort(-lists["cand_scores"], axis=1, kind="stable")
    rows = np.arange(len(order))
    lists["reference_chosen_logps"] = lists["reference_cand_logps"][rows, order[:, 0]]
    lists["reference_rejected_logps"] = lists["reference_cand_logps"][rows, order[:, -1]]


def prepare(cfg: DoraExperimentConfig, seed: int, out: str, writer: JsonlWriter):
    seed_dir = os.path.join(out, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    data = make_scenario("synthetic_shift", seed=seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    pairs, lists = _encode(tok, data, enc)
    test = encode_pairs(tok, data.test, **enc)
    oracle = None
    if any(m.train_data == "oracle" for m in cfg.methods):  # same size, all lists from the target source
        odata = make_scenario("synthetic_shift", seed=seed, **{**cfg.data.scenario_kwargs, "mixture": {"target": 1.0}})
        if odata.tokenizer.vocab != tok.vocab:  # pragma: no cover - same world, same words
            raise RuntimeError("oracle data has a different vocabulary")
        oracle = dict(zip(("pairs", "lists"), _encode(tok, odata, enc)))

    model = build_policy(cfg.model, tok, seed=seed)
    graphdef, _, rest = split_model(model)
    sw = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "sft", "method": "sft"})
    ref_params = run_sft(model, data.sft, tok, cfg, seed=seed, writer=sw,
                         checkpoint_dir=os.path.join(seed_dir, "checkpoints", "sft"))
    sw.close()
    init_params = None
    if cfg.model.lora.enabled:
        nnx.update(model, ref_params)
        graphdef, rest, init_params, ref_params = add_lora(model, cfg.model, seed=seed)
    logits_fn = make_logits_fn(graphdef, rest)
    test.update(precompute_reference_logps(logits_fn, ref_params, test))
    _with_reference(logits_fn, ref_params, pairs, lists)
    if oracle is not None:
        _with_reference(logits_fn, ref_params, oracle["pairs"], oracle["lists"])

    t0 = time.perf_counter()
    clf, p, a, sources = _fit_classifier(cfg, data, graphdef, rest, ref_params, lists, seed, seed_dir)
    k = lists["cand_input_ids"].shape[1]
    lists.update(attach_source_probs({}, p, a, k))
    cols = _pair_columns(data)
    pk, ak = p.reshape(-1, k), a.reshape(-1, k)
    pairs["source_prob"] = np.take_along_axis(pk, cols, 1).astype(np.float32)
    pairs["source_share"] = np.take_along_axis(ak, cols, 1).astype(np.float32)
    h = np.asarray(dora_calibration(p, alpha=data.alpha, source_share=a))
    H = h.reshape(-1, k).mean(1)
    src_list = sources.reshape(-1, k)[:, 0]
    diag = {
        "classifier": clf.summary(),
        "classifier_time_s": time.perf_counter() - t0,
        "mean_h_by_source": {s: float(h[sources == s].mean()) for s in data.sources},
        "mean_H_by_source": {s: float(H[src_list == s].mean()) for s in data.sources},
        "h_max": float(h.max()), "h_bound": 1.0 / data.alpha,
        "H_ess": float(H.sum() ** 2 / (len(H) * (H ** 2).sum())),
        "share_of_H_on_target": float(H[src_list == "target"].sum() / H.sum()),
    }
    # investigation aid: the same classifier on the generator's own sufficient features
    # (helpfulness, n_flat, n_pad, length) — how much source signal the hidden states lose
    oracle_x = np.asarray([data.world.features(le.prompt, c) for le in data.train_lists for c in le.candidates],
                          np.float32)
    feat_clf = SourceClassifier(mode=cfg.classifier.mode, holdout=cfg.classifier.holdout,
                                config=ClassifierConfig(steps=cfg.classifier.steps, lr=cfg.classifier.lr))
    feat_clf.fit(oracle_x, sources, mixture=data.mixture, seed=seed)
    diag["oracle_feature_classifier"] = feat_clf.summary()["reports"]
    prompts = [e.prompt for e in data.test[: min(cfg.eval.n_prompts, len(data.test))]]
    flat_diff = np.asarray([data.world.features(e.prompt, e.chosen)[1] != data.world.features(e.prompt, e.rejected)[1]
                            for e in data.test])
    ctx = Ctx(cfg, seed, data, graphdef, rest, ref_params, init_params, logits_fn, pairs, lists, test, prompts,
              encode_prompts(tok, prompts, max_prompt_len=cfg.data.max_prompt_len), flat_diff, oracle)
    return ctx, diag, seed_dir


# ------------------------------------------------------------------------------ evaluation


def _sample(ctx: Ctx, params):
    e = ctx.cfg.eval
    return sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, ctx.prompt_arrays, ctx.prompts,
                            tokenizer=ctx.data.tokenizer, reward_fn=ctx.data.reward_fn,
                            metrics_fn=ctx.data.metrics_fn, key=jax.random.PRNGKey(10_000 + ctx.seed),
                            max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                            batch_size=e.batch_size)


def _accuracy(ctx: Ctx, objective, params) -> dict:
    c, r = implicit_rewards(ctx.logits_fn, params, ctx.test, objective)
    hit = c > r
    return {"target_pref_acc": float(hit.mean()), "target_pref_acc_flat": float(hit[ctx.flat_diff].mean())}


def evaluate(ctx: Ctx, objective, params, ref_eval) -> dict:
    ev = _sample(ctx, params)
    return {**_accuracy(ctx, objective, params), "target_reward": ev["reward"], "n_flat": ev["n_flat"],
            "n_pad": ev["n_pad"], "helpfulness": ev["helpfulness"],
            "win_rate_vs_ref": win_rate(ev["rewards"], ref_eval["rewards"]), "kl_to_ref": ev["kl_to_ref"]}


def _method_for_seed(m, data):
    """α of the calibrated rules from the data mixture unless the config fixes it."""
    if m.weighting in CALIBRATED and "alpha" not in m.weighting_kwargs:
        return dataclasses.replace(m, weighting_kwargs={**m.weighting_kwargs, "alpha": data.alpha})
    return m


def run_seed(cfg: DoraExperimentConfig, seed: int, out: str, writer: JsonlWriter) -> dict:
    t0 = time.perf_counter()
    ctx, diag, seed_dir = prepare(cfg, seed, out, writer)
    d = diag
    print(f"  seed {seed} classifier ({cfg.classifier.mode}): " + ", ".join(
        f"{k} acc {r['accuracy']:.3f} AUC {r['auc']:.3f} ECE {r['ece']:.3f} (oracle-feature AUC "
        f"{d['oracle_feature_classifier'][k]['auc']:.3f})" for k, r in d["classifier"]["reports"].items())
        + "  mean h̃ by source: " + ", ".join(f"{s} {v:.2f}" for s, v in d["mean_h_by_source"].items()), flush=True)
    ref_eval = _sample(ctx, ctx.ref_params)
    methods = {"reference (SFT)": {"target_pref_acc": float("nan"), "target_pref_acc_flat": float("nan"),
                                   "target_reward": ref_eval["reward"], "n_flat": ref_eval["n_flat"],
                                   "n_pad": ref_eval["n_pad"], "helpfulness": ref_eval["helpfulness"],
                                   "win_rate_vs_ref": 0.5, "kl_to_ref": 0.0}}
    for m0 in cfg.methods:
        m = _method_for_seed(m0, ctx.data)
        objective = objective_for(m)
        if m.train_data not in ("train", "oracle"):
            raise ValueError(f"method {m.name!r}: dora.py supports train_data 'train' or 'oracle' "
                             f"(n_train lists from the target distribution), not {m.train_data!r}")
        if m.train_data == "oracle" and objective.needs_source:
            raise ValueError(f"method {m.name!r}: the oracle data has no source classifier outputs")
        sets = ctx.oracle if m.train_data == "oracle" else {"pairs": ctx.pairs, "lists": ctx.lists}
        arrays = sets["lists"] if objective.listwise else sets["pairs"]
        if not objective.needs_source:
            arrays = {k: v for k, v in arrays.items() if not k.startswith("source_")}
        mw = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "preference", "method": m.name})
        t1 = time.perf_counter()
        params, _ = run_preference(
            ctx.graphdef, ctx.rest, ctx.ref_params, arrays, m, cfg, seed=seed, writer=mw,
            checkpoint_dir=os.path.join(seed_dir, "checkpoints", m.name), init_params=ctx.init_params,
            eval_fn=lambda state, o=objective: {"target_pref_acc": _accuracy(ctx, o, state["params"])["target_pref_acc"]})
        mw.close()
        train_s = time.perf_counter() - t1
        methods[m.name] = {**evaluate(ctx, objective, params, ref_eval), "train_time_s": train_s}
        r = methods[m.name]
        print(f"  seed {seed} {m.name:>12s}: target acc {r['target_pref_acc']:.3f} (flat {r['target_pref_acc_flat']:.3f})"
              f"  reward {r['target_reward']:+.3f}  flattery {r['n_flat']:.2f}  KL {r['kl_to_ref']:.2f}"
              f"  ({train_s:.1f}s)", flush=True)
    summary = {"scenario": cfg.data.scenario, "seed": seed, "methods": methods, "config": to_dict(cfg),
               "data_info": ctx.data.info, "diagnostics": diag, "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(os.path.join(seed_dir, "summary.json"), summary)
    return summary


def _mean_diagnostics(diags: list[dict]) -> dict:
    out = {}
    for key in ("mean_h_by_source", "mean_H_by_source"):
        out[key] = {s: float(np.mean([d[key][s] for d in diags])) for s in diags[0][key]}
    for key in ("H_ess", "share_of_H_on_target", "h_max"):
        out[key] = float(np.mean([d[key] for d in diags]))
    out["classifier"] = {name: {m: float(np.mean([d["classifier"]["reports"][name][m] for d in diags]))
                                for m in ("accuracy", "auc", "ece", "brier", "nll", "base_rate")}
                         for name in diags[0]["classifier"]["reports"]}
    out["oracle_feature_classifier"] = {name: {m: float(np.mean([d["oracle_feature_classifier"][name][m] for d in diags]))
                                               for m in ("accuracy", "auc", "ece")}
                                        for name in diags[0]["oracle_feature_classifier"]}
    return out


def paired_comparisons(summaries: list[dict], methods, metrics=("target_pref_acc", "target_pref_acc_flat",
                                                                  "target_reward")) -> dict:
    """Per base loss, DoRA minus each ablation (ERM, DRO only, reweighting only), paired by seed:
    ``{"<dora> - <other>": {metric: mean, metric_sem: s.e., "n_positive": seeds where DoRA is higher}}``."""
    out = {}
    for base in dict.fromkeys(m.base for m in methods):
        by_rule = {m.weighting: m.name for m in methods if m.base == base and m.train_data == "train"}
        if "dora" not in by_rule:
            continue
        for rule in ("uniform", "dro", "dora_reweight"):
            if rule not in by_rule:
                continue
            a, b = by_rule["dora"], by_rule[rule]
            row = {}
            for k in metrics:
                d = np.asarray([s["methods"][a][k] - s["methods"][b][k] for s in summaries], np.float64)
                row[k] = float(d.mean())
                row[f"{k}_sem"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
                row[f"{k}_n_positive"] = int((d > 0).sum())
            out[f"{a} - {b}"] = row
    return out


def format_paired(paired: dict, n_seeds: int) -> str:
    rows = ["| comparison (paired over seeds) | Δ target acc. | Δ acc. (flattery differs) | Δ target reward |",
            "|---|---|---|---|"]
    for name, r in paired.items():
        cells = [f"{r[k]:+.4f} ± {r[k + '_sem']:.4f} ({r[k + '_n_positive']}/{n_seeds} > 0)"
                 for k in ("target_pref_acc", "target_pref_acc_flat", "target_reward")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    out = args.out
    prepare_out_dir(out, cfg, resume=args.resume)
    t0 = time.perf_counter()
    print(f"alignshift DoRA: scenario={cfg.data.scenario} seeds={cfg.seeds} methods={[m.name for m in cfg.methods]} "
          f"classifier={cfg.classifier.mode} devices={jax.devices()}", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = JsonlWriter(metrics_path, static={"scenario": cfg.data.scenario})
    summaries = [run_seed(cfg, cfg.seed + k, out, writer) for k in range(cfg.seeds)]
    writer.close()
    summary = aggregate_seeds(summaries)
    summary["diagnostics"] = _mean_diagnostics([s["diagnostics"] for s in summaries])
    summary["data_info"] = summaries[0]["data_info"]
    summary["paired"] = paired_comparisons(summaries, cfg.methods)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    table = format_table(summary, COLUMNS) + "\n\n" + format_paired(summary["paired"], summary["n_seeds"])
    header = (f"## ShiftBench `synthetic_shift` — DoRA ablation — target test set, {summary['n_seeds']} seed(s), "
              f"mean ± s.e.\n\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + table + "\n")
    plot_training_curves(read_jsonl(metrics_path), os.path.join(out, "training_curves.png"),
                         panels=[("loss", "training loss"), ("weights/ess", "weight ESS"),
                                 ("eval/target_pref_acc", "target pref. accuracy (held out)")])
    print("\n" + header + table)
    dg = summary["diagnostics"]
    print("\nmean h̃ by source: " + ", ".join(f"{s} {v:.3f}" for s, v in dg["mean_h_by_source"].items())
          + f"; share of H on target lists {dg['share_of_H_on_target']:.3f}; ESS(H) {dg['H_ess']:.3f}")
    print(f"wrote {out}/summary.json, results.md, metrics.jsonl, training_curves.png in "
          f"{summary['wall_time_s']:.0f}s", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
