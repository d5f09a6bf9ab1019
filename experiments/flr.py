"""FLR (follow-up likelihood as reward, Zhang et al. AAAI 2025) on ShiftBench ``followup``.

Per seed:

1. Build the ``followup`` scenario: a conversation corpus whose user follow-up turns are
   positive or negative with a probability that rises with the hidden response quality
   (:mod:`alignshift.data.followup`). SFT a tiny Llama on it (the policy AND the FLR LM, as
   in the paper, where Llama-3-8B-Instruct plays both roles). No preference label is used.
2. **Reward models** on the held-out ground-truth test pairs: pairwise accuracy of FLR
   (both scoring modes, the three aggregations) and of Direct (the response's own
   length-normalised likelihood), plus Pearson/Spearman of each reward with the quality of
   the individual test responses (the rating-benchmark analogue).
3. **Alignment**: sample ``flr.n_samples`` responses for each of ``flr.n_mine_prompts``
   training prompts from the SFT policy (KV-cached sampler), label them with FLR, with
   Direct, and with the ground-truth quality, build max-vs-min pairs per prompt
   (:mod:`alignshift.rewards.mining`) and train each configured method (DPO) from the SFT
   reference on each labelled set. Evaluate every policy by the ground-truth quality of
   its sampled responses on test prompts (plus win rate and KL vs the SFT policy).

Writes ``summary.json`` (design schema: ``methods`` = policies, plus ``reward_models``),
``metrics.jsonl``, ``results.md`` and per-seed summaries. The hooks of this experiment on the
shared driver are :mod:`alignshift.experiment.flr`.

    python experiments/flr.py --config experiments/configs/flr.yaml --out results/flr [--quick]

The command line is the one every experiment script shares (:mod:`alignshift.cli`):
``--config --out --seeds --quick --resume --methods --dry-run --skip-bad-rows`` and dotted
overrides (``flr.n_samples=4``; the ``flr:`` section is
:class:`alignshift.experiment.flr.FLRSettings`). ``--methods``
picks the preference methods trained on every labelled set. ``--dry-run`` plans the policy
model (the ``flr:`` section is not planned). ``--resume`` works per seed, not per step (this
script writes no checkpoints; a seed takes minutes): a seed whose ``seed_<s>/summary.json``
exists in ``--out`` from the same config is reused, an unfinished seed is rerun from scratch
and its partial records are removed from ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import sys

from alignshift.cli import run_main
from alignshift.experiment.driver import experiment_script
from alignshift.experiment.flr import FLRExperiment, FLRExperimentConfig, check_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "flr.yaml")

# the shared experiment command line, loaded as FLRExperimentConfig (--dry-run exits inside parse_args)
parse_args, main = experiment_script(__doc__.splitlines()[0], DEFAULT_CONFIG, "results/flr", FLRExperiment,
                                     cls=FLRExperimentConfig, check=check_config)

if __name__ == "__main__":
    sys.exit(run_main(main))
