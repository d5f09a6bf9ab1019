"""Hugging Face weight and config plumbing shared by the model files.

A model file supplies its architecture and a name map ``hf_name(path) -> (hf_weight_name,
transpose)`` from an nnx parameter path; this module turns that map into state-dict import
(:func:`load_state_dict`, with the missing / unexpected / shape checks) and export
(:func:`export_state_dict`). It also holds the config side: :class:`HFConfig` (the
hashable config dataclass base), :func:`config_dict`, and :func:`rope_from_hf` /
:func:`normalize_rope_scaling` (the transformers 4 / 5 rotary spellings).
:mod:`alignshift.models.hf` reads and writes checkpoint folders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.models.layers import _freeze

__all__ = [
    "HFConfig",
    "config_dict",
    "export_state_dict",
    "hf_name",
    "load_state_dict",
    "named_params",
    "normalize_rope_scaling",
    "rope_from_hf",
    "to_numpy",
]

HFName = Callable[[tuple], "tuple[str, bool]"]


# --------------------------------------------------------------------------- weights


def hf_name(path: tuple, *, transpose_kernel: bool = True) -> tuple[str, bool]:
    """The usual map of an nnx param path to ``(hf_weight_name, transpose)``.

    ``kernel`` -> ``weight`` (transposed: torch ``nn.Linear`` stores [out, in], unless
    ``transpose_kernel=False``); ``embedding`` / ``weight`` -> ``weight``; ``bias`` -> ``bias``.
    ``("model", "layers", 0, "self_attn", "q_proj", "kernel")`` ->
    ``("model.layers.0.self_attn.q_proj.weight", True)``.
    """
    *prefix, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join([*prefix, "weight"]), transpose_kernel
    if leaf in ("embedding", "weight"):
        return ".".join([*prefix, "weight"]), False
    if leaf == "bias":
        return ".".join([*prefix, "bias"]), False
    raise ValueError(f"no HF name for parameter path {path!r}")


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy/JAX array, a lazy tensor or a torch tensor (bf16/f16 -> f32)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def named_params(model: nnx.Module, name_map: HFName) -> dict[str, tuple[nnx.Param, bool]]:
    """``{hf_weight_name: (param, transpose)}`` for every ``nnx.Param`` of ``model``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            name, transpose = name_map(path)
            out[name] = (node, transpose)
    return out


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], name_map: HFName, *,
                    model_name: str, strict: bool = True, ignore_suffixes: Iterable[str] = (),
                    ignore_names: Iterable[str] = ()) -> nnx.Module:
    """Write HF-named tensors into ``model`` in place; returns ``model``.

    Names ending in ``ignore_suffixes`` (buffers) or in ``ignore_names`` are dropped. Then,
    with ``strict``, a ``KeyError`` lists every missing and unexpected name (``model_name``
    says what did not match). Weights are transposed where ``name_map`` says so, a shape
    mismatch raises ``ValueError`` naming the weight, and values are cast to each
    parameter's dtype.
    """
    params = named_params(model, name_map)
    suffixes, drop = tuple(ignore_suffixes), set(ignore_names)
    given = {k: v for k, v in state_dict.items() if not k.endswith(suffixes) and k not in drop}
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    if strict and (missing or unexpected):
        raise KeyError(f"HF state dict does not match {model_name}: missing={missing}, "
                       f"unexpected={unexpected}")
    for name, (var, transpose) in params.items():
        if name not in given:
            continue
        arr = to_numpy(given[name])
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"shape mismatch for {name}: got {arr.shape} (after transpose={transpose}), "
                             f"expected {tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, dtype=var.dtype))
    return model


def export_state_dict(model: nnx.Module, name_map: HFName) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_state_dict`: HF-named numpy arrays (transposed back where mapped)."""
    out = {}
    for name, (var, transpose) in named_params(model, name_map).items():
        arr = np.asarray(var[...])
        out[name] = arr.T if transpose else arr
    return out


# --------------------------------------------------------------------------- configs


class HFConfig:
    """Base of the model config dataclasses (HF field names): hash, ``to_dict``, ``from_dict``.

    The config is a static attribute of the model, so it ends up in the nnx GraphDef, a jit
    cache key: it must be hashable (don't mutate it after building a model). A
    ``@dataclass`` sets ``__hash__`` to ``None`` unless the class body defines it, so each
    subclass states ``__hash__ = HFConfig.__hash__``.
    """

    def __hash__(self) -> int:
        return hash(_freeze(dataclasses.asdict(self)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a dict, ignoring keys that are not fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def _resolve_heads(self) -> None:
        """For grouped-query configs (``head_dim``, ``num_key_value_heads``): fill their HF
        defaults (``hidden_size // num_attention_heads``, ``num_attention_heads``) and check
        that the kv heads divide the query heads and that ``head_dim`` is even (rotary)."""
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def _from_hf_dict(cls, d: Mapping[str, Any], overrides: Mapping[str, Any], *,
                      required: Iterable[str] = (), optional: Iterable[str] = (),
                      flags: Iterable[str] = (), **fields: Any):
        """``cls(**fields)`` plus fields read from the config.json-style dict ``d``:
        ``required`` as ``d[name]``, ``optional`` as ``d.get(name, field default)`` (the
        field defaults are transformers' defaults), ``flags`` as ``bool`` of that;
        ``overrides`` are applied last."""
        default = {f.name: f.default for f in dataclasses.fields(cls)}
        kwargs = {**fields, **{k: d[k] for k in required}}
        kwargs.update({k: d.get(k, default[k]) for k in optional})
        kwargs.update({k: bool(d.get(k, default[k])) for k in flags})
        kwargs.update(overrides)
        return cls(**kwargs)


def config_dict(config: Any, names: Iterable[str]) -> dict[str, Any]:
    """A config.json-style dict from a dict or a ``transformers`` config (whose ``to_dict`` may
    drop attributes equal to their defaults in some versions: ``names`` are filled back in)."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        for name in names:
            if name not in d and hasattr(config, name):
                d[name] = getattr(config, name)
        return d
    raise TypeError(f"expected a transformers config or a dict, got {type(config)!r}")


def _first(d: Mapping[str, Any], keys: Iterable[str], default: Any) -> Any:
    """``d[k]`` for the first key ``k`` of ``keys`` present in ``d`` (even if ``None``), else ``default``."""
    for k in keys:
        if k in d:
            return d[k]
    return default


def rope_from_hf(d: Mapping[str, Any], arch: str, *, theta_keys: Iterable[str] = ("rope_theta",),
                 factor_keys: Iterable[str] | None = None, factor_default: float = 1.0,
                 rope_types: Iterable[str] | None = None) -> tuple[float, float, dict | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)`` from a config dict ``d``.

    transformers 5 keeps rotary settings in ``rope_parameters`` (``rope_theta``,
    ``rope_type``, ``partial_rotary_factor``, scaling keys); transformers 4 in top-level
    ``rope_theta`` / ``partial_rotary_factor`` and ``rope_scaling`` (with ``type`` or
    ``rope_type``). ``rope_parameters`` wins over ``rope_scaling``, which wins over the
    top-level ``theta_keys`` / ``factor_keys`` (first present; then ``10000.0`` /
    ``factor_default``). ``rope_scaling`` comes back ``None`` for the default rope type,
    else ``{"rope_type": ..., **scaling keys}``.

    ``factor_keys=None``: partial rotary is unsupported, so a factor other than 1 (or
    ``None``) raises ``NotImplementedError`` and ``1.0`` is returned. ``rope_types``: the
    supported rope types (others raise ``NotImplementedError``), ``None`` = unchecked.
    Per-layer-type ``rope_parameters`` are not supported (``arch`` names the model).
    """
    rope_params = dict(d.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in rope_params.values()):
        raise NotImplementedError(f"per-layer-type rope_parameters are not supported for {arch}")
    merged = {**dict(d.get("rope_scaling") or {}), **rope_params}
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = _first(d, theta_keys, 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_types is not None and rope_type not in tuple(rope_types):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported for {arch}")
    if factor_keys is None:
        if merged.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) not in (None, 1.0):
            raise NotImplementedError("partial_rotary_factor != 1 is not supported")
        factor = 1.0
    else:
        factor = merged.pop("partial_rotary_factor", None)
        if factor is None:
            factor = _first(d, factor_keys, factor_default)
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **merged}
    return float(theta), float(factor), rope_scaling


def normalize_rope_scaling(rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int, *,
                           drop: Iterable[str] = ("rope_theta",)) -> dict | None:
    """A config's ``rope_scaling`` in one spelling: ``None`` for the default rope type, else a
    dict keyed ``rope_type`` (not ``type``) without the ``drop`` keys; ``llama3`` scaling gets
    ``original_max_position_embeddings`` (default ``max_position_embeddings``)."""
    if rope_scaling is None:
        return None
    rs = dict(rope_scaling)
    rtype = rs.pop("type", None)
    rs.setdefault("rope_type", rtype or "default")
    for k in drop:
        rs.pop(k, None)
    if rs["rope_type"] == "default":
        return None
    if rs["rope_type"] == "llama3":
        rs.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rs
