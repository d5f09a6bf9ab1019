"""Hugging Face checkpoint folders: import into our Flax NNX models and export back.

    model = load_hf_model("path/to/hf_folder", dtype=jnp.bfloat16, mesh=None)
    logits = model(input_ids, attention_mask=mask)          # [B, T, V] float32
    tokenizer = load_hf_tokenizer("path/to/hf_folder")      # AutoTokenizer, chat template included
    save_hf_model(model, "out_folder", tokenizer=tokenizer) # transformers can load it

Import reads ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``. The model skeleton is built abstractly
(``nnx.eval_shape``: no random initialisation is materialised) and tensors are read one at a
time, lazily, cast to the target ``param_dtype`` as they are read; so peak host memory is one
copy of the weights in the target dtype, never a full float32 copy of a bf16 checkpoint.
With a ``mesh``, parameters are then placed with the partition rules of
:mod:`alignshift.parallel.rules`.

Supported ``model_type`` values are the keys of :data:`ARCHITECTURES` (``mistral`` loads into
our Llama with its ``sliding_window``, and is exported back as ``mistral``).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.models.layers import DTYPES

__all__ = ["ARCHITECTURES", "load_hf_model", "load_hf_tokenizer", "save_hf_model", "read_hf_config"]

# model_type -> (module, config class, model class)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("alignshift.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    # Mistral = the Llama network (no biases) + sliding-window attention: LlamaConfig.sliding_window
    "mistral": ("alignshift.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "gemma": ("alignshift.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("alignshift.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gpt_neox": ("alignshift.models.gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gpt2": ("alignshift.models.gpt2", "GPT2Config", "GPT2LMHeadModel"),
}

# safetensors header dtypes we can load (cast to the target param dtype as they are read)
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}


def _architecture(model_type: str, where: str):
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{where}: unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    mod_name, cfg_name, model_name = ARCHITECTURES[model_type]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:  # an architecture registered before its module landed
        raise ValueError(f"{where}: model_type {model_type!r} is not available in this build ({e})") from None
    return mod, getattr(mod, cfg_name), getattr(mod, model_name)


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "model_type" not in cfg:
        raise ValueError(f"{cfg_path}: no 'model_type' key")
    return cfg


class _LazyTensor:
    """A tensor in a safetensors file, read (and cast) only when converted to an array."""

    def __init__(self, file: str, name: str, dtype):
        self.file, self.name, self.dtype = file, name, dtype

    def __array__(self, dtype=None, copy=None):
        from safetensors import safe_open

        with safe_open(self.file, framework="flax") as f:
            x = f.get_tensor(self.name)
        x = np.asarray(x.astype(self.dtype) if self.dtype is not None else x)
        return x if dtype is None else x.astype(dtype)


class LazySafetensors(Mapping):
    """A read-only mapping ``name -> lazy tensor`` over a (sharded) safetensors checkpoint."""

    def __init__(self, path: str, dtype=None):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="flax") as f:
                self._files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        missing = sorted({f for f in self._files.values() if not os.path.isfile(f)})
        if missing:
            raise FileNotFoundError(f"{path}: index lists missing shard file(s) {missing}")
        self._check_dtypes()
        self._dtype = dtype

    def _check_dtypes(self) -> None:
        """Every tensor must be stored as a float (reads only the file headers): an integer or
        boolean tensor (a quantized or corrupt checkpoint) would be cast to garbage silently."""
        from safetensors import safe_open

        for file in sorted(set(self._files.values())):
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    dt = f.get_slice(name).get_dtype()
                    if dt not in _FLOAT_STORAGE:
                        raise ValueError(
                            f"{file}: tensor {name!r} is stored as {dt}, not a floating-point dtype "
                            f"({sorted(_FLOAT_STORAGE)}); quantized or corrupt checkpoints are not supported"
                        )

    def __getitem__(self, k: str) -> _LazyTensor:
        return _LazyTensor(self._files[k], k, self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_hf_model(
    path: str,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    *,
    param_dtype: Any | None = None,
    remat: bool = False,
):
    """Load a local HF model folder into our Flax NNX model.

    ``dtype`` is the compute dtype; ``param_dtype`` (default: ``dtype``) the storage dtype.
    Raises a clear error for an unsupported ``model_type``, missing/unexpected weight names
    (listing them) and shape mismatches (naming the weight).
    """
    hf_cfg = read_hf_config(path)
    mod, cfg_cls, model_cls = _architecture(hf_cfg["model_type"], path)
    param_dtype = dtype if param_dtype is None else param_dtype
    for what, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
        if not jnp.issubdtype(jnp.dtype(dt), jnp.floating):
            raise ValueError(f"load_hf_model({path!r}): {what} must be a floating-point dtype, got {jnp.dtype(dt)}")
    declared = hf_cfg.get("dtype", hf_cfg.get("torch_dtype"))
    if declared is not None and declared not in (*DTYPES, "float64", "auto"):
        raise ValueError(f"{path}/config.json: key 'dtype' is {declared!r}; supported: {sorted(DTYPES)}")
    weights = LazySafetensors(path, dtype=param_dtype)
    try:
        cfg = cfg_cls.from_hf(hf_cfg)
    except KeyError as e:
        raise ValueError(f"{path}/config.json lacks required key {e.args[0]!r}") from None
    if remat:
        cfg.remat = True
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    try:
        mod.params_from_hf_state_dict(model, weights, strict=True)
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None
    if mesh is not None:
        from alignshift.parallel.rules import shard_params

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, shard_params(params, mesh), rest)
    return model


def load_hf_tokenizer(path: str):
    """The tokenizer (and chat template) saved in the same folder, via ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _model_type(model) -> str:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt:
        return mt
    for name, (mod_name, _, model_name) in ARCHITECTURES.items():
        if type(model).__name__ == model_name:
            return name
    raise ValueError(f"cannot tell the HF model_type of {type(model).__name__}")


def save_hf_model(model, path: str, *, tokenizer=None, dtype: str = "float32") -> None:
    """Write ``model`` as an HF folder (config.json + model.safetensors) that ``transformers``
    loads with ``AutoModelForCausalLM.from_pretrained(path)``; optionally the tokenizer too."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    model_type = _model_type(model)
    mod, _, _ = _architecture(model_type, "save_hf_model")
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("remat", "model_type")}
    if "rope_theta" in fields and "rope_parameters" not in fields:
        rp = {"rope_type": "default", "rope_theta": fields["rope_theta"]}
        if fields.get("rope_scaling"):
            rp.update(fields["rope_scaling"])
        fields["rope_parameters"] = rp
        fields.pop("rope_theta")
        fields.pop("rope_scaling", None)
    hf_cfg = AutoConfig.for_model(model_type, **fields)
    hf_cfg.dtype = dtype
    os.makedirs(path, exist_ok=True)
    hf_cfg.save_pretrained(path)
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"save_hf_model: dtype must be float32 or float16 (numpy safetensors); got {dtype!r}")
    sd = {k: np.ascontiguousarray(np.asarray(v, dtype=np_dtype)) for k, v in mod.params_to_hf_state_dict(model).items()}
    tmp = os.path.join(path, ".model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
