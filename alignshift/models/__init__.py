"""Model definitions (Flax NNX)."""

from alignshift.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    hf_name,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)
from alignshift.models.hf import ARCHITECTURES, load_hf_model, load_hf_tokenizer, save_hf_model
from alignshift.models.sampling import generate

__all__ = [
    "ARCHITECTURES",
    "load_hf_model",
    "load_hf_tokenizer",
    "save_hf_model",
    "LlamaConfig",
    "LlamaForCausalLM",
    "generate",
    "hf_name",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]
