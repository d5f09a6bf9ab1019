"""Model definitions (Flax NNX)."""

from alignshift.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    hf_name,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)
from alignshift.models.gemma import GemmaConfig, GemmaForCausalLM
from alignshift.models.gpt2 import GPT2Config, GPT2LMHeadModel
from alignshift.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM
from alignshift.models.hf import ARCHITECTURES, load_hf_model, load_hf_tokenizer, save_hf_model
from alignshift.models.sampling import generate

__all__ = [
    "GemmaConfig",
    "GemmaForCausalLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPTNeoXConfig",
    "GPTNeoXForCausalLM",
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
