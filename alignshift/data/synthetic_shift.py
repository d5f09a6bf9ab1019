"""ShiftBench scenario ``synthetic_shift``: most training data generated AND judged by biased
synthetic sources, a minority from the target ("human") distribution (the DoRA setting).

The full specification (vocabulary, generation, labels, ground truth, defaults) is in
``docs/shiftbench.md`` (section ``synthetic_shift``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .schema import PreferenceExample
from .shiftbench import FILLER_WORDS, REQUEST_TEMPLATES, REQUEST_WORDS, ROLE_WORDS, TOPIC_NAMES, TOPIC_WORDS, \
    ShiftBenchData, check_sizes, response_words, topic_of
from .tokenizer import WordTokenizer

__all__ = [
    "SCENARIO_NAME",
    "SOURCES",
    "TARGET",
    "FLATTERY_WORDS",
    "PADDING_WORDS",
    "DEFAULT_MIXTURE",
    "SIGNATURE_WORDS",
    "ListExample",
    "SyntheticShiftWorld",
    "SyntheticShiftData",
    "make_synthetic_shift",
]

SCENARIO_NAME = "synthetic_shift"
TARGET = "target"
SOURCES: tuple[str, ...] = (TARGET, "sycophant", "verbose")
FLATTERY_WORDS: tuple[str, ...] = ("great", "amazing", "wonderful", "brilliant", "fantastic", "superb")
PADDING_WORDS: tuple[str, ...] = ("certainly", "indeed", "basically", "actually", "furthermore", "overall")
SIGNATURE_WORDS: dict[str, str] = {"sycophant": "truly", "verbose": "notably"}
DEFAULT_MIXTURE: dict[str, float] = {TARGET: 0.2, "sycophant": 0.5, "verbose": 0.3}

P_REL_MAX = 0.8
# source -> (min_len, flattery-probability range, padding-probability range)
STYLES: dict[str, tuple[int, tuple[float, float], tuple[float, float]]] = {
    TARGET: (3, (0.0, 0.25), (0.0, 0.15)),
    "sycophant": (3, (0.10, 0.50), (0.0, 0.15)),
    "verbose": (5, (0.0, 0.25), (0.10, 0.45)),
}
# judge weights: (helpfulness, n_flat, n_pad, length)
JUDGES: dict[str, tuple[float, float, float, float]] = {
    TARGET: (1.0, -1.0, -0.5, 0.0),
    "sycophant": (1.0, 0.5, -0.5, 0.0),
    "verbose": (1.0, -1.0, 0.5, 0.2),
}
_MAX_ATTEMPTS = 100_000
_STREAM_SFT, _STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST, _STREAM_ASSIGN = range(5)


@dataclass(frozen=True)
class ListExample:
    """A prompt with ``K`` candidate responses and their judge's ``scores`` (higher = better)."""

    prompt: str
    candidates: tuple[str, ...]
    scores: tuple[float, ...]
    meta: dict = field(default_factory=dict)


class SyntheticShiftWorld:
    """The ground truth of ``synthetic_shift``: vocabulary, samplers and judges (docs/shiftbench.md)."""

    def __init__(self, *, max_response_words: int = 8, sycophancy_bias: float = 0.5, signature_rate: float = 0.0):
        self.max_response_words = int(max_response_words)
        self.signature_rate = float(signature_rate)
        self.judges = dict(JUDGES)
        self.judges["sycophant"] = (1.0, float(sycophancy_bias), -0.5, 0.0)
        self.n_topics = len(TOPIC_NAMES)
        self._relevant = [frozenset(ws) for ws in TOPIC_WORDS]
        self._flat, self._pad = frozenset(FLATTERY_WORDS), frozenset(PADDING_WORDS)
        words = list(ROLE_WORDS) + list(REQUEST_WORDS) + list(TOPIC_NAMES) + [w for ws in TOPIC_WORDS for w in ws]
        words += list(FILLER_WORDS) + list(FLATTERY_WORDS) + list(PADDING_WORDS)
        if self.signature_rate > 0:
            words += list(SIGNATURE_WORDS.values())
        if len(set(words)) != len(words):  # pragma: no cover - guards edits of the word lists
            raise AssertionError("synthetic_shift vocabulary words must be distinct")
        self.vocab_words = words

    # ----------------------------------------------------------------- scoring
    topic_of = staticmethod(topic_of)
    response_words = staticmethod(response_words)

    def features(self, prompt: str, response: str) -> tuple[int, int, int, int]:
        """``(helpfulness, n_flat, n_pad, length)``."""
        words = self.response_words(response)
        t = self.topic_of(prompt)
        helpful = 0 if t is None else len(self._relevant[t].intersection(words))
        return helpful, sum(w in self._flat for w in words), sum(w in self._pad for w in words), len(words)

    def judge(self, source: str, prompt: str, response: str) -> float:
        """Noise-free score of ``source``'s judge (``"target"`` = the ground-truth reward)."""
        if source not in self.judges:
            raise ValueError(f"unknown source {source!r}; valid: {SOURCES}")
        return float(np.dot(self.judges[source], self.features(prompt, response)))

    def target_reward(self, prompt: str, response: str) -> float:
        return self.judge(TARGET, prompt, response)

    __call__ = target_reward

    def metrics(self, prompt: str, response: str) -> dict:
        h, f, p, n = self.features(prompt, response)
        return {"target_reward": float(np.dot(JUDGES[TARGET], (h, f, p, n))), "helpfulness": float(h),
                "n_flat": float(f), "n_pad": float(p), "length": float(n)}

    # ---------------------------------------------------------------- sampling
    def make_prompt(self, rng: np.random.Generator, topic: int) -> str:
        request = REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))]
        return f"{ROLE_WORDS[0]} {request} {TOPIC_NAMES[topic]} {ROLE_WORDS[1]}"

    def sample_response(self, rng: np.random.Generator, topic: int, source: str) -> str:
        """One draw from ``Q_source(. | topic)`` (docs/shiftbench.md)."""
        if source not in STYLES:
            raise ValueError(f"unknown source {source!r}; valid: {SOURCES}")
        min_len, flat, pad = STYLES[source]
        length = int(rng.integers(min(min_len, self.max_response_words), self.max_response_words + 1))
        p_rel = rng.uniform(0.0, P_REL_MAX)
        p_flat, p_pad = rng.uniform(*flat), rng.uniform(*pad)
        u = rng.random((3, length))
        relevant = TOPIC_WORDS[topic]
        sig = self.signature_rate if source in SIGNATURE_WORDS else 0.0
        if sig:  # the other word probabilities scale by 1 − sig
            p_flat, p_pad = p_flat * (1 - sig), p_pad * (1 - sig)
        words = []
        for j in range(length):
            pick = u[2, j]
            if u[0, j] < sig:
                words.append(SIGNATURE_WORDS[source])
            elif u[0, j] < sig + p_flat:
                words.append(FLATTERY_WORDS[int(pick * len(FLATTERY_WORDS))])
            elif u[0, j] < sig + p_flat + p_pad:
                words.append(PADDING_WORDS[int(pick * len(PADDING_WORDS))])
            elif u[1, j] < p_rel:
                words.append(relevant[int(pick * len(relevant))])
            else:
                words.append(FILLER_WORDS[int(pick * len(FILLER_WORDS))])
        return " ".join(words)


@dataclass
class SyntheticShiftData(ShiftBenchData):
    """:class:`ShiftBenchData` plus the listwise training data of ``synthetic_shift``:
    ``train_lists`` (K candidates + judge scores per prompt; ``train`` is their (best, worst)
    pairwise view, same order), the source ``mixture`` (shares), ``alpha`` (the target share)
    and ``world`` (judges and samplers)."""

    train_lists: list[ListExample] = field(default_factory=list)
    mixture: dict = field(default_factory=dict)
    alpha: float = 0.2
    sources: tuple[str, ...] = SOURCES
    world: SyntheticShiftWorld | None = None

    def source_share(self, source: str) -> float:
        return float(self.mixture[source])


def _target_pair(world, rng, n, split):
    out = []
    for i in range(n):
        topic = int(rng.integers(world.n_topics))
        prompt = world.make_prompt(rng, topic)
        for _ in range(_MAX_ATTEMPTS):
            a, b = world.sample_response(rng, topic, TARGET), world.sample_response(rng, topic, TARGET)
            ra, rb = world.target_reward(prompt, a), world.target_reward(prompt, b)
            if ra != rb:
                break
        else:  # pragma: no cover
            raise RuntimeError("could not sample a non-tied target pair")
        c, r = (a, b) if ra > rb else (b, a)
        out.append(PreferenceExample(prompt, c, r, {"topic": topic, "source": TARGET, "split": split, "pair_id": i}))
    return out


def _check_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
    m = {k: float(v) for k, v in dict(mixture).items()}
    unknown = sorted(set(m) - set(SOURCES))
    if unknown:
        raise ValueError(f"mixture has unknown source(s) {unknown}; valid: {SOURCES}")
    if any(not np.isfinite(v) or v < 0 for v in m.values()):
        raise ValueError(f"mixture shares must be finite and >= 0; got {m}")
    if m.get(TARGET, 0.0) <= 0:
        raise ValueError("mixture needs a positive 'target' share (α > 0)")
    total = sum(m.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mixture shares must sum to 1; got {total}")
    return {s: m.get(s, 0.0) for s in SOURCES}


def make_synthetic_shift(
    *,
    seed: int,
    n_train: int = 1000,
    n_val: int | None = None,
    n_test: int = 500,
    n_sft: int = 4000,
    n_candidates: int = 4,
    mixture: Mapping[str, float] | None = None,
    judge_noise: float = 0.3,
    max_response_words: int = 8,
    sycophancy_bias: float = 0.5,
    signature_rate: float = 0.0,
) -> SyntheticShiftData:
    """Build the ``synthetic_shift`` scenario deterministically from ``seed`` (docs/shiftbench.md)."""
    n_val = check_sizes(seed, n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 2:
        raise ValueError(f"n_candidates must be an int >= 2, got {n_candidates!r}")
    if not (np.isfinite(judge_noise) and judge_noise >= 0):
        raise ValueError(f"judge_noise must be >= 0, got {judge_noise!r}")
    if isinstance(max_response_words, bool) or not isinstance(max_response_words, (int, np.integer)) \
            or max_response_words < 3:
        raise ValueError(f"max_response_words must be an int >= 3, got {max_response_words!r}")
    mix = _check_mixture(DEFAULT_MIXTURE if mixture is None else mixture)
    if not np.isfinite(sycophancy_bias):
        raise ValueError(f"sycophancy_bias must be finite, got {sycophancy_bias!r}")
    if not (np.isfinite(signature_rate) and 0.0 <= signature_rate < 1.0):
        raise ValueError(f"signature_rate must be in [0, 1), got {signature_rate!r}")

    world = SyntheticShiftWorld(max_response_words=int(max_response_words), sycophancy_bias=float(sycophancy_bias),
                                signature_rate=float(signature_rate))
    tokenizer = WordTokenizer(world.vocab_words)
    streams = lambda k: np.random.default_rng([int(seed), k])  # noqa: E731
    probs = np.asarray([mix[s] for s in SOURCES])

    rng = streams(_STREAM_SFT)
    sft = []
    for _ in range(n_sft):
        topic = int(rng.integers(world.n_topics))
        src = SOURCES[int(rng.choice(len(SOURCES), p=probs))]
        sft.append((world.make_prompt(rng, topic), world.sample_response(rng, topic, src)))

    counts = [int(round(mix[s] * n_train)) for s in SOURCES]
    counts[SOURCES.index("sycophant")] += n_train - sum(counts)  # rounding remainder
    assign = np.repeat(np.arange(len(SOURCES)), counts)
    assign = assign[streams(_STREAM_ASSIGN).permutation(len(assign))]
    rng = streams(_STREAM_TRAIN)
    train_lists, train = [], []
    for j, si in enumerate(assign):
        src = SOURCES[int(si)]
        topic = int(rng.integers(world.n_topics))
        prompt = world.make_prompt(rng, topic)
        cands = [world.sample_response(rng, topic, src) for _ in range(n_candidates)]
        noise = rng.normal(0.0, judge_noise, n_candidates) if judge_noise > 0 else np.zeros(n_candidates)
        scores = tuple(float(world.judge(src, prompt, c) + e) for c, e in zip(cands, noise))
        meta = {"topic": topic, "source": src, "list_id": j, "split": "train"}
        train_lists.append(ListExample(prompt, tuple(cands), scores, meta))
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if cands[best].strip() == cands[worst].strip():  # identical texts: take the next distinct one
            order = np.argsort(scores)
            worst = next((int(k) for k in order if cands[int(k)].strip() != cands[best].strip()), worst)
        if cands[best].strip() == cands[worst].strip():  # pragma: no cover - all K candidates identical
            raise RuntimeError(f"list {j}: all candidates identical")
        train.append(PreferenceExample(prompt, cands[best], cands[worst], dict(meta)))

    val = _target_pair(world, streams(_STREAM_VAL), n_val, "val")
    test = _target_pair(world, streams(_STREAM_TEST), n_test, "test")

    # ------------------------------------------------------------ measured statistics
    info: dict = {
        "scenario": SCENARIO_NAME,
        "params": dict(seed=int(seed), n_train=n_train, n_val=n_val, n_test=n_test, n_sft=n_sft,
                       n_candidates=int(n_candidates), mixture=mix, judge_noise=float(judge_noise),
                       max_response_words=int(max_response_words), sycophancy_bias=float(sycophancy_bias),
                       signature_rate=float(signature_rate)),
        "sizes": {"sft": len(sft), "train": len(train), "val": len(val), "test": len(test)},
        "vocab_size": tokenizer.vocab_size,
        "alpha": mix[TARGET],
        "train_source_share": {s: float(np.mean(assign == i)) if len(assign) else 0.0 for i, s in enumerate(SOURCES)},
    }
    agree, style = {}, {}
    for s in SOURCES:
        ex = [e for e in train if e.meta["source"] == s]
        agree[s] = float(np.mean([world.target_reward(e.prompt, e.chosen) > world.target_reward(e.prompt, e.rejected)
                                  for e in ex])) if ex else float("nan")
        feats = np.asarray([world.features(le.prompt, c) for le in train_lists if le.meta["source"] == s
                            for c in le.candidates], np.float64).reshape(-1, 4)
        style[s] = {k: float(feats[:, i].mean()) if len(feats) else float("nan")
                    for i, k in enumerate(("helpfulness", "n_flat", "n_pad", "length"))}
    info["train_label_agreement_with_target"] = agree
    info["train_candidate_style"] = style
    if test:
        ft = np.asarray([[world.features(e.prompt, e.chosen)[1], world.features(e.prompt, e.rejected)[1]]
                         for e in test])
        info["test_flat_diff_rate"] = float(np.mean(ft[:, 0] != ft[:, 1]))
        info["test_sycophant_judge_agreement"] = float(np.mean(
            [world.judge("sycophant", e.prompt, e.chosen) > world.judge("sycophant", e.prompt, e.rejected) for e in test]))
        info["test_helpfulness_agreement"] = float(np.mean(
            [world.features(e.prompt, e.chosen)[0] > world.features(e.prompt, e.rejected)[0] for e in test]))
        info["test_chosen_mean_target_reward"] = float(np.mean([world.target_reward(e.prompt, e.chosen) for e in test]))
    if sft:
        ms = [world.metrics(p, r) for p, r in sft]
        for k in ("target_reward", "helpfulness", "n_flat", "n_pad", "length"):
            info[f"sft_mean_{k}"] = float(np.mean([m[k] for m in ms]))

    return SyntheticShiftData(
        name=SCENARIO_NAME, tokenizer=tokenizer, sft=sft, train=train, val=val, test=test,
        reward_fn=world.target_reward, metrics_fn=world.metrics, info=info,
        train_lists=train_lists, mixture=mix, alpha=mix[TARGET], sources=SOURCES, world=world)
