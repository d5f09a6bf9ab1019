"""FLR: follow-up likelihood as reward (Zhang et al., AAAI 2025), and the Direct baseline.

A response ``y`` to a prompt ``x`` is scored by how likely a causal LM finds *positive* user
follow-ups ("That makes perfect sense!") versus *negative* ones ("That makes no sense!")
right after it (``docs/methods.md`` §5).

    scores = flr_scores(model, tokenizer, prompts, responses, dimension="understanding",
                        mode="likelihood", aggregate="difference")      # np.ndarray [N]

Follow-ups
    :data:`FOLLOWUPS` maps each of the six helpfulness dimensions (``understanding``,
    ``relevance``, ``correctness``, ``engagingness``, ``informativeness``, ``following``) to
    ``{"positive": [10 str], "negative": [10 str]}``, loaded from ``alignshift/data/followups.json``
    (:func:`alignshift.data.followup.load_followups`), with the exact characters of the authors' ``utils.py`` (typographic ’ vs
    straight ' apostrophes, and the three duplicated entries, kept). ``dimension="all"``
    (or a list of dimensions) pools them.

Templates (``template=``)
    * ``"base"`` (default; the authors' ``run_llama3.py``): ``user: x`` / ``assistant: y`` /
      ``user: f`` under the tokenizer's chat template, no system prompt, no generation prompt.
    * ``"swapped"`` (``run_llama3_ft.py``, for an FLR-LM fine-tuned on feedback, see
      :mod:`alignshift.rewards.mining`): ``user: FT_INSTRUCTION`` / ``assistant: x`` /
      ``user: y`` / ``assistant: f``.

    Hugging Face tokenizers need a ``chat_template``. The conversation is rendered with and
    without the follow-up turn; the rendered string of the shorter conversation must be a
    prefix of the longer one (true of Llama-3/Gemma/ChatML templates) and the suffix is
    tokenised as ``[turn header][f][turn end]`` in three pieces so that the follow-up's own
    tokens are known exactly. A :class:`~alignshift.data.WordTokenizer` (ShiftBench, whose
    prompts already read ``"user: ... assistant:"``) uses the word-level layout the
    ``followup`` scenario is written in: context ``<bos> x y <eos>``, follow-up turn
    ``user: f <eos>`` (base template only).

Score of one follow-up ``f`` (``mode=``)
    * ``"likelihood"`` (the paper's definition): ``s(f) = (1/n) Σ_t log p(f_t | context,
      f_<t)`` by teacher forcing, over ``f``'s own tokens; the turn-end token(s) are excluded
      unless ``include_eot=True``.
    * ``"repo"`` (the released code, for parity): tokenise ``f`` alone with the tokenizer's
      special tokens (``[BOS, f_1..f_n]``), take the logits row at position ``-(n+1)`` of the
      templated sequence (counted from its last token, the turn end), i.e. the row at
      ``f_1``, and average that row's RAW logits over those ``n+1`` ids. A bag-of-tokens
      logit at one position, not a likelihood (docs/methods.md §5.3).

Aggregation (``aggregate=``) over the follow-ups of the chosen dimension(s)
    ``"difference"``: ``mean_{f∈Pos} s(f) − mean_{f∈Neg} s(f)`` (default);
    ``"positive"``: ``mean_{f∈Pos} s(f)``; ``"negative"``: ``−mean_{f∈Neg} s(f)``.
    (With ``dimension="all"`` each dimension has 10 + 10 follow-ups, so the pooled difference
    equals the average of the six per-dimension differences.)

Batching and prefix reuse
    Contexts (x, y) are LEFT-padded into batches of ``batch_size``; all K follow-ups are
    scored for every context in one jitted call. With ``reuse_prefix=True`` (default, for
    models with a KV cache) the shared context runs ONCE per (x, y): a prefill fills the KV
    cache, which is then tiled K times and the K follow-up turns run on top of it. Without
    it, the K full sequences ``context + turn_k`` are recomputed from scratch (the
    reference path; same numbers up to float summation order). ``benchmarks/sampling_throughput.py``
    measures the speedup.

Direct baseline
    :func:`direct_scores`: the response's own length-normalised log-likelihood
    ``(1/|y|) Σ_t log p(y_t | x, y_<t)`` under the same template (``user: x`` /
    ``assistant: y``; for a WordTokenizer ``<bos> x y <eos>`` with ``<eos>`` counted as a
    response token, as in :func:`alignshift.data.encode_completions`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.data.followup import load_followups
from alignshift.losses.logps import mean_logps, sequence_logps
from alignshift.models.layers import positions_from_mask

__all__ = [
    "FOLLOWUPS",
    "DIMENSIONS",
    "MODES",
    "AGGREGATES",
    "TEMPLATES",
    "FT_INSTRUCTION",
    "followups_for",
    "followup_scores",
    "aggregate_scores",
    "flr_scores",
    "direct_scores",
    "render_followup",
    "render_direct",
]

#: dimension -> {"positive": [...], "negative": [...]}: the authors' exact follow-up utterances.
FOLLOWUPS: dict[str, dict[str, list[str]]] = load_followups()
DIMENSIONS: tuple[str, ...] = tuple(FOLLOWUPS)
MODES: tuple[str, ...] = ("likelihood", "repo")
AGGREGATES: tuple[str, ...] = ("difference", "positive", "negative")
TEMPLATES: tuple[str, ...] = ("base", "swapped")
#: The user turn that opens the role-swapped (fine-tuned FLR-LM) template.
FT_INSTRUCTION = "Please ask me a question and provide feedback to my answer."


def followups_for(dimension: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``(positive, negative)`` follow-ups of one dimension, a list of them, or ``"all"``."""
    dims = list(DIMENSIONS) if dimension == "all" else [dimension] if isinstance(dimension, str) else list(dimension)
    if not dims:
        raise ValueError("dimension: empty list")
    bad = [d for d in dims if d not in FOLLOWUPS]
    if bad:
        raise ValueError(f"dimension: unknown {bad}; valid: {list(DIMENSIONS)} or 'all'")
    return ([f for d in dims for f in FOLLOWUPS[d]["positive"]],
            [f for d in dims for f in FOLLOWUPS[d]["negative"]])


# --------------------------------------------------------------------------- tokenisation


def _is_word_tokenizer(tokenizer) -> bool:
    return not hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "bos_id")


def _hf_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _split_suffix(tokenizer, short_msgs, long_msgs, content: str, **kw):
    """Token ids of the rendered ``short_msgs`` and of the suffix the last message adds,
    the suffix split as ``(pre, content, post)`` token lists."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer has no chat_template (FLR renders conversations with it)")
    short = tokenizer.apply_chat_template(short_msgs, tokenize=False, **kw) if short_msgs else ""
    full = tokenizer.apply_chat_template(long_msgs, tokenize=False)
    if not full.startswith(short):
        raise ValueError("chat template: the rendered conversation without its last turn is not a prefix "
                         "of the rendered conversation (cannot isolate the last turn's tokens)")
    suffix = full[len(short):]
    at = suffix.rfind(content)
    if at < 0:
        raise ValueError(f"chat template altered the turn content {content!r} (e.g. stripped it)")
    return (_hf_ids(tokenizer, short), _hf_ids(tokenizer, suffix[:at]), _hf_ids(tokenizer, content),
            _hf_ids(tokenizer, suffix[at + len(content):]))


def render_followup(tokenizer, prompt: str, response: str, followup: str, *, template: str = "base"):
    """``(context_ids, turn_ids, f_start, f_end, repo_ids)`` for one conversation: the follow-up
    turn is ``turn_ids`` with ``f``'s own tokens at ``turn_ids[f_start:f_end]`` and the turn end
    after them; ``repo_ids`` = ``f`` tokenised alone with the tokenizer's special tokens."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if _is_word_tokenizer(tokenizer):
        if template != "base":
            raise ValueError("a WordTokenizer supports template='base' only")
        ctx = tokenizer.encode(f"{prompt} {response}", add_bos=True) + [tokenizer.eos_id]
        f_ids = tokenizer.encode(followup)
        turn = [tokenizer.token_to_id("user:")] + f_ids + [tokenizer.eos_id]
        return ctx, turn, 1, 1 + len(f_ids), [tokenizer.bos_id] + f_ids
    if template == "base":
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        last = {"role": "user", "content": followup}
    else:
        msgs = [{"role": "user", "content": FT_INSTRUCTION}, {"role": "assistant", "content": prompt},
                {"role": "user", "content": response}]
        last = {"role": "assistant", "content": followup}
    ctx, pre, f_ids, post = _split_suffix(tokenizer, msgs, msgs + [last], followup)
    repo = list(tokenizer(followup, add_special_tokens=True)["input_ids"])
    return ctx, pre + f_ids + post, len(pre), len(pre) + len(f_ids), repo


def render_direct(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: the templated prompt (generation prompt included) and the
    response tokens whose mean log-probability is the Direct reward."""
    if _is_word_tokenizer(tokenizer):
        return tokenizer.encode(prompt, add_bos=True), tokenizer.encode(response) + [tokenizer.eos_id]
    u = [{"role": "user", "content": prompt}]
    ctx, pre, r_ids, _ = _split_suffix(tokenizer, u, u + [{"role": "assistant", "content": response}],
                                       response, add_generation_prompt=False)
    return ctx + pre, r_ids


# --------------------------------------------------------------------------- jitted scoring


def _tile(x, reps):  # [B, ...] -> [B*reps, ...] (row b repeated reps times, contiguous)
    return jnp.repeat(x, reps, axis=0)


def _build_scorer(graphdef, reuse_prefix: bool):
    def run(state, ctx_ids, ctx_mask, turn_ids, turn_mask, score_mask, repo_row, repo_ids, repo_mask):
        model = nnx.merge(graphdef, state)
        B, C = ctx_ids.shape
        K, F = turn_ids.shape
        t_ids = jnp.tile(turn_ids, (B, 1))  # row b*K + k = context b, follow-up k
        t_mask = jnp.tile(turn_mask, (B, 1))
        full_mask = jnp.concatenate([_tile(ctx_mask, K), t_mask], axis=1)
        if reuse_prefix:
            cache = model.init_cache(B, C + F)
            ctx_key_mask = jnp.concatenate([ctx_mask, jnp.zeros((B, F), ctx_mask.dtype)], axis=1)
            ctx_logits, cache = model.forward_cached(ctx_ids, cache=cache, index=0, key_mask=ctx_key_mask,
                                                     positions=positions_from_mask(ctx_mask))
            cache = jax.tree_util.tree_map(lambda c: _tile(c, K), cache)
            turn_logits, _ = model.forward_cached(t_ids, cache=cache, index=C, key_mask=full_mask,
                                                  positions=positions_from_mask(full_mask)[:, C:])
            last = _tile(ctx_logits[:, -1], K)
        else:
            ids = jnp.concatenate([_tile(ctx_ids, K), t_ids], axis=1)
            logits = model(ids, attention_mask=full_mask)
            turn_logits, last = logits[:, C:], logits[:, C - 1]
        pred = jnp.concatenate([last[:, None], turn_logits[:, :-1]], axis=1)  # pred[:, j] predicts token j
        sm = jnp.tile(score_mask, (B, 1))
        lik = mean_logps(*sequence_logps(pred, t_ids, sm))
        row = jnp.take_along_axis(turn_logits, jnp.tile(repo_row, B)[:, None, None], axis=1)[:, 0]  # [BK, V]
        r_ids, r_mask = jnp.tile(repo_ids, (B, 1)), jnp.tile(repo_mask, (B, 1)).astype(jnp.float32)
        picked = jnp.take_along_axis(row, r_ids, axis=1)
        repo = (picked * r_mask).sum(1) / jnp.maximum(r_mask.sum(1), 1.0)
        return lik.reshape(B, K), repo.reshape(B, K)

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _scorer(graphdef, reuse_prefix: bool):
    return _build_scorer(graphdef, reuse_prefix)


def _get_scorer(graphdef, reuse_prefix):
    try:
        hash(graphdef)
    except TypeError:
        return _build_scorer(graphdef, reuse_prefix)
    return _scorer(graphdef, reuse_prefix)


def _check_inputs(prompts, responses):
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of str, not a single str")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for name, seq in (("prompts", prompts), ("responses", responses)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")


def _left_trunc(ids: list[int], max_len: int | None, bos: int | None) -> list[int]:
    if max_len is None or len(ids) <= max_len:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - max_len + 1:]
    return ids[len(ids) - max_len:]


def _pad_to(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def followup_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                    dimension: str | Sequence[str] = "understanding", template: str = "base",
                    include_eot: bool = False, batch_size: int = 8, reuse_prefix: bool | None = None,
                    max_context_len: int | None = None) -> dict:
    """Per-follow-up scores of every (prompt, response): ``{"likelihood": [N, K], "repo": [N, K],
    "is_positive": bool [K], "followups": [K str]}`` (positives first). See the module doc."""
    _check_inputs(prompts, responses)
    pos, neg = followups_for(dimension)
    followups = pos + neg
    K, N = len(followups), len(prompts)
    if reuse_prefix is None:
        reuse_prefix = bool(getattr(model, "supports_kv_cache", False))
    if reuse_prefix and not getattr(model, "supports_kv_cache", False):
        raise ValueError(f"reuse_prefix=True needs a model with a KV cache; {type(model).__name__} has none")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    out = {"likelihood": np.zeros((N, K)), "repo": np.zeros((N, K)),
           "is_positive": np.arange(K) < len(pos), "followups": followups}
    if N == 0:
        return out
    bos = getattr(tokenizer, "bos_id", getattr(tokenizer, "bos_token_id", None))
    # The follow-up turns are rendered once (with row 0's context) and every context once
    # (with the first follow-up): N + K renders, each checked against the shared pieces.
    rendered = [render_followup(tokenizer, prompts[0], responses[0], f, template=template) for f in followups]
    turns = [x[1:] for x in rendered]
    if any(x[0] != rendered[0][0] for x in rendered):  # pragma: no cover - template-dependent guard
        raise ValueError("row 0: the context tokens depend on the follow-up (template not prefix-stable)")
    contexts = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        x = rendered[0] if i == 0 else render_followup(tokenizer, p, r, followups[0], template=template)
        if x[1:] != turns[0]:  # pragma: no cover - template-dependent guard
            raise ValueError(f"row {i}: follow-up turn tokens depend on the context")
        contexts.append(_left_trunc(x[0], max_context_len, bos))
    F = _pad_to(max(len(t[0]) for t in turns))
    R = max(len(t[3]) for t in turns)
    turn_ids = np.zeros((K, F), np.int32)
    turn_mask = np.zeros((K, F), np.int32)
    score_mask = np.zeros((K, F), np.int32)
    repo_row = np.zeros((K,), np.int32)
    repo_ids = np.zeros((K, R), np.int32)
    repo_mask = np.zeros((K, R), np.int32)
    for k, (t, a, b, rid) in enumerate(turns):
        if b <= a:
            raise ValueError(f"follow-up {followups[k]!r} has no tokens")
        turn_ids[k, :len(t)] = t
        turn_mask[k, :len(t)] = 1
        score_mask[k, a:len(t) if include_eot else b] = 1
        row = len(t) - len(rid)
        if row < 0:
            raise ValueError(f"repo mode: follow-up {followups[k]!r} tokenised alone ({len(rid)} ids) is longer "
                             f"than its turn ({len(t)} tokens)")
        repo_row[k] = row
        repo_ids[k, :len(rid)] = rid
        repo_mask[k, :len(rid)] = 1
    C = _pad_to(max(len(c) for c in contexts))
    pad_id = int(getattr(tokenizer, "pad_id", getattr(tokenizer, "pad_token_id", 0)) or 0)
    ctx_ids = np.full((N, C), pad_id, np.int32)
    ctx_mask = np.zeros((N, C), np.int32)
    for i, c in enumerate(contexts):
        ctx_ids[i, C - len(c):] = c
        ctx_mask[i, C - len(c):] = 1
    graphdef, state = nnx.split(model)
    fn = _get_scorer(graphdef, bool(reuse_prefix))
    B = min(batch_size, N)
    lik, repo = [], []
    for a in range(0, N, B):
        idx = np.arange(a, a + B) % N  # the last batch is filled with repeats, then dropped
        l, r = fn(state, ctx_ids[idx], ctx_mask[idx], turn_ids, turn_mask, score_mask, repo_row, repo_ids, repo_mask)
        n = min(B, N - a)
        lik.append(np.asarray(l, np.float64)[:n])
        repo.append(np.asarray(r, np.float64)[:n])
    out["likelihood"], out["repo"] = np.concatenate(lik), np.concatenate(repo)
    return out


def aggregate_scores(per_followup: np.ndarray, is_positive: np.ndarray, aggregate: str = "difference") -> np.ndarray:
    """Reduce [N, K] follow-up scores to [N] rewards (see the module doc)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    s = np.asarray(per_followup, np.float64)
    is_positive = np.asarray(is_positive, bool)
    p = s[:, is_positive].mean(1) if is_positive.any() else np.zeros(len(s))
    n = s[:, ~is_positive].mean(1) if (~is_positive).any() else np.zeros(len(s))
    return {"difference": p - n, "positive": p, "negative": -n}[aggregate]


def flr_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
               dimension: str | Sequence[str] = "understanding", mode: str = "likelihood",
               aggregate: str = "difference", template: str = "base", include_eot: bool = False,
               batch_size: int = 8, reuse_prefix: bool | None = None,
               max_context_len: int | None = None) -> np.ndarray:
    """FLR reward of every (prompt, response): float64 array [N] (see the module doc).

    Args:
      model: one of our causal LMs (``model(ids, attention_mask=) -> logits``).
      tokenizer: a Hugging Face tokenizer with a chat template, or a WordTokenizer.
      dimension: one of :data:`DIMENSIONS`, a list of them, or ``"all"``.
      mode: ``"likelihood"`` (mean token log-prob of f, the paper) or ``"repo"``.
      aggregate: ``"difference"`` (pos − neg), ``"positive"`` or ``"negative"`` (−neg).
      template: ``"base"`` or ``"swapped"`` (fine-tuned FLR-LM).
      include_eot: count the turn-end token(s) in the likelihood mean.
      batch_size: contexts per jitted call (each runs all K follow-ups).
      reuse_prefix: run the shared (x, y) prefix once per context via the KV cache
        (default: when the model has one).
      max_context_len: truncate contexts from the left (keeping BOS) to this many tokens.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    s = followup_scores(model, tokenizer, prompts, responses, dimension=dimension, template=template,
                        include_eot=include_eot, batch_size=batch_size, reuse_prefix=reuse_prefix,
                        max_context_len=max_context_len)
    return aggregate_scores(s[mode], s["is_positive"], aggregate)


# --------------------------------------------------------------------------- Direct


@functools.lru_cache(maxsize=16)
def _direct_fn(graphdef):
    def run(state, ids, attn, loss_mask):
        logits = nnx.merge(graphdef, state)(ids, attention_mask=attn)
        return mean_logps(*sequence_logps(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:]))

    return jax.jit(run)


def direct_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                  batch_size: int = 16, max_len: int | None = None) -> np.ndarray:
    """Direct baseline: the response's length-normalised log-likelihood, float64 [N]."""
    _check_inputs(prompts, responses)
    N = len(prompts)
    if N == 0:
        return np.zeros((0,))
    rows = [render_direct(tokenizer, p, r) for p, r in zip(prompts, responses)]
    for i, (_, r) in enumerate(rows):
        if not r:
            raise ValueError(f"row {i}: response has no tokens")
    T = _pad_to(max(len(p) + len(r) for p, r in rows))
    if max_len is not None:
        T = min(T, int(max_len))
    pad_id = int(getattr(tokenizer, "pad_id", getattr(tokenizer, "pad_token_id", 0)) or 0)
    ids = np.full((N, T), pad_id, np.int32)
    attn = np.zeros((N, T), np.int32)
    lm = np.zeros((N, T), np.int32)
    for i, (p, r) in enumerate(rows):
        seq = (p + r)[:T]
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        lm[i, len(p):len(seq)] = 1
    graphdef, state = nnx.split(model)
    try:
        fn = _direct_fn(graphdef)
    except TypeError:
        fn = _direct_fn.__wrapped__(graphdef)
    B = min(batch_size, N)
    out = []
    for a in range(0, N, B):
        idx = np.arange(a, a + B) % N
        out.append(np.asarray(fn(state, ids[idx], attn[idx], lm[idx]), np.float64)[: min(B, N - a)])
    return np.concatenate(out)
