"""LoRA adapters: exact identity at init, adapter-only training with the DPO step, reference =
adapters disabled, merge, PEFT export (and, when ``peft`` is installed, a logits match)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignshift.losses import make_objective
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM, params_to_hf_state_dict
from alignshift.models.lora import (
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    apply_lora,
    count_lora_params,
    lora_modules,
    merge_lora,
    reference_params,
    save_peft_adapter,
    split_lora,
)
from alignshift.forward import make_logits_fn
from alignshift.train.steps import init_state, make_preference_step

V = 61
CFG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def _base(seed=0):
    return LlamaForCausalLM(LlamaConfig(**CFG, initializer_range=0.2), rngs=nnx.Rngs(seed))


def _lora(cfg=None, seed=0):
    return apply_lora(_base(seed), cfg or LoRAConfig(rank=4, alpha=8.0, targets=TARGETS),
                      rngs=nnx.Rngs(123))


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, attention_mask=mask)


def _ids(seed=0, B=2, T=7):
    rs = np.random.RandomState(seed)
    ids = jnp.asarray(rs.randint(0, V, size=(B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] < np.array([T, 4])[:B, None], jnp.int32)
    return ids, mask


def _pref_batch(B=4, T=8, seed=1):
    rs = np.random.RandomState(seed)
    b = {}
    for g in ("chosen", "rejected"):
        b[f"{g}_input_ids"] = jnp.asarray(rs.randint(0, V, size=(B, T)), jnp.int32)
        b[f"{g}_attention_mask"] = jnp.ones((B, T), jnp.int32)
        b[f"{g}_loss_mask"] = jnp.asarray(np.arange(T)[None].repeat(B, 0) >= 3, jnp.int32)
    return b


def _set_lora_random(model, seed=7, std=0.3):
    """Non-zero B (and A) so that the adapters actually change the outputs."""
    key = jax.random.PRNGKey(seed)
    for _, m in sorted(lora_modules(model).items()):
        key, ka, kb = jax.random.split(key, 3)
        m.lora_a.set_value(std * jax.random.normal(ka, m.lora_a.shape))
        m.lora_b.set_value(std * jax.random.normal(kb, m.lora_b.shape))


def test_targets_paths_and_identity_at_init():
    base, model = _base(), _lora()
    mods = lora_modules(model)
    assert sorted(mods) == sorted(f"model.layers.{i}.{blk}.{n}" for i in range(2)
                                  for blk, n in [("self_attn", "q_proj"), ("self_attn", "v_proj"),
                                                 ("self_attn", "o_proj"), ("mlp", "down_proj")])
    assert all(isinstance(m, LoRALinear) and isinstance(m, nnx.Linear) for m in mods.values())
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    # the base weights keep their HF-named paths; adapters sit next to them
    state = nnx.state(model)
    attn = state["model"]["layers"][0]["self_attn"]
    assert set(attn["q_proj"].keys()) == {"kernel", "lora_a", "lora_b"}
    assert attn["q_proj"]["lora_a"].shape == (32, 4) and attn["q_proj"]["lora_b"].shape == (4, 32)
    np.testing.assert_array_equal(attn["q_proj"]["kernel"][...],
                                  base.model.layers[0].self_attn.q_proj.kernel[...])
    ids, mask = _ids()
    np.testing.assert_array_equal(np.asarray(_fwd(model, ids, mask)), np.asarray(_fwd(base, ids, mask)))


def test_split_isolates_adapters_only():
    r = 4
    model = _lora()
    graphdef, lora_params, rest = split_lora(model)
    leaves = jax.tree_util.tree_leaves(lora_params)
    assert len(leaves) == 2 * 4 * 2  # (A, B) x 4 targets x 2 layers
    d, hd, kv, inter = 32, 8, 2, 48
    dims = [(d, 4 * hd), (d, kv * hd), (4 * hd, d), (inter, d)]  # q, v, o, down: (in, out)
    expected = 2 * sum(r * (i + o) for i, o in dims)
    assert count_lora_params(lora_params) == expected == count_lora_params(model)
    assert all(isinstance(v, LoRAParam) for v in jax.tree_util.tree_leaves(
        nnx.state(model, LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    # nothing trainable leaks into rest, no base weight into the adapters
    def names(tree):
        return [jax.tree_util.keystr(p).removesuffix(".value")
                for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    assert all(n.endswith(("['lora_a']", "['lora_b']")) for n in names(lora_params))
    assert not any("lora" in n for n in names(rest))
    assert any(n.endswith("['q_proj']['kernel']") for n in names(rest))
    tx = optax.adam(1e-2)
    assert count_lora_params(init_state(lora_params, tx)["opt_state"]) == 2 * expected + 1  # mu, nu, count


def test_unknown_targets_and_dropout_raise():
    with pytest.raises(ValueError, match="match no nnx.Linear"):
        apply_lora(_base(), LoRAConfig(targets=("qkv",)), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError):
        apply_lora(_base(), LoRAConfig(dropout=0.1), rngs=nnx.Rngs(0))
    # regex targets: only layer 1's q_proj
    m = _lora(LoRAConfig(rank=2, targets=(r"model\.layers\.1\..*q_proj",)))
    assert sorted(lora_modules(m)) == ["model.layers.1.self_attn.q_proj"]


def test_dpo_steps_train_adapters_only_and_reference_is_base():
    base, model = _base(), _lora()
    _set_lora_random(model, std=0.05)  # B != 0: otherwise A gets no gradient at step 0
    graphdef, lora_params, rest = split_lora(model)
    base_kernels = {k: np.asarray(v) for k, v in params_to_hf_state_dict(base).items()}
    tx = optax.adam(5e-2)
    step = make_preference_step(graphdef, rest, tx, make_objective("dpo"))
    state = init_state(jax.tree.map(jnp.copy, lora_params), tx)
    before = jax.tree.map(np.asarray, lora_params)
    batch = _pref_batch()
    losses = []
    for _ in range(4):
        state, m = step(state, batch, reference_params(state["params"]))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, state["params"])
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                     jax.tree_util.tree_leaves(after))]
    assert all(changed)
    # base weights untouched (rest is static; the step never sees them as params)
    trained = nnx.merge(graphdef, state["params"], rest)
    hf_rest = {k: np.asarray(v) for k, v in params_to_hf_state_dict(_base()).items()}
    for k, v in base_kernels.items():
        np.testing.assert_array_equal(v, hf_rest[k])
    np.testing.assert_array_equal(np.asarray(trained.model.layers[0].self_attn.q_proj.kernel[...]),
                                  base_kernels["model.layers.0.self_attn.q_proj.weight"].T)
    # reference = same graph, adapters zeroed == the base model exactly
    logits_fn = make_logits_fn(graphdef, rest)
    ids, mask = _ids()
    ref = jax.jit(logits_fn)(reference_params(state["params"]), ids, mask)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(_fwd(base, ids, mask)))
    pol = jax.jit(logits_fn)(state["params"], ids, mask)
    assert np.abs(np.asarray(pol) - np.asarray(ref)).max() > 1e-3


def test_merge_matches_unmerged_and_exports():
    model = _lora()
    _set_lora_random(model)
    ids, mask = _ids()
    unmerged = np.asarray(_fwd(model, ids, mask))
    assert np.abs(unmerged - np.asarray(_fwd(_base(), ids, mask))).max() > 1e-2
    merge_lora(model)
    assert not lora_modules(model)
    assert type(model.model.layers[1].mlp.down_proj) is nnx.Linear
    assert not jax.tree_util.tree_leaves(nnx.state(model, LoRAParam))
    np.testing.assert_allclose(np.asarray(_fwd(model, ids, mask)), unmerged, atol=1e-5, rtol=1e-5)
    sd = params_to_hf_state_dict(model)  # HF export works again (no adapter leaves)
    assert "model.layers.0.self_attn.q_proj.weight" in sd and not any("lora" in k for k in sd)


def test_peft_export_layout(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = _lora(cfg)
    _set_lora_random(model)
    save_peft_adapter(model, str(tmp_path), cfg, base_model_name_or_path="tiny-llama")
    ac = json.loads((tmp_path / "adapter_config.json").read_text())
    assert ac["peft_type"] == "LORA" and ac["task_type"] == "CAUSAL_LM" and ac["bias"] == "none"
    assert ac["r"] == 4 and ac["lora_alpha"] == 8.0 and ac["lora_dropout"] == 0.0
    assert ac["target_modules"] == sorted(TARGETS) and ac["base_model_name_or_path"] == "tiny-llama"
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(sd) == 16
    pre = "base_model.model.model.layers.1.mlp.down_proj"
    assert sd[f"{pre}.lora_A.weight"].shape == (4, 48)  # [r, in]
    assert sd[f"{pre}.lora_B.weight"].shape == (32, 4)  # [out, r]
    np.testing.assert_array_equal(sd[f"{pre}.lora_A.weight"],
                                  np.asarray(model.model.layers[1].mlp.down_proj.lora_a[...]).T)
    # a regex selecting only some q_proj layers exports full module paths, not the leaf name
    part = LoRAConfig(rank=2, alpha=2.0, targets=(r"model\.layers\.1\..*q_proj",))
    m2 = _lora(part)
    save_peft_adapter(m2, str(tmp_path / "part"), part)
    ac2 = json.loads((tmp_path / "part" / "adapter_config.json").read_text())
    assert ac2["target_modules"] == ["model.layers.1.self_attn.q_proj"]


def test_peft_loads_adapter_with_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from alignshift.models.hf import save_hf_model

    cfg = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = _lora(cfg)
    _set_lora_random(model)
    save_hf_model(merge_lora(_base()), str(tmp_path / "base"))  # the (un-adapted) base weights
    save_peft_adapter(model, str(tmp_path / "adapter"), cfg, base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids, mask = _ids()
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    pos = np.maximum(np.cumsum(mask_np, axis=1) - 1, 0)
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids_np, dtype=torch.long),
                 attention_mask=torch.tensor(mask_np, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
    ours = np.asarray(_fwd(model, ids, mask))
    real = mask_np.astype(bool)  # padded query rows differ by convention only
    assert np.abs(ours - np.asarray(_fwd(_base(), ids, mask))).max() > 1e-2  # adapters matter
    np.testing.assert_allclose(ours[real], out[real], atol=1e-4, rtol=1e-4)
