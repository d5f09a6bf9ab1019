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
   becomes a per-example ``weight`` column;
3. the model loaded straight onto the mesh (``load_hf_model(..., mesh=mesh)``: parameters
   sharded by the rule table as they are read); with ``model.lora.enabled`` adapters are
   added and trained, the reference being the zeroed adapters;
4. reference log-probs computed once (optionally cached on disk, ``train.reference_cache_dir``);
5. each method trained from the reference on its ``train_data`` (``train``, ``val``,
   ``train+val``) with the shared runner, logging to ``metrics.jsonl``;
6. held-out implicit-reward preference accuracy on the test (and validation) pairs.

Outputs (same schema as the benchmark experiments, read by ``notebooks/``):
``<out>/summary.json``, ``metrics.jsonl``, ``results.md``. There is no SFT phase: the HF model
is the reference. Sampling-based metrics need a reward model and are not computed here.

One seed per run: ``seed`` sets the batch order (and LoRA's initialisation); ``seeds`` /
``--seeds`` above 1 is refused (run the script once per ``seed=S`` with its own ``--out``).
Candidate-list data (``data.dataset: candidates``) is turned into best-vs-worst pairs; DoRA's
per-candidate ``probs`` are kept in ``meta`` but not turned into the ``source_prob`` /
``source_share`` inputs the ``dora`` weighting rule needs.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignshift import __version__
from alignshift.cli import experiment_parser, parse_experiment_args, prepare_out_dir
from alignshift.config import ConfigError, ExperimentConfig, to_dict

__all__ = ["main", "run"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COLUMNS = [("test_pref_acc", "test pref. acc."), ("test_reward_margin", "test reward margin"),
           ("val_pref_acc", "val pref. acc."), ("train_time_s", "train time (s)")]


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _check(cfg: ExperimentConfig) -> None:
    if cfg.seeds != 1:
        raise ConfigError(f"config key 'seeds' (--seeds) is {cfg.seeds}, but preference_hf.py trains one seed per "
                          "run; run it once per seed with seed=S and a separate --out")
    if not cfg.model.hf_path:
        raise ConfigError("config key 'model.hf_path' must name a Hugging Face model folder for this script")
    if not cfg.data.dataset:
        raise ConfigError("config key 'data.dataset' must name a registered dataset for this script "
                          "(alignshift.data.datasets.DATASETS)")
    for i, m in enumerate(cfg.methods):
        if m.train_data not in ("train", "val", "train+val"):
            raise ConfigError(f"config key 'methods.{i}.train_data' must be train, val or train+val here; "
                              f"got {m.train_data!r}")
        if m.example_weights:
            raise ConfigError(f"config key 'methods.{i}.example_weights' is a benchmark-only option; "
                              "give real data a 'weight' field instead")


def _encode(tok, examples, cfg: ExperimentConfig) -> dict:
    from alignshift.data.chat import encode_chat_pairs

    arrays = encode_chat_pairs(tok, examples, max_prompt_len=cfg.data.max_prompt_len,
                               max_completion_len=cfg.data.max_completion_len, mode=cfg.data.chat_mode,
                               system_prompt=cfg.data.system_prompt or None)
    if any("weight" in e.meta for e in examples):
        arrays["weight"] = np.asarray([e.meta.get("weight", 1.0) for e in examples], np.float32)
    return arrays


def run(cfg: ExperimentConfig, out: str, *, resume: bool = False) -> dict:
    from alignshift.data.chat import chat_token_lengths
    from alignshift.data.datasets import DATASETS, load_dataset_splits
    from alignshift.data.schema import DataError, SkippedRows
    from alignshift.eval.report import aggregate_seeds, format_table, write_json_atomic
    from alignshift.eval.shift_eval import preference_accuracy
    from alignshift.models.hf import load_hf_model, load_hf_tokenizer
    from alignshift.parallel import make_mesh, maybe_initialize_distributed, shard_params
    from alignshift.train.metrics import JsonlWriter
    from alignshift.train.pipeline import clean_splits
    from alignshift.train.ref_cache import ReferenceLogpCache
    from alignshift.train.runner import add_lora, objective_for, precompute_reference_logps, run_preference
    from alignshift.train.steps import make_logits_fn, split_model

    _check(cfg)
    if DATASETS[cfg.data.dataset].kind == "classification":
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is classification data, not preference pairs")
    maybe_initialize_distributed()
    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    prepare_out_dir(out, cfg, resume=resume)
    print(f"alignshift preference_hf: {cfg.model.hf_path} on {cfg.data.dataset} mesh={dict(mesh.shape)} "
          f"methods={[m.name for m in cfg.methods]}", flush=True)

    skipped = SkippedRows()
    splits = load_dataset_splits(cfg.data.dataset, cfg.data.dataset_source or None,
                                 skip_bad_rows=cfg.data.skip_bad_rows, report=skipped, **cfg.data.dataset_kwargs)
    objectives = {m.name: objective_for(m) for m in cfg.methods}
    wanted = {m.train_data for m in cfg.methods}
    needs_val = bool(wanted & {"val", "train+val"}) or any(o.needs_val for o in objectives.values())
    if needs_val and not splits.val:
        raise ConfigError(f"a method needs validation pairs but {cfg.data.dataset!r} gave none "
                          "(set data.dataset_kwargs.val_ratio)")
    tok = load_hf_tokenizer(cfg.model.hf_path)
    splits = clean_splits(splits, cfg.data, tok, cfg.data.dataset, report=skipped,
                          lengths=chat_token_lengths(tok, mode=cfg.data.chat_mode,
                                                     system_prompt=cfg.data.system_prompt or None))
    splits.info.update({f"n_{s}": len(splits.split(s)) for s in ("train", "val", "test")})
    if not splits.train:
        raise DataError(f"{cfg.data.dataset}/train: no valid pairs ({skipped.summary()})")
    sets = {"train": _encode(tok, splits.train, cfg)}
    if splits.val:
        sets["val"] = _encode(tok, splits.val, cfg)
    if splits.test:
        sets["test"] = _encode(tok, splits.test, cfg)

    seed = cfg.seed
    model = load_hf_model(cfg.model.hf_path, dtype=_DTYPES[cfg.model.dtype], mesh=mesh, remat=cfg.model.remat)
    if len(tok) > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}")
    init_params = None
    if cfg.model.lora.enabled:
        graphdef, rest, init_params, ref_params = add_lora(model, cfg.model, seed=seed)
        init_params, ref_params = shard_params(init_params, mesh), shard_params(ref_params, mesh)
    else:
        graphdef, ref_params, rest = split_model(model)
    logits_fn = make_logits_fn(graphdef, rest)

    def compute(a):
        return precompute_reference_logps(logits_fn, ref_params, a, batch_size=cfg.eval.batch_size)

    cache = ReferenceLogpCache(cfg.train.reference_cache_dir) if cfg.train.reference_cache_dir else None
    extra = {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "alignshift": __version__,
             "backend": jax.default_backend()}
    if cfg.train.precompute_reference or any(o.needs_reference for o in objectives.values()):
        for arrays in sets.values():
            arrays.update(cache.get_or_compute(arrays, {"params": ref_params, "rest": rest}, compute, extra=extra)
                          if cache else compute(arrays))
    if "train+val" in wanted:
        sets["train+val"] = {k: np.concatenate([sets["train"][k], sets["val"][k]])
                             for k in sets["train"] if k in sets["val"]}

    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = JsonlWriter(metrics_path, static={"scenario": cfg.data.dataset, "seed": seed})

    def evaluate(params, objective) -> dict:
        row = {}
        for split in ("test", "val"):
            if split in sets:
                acc = preference_accuracy(logits_fn, params, sets[split], objective, batch_size=cfg.eval.batch_size)
                row[f"{split}_pref_acc"] = acc["pref_acc"]
                row[f"{split}_reward_margin"] = acc["reward_margin"]
        return row

    methods: dict[str, dict] = {}
    for m in cfg.methods:
        objective = objectives[m.name]
        arrays = sets[m.train_data]
        n = arrays["chosen_input_ids"].shape[0]
        mcfg = cfg
        if cfg.train.batch_size > n:
            raise ConfigError(f"method {m.name!r}: train.batch_size {cfg.train.batch_size} > {n} pairs in "
                              f"{m.train_data!r}")
        eval_fn = None
        if "test" in sets and cfg.train.eval_every:
            eval_fn = (lambda obj: lambda state: {"test_pref_acc": preference_accuracy(
                logits_fn, state["params"], sets["test"], obj, batch_size=cfg.eval.batch_size)["pref_acc"]})(objective)
        mw = JsonlWriter(metrics_path, static={"scenario": cfg.data.dataset, "seed": seed, "phase": "preference",
                                               "method": m.name})
        t1 = time.perf_counter()
        params, _ = run_preference(graphdef, rest, ref_params, arrays, m, mcfg, seed=seed, writer=mw,
                                   checkpoint_dir=os.path.join(out, f"seed_{seed}", "checkpoints", m.name),
                                   eval_fn=eval_fn, val_arrays=sets.get("val"), init_params=init_params)
        mw.close()
        methods[m.name] = {**evaluate(params, objective), "train_time_s": time.perf_counter() - t1}
        print(f"  {m.name:>12s}: " + "  ".join(f"{k} {v:.3f}" for k, v in methods[m.name].items()), flush=True)
    writer.close()

    per_seed = {"scenario": cfg.data.dataset, "seed": seed, "methods": methods, "config": to_dict(cfg),
                "data_info": _json_safe(splits.info), "wall_time_s": time.perf_counter() - t0}
    write_json_atomic(os.path.join(out, f"seed_{seed}", "summary.json"), per_seed)
    summary = aggregate_seeds([per_seed])
    summary.update({"data_info": per_seed["data_info"], "wall_time_s": per_seed["wall_time_s"],
                    "mesh": {k: int(v) for k, v in mesh.shape.items()}})
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    table = format_table(summary, COLUMNS)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"## {cfg.scenario}: {cfg.data.dataset} with {os.path.basename(cfg.model.hf_path.rstrip('/'))}\n\n"
                + table + "\n")
    print("\n" + table + f"\n\nwrote {out}/summary.json, metrics.jsonl, results.md", flush=True)
    return summary


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0], None, "results/preference_hf", real_data=True)
    args, cfg = parse_experiment_args(parser, argv)
    try:
        return run(cfg, args.out, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
