"""Data: preference schema, word tokenizer, the embedded ShiftBench benchmark, encoding and batching;
chat-template encoding for HF tokenizers (``chat``) and real-dataset adapters (``datasets``).

Pure numpy/python (no jax).
"""

from .chat import LengthBucketIterator, encode_chat_pairs
from .encode import PAIR_KEYS, encode_completions, encode_pairs, encode_prompts
from .loader import BatchIterator
from .schema import DataError, PreferenceExample, validate_example, validate_examples
from .shiftbench import SCENARIOS, ShiftBenchData, make_scenario
from .tokenizer import WordTokenizer
from .preference_shift import SCENARIO_NAME as _PS_NAME, PreferenceShiftData, make_preference_shift, mix_reward

SCENARIOS[_PS_NAME] = make_preference_shift  # registered here: preference_shift builds on shiftbench
from .synthetic_shift import SCENARIO_NAME as _SS_NAME, SyntheticShiftData, make_synthetic_shift  # noqa: E402

SCENARIOS[_SS_NAME] = make_synthetic_shift  # DoRA's mixture-of-sources scenario, also built on shiftbench
from .followup import SCENARIO_NAME as _FU_NAME, FollowupData, make_followup  # noqa: E402

SCENARIOS[_FU_NAME] = make_followup  # FLR: follow-up turns that track hidden response quality

__all__ = [
    "DataError",
    "PreferenceExample",
    "validate_example",
    "validate_examples",
    "WordTokenizer",
    "encode_completions",
    "encode_prompts",
    "encode_pairs",
    "PAIR_KEYS",
    "BatchIterator",
    "ShiftBenchData",
    "make_scenario",
    "SCENARIOS",
    "PreferenceShiftData",
    "make_preference_shift",
    "mix_reward",
    "SyntheticShiftData",
    "make_synthetic_shift",
    "FollowupData",
    "make_followup",
    "encode_chat_pairs",
    "LengthBucketIterator",
]
