"""Where each method helps: sweep the strength of a ShiftBench scenario's shift and record
(method − DPO) on the experiment's target metric, paired by seed, with 95% t-intervals.

For one scenario, a grid over one or two ``data.scenario_kwargs`` knobs, a method list and
seeds, every grid point runs the scenario's own experiment (``experiments/iw_dpo.py``,
``robust_dpo.py`` or ``dora.py``: same config, same driver, same evaluator) in this process,
with the reduced settings given as dotted overrides (``--set train.steps=100``). Per grid point
the paired difference of every method against the DPO baseline is computed from the per-seed
summaries (:func:`alignshift.eval.report.paired_differences`) and written to the JSON file at
once, so a cut-off sweep leaves every finished point (and, with the per-point work directory
under ``--work``, every finished seed: rerunning the same command resumes). The figure is a
heat map over the two knobs (a strip for one knob) of the mean difference on the target
metric, with cells whose 95% interval excludes 0 marked.

The SFT reference of a seed is trained once and reused at every grid point whose SFT corpus
(hashed) and model/SFT settings are identical (for a knob that only changes the preference
pairs, the reference of a seed is then the same at every point, as it would be in a
per-point run with the same seed); otherwise it is trained afresh.

    python experiments/shift_sweep.py --scenario preference_shift --grid alpha0=0.1,0.4,0.7,1.0 \
        --methods dpo,kldpo_t0.05,kldpo_norm_t0.05,wdpo_r0.01 --seeds 3 --set train.steps=100 \
        --json docs/results/shift_sweep_preference_shift.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: per scenario: the experiment script, its baseline, the target metric (the heat map) and the
#: other metrics recorded, and what the method's own theory predicts
SCENARIOS = {
    "deploy_shift": dict(script="iw_dpo.py", baseline="dpo_train", target="deploy_pref_acc",
                         metrics=["deploy_pref_acc", "deploy_reward", "harm"],
                         label="deployment preference accuracy"),
    "preference_shift": dict(script="robust_dpo.py", baseline="dpo", target="acc/convex/1.00",
                             metrics=["acc/convex/1.00", "acc_alpha0", "acc_worst", "acc_mean"],
                             label="accuracy at α = 1 (convex)"),
    "synthetic_shift": dict(script="dora.py", baseline="dpo", target="target_pref_acc",
                            metrics=["target_pref_acc", "target_pref_acc_flat", "target_reward"],
                            label="target preference accuracy"),
}


def _load_script(name: str):
    path = os.path.join(ROOT, "experiments", name)
    spec = importlib.util.spec_from_file_location("_sweep_" + name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse_grid(specs: list[str]) -> list[tuple[str, list]]:
    out = []
    for s in specs:
        k, _, vals = s.partition("=")
        if not vals:
            raise SystemExit(f"error: --grid {s!r}: expected knob=v1,v2,...")
        out.append((k.strip(), [json.loads(v) for v in vals.split(",")]))
    if not 1 <= len(out) <= 2:
        raise SystemExit("error: one or two --grid knobs")
    return out


def _cell_id(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def _work_name(cell: str) -> str:
    return cell.replace("=", "_").replace(",", "__")


_SFT_CACHE: dict = {}


def _cached_experiment(exp):
    """``exp`` with its SFT reference reused across grid points (see module doc) and finished
    seeds reused on a rerun."""
    from alignshift.config import to_dict
    base = type(exp)

    def build_reference(self, ctx):
        cfg = ctx.cfg
        corpus = hashlib.sha256(repr([repr(e) for e in ctx.data.sft]).encode()).hexdigest()
        key = json.dumps([ctx.seed, corpus, to_dict(cfg.model), to_dict(cfg.sft), list(ctx.tokenizer.vocab)],
                         sort_keys=True, default=str)
        if key in _SFT_CACHE and not cfg.model.lora.enabled:
            ctx.graphdef, ctx.rest, ctx.ref_params = _SFT_CACHE[key]
            print(f"  seed {ctx.seed}: SFT reference reused (identical corpus and settings)", flush=True)
            return
        base.build_reference(self, ctx)
        _SFT_CACHE[key] = (ctx.graphdef, ctx.rest, ctx.ref_params)

    exp.__class__ = type("Cached" + base.__name__, (base,), {"build_reference": build_reference,
                                                             "resume_seeds": True})
    return exp


def _derived(scenario: str, summaries: list[dict]) -> None:
    """Add the sweep's derived metrics to each seed's method rows (in place)."""
    if scenario != "preference_shift":
        return
    for s in summaries:
        a0 = float(s["data_info"].get("alpha0", s["config"]["data"]["scenario_kwargs"].get("alpha0", 0.1)))
        for row in s["methods"].values():
            accs = {k: v for k, v in row.items() if k.startswith("acc/convex/") and isinstance(v, float)
                    and math.isfinite(v)}
            if not accs:
                continue
            row["acc_alpha0"] = row.get(f"acc/convex/{a0:.2f}", float("nan"))
            row["acc_worst"] = min(accs.values())
            row["acc_mean"] = float(np.mean(list(accs.values())))


def _diagnostics(scenario: str, work: str) -> dict:
    """What the method's theory conditions on, from the point's aggregate ``summary.json``:
    DoRA's source-classifier held-out AUC and weights by source; the data's label statistics."""
    path = os.path.join(work, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        s = json.load(f)
    out = {}
    info = s.get("data_info") or {}
    seed_path = os.path.join(work, f"seed_{s.get('seeds', [0])[0]}", "summary.json")
    if not info and os.path.isfile(seed_path):  # the first seed's data (the aggregate may not copy it)
        with open(seed_path) as f:
            info = json.load(f).get("data_info") or {}
    for k in ("train_deploy_label_agreement", "train_deploy_label_agreement_by_category", "test_deploy_label_agreement",
              "test_ab_disagreement", "train_ab_disagreement"):
        if isinstance(info.get(k), (int, float, dict)):
            out[k] = info[k]
    mpath = os.path.join(work, "metrics.jsonl")
    if scenario == "deploy_shift" and os.path.isfile(mpath):  # the IW weights after the warm-up (step > 40)
        by: dict = {}
        with open(mpath) as f:
            for line in f:
                r = json.loads(line)
                if r.get("phase") == "preference" and "weights/ess" in r and r.get("step", 0) > 40:
                    by.setdefault(r["method"], []).append(r)
        out["weights_after_warmup"] = {m: {"ess": float(np.mean([r["weights/ess"] for r in rs])),
                                           "min": float(min(r["weights/min"] for r in rs)),
                                           "max": float(max(r["weights/max"] for r in rs))} for m, rs in by.items()}
    dg = s.get("diagnostics")
    if scenario == "synthetic_shift" and dg:
        out["classifier_auc"] = dg["classifier"]["pooled"]["auc"]
        out["oracle_feature_auc"] = dg.get("oracle_feature_classifier", {}).get("pooled", {}).get("auc")
        out["mean_h_by_source"] = dg["mean_h_by_source"]
        out["share_of_H_on_target"] = dg["share_of_H_on_target"]
        out["H_ess"] = dg["H_ess"]
    return out


def markdown(result: dict, metrics=None) -> str:
    """Markdown tables of a sweep: per cell and method, mean (method − DPO) [95% CI] (k/n > 0),
    ``**`` where the interval excludes 0; one table per metric."""
    knobs = list(result["grid"])
    out = []
    points = sorted(result["points"], key=lambda c: [result["grid"][k].index(c["knobs"][k]) for k in reversed(knobs)])
    for k in metrics or result["metrics"]:
        head = "| " + " | ".join(knobs) + f" | {result['baseline']} | " + " | ".join(
            f"{m} − {result['baseline']}" for m in result["methods_compared"]) + " |"
        rows = [f"**{k}**{' (target metric)' if k == result['target_metric'] else ''}: mean over seeds of "
                f"{result['baseline']}, and paired (method − {result['baseline']}) mean [95% t-interval] (seeds > 0 of n)", "",
                head, "|" + "---|" * (len(knobs) + 1 + len(result["methods_compared"]))]
        for c in points:
            cells = []
            for m in result["methods_compared"]:
                d = c["paired"].get(m, {}).get(k)
                if not d:
                    cells.append("—")
                    continue
                sig = d["ci95"] is not None and (d["ci95"][0] > 0 or d["ci95"][1] < 0)
                ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                txt = f"{d['mean']:+.3f}{ci} ({d['n_positive']}/{d['n']})"
                cells.append(f"**{txt}**" if sig else txt)
            b = c["means"].get(result["baseline"], {}).get(k)
            rows.append("| " + " | ".join(str(c["knobs"][kk]) for kk in knobs) + f" | {'—' if b is None else f'{b:.3f}'} | "
                        + " | ".join(cells) + " |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def _seed_summaries(work: str, cfg) -> list[dict]:
    out = []
    for k in range(cfg.seeds):
        with open(os.path.join(work, f"seed_{cfg.seed + k}", "summary.json")) as f:
            out.append(json.load(f))
    return out


def _write_json(path: str, obj: dict) -> None:
    obj["commits"] = sorted({c["commit"] for c in obj["points"] if c.get("commit")} | {obj["commit"]} - {None})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def plot(result: dict, png: str) -> None:
    """Heat map (two knobs) or strip (one knob) of mean (method − DPO) on the target metric;
    ``*`` marks a cell whose 95% interval excludes 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = result["grid"]
    methods = result["methods_compared"]
    target = result["target_metric"]
    ks = list(knobs)
    rows_v = knobs[ks[1]] if len(ks) == 2 else [None]
    cols_v = knobs[ks[0]]
    cells = {c["cell"]: c for c in result["points"]}
    vals = [c["paired"][m][target]["mean"] for c in result["points"] for m in methods
            if target in c["paired"].get(m, {})]
    lim = max([abs(v) for v in vals] + [1e-3])
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 0.9 * len(rows_v) + 1.8),
                             squeeze=False)
    im = None
    for ax, m in zip(axes[0], methods):
        Z = np.full((len(rows_v), len(cols_v)), np.nan)
        for i, rv in enumerate(rows_v):
            for j, cv in enumerate(cols_v):
                point = {ks[0]: cv} if rv is None else {ks[0]: cv, ks[1]: rv}
                c = cells.get(_cell_id(point))
                d = c and c["paired"].get(m, {}).get(target)
                if not d:
                    continue
                Z[i, j] = d["mean"]
                sig = d["ci95"] is not None and (d["ci95"][0] > 0 or d["ci95"][1] < 0)
                ax.text(j, i, f"{d['mean']:+.3f}{'*' if sig else ''}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if sig else "normal")
        im = ax.imshow(Z, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_xticks(range(len(cols_v)), [str(v) for v in cols_v])
        ax.set_xlabel(ks[0])
        if rows_v[0] is None:
            ax.set_yticks([])
        else:
            ax.set_yticks(range(len(rows_v)), [str(v) for v in rows_v])
            ax.set_ylabel(ks[1]) if ax is axes[0][0] else None
        ax.set_title(f"{m} − {result['baseline']}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"Δ {result['target_label']}")
    fig.suptitle(f"{result['scenario']}: (method − DPO) on {result['target_label']}, {result['n_seeds']} seeds; "
                 "* = 95% CI excludes 0", fontsize=10, y=1.04)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--markdown"]:  # print the tables of finished sweeps: --markdown FILE.json ...
        for path in argv[1:]:
            with open(path) as f:
                r = json.load(f)
            print(f"### `{r['scenario']}`\n\n" + markdown(r) + "\n")
        return {"markdown": argv[1:]}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--grid", action="append", required=True, help="knob=v1,v2,... (data.scenario_kwargs key); 1 or 2")
    p.add_argument("--methods", required=True, help="comma-separated config method names (the DPO baseline is added)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="dotted config override, e.g. train.steps=100")
    p.add_argument("--config", default=None, help="default: the experiment's own config")
    p.add_argument("--json", default=None, help="default: docs/results/shift_sweep_<scenario>.json")
    p.add_argument("--merge", action="append", default=[],
                   help="also keep the finished points of this JSON file of the same sweep (run in parts)")
    p.add_argument("--work", default=None, help="per-point run directories (default results/shift_sweep/<scenario>)")
    args = p.parse_args(argv)

    spec = SCENARIOS[args.scenario]
    grid = _parse_grid(args.grid)
    base = spec["baseline"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != base]
    json_path = args.json or os.path.join(ROOT, "docs", "results", f"shift_sweep_{args.scenario}.json")
    png_path = os.path.splitext(json_path)[0] + ".png"
    work_root = args.work or os.path.join(ROOT, "results", "shift_sweep", args.scenario)
    mod = _load_script(spec["script"])
    from alignshift.eval.report import paired_differences
    from alignshift.experiment.driver import run_experiment

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    result = {"scenario": args.scenario, "command": "python experiments/shift_sweep.py " + " ".join(argv),
              "commit": commit, "experiment": f"experiments/{spec['script']}", "baseline": base,
              "methods_compared": methods, "target_metric": spec["target"], "target_label": spec["label"],
              "metrics": spec["metrics"], "grid": {k: v for k, v in grid}, "n_seeds": args.seeds,
              "overrides": args.set, "points": [], "wall_time_s": 0.0, "complete": False}
    names = [k for k, _ in grid]
    for i, path in enumerate([json_path, *args.merge]):  # resume: keep finished points of the same sweep
        if not os.path.exists(path):
            continue
        with open(path) as f:
            old = json.load(f)
        same = ("n_seeds", "overrides", "methods_compared", "baseline")
        if {k: old.get(k) for k in same} != {k: result[k] for k in same} or list(old["grid"]) != names:
            if i:
                raise SystemExit(f"error: --merge {path}: another sweep (seeds, overrides, methods or knobs differ)")
            continue
        # the same sweep, possibly on a grid extended since (or run in parts: --merge): keep its points
        have = {c["cell"] for c in result["points"]}
        new = [c for c in old["points"] if all(c["knobs"][k] in v for k, v in grid) and c["cell"] not in have]
        result["points"] += new
        result["wall_time_s"] += old.get("wall_time_s", 0.0) if i == 0 else sum(c["wall_time_s"] for c in new)
        if i == 0 and old.get("commit"):
            result["commit"] = old["commit"]  # where the sweep started; "commits": where its points ran
    for c in result["points"]:
        if not c.get("diagnostics"):
            c["diagnostics"] = _diagnostics(args.scenario, os.path.join(work_root, _work_name(c["cell"])))
    done = {c["cell"] for c in result["points"]}
    t_start = time.perf_counter()
    wall0 = result["wall_time_s"]
    for values in itertools.product(*[v for _, v in grid]):
        point = dict(zip(names, values))
        cell = _cell_id(point)
        if cell in done:
            print(f"[sweep] {cell}: done, kept", flush=True)
            continue
        work = os.path.join(work_root, _work_name(cell))
        argv_run = ["--out", work, "--seeds", str(args.seeds), "--methods", ",".join([base, *methods]),
                    *(["--config", args.config] if args.config else []), *args.set,
                    *[f"data.scenario_kwargs.{k}={json.dumps(v)}" for k, v in point.items()]]
        _, cfg = mod.parse_args(argv_run)
        t0 = time.perf_counter()
        print(f"[sweep] {cell}: running ({args.seeds} seeds, methods {[base, *methods]})", flush=True)
        exp = _cached_experiment(_make_experiment(mod))
        run_experiment(cfg, work, exp, resume=True)
        summaries = _seed_summaries(work, cfg)
        _derived(args.scenario, summaries)
        paired = paired_differences(summaries, base, spec["metrics"], methods=methods)
        means = {m: {k: float(np.mean([s["methods"][m][k] for s in summaries])) for k in spec["metrics"]
                     if all(k in s["methods"][m] for s in summaries)} for m in [base, *methods]}
        result["points"].append({"cell": cell, "knobs": point, "commit": commit, "seeds": paired["seeds"],
                                 "paired": paired["methods"],
                                 "means": means, "wall_time_s": time.perf_counter() - t0,
                                 "diagnostics": _diagnostics(args.scenario, work)})
        result["wall_time_s"] = wall0 + time.perf_counter() - t_start
        _write_json(json_path, result)
        plot(result, png_path)
        d = paired["methods"]
        print(f"[sweep] {cell}: " + "; ".join(
            f"{m} {d[m][spec['target']]['mean']:+.3f} {d[m][spec['target']]['ci95']}" for m in methods
            if spec["target"] in d[m]) + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    result["wall_time_s"] = wall0 + time.perf_counter() - t_start
    result["complete"] = len(result["points"]) == math.prod(len(v) for _, v in grid)
    _write_json(json_path, result)
    plot(result, png_path)
    print(f"[sweep] wrote {json_path} and {png_path} ({result['wall_time_s']:.0f}s)", flush=True)
    return result


def _make_experiment(mod):
    """The experiment object ``mod``'s ``main`` builds (the same factory as the script)."""
    from alignshift.experiment.dora import DoraExperiment
    from alignshift.experiment.driver import Experiment
    from alignshift.experiment.evaluators import AlphaSweepEvaluator
    name = os.path.basename(mod.__file__)
    if name == "dora.py":
        return DoraExperiment()
    if name == "robust_dpo.py":
        return Experiment(AlphaSweepEvaluator(), title="WDPO / KLDPO")
    return Experiment(title="IW-DPO")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
