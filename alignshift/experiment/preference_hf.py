"""Preference optimisation of a Hugging Face model on a real dataset, on a device mesh: the
hooks of ``experiments/preference_hf.py`` on the experiment driver (its docstring describes
the run).

:meth:`PreferenceHFExperiment.start` checks the config, initialises ``jax.distributed`` when
the environment describes several processes and builds the mesh; per seed (one per run) the
dataset's splits are loaded and their rows checked (:func:`~alignshift.data.cleaning.clean_splits`,
lengths through the chat template), per-example columns come from the rows' ``meta``
(``weight``; DoRA's :func:`source_columns`), the splits are chat-template encoded, and the
model is loaded straight onto the mesh (it is the reference: no SFT phase); LoRA adapters
are added when enabled. Methods train on ``train``, ``val`` or ``train+val``; the
:class:`~alignshift.experiment.evaluators.HeldOutEvaluator` reports held-out implicit-reward
accuracy. ``summary.json`` adds ``data_info`` and ``mesh``.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from alignshift import __version__
from alignshift.config import ConfigError, ExperimentConfig, to_dict
from alignshift.data.cleaning import clean_splits
from alignshift.data.schema import DataError, SkippedRows
from alignshift.experiment.driver import (
    Experiment,
    MethodRun,
    SeedContext,
    add_reference_logps,
    concat_train_val,
)
from alignshift.experiment.evaluators import HeldOutEvaluator
from alignshift.forward import split_model
from alignshift.losses.dora import pair_weight_columns
from alignshift.models.layers import DTYPES
from alignshift.train.phases import add_lora, objective_for

__all__ = ["PreferenceHFExperiment", "check_config", "source_columns", "split_source_kwargs", "SOURCE_KWARGS"]


# keys of data.dataset_kwargs read by this experiment (DoRA's source shares), not by the adapter
SOURCE_KWARGS = ("source_shares", "source_share")
# data.dataset_kwargs.holdout_ratio (read here, not by the adapter): the test split is a seeded
# share of the adapter's train split (for one local file whose "test" split is the same rows)
HOLDOUT_KWARG = "holdout_ratio"


def hold_out(splits, ratio: float, seed: int, report: SkippedRows):
    """``splits`` with ``test`` = a seeded ``ratio`` share of ``train`` (round(ratio·n), at
    least 1) and ``train`` the rest, both in file order; the adapter's own test split is
    dropped, and so are its entries in the skipped-rows ``report``."""
    n = len(splits.train)
    n_test = max(1, round(ratio * n)) if n else 0
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())
    dropped = {k: v for k, v in report.by_source.items() if k.endswith("/test")}
    for k, v in dropped.items():
        report.count -= v
        del report.by_source[k]
    if dropped:
        report.reasons = list(dict.fromkeys(report.reasons))  # the same rows' messages again
    splits.test = [e for i, e in enumerate(splits.train) if i in chosen]
    splits.train = [e for i, e in enumerate(splits.train) if i not in chosen]
    splits.info["holdout"] = {"ratio": float(ratio), "seed": int(seed), "n_test": len(splits.test)}
    if report.count:
        splits.info["skipped_rows"] = {"count": report.count, "by_source": dict(report.by_source)}
    else:
        splits.info.pop("skipped_rows", None)
    return splits


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


def check_config(cfg: ExperimentConfig) -> None:
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
    r = cfg.data.dataset_kwargs.get("holdout_ratio")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1):
        raise ConfigError(f"config key 'data.dataset_kwargs.holdout_ratio' must be a number in (0, 1); got {r!r}")


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
    methods = {m.name: m.weighting for m in cfg.methods if "source" in WEIGHTING_RULES[m.weighting].requires}
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


def _pair_candidate_columns(examples) -> np.ndarray | None:
    """``[N, 2]``: the candidate columns of each pair's chosen and rejected response
    (``meta["chosen_index"]`` / ``meta["rejected_index"]``, set by
    :func:`~alignshift.data.datasets.base.best_worst_pairs`), or None when a row lacks them."""
    if not all("chosen_index" in e.meta and "rejected_index" in e.meta for e in examples):
        return None
    return np.asarray([[e.meta["chosen_index"], e.meta["rejected_index"]] for e in examples], np.int64)


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


class PreferenceHFExperiment(Experiment):
    """A local HF model folder (``model.hf_path``) on a registered dataset (``data.dataset``)."""

    supports_tuning = False  # tuning.enabled: the ShiftBench experiments only (alignshift/experiment/tuning.py)

    def __init__(self):
        super().__init__(HeldOutEvaluator())
        self.mesh = None

    def start(self, cfg: ExperimentConfig) -> None:
        from alignshift.data.datasets import DATASETS
        from alignshift.parallel import make_mesh, maybe_initialize_distributed

        check_config(cfg)
        if DATASETS[cfg.data.dataset].kind == "classification":
            raise ConfigError(f"data.dataset={cfg.data.dataset!r} is classification data, not preference pairs")
        maybe_initialize_distributed()
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)

    def banner(self, cfg) -> str:
        return (f"alignshift preference_hf: {cfg.model.hf_path} on {cfg.data.dataset} mesh={dict(self.mesh.shape)} "
                f"methods={[m.name for m in cfg.methods]}")

    def scenario(self, cfg) -> str:
        return cfg.data.dataset

    def writer_static(self, cfg) -> dict:
        return {"scenario": cfg.data.dataset, "seed": cfg.seed}

    def load_data(self, ctx: SeedContext) -> None:
        """The dataset's splits, rows checked; the meta columns (checked before any encoding
        or model loading)."""
        from alignshift.data.chat import chat_token_lengths
        from alignshift.data.datasets import load_dataset_splits
        from alignshift.models.hf import load_hf_tokenizer

        cfg = ctx.cfg
        skipped = SkippedRows()
        dataset_kwargs, source_spec = split_source_kwargs(cfg)
        holdout = dataset_kwargs.pop(HOLDOUT_KWARG, None)
        splits = load_dataset_splits(cfg.data.dataset, cfg.data.dataset_source or None,
                                     skip_bad_rows=cfg.data.skip_bad_rows, report=skipped, **dataset_kwargs)
        if holdout:
            splits = hold_out(splits, holdout, int(dataset_kwargs.get("seed", 0)) + 1, skipped)
        wanted = {m.train_data for m in cfg.methods}
        needs_val = bool(wanted & {"val", "train+val"}) or any("val_batch" in objective_for(m).requires for m in cfg.methods)
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
        cols, k, pair_cols = {}, None, {}
        for split in ("train", "val", "test"):
            rows = splits.split(split)
            if rows:
                spec = source_spec if source_spec and split in source_spec["splits"] else None
                cols[split] = _meta_columns(rows, spec, source=f"{cfg.data.dataset}/{split}", k=k)
                k = cols[split]["source_prob"].shape[1] if "source_prob" in cols[split] else k
                if "source_prob" in cols[split]:
                    pair_cols[split] = _pair_candidate_columns(rows)
        if "train" in pair_cols and "val" in pair_cols and pair_cols["train"] is not None \
                and pair_cols["val"] is not None:
            pair_cols["train+val"] = np.concatenate([pair_cols["train"], pair_cols["val"]])
        ctx.data, ctx.tokenizer, ctx.extra["columns"] = splits, tok, cols
        ctx.extra["pair_cols"] = pair_cols

    def encode(self, ctx: SeedContext) -> None:
        from alignshift.data.chat import encode_chat_pairs

        d = ctx.cfg.data
        # KTO's mismatched kl_* rows only when a method reads them (their reference log-probs
        # are a third forward pass over every set otherwise)
        kl_rows = any("kl_completions" in objective_for(m).requires for m in ctx.cfg.methods)
        ctx.sets = {}
        for split, columns in ctx.extra["columns"].items():
            arrays = encode_chat_pairs(ctx.tokenizer, ctx.data.split(split), max_prompt_len=d.max_prompt_len,
                                       max_completion_len=d.max_completion_len, mode=d.chat_mode,
                                       system_prompt=d.system_prompt or None, kl_pairing=d.kl_pairing)
            arrays.update(columns)
            if not kl_rows:
                arrays = {k: v for k, v in arrays.items() if not k.startswith("kl_")}
            ctx.sets[split] = arrays

    def build_reference(self, ctx: SeedContext) -> None:
        """The HF model loaded onto the mesh is the reference; with LoRA, adapters on top."""
        from alignshift.models.hf import load_hf_model
        from alignshift.parallel import shard_params

        cfg, tok = ctx.cfg, ctx.tokenizer
        model = load_hf_model(cfg.model.hf_path, dtype=DTYPES[cfg.model.dtype], mesh=self.mesh, remat=cfg.model.remat)
        if len(tok) > model.config.vocab_size:
            raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}")
        if cfg.model.lora.enabled:
            ctx.graphdef, ctx.rest, init_params, ref_params = add_lora(model, cfg.model, seed=ctx.seed)
            ctx.init_params, ctx.ref_params = shard_params(init_params, self.mesh), shard_params(ref_params, self.mesh)
        else:
            ctx.graphdef, ctx.ref_params, ctx.rest = split_model(model)

    def add_reference(self, ctx: SeedContext) -> None:
        cfg = ctx.cfg
        if cfg.train.precompute_reference or any("reference" in objective_for(m).requires for m in cfg.methods):
            extra = {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "alignshift": __version__,
                     "backend": jax.default_backend()}
            add_reference_logps(ctx, extra=extra, batch_size=cfg.eval.batch_size)
        concat_train_val(ctx)

    def method_run(self, ctx: SeedContext, m) -> MethodRun:
        arrays = ctx.sets[m.train_data]
        n = arrays["chosen_input_ids"].shape[0]
        if ctx.cfg.train.batch_size > n:
            raise ConfigError(f"method {m.name!r}: train.batch_size {ctx.cfg.train.batch_size} > {n} pairs in "
                              f"{m.train_data!r}")
        if "source_prob" in arrays and "source" in objective_for(m).requires:
            # DoRA's pair weight H: the prompt's K candidates (the authors' code) or the pair's two
            try:
                prob, share = pair_weight_columns(arrays["source_prob"], arrays["source_share"],
                                                  ctx.extra.get("pair_cols", {}).get(m.train_data),
                                                  m.weighting_kwargs.get("pair_weight", "candidates"))
            except ValueError as e:
                raise ConfigError(f"method {m.name!r} (weighting_kwargs.pair_weight): {e}") from None
            arrays = {**arrays, "source_prob": prob, "source_share": share}
        return MethodRun(m.name, m, arrays, ctx.cfg)

    def seed_summary(self, ctx: SeedContext, methods: dict, seconds: float) -> dict:
        summary = super().seed_summary(ctx, methods, seconds)
        summary["data_info"] = _json_safe(summary["data_info"])
        return summary

    def aggregate(self, cfg, summaries: list[dict]) -> dict:
        summary = super().aggregate(cfg, summaries)
        summary.update({"data_info": summaries[0]["data_info"], "mesh": {k: int(v) for k, v in self.mesh.shape.items()}})
        return summary

    def results_md(self, cfg, summary: dict) -> str:
        text = super().results_md(cfg, summary)
        samples = summary.get("samples")
        if samples:
            text += "\n\n" + format_samples(samples, limit=3)
        return text

    def results_title(self, cfg, summary: dict) -> str:
        return f"## {cfg.scenario}: {cfg.data.dataset} with {os.path.basename(cfg.model.hf_path.rstrip('/'))}"


def format_samples(samples: dict, *, limit: int = 3, width: int = 400) -> str:
    """Markdown: the first ``limit`` held-out prompts and each row's response to them."""
    def clip(t: str) -> str:
        t = " ".join(t.split())
        return (t[:width] + " …") if len(t) > width else t

    how = "greedy" if samples.get("temperature", 1.0) == 0 else f"sampled at temperature {samples['temperature']:g}"
    lines = [f"### Responses to held-out prompts ({how}, at most {samples.get('max_new_tokens')} new tokens)"]
    for i, prompt in enumerate(samples["prompts"][:limit]):
        turns = samples.get("turns", [1] * len(samples["prompts"]))[i]
        lines.append(f"\n**Prompt {i + 1}**" + (f" (last of {turns} turns)" if turns > 1 else "") + f": {clip(prompt)}\n")
        for name, responses in samples["responses"].items():
            lines.append(f"- *{name}*: {clip(responses[i]) or '(empty)'}")
    return "\n".join(lines)
