"""Where do IW-DPO's KMM weights put their mass? A diagnostic for ``deploy_shift``.

SFT the reference, run plain DPO for the warm-up (``--warmup-steps``), then, with those
params, compute IW-DPO-L/-R weights for many (training batch, validation batch) draws and
report the mean normalised weight on each training category. The true density ratio is
``1/deploy_fraction`` (4) on ``helpful_harmless`` (deployment-type) pairs and 0 on
``helpful_harmful`` ones, so informative weights put mean weight ≈ 4 on the former.

    python experiments/iw_diagnostics.py [--config experiments/configs/iw_dpo.yaml] [--seed 0] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from alignshift.cli import add_skip_bad_rows, run_main
from alignshift.config import MethodConfig, load_config
from alignshift.data import BatchIterator, encode_pairs, make_scenario
from alignshift.losses import make_objective
from alignshift.losses.weighting import iw_weights, normalize_weights
from alignshift.train.phases import build_policy, precompute_reference_logps, run_preference, run_sft
from alignshift.forward import make_logits_fn, policy_inputs, split_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/iw_dpo.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=32)
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("overrides", nargs="*")
    add_skip_bad_rows(p)  # the generated scenario has no bad rows: accepted like every entry point's
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides + [f"train.steps={a.warmup_steps}", "train.eval_every=0"]
                      + (["data.skip_bad_rows=true"] if a.skip_bad_rows else []))
    data = make_scenario(cfg.data.scenario, seed=a.seed, **cfg.data.scenario_kwargs)
    tok = data.tokenizer
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    model = build_policy(cfg.model, tok, seed=a.seed)
    g, _, rest = split_model(model)
    ref = run_sft(model, data.sft, tok, cfg, seed=a.seed)
    lf = make_logits_fn(g, rest)
    train, val = encode_pairs(tok, data.train, **enc), encode_pairs(tok, data.val, **enc)
    for arr in (train, val):
        arr.update(precompute_reference_logps(lf, ref, arr))
    params, _ = run_preference(g, rest, ref, train, MethodConfig(), cfg, seed=a.seed)  # the DPO warm-up
    cat = np.asarray([ex.meta["category"] == "helpful_harmless" for ex in data.train], np.float32)
    keys = [k for k in train if k.split("_")[0] in ("chosen", "rejected", "reference")]
    it = BatchIterator({**{k: train[k] for k in keys}, "is_deploy": cat}, cfg.train.batch_size, seed=1)
    vit = BatchIterator({k: val[k] for k in keys}, min(cfg.train.val_batch_size, len(data.val)), seed=2)
    obj = make_objective("dpo")
    feats = jax.jit(lambda prm, b: (lambda t: (t.losses, jnp.stack([t.chosen_rewards, t.rejected_rewards], -1)))(
        obj.terms(policy_inputs(lf, prm, b, obj))[0]))
    rows = []
    print(f"seed {a.seed}, after {a.warmup_steps} DPO steps; true ratio: 4.0 on deployment-type pairs, 0 on others")
    print(f"{'rule':>9s} {'gamma':>7s} {'ESS':>6s} {'mean w | deploy-type':>21s} {'mean w | helpful-harmful':>25s}")
    for rule, kind in (("iw_dpo_l", 0), ("iw_dpo_r", 1)):
        for gamma in (0.1, "median"):
            wd, wh, ess = [], [], []
            for s in range(a.draws):
                b = it.batch_at(s)
                tr = feats(params, {k: b[k] for k in keys})[kind]
                va = feats(params, vit.batch_at(s))[kind]
                w = np.asarray(normalize_weights(iw_weights(tr, val_features=va, gamma=gamma, warmup_examples=0)))
                d = b["is_deploy"] > 0
                wd.append(w[d].mean() if d.any() else np.nan)
                wh.append(w[~d].mean())
                ess.append(w.sum() ** 2 / (len(w) * (w ** 2).sum()))
            rows.append((rule, gamma, np.mean(ess), np.nanmean(wd), np.mean(wh)))
            print(f"{rule:>9s} {str(gamma):>7s} {np.mean(ess):6.3f} {np.nanmean(wd):21.3f} {np.mean(wh):25.3f}")
    return rows


if __name__ == "__main__":
    sys.exit(run_main(main))
