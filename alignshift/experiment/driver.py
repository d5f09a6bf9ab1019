"""The experiment driver: the seed loop every experiment script runs, with hooks for what is
each experiment's own.

Per seed, :func:`prepare_seed` lets the hooks of an :class:`Experiment` fill a
:class:`SeedContext`, in this order:

1. ``load_data``       — the data and tokenizer (a ShiftBench scenario, rows checked; a real dataset);
2. ``encode``          — the encoded data sets (``ctx.sets``) the methods train and are evaluated on;
3. ``build_reference`` — the reference policy (SFT of a fresh model; a loaded HF model), LoRA;
4. ``add_reference``   — the reference log-probs of the sets, once (optionally cached on disk);
5. ``fit``             — what the methods need besides (DoRA's source classifier; FLR's reward
   models and sampled responses).

:func:`run_seed` then scores the reference with the experiment's evaluator
(:mod:`alignshift.experiment.evaluators`), trains each :class:`MethodRun` of ``method_runs``
from the reference (:func:`train_method`), evaluates it, and writes ``seed_<s>/summary.json``
(``seed_summary``). :func:`run_experiment` runs every seed (``--resume``: from checkpoints, or,
with ``resume_seeds``, reusing finished seeds), then writes the aggregate ``summary.json``
(``aggregate``; the evaluator's ``finish``), ``results.md`` and ``training_curves.png``
(``report``); every logged step goes to ``metrics.jsonl``. :func:`merge_runs` (``--merge``) writes
the same aggregate files from seeds run by separate processes or machines.

The defaults are the ShiftBench pipeline of ``shift_demo.py``, ``iw_dpo.py`` and
``robust_dpo.py``; :mod:`alignshift.experiment.dora`, :mod:`~alignshift.experiment.flr` and
:mod:`~alignshift.experiment.preference_hf` override what is theirs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from alignshift import __version__
from alignshift.cli import exit_on, experiment_parser, parse_experiment_args, prepare_out_dir, seedless_config
from alignshift.config import ConfigError, ExperimentConfig, MethodConfig, to_dict
from alignshift.data import encode_pairs, make_scenario
from alignshift.data.cleaning import clean_splits
from alignshift.eval.report import (
    aggregate_seeds,
    format_paired_differences,
    format_table,
    paired_differences,
    plot_training_curves,
    read_jsonl,
    write_json_atomic,
)
from alignshift.experiment import tuning
from alignshift.experiment.evaluators import DeployEvaluator
from alignshift.forward import make_logits_fn, split_model
from alignshift.train import phases, tracking
from alignshift.train.metrics import JsonlWriter
from alignshift.train.ref_cache import ReferenceLogpCache

__all__ = ["SeedContext", "MethodRun", "Experiment", "prepare_seed", "train_method", "run_seed", "run_experiment",
           "experiment_script", "merge_runs", "MergeError", "sft_reference", "add_reference_logps", "concat_train_val",
           "batch_size_for", "finished_seeds", "dpo_baseline"]


@dataclasses.dataclass
class SeedContext:
    """One seed's state, filled by the experiment's hooks (:func:`prepare_seed`) and read by
    its evaluator and method runs."""

    cfg: ExperimentConfig
    seed: int
    seed_dir: str
    writer: JsonlWriter
    started: float = 0.0  # time.perf_counter() at the seed's start
    data: object = None
    tokenizer: object = None
    graphdef: object = None
    rest: object = None
    ref_params: object = None
    init_params: object = None  # the policy's starting params when they differ from the reference (LoRA)
    logits_fn: object = None
    sets: dict = dataclasses.field(default_factory=dict)  # encoded data sets, with reference log-probs
    extra: dict = dataclasses.field(default_factory=dict)  # what an experiment's hooks keep for later hooks
    summary: dict = dataclasses.field(default_factory=dict)  # extra keys of this seed's summary.json

    def sample_kwargs(self) -> dict:
        e = self.cfg.eval
        return dict(tokenizer=self.tokenizer, reward_fn=self.data.reward_fn, metrics_fn=self.data.metrics_fn,
                    max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                    batch_size=e.batch_size)

    @property
    def eval_key(self):
        return jax.random.PRNGKey(10_000 + self.seed)


@dataclasses.dataclass
class MethodRun:
    """One preference training of a seed: ``method`` on ``arrays`` (with reference log-probs)
    under ``cfg``; its row in ``summary.json`` is ``name`` (``row``: metrics known before
    training, e.g. FLR's mined-pair label accuracy). ``checkpoint``: under
    ``seed_<s>/checkpoints/<name>`` (``--resume`` continues it)."""

    name: str
    method: MethodConfig
    arrays: dict
    cfg: ExperimentConfig
    checkpoint: bool = True
    row: dict = dataclasses.field(default_factory=dict)


def batch_size_for(cfg: ExperimentConfig, n: int) -> ExperimentConfig:
    """``cfg`` with ``train.batch_size`` cut to ``n`` examples when it is larger (e.g. DPO on the
    small D_v alone, or few mined pairs), rounded down to a multiple of ``train.grad_accum_steps``
    (the micro-batches are equal; at least one example per micro-batch: fewer examples than
    micro-batches accumulate over as many micro-batches as there are examples)."""
    if cfg.train.batch_size <= n:
        return cfg
    k = min(cfg.train.grad_accum_steps, n)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=n - n % k, grad_accum_steps=k))


def sft_reference(ctx: SeedContext, model: nnx.Module, cfg: ExperimentConfig | None = None, *,
                  checkpoint: bool = True):
    """The SFT phase on ``ctx.data.sft`` (logged as phase/method ``sft``; checkpointed under
    ``seed_<s>/checkpoints/sft``); returns the trained params = the reference."""
    writer = JsonlWriter(ctx.writer.path, static={**ctx.writer.static, "seed": ctx.seed, "phase": "sft",
                                                  "method": "sft"})
    ref_params = phases.run_sft(model, ctx.data.sft, ctx.tokenizer, cfg or ctx.cfg, seed=ctx.seed, writer=writer,
                                checkpoint_dir=os.path.join(ctx.seed_dir, "checkpoints", "sft") if checkpoint else None)
    writer.close()
    return ref_params


def add_reference_logps(ctx: SeedContext, *, extra: dict, batch_size: int = 256) -> None:
    """Add ``reference_{chosen,rejected,kl}_logps`` to every set in ``ctx.sets``, read from the
    ``train.reference_cache_dir`` cache when set (``extra``: what else the key depends on)."""
    cfg = ctx.cfg

    def compute(a):
        return phases.precompute_reference_logps(ctx.logits_fn, ctx.ref_params, a, batch_size=batch_size)

    cache = ReferenceLogpCache(cfg.train.reference_cache_dir) if cfg.train.reference_cache_dir else None
    for arrays in ctx.sets.values():
        # the key hashes params AND rest: with LoRA the base weights live in ``rest``
        weights = {"params": ctx.ref_params, "rest": ctx.rest}
        arrays.update(cache.get_or_compute(arrays, weights, compute, extra=extra) if cache else compute(arrays))


def concat_train_val(ctx: SeedContext) -> None:
    """``ctx.sets["train+val"]`` when a method trains on it (after the reference log-probs)."""
    if "train+val" in {m.train_data for m in ctx.cfg.methods}:
        a, b = ctx.sets["train"], ctx.sets["val"]
        ctx.sets["train+val"] = {k: np.concatenate([a[k], b[k]]) for k in a if k in b}


class Experiment:
    """The hooks of one experiment on the driver. The defaults are the ShiftBench pipeline:
    the scenario ``data.scenario`` (rows checked, :func:`~alignshift.data.cleaning.clean_splits`),
    a tiny Llama SFT-ed on its corpus as the reference, every method trained from it on its
    ``train_data`` (D_tr, D_v, D_tr ∪ D_v, or an oracle set from the deployment distribution),
    IW rules drawing a deployment-validation batch each step, and ``evaluator`` (default
    :class:`~alignshift.experiment.evaluators.DeployEvaluator`) scoring the policies."""

    #: ``--resume`` also reuses a seed whose ``seed_<s>/summary.json`` exists, from the same
    #: config and holding ``seed_keys`` (for experiments that write no checkpoints); its
    #: partial records are removed from ``metrics.jsonl``
    resume_seeds = False
    seed_keys: tuple = ()
    #: check the scenario's rows (:func:`~alignshift.data.cleaning.clean_splits`); False for
    #: generated data with no rows to check (DoRA's lists, FLR's conversations)
    check_rows = True
    #: ``tuning.enabled`` works here (:mod:`alignshift.experiment.tuning`; :meth:`tuning_split`)
    supports_tuning = True

    def __init__(self, evaluator=None, title: str = ""):
        self.evaluator = evaluator or DeployEvaluator()
        self.title = title

    # ------------------------------------------------------------------ the run

    def start(self, cfg: ExperimentConfig) -> None:
        """Before the output directory is prepared (checks, distributed initialisation, mesh)."""

    def tuning_split(self, ctx: SeedContext) -> dict:
        """With ``tuning.enabled``: hold the selection split out of the training pairs
        (:func:`alignshift.experiment.tuning.split_for_tuning`); returns its description."""
        return tuning.split_for_tuning(ctx, ("train",))

    def banner(self, cfg: ExperimentConfig) -> str:
        fields = "".join(f"{k}={v} " for k, v in self.banner_fields(cfg).items())
        return (f"alignshift {self.title or cfg.scenario}: scenario={cfg.data.scenario} seeds={cfg.seeds} "
                f"methods={[m.name for m in cfg.methods]} {fields}devices={jax.devices()}")

    def banner_fields(self, cfg: ExperimentConfig) -> dict:
        """More ``key=value`` settings the first printed line shows."""
        return {}

    def scenario(self, cfg: ExperimentConfig) -> str:
        """The ``scenario`` of the summaries and of every metrics record."""
        return cfg.data.scenario

    def writer_static(self, cfg: ExperimentConfig) -> dict:
        return {"scenario": self.scenario(cfg)}

    # ------------------------------------------------------------------ one seed

    def load_data(self, ctx: SeedContext) -> None:
        cfg = ctx.cfg
        data = make_scenario(cfg.data.scenario, seed=ctx.seed, **cfg.data.scenario_kwargs)
        ctx.tokenizer = data.tokenizer
        if self.check_rows:
            data = clean_splits(data, cfg.data, data.tokenizer, cfg.data.dataset or cfg.data.scenario)
        ctx.data = data

    def encode(self, ctx: SeedContext) -> None:
        """The sets every configured method needs (plus the evaluator's ``extra_sets``)."""
        cfg, data, tok, seed = ctx.cfg, ctx.data, ctx.tokenizer, ctx.seed
        enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len,
                   kl_pairing=cfg.data.kl_pairing)
        wanted = {m.train_data for m in cfg.methods}
        needs_val = any("val_batch" in phases.objective_for(m).requires for m in cfg.methods) or wanted & {"val", "train+val"}
        sets = {"train": encode_pairs(tok, data.train, **enc), "test": encode_pairs(tok, data.test, **enc)}
        if needs_val:
            sets["val"] = encode_pairs(tok, data.val, **enc)
        if "oracle" in wanted:
            if cfg.data.scenario != "deploy_shift":
                raise ValueError(f"train_data='oracle' is only defined for deploy_shift, not {cfg.data.scenario!r}")
            oracle = make_scenario(cfg.data.scenario, seed=seed, **{**cfg.data.scenario_kwargs, "deploy_fraction": 1.0})
            sets["oracle"] = encode_pairs(tok, oracle.train, **enc)
        extra_sets = self.evaluator.extra_sets
        for name, examples in (extra_sets(data) if extra_sets else {}).items():
            sets[name] = encode_pairs(tok, examples, **enc)
        ctx.sets = sets

    def build_reference(self, ctx: SeedContext) -> None:
        """A fresh policy SFT-ed on the scenario's corpus; with LoRA, adapters on top of it."""
        cfg = ctx.cfg
        model = phases.build_policy(cfg.model, ctx.tokenizer, seed=ctx.seed)
        ctx.graphdef, _, ctx.rest = split_model(model)
        ctx.ref_params = sft_reference(ctx, model)
        if cfg.model.lora.enabled:  # SFT model = reference; the policy trains adapters on top of it
            nnx.update(model, ctx.ref_params)
            ctx.graphdef, ctx.rest, ctx.init_params, ctx.ref_params = phases.add_lora(model, cfg.model, seed=ctx.seed)

    def add_reference(self, ctx: SeedContext) -> None:
        cfg = ctx.cfg
        # the model config is part of the cache key: rope/eps/dtype live in the definition, not the weights
        extra = {"model": to_dict(cfg.model), "tokenizer_vocab": list(ctx.tokenizer.vocab),
                 "max_prompt_len": cfg.data.max_prompt_len, "max_completion_len": cfg.data.max_completion_len,
                 "backend": jax.default_backend(), "alignshift": __version__}
        add_reference_logps(ctx, extra=extra)
        concat_train_val(ctx)

    def fit(self, ctx: SeedContext) -> None:
        """Anything the methods or the evaluator need besides the reference."""

    def method_runs(self, ctx: SeedContext) -> Iterator[MethodRun]:
        """The trainings of this seed, in order (a generator may prepare each one lazily)."""
        for m in ctx.cfg.methods:
            yield self.method_run(ctx, m)

    def method_run(self, ctx: SeedContext, m: MethodConfig) -> MethodRun:
        """Method ``m`` on its ``train_data`` (with true density-ratio weights if asked)."""
        arrays = ctx.sets[m.train_data]
        if m.example_weights == "true_density_ratio":
            if m.train_data != "train" or "true_density_ratio" not in ctx.data.info:
                raise ValueError(f"method {m.name!r}: true_density_ratio weights need train_data='train' "
                                 "and a scenario that reports its density ratio")
            ratio = ctx.data.info["true_density_ratio"]
            examples = ctx.data.train
            if "train_keep" in ctx.extra:  # the pairs left after the tuning selection split
                examples = [examples[i] for i in ctx.extra["train_keep"]]
            weight = np.asarray([ratio[ex.meta["category"]] for ex in examples], np.float32)
            arrays = {**arrays, "weight": weight}
        return MethodRun(m.name, m, arrays, batch_size_for(ctx.cfg, arrays["chosen_input_ids"].shape[0]))

    def seed_summary(self, ctx: SeedContext, methods: dict, seconds: float) -> dict:
        """The seed's ``summary.json``."""
        return {"scenario": self.scenario(ctx.cfg), "seed": ctx.seed, "methods": methods, "config": to_dict(ctx.cfg),
                "data_info": ctx.data.info, **ctx.summary, "wall_time_s": seconds}

    # ------------------------------------------------------------------ the aggregate

    def aggregate(self, cfg: ExperimentConfig, summaries: list[dict]) -> dict:
        """The aggregate ``summary.json`` (mean ± s.e. over seeds, plus an experiment's keys):
        with a DPO baseline among the methods (:func:`dpo_baseline`), ``paired_vs_dpo`` (every
        method minus it, paired by seed, 95% t-intervals, on the evaluator's columns); with
        ``tuning.enabled``, ``tuning`` (each method's selections by seed)."""
        summary = aggregate_seeds(summaries)
        base = dpo_baseline(cfg, summaries[0]["methods"])
        if base is not None:
            metrics = [k for k, _ in self.evaluator.paired_columns]
            names = [m.name for m in cfg.methods if m.name in summaries[0]["methods"]]
            summary["paired_vs_dpo"] = paired_differences(summaries, base, metrics, methods=names)
        if cfg.tuning.enabled and all("tuning" in s for s in summaries):
            summary["tuning"] = tuning.aggregate_tuning(cfg, summaries)
        return summary

    def results_title(self, cfg: ExperimentConfig, summary: dict) -> str:
        return (f"## ShiftBench `{cfg.data.scenario}` — {self.title or cfg.scenario} — test set, "
                f"{summary['n_seeds']} seed(s), mean ± s.e.")

    def results_md(self, cfg: ExperimentConfig, summary: dict) -> str:
        text = self.results_title(cfg, summary) + "\n\n" + format_table(summary, self.evaluator.columns)
        paired = summary.get("paired_vs_dpo")
        if paired and summary.get("n_seeds", 1) > 1 and paired["methods"]:
            text += ("\n\n### Paired differences vs " + paired["baseline"] + "\n\n"
                     + format_paired_differences(paired, self.evaluator.paired_columns))
        if "tuning" in summary:
            text += "\n\n" + format_tuning(summary["tuning"])
        return text

    def report(self, cfg: ExperimentConfig, summary: dict, out: str) -> None:
        """``results.md``, ``training_curves.png`` (when the evaluator has ``panels``), printed."""
        text = self.results_md(cfg, summary)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(text + "\n")
        files = ["summary.json", "results.md", "metrics.jsonl"]
        if self.evaluator.panels:
            records = read_jsonl(os.path.join(out, "metrics.jsonl"))
            if "tuning" in summary:
                records = selected_candidate_records(records, summary["tuning"])
            plot_training_curves(records, os.path.join(out, "training_curves.png"), panels=self.evaluator.panels)
            files.append("training_curves.png")
        print("\n" + text)
        print(f"\nwrote {out}/{', '.join(files)} in {summary['wall_time_s']:.0f}s", flush=True)


def dpo_baseline(cfg: ExperimentConfig, rows) -> str | None:
    """The method every other is compared with: ``tuning.baseline`` when set, else a method
    named ``dpo`` or ``dpo_train``, else the first plain DPO row (base ``dpo``, uniform weights,
    no penalty or label smoothing, on ``train``); None when there is none among ``rows``."""
    names = [m.name for m in cfg.methods if m.name in rows]
    if cfg.tuning.baseline:
        return cfg.tuning.baseline if cfg.tuning.baseline in names else None
    for name in ("dpo", "dpo_train"):
        if name in names:
            return name
    for m in cfg.methods:
        if (m.name in names and m.base == "dpo" and m.weighting == "uniform" and m.penalty is None
                and m.train_data == "train" and not m.example_weights and not m.base_kwargs.get("label_smoothing")):
            return m.name
    return None


def format_tuning(t: dict) -> str:
    """Markdown: each tuned method's selected configuration per seed and its selection score."""
    seeds = list(next(iter(t["methods"].values()))["selected_by_seed"]) if t["methods"] else []
    lines = [f"### Tuning: {t['budget']} configurations per method ({t['strategy']}), selected by {t['metric']} on "
             f"{round(100 * t['val_fraction'])}% of the training pairs held out",
             "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean selection score |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for name, r in t["methods"].items():
        cells = [f"{tuning.candidate_label(r['selected_by_seed'][s]['values'])} ({r['selected_by_seed'][s]['score']:.3f})"
                 for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['mean_score']:.3f} |")
    return "\n".join(lines)


def selected_candidate_records(records: list[dict], t: dict) -> list[dict]:
    """The ``metrics.jsonl`` records for the training-curve plot of a tuned run: each method's
    SELECTED configuration (phase ``tuning``, its ``candidate`` index) relabelled as phase
    ``preference``; the other configurations are left out."""
    chosen = {(int(seed), name): r["index"] for name, m in t["methods"].items()
              for seed, r in m["selected_by_seed"].items()}
    out = []
    for r in records:
        if r.get("phase") == "tuning":
            if chosen.get((r.get("seed"), r.get("method"))) == r.get("candidate"):
                out.append({**r, "phase": "preference"})
        else:
            out.append(r)
    return out


def prepare_seed(cfg: ExperimentConfig, seed: int, out: str, writer: JsonlWriter,
                 experiment: Experiment | None = None) -> SeedContext:
    """Data, encoded sets, the reference and its log-probs, and the experiment's own fits."""
    exp = experiment or Experiment()
    ctx = SeedContext(cfg, seed, os.path.join(out, f"seed_{seed}"), writer, started=time.perf_counter())
    exp.load_data(ctx)
    exp.encode(ctx)
    exp.build_reference(ctx)
    ctx.logits_fn = make_logits_fn(ctx.graphdef, ctx.rest)
    exp.add_reference(ctx)
    exp.fit(ctx)
    return ctx


def train_method(ctx: SeedContext, run: MethodRun, eval_fn=None, *, candidate: int | None = None):
    """Train ``run`` from the reference (logged as phase ``preference``, method ``run.name``;
    a tuning ``candidate`` as phase ``tuning`` with its index); returns (params, seconds).
    Rules that need a validation batch draw it from ``ctx.sets["val"]``."""
    static = {**ctx.writer.static, "seed": ctx.seed, "phase": "preference", "method": run.name}
    if candidate is not None:
        static.update(phase="tuning", candidate=candidate)
    writer = JsonlWriter(ctx.writer.path, static=static)
    t1 = time.perf_counter()
    ckpt = os.path.join(ctx.seed_dir, "checkpoints", run.name) if run.checkpoint else None
    params, _ = phases.run_preference(ctx.graphdef, ctx.rest, ctx.ref_params, run.arrays, run.method, run.cfg,
                                      seed=ctx.seed, writer=writer, checkpoint_dir=ckpt, eval_fn=eval_fn,
                                      val_arrays=ctx.sets.get("val"), init_params=ctx.init_params)
    writer.close()
    return params, time.perf_counter() - t1


def run_seed(cfg: ExperimentConfig, seed: int, out: str, writer: JsonlWriter, experiment: Experiment) -> dict:
    """One seed: prepare, score the reference, train and evaluate every method run; writes and
    returns the seed's summary."""
    ctx = prepare_seed(cfg, seed, out, writer, experiment)
    ev = experiment.evaluator
    methods: dict[str, dict] = {}
    ref = ev.setup(ctx)
    if ref is not None:
        methods[ev.reference_name] = ref
    tuned = cfg.tuning.enabled
    if tuned:  # equal budgets: the selection split out of D_tr first (alignshift/experiment/tuning.py)
        ctx.summary["tuning"] = {"metric": cfg.tuning.metric, "split": experiment.tuning_split(ctx), "methods": {}}
    for run in experiment.method_runs(ctx):
        extra = {}
        if tuned:
            res = tuning.tune_method(ctx, run, train_method)
            run, params, train_s = res.run, res.params, res.train_s
            ctx.summary["tuning"]["methods"][run.name] = res.record
            extra = {f"select_{cfg.tuning.metric}": res.score, "tuning_time_s": res.total_s}
            objective = phases.objective_for(run.method)
        else:
            objective = phases.objective_for(run.method)
            params, train_s = train_method(ctx, run, eval_fn=ev.during_training(ctx, objective))
        methods[run.name] = {**ev.evaluate(ctx, objective, params), **run.row, "train_time_s": train_s, **extra}
        print(f"  seed {seed} {run.name:>{ev.name_width}s}: {ev.line(methods[run.name])}  ({train_s:.1f}s)",
              flush=True)
    summary = experiment.seed_summary(ctx, methods, time.perf_counter() - ctx.started)
    write_json_atomic(os.path.join(ctx.seed_dir, "summary.json"), summary)
    return summary


def finished_seeds(cfg: ExperimentConfig, out: str, keys=()) -> dict[int, dict]:
    """``{seed: summary}`` of the seeds whose ``seed_<s>/summary.json`` (written last by
    :func:`run_seed`) exists; one from another config (or without ``keys``) is an error. The
    configs may differ in ``seed``/``seeds`` (a seed's run does not depend on them)."""
    want = seedless_config(cfg)
    done = {}
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        path = os.path.join(out, f"seed_{seed}", "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            s = json.load(fh)
        if seedless_config(s.get("config", {})) != want or any(key not in s for key in keys):
            raise SystemExit(f"error: --resume: {path} was produced by a different config; "
                             "use a new --out or drop --resume")
        done[seed] = s
    return done


def _keep_records_of(path: str, seeds) -> None:
    """Drop from ``metrics.jsonl`` the records of seeds that did not finish (they are rerun)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("seed") in seeds]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def experiment_script(description: str, default_config: str | None, default_out: str, make_experiment=Experiment, *,
                      cls=ExperimentConfig, check=None, real_data: bool = False, errors: tuple = ()):
    """``(parse_args, main)`` of an experiment script: the shared command line
    (:func:`alignshift.cli.parse_experiment_args`, config class ``cls``, the script's
    ``check``) and :func:`run_experiment` with ``make_experiment()``'s hooks. ``errors``:
    exception types ``main`` itself reports as one ``error:`` line with exit status 2 (the
    script's ``__main__`` reports every user error so: :func:`alignshift.cli.run_main`)."""

    def parse_args(argv=None):
        parser = experiment_parser(description, default_config, default_out, real_data=real_data)
        return parse_experiment_args(parser, argv, cls=cls, check=check)

    def main(argv=None) -> dict:
        args, cfg = parse_args(argv)
        with exit_on(*errors) if errors else contextlib.nullcontext():
            if args.merge:
                if args.resume:
                    raise SystemExit("error: --merge and --resume: choose one (--merge trains nothing)")
                with exit_on(MergeError):
                    return merge_runs(cfg, args.out, args.merge, make_experiment())
            return run_experiment(cfg, args.out, make_experiment(), resume=args.resume)

    return parse_args, main


def run_experiment(cfg: ExperimentConfig, out: str, experiment: Experiment | None = None, *,
                   resume: bool = False) -> dict:
    """All seeds, then the aggregate files; returns the aggregated summary."""
    exp = experiment or Experiment()
    if cfg.tuning.enabled and not exp.supports_tuning:
        raise ConfigError(f"config key 'tuning.enabled' is true, but {type(exp).__name__} does not support tuning "
                          "(the ShiftBench experiments do: shift_demo.py, iw_dpo.py, robust_dpo.py, dora.py)")
    exp.start(cfg)
    prepare_out_dir(out, cfg, resume=resume)
    t0 = time.perf_counter()
    print(exp.banner(cfg), flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    done = {}
    if resume and exp.resume_seeds:
        done = finished_seeds(cfg, out, exp.seed_keys)
        _keep_records_of(metrics_path, set(done))
    writer = JsonlWriter(metrics_path, static=exp.writer_static(cfg))
    tracking.start(cfg.train.report_to, out, to_dict(cfg))  # train.report_to: TensorBoard / W&B besides metrics.jsonl
    summaries = []
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        if seed in done:
            print(f"  seed {seed}: finished in {out}/seed_{seed}/summary.json, reused (--resume)", flush=True)
            summaries.append(done[seed])
        else:
            summaries.append(run_seed(cfg, seed, out, writer, exp))
    writer.close()
    tracking.stop()

    summary = exp.aggregate(cfg, summaries)
    summary["wall_time_s"] = time.perf_counter() - t0
    exp.evaluator.finish(summary, out)
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    exp.report(cfg, summary, out)
    return summary


class MergeError(ValueError):
    """``--merge`` cannot build the aggregate (a seed missing or run twice, another config)."""


def merge_runs(cfg: ExperimentConfig, out: str, sources: list[str], experiment: Experiment | None = None) -> dict:
    """Aggregate seeds run by separate processes (or machines) into ``out``, as one run of ``cfg``
    over all its seeds would have written them: every seed ``cfg.seed … cfg.seed + cfg.seeds − 1``
    must have a finished ``seed_<s>/summary.json`` in exactly one of ``sources`` (each the
    ``--out`` of a run of the same config with its own ``seed=S --seeds N``; the configs may
    differ in those two keys only). The seed directories are copied into ``out``, their
    ``metrics.jsonl`` records concatenated in seed order, then the aggregate ``summary.json``
    (``merged_from``: which seeds came from where; ``wall_time_s``: the sum of the seeds'),
    ``results.md`` and plots are written. Nothing is trained."""
    exp = experiment or Experiment()
    if getattr(exp.evaluator, "finish_needs_setup", False):
        raise MergeError(f"--merge: {type(exp.evaluator).__name__} builds its aggregate from the scenario's data "
                         "(set up while training); run all seeds in one process instead")
    want = seedless_config(cfg)
    found: dict[int, str] = {}
    for src in sources:
        if not os.path.isdir(src):
            raise MergeError(f"--merge: {src} is not a directory")
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name, "summary.json")
            if not (name.startswith("seed_") and name[5:].isdigit() and os.path.isfile(path)):
                continue
            seed = int(name[5:])
            if seed in found:
                raise MergeError(f"--merge: seed {seed} is in both {found[seed]} and {src}")
            found[seed] = src
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    missing = [s for s in seeds if s not in found]
    if missing:
        raise MergeError(f"--merge: no finished seed_<s>/summary.json for seed(s) {missing} in {list(sources)}")
    summaries = []
    for seed in seeds:
        with open(os.path.join(found[seed], f"seed_{seed}", "summary.json")) as fh:
            s = json.load(fh)
        got = seedless_config(s.get("config", {}))
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise MergeError(f"--merge: {found[seed]}/seed_{seed} was run with another config (differs in {diff})")
        summaries.append(s)
    if os.path.abspath(out) in {os.path.abspath(src) for src in sources}:
        raise MergeError("--merge: --out must be a new directory, not one of the merged ones")
    exp.start(cfg)
    prepare_out_dir(out, cfg, resume=False)
    records = []
    for seed in seeds:
        shutil.copytree(os.path.join(found[seed], f"seed_{seed}"), os.path.join(out, f"seed_{seed}"))
        path = os.path.join(found[seed], "metrics.jsonl")
        records += [r for r in read_jsonl(path) if r.get("seed") == seed] if os.path.exists(path) else []
    tmp = os.path.join(out, "metrics.jsonl.tmp")
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, os.path.join(out, "metrics.jsonl"))

    summary = exp.aggregate(cfg, summaries)
    summary["config"] = to_dict(cfg)
    summary["merged_from"] = {src: [s for s in seeds if found[s] == src] for src in sources}
    summary["wall_time_s"] = float(sum(s.get("wall_time_s", 0.0) for s in summaries))
    exp.evaluator.finish(summary, out)
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    exp.report(cfg, summary, out)
    return summary
