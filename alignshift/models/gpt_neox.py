"""GPT-NeoX (Pythia) causal language model in Flax NNX.

The module attribute tree mirrors Hugging Face names, so importing a checkpoint
is a pure name mapping (:func:`alignshift.models.hf_params.hf_name`, see
:func:`params_from_hf_state_dict`)::

    gpt_neox.embed_in.embedding                          <- gpt_neox.embed_in.weight
    gpt_neox.layers.{i}.{input,post_attention}_layernorm.{weight,bias}
    gpt_neox.layers.{i}.attention.query_key_value.kernel <- ...weight.T  (.bias <- .bias)
    gpt_neox.layers.{i}.attention.dense.kernel           <- ...weight.T
    gpt_neox.layers.{i}.mlp.dense_h_to_4h.kernel         <- ...weight.T
    gpt_neox.layers.{i}.mlp.dense_4h_to_h.kernel         <- ...weight.T
    gpt_neox.final_layer_norm.{weight,bias}
    embed_out.kernel                                     <- embed_out.weight.T (hub checkpoints)
                                                            or lm_head.weight.T (transformers>=5
                                                            module name); absent when tied

HF details reproduced here:

* the fused ``query_key_value`` output is viewed as ``[B, T, heads, 3 * head_dim]``
  and split *per head* into q / k / v (not as three contiguous [hidden] blocks);
* partial rotary: only the first ``rotary_ndims = int(head_dim * partial_rotary_factor)``
  dims of each q / k head are rotated (rotate_half layout), the rest pass through;
  inverse frequencies use ``rotary_ndims`` as the rotary dimension;
* parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` or sequential
  ``y = x + attn(ln1(x)); y + mlp(ln2(y))``;
* LayerNorm with bias, statistics in float32; ``hidden_act="gelu"`` is the exact (erf) GELU.
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
    to_numpy,
)
from alignshift.models.layers import (
    activation,
    apply_layer,
    apply_rotary,
    attention,
    CausalLM,
    embed_lookup,
    embedding,
    LayerNorm,
    linear,
    lm_logits,
    rope_cos_sin,
    rope_inv_freq,
    TokenLayout,
)

__all__ = [
    "GPTNeoXConfig",
    "GPTNeoXForCausalLM",
    "GPTNeoXModel",
    "GPTNeoXLayer",
    "GPTNeoXAttention",
    "GPTNeoXMLP",
    "hf_name",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class GPTNeoXConfig(HFConfig):
    """GPT-NeoX hyper-parameters with Hugging Face field names.

    Rotary settings are flattened: ``rope_theta`` and ``partial_rotary_factor``
    (``rope_parameters["rope_theta"]`` / ``["partial_rotary_factor"]`` in
    transformers 5, ``rotary_emb_base`` / ``rotary_pct`` in old config.json files),
    plus ``rope_scaling`` (``None`` for plain RoPE, else e.g.
    ``{"rope_type": "linear", "factor": 2.0}``). Defaults match Pythia / HF
    (``partial_rotary_factor=0.25``, parallel residual, exact GELU, untied head,
    biases everywhere). Hashable; don't mutate after building a model.
    """

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    initializer_range: float = 0.02
    remat: bool = False

    __hash__ = HFConfig.__hash__

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not 0.0 <= float(self.partial_rotary_factor) <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in [0, 1], got {self.partial_rotary_factor}")
        if self.rotary_ndims % 2 != 0:
            raise ValueError(f"rotary_ndims = int(head_dim * partial_rotary_factor) = {self.rotary_ndims} "
                             "must be even")
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings,
                                                   drop=("rope_theta", "partial_rotary_factor"))
        activation(self.hidden_act)  # fail early
        if self.rotary_ndims:
            rope_inv_freq(self.rotary_ndims, self.rope_theta, self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Rotated dims per head, ``int(head_dim * partial_rotary_factor)`` as in HF."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "GPTNeoXConfig":
        """Build from a ``transformers.GPTNeoXConfig`` (v4 or v5) or a config.json-style dict.

        Rotary settings are read from ``rope_parameters`` (transformers 5), then
        ``rope_scaling``, then the top-level ``rope_theta`` / ``partial_rotary_factor``
        or the original GPT-NeoX spellings ``rotary_emb_base`` / ``rotary_pct``.
        ``overrides`` (e.g. ``remat=True``) are applied last.
        """
        d = config_dict(config, (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "layer_norm_eps", "use_parallel_residual", "hidden_act",
            "rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rotary_pct",
            "partial_rotary_factor", "max_position_embeddings", "tie_word_embeddings",
            "attention_bias", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range"))

        theta, factor, rope_scaling = rope_from_hf(
            d, "GPT-NeoX", theta_keys=("rope_theta", "rotary_emb_base"),
            factor_keys=("partial_rotary_factor", "rotary_pct"), factor_default=0.25)

        return cls._from_hf_dict(
            d, overrides,
            required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"),
            optional=("layer_norm_eps", "hidden_act", "max_position_embeddings", "pad_token_id",
                      "bos_token_id", "eos_token_id", "initializer_range"),
            flags=("use_parallel_residual", "tie_word_embeddings", "attention_bias"),
            rope_theta=theta, partial_rotary_factor=factor, rope_scaling=rope_scaling)


# --------------------------------------------------------------------------- modules


class GPTNeoXAttention(nnx.Module):
    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        self.num_heads = c.num_attention_heads
        self.head_dim = c.head_dim
        self.rotary_ndims = c.rotary_ndims
        self.dtype = dtype
        args = (c.initializer_range, rngs, dtype, param_dtype)
        self.query_key_value = linear(c.hidden_size, 3 * c.hidden_size, c.attention_bias, *args)
        self.dense = linear(c.hidden_size, c.hidden_size, c.attention_bias, *args)

    def __call__(self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B,T,d]; mask bool [B,1,T,T] (None: causal, no padding); cos/sin float32 [B,T,rotary_ndims]."""
        B, T, _ = x.shape
        H, D, R = self.num_heads, self.head_dim, self.rotary_ndims
        # HF: view(B, T, H, 3*D) then chunk the last axis -> q, k, v interleaved per head
        qkv = self.query_key_value(x).reshape(B, T, H, 3 * D)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        if R == D:
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        elif R > 0:
            q = jnp.concatenate([apply_rotary(q[..., :R], cos, sin), q[..., R:]], axis=-1)
            k = jnp.concatenate([apply_rotary(k[..., :R], cos, sin), k[..., R:]], axis=-1)
        out = attention(q, k, v, mask, causal=True, scale=D ** -0.5, dtype=self.dtype)
        return self.dense(out)


class GPTNeoXMLP(nnx.Module):
    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        args = (c.initializer_range, rngs, dtype, param_dtype)
        # HF uses nn.Linear with its default bias=True here, independent of attention_bias
        self.dense_h_to_4h = linear(c.hidden_size, c.intermediate_size, True, *args)
        self.dense_4h_to_h = linear(c.intermediate_size, c.hidden_size, True, *args)
        self.hidden_act = c.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense_4h_to_h(activation(self.hidden_act)(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nnx.Module):
    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.use_parallel_residual = bool(config.use_parallel_residual)
        nkw = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = LayerNorm(config.hidden_size, **nkw)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, **nkw)
        self.attention = GPTNeoXAttention(config, **kw)
        self.mlp = GPTNeoXMLP(config, **kw)

    def __call__(self, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        attn = self.attention(self.input_layernorm(h), mask, cos, sin)
        if self.use_parallel_residual:
            return h + attn + self.mlp(self.post_attention_layernorm(h))
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))



class GPTNeoXModel(nnx.Module):
    """The decoder stack (HF ``GPTNeoXModel``): embed_in, layers, final_layer_norm."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.embed_in = embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                  rngs, dtype, param_dtype)
        self.layers = nnx.List([
            GPTNeoXLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for _ in range(config.num_hidden_layers)
        ])
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return embed_lookup(self.embed_in, input_ids, self.dtype)

    def __call__(self, inputs_embeds: jax.Array, layout: TokenLayout) -> jax.Array:
        """Decoder stack over ``inputs_embeds`` [B,T,d] laid out as ``layout`` (padded or packed rows)."""
        c = self.config
        positions = layout.positions
        R = c.rotary_ndims
        if R:
            cos, sin = rope_cos_sin(positions, rope_inv_freq(R, c.rope_theta, c.rope_scaling))
        else:
            cos = sin = jnp.zeros(positions.shape + (0,), jnp.float32)
        mask = layout.mask()
        h = inputs_embeds.astype(self.dtype)
        for layer in self.layers:
            h = apply_layer(layer, h, mask, cos, sin, remat=c.remat)
        return self.final_layer_norm(h)


class GPTNeoXForCausalLM(CausalLM, nnx.Module):
    """GPT-NeoX with an LM head (``embed_out``). ``model(input_ids, attention_mask=...)`` -> float32 logits."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.gpt_neox = GPTNeoXModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_out = None if config.tie_word_embeddings else linear(
            config.hidden_size, config.vocab_size, False, config.initializer_range, rngs, dtype, param_dtype)

    @property
    def _backbone(self):
        return self.gpt_neox

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        return lm_logits(self.gpt_neox.embed_in, self.embed_out, h, self.dtype)


# --------------------------------------------------------------------------- HF weight mapping

# non-parameter buffers found in some checkpoints (old causal-mask buffers, rotary caches)
_IGNORED_HF_SUFFIXES = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")
_HEAD_NAMES = ("embed_out.weight", "lm_head.weight")


def params_from_hf_state_dict(model: GPTNeoXForCausalLM, state_dict: Mapping[str, Any], *,
                              strict: bool = True) -> GPTNeoXForCausalLM:
    """Write HF-named tensors (numpy arrays or torch tensors) into ``model`` in place.

    Linear weights are transposed (HF [out, in] -> nnx kernel [in, out]); values are
    cast to each parameter's dtype. The head may be named ``embed_out.weight`` (hub
    checkpoints) or ``lm_head.weight`` (transformers>=5 ``state_dict()``); both are
    accepted and ignored for tied models. Buffers (``attention.bias``,
    ``attention.masked_bias``, ``rotary_emb.inv_freq``) are ignored. With ``strict``
    a ``KeyError`` lists every missing and unexpected name. Returns ``model``.
    """
    given = dict(state_dict)
    heads = [n for n in _HEAD_NAMES if n in given]
    if model.embed_out is None:
        for n in heads:
            given.pop(n)
    elif len(heads) == 2:
        a, b = (to_numpy(given[n]) for n in heads)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError("state dict holds both embed_out.weight and lm_head.weight with different values")
        given.pop("lm_head.weight")
    elif heads == ["lm_head.weight"]:
        given["embed_out.weight"] = given.pop("lm_head.weight")
    return load_state_dict(model, given, hf_name, model_name="GPTNeoXForCausalLM", strict=strict,
                           ignore_suffixes=_IGNORED_HF_SUFFIXES)


def params_to_hf_state_dict(model: GPTNeoXForCausalLM, *, head_name: str = "lm_head",
                            include_tied_head: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf_state_dict`: HF-named numpy arrays (Linear weights [out, in]).

    ``head_name="lm_head"`` (default) gives the names of the installed transformers'
    ``GPTNeoXForCausalLM.state_dict()``; ``"embed_out"`` gives the original checkpoint
    (Pythia hub) layout. Tied models also get the head (a copy of ``embed_in``) when
    ``include_tied_head`` (default), matching the keys of transformers' ``state_dict()``.
    """
    if head_name not in ("lm_head", "embed_out"):
        raise ValueError(f"head_name must be 'lm_head' or 'embed_out', got {head_name!r}")
    out = export_state_dict(model, hf_name)
    if "embed_out.weight" in out:
        out[f"{head_name}.weight"] = out.pop("embed_out.weight")
    elif include_tied_head:
        out[f"{head_name}.weight"] = out["gpt_neox.embed_in.weight"].copy()
    return out
