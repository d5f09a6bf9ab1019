"""CPU time of the one attention function (``alignshift.models.layers.attention``) against the float32
einsum path it replaced (the old ``grouped_query_attention``, copied here verbatim), forward +
backward, jitted, A/B interleaved over several rounds; fp32 and bf16.

Prints per-call milliseconds of the old path, of ``attention(implementation="auto")`` (what every
model calls; on a CPU the float32 einsum path) and, for reference, of
``jax.nn.dot_product_attention``'s XLA implementation with the same mask, and the new/old ratio
(median over rounds of the per-round ratio).

    python benchmarks/attention_cpu.py [--rounds 5] [--calls 10] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignshift.models.layers import MASK_VALUE, attention, causal_padding_mask, segment_mask

# (name, B, T, H, KV, D, layout, soft-cap)
SHAPES = [
    ("mha padded (GPT-2/NeoX)", 8, 128, 8, 8, 64, "padded", None),
    ("gqa padded (Llama)", 8, 256, 8, 2, 64, "padded", None),
    ("gqa packed shared-prompt", 4, 512, 8, 2, 64, "shared", None),
    ("gqa padded soft-cap (Gemma 2)", 8, 256, 8, 4, 32, "padded", 50.0),
]


def old_grouped_query_attention(q, k, v, mask, scale, dtype, logit_cap=None):
    """layers.grouped_query_attention before the merge (verbatim)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    q = q.astype(dtype).reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
    scores = scores * scale if logit_cap is None else jnp.tanh(scores * scale / logit_cap) * logit_cap
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores.astype(jnp.float32), MASK_VALUE), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype))
    return out.reshape(B, T, H * D)


def old_dot_product_attention(q, k, v, mask, scale, dtype, logit_cap=None):
    """layers.dot_product_attention (multi-head) before the merge (verbatim)."""
    B, T, H, D = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores.astype(jnp.float32), MASK_VALUE), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(dtype), v.astype(dtype))
    return out.reshape(B, T, H * D)


def make_mask(layout, B, T, rng):
    if layout == "padded":
        lengths = rng.integers(T // 2, T + 1, size=B)
        return causal_padding_mask(jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.int32))
    # packed rows of [prompt | chosen | rejected] groups of ~T/3 tokens
    seg, br, pos = (np.zeros((B, T), np.int32) for _ in range(3))
    for b in range(B):
        a, s = 0, 1
        while a < T - 8:
            p, c, r = (int(x) for x in rng.integers(2, T // 8, size=3))
            n = min(p + c + r, T - a)
            seg[b, a:a + n] = s
            br[b, a + p:a + p + c], br[b, a + p + c:a + n] = 1, 2
            pos[b, a:a + n] = np.concatenate([np.arange(p + c), p + np.arange(r)])[:n]
            a, s = a + n, s + 1
    return segment_mask(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(br))


def fwd_bwd(fn, dtype, cap):
    def loss(q, k, v, mask):
        return jnp.sum(fn(q, k, v, mask, 0.125, dtype, cap).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_calls(f, args, n):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 3 calls, the first two shapes")
    a = ap.parse_args()
    rounds, calls, shapes = (2, 3, SHAPES[:2]) if a.quick else (a.rounds, a.calls, SHAPES)
    print(f"device={jax.devices()[0].platform} jax={jax.__version__}; forward+backward, jitted; "
          f"median ms/call over {rounds} interleaved rounds x {calls} calls")
    print(f"{'shape':32s} {'dtype':8s} {'old':>8s} {'new':>8s} {'jax.nn':>8s} {'new/old':>8s}")
    rng = np.random.default_rng(0)
    for name, B, T, H, KV, D, layout, cap in shapes:
        mask = make_mask(layout, B, T, rng)
        for dtype in (jnp.float32, jnp.bfloat16):
            q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in ((B, T, H, D), (B, T, KV, D), (B, T, KV, D)))
            old = old_dot_product_attention if (KV == H and cap is None) else old_grouped_query_attention

            def new(q, k, v, mask, scale, dtype, cap):
                return attention(q, k, v, mask, causal=True, scale=scale, dtype=dtype, logit_cap=cap)

            def jnn(q, k, v, mask, scale, dtype, cap):
                return attention(q, k, v, mask, causal=True, scale=scale, dtype=dtype, implementation="jax")

            fns = {"old": fwd_bwd(old, dtype, cap), "new": fwd_bwd(new, dtype, cap)}
            if cap is None:
                fns["jax.nn"] = fwd_bwd(jnn, dtype, cap)
            times = {key: [] for key in fns}
            for _ in range(rounds):
                for key, f in fns.items():  # A/B(/C) interleaved within each round
                    times[key].append(time_calls(f, (q, k, v, mask), calls))
            med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
            jn = f"{med['jax.nn']:8.2f}" if "jax.nn" in med else f"{'-':>8s}"
            print(f"{name:32s} {jnp.dtype(dtype).name:8s} {med['old']:8.2f} {med['new']:8.2f} {jn} {ratio:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
