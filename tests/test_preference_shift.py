"""Tests for the ``preference_shift`` scenario (alignshift.data.preference_shift)."""

import json
import math

import numpy as np
import pytest

from alignshift.data.preference_shift import (
    ANGER_WORDS,
    DEFAULT_ALPHAS,
    FEAR_WORDS,
    SCENARIO_NAME,
    PreferenceShiftData,
    make_preference_shift,
    mix_reward,
)
from alignshift.data.schema import validate_examples
from alignshift.data.shiftbench import ShiftBenchData

SMALL = dict(n_train=120, n_test=60, n_sft=50)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def data():
    return make_preference_shift(seed=0)  # defaults: the documented curve is about these


@pytest.fixture(scope="module")
def small():
    return make_preference_shift(seed=3, **SMALL)


def _as_tuples(exs):
    return [(e.prompt, e.chosen, e.rejected, tuple(sorted(e.meta.items()))) for e in exs]


# ------------------------------------------------------------- determinism
def test_deterministic_from_seed(small):
    again = make_preference_shift(seed=3, **SMALL)
    assert again.sft == small.sft
    for split in ("train", "val", "test"):
        assert _as_tuples(getattr(again, split)) == _as_tuples(getattr(small, split))
    assert again.test_pairs == small.test_pairs
    assert set(again.test_by_alpha) == set(small.test_by_alpha)
    for key in small.test_by_alpha:
        assert _as_tuples(again.test_by_alpha[key]) == _as_tuples(small.test_by_alpha[key])
    assert json.dumps(again.info, sort_keys=True) == json.dumps(small.info, sort_keys=True)
    other = make_preference_shift(seed=4, **SMALL)
    assert _as_tuples(other.train) != _as_tuples(small.train)


def test_streams_are_independent(small):
    more_sft = make_preference_shift(seed=3, **{**SMALL, "n_sft": 80})
    assert _as_tuples(more_sft.train) == _as_tuples(small.train)
    assert more_sft.test_pairs == small.test_pairs
    other_grid = make_preference_shift(seed=3, **SMALL, alphas=(0.0, 0.5, 1.0))
    assert _as_tuples(other_grid.train) == _as_tuples(small.train)
    assert _as_tuples(other_grid.val) == _as_tuples(small.val)


# ------------------------------------------------------------------- sizes
def test_sizes_and_types(data):
    assert isinstance(data, PreferenceShiftData) and isinstance(data, ShiftBenchData)
    assert data.name == SCENARIO_NAME == "preference_shift"
    assert (len(data.sft), len(data.train), len(data.val), len(data.test)) == (4000, 2000, 40, 500)
    assert data.info["sizes"] == {"sft": 4000, "train": 2000, "val": 40, "test": 500}
    assert data.alphas == tuple(DEFAULT_ALPHAS) and data.mixing == ("convex", "geometric")
    assert set(data.test_by_alpha) == {(k, a) for k in data.mixing for a in data.alphas}
    assert len(data.test_pairs) == 500
    assert data.prompts("test") == [p for p, _, _ in data.test_pairs]
    json.dumps(data.info)  # JSON-serialisable (it goes into summary.json)


def test_test_by_alpha_relabels_the_same_pairs(data):
    for key, exs in data.test_by_alpha.items():
        assert len(exs) == len(data.test_pairs)
        for i, (e, (p, a, b)) in enumerate(zip(exs, data.test_pairs)):
            assert e.prompt == p and {e.chosen, e.rejected} == {a, b}
            assert e.meta["pair_id"] == i and (e.meta["kind"], e.meta["alpha"]) == key
    # default `test` = alpha0 convex labels; lookup with any float spelling
    assert data.test is data.test_by_alpha[("convex", 0.1)] is data.test_at(0.1)
    assert data.test_at(0.1 + 0.2, "geometric") is data.test_by_alpha[("geometric", 0.3)]
    with pytest.raises(KeyError):
        data.test_at(0.55)


def test_test_alpha_selects_the_test_labels(small):
    shifted = make_preference_shift(seed=3, **SMALL, test_alpha=1.0, test_mixing="geometric",
                                    alphas=(0.0, 0.5), mixing=("convex",))
    assert shifted.test is shifted.test_at(1.0, "geometric")
    # grid = alphas U {alpha0, test_alpha}, for every kind in `mixing`, plus the test labelling
    assert shifted.alphas == (0.0, 0.1, 0.5, 1.0)
    assert set(shifted.test_by_alpha) == {("convex", a) for a in shifted.alphas} | {("geometric", 1.0)}
    assert shifted.info["test_label_agreement_curve"]["convex"][1] == 1.0
    if shifted.info["test_tie_redraw_rate"] == small.info["test_tie_redraw_rate"] == 0.0:
        assert shifted.test_pairs == small.test_pairs  # no tie redraws -> the grid does not change the pairs


# --------------------------------------------------------------- validity
def test_examples_validate_and_tokenize_without_unk(small):
    tok = small.tokenizer
    for split in ("train", "val", "test"):
        exs = getattr(small, split)
        assert validate_examples(exs) == exs
    for exs in small.test_by_alpha.values():
        validate_examples(exs)
    texts = [t for p, r in small.sft for t in (p, r)]
    texts += [t for e in small.train + small.val + small.test for t in (e.prompt, e.chosen, e.rejected)]
    for t in texts:
        assert tok.unk_id not in tok.encode(t), t
    for p, r in small.sft:
        assert 3 <= len(r.split()) <= 8 and p.startswith("user: ") and p.endswith(" assistant:")


def test_chosen_has_higher_alpha0_reward_on_every_pair(data):
    for e in data.train + data.val:
        assert data.reward_fn(e.prompt, e.chosen) > data.reward_fn(e.prompt, e.rejected)
        assert (e.meta["kind"], e.meta["alpha"]) == ("convex", 0.1)
    for (kind, alpha), exs in data.test_by_alpha.items():
        if alpha not in (0.0, 0.5, 1.0):
            continue
        f = data.reward_fn_at(alpha, kind)
        assert all(f(e.prompt, e.chosen) > f(e.prompt, e.rejected) for e in exs)


def test_rewards_are_strictly_in_unit_interval(data):
    world = data.world
    responses = [r for _, r in data.sft] + [t for p, a, b in data.test_pairs for t in (a, b)]
    responses += ["", "<eos>", " ".join(["rage"] * 200), " ".join(["terror"] * 200), "unknownword"]
    for r in responses:
        ra, rb = world.rewards(r)
        assert 0.0 < ra < 1.0 and 0.0 < rb < 1.0
        m = data.metrics_fn("user: explain cooking assistant:", r)
        assert 0.0 < m["r_alpha0"] < 1.0 and m["r_A"] == ra and m["r_B"] == rb


def test_reward_values_by_hand(data):
    w, p = data.world, "user: explain music assistant:"
    # two "terror" (intensity 1.6): s_A = 3.2; no anger word: s_B = 0
    assert w.rewards("terror terror") == pytest.approx((_sig(3.2 - 1.5), _sig(-1.5)), abs=1e-12)
    # words after <eos> and <pad>/<bos> are ignored
    assert w.rewards("<bos> terror terror <eos> rage rage") == w.rewards("terror terror")
    assert w.rewards("rage") == pytest.approx((_sig(-1.5), _sig(1.7 - 1.5)), abs=1e-12)
    m = data.metrics_fn(p, "afraid rage rage the <eos> afraid")
    assert (m["n_A"], m["n_B"], m["length"]) == (1.0, 2.0, 4.0)
    ra, rb = w.rewards("afraid rage")
    assert data.reward_fn(p, "afraid rage") == pytest.approx(0.9 * ra + 0.1 * rb, abs=1e-12)
    assert data.reward_fn_at(1.0, "geometric")(p, "afraid rage") == pytest.approx(rb, abs=1e-12)
    assert data.reward_fn_at(0.0, "convex")(p, "afraid rage") == pytest.approx(ra, abs=1e-12)
    assert set(FEAR_WORDS).isdisjoint(ANGER_WORDS)


# ------------------------------------------------------------------ mixing
def test_mix_reward_formulas():
    assert mix_reward(0.2, 0.8, 0.25, "convex") == pytest.approx(0.75 * 0.2 + 0.25 * 0.8)  # 0.35
    assert mix_reward(0.2, 0.8, 0.25, "convex") == pytest.approx(0.35, abs=1e-12)
    # 0.2^0.75 * 0.8^0.25 = 0.2^0.5 * (0.16)^0.25 = sqrt(0.08)
    assert mix_reward(0.2, 0.8, 0.25, "geometric") == pytest.approx(math.sqrt(0.08), abs=1e-12)
    assert mix_reward(0.25, 0.64, 0.5, "geometric") == pytest.approx(0.4, abs=1e-12)
    for kind in ("convex", "geometric"):
        assert mix_reward(0.3, 0.6, 0.0, kind) == pytest.approx(0.3, abs=1e-12)
        assert mix_reward(0.3, 0.6, 1.0, kind) == pytest.approx(0.6, abs=1e-12)
    arr = mix_reward(np.array([0.2, 0.5]), np.array([0.8, 0.5]), 0.5, "convex")
    np.testing.assert_allclose(arr, [0.5, 0.5])
    assert isinstance(mix_reward(0.2, 0.8, 0.5), float)


def test_mix_reward_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        mix_reward(0.0, 0.5, 0.5, "geometric")
    with pytest.raises(ValueError, match="positive"):
        mix_reward(np.array([0.5, -0.1]), 0.5, 0.5, "geometric")
    with pytest.raises(ValueError):
        mix_reward(0.5, 0.5, 1.5, "convex")
    with pytest.raises(ValueError):
        mix_reward(0.5, 0.5, 0.5, "harmonic")


# ------------------------------------------------------------------- shift
def test_label_agreement_curve_shows_the_shift(data):
    curve = data.info["test_label_agreement_curve"]
    alphas = data.info["alphas"]
    i0, i1 = alphas.index(0.1), alphas.index(1.0)
    assert curve["convex"][i0] == 1.0
    for kind in ("convex", "geometric"):
        c = curve[kind]
        assert c[i0] >= 0.95
        tol = 0.0 if kind == "convex" else 0.02  # convex: exactly monotone (each pair flips at most once)
        assert all(c[j + 1] <= c[j] + tol for j in range(i0, i1)), (kind, c)
        assert c[i1] < 0.75, (kind, c)
        assert c[0] < 1.0  # moving towards pure fear changes a few labels too
    assert curve["convex"][i1] == curve["geometric"][i1]  # both are r_B at alpha = 1
    assert 0.3 <= data.info["test_ab_disagreement"] <= 0.55


def test_info_agreement_matches_the_labels(data):
    ref = [e.chosen for e in data.test_at(0.1, "convex")]
    for kind in data.mixing:
        for a in data.alphas:
            exs = data.test_at(a, kind)
            agree = float(np.mean([e.chosen == c for e, c in zip(exs, ref)]))
            assert data.info["test_label_agreement"][kind][f"{a:g}"] == pytest.approx(agree)
            assert all(e.meta["flipped"] == (e.chosen != c) for e, c in zip(exs, ref))
    assert data.info["train_label_agreement_A"] > 0.9 > 0.7 > data.info["train_label_agreement_B"]


def test_bad_arguments_raise():
    for kw in (dict(seed=-1), dict(seed=0, n_train=-1), dict(seed=0, alpha0=1.2), dict(seed=0, alphas=(0.0, 2.0)),
               dict(seed=0, mixing=("convex", "harmonic")), dict(seed=0, mixing=()),
               dict(seed=0, max_response_words=2), dict(seed=0, test_mixing="x"), dict(seed=0, test_alpha=-0.1)):
        with pytest.raises(ValueError):
            make_preference_shift(**{**SMALL, **kw})
