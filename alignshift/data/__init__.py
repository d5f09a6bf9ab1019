"""Data: preference schema, word tokenizer, the embedded ShiftBench benchmark, encoding and batching.

Pure numpy/python (no jax).
"""

from .encode import PAIR_KEYS, encode_completions, encode_pairs, encode_prompts
from .loader import BatchIterator
from .schema import DataError, PreferenceExample, validate_example, validate_examples
from .shiftbench import SCENARIOS, ShiftBenchData, make_scenario
from .tokenizer import WordTokenizer
from .preference_shift import SCENARIO_NAME as _PS_NAME, PreferenceShiftData, make_preference_shift, mix_reward

SCENARIOS[_PS_NAME] = make_preference_shift  # registered here: preference_shift builds on shiftbench

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
]
