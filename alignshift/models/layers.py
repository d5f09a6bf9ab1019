"""Generic layers shared by the models: norms, activations, linear helpers, rotary position
embeddings, attention masks and token layouts (padded or packed rows), the one attention
function of every model (:func:`attention`; docs/attention.md), and the :class:`CausalLM`
entry points.

Conventions follow Hugging Face transformers:
  * norm parameters are called ``weight`` / ``bias`` (HF names), statistics computed in float32;
  * rotary embeddings use the "rotate_half" (non-interleaved) layout:
    ``x * cos + rotate_half(x) * sin`` with ``cos = cos(concat(freqs, freqs))``;
  * ``rope_inv_freq`` reproduces ``transformers.modeling_rope_utils`` for the
    "default", "linear" and "llama3" rope types.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# dtype names (as in configs and HF ``config.json``) -> JAX dtypes
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Large finite negative used for masked attention logits. Rows that attend to
# nothing (e.g. a left-pad query) then get a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None, **kwargs):
    """``jax.lax.dot_general`` for ``nnx.Linear(dot_general=...)`` that runs an ``[..., K] x [K, N]``
    projection as ONE 2-D matmul ``[prod(...), K] x [K, N]`` (same values).

    Why: the kernel gradient of a 3-D ``[B, T, K] x [K, N]`` contraction is a dot over two
    contracting dimensions, which XLA:CPU lowers with a full transpose of the ``[B, T, N]``
    output gradient (e.g. ``[8000, 4096]`` for an 8k-vocabulary LM head) before the matmul;
    flattened, the same gradient is a plain ``xᵀ·g``. Measured on a Llama MLP block
    ``[16, 256, 256] x [256, 688]`` + SiLU, forward + backward: 56 ms -> 22 ms (2-core CPU).
    Other contraction patterns (and explicit ``out_sharding``) go to ``lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if (lhs.ndim > 2 and rhs.ndim == 2 and not lb and not rb and out_sharding is None
            and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)):
        y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                                precision=precision, preferred_element_type=preferred_element_type, **kwargs)
        return y.reshape(*lhs.shape[:-1], rhs.shape[-1])
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def flat_attend(embed: nnx.Embed, h: jax.Array) -> jax.Array:
    """``embed.attend(h)`` (tied LM head, ``h @ Eᵀ``) over ``h`` flattened to 2-D (see
    :func:`flat_dot_general` for why)."""
    y = embed.attend(h.reshape(-1, h.shape[-1]))
    return y.reshape(*h.shape[:-1], y.shape[-1])


def embedding(num: int, dim: int, std: float, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.Embed:
    """``nnx.Embed`` with a ``normal(std)`` init."""
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=nnx.initializers.normal(std), rngs=rngs)


def embed_lookup(embed: nnx.Embed, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows ``ids`` of ``embed`` in ``dtype``; out-of-range ids (e.g. a pad id of -1) are
    clipped (``mode="clip"``), so they never produce NaN rows."""
    return jnp.take(embed.embedding[...], ids, axis=0, mode="clip").astype(dtype)


def lm_logits(embed: nnx.Embed, head: nnx.Linear | None, h: jax.Array, dtype: Any) -> jax.Array:
    """float32 logits from final hidden states ``h``: ``head(h)``, or the tied head
    ``h @ embedᵀ`` (in ``dtype``) when ``head`` is ``None``."""
    logits = flat_attend(embed, h.astype(dtype)) if head is None else head(h)
    return logits.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Llama / T5 style), parameter named ``weight``.

    ``zero_centered`` (Gemma): the scale is ``1 + weight`` (in float32) and ``weight`` starts at 0.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, zero_centered: bool = False):
        init = jnp.zeros if zero_centered else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype=param_dtype))
        self.eps = float(eps)
        self.dtype = dtype
        self.zero_centered = bool(zero_centered)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        scale = self.weight[...].astype(jnp.float32)
        if self.zero_centered:
            scale = 1.0 + scale
        return (y * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with HF parameter names ``weight`` / ``bias``; statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype=param_dtype)) if use_bias else None
        self.eps = float(eps)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        xc = x32 - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def linear(din: int, dout: int, bias: bool, std: float, rngs: nnx.Rngs, dtype: Any,
           param_dtype: Any) -> nnx.Linear:
    """``nnx.Linear`` with a ``normal(std)`` kernel init and :func:`flat_dot_general`."""
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs,
                      dot_general=flat_dot_general)


# --------------------------------------------------------------------------- activations


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,  # HF GELUActivation: erf-based
    "gelu_new": _gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,  # same function, different spelling of the polynomial
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """JAX version of ``transformers.activations.ACT2FN[name]`` for the supported names."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"activation {name!r} is not supported (supported: {sorted(_ACTIVATIONS)})") from None


# --------------------------------------------------------------------------- rotary


def _freeze(obj: Any) -> Any:
    """Recursively turn dicts/lists into hashable tuples (for caching / hashing)."""
    if isinstance(obj, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    return obj


def rope_inv_freq(head_dim: int, theta: float = 10000.0,
                  rope_scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """Inverse rotary frequencies, shape [head_dim // 2], float32 numpy.

    Mirrors transformers' ``_compute_default_rope_parameters``,
    ``_compute_linear_scaling_rope_parameters`` and ``_compute_llama3_parameters``
    (all computed in float32 like the torch code). Only rope types whose
    attention scaling factor is 1.0 are supported.
    """
    return _rope_inv_freq_cached(int(head_dim), float(theta), _freeze(rope_scaling or {})).copy()


@functools.lru_cache(maxsize=64)
def _rope_inv_freq_cached(head_dim: int, theta: float, frozen_scaling: tuple) -> np.ndarray:
    scaling = dict(frozen_scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    f32 = np.float32
    dim = head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponent)).astype(f32)

    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / f32(scaling["factor"])).astype(f32)
    if rope_type == "llama3":
        factor = f32(scaling["factor"])
        low_freq_factor = f32(scaling["low_freq_factor"])
        high_freq_factor = f32(scaling["high_freq_factor"])
        old_context_len = f32(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (f32(1) - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(f32)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer ``positions`` [..., T] -> two float32 arrays [..., T, 2*len(inv_freq)]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Apply rotary embedding to ``x`` [B, T, H, D] with cos/sin [B, T, D] (HF rotate_half layout).

    Computed in float32, returned in ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# --------------------------------------------------------------------------- masks


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids from a [B, T] 0/1 mask: ``clip(cumsum(mask) - 1, 0)`` (left-padding safe)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0).astype(jnp.int32)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids of a packed row [B, T]: the index within the token's segment (a segment is a
    contiguous run of equal ids; positions restart at 0 where the id changes)."""
    T = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """Boolean attention mask [B, 1, T, T] (query, key): key is real and key <= query."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
    key_ok = attention_mask.astype(jnp.bool_)[:, None, None, :]
    return causal[None, None] & key_ok


def sliding_window_mask(attention_mask: jax.Array, window: int) -> jax.Array:
    """Boolean [B, 1, T, T] mask: causal + padding + ``q - window < k`` (HF's
    ``sliding_window_overlay``: ``kv_idx > q_idx - window``), i.e. a query sees itself and
    the ``window - 1`` previous sequence indices (Gemma 2's sliding layers, Mistral)."""
    T = attention_mask.shape[-1]
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    return causal_padding_mask(attention_mask) & (k > q - window)[None, None]


def segment_mask(segment_ids: jax.Array, positions: jax.Array, branch_ids: jax.Array | None = None,
                 window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, T] mask of a packed (and optionally shared-prompt) row: query ``i`` sees
    key ``j`` iff both are in the same segment (``segment_ids``, 0 = padding, which sees and is
    seen by nothing), ``j <= i`` by index, and, with ``branch_ids``, ``branch[j] == 0`` (the
    shared prompt) or ``branch[j] == branch[i]`` (the same response). With a ``window`` also
    ``positions[i] - positions[j] < window``: sliding windows are measured in positions, not
    indices (in a shared-prompt row a rejected token's position continues from the prompt's
    end, while its index comes after the chosen response)."""
    T = segment_ids.shape[-1]
    seg_q, seg_k = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
    allowed = (seg_q == seg_k) & (seg_k != 0) & jnp.tril(jnp.ones((T, T), jnp.bool_))[None, None]
    if branch_ids is not None:
        br_q, br_k = branch_ids[:, None, :, None], branch_ids[:, None, None, :]
        allowed = allowed & ((br_k == 0) | (br_k == br_q))
    if window is not None:
        allowed = allowed & (positions[:, None, :, None] - positions[:, None, None, :] < window)
    return allowed


def cached_attention_mask(key_mask: jax.Array, index, n_new: int, window: int | None = None) -> jax.Array:
    """Boolean mask [B, 1, n_new, S] for ``n_new`` queries written at cache slots
    ``index .. index + n_new - 1``: key slot ``s`` is visible iff ``key_mask[b, s]`` and
    ``s <= `` the query's slot (the KV-cache analogue of :func:`causal_padding_mask`), and,
    with a ``window``, ``s > `` the query's slot ``- window`` (of :func:`sliding_window_mask`)."""
    S = key_mask.shape[-1]
    q_slots = index + jnp.arange(n_new, dtype=jnp.int32)
    s = jnp.arange(S, dtype=jnp.int32)[None, :]
    visible = s <= q_slots[:, None]
    if window is not None:
        visible = visible & (s > q_slots[:, None] - window)
    return visible[None, None] & key_mask.astype(jnp.bool_)[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """What the tokens of a ``[B, T]`` batch are: their ``positions`` (rotary / learned position
    ids) and who attends to whom, in one of two layouts:

    * padded (``attention_mask`` [B, T] 0/1, or None = no padding): one sequence per row,
      causal by index, padding keys invisible; sliding windows by index (HF's convention);
    * packed (``segment_ids`` [B, T], 0 = padding): several sequences per row, attention
      confined to a segment (:func:`segment_mask`), optionally with ``branch_ids`` (shared-prompt
      groups: 0 = the shared prompt, 1.. = the responses); sliding windows by position.

    Built by :meth:`CausalLM.hidden_states`; the backbones read :meth:`mask` once per kind of layer."""

    positions: jax.Array
    attention_mask: jax.Array | None = None
    segment_ids: jax.Array | None = None
    branch_ids: jax.Array | None = None

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def mask(self, window: int | None = None) -> jax.Array | None:
        """The boolean [B, 1, T, T] attention mask (``window``: a sliding-window layer's), or None
        when there is no padding and no packing: the layer then calls :func:`attention` with
        ``mask=None, causal=True, window=window`` (on a GPU, cuDNN's causal mask type, no mask
        tensor)."""
        if self.segment_ids is not None:
            return segment_mask(self.segment_ids, self.positions, self.branch_ids, window)
        if self.attention_mask is None:
            return None
        if window is None:
            return causal_padding_mask(self.attention_mask)
        return sliding_window_mask(self.attention_mask, window)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis with boolean ``mask``; fully masked rows stay finite."""
    scores = jnp.where(mask, scores.astype(jnp.float32), MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Soft-capping ``tanh(x / cap) * cap`` (identity when ``cap`` is ``None``)."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


# --------------------------------------------------------------------------- attention

#: ``implementation=`` values of :func:`attention`.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "jax")
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *, scale: float,
              dtype: Any, causal: bool = False, window: int | None = None, logit_cap: float | None = None,
              implementation: str = "auto") -> jax.Array:
    """Scaled dot-product attention, the one entry point of every model (self-attention, grouped
    queries, the KV cache). ``q`` [B,T,H,D], ``k``/``v`` [B,S,KV,D] with H a multiple of KV (query
    head ``h`` uses kv head ``h // (H // KV)``, HF ``repeat_kv``; KV == H is multi-head attention)
    -> [B,T,H*D] in ``dtype``.

    Which keys a query sees: ``mask`` (boolean, broadcastable to [B,1,T,S]), which is complete
    (causality and any sliding window already in it); or, with ``mask=None``, ``causal`` (key
    index <= query index, T == S) and ``window`` (query index - key index < window). ``causal``
    with a ``mask`` promises the mask is causal (a subset of key <= query), so a fused kernel may
    skip the upper triangle; it changes no value. ``logit_cap`` soft-caps the scaled scores
    before masking (Gemma 2, :func:`softcap`). Fully masked rows give a finite output.

    ``implementation``:

    * ``"xla"``: scores and softmax in float32 (``einsum`` with float32 accumulation, the
      masked float32 softmax, probabilities cast to ``dtype`` for the value product). Any mask,
      soft-capping, any dtype; the fastest lowering on a CPU (``benchmarks/attention_cpu.py``).
    * ``"cudnn"``: :func:`jax.nn.dot_product_attention` with cuDNN's fused (flash) kernel: GPU,
      bf16/fp16, no soft-cap; a plain causal (or causal sliding-window) attention runs with
      cuDNN's own mask type, any other mask as an additive bias (docs/attention.md).
    * ``"jax"``: :func:`jax.nn.dot_product_attention`'s XLA implementation with the same
      arguments as ``"cudnn"`` (checks the argument mapping on any backend).
    * ``"auto"`` (default): ``"cudnn"`` on a GPU when the inputs qualify (16-bit ``dtype``, no
      soft-cap, head dim a multiple of 8 and <= 128, even T and S when a mask is given), falling
      back to ``"xla"`` if cuDNN refuses them; ``"xla"`` everywhere else.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}; got {implementation!r}")
    if mask is None and window is not None and not causal:
        raise ValueError("attention: a sliding window without a mask needs causal=True")
    if implementation == "auto":
        if _cudnn_candidate(q, k, mask, dtype, logit_cap):
            try:
                return _attention_fused(q, k, v, mask, scale, dtype, causal, window, "cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # cuDNN missing or refusing this shape: the float32 path below
        implementation = "xla"
    if implementation == "xla":
        return _attention_xla(q, k, v, mask, scale, dtype, causal, window, logit_cap)
    if logit_cap is not None:
        raise ValueError(f"attention implementation {implementation!r} has no logit soft-capping; use 'xla'")
    return _attention_fused(q, k, v, mask, scale, dtype, causal, window,
                            "cudnn" if implementation == "cudnn" else None)


def _cudnn_candidate(q, k, mask, dtype, logit_cap) -> bool:
    if logit_cap is not None or jax.default_backend() != "gpu":
        return False
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _FUSED_DTYPES]:
        return False
    D = q.shape[-1]
    if D % 8 or D > 128:
        return False
    return mask is None or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def _attention_fused(q, k, v, mask, scale, dtype, causal, window, implementation):
    """:func:`jax.nn.dot_product_attention` (``implementation`` ``"cudnn"`` or None = XLA)."""
    B, T, H, D = q.shape
    kw: dict[str, Any] = {}
    if mask is not None:
        kw["mask"] = jnp.broadcast_to(mask, (B, 1, T, k.shape[1]))
    elif window is not None:
        kw["local_window_size"] = (int(window) - 1, 0)
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=scale,
                                       is_causal=bool(causal), implementation=implementation, **kw)
    return out.reshape(B, T, H * D)


def _attention_xla(q, k, v, mask, scale, dtype, causal, window, logit_cap):
    """The float32-softmax einsum path (see :func:`attention`)."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    if mask is None:
        if causal:
            qi, ki = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
            allowed = ki <= qi
            if window is not None:
                allowed = allowed & (ki > qi - window)
            mask = allowed[None, None]
    if KV == H:  # multi-head: 4-D einsums (XLA:CPU runs them faster than the grouped form with G = 1)
        scores = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
        scores = softcap(scores * scale, logit_cap)
        probs = jax.nn.softmax(scores, axis=-1) if mask is None else masked_softmax(scores, mask)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(dtype), v.astype(dtype))
        return out.reshape(B, T, H * D)
    q = q.astype(dtype).reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
    scores = softcap(scores * scale, logit_cap)
    probs = jax.nn.softmax(scores, axis=-1) if mask is None else masked_softmax(scores, mask[:, :, None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype))
    return out.reshape(B, T, H * D)


def _remat_call_layer(layer, h, *args):
    """``layer(h, *args)`` under ``jax.checkpoint``, functionally: the layer is split into
    (graphdef, state) and merged inside, so it works whether the weights are concrete, traced by
    an nnx transform, or merged from a pytree inside a plain ``jax.value_and_grad`` (the train
    step) -- ``nnx.remat`` raises a TraceContextError in that last case. A layer's forward
    mutates no state, so nothing needs writing back."""
    graphdef, state = nnx.split(layer)

    def run(state, h, *args):
        return nnx.merge(graphdef, state)(h, *args)

    return jax.checkpoint(run)(state, h, *args)


def apply_layer(layer, h: jax.Array, *args, remat: bool = False) -> jax.Array:
    """``layer(h, *args)``, under ``nnx.remat`` (activation recomputation) when ``remat``."""
    return _remat_call_layer(layer, h, *args) if remat else layer(h, *args)


def token_layout(shape: tuple[int, int], *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 branch_ids: jax.Array | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a ``shape = (B, T)`` batch from :meth:`CausalLM.hidden_states`'s
    keywords (one clear error for an impossible combination)."""
    B, T = shape
    for name, x in (("attention_mask", attention_mask), ("positions", positions),
                    ("segment_ids", segment_ids), ("branch_ids", branch_ids)):
        if x is not None and tuple(x.shape) != (B, T):
            raise ValueError(f"{name} must have shape [B, T] = {(B, T)}; got {tuple(x.shape)}")
    if segment_ids is None:
        if branch_ids is not None:
            raise ValueError("branch_ids (shared-prompt rows) need segment_ids (the packed layout)")
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if attention_mask is None
                         else positions_from_mask(attention_mask))
        return TokenLayout(positions=positions, attention_mask=attention_mask)
    if attention_mask is not None:
        raise ValueError("pass attention_mask (padded rows) or segment_ids (packed rows), not both")
    if positions is None:
        if branch_ids is not None:
            raise ValueError("shared-prompt rows (branch_ids) need explicit positions: a response's positions "
                             "continue from the prompt's end, not from the previous response")
        positions = positions_from_segments(segment_ids)
    return TokenLayout(positions=positions, segment_ids=segment_ids, branch_ids=branch_ids)


class CausalLM:
    """Entry points shared by our causal LMs (mixed into each ``nnx.Module`` LM class).

    A subclass provides ``_backbone`` (its HF-named decoder stack, e.g. ``self.model``, with
    ``embed(ids)`` and ``__call__(inputs_embeds, layout)``, ``layout`` a :class:`TokenLayout`) and
    ``logits_from_hidden(h)``. ``model(input_ids, attention_mask=...)`` -> float32 logits.

    Two batch layouts (keywords of ``__call__`` and :meth:`hidden_states`):

    * **padded** (as in HF): ``attention_mask`` [B, T] 0/1 (None = no padding), one sequence
      per row; ``positions`` default to :func:`positions_from_mask`;
    * **packed**: ``segment_ids`` [B, T] int (0 = padding, 1, 2, … = the sequences of a row,
      each a contiguous run of tokens): attention is confined to a segment and ``positions``
      (default: restarting at 0 in every segment, :func:`positions_from_segments`) are the
      tokens' positions within their sequence. With ``branch_ids`` [B, T] (shared-prompt
      groups ``[prompt | response 1 | response 2 | …]`` in one segment; 0 = the shared
      prompt, 1, 2, … = the responses) a response token sees the prompt and its own response
      only, and ``positions`` must be given (a response's positions continue from the
      prompt's end, as if the other responses were absent). Sliding windows are measured in
      positions. See :func:`segment_mask` and :mod:`alignshift.data.packing`.
    """

    @property
    def _backbone(self):  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings [B,T,d] (in ``dtype``) for ``inputs_embeds=`` (see the backbone's ``embed``)."""
        return self._backbone.embed(input_ids)

    def hidden_states(self, input_ids: jax.Array | None = None, *,
                      attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None,
                      inputs_embeds: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      branch_ids: jax.Array | None = None) -> jax.Array:
        """Final (normed) hidden states [B,T,d] in ``dtype``, i.e. the LM-head input (padded or
        packed layout: see the class docstring)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids / inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self._backbone(inputs_embeds, token_layout(inputs_embeds.shape[:2], attention_mask=attention_mask,
                                                          positions=positions, segment_ids=segment_ids,
                                                          branch_ids=branch_ids))

    # ------------------------------------------------------------------ KV cache (optional)
    @property
    def supports_kv_cache(self) -> bool:
        """True when the backbone offers ``init_cache`` / ``forward_cached`` (Llama does)."""
        return hasattr(self._backbone, "forward_cached")

    def init_cache(self, batch_size: int, max_len: int):
        """An empty KV cache for ``batch_size`` rows and ``max_len`` slots: a list with one
        ``(k, v)`` pair of zeros [B, max_len, n_kv_heads, head_dim] per layer (a pytree)."""
        if not self.supports_kv_cache:
            raise NotImplementedError(f"{type(self).__name__} has no KV-cache path")
        return self._backbone.init_cache(batch_size, max_len)

    def forward_cached(self, input_ids: jax.Array, *, cache, index, key_mask: jax.Array,
                       positions: jax.Array):
        """Run ``input_ids`` [B, T] written at cache slots ``index .. index+T-1``.

        ``key_mask`` [B, S] (S = cache length) marks the real slots (the new ones included);
        ``positions`` [B, T] are the new tokens' rotary positions. Returns ``(float32 logits
        [B, T, V], new_cache)``. Equals the no-cache forward of the whole sequence up to
        float summation order (masked keys get exactly zero weight)."""
        if not self.supports_kv_cache:
            raise NotImplementedError(f"{type(self).__name__} has no KV-cache path")
        h, cache = self._backbone.forward_cached(self.embed(input_ids), key_mask, positions, cache, index)
        return self.logits_from_hidden(h), cache

    def __call__(self, input_ids: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 branch_ids: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, V] (keywords as :meth:`hidden_states`)."""
        h = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions,
                               inputs_embeds=inputs_embeds, segment_ids=segment_ids, branch_ids=branch_ids)
        return self.logits_from_hidden(h)
