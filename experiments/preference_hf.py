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
   become ``source_prob`` / ``source_share`` columns (:func:`source_columns`, below);
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
Candidate-list data (``data.dataset: candidates``) is turned into best-vs-worst pairs (the
pairwise methods train on those), but DoRA's weight of a pair averages the calibration
``h̃`` over ALL K candidates of its prompt, as the authors' DPO code does: for every method
whose weighting rule has ``needs_source`` the training rows (``train`` and/or ``val``, per
``train_data``) get ``source_prob`` ``[N, K]`` = the row's ``probs`` (classifier probability
of the target, one per candidate, in the file's order) and ``source_share`` ``[N, K]`` = each
candidate's mixture share ``a``. Two keys of ``data.dataset_kwargs`` give the shares; they
are read here and removed before the dataset adapter is called (:func:`split_source_kwargs`):

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

__all__ = ["main", "run", "source_columns", "split_source_kwargs", "SOURCE_KWARGS"]

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
    split_source_kwargs(cfg)  # the source-share keys' types (and their presence, for DoRA)


# keys of data.dataset_kwargs read by this script (DoRA's source shares), not by the adapter
SOURCE_KWARGS = ("source_shares", "source_share")


def _share(v, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"config key '{key}' must be a finite number >= 0; got {v!r}")
    return float(v)


def split_source_kwargs(cfg: ExperimentConfig) -> tuple[dict, dict | None]:
    """``(adapter kwargs, source spec)``: ``data.dataset_kwargs`` without :data:`SOURCE_KWARGS`,
    and, when a method's weighting rule has ``needs_source``, ``{"shares", "share", "methods",
    "splits"}`` for :func:`source_columns` (``methods``: ``{name: weighting}`` of those methods;
    ``splits``: the training splits they read, ``train`` and/or ``val``); else None.

    Refuses malformed share keys, and a DoRA method with neither key set."""
    from alignshift.losses.weighting import WEIGHTING_RULES

    kwargs = dict(cfg.data.dataset_kwargs)
    raw_shares, raw_share = kwargs.pop("source_shares", None), kwargs.pop("source_share", None)
    shares = share = None
    if raw_shares is not None:
        if not isinstance(raw_shares, (list, tuple)) or not raw_shares:
            raise ConfigError("config key 'data.dataset_kwargs.source_shares' must be a non-empty list of "
                              f"shares (index = source id); got {raw_shares!r}")
        shares = [_share(v, f"data.dataset_kwargs.source_shares.{j}") for j, v in enumerate(raw_shares)]
    if raw_share is not None:
        share = _share(raw_share, "data.dataset_kwargs.source_share")
    methods = {m.name: m.weighting for m in cfg.methods if WEIGHTING_RULES[m.weighting].needs_source}
    if not methods:
        return kwargs, None
    if shares is None and share is None:
        name, rule = next(iter(methods.items()))
        raise ConfigError(f"method {name!r} (weighting {rule!r}) needs each candidate's source share: set "
                          "'data.dataset_kwargs.source_shares' (a list, index = the rows' source_ids) or "
                          "'data.dataset_kwargs.source_share' (one number for every candidate)")
    splits = set()
    for m in cfg.methods:
        if m.name in methods:
            splits |= {"train+val": {"train", "val"}}.get(m.train_data, {m.train_data})
    return kwargs, {"shares": shares, "share": share, "methods": methods, "splits": splits}


def source_columns(examples, spec: dict, *, source: str = "train", k: int | None = None) -> dict:
    """DoRA's ``source_prob`` / ``source_share`` columns ``[N, K]`` (float32) of ``examples``
    from ``meta["probs"]`` (all K candidates of the row's prompt, in the file's order) and
    ``meta["source_ids"]`` mapped through ``spec["shares"]`` (or ``spec["share"]`` for every
    candidate of a row without ids / when no list is given); ``spec`` as returned by
    :func:`split_source_kwargs`. ``k``: the K other splits already have (they are
    concatenated for ``train+val``). A bad row raises :class:`DataError` naming
    ``<source> row i`` (``meta["row"]``), the field and the method that needs it."""
    from alignshift.data.schema import DataError
    from alignshift.rewards.source_classifier import attach_source_probs

    who = ("method " if len(spec["methods"]) == 1 else "methods ") + ", ".join(
        f"{n!r} (weighting {r!r})" for n, r in spec["methods"].items())
    shares, share = spec["shares"], spec["share"]
    ref = None if k is None else "the other training split"
    probs, alist = [], []
    for pos, e in enumerate(examples):
        row = e.meta.get("row", pos)
        where = f"{source} row {row}"
        p = e.meta.get("probs")
        if p is None:
            raise DataError(f"{where}: field 'probs' is missing; {who} needs every training row's per-candidate "
                            "classifier probability of the target ('probs', one per candidate)")
        if not isinstance(p, (list, tuple)) or not p or not all(
                isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                and 0.0 <= x <= 1.0 for x in p):
            raise DataError(f"{where}: field 'probs' must list probabilities in [0, 1]; got {p!r}")
        if k is None:
            k, ref = len(p), f"row {row}"
        elif len(p) != k:
            raise DataError(f"{where}: field 'probs' has {len(p)} candidates but {ref} has {k}; {who} needs "
                            "the same K on every training row (source_prob is [N, K])")
        ids = e.meta.get("source_ids")
        if shares is not None and ids is not None:
            if not isinstance(ids, (list, tuple)) or len(ids) != len(p):
                raise DataError(f"{where}: field 'source_ids' must list one source id per candidate "
                                f"({len(p)}); got {ids!r}")
            for s in ids:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < len(shares):
                    raise DataError(f"{where}: field 'source_ids' has source id {s!r} outside "
                                    f"data.dataset_kwargs.source_shares (ids 0..{len(shares) - 1})")
            a = [shares[int(s)] for s in ids]
        elif share is not None:
            a = [share] * len(p)
        else:
            raise DataError(f"{where}: field 'source_ids' is missing; {who} maps it through "
                            "data.dataset_kwargs.source_shares (set data.dataset_kwargs.source_share for "
                            "rows without source ids)")
        probs.append(p)
        alist.append(a)
    if not probs:
        return {}
    return attach_source_probs({}, np.asarray(probs, np.float32).ravel(), np.asarray(alist, np.float32).ravel(), k)


def _meta_columns(examples, source_spec: dict | None = None, *, source: str = "train",
                  k: int | None = None) -> dict:
    """Per-example columns from ``meta``: ``weight`` (when any row has one) and, with a
    ``source_spec`` (:func:`split_source_kwargs`), DoRA's ``source_prob``/``source_share``."""
    out = {}
    if any("weight" in e.meta for e in examples):
        out["weight"] = np.asarray([e.meta.get("weight", 1.0) for e in examples], np.float32)
    if source_spec is not None:
        out.update(source_columns(examples, source_spec, source=source, k=k))
    return out


def _encode(tok, examples, cfg: ExperimentConfig, columns: dict) -> dict:
    from alignshift.data.chat import encode_chat_pairs

    arrays = encode_chat_pairs(tok, examples, max_prompt_len=cfg.data.max_prompt_len,
                               max_completion_len=cfg.data.max_completion_len, mode=cfg.data.chat_mode,
                               system_prompt=cfg.data.system_prompt or None)
    arrays.update(columns)
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
    dataset_kwargs, source_spec = split_source_kwargs(cfg)
    splits = load_dataset_splits(cfg.data.dataset, cfg.data.dataset_source or None,
                                 skip_bad_rows=cfg.data.skip_bad_rows, report=skipped, **dataset_kwargs)
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
    # meta columns first: DoRA's source columns are checked before encoding and model loading
    cols, k = {}, None
    for split in ("train", "val", "test"):
        rows = splits.split(split)
        if rows:
            spec = source_spec if source_spec and split in source_spec["splits"] else None
            cols[split] = _meta_columns(rows, spec, source=f"{cfg.data.dataset}/{split}", k=k)
            k = cols[split]["source_prob"].shape[1] if "source_prob" in cols[split] else k
    sets = {split: _encode(tok, splits.split(split), cfg, c) for split, c in cols.items()}

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
