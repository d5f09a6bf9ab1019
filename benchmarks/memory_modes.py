"""Memory of one DPO step in three modes, from XLA's own accounting (no weights are allocated).

    full+ref     full fine-tuning; a second full copy of the weights is the frozen reference
                 (reference forward inside the step)
    precomputed  full fine-tuning; reference log-probs precomputed (``train.precompute_reference``
                 or the on-disk cache) and fed in the batch
    lora         LoRA adapters only in the optimiser; the reference is the same graph with the
                 adapters zeroed (no second copy); the frozen base enters the step as ``frozen=``

Each step (``alignshift.train.steps.make_preference_step``, AdamW) is lowered with abstract
shapes (``jax.ShapeDtypeStruct``) and compiled for the local backend; XLA's
``compiled.memory_analysis()`` gives argument / output / temporary / aliased bytes. The peak
estimate is ``arguments + outputs + temporaries − aliased`` (the donated state's buffers are
reused for the new state). On the CPU backend temporaries follow XLA:CPU's buffer assignment,
close to but not the same as a GPU's; run it on a GPU for device figures.

    python benchmarks/memory_modes.py          # ~1.1B Llama shape (TinyLlama-like), fp32 master weights
    python benchmarks/memory_modes.py --hidden 256 --layers 4 --heads 4 --intermediate 688 \\
        --vocab 8000 --seq-len 256 --batch 8   # the small CPU config
    python benchmarks/memory_modes.py --modes precomputed --batch 32 --grad-accum 1,2,4,8 \\
        [--weighting kl_dro]                   # peak memory vs the micro-batch count (accumulation)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.config import OptimConfig
from alignshift.losses import make_objective
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.models.lora import LoRAConfig, apply_lora, reference_params, split_lora
from alignshift.train.optim import make_optimizer
from alignshift.forward import split_model
from alignshift.train.steps import init_state, make_preference_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODES = ("full+ref", "precomputed", "lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer")
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="> 0: log-probs this many positions at a time (no [B, T, V] logits)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names (DoRA: q,v)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--grad-accum", default="1",
                   help="comma-separated micro-batch counts k (train.grad_accum_steps): one row per mode and k, "
                        "--batch pairs split into k micro-batches")
    p.add_argument("--weighting", default="uniform",
                   help="weighting rule (e.g. kl_dro: batch-coupled, so k > 1 adds a forward-only pass)")
    return p.parse_args(argv)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def _batch(B: int, T: int, with_ref: bool) -> dict:
    b = {}
    for g in ("chosen", "rejected"):
        for f in ("input_ids", "attention_mask", "loss_mask"):
            b[f"{g}_{f}"] = jax.ShapeDtypeStruct((B, T), jnp.int32)
        if with_ref:
            b[f"reference_{g}_logps"] = jax.ShapeDtypeStruct((B,), jnp.float32)
    return b


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(mode: str, a, k: int = 1) -> dict:
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(2048, a.seq_len), remat=a.remat)
    dtype, pdt = DTYPES[a.dtype], DTYPES[a.param_dtype]

    def build():
        m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pdt)
        if mode == "lora":
            apply_lora(m, LoRAConfig(rank=a.lora_rank, alpha=a.lora_alpha,
                                     targets=tuple(a.lora_targets.split(","))), rngs=nnx.Rngs(1))
        return m

    model = nnx.eval_shape(build)
    tx = make_optimizer(OptimConfig(lr=1e-5), 100)
    objective = make_objective("dpo", a.weighting)
    if mode == "lora":
        graphdef, params, rest = split_lora(model)
        ref = jax.eval_shape(reference_params, params)
        extra = (ref, None, _abstract(rest))
        frozen = rest
    else:
        graphdef, params, rest = split_model(model)
        ref = _abstract(params) if mode == "full+ref" else None
        extra = (ref,)
        frozen = None
    step = make_preference_step(graphdef, rest, tx, objective, logits_chunk=a.logits_chunk, grad_accum_steps=k)
    state = jax.eval_shape(lambda p: init_state(p, tx), _abstract(params))
    batch = _batch(a.batch, a.seq_len, with_ref=mode == "precomputed")
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, *extra).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = ma.alias_size_in_bytes
    return {
        "mode": mode,
        "k": k,
        "trainable": _nbytes(params) // jnp.dtype(pdt).itemsize,
        "weights_bytes": _nbytes(params) + (_nbytes(frozen) if frozen is not None else 0),
        "state_bytes": _nbytes(state),
        "ref_bytes": _nbytes(ref) if ref is not None else 0,
        "argument": arg, "output": out, "temp": tmp, "alias": alias,
        "peak": arg + out + tmp - alias,
        "compile_s": secs,
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    gib = 2.0 ** 30
    print(f"backend {jax.default_backend()}: Llama hidden={a.hidden} layers={a.layers} heads={a.heads}/{a.kv_heads} "
          f"ffn={a.intermediate} vocab={a.vocab}; batch {a.batch} pairs x seq {a.seq_len}; compute {a.dtype}, "
          f"params {a.param_dtype}, remat={a.remat}, logits_chunk={a.logits_chunk}; LoRA r={a.lora_rank} on {a.lora_targets}; "
          f"weighting {a.weighting}")
    rows = [measure(m, a, int(k)) for m in a.modes.split(",") for k in a.grad_accum.split(",")]
    hdr = f"{'mode':<12} {'k':>3} {'trainable':>13} {'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'alias GiB':>9} " \
          f"{'peak GiB':>9} {'vs full+ref':>11} {'compile s':>9}"
    print(hdr)
    base = next((r["peak"] for r in rows if r["mode"] == "full+ref"), rows[0]["peak"])
    for r in rows:
        print(f"{r['mode']:<12} {r['k']:>3} {r['trainable']:>13,} {r['argument'] / gib:9.2f} {r['output'] / gib:8.2f} "
              f"{r['temp'] / gib:9.2f} {r['alias'] / gib:9.2f} {r['peak'] / gib:9.2f} {r['peak'] / base:11.2f} "
              f"{r['compile_s']:9.1f}")


if __name__ == "__main__":
    main()
