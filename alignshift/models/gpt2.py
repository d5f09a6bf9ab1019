"""GPT-2 causal language model in Flax NNX.

The module attribute tree mirrors Hugging Face names, so importing a checkpoint
is a pure name mapping (see :func:`hf_name` / :func:`params_from_hf_state_dict`)::

    transformer.wte.embedding                   <- transformer.wte.weight
    transformer.wpe.embedding                   <- transformer.wpe.weight   (learned positions)
    transformer.h.{i}.{ln_1,ln_2}.{weight,bias}
    transformer.h.{i}.attn.c_attn.kernel        <- ...c_attn.weight   (NOT transposed)
    transformer.h.{i}.attn.c_proj.kernel        <- ...c_proj.weight   (NOT transposed)
    transformer.h.{i}.mlp.{c_fc,c_proj}.kernel  <- ...weight          (NOT transposed)
    transformer.ln_f.{weight,bias}
    lm_head.kernel                              <- lm_head.weight.T (only when untied; GPT-2 ties it)

HF GPT-2 uses ``Conv1D`` layers whose weight is stored as ``[in, out]``, which is
already the nnx ``Linear`` kernel layout, so those weights are copied as is; only
an (untied) ``lm_head`` is an ``nn.Linear`` and gets transposed. Checkpoints
without the ``transformer.`` prefix (the original ``openai-community/gpt2`` files)
are accepted too.

HF details reproduced here: ``c_attn`` output is split into three contiguous
``[n_embd]`` blocks q | k | v, each viewed as ``[heads, head_dim]``;
``inputs_embeds`` are token embeddings *before* the position embeddings are
added; ``activation_function="gelu_new"`` is the tanh GELU approximation;
``scale_attn_weights`` / ``scale_attn_by_inverse_layer_idx`` are honoured
(``reorder_and_upcast_attn`` needs no special path: scores are always float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.models import hf_params
from alignshift.models.hf_params import HFConfig, config_dict, export_state_dict, load_state_dict
from alignshift.models.layers import (
    activation,
    apply_layer,
    attention,
    CausalLM,
    embed_lookup,
    embedding,
    LayerNorm,
    linear,
    lm_logits,
    TokenLayout,
)

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "GPT2Block",
    "GPT2Attention",
    "GPT2MLP",
    "hf_name",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class GPT2Config(HFConfig):
    """GPT-2 hyper-parameters with Hugging Face field names (``n_embd``, ``n_layer``, ...).

    The generic names used by the other models (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``,
    ``intermediate_size``, ``head_dim``) are read-only properties. Hashable; don't
    mutate after building a model.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    initializer_range: float = 0.02
    remat: bool = False

    __hash__ = HFConfig.__hash__

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        activation(self.activation_function)  # fail early

    # generic (HF attribute_map) names
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "GPT2Config":
        """Build from a ``transformers.GPT2Config`` or a config.json-style dict.

        Accepts both the GPT-2 spellings (``n_embd``, ``n_layer``, ``n_head``,
        ``n_positions``) and the generic ones (``hidden_size``, ...).
        ``overrides`` (e.g. ``remat=True``) are applied last.
        """
        d = config_dict(config, (
            "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
            "activation_function", "layer_norm_epsilon", "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
            "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range",
            "add_cross_attention"))
        if d.get("add_cross_attention"):
            raise NotImplementedError("GPT-2 with cross-attention is not supported")

        def pick(name, alias, default=None):
            if d.get(name) is not None:
                return d[name]
            if d.get(alias) is not None:
                return d[alias]
            if default is None:
                raise KeyError(f"config has neither {name!r} nor {alias!r}")
            return default

        return cls._from_hf_dict(
            d, overrides,
            optional=("n_inner", "activation_function", "layer_norm_epsilon", "pad_token_id",
                      "bos_token_id", "eos_token_id", "initializer_range"),
            flags=("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                   "tie_word_embeddings"),
            vocab_size=d["vocab_size"],
            n_positions=pick("n_positions", "max_position_embeddings", 1024),
            n_embd=pick("n_embd", "hidden_size"),
            n_layer=pick("n_layer", "num_hidden_layers"),
            n_head=pick("n_head", "num_attention_heads"))


# --------------------------------------------------------------------------- modules


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        self.num_heads = c.n_head
        self.head_dim = c.head_dim
        self.dtype = dtype
        scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = float(scale)
        proj_std = c.initializer_range / (2 * c.n_layer) ** 0.5  # HF init for c_proj
        self.c_attn = linear(c.n_embd, 3 * c.n_embd, True, c.initializer_range, rngs, dtype, param_dtype)
        self.c_proj = linear(c.n_embd, c.n_embd, True, proj_std, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x [B,T,d]; mask bool [B,1,T,T] (None: causal, no padding)."""
        B, T, d = x.shape
        H, D = self.num_heads, self.head_dim
        # HF: c_attn(x).split(n_embd, dim=2) -> contiguous q | k | v blocks
        qkv = self.c_attn(x).reshape(B, T, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v, mask, causal=True, scale=self.scale, dtype=self.dtype)
        return self.c_proj(out)


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        c = config
        proj_std = c.initializer_range / (2 * c.n_layer) ** 0.5
        self.c_fc = linear(c.n_embd, c.intermediate_size, True, c.initializer_range, rngs, dtype, param_dtype)
        self.c_proj = linear(c.intermediate_size, c.n_embd, True, proj_std, rngs, dtype, param_dtype)
        self.activation_function = c.activation_function

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(activation(self.activation_function)(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(config.n_embd, **nkw)
        self.attn = GPT2Attention(config, layer_idx, **kw)
        self.ln_2 = LayerNorm(config.n_embd, **nkw)
        self.mlp = GPT2MLP(config, **kw)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.ln_1(h), mask)
        return h + self.mlp(self.ln_2(h))



class GPT2Model(nnx.Module):
    """The decoder stack (HF ``GPT2Model``): wte, wpe, h, ln_f."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        std = config.initializer_range
        self.wte = embedding(config.vocab_size, config.n_embd, std, rngs, dtype, param_dtype)
        self.wpe = embedding(config.n_positions, config.n_embd, std, rngs, dtype, param_dtype)
        self.h = nnx.List([
            GPT2Block(config, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for i in range(config.n_layer)
        ])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype,
                              param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings only (no positions); out-of-range ids are clipped, never NaN."""
        return embed_lookup(self.wte, input_ids, self.dtype)

    def __call__(self, inputs_embeds: jax.Array, layout: TokenLayout) -> jax.Array:
        """Blocks over ``inputs_embeds`` [B,T,d] (token embeddings only) laid out as ``layout``."""
        c = self.config
        # positions beyond n_positions are clipped to the last learned one (HF would index-error)
        h = inputs_embeds.astype(self.dtype) + embed_lookup(self.wpe, layout.positions, self.dtype)
        mask = layout.mask()
        for block in self.h:
            h = apply_layer(block, h, mask, remat=c.remat)
        return self.ln_f(h)


class GPT2LMHeadModel(CausalLM, nnx.Module):
    """GPT-2 with an LM head (tied to ``wte`` unless ``tie_word_embeddings=False``).

    ``model(input_ids, attention_mask=...)`` -> float32 logits [B,T,V].
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.transformer = GPT2Model(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else linear(
            config.n_embd, config.vocab_size, False, config.initializer_range, rngs, dtype, param_dtype)

    @property
    def _backbone(self):
        return self.transformer

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        return lm_logits(self.transformer.wte, self.lm_head, h, self.dtype)


# --------------------------------------------------------------------------- HF weight mapping

# non-parameter causal-mask buffers found in older checkpoints
_IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def hf_name(path: tuple) -> tuple[str, bool]:
    """Map an nnx param path to ``(hf_weight_name, transpose)``.

    Conv1D kernels are stored [in, out] by HF, like nnx: no transpose. Only the
    ``lm_head`` (an ``nn.Linear``, present when untied) is transposed.
    ``("transformer", "h", 0, "attn", "c_attn", "kernel")`` ->
    ``("transformer.h.0.attn.c_attn.weight", False)``.
    """
    return hf_params.hf_name(path, transpose_kernel=str(path[0]) == "lm_head")


def params_from_hf_state_dict(model: GPT2LMHeadModel, state_dict: Mapping[str, Any], *,
                              strict: bool = True) -> GPT2LMHeadModel:
    """Write HF-named tensors (numpy arrays or torch tensors) into ``model`` in place.

    Conv1D weights are copied as is ([in, out]); an untied ``lm_head.weight`` is
    transposed. Keys without the ``transformer.`` prefix (original GPT-2 files) are
    accepted; ``lm_head.weight`` is ignored for tied models; ``attn.bias`` /
    ``attn.masked_bias`` buffers are ignored. With ``strict`` a ``KeyError`` lists
    every missing and unexpected name. Returns ``model``.
    """
    if not any(k.startswith("transformer.") and not k.endswith(_IGNORED_HF_SUFFIXES) for k in state_dict):
        state_dict = {k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in state_dict.items()}
    return load_state_dict(model, state_dict, hf_name, model_name="GPT2LMHeadModel", strict=strict,
                           ignore_suffixes=_IGNORED_HF_SUFFIXES,
                           ignore_names=("lm_head.weight",) if model.lm_head is None else ())


def params_to_hf_state_dict(model: GPT2LMHeadModel, *,
                            include_tied_head: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf_state_dict`: HF-named numpy arrays.

    With ``include_tied_head`` (default) a tied model also gets ``lm_head.weight``
    (a copy of ``transformer.wte.weight``), so the result has exactly the keys of
    transformers' ``GPT2LMHeadModel.state_dict()``.
    """
    out = export_state_dict(model, hf_name)
    if model.lm_head is None and include_tied_head:
        out["lm_head.weight"] = out["transformer.wte.weight"].copy()
    return out
