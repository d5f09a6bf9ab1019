"""Tokenisation + padding of prompts / completions into fixed-shape int32 arrays.

Layout contract relied upon by the training code
------------------------------------------------
Completion sequences (``encode_completions``), length ``T = max_prompt_len + max_completion_len``,
RIGHT-padded with ``pad_id``::

    position:      0     1..p-1          p..p+c-1                 p+c..T-1
    input_ids:    bos   prompt tokens   completion tokens [+eos]   pad ...
    attention:     1     1 ...           1 ...                     0 ...
    loss_mask:     0     0 ...           1 ...                     0 ...

``loss_mask`` is 1 exactly on the completion tokens (eos included), so the
per-sequence log-probability is ``sum(logp(input_ids[:, 1:] | logits[:, :-1]) *
loss_mask[:, 1:])``.  Since position 0 is always bos (loss 0), no completion
token is lost by the shift.

Truncation: the prompt part (bos included) keeps its LAST ``max_prompt_len``
tokens but always starts with bos (tokens are dropped from the front, after
bos); the completion keeps its FIRST ``max_completion_len`` tokens with eos
counted in that budget, so a truncated completion has no eos.  ``truncated[i]``
records completion truncation, ``prompt_truncated[i]`` prompt truncation.

Prompts for sampling (``encode_prompts``) are LEFT-padded to ``max_prompt_len``
and start with bos, so generation can append tokens at the right edge.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .schema import DataError, PreferenceExample, validate_examples
from .tokenizer import WordTokenizer

__all__ = ["encode_completions", "encode_prompts", "encode_pairs", "encode_lists", "kl_completion_sources",
           "KL_PAIRINGS", "PAIR_KEYS", "LIST_KEYS"]

#: How :func:`encode_pairs` builds KTO's mismatched ``kl_*`` rows (:func:`kl_completion_sources`).
KL_PAIRINGS: tuple[str, ...] = ("trl", "previous_chosen")

#: Exact keys returned by :func:`encode_pairs`.
PAIR_KEYS: tuple[str, ...] = (
    "chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask",
    "rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask",
    "prompt_ids", "prompt_mask",
    "kl_input_ids", "kl_attention_mask", "kl_loss_mask",
)


def _check_lens(**lens: int) -> None:
    for name, v in lens.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _prompt_tokens(tokenizer: WordTokenizer, prompt: str, max_prompt_len: int) -> tuple[list[int], bool]:
    ids = tokenizer.encode(prompt, add_bos=True)
    if len(ids) <= max_prompt_len:
        return ids, False
    keep = max_prompt_len - 1
    return [tokenizer.bos_id] + (ids[len(ids) - keep:] if keep > 0 else []), True


def _completion_tokens(tokenizer: WordTokenizer, completion: str, max_completion_len: int) -> tuple[list[int], bool]:
    ids = tokenizer.encode(completion) + [tokenizer.eos_id]
    if len(ids) <= max_completion_len:
        return ids, False
    return ids[:max_completion_len], True


def encode_completions(
    tokenizer: WordTokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_prompt_len: int,
    max_completion_len: int,
) -> dict[str, np.ndarray]:
    """Encode ``[bos] + prompt + completion + [eos]`` sequences (see module docstring).

    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` (int32 ``[N, T]``),
    ``truncated`` and ``prompt_truncated`` (bool ``[N]``).
    """
    _check_lens(max_prompt_len=max_prompt_len, max_completion_len=max_completion_len)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    n, t = len(prompts), max_prompt_len + max_completion_len
    input_ids = np.full((n, t), tokenizer.pad_id, dtype=np.int32)
    attention_mask = np.zeros((n, t), dtype=np.int32)
    loss_mask = np.zeros((n, t), dtype=np.int32)
    truncated = np.zeros((n,), dtype=bool)
    prompt_truncated = np.zeros((n,), dtype=bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, prompt_truncated[i] = _prompt_tokens(tokenizer, prompt, max_prompt_len)
        c, truncated[i] = _completion_tokens(tokenizer, completion, max_completion_len)
        lp, lc = len(p), len(c)
        input_ids[i, :lp] = p
        input_ids[i, lp:lp + lc] = c
        attention_mask[i, :lp + lc] = 1
        loss_mask[i, lp:lp + lc] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
    }


def encode_prompts(tokenizer: WordTokenizer, prompts: Sequence[str], *, max_prompt_len: int) -> dict[str, np.ndarray]:
    """LEFT-padded ``[bos] + prompt`` ids for sampling: ``prompt_ids``/``prompt_mask`` int32 ``[N, P]``.

    Same prompt truncation policy as :func:`encode_completions`.
    """
    _check_lens(max_prompt_len=max_prompt_len)
    n = len(prompts)
    prompt_ids = np.full((n, max_prompt_len), tokenizer.pad_id, dtype=np.int32)
    prompt_mask = np.zeros((n, max_prompt_len), dtype=np.int32)
    for i, prompt in enumerate(prompts):
        p, _ = _prompt_tokens(tokenizer, prompt, max_prompt_len)
        prompt_ids[i, max_prompt_len - len(p):] = p
        prompt_mask[i, max_prompt_len - len(p):] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def kl_completion_sources(n: int, kl_pairing: str = "trl") -> list[tuple[int, str]]:
    """For each of ``n`` examples, ``(row, field)`` of the completion its ``kl_*`` row pairs with
    its prompt: KTO's mismatched completions ``y'`` for the reference point
    ``z₀ = max(0, mean log π(y'|x)/π_ref(y'|x))``.

    * ``"trl"`` (default): the previous example's (``(i − 1) mod n``) CHOSEN completion for even
      ``i`` and its REJECTED completion for odd ``i``. TRL unpairs a paired data set into 2n
      rows (every chosen and every rejected completion, each with its prompt) and gives each
      row the completion of the row before it within its batch, so its KL completions are the
      batch's completions, rejected ones included, each with another prompt. With one ``kl_*``
      row per pair, alternating chosen and rejected draws the mismatched completions from the
      same half-chosen, half-rejected set.
    * ``"previous_chosen"``: the previous example's chosen completion for every ``i`` (the
      former behaviour; KL completions are desirable responses only).

    With ``n == 1`` the pair is matched (there is no other completion)."""
    if kl_pairing not in KL_PAIRINGS:
        raise ValueError(f"unknown kl_pairing {kl_pairing!r}; choose one of {KL_PAIRINGS}")
    if kl_pairing == "previous_chosen":
        return [((i - 1) % n, "chosen") for i in range(n)]
    return [((i - 1) % n, "chosen" if i % 2 == 0 else "rejected") for i in range(n)]


def encode_pairs(
    tokenizer: WordTokenizer,
    examples: Sequence[PreferenceExample | dict],
    *,
    max_prompt_len: int,
    max_completion_len: int,
    kl_pairing: str = "trl",
) -> dict[str, np.ndarray]:
    """Encode preference pairs into the arrays named in :data:`PAIR_KEYS`.

    ``chosen_*``/``rejected_*``: :func:`encode_completions` of (prompt, chosen/rejected).
    ``prompt_*``: :func:`encode_prompts` of the prompts.
    ``kl_*``: prompt ``i`` paired with another example's completion (mismatched pairs for
    KTO's reference-point KL estimate): with ``kl_pairing="trl"`` (default) the previous
    example's chosen completion for even ``i`` and its rejected one for odd ``i``, drawing
    from chosen and rejected completions alike as TRL does; ``"previous_chosen"``: always the
    previous example's chosen one (:func:`kl_completion_sources`). With N == 1 the pair is
    matched, there being no other completion.

    Examples are validated first (:class:`DataError` on bad rows); a completion with
    zero tokens after truncation also raises :class:`DataError`.
    """
    _check_lens(max_prompt_len=max_prompt_len, max_completion_len=max_completion_len)
    exs = validate_examples(examples)
    prompts = [e.prompt for e in exs]
    chosen = [e.chosen for e in exs]
    rejected = [e.rejected for e in exs]
    kl_sources = kl_completion_sources(len(exs), kl_pairing)
    kl_completions = [chosen[j] if f == "chosen" else rejected[j] for j, f in kl_sources]

    kw = dict(max_prompt_len=max_prompt_len, max_completion_len=max_completion_len)
    out: dict[str, np.ndarray] = {}
    for prefix, comps in (("chosen", chosen), ("rejected", rejected), ("kl", kl_completions)):
        enc = encode_completions(tokenizer, prompts, comps, **kw)
        n_tok = enc["loss_mask"].sum(axis=1)
        if np.any(n_tok == 0):  # defensive: cannot happen with max_completion_len >= 1
            i = int(np.argmax(n_tok == 0))
            row, field_name = kl_sources[i] if prefix == "kl" else (i, prefix)
            raise DataError(f"row {row}: field '{field_name}' has zero tokens after truncation")
        out[f"{prefix}_input_ids"] = enc["input_ids"]
        out[f"{prefix}_attention_mask"] = enc["attention_mask"]
        out[f"{prefix}_loss_mask"] = enc["loss_mask"]
    out.update(encode_prompts(tokenizer, prompts, max_prompt_len=max_prompt_len))
    return {k: out[k] for k in PAIR_KEYS}


#: Exact keys returned by :func:`encode_lists`.
LIST_KEYS: tuple[str, ...] = (
    "cand_input_ids", "cand_attention_mask", "cand_loss_mask", "cand_scores", "prompt_ids", "prompt_mask",
)


def encode_lists(
    tokenizer: WordTokenizer,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]] | None = None,
    *,
    max_prompt_len: int,
    max_completion_len: int,
) -> dict[str, np.ndarray]:
    """Encode K candidate completions per prompt (listwise losses: Plackett–Luce, RRHF, LIRE).

    ``cand_{input_ids,attention_mask,loss_mask}``: int32 ``[N, K, T]``, row ``(i, k)`` laid out
    exactly as :func:`encode_completions` of ``(prompts[i], candidates[i][k])``;
    ``cand_scores``: float32 ``[N, K]`` (the judge's rewards, higher = better; zeros when
    ``scores`` is None, i.e. the candidates are already ranked best first);
    ``prompt_*``: :func:`encode_prompts` of the prompts. K must be the same for every prompt
    and at least 2; every candidate a non-empty string; scores finite — else
    :class:`DataError` naming the row and the field.
    """
    _check_lens(max_prompt_len=max_prompt_len, max_completion_len=max_completion_len)
    n = len(prompts)
    if len(candidates) != n:
        raise ValueError(f"got {n} prompts but {len(candidates)} candidate lists")
    if scores is not None and len(scores) != n:
        raise ValueError(f"got {n} prompts but {len(scores)} score lists")
    k = len(candidates[0]) if n else 2
    for i in range(n):
        if not isinstance(prompts[i], str) or not prompts[i].strip():
            raise DataError(f"row {i}: field 'prompt' is empty or not a str")
        if len(candidates[i]) != k or k < 2:
            raise DataError(f"row {i}: field 'candidates' has {len(candidates[i])} items; every row needs the same K >= 2 "
                            f"(row 0 has {k})")
        for j, c in enumerate(candidates[i]):
            if not isinstance(c, str) or not c.strip():
                raise DataError(f"row {i}: field 'candidates[{j}]' is empty or not a str")
        if scores is not None:
            sc = np.asarray(scores[i], dtype=np.float64)
            if sc.shape != (k,) or not np.all(np.isfinite(sc)):
                raise DataError(f"row {i}: field 'scores' must be {k} finite numbers; got {list(scores[i])}")
    kw = dict(max_prompt_len=max_prompt_len, max_completion_len=max_completion_len)
    flat_p = [p for p in prompts for _ in range(k)]
    flat_c = [c for cs in candidates for c in cs]
    enc = encode_completions(tokenizer, flat_p, flat_c, **kw)
    t = max_prompt_len + max_completion_len
    out = {f"cand_{f}": enc[f].reshape(n, k, t) for f in ("input_ids", "attention_mask", "loss_mask")}
    out["cand_scores"] = (np.zeros((n, k), np.float32) if scores is None
                          else np.asarray(scores, dtype=np.float32).reshape(n, k))
    out.update(encode_prompts(tokenizer, list(prompts), max_prompt_len=max_prompt_len))
    return {key: out[key] for key in LIST_KEYS}
