"""Evaluation on a benchmark's deployment test set.

* ``preference_accuracy``: fraction of held-out pairs whose implicit reward (the method's
  own, e.g. ``β·(log π − log π_ref)`` for DPO, ``β·mean log π`` for SimPO) ranks the chosen
  response above the rejected one.
* ``sample_and_score``: sample responses to test prompts, score them with the ground-truth
  reward, and estimate ``KL(π‖π_ref)`` by the Monte-Carlo mean of ``log π(y) − log π_ref(y)``
  over the policy's own samples.
* ``win_rate``: P(policy reward > reference reward) + ½·P(tie), prompt by prompt.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.losses import Objective
from alignshift.models.sampling import generate
from alignshift.forward import batch_sequence_logps, map_batches, policy_inputs

__all__ = ["implicit_rewards", "preference_accuracy", "sample_and_score", "win_rate"]


@functools.lru_cache(maxsize=16)
def _rewards_fn(logits_fn, objective: Objective):
    """One jitted implicit-reward function per (forward, objective): repeated evaluations of
    the same method reuse its compiled function instead of tracing a new one."""

    @jax.jit
    def terms(p, batch):
        t = objective.terms(policy_inputs(logits_fn, p, batch, objective))[0]
        return t.chosen_rewards, t.rejected_rewards

    return terms


def implicit_rewards(logits_fn, params, arrays: dict, objective: Objective, *, batch_size: int = 256):
    """The method's implicit rewards of every pair's chosen and rejected response, ``(c, r)``."""
    batch = {k: v for k, v in arrays.items() if not k.startswith("prompt_")}
    return map_batches(_rewards_fn(logits_fn, objective), batch, batch_size=batch_size, args=(params,))


def preference_accuracy(logits_fn, params, arrays: dict, objective: Objective, *, batch_size: int = 256) -> dict:
    """Implicit-reward pairwise accuracy (ties count as wrong) and mean reward margin."""
    c, r = implicit_rewards(logits_fn, params, arrays, objective, batch_size=batch_size)
    return {"pref_acc": float(np.mean(c > r)), "reward_margin": float(np.mean(c - r))}


def sample_and_score(
    graphdef,
    rest,
    params,
    ref_params,
    prompt_arrays: dict,
    prompts: list[str],
    *,
    tokenizer,
    reward_fn: Callable[[str, str], float],
    metrics_fn: Callable[[str, str], dict],
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
) -> dict:
    """Sample one response per prompt; return mean ground-truth metrics, the KL estimate and
    the per-prompt rewards (``rewards``, for win rates) and responses (``responses``)."""
    model = nnx.merge(graphdef, params, rest)
    logits_fn = lambda p, i, a: nnx.merge(graphdef, p, rest)(i, attention_mask=a)
    logratio_fn = jax.jit(
        lambda p, rp, i, a, m: batch_sequence_logps(logits_fn, p, i, a, m)[0]
        - batch_sequence_logps(logits_fn, rp, i, a, m)[0]
    )
    n = len(prompts)
    per: list[dict] = []
    rewards: list[float] = []
    responses: list[str] = []
    kls = []
    for b, a in enumerate(range(0, n, batch_size)):
        sl = slice(a, min(a + batch_size, n))
        pids, pmask = prompt_arrays["prompt_ids"][sl], prompt_arrays["prompt_mask"][sl]
        toks, rmask = generate(
            model,
            jnp.asarray(pids),
            jnp.asarray(pmask),
            key=jax.random.fold_in(key, b),
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            temperature=temperature,
            top_p=top_p,
        )
        toks, rmask = np.asarray(toks), np.asarray(rmask)
        ids = np.concatenate([pids, toks], axis=1)
        am = np.concatenate([pmask, rmask], axis=1)
        lm = np.concatenate([np.zeros_like(pmask), rmask], axis=1)
        kls.append(np.asarray(logratio_fn(params, ref_params, ids, am, lm)))
        for i, row in enumerate(toks):
            text = tokenizer.decode([int(t) for t, m in zip(row, rmask[i]) if m])
            responses.append(text)
            per.append(metrics_fn(prompts[sl.start + i], text))
            rewards.append(float(reward_fn(prompts[sl.start + i], text)))
    out = {k: float(np.mean([p[k] for p in per])) for k in per[0] if isinstance(per[0][k], (int, float, bool, np.number))}
    out["kl_to_ref"] = float(np.mean(np.concatenate(kls)))
    out["reward"] = float(np.mean(rewards))
    out["per_sample"] = per
    out["rewards"] = np.asarray(rewards)
    out["responses"] = responses
    return out


def win_rate(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> float:
    p, r = np.asarray(policy_rewards), np.asarray(reference_rewards)
    return float(np.mean((p > r) + 0.5 * (p == r)))
