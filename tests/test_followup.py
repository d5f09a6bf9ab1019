"""ShiftBench scenario ``followup`` (alignshift.data.followup)."""

import numpy as np
import pytest

from alignshift.data import SCENARIOS, encode_completions, make_scenario
from alignshift.data.followup import FollowupWorld, followup_words, make_followup


def _small(seed=0, **kw):
    return make_scenario("followup", seed=seed, **{"n_train": 50, "n_test": 40, "n_sft": 3000, **kw})


def test_registered_deterministic_and_valid():
    assert SCENARIOS["followup"] is make_followup
    a, b = _small(3), _small(3)
    assert a.sft == b.sft and a.test == b.test and a.train == b.train
    assert _small(4).sft != a.sft
    tok = a.tokenizer
    for w in followup_words(("understanding",)):  # every follow-up word of the corpus is one token
        assert tok.token_to_id(w) != tok.unk_id, w
    assert tok.token_to_id("boring.") == tok.unk_id  # other dimensions' words are not in the vocabulary
    assert make_followup(seed=0, n_sft=1, n_train=1, n_test=1, followup_dimensions="all").tokenizer.token_to_id(
        "boring.") != tok.unk_id
    assert tok.token_to_id("You\u2019re") != tok.token_to_id("You're")  # exact characters kept
    for e in a.test + a.train:
        assert a.reward_fn(e.prompt, e.chosen) > a.reward_fn(e.prompt, e.rejected)
        assert e.meta["quality_chosen"] == a.reward_fn(e.prompt, e.chosen)
    with pytest.raises(ValueError, match="followup_dimensions"):
        make_followup(seed=0, n_sft=1, followup_dimensions=("helpfulness",))
    with pytest.raises(ValueError, match="followup_rate"):
        make_followup(seed=0, followup_rate=1.5)


def test_quality_and_followups_track_it():
    w = FollowupWorld()
    p = "user: explain cooking assistant:"
    assert w.quality(p, "recipe recipe oven the song") == 2.0  # distinct topic words only
    assert w.quality(p, "recipe <eos> user: oven") == 1.0  # scored up to the first <eos>
    assert w.quality("user: explain nothing assistant:", "recipe") == 0.0
    d = _small(0)
    info = d.info
    rates = [info["sft_positive_rate_by_quality"][str(q)] for q in range(5)]
    assert all(x < y for x, y in zip(rates, rates[1:]))  # positive follow-ups rise with quality
    for q in range(4):  # and match the documented sigmoid
        assert abs(rates[q] - 1 / (1 + np.exp(-1.5 * (q - 1.5)))) < 0.08
    assert 0.45 < info["sft_followup_rate"] < 0.55
    from alignshift.rewards.flr import FOLLOWUPS

    pos, neg = set(FOLLOWUPS["understanding"]["positive"]), set(FOLLOWUPS["understanding"]["negative"])
    n_fu = 0
    for prompt, comp in d.sft:
        if " <eos> user: " in comp:
            resp, f = comp.split(" <eos> user: ")
            assert f in pos | neg
            n_fu += 1
    assert n_fu == round(info["sft_followup_rate"] * len(d.sft))


def test_flr_scores_exactly_the_trained_layout():
    """The FLR word-level rendering of (prompt, response, follow-up) is token for token the
    SFT encoding of the corpus conversation: the scorer asks the LM what it was trained on."""
    from alignshift.rewards.flr import render_followup

    d = _small(1, n_sft=50)
    tok = d.tokenizer
    for prompt, comp in d.sft:
        if " <eos> user: " not in comp:
            continue
        resp, f = comp.split(" <eos> user: ")
        ctx, turn, a, b, _ = render_followup(tok, prompt, resp, f)
        enc = encode_completions(tok, [prompt], [comp], max_prompt_len=8, max_completion_len=24)
        seq = enc["input_ids"][0][enc["attention_mask"][0] == 1].tolist()
        assert seq == ctx + turn
        assert tok.decode(turn[a:b]) == f
