"""``--dry-run``: build the model and optimizer state with abstract shapes and print the
parameter count, the per-device memory and the sharding plan -- no weights, no devices.

    python -m alignshift.dryrun --config experiments/configs/iw_dpo_safe_rlhf_llama3_8b.yaml
    python experiments/iw_dpo.py --config <yaml> --dry-run          # any experiment script

The model comes from ``model.hf_path``'s ``config.json`` (a folder with weights, or a
config-only folder such as ``experiments/configs/models/llama3_8b_instruct``) or, without
``hf_path``, from the tiny-Llama sizes in ``model``. It is built with ``nnx.eval_shape``
(no parameter is materialised), LoRA adapters are added abstractly when
``model.lora.enabled``, and the train state ``{step, params, opt_state}`` is
``jax.eval_shape(init_state)``. The mesh is ``mesh.{data,fsdp,tensor}`` over
``mesh.devices`` devices (default: the devices present), built as a
``jax.sharding.AbstractMesh``: the plan is computed for, say, 8 GPUs on a CPU-only machine.
Shardings are the ones training uses (:func:`alignshift.parallel.state_shardings` on the
rule table), and per-device bytes are ``NamedSharding.shard_shape`` sizes.

Per-device memory = trainable params + their gradients + optimizer state + frozen weights
(the reference copy the runner keeps, or the base weights under LoRA) + an activation
estimate. The activation term is a rough upper bound for one micro-batch of
``train.batch_size / (data*fsdp)`` pairs (chosen + rejected [+ KL] sequences of
``max_prompt_len + max_completion_len`` tokens): float32 logits and log-softmax, plus per
layer either the remat checkpoint (``model.remat``) or the full set of intermediate
activations and attention scores; WDPO's double back-propagation doubles it. XLA may do
better (fusion, rematerialisation). With ``mesh.device_memory_gb`` set, an estimate above
it is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from alignshift.config import ConfigError, ExperimentConfig
from alignshift.experiment.errors import add_skip_bad_rows, error_line, run_main
from alignshift.models.layers import DTYPES

__all__ = ["dry_run", "run_dry_run", "load_plan_config", "resolve_hf_config", "abstract_model", "main"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GiB = 1024 ** 3


def resolve_hf_config(path: str) -> tuple[str, dict]:
    """``(folder, config.json dict)``; a relative folder is tried against the working
    directory, then the repository root."""
    for cand in (path, os.path.join(_REPO_ROOT, path)):
        f = os.path.join(cand, "config.json")
        if os.path.isfile(f):
            with open(f) as fh:
                cfg = json.load(fh)
            if "model_type" not in cfg:
                raise ConfigError(f"{f}: no 'model_type' key")
            return cand, cfg
    raise ConfigError(f"config key 'model.hf_path': no config.json in {path!r} (nor under the repository root)")


def _architecture(model_type: str):
    from alignshift.models.hf import ARCHITECTURES

    if model_type not in ARCHITECTURES:
        raise ConfigError(f"config key 'model.hf_path': model_type {model_type!r} is not supported; "
                          f"supported: {sorted(ARCHITECTURES)}")
    mod_name, cfg_name, model_name = ARCHITECTURES[model_type]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def abstract_model(cfg: ExperimentConfig, *, vocab_size: int = 256):
    """``(abstract model, description dict)`` from ``model.hf_path``'s config.json or the
    tiny-Llama fields (``vocab_size`` when ``model.vocab_size`` is 0: the benchmark's
    tokenizer is not built here)."""
    m = cfg.model
    dtype = DTYPES[m.dtype]
    if m.hf_path:
        folder, hf = resolve_hf_config(m.hf_path)
        cfg_cls, model_cls = _architecture(hf["model_type"])
        mcfg = cfg_cls.from_hf(hf)
        desc = {"source": folder, "model_type": hf["model_type"]}
    else:
        from alignshift.models.llama import LlamaConfig, LlamaForCausalLM

        model_cls = LlamaForCausalLM
        mcfg = LlamaConfig(vocab_size=m.vocab_size or vocab_size, hidden_size=m.hidden_size,
                           intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                           num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                           rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
                           tie_word_embeddings=m.tie_word_embeddings)
        desc = {"source": "model.* (tiny Llama)", "model_type": "llama"}
    if m.remat:
        mcfg.remat = True

    def build():
        model = model_cls(mcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        if m.lora.enabled:
            from alignshift.models.lora import LoRAConfig, apply_lora

            apply_lora(model, LoRAConfig(rank=m.lora.rank, alpha=m.lora.alpha, targets=tuple(m.lora.targets)),
                       rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    desc.update({k: getattr(mcfg, k, None) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "sliding_window")})
    return model, desc


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def _per_device_bytes(tree, shardings) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    assert len(leaves) == len(shs), (len(leaves), len(shs))
    return sum(_nbytes(s.shard_shape(tuple(x.shape)), x.dtype) for x, s in zip(leaves, shs))


def _total_bytes(tree) -> int:
    return sum(_nbytes(tuple(x.shape), x.dtype) for x in jax.tree_util.tree_leaves(tree))


def _count(tree) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _plan(params, mesh) -> list[dict]:
    """One row per parameter *kind* (layer indices collapsed to ``*``)."""
    from alignshift.parallel.rules import logical_axes_for, param_path, param_shardings

    shardings = param_shardings(params, mesh)
    rows: dict[str, dict] = {}
    flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(params), flat_s):
        path = param_path(kp)
        key = re.sub(r"/\d+/", "/*/", path)
        if key in rows:
            rows[key]["count"] += 1
            continue
        rows[key] = {"param": key, "count": 1, "shape": tuple(x.shape), "dtype": str(jnp.dtype(x.dtype)),
                     "logical": logical_axes_for(path, len(x.shape)), "spec": str(s.spec),
                     "per_device": tuple(s.shard_shape(tuple(x.shape)))}
    return list(rows.values())


def _activation_bytes(cfg: ExperimentConfig, desc: dict, mesh_shape: dict, objective_flags: dict) -> dict:
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    tp = mesh_shape["tensor"]
    b = math.ceil(cfg.train.batch_size / dp)
    seqs = b * (3 if objective_flags["kl"] else 2)
    if objective_flags["val"]:
        seqs += 2 * math.ceil(cfg.train.val_batch_size / dp)
    t = cfg.data.max_prompt_len + cfg.data.max_completion_len
    h, i, L = desc["hidden_size"], desc["intermediate_size"], desc["num_hidden_layers"]
    nh, v = desc["num_attention_heads"], desc["vocab_size"]
    act = jnp.dtype(DTYPES[cfg.model.dtype]).itemsize
    # fp32 logits + log-softmax, vocab split over tensor; logits_chunk / logits_on_responses shrink
    # the positions that hold them (WDPO's embedding path always takes full logits)
    t_logits = t
    if cfg.train.logits_on_responses and not objective_flags["wdpo"]:
        t_logits = min(t, cfg.data.max_completion_len)
    if cfg.train.logits_chunk > 0 and not objective_flags["wdpo"]:
        t_logits = min(t_logits, cfg.train.logits_chunk)
    logits = 2 * seqs * t_logits * v * 4 // tp
    layer_full = seqs * t * (6 * h + 3 * i) * act // tp + 2 * seqs * nh * t * t * 4 // tp
    if cfg.model.remat:
        layers = L * seqs * t * h * act + layer_full
    else:
        layers = L * layer_full
    total = (logits + layers) * (2 if objective_flags["wdpo"] else 1)
    return {"micro_batch_pairs_per_device": b, "sequences_per_device": seqs, "seq_len": t,
            "logits": logits, "layers": layers, "total": total}


def dry_run(cfg: ExperimentConfig, *, devices: int | None = None, trace_step: bool = False,
            out: Callable[[str], Any] | None = print) -> dict:
    """Plan ``cfg`` on its mesh with abstract shapes; returns the report (and prints it)."""
    from jax.sharding import AbstractMesh

    from alignshift.parallel.mesh import MESH_AXES, resolve_mesh_shape
    from alignshift.parallel.rules import param_shardings, state_shardings, unmatched_params
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import objective_for
    from alignshift.forward import split_model
    from alignshift.train.steps import init_state

    say = out or (lambda s: None)
    warnings: list[str] = []
    # --- data: a registered dataset or a benchmark scenario (nothing is loaded)
    if cfg.data.dataset:
        from alignshift.data.datasets import DATASETS

        if cfg.data.dataset not in DATASETS:
            raise ConfigError(f"config key 'data.dataset': unknown dataset {cfg.data.dataset!r}; "
                              f"registered: {sorted(DATASETS)}")
        if DATASETS[cfg.data.dataset].kind == "classification":
            warnings.append(f"data.dataset={cfg.data.dataset!r} is classification data: preference pairs are "
                            "built from generations labelled by its classifier, not loaded directly")
        if cfg.data.chat_mode not in ("auto", "chat", "raw"):
            raise ConfigError(f"config key 'data.chat_mode' must be auto, chat or raw; got {cfg.data.chat_mode!r}")
    else:
        from alignshift.data import SCENARIOS

        if cfg.data.scenario not in SCENARIOS:
            raise ConfigError(f"config key 'data.scenario': unknown scenario {cfg.data.scenario!r}; "
                              f"known: {sorted(SCENARIOS)}")
    objectives = [objective_for(m) for m in cfg.methods]
    flags = {"kl": any("kl_completions" in o.requires for o in objectives), "val": any("val_batch" in o.requires for o in objectives),
             "wdpo": any(m.penalty == "wdpo" for m in cfg.methods)}

    # --- mesh
    n_dev = cfg.mesh.devices or devices or jax.device_count()
    try:
        shape = resolve_mesh_shape(n_dev, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise ConfigError(f"config key 'mesh': {e}") from None
    mesh = AbstractMesh(shape, MESH_AXES)
    mesh_shape = dict(zip(MESH_AXES, shape))
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    for key, val in (("train.batch_size", cfg.train.batch_size),) + (
            (("train.val_batch_size", cfg.train.val_batch_size),) if flags["val"] else ()):
        if val % dp:
            raise ConfigError(f"config key {key!r} = {val} is not divisible by the mesh's data*fsdp = {dp}")

    # --- model, abstractly
    model, desc = abstract_model(cfg)
    if cfg.model.lora.enabled:
        from alignshift.models.lora import split_lora

        graphdef, params, rest = split_lora(model)
    else:
        graphdef, params, rest = split_model(model)
    all_params = nnx.state(model, nnx.Param)
    unmatched = unmatched_params(all_params)
    if unmatched:
        warnings.append(f"{len(unmatched)} parameter(s) match no partition rule (replicated): {unmatched[:4]}")

    # --- train state, abstractly
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    s_sh = state_shardings(state, mesh)
    params_dev = _per_device_bytes(state["params"], s_sh["params"])
    opt_dev = _per_device_bytes(state["opt_state"], s_sh["opt_state"])
    if cfg.model.lora.enabled:
        frozen = nnx.state(model, nnx.Param)  # base weights stay in `rest`; reference = zeroed adapters
        frozen_dev = _per_device_bytes(frozen, param_shardings(frozen, mesh)) - params_dev
        frozen_what = "base weights (LoRA: reference = adapters zeroed)"
    else:
        frozen_dev = params_dev
        frozen_what = "reference params (a second copy of the weights)"
    acts = _activation_bytes(cfg, desc, mesh_shape, flags)
    per_dev = {"params": params_dev, "grads": params_dev, "opt_state": opt_dev, "frozen": frozen_dev,
               "activations": acts["total"]}
    per_dev["total"] = sum(per_dev.values())
    n_total, n_train = _count(all_params), _count(params)
    plan = _plan(all_params, mesh)

    report = {
        "model": desc, "n_params": n_total, "n_trainable": n_train, "mesh": mesh_shape, "devices": n_dev,
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "lora": cfg.model.lora.enabled,
        "per_device_bytes": per_dev, "per_device_gib": {k: v / GiB for k, v in per_dev.items()},
        "activation_detail": acts, "frozen": frozen_what,
        "state_bytes_total": _total_bytes(state), "plan": plan, "warnings": warnings,
        "methods": [m.name for m in cfg.methods], "dataset": cfg.data.dataset or f"scenario:{cfg.data.scenario}",
    }
    if trace_step:
        report["step_outputs"] = _trace_step(cfg, graphdef, rest, tx, objectives[0], state, desc, flags)

    g = report["per_device_gib"]
    say(f"dry run: {cfg.scenario}  model={desc['model_type']} ({desc['source']})  dtype={cfg.model.dtype}"
        f"  remat={cfg.model.remat}  lora={cfg.model.lora.enabled}")
    say(f"  parameters: {n_total:,} total, {n_train:,} trainable  ({n_total / 1e9:.2f} B)")
    say(f"  data: {report['dataset']}  methods: {report['methods']}")
    say(f"  mesh: {n_dev} devices as data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]}"
        f"  (micro-batch {acts['micro_batch_pairs_per_device']} pairs/device, seq {acts['seq_len']})")
    say("  per-device memory (GiB): " + "  ".join(f"{k} {g[k]:.2f}" for k in
                                                  ("params", "grads", "opt_state", "frozen", "activations"))
        + f"  => total {g['total']:.2f}")
    say(f"    frozen = {frozen_what}; activations = rough upper bound (logits {acts['logits'] / GiB:.2f}, "
        f"layers {acts['layers'] / GiB:.2f})")
    say("  sharding plan (param kind: count x shape dtype -> spec -> per-device shape):")
    for r in plan:
        say(f"    {r['param']}: {r['count']} x {r['shape']} {r['dtype']} -> {r['spec']} -> {r['per_device']}")
    if trace_step:
        say(f"  one preference step traced with jax.eval_shape: metrics {report['step_outputs']['metrics']}")
    for w in warnings:
        say(f"  warning: {w}")
    budget = cfg.mesh.device_memory_gb
    if budget:
        ok = g["total"] <= budget
        say(f"  fits mesh.device_memory_gb={budget:g}: {'yes' if ok else 'NO'}")
        report["fits"] = ok
        if not ok:
            raise ConfigError(f"config key 'mesh.device_memory_gb': estimated {g['total']:.1f} GiB per device "
                              f"exceeds {budget:g} GiB; use more fsdp/tensor sharding, remat, LoRA or a smaller "
                              "micro-batch")
    return report


def _trace_step(cfg, graphdef, rest, tx, objective, state, desc, flags) -> dict:
    """``jax.eval_shape`` of one preference step on an abstract batch (wiring check)."""
    from alignshift.train.steps import make_preference_step

    b, t = cfg.train.batch_size, cfg.data.max_prompt_len + cfg.data.max_completion_len
    groups = ("chosen", "rejected", "kl") if flags["kl"] else ("chosen", "rejected")
    batch = {}
    for g in groups:
        for k in ("input_ids", "attention_mask", "loss_mask"):
            batch[f"{g}_{k}"] = jax.ShapeDtypeStruct((b, t), jnp.int32)
        batch[f"reference_{g}_logps"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    step = make_preference_step(graphdef, rest, tx, objective)
    args = (state, batch, None)
    if "val_batch" in objective.requires:
        vb = {k: jax.ShapeDtypeStruct((cfg.train.val_batch_size,) + v.shape[1:], v.dtype) for k, v in batch.items()}
        new_state, metrics = jax.eval_shape(lambda s, x, v: step(s, x, None, val_batch=v), state, batch, vb)
    else:
        new_state, metrics = jax.eval_shape(step, *args)
    return {"metrics": sorted(metrics)}


def load_plan_config(path: str | None, overrides=(), *, quick: bool = False) -> tuple[ExperimentConfig, list[str]]:
    """Load an experiment YAML for planning. Top-level sections that only one experiment
    script knows (e.g. ``classifier`` for DoRA, ``flr`` for FLR) are dropped (and returned);
    everything else is validated as :class:`~alignshift.config.ExperimentConfig`."""
    from alignshift.config import apply_overrides, from_dict, read_config_file, to_dict, validate

    data = read_config_file(path)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    dropped = sorted(k for k in data if k not in known)
    data = {k: v for k, v in data.items() if k in known}
    ours = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in known]
    base = to_dict(from_dict(ExperimentConfig, data))
    if quick:
        from alignshift.config import _dump

        base = apply_overrides(base, [f"{k}={_dump(v)}" for k, v in base.get("quick", {}).items()
                                      if k.split(".")[0] in known])
    cfg = from_dict(ExperimentConfig, apply_overrides(base, ours))
    validate(cfg)
    return cfg, dropped


def run_dry_run(path: str | None, overrides=(), *, quick: bool = False, devices: int | None = None,
                trace_step: bool = False, json_out: str | None = None) -> int:
    """Command-line entry (``--dry-run`` of the experiment scripts): 0 on success, 2 on a
    config error (printed)."""
    try:
        cfg, dropped = load_plan_config(path, overrides, quick=quick)
        if dropped:
            print(f"(dry run: script-specific config sections not planned: {dropped})")
        rep = dry_run(cfg, devices=devices, trace_step=trace_step)
    except ConfigError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if json_out:
        with open(json_out, "w") as f:
            json.dump({k: v for k, v in rep.items() if k != "plan"}, f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--devices", type=int, default=None, help="plan for this many devices")
    p.add_argument("--trace-step", action="store_true", help="also jax.eval_shape one preference step")
    p.add_argument("--json", default=None, help="write the report (without the plan) to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--quick", action="store_true", help="apply the config's --quick overrides first")
    add_skip_bad_rows(p)
    args = p.parse_args(argv)
    overrides = list(args.overrides) + (["data.skip_bad_rows=true"] if args.skip_bad_rows else [])
    return run_dry_run(args.config, overrides, quick=args.quick, devices=args.devices,
                       trace_step=args.trace_step, json_out=args.json)


if __name__ == "__main__":
    sys.exit(run_main(main))
