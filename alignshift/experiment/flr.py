"""FLR (follow-up likelihood as reward, Zhang et al. AAAI 2025) on ShiftBench ``followup``: the
hooks of ``experiments/flr.py`` on the experiment driver.

Per seed: SFT a tiny Llama on the conversation corpus (the policy, the reference AND the FLR
LM; no preference label is used; no checkpoints); :meth:`FLRExperiment.fit` evaluates the
reward models on the ground-truth test pairs (FLR in both modes and three aggregations,
Direct, response length: pairwise accuracy, Pearson/Spearman with the responses' quality)
and samples ``flr.n_samples`` responses per training prompt, labelled by each labeler; each
labeler's max-vs-min mined pairs then train every configured method, and the
:class:`~alignshift.experiment.evaluators.QualityEvaluator` scores the policies by the
ground-truth quality of their sampled test responses. ``summary.json`` adds
``reward_models``, ``timing`` and ``mined_reward_correlation``; ``--resume`` reuses finished
seeds (the experiment writes no checkpoints).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from alignshift.config import ConfigError, ExperimentConfig, to_dict
from alignshift.data import encode_pairs
from alignshift.eval.report import aggregate_seeds, format_paired_differences, format_table, paired_differences
from alignshift.experiment.driver import Experiment, MethodRun, SeedContext, batch_size_for, sft_reference
from alignshift.experiment.evaluators import QualityEvaluator
from alignshift.forward import split_model
from alignshift.rewards.evaluate import pairwise_accuracy, pearson, spearman
from alignshift.rewards.flr import aggregate_scores, direct_scores, followup_scores
from alignshift.rewards.mining import mine_pairs, sample_responses
from alignshift.train.phases import build_policy, precompute_reference_logps

__all__ = ["FLRSettings", "FLRExperimentConfig", "FLRExperiment", "LABELER_NAMES", "check_config",
           "reward_model_rows"]


@dataclasses.dataclass
class FLRSettings:
    dimension: str = "understanding"  # follow-up dimension scored ("all" = the six)
    mode: str = "likelihood"  # FLR mode used for mining
    aggregate: str = "difference"  # FLR aggregation used for mining
    sft_max_completion_len: int = 24  # response + '<eos> user: <follow-up>' in the SFT corpus
    n_mine_prompts: int = 500  # training prompts to sample from
    n_samples: int = 8  # responses per prompt (the authors: 8)
    temperature: float = 0.7  # the authors' generation settings
    top_p: float = 0.9
    min_gap: float = 0.0  # skip prompts whose max-min reward gap is smaller
    labelers: list = dataclasses.field(default_factory=lambda: ["flr", "direct", "ground_truth"])
    score_batch_size: int = 64


@dataclasses.dataclass
class FLRExperimentConfig(ExperimentConfig):
    flr: FLRSettings = dataclasses.field(default_factory=FLRSettings)


LABELER_NAMES = {"flr": "FLR-mined", "direct": "Direct-mined", "ground_truth": "GT-mined"}
RM_COLUMNS = [("pair_acc", "test pair acc."), ("pearson", "Pearson vs quality"),
              ("spearman", "Spearman vs quality")]


def check_config(cfg: FLRExperimentConfig) -> None:
    if cfg.data.scenario != "followup":
        raise ConfigError(f"experiments/flr.py needs data.scenario=followup, got {cfg.data.scenario!r}")
    bad = [x for x in cfg.flr.labelers if x not in LABELER_NAMES]
    if bad:
        raise ConfigError(f"flr.labelers: unknown {bad}; valid: {list(LABELER_NAMES)}")


def reward_model_rows(model, tok, data, f: FLRSettings) -> dict:
    """Each reward model on the ground-truth test pairs: ``{name: {pair_acc, pearson, spearman}}``."""
    test = data.test
    prompts = [e.prompt for e in test] * 2
    responses = [e.chosen for e in test] + [e.rejected for e in test]
    quality = np.asarray([data.reward_fn(p, r) for p, r in zip(prompts, responses)])
    n = len(test)
    rows = {}

    def row(s):
        s = np.asarray(s, np.float64)
        return {"pair_acc": pairwise_accuracy(s[:n], s[n:]), "pearson": pearson(s, quality),
                "spearman": spearman(s, quality)}

    per = followup_scores(model, tok, prompts, responses, dimension=f.dimension, batch_size=f.score_batch_size)
    for mode in ("likelihood", "repo"):
        for agg in ("difference", "positive", "negative"):
            name = "FLR" if (mode, agg) == ("likelihood", "difference") else f"FLR {mode} {agg}"
            rows[name] = row(aggregate_scores(per[mode], per["is_positive"], agg))
    rows["Direct"] = row(direct_scores(model, tok, prompts, responses, batch_size=f.score_batch_size))
    rows["length (baseline)"] = row([len(r.split()) for r in responses])
    return rows


class FLRExperiment(Experiment):
    resume_seeds = True  # no checkpoints: --resume reuses finished seeds
    seed_keys = ("reward_models",)
    check_rows = False  # generated conversations
    supports_tuning = False  # tuning.enabled: the ShiftBench experiments only (alignshift/experiment/tuning.py)

    def __init__(self):
        super().__init__(QualityEvaluator(), title="FLR")

    def banner_fields(self, cfg) -> dict:
        return {"labelers": cfg.flr.labelers}

    def encode(self, ctx: SeedContext) -> None:
        """Nothing yet: the training pairs are mined from the reference's samples."""

    def build_reference(self, ctx: SeedContext) -> None:
        """SFT on the conversation corpus (responses with their follow-up turns), no checkpoints."""
        cfg = ctx.cfg
        model = build_policy(cfg.model, ctx.tokenizer, seed=ctx.seed)
        ctx.graphdef, _, ctx.rest = split_model(model)
        sft_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                    max_completion_len=cfg.flr.sft_max_completion_len))
        ctx.ref_params = sft_reference(ctx, model, sft_cfg, checkpoint=False)
        nnx.update(model, ctx.ref_params)
        ctx.extra["model"] = model
        ctx.extra["timing"] = {"sft_s": time.perf_counter() - ctx.started}

    def add_reference(self, ctx: SeedContext) -> None:
        """Per labelled set, in :meth:`method_runs`."""

    def fit(self, ctx: SeedContext) -> None:
        """The reward models on the test pairs; then sample, label and keep the responses."""
        cfg, f, data, tok, model = ctx.cfg, ctx.cfg.flr, ctx.data, ctx.tokenizer, ctx.extra["model"]
        timing = ctx.extra["timing"]
        t1 = time.perf_counter()
        rm = reward_model_rows(model, tok, data, f)
        timing["reward_models_s"] = time.perf_counter() - t1
        print(f"  seed {ctx.seed} reward models: FLR {rm['FLR']['pair_acc']:.3f}  Direct {rm['Direct']['pair_acc']:.3f}"
              f"  (repo {rm['FLR repo difference']['pair_acc']:.3f}; {timing['reward_models_s']:.1f}s)", flush=True)

        t2 = time.perf_counter()
        prompts = data.prompts("train")[: f.n_mine_prompts]  # only 32 distinct prompts exist: repeats are kept
        samples = sample_responses(model, tok, prompts, n_samples=f.n_samples, key=jax.random.PRNGKey(20_000 + ctx.seed),
                                   max_new_tokens=cfg.eval.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                                   max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.eval.batch_size)
        timing["sampling_s"] = time.perf_counter() - t2
        flat_p = [p for p in prompts for _ in range(f.n_samples)]
        flat_r = [r for rs in samples for r in rs]
        gt = np.asarray([data.reward_fn(p, r) for p, r in zip(flat_p, flat_r)]).reshape(len(prompts), f.n_samples)
        scores = {"ground_truth": gt}
        if "flr" in f.labelers:
            per = followup_scores(model, tok, flat_p, flat_r, dimension=f.dimension, batch_size=f.score_batch_size)
            scores["flr"] = aggregate_scores(per[f.mode], per["is_positive"], f.aggregate).reshape(gt.shape)
        if "direct" in f.labelers:
            scores["direct"] = direct_scores(model, tok, flat_p, flat_r, batch_size=f.score_batch_size).reshape(gt.shape)
        timing["mining_s"] = time.perf_counter() - t2
        ctx.extra.update(prompts=prompts, samples=samples, scores=scores, n_sampled=len(flat_r))
        ctx.summary["mined_reward_correlation"] = {lab: spearman(scores[lab].ravel(), gt.ravel())
                                                   for lab in scores if lab != "ground_truth"}
        ctx.summary["reward_models"] = rm

    def method_runs(self, ctx: SeedContext):
        """Per labeler, its max-vs-min mined pairs (with reference log-probs); every method on them."""
        cfg, f, data = ctx.cfg, ctx.cfg.flr, ctx.data
        enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len,
                   kl_pairing=cfg.data.kl_pairing)
        for lab in f.labelers:
            pairs = mine_pairs(ctx.extra["prompts"], ctx.extra["samples"], ctx.extra["scores"][lab], min_gap=f.min_gap)
            qc = np.asarray([data.reward_fn(p.prompt, p.chosen) for p in pairs])
            qr = np.asarray([data.reward_fn(p.prompt, p.rejected) for p in pairs])
            label_acc = float(np.mean(qc > qr)) if pairs else float("nan")
            arrays = encode_pairs(ctx.tokenizer, pairs, **enc)
            arrays.update(precompute_reference_logps(ctx.logits_fn, ctx.ref_params, arrays))
            for m in cfg.methods:
                yield MethodRun(f"{m.name} ({LABELER_NAMES[lab]})", m, arrays, batch_size_for(cfg, len(pairs)),
                                checkpoint=False, row={"pair_label_acc": label_acc, "n_pairs": float(len(pairs))})

    def seed_summary(self, ctx: SeedContext, methods: dict, seconds: float) -> dict:
        timing = {**ctx.extra["timing"], "total_s": seconds, "n_sampled": ctx.extra["n_sampled"]}
        s = ctx.summary
        return {"scenario": ctx.cfg.data.scenario, "seed": ctx.seed, "methods": methods, "config": to_dict(ctx.cfg),
                "data_info": ctx.data.info, "timing": timing,
                "mined_reward_correlation": s["mined_reward_correlation"], "reward_models": s["reward_models"]}

    def aggregate(self, cfg, summaries: list[dict]) -> dict:
        summary = aggregate_seeds(summaries)
        summary["reward_models"] = aggregate_seeds([{"scenario": s["scenario"], "seed": s["seed"],
                                                     "methods": s["reward_models"], "config": {}}
                                                    for s in summaries])["methods"]
        summary["timing"] = [s["timing"] for s in summaries]
        summary["mined_reward_correlation"] = [s["mined_reward_correlation"] for s in summaries]
        summary["paired_vs_direct"] = self.paired_vs_direct(cfg, summaries)
        return summary

    def paired_vs_direct(self, cfg, summaries: list[dict]) -> dict:
        """FLR's claim as paired differences by seed with 95% t-intervals: ``reward_models``, every
        reward model minus Direct (:data:`RM_COLUMNS`); ``alignment``, per method, its policy on
        each labeler's mined pairs minus the same method on Direct-mined pairs (the evaluator's
        columns). A part whose baseline is not among the rows is left out."""
        out = {}
        rms = [{"seed": s["seed"], "methods": s["reward_models"]} for s in summaries]
        if "Direct" in rms[0]["methods"]:
            out["reward_models"] = paired_differences(rms, "Direct", [k for k, _ in RM_COLUMNS])
        cols = [k for k, _ in self.evaluator.paired_columns]
        for m in cfg.methods:
            base = f"{m.name} ({LABELER_NAMES['direct']})"
            if base in summaries[0]["methods"]:
                others = [f"{m.name} ({LABELER_NAMES[lab]})" for lab in cfg.flr.labelers if lab != "direct"]
                out.setdefault("alignment", {})[m.name] = paired_differences(summaries, base, cols, methods=others)
        return out

    def results_md(self, cfg, summary: dict) -> str:
        n = summary["n_seeds"]
        return (f"## FLR on ShiftBench `{cfg.data.scenario}` — {n} seed(s), mean ± s.e.\n\n"
                f"### Reward models: accuracy on {cfg.data.scenario_kwargs.get('n_test', 500)} ground-truth test "
                f"pairs (dimension `{cfg.flr.dimension}`)\n\n"
                + format_table({"methods": summary["reward_models"], "n_seeds": n}, RM_COLUMNS)
                + "\n\n### Alignment: policies trained on mined pairs, ground-truth quality of sampled test responses\n\n"
                + format_table(summary, self.evaluator.columns) + self._paired_md(summary))

    def _paired_md(self, summary: dict) -> str:
        paired = summary.get("paired_vs_direct") or {}
        if summary["n_seeds"] < 2 or not paired:
            return ""
        text = ""
        if "reward_models" in paired:
            text += ("\n\n### Reward models minus Direct, paired by seed\n\n"
                     + format_paired_differences(paired["reward_models"], RM_COLUMNS))
        for name, p in paired.get("alignment", {}).items():
            text += (f"\n\n### Policies minus {p['baseline']}, paired by seed\n\n"
                     + format_paired_differences(p, self.evaluator.paired_columns))
        return text
