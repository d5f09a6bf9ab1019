"""Regenerate the notebooks (without outputs) from this one source:

    python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files, so the committed notebooks stay output-free.
"""

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
                      "Runs: `iw_dpo` (`experiments/iw_dpo.py`) and, if present, `iw_ceiling` "
                      "(`experiments/iw_diagnostics.py`). Training pairs are mostly *helpful-harmful*; "
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
    new_code_cell("""# the importance-weighting ceiling (true density ratio), if that run exists
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
                      "sources, a minority from the target distribution; DoRA reweights by the classifier-"
                      "calibrated density ratio inside a log-mean-exp. Evaluation is on target-judged data."),
    new_code_cell(SETUP),
    new_code_cell("""RUN = os.environ.get("ALIGNSHIFT_RUN", "dora")
summary, records = nb.load_run(RUN)
nb.methods_table(summary) if summary else None"""),
    new_code_cell("""if summary:
    main = next((k for k in ("target_pref_acc", "deploy_pref_acc", "pref_acc") if k in nb.metric_names(summary)),
                nb.metric_names(summary)[0])
    nb.show(nb.plot_bars(summary, main))"""),
    new_code_cell("""nb.show(nb.plot_training(records, ["loss", "rewards/margins", "rewards/accuracies"]))"""),
    new_markdown_cell("## Calibrated robust weights\nThe effective per-example weights of the reduction "
                      "(softmax of h̃·ℓ/λ for DoRA) per logged batch."),
    new_code_cell("""display(nb.weight_stats(records)) if records else None
nb.show(nb.plot_weight_histograms(records))"""),
    new_code_cell("""nb.show(nb.plot_calibration(records))"""),
])

write("notebooks/04_flr_followup.ipynb", [
    new_markdown_cell("# FLR: follow-up likelihood as reward (ShiftBench `followup`)\n\n"
                      "Run: `flr` (`experiments/flr.py`). FLR vs Direct as reward models (pair accuracy, "
                      "correlation with quality) and DPO on FLR-mined vs Direct-mined vs ground-truth-mined "
                      "pairs."),
    new_code_cell(SETUP),
    new_code_cell("""RUN = os.environ.get("ALIGNSHIFT_RUN", "flr")
summary, records = nb.load_run(RUN)
nb.methods_table(summary) if summary else None"""),
    new_code_cell("""if summary:
    for k in ("pair_acc", "quality", "win_rate_vs_sft"):
        if k in nb.metric_names(summary):
            nb.show(nb.plot_bars(summary, k))"""),
    new_code_cell("""nb.show(nb.plot_training(records, ["loss", "rewards/margins", "rewards/accuracies"]))"""),
    new_code_cell("""nb.show(nb.plot_calibration(records))"""),
])
