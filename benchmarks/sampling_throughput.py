"""Decoder throughput (tokens/s), KV-cached vs uncached, and the FLR prefix-reuse speedup.

Sampling: the demo config's model (``experiments/configs/shift_demo.yaml``: tiny Llama sized
for the ShiftBench vocabulary), random weights, ``eos_id=None`` so every row generates all
``max_new_tokens`` tokens; left-padded prompts of ``--prompt-len`` tokens. Each setting is
compiled once, then timed ``--repeats`` times (median); cached and uncached runs are
interleaved so drift on a shared machine hits both alike. tokens/s = batch × new tokens / s.

FLR scoring: ``followup_scores`` on ``--flr-contexts`` (prompt, response) pairs of the
``followup`` scenario with ``reuse_prefix=True`` (context prefilled once into the KV cache,
K follow-up turns run on the tiled cache) vs ``False`` (K full sequences per context), for
one dimension (K = 20) and all six (K = 120).

    python benchmarks/sampling_throughput.py [--config experiments/configs/shift_demo.yaml]
        [--batch 64 256] [--new-tokens 10 64 256] [--prompt-len 8] [--repeats 3] [--out res.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignshift.config import load_config
from alignshift.data import make_scenario
from alignshift.models.sampling import generate
from alignshift.train.phases import build_policy


def _time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/shift_demo.yaml")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[10, 64, 256])
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flr-contexts", type=int, default=256)
    p.add_argument("--skip-flr", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    data = make_scenario(cfg.data.scenario, seed=0, n_train=10, n_test=10, n_sft=10)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    V = data.tokenizer.vocab_size
    print(f"model: {cfg.model.num_hidden_layers} layers, d={cfg.model.hidden_size}, "
          f"{cfg.model.num_attention_heads} heads / {cfg.model.num_key_value_heads} KV heads, vocab {V}; "
          f"backend {jax.default_backend()}, devices {jax.devices()}")
    rows = []
    print(f"{'batch':>6} {'new':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}")
    for B in args.batch:
        rs = np.random.RandomState(0)
        ids = rs.randint(4, V, size=(B, args.prompt_len)).astype(np.int32)
        lens = rs.randint(2, args.prompt_len + 1, size=B)
        mask = (np.arange(args.prompt_len)[None, :] >= args.prompt_len - lens[:, None]).astype(np.int32)
        ids, mask = jnp.asarray(ids * mask), jnp.asarray(mask)
        for N in args.new_tokens:
            fns = {c: (lambda c=c: generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=N, eos_id=None,
                                            pad_id=0, temperature=1.0, use_cache=c)[0]) for c in (True, False)}
            for f in fns.values():  # compile
                jax.block_until_ready(f())
            t = {True: [], False: []}
            for _ in range(args.repeats):
                for c in (True, False):
                    t[c].append(_time(fns[c], 1))
            tc, tu = statistics.median(t[True]), statistics.median(t[False])
            row = {"batch": B, "new_tokens": N, "prompt_len": args.prompt_len, "cached_s": tc, "uncached_s": tu,
                   "cached_tok_s": B * N / tc, "uncached_tok_s": B * N / tu, "speedup": tu / tc}
            rows.append(row)
            print(f"{B:>6} {N:>5} {row['cached_tok_s']:>13.0f} {row['uncached_tok_s']:>15.0f} {row['speedup']:>7.2f}x",
                  flush=True)
    out = {"sampling": rows, "config": args.config}

    if not args.skip_flr:
        from alignshift.rewards.flr import followup_scores

        fu = make_scenario("followup", seed=0, n_train=args.flr_contexts, n_test=1, n_sft=1)
        prompts = [e.prompt for e in fu.train] 
        responses = [e.chosen for e in fu.train]
        fm = build_policy(cfg.model, fu.tokenizer, seed=0)
        flr_rows = []
        print(f"\nFLR follow-up scoring, {len(prompts)} contexts")
        print(f"{'dimension':>14} {'K':>4} {'prefix reuse s':>15} {'full seqs s':>12} {'speedup':>8}")
        for dim in ("understanding", "all"):
            fns = {r: (lambda r=r: followup_scores(fm, fu.tokenizer, prompts, responses, dimension=dim,
                                                   batch_size=64, reuse_prefix=r)["likelihood"]) for r in (True, False)}
            a, b = fns[True](), fns[False]()
            assert np.allclose(a, b, atol=1e-4), "prefix reuse changed the scores"
            t = {True: [], False: []}
            for _ in range(args.repeats):
                for r in (True, False):
                    t[r].append(_time(fns[r], 1))
            tr, tf = statistics.median(t[True]), statistics.median(t[False])
            k = 20 if dim != "all" else 120
            flr_rows.append({"dimension": dim, "K": k, "contexts": len(prompts), "prefix_reuse_s": tr,
                             "full_sequences_s": tf, "speedup": tf / tr})
            print(f"{dim:>14} {k:>4} {tr:>15.3f} {tf:>12.3f} {tf / tr:>7.2f}x", flush=True)
        out["flr"] = flr_rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
