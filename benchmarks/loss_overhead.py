"""Step-time ratio of every objective to plain DPO on the same config, in one run.

All steps use precomputed reference log-probs; rules that need a deployment-validation batch
(IW-DPO) get one of ``--val-batch`` pairs per step, as in training. Objectives are timed in
interleaved rounds (A B C ... A B C ...) so drift on a shared machine affects all alike.

    python benchmarks/loss_overhead.py [--config experiments/configs/shift_demo.yaml] [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from alignshift.config import MethodConfig, load_config
from alignshift.losses.penalties import PenaltyGradient
from alignshift.data import BatchIterator, encode_pairs, make_scenario
from alignshift.train.optim import make_optimizer
from alignshift.train.phases import build_policy, objective_for, precompute_reference_logps
from alignshift.forward import make_logits_fn, split_model
from alignshift.train.steps import init_state, make_preference_step

OBJECTIVES = {
    "dpo": MethodConfig(name="dpo"),
    "ipo": MethodConfig(name="ipo", base="ipo"),
    "simpo": MethodConfig(name="simpo", base="simpo"),
    "kto": MethodConfig(name="kto", base="kto"),
    "wpo": MethodConfig(name="wpo", weighting="wpo"),
    "iw_dpo_l": MethodConfig(name="iw_dpo_l", weighting="iw_dpo_l", weighting_kwargs={"warmup_examples": 0}),
    "iw_dpo_r": MethodConfig(name="iw_dpo_r", weighting="iw_dpo_r", weighting_kwargs={"warmup_examples": 0}),
    "kldpo": MethodConfig(name="kldpo", weighting="kl_dro"),
    "dr_dpo": MethodConfig(name="dr_dpo", weighting="dr_dpo"),
    "dora": MethodConfig(name="dora", weighting="dora", weighting_kwargs={"lam": 1.0, "alpha": 0.25}),
    "wdpo": MethodConfig(name="wdpo", penalty="wdpo", penalty_kwargs={"rho": 0.01}),
    "wdpo_fwd": MethodConfig(name="wdpo_fwd", penalty="wdpo",
                             penalty_kwargs={"rho": 0.01},
                             penalty_gradient={"mode": "forward_over_reverse"}),
    "wdpo_fd": MethodConfig(name="wdpo_fd", penalty="wdpo", penalty_kwargs={"rho": 0.01},
                            penalty_gradient={"mode": "finite_difference"}),
    # the penalty's gradient from 8 of the 32 pairs per step (unbiased; central difference)
    "wdpo_fd_m8": MethodConfig(name="wdpo_fd_m8", penalty="wdpo",
                               penalty_kwargs={"rho": 0.01},
                               penalty_gradient={"mode": "finite_difference", "pairs": 8}),
    "wdpo_fd_m4": MethodConfig(name="wdpo_fd_m4", penalty="wdpo",
                               penalty_kwargs={"rho": 0.01},
                               penalty_gradient={"mode": "finite_difference", "pairs": 4}),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/shift_demo.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed steps per objective per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--val-batch", type=int, default=16)
    p.add_argument("--only", default=None, help="comma-separated subset (dpo is always included)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    names = list(OBJECTIVES) if not a.only else ["dpo"] + [n for n in a.only.split(",") if n != "dpo"]
    data = make_scenario(cfg.data.scenario, seed=0, **cfg.data.scenario_kwargs)
    g, params, rest = split_model(build_policy(cfg.model, data.tokenizer, seed=0))
    enc = dict(max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_completion_len)
    lf = make_logits_fn(g, rest)
    train = encode_pairs(data.tokenizer, data.train, **enc)
    val = encode_pairs(data.tokenizer, data.val, **enc)
    for arr in (train, val):
        arr.update(precompute_reference_logps(lf, params, arr))
    # DoRA reads per-response classifier probabilities (precomputed in real runs): random ones here
    rng = np.random.default_rng(0)
    n = len(train["chosen_input_ids"])
    sources = {"source_prob": rng.uniform(0.05, 0.95, (n, 2)).astype(np.float32),
               "source_share": np.full((n, 2), 0.25, np.float32)}
    tx = make_optimizer(cfg.train.optim, 10_000)
    copy = lambda t: jax.tree_util.tree_map(lambda x: x.copy(), t)

    runners = {}
    for n in names:
        m = OBJECTIVES[n]
        obj = objective_for(m)
        arrays = {**train, **sources} if "source" in obj.requires else train
        keys = [k for k in arrays if not k.startswith("prompt_")]
        if "kl_completions" not in obj.requires:
            keys = [k for k in keys if not k.startswith(("kl_", "reference_kl"))]
        it = iter(BatchIterator({k: arrays[k] for k in keys}, cfg.train.batch_size, seed=0))
        vit = iter(BatchIterator({k: val[k] for k in keys}, min(a.val_batch, len(data.val)), seed=1)) \
            if "val_batch" in obj.requires else None
        step = make_preference_step(g, rest, tx, obj, penalty_gradient=PenaltyGradient.from_dict(m.penalty_gradient))
        state = init_state(copy(params), tx)
        for _ in range(3):  # compile + warm up
            state, mets = step(state, next(it), None, next(vit) if vit else None)
        jax.block_until_ready(mets)
        runners[n] = [step, state, it, vit]

    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            step, state, it, vit = runners[n]
            for _ in range(a.steps):
                b, vb = next(it), (next(vit) if vit else None)
                t = time.perf_counter()
                state, mets = step(state, b, None, vb)
                jax.block_until_ready(mets)
                times[n].append(time.perf_counter() - t)
            runners[n][1] = state
    base = statistics.median(times["dpo"])
    T = train["chosen_input_ids"].shape[1]
    print(f"device={jax.devices()[0].platform} batch={cfg.train.batch_size} pairs seq={T} "
          f"layers={cfg.model.num_hidden_layers} d={cfg.model.hidden_size}; median over {a.rounds}x{a.steps} steps")
    print(f"{'objective':>10s} {'ms/step':>9s} {'ratio to dpo':>13s}")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:>10s} {med * 1e3:9.2f} {med / base:13.2f}x")


if __name__ == "__main__":
    main()
