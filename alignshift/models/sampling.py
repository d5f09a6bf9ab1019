"""Batched, jitted autoregressive sampling for left-padded prompts.

Two decoders, same results (greedy tokens identical, logits equal up to float summation
order; ``tests/test_kv_cache.py``):

* **KV cache** (default when the model has one, ``model.supports_kv_cache``: Llama): one
  prefill forward over the prompt fills a per-layer key/value cache of ``P + max_new_tokens``
  slots, then each step runs the model on the ONE new token at its slot
  (``model.forward_cached``), attending to the cached keys/values.
* **No cache** (``use_cache=False``, or models without a cache path): a fixed-size token
  buffer [B, P + max_new_tokens] is kept and the full forward pass is recomputed every step.

Either way the whole decode loop is one ``jax.lax.while_loop`` under a single ``jax.jit``;
compiled functions are cached per (GraphDef, static settings), so repeated calls with the
same shapes do not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alignshift.models.layers import positions_from_mask

__all__ = ["generate", "top_p_filter", "sample_logits"]

_NEG_INF = -jnp.inf


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filtering on [..., V] logits: keep the smallest set of most likely
    tokens whose probability mass reaches ``top_p`` (the top-1 token is always
    kept); the rest are set to -inf. Same rule as HF ``TopPLogitsWarper``."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    inverse = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
    return jnp.where(keep, logits, _NEG_INF)


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature, top_p, greedy: bool,
                  use_top_p: bool) -> jax.Array:
    """Pick next tokens from [B, V] float32 logits -> [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _normalize_eos(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int,)) or hasattr(eos_id, "__index__"):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def _build(graphdef, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, greedy: bool,
           use_top_p: bool, use_cache: bool = True):
    def buffers(prompt_ids, prompt_mask):
        """Token and mask buffers ``[B, P + N]`` holding the (pad-sanitised) prompts, and the EOS ids."""
        B, P = prompt_ids.shape
        N = max_new_tokens
        L = P + N
        prompt_mask = prompt_mask.astype(jnp.int32)
        prompt_ids = jnp.where(prompt_mask > 0, prompt_ids.astype(jnp.int32), pad_id)
        tokens = jnp.full((B, L), pad_id, jnp.int32).at[:, :P].set(prompt_ids)
        mask = jnp.zeros((B, L), jnp.int32).at[:, :P].set(prompt_mask)
        eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
        return B, P, N, L, tokens, mask, eos

    def emit_token(i, logits_last, tokens, mask, done, *, P, eos, key, temperature, top_p):
        """Sample token ``i`` (slot P+i) from the logits of slot P+i-1; rows already done get
        padding (mask 0); a sampled EOS marks the row done."""
        nxt = sample_logits(logits_last, jax.random.fold_in(key, i), temperature=temperature,
                            top_p=top_p, greedy=greedy, use_top_p=use_top_p)
        alive = ~done
        nxt = jnp.where(alive, nxt, pad_id)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, P + i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, alive.astype(jnp.int32), P + i, axis=1)
        hit_eos = jnp.any(nxt[:, None] == eos[None, :], axis=-1) if eos_ids else jnp.zeros_like(done)
        return tokens, mask, done | (alive & hit_eos)

    def run(state, prompt_ids, prompt_mask, key, temperature, top_p):
        model = nnx.merge(graphdef, state)
        if use_cache and getattr(model, "supports_kv_cache", False):
            return _run_cached(model, prompt_ids, prompt_mask, key, temperature, top_p)
        B, P, N, L, tokens, mask, eos = buffers(prompt_ids, prompt_mask)

        def cond(carry):
            i, _, _, done = carry
            return (i < N) & ~jnp.all(done)

        def body(carry):
            i, tokens, mask, done = carry
            positions = positions_from_mask(mask)
            logits = model(tokens, attention_mask=mask, positions=positions)  # [B, L, V]
            last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
            tokens, mask, done = emit_token(i, last, tokens, mask, done, P=P, eos=eos, key=key,
                                            temperature=temperature, top_p=top_p)
            return i + 1, tokens, mask, done

        done0 = jnp.zeros((B,), jnp.bool_)
        _, tokens, mask, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, mask, done0))
        return tokens[:, P:], mask[:, P:]

    def _run_cached(model, prompt_ids, prompt_mask, key, temperature, top_p):
        B, P, N, L, tokens, mask, eos = buffers(prompt_ids, prompt_mask)

        emit = functools.partial(emit_token, P=P, eos=eos, key=key, temperature=temperature, top_p=top_p)

        # prefill: the whole (left-padded) prompt in one forward, filling slots 0..P-1
        cache = model.init_cache(B, L)
        logits, cache = model.forward_cached(tokens[:, :P], cache=cache, index=0, key_mask=mask,
                                             positions=positions_from_mask(mask[:, :P]))
        tokens, mask, done = emit(0, logits[:, -1], tokens, mask, jnp.zeros((B,), jnp.bool_))

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < N) & ~jnp.all(done)

        def body(carry):
            i, tokens, mask, done, cache = carry
            slot = P + i - 1  # the newest token: feed it, predict slot P + i
            tok = jax.lax.dynamic_slice_in_dim(tokens, slot, 1, axis=1)
            pos = jnp.maximum(jnp.sum(jnp.where(jnp.arange(L)[None, :] <= slot, mask, 0), axis=1) - 1, 0)
            logits, cache = model.forward_cached(tok, cache=cache, index=slot, key_mask=mask,
                                                 positions=pos[:, None].astype(jnp.int32))
            tokens, mask, done = emit(i, logits[:, 0], tokens, mask, done)
            return i + 1, tokens, mask, done, cache

        _, tokens, mask, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, mask, done, cache))
        return tokens[:, P:], mask[:, P:]

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _build_cached(graphdef, max_new_tokens, eos_ids, pad_id, greedy, use_top_p):
    return _build(graphdef, max_new_tokens, eos_ids, pad_id, greedy, use_top_p)


@functools.lru_cache(maxsize=32)
def _build_cached_nocache(graphdef, max_new_tokens, eos_ids, pad_id, greedy, use_top_p):
    return _build(graphdef, max_new_tokens, eos_ids, pad_id, greedy, use_top_p, use_cache=False)


def _get_fn(graphdef, *static, use_cache: bool = True):
    try:
        hash(graphdef)
    except TypeError:  # unhashable static attribute somewhere in the module: no caching
        return _build(graphdef, *static, use_cache=use_cache)
    return (_build_cached if use_cache else _build_cached_nocache)(graphdef, *static)


def generate(model: nnx.Module, prompt_ids, prompt_mask, *, key: jax.Array, max_new_tokens: int,
             eos_id: int | Sequence[int] | None, pad_id: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, use_cache: bool = True) -> tuple[jax.Array, jax.Array]:
    """Sample continuations for LEFT-padded prompts.

    Args:
      model: callable ``model(ids, attention_mask=, positions=) -> logits [B,T,V]``
        (e.g. ``LlamaForCausalLM``).
      prompt_ids, prompt_mask: [B, P]; prompts are left-padded (mask 0 on pads).
      key: PRNG key (ignored for greedy decoding).
      eos_id: an id, a sequence of ids (any of them stops a row), or None.
      temperature: ``0`` means greedy. top_p: nucleus mass (``1.0`` disables filtering).
      use_cache: decode with the model's KV cache when it has one (prefill + one token per
        step); ``False`` recomputes the full buffer every step (the reference decoder).

    Returns:
      ``(tokens, response_mask)``, both int32 [B, max_new_tokens]. ``response_mask`` is
      1 on generated tokens up to and including the first eos; later positions hold
      ``pad_id`` and mask 0.
    """
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_ids.shape[-1] < 1 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError("prompt_ids / prompt_mask must both be [B, P] with P >= 1")
    greedy = bool(greedy) or float(temperature) == 0.0
    if not greedy and float(temperature) < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    use_top_p = (not greedy) and float(top_p) < 1.0
    graphdef, state = nnx.split(model)
    fn = _get_fn(graphdef, int(max_new_tokens), _normalize_eos(eos_id), int(pad_id), greedy, use_top_p,
                 use_cache=bool(use_cache))
    if key is None:
        key = jax.random.key(0)
    return fn(state, prompt_ids, prompt_mask, key,
              jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p))
