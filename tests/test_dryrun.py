"""--dry-run: every experiment config builds with abstract shapes on its mesh (no weights)."""

import functools
import glob
import json
import math
import os

import pytest

from alignshift.cli import experiment_parser, parse_experiment_args
from alignshift.config import ConfigError, load_config
from alignshift.dryrun import dry_run, load_plan_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml")))
REAL = {"iw_dpo_safe_rlhf_llama3_8b", "kldpo_helpsteer2_llama32_1b", "dora_hh_mistral", "flr_ultrafeedback_llama3_8b",
        "iw_dpo_shp_pythia_1.4b"}


def _name(p):
    return os.path.splitext(os.path.basename(p))[0]


def _hf(folder):
    with open(os.path.join(ROOT, "experiments", "configs", "models", folder, "config.json")) as f:
        return json.load(f)


def _llama_params(c):
    """Independent count from the HF config: embeddings, per-layer attention/MLP/norms, head."""
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h * (1 if c.get("tie_word_embeddings") else 2) + n * layer + h


def _neox_params(c):
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return 2 * v * h + n * layer + 2 * h


@functools.lru_cache(maxsize=None)
def _report(name):
    """One abstract build per config for the whole module (an 8 B build takes ~3 s on CI)."""
    cfg, dropped = load_plan_config(os.path.join(ROOT, "experiments", "configs", f"{name}.yaml"))
    return cfg, dropped, dry_run(cfg, devices=8, out=None)


def test_every_config_is_covered():
    assert REAL <= {_name(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_passes_dry_run(path):
    cfg, dropped, rep = _report(_name(path))  # script-specific sections (DoRA's classifier, ...) not planned
    assert set(dropped) <= {"classifier", "flr"}
    assert rep["n_params"] > 0 and rep["per_device_bytes"]["total"] > 0 and rep["plan"]
    if _name(path) in REAL:
        assert cfg.mesh.device_memory_gb > 0 and rep["fits"]  # the documented memory budget holds
        assert rep["devices"] == cfg.mesh.devices and cfg.train.batch_size % (rep["mesh"]["data"] * rep["mesh"]["fsdp"]) == 0
        assert not [w for w in rep["warnings"] if "match no partition rule" in w]


def test_parameter_counts_and_sharded_bytes_are_exact():
    cfg, _, rep = _report("iw_dpo_safe_rlhf_llama3_8b")
    c = _hf("llama31_8b_instruct")
    assert rep["n_params"] == _llama_params(c) == 8_030_261_248  # the published 8.03 B
    # fsdp=8, tensor=1: every matrix is split 8 ways along its 4096-wide model dim, vectors replicated
    h, n = c["hidden_size"], c["num_hidden_layers"]
    vectors = (2 * n + 1) * h
    expect = ((rep["n_params"] - vectors) // 8 + vectors) * 2  # bfloat16
    assert rep["per_device_bytes"]["params"] == expect == rep["per_device_bytes"]["grads"]
    assert rep["per_device_bytes"]["frozen"] == expect  # the reference copy
    # AdamW's mu and nu follow the parameters (same dtype and sharding) + a few scalars
    assert 0 <= rep["per_device_bytes"]["opt_state"] - 2 * expect < 1024
    # FSDP gathers: the larger of 3 layers' worth (weights, next weights, whole gradient) and the
    # LM head + its gradient (here the head: 128256 x 4096 in bfloat16, twice)
    layer = (_llama_params(c) - 2 * c["vocab_size"] * h - h) // n * 2
    assert rep["per_device_bytes"]["fsdp_buffers"] == max(3 * layer, 2 * 2 * c["vocab_size"] * h)
    # a float32 gradient accumulator (twice the bfloat16 gradients) only with gradient accumulation
    assert rep["per_device_bytes"]["grad_accum"] == (2 * expect if cfg.train.grad_accum_steps > 1 else 0)
    assert rep["per_device_gib"]["total"] == pytest.approx(sum(rep["per_device_bytes"][k] for k in (
        "params", "grads", "grad_accum", "opt_state", "frozen", "fsdp_buffers", "activations")) / 1024 ** 3)

    assert _report("kldpo_helpsteer2_llama32_1b")[2]["n_params"] == _llama_params(_hf("llama32_1b_instruct")) \
        == 1_235_814_400
    assert _report("iw_dpo_shp_pythia_1.4b")[2]["n_params"] == _neox_params(_hf("pythia_1.4b")) == 1_414_647_808


def test_lora_config_counts_adapters_and_base():
    cfg, _, rep = _report("dora_hh_mistral")
    c = _hf("mistral_7b_v01")
    r, n, h = 8, c["num_hidden_layers"], c["hidden_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    adapters = n * (r * (h + h) + r * (h + kv))  # q_proj and v_proj: A [in, r], B [r, out]
    assert rep["n_trainable"] == adapters == 3_407_872
    assert rep["n_params"] == _llama_params(c) + adapters  # Mistral-7B: 7.24 B base
    assert rep["per_device_bytes"]["frozen"] > 100 * rep["per_device_bytes"]["params"]
    # loaded as model_type mistral (our Llama + sliding window), no longer planned as an alias
    assert rep["model"]["model_type"] == "mistral" and rep["model"]["sliding_window"] == 4096
    assert not [w for w in rep["warnings"] if "mistral" in w]


def test_dry_run_rejects_impossible_plans(tmp_path):
    path = os.path.join(ROOT, "experiments", "configs", "iw_dpo_safe_rlhf_llama3_8b.yaml")
    small = os.path.join(ROOT, "experiments", "configs", "kldpo_helpsteer2_llama32_1b.yaml")
    with pytest.raises(ConfigError, match="mesh.device_memory_gb"):
        dry_run(load_config(small, ["data.max_completion_len=8192"]), out=None)
    with pytest.raises(ConfigError, match="'mesh'"):
        dry_run(load_config(path, ["mesh.devices=6"]), out=None)
    with pytest.raises(ConfigError, match="train.batch_size"):
        dry_run(load_config(path, ["train.batch_size=12"]), out=None)
    with pytest.raises(ConfigError, match="unknown dataset"):
        dry_run(load_config(path, ["data.dataset=cali"]), out=None)
    with pytest.raises(ConfigError, match="no config.json"):
        dry_run(load_config(path, [f"model.hf_path={tmp_path}"]), out=None)


def test_cli_flag_and_step_trace(capsys):
    cfg_path = os.path.join(ROOT, "experiments", "configs", "iw_dpo.yaml")
    p = experiment_parser("t", cfg_path, "out")
    with pytest.raises(SystemExit) as e:
        parse_experiment_args(p, ["--dry-run", "mesh.devices=8", "mesh.fsdp=2", "mesh.tensor=2"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "sharding plan" in text and "data=2 x fsdp=2 x tensor=2" in text and "P('fsdp', 'tensor')" in text
    rep = dry_run(load_config(cfg_path), devices=1, trace_step=True, out=None)
    assert {"loss", "rewards/accuracies"} <= set(rep["step_outputs"]["metrics"])
    assert math.isclose(rep["per_device_bytes"]["params"], 4 * rep["n_params"])  # one device, float32


# --------------------------------------------------------------------------- accumulation, packing,
# shared prompts: the plan's numbers are the hand-computed arithmetic of a small config

def _small(train=None, methods=None, dtype="float32"):
    """A tiny-Llama plan (no hf_path): d 64, FFN 128, 2 layers, 4 heads (2 KV), vocab 256,
    prompts of 8 + responses of 10 tokens, 16 pairs, one device."""
    from alignshift.config import ExperimentConfig, from_dict, validate

    cfg = from_dict(ExperimentConfig, {
        "model": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "dtype": dtype},
        "data": {"max_prompt_len": 8, "max_completion_len": 10},
        "train": {"batch_size": 16, **(train or {})},
        "methods": methods or [{"name": "dpo", "base": "dpo"}],
        "mesh": {"devices": 1}})
    validate(cfg)
    return cfg


_SMALL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}


def _acts(rows, t, logit_positions, *, h=64, i=128, L=2, nh=4, v=256, act=4, remat=False):
    """The module docstring's activation arithmetic, written out."""
    logits = 2 * logit_positions * v * 4  # float32 logits + log-softmax
    layer = rows * t * (6 * h + 3 * i) * act + 2 * rows * nh * t * t * 4  # one layer + f32 scores/probs
    return logits + (L * rows * t * h * act + layer if remat else L * layer)


def test_plan_matches_hand_arithmetic_padded():
    rep = dry_run(_small(), out=None)
    pd = rep["per_device_bytes"]
    n = _llama_params(_SMALL)
    assert rep["n_params"] == n == 106_816
    assert pd["params"] == pd["grads"] == pd["frozen"] == 4 * n and pd["grad_accum"] == 0
    assert pd["fsdp_buffers"] == 0  # one device: nothing is gathered
    # 16 pairs = 32 rows of 8 + 10 tokens; logits on all 18 positions of every row
    lay = rep["activation_detail"]["layout"]
    assert (lay["rows"], lay["row_len"], lay["logit_positions"]) == (32, 18, 32 * 18)
    assert pd["activations"] == _acts(32, 18, 32 * 18) == 5_382_144
    assert pd["total"] == sum(v for k, v in pd.items() if k != "total")
    # remat keeps one [tokens, d] checkpoint per layer and one layer's working set
    cfg = _small()
    cfg.model.remat = True
    assert dry_run(cfg, out=None)["per_device_bytes"]["activations"] == _acts(32, 18, 576, remat=True)
    # response window (10 positions per row), then 4 at a time
    assert dry_run(_small({"logits_on_responses": True}), out=None)["per_device_bytes"]["activations"] == \
        _acts(32, 18, 32 * 10)
    assert dry_run(_small({"logits_on_responses": True, "logits_chunk": 4}), out=None)[
        "per_device_bytes"]["activations"] == _acts(32, 18, 32 * 4)
    # a fused attention kernel keeps only its softmax statistics, not the [T, T] scores
    fused = dry_run(_small(), out=None, fused_attention=True)["per_device_bytes"]["activations"]
    assert _acts(32, 18, 576) - fused == 2 * (2 * 32 * 4 * 18 * 18 * 4 - 32 * 4 * 18 * 4)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_divides_activations_by_k_and_adds_a_float32_accumulator(k):
    one = dry_run(_small(dtype="bfloat16"), out=None)
    acc = dry_run(_small({"grad_accum_steps": k}, dtype="bfloat16"), out=None)
    a1, ak = one["per_device_bytes"], acc["per_device_bytes"]
    assert ak["activations"] * k == a1["activations"]  # one micro-batch of 16/k pairs alive at a time
    assert acc["activation_detail"]["micro_batch_pairs_per_device"] == 16 // k
    assert a1["grad_accum"] == 0 and ak["grad_accum"] == 4 * one["n_trainable"] == 2 * a1["params"]  # f32 vs bf16
    for key in ("params", "grads", "opt_state", "frozen"):
        assert ak[key] == a1[key]
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        dry_run(_small({"grad_accum_steps": 32}), out=None)  # 16 pairs cannot make 32 micro-batches


def test_global_scope_coupled_rule_adds_a_forward_only_pass_not_activations():
    kl = [{"name": "kldpo", "base": "dpo", "weighting": "kl_dro"}]
    glob_ = dry_run(_small({"grad_accum_steps": 4}, methods=kl), out=None)["activation_detail"]
    micro = dry_run(_small({"grad_accum_steps": 4, "weighting_scope": "micro_batch"}, methods=kl),
                    out=None)["activation_detail"]
    dpo = dry_run(_small({"grad_accum_steps": 4}), out=None)["activation_detail"]
    assert glob_["coupled_forward_pass"] and not micro["coupled_forward_pass"] and not dpo["coupled_forward_pass"]
    assert glob_["coupled_pass"] < glob_["train_pass"]  # forward-only: nothing kept per layer
    # the peak is the training micro-batch + the whole batch's per-example outputs and cotangents
    assert glob_["total"] == micro["total"] + glob_["coupled_outputs"] == dpo["total"] + 2 * 16 * 4 * 16
    assert not dry_run(_small(methods=kl), out=None)["activation_detail"]["coupled_forward_pass"]  # k = 1


def test_shared_prompt_and_packing_shrink_the_tokens():
    padded = dry_run(_small(), out=None)["activation_detail"]["layout"]
    assert padded["computed_tokens_per_pair"] == 2 * 18
    # [prompt | chosen | rejected]: one row of 8 + 2 * 10 tokens per pair; LM head on the 2 * 10 response slots
    shared = dry_run(_small({"share_prompt": True}), out=None)
    lay = shared["activation_detail"]["layout"]
    assert (lay["rows"], lay["row_len"], lay["logit_positions"]) == (16, 28, 16 * 2 * 10)
    assert lay["computed_tokens_per_pair"] == 28 < padded["computed_tokens_per_pair"]
    assert shared["per_device_bytes"]["activations"] == _acts(16, 28, 320)
    # packing without a length distribution: a micro-batch may need one row per sequence
    assert dry_run(_small({"packing": True}), out=None)["activation_detail"]["layout"]["rows"] == 32
    # with mean lengths 4 + 3 / 4 + 3: sequences of 7 tokens, a row holds 18 - 7/2 = 14.5 of them on
    # average; ceil(32 * 7 / 14.5) = 16 rows, a compiled row count (multiples of ceil(32 / 8) = 4)
    from alignshift.dryrun import LengthProfile

    prof = LengthProfile.parse("4,3,3")
    rep = dry_run(_small({"packing": True}), out=None, lengths=prof)
    lay = rep["activation_detail"]["layout"]
    assert (lay["rows"], lay["row_len"], lay["expected_tokens_per_row"]) == (16, 18, 14.5)
    assert lay["real_tokens_per_pair"] == 14 and lay["computed_tokens_per_pair"] == 18
    assert rep["per_device_bytes"]["activations"] == _acts(16, 18, 16 * 2 * 10)
    # both: groups of 4 + 3 + 3 = 10 tokens in rows of 28: ceil(16 * 10 / 23) = 7 -> 8 (multiples of 2)
    both = dry_run(_small({"packing": True, "share_prompt": True}), out=None, lengths=prof)["activation_detail"]
    assert (both["layout"]["rows"], both["layout"]["row_len"]) == (8, 28)
    assert both["layout"]["computed_tokens_per_pair"] == 14 < lay["computed_tokens_per_pair"]


def test_length_profile_from_per_row_counts_simulates_the_packer(tmp_path):
    from alignshift.dryrun import LengthProfile

    # every pair: prompt 5, responses 4 -> sequences of 9 tokens, exactly 2 per 18-token row
    f = tmp_path / "lengths.json"
    f.write_text(json.dumps({"prompt": [5] * 10, "chosen": [4] * 10, "rejected": [4] * 10}))
    prof = LengthProfile.parse(str(f))
    lay = dry_run(_small({"packing": True}), out=None, lengths=prof)["activation_detail"]["layout"]
    assert (lay["rows"], lay["expected_tokens_per_row"], lay["real_tokens_per_pair"]) == (16, 18.0, 18)
    # truncation at data.max_prompt_len / max_completion_len first: 30 -> 8, 12 -> 10
    f.write_text(json.dumps({"prompt": [30] * 4, "chosen": [12] * 4, "rejected": [12] * 4}))
    assert LengthProfile.parse(str(f)).means(8, 10) == (8, 10, 10)
    for bad in ("3,4", "a,b,c", "0,1,1"):
        with pytest.raises(ConfigError, match="--lengths"):
            LengthProfile.parse(bad)


def test_memory_plans_of_the_docs():
    """docs/memory_plans.md: each plan fits an H100's JAX default preallocation (75% of 79.6 GiB)
    with fused attention at its micro-batch, and twice the micro-batch does not."""
    budget = 0.75 * 81559 / 1024
    for name, k, mb in (("memory_plan_llama3_8b_dpo", 2, 8), ("memory_plan_llama3_70b_lora_dpo", 8, 2)):
        cfg, _ = load_plan_config(os.path.join(ROOT, "experiments", "configs", "models", f"{name}.yaml"))
        rep = dry_run(cfg, out=None, fused_attention=True)
        g = rep["per_device_gib"]
        assert cfg.train.grad_accum_steps == k and rep["activation_detail"]["micro_batch_pairs_per_device"] == mb
        assert rep["fits"] and g["total"] < budget < g["total"] + g["activations"]
