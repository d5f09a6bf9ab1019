"""Mining preference data with a reward (FLR by default), and FLR-LM feedback fine-tuning.

Pair mining (docs/methods.md §5.5; the rules are not in the authors' repo, so they follow the paper's
description as recorded in the spec [INFER]):

    responses = sample_responses(policy, tok, prompts, n_samples=8, temperature=0.7, top_p=0.9, key=k)
    scores    = score_responses(flr_model, tok, prompts, responses, reward="flr", dimension="understanding")
    pairs     = mine_pairs(prompts, responses, scores, min_gap=0.0)   # DPO: max vs min per prompt
    kto       = kto_examples(prompts, responses, scores, min_gap=0.0)  # desirable / undesirable

* :func:`sample_responses`: N samples per prompt from a policy with our batched, jitted,
  KV-cached sampler (:func:`alignshift.models.sampling.generate`), temperature / top-p.
* :func:`mine_pairs`: per prompt, chosen = the highest-scoring sample, rejected = the lowest
  (first occurrence on ties; empty samples are ignored); a prompt is skipped when the gap
  ``max − min`` is ``<= 0`` or ``< min_gap``, or when the two texts are identical. The result is a list of
  :class:`~alignshift.data.PreferenceExample` for :func:`alignshift.data.encode_pairs` and the
  existing trainer (DPO, or the pair-form KTO loss). ``meta`` keeps the scores and the gap.
* :func:`kto_examples`: the same extremes as unpaired KTO rows
  ``{"prompt", "completion", "label": True/False, "score"}``.

FLR-LM fine-tuning with natural-language feedback (docs/methods.md §5.3/§5.5): the scoring LM learns to
play the *user* of the role-swapped template — ``user: FT_INSTRUCTION`` / ``assistant: x`` /
``user: y`` / ``assistant: feedback``. :func:`feedback_sft_arrays` renders such conversations
with the tokenizer's chat template and puts the loss on the ASSISTANT turns only (content and
turn-end tokens; LLaMA-Factory's default masking); :func:`run_feedback_sft` trains with the
existing SFT step (:func:`alignshift.train.steps.make_sft_step`). The fine-tuned LM is then
used with ``flr_scores(..., template="swapped")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignshift.data.schema import PreferenceExample

__all__ = [
    "sample_responses",
    "score_responses",
    "mine_pairs",
    "kto_examples",
    "feedback_conversation",
    "feedback_sft_arrays",
    "run_feedback_sft",
]


# --------------------------------------------------------------------------- sampling


def _prompt_ids(tokenizer, prompts: Sequence[str], max_prompt_len: int):
    from alignshift.data.encode import encode_prompts

    if hasattr(tokenizer, "bos_id") and not hasattr(tokenizer, "apply_chat_template"):
        enc = encode_prompts(tokenizer, prompts, max_prompt_len=max_prompt_len)
        return enc["prompt_ids"], enc["prompt_mask"]
    ids = np.full((len(prompts), max_prompt_len), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        t = list(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False))
        t = t[-max_prompt_len:]
        ids[i, max_prompt_len - len(t):] = t
        mask[i, max_prompt_len - len(t):] = 1
    return ids, mask


def _decode(tokenizer, ids) -> str:
    if hasattr(tokenizer, "bos_id") and not hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def sample_responses(model, tokenizer, prompts: Sequence[str], *, n_samples: int, key: jax.Array,
                     max_new_tokens: int, temperature: float = 0.7, top_p: float = 0.9,
                     max_prompt_len: int = 64, batch_size: int = 256, eos_id=None) -> list[list[str]]:
    """``n_samples`` sampled responses per prompt (``[len(prompts)][n_samples]`` strings).

    Defaults follow the authors' generation script (temperature 0.7, top-p 0.9). Prompts are
    repeated prompt-major and decoded in batches of ``batch_size`` rows with the KV-cached
    sampler. A WordTokenizer prompt is encoded as in ShiftBench (``<bos> prompt``); an HF
    tokenizer's through its chat template with the generation prompt.
    """
    from alignshift.models.sampling import generate

    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str")
    if not prompts:
        return []
    ids, mask = _prompt_ids(tokenizer, prompts, max_prompt_len)
    ids, mask = np.repeat(ids, n_samples, 0), np.repeat(mask, n_samples, 0)
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_id", None)
        if eos_id is None:
            eos_id = tokenizer.eos_token_id
    pad_id = int(getattr(tokenizer, "pad_id", getattr(tokenizer, "pad_token_id", 0)) or 0)
    n = ids.shape[0]
    B = min(batch_size, n)
    texts = []
    for b, a in enumerate(range(0, n, B)):
        idx = np.arange(a, a + B) % n  # fixed batch shape: one compilation
        toks, rmask = generate(model, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]), key=jax.random.fold_in(key, b),
                               max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                               temperature=temperature, top_p=top_p)
        toks, rmask = np.asarray(toks), np.asarray(rmask)
        for j in range(min(B, n - a)):
            texts.append(_decode(tokenizer, [int(t) for t, m in zip(toks[j], rmask[j]) if m]))
    return [texts[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]


def score_responses(model, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]], *,
                    reward: str = "flr", **kwargs) -> np.ndarray:
    """Scores ``[len(prompts), n_samples]`` of sampled responses: ``reward="flr"`` (kwargs go to
    :func:`~alignshift.rewards.flr.flr_scores`) or ``"direct"``."""
    from alignshift.rewards.flr import direct_scores, flr_scores

    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} response lists")
    n = {len(r) for r in responses}
    if len(n) > 1:
        raise ValueError(f"every prompt needs the same number of responses, got {sorted(n)}")
    k = n.pop() if n else 0
    flat_p = [p for p in prompts for _ in range(k)]
    flat_r = [r for rs in responses for r in rs]
    if reward == "flr":
        s = flr_scores(model, tokenizer, flat_p, flat_r, **kwargs)
    elif reward == "direct":
        s = direct_scores(model, tokenizer, flat_p, flat_r, **kwargs)
    else:
        raise ValueError(f"reward must be 'flr' or 'direct', got {reward!r}")
    return np.asarray(s, np.float64).reshape(len(prompts), k)


# --------------------------------------------------------------------------- pairs


def _check_scored(prompts, responses, scores) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(prompts):
        raise ValueError(f"scores must be [len(prompts)={len(prompts)}, n_samples], got shape {scores.shape}")
    for i, rs in enumerate(responses):
        if len(rs) != scores.shape[1]:
            raise ValueError(f"row {i}: {len(rs)} responses but {scores.shape[1]} scores")
    if len(responses) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} response lists")
    if not np.all(np.isfinite(scores)):
        i = int(np.argwhere(~np.isfinite(scores))[0, 0])
        raise ValueError(f"row {i}: non-finite score")
    return scores


def _extremes(prompts, responses, scores, min_gap):
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    scores = _check_scored(prompts, responses, scores)
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        ok = np.asarray([bool(r.strip()) for r in rs], bool)  # empty samples cannot be trained on
        if ok.sum() < 2:
            continue
        hi = int(np.argmax(np.where(ok, scores[i], -np.inf)))
        lo = int(np.argmin(np.where(ok, scores[i], np.inf)))
        gap = float(scores[i, hi] - scores[i, lo])
        if gap <= 0 or gap < min_gap or rs[hi] == rs[lo]:
            continue
        yield i, p, rs[hi], rs[lo], float(scores[i, hi]), float(scores[i, lo]), gap


def mine_pairs(prompts: Sequence[str], responses: Sequence[Sequence[str]], scores, *,
               min_gap: float = 0.0) -> list[PreferenceExample]:
    """DPO pairs: per prompt the highest- vs the lowest-scoring response (see module doc)."""
    return [PreferenceExample(p, c, r, {"prompt_index": i, "chosen_score": sc, "rejected_score": sr, "gap": g})
            for i, p, c, r, sc, sr, g in _extremes(prompts, responses, scores, min_gap)]


def kto_examples(prompts: Sequence[str], responses: Sequence[Sequence[str]], scores, *,
                 min_gap: float = 0.0) -> list[dict]:
    """Unpaired KTO rows: the best response of each kept prompt as desirable (``label=True``),
    the worst as undesirable (``label=False``)."""
    out = []
    for i, p, c, r, sc, sr, _ in _extremes(prompts, responses, scores, min_gap):
        out.append({"prompt": p, "completion": c, "label": True, "score": sc, "prompt_index": i})
        out.append({"prompt": p, "completion": r, "label": False, "score": sr, "prompt_index": i})
    return out


# --------------------------------------------------------------------------- FLR-LM fine-tuning


def feedback_conversation(prompt: str, response: str, feedback: str) -> list[dict]:
    """The role-swapped conversation the fine-tuned FLR-LM learns (docs/methods.md §5.3)."""
    from alignshift.rewards.flr import FT_INSTRUCTION

    return [{"role": "user", "content": FT_INSTRUCTION}, {"role": "assistant", "content": prompt},
            {"role": "user", "content": response}, {"role": "assistant", "content": feedback}]


def _conversation_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 loss mask on the assistant turns
    (content + turn end), rendered turn by turn so each turn's tokens are known exactly."""
    from alignshift.rewards.flr import _split_suffix

    ids, mask = [], []
    for t, m in enumerate(messages):
        prev, pre, content, post = _split_suffix(tokenizer, messages[:t], messages[:t + 1], m["content"])
        if len(prev) != len(ids) or prev != ids[:len(prev)]:
            raise ValueError(f"turn {t}: the rendered conversation is not prefix-stable under the chat template")
        train = 1 if m["role"] == "assistant" else 0
        ids += pre + content + post
        mask += [0] * len(pre) + [train] * (len(content) + len(post))
    return ids, mask


def feedback_sft_arrays(tokenizer, examples: Sequence[tuple[str, str, str]], *, max_len: int) -> dict[str, np.ndarray]:
    """Encode ``(prompt, response, feedback)`` triples as role-swapped conversations:
    ``input_ids``/``attention_mask``/``loss_mask`` int32 [N, max_len], right-padded, with the
    loss on the assistant turns only (the question ``x`` and the feedback). Too long rows
    raise (naming the row) rather than silently lose their feedback."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("feedback SFT needs a tokenizer with a chat template")
    n = len(examples)
    pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    ids = np.full((n, max_len), pad_id, np.int32)
    attn = np.zeros((n, max_len), np.int32)
    loss = np.zeros((n, max_len), np.int32)
    for i, ex in enumerate(examples):
        if len(ex) != 3 or not all(isinstance(s, str) for s in ex):
            raise ValueError(f"row {i}: expected a (prompt, response, feedback) triple of str")
        t, m = _conversation_tokens(tokenizer, feedback_conversation(*ex))
        if len(t) > max_len:
            raise ValueError(f"row {i}: conversation has {len(t)} tokens > max_len={max_len}")
        ids[i, :len(t)] = t
        attn[i, :len(t)] = 1
        loss[i, :len(t)] = m
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def run_feedback_sft(model, tokenizer, examples: Sequence[tuple[str, str, str]], *, steps: int,
                     batch_size: int = 16, lr: float = 1e-4, max_len: int = 256, seed: int = 0,
                     writer=None):
    """Fine-tune the FLR-LM on role-swapped feedback conversations (assistant-turn loss) with
    the existing SFT step and loop; updates ``model`` in place and returns the training log."""
    from flax import nnx

    from alignshift.config import OptimConfig
    from alignshift.data.loader import BatchIterator
    from alignshift.train.loop import train_loop
    from alignshift.train.optim import make_optimizer
    from alignshift.forward import split_model
    from alignshift.train.steps import init_state, make_sft_step

    arrays = feedback_sft_arrays(tokenizer, examples, max_len=max_len)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=min(10, max(1, steps // 10))), steps)
    it = BatchIterator(arrays, min(batch_size, len(examples)), seed=seed)
    state, history = train_loop(make_sft_step(graphdef, rest, tx), init_state(params, tx), it, steps=steps,
                                log_every=max(1, steps // 5), writer=writer, desc="flr-lm sft", progress=False)
    nnx.update(model, state["params"])
    return history
