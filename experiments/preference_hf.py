"""Preference optimisation of a Hugging Face model on a real dataset, on a device mesh.

    python experiments/preference_hf.py --config experiments/configs/iw_dpo_safe_rlhf_llama3_8b.yaml \\
        --out results/iw_dpo_safe_rlhf model.hf_path=/models/Llama-3.1-8B-Instruct
    python experiments/preference_hf.py --config <yaml> --dry-run      # plan only: memory + sharding

The config names the model folder (``model.hf_path``: config.json, safetensors, tokenizer
with its chat template), the dataset (``data.dataset`` from
``alignshift.data.datasets.DATASETS``, ``data.dataset_source`` a hub name or local path,
``data.dataset_kwargs`` its split recipe / filters), the tokenisation budget and chat mode,
the mesh (``mesh.data/fsdp/tensor``) and the methods. Steps:

1. ``jax.distributed`` initialisation when the environment describes several processes,
   then ``make_mesh(data, fsdp, tensor)``;
2. the dataset's train/val/test splits: malformed rows raise an error naming the dataset,
   row and field, or, with ``--skip-bad-rows`` (``data.skip_bad_rows``), are dropped and
   counted (``data_info.skipped_rows`` in ``summary.json``); rows longer than the budget
   (measured through the chat template) follow ``data.truncation``: ``truncate`` (prompt cut
   from the left, response from the right), ``error`` (naming the row and field; skipped
   instead with ``--skip-bad-rows``) or ``skip`` (dropped and counted). Then chat-template
   encoding (``encode_chat_pairs``: prompt masked out of the loss); ``meta["weight"]``
   becomes a per-example ``weight`` column and, when a method's weighting rule reads the
   source classifier (``dora``, ``dora_reweight``), ``meta["probs"]`` / ``meta["source_ids"]``
   become ``source_prob`` / ``source_share`` columns
   (:func:`alignshift.experiment.preference_hf.source_columns`);
3. the model loaded straight onto the mesh (``load_hf_model(..., mesh=mesh)``: parameters
   sharded by the rule table as they are read); with ``model.lora.enabled`` adapters are
   added and trained, the reference being the zeroed adapters;
4. reference log-probs computed once (optionally cached on disk, ``train.reference_cache_dir``);
5. each method trained from the reference on its ``train_data`` (``train``, ``val``,
   ``train+val``) by the shared experiment driver (hooks: :mod:`alignshift.experiment.preference_hf`),
   logging to ``metrics.jsonl``;
6. held-out implicit-reward preference accuracy on the test (and validation) pairs.

Outputs (same schema as the benchmark experiments, read by ``notebooks/``):
``<out>/summary.json``, ``metrics.jsonl``, ``results.md``. There is no SFT phase: the HF model
is the reference. Sampling-based metrics need a reward model and are not computed here.

One seed per run: ``seed`` sets the batch order (and LoRA's initialisation); ``seeds`` /
``--seeds`` above 1 is refused (run the script once per ``seed=S`` with its own ``--out``).
Candidate-list data (``data.dataset: candidates``) is turned into best-vs-worst pairs (the
pairwise methods train on those), but DoRA's weight of a pair averages the calibration
``h̃`` over ALL K candidates of its prompt, as the authors' DPO code does: for every method
whose weighting rule has ``needs_source`` the training rows (``train`` and/or ``val``, per
``train_data``) get ``source_prob`` ``[N, K]`` = the row's ``probs`` (classifier probability
of the target, one per candidate, in the file's order) and ``source_share`` ``[N, K]`` = each
candidate's mixture share ``a``. Two keys of ``data.dataset_kwargs`` give the shares; they
are read by the experiment and removed before the dataset adapter is called
(:func:`alignshift.experiment.preference_hf.split_source_kwargs`):

* ``source_shares``: a list, index = source id, mapped through each row's ``source_ids``
  (e.g. the authors' K = 4 slots: ``[0.25, 0.25, 0.25, 0.25]``);
* ``source_share``: one number for every candidate of rows without ``source_ids`` (or of
  every row when ``source_shares`` is not given).

A training row without ``probs``, with a different K than the first row, without
``source_ids`` where only ``source_shares`` is given, or with a source id outside
``source_shares`` raises :class:`~alignshift.data.DataError` naming the row, the field and
the method that needs it (not skipped by ``--skip-bad-rows``: the other methods could use
the row). Such columns are ignored by the methods that do not read them.
"""

from __future__ import annotations

import sys

from alignshift.cli import run_main
from alignshift.config import ConfigError
from alignshift.experiment.driver import experiment_script
from alignshift.experiment.preference_hf import PreferenceHFExperiment

__all__ = ["main"]

parse_args, main = experiment_script(__doc__.splitlines()[0], None, "results/preference_hf", PreferenceHFExperiment,
                                     real_data=True, errors=(ConfigError,))

if __name__ == "__main__":
    sys.exit(run_main(main))
