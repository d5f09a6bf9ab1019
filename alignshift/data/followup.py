"""ShiftBench scenario ``followup`` (FLR): a corpus whose user follow-up turns track hidden
response quality, so a follow-up likelihood can recover preferences without labels.

It mirrors the premise of "Aligning Language Models Using Follow-up Likelihood as Reward
Signal" (Zhang et al., AAAI 2025): in natural conversations users react to good answers with
positive follow-ups ("That makes perfect sense!") and to bad ones with negative follow-ups
("That makes no sense!"); an LM pre-trained on such conversations therefore carries a reward
signal in ``p(follow-up | prompt, response)``. Here the conversations are generated from a
known process, so the reward it implies can be checked against the ground truth exactly.

Everything is generated offline from a seed (pure numpy/python), like :mod:`.shiftbench`.

Vocabulary
----------
The :mod:`.shiftbench` words without the harmful ones (``user: assistant:``, the request
words, 8 topic names, 8 x 6 topic content words, 16 filler words), followed by every
whitespace-separated word of the FLR follow-up utterances of the corpus's
``followup_dimensions`` (:data:`alignshift.rewards.flr.FOLLOWUPS`, exact characters,
punctuation attached, e.g. ``sense!`` or ``You’re``), de-duplicated in order of first
appearance. Only those dimensions' words: a vocabulary row the SFT corpus never trains is
a free logit that preference training can pour probability mass into (measured: with all
six dimensions' words in the vocabulary, DPO at lr 1e-4 made the policy emit untrained
follow-up words and collapsed its quality).

Prompts
-------
``"user: <request> <topic-name> assistant:"`` exactly as in ``deploy_shift`` (request
template and topic uniform).

Responses ``q(response | topic)``
---------------------------------
1. length ``L ~ Uniform{3, ..., max_response_words}`` words;
2. a per-response *relevance* ``p_rel ~ U(0, 0.8)``;
3. each word independently: with probability ``p_rel`` a uniformly drawn content word of
   the prompt's topic; otherwise with probability 0.15 a uniformly drawn content word of
   another topic (off-topic); otherwise a uniformly drawn filler word.

Hidden quality (the ground truth)
---------------------------------
``quality(prompt, response)`` = the number of DISTINCT content words of the prompt's topic in
the response (0..6), scored on the words up to the first ``<eos>`` (``<pad>``/``<bos>``
ignored); ``reward_fn = quality``. Repeating a word earns nothing, so neither length nor
the frequency of topic words is the quality itself.

Follow-up turns (what makes the corpus FLR-informative)
-------------------------------------------------------
Each SFT conversation gets, with probability ``followup_rate``, a user follow-up turn after
the response. Its sentiment is POSITIVE with probability

    P(positive | quality q) = sigmoid(followup_slope * (q - followup_center))

(default slope 1.5, centre 1.5), else NEGATIVE; the utterance is then drawn uniformly from
``FOLLOWUPS[d][sentiment]`` with ``d`` uniform over ``followup_dimensions`` (default:
``("understanding",)``, the dimension the authors' scripts use; ``"all"`` = the six). The
conversation's completion text is ``"<response> <eos> user: <follow-up>"`` (the encoder
appends the final ``<eos>``), i.e. the word-level layout that
:func:`alignshift.rewards.flr.render_followup` scores: context ``<bos> prompt response
<eos>``, follow-up turn ``user: f <eos>``. A policy SFT-trained on this corpus stops at the
first ``<eos>`` when sampling, so its responses never contain the follow-up; the same LM,
scored on a follow-up turn, is the FLR reward model. No preference label is ever shown to it.

Splits
------
* ``sft``: ``n_sft`` ``(prompt, completion)`` conversations as above, uniform topics.
* ``train`` / ``val`` / ``test``: ``n_train`` / ``n_val`` (default ``max(1, n_train // 50)``)
  / ``n_test`` ground-truth preference pairs: two responses drawn i.i.d. from ``q`` for the
  same prompt, redrawn until their qualities differ; chosen = the higher quality. ``meta =
  {"topic", "split", "quality_chosen", "quality_rejected"}``.

Determinism: each part uses its own stream ``default_rng([seed, stream_id])``.

``info`` (measured on the generated data) holds the sizes, the quality distribution of
``q``, the follow-up rate and the positive-follow-up rate per quality level in the SFT
corpus, the true ``P(positive | quality)`` per quality level, and the test pairs' mean
qualities and gap.
"""

from __future__ import annotations

import functools
import json
import math
import os
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


_FOLLOWUPS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewards",
                               "followups.json")


@functools.lru_cache(maxsize=1)
def _followups_cached() -> str:
    with open(_FOLLOWUPS_FILE, encoding="utf-8") as f:
        return f.read()


def _followups() -> dict:
    """The FLR follow-ups, read from the same data file as :data:`alignshift.rewards.flr.FOLLOWUPS`
    (read directly: the data package stays free of jax/model imports)."""
    return {k: v for k, v in json.loads(_followups_cached()).items() if not k.startswith("_")}


def followup_words(dimensions="all") -> list[str]:
    """Every word of the FLR follow-ups of ``dimensions`` (default all six), in order of first
    appearance."""
    fu = _followups()
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
        fu = _followups()
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
    """Build the ``followup`` scenario (see the module docstring)."""
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
