"""Dataset adapters on small fixtures written in each dataset's published schema (no downloads)."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from alignshift.data import DataError, PreferenceExample
from alignshift.data.datasets import (
    DATASETS,
    CandidateExample,
    best_worst_pairs,
    emotion_mixture_pairs,
    emotion_prompts,
    helpsteer2_mixture_pairs,
    iw_dpo_splits,
    load_dataset_splits,
    load_emotion,
    load_helpsteer2_candidates,
    load_hh_rlhf,
    load_pku_safe_rlhf,
    load_preference_file,
    load_shp,
    load_ultrafeedback_binarized,
    load_ultrafeedback_candidates,
    shift_split,
    ultrafeedback_pairs,
)
from alignshift.data.preference_shift import mix_reward


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ------------------------------------------------------------------------------ PKU-SafeRLHF

HARMS = ["Animal Abuse", "Cybercrime", "Drugs", "Economic Crime", "White-Collar Crime"]


def _pku_row(i, safe0, safe1, better, safer):
    def cats(safe):
        return {h: (not safe and h in ("Drugs", "Cybercrime")) for h in HARMS}
    return {"prompt": f"question {i}?", "response_0": f"answer zero {i}", "response_1": f"answer one {i}",
            "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca3-8B",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_harm_category": cats(safe0), "response_1_harm_category": cats(safe1),
            "response_0_severity_level": 0 if safe0 else 2, "response_1_severity_level": 0 if safe1 else 1,
            "better_response_id": better, "safer_response_id": safer}


def _pku_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        s0, s1 = bool(rng.random() < 0.6), bool(rng.random() < 0.6)
        rows.append(_pku_row(i + 1000 * seed, s0, s1, int(rng.integers(2)), int(rng.integers(2))))
    return rows


@pytest.fixture(scope="module")
def pku_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pku")
    _jsonl(d / "train.jsonl", _pku_rows(400, 0))
    _jsonl(d / "test.jsonl", _pku_rows(120, 1))
    return str(d)


def test_pku_mapping(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [_pku_row(0, False, True, 0, 1), _pku_row(1, False, True, 1, 0)])
    a, b = load_pku_safe_rlhf(path, "train")
    # row 0: response_0 more helpful but unsafe -> helpful_harmful, chosen = response_0
    assert (a.prompt, a.chosen, a.rejected) == ("question 0?", "answer zero 0", "answer one 0")
    assert a.meta["category"] == "helpful_harmful" and a.meta["chosen_safe"] is False and a.meta["rejected_safe"]
    assert a.meta["chosen_harm_categories"] == ["Cybercrime", "Drugs"] and a.meta["chosen_severity"] == 2
    assert a.meta["chosen_model"] == "Alpaca-7B" and a.meta["source"] == "pku_safe_rlhf"
    assert b.chosen == "answer one 1" and b.meta["category"] == "helpful_harmless"
    (s,) = load_pku_safe_rlhf(path, "train", label="safety", max_rows=1)
    assert s.chosen == "answer one 0" and s.meta["chosen_safe"]


def test_pku_iw_dpo_recipe(pku_dir):
    out = iw_dpo_splits(pku_dir, seed=3)
    n_tr = len(out.train)
    hh = [e for e in out.train if e.meta["category"] == "helpful_harmless"]
    hf = [e for e in out.train if e.meta["category"] == "helpful_harmful"]
    all_train = load_pku_safe_rlhf(pku_dir, "train")
    n_hf_all = sum(e.meta["category"] == "helpful_harmful" for e in all_train)
    n_hh_all = len(all_train) - n_hf_all
    # every helpful-harmful pair is used when enough helpful-harmless pairs exist
    assert n_hh_all >= round(n_hf_all / 3) + round((n_hf_all * 4 / 3) / 50)
    assert len(hf) == n_hf_all
    assert abs(len(hh) / n_tr - 0.25) < 0.01
    assert len(out.val) == max(1, round(n_tr / 50))
    assert all(e.meta["category"] == "helpful_harmless" for e in out.val + out.test)
    assert all(e.meta["split"] == "test" for e in out.test)
    # test = the helpful-harmless pairs of the test split; train/val disjoint
    n_test_hh = sum(e.meta["category"] == "helpful_harmless" for e in load_pku_safe_rlhf(pku_dir, "test"))
    assert len(out.test) == n_test_hh
    assert not {e.prompt for e in out.val} & {e.prompt for e in out.train}
    assert out.info["train_category_share"]["helpful_harmless"] == pytest.approx(len(hh) / n_tr)
    # determinism
    again = iw_dpo_splits(pku_dir, seed=3)
    assert [e.prompt for e in again.train] == [e.prompt for e in out.train]


def test_shift_split_subsamples_when_deploy_is_scarce():
    exs = [PreferenceExample(f"p{i}", "a", "b", {"d": i < 20}) for i in range(400)]
    out = shift_split(exs, lambda e: e.meta["d"], deploy_fraction=0.25, val_ratio=0.02, seed=0)
    n_dep_train = sum(e.meta["deploy"] for e in out.train)
    assert n_dep_train + len(out.val) + len(out.test) <= 20 and len(out.test) >= 1
    assert abs(n_dep_train / len(out.train) - 0.25) < 0.03
    with pytest.raises(DataError, match="no deployment-type"):
        shift_split(exs[20:], lambda e: e.meta["d"])


def test_pku_malformed_row_named(tmp_path):
    rows = [_pku_row(0, True, True, 0, 0), _pku_row(1, True, True, 0, 0)]
    rows[1]["response_1"] = "   "
    with pytest.raises(DataError, match=r"pku_safe_rlhf row 1: field 'response_1' is empty"):
        load_pku_safe_rlhf(_jsonl(tmp_path / "t.jsonl", rows))
    rows[1]["response_1"] = "ok"
    rows[1]["better_response_id"] = 2
    with pytest.raises(DataError, match=r"row 1: field 'better_response_id' must be 0 or 1"):
        load_pku_safe_rlhf(_jsonl(tmp_path / "t2.jsonl", rows))


# ---------------------------------------------------------------------------------------- SHP


def _shp_row(post, domain, a, b, label, sa, sb):
    return {"post_id": post, "domain": domain, "upvote_ratio": 0.95, "history": f"post {post} text",
            "c_root_id_A": f"{post}a{a}", "c_root_id_B": f"{post}b{b}", "created_at_utc_A": 10, "created_at_utc_B": 5,
            "score_A": sa, "score_B": sb, "human_ref_A": f"comment {a} on {post}", "human_ref_B": f"comment {b} on {post}",
            "labels": label, "seconds_difference": 5.0, "score_ratio": max(sa, sb) / min(sa, sb)}


def test_shp_mapping_and_filters(tmp_path):
    rows = [_shp_row("p1", "askculinary_train", 1, 2, 1, 30, 10),   # ratio 3, A wins
            _shp_row("p1", "askculinary_train", 1, 3, 0, 4, 12),    # ratio 3, B wins
            _shp_row("p1", "askculinary_train", 4, 5, 1, 25, 10),   # ratio 2.5
            _shp_row("p2", "legaladvice_train", 1, 2, 1, 21, 10),   # ratio 2.1
            _shp_row("p3", "legaladvice_train", 1, 2, 0, 10, 50)]   # ratio 5, B wins
    path = _jsonl(tmp_path / "shp" / "train.jsonl", rows)
    exs = load_shp(path, max_pairs_per_post=None, min_score_ratio=2.0)
    assert len(exs) == 5
    e0, e1 = exs[0], exs[1]
    assert e0.prompt == "post p1 text" and e0.chosen == "comment 1 on p1" and e0.rejected == "comment 2 on p1"
    assert e1.chosen == "comment 3 on p1" and e1.meta["score_chosen"] == 12 and e1.meta["score_rejected"] == 4
    assert e0.meta["domain"] == "askculinary" and e0.meta["score_ratio"] == 3.0
    assert [e.meta["row"] for e in load_shp(path, min_score_ratio=2.6, max_pairs_per_post=None)] == [0, 1, 4]
    # at most 2 pairs per post, highest ratio first (rows 0 and 1 of p1 both have ratio 3)
    assert [e.meta["row"] for e in load_shp(path, max_pairs_per_post=2)] == [0, 1, 3, 4]
    assert {e.meta["domain"] for e in load_shp(path, domains=["legaladvice"])} == {"legaladvice"}
    # the folder layout finds train.jsonl
    assert len(load_shp(str(tmp_path / "shp"), max_pairs_per_post=None)) == 5


def test_shp_domain_shift_registry(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        dom = "askculinary" if i % 4 == 0 else ("legaladvice" if i % 4 == 1 else "askphysics")
        rows.append(_shp_row(f"p{i}", f"{dom}_train", 1, 2, int(rng.integers(2)), 30, 10))
    _jsonl(tmp_path / "shp" / "train.jsonl", rows)
    _jsonl(tmp_path / "shp" / "test.jsonl", [_shp_row(f"t{i}", "askculinary_test", 1, 2, 1, 30, 10) for i in range(7)]
           + [_shp_row("t9", "askphysics_test", 1, 2, 1, 30, 10)])
    out = load_dataset_splits("shp_domain_shift", str(tmp_path / "shp"), deploy_domains=["askculinary"], seed=1)
    dep = [e for e in out.train if e.meta["domain"] == "askculinary"]
    assert abs(len(dep) / len(out.train) - 0.25) < 0.01
    assert {e.meta["domain"] for e in out.val + out.test} == {"askculinary"} and len(out.test) == 7


# ---------------------------------------------------------------------------------- HelpSteer2


def test_helpsteer2_mixture_matches_numpy(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for p in range(12):
        for k in range(2 if p % 3 else 3):
            rows.append({"prompt": f"prompt {p}", "response": f"response {p}.{k}",
                         **{a: int(rng.integers(0, 5)) for a in
                            ("helpfulness", "correctness", "coherence", "complexity", "verbosity")}})
    path = _jsonl(tmp_path / "hs2.jsonl", rows)
    cands = load_helpsteer2_candidates(path)
    assert len(cands) == 12 and [len(c.candidates) for c in cands][:3] == [3, 2, 2]
    w = {"helpfulness": 0.3, "correctness": 0.7}
    pairs = helpsteer2_mixture_pairs(cands, w)
    # independent float64 reference: z-score each attribute over all rows, mix, argmax/argmin
    h = np.array([r["helpfulness"] for r in rows], float)
    c = np.array([r["correctness"] for r in rows], float)
    mixed = 0.3 * (h - h.mean()) / h.std() + 0.7 * (c - c.mean()) / c.std()
    expect = []
    for p in range(12):
        idx = [i for i, r in enumerate(rows) if r["prompt"] == f"prompt {p}"]
        m = mixed[idx]
        if m.max() - m.min() <= 0:
            continue
        expect.append((rows[idx[int(np.argmax(m))]]["response"], rows[idx[int(np.argmin(m))]]["response"],
                       float(m.max())))
    assert [(q.chosen, q.rejected) for q in pairs] == [(a, b) for a, b, _ in expect]
    np.testing.assert_allclose([q.meta["score_chosen"] for q in pairs], [s for _, _, s in expect], rtol=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        helpsteer2_mixture_pairs(cands, {"helpfulness": 0.5, "correctness": 0.6})


def test_helpsteer2_generated_layout_and_errors(tmp_path):
    rows = [{"prompt": "q1", "responses": ["r1", "r2", "r3"],
             "scores": {"helpsteer-helpfulness": [0.1, 0.9, 0.5], "ultrafeedback-honesty": [0.3, 0.2, 0.1]}},
            {"prompt": "q2", "responses": ["s1", "s2"],
             "scores": {"helpsteer-helpfulness": [0.4, 0.2], "ultrafeedback-honesty": [0.9, 0.1]}}]
    cands = load_helpsteer2_candidates(_jsonl(tmp_path / "gen.jsonl", rows))
    pairs = helpsteer2_mixture_pairs(cands, {"helpsteer-helpfulness": 1.0})
    assert [(p.chosen, p.rejected) for p in pairs] == [("r2", "r1"), ("s1", "s2")]
    rows[1]["scores"]["helpsteer-helpfulness"] = [0.4]
    with pytest.raises(DataError, match=r"helpsteer2 row 1: field 'scores.helpsteer-helpfulness'"):
        load_helpsteer2_candidates(_jsonl(tmp_path / "bad.jsonl", rows))


# ------------------------------------------------------------------------------- UltraFeedback


def test_ultrafeedback_binarized(tmp_path):
    def chat(p, r):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    rows = [{"prompt": "Hi?", "prompt_id": "a1", "chosen": chat("Hi?", "Hello!"), "rejected": chat("Hi?", "Go away."),
             "messages": chat("Hi?", "Hello!"), "score_chosen": 8.0, "score_rejected": 3.0}]
    import datasets as hfds
    path = str(tmp_path / "train_prefs.parquet")
    hfds.Dataset.from_list(rows).to_parquet(path)  # the hub ships parquet
    (e,) = load_ultrafeedback_binarized(path, "train_prefs")
    assert (e.prompt, e.chosen, e.rejected) == ("Hi?", "Hello!", "Go away.")
    assert e.meta["score_chosen"] == 8.0 and "prompt_messages" not in e.meta
    rows[0]["rejected"] = chat("Other?", "Go away.")
    with pytest.raises(DataError, match=r"ultrafeedback_binarized row 0: field 'rejected' has a different"):
        load_ultrafeedback_binarized(_jsonl(tmp_path / "b.jsonl", rows), "train")


def _uf_completion(model, resp, overall, ratings):
    ann = {a: {"Rating": r, "Rationale": "..."} for a, r in zip(
        ("instruction_following", "honesty", "truthfulness", "helpfulness"), ratings)}
    return {"model": model, "response": resp, "overall_score": overall, "fine-grained_score": float(np.mean(
        [float(x) for x in ratings if x != "N/A"])), "annotations": ann, "critique": "c", "custom_system_prompt": "",
        "principle": "helpfulness"}


def test_ultrafeedback_candidates(tmp_path):
    rows = [{"source": "evol_instruct", "instruction": "Write a haiku.", "models": ["m1", "m2", "m3", "m4"],
             "completions": [_uf_completion("m1", "haiku one", 7.5, ["4", "5", "N/A", "4"]),
                             _uf_completion("m2", "haiku two", 3.0, ["2", "3", "2", "1"]),
                             _uf_completion("m3", "haiku three", 9.0, ["5", "5", "5", "5"]),
                             _uf_completion("m4", "haiku four", 5.0, ["3", "3", "3", "3"])],
             "correct_answers": [], "incorrect_answers": []}]
    (c,) = load_ultrafeedback_candidates(_jsonl(tmp_path / "uf.jsonl", rows))
    assert c.scores["overall"] == [7.5, 3.0, 9.0, 5.0] and math.isnan(c.scores["truthfulness"][0])
    assert c.meta["dataset_source"] == "evol_instruct" and c.meta["models"] == ["m1", "m2", "m3", "m4"]
    (p,) = ultrafeedback_pairs([c])
    assert (p.chosen, p.rejected) == ("haiku three", "haiku two")
    (q,) = ultrafeedback_pairs([c], {"truthfulness": 1.0})  # NaN candidate skipped
    assert (q.chosen, q.rejected) == ("haiku three", "haiku two")


def test_best_worst_pairs_skips_ties_and_unrated():
    cs = [CandidateExample("p", ["a", "b"], {"s": [1.0, 1.0]}, {"row": 0}),
          CandidateExample("q", ["a", "b", "c"], {"s": [float("nan"), 2.0, 1.0]}, {"row": 1})]
    out = best_worst_pairs(cs, {"s": 1.0}, zscore=False)
    assert [(p.prompt, p.chosen, p.rejected) for p in out] == [("q", "b", "c")]
    with pytest.raises(DataError, match=r"row 0: no scores for objective"):
        best_worst_pairs(cs, {"t": 1.0})
    with pytest.raises(DataError, match="scores"):
        CandidateExample("p", ["a", "b"], {"s": [1.0]}, {"row": 7})


# ------------------------------------------------------------------------------------ HH-RLHF


def test_hh_rlhf_chat_and_raw(tmp_path):
    conv = "\n\nHuman: How do I bake bread?\n\nAssistant: Use flour.\n\nHuman: And then?\n\nAssistant:"
    rows = [{"chosen": conv + " Knead it and bake at 220C.", "rejected": conv + " No idea."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: What."}]
    d = tmp_path / "hh" / "helpful-base"
    _jsonl(d / "train.jsonl", rows)
    a, b = load_hh_rlhf(str(tmp_path / "hh"), data_dir="helpful-base")
    assert (a.prompt, a.chosen, a.rejected) == ("And then?", "Knead it and bake at 220C.", "No idea.")
    assert a.meta["prompt_messages"] == [{"role": "user", "content": "How do I bake bread?"},
                                         {"role": "assistant", "content": "Use flour."},
                                         {"role": "user", "content": "And then?"}]
    assert a.meta["subset"] == "helpful-base" and "prompt_messages" not in b.meta and b.prompt == "Hi"
    r = load_hh_rlhf(str(d / "train.jsonl"), format="raw")[1]
    assert r.prompt == "\n\nHuman: Hi\n\nAssistant:" and r.chosen == "Hello there." and r.meta["raw_prompt"]
    rows.append({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"})
    with pytest.raises(DataError, match=r"hh_rlhf row 2: field 'rejected' does not share"):
        load_hh_rlhf(_jsonl(tmp_path / "bad.jsonl", rows))


# ------------------------------------------------------------------------------------ Emotion


def test_emotion(tmp_path):
    rows = [{"text": "i feel so scared walking home alone tonight", "label": 4},
            {"text": "i am furious about the delays today again", "label": 3},
            {"text": "short one", "label": 1}]
    got = load_emotion(_jsonl(tmp_path / "train.jsonl", rows))
    assert [g["label_name"] for g in got] == ["fear", "anger", "joy"]
    assert emotion_prompts(got, n_words=3) == ["i feel so", "i am furious"]
    probs = np.zeros((2, 2, 6))
    probs[0, 0, 4], probs[0, 0, 3] = 0.9, 0.05   # continuation 0: fearful
    probs[0, 1, 4], probs[0, 1, 3] = 0.1, 0.8    # continuation 1: angry
    probs[1, :, 4] = 0.3
    probs[1, :, 3] = 0.3  # identical rewards: dropped
    conts = [["fear text", "anger text"], ["x", "y"]]
    lo = emotion_mixture_pairs(["i feel so", "i am"], conts, probs, alpha=0.1)
    hi = emotion_mixture_pairs(["i feel so", "i am"], conts, probs, alpha=0.9)
    assert len(lo) == 1 and lo[0].chosen == "fear text" and hi[0].chosen == "anger text"
    assert lo[0].meta["reward_chosen"] == pytest.approx(float(mix_reward(0.9, 0.05, 0.1)))
    rows[2]["label"] = 9
    with pytest.raises(DataError, match=r"emotion row 2: field 'label'"):
        load_emotion(_jsonl(tmp_path / "bad.jsonl", rows))


# ---------------------------------------------------------------------------- generic + registry


def test_preference_file_and_registry(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "weight": 2.0},
            {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q2"}],
             "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no", "meta": {"domain": "x"}}]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    a, b = load_preference_file(path)
    assert a.meta["weight"] == 2.0 and b.prompt == "q2" and b.meta["prompt_messages"][0]["role"] == "system"
    assert b.meta["domain"] == "x"
    splits = load_dataset_splits("preference", path, val_ratio=0.5)
    assert len(splits.train) == 1 and len(splits.val) == 1
    rows[1]["chosen"] = [{"role": "user", "content": "oops"}]
    with pytest.raises(DataError, match=r"preference row 1: field 'chosen' must end with a non-empty assistant"):
        load_preference_file(_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset_splits("cali")
    with pytest.raises(DataError, match="does not exist"):
        load_preference_file(str(tmp_path / "missing.jsonl"))
    assert {s.schema for s in DATASETS.values()} <= {"card", "inferred", "n/a"}


def test_candidates_file_for_dora(tmp_path):
    rows = [{"prompt": "q", "candidates": ["a", "b", "c", "d"], "scores": [0.1, 0.9, 0.5, 0.3],
             "probs": [0.2, 0.9, 0.5, 0.4], "source_ids": [0, 1, 2, 3]}]
    out = load_dataset_splits("candidates", _jsonl(tmp_path / "train.jsonl", rows))
    (p,) = out.train
    assert (p.chosen, p.rejected) == ("b", "a") and p.meta["probs"] == [0.2, 0.9, 0.5, 0.4]
    rows[0]["probs"] = [0.2, 1.5, 0.5, 0.4]
    with pytest.raises(DataError, match=r"candidates row 0: field 'probs'"):
        load_dataset_splits("candidates", _jsonl(tmp_path / "b" / "train.jsonl", rows))


def test_skip_bad_rows_drops_and_counts_in_every_kind_of_adapter(tmp_path):
    """``load_dataset_splits(..., skip_bad_rows=True)``: malformed rows are dropped and counted
    per dataset/split (``info["skipped_rows"]`` and the caller's report) instead of raising."""
    from alignshift.data.schema import SkippedRows

    pku = [_pku_row(i, True, i % 2 == 0, 0, 0) for i in range(6)]
    pku[2]["response_1"] = "  "
    path = _jsonl(tmp_path / "pku" / "train.jsonl", pku)
    with pytest.raises(DataError, match=r"pku_safe_rlhf row 2: field 'response_1' is empty"):
        load_dataset_splits("pku_safe_rlhf", path)
    rep = SkippedRows()
    out = load_dataset_splits("pku_safe_rlhf", path, skip_bad_rows=True, report=rep)
    assert len(out.train) == 5 and [e.meta["row"] for e in out.train] == [0, 1, 3, 4, 5]
    # (a single file serves as this recipe's train and test split: the bad row is counted in both)
    assert out.info["skipped_rows"]["by_source"]["pku_safe_rlhf/train"] == 1
    assert rep.count == out.info["skipped_rows"]["count"]

    # a split recipe (IW-DPO) forwards it to both splits it loads
    d = tmp_path / "pku_iw"
    train, test = _pku_rows(200, 0), _pku_rows(60, 1)
    train[5]["better_response_id"], test[7]["prompt"] = 3, ""
    _jsonl(d / "train.jsonl", train)
    _jsonl(d / "test.jsonl", test)
    out = load_dataset_splits("pku_safe_rlhf_iw", str(d), skip_bad_rows=True)
    assert out.info["skipped_rows"]["by_source"] == {"pku_safe_rlhf/train": 1, "pku_safe_rlhf/test": 1}

    # candidate lists (generic, DoRA layout) and grouped per-response rows (HelpSteer2)
    cands = [{"prompt": "q", "candidates": ["a", "b"], "scores": [0.1, 0.9]},
             {"prompt": "q2", "candidates": ["a"], "scores": [0.1]},
             {"prompt": "q3", "candidates": ["c", "d"], "scores": [0.5, 0.2], "meta": [1]}]
    out = load_dataset_splits("candidates", _jsonl(tmp_path / "c" / "train.jsonl", cands), skip_bad_rows=True)
    assert [p.chosen for p in out.train] == ["b"] and out.info["skipped_rows"]["count"] == 2
    hs = [{"prompt": "p", "response": f"r{k}", **{a: k for a in ("helpfulness", "correctness", "coherence",
                                                                 "complexity", "verbosity")}} for k in range(3)]
    hs[1]["correctness"] = "high"
    rep = SkippedRows()
    (c,) = load_helpsteer2_candidates(_jsonl(tmp_path / "hs.jsonl", hs), skip_bad_rows=True, report=rep)
    assert c.candidates == ["r0", "r2"] and c.meta["rows"] == [0, 2] and rep.by_source == {"helpsteer2/train": 1}
    assert "helpsteer2 row 1: field 'correctness' must be a number" in rep.summary()


def test_preference_file_bad_json_line_names_file_and_line(tmp_path):
    """A malformed JSON line in a ``preference`` JSONL file: a DataError naming the file and
    the line (not datasets' opaque DatasetGenerationError); with ``skip_bad_rows`` the line is
    dropped and counted under the file's name."""
    from alignshift.data.schema import SkippedRows

    good = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    path = tmp_path / "prefs" / "train.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(r) for r in good]
    lines.insert(2, '{"prompt": "q", "chosen": "a", rejected: "b"}')  # line 3: unquoted key
    lines.insert(4, "")  # a blank line is fine
    lines.insert(5, "[1, 2]")  # line 6: valid JSON, not an object
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path} line 3: not valid JSON"):
        load_preference_file(str(path))
    with pytest.raises(DataError, match=rf"{path} line 3: not valid JSON"):
        load_dataset_splits("preference", str(path))
    rep = SkippedRows()
    out = load_preference_file(str(path), skip_bad_rows=True, report=rep)
    assert [e.prompt for e in out] == ["q0", "q1", "q2", "q3"]
    assert rep.count == 2 and rep.by_source == {str(path): 2}
    assert f"{path} line 6: expected a JSON object" in rep.summary()
    splits = load_dataset_splits("preference", str(path.parent), skip_bad_rows=True, val_ratio=0.25)
    assert len(splits.train) + len(splits.val) == 4 and splits.info["skipped_rows"]["count"] == 2
    # a bad line and a bad row together: both dropped, both counted
    lines[0] = json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"})
    path.write_text("\n".join(lines) + "\n")
    rep = SkippedRows()
    out = load_preference_file(str(path), skip_bad_rows=True, report=rep)
    assert [e.prompt for e in out] == ["q1", "q2", "q3"] and rep.count == 3
    # candidates layout goes through the same reader
    (tmp_path / "c.jsonl").write_text('{"prompt": "q", "candidates": ["a", "b"], "scores": [1, 2]}\n{oops\n')
    with pytest.raises(DataError, match=r"c.jsonl line 2: not valid JSON"):
        load_dataset_splits("candidates", str(tmp_path / "c.jsonl"))
    # a JSON array file with a syntax error: named by line too
    (tmp_path / "arr.json").write_text('[\n {"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": }\n]\n')
    with pytest.raises(DataError, match=r"arr.json line 3: not valid JSON"):
        load_preference_file(str(tmp_path / "arr.json"))
