"""The experiment pipeline shared by the ShiftBench scripts.

Per seed: build the scenario, SFT the policy (= the reference), precompute reference
log-probs for every data set a method may train on, train each method from the reference
on its ``train_data`` (D_tr, D_v, D_tr ∪ D_v, or an oracle set from the deployment
distribution), hand IW rules a deployment-validation batch each step, and evaluate on the
deployment test set. Then aggregate seeds (mean ± s.e.) and write ``summary.json``,
``metrics.jsonl``, ``results.md`` and ``training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from alignshift.cli import prepare_out_dir
from alignshift.config import ExperimentConfig, to_dict
from alignshift.data import encode_pairs, encode_prompts, make_scenario
from alignshift.eval.report import aggregate_seeds, format_table, plot_training_curves, read_jsonl, write_json_atomic
from alignshift.eval.shift_eval import preference_accuracy, sample_and_score, win_rate
from alignshift.train.metrics import JsonlWriter
from alignshift.train.runner import build_policy, objective_for, precompute_reference_logps, run_preference, run_sft
from alignshift.train.steps import make_logits_fn, split_model

__all__ = ["DEFAULT_COLUMNS", "run_seed", "run_experiment"]

DEFAULT_COLUMNS = [
    ("deploy_pref_acc", "deploy pref. acc."),
    ("deploy_reward", "deploy reward (sampled)"),
    ("helpfulness", "helpfulness"),
    ("harm", "harm"),
    ("win_rate_vs_ref", "win rate vs ref"),
    ("kl_to_ref", "KL to ref"),
]


def _concat_arrays(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a if k in b}


def run_seed(cfg: ExperimentConfig, seed: int, out_dir: str, writer: JsonlWriter) -> dict:
    t0 = time.perf_counter()
    seed_dir = os.path.join(out_dir, f"seed_{seed}")
    data = make_scenario(cfg.data.scenario, seed=seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    wanted = {m.train_data for m in cfg.methods}
    needs_val = any(objective_for(m).needs_val for m in cfg.methods) or wanted & {"val", "train+val"}
    sets = {"train": encode_pairs(tok, data.train, **enc), "test": encode_pairs(tok, data.test, **enc)}
    if needs_val:
        sets["val"] = encode_pairs(tok, data.val, **enc)
    if "oracle" in wanted:
        if cfg.data.scenario != "deploy_shift":
            raise ValueError(f"train_data='oracle' is only defined for deploy_shift, not {cfg.data.scenario!r}")
        oracle = make_scenario(cfg.data.scenario, seed=seed, **{**cfg.data.scenario_kwargs, "deploy_fraction": 1.0})
        sets["oracle"] = encode_pairs(tok, oracle.train, **enc)

    # 1. SFT -> reference policy
    model = build_policy(cfg.model, tok, seed=seed)
    graphdef, _, rest = split_model(model)
    sft_writer = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "sft", "method": "sft"})
    ref_params = run_sft(model, data.sft, tok, cfg, seed=seed, writer=sft_writer,
                         checkpoint_dir=os.path.join(seed_dir, "checkpoints", "sft"))
    sft_writer.close()
    logits_fn = make_logits_fn(graphdef, rest)

    # 2. Reference log-probs, once per data set
    for arrays in sets.values():
        arrays.update(precompute_reference_logps(logits_fn, ref_params, arrays))
    if "train+val" in wanted:
        sets["train+val"] = _concat_arrays(sets["train"], sets["val"])
    test_arrays = sets["test"]

    # 3. Reference samples (the win-rate baseline)
    n_eval = min(cfg.eval.n_prompts, len(data.test))
    prompts = [ex.prompt for ex in data.test[:n_eval]]
    prompt_arrays = encode_prompts(tok, prompts, max_prompt_len=cfg.data.max_prompt_len)
    sample_kw = dict(tokenizer=tok, reward_fn=data.reward_fn, metrics_fn=data.metrics_fn,
                     max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                     top_p=cfg.eval.top_p, batch_size=cfg.eval.batch_size)
    eval_key = jax.random.PRNGKey(10_000 + seed)
    ref_eval = sample_and_score(graphdef, rest, ref_params, ref_params, prompt_arrays, prompts, key=eval_key,
                                **sample_kw)
    methods: dict[str, dict] = {
        "reference (SFT)": {
            "deploy_pref_acc": float("nan"),
            "deploy_reward": ref_eval["reward"],
            "helpfulness": ref_eval.get("helpfulness", float("nan")),
            "harm": ref_eval.get("harm", float("nan")),
            "win_rate_vs_ref": 0.5,
            "kl_to_ref": 0.0,
        }
    }

    # 4. Each preference method from the reference
    for m in cfg.methods:
        objective = objective_for(m)
        acc_fn = lambda state, o=objective: {
            "deploy_pref_acc": preference_accuracy(logits_fn, state["params"], test_arrays, o)["pref_acc"]
        }
        train_arrays = sets[m.train_data]
        if m.example_weights == "true_density_ratio":
            if m.train_data != "train" or "true_density_ratio" not in data.info:
                raise ValueError(f"method {m.name!r}: true_density_ratio weights need train_data='train' "
                                 "and a scenario that reports its density ratio")
            ratio = data.info["true_density_ratio"]
            weight = np.asarray([ratio[ex.meta["category"]] for ex in data.train], np.float32)
            train_arrays = {**train_arrays, "weight": weight}
        n_train = train_arrays["chosen_input_ids"].shape[0]
        mcfg = cfg
        if cfg.train.batch_size > n_train:  # e.g. DPO on the small D_v alone
            mcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=n_train))
        mw = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "preference", "method": m.name})
        t1 = time.perf_counter()
        params, _ = run_preference(graphdef, rest, ref_params, train_arrays, m, mcfg, seed=seed, writer=mw,
                                   checkpoint_dir=os.path.join(seed_dir, "checkpoints", m.name), eval_fn=acc_fn,
                                   val_arrays=sets.get("val"))
        mw.close()
        train_s = time.perf_counter() - t1
        acc = preference_accuracy(logits_fn, params, test_arrays, objective)
        ev = sample_and_score(graphdef, rest, params, ref_params, prompt_arrays, prompts, key=eval_key, **sample_kw)
        methods[m.name] = {
            "deploy_pref_acc": acc["pref_acc"],
            "deploy_reward": ev["reward"],
            "helpfulness": ev.get("helpfulness", float("nan")),
            "harm": ev.get("harm", float("nan")),
            "win_rate_vs_ref": win_rate(ev["rewards"], ref_eval["rewards"]),
            "kl_to_ref": ev["kl_to_ref"],
            "train_time_s": train_s,
        }
        print(f"  seed {seed} {m.name:>10s}: deploy acc {acc['pref_acc']:.3f}  reward {ev['reward']:+.3f}  "
              f"harm {ev.get('harm', float('nan')):.3f}  KL {ev['kl_to_ref']:.2f}  ({train_s:.1f}s)", flush=True)

    summary = {
        "scenario": cfg.data.scenario,
        "seed": seed,
        "methods": methods,
        "config": to_dict(cfg),
        "data_info": data.info,
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json_atomic(os.path.join(seed_dir, "summary.json"), summary)
    return summary


def run_experiment(cfg: ExperimentConfig, out: str, *, resume: bool = False, title: str = "",
                   columns=DEFAULT_COLUMNS) -> dict:
    """All seeds, then the aggregate files; returns the aggregated summary."""
    prepare_out_dir(out, cfg, resume=resume)
    t0 = time.perf_counter()
    print(f"alignshift {title or cfg.scenario}: scenario={cfg.data.scenario} seeds={cfg.seeds} "
          f"methods={[m.name for m in cfg.methods]} devices={jax.devices()}", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = JsonlWriter(metrics_path, static={"scenario": cfg.data.scenario})
    summaries = [run_seed(cfg, cfg.seed + k, out, writer) for k in range(cfg.seeds)]
    writer.close()

    summary = aggregate_seeds(summaries)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    table = format_table(summary, columns)
    header = (f"## ShiftBench `{cfg.data.scenario}` — {title or cfg.scenario} — deployment test set, "
              f"{summary['n_seeds']} seed(s), mean ± s.e.\n\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + table + "\n")
    plot_training_curves(
        read_jsonl(metrics_path),
        os.path.join(out, "training_curves.png"),
        panels=[("loss", "training loss"), ("rewards/margins", "train reward margin"),
                ("eval/deploy_pref_acc", "deploy pref. accuracy (held out)")],
    )
    print("\n" + header + table)
    print(f"\nwrote {out}/summary.json, results.md, metrics.jsonl, training_curves.png "
          f"in {summary['wall_time_s']:.0f}s", flush=True)
    return summary
