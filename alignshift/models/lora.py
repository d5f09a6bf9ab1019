"""LoRA adapters for our Flax NNX causal LMs (Llama, Gemma, GPT-NeoX, GPT-2).

    cfg = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    apply_lora(model, cfg, rngs=nnx.Rngs(0))            # in place; returns model
    graphdef, lora_params, rest = split_lora(model)     # trainable = adapters ONLY
    state = init_state(lora_params, tx)                 # alignshift.train.steps
    step = make_preference_step(graphdef, rest, tx, objective)
    state, m = step(state, batch, ref_params=reference_params(state["params"]))
    merge_lora(model)                                   # fold A@B into kernels, drop adapters
    save_peft_adapter(model, "out/adapter", cfg)        # (before merging) PEFT folder

Design
------
* Every matching ``nnx.Linear`` is replaced, at the same attribute, by a :class:`LoRALinear`
  (a subclass of ``nnx.Linear``) that *shares* the base layer's ``kernel``/``bias``
  variables and adds ``lora_a`` [in, r] (he-uniform, like PEFT's kaiming init) and
  ``lora_b`` [r, out] (zeros). Output: ``base(x) + (alpha / r) * (x @ lora_a @ lora_b)``.
  The base weight therefore stays at its HF-named path (``...q_proj.kernel``), the adapters
  are at ``...q_proj.lora_a`` / ``...q_proj.lora_b``.
* Adapters are ``nnx.LoRAParam`` variables (a subclass of ``nnx.Param``), so
  ``nnx.split(model, nnx.LoRAParam, ...)`` (:func:`split_lora`) isolates them: the optimizer
  state holds only the adapters; base weights live in the static ``rest``.
  NOTE: ``alignshift.train.steps.split_model`` filters on ``nnx.Param`` which *includes*
  ``LoRAParam``; use :func:`split_lora` (or :func:`split_for_training`) for a LoRA model.
* The reference model is "the policy with adapters disabled", done purely: the same graphdef
  and ``rest`` with the adapter leaves replaced by zeros (:func:`reference_params`). Since
  ``lora_b = 0`` gives ``base(x) + 0`` exactly, the reference forward equals the base model
  bit for bit, no second copy of the base weights is held, and it plugs into
  ``make_preference_step(...)(state, batch, ref_params=reference_params(state["params"]))``
  with no change to the steps. (A static "enabled" flag would need a second graphdef and a
  second compile; the zero tree costs one tiny extra ``x @ A @ B`` per targeted layer.)
* ``dropout`` is recorded (and exported to ``adapter_config.json``) but only ``0.0`` is
  supported: the pure train steps carry no RNG stream for a dropout mask.
* ``hf_name``/``params_to_hf_state_dict`` of the model modules know nothing about adapters:
  call :func:`merge_lora` before ``save_hf_model``, or :func:`save_peft_adapter` to write
  the adapters alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "LoRAConfig",
    "LoRAParam",
    "LoRALinear",
    "apply_lora",
    "lora_modules",
    "split_lora",
    "split_for_training",
    "reference_params",
    "zero_lora",
    "count_lora_params",
    "merge_lora",
    "lora_state_dict",
    "save_peft_adapter",
]

LoRAParam = nnx.LoRAParam  # subclass of nnx.Param; the adapters' variable type

DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters (PEFT names in brackets): ``rank`` (r), ``alpha`` (lora_alpha),
    ``dropout`` (lora_dropout, only 0.0 is supported), ``targets`` (target_modules).

    A target matches a module whose dotted path (e.g. ``model.layers.0.self_attn.q_proj``)
    equals it or ends with ``"." + target`` (PEFT's list semantics: ``"q_proj"``, ``"dense"``,
    ``"c_attn"``, ``"self_attn.o_proj"``), or, failing that, that ``re.fullmatch``-es it as a
    regular expression (e.g. ``r".*layers\\.1\\..*_proj"``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LoRAConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"enabled"})
        if unknown:
            raise ValueError(f"unknown LoRA config keys {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _matches(path: str, targets: Sequence[str]) -> bool:
    for t in targets:
        if path == t or path.endswith("." + t):
            return True
        try:
            if re.fullmatch(t, path):
                return True
        except re.error:
            pass
    return False


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` + low-rank adapter. Built from an existing ``nnx.Linear`` whose
    ``kernel``/``bias`` variables it shares (same attribute names, so same state paths)."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs,
                 a_init=nnx.initializers.he_uniform(), lora_param_dtype: Any = None):
        if isinstance(base, LoRALinear):
            raise ValueError("layer already has a LoRA adapter")
        self.kernel = base.kernel
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        for name in ("in_features", "out_features", "use_bias", "dtype", "param_dtype",
                     "precision", "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        pdt = lora_param_dtype if lora_param_dtype is not None else base.kernel.dtype
        self.lora_rank = int(rank)
        self.lora_alpha = float(alpha)
        self.lora_scale = float(alpha) / float(rank)
        self.lora_a = LoRAParam(a_init(rngs.params(), (self.in_features, self.lora_rank), pdt))
        self.lora_b = LoRAParam(jnp.zeros((self.lora_rank, self.out_features), pdt))

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        delta = (x @ a) @ b
        return y + (self.lora_scale * delta).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """``(alpha / r) * A @ B`` in float32, shape [in, out]."""
        a = jnp.asarray(self.lora_a[...], jnp.float32)
        b = jnp.asarray(self.lora_b[...], jnp.float32)
        return self.lora_scale * (a @ b)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _set_child(model, path, new) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def lora_modules(model) -> dict[str, LoRALinear]:
    """``{dotted module path: LoRALinear}`` of the model's adapters."""
    return {_path_str(p): n for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)}


def apply_lora(model, cfg: LoRAConfig, *, rngs: nnx.Rngs, param_dtype: Any = None):
    """Wrap, in place, every ``nnx.Linear`` whose path matches ``cfg.targets`` in a
    :class:`LoRALinear` (``lora_b = 0``, so the model's outputs are unchanged). Returns
    ``model``. ``param_dtype`` is the adapters' storage dtype (default: each base kernel's;
    pass ``jnp.float32`` to train fp32 adapters over a bf16 base). Raises if nothing matches (a typo in ``targets`` must not silently train
    nothing) or if ``cfg.dropout != 0``."""
    if cfg.dropout:
        raise NotImplementedError("LoRA dropout > 0 is not supported (the pure train steps carry "
                                  "no dropout RNG); set dropout=0.0")
    found = [(p, n) for p, n in nnx.iter_graph(model)
             if isinstance(n, nnx.Linear) and not isinstance(n, LoRALinear)
             and _matches(_path_str(p), cfg.targets)]
    if not found:
        names = sorted({str(p[-1]) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)})
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no nnx.Linear in "
                         f"{type(model).__name__}; its Linear names are {names}")
    for path, lin in found:
        _set_child(model, path, LoRALinear(lin, rank=cfg.rank, alpha=cfg.alpha, rngs=rngs,
                                           lora_param_dtype=param_dtype))
    return model


def split_lora(model):
    """``(graphdef, lora_params, rest)``: the adapters (trainable) and everything else (the
    frozen base weights included). Drop-in for ``split_model`` in the train steps."""
    return nnx.split(model, LoRAParam, ...)


def split_for_training(model):
    """:func:`split_lora` if the model has adapters, else ``nnx.split(model, nnx.Param, ...)``."""
    if lora_modules(model):
        return split_lora(model)
    return nnx.split(model, nnx.Param, ...)


def zero_lora(params):
    """The same tree with every adapter leaf zeroed (a fresh buffer, safe to pass next to a
    donated state). For a mixed tree only ``lora_a``/``lora_b`` leaves are zeroed."""

    def z(path, x):
        if isinstance(x, nnx.Variable):
            if isinstance(x, LoRAParam):
                return x.replace(jnp.zeros_like(x[...]))
            return x
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        while keys and keys[-1] in ("value", "raw_value"):  # nnx.Variable pytree leaf
            keys.pop()
        return jnp.zeros_like(x) if keys and keys[-1] in ("lora_a", "lora_b") else x

    return jax.tree_util.tree_map_with_path(z, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def reference_params(lora_params):
    """Params for the reference forward: the policy's graph with adapters disabled (zeroed).
    Use as ``ref_params=`` of ``make_preference_step`` with ``(graphdef, rest)`` of
    :func:`split_lora`; the result equals the base model exactly."""
    return zero_lora(lora_params)


def count_lora_params(model_or_params) -> int:
    params = model_or_params
    if isinstance(model_or_params, nnx.Module):
        params = nnx.state(model_or_params, LoRAParam)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def merge_lora(model):
    """Fold ``(alpha / r) * A @ B`` into each adapted kernel and put a plain ``nnx.Linear`` back
    (same ``kernel``/``bias`` paths, no adapters), in place. Returns ``model``; afterwards
    ``save_hf_model`` exports it as an ordinary HF checkpoint."""
    for path, lin in [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]:
        merged = (jnp.asarray(lin.kernel[...], jnp.float32) + lin.delta_kernel()).astype(lin.kernel.dtype)
        kw = dict(use_bias=lin.use_bias, dtype=lin.dtype, param_dtype=lin.param_dtype,
                  precision=lin.precision, dot_general=lin.dot_general,
                  promote_dtype=lin.promote_dtype, preferred_element_type=lin.preferred_element_type)
        plain = nnx.eval_shape(lambda: nnx.Linear(lin.in_features, lin.out_features, rngs=nnx.Rngs(0), **kw))
        lin.kernel.set_value(merged)
        plain.kernel = lin.kernel  # keep the Variable object (and its metadata / sharding)
        plain.bias = lin.bias if lin.bias is not None else nnx.data(None)
        _set_child(model, path, plain)
    return model


# --------------------------------------------------------------------------- PEFT export


def _hf_module_path(path: str) -> str:
    # Our attribute trees use HF names (model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn,
    # gpt_neox.layers.0.attention.query_key_value), so the module path IS the HF path.
    return path


def lora_state_dict(model) -> dict[str, np.ndarray]:
    """PEFT-named float32 numpy tensors: ``base_model.model.<path>.lora_A.weight`` [r, in] and
    ``...lora_B.weight`` [out, r] (torch ``nn.Linear`` layout, i.e. our A/B transposed)."""
    out = {}
    for path, lin in lora_modules(model).items():
        pre = f"base_model.model.{_hf_module_path(path)}"
        out[f"{pre}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lin.lora_a[...], np.float32).T)
        out[f"{pre}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lin.lora_b[...], np.float32).T)
    return out


def _peft_targets(model, mods) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly the adapted layers, else full paths."""
    leaves = {p.rsplit(".", 1)[-1] for p in mods}
    same_leaf = {_path_str(p) for p, n in nnx.iter_graph(model)
                 if isinstance(n, nnx.Linear) and str(p[-1]) in leaves}
    return sorted(leaves) if same_leaf == set(mods) else sorted(mods)


def save_peft_adapter(model, path: str, cfg: LoRAConfig, base_model_name_or_path: str = "") -> None:
    """Write a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``peft.PeftModel.from_pretrained(hf_model, path)`` loads onto the transformers model."""
    from safetensors.numpy import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (merged already?)")
    ranks = {m.lora_rank for m in mods.values()}
    alphas = {m.lora_alpha for m in mods.values()}
    if ranks != {cfg.rank} or alphas != {float(cfg.alpha)}:
        raise ValueError(f"adapters have rank(s) {sorted(ranks)} / alpha(s) {sorted(alphas)}, "
                         f"cfg says r={cfg.rank}, alpha={cfg.alpha}")
    mt = getattr(model.config, "model_type", None) or type(model).__name__
    fan_in_fan_out = "gpt2" in str(mt).lower()  # HF GPT-2 Conv1D stores weights [in, out]
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(cfg.rank),
        "lora_alpha": float(cfg.alpha),
        "lora_dropout": float(cfg.dropout),
        "target_modules": _peft_targets(model, mods),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(adapter_cfg, f, indent=2, sort_keys=True)
    tmp = os.path.join(path, ".adapter_model.safetensors.tmp")
    save_file(lora_state_dict(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "adapter_model.safetensors"))
