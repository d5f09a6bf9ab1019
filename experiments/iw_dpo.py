"""IW-DPO under deployment shift (Lodkaew et al., TMLR 2025) on ShiftBench ``deploy_shift``.

Methods (``experiments/configs/iw_dpo.yaml``): DPO on D_tr, DPO on D_v alone, DPO on
D_tr ∪ D_v, WPO, IW-DPO-L and IW-DPO-R (KMM weights from a deployment-validation batch each
step), and an oracle DPO trained on a D_tr-sized deployment-distribution set, which shows
how much the shift costs. Same outputs as the demo.

    python experiments/iw_dpo.py --config experiments/configs/iw_dpo.yaml --out results/iw_dpo
"""

from __future__ import annotations

import os
import sys

from alignshift.cli import run_main
from alignshift.experiment.driver import Experiment, experiment_script

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "iw_dpo.yaml")

parse_args, main = experiment_script(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/iw_dpo",
                                     lambda: Experiment(title="IW-DPO"))

if __name__ == "__main__":
    sys.exit(run_main(main))
