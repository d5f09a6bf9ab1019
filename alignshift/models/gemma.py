"""Gemma (1) and Gemma 2 causal language models in Flax NNX.

Follows the conventions of :mod:`alignshift.models.llama` (HF-named attribute
tree, ``nnx.List`` of layers, hashable config dataclass, float32 logits) and
reproduces Hugging Face transformers' ``GemmaForCausalLM`` /
``Gemma2ForCausalLM`` (eager attention path). Parameter names
(:func:`alignshift.models.hf_params.hf_name`)::

    model.embed_tokens.embedding                        <- model.embed_tokens.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.kernel    <- ...weight.T   (.bias <- .bias)
    model.layers.{i}.mlp.{gate,up,down}_proj.kernel     <- ...weight.T
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.{pre,post}_feedforward_layernorm.weight   (Gemma 2 only)
    model.norm.weight
    (no lm_head: embeddings are always tied; an HF ``lm_head.weight`` is ignored)

Details matched to transformers (which in places differ from the papers):

* RMSNorm: normalise in float32, multiply by ``(1 + weight)`` in float32, then
  cast (weights are stored zero-centred; HF inits them to 0).
* Input embeddings are multiplied by ``sqrt(hidden_size)`` *rounded to the
  compute dtype* (in bf16: 55.4256 -> 55.5, as HF does). :meth:`embed` returns
  the scaled embeddings (like HF's ``get_input_embeddings()(ids)``), so
  ``inputs_embeds`` passed to ``__call__`` are used as is (not re-scaled).
* Gemma 1: pre-norm block, ``post_attention_layernorm`` is the *pre-MLP* norm
  (Llama layout). Gemma 2: sandwich norms, ``post_attention_layernorm`` normalises
  the attention output, ``pre_/post_feedforward_layernorm`` wrap the MLP.
* Attention scale ``query_pre_attn_scalar ** -0.5`` (Gemma 2) or
  ``head_dim ** -0.5`` (Gemma 1); attention soft-cap ``tanh(s / c) * c`` on
  the scaled scores before masking; final logit soft-cap on the logits.
* Sliding-window layers: key index ``k`` is visible from query index ``q`` iff
  ``q - window < k <= q`` (HF ``sliding_window_overlay``: ``kv_idx > q_idx - window``),
  i.e. a query sees itself plus ``window - 1`` previous tokens. Like HF, the
  window is measured in sequence indices in padded batches (equal to position
  differences for left- or right-padded batches); in packed rows
  (:class:`~alignshift.models.layers.TokenLayout`) in positions. ``layer_types``
  (transformers 5) or the default alternating rule (layer 0 sliding, layer 1
  full, ...) decide which layers are sliding.
"""

from __future__ import annotations

import dataclasses
import math
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
    rope_from_hf,
)
from alignshift.models.layers import (
    apply_layer,
    apply_rotary,
    attention,
    CausalLM,
    embed_lookup,
    embedding,
    linear,
    lm_logits,
    RMSNorm,
    rope_cos_sin,
    rope_inv_freq,
    sliding_window_mask,
    softcap,
    TokenLayout,
)

__all__ = [
    "GemmaConfig",
    "GemmaForCausalLM",
    "GemmaModel",
    "GemmaDecoderLayer",
    "GemmaAttention",
    "GemmaMLP",
    "GemmaRMSNorm",
    "sliding_window_mask",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]

SLIDING = "sliding_attention"
FULL = "full_attention"
_MODEL_TYPES = ("gemma", "gemma2")
# hidden activation -> jax.nn.gelu(approximate=...)
_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}
# Gemma 2 defaults of transformers' Gemma2Config (used when a config dict omits them)
_GEMMA2_DEFAULTS = dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, sliding_window=4096)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class GemmaConfig(HFConfig):
    """Gemma / Gemma 2 hyper-parameters with Hugging Face field names.

    ``model_type`` ("gemma" or "gemma2") selects the block layout (Gemma 2 adds
    the post-attention / pre- and post-feed-forward norms). The Gemma 2 knobs
    (``query_pre_attn_scalar``, soft-caps, ``sliding_window``, ``layer_types``)
    default to "off" here; :meth:`from_hf` fills them from the HF config.
    ``query_pre_attn_scalar=None`` means ``head_dim`` (Gemma 1 scaling);
    ``layer_types=None`` means all-full for Gemma 1 and HF's alternating rule
    (even layers sliding) for Gemma 2. Hashable, like :class:`LlamaConfig`.
    """

    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    initializer_range: float = 0.02
    remat: bool = False

    __hash__ = HFConfig.__hash__

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {self.model_type!r}")
        self._resolve_heads()
        if self.hidden_activation not in _ACTIVATIONS:
            raise NotImplementedError(f"hidden_activation={self.hidden_activation!r} not supported "
                                      f"({sorted(_ACTIVATIONS)})")
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        if self.layer_types is None:
            if self.model_type == "gemma2":
                self.layer_types = [SLIDING if (i + 1) % 2 else FULL
                                    for i in range(self.num_hidden_layers)]
            else:
                self.layer_types = [FULL] * self.num_hidden_layers
        self.layer_types = [str(t) for t in self.layer_types]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected "
                             f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer_types {bad} (expected {SLIDING!r} / {FULL!r})")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types contains sliding_attention but sliding_window is None")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "GemmaConfig":
        """Build from a ``transformers.GemmaConfig`` / ``Gemma2Config`` (v4 or v5) or a config.json dict.

        Reads ``rope_parameters["rope_theta"]`` (transformers 5) or top-level
        ``rope_theta``; ``hidden_activation`` or ``hidden_act`` (Gemma 1's legacy
        ``"gelu"`` means the tanh approximation, as in transformers); ``layer_types``
        or the alternating rule. ``overrides`` (e.g. ``remat=True``) are applied last.
        """
        d = config_dict(config, (
            "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
            "hidden_activation", "attention_bias", "rope_parameters", "rope_scaling",
            "rope_theta", "query_pre_attn_scalar", "attn_logit_softcapping",
            "final_logit_softcapping", "sliding_window", "layer_types",
            "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
            "initializer_range", "use_bidirectional_attention"))

        model_type = d.get("model_type")
        if model_type is None:  # bare dict: guess from Gemma 2-only fields
            g2 = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "sliding_window", "layer_types")
            model_type = "gemma2" if any(k in d for k in g2) else "gemma"
        if model_type not in _MODEL_TYPES:
            raise NotImplementedError(f"model_type {model_type!r} is not supported (gemma, gemma2)")
        if not d.get("tie_word_embeddings", True):
            raise NotImplementedError("untied Gemma embeddings (tie_word_embeddings=False) are not supported")
        if d.get("use_bidirectional_attention"):
            raise NotImplementedError("use_bidirectional_attention=True is not supported")

        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if model_type == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # transformers' legacy remap for the official Gemma 1 configs

        theta, _, _ = rope_from_hf(d, "Gemma", rope_types=("default",))

        gemma2: dict[str, Any] = {}
        if model_type == "gemma2":
            for k, default in _GEMMA2_DEFAULTS.items():
                gemma2[k] = d.get(k, default)
            gemma2["layer_types"] = d.get("layer_types")
            if gemma2["layer_types"] is not None:
                gemma2["layer_types"] = list(gemma2["layer_types"])
        return cls._from_hf_dict(
            d, overrides,
            required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"),
            optional=("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                      "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range"),
            flags=("attention_bias",),
            model_type=model_type, rope_theta=theta, hidden_activation=act, **gemma2)


# --------------------------------------------------------------------------- modules


class GemmaRMSNorm(RMSNorm):
    """Gemma RMSNorm: ``normalise(x) * (1 + weight)`` in float32, then cast to ``dtype``.

    ``weight`` is zero-centred (initialised to 0, i.e. identity scaling).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        super().__init__(dim, eps=eps, dtype=dtype, param_dtype=param_dtype, zero_centered=True)


class GemmaAttention(nnx.Module):
    """Self-attention; ``window`` (a sliding layer's ``sliding_window``, else None) bounds how far
    back a query sees when no mask is given (a mask already holds the window)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, window: int | None = None):
        c = config
        self.window = window
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scaling = float(c.query_pre_attn_scalar) ** -0.5
        self.softcap = None if c.attn_logit_softcapping is None else float(c.attn_logit_softcapping)
        self.dtype = dtype
        args = (c.initializer_range, rngs, dtype, param_dtype)
        self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.attention_bias, *args)
        self.k_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, *args)
        self.v_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias, *args)
        self.o_proj = linear(c.num_attention_heads * c.head_dim, c.hidden_size, c.attention_bias, *args)

    def __call__(self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B,T,d]; mask bool [B,1,T,T] (None: causal, no padding, within the layer's ``window``
        if it is a sliding layer); cos/sin float32 [B,T,head_dim]."""
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x).reshape(B, T, H, D), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(B, T, KV, D), cos, sin)
        v = self.v_proj(x).reshape(B, T, KV, D)
        out = attention(q, k, v, mask, causal=True, window=self.window, scale=self.scaling, dtype=self.dtype,
                        logit_cap=self.softcap)
        return self.o_proj(out)


class GemmaMLP(nnx.Module):
    """GeGLU: ``down(gelu(gate(x)) * up(x))`` (tanh-approximate gelu by default)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        args = (c.initializer_range, rngs, dtype, param_dtype)
        self.approximate = _ACTIVATIONS[c.hidden_activation]
        self.gate_proj = linear(c.hidden_size, c.intermediate_size, False, *args)
        self.up_proj = linear(c.hidden_size, c.intermediate_size, False, *args)
        self.down_proj = linear(c.intermediate_size, c.hidden_size, False, *args)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.down_proj(gate * self.up_proj(x))


class GemmaDecoderLayer(nnx.Module):
    """Gemma 1 (pre-norm) or Gemma 2 (sandwich-norm) decoder block."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, window: int | None = None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.is_gemma2 = config.is_gemma2
        self.self_attn = GemmaAttention(config, window=window, **kw)
        self.mlp = GemmaMLP(config, **kw)
        nkw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, **nkw)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, **nkw)
        if self.is_gemma2:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, **nkw)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, **nkw)

    def __call__(self, h: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        if self.is_gemma2:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), mask, cos, sin))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        # Gemma 1: HF's "post_attention_layernorm" is the pre-MLP norm
        h = h + self.self_attn(self.input_layernorm(h), mask, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))



class GemmaModel(nnx.Module):
    """The decoder stack (HF ``GemmaModel`` / ``Gemma2Model``): embed_tokens, layers, norm."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      rngs, dtype, param_dtype)
        self.layers = nnx.List([
            GemmaDecoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              window=config.sliding_window if kind == SLIDING else None)
            for kind in config.layer_types
        ])
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Scaled input embeddings ``E[ids] * sqrt(hidden_size)`` in ``dtype`` (normaliser rounded to ``dtype``)."""
        x = embed_lookup(self.embed_tokens, input_ids, self.dtype)
        return x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype=self.dtype)

    def __call__(self, inputs_embeds: jax.Array, layout: TokenLayout) -> jax.Array:
        """Decoder stack over ``inputs_embeds`` [B,T,d] laid out as ``layout`` (padded or packed rows)."""
        c = self.config
        cos, sin = rope_cos_sin(layout.positions, rope_inv_freq(c.head_dim, c.rope_theta))
        windows = {FULL: None, SLIDING: c.sliding_window}
        masks = {kind: layout.mask(windows[kind]) for kind in set(c.layer_types)}
        h = inputs_embeds.astype(self.dtype)
        for layer, kind in zip(self.layers, c.layer_types):
            h = apply_layer(layer, h, masks[kind], cos, sin, remat=c.remat)
        return self.norm(h)


class GemmaForCausalLM(CausalLM, nnx.Module):
    """Gemma / Gemma 2 with tied LM head. ``model(input_ids, attention_mask=...)`` -> float32 logits [B,T,V]."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.model = GemmaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None  # always tied to model.embed_tokens

    @property
    def _backbone(self):
        return self.model

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Tied LM head (+ final logit soft-cap, applied in float32) -> float32 logits."""
        logits = lm_logits(self.model.embed_tokens, None, h, self.dtype)
        return softcap(logits, self.config.final_logit_softcapping)


# --------------------------------------------------------------------------- HF weight mapping

_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embed_tokens.embed_scale")


def params_from_hf_state_dict(model: GemmaForCausalLM, state_dict: Mapping[str, Any], *,
                              strict: bool = True) -> GemmaForCausalLM:
    """Write HF-named tensors (numpy arrays or torch tensors) into ``model`` in place.

    Linear weights are transposed (HF [out, in] -> kernel [in, out]); values are
    cast to each parameter's dtype. ``lm_head.weight`` (tied) and rotary /
    embed-scale buffers are ignored. With ``strict`` a ``KeyError`` lists every
    missing and unexpected name; a shape mismatch raises ``ValueError``. Returns ``model``.
    """
    return load_state_dict(model, state_dict, hf_name,
                           model_name=f"GemmaForCausalLM ({model.config.model_type})", strict=strict,
                           ignore_suffixes=_IGNORED_HF_SUFFIXES, ignore_names=("lm_head.weight",))


def params_to_hf_state_dict(model: GemmaForCausalLM) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf_state_dict`: HF-named numpy arrays (Linear weights [out, in]).

    ``lm_head.weight`` is not emitted (tied to ``model.embed_tokens.weight``).
    """
    return export_state_dict(model, hf_name)
