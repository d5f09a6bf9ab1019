"""Evaluation across reward mixtures for ``preference_shift`` (the WDPO/KLDPO experiment).

Training labels come from the α₀ convex mixture of two ground-truth rewards; evaluation
sweeps α over the scenario's grid with convex and geometric mixing:

* ``acc/<kind>/<α>``: implicit-reward accuracy on the SAME test pairs relabelled by the
  (kind, α) mixture (like is compared with like along the curve);
* ``reward/<kind>/<α>``: mean (kind, α)-mixed ground-truth reward of responses sampled
  from the policy for the test prompts (one sample set per method, re-scored per α);
* ``kl_to_ref``.

``curves_from_summary`` and ``plot_alpha_curves`` turn an aggregated ``summary.json`` into
per-method curves (mean ± s.e. over seeds) and a PNG with error bands.
"""

from __future__ import annotations

import numpy as np

from alignshift.data import PreferenceExample, encode_prompts, mix_reward
from alignshift.eval.report import save_figure_atomic
from alignshift.eval.shift_eval import implicit_rewards, sample_and_score

__all__ = ["AlphaSweepEvaluator", "curves_from_summary", "plot_alpha_curves"]


def _key(metric: str, kind: str, alpha: float) -> str:
    return f"{metric}/{kind}/{alpha:.2f}"


class AlphaSweepEvaluator:
    """Evaluator for :func:`alignshift.train.pipeline.run_experiment` on ``preference_shift``."""

    panels = [("loss", "training loss"), ("rewards/margins", "train reward margin"),
              ("eval/pref_acc_alpha0", "held-out accuracy at α₀")]

    @staticmethod
    def extra_sets(data) -> dict:
        # response_1 as "chosen", response_2 as "rejected": the labels per α say which won
        return {"pairs": [PreferenceExample(p, a, b) for p, a, b in data.test_pairs]}

    def setup(self, ctx) -> dict:
        data = ctx.data
        self.alphas = list(data.alphas)
        self.kinds = list(data.mixing)
        self.alpha0 = data.alpha0
        first = [a for _, a, _ in data.test_pairs]
        self.labels = {  # True where response_1 is preferred under (kind, α)
            (k, a): np.asarray([ex.chosen == r1 for ex, r1 in zip(data.test_at(a, k), first)])
            for k in self.kinds for a in self.alphas
        }
        n = min(ctx.cfg.eval.n_prompts, len(data.test_pairs))
        self.prompts = [p for p, _, _ in data.test_pairs[:n]]
        self.prompt_arrays = encode_prompts(data.tokenizer, self.prompts, max_prompt_len=ctx.cfg.data.max_prompt_len)
        self.columns = [(_key("acc", "convex", self.alpha0), "acc α₀"),
                        (_key("acc", "convex", 0.5), "acc α=.5 (convex)"),
                        (_key("acc", "convex", 1.0), "acc α=1 (convex)"),
                        (_key("acc", "geometric", 1.0), "acc α=1 (geom.)"),
                        (_key("reward", "convex", self.alpha0), "reward α₀"),
                        (_key("reward", "convex", 1.0), "reward α=1 (convex)"),
                        ("kl_to_ref", "KL to ref")]
        out = {_key("acc", k, a): float("nan") for k in self.kinds for a in self.alphas}
        out.update(self._rewards(ctx, ctx.ref_params))
        return out

    def _rewards(self, ctx, params) -> dict:
        ev = sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, self.prompt_arrays, self.prompts,
                              key=ctx.eval_key, **ctx.sample_kwargs())
        ra = np.asarray([m["r_A"] for m in ev["per_sample"]])
        rb = np.asarray([m["r_B"] for m in ev["per_sample"]])
        out = {_key("reward", k, a): float(np.mean(mix_reward(ra, rb, a, k)))
               for k in self.kinds for a in self.alphas}
        out["kl_to_ref"] = ev["kl_to_ref"]
        return out

    def _accuracies(self, ctx, objective, params, kinds_alphas) -> dict:
        c, r = implicit_rewards(ctx.logits_fn, params, ctx.sets["pairs"], objective)
        return {_key("acc", k, a): float(np.mean(np.where(self.labels[(k, a)], c > r, r > c)))
                for k, a in kinds_alphas}

    def during_training(self, ctx, objective):
        return lambda state: {"pref_acc_alpha0": self._accuracies(
            ctx, objective, state["params"], [("convex", self.alpha0)])[_key("acc", "convex", self.alpha0)]}

    def evaluate(self, ctx, objective, params) -> dict:
        out = self._accuracies(ctx, objective, params, [(k, a) for k in self.kinds for a in self.alphas])
        out.update(self._rewards(ctx, params))
        return out

    def line(self, m: dict) -> str:
        a0, a1 = _key("acc", "convex", self.alpha0), _key("acc", "convex", 1.0)
        return (f"acc α₀ {m[a0]:.3f}  acc α=1 {m[a1]:.3f}  reward α₀ {m[_key('reward', 'convex', self.alpha0)]:.3f}  "
                f"KL {m['kl_to_ref']:.2f}")


def curves_from_summary(summary: dict, alphas, kinds) -> dict:
    """``{method: {"<metric>/<kind>": [mean per α], "<metric>/<kind>_sem": [...]}}``."""
    curves = {}
    for name, m in summary["methods"].items():
        c = {}
        for metric in ("acc", "reward"):
            for k in kinds:
                c[f"{metric}/{k}"] = [m.get(_key(metric, k, a), float("nan")) for a in alphas]
                c[f"{metric}/{k}_sem"] = [m.get(_key(metric, k, a) + "_sem", 0.0) for a in alphas]
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
