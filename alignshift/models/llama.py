"""Llama causal language model in Flax NNX (also Mistral: the same network with
sliding-window attention, ``LlamaConfig(model_type="mistral", sliding_window=W)``).

The module attribute tree mirrors Hugging Face names, so importing a checkpoint
is a pure name mapping (:func:`alignshift.models.hf_params.hf_name`, see
:func:`params_from_hf_state_dict`)::

    model.embed_tokens.embedding                 <- model.embed_tokens.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.kernel  <- ...weight.T   (.bias <- .bias)
    model.layers.{i}.mlp.{gate,up,down}_proj.kernel   <- ...weight.T
    model.layers.{i}.{input,post_attention}_layernorm.weight
    model.norm.weight
    lm_head.kernel                               <- lm_head.weight.T  (absent when tied)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.models.hf_params import (
    HFConfig,
    config_dict,
    export_state_dict,
    hf_name,
    load_state_dict,
    normalize_rope_scaling,
    rope_from_hf,
)
from alignshift.models.layers import (
    apply_layer,
    apply_rotary,
    attention,
    cached_attention_mask,
    CausalLM,
    embed_lookup,
    embedding,
    linear,
    lm_logits,
    RMSNorm,
    rope_cos_sin,
    rope_inv_freq,
    TokenLayout,
)

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaDecoderLayer",
    "LlamaAttention",
    "LlamaMLP",
    "hf_name",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]


# --------------------------------------------------------------------------- config

_MODEL_TYPES = ("llama", "mistral")


@dataclasses.dataclass
class LlamaConfig(HFConfig):
    """Llama hyper-parameters with Hugging Face field names.

    ``rope_scaling`` is ``None`` for plain RoPE, or a dict such as
    ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``.
    Hashable (see :class:`~alignshift.models.hf_params.HFConfig`); don't
    mutate it after building a model.

    ``model_type`` is the HF architecture the weights come from and are exported as:
    ``"llama"`` or ``"mistral"`` (Mistral-7B = Llama without biases plus
    ``sliding_window``: a query attends to itself and the ``sliding_window - 1``
    previous positions, HF's ``kv_idx > q_idx - sliding_window``; ``None`` = full
    causal attention, as in Mistral v0.2+). A sliding window needs ``"mistral"``: HF's
    Llama has none, so an exported Llama would silently lose it.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    initializer_range: float = 0.02
    model_type: str = "llama"
    sliding_window: int | None = None
    remat: bool = False

    __hash__ = HFConfig.__hash__

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {self.model_type!r}")
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise ValueError(f"sliding_window={self.sliding_window} needs model_type='mistral' "
                                 "(HF Llama has no sliding-window attention)")
            if isinstance(self.sliding_window, bool) or self.sliding_window < 1:
                raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise ValueError("model_type='mistral' has no attention/MLP biases (HF MistralForCausalLM)")
        self._resolve_heads()
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        # fail early on unsupported rope types
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        """The fields (``sliding_window`` only for Mistral: HF's Llama config has no such key)."""
        d = super().to_dict()
        if self.model_type == "llama":
            d.pop("sliding_window")
        return d

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "LlamaConfig":
        """Build from a ``transformers.LlamaConfig`` / ``MistralConfig`` (v4 or v5) or a
        config.json-style dict (``model_type`` ``"mistral"`` keeps ``sliding_window``;
        any other is read as Llama).

        Handles both the old spelling (``rope_theta`` + ``rope_scaling`` with
        ``type``/``rope_type``) and the transformers-5 one (``rope_parameters``
        holding ``rope_theta`` and ``rope_type``). ``overrides`` (e.g. ``remat=True``)
        are applied last.
        """
        d = config_dict(config, (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id",
            "rope_parameters", "rope_scaling", "rope_theta", "hidden_act",
            "initializer_range", "model_type", "sliding_window"))

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act={act!r} not supported (only silu)")

        theta, _, rope_scaling = rope_from_hf(d, "Llama")
        model_type = "mistral" if d.get("model_type") == "mistral" else "llama"

        return cls._from_hf_dict(
            d, overrides,
            required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"),
            optional=("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                      "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range"),
            flags=("tie_word_embeddings", "attention_bias", "mlp_bias"),
            model_type=model_type, rope_theta=theta, rope_scaling=rope_scaling,
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None)


# --------------------------------------------------------------------------- modules


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.window = c.sliding_window
        self.dtype = dtype
        args = (c.initializer_range, rngs, dtype, param_dtype)
        self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.attention_bias, *args)
        self.k_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, *args)
        self.v_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, *args)
        self.o_proj = linear(c.num_attention_heads * c.head_dim, c.hidden_size, c.attention_bias, *args)

    def __call__(self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B,T,d]; mask bool [B,1,T,T] (None: causal, no padding); cos/sin float32 [B,T,head_dim]."""
        q, k, v = self._qkv(x, cos, sin)
        return self.o_proj(attention(q, k, v, mask, causal=True, window=self.window,
                                     scale=self.head_dim ** -0.5, dtype=self.dtype))

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Projected heads: rotated q [B,T,H,D] and k [B,T,KV,D], and v [B,T,KV,D]."""
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, KV, D)
        v = self.v_proj(x).reshape(B, T, KV, D)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward_cached(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
                       k_cache: jax.Array, v_cache: jax.Array, index):
        """KV-cache variant of ``__call__``: x [B,T,d] are the tokens at cache slots
        ``index..index+T-1``; mask bool [B,1,T,S]; caches [B,S,KV,D]. Returns (out, k, v)."""
        q, k, v = self._qkv(x, cos, sin)
        start = (0, index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
        out = attention(q, k_cache, v_cache, mask, scale=self.head_dim ** -0.5, dtype=self.dtype)
        return self.o_proj(out), k_cache, v_cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        args = (c.initializer_range, rngs, dtype, param_dtype)
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, *args)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, *args)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, c.mlp_bias, *args)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, **kw)
        self.mlp = LlamaMLP(config, **kw)
        nkw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **nkw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **nkw)

    def __call__(self, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        h = h + self.self_attn(self.input_layernorm(h), mask, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_cached(self, h, mask, cos, sin, k_cache, v_cache, index):
        a, k_cache, v_cache = self.self_attn.forward_cached(self.input_layernorm(h), mask, cos, sin,
                                                            k_cache, v_cache, index)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k_cache, v_cache



class LlamaModel(nnx.Module):
    """The decoder stack (HF ``LlamaModel``): embed_tokens, layers, norm."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      rngs, dtype, param_dtype)
        self.layers = nnx.List([
            LlamaDecoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for _ in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return embed_lookup(self.embed_tokens, input_ids, self.dtype)

    def __call__(self, inputs_embeds: jax.Array, layout: TokenLayout) -> jax.Array:
        """Decoder stack over ``inputs_embeds`` [B,T,d] laid out as ``layout`` (padded or packed rows)."""
        c = self.config
        cos, sin = rope_cos_sin(layout.positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        mask = layout.mask(c.sliding_window)
        h = inputs_embeds.astype(self.dtype)
        for layer in self.layers:
            h = apply_layer(layer, h, mask, cos, sin, remat=c.remat)
        return self.norm(h)

    def init_cache(self, batch_size: int, max_len: int):
        """Zero KV cache: one ``(k, v)`` pair [B, max_len, n_kv_heads, head_dim] per layer."""
        c = self.config
        shape = (int(batch_size), int(max_len), c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.layers]

    def forward_cached(self, inputs_embeds: jax.Array, key_mask: jax.Array, positions: jax.Array,
                       cache, index):
        """Decoder stack over new tokens at cache slots ``index..`` (see ``CausalLM.forward_cached``)."""
        c = self.config
        cos, sin = rope_cos_sin(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        mask = cached_attention_mask(key_mask, index, inputs_embeds.shape[1], window=c.sliding_window)
        h = inputs_embeds.astype(self.dtype)
        new_cache = []
        for layer, (kc, vc) in zip(self.layers, cache):
            h, kc, vc = layer.forward_cached(h, mask, cos, sin, kc, vc, index)
            new_cache.append((kc, vc))
        return self.norm(h), new_cache


class LlamaForCausalLM(CausalLM, nnx.Module):
    """Llama with an LM head. ``model(input_ids, attention_mask=...)`` -> float32 logits [B,T,V]."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else linear(
            config.hidden_size, config.vocab_size, False, config.initializer_range, rngs, dtype, param_dtype)

    @property
    def _backbone(self):
        return self.model

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        return lm_logits(self.model.embed_tokens, self.lm_head, h, self.dtype)


# --------------------------------------------------------------------------- HF weight mapping

_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def params_from_hf_state_dict(model: LlamaForCausalLM, state_dict: Mapping[str, Any], *,
                              strict: bool = True) -> LlamaForCausalLM:
    """Write HF-named tensors (numpy arrays or torch tensors) into ``model`` in place.

    Linear weights are transposed (HF [out, in] -> nnx kernel [in, out]); values
    are cast to each parameter's dtype. With ``strict`` a ``KeyError`` lists every
    missing and unexpected name. ``lm_head.weight`` is accepted and ignored for
    tied models; rotary ``inv_freq`` buffers are ignored. Returns ``model``.
    """
    return load_state_dict(model, state_dict, hf_name, model_name="LlamaForCausalLM", strict=strict,
                           ignore_suffixes=_IGNORED_HF_SUFFIXES,
                           ignore_names=("lm_head.weight",) if model.lm_head is None else ())


def params_to_hf_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf_state_dict`: HF-named numpy arrays (Linear weights as [out, in])."""
    return export_state_dict(model, hf_name)
