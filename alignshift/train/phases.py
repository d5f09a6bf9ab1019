"""The training phases an experiment composes, in the order it runs them: build the policy
(:func:`build_policy`, :func:`add_lora`), the SFT phase (:func:`run_sft`), the reference
precompute (:func:`precompute_reference_logps`) and the preference phase of one method
(:func:`run_preference`, :func:`objective_for`, :func:`preference_iterator`). Each phase runs
its steps with :func:`alignshift.train.loop.train_loop`; the seed loop over phases and methods
is :mod:`alignshift.experiment.driver`.

Side effects (files) are limited to the ``writer`` and the checkpoint directory passed in.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.config import ExperimentConfig, MethodConfig, ModelConfig
from alignshift.data import BatchIterator, LengthBucketIterator, WordTokenizer, encode_completions
from alignshift.data.packing import PackedBatchIterator, batch_groups, packed_row_len
from alignshift.losses import Objective, make_objective
from alignshift.losses.penalties import PenaltyGradient
from alignshift.models.layers import DTYPES
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.train.checkpoint import Checkpointer
from alignshift.train.loop import train_loop
from alignshift.train.metrics import JsonlWriter
from alignshift.train.optim import make_optimizer
from alignshift.forward import batch_sequence_logps, map_batches, split_model
from alignshift.train.steps import init_state, make_preference_step, make_sft_step

__all__ = [
    "build_policy",
    "add_lora",
    "objective_for",
    "run_sft",
    "precompute_reference_logps",
    "run_preference",
    "pack_kwargs",
    "preference_iterator",
]



def build_policy(cfg: ModelConfig, tokenizer, *, seed: int, mesh=None) -> nnx.Module:
    """The policy: loaded from ``cfg.hf_path`` if set, else a freshly initialised tiny Llama
    sized for the tokenizer's vocabulary."""
    if cfg.hf_path:
        from alignshift.models.hf import load_hf_model

        model = load_hf_model(cfg.hf_path, dtype=DTYPES[cfg.dtype], mesh=mesh, remat=cfg.remat)
        n_vocab = getattr(model.config, "vocab_size", None)
        if n_vocab is not None and n_vocab < len(tokenizer):
            raise ValueError(f"model.hf_path={cfg.hf_path}: vocab_size {n_vocab} < tokenizer size {len(tokenizer)}")
        return model
    vocab = cfg.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    lcfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        remat=cfg.remat,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    return LlamaForCausalLM(lcfg, rngs=nnx.Rngs(seed), dtype=DTYPES[cfg.dtype])


def add_lora(model: nnx.Module, cfg: ModelConfig, *, seed: int):
    """Add LoRA adapters (``model.lora``) to a trained model; returns ``(graphdef, rest,
    init_params, ref_params)``: the policy trains ``init_params`` (adapters only) and the
    reference is the same graph with the adapters zeroed."""
    from alignshift.models.lora import LoRAConfig, apply_lora, reference_params, split_lora

    lcfg = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets))
    apply_lora(model, lcfg, rngs=nnx.Rngs(seed + 1))
    graphdef, lora_params, rest = split_lora(model)
    return graphdef, rest, lora_params, reference_params(lora_params)


def objective_for(m: MethodConfig) -> Objective:
    return make_objective(m.base, m.weighting, m.penalty, base_kwargs=m.base_kwargs,
                          weighting_kwargs=m.weighting_kwargs, penalty_kwargs=m.penalty_kwargs)


def run_sft(
    model: nnx.Module,
    sft_pairs: list[tuple[str, str]],
    tokenizer: WordTokenizer,
    cfg: ExperimentConfig,
    *,
    seed: int,
    writer: JsonlWriter | None = None,
    checkpoint_dir: str | None = None,
):
    """Supervised fine-tuning on (prompt, response) pairs; returns the trained params."""
    graphdef, params, rest = split_model(model)
    arrays = encode_completions(
        tokenizer,
        [p for p, _ in sft_pairs],
        [r for _, r in sft_pairs],
        max_prompt_len=cfg.data.max_prompt_len,
        max_completion_len=cfg.data.max_completion_len,
    )
    arrays = {k: arrays[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    it = BatchIterator(arrays, cfg.sft.batch_size, seed=seed)
    tx = make_optimizer(cfg.sft.optim, cfg.sft.steps)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    state, _ = train_loop(
        make_sft_step(graphdef, rest, tx, logits_chunk=cfg.train.logits_chunk, response_window=response_window(cfg)),
        init_state(params, tx),
        it,
        steps=cfg.sft.steps,
        log_every=cfg.train.log_every,
        writer=writer,
        checkpointer=ckpt,
        desc="sft",
        max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite,
    )
    if ckpt:
        ckpt.close()
    return state["params"]


def precompute_reference_logps(
    logits_fn: Callable, ref_params, arrays: dict, groups=("chosen", "rejected", "kl"), batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Reference per-sequence log-probs for every example, once: ``reference_{g}_logps [N]``."""
    fn = jax.jit(lambda p, i, a, m: batch_sequence_logps(logits_fn, p, i, a, m)[0])
    out = {}
    for g in groups:
        if f"{g}_input_ids" not in arrays:
            continue
        cols = [arrays[f"{g}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")]
        logps = map_batches(lambda p, b: fn(p, *b), cols, batch_size=batch_size, args=(ref_params,))
        out[f"reference_{g}_logps"] = logps.astype(np.float32)
    return out


def response_window(cfg) -> int:
    """The LM-head window of ``train.logits_on_responses`` (``data.max_completion_len``; 0 = off)."""
    return cfg.data.max_completion_len if cfg.train.logits_on_responses else 0


def pack_kwargs(cfg: ExperimentConfig, arrays: dict, *, micro_batches: int | None = None) -> dict | None:
    """:func:`alignshift.data.packing.pack_batch`'s settings for ``train.packing`` /
    ``train.share_prompt`` (None when both are off): rows of the arrays' width ``T`` (packing), or
    ``T + (n - 1) · data.max_completion_len`` with a shared prompt (one whole group of ``n``
    responses per row at most), ``data.max_completion_len`` response slots per sequence,
    ``micro_batches`` = ``train.grad_accum_steps`` by default, and the automatic row count
    (:func:`alignshift.data.packing.row_counts`: at most 8 batch shapes per run)."""
    t = cfg.train
    if not (t.packing or t.share_prompt):
        return None
    groups = batch_groups(arrays)
    width = arrays[f"{groups[0]}_input_ids"].shape[-1]
    n = arrays["cand_input_ids"].shape[1] if groups == ("cand",) else len(groups)
    C = cfg.data.max_completion_len
    row_len = packed_row_len(width - C, C, n_responses=n, share_prompt=t.share_prompt)
    return {"row_len": row_len, "target_len": C, "share_prompt": bool(t.share_prompt), "packing": bool(t.packing),
            "micro_batches": int(t.grad_accum_steps if micro_batches is None else micro_batches)}


def preference_iterator(arrays: dict, batch_size: int, *, seed: int, length_bucket: int = 0,
                        pack: dict | None = None) -> BatchIterator:
    """The preference phase's training iterator: a plain :class:`BatchIterator`, or with
    ``length_bucket > 0`` (``train.length_bucket``) a :class:`LengthBucketIterator` that batches
    similar lengths and trims each batch's padding to a multiple of ``length_bucket`` tokens, or
    with ``pack`` (:func:`pack_kwargs`) a :class:`~alignshift.data.packing.PackedBatchIterator`
    whose batches come out packed on the host. All orders are pure functions of ``(seed, step)``,
    so checkpoint resume is exact. Only the sequence axis shrinks (the batch axis is unchanged, so
    data-parallel splits still hold); each distinct width is one more compilation of the step."""
    if pack is not None:
        if length_bucket > 0:
            raise ValueError("train.length_bucket and train.packing/share_prompt do not combine: packing already "
                             "removes the padding (set train.length_bucket=0)")
        return PackedBatchIterator(arrays, batch_size, seed=seed, pack_kwargs=pack)
    if length_bucket <= 0:
        return BatchIterator(arrays, batch_size, seed=seed)
    listwise = sorted(k for k, v in arrays.items() if k.startswith("cand_") or np.ndim(v) > 2)
    if listwise:
        raise ValueError(f"train.length_bucket={length_bucket} needs pairwise [N, T] arrays, but the training "
                         f"arrays include {listwise} (listwise layout); set train.length_bucket=0")
    return LengthBucketIterator(arrays, batch_size, seed=seed, bucket=int(length_bucket))


def run_preference(
    graphdef,
    rest,
    ref_params,
    train_arrays: dict,
    method: MethodConfig,
    cfg: ExperimentConfig,
    *,
    seed: int,
    writer: JsonlWriter | None = None,
    checkpoint_dir: str | None = None,
    eval_fn: Callable | None = None,
    val_arrays: dict | None = None,
    init_params=None,
):
    """Train one preference method starting from ``init_params`` (default: the reference params;
    with LoRA, the fresh adapters while the reference is the zeroed adapters); returns final params
    and the logged history. With ``train.precompute_reference`` the reference log-probs are
    computed once (and must already be in ``train_arrays``/``val_arrays``); otherwise the
    frozen reference runs inside every step. Rules that need a deployment/validation batch
    draw one per step from ``val_arrays`` (own iterator, ``train.val_batch_size``)."""
    objective = objective_for(method)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    # ``rest`` goes in as an argument, not a constant baked into the compiled step: under LoRA
    # it holds the frozen base weights (shardable, and never copied into the executable).
    step = make_preference_step(graphdef, rest, tx, objective, logits_chunk=cfg.train.logits_chunk,
                                response_window=response_window(cfg),
                                penalty_gradient=PenaltyGradient.from_dict(method.penalty_gradient),
                                grad_accum_steps=cfg.train.grad_accum_steps, weighting_scope=cfg.train.weighting_scope)
    step_fn = functools.partial(step, frozen=rest)
    keep = [k for k in train_arrays if not k.startswith("prompt_")]
    if "kl_completions" not in objective.requires:
        keep = [k for k in keep if not k.startswith(("kl_", "reference_kl"))]
    if cfg.train.precompute_reference:
        missing = [k for k in ("reference_chosen_logps", "reference_rejected_logps") if k not in train_arrays]
        if "reference" in objective.requires and missing:
            raise ValueError(f"precompute_reference=True but train arrays lack {missing}")
        step_args = (None,)
    else:
        keep = [k for k in keep if not k.startswith("reference_")]
        step_args = (ref_params,)
    train_arrays = {k: train_arrays[k] for k in keep}
    pack = pack_kwargs(cfg, train_arrays)
    if pack is not None and objective.penalty is not None:
        raise ValueError(f"method {method.name!r}: penalty {objective.penalty!r} runs through the input embeddings "
                         "of padded sequences and does not support train.packing/share_prompt")
    it = preference_iterator(train_arrays, cfg.train.batch_size, seed=seed,
                             length_bucket=cfg.train.length_bucket, pack=pack)
    val_it = None
    if "val_batch" in objective.requires:
        if val_arrays is None:
            raise ValueError(f"method {method.name!r}: weighting {method.weighting!r} needs validation arrays")
        n_val = val_arrays["chosen_input_ids"].shape[0]
        val_keep = {k: val_arrays[k] for k in keep if k in val_arrays}
        # the validation batch goes through the step whole (never split into micro-batches)
        val_it = preference_iterator(val_keep, min(cfg.train.val_batch_size, n_val), seed=seed + 7919,
                                     pack=None if pack is None else pack_kwargs(cfg, val_keep, micro_batches=1))
    # Start from a copy (of the reference by default): the step donates its state buffers.
    params0 = jax.tree_util.tree_map(jnp.copy, ref_params if init_params is None else init_params)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    try:
        state, history = train_loop(
            step_fn,
            init_state(params0, tx),
            it,
            steps=cfg.train.steps,
            log_every=cfg.train.log_every,
            writer=writer,
            step_args=step_args,
            checkpointer=ckpt,
            checkpoint_every=cfg.train.checkpoint_every,
            eval_fn=eval_fn,
            eval_every=cfg.train.eval_every,
            val_iterator=val_it,
            desc=method.name,
            max_consecutive_nonfinite=cfg.train.max_consecutive_nonfinite,
        )
    finally:
        if ckpt:
            ckpt.close()
    return state["params"], history
