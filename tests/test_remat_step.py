"""Activation recomputation (``remat=True``) inside the real train step: the preference step
takes ``jax.value_and_grad`` over params merged into the model (not an nnx transform), which
``nnx.remat`` rejected; the step must run and equal the step without remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignshift.losses import make_objective
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.models.lora import LoRAConfig, apply_lora, reference_params, split_lora
from alignshift.forward import split_model
from alignshift.train.steps import init_state, make_preference_step

CFG = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)


def _batch(B=4, T=9):
    rs = np.random.RandomState(0)
    b = {}
    for g in ("chosen", "rejected"):
        b[f"{g}_input_ids"] = jnp.asarray(rs.randint(0, 53, (B, T)), jnp.int32)
        b[f"{g}_attention_mask"] = jnp.asarray(np.arange(T)[None] < rs.randint(6, T + 1, (B, 1)), jnp.int32)
        b[f"{g}_loss_mask"] = b[f"{g}_attention_mask"] * jnp.asarray(np.arange(T)[None] >= 3, jnp.int32)
    return b


def _run(remat: bool, lora: bool):
    model = LlamaForCausalLM(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0))
    if lora:
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj")), rngs=nnx.Rngs(1))
        graphdef, params, rest = split_lora(model)
        ref, frozen = reference_params(params), rest
        # non-zero B so the step-1 gradients reach A as well
        params = jax.tree_util.tree_map(lambda x: x + 0.1, params)
    else:
        graphdef, params, rest = split_model(model)
        ref, frozen = jax.tree_util.tree_map(lambda x: x * 0.9, params), None
    tx = optax.sgd(0.1)
    step = make_preference_step(graphdef, rest, tx, make_objective("dpo"))
    state = init_state(params, tx)
    out = []
    for _ in range(2):  # the second step sees moved params
        state, m = step(state, _batch(), ref, None, frozen)
        out.append((float(m["loss"]), float(m["grad_norm"])))
    return out, state["params"]


def test_remat_in_preference_step_matches_no_remat():
    for lora in (False, True):
        a, pa = _run(False, lora)
        b, pb = _run(True, lora)
        assert a[1][0] != a[0][0]
        np.testing.assert_allclose(b, a, rtol=2e-5)
        for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
