"""Throughput of the sharded, jitted DPO step on a Llama of any size (random weights and tokens).

Times ``make_preference_step`` (policy forward + backward on chosen and rejected, the frozen
reference forward inside the step, AdamW update) jitted over a ``("data", "fsdp", "tensor")``
mesh with the shardings of :mod:`alignshift.parallel`. Weights are initialised directly in
their shardings (no host copy of the full model). Prints step time, tokens/s, model FLOP
utilisation and peak device memory.

FLOPs per step use the usual dense-transformer approximation
``6·N·tokens`` (policy fwd+bwd) ``+ 2·N·tokens`` (reference fwd; omitted with
``--precomputed-ref``), where ``tokens = 2·batch·seq_len`` (chosen + rejected) and ``N`` is
the parameter count of the matmuls (all parameters except the input embedding, which is a
gather; with tied embeddings it is counted once, as the LM head). Attention-score FLOPs are
not in that figure; a second MFU line adds them (``4·L·T·H·head_dim`` per token and forward,
causal mask not discounted). MFU = FLOPs / step time / (peak × devices), with the peak
from ``--peak-tflops`` or, by device kind, the dense bf16 tensor-core figure (H100 / H200
SXM: 989 TFLOP/s). On CPU, MFU is not reported unless ``--peak-tflops`` is given.

    python benchmarks/step_throughput.py --hidden 64 --layers 2 --heads 4 --vocab 512 \\
        --seq-len 64 --batch 8 --steps 5                                    # CPU smoke run
    python benchmarks/step_throughput.py --hidden 4096 --layers 32 --heads 32 --kv-heads 8 \\
        --intermediate 14336 --vocab 128256 --seq-len 2048 --batch 8 --dtype bfloat16 \\
        --mesh -1,8,1 --remat                                               # Llama-3-8B shape

Simulate devices on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.config import OptimConfig
from alignshift.losses import make_objective
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.parallel import (
    make_mesh,
    make_sharded_step,
    param_shardings,
    replicated,
    shard_batch,
    state_shardings,
)
from alignshift.train.optim import make_optimizer
from alignshift.forward import batch_sequence_logps, make_logits_fn, split_model
from alignshift.train.steps import init_state, make_preference_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per device
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v6", 918.0),
    ("TPU v4", 275.0),
)


def default_peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "") or ""
    for name, tf in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tf
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads (MHA)")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden // heads")
    p.add_argument("--intermediate", type=int, default=None, help="default: 4 * hidden")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step (global)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (-1 = the rest)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer")
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--precomputed-ref", action="store_true",
                   help="reference log-probs in the batch instead of a reference forward in the step")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default by device kind: H100/H200 989 bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def matmul_params(params, tied: bool) -> int:
    n = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "embed_tokens" in name and not tied:
            continue
        n += int(np.prod(x.shape))
    return n


def random_batch(rng: np.random.Generator, B: int, T: int, vocab: int, with_ref: bool) -> dict:
    batch = {}
    prompt = T // 2
    for g in ("chosen", "rejected"):
        batch[f"{g}_input_ids"] = rng.integers(3, vocab, size=(B, T), dtype=np.int32)
        batch[f"{g}_attention_mask"] = np.ones((B, T), np.int32)
        lm = np.zeros((B, T), np.int32)
        lm[:, prompt:] = 1
        batch[f"{g}_loss_mask"] = lm
        if with_ref:
            batch[f"reference_{g}_logps"] = rng.normal(-T, 1.0, size=(B,)).astype(np.float32)
    return batch


def reference_outside_grad(step_fn, graphdef, rest):
    """``step(state, batch, ref_params)`` that runs the reference forward in the same jitted
    step but before ``value_and_grad`` and hands the library step precomputed log-probs.
    Same FLOPs as the library's in-step reference; needed with ``--remat`` because nnx.remat
    inside ``value_and_grad`` on the (non-differentiated) reference params raises
    ``TraceContextError`` in ``make_preference_step``."""
    inner = getattr(step_fn, "__wrapped__", step_fn)
    logits_fn = make_logits_fn(graphdef, rest)

    def step(state, batch, ref_params):
        cat = lambda f: jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]], axis=0)
        s, _ = batch_sequence_logps(logits_fn, ref_params, cat("input_ids"), cat("attention_mask"),
                                    cat("loss_mask"))
        B = batch["chosen_input_ids"].shape[0]
        s = jax.lax.stop_gradient(s)
        return inner(state, {**batch, "reference_chosen_logps": s[:B], "reference_rejected_logps": s[B:]})

    return step


def main(argv=None):
    a = parse_args(argv)
    mesh_shape = [int(s) for s in a.mesh.split(",")]
    if len(mesh_shape) != 3:
        raise SystemExit(f"--mesh wants data,fsdp,tensor; got {a.mesh!r}")
    mesh = make_mesh(*mesh_shape)
    dev = jax.devices()[0]

    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or 4 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, tie_word_embeddings=a.tie_embeddings, remat=a.remat,
        max_position_embeddings=max(2048, a.seq_len), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    dtype, param_dtype = DTYPES[a.dtype], DTYPES[a.param_dtype]

    def build():
        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(a.seed), dtype=dtype, param_dtype=param_dtype)
        _, params, rest = split_model(model)
        return params, rest

    # initialise directly in the target shardings (no full host copy of the model)
    graphdef, abs_params, _ = split_model(nnx.eval_shape(
        lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(a.seed), dtype=dtype, param_dtype=param_dtype)))
    p_sh = param_shardings(abs_params, mesh)
    init = jax.jit(build, out_shardings=(p_sh, replicated(mesh)))
    t0 = time.perf_counter()
    params, rest = init()
    ref_params = None if a.precomputed_ref else init()[0]  # same seed: policy == reference at step 0

    tx = make_optimizer(OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0), 10_000)
    s_sh = state_shardings(jax.eval_shape(lambda p: init_state(p, tx), params), mesh)
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=s_sh, donate_argnums=0)(params)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0

    step = make_preference_step(graphdef, rest, tx, make_objective("dpo"))
    if a.remat and not a.precomputed_ref:
        step = reference_outside_grad(step, graphdef, rest)
    rng = np.random.default_rng(a.seed)
    batch = shard_batch(random_batch(rng, a.batch, a.seq_len, a.vocab, a.precomputed_ref), mesh)
    extra = (ref_params,)
    sstep = make_sharded_step(step, state, batch, mesh, *extra)

    t0 = time.perf_counter()
    compiled = sstep.lower(state, batch, *extra).compile()
    t_compile = time.perf_counter() - t0
    for _ in range(a.warmup):
        state, m = compiled(state, batch, *extra)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, *extra)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    loss = float(m["loss"])

    # ---------------------------------------------------------------- report
    n_dev = mesh.devices.size
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abs_params))
    n_mm = matmul_params(abs_params, a.tie_embeddings)
    tokens = 2 * a.batch * a.seq_len  # chosen + rejected
    passes = 6 + (0 if a.precomputed_ref else 2)  # policy fwd+bwd (+ reference fwd)
    flops = passes * n_mm * tokens
    hd = cfg.head_dim * cfg.num_attention_heads
    attn_fwd = 4 * cfg.num_hidden_layers * a.seq_len * hd * tokens
    flops_attn = flops + attn_fwd * (3 + (0 if a.precomputed_ref else 1))
    med, mean = statistics.median(times), statistics.fmean(times)
    peak = a.peak_tflops if a.peak_tflops is not None else default_peak_tflops(dev)

    print(f"device      : {n_dev} x {dev.platform} ({getattr(dev, 'device_kind', '?')}), "
          f"mesh {dict(mesh.shape)}")
    print(f"model       : Llama d={cfg.hidden_size} L={cfg.num_hidden_layers} H={cfg.num_attention_heads} "
          f"KV={cfg.num_key_value_heads} hd={cfg.head_dim} ff={cfg.intermediate_size} V={cfg.vocab_size} "
          f"dtype={a.dtype} params={a.param_dtype} remat={a.remat}")
    print(f"params      : {n_total / 1e6:.2f} M total, {n_mm / 1e6:.2f} M in matmuls (N)")
    print(f"batch       : {a.batch} pairs x {a.seq_len} tokens = {tokens} tokens/step "
          f"({'precomputed reference' if a.precomputed_ref else 'reference forward in the step'}"
          f"{' (before the grad: remat workaround)' if a.remat and not a.precomputed_ref else ''})")
    print(f"init        : {t_init:.2f} s   compile: {t_compile:.2f} s   final loss: {loss:.4f}")
    print(f"step time   : {med * 1e3:.2f} ms median, {mean * 1e3:.2f} ms mean over {a.steps} steps")
    print(f"throughput  : {tokens / med:,.0f} tokens/s ({tokens / med / n_dev:,.0f} per device)")
    print(f"model FLOPs : {flops / 1e12:.4f} TFLOP/step ({passes}·N·tokens) = {flops / med / 1e12:.3f} TFLOP/s")
    if peak:
        print(f"MFU         : {100 * flops / med / (peak * 1e12 * n_dev):.2f} % of {peak:g} TFLOP/s x {n_dev}"
              f"   (with attention FLOPs: {100 * flops_attn / med / (peak * 1e12 * n_dev):.2f} %)")
    else:
        print("MFU         : n/a (unknown peak for this device; pass --peak-tflops)")
    peaks = []
    for d in mesh.devices.flat:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    if peaks:
        print(f"peak memory : {max(peaks) / 2**30:.3f} GiB (max over devices; "
              f"limit {stats.get('bytes_limit', 0) / 2**30:.1f} GiB)")
    else:
        print("peak memory : n/a (device.memory_stats() not available on this platform)")


if __name__ == "__main__":
    main()
