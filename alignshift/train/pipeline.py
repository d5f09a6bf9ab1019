"""The experiment pipeline shared by the ShiftBench scripts.

Per seed: build the scenario, SFT the policy (= the reference), precompute reference
log-probs for every data set a method may train on, train each method from the reference
on its ``train_data`` (D_tr, D_v, D_tr ∪ D_v, or an oracle set from the deployment
distribution), hand IW rules a deployment-validation batch each step, and evaluate on the
deployment test set. Then aggregate seeds (mean ± s.e.) and write ``summary.json``,
``metrics.jsonl``, ``results.md`` and ``training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from alignshift import __version__
from alignshift.cli import prepare_out_dir
from alignshift.config import ExperimentConfig, to_dict
from alignshift.data import encode_pairs, encode_prompts, make_scenario
from alignshift.data.schema import DataError, SkippedRows, check_lengths, validate_example
from alignshift.eval.report import aggregate_seeds, format_table, plot_training_curves, read_jsonl, write_json_atomic
from alignshift.eval.shift_eval import preference_accuracy, sample_and_score, win_rate
from alignshift.train.metrics import JsonlWriter
from alignshift.train.ref_cache import ReferenceLogpCache
from alignshift.train.runner import (
    add_lora,
    build_policy,
    objective_for,
    precompute_reference_logps,
    run_preference,
    run_sft,
)
from alignshift.train.steps import make_logits_fn, split_model

__all__ = ["DEFAULT_COLUMNS", "SeedContext", "DeployEvaluator", "prepare_seed", "train_method", "run_seed",
           "run_experiment"]

DEFAULT_COLUMNS = [
    ("deploy_pref_acc", "deploy pref. acc."),
    ("deploy_reward", "deploy reward (sampled)"),
    ("helpfulness", "helpfulness"),
    ("harm", "harm"),
    ("win_rate_vs_ref", "win rate vs ref"),
    ("kl_to_ref", "KL to ref"),
]


def _concat_arrays(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a if k in b}


@dataclasses.dataclass
class SeedContext:
    """Everything one seed's methods share: data, the SFT reference, encoded data sets with
    their reference log-probs, and the sampling settings."""

    cfg: ExperimentConfig
    seed: int
    seed_dir: str
    data: object
    graphdef: object
    rest: object
    ref_params: object
    logits_fn: object
    sets: dict
    writer: JsonlWriter
    init_params: object = None  # the policy's starting params when they differ from the reference (LoRA)

    def sample_kwargs(self) -> dict:
        e = self.cfg.eval
        return dict(tokenizer=self.data.tokenizer, reward_fn=self.data.reward_fn, metrics_fn=self.data.metrics_fn,
                    max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                    batch_size=e.batch_size)

    @property
    def eval_key(self):
        return jax.random.PRNGKey(10_000 + self.seed)


def _token_counter(tok):
    """``count(kind, text)``: tokens of a prompt (bos included) or completion (eos included)."""
    def count(kind, text):
        if hasattr(tok, "bos_id"):  # our WordTokenizer
            return len(tok.encode(text, add_bos=True)) if kind == "prompt" else len(tok.encode(text)) + 1
        return len(tok(text, add_special_tokens=(kind == "prompt"))["input_ids"]) + (kind == "completion")
    return count


def _row_number(row, position: int) -> int:
    """The row number errors name: ``meta["row"]`` (the row of the dataset file/split a real-data
    adapter read it from) when the example carries one, else its position in the split."""
    meta = getattr(row, "meta", None) if not isinstance(row, dict) else row.get("meta")
    r = meta.get("row") if isinstance(meta, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) else position


def clean_splits(data, dcfg, tok, name: str, *, lengths=None, report: SkippedRows | None = None):
    """Validate the train/val/test rows of ``data`` (``data.skip_bad_rows``, ``data.truncation``):
    the first bad row raises :class:`DataError` naming ``<name>/<split> row i`` (``i``: the row's
    ``meta["row"]`` when a dataset adapter set it, else its position) and the field, or,
    with ``skip_bad_rows``, bad (and, unless truncating, over-long) rows are dropped, counted,
    printed and recorded in ``data.info["skipped_rows"]``. Returns ``data`` with the kept rows.

    Lengths are counted with ``tok`` as :func:`alignshift.data.encode_pairs` sees them, or by
    ``lengths`` (see :func:`~alignshift.data.schema.check_lengths`; chat templates). ``report``
    continues an earlier one (rows a dataset adapter already skipped), so the record is the total."""
    report = SkippedRows() if report is None else report
    count, kept = (None if lengths is not None else _token_counter(tok)), {}
    policy = "skip" if (dcfg.truncation == "error" and dcfg.skip_bad_rows) else dcfg.truncation
    for split in ("train", "val", "test"):
        rows = getattr(data, split, None)
        if not isinstance(rows, list):
            continue
        src, idx, exs = f"{name}/{split}", [], []
        for i, r in enumerate(rows):
            i = _row_number(r, i)
            try:
                exs.append(validate_example(r, i, source=src))
                idx.append(i)
            except DataError as e:
                if not dcfg.skip_bad_rows:
                    raise
                report.add(src, e)
        kept[split] = check_lengths(exs, count, max_prompt_len=dcfg.max_prompt_len,
                                    max_completion_len=dcfg.max_completion_len, policy=policy, source=src,
                                    report=report, indices=idx, lengths=lengths)
        if rows and not kept[split]:
            raise DataError(f"{src}: no valid rows left ({report.by_source.get(src, 0)} skipped)")
    if report.count:
        print(f"data: {report.summary()}", flush=True)
        if isinstance(getattr(data, "info", None), dict):
            data.info["skipped_rows"] = {"count": report.count, "by_source": dict(report.by_source)}
    if all(kept[k] is getattr(data, k) or kept[k] == getattr(data, k) for k in kept):
        return data
    if dataclasses.is_dataclass(data):
        return dataclasses.replace(data, **kept)
    for k, v in kept.items():
        setattr(data, k, v)
    return data


def prepare_seed(cfg: ExperimentConfig, seed: int, out_dir: str, writer: JsonlWriter, extra_sets=None) -> SeedContext:
    """Build the scenario, SFT the reference, encode the data sets every configured method
    needs (plus ``extra_sets(data) -> {name: examples}``) and precompute their reference
    log-probs once."""
    seed_dir = os.path.join(out_dir, f"seed_{seed}")
    data = make_scenario(cfg.data.scenario, seed=seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    data = clean_splits(data, cfg.data, tok, cfg.data.dataset or cfg.data.scenario)
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    wanted = {m.train_data for m in cfg.methods}
    needs_val = any(objective_for(m).needs_val for m in cfg.methods) or wanted & {"val", "train+val"}
    sets = {"train": encode_pairs(tok, data.train, **enc), "test": encode_pairs(tok, data.test, **enc)}
    if needs_val:
        sets["val"] = encode_pairs(tok, data.val, **enc)
    if "oracle" in wanted:
        if cfg.data.scenario != "deploy_shift":
            raise ValueError(f"train_data='oracle' is only defined for deploy_shift, not {cfg.data.scenario!r}")
        oracle = make_scenario(cfg.data.scenario, seed=seed, **{**cfg.data.scenario_kwargs, "deploy_fraction": 1.0})
        sets["oracle"] = encode_pairs(tok, oracle.train, **enc)
    for name, examples in (extra_sets(data) if extra_sets else {}).items():
        sets[name] = encode_pairs(tok, examples, **enc)

    model = build_policy(cfg.model, tok, seed=seed)
    graphdef, _, rest = split_model(model)
    sft_writer = JsonlWriter(writer.path, static={**writer.static, "seed": seed, "phase": "sft", "method": "sft"})
    ref_params = run_sft(model, data.sft, tok, cfg, seed=seed, writer=sft_writer,
                         checkpoint_dir=os.path.join(seed_dir, "checkpoints", "sft"))
    sft_writer.close()
    init_params = None
    if cfg.model.lora.enabled:  # SFT model = reference; the policy trains adapters on top of it
        nnx.update(model, ref_params)
        graphdef, rest, init_params, ref_params = add_lora(model, cfg.model, seed=seed)
    logits_fn = make_logits_fn(graphdef, rest)
    compute = lambda a: precompute_reference_logps(logits_fn, ref_params, a)  # noqa: E731
    cache = ReferenceLogpCache(cfg.train.reference_cache_dir) if cfg.train.reference_cache_dir else None
    # the model config is part of the key: rope/eps/dtype live in the definition, not the weights
    extra = {"model": to_dict(cfg.model), "tokenizer_vocab": list(tok.vocab), **enc,
             "backend": jax.default_backend(), "alignshift": __version__}
    for arrays in sets.values():
        # the key hashes params AND rest: with LoRA the base weights live in ``rest``
        weights = {"params": ref_params, "rest": rest}
        arrays.update(cache.get_or_compute(arrays, weights, compute, extra=extra) if cache else compute(arrays))
    if "train+val" in wanted:
        sets["train+val"] = _concat_arrays(sets["train"], sets["val"])
    return SeedContext(cfg, seed, seed_dir, data, graphdef, rest, ref_params, logits_fn, sets, writer, init_params)


def train_method(ctx: SeedContext, m, eval_fn=None):
    """Train method ``m`` from the reference on its ``train_data``; returns (params, seconds)."""
    cfg, data = ctx.cfg, ctx.data
    train_arrays = ctx.sets[m.train_data]
    if m.example_weights == "true_density_ratio":
        if m.train_data != "train" or "true_density_ratio" not in data.info:
            raise ValueError(f"method {m.name!r}: true_density_ratio weights need train_data='train' "
                             "and a scenario that reports its density ratio")
        ratio = data.info["true_density_ratio"]
        weight = np.asarray([ratio[ex.meta["category"]] for ex in data.train], np.float32)
        train_arrays = {**train_arrays, "weight": weight}
    n_train = train_arrays["chosen_input_ids"].shape[0]
    mcfg = cfg
    if cfg.train.batch_size > n_train:  # e.g. DPO on the small D_v alone
        mcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=n_train))
    mw = JsonlWriter(ctx.writer.path, static={**ctx.writer.static, "seed": ctx.seed, "phase": "preference",
                                              "method": m.name})
    t1 = time.perf_counter()
    params, _ = run_preference(ctx.graphdef, ctx.rest, ctx.ref_params, train_arrays, m, mcfg, seed=ctx.seed,
                               writer=mw, checkpoint_dir=os.path.join(ctx.seed_dir, "checkpoints", m.name),
                               eval_fn=eval_fn, val_arrays=ctx.sets.get("val"), init_params=ctx.init_params)
    mw.close()
    return params, time.perf_counter() - t1


class DeployEvaluator:
    """Deployment-test evaluation: implicit-reward accuracy on the test pairs, ground-truth
    reward / helpfulness / harm of sampled responses, win rate and KL vs the reference."""

    columns = DEFAULT_COLUMNS
    panels = [("loss", "training loss"), ("rewards/margins", "train reward margin"),
              ("eval/deploy_pref_acc", "deploy pref. accuracy (held out)")]
    extra_sets = None

    def setup(self, ctx: SeedContext) -> dict:
        """Reference-policy metrics (and anything the method evaluations compare against)."""
        n_eval = min(ctx.cfg.eval.n_prompts, len(ctx.data.test))
        self.prompts = [ex.prompt for ex in ctx.data.test[:n_eval]]
        self.prompt_arrays = encode_prompts(ctx.data.tokenizer, self.prompts, max_prompt_len=ctx.cfg.data.max_prompt_len)
        self.ref_eval = self._sample(ctx, ctx.ref_params)
        r = self.ref_eval
        return {"deploy_pref_acc": float("nan"), "deploy_reward": r["reward"],
                "helpfulness": r.get("helpfulness", float("nan")), "harm": r.get("harm", float("nan")),
                "win_rate_vs_ref": 0.5, "kl_to_ref": 0.0}

    def _sample(self, ctx, params):
        return sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, self.prompt_arrays, self.prompts,
                                key=ctx.eval_key, **ctx.sample_kwargs())

    def during_training(self, ctx: SeedContext, objective):
        test = ctx.sets["test"]
        return lambda state: {"deploy_pref_acc": preference_accuracy(ctx.logits_fn, state["params"], test,
                                                                     objective)["pref_acc"]}

    def evaluate(self, ctx: SeedContext, objective, params) -> dict:
        acc = preference_accuracy(ctx.logits_fn, params, ctx.sets["test"], objective)
        ev = self._sample(ctx, params)
        return {"deploy_pref_acc": acc["pref_acc"], "deploy_reward": ev["reward"],
                "helpfulness": ev.get("helpfulness", float("nan")), "harm": ev.get("harm", float("nan")),
                "win_rate_vs_ref": win_rate(ev["rewards"], self.ref_eval["rewards"]), "kl_to_ref": ev["kl_to_ref"]}

    def line(self, m: dict) -> str:
        return (f"deploy acc {m['deploy_pref_acc']:.3f}  reward {m['deploy_reward']:+.3f}  "
                f"harm {m['harm']:.3f}  KL {m['kl_to_ref']:.2f}")


def run_seed(cfg: ExperimentConfig, seed: int, out_dir: str, writer: JsonlWriter, evaluator=None) -> dict:
    evaluator = evaluator or DeployEvaluator()
    t0 = time.perf_counter()
    ctx = prepare_seed(cfg, seed, out_dir, writer, extra_sets=evaluator.extra_sets)
    methods: dict[str, dict] = {"reference (SFT)": evaluator.setup(ctx)}
    for m in cfg.methods:
        objective = objective_for(m)
        params, train_s = train_method(ctx, m, eval_fn=evaluator.during_training(ctx, objective))
        methods[m.name] = {**evaluator.evaluate(ctx, objective, params), "train_time_s": train_s}
        print(f"  seed {seed} {m.name:>10s}: {evaluator.line(methods[m.name])}  ({train_s:.1f}s)", flush=True)
    summary = {
        "scenario": cfg.data.scenario,
        "seed": seed,
        "methods": methods,
        "config": to_dict(cfg),
        "data_info": ctx.data.info,
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json_atomic(os.path.join(ctx.seed_dir, "summary.json"), summary)
    return summary


def run_experiment(cfg: ExperimentConfig, out: str, *, resume: bool = False, title: str = "",
                   evaluator=None, after=None) -> dict:
    """All seeds, then the aggregate files; returns the aggregated summary. ``after(summary,
    out)`` may write extra outputs (e.g. curve plots)."""
    evaluator = evaluator or DeployEvaluator()
    prepare_out_dir(out, cfg, resume=resume)
    t0 = time.perf_counter()
    print(f"alignshift {title or cfg.scenario}: scenario={cfg.data.scenario} seeds={cfg.seeds} "
          f"methods={[m.name for m in cfg.methods]} devices={jax.devices()}", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = JsonlWriter(metrics_path, static={"scenario": cfg.data.scenario})
    summaries = [run_seed(cfg, cfg.seed + k, out, writer, evaluator) for k in range(cfg.seeds)]
    writer.close()

    summary = aggregate_seeds(summaries)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    if after is not None:
        after(summary, out)
        write_json_atomic(os.path.join(out, "summary.json"), summary)
    table = format_table(summary, evaluator.columns)
    header = (f"## ShiftBench `{cfg.data.scenario}` — {title or cfg.scenario} — test set, "
              f"{summary['n_seeds']} seed(s), mean ± s.e.\n\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + table + "\n")
    plot_training_curves(
        read_jsonl(metrics_path),
        os.path.join(out, "training_curves.png"),
        panels=evaluator.panels,
    )
    print("\n" + header + table)
    print(f"\nwrote {out}/summary.json, results.md, metrics.jsonl, training_curves.png "
          f"in {summary['wall_time_s']:.0f}s", flush=True)
    return summary
