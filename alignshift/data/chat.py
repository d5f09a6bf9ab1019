"""Chat-template tokenisation of preference pairs for Hugging Face tokenizers, with prompt
masking, truncation and length bucketing.

    tok = load_hf_tokenizer("path/to/model")                 # chat template included
    arrays = encode_chat_pairs(tok, examples, max_prompt_len=1024, max_completion_len=1024)
    it = LengthBucketIterator(arrays, batch_size=32, seed=0, bucket=128)

The arrays have exactly the keys and layout of :func:`alignshift.data.encode_pairs`
(:data:`~alignshift.data.encode.PAIR_KEYS`), so every training step, the reference cache
and the sharded path take them unchanged:

* ``{chosen,rejected,kl}_input_ids`` ``[N, T]`` with ``T = max_prompt_len +
  max_completion_len``, RIGHT-padded: prompt tokens then response tokens then padding;
  ``*_attention_mask`` 1 on real tokens; ``*_loss_mask`` 1 exactly on the response tokens
  (prompt tokens are never in the loss);
* ``prompt_ids``/``prompt_mask`` ``[N, max_prompt_len]``, LEFT-padded, for sampling;
* ``kl_*``: prompt ``i`` with another example's response (KTO's KL estimate; ``kl_pairing``, as
  :func:`alignshift.data.encode.kl_completion_sources`: by default TRL's mix of the previous
  example's chosen and rejected responses).

Tokenisation (``mode``):

* ``"chat"``: the prompt is the conversation (``meta["prompt_messages"]`` when the adapter
  kept several turns, else one user turn; ``system_prompt`` is prepended when given)
  rendered with ``add_generation_prompt=True``; the response tokens are the rest of the
  rendering of the conversation plus the assistant turn (so end-of-turn tokens such as
  Llama 3's ``<|eot_id|>`` are part of the response and learned). The template's own BOS is
  kept and the text is tokenised with ``add_special_tokens=False``: no double BOS. If a
  template does not render the prompt as a prefix of the full conversation, the response is
  tokenised alone and ``eos`` appended.
* ``"raw"``: ``[bos] + prompt`` and ``raw_separator + response + [eos]`` as plain text (the
  HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant:" format DoRA uses, or tokenizers without a chat
  template).
* ``"auto"`` (default): ``"chat"`` when the tokenizer has a chat template and the example
  is not marked ``meta["raw_prompt"]``, else ``"raw"``.

Truncation: the prompt keeps its END (the latest turns; a leading BOS is kept), the
response keeps its START (a truncated response has no end-of-turn token). Truncation
counts are returned with ``return_info=True``. To refuse or drop over-long rows instead
(``data.truncation`` ``error`` | ``skip``), check them first with
:func:`alignshift.data.schema.check_lengths` and ``lengths=chat_token_lengths(tokenizer, ...)``:
the untruncated lengths exactly as this encoder measures them (``kl_*`` rows, another row's
response after this prompt, are still cut to fit).

Malformed input raises :class:`~alignshift.data.DataError` naming the row and the field.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .encode import PAIR_KEYS, kl_completion_sources
from .loader import BatchIterator
from .schema import DataError, PreferenceExample, validate_example

__all__ = ["prompt_messages", "tokenize_prompt_response", "chat_token_lengths", "encode_chat_pairs",
           "LengthBucketIterator", "sequence_lengths"]


def prompt_messages(ex: PreferenceExample, index: int, system_prompt: str | None = None) -> list[dict]:
    """The prompt as chat messages (``meta["prompt_messages"]`` or one user turn)."""
    msgs = ex.meta.get("prompt_messages")
    if msgs is None:
        msgs = [{"role": "user", "content": ex.prompt}]
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise DataError(f"row {index}: field 'meta.prompt_messages' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"row {index}: field 'meta.prompt_messages' item {j} needs str 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"row {index}: field 'meta.prompt_messages' must end with a user turn, "
                        f"not {out[-1]['role']!r}")
    if system_prompt and out[0]["role"] != "system":
        out = [{"role": "system", "content": system_prompt}] + out
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _mode_for(tokenizer, ex: PreferenceExample, mode: str) -> str:
    if mode not in ("auto", "chat", "raw"):
        raise ValueError(f"mode must be 'auto', 'chat' or 'raw', got {mode!r}")
    if mode == "auto":
        return "raw" if (ex.meta.get("raw_prompt") or not getattr(tokenizer, "chat_template", None)) else "chat"
    if mode == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("mode='chat' but the tokenizer has no chat template; use mode='raw' or set one")
    return mode


def tokenize_prompt_response(tokenizer, ex: PreferenceExample, response: str, index: int, *, mode: str = "auto",
                             system_prompt: str | None = None, raw_separator: str = " ") -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one example and one response (untruncated)."""
    m = _mode_for(tokenizer, ex, mode)
    if m == "chat":
        msgs = prompt_messages(ex, index, system_prompt)
        p_text = _render(tokenizer, msgs, generation_prompt=True)
        full = _render(tokenizer, msgs + [{"role": "assistant", "content": response}], generation_prompt=False)
        p_ids = _ids(tokenizer, p_text)
        if full.startswith(p_text):
            r_ids = _ids(tokenizer, full[len(p_text):])
        else:  # template re-renders the history differently once an answer follows
            r_ids = _ids(tokenizer, response) + _eos(tokenizer)
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        p_ids = bos + _ids(tokenizer, ex.prompt)
        r_ids = _ids(tokenizer, raw_separator + response) + _eos(tokenizer)
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and len(p_ids) >= 2 and p_ids[0] == bos_id and p_ids[1] == bos_id:
        p_ids = p_ids[1:]  # a template that writes BOS and a tokenizer that adds it: keep one
    if not p_ids:
        raise DataError(f"row {index}: field 'prompt' has zero tokens")
    if not r_ids:
        raise DataError(f"row {index}: response has zero tokens")
    return p_ids, r_ids


def chat_token_lengths(tokenizer, *, mode: str = "auto", system_prompt: str | None = None,
                       raw_separator: str = " "):
    """``lengths(example, row) -> {"prompt": n, "chosen": n, "rejected": n}``: the untruncated
    token counts :func:`encode_chat_pairs` (same arguments) sees, for
    :func:`~alignshift.data.schema.check_lengths`."""
    def lengths(ex: PreferenceExample, index: int) -> dict[str, int]:
        kw = dict(mode=mode, system_prompt=system_prompt, raw_separator=raw_separator)
        p_ids, c_ids = tokenize_prompt_response(tokenizer, ex, ex.chosen, index, **kw)
        _, r_ids = tokenize_prompt_response(tokenizer, ex, ex.rejected, index, **kw)
        return {"prompt": len(p_ids), "chosen": len(c_ids), "rejected": len(r_ids)}
    return lengths


def _truncate_prompt(ids: list[int], max_len: int, bos_id) -> tuple[list[int], bool]:
    if len(ids) <= max_len:
        return ids, False
    if bos_id is not None and ids[0] == bos_id and max_len > 1:
        return [ids[0]] + ids[len(ids) - (max_len - 1):], True
    return ids[len(ids) - max_len:], True


def encode_chat_pairs(
    tokenizer,
    examples: Sequence[PreferenceExample | dict],
    *,
    max_prompt_len: int,
    max_completion_len: int,
    mode: str = "auto",
    system_prompt: str | None = None,
    raw_separator: str = " ",
    return_info: bool = False,
    kl_pairing: str = "trl",
):
    """Encode pairs with an HF tokenizer into :data:`PAIR_KEYS` arrays (module docstring).
    ``kl_pairing`` chooses KTO's mismatched ``kl_*`` completions
    (:func:`alignshift.data.encode.kl_completion_sources`: ``"trl"`` or ``"previous_chosen"``).

    With ``return_info`` returns ``(arrays, info)``; ``info`` counts truncated prompts and
    responses and gives the untruncated length percentiles (to choose the budgets).
    """
    for name, v in (("max_prompt_len", max_prompt_len), ("max_completion_len", max_completion_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    exs = [validate_example(e, i) for i, e in enumerate(examples)]
    n, t = len(exs), max_prompt_len + max_completion_len
    kl_sources = kl_completion_sources(n, kl_pairing) if n else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bos_id = tokenizer.bos_token_id
    out = {k: np.zeros((n, max_prompt_len if k.startswith("prompt_") else t), np.int32) for k in PAIR_KEYS}
    for k in out:
        if k.endswith("input_ids") or k == "prompt_ids":
            out[k][:] = pad
    tok_cache: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
    n_prompt_trunc = 0
    n_resp_trunc = 0
    p_lens, r_lens = [], []

    def tokens(i: int, which: str, response: str):
        key = (i, which)
        if key not in tok_cache:
            tok_cache[key] = tokenize_prompt_response(tokenizer, exs[i], response, i, mode=mode,
                                                      system_prompt=system_prompt, raw_separator=raw_separator)
        return tok_cache[key]

    for i, ex in enumerate(exs):
        j, field = kl_sources[i]
        for group, which, resp in (("chosen", "chosen", ex.chosen), ("rejected", "rejected", ex.rejected),
                                   ("kl", "kl", getattr(exs[j], field))):
            p_ids, r_ids = tokens(i, which, resp)
            if group != "kl":
                p_lens.append(len(p_ids))
                r_lens.append(len(r_ids))
            p_ids, p_tr = _truncate_prompt(p_ids, max_prompt_len, bos_id)
            r_tr = len(r_ids) > max_completion_len
            r_ids = r_ids[:max_completion_len]
            if group == "chosen":
                n_prompt_trunc += int(p_tr)
            if group != "kl":
                n_resp_trunc += int(r_tr)
            lp, lr = len(p_ids), len(r_ids)
            out[f"{group}_input_ids"][i, :lp] = p_ids
            out[f"{group}_input_ids"][i, lp:lp + lr] = r_ids
            out[f"{group}_attention_mask"][i, :lp + lr] = 1
            out[f"{group}_loss_mask"][i, lp:lp + lr] = 1
            if group == "chosen":
                out["prompt_ids"][i, max_prompt_len - lp:] = p_ids
                out["prompt_mask"][i, max_prompt_len - lp:] = 1
    if not return_info:
        return out
    pct = (lambda xs, q: float(np.percentile(xs, q)) if xs else math.nan)
    info = {"n": n, "prompt_truncated": n_prompt_trunc, "responses_truncated": n_resp_trunc,
            "prompt_len_p50": pct(p_lens, 50), "prompt_len_p95": pct(p_lens, 95), "prompt_len_max": max(p_lens, default=0),
            "response_len_p50": pct(r_lens, 50), "response_len_p95": pct(r_lens, 95),
            "response_len_max": max(r_lens, default=0)}
    return out, info


# ---------------------------------------------------------------------------- length bucketing


def sequence_lengths(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-example real length: the longest of the right-padded ``*_attention_mask`` rows."""
    masks = [v for k, v in arrays.items() if k.endswith("_attention_mask") and np.ndim(v) == 2]
    if not masks:
        raise ValueError("no '*_attention_mask' arrays to measure lengths from")
    return np.max(np.stack([m.sum(axis=1) for m in masks]), axis=0)


class LengthBucketIterator(BatchIterator):
    """:class:`~alignshift.data.BatchIterator` that groups examples of similar length and
    trims each batch's padding to a multiple of ``bucket`` tokens.

    Each epoch: shuffle, cut into windows of ``window`` batches, sort each window by length,
    cut into batches, shuffle the batch order (all from ``default_rng([seed, epoch])``, so
    iteration stays deterministic and resumable). A batch's right-padded ``[B, T]`` arrays
    are cut to ``L = min(T, ceil(max_len / bucket) * bucket)`` columns and the left-padded
    ``prompt_ids``/``prompt_mask`` to their last ``ceil(max_prompt / bucket) * bucket``
    columns; only padding is removed, so losses are unchanged, and jit sees at most
    ``T / bucket`` distinct shapes.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, bucket: int = 64,
                 window: int = 64, shuffle: bool = True):
        super().__init__(arrays, batch_size, seed=seed, shuffle=shuffle)
        if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
            raise ValueError(f"bucket must be a positive int, got {bucket!r}")
        self.bucket, self.window = int(bucket), max(1, int(window))
        self.lengths = sequence_lengths(self.arrays)
        pm = self.arrays.get("prompt_mask")
        self.prompt_lengths = pm.sum(axis=1) if pm is not None else None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is not None and self._perm_cache[0] == epoch:
            return self._perm_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_examples) if self.shuffle else np.arange(self.num_examples)
        w = self.window * self.batch_size
        chunks = [order[a:a + w] for a in range(0, len(order), w)]
        order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        nb = self.steps_per_epoch
        batches = order[: nb * self.batch_size].reshape(nb, self.batch_size)
        if self.shuffle:
            batches = batches[rng.permutation(nb)]
        order = np.concatenate([batches.reshape(-1), order[nb * self.batch_size:]])
        self._perm_cache = (epoch, order)
        return order

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(step)
        b = self.bucket
        out = {}
        for k, v in self.arrays.items():
            x = v[idx]
            if k in ("prompt_ids", "prompt_mask") and self.prompt_lengths is not None:
                keep = min(x.shape[1], int(math.ceil(max(1, self.prompt_lengths[idx].max()) / b)) * b)
                x = x[:, x.shape[1] - keep:]
            elif x.ndim == 2 and (k.endswith(("_input_ids", "_attention_mask", "_loss_mask"))):
                keep = min(x.shape[1], int(math.ceil(max(1, self.lengths[idx].max()) / b)) * b)
                x = x[:, :keep]
            out[k] = x
        return out
