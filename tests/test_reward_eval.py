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


def test_cli_end_to_end(tmp_path, capsys):
    import transformers
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    from alignshift.models.hf import load_hf_model, save_hf_model
    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
    from alignshift.rewards.flr import FOLLOWUPS, direct_scores, flr_scores

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
