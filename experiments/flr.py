"""FLR (follow-up likelihood as reward, Zhang et al. AAAI 2025) on ShiftBench ``followup``.

Per seed:

1. Build the ``followup`` scenario: a conversation corpus whose user follow-up turns are
   positive or negative with a probability that rises with the hidden response quality
   (:mod:`alignshift.data.followup`). SFT a tiny Llama on it (the policy AND the FLR LM, as
   in the paper, where Llama-3-8B-Instruct plays both roles). No preference label is used.
2. **Reward models** on the held-out ground-truth test pairs: pairwise accuracy of FLR
   (both scoring modes, the three aggregations) and of Direct (the response's own
   length-normalised likelihood), plus Pearson/Spearman of each reward with the quality of
   the individual test responses (the rating-benchmark analogue).
3. **Alignment**: sample ``flr.n_samples`` responses for each of ``flr.n_mine_prompts``
   training prompts from the SFT policy (KV-cached sampler), label them with FLR, with
   Direct, and with the ground-truth quality, build max-vs-min pairs per prompt
   (:mod:`alignshift.rewards.mining`) and train each configured method (DPO) from the SFT
   reference on each labelled set. Evaluate every policy by the ground-truth quality of
   its sampled responses on test prompts (plus win rate and KL vs the SFT policy).

Writes ``summary.json`` (design schema: ``methods`` = policies, plus ``reward_models``),
``metrics.jsonl``, ``results.md`` and per-seed summaries.

    python experiments/flr.py --config experiments/configs/flr.yaml --out results/flr [--quick]

The command line is the one every experiment script shares (:mod:`alignshift.cli`):
``--config --out --seeds --quick --resume --methods --dry-run --skip-bad-rows`` and dotted
overrides (``flr.n_samples=4``; the ``flr:`` section is :class:`FLRSettings`). ``--methods``
picks the preference methods trained on every labelled set. ``--dry-run`` plans the policy
model (the ``flr:`` section is not planned). ``--resume`` works per seed, not per step (this
script writes no checkpoints; a seed takes minutes): a seed whose ``seed_<s>/summary.json``
exists in ``--out`` from the same config is reused, an unfinished seed is rerun from scratch
and its partial records are removed from ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from alignshift.cli import experiment_parser, parse_experiment_args, prepare_out_dir
from alignshift.config import ConfigError, ExperimentConfig, to_dict
from alignshift.data import encode_pairs, encode_prompts, make_scenario
from alignshift.eval.report import aggregate_seeds, format_table, write_json_atomic
from alignshift.eval.shift_eval import sample_and_score, win_rate
from alignshift.rewards.evaluate import pairwise_accuracy, pearson, spearman
from alignshift.rewards.flr import direct_scores, followup_scores, aggregate_scores
from alignshift.rewards.mining import mine_pairs, sample_responses
from alignshift.train.metrics import JsonlWriter
from alignshift.train.runner import build_policy, precompute_reference_logps, run_preference, run_sft
from alignshift.train.steps import make_logits_fn, split_model

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "flr.yaml")


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
POLICY_COLUMNS = [("quality", "GT quality (sampled)"), ("win_rate_vs_sft", "win rate vs SFT"),
                  ("kl_to_ref", "KL to SFT"), ("pair_label_acc", "mined-pair label acc."),
                  ("n_pairs", "# pairs")]
RM_COLUMNS = [("pair_acc", "test pair acc."), ("pearson", "Pearson vs quality"),
              ("spearman", "Spearman vs quality")]


def parse_args(argv=None):
    """The shared experiment command line (:func:`alignshift.cli.parse_experiment_args`), loaded
    as :class:`FLRExperimentConfig` (``--dry-run`` exits inside ``parser.parse_args``)."""
    parser = experiment_parser(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/flr")
    args, cfg = parse_experiment_args(parser, argv, cls=FLRExperimentConfig)
    try:
        if cfg.data.scenario != "followup":
            raise ConfigError(f"experiments/flr.py needs data.scenario=followup, got {cfg.data.scenario!r}")
        bad = [x for x in cfg.flr.labelers if x not in LABELER_NAMES]
        if bad:
            raise ConfigError(f"flr.labelers: unknown {bad}; valid: {list(LABELER_NAMES)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


def _reward_model_rows(model, tok, data, f: FLRSettings) -> dict:
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


def run_seed(cfg: FLRExperimentConfig, seed: int, out: str, writer: JsonlWriter) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    f = cfg.flr
    data = make_scenario(cfg.data.scenario, seed=seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    seed_dir = os.path.join(out, f"seed_{seed}")

    # 1. SFT on the conversation corpus (policy = reference = FLR LM)
    model = build_policy(cfg.model, tok, seed=seed)
    graphdef, _, rest = split_model(model)
    sft_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_completion_len=f.sft_max_completion_len))
    sw = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "sft", "method": "sft"})
    ref_params = run_sft(model, data.sft, tok, sft_cfg, seed=seed, writer=sw)
    sw.close()
    nnx.update(model, ref_params)
    t_sft = time.perf_counter() - t0

    # 2. reward models on the ground-truth test pairs
    t1 = time.perf_counter()
    rm = _reward_model_rows(model, tok, data, f)
    t_rm = time.perf_counter() - t1
    print(f"  seed {seed} reward models: FLR {rm['FLR']['pair_acc']:.3f}  Direct {rm['Direct']['pair_acc']:.3f}  "
          f"(repo {rm['FLR repo difference']['pair_acc']:.3f}; {t_rm:.1f}s)", flush=True)

    # 3. mining: sample, label, pair
    t2 = time.perf_counter()
    prompts = data.prompts("train")[: f.n_mine_prompts]  # only 32 distinct prompts exist: repeats are kept
    samples = sample_responses(model, tok, prompts, n_samples=f.n_samples, key=jax.random.PRNGKey(20_000 + seed),
                               max_new_tokens=cfg.eval.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                               max_prompt_len=cfg.data.max_prompt_len, batch_size=cfg.eval.batch_size)
    t_sample = time.perf_counter() - t2
    flat_p = [p for p in prompts for _ in range(f.n_samples)]
    flat_r = [r for rs in samples for r in rs]
    gt = np.asarray([data.reward_fn(p, r) for p, r in zip(flat_p, flat_r)]).reshape(len(prompts), f.n_samples)
    scores = {"ground_truth": gt}
    if "flr" in f.labelers:
        per = followup_scores(model, tok, flat_p, flat_r, dimension=f.dimension, batch_size=f.score_batch_size)
        scores["flr"] = aggregate_scores(per[f.mode], per["is_positive"], f.aggregate).reshape(gt.shape)
    if "direct" in f.labelers:
        scores["direct"] = direct_scores(model, tok, flat_p, flat_r, batch_size=f.score_batch_size).reshape(gt.shape)
    t_mine = time.perf_counter() - t2

    # 4. train each method on each labelled set; evaluate by ground-truth quality
    logits_fn = make_logits_fn(graphdef, rest)
    n_eval = min(cfg.eval.n_prompts, len(data.test))
    eval_prompts = [e.prompt for e in data.test[:n_eval]]
    eval_arrays = encode_prompts(tok, eval_prompts, max_prompt_len=cfg.data.max_prompt_len)
    skw = dict(tokenizer=tok, reward_fn=data.reward_fn, metrics_fn=data.metrics_fn, key=jax.random.PRNGKey(10_000 + seed),
               max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
               batch_size=cfg.eval.batch_size)
    ref_eval = sample_and_score(graphdef, rest, ref_params, ref_params, eval_arrays, eval_prompts, **skw)
    methods = {"SFT (reference)": {"quality": ref_eval["reward"], "win_rate_vs_sft": 0.5, "kl_to_ref": 0.0,
                                   "pair_label_acc": float("nan"), "n_pairs": 0.0, "train_time_s": 0.0}}
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    for lab in f.labelers:
        pairs = mine_pairs(prompts, samples, scores[lab], min_gap=f.min_gap)
        qc = np.asarray([data.reward_fn(p.prompt, p.chosen) for p in pairs])
        qr = np.asarray([data.reward_fn(p.prompt, p.rejected) for p in pairs])
        label_acc = float(np.mean(qc > qr)) if pairs else float("nan")
        arrays = encode_pairs(tok, pairs, **enc)
        arrays.update(precompute_reference_logps(logits_fn, ref_params, arrays))
        for m in cfg.methods:
            name = f"{m.name} ({LABELER_NAMES[lab]})"
            mcfg = cfg if cfg.train.batch_size <= len(pairs) else dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, batch_size=len(pairs)))
            mw = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "preference", "method": name})
            t3 = time.perf_counter()
            params, _ = run_preference(graphdef, rest, ref_params, arrays, m, mcfg, seed=seed, writer=mw)
            mw.close()
            ev = sample_and_score(graphdef, rest, params, ref_params, eval_arrays, eval_prompts, **skw)
            methods[name] = {"quality": ev["reward"], "win_rate_vs_sft": win_rate(ev["rewards"], ref_eval["rewards"]),
                             "kl_to_ref": ev["kl_to_ref"], "pair_label_acc": label_acc, "n_pairs": float(len(pairs)),
                             "train_time_s": time.perf_counter() - t3}
            print(f"  seed {seed} {name:>24s}: quality {ev['reward']:.3f} (SFT {ref_eval['reward']:.3f})  "
                  f"label acc {label_acc:.3f}  pairs {len(pairs)}  KL {ev['kl_to_ref']:.2f}", flush=True)
    timing = {"sft_s": t_sft, "reward_models_s": t_rm, "sampling_s": t_sample, "mining_s": t_mine,
              "total_s": time.perf_counter() - t0, "n_sampled": len(flat_r)}
    summary = {"scenario": cfg.data.scenario, "seed": seed, "methods": methods, "config": to_dict(cfg),
               "data_info": data.info, "timing": timing,
               "mined_reward_correlation": {lab: spearman(scores[lab].ravel(), gt.ravel())
                                            for lab in scores if lab != "ground_truth"}}
    rm_summary = {"scenario": cfg.data.scenario, "seed": seed, "methods": rm, "config": {}}
    write_json_atomic(os.path.join(seed_dir, "summary.json"), {**summary, "reward_models": rm})
    return summary, rm_summary


def finished_seeds(cfg: FLRExperimentConfig, out: str) -> dict[int, tuple[dict, dict]]:
    """``--resume``: ``{seed: (summary, rm_summary)}`` of the seeds whose ``seed_<s>/summary.json``
    (written last by :func:`run_seed`) exists; one from another config is an error."""
    want = json.loads(json.dumps(to_dict(cfg)))
    done = {}
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        path = os.path.join(out, f"seed_{seed}", "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            s = json.load(fh)
        if s.get("config") != want or "reward_models" not in s:
            raise SystemExit(f"error: --resume: {path} was produced by a different config; "
                             "use a new --out or drop --resume")
        summary = {k2: v for k2, v in s.items() if k2 != "reward_models"}
        done[seed] = (summary, {"scenario": s["scenario"], "seed": seed, "methods": s["reward_models"], "config": {}})
    return done


def _keep_records_of(path: str, seeds) -> None:
    """Drop from ``metrics.jsonl`` the records of seeds that did not finish (they are rerun)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("seed") in seeds]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    out = args.out
    prepare_out_dir(out, cfg, resume=args.resume)
    t0 = time.perf_counter()
    print(f"alignshift FLR: scenario={cfg.data.scenario} seeds={cfg.seeds} methods={[m.name for m in cfg.methods]} "
          f"labelers={cfg.flr.labelers}", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    done = finished_seeds(cfg, out) if args.resume else {}
    if args.resume:
        _keep_records_of(metrics_path, set(done))
    writer = JsonlWriter(metrics_path, static={"scenario": cfg.data.scenario})
    runs = []
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        if seed in done:
            print(f"  seed {seed}: finished in {out}/seed_{seed}/summary.json, reused (--resume)", flush=True)
            runs.append(done[seed])
        else:
            runs.append(run_seed(cfg, seed, out, writer))
    writer.close()
    summary = aggregate_seeds([r[0] for r in runs])
    rm = aggregate_seeds([r[1] for r in runs])
    summary["reward_models"] = rm["methods"]
    summary["timing"] = [r[0]["timing"] for r in runs]
    summary["mined_reward_correlation"] = [r[0]["mined_reward_correlation"] for r in runs]
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    n = summary["n_seeds"]
    text = (f"## FLR on ShiftBench `followup` — {n} seed(s), mean ± s.e.\n\n"
            f"### Reward models: accuracy on {cfg.data.scenario_kwargs.get('n_test', 500)} ground-truth test pairs "
            f"(dimension `{cfg.flr.dimension}`)\n\n"
            + format_table({**rm, "n_seeds": n}, RM_COLUMNS)
            + "\n\n### Alignment: policies trained on mined pairs, ground-truth quality of sampled test responses\n\n"
            + format_table(summary, POLICY_COLUMNS) + "\n")
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    print("\n" + text)
    print(f"wrote {out}/summary.json, results.md, metrics.jsonl in {summary['wall_time_s']:.0f}s", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
