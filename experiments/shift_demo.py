"""The default main job: SFT a tiny Llama, then DPO-family methods on ShiftBench ``deploy_shift``.

For each seed: build the benchmark, SFT the policy on its corpus (that is the reference),
precompute reference log-probs, train every configured method from the reference, and
evaluate on the deployment test set (the driver: ``alignshift/experiment/driver.py``). Writes to ``--out``:

* ``summary.json``   — design schema, mean over seeds, plus ``<metric>_sem``
* ``seed_<s>/summary.json`` — one per seed
* ``metrics.jsonl``  — every logged step (``seed``, ``phase``, ``method``, ``step``, metrics)
* ``results.md``     — the printed table
* ``training_curves.png``

    python experiments/shift_demo.py --config experiments/configs/shift_demo.yaml --out results/shift_demo
"""

from __future__ import annotations

import os
import sys

from alignshift.cli import run_main
from alignshift.experiment.driver import Experiment, experiment_script

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shift_demo.yaml")

parse_args, main = experiment_script(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/shift_demo",
                                     lambda: Experiment(title="DPO family"))

if __name__ == "__main__":
    sys.exit(run_main(main))
