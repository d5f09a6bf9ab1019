"""Evaluation across reward mixtures for ``preference_shift`` (the WDPO/KLDPO experiment).

Training labels come from the α₀ convex mixture of two ground-truth rewards; evaluation
sweeps α over the scenario's grid with convex and geometric mixing:

* ``acc/<kind>/<α>``: implicit-reward accuracy on the SAME test pairs relabelled by the
  (kind, α) mixture (like is compared with like along the curve);
* ``reward/<kind>/<α>``: mean (kind, α)-mixed ground-truth reward of responses sampled
  from the policy for the test prompts (one sample set per method, re-scored per α);
* ``kl_to_ref``.

``curves_from_summary`` and ``plot_alpha_curves`` turn an aggregated ``summary.json`` into
per-method curves (mean ± s.e. over seeds) and a PNG with error bands. The evaluator that
measures these metrics is :class:`alignshift.experiment.evaluators.AlphaSweepEvaluator`.
"""

from __future__ import annotations

import numpy as np

from alignshift.eval.report import save_figure_atomic

__all__ = ["alpha_key", "curves_from_summary", "plot_alpha_curves"]


def alpha_key(metric: str, kind: str, alpha: float) -> str:
    """The summary key of ``metric`` (``acc`` / ``reward``) under (kind, α) mixing."""
    return f"{metric}/{kind}/{alpha:.2f}"


def curves_from_summary(summary: dict, alphas, kinds) -> dict:
    """``{method: {"<metric>/<kind>": [mean per α], "<metric>/<kind>_sem": [...]}}``."""
    curves = {}
    for name, m in summary["methods"].items():
        c = {}
        for metric in ("acc", "reward"):
            for k in kinds:
                c[f"{metric}/{k}"] = [m.get(alpha_key(metric, k, a), float("nan")) for a in alphas]
                c[f"{metric}/{k}_sem"] = [m.get(alpha_key(metric, k, a) + "_sem", 0.0) for a in alphas]
        curves[name] = c
    return {"alphas": list(alphas), "kinds": list(kinds), "methods": curves}


def plot_alpha_curves(curves: dict, path: str, *, alpha0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.asarray(curves["alphas"])
    kinds = curves["kinds"]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7.5), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(curves["methods"])}
    for j, k in enumerate(kinds):
        for i, (metric, title) in enumerate((("acc", "preference accuracy"), ("reward", "mixed reward of samples"))):
            ax = axes[i, j]
            for name, c in curves["methods"].items():
                y = np.asarray(c[f"{metric}/{k}"], float)
                if np.all(np.isnan(y)):
                    continue
                e = np.asarray(c[f"{metric}/{k}_sem"], float)
                ls = "--" if name.startswith("reference") else "-"
                ax.plot(alphas, y, ls, marker="o", ms=3, label=name, color=colors[name])
                ax.fill_between(alphas, y - e, y + e, color=colors[name], alpha=0.15)
            ax.axvline(alpha0, color="k", lw=0.8, ls=":")
            ax.set_title(f"{title} — {k} mixing")
            ax.set_xlabel("evaluation α (training α₀ dotted)")
            ax.grid(alpha=0.3)
    axes[1, 0].legend(fontsize=7)  # the reward panels also show the reference
    fig.tight_layout()
    save_figure_atomic(fig, path)
