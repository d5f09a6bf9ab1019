"""Step time of the jitted DPO step on the demo config (CPU or whatever JAX sees).

Prints the median wall time per step of (a) the preference step with precomputed reference
log-probs and (b) the step that runs the frozen reference forward inside, and their ratio.

    python benchmarks/dpo_step.py [--config experiments/configs/shift_demo.yaml] [--steps 50] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from alignshift.config import MethodConfig, load_config
from alignshift.data import BatchIterator, encode_pairs, make_scenario
from alignshift.train.optim import make_optimizer
from alignshift.train.phases import build_policy, objective_for, precompute_reference_logps
from alignshift.forward import make_logits_fn, split_model
from alignshift.train.steps import init_state, make_preference_step


def time_step(step, state, it, extra, n):
    for _ in range(3):  # compile + warm-up
        state, m = step(state, next(it), *extra)
    jax.block_until_ready(m)
    times = []
    for _ in range(n):
        b = next(it)
        t = time.perf_counter()
        state, m = step(state, b, *extra)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/shift_demo.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    data = make_scenario(cfg.data.scenario, seed=0, **cfg.data.scenario_kwargs)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    g, params, rest = split_model(model)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    arrays = {k: v for k, v in arrays.items() if not k.startswith(("prompt_", "kl_"))}
    arrays.update(precompute_reference_logps(make_logits_fn(g, rest), params, arrays, groups=("chosen", "rejected")))
    obj = objective_for(MethodConfig())
    tx = make_optimizer(cfg.train.optim, 10_000)
    step = make_preference_step(g, rest, tx, obj)
    copy = lambda t: jax.tree_util.tree_map(lambda x: x.copy(), t)
    it_pre = iter(BatchIterator(arrays, cfg.train.batch_size, seed=0))
    it_in = iter(BatchIterator({k: v for k, v in arrays.items() if not k.startswith("reference_")},
                               cfg.train.batch_size, seed=0))
    t_pre = time_step(step, init_state(copy(params), tx), it_pre, (None,), a.steps)
    t_in = time_step(step, init_state(copy(params), tx), it_in, (params,), a.steps)
    T = arrays["chosen_input_ids"].shape[1]
    print(f"device={jax.devices()[0].platform} batch={cfg.train.batch_size} pairs seq={T} "
          f"layers={cfg.model.num_hidden_layers} d={cfg.model.hidden_size}")
    print(f"DPO step, precomputed reference : {t_pre * 1e3:8.2f} ms (median of {a.steps})")
    print(f"DPO step, reference in the step : {t_in * 1e3:8.2f} ms")
    print(f"ratio in-step / precomputed     : {t_in / t_pre:8.2f}x")


if __name__ == "__main__":
    main()
