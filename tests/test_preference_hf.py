"""experiments/preference_hf.py end to end: an HF model folder (tiny, written here) + a dataset
in the generic preference layout -> training on a mesh -> summary.json the notebooks read; and
DoRA on the candidates layout (K = 4, classifier probs and source ids -> source columns)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers
import yaml
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start>", "<eot>", "user", "assistant", "system", ":",
         "good", "great", "fine", "bad", "awful", "poor", "how", "what", "why", "is", "it", "the", "sky", "sea"]


def _folder(tmp_path):
    from alignshift.models.hf import save_hf_model
    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start> {{ m['role'] }} : {{ m['content'] }} <eot> "
                         "{% endfor %}{% if add_generation_prompt %}<start> assistant : {% endif %}")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    # random weights from numpy into an abstract model: no XLA compilation for initialisers
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype), state)
    d = tmp_path / "model"
    save_hf_model(nnx.merge(graphdef, state), str(d), tokenizer=tok)
    return str(d)


# rows appended to train.jsonl (rows 48-50): malformed (empty chosen; chosen == rejected) and
# over-long (a 9-word chosen: 10 tokens with <eot> > max_completion_len=6)
BAD_ROWS = [{"prompt": "how is it", "chosen": "", "rejected": "bad"},
            {"prompt": "how is it", "chosen": "good", "rejected": "good"}]
LONG_ROW = {"prompt": "how is it", "chosen": "good " * 9, "rejected": "bad"}


def _data(tmp_path, extra_train=()):
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    for split, n in (("train", 48), ("test", 16)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                q = " ".join(rng.choice(["how", "what", "why", "is", "it", "the", "sky", "sea"], 4))
                good = " ".join(rng.choice(["good", "great", "fine"], rng.integers(1, 4)))
                bad = " ".join(rng.choice(["bad", "awful", "poor"], rng.integers(1, 4)))
                f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
            if split == "train":
                for row in extra_train:
                    f.write(json.dumps(row) + "\n")
    return str(d)


def _config(tmp_path, data_dir, **data):
    cfg = {
        "scenario": "tiny_real", "seed": 0,
        "model": {"hf_path": _folder(tmp_path), "dtype": "float32"},
        "data": {"dataset": "preference", "dataset_source": data_dir, "dataset_kwargs": {},
                 "chat_mode": "chat", "max_prompt_len": 12, "max_completion_len": 6, **data},
        # one method and no in-training evaluation: every distinct jit costs ~1 s of CI time
        "train": {"steps": 10, "batch_size": 8, "log_every": 5, "eval_every": 0,
                  "optim": {"lr": 3e-3, "warmup_steps": 2}},
        "methods": [{"name": "kldpo", "base": "dpo", "base_kwargs": {"beta": 0.5}, "weighting": "kl_dro",
                     "weighting_kwargs": {"tau": 0.5}}],
        "eval": {"batch_size": 16},
        "mesh": {"data": -1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_hf_model_and_dataset_to_results(tmp_path, capsys):
    import preference_hf

    # --skip-bad-rows drops the two malformed rows (adapter) and data.truncation=skip the
    # over-long one (measured through the chat template); all three are counted
    path = _config(tmp_path, _data(tmp_path, [*BAD_ROWS, LONG_ROW]), truncation="skip")
    out = tmp_path / "out"
    summary = preference_hf.main(["--config", path, "--out", str(out), "--skip-bad-rows"])
    s = json.loads((out / "summary.json").read_text())
    assert s["scenario"] == "preference" and set(s["methods"]) == {"kldpo"}
    assert s["data_info"]["n_train"] == 48 and s["data_info"]["n_val"] == 0 and s["data_info"]["n_test"] == 16
    assert s["data_info"]["skipped_rows"] == {"count": 3, "by_source": {"preference/train": 3}}
    seed_summary = json.loads((out / "seed_0" / "summary.json").read_text())
    assert seed_summary["data_info"]["skipped_rows"]["count"] == 3
    # eval.reference_row / eval.sample_prompts off (the default): the outputs are as before
    assert set(seed_summary["methods"]["kldpo"]) == {"test_pref_acc", "test_reward_margin", "train_time_s"}
    assert "samples" not in s and "samples" not in seed_summary
    printed = capsys.readouterr().out
    assert "preference row 48: field 'chosen' is empty" in printed
    assert "preference/train row 50: field 'chosen' has 10 tokens > max_completion_len=6" in printed
    assert s["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and s["config"]["model"]["hf_path"].endswith("model")
    # "good" responses vs "bad" ones is trivially learnable: DPO ranks the held-out pairs
    assert s["methods"]["kldpo"]["test_pref_acc"] >= 0.9 and s["methods"]["kldpo"]["test_reward_margin"] > 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in recs if r.get("phase") == "preference"} == {"kldpo"}
    assert any("weights/max" in r for r in recs)
    assert (out / "results.md").read_text().count("|") > 8 and summary["n_seeds"] == 1
    # the notebooks' reader understands it
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import nbhelpers

    summ, records = nbhelpers.load_run("out", root=tmp_path)
    assert "test_pref_acc" in nbhelpers.methods_table(summ).columns and nbhelpers.methods_in(records) == ["kldpo"]


def test_script_requires_model_and_dataset(tmp_path, capsys):
    import preference_hf

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "preference"}}))
    with pytest.raises(SystemExit) as e:
        preference_hf.main(["--config", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "model.hf_path" in capsys.readouterr().err


def test_bad_and_over_long_rows_are_errors_naming_row_and_field(tmp_path):
    import preference_hf

    from alignshift.data.schema import DataError

    # without --skip-bad-rows the first malformed row stops the run, named by file row and field
    path = _config(tmp_path, _data(tmp_path, BAD_ROWS))
    with pytest.raises(DataError, match=r"^preference row 48: field 'chosen' is empty"):
        preference_hf.main(["--config", path, "--out", str(tmp_path / "o")])
    # data.truncation=error: an over-long response (counted with the chat template) is refused
    # instead of truncated, before any model is loaded
    (tmp_path / "long").mkdir()
    data = _data(tmp_path / "long", [LONG_ROW])
    path = _config(tmp_path, data, truncation="error")
    with pytest.raises(DataError, match=r"^preference/train row 48: field 'chosen' has 10 tokens > "
                                        r"max_completion_len=6 \(truncation policy 'error'\)"):
        preference_hf.main(["--config", path, "--out", str(tmp_path / "o")])
    # ... and the prompt budget counts the rendered template (12 tokens here), not the raw text
    path = _config(tmp_path, data, truncation="error", max_prompt_len=11, max_completion_len=10)
    with pytest.raises(DataError, match=r"^preference/train row 0: field 'prompt' has 12 tokens > max_prompt_len=11"):
        preference_hf.main(["--config", path, "--out", str(tmp_path / "o")])


def _script(*argv):
    """experiments/preference_hf.py as a user runs it: a fresh process, its exit status and stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "preference_hf.py"), *argv],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _error_lines(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    return errors[0]


def test_data_errors_are_one_error_line_and_exit_2(tmp_path):
    """A malformed JSON line in the data file, or a data path that does not exist: ONE line
    ``error: ...`` naming the file (and line) on stderr, exit status 2, no traceback."""
    data = _data(tmp_path)
    with open(os.path.join(data, "train.jsonl"), "a") as f:
        f.write('{"prompt": "how is it", "chosen": "good"\n')  # line 49: not valid JSON
    path = _config(tmp_path, data)
    line = _error_lines(_script("--config", path, "--out", str(tmp_path / "o")))
    assert "train.jsonl line 49: not valid JSON" in line
    cfg = yaml.safe_load(open(path))
    cfg["data"]["dataset_source"] = str(tmp_path / "missing.jsonl")
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(cfg))
    line = _error_lines(_script("--config", str(missing), "--out", str(tmp_path / "o")))
    assert "missing.jsonl" in line and "does not exist" in line


def test_more_than_one_seed_is_refused(tmp_path, capsys):
    import preference_hf

    path = _config(tmp_path, _data(tmp_path))
    for argv in (["--seeds", "3"], ["seeds=2"]):
        with pytest.raises(SystemExit) as e:
            preference_hf.main(["--config", path, "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "config key 'seeds' (--seeds) is" in err and "seed=S" in err


# ---- DoRA on candidates data: K = 4 candidates per prompt with classifier 'probs' and
# 'source_ids' (the dora_hh_mistral layout) -> source_prob / source_share [N, 4] columns
K4_SHARES = [0.4, 0.3, 0.2, 0.1]  # distinct per source id, so the mapping is visible


def _candidates_data(tmp_path, n_train=24, n_test=8, drop_probs_row=None):
    rng = np.random.default_rng(1)
    d = tmp_path / "cands"
    d.mkdir()
    rows = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows[split] = []
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                q = " ".join(rng.choice(["how", "what", "why", "is", "it", "the", "sky", "sea"], 4))
                cands = [" ".join(rng.choice(words, rng.integers(1, 4)))
                         for words in (["good", "great"], ["fine"], ["poor"], ["bad", "awful"])]
                perm = rng.permutation(4)  # candidate order in the file is not the score order
                row = {"prompt": q, "candidates": [cands[j] for j in perm],
                       "scores": [float(3 - j) for j in perm]}
                if split == "train":  # the test split needs no classifier outputs
                    row["probs"] = [round(float(x), 3) for x in rng.uniform(0.05, 0.95, 4)]
                    row["source_ids"] = [int(x) for x in rng.permutation(4)]
                    if i == drop_probs_row:
                        del row["probs"]
                rows[split].append(row)
                f.write(json.dumps(row) + "\n")
    return str(d), rows


def _dora_config(tmp_path, data_dir, **kwargs):
    path = _config(tmp_path, data_dir)
    cfg = yaml.safe_load(open(path))
    cfg["data"].update({"dataset": "candidates",
                        "dataset_kwargs": {"test_split": "test", "source_shares": K4_SHARES, **kwargs}})
    cfg["train"].update({"steps": 3, "log_every": 1})
    cfg["methods"] = [{"name": "dpo_dora", "base": "dpo", "base_kwargs": {"beta": 0.5}, "weighting": "dora",
                       "weighting_kwargs": {"lam": 1.0, "alpha": 0.25}}]
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_source_columns_from_candidates_probs_and_source_ids(tmp_path):
    from alignshift.experiment.preference_hf import source_columns, split_source_kwargs

    from alignshift.config import ConfigError, load_config
    from alignshift.data.datasets import load_dataset_splits
    from alignshift.data.schema import DataError

    data, rows = _candidates_data(tmp_path)
    cfg = load_config(_dora_config(tmp_path, data, max_rows=100))
    kwargs, spec = split_source_kwargs(cfg)
    # the share keys are this script's, not the loader's (which rejects unknown kwargs)
    assert kwargs == {"test_split": "test", "max_rows": 100}
    assert spec["shares"] == K4_SHARES and spec["methods"] == {"dpo_dora": "dora"} and spec["splits"] == {"train"}
    train = load_dataset_splits("candidates", data, **kwargs).train
    assert len(train) == len(rows["train"])
    cols = source_columns(train, spec, source="candidates/train")
    # all K = 4 candidates of each prompt, in the file's order (not just the chosen/rejected pair)
    want_p = np.asarray([r["probs"] for r in rows["train"]], np.float32)
    want_a = np.asarray([[K4_SHARES[s] for s in r["source_ids"]] for r in rows["train"]], np.float32)
    assert cols["source_prob"].shape == cols["source_share"].shape == (len(train), 4)
    np.testing.assert_array_equal(cols["source_prob"], want_p)
    np.testing.assert_array_equal(cols["source_share"], want_a)
    # rows without source_ids: the scalar source_share for every candidate
    bare = [e.__class__(e.prompt, e.chosen, e.rejected, {k: v for k, v in e.meta.items() if k != "source_ids"})
            for e in train]
    one = source_columns(bare, {**spec, "share": 0.75}, source="candidates/train")
    np.testing.assert_array_equal(one["source_share"], np.full((len(train), 4), 0.75, np.float32))
    with pytest.raises(DataError, match=r"^candidates/train row 0: field 'source_ids' is missing; method "
                                        r"'dpo_dora' \(weighting 'dora'\)"):
        source_columns(bare, spec, source="candidates/train")
    # a source id outside source_shares, and a row with another K, name the row and field
    with pytest.raises(DataError, match=r"^candidates/train row 2: field 'source_ids' has source id 3 outside "
                                        r"data.dataset_kwargs.source_shares \(ids 0..2\)"):
        source_columns(train[2:], {**spec, "shares": K4_SHARES[:3]}, source="candidates/train")
    odd = train[:3] + [train[3].__class__(train[3].prompt, train[3].chosen, train[3].rejected,
                                          {**train[3].meta, "probs": [0.5] * 3, "source_ids": [0, 1, 2]})]
    with pytest.raises(DataError, match=r"^candidates/train row 3: field 'probs' has 3 candidates but row 0 has 4"):
        source_columns(odd, spec, source="candidates/train")
    # a DoRA method with no share key at all is refused up front
    cfg.data.dataset_kwargs = {"test_split": "test"}
    with pytest.raises(ConfigError, match=r"method 'dpo_dora' \(weighting 'dora'\) needs each candidate's "
                                          r"source share.*source_shares"):
        split_source_kwargs(cfg)


def test_dora_on_candidates_file_end_to_end(tmp_path, monkeypatch):
    import preference_hf

    from alignshift.train import phases

    data, rows = _candidates_data(tmp_path)
    seen = {}
    real = phases.run_preference

    def spy(graphdef, rest, ref_params, arrays, method, *a, **kw):
        seen[method.name] = {k: np.asarray(v) for k, v in arrays.items()}
        return real(graphdef, rest, ref_params, arrays, method, *a, **kw)

    monkeypatch.setattr(phases, "run_preference", spy)
    out = tmp_path / "out"
    preference_hf.main(["--config", _dora_config(tmp_path, data), "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert set(s["methods"]) == {"dpo_dora"} and s["data_info"]["n_train"] == 24 and s["data_info"]["n_test"] == 8
    assert math.isfinite(s["methods"]["dpo_dora"]["test_pref_acc"])
    # the training arrays the method got carry all 4 candidates' p and mapped shares a
    arr = seen["dpo_dora"]
    np.testing.assert_array_equal(arr["source_prob"], np.asarray([r["probs"] for r in rows["train"]], np.float32))
    np.testing.assert_array_equal(arr["source_share"], np.asarray(
        [[K4_SHARES[i] for i in r["source_ids"]] for r in rows["train"]], np.float32))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if r.get("method") == "dpo_dora" and "weights/max" in r]
    assert logged and all(math.isfinite(r["loss"]) for r in logged if "loss" in r)


def test_dora_training_row_without_probs_is_an_error(tmp_path):
    import preference_hf

    from alignshift.data.schema import DataError

    data, _ = _candidates_data(tmp_path, drop_probs_row=5)
    with pytest.raises(DataError, match=r"^candidates/train row 5: field 'probs' is missing; method 'dpo_dora' "
                                        r"\(weighting 'dora'\) needs every training row's per-candidate"):
        preference_hf.main(["--config", _dora_config(tmp_path, data), "--out", str(tmp_path / "o")])


def test_reference_row_samples_and_holdout(tmp_path):
    """eval.reference_row + eval.sample_prompts (real data): a reference row ranking the held-out
    pairs by the reference's mean per-token log-prob (checked against transformers), Wilson 95%
    intervals, responses of the reference and the policy for the same held-out prompts with the
    Monte-Carlo KL; data.dataset_kwargs.holdout_ratio carves the test set from train."""
    import preference_hf
    import torch

    from alignshift.data.chat import encode_chat_pairs
    from alignshift.models.hf import load_hf_tokenizer

    path = _config(tmp_path, _data(tmp_path))
    cfg = yaml.safe_load(open(path))
    cfg["data"]["dataset_kwargs"] = {"holdout_ratio": 0.25, "seed": 3}
    cfg["eval"].update({"reference_row": True, "sample_prompts": 3, "max_new_tokens": 4, "temperature": 1.0})
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    out = tmp_path / "out"
    preference_hf.main(["--config", path, "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    # 48 train rows -> 12 held out (the folder's own 16 test rows are not used)
    assert s["data_info"]["n_train"] == 36 and s["data_info"]["n_test"] == 12
    assert s["data_info"]["holdout"] == {"ratio": 0.25, "seed": 4, "n_test": 12}
    assert list(s["methods"]) == ["reference", "kldpo"]
    ref, pol = s["methods"]["reference"], s["methods"]["kldpo"]
    # the reference's implicit reward is 0 for every pair: no accuracy, margin 0, KL 0
    assert math.isnan(ref["test_pref_acc"]) and ref["test_reward_margin"] == 0.0 and ref["kl_to_ref"] == 0.0
    assert pol["test_pref_acc_lo"] <= pol["test_pref_acc"] <= pol["test_pref_acc_hi"] and pol["test_n_pairs"] == 12
    assert math.isfinite(pol["kl_to_ref"]) and pol["kl_to_ref"] != 0.0

    # the reference ranking, recomputed with transformers on the same held-out rows
    from alignshift.data.datasets import load_dataset_splits
    from alignshift.experiment.preference_hf import hold_out
    from alignshift.data.schema import SkippedRows

    splits = hold_out(load_dataset_splits("preference", cfg["data"]["dataset_source"], seed=3), 0.25, 4,
                      SkippedRows())
    tok = load_hf_tokenizer(cfg["model"]["hf_path"])
    enc = encode_chat_pairs(tok, splits.test, max_prompt_len=12, max_completion_len=6, mode="chat")
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"]["hf_path"], torch_dtype=torch.float32)

    def mean_logp(g):
        ids = torch.tensor(enc[f"{g}_input_ids"], dtype=torch.long)
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids, attention_mask=torch.tensor(enc[f"{g}_attention_mask"])).logits, -1)
        tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].numpy()
        m = enc[f"{g}_loss_mask"][:, 1:]
        return (tok_lp * m).sum(1) / m.sum(1)

    assert ref["test_ref_logp_acc"] == pytest.approx(float(np.mean(mean_logp("chosen") > mean_logp("rejected"))))

    # the same 3 held-out prompts, one response each from the reference and the policy
    smp = s["samples"]
    assert smp["prompts"] == [e.prompt for e in splits.test[:3]]
    assert set(smp["responses"]) == {"reference", "kldpo"} and all(len(v) == 3 for v in smp["responses"].values())
    assert json.loads((out / "seed_0" / "summary.json").read_text())["samples"] == smp
    md = (out / "results.md").read_text()
    assert "Responses to held-out prompts" in md and "95% CI low" in md and "KL to ref" in md
