"""Regenerate the notebooks (without outputs) from this one source:

    python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files, so the committed notebooks stay output-free.
"""

import hashlib
import os

import nbformat as nbf
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """import os, sys
sys.path.insert(0, os.getcwd())  # notebooks/ (nbhelpers.py); run the notebook from its folder
import nbhelpers as nb
print("results root:", nb.results_root())"""


HERE = os.path.dirname(os.path.abspath(__file__))


def write(path, cells):
    path = os.path.join(HERE, os.path.basename(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for i, c in enumerate(cells):  # stable ids: rebuilding changes only the cells that changed
        c.id = hashlib.sha1(f"{stem}/{i}/{c.source}".encode()).hexdigest()[:8]
    nbk = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbf.validate(nbk)
    nbf.write(nbk, path)


write("notebooks/00_overview.ipynb", [
    new_markdown_cell("# alignshift results: overview\n\nEvery run under the results root (`$ALIGNSHIFT_RESULTS`, "
                      "default `../results`) that has a `summary.json`: what ran, and its method table "
                      "(mean ± standard error over seeds). Nothing is re-run: the notebook reads only "
                      "`summary.json` and `metrics.jsonl`."),
    new_code_cell(SETUP),
    new_code_cell("""import pandas as pd
from IPython.display import display, Markdown
runs = nb.list_runs()
rows = []
for name in runs:
    s, recs = nb.load_run(name)
    rows.append({"run": name, "scenario": s["scenario"], "seeds": s.get("n_seeds", 1),
                 "methods": len(s["methods"]), "logged records": len(recs),
                 "wall time (min)": round(s.get("wall_time_s", float("nan")) / 60, 1)})
pd.DataFrame(rows).set_index("run") if rows else print("no runs found")"""),
    new_code_cell("""for name in runs:
    s, recs = nb.load_run(name)
    display(Markdown(f"### `{name}` — scenario `{s['scenario']}`, {s.get('n_seeds', 1)} seed(s)"))
    display(nb.methods_table(s))"""),
    new_code_cell("""# training loss and reward margin of every run, side by side
for name in runs:
    s, recs = nb.load_run(name)
    display(Markdown(f"**{name}**"))
    nb.show(nb.plot_training(recs, ["loss", "rewards/margins", "rewards/accuracies"]))"""),
])

write("notebooks/01_iw_dpo_deploy_shift.ipynb", [
    new_markdown_cell("# IW-DPO under deployment shift (ShiftBench `deploy_shift`)\n\n"
                      "Runs: `iw_dpo` (`experiments/iw_dpo.py`) and, if present, `iw_ceiling`: also an "
                      "`iw_dpo.py` run, of three of `iw_dpo.yaml`'s methods (`--out results/iw_ceiling "
                      "--methods dpo_train,iw_dpo_r_med,iw_true_ratio`), where `iw_true_ratio` weights every "
                      "pair by the benchmark's true density ratio: the ceiling for any importance weighting "
                      "(`experiments/iw_diagnostics.py` is a separate diagnostic of where the KMM weights put "
                      "their mass; it prints, and writes no `summary.json`). "
                      "Training pairs are mostly *helpful-harmful*; "
                      "deployment pairs are *helpful-harmless*. We compare DPO on D_tr / D_v / D_tr∪D_v, "
                      "WPO, IW-DPO-L/-R (KMM weights) and the oracle, on the deployment test set; then the "
                      "batch weights the IW rules produced, and how calibrated the implicit reward is."),
    new_code_cell(SETUP),
    new_code_cell("""RUN = os.environ.get("ALIGNSHIFT_RUN", "iw_dpo")
summary, records = nb.load_run(RUN)
COLUMNS = ["deploy_pref_acc", "deploy_reward", "helpfulness", "harm", "win_rate_vs_ref", "kl_to_ref"]
nb.methods_table(summary, COLUMNS) if summary else None"""),
    new_code_cell("""if summary:
    nb.show(nb.plot_bars(summary, "deploy_pref_acc", title="held-out deployment preference accuracy"))
    nb.show(nb.plot_bars(summary, "harm", title="harm of sampled responses (lower is better)"))"""),
    new_code_cell("""# held-out accuracy during training, loss and reward margins
nb.show(nb.plot_training(records, ["eval/deploy_pref_acc", "loss", "rewards/margins"]))"""),
    new_markdown_cell("## Importance weights\nPer logged batch: the largest normalised weight and the effective "
                      "sample size ESS/B. Uniform DPO sits at max w = 1, ESS = 1; weights that never move far "
                      "from 1 mean KMM barely separates the deployment-type pairs."),
    new_code_cell("""display(nb.weight_stats(records)) if records else None
nb.show(nb.plot_weight_histograms(records))"""),
    new_markdown_cell("## Calibration of the implicit reward\nσ(batch mean margin) against the fraction of "
                      "training pairs ranked correctly, over all logged batches."),
    new_code_cell("""display(nb.calibration(records))
nb.show(nb.plot_calibration(records))"""),
    new_code_cell("""# the importance-weighting ceiling (iw_dpo.py: DPO, IW-DPO-R median, true density ratio), if that run exists
ceil, _ = nb.load_run("iw_ceiling")
nb.methods_table(ceil, ["deploy_pref_acc", "deploy_reward", "harm"]) if ceil else None"""),
])

write("notebooks/02_robust_dpo_preference_shift.ipynb", [
    new_markdown_cell("# WDPO / KLDPO under preference shift (ShiftBench `preference_shift`)\n\n"
                      "Run: `robust_dpo` (`experiments/robust_dpo.py`). Pairs are labelled by a mixture α₀ of "
                      "two reward objectives at training; evaluation relabels the test pairs for every α in "
                      "[0, 1] (convex and geometric mixing). The shift curves show how each method degrades "
                      "as α moves away from α₀ (dotted line)."),
    new_code_cell(SETUP),
    new_code_cell("""RUN = os.environ.get("ALIGNSHIFT_RUN", "robust_dpo")
summary, records = nb.load_run(RUN)
nb.show(nb.plot_shift_curves(summary)) if summary else None"""),
    new_code_cell("""# accuracy at a few evaluation mixtures (mean ± s.e.)
if summary:
    cols = [k for k in ("acc/convex/0.10", "acc/convex/0.50", "acc/convex/1.00", "acc/geometric/1.00")
            if any(k in m for m in summary["methods"].values())]
    display(nb.methods_table(summary, cols or None))"""),
    new_code_cell("""nb.show(nb.plot_training(records, ["loss", "rewards/margins", "penalty"]))"""),
    new_markdown_cell("## KLDPO tilt weights\nKLDPO's worst-case weights `min(exp((L−L̄)/τ), 10)`: the smaller τ, "
                      "the more the weight concentrates on the highest-loss pairs (large max w, small ESS/B); "
                      "WDPO and DPO keep uniform weights."),
    new_code_cell("""display(nb.weight_stats(records)) if records else None
nb.show(nb.plot_weight_histograms(records))"""),
    new_code_cell("""nb.show(nb.plot_calibration(records))"""),
])

write("notebooks/03_dora_synthetic_shift.ipynb", [
    new_markdown_cell("# DoRA under synthetic-response shift (ShiftBench `synthetic_shift`)\n\n"
                      "Run: `dora` (`experiments/dora.py`). Most training lists come from biased synthetic "
                      "sources (a sycophantic and a verbose LLM), a minority (α) from the target distribution; "
                      "DoRA reweights by the classifier-calibrated density ratio h̃ inside a log-mean-exp. "
                      "Evaluation is on the target distribution: implicit-reward accuracy on held-out target "
                      "pairs (all, and those whose responses differ in flattery) and the target reward of "
                      "sampled responses."),
    new_code_cell(SETUP),
    new_code_cell("""RUN = os.environ.get("ALIGNSHIFT_RUN", "dora")
summary, records = nb.load_run(RUN)
COLUMNS = ["target_pref_acc", "target_pref_acc_flat", "target_reward", "n_flat", "win_rate_vs_ref", "kl_to_ref"]
if summary:
    print(f"{summary.get('n_seeds', 1)} seed(s), mean ± s.e.; methods:", ", ".join(summary["methods"]))
    display(nb.methods_table(summary, [c for c in COLUMNS if c in nb.metric_names(summary)] or None))"""),
    new_markdown_cell("## DoRA vs its ablations, paired by seed\nFor each base loss (DPO, Plackett–Luce): DoRA "
                      "minus ERM, minus DRO only (log-mean-exp without h̃) and minus reweighting only "
                      "(mean h̃·ℓ); the count is the number of seeds where DoRA is higher."),
    new_code_cell("""display(nb.paired_table(summary)) if summary and summary.get("paired") else print("no paired comparisons")"""),
    new_code_cell("""if summary:
    main = next((k for k in ("target_pref_acc", "deploy_pref_acc", "pref_acc") if k in nb.metric_names(summary)),
                nb.metric_names(summary)[0])
    nb.show(nb.plot_bars(summary, main, title="target preference accuracy (held out)"))
    if "target_reward" in nb.metric_names(summary):
        nb.show(nb.plot_bars(summary, "target_reward", title="target reward of sampled responses"))"""),
    new_code_cell("""nb.show(nb.plot_training(records, ["loss", "eval/target_pref_acc", "rewards/margins"]))"""),
    new_markdown_cell("## Source classifier: calibration\nDoRA's weights are only as good as the classifier's "
                      "P(target | response): its held-out accuracy, AUC, ECE, Brier and NLL (mean over seeds), "
                      "next to the same classifier on the generator's own features (how much source signal the "
                      "reference model's hidden states lose), and the per-seed reliability diagram "
                      "(`seed_<s>/summary.json`)."),
    new_code_cell("""if summary and summary.get("diagnostics"):
    display(nb.dora_classifier_table(summary))
    nb.show(nb.plot_source_reliability(nb.load_seed_summaries(RUN)))
else:
    print("no classifier diagnostics in this summary")"""),
    new_markdown_cell("## Calibration weights by source\nMean h̃ per response and H per list by their true "
                      "source: the target lists should get the largest weight (1/α at most). ESS(H) is the "
                      "effective sample size of the list weights as a fraction of the lists."),
    new_code_cell("""if summary and summary.get("diagnostics"):
    display(nb.dora_weight_table(summary))
    print(nb.dora_weight_stats(summary))"""),
    new_markdown_cell("## Robust weights during training\nThe effective per-example weights of the reduction "
                      "(softmax of h̃·ℓ/λ for DoRA) per logged batch."),
    new_code_cell("""display(nb.weight_stats(records)) if records else None
nb.show(nb.plot_weight_histograms(records))"""),
    new_code_cell("""nb.show(nb.plot_calibration(records))"""),
])

write("notebooks/04_flr_followup.ipynb", [
    new_markdown_cell("# FLR: follow-up likelihood as reward (ShiftBench `followup`)\n\n"
                      "Run: `flr` (`experiments/flr.py`). First the reward models on held-out ground-truth "
                      "pairs: FLR (the likelihood of positive vs negative user follow-ups; two scoring modes × "
                      "three aggregations) against Direct (the response's own length-normalised likelihood) "
                      "and a length baseline. Then alignment: DPO on pairs mined from the SFT policy's samples "
                      "and labelled by FLR, by Direct or by the ground truth."),
    new_code_cell(SETUP),
    new_code_cell("""from IPython.display import display, Markdown
RUN = os.environ.get("ALIGNSHIFT_RUN", "flr")
summary, records = nb.load_run(RUN)
if summary:
    print(f"{summary.get('n_seeds', 1)} seed(s), mean ± s.e.")"""),
    new_markdown_cell("## Reward models: FLR vs Direct\nPairwise accuracy on the ground-truth test pairs, and "
                      "Pearson / Spearman correlation of each reward with the quality of the individual test "
                      "responses (`summary[\"reward_models\"]`). `FLR` is the likelihood mode with the "
                      "difference aggregation (the paper's default)."),
    new_code_cell("""if summary and summary.get("reward_models"):
    display(nb.reward_models_table(summary))
    display(Markdown("**pairwise accuracy: FLR mode × aggregation, vs Direct**"))
    display(nb.flr_grid(summary, "pair_acc"))
    nb.show(nb.plot_bars(nb.rm_summary(summary), "pair_acc", title="reward-model accuracy on test pairs"))
else:
    print("no reward_models in this summary")"""),
    new_markdown_cell("## Alignment on mined pairs\nPolicies trained from the SFT reference on max-vs-min pairs "
                      "of sampled responses, labelled by each reward; scored by the ground-truth quality of "
                      "their sampled test responses. `pair_label_acc` is how often the mined pair's label "
                      "agrees with the ground truth."),
    new_code_cell("""if summary:
    display(nb.methods_table(summary, [k for k in ("quality", "win_rate_vs_sft", "kl_to_ref", "pair_label_acc",
                                                   "n_pairs") if k in nb.metric_names(summary)] or None))
    for k in ("quality", "win_rate_vs_sft"):
        if k in nb.metric_names(summary):
            nb.show(nb.plot_bars(summary, k))"""),
    new_code_cell("""# Spearman of each labeller's scores with the ground-truth quality of the mined samples, per seed
display(nb.mined_correlation_table(summary)) if summary and summary.get("mined_reward_correlation") else None"""),
    new_code_cell("""nb.show(nb.plot_training(records, ["loss", "rewards/margins", "rewards/accuracies"]))"""),
    new_code_cell("""nb.show(nb.plot_calibration(records))"""),
])


write("notebooks/shift_sweeps.ipynb", [
    new_markdown_cell("# Where each method helps: shift-strength sweeps\n\nReads the committed sweep results `docs/results/shift_sweep_<scenario>.json` written by `experiments/shift_sweep.py` (nothing is trained here) and renders, per scenario, a heat map (two knobs) or strip (one knob) of the paired difference (method − DPO) on the experiment's target metric, with `*` where the 95% t-interval over seeds excludes 0, and a table of every cell. The reading of each sweep is in `docs/results/shift_sweeps.md`."),
    new_code_cell('import glob, io, json, os\nimport numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt\nfrom IPython.display import Image, Markdown, display\n\nRESULTS = os.path.join(os.getcwd(), "..", "docs", "results")  # run the notebook from notebooks/\npaths = sorted(glob.glob(os.path.join(RESULTS, "shift_sweep_*.json")))\nsweeps = {}\nfor p in paths:\n    with open(p) as f:\n        s = json.load(f)\n    sweeps[s["scenario"]] = s\nprint("sweeps:", {k: f"{len(s[\'points\'])} points, {s[\'n_seeds\']} seeds" for k, s in sweeps.items()})'),
    new_code_cell('def cell_id(point):\n    return ",".join(f"{k}={v}" for k, v in point.items())\n\ndef heatmap(s):\n    knobs, methods, target = s["grid"], s["methods_compared"], s["target_metric"]\n    ks = list(knobs)\n    rows_v = knobs[ks[1]] if len(ks) == 2 else [None]\n    cols_v = knobs[ks[0]]\n    cells = {c["cell"]: c for c in s["points"]}\n    vals = [c["paired"][m][target]["mean"] for c in s["points"] for m in methods if target in c["paired"].get(m, {})]\n    lim = max([abs(v) for v in vals] + [1e-3])\n    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 0.9 * len(rows_v) + 1.8), squeeze=False)\n    im = None\n    for ax, m in zip(axes[0], methods):\n        Z = np.full((len(rows_v), len(cols_v)), np.nan)\n        for i, rv in enumerate(rows_v):\n            for j, cv in enumerate(cols_v):\n                point = {ks[0]: cv} if rv is None else {ks[0]: cv, ks[1]: rv}\n                c = cells.get(cell_id(point))\n                d = c and c["paired"].get(m, {}).get(target)\n                if not d:\n                    continue\n                Z[i, j] = d["mean"]\n                sig = d["ci95"] is not None and (d["ci95"][0] > 0 or d["ci95"][1] < 0)\n                ax.text(j, i, f"{d[\'mean\']:+.3f}{\'*\' if sig else \'\'}", ha="center", va="center", fontsize=8,\n                        fontweight="bold" if sig else "normal")\n        im = ax.imshow(Z, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", origin="lower")\n        ax.set_xticks(range(len(cols_v)), [str(v) for v in cols_v]); ax.set_xlabel(ks[0])\n        if rows_v[0] is None:\n            ax.set_yticks([])\n        else:\n            ax.set_yticks(range(len(rows_v)), [str(v) for v in rows_v]); ax.set_ylabel(ks[1]) if ax is axes[0][0] else None\n        ax.set_title(f"{m} − {s[\'baseline\']}", fontsize=9)\n    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"Δ {s[\'target_label\']}")\n    fig.suptitle(f"{s[\'scenario\']}: (method − DPO), {s[\'n_seeds\']} seeds; * = 95% CI excludes 0", fontsize=10, y=1.04)\n    buf = io.BytesIO()\n    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")\n    plt.close(fig)\n    display(Image(data=buf.getvalue(), format="png"))  # inline PNG whatever the backend\n\ndef table(s):\n    rows = []\n    for c in s["points"]:\n        for m in s["methods_compared"]:\n            for k in s["metrics"]:\n                d = c["paired"].get(m, {}).get(k)\n                if not d:\n                    continue\n                lo, hi = d["ci95"] if d["ci95"] else (np.nan, np.nan)\n                rows.append({**c["knobs"], "method": m, "metric": k, "dpo": c["means"][s["baseline"]].get(k),\n                             "method value": c["means"][m].get(k), "Δ mean": d["mean"], "CI low": lo, "CI high": hi,\n                             "n": d["n"], "sig.": "*" if d["ci95"] and (lo > 0 or hi < 0) else ""})\n    return pd.DataFrame(rows).round(4)'),
    new_code_cell('for name, s in sweeps.items():\n    display(Markdown(f"## `{name}` — target metric `{s[\'target_metric\']}` ({s[\'target_label\']}); baseline `{s[\'baseline\']}`; "\n                     f"{s[\'n_seeds\']} seeds; commit `{str(s[\'commit\'])[:10]}`; wall time {s[\'wall_time_s\'] / 60:.1f} min"\n                     + ("" if s.get("complete") else " — **partial sweep**")))\n    heatmap(s)\n    t = table(s)\n    display(t[t["metric"] == s["target_metric"]].drop(columns="metric"))\nif not sweeps:\n    print("no sweep results in", RESULTS)'),
    new_code_cell('# every recorded metric, every cell (paired over seeds)\nfor name, s in sweeps.items():\n    display(Markdown(f"### `{name}`: all metrics"))\n    display(table(s))'),
])
