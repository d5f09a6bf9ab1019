"""Time per step of gradient accumulation (``train.grad_accum_steps``) vs one whole-batch step.

The same batch of ``--batch`` pairs is stepped as ``k`` micro-batches for each ``k`` in
``--grad-accum``, for a sum-decomposable objective (DPO: one pass) and a batch-coupled rule
(KLDPO's tilt, ``weighting_scope: global``: a forward-only pass first, then the backward passes).
Steps are A/B interleaved (one step of each configuration per round, ``--rounds`` rounds after a
compile-and-warm-up step) and the median is reported, with the ratio to ``k = 1``; the peak
memory of each compiled step (XLA's ``memory_analysis``: arguments + outputs + temporaries −
aliased) is printed beside it.

    python benchmarks/grad_accum.py                      # small Llama on the CPU
    python benchmarks/grad_accum.py --hidden 1024 --layers 8 --seq-len 512 --batch 32
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.config import OptimConfig
from alignshift.forward import split_model
from alignshift.losses import make_objective
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.train.optim import make_optimizer
from alignshift.train.steps import init_state, make_preference_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="pairs per step (the effective batch)")
    p.add_argument("--grad-accum", default="1,2,4")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=max(2048, a.seq_len))
    graphdef, params, rest = split_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {}
    for g in ("chosen", "rejected"):
        batch[f"{g}_input_ids"] = jnp.asarray(rng.integers(1, a.vocab, (a.batch, a.seq_len)), jnp.int32)
        batch[f"{g}_attention_mask"] = jnp.ones((a.batch, a.seq_len), jnp.int32)
        batch[f"{g}_loss_mask"] = jnp.asarray(np.arange(a.seq_len)[None].repeat(a.batch, 0) >= a.seq_len // 2, jnp.int32)
        batch[f"reference_{g}_logps"] = jnp.asarray(rng.normal(-a.seq_len, 1.0, a.batch), jnp.float32)
    tx = make_optimizer(OptimConfig(lr=1e-6, warmup_steps=0), 1000)
    ks = [int(k) for k in a.grad_accum.split(",")]
    configs = []
    for name, weighting, kw in (("dpo", "uniform", {}), ("kldpo", "kl_dro", {"tau": 1.0})):
        obj = make_objective("dpo", weighting, weighting_kwargs=kw)
        for k in ks:
            step = make_preference_step(graphdef, rest, tx, obj, grad_accum_steps=k)
            state = init_state(jax.tree_util.tree_map(jnp.copy, params), tx)
            ma = step.lower(state, batch).compile().memory_analysis()
            peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
            state, m = step(state, batch)  # compile + warm up
            jax.block_until_ready(m["loss"])
            configs.append({"name": name, "k": k, "step": step, "state": state, "times": [], "peak": peak})
    for _ in range(a.rounds):  # A/B interleaved
        for c in configs:
            t0 = time.perf_counter()
            c["state"], m = c["step"](c["state"], batch)
            jax.block_until_ready(m["loss"])
            c["times"].append(time.perf_counter() - t0)
    print(f"backend {jax.default_backend()} ({jax.device_count()} devices): Llama hidden={a.hidden} layers={a.layers} "
          f"vocab={a.vocab}; {a.batch} pairs x {a.seq_len} tokens per step; {a.rounds} interleaved rounds, median")
    print(f"{'objective':<8} {'k':>3} {'s/step':>8} {'vs k=1':>7} {'peak MiB':>9}")
    for c in configs:
        base = next(x for x in configs if x["name"] == c["name"] and x["k"] == ks[0])
        t, t0 = np.median(c["times"]), np.median(base["times"])
        print(f"{c['name']:<8} {c['k']:>3} {t:8.3f} {t / t0:7.2f} {c['peak'] / 2 ** 20:9.1f}")


if __name__ == "__main__":
    main()
