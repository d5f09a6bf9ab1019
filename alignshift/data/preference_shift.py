"""ShiftBench scenario ``preference_shift``: a controlled shift of the *preference labels*.

The full specification (vocabulary, generation, labels, ground truth, defaults) is in
``docs/shiftbench.md`` (section ``preference_shift``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

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
from .tokenizer import WordTokenizer

__all__ = [
    "SCENARIO_NAME",
    "PreferenceShiftData",
    "PreferenceShiftWorld",
    "make_preference_shift",
    "mix_reward",
    "MIXING_KINDS",
    "DEFAULT_ALPHAS",
    "FEAR_WORDS",
    "ANGER_WORDS",
    "FEAR_INTENSITY",
    "ANGER_INTENSITY",
    "NEUTRAL_WORDS",
]

SCENARIO_NAME = "preference_shift"

FEAR_WORDS: tuple[str, ...] = ("afraid", "scared", "panic", "dread", "terror", "nervous")
FEAR_INTENSITY: tuple[float, ...] = (1.0, 0.8, 1.4, 1.2, 1.6, 0.6)
ANGER_WORDS: tuple[str, ...] = ("angry", "furious", "rage", "hate", "annoyed", "outrage")
ANGER_INTENSITY: tuple[float, ...] = (1.1, 1.5, 1.7, 1.3, 0.7, 0.9)
NEUTRAL_WORDS: tuple[str, ...] = tuple(w for ws in TOPIC_WORDS for w in ws) + tuple(FILLER_WORDS)
_FEAR_SET, _ANGER_SET = frozenset(FEAR_WORDS), frozenset(ANGER_WORDS)

MIXING_KINDS: tuple[str, ...] = ("convex", "geometric")
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# Generative constants (docs/shiftbench.md).
MIN_RESPONSE_WORDS = 3
P_EMO_MAX = 1.0
BALANCE_BETA = 2.0
P_TOPICAL = 0.5
NEUTRAL_SCALE = 0.1
REWARD_SLOPE = 1.0
REWARD_OFFSET = 1.5
LOGIT_CLIP = 30.0
TIE_TOL = 1e-9
_MAX_ATTEMPTS = 100_000

_STREAM_SFT, _STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST = range(4)


def _alpha_key(alpha: float) -> float:
    return round(float(alpha), 6)


def _check_alpha(alpha) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return a


def mix_reward(r_a, r_b, alpha: float, kind: str = "convex"):
    """Mix two rewards with weight ``alpha`` on ``r_b``.

    ``kind="convex"``: ``(1 - alpha) * r_a + alpha * r_b``;
    ``kind="geometric"``: ``r_a ** (1 - alpha) * r_b ** alpha`` (needs ``r_a, r_b > 0``,
    else ``ValueError``).  Works on floats and numpy arrays (returns a float for
    scalar inputs).
    """
    alpha = _check_alpha(alpha)
    a, b = np.asarray(r_a, dtype=np.float64), np.asarray(r_b, dtype=np.float64)
    if kind == "convex":
        out = (1.0 - alpha) * a + alpha * b
    elif kind == "geometric":
        if np.any(a <= 0) or np.any(b <= 0):
            raise ValueError("geometric mixing needs strictly positive rewards")
        out = np.exp((1.0 - alpha) * np.log(a) + alpha * np.log(b))
    else:
        raise ValueError(f"kind must be one of {MIXING_KINDS}, got {kind!r}")
    return float(out) if out.ndim == 0 else out


def _mix_for_ranking(r_a: np.ndarray, r_b: np.ndarray, alpha: float, kind: str) -> np.ndarray:
    """A monotone transform of :func:`mix_reward` (log for geometric), for comparing pairs."""
    if kind == "geometric":
        return (1.0 - alpha) * np.log(r_a) + alpha * np.log(r_b)
    return mix_reward(r_a, r_b, alpha, kind)


class PreferenceShiftWorld:
    """The ground truth of ``preference_shift``: vocabulary, sampler and the two rewards."""

    def __init__(self, *, alpha0: float = 0.1, max_response_words: int = 8):
        self.alpha0 = _check_alpha(alpha0)
        self.max_response_words = int(max_response_words)
        self.n_topics = len(TOPIC_NAMES)
        weights: dict[str, tuple[float, float]] = {}
        for w, v in zip(FEAR_WORDS, FEAR_INTENSITY):
            weights[w] = (float(v), 0.0)
        for w, v in zip(ANGER_WORDS, ANGER_INTENSITY):
            weights[w] = (0.0, float(v))
        for j, w in enumerate(NEUTRAL_WORDS):
            weights[w] = (NEUTRAL_SCALE * math.sin(1.7 * j + 0.3), NEUTRAL_SCALE * math.sin(2.3 * j + 1.1))
        self.word_weights = weights
        words = list(ROLE_WORDS) + list(REQUEST_WORDS) + list(TOPIC_NAMES) + list(NEUTRAL_WORDS)
        words += list(FEAR_WORDS) + list(ANGER_WORDS)
        if len(set(words)) != len(words):  # pragma: no cover - guards edits of the word lists
            raise AssertionError("preference_shift vocabulary words must be distinct")
        self.vocab_words = words

    # ----------------------------------------------------------------- scoring
    topic_of = staticmethod(topic_of)
    response_words = staticmethod(response_words)

    def scores(self, response: str) -> tuple[float, float]:
        """``(s_A, s_B)``: the bag-of-words scores of the two objectives."""
        sa = sb = 0.0
        for w in self.response_words(response):
            va, vb = self.word_weights.get(w, (0.0, 0.0))
            sa += va
            sb += vb
        return sa, sb

    @staticmethod
    def _sigmoid(s: float) -> float:
        z = min(max(REWARD_SLOPE * (s - REWARD_OFFSET), -LOGIT_CLIP), LOGIT_CLIP)
        return 1.0 / (1.0 + math.exp(-z))

    def rewards(self, response: str) -> tuple[float, float]:
        """``(r_A, r_B)``, both in ``(0, 1)``; the prompt does not matter."""
        sa, sb = self.scores(response)
        return self._sigmoid(sa), self._sigmoid(sb)

    def r_a(self, prompt: str, response: str) -> float:
        return self.rewards(response)[0]

    def r_b(self, prompt: str, response: str) -> float:
        return self.rewards(response)[1]

    def reward_at(self, prompt: str, response: str, alpha: float, kind: str = "convex") -> float:
        ra, rb = self.rewards(response)
        return mix_reward(ra, rb, alpha, kind)

    def reward_fn_at(self, alpha: float, kind: str = "convex") -> Callable[[str, str], float]:
        alpha = _check_alpha(alpha)
        if kind not in MIXING_KINDS:
            raise ValueError(f"kind must be one of {MIXING_KINDS}, got {kind!r}")

        def reward_fn(prompt: str, response: str) -> float:
            return self.reward_at(prompt, response, alpha, kind)

        reward_fn.__name__ = f"reward_{kind}_{alpha:g}"
        return reward_fn

    def train_reward(self, prompt: str, response: str) -> float:
        """The ``alpha0`` convex mixture (the training-label reward)."""
        return self.reward_at(prompt, response, self.alpha0, "convex")

    __call__ = train_reward

    def metrics(self, prompt: str, response: str) -> dict:
        words = self.response_words(response)
        ra, rb = self.rewards(response)
        return {
            "r_A": ra,
            "r_B": rb,
            "r_alpha0": mix_reward(ra, rb, self.alpha0, "convex"),
            "n_A": float(sum(w in _FEAR_SET for w in words)),
            "n_B": float(sum(w in _ANGER_SET for w in words)),
            "length": float(len(words)),
        }

    # ---------------------------------------------------------------- sampling
    def make_prompt(self, rng: np.random.Generator, topic: int) -> str:
        request = REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))]
        return f"{ROLE_WORDS[0]} {request} {TOPIC_NAMES[topic]} {ROLE_WORDS[1]}"

    def sample_response(self, rng: np.random.Generator, topic: int) -> str:
        """One draw from ``q(.|topic)`` (docs/shiftbench.md)."""
        length = int(rng.integers(MIN_RESPONSE_WORDS, self.max_response_words + 1))
        p_emo = rng.uniform(0.0, P_EMO_MAX)
        theta = rng.beta(BALANCE_BETA, BALANCE_BETA)
        p_fear = p_emo * theta
        u = rng.random((3, length))
        relevant = TOPIC_WORDS[topic]
        words = []
        for j in range(length):
            pick = u[2, j]
            if u[0, j] < p_fear:
                words.append(FEAR_WORDS[int(pick * len(FEAR_WORDS))])
            elif u[0, j] < p_emo:
                words.append(ANGER_WORDS[int(pick * len(ANGER_WORDS))])
            elif u[1, j] < P_TOPICAL:
                words.append(relevant[int(pick * len(relevant))])
            else:
                words.append(FILLER_WORDS[int(pick * len(FILLER_WORDS))])
        return " ".join(words)

    def sample_unordered_pair(self, rng: np.random.Generator, topic: int,
                              labellings: Sequence[tuple[str, float]]) -> tuple[str, str, int]:
        """Two distinct responses with a strict preference under every ``(kind, alpha)``
        in ``labellings``; returns ``(response_1, response_2, n_redraws)``."""
        for attempt in range(_MAX_ATTEMPTS):
            a, b = self.sample_response(rng, topic), self.sample_response(rng, topic)
            if a == b:
                continue
            ra, rb = np.array(self.rewards(a)), np.array(self.rewards(b))
            if all(abs(float(_mix_for_ranking(ra[0], ra[1], al, k) - _mix_for_ranking(rb[0], rb[1], al, k)))
                   > TIE_TOL for k, al in labellings):
                return a, b, attempt
        raise RuntimeError(f"could not sample a non-tied pair in {_MAX_ATTEMPTS} attempts")  # pragma: no cover


@dataclass
class PreferenceShiftData(ShiftBenchData):
    """:class:`ShiftBenchData` plus the per-alpha test labels of ``preference_shift``.

    * ``test_pairs``: ``(prompt, response_1, response_2)`` of the test set, in order;
    * ``test_by_alpha[(kind, alpha)]``: those pairs labelled by the ``(kind, alpha)``
      mixture (alpha keys rounded to 6 decimals; use :meth:`test_at` to look up
      with any float);
    * ``alphas``: the sorted evaluation grid; ``mixing``: the mixing kinds;
      ``alpha0``: the training mixture weight (convex);
    * :meth:`reward_fn_at` gives the ground-truth reward of any mixture.
    """

    test_pairs: list[tuple[str, str, str]] = field(default_factory=list)
    test_by_alpha: dict[tuple[str, float], list[PreferenceExample]] = field(default_factory=dict)
    alphas: tuple[float, ...] = ()
    mixing: tuple[str, ...] = ()
    alpha0: float = 0.1
    world: PreferenceShiftWorld | None = None

    def reward_fn_at(self, alpha: float, kind: str = "convex") -> Callable[[str, str], float]:
        """Ground-truth reward ``(prompt, response) -> float`` of the ``(kind, alpha)`` mixture."""
        return self.world.reward_fn_at(alpha, kind)

    def test_at(self, alpha: float, kind: str = "convex") -> list[PreferenceExample]:
        """``test_by_alpha[(kind, alpha)]`` (``KeyError`` listing the grid if absent)."""
        key = (kind, _alpha_key(alpha))
        if key not in self.test_by_alpha:
            raise KeyError(f"no test labels for {key}; available: {sorted(self.test_by_alpha)}")
        return self.test_by_alpha[key]


def _labelled_pairs(world: PreferenceShiftWorld, rng: np.random.Generator, n: int, split: str,
                    labellings: Sequence[tuple[str, float]]) -> tuple[list[tuple[int, str, str, str]], int]:
    """``n`` test-style pairs ``(topic, prompt, response_1, response_2)`` and the number of redraws."""
    out, redraws = [], 0
    for _ in range(n):
        topic = int(rng.integers(world.n_topics))
        prompt = world.make_prompt(rng, topic)
        a, b, k = world.sample_unordered_pair(rng, topic, labellings)
        redraws += k
        out.append((topic, prompt, a, b))
    return out, redraws


def _pair_rewards(world: PreferenceShiftWorld, pairs) -> tuple[np.ndarray, np.ndarray]:
    """``(R1, R2)``, each ``[n, 2]`` = ``(r_A, r_B)`` of response_1 / response_2."""
    r1 = np.array([world.rewards(a) for _, _, a, _ in pairs], dtype=np.float64).reshape(-1, 2)
    r2 = np.array([world.rewards(b) for _, _, _, b in pairs], dtype=np.float64).reshape(-1, 2)
    return r1, r2


def _label(pairs, rewards: tuple[np.ndarray, np.ndarray], alpha: float, kind: str, split: str,
           ref: np.ndarray | None = None) -> tuple[list[PreferenceExample], np.ndarray]:
    """Label ``pairs`` by the ``(kind, alpha)`` mixture; returns examples and ``first_wins`` flags."""
    r1, r2 = rewards
    first = np.asarray(_mix_for_ranking(r1[:, 0], r1[:, 1], alpha, kind)
                       > _mix_for_ranking(r2[:, 0], r2[:, 1], alpha, kind), dtype=bool).reshape(-1)
    exs = []
    for i, ((topic, prompt, a, b), f) in enumerate(zip(pairs, first)):
        c, r = (a, b) if f else (b, a)
        meta = {"topic": topic, "split": split, "alpha": float(alpha), "kind": kind}
        if split == "test":
            meta["pair_id"] = i
            meta["flipped"] = bool(ref is not None and f != ref[i])
        exs.append(PreferenceExample(prompt, c, r, meta))
    return exs, first


def make_preference_shift(
    *,
    seed: int,
    n_train: int = 2000,
    n_val: int | None = None,
    n_test: int = 500,
    n_sft: int = 4000,
    alpha0: float = 0.1,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    mixing: Sequence[str] = MIXING_KINDS,
    max_response_words: int = 8,
    test_alpha: float | None = None,
    test_mixing: str = "convex",
) -> PreferenceShiftData:
    """Build the ``preference_shift`` scenario deterministically from ``seed`` (docs/shiftbench.md)."""
    n_val = check_sizes(seed, n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft)
    alpha0 = _check_alpha(alpha0)
    alphas = [_check_alpha(a) for a in alphas]
    mixing = tuple(mixing)
    if not mixing or any(k not in MIXING_KINDS for k in mixing) or len(set(mixing)) != len(mixing):
        raise ValueError(f"mixing must be a non-empty subset of {MIXING_KINDS}, got {mixing!r}")
    if test_mixing not in MIXING_KINDS:
        raise ValueError(f"test_mixing must be one of {MIXING_KINDS}, got {test_mixing!r}")
    test_alpha = alpha0 if test_alpha is None else _check_alpha(test_alpha)
    if isinstance(max_response_words, bool) or not isinstance(max_response_words, (int, np.integer)) \
            or max_response_words < MIN_RESPONSE_WORDS:
        raise ValueError(f"max_response_words must be an int >= {MIN_RESPONSE_WORDS}, got {max_response_words!r}")

    world = PreferenceShiftWorld(alpha0=alpha0, max_response_words=int(max_response_words))
    tokenizer = WordTokenizer(world.vocab_words)
    streams = lambda k: np.random.default_rng([int(seed), k])  # noqa: E731

    grid = tuple(sorted({_alpha_key(a) for a in [*alphas, alpha0, test_alpha]}))
    labellings = [("convex", _alpha_key(alpha0))]
    labellings += [(k, a) for k in mixing for a in grid if (k, a) != labellings[0]]
    if (test_mixing, _alpha_key(test_alpha)) not in labellings:
        labellings.append((test_mixing, _alpha_key(test_alpha)))
    train_labelling = [("convex", alpha0)]

    # SFT corpus from the base distribution, uniform topics.
    rng = streams(_STREAM_SFT)
    sft = []
    for _ in range(n_sft):
        topic = int(rng.integers(world.n_topics))
        sft.append((world.make_prompt(rng, topic), world.sample_response(rng, topic)))

    train_pairs, train_redraws = _labelled_pairs(world, streams(_STREAM_TRAIN), n_train, "train", train_labelling)
    val_pairs, _ = _labelled_pairs(world, streams(_STREAM_VAL), n_val, "val", train_labelling)
    test_pairs, test_redraws = _labelled_pairs(world, streams(_STREAM_TEST), n_test, "test", labellings)
    train, _ = _label(train_pairs, _pair_rewards(world, train_pairs), alpha0, "convex", "train")
    val, _ = _label(val_pairs, _pair_rewards(world, val_pairs), alpha0, "convex", "val")

    test_rewards = _pair_rewards(world, test_pairs)
    _, ref = _label(test_pairs, test_rewards, alpha0, "convex", "test")
    test_by_alpha: dict[tuple[str, float], list[PreferenceExample]] = {}
    firsts: dict[tuple[str, float], np.ndarray] = {}
    for kind, a in labellings:
        exs, first = _label(test_pairs, test_rewards, a, kind, "test", ref)
        test_by_alpha[(kind, a)] = exs
        firsts[(kind, a)] = first
    test = test_by_alpha[(test_mixing, _alpha_key(test_alpha))]

    # Measured statistics.
    def agree(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(x == y)) if len(x) else float("nan")

    agreement = {k: {f"{a:g}": agree(firsts[(k, a)], ref) for a in grid} for k in mixing}
    info: dict = {
        "scenario": SCENARIO_NAME,
        "params": dict(seed=int(seed), n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft, alpha0=alpha0,
                       alphas=list(alphas), mixing=list(mixing), max_response_words=int(max_response_words),
                       test_alpha=test_alpha, test_mixing=test_mixing),
        "sizes": {"sft": len(sft), "train": len(train), "val": len(val), "test": len(test)},
        "vocab_size": tokenizer.vocab_size,
        "n_topics": world.n_topics,
        "alpha0": alpha0,
        "alphas": list(grid),
        "mixing": list(mixing),
        "test_label": {"kind": test_mixing, "alpha": test_alpha},
        "test_label_agreement": agreement,
        "test_label_agreement_curve": {k: [agreement[k][f"{a:g}"] for a in grid] for k in mixing},
        "test_ab_disagreement": float(np.mean((test_rewards[0][:, 0] > test_rewards[1][:, 0])
                                              != (test_rewards[0][:, 1] > test_rewards[1][:, 1])))
        if test_pairs else float("nan"),
        "train_tie_redraw_rate": train_redraws / max(1, train_redraws + n_train),
        "test_tie_redraw_rate": test_redraws / max(1, test_redraws + n_test),
    }
    if train:
        mc = [world.metrics(e.prompt, e.chosen) for e in train]
        mr = [world.metrics(e.prompt, e.rejected) for e in train]
        info["train_label_agreement_A"] = float(np.mean([c["r_A"] > r["r_A"] for c, r in zip(mc, mr)]))
        info["train_label_agreement_B"] = float(np.mean([c["r_B"] > r["r_B"] for c, r in zip(mc, mr)]))
        info["train_mean_reward_gap"] = float(np.mean([c["r_alpha0"] - r["r_alpha0"] for c, r in zip(mc, mr)]))
    if sft:
        ms = [world.metrics(p, r) for p, r in sft]
        for key in ("r_A", "r_B", "r_alpha0", "n_A", "n_B", "length"):
            info[f"sft_mean_{key}"] = float(np.mean([m[key] for m in ms]))

    return PreferenceShiftData(
        name=SCENARIO_NAME, tokenizer=tokenizer, sft=sft, train=train, val=val, test=test,
        reward_fn=world.reward_fn_at(alpha0, "convex"), metrics_fn=world.metrics, info=info,
        test_pairs=[(p, a, b) for _, p, a, b in test_pairs], test_by_alpha=test_by_alpha,
        alphas=grid, mixing=mixing, alpha0=alpha0, world=world)
