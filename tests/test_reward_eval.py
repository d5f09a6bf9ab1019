"""Reward-model evaluation (alignshift.rewards.evaluate): metrics vs SciPy, benchmark layouts, CLI."""

import json

import numpy as np
import pytest
import scipy.stats

from alignshift.rewards import evaluate as ev


def test_metrics_match_scipy():
    rs = np.random.RandomState(0)
    for n in (2, 7, 50):
        x = rs.randn(n)
        y = 0.5 * x + rs.randn(n)
        np.testing.assert_allclose(ev.pearson(x, y), scipy.stats.pearsonr(x, y)[0], rtol=1e-10)
        np.testing.assert_allclose(ev.spearman(x, y), scipy.stats.spearmanr(x, y)[0], rtol=1e-10)
    # ties (integer gold scores, rounded rewards)
    x = rs.randint(0, 5, 40).astype(float)
    y = np.round(x + rs.randn(40), 0)
    np.testing.assert_array_equal(ev.rankdata(y), scipy.stats.rankdata(y))
    np.testing.assert_allclose(ev.spearman(x, y), scipy.stats.spearmanr(x, y)[0], rtol=1e-10)
    assert np.isnan(ev.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    c, r = np.array([1.0, 2.0, 3.0, 0.5]), np.array([0.0, 2.0, 4.0, 0.4])
    assert ev.pairwise_accuracy(c, r) == 0.5  # the tie counts as wrong
    with pytest.raises(ValueError, match="equal length"):
        ev.pairwise_accuracy([1.0], [1.0, 2.0])


LAYOUTS = {
    "pairwise": ({"prompt": "p", "chosen": "good", "rejected": "bad"}, ("p", "good", "bad")),
    "shp": ({"history": "p", "human_ref_A": "a", "human_ref_B": "b", "labels": 0, "score_A": 3}, ("p", "b", "a")),
    "hh": ({"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"},
           ("\n\nHuman: hi\n\nAssistant:", "good", "bad")),
    "alpaca_farm": ({"instruction": "do", "input": "x", "output_1": "o1", "output_2": "o2", "preference": 2},
                    ("do\n\nx", "o2", "o1")),
    "beavertails": ({"prompt": "p", "response_0": "r0", "response_1": "r1", "better_response_id": 0,
                     "safer_response_id": 1}, ("p", "r0", "r1")),
    "rating": ({"prompt": "p", "response": "r", "score": 3}, ("p", "r", 3.0)),
    "helpsteer": ({"prompt": "p", "response": "r", "helpfulness": 4, "correctness": 2}, ("p", "r", 4.0)),
    "flask": ({"instruction": "p", "response": "r", "score": 2.5}, ("p", "r", 2.5)),
    "mt_bench": ({"question_id": 1, "turns": ["q1", "q2"], "answer": "r", "score": 7}, ("q1\nq2", "r", 7.0)),
    "feedback_bench": ({"orig_instruction": "p", "orig_response": "r", "orig_score": "5"}, ("p", "r", 5.0)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts(tmp_path, layout):
    row, want = LAYOUTS[layout]
    path = tmp_path / f"{layout}.jsonl"
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    kind, got_layout, rows = ev.load_bench(str(path))
    assert got_layout == layout and rows == [want, want]
    assert kind == ("pairwise" if layout in ev.PAIRWISE_LAYOUTS else "rating")
    assert len(ev.load_bench(str(path), layout, max_examples=1)[2]) == 1


def test_bad_rows_are_named(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'chosen' must be a string"):
        ev.load_bench(str(p))
    p.write_text(json.dumps({"history": "p", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}) + "\n")
    with pytest.raises(ValueError, match="row 0: field 'labels' must be 0 or 1"):
        ev.load_bench(str(p))
    p.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="cannot recognise the benchmark layout"):
        ev.load_bench(str(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        ev.load_bench(str(p))


HH_GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"}
# as in the published harmless-base test split: a row whose transcripts diverge before the last turn
HH_DIVERGED = {"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: hi\n\nAssistant: good",
               "rejected": "\n\nHuman: hi\n\nAssistant: hi\n\nHuman: hi\n\nAssistant: bad"}


def _hh_file(path):
    path.write_text("\n".join([json.dumps(HH_GOOD), json.dumps(HH_DIVERGED), "", "{not json",
                               json.dumps({"chosen": "no turns here", "rejected": "x"}), json.dumps(HH_GOOD)]) + "\n")
    return path


def test_skip_bad_rows_counts_and_names_lines(tmp_path):
    from alignshift.data import DataError
    from alignshift.data.schema import SkippedRows

    p = _hh_file(tmp_path / "hh.jsonl")
    with pytest.raises(DataError, match=r"hh.jsonl: line 2: row 1: 'chosen' and 'rejected' transcripts have "
                                        r"different histories"):
        ev.load_bench(str(p))
    rep = SkippedRows()
    kind, layout, rows = ev.load_bench(str(p), skip_bad_rows=True, report=rep)
    want = ("\n\nHuman: hi\n\nAssistant:", "good", "bad")
    assert (kind, layout, rows) == ("pairwise", "hh", [want, want])
    assert rep.count == 3 and rep.by_source == {str(p): 3}
    assert [r.split(": ", 1)[1][:7] for r in rep.reasons] == ["line 2:", "line 4 ", "line 5:"]
    assert "no '\\n\\nAssistant:' turn" in rep.reasons[2]
    # max_examples counts the rows kept
    assert ev.load_bench(str(p), max_examples=2, skip_bad_rows=True)[2] == [want, want]
    # only bad rows: a clear error, not an empty evaluation
    q = tmp_path / "allbad.jsonl"
    q.write_text(json.dumps(HH_DIVERGED) + "\n")
    with pytest.raises(DataError, match="no examples left after skipping bad rows"):
        ev.load_bench(str(q), "hh", skip_bad_rows=True)


def test_cli_data_errors_print_one_line_and_exit_2(tmp_path, capsys):
    p = _hh_file(tmp_path / "hh.jsonl")
    cases = [
        (["--bench", str(p)], "hh.jsonl: line 2: row 1: 'chosen' and 'rejected' transcripts have different histories"),
        (["--bench", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--bench", str(p), "--layout", "shp"], "line 1: row 0: missing field 'human_ref_A'"),
        # bad rows skipped, then the model folder is the problem
        (["--bench", str(p), "--skip-bad-rows"], "no config.json"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", str(tmp_path / "no_model"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], err
        assert len(err) == (5 if "--skip-bad-rows" in extra else 1), err  # the skip report, then the error
    # the real entry point: no traceback, exit status 2
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "alignshift.rewards.evaluate", "--model", str(tmp_path),
                        "--bench", str(p)], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                 "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {p}: line 2: row 1: 'chosen' and 'rejected' transcripts have different histories"]


def test_evaluate_reward_with_known_scores():
    rows = [("p", "aa", "a"), ("p", "a", "aaa"), ("p", "aaaa", "aa")]
    res = ev.evaluate_reward(lambda ps, rs: [len(r) for r in rs], "pairwise", rows)
    assert res["accuracy"] == pytest.approx(2 / 3) and res["n"] == 3
    rows = [("p", "a", 1.0), ("p", "aaa", 2.0), ("p", "aa", 3.0)]
    res = ev.evaluate_reward(lambda ps, rs: [len(r) for r in rs], "rating", rows)
    assert res["pearson"] == pytest.approx(scipy.stats.pearsonr([1, 3, 2], [1, 2, 3])[0])
    assert res["spearman"] == pytest.approx(0.5)


def _tiny_hf(tmp_path):
    """A 1-layer Llama with a word-level HF tokenizer and a toy chat template, saved as an HF folder."""
    import transformers
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    from alignshift.models.hf import save_hf_model
    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
    from alignshift.rewards.flr import FOLLOWUPS

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<t>", "</t>", "user", "assistant", "hi", "yo", "good", "bad"]
    for f in FOLLOWUPS["understanding"]["positive"] + FOLLOWUPS["understanding"]["negative"]:
        words += [w for w in f.split() if w not in words]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<t> {{ m['role'] }} {{ m['content'] }} </t> "
                        "{% endfor %}{% if add_generation_prompt %}<t> assistant {% endif %}")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    folder = tmp_path / "m"
    save_hf_model(model, str(folder), tokenizer=hf)
    return folder, hf


def test_cli_end_to_end(tmp_path, capsys):
    from alignshift.models.hf import load_hf_model
    from alignshift.rewards.flr import direct_scores, flr_scores

    folder, hf = _tiny_hf(tmp_path)
    pw = tmp_path / "pairs.jsonl"
    pw.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r})
                            for p, c, r in [("hi", "good", "bad"), ("yo", "bad yo", "good"), ("hi yo", "yo", "hi")]))
    rt = tmp_path / "help.jsonl"
    rt.write_text("\n".join(json.dumps({"prompt": "hi", "response": r, "helpfulness": s})
                            for r, s in [("good", 4), ("bad", 0), ("good yo", 3)]))
    out = tmp_path / "res.json"
    res = ev.main(["--model", str(folder), "--bench", str(pw), str(rt), "--out", str(out), "--batch-size", "2"])
    assert json.loads(out.read_text()) == res
    model = load_hf_model(str(folder))  # same graph as the CLI's: its compiled scorer is reused
    s = flr_scores(model, hf, ["hi", "yo", "hi yo"] * 2, ["good", "bad yo", "yo", "bad", "good", "hi"], batch_size=2)
    assert res["results"]["pairs.jsonl"]["accuracy"] == pytest.approx(np.mean(s[:3] > s[3:]), abs=1e-12)
    s = flr_scores(model, hf, ["hi"] * 3, ["good", "bad", "good yo"], batch_size=2)
    assert res["results"]["help.jsonl"]["pearson"] == pytest.approx(scipy.stats.pearsonr(s, [4, 0, 3])[0], abs=1e-5)
    res = ev.main(["--model", str(folder), "--bench", str(rt), "--reward", "direct", "--batch-size", "2"])
    d = direct_scores(model, hf, ["hi"] * 3, ["good", "bad", "good yo"], batch_size=2)
    assert res["results"]["help.jsonl"]["spearman"] == pytest.approx(scipy.stats.spearmanr(d, [4, 0, 3])[0])
    # messy HH file: the bad rows are skipped, counted and reported; the rest is evaluated
    hh = _hh_file(tmp_path / "hh.jsonl")
    res = ev.main(["--model", str(folder), "--bench", str(hh), "--reward", "direct", "--batch-size", "2",
                   "--skip-bad-rows"])
    r = res["results"]["hh.jsonl"]
    assert r["layout"] == "hh" and r["n"] == 2 and r["skipped_rows"]["count"] == 3
    assert "different histories" in r["skipped_rows"]["reasons"][0]
    out = capsys.readouterr()
    assert "hh.jsonl [hh, n=2, 3 bad row(s) skipped]" in out.out and "skipped 3 bad row(s)" in out.err


def test_bootstrap_ci():
    rs = np.random.RandomState(0)
    ok = (rs.rand(400) < 0.6).astype(float)
    lo, hi = ev.bootstrap_ci(ok, n_boot=4000, seed=1)
    assert ev.bootstrap_ci(ok, n_boot=4000, seed=1) == (lo, hi)  # seeded
    assert lo < ok.mean() < hi
    half = 1.96 * np.sqrt(ok.mean() * (1 - ok.mean()) / len(ok))  # normal approximation
    assert abs((hi - lo) / 2 - half) < 0.1 * half
    # paired: a method against itself differs by exactly 0 on every resample
    assert ev.bootstrap_ci(ok, n_boot=500, baseline=ok) == (0.0, 0.0)
    d_lo, d_hi = ev.bootstrap_ci(ok, n_boot=2000, baseline=np.zeros(400))
    assert (d_lo, d_hi) == pytest.approx(ev.bootstrap_ci(ok, n_boot=2000))
    with pytest.raises(ValueError, match="baseline shape"):
        ev.bootstrap_ci(ok, baseline=ok[:3])
    res = ev.evaluate_reward(lambda ps, rs_: [len(r) for r in rs_], "pairwise", [("p", "aa", "a"), ("p", "a", "a")],
                             n_boot=200)
    assert res["accuracy"] == 0.5 and res["ties"] == 0.5 and 0.0 <= res["accuracy_ci95"][0] <= 0.5 <= \
        res["accuracy_ci95"][1] <= 1.0


def test_hh_turns_and_empty_final_turn(tmp_path):
    t = "\n\nHuman: q1 \n\nAssistant: a1\n\nHuman: q2\n\nHuman: more\n\nAssistant:"
    assert ev.hh_turns(t) == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "q2\n\nmore"}]
    assert ev.hh_turns("just text") is None and ev.hh_turns("\n\nAssistant: hi") is None
    # the wrapper renders the transcript as turns and leaves other messages alone
    _, hf = _tiny_hf(tmp_path)
    wrapped = ev.HHTurnsTokenizer(hf)
    msgs = [{"role": "user", "content": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: hi\n\nAssistant:"},
            {"role": "assistant", "content": "good"}]
    want = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}]
    assert wrapped.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(want, tokenize=False)
    assert wrapped.chat_template == hf.chat_template and wrapped("hi yo")["input_ids"] == hf("hi yo")["input_ids"]
    # an empty final assistant turn (as in 4 published harmless-base test rows) is a bad row
    p = tmp_path / "hh.jsonl"
    p.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: ok"})
                 + "\n" + json.dumps(HH_GOOD) + "\n")
    with pytest.raises(ValueError, match="line 1: row 0: field 'chosen' has an empty final assistant turn"):
        ev.load_bench(str(p))
    assert ev.load_bench(str(p), skip_bad_rows=True)[2] == [("\n\nHuman: hi\n\nAssistant:", "good", "bad")]


def test_cli_sweep_matches_single_rewards(tmp_path):
    from alignshift.models.hf import load_hf_model
    from alignshift.rewards.flr import DIMENSIONS, MODES, direct_scores, flr_scores

    folder, hf = _tiny_hf(tmp_path)
    hh = tmp_path / "hh.jsonl"
    pairs = [("hi", "good", "bad"), ("hi\n\nAssistant: yo\n\nHuman: hi", "bad yo", "good"), ("yo hi", "yo", "hi yo"),
             ("yo", "good good", "bad"), ("hi", "hi", "hi")]
    hh.write_text("\n".join(json.dumps({"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}",
                                        "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}) for p, c, r in pairs))
    npz = tmp_path / "s.npz"
    common = ["--model", str(folder), "--bench", str(hh), "--layout", "hh", "--sweep", "--hh-turns", "--batch-size",
              "2", "--n-boot", "200"]
    res = ev.main(common + ["--chunk", "3", "--sample", "4", "--seed", "1", "--save-scores", str(npz)])
    r = res["results"]["hh.jsonl"]
    rows = r["sample"]["rows"]
    assert len(rows) == 4 and rows == sorted(rows) and r["n"] == 4
    small = ev.main(common + ["--sample", "2", "--seed", "1", "--chunk", "0"])["results"]["hh.jsonl"]["sample"]["rows"]
    assert set(small) < set(rows)  # a larger --sample with the same seed keeps the smaller one's rows
    rest = ev.main(common + ["--sample", "2", "--sample-offset", "2", "--seed", "1", "--chunk", "0"])
    assert sorted(small + rest["results"]["hh.jsonl"]["sample"]["rows"]) == rows  # disjoint, adds up
    _, _, all_rows = ev.load_bench(str(hh), "hh")
    sub = [all_rows[i] for i in rows]
    prompts = [x[0] for x in sub] * 2
    resp = [x[1] for x in sub] + [x[2] for x in sub]
    tok = ev.HHTurnsTokenizer(hf)
    model = load_hf_model(str(folder))
    saved = np.load(npz)
    assert saved["rows"].tolist() == rows
    names = {"direct": direct_scores(model, tok, prompts, resp, batch_size=2),
             "length": np.asarray([len(hf(x, add_special_tokens=False)["input_ids"]) for x in resp], float)}
    for mode in MODES:
        for d in DIMENSIONS + ("all",):
            names[f"flr/{mode}/{d}"] = flr_scores(model, tok, prompts, resp, dimension=d, mode=mode, batch_size=2)
    assert set(r["methods"]) == set(names)
    for k, want in names.items():
        np.testing.assert_allclose(saved[k.replace("/", ".")], want, rtol=1e-5, atol=1e-5, err_msg=k)
        m = r["methods"][k]
        assert m["accuracy"] == pytest.approx(np.mean(want[:4] > want[4:])), k
        assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
        if k != "direct":
            assert m["minus_direct"] == pytest.approx(m["accuracy"] - r["methods"]["direct"]["accuracy"])
    # the default renders the transcript as one user message (and --chunk 0 scores all rows in one chunk)
    flat_npz = tmp_path / "flat.npz"
    flat = ev.main([x for x in common if x != "--hh-turns"] + ["--chunk", "0", "--save-scores", str(flat_npz)])
    assert flat["results"]["hh.jsonl"]["n"] == 5 and "sample" not in flat["results"]["hh.jsonl"]
    args = ([x[0] for x in all_rows] * 2, [x[1] for x in all_rows] + [x[2] for x in all_rows])
    got = np.load(flat_npz)["flr.likelihood.all"]
    np.testing.assert_allclose(got, flr_scores(model, hf, *args, dimension="all", batch_size=2), rtol=1e-5, atol=1e-5)
    assert np.abs(got - flr_scores(model, tok, *args, dimension="all", batch_size=2)).max() > 1e-3
    rt = tmp_path / "help.jsonl"
    rt.write_text(json.dumps({"prompt": "hi", "response": "good", "helpfulness": 1}) + "\n")
    with pytest.raises(SystemExit):
        ev.main(["--model", str(folder), "--bench", str(rt), "--sweep"])
