"""Model definitions (Flax NNX)."""

from alignshift.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    hf_name,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)
from alignshift.models.sampling import generate

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "generate",
    "hf_name",
    "params_from_hf_state_dict",
    "params_to_hf_state_dict",
]
