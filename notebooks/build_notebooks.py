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
