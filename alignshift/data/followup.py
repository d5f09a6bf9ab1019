"""ShiftBench scenario ``followup`` (FLR): a corpus whose user follow-up turns track hidden
response quality, so a follow-up likelihood can recover preferences without labels.

The full specification (vocabulary, generation, labels, ground truth, defaults) is in
``docs/shiftbench.md`` (section ``followup``).
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from dataclasses import dataclass, field

import numpy as np

from .schema import PreferenceExample
from .shiftbench import (
    FILLER_WORDS,
    REQUEST_TEMPLATES,
    REQUEST_WORDS,
    ROLE_WORDS,
    TOPIC_NAMES,
    TOPIC_WORDS,
    ShiftBenchData,
    check_sizes,
    response_words,
    topic_of,
)
from .tokenizer import EOS, WordTokenizer

__all__ = ["SCENARIO_NAME", "FollowupWorld", "FollowupData", "make_followup", "followup_words"]

SCENARIO_NAME = "followup"
MIN_RESPONSE_WORDS = 3
P_REL_MAX = 0.8
P_OFF_TOPIC = 0.15
_MAX_ATTEMPTS = 100_000
_STREAM_SFT, _STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST = range(4)


@functools.lru_cache(maxsize=1)
def _followups_text() -> str:
    return resources.files("alignshift.data").joinpath("followups.json").read_text(encoding="utf-8")


def load_followups() -> dict[str, dict[str, list[str]]]:
    """FLR's follow-up utterances, ``{dimension: {"positive": [str], "negative": [str]}}``: the
    authors' exact texts, from ``alignshift/data/followups.json`` (keys starting with ``_`` are
    comments). The one reader of that file (:data:`alignshift.rewards.flr.FOLLOWUPS` is its result)."""
    out = {}
    for dim, v in json.loads(_followups_text()).items():
        if dim.startswith("_"):
            continue
        if set(v) != {"positive", "negative"} or not all(isinstance(s, str) for k in v for s in v[k]):
            raise ValueError(f"followups.json: dimension {dim!r} must hold 'positive' and 'negative' string lists")
        out[dim] = {"positive": list(v["positive"]), "negative": list(v["negative"])}
    return out



def followup_words(dimensions="all") -> list[str]:
    """Every word of the FLR follow-ups of ``dimensions`` (default all six), in order of first
    appearance."""
    fu = load_followups()
    out: dict[str, None] = {}
    for d, v in fu.items():
        if dimensions != "all" and d not in dimensions:
            continue
        for k in ("positive", "negative"):
            for f in v[k]:
                for w in f.split():
                    out.setdefault(w, None)
    return list(out)


@dataclass
class FollowupData(ShiftBenchData):
    """:class:`ShiftBenchData` plus the follow-up process (for inspection and tests)."""

    followup_dimensions: tuple[str, ...] = ()
    p_positive: object = None  # quality -> P(positive follow-up)
    world: object = field(default=None, repr=False)


class FollowupWorld:
    """The ground truth of ``followup``: vocabulary, samplers and scoring (see module doc)."""

    def __init__(self, *, max_response_words: int = 8, followup_slope: float = 1.5,
                 followup_center: float = 1.5, followup_dimensions=("understanding",)):
        fu = load_followups()
        dims = tuple(fu) if followup_dimensions == "all" else tuple(followup_dimensions)
        bad = [d for d in dims if d not in fu]
        if not dims or bad:
            raise ValueError(f"followup_dimensions: unknown {bad or '(empty)'}; valid: {list(fu)} or 'all'")
        self.dimensions = dims
        self.max_response_words = int(max_response_words)
        self.slope, self.center = float(followup_slope), float(followup_center)
        self.n_topics = len(TOPIC_NAMES)
        self._relevant = [frozenset(ws) for ws in TOPIC_WORDS]
        self._off_topic = [[w for s, ws in enumerate(TOPIC_WORDS) if s != t for w in ws] for t in range(self.n_topics)]
        self._pos = [f for d in dims for f in fu[d]["positive"]]
        self._neg = [f for d in dims for f in fu[d]["negative"]]
        words = list(ROLE_WORDS) + list(REQUEST_WORDS) + list(TOPIC_NAMES)
        words += [w for ws in TOPIC_WORDS for w in ws] + list(FILLER_WORDS)
        seen = set(words)
        words += [w for w in followup_words(dims) if not (w in seen or seen.add(w))]
        self.vocab_words = words

    # ----------------------------------------------------------------- scoring
    topic_of = staticmethod(topic_of)
    response_words = staticmethod(response_words)

    def quality(self, prompt: str, response: str) -> float:
        t = self.topic_of(prompt)
        if t is None:
            return 0.0
        return float(len(self._relevant[t].intersection(self.response_words(response))))

    def metrics(self, prompt: str, response: str) -> dict:
        return {"quality": self.quality(prompt, response), "length": float(len(self.response_words(response)))}

    def p_positive(self, quality: float) -> float:
        return 1.0 / (1.0 + math.exp(-self.slope * (float(quality) - self.center)))

    # ---------------------------------------------------------------- sampling
    def make_prompt(self, rng: np.random.Generator, topic: int) -> str:
        request = REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))]
        return f"{ROLE_WORDS[0]} {request} {TOPIC_NAMES[topic]} {ROLE_WORDS[1]}"

    def sample_response(self, rng: np.random.Generator, topic: int) -> str:
        length = int(rng.integers(MIN_RESPONSE_WORDS, self.max_response_words + 1))
        p_rel = rng.uniform(0.0, P_REL_MAX)
        u = rng.random((2, length))
        relevant, off = TOPIC_WORDS[topic], self._off_topic[topic]
        words = []
        for j in range(length):
            if u[0, j] < p_rel:
                words.append(relevant[int(u[1, j] * len(relevant))])
            elif u[0, j] < p_rel + (1.0 - p_rel) * P_OFF_TOPIC:
                words.append(off[int(u[1, j] * len(off))])
            else:
                words.append(FILLER_WORDS[int(u[1, j] * len(FILLER_WORDS))])
        return " ".join(words)

    def sample_followup(self, rng: np.random.Generator, quality: float) -> tuple[str, bool]:
        positive = bool(rng.random() < self.p_positive(quality))
        pool = self._pos if positive else self._neg
        return pool[int(rng.integers(len(pool)))], positive


def _pairs(world: FollowupWorld, rng, n: int, split: str) -> list[PreferenceExample]:
    out = []
    for _ in range(n):
        topic = int(rng.integers(world.n_topics))
        prompt = world.make_prompt(rng, topic)
        for _ in range(_MAX_ATTEMPTS):
            a, b = world.sample_response(rng, topic), world.sample_response(rng, topic)
            qa, qb = world.quality(prompt, a), world.quality(prompt, b)
            if qa != qb:
                break
        else:  # pragma: no cover
            raise RuntimeError("could not sample a pair with distinct qualities")
        (c, qc), (r, qr) = ((a, qa), (b, qb)) if qa > qb else ((b, qb), (a, qa))
        out.append(PreferenceExample(prompt, c, r, {"topic": topic, "split": split, "quality_chosen": qc,
                                                    "quality_rejected": qr}))
    return out


def make_followup(
    *,
    seed: int,
    n_train: int = 2000,
    n_val: int | None = None,
    n_test: int = 500,
    n_sft: int = 4000,
    max_response_words: int = 8,
    followup_rate: float = 0.5,
    followup_slope: float = 1.5,
    followup_center: float = 1.5,
    followup_dimensions=("understanding",),
) -> FollowupData:
    """Build the ``followup`` scenario (docs/shiftbench.md)."""
    n_val = check_sizes(seed, n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft)
    if not 0.0 <= followup_rate <= 1.0:
        raise ValueError(f"followup_rate must be in [0, 1], got {followup_rate}")
    if not followup_slope >= 0:
        raise ValueError(f"followup_slope must be >= 0, got {followup_slope}")
    if isinstance(max_response_words, bool) or not isinstance(max_response_words, (int, np.integer)) \
            or max_response_words < MIN_RESPONSE_WORDS:
        raise ValueError(f"max_response_words must be an int >= {MIN_RESPONSE_WORDS}, got {max_response_words!r}")
    if isinstance(followup_dimensions, str) and followup_dimensions != "all":
        followup_dimensions = (followup_dimensions,)
    world = FollowupWorld(max_response_words=max_response_words, followup_slope=followup_slope,
                          followup_center=followup_center, followup_dimensions=followup_dimensions)
    tokenizer = WordTokenizer(world.vocab_words)
    streams = lambda k: np.random.default_rng([seed, k])  # noqa: E731

    rng = streams(_STREAM_SFT)
    sft, qualities, has_fu, positive = [], [], [], []
    for _ in range(n_sft):
        topic = int(rng.integers(world.n_topics))
        prompt = world.make_prompt(rng, topic)
        response = world.sample_response(rng, topic)
        q = world.quality(prompt, response)
        qualities.append(q)
        if rng.random() < followup_rate:
            f, pos = world.sample_followup(rng, q)
            sft.append((prompt, f"{response} {EOS} {ROLE_WORDS[0]} {f}"))
            has_fu.append(True)
            positive.append(pos)
        else:
            sft.append((prompt, response))
            has_fu.append(False)
            positive.append(False)
    train = _pairs(world, streams(_STREAM_TRAIN), n_train, "train")
    val = _pairs(world, streams(_STREAM_VAL), n_val, "val")
    test = _pairs(world, streams(_STREAM_TEST), n_test, "test")

    q_arr, fu_arr, pos_arr = np.asarray(qualities), np.asarray(has_fu, bool), np.asarray(positive, bool)
    pos_rate = {}
    for q in range(len(TOPIC_WORDS[0]) + 1):
        sel = fu_arr & (q_arr == q)
        if sel.any():
            pos_rate[str(q)] = round(float(pos_arr[sel].mean()), 4)
    info = {
        "scenario": SCENARIO_NAME,
        "params": dict(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft,
                       max_response_words=max_response_words, followup_rate=followup_rate,
                       followup_slope=followup_slope, followup_center=followup_center,
                       followup_dimensions=list(world.dimensions)),
        "sizes": {"sft": len(sft), "train": len(train), "val": len(val), "test": len(test)},
        "vocab_size": tokenizer.vocab_size,
        "max_quality": float(min(len(TOPIC_WORDS[0]), max_response_words)),
        "sft_quality_distribution": {str(q): round(float(np.mean(q_arr == q)), 4)
                                     for q in range(len(TOPIC_WORDS[0]) + 1)} if sft else {},
        "sft_mean_quality": float(q_arr.mean()) if sft else float("nan"),
        "sft_followup_rate": float(fu_arr.mean()) if sft else float("nan"),
        "sft_positive_rate_by_quality": pos_rate,
        "p_positive_by_quality": {str(q): round(world.p_positive(q), 4) for q in range(len(TOPIC_WORDS[0]) + 1)},
    }
    if test:
        gap = np.asarray([e.meta["quality_chosen"] - e.meta["quality_rejected"] for e in test])
        info["test_mean_quality_gap"] = float(gap.mean())
        info["test_chosen_mean_quality"] = float(np.mean([e.meta["quality_chosen"] for e in test]))
        info["test_rejected_mean_quality"] = float(np.mean([e.meta["quality_rejected"] for e in test]))
    return FollowupData(name=SCENARIO_NAME, tokenizer=tokenizer, sft=sft, train=train, val=val, test=test,
                        reward_fn=world.quality, metrics_fn=world.metrics, info=info,
                        followup_dimensions=world.dimensions, p_positive=world.p_positive, world=world)
