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

from alignshift.cli import run_main
from alignshift.config import ConfigError
from alignshift.experiment.driver import Experiment, experiment_script
from alignshift.experiment.evaluators import AlphaSweepEvaluator

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "robust_dpo.yaml")


def check_config(cfg) -> None:
    if cfg.data.scenario != "preference_shift":
        raise ConfigError(f"robust_dpo needs data.scenario=preference_shift, got {cfg.data.scenario!r}")


parse_args, main = experiment_script(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/robust_dpo",
                                     lambda: Experiment(AlphaSweepEvaluator(), title="WDPO / KLDPO"),
                                     check=check_config)

if __name__ == "__main__":
    sys.exit(run_main(main))
