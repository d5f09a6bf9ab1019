"""DoRA (Zhu et al., NeurIPS 2025) on ShiftBench ``synthetic_shift``: the hooks of
``experiments/dora.py`` on the experiment driver.

Per seed: the scenario's training pairs and K-candidate lists (and, for ``train_data: oracle``,
as many lists drawn from the target distribution) with reference log-probs; the SFT reference
as in the ShiftBench pipeline; then the source classifier (:meth:`DoraExperiment.fit`) on
mean-pooled reference hidden states (held-out calibration report and ``reliability.png`` per
seed), whose ``p`` per response becomes the ``source_prob`` / ``source_share`` columns the
calibrated rules read. Methods train on the pairs or (listwise) the lists; the
:class:`~alignshift.experiment.evaluators.TargetEvaluator` scores them on the TARGET
distribution. ``summary.json`` adds ``diagnostics`` (classifier reports, mean calibration
weight per source) and ``paired`` (DoRA minus each ablation, paired by seed).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from alignshift.config import ConfigError, ExperimentConfig
from alignshift.data import encode_pairs, make_scenario
from alignshift.data.encode import encode_lists
from alignshift.eval.report import t_interval
from alignshift.experiment import tuning
from alignshift.experiment.driver import Experiment, MethodRun, SeedContext
from alignshift.experiment.evaluators import TargetEvaluator
from alignshift.losses.dora import dora_calibration, pair_weight_columns
from alignshift.rewards.source_classifier import (
    ClassifierConfig,
    SourceClassifier,
    attach_source_probs,
    plot_reliability,
    reference_features,
)
from alignshift.train.phases import objective_for, precompute_reference_logps

__all__ = ["ClassifierSettings", "DoraExperimentConfig", "DoraExperiment", "check_config", "paired_comparisons",
           "format_paired"]

CALIBRATED = ("dora", "dora_reweight")  # rules that read the classifier's p


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


def check_config(cfg: DoraExperimentConfig) -> None:
    if cfg.data.scenario != "synthetic_shift":
        raise ConfigError(f"dora needs data.scenario=synthetic_shift, got {cfg.data.scenario!r}")
    c = cfg.classifier
    if c.mode not in ("pooled", "per_source") or c.features not in ("reference", "hf") or \
            c.pool not in ("response", "all") or (c.features == "hf" and not c.hf_encoder):
        raise ConfigError(f"config key 'classifier' is invalid: {c}")


def _encode(tok, data, enc) -> tuple[dict, dict]:
    pairs = encode_pairs(tok, data.train, **enc)
    lists = encode_lists(tok, [le.prompt for le in data.train_lists], [list(le.candidates) for le in data.train_lists],
                         [list(le.scores) for le in data.train_lists],
                         **{k: v for k, v in enc.items() if k != "kl_pairing"})
    return pairs, lists


def _list_reference(logits_fn, ref_params, lists: dict) -> np.ndarray:
    n, k, t = lists["cand_input_ids"].shape
    flat = {f"cand_{f}": lists[f"cand_{f}"].reshape(n * k, t) for f in ("input_ids", "attention_mask", "loss_mask")}
    return precompute_reference_logps(logits_fn, ref_params, flat, groups=("cand",))["reference_cand_logps"].reshape(n, k)


def _with_reference(logits_fn, ref_params, pairs, lists) -> None:
    pairs.update(precompute_reference_logps(logits_fn, ref_params, pairs))
    lists["reference_cand_logps"] = _list_reference(logits_fn, ref_params, lists)
    # run_preference checks that precomputed pairwise reference log-probs are present; for the
    # list arrays they are those of the best / worst-scored candidates (unused by listwise steps)
    order = np.argsort(-lists["cand_scores"], axis=1, kind="stable")
    rows = np.arange(len(order))
    lists["reference_chosen_logps"] = lists["reference_cand_logps"][rows, order[:, 0]]
    lists["reference_rejected_logps"] = lists["reference_cand_logps"][rows, order[:, -1]]


def _pair_columns(data) -> np.ndarray:
    """For each training pair, the list columns of its chosen and rejected response, ``[N, 2]``."""
    cols = []
    for le, ex in zip(data.train_lists, data.train):
        c = le.candidates
        cols.append((c.index(ex.chosen), max(j for j in range(len(c)) if c[j] == ex.rejected)))
    return np.asarray(cols, np.int64)


def _fit_classifier(ctx: SeedContext, lists: dict):
    c, data = ctx.cfg.classifier, ctx.data
    n, k, t = lists["cand_input_ids"].shape
    if c.features == "hf":
        from alignshift.rewards.source_classifier import hf_encoder_features

        feats = hf_encoder_features(c.hf_encoder, [le.prompt for le in data.train_lists for _ in le.candidates],
                                    [x for le in data.train_lists for x in le.candidates])
    else:
        flat = {f: lists[f"cand_{f}"].reshape(n * k, t) for f in ("input_ids", "attention_mask", "loss_mask")}
        feats = reference_features(ctx.graphdef, ctx.rest, ctx.ref_params, flat, pool=c.pool)
    sources = [le.meta["source"] for le in data.train_lists for _ in range(k)]
    clf = SourceClassifier(mode=c.mode, holdout=c.holdout,
                           config=ClassifierConfig(hidden=c.hidden, steps=c.steps, lr=c.lr, l2=c.l2))
    clf.fit(feats, sources, mixture=data.mixture, seed=ctx.seed)
    plot_reliability(clf.reports, os.path.join(ctx.seed_dir, "reliability.png"))
    p, a = clf.predict(feats)
    return clf, p, a, np.asarray(sources)


class DoraExperiment(Experiment):
    check_rows = False  # generated lists

    def __init__(self):
        super().__init__(TargetEvaluator(), title="DoRA ablation")

    def banner_fields(self, cfg) -> dict:
        return {"classifier": cfg.classifier.mode}

    def encode(self, ctx: SeedContext) -> None:
        cfg, tok = ctx.cfg, ctx.tokenizer
        enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len,
                   kl_pairing=cfg.data.kl_pairing)
        pairs, lists = _encode(tok, ctx.data, enc)
        ctx.sets = {"pairs": pairs, "lists": lists, "test": encode_pairs(tok, ctx.data.test, **enc)}
        if any(m.train_data == "oracle" for m in cfg.methods):  # same size, all lists from the target source
            odata = make_scenario("synthetic_shift", seed=ctx.seed,
                                  **{**cfg.data.scenario_kwargs, "mixture": {"target": 1.0}})
            if odata.tokenizer.vocab != tok.vocab:  # pragma: no cover - same world, same words
                raise RuntimeError("oracle data has a different vocabulary")
            ctx.sets["oracle_pairs"], ctx.sets["oracle_lists"] = _encode(tok, odata, enc)

    def add_reference(self, ctx: SeedContext) -> None:
        s = ctx.sets
        s["test"].update(precompute_reference_logps(ctx.logits_fn, ctx.ref_params, s["test"]))
        _with_reference(ctx.logits_fn, ctx.ref_params, s["pairs"], s["lists"])
        if "oracle_pairs" in s:
            _with_reference(ctx.logits_fn, ctx.ref_params, s["oracle_pairs"], s["oracle_lists"])

    def fit(self, ctx: SeedContext) -> None:
        """The source classifier, its ``p`` as source columns, and the seed's ``diagnostics``."""
        cfg, data, pairs, lists = ctx.cfg, ctx.data, ctx.sets["pairs"], ctx.sets["lists"]
        os.makedirs(ctx.seed_dir, exist_ok=True)
        t0 = time.perf_counter()
        clf, p, a, sources = _fit_classifier(ctx, lists)
        k = lists["cand_input_ids"].shape[1]
        lists.update(attach_source_probs({}, p, a, k))
        # every pair carries its prompt's K columns; a calibrated method's weighting_kwargs.pair_weight
        # decides which its H averages (alignshift/losses/dora.py: all K, the authors' code, or the
        # pair's own two, selected in method_run)
        ctx.extra["pair_cols"] = _pair_columns(data)
        pairs["source_prob"] = p.reshape(-1, k).astype(np.float32)
        pairs["source_share"] = a.reshape(-1, k).astype(np.float32)
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
        feat_clf.fit(oracle_x, sources, mixture=data.mixture, seed=ctx.seed)
        diag["oracle_feature_classifier"] = feat_clf.summary()["reports"]
        ctx.summary["diagnostics"] = diag
        ctx.extra["flat_diff"] = np.asarray([data.world.features(e.prompt, e.chosen)[1]
                                             != data.world.features(e.prompt, e.rejected)[1] for e in data.test])
        print(f"  seed {ctx.seed} classifier ({cfg.classifier.mode}): " + ", ".join(
            f"{name} acc {r['accuracy']:.3f} AUC {r['auc']:.3f} ECE {r['ece']:.3f} (oracle-feature AUC "
            f"{diag['oracle_feature_classifier'][name]['auc']:.3f})" for name, r in diag["classifier"]["reports"].items())
            + "  mean h̃ by source: " + ", ".join(f"{s} {v:.2f}" for s, v in diag["mean_h_by_source"].items()),
            flush=True)

    def tuning_split(self, ctx: SeedContext) -> dict:
        """The selection split out of the training lists: their pairs (scored) and lists
        (index-aligned) lose the same rows, and so do the pairs' candidate columns."""
        info = tuning.split_for_tuning(ctx, ("pairs", "lists"), select_from="pairs")
        ctx.extra["pair_cols"] = ctx.extra["pair_cols"][ctx.extra["train_keep"]]
        return info

    def method_run(self, ctx: SeedContext, m0) -> MethodRun:
        m = m0
        if m.weighting in CALIBRATED and "alpha" not in m.weighting_kwargs:  # α from the data mixture
            m = dataclasses.replace(m, weighting_kwargs={**m.weighting_kwargs, "alpha": ctx.data.alpha})
        objective = objective_for(m)
        if m.train_data not in ("train", "oracle"):
            raise ValueError(f"method {m.name!r}: dora.py supports train_data 'train' or 'oracle' "
                             f"(n_train lists from the target distribution), not {m.train_data!r}")
        if m.train_data == "oracle" and "source" in objective.requires:
            raise ValueError(f"method {m.name!r}: the oracle data has no source classifier outputs")
        prefix = "oracle_" if m.train_data == "oracle" else ""
        listwise = "lists" in objective.requires
        arrays = ctx.sets[prefix + ("lists" if listwise else "pairs")]
        if "source" not in objective.requires:
            arrays = {k: v for k, v in arrays.items() if not k.startswith("source_")}
        elif not listwise:
            prob, share = pair_weight_columns(arrays["source_prob"], arrays["source_share"], ctx.extra["pair_cols"],
                                              m.weighting_kwargs.get("pair_weight", "candidates"))
            arrays = {**arrays, "source_prob": prob, "source_share": share}
        return MethodRun(m.name, m, arrays, ctx.cfg)

    def aggregate(self, cfg, summaries: list[dict]) -> dict:
        summary = super().aggregate(cfg, summaries)
        summary["diagnostics"] = _mean_diagnostics([s["diagnostics"] for s in summaries])
        summary["data_info"] = summaries[0]["data_info"]
        summary["paired"] = paired_comparisons(summaries, cfg.methods)
        return summary

    def results_title(self, cfg, summary: dict) -> str:
        return (f"## ShiftBench `synthetic_shift` — DoRA ablation — target test set, {summary['n_seeds']} seed(s), "
                f"mean ± s.e.")

    def results_md(self, cfg, summary: dict) -> str:
        return super().results_md(cfg, summary) + "\n\n" + format_paired(summary["paired"], summary["n_seeds"])

    def report(self, cfg, summary: dict, out: str) -> None:
        super().report(cfg, summary, out)
        dg = summary["diagnostics"]
        print("mean h̃ by source: " + ", ".join(f"{s} {v:.3f}" for s, v in dg["mean_h_by_source"].items())
              + f"; share of H on target lists {dg['share_of_H_on_target']:.3f}; ESS(H) {dg['H_ess']:.3f}", flush=True)


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
    ``{"<dora> - <other>": {metric: mean, metric_sem: s.e., metric_ci95: [low, high] (95% Student-t;
    None from one seed), metric_n_positive: seeds where DoRA is higher}}``."""
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
                _, lo, hi = t_interval(d)
                row[f"{k}_ci95"] = None if lo is None else [lo, hi]
                row[f"{k}_n_positive"] = int((d > 0).sum())
            out[f"{a} - {b}"] = row
    return out


def format_paired(paired: dict, n_seeds: int) -> str:
    rows = ["| comparison (paired over seeds: mean ± s.e. [95% t-interval]) | Δ target acc. | Δ acc. (flattery differs) "
            "| Δ target reward |", "|---|---|---|---|"]

    def cell(r, k):
        ci = r.get(k + "_ci95")
        ci = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        return f"{r[k]:+.4f} ± {r[k + '_sem']:.4f}{ci} ({r[k + '_n_positive']}/{n_seeds} > 0)"
    for name, r in paired.items():
        cells = [cell(r, k) for k in ("target_pref_acc", "target_pref_acc_flat", "target_reward")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
