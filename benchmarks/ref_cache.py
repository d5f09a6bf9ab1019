"""Time saved by the on-disk reference log-prob cache (``train.reference_cache_dir``) on the demo.

For one seed of a config (default: the demo's), SFT the reference as the demo does, encode the
data sets the demo uses (train, test), then for each set time

    cold  ``ReferenceLogpCache.get_or_compute`` on an empty cache: jitted reference forward over
          the whole set (compilation included, as in a fresh process) + hashing + atomic write
    warm  the same call again, as a later run or another method would make it: hashing + load

and print both and the saving. Any config key can be overridden (``model.hidden_size=256`` ...).

    python benchmarks/ref_cache.py
    python benchmarks/ref_cache.py --set model.hidden_size=256 model.num_hidden_layers=4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

from alignshift import __version__
from alignshift.config import load_config, to_dict
from alignshift.data import encode_pairs, make_scenario
from alignshift.train.metrics import JsonlWriter
from alignshift.train.ref_cache import ReferenceLogpCache
from alignshift.train.phases import build_policy, precompute_reference_logps, run_sft
from alignshift.forward import make_logits_fn, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "experiments", "configs", "shift_demo.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.set)
    data = make_scenario(cfg.data.scenario, seed=a.seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    with tempfile.TemporaryDirectory() as d:
        model = build_policy(cfg.model, tok, seed=a.seed)
        graphdef, _, rest = split_model(model)
        t0 = time.perf_counter()
        writer = JsonlWriter(os.path.join(d, "metrics.jsonl"))
        ref_params = run_sft(model, data.sft, tok, cfg, seed=a.seed, writer=writer)
        writer.close()
        t_sft = time.perf_counter() - t0
        logits_fn = make_logits_fn(graphdef, rest)
        cache = ReferenceLogpCache(os.path.join(d, "cache"))
        extra = {"model": to_dict(cfg.model), "tokenizer_vocab": list(tok.vocab), **enc,
                 "backend": jax.default_backend(), "alignshift": __version__}
        weights = {"params": ref_params, "rest": rest}

        def compute(arrays):
            return precompute_reference_logps(logits_fn, ref_params, arrays)

        print(f"config {os.path.relpath(a.config, ROOT)} seed {a.seed}: model hidden={cfg.model.hidden_size} "
              f"layers={cfg.model.num_hidden_layers}; SFT {cfg.sft.steps} steps took {t_sft:.1f} s (not cached: "
              "the cache key needs the reference weights)")
        print(f"{'set':<6} {'pairs':>6} {'cold s':>8} {'warm s':>8} {'saved s':>8}")
        tot_c = tot_w = 0.0
        for name, examples in (("train", data.train), ("test", data.test)):
            arrays = encode_pairs(tok, examples, **enc)
            t0 = time.perf_counter()
            cold = cache.get_or_compute(arrays, weights, compute, extra=extra)
            jax.block_until_ready(cold)
            tc = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = cache.get_or_compute(arrays, weights, compute, extra=extra)
            tw = time.perf_counter() - t0
            assert all((warm[k] == cold[k]).all() for k in cold), "cache returned different values"
            tot_c, tot_w = tot_c + tc, tot_w + tw
            print(f"{name:<6} {len(examples):>6} {tc:8.2f} {tw:8.2f} {tc - tw:8.2f}")
        n_methods = len(cfg.methods)
        print(f"per seed and run: {tot_c:.2f} s cold vs {tot_w:.2f} s warm; a re-run of all {n_methods} methods "
              f"(or a resumed run) saves {tot_c - tot_w:.2f} s per seed")


if __name__ == "__main__":
    main()
