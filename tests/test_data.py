"""Tests for alignshift.data: schema, tokenizer, encoding and batching."""

import json

import numpy as np
import pytest

from alignshift.data import (
    PAIR_KEYS,
    BatchIterator,
    DataError,
    PreferenceExample,
    WordTokenizer,
    encode_completions,
    encode_pairs,
    encode_prompts,
    validate_example,
    validate_examples,
)

WORDS = ["user:", "assistant:", "explain", "cooking", "recipe", "oven", "flour", "the", "a", "poison", "w1", "w2", "w3"]


@pytest.fixture
def tok():
    return WordTokenizer(WORDS)


def _ex(prompt="user: explain cooking assistant:", chosen="recipe oven", rejected="the poison", **meta):
    return PreferenceExample(prompt, chosen, rejected, dict(meta))


# ------------------------------------------------------------------ schema
def test_validate_ok_dict_and_dataclass():
    ex = validate_example({"prompt": "p", "chosen": "a", "rejected": "b"}, 0)
    assert ex == PreferenceExample("p", "a", "b", {})
    ex2 = _ex(topic=1)
    assert validate_example(ex2, 3) == ex2
    assert validate_examples([ex2, {"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"k": 1}}])[1].meta == {"k": 1}


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "   "}, "rejected", "is empty"),
        ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "is missing"),
        ({"prompt": "p", "rejected": "b"}, "chosen", "is missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "must be a str"),
        ({"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", "identical"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "meta": [1]}, "meta", "must be a dict"),
    ],
)
def test_validate_errors_name_row_and_field(row, field, problem):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 17 + [row]
    with pytest.raises(DataError) as ei:
        validate_examples(rows)
    msg = str(ei.value)
    assert msg.startswith(f"row 17: field '{field}'")
    assert problem in msg
    assert isinstance(ei.value, ValueError)


def test_validate_non_mapping_row():
    with pytest.raises(DataError, match="row 2"):
        validate_example(["p", "a", "b"], 2)


# --------------------------------------------------------------- tokenizer
def test_tokenizer_specials_and_roundtrip(tok, tmp_path):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.vocab_size == 4 + len(WORDS)
    ids = tok.encode("user:  explain\tcooking  assistant:", add_bos=True)
    assert ids[0] == tok.bos_id and len(ids) == 5
    assert tok.decode(ids) == "user: explain cooking assistant:"
    assert tok.decode(ids, skip_special=False).startswith("<bos> user:")
    assert tok.encode("zebra recipe") == [tok.unk_id, tok.token_to_id("recipe")]
    assert tok.decode(tok.encode("zebra recipe")) == "<unk> recipe"
    path = tmp_path / "tok.json"
    tok.save(path)
    tok2 = WordTokenizer.load(path)
    assert tok2 == tok and tok2.vocab == tok.vocab
    assert json.loads(path.read_text())["vocab"][4] == WORDS[0]
    # specials given explicitly in canonical order are accepted
    assert WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS) == tok


def test_tokenizer_rejects_bad_vocab(tok):
    with pytest.raises(ValueError):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError):
        WordTokenizer(["a b"])
    with pytest.raises(ValueError):
        WordTokenizer(["a", "<eos>"])
    with pytest.raises(ValueError):
        tok.decode([999])


# ------------------------------------------------------------------ encode
def test_encode_completions_layout_and_roundtrip(tok):
    prompts = ["user: explain cooking assistant:", "user: explain assistant:"]
    comps = ["recipe oven flour", "poison"]
    enc = encode_completions(tok, prompts, comps, max_prompt_len=6, max_completion_len=5)
    ids, att, lm = enc["input_ids"], enc["attention_mask"], enc["loss_mask"]
    assert ids.shape == att.shape == lm.shape == (2, 11)
    assert ids.dtype == att.dtype == lm.dtype == np.int32
    assert not enc["truncated"].any()
    for i in range(2):
        assert ids[i, 0] == tok.bos_id
        # round trip: tokens under loss_mask decode to completion + eos
        assert tok.decode(ids[i][lm[i] == 1], skip_special=False) == comps[i] + " <eos>"
        n_prompt = len(tok.encode(prompts[i])) + 1
        assert lm[i, :n_prompt].sum() == 0  # never on bos / prompt
        assert np.all(lm[i] <= att[i])  # never on padding
        real = int(att[i].sum())
        assert np.all(att[i, :real] == 1) and np.all(att[i, real:] == 0)  # right padded
        assert np.all(ids[i, real:] == tok.pad_id)
        assert ids[i, real - 1] == tok.eos_id
    # the training shift: loss_mask[:, 1:] still covers every completion token
    assert lm[:, 1:].sum() == lm.sum()


def test_encode_truncation_policy(tok):
    prompt = "w1 w2 w3 user: explain cooking assistant:"  # 7 words -> 8 with bos
    comp = "recipe oven flour the a"  # 5 words -> 6 with eos
    enc = encode_completions(tok, [prompt], [comp], max_prompt_len=4, max_completion_len=3)
    ids, lm, att = enc["input_ids"][0], enc["loss_mask"][0], enc["attention_mask"][0]
    assert ids.shape == (7,)
    assert tok.decode(ids[:4], skip_special=False) == "<bos> explain cooking assistant:"  # end of prompt kept
    assert tok.decode(ids[lm == 1], skip_special=False) == "recipe oven flour"  # start kept, eos dropped
    assert bool(enc["truncated"][0]) and bool(enc["prompt_truncated"][0])
    assert att.sum() == 7 and lm.sum() == 3
    # eos counts in the budget: exactly-fitting words without room for eos are truncated
    enc2 = encode_completions(tok, ["cooking"], ["recipe oven"], max_prompt_len=2, max_completion_len=2)
    assert bool(enc2["truncated"][0]) and tok.eos_id not in enc2["input_ids"][0]
    enc3 = encode_completions(tok, ["cooking"], ["recipe oven"], max_prompt_len=2, max_completion_len=3)
    assert not enc3["truncated"][0] and enc3["input_ids"][0, -1] == tok.eos_id
    # max_prompt_len=1 keeps only bos
    enc4 = encode_completions(tok, ["cooking"], ["recipe"], max_prompt_len=1, max_completion_len=2)
    assert enc4["input_ids"][0].tolist() == [tok.bos_id, tok.token_to_id("recipe"), tok.eos_id]
    with pytest.raises(ValueError):
        encode_completions(tok, ["a"], ["b"], max_prompt_len=4, max_completion_len=0)
    with pytest.raises(ValueError):
        encode_completions(tok, ["a"], ["b", "c"], max_prompt_len=4, max_completion_len=2)


def test_encode_prompts_left_padded(tok):
    enc = encode_prompts(tok, ["user: explain cooking assistant:", "cooking", "w1 w2 w3 user: explain"], max_prompt_len=5)
    ids, m = enc["prompt_ids"], enc["prompt_mask"]
    assert ids.shape == m.shape == (3, 5) and ids.dtype == m.dtype == np.int32
    assert tok.decode(ids[0], skip_special=False) == "<bos> user: explain cooking assistant:"
    assert ids[1].tolist() == [0, 0, 0, tok.bos_id, tok.token_to_id("cooking")]
    assert m[1].tolist() == [0, 0, 0, 1, 1]
    assert tok.decode(ids[2], skip_special=False) == "<bos> w2 w3 user: explain"
    assert np.all(ids[:, -1] != tok.pad_id)


def test_encode_pairs_keys_and_kl_mismatch(tok):
    exs = [_ex(chosen=c, rejected=r) for c, r in [("recipe", "poison"), ("oven oven", "the"), ("flour a", "a")]]
    # the former kl pairing (the default, kl_pairing="trl", is tested in tests/test_recipes.py)
    enc = encode_pairs(tok, exs, max_prompt_len=6, max_completion_len=4, kl_pairing="previous_chosen")
    assert tuple(enc) == PAIR_KEYS
    assert all(v.dtype == np.int32 for v in enc.values())
    n = len(exs)
    for i in range(n):
        for prefix, text in (("chosen", exs[i].chosen), ("rejected", exs[i].rejected),
                             ("kl", exs[(i - 1) % n].chosen)):
            ids, lm = enc[f"{prefix}_input_ids"][i], enc[f"{prefix}_loss_mask"][i]
            assert tok.decode(ids[lm == 1], skip_special=False) == text + " <eos>"
        assert tok.decode(enc["prompt_ids"][i]) == exs[i].prompt
    # kl pairs are mismatched: no row's kl completion equals its own chosen completion
    kl_c = [tok.decode(enc["kl_input_ids"][i][enc["kl_loss_mask"][i] == 1]) for i in range(n)]
    assert all(kl_c[i] != exs[i].chosen for i in range(n))
    # prompt part of kl equals prompt part of chosen
    assert np.array_equal(enc["kl_input_ids"] * (1 - enc["kl_loss_mask"]) * enc["kl_attention_mask"],
                          enc["chosen_input_ids"] * (1 - enc["chosen_loss_mask"]) * enc["chosen_attention_mask"])


def test_encode_pairs_validates(tok):
    rows = [_ex(), {"prompt": "user: explain", "chosen": "", "rejected": "the"}]
    with pytest.raises(DataError, match=r"row 1: field 'chosen' is empty"):
        encode_pairs(tok, rows, max_prompt_len=6, max_completion_len=4)
    with pytest.raises(DataError, match=r"row 0: field 'rejected'"):
        encode_pairs(tok, [_ex(chosen="oven", rejected="oven")], max_prompt_len=6, max_completion_len=4)
    with pytest.raises(DataError, match=r"row 0: field 'prompt' is missing"):
        encode_pairs(tok, [{"chosen": "a", "rejected": "b"}], max_prompt_len=6, max_completion_len=4)


# ------------------------------------------------------------------ loader
def _arrays(n=23):
    return {"x": np.arange(n, dtype=np.int32), "y": np.arange(2 * n, dtype=np.float32).reshape(n, 2)}


def test_batch_iterator_pure_and_epochs():
    it = BatchIterator(_arrays(), 5, seed=7)
    assert it.steps_per_epoch == 4
    a = it.batch_at(6)
    it2 = BatchIterator(_arrays(), 5, seed=7)
    for s in (3, 9, 0):
        it2.batch_at(s)
    b = it2.batch_at(6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(a["y"][:, 0], 2 * a["x"])  # rows stay aligned across arrays
    # each epoch visits distinct examples, drops the incomplete last batch
    ep0 = np.concatenate([it.batch_at(s)["x"] for s in range(4)])
    ep1 = np.concatenate([it.batch_at(s)["x"] for s in range(4, 8)])
    assert len(set(ep0.tolist())) == 20 and len(set(ep1.tolist())) == 20
    assert not np.array_equal(ep0, ep1)
    expected = np.random.default_rng([7, 1]).permutation(23)[:20]
    assert np.array_equal(ep1, expected)
    # different seed -> different order; no shuffle -> identity order
    assert not np.array_equal(BatchIterator(_arrays(), 5, seed=8).batch_at(0)["x"], it.batch_at(0)["x"])
    ns = BatchIterator(_arrays(), 5, seed=7, shuffle=False)
    assert ns.batch_at(5)["x"].tolist() == [5, 6, 7, 8, 9]


def test_batch_iterator_resume_bit_identical():
    full = BatchIterator(_arrays(), 4, seed=3)
    ref = [next(full) for _ in range(13)]
    part = BatchIterator(_arrays(), 4, seed=3)
    for _ in range(6):
        next(part)
    state = json.loads(json.dumps(part.state()))
    assert state == {"step": 6}
    resumed = BatchIterator(_arrays(), 4, seed=3)
    resumed.restore(state)
    rest = [b for _, b in zip(range(7), resumed)]
    for r, b in zip(ref[6:], rest):
        assert all(np.array_equal(r[k], b[k]) for k in r)
    assert resumed.state() == {"step": 13}


def test_batch_iterator_errors():
    with pytest.raises(ValueError):
        BatchIterator(_arrays(3), 4, seed=0)
    with pytest.raises(ValueError):
        BatchIterator({"x": np.zeros((0, 2))}, 1, seed=0)
    with pytest.raises(ValueError):
        BatchIterator({"x": np.zeros(3), "y": np.zeros(4)}, 1, seed=0)
    with pytest.raises(ValueError):
        BatchIterator(_arrays(3), 0, seed=0)
