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
    assert rep["per_device_gib"]["total"] == pytest.approx(sum(rep["per_device_bytes"][k] for k in (
        "params", "grads", "opt_state", "frozen", "activations")) / 1024 ** 3)

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
