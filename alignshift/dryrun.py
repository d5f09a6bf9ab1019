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

Per-device memory = trainable params + their gradients (+ a float32 accumulator with
``train.grad_accum_steps`` k > 1: alignshift/train/accumulate.py sums the micro-batches'
gradients in float32) + optimizer state + frozen weights (the reference copy the runner keeps,
or the base weights under LoRA) + the FSDP all-gather buffers (a layer's whole weights, the next
layer's prefetched, and in full fine-tuning its whole gradient before the reduce-scatter; or the
LM head and its gradient) + an activation estimate.

The activation term is a rough upper bound for one micro-batch of
``train.batch_size / (data*fsdp*k)`` pairs per device, laid out as the step sees it
(:func:`_layout`): padded rows of ``max_prompt_len + max_completion_len`` tokens (chosen,
rejected [, KTO's KL completion]), one ``[prompt | chosen | rejected]`` row per pair with
``train.share_prompt`` (the prompt once), or packed rows (``train.packing``) whose count comes
from the data's length distribution when one is given (``--lengths``: per-row token counts from
``benchmarks/count_hh_lengths.py --json``, or mean prompt/chosen/rejected tokens) and is the
worst case (one sequence per row) otherwise. It holds float32 logits and log-softmax of the
positions the LM head sees (all, the response window, ``logits_chunk`` at a time; packed and
shared-prompt batches only the response slots), plus per layer either the remat checkpoint
(``model.remat``) or every intermediate, plus one layer's working set with the attention scores
and probabilities in float32 (``--fused-attention``: a fused kernel, only its softmax
statistics); WDPO's double back-propagation doubles it. Forward-only passes (an in-step
reference, IW-DPO's validation batch under accumulation, and the forward-only pass that a
batch-coupled objective -- KLDPO, DR-DPO, DoRA/DRO, IW-DPO, KTO -- runs over all k
micro-batches with ``train.weighting_scope: global``) keep nothing per layer: they are below
the training pass and add only their per-example outputs (a few float32 numbers per pair) to
the peak; the coupled pass costs one more policy forward per step, not memory. XLA may do
better (fusion, rematerialisation). With ``mesh.device_memory_gb`` set, an estimate above it
is an error. docs/memory_plans.md works two plans through.
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

__all__ = ["dry_run", "run_dry_run", "load_plan_config", "resolve_hf_config", "abstract_model", "LengthProfile",
           "main"]

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


ACCUM_DTYPE = jnp.float32  # the gradient accumulator of alignshift/train/accumulate.py (k > 1)


@dataclasses.dataclass(frozen=True)
class LengthProfile:
    """A data set's untruncated token counts per pair: per-row lists (``prompt``, ``chosen``,
    ``rejected``; what ``benchmarks/count_hh_lengths.py --json`` writes) or one mean each.
    :func:`dry_run` truncates them at ``data.max_prompt_len`` / ``max_completion_len`` and uses
    them for the tokens a packed row holds."""

    prompt: tuple
    chosen: tuple
    rejected: tuple
    source: str = ""

    @classmethod
    def parse(cls, spec: str) -> "LengthProfile":
        """``"P,C,R"`` (mean tokens) or a JSON file ``{"prompt": [...], "chosen": [...], "rejected": [...]}``."""
        if os.path.isfile(spec):
            with open(spec) as f:
                d = json.load(f)
            try:
                lists = tuple(tuple(int(x) for x in d[k]) for k in ("prompt", "chosen", "rejected"))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"--lengths {spec}: needs lists 'prompt', 'chosen' and 'rejected' of token counts") \
                    from None
            if not lists[0] or len({len(x) for x in lists}) != 1:
                raise ConfigError(f"--lengths {spec}: 'prompt', 'chosen', 'rejected' must be non-empty and equally long")
            return cls(*lists, source=spec)
        try:
            p, c, r = (float(x) for x in spec.split(","))
        except ValueError:
            raise ConfigError(f"--lengths must be a JSON file of per-row token counts or 'P,C,R' (mean prompt, "
                              f"chosen and rejected tokens); got {spec!r}") from None
        if min(p, c, r) <= 0:
            raise ConfigError(f"--lengths {spec!r}: token counts must be > 0")
        return cls((p,), (c,), (r,), source=f"means {spec}")

    def means(self, max_prompt: int, max_completion: int) -> tuple[float, float, float]:
        """Mean prompt, chosen and rejected tokens after truncation."""
        def m(xs, cap):
            return sum(min(x, cap) for x in xs) / len(xs)
        return m(self.prompt, max_prompt), m(self.chosen, max_completion), m(self.rejected, max_completion)


_PACK_SAMPLES = 256  # simulated micro-batches per packing estimate


def _packed_rows(units: int, unit_tokens, row_len: int) -> tuple[int, float]:
    """``(rows, tokens per row)`` first-fit decreasing packing of ``unit_tokens`` (one micro-batch's
    units: sequences, or shared-prompt groups) into rows of ``row_len`` tokens, the row count
    rounded up to the run's compiled shapes (:func:`alignshift.data.packing.row_counts`)."""
    from alignshift.data.packing import row_counts

    fill: list[int] = []
    for n in sorted(unit_tokens, reverse=True):
        for r, f in enumerate(fill):
            if f + n <= row_len:
                fill[r] += n
                break
        else:
            fill.append(n)
    need = len(fill)
    return next(c for c in row_counts(units) if c >= need), sum(fill) / need


def _layout(cfg: ExperimentConfig, pairs: int, flags: dict, lengths: LengthProfile | None) -> dict:
    """The token layout of one device's micro-batch of ``pairs`` pairs: ``rows`` x ``row_len``
    tokens through the model and ``logit_positions``, the positions the LM head and log-softmax
    hold at a time (all rows together). ``g`` = 2 sequences per pair (3 with KTO's mismatched
    KL completion), ``P``/``C`` = ``data.max_prompt_len``/``max_completion_len``.

    * padded: one row per sequence, ``P + C`` tokens; the LM head on every position, on the
      ``C``-position response window (``train.logits_on_responses``), ``logits_chunk`` at a time;
    * ``train.share_prompt`` without packing: one row per pair, ``[prompt | chosen | rejected]``
      = ``P + g·C`` tokens (the prompt once);
    * ``train.packing``: rows of ``P + C`` tokens (``P + g·C`` with shared prompts) holding whole
      sequences (groups), first-fit decreasing, the row count rounded up to one of the run's
      compiled shapes (:func:`alignshift.data.packing.row_counts`). Without a length profile a
      micro-batch can need one row per unit (every sequence at its maximum): that is the plan.
      With per-row counts the packer is simulated on random micro-batches of the data (the
      largest row count seen is the compiled shape the plan must hold); with means only, a row
      holds ``row_len - unit/2`` tokens (about half a unit lost at each row's end).

    Packed and shared-prompt batches run the LM head on the ``g·C`` response slots per pair only
    (``{g}_target_index``), ``logits_chunk`` at a time."""
    import numpy as np

    P, C = cfg.data.max_prompt_len, cfg.data.max_completion_len
    g = 3 if flags["kl"] else 2
    share, pack = cfg.train.share_prompt, cfg.train.packing
    row_len = P + g * C if share else P + C
    units = pairs if share else pairs * g
    out = {"layout": ("packed" if pack else "padded") + (", shared prompt" if share else ""), "candidates": g,
           "row_len": row_len, "units": units}
    if lengths is not None:
        p, c, r = lengths.means(P, C)
        resp = c + r + (c if g == 3 else 0.0)  # KTO's KL completion: another pair's response
        out["real_tokens_per_pair"] = (p + resp) if share else (g * p + resp)
    rows = units
    if pack and lengths is not None and len(lengths.prompt) > 1:
        rng = np.random.default_rng(0)
        pr, ch, rj = (np.minimum(np.asarray(x), cap) for x, cap in
                      ((lengths.prompt, P), (lengths.chosen, C), (lengths.rejected, C)))
        sims = []
        for _ in range(_PACK_SAMPLES):
            i = rng.integers(0, len(pr), pairs)
            seqs = [ch[i], rj[i]] + ([ch[rng.integers(0, len(pr), pairs)]] if g == 3 else [])
            toks = (pr[i] + sum(seqs)).tolist() if share else np.concatenate([pr[i] + s for s in seqs]).tolist()
            sims.append(_packed_rows(units, toks, row_len))
        rows = max(n for n, _ in sims)
        out["expected_tokens_per_row"] = float(np.mean([t for _, t in sims]))
        out["rows_mean"] = float(np.mean([n for n, _ in sims]))
    elif pack and lengths is not None:
        unit = out["real_tokens_per_pair"] / (1 if share else g)
        per_row = max(unit, row_len - unit / 2)
        from alignshift.data.packing import row_counts

        need = math.ceil(units * unit / per_row)
        rows = next(n for n in row_counts(units) if n >= need)
        out["expected_tokens_per_row"] = per_row
    out["rows"] = rows
    out["tokens"] = rows * row_len
    out["computed_tokens_per_pair"] = out["tokens"] / pairs
    if share or pack:  # the LM head on the response slots only
        w = min(C, cfg.train.logits_chunk) if cfg.train.logits_chunk > 0 else C
        out["logit_positions"] = pairs * g * w
    else:  # WDPO's embedding path always takes full logits
        t_logits = row_len
        if cfg.train.logits_on_responses and not flags["wdpo"]:
            t_logits = min(row_len, C)
        if cfg.train.logits_chunk > 0 and not flags["wdpo"]:
            t_logits = min(t_logits, cfg.train.logits_chunk)
        out["logit_positions"] = rows * t_logits
    return out


def _pass_bytes(cfg: ExperimentConfig, desc: dict, tp: int, lay: dict, *, backward: bool,
                fused_attention: bool) -> dict:
    """Activation bytes of one pass over ``lay``'s rows on one device: float32 logits and
    log-softmax of the LM-head positions (vocabulary split over ``tensor``); per layer either the
    remat checkpoint (the layer's input) or every intermediate kept for the backward pass; one
    layer's working set (its intermediates, the attention scores and probabilities in float32
    unless ``fused_attention``: then only the softmax statistics). A forward-only pass
    (``backward=False``: the reference, a validation batch, the forward-only pass of a
    batch-coupled rule) keeps nothing per layer."""
    h, i, L = desc["hidden_size"], desc["intermediate_size"], desc["num_hidden_layers"]
    nh, v = desc["num_attention_heads"], desc["vocab_size"]
    act = jnp.dtype(DTYPES[cfg.model.dtype]).itemsize
    rows, t = lay["rows"], lay["row_len"]
    tokens = rows * t
    logits = 2 * lay["logit_positions"] * v * 4 // tp
    scores = (rows * nh * t * 4 if fused_attention else 2 * rows * nh * t * t * 4) // tp
    layer_full = tokens * (6 * h + 3 * i) * act // tp + scores
    if not backward:
        layers = layer_full
    elif cfg.model.remat:
        layers = L * tokens * h * act + layer_full
    else:
        layers = L * layer_full
    return {"logits": logits, "layers": layers, "total": logits + layers}


def _activation_bytes(cfg: ExperimentConfig, desc: dict, mesh_shape: dict, objective_flags: dict,
                      lengths: LengthProfile | None = None, fused_attention: bool = False) -> dict:
    """Peak activation bytes per device: the largest of the training micro-batch's forward +
    backward (twice that under WDPO's double back-propagation), the validation batch's forward
    (IW-DPO: once per step, features only; added to the training pass without accumulation,
    where it runs inside the differentiated step) and, for a batch-coupled objective under gradient
    accumulation with ``weighting_scope: global``, the forward-only pass (one micro-batch at a
    time; what it keeps is a few float32 numbers per example, counted in ``coupled_outputs``)."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    tp = mesh_shape["tensor"]
    k = cfg.train.grad_accum_steps
    b = math.ceil(cfg.train.batch_size / (dp * k))
    lay = _layout(cfg, b, objective_flags, lengths)
    train = _pass_bytes(cfg, desc, tp, lay, backward=True, fused_attention=fused_attention)
    mult = 2 if objective_flags["wdpo"] else 1
    out = {"micro_batch_pairs_per_device": b, "grad_accum_steps": k, "pairs_per_device": b * k,
           "sequences_per_device": b * lay["candidates"],
           "seq_len": lay["row_len"], "layout": lay, "fused_attention": fused_attention,
           "logits": train["logits"] * mult, "layers": train["layers"] * mult, "train_pass": train["total"] * mult}
    candidates = [out["train_pass"]]
    if objective_flags["val"]:
        vb = math.ceil(cfg.train.val_batch_size / dp)
        val = _pass_bytes(cfg, desc, tp, _layout(cfg, vb, objective_flags, lengths), backward=False,
                          fused_attention=fused_attention)
        out["validation_pass"] = val["total"]
        if k == 1:  # inside the differentiated step: XLA may run it while the policy's activations live
            candidates[0] += val["total"]
        else:  # accumulation runs it before the micro-batch scan
            candidates.append(val["total"])
    coupled = objective_flags["coupled"] and k > 1 and cfg.train.weighting_scope == "global"
    out["coupled_forward_pass"] = coupled
    # per-example outputs of the whole per-device batch (log-probs, token counts, WPO terms,
    # penalties: < 16 float32 each) and their cotangents
    out["coupled_outputs"] = 2 * 16 * 4 * b * k if coupled else 0
    if coupled:
        fwd = _pass_bytes(cfg, desc, tp, lay, backward=False, fused_attention=fused_attention)
        out["coupled_pass"] = fwd["total"]
        candidates.append(fwd["total"])
    out["total"] = max(candidates) + out["coupled_outputs"]
    return out


def _gather_bytes(all_params, mesh_shape: dict, *, lora: bool) -> dict:
    """Buffers of the FSDP all-gathers on one device: a layer's weights are gathered whole
    (divided over ``tensor`` only) before it runs, the next layer's while it runs, and in full
    fine-tuning its whole gradient exists before the reduce-scatter; the LM head (or any other
    non-layer matrix) likewise, once (+ its gradient). The peak is the larger of the two
    moments. 0 without ``fsdp`` sharding."""
    from alignshift.parallel.rules import param_path

    if mesh_shape["fsdp"] <= 1:
        return {"layer": 0, "other": 0, "total": 0}
    tp = mesh_shape["tensor"]
    layers: dict[str, int] = {}
    other = 0
    for kp, x in jax.tree_util.tree_leaves_with_path(all_params):
        nb = _nbytes(tuple(x.shape), x.dtype) // tp
        m = re.search(r"/(\d+)/", param_path(kp))
        if m:
            layers[m.group(1)] = layers.get(m.group(1), 0) + nb
        else:
            other = max(other, nb)
    layer = max(layers.values(), default=0)
    grads = 0 if lora else 1
    out = {"layer": layer, "other": other}
    out["total"] = max((2 + grads) * layer, (1 + grads) * other)
    return out


def _batch_coupled(objective) -> bool:
    """Whether gradient accumulation needs the whole batch's losses before any backward pass
    (:func:`alignshift.train.accumulate.sum_decomposable` is False)."""
    from alignshift.train.accumulate import sum_decomposable

    return not sum_decomposable(objective)


def dry_run(cfg: ExperimentConfig, *, devices: int | None = None, trace_step: bool = False,
            out: Callable[[str], Any] | None = print, lengths: LengthProfile | None = None,
            fused_attention: bool = False) -> dict:
    """Plan ``cfg`` on its mesh with abstract shapes; returns the report (and prints it).

    ``lengths``: the data's token counts (packing: rows from the expected tokens per row);
    ``fused_attention``: plan for a fused attention kernel (cuDNN on GPU: no ``[T, T]`` scores
    in memory) instead of XLA's materialised float32 scores and probabilities."""
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
             "wdpo": any(m.penalty == "wdpo" for m in cfg.methods),
             "coupled": any(_batch_coupled(o) for o in objectives)}

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
    k = cfg.train.grad_accum_steps
    if cfg.train.batch_size % (dp * k):
        raise ConfigError(f"config key 'train.batch_size' = {cfg.train.batch_size} is not divisible by the mesh's "
                          f"data*fsdp = {dp} times 'train.grad_accum_steps' = {k}: every device's micro-batches "
                          "are equal")

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
    acts = _activation_bytes(cfg, desc, mesh_shape, flags, lengths, fused_attention)
    # k > 1: the micro-batch's gradient (parameters' dtype) + a float32 accumulator of the sum
    accum_dev = 0
    if k > 1:
        f32 = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, ACCUM_DTYPE), state["params"])
        accum_dev = _per_device_bytes(f32, s_sh["params"])
    gather = _gather_bytes(all_params, mesh_shape, lora=cfg.model.lora.enabled)
    per_dev = {"params": params_dev, "grads": params_dev, "grad_accum": accum_dev, "opt_state": opt_dev,
               "frozen": frozen_dev, "fsdp_buffers": gather["total"], "activations": acts["total"]}
    per_dev["total"] = sum(per_dev.values())
    n_total, n_train = _count(all_params), _count(params)
    plan = _plan(all_params, mesh)

    report = {
        "model": desc, "n_params": n_total, "n_trainable": n_train, "mesh": mesh_shape, "devices": n_dev,
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "lora": cfg.model.lora.enabled,
        "per_device_bytes": per_dev, "per_device_gib": {k: v / GiB for k, v in per_dev.items()},
        "activation_detail": acts, "fsdp_gather": gather, "frozen": frozen_what, "lengths": lengths.source if lengths else None,
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
    lay = acts["layout"]
    say(f"  mesh: {n_dev} devices as data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]}"
        f"  (batch {cfg.train.batch_size} pairs = {k} micro-batch(es) of {acts['micro_batch_pairs_per_device']} "
        f"pairs/device, seq {acts['seq_len']})")
    say(f"  layout: {lay['layout']}: {lay['rows']} row(s) x {lay['row_len']} tokens per device and micro-batch "
        f"= {lay['computed_tokens_per_pair']:.0f} tokens computed per pair"
        + (f" (data: {lay['real_tokens_per_pair']:.0f} tokens per pair)" if "real_tokens_per_pair" in lay else "")
        + (f"; {lay['expected_tokens_per_row']:.0f} expected tokens per packed row" if "expected_tokens_per_row" in lay
           else "") + f"; LM head on {lay['logit_positions']} position(s) at a time")
    say("  per-device memory (GiB): " + "  ".join(f"{k_} {g[k_]:.2f}" for k_ in
                                                  ("params", "grads", "grad_accum", "opt_state", "frozen",
                                                   "fsdp_buffers", "activations"))
        + f"  => total {g['total']:.2f}")
    say(f"    frozen = {frozen_what}; activations = rough upper bound (logits {acts['logits'] / GiB:.2f}, "
        f"layers {acts['layers'] / GiB:.2f}; attention {'fused' if fused_attention else 'materialised float32'})")
    if acts["coupled_forward_pass"]:
        say(f"    batch-coupled objective, weighting_scope global: + a forward-only pass over the {k} micro-batches "
            f"(peak {acts['coupled_pass'] / GiB:.2f} GiB, below the training pass; keeps "
            f"{acts['coupled_outputs']:,} bytes of per-example outputs) = one more policy forward per step")
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
                trace_step: bool = False, json_out: str | None = None, lengths: str | None = None,
                fused_attention: bool = False) -> int:
    """Command-line entry (``--dry-run`` of the experiment scripts): 0 on success, 2 on a
    config error (printed)."""
    try:
        profile = LengthProfile.parse(lengths) if lengths else None
        cfg, dropped = load_plan_config(path, overrides, quick=quick)
        if dropped:
            print(f"(dry run: script-specific config sections not planned: {dropped})")
        rep = dry_run(cfg, devices=devices, trace_step=trace_step, lengths=profile, fused_attention=fused_attention)
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
    p.add_argument("--lengths", default=None, help="the data's token counts for packing: a JSON file of per-row "
                   "counts {prompt, chosen, rejected} (benchmarks/count_hh_lengths.py --json) or 'P,C,R' means")
    p.add_argument("--fused-attention", action="store_true", help="plan for a fused attention kernel (GPU, bf16: "
                   "no [T, T] scores in memory) instead of materialised float32 scores")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--quick", action="store_true", help="apply the config's --quick overrides first")
    add_skip_bad_rows(p)
    args = p.parse_args(argv)
    overrides = list(args.overrides) + (["data.skip_bad_rows=true"] if args.skip_bad_rows else [])
    return run_dry_run(args.config, overrides, quick=args.quick, devices=args.devices,
                       trace_step=args.trace_step, json_out=args.json, lengths=args.lengths,
                       fused_attention=args.fused_attention)


if __name__ == "__main__":
    sys.exit(run_main(main))
