"""The ``synthetic_shift`` scenario (alignshift.data.synthetic_shift): determinism, the documented
generative process, the judges, and that the shift is real."""

import json

import numpy as np
import pytest

from alignshift.data import SCENARIOS, make_scenario
from alignshift.data.schema import validate_examples
from alignshift.data.synthetic_shift import (
    FLATTERY_WORDS,
    PADDING_WORDS,
    SCENARIO_NAME,
    SOURCES,
    SyntheticShiftData,
    SyntheticShiftWorld,
    make_synthetic_shift,
)

SMALL = dict(n_train=80, n_test=40, n_sft=30)


@pytest.fixture(scope="module")
def small():
    return make_synthetic_shift(seed=1, **SMALL)


def _tuples(exs):
    return [(e.prompt, e.chosen, e.rejected, tuple(sorted(e.meta.items()))) for e in exs]


def test_registered_and_deterministic(small):
    assert SCENARIOS[SCENARIO_NAME] is make_synthetic_shift
    again = make_scenario(SCENARIO_NAME, seed=1, **SMALL)
    assert isinstance(again, SyntheticShiftData)
    assert again.sft == small.sft and again.train_lists == small.train_lists
    for split in ("train", "val", "test"):
        assert _tuples(getattr(again, split)) == _tuples(getattr(small, split))
    assert json.dumps(again.info, sort_keys=True) == json.dumps(small.info, sort_keys=True)
    assert _tuples(make_synthetic_shift(seed=2, **SMALL).train) != _tuples(small.train)
    with pytest.raises(ValueError, match="unknown argument"):
        make_scenario(SCENARIO_NAME, seed=0, n_lists=3)


def test_structure_sources_and_pairwise_view(small):
    d = small
    assert len(d.train_lists) == len(d.train) == 80 and len(d.test) == 40 and len(d.val) == 1
    validate_examples(d.train + d.val + d.test)
    counts = {s: sum(le.meta["source"] == s for le in d.train_lists) for s in SOURCES}
    assert counts == {"target": 16, "sycophant": 40, "verbose": 24}  # exactly round(share * n_train)
    assert d.alpha == 0.2 and d.source_share("sycophant") == 0.5
    for le, ex in zip(d.train_lists, d.train):
        assert len(le.candidates) == len(le.scores) == 4
        assert ex.prompt == le.prompt and ex.meta["source"] == le.meta["source"]
        assert ex.chosen == le.candidates[int(np.argmax(le.scores))]
        assert max(le.scores) > min(le.scores)
        # the scores are the list's own judge plus noise of scale judge_noise
        clean = [d.world.judge(le.meta["source"], le.prompt, c) for c in le.candidates]
        assert np.max(np.abs(np.subtract(le.scores, clean))) < 5 * 0.3
    for ex in d.test + d.val:  # target pairs, labelled by the noise-free target reward
        assert ex.meta["source"] == "target"
        assert d.reward_fn(ex.prompt, ex.chosen) > d.reward_fn(ex.prompt, ex.rejected)


def test_judges_follow_the_documented_formulas():
    w = SyntheticShiftWorld()
    prompt = "user: discuss health assistant:"
    resp = "great doctor diet great certainly <eos> great great"
    assert w.features(prompt, resp) == (2, 2, 1, 5)  # scoring stops at <eos>
    assert w.judge("target", prompt, resp) == pytest.approx(2 - 2 - 0.5)
    assert w.judge("sycophant", prompt, resp) == pytest.approx(2 + 0.5 * 2 - 0.5)
    assert w.judge("verbose", prompt, resp) == pytest.approx(2 - 2 + 0.5 + 0.2 * 5)
    assert w.target_reward(prompt, resp) == w.metrics(prompt, resp)["target_reward"]
    assert w.features("no topic here", "doctor diet") == (0, 0, 0, 2)
    with pytest.raises(ValueError, match="unknown source"):
        w.judge("human", prompt, resp)


def test_source_styles_differ_as_documented():
    w = SyntheticShiftWorld()
    rng = np.random.default_rng(0)
    stats = {}
    for s in SOURCES:
        f = np.asarray([w.features("user: explain music assistant:", w.sample_response(rng, 2, s)) for _ in range(1500)])
        stats[s] = f.mean(0)
        assert f[:, 3].min() >= (5 if s == "verbose" else 3) and f[:, 3].max() <= 8
    # expected flattery per word: U(0,.25) -> .125, U(.1,.5) -> .3; padding: U(0,.15) -> .075, U(.1,.45) -> .275
    assert stats["sycophant"][1] / 5.5 == pytest.approx(0.30, abs=0.03)
    assert stats["target"][1] / 5.5 == pytest.approx(0.125, abs=0.02)
    assert stats["verbose"][2] / 6.5 == pytest.approx(0.275, abs=0.03)
    words = set(FLATTERY_WORDS) | set(PADDING_WORDS)
    assert len(words) == 12 and words <= set(w.vocab_words)


def test_the_shift_is_real():
    d = make_synthetic_shift(seed=0, n_train=400, n_test=200, n_sft=0)
    agree = d.info["train_label_agreement_with_target"]
    assert agree["target"] > 0.95
    assert agree["sycophant"] < agree["target"] - 0.2  # the biased judge disagrees with the target often
    assert d.info["test_flat_diff_rate"] > 0.4
    assert d.info["test_sycophant_judge_agreement"] < 0.85
    assert d.info["train_source_share"] == {"target": 0.2, "sycophant": 0.5, "verbose": 0.3}


@pytest.mark.parametrize("kw, msg", [
    (dict(mixture={"target": 0.5, "sycophant": 0.4}), "sum to 1"),
    (dict(mixture={"target": 0.0, "sycophant": 1.0}), "positive 'target'"),
    (dict(mixture={"target": 0.5, "robot": 0.5}), "unknown source"),
    (dict(n_candidates=1), "n_candidates"),
    (dict(judge_noise=-1.0), "judge_noise"),
    (dict(n_train=-1), "n_train"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_synthetic_shift(seed=0, **{**SMALL, **kw})


def test_signature_and_bias_knobs():
    base = make_synthetic_shift(seed=0, **SMALL)
    sig = make_synthetic_shift(seed=0, signature_rate=0.3, sycophancy_bias=1.0, **SMALL)
    assert "truly" not in base.tokenizer.vocab and "truly" in sig.tokenizer.vocab
    for le in sig.train_lists:
        text = " ".join(le.candidates).split()
        if le.meta["source"] == "target":
            assert "truly" not in text and "notably" not in text
        assert not ("truly" in text and le.meta["source"] != "sycophant")
    n_sig = sum(" ".join(le.candidates).split().count("truly") for le in sig.train_lists if le.meta["source"] == "sycophant")
    n_words = sum(len(" ".join(le.candidates).split()) for le in sig.train_lists if le.meta["source"] == "sycophant")
    assert n_sig / n_words == pytest.approx(0.3, abs=0.05)
    prompt, resp = "user: discuss health assistant:", "great truly doctor"
    assert sig.world.judge("sycophant", prompt, resp) == pytest.approx(1 + 1.0 * 1)
    assert base.world.judge("sycophant", prompt, resp) == pytest.approx(1 + 0.5 * 1)
    assert sig.world.target_reward(prompt, resp) == base.world.target_reward(prompt, resp) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="signature_rate"):
        make_synthetic_shift(seed=0, signature_rate=1.0, **SMALL)
