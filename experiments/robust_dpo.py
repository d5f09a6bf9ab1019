"""WDPO and KLDPO (Xu et al., NeurIPS 2025) under preference shift, on ShiftBench ``preference_shift``.

Training labels come from the α₀ = 0.1 convex mixture of two ground-truth rewards; the
evaluation sweeps α over [0, 1] with convex and geometric mixing. Methods
(``experiments/configs/robust_dpo.yaml``): DPO, KLDPO at several τ, WDPO at several ρ, and
DR-DPO. Besides the usual files, ``summary.json`` holds ``curves`` (per-method mean ± s.e.
per α) and ``alpha_curves.png`` plots accuracy and mixed reward vs α with error bands.

    python experiments/robust_dpo.py --config experiments/configs/robust_dpo.yaml --out results/robust_dpo
"""

from __future__ import annotations

import os
import sys

from alignshift.cli import experiment_parser, parse_experiment_args
from alignshift.eval.alpha_sweep import AlphaSweepEvaluator, curves_from_summary, plot_alpha_curves
from alignshift.train.pipeline import run_experiment

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "robust_dpo.yaml")


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/robust_dpo")
    args, cfg = parse_experiment_args(parser, argv)
    if cfg.data.scenario != "preference_shift":
        parser.error(f"robust_dpo needs data.scenario=preference_shift, got {cfg.data.scenario!r}")
    ev = AlphaSweepEvaluator()

    def after(summary, out):
        summary["curves"] = curves_from_summary(summary, ev.alphas, ev.kinds)
        plot_alpha_curves(summary["curves"], os.path.join(out, "alpha_curves.png"), alpha0=ev.alpha0)

    return run_experiment(cfg, args.out, resume=args.resume, title="WDPO / KLDPO", evaluator=ev, after=after)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
