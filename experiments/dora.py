"""DoRA (Zhu et al., NeurIPS 2025) and its ablations on ShiftBench ``synthetic_shift``.

Most training lists are generated and judged by biased synthetic sources (a sycophantic and a
verbose LLM), a minority (α = 0.2) by the target ("human") distribution; the coarse source of
every list is known. Per seed: build the scenario, SFT a tiny Llama on the mixture corpus (=
the reference), precompute reference log-probs for the pairs and the K-candidate lists, train
the source classifier on mean-pooled reference hidden states (held-out calibration report and
reliability plot per seed), store ``p`` per response, then train every method from the
reference and evaluate on the TARGET distribution: implicit-reward accuracy on held-out target
pairs (all, and the pairs whose responses differ in flattery, where the biased sycophant judge
and the target disagree most), and the target reward / flattery count / win rate / KL of
sampled responses.

Methods (``experiments/configs/dora.yaml``), for DPO and for Plackett–Luce DPO (K = 4): ERM,
robust DPO, DR-DPO (pairwise only), vanilla DRO ``λ·log mean exp(ℓ/λ)``, reweighting only
``mean(h̃·ℓ)``, and DoRA ``λ·log mean exp(h̃·ℓ/λ)`` (λ = 1; the log-mean-exp runs over each
training micro-batch = the global batch of 32 prompts here). Writes ``summary.json`` (design
schema, mean and ``_sem`` over seeds, plus ``diagnostics``: classifier reports and the mean
calibration weight per source), ``results.md``, ``metrics.jsonl``, ``training_curves.png`` and
``seed_<s>/reliability.png``. The hooks of this experiment on the shared driver (the classifier
fit, the list data, the paired comparisons) are :mod:`alignshift.experiment.dora`.

    python experiments/dora.py --config experiments/configs/dora.yaml --out results/dora [--quick]
"""

from __future__ import annotations

import os
import sys

from alignshift.cli import run_main
from alignshift.experiment.dora import DoraExperiment, DoraExperimentConfig, check_config
from alignshift.experiment.driver import experiment_script

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "dora.yaml")

parse_args, main = experiment_script(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/dora", DoraExperiment,
                                     cls=DoraExperimentConfig, check=check_config)

if __name__ == "__main__":
    sys.exit(run_main(main))
