"""Golden parity with TRL's ``DPOTrainer`` (the DPO implementation most users know).

A tiny HF Llama (PyTorch) policy and a differently initialised reference are saved with
``save_pretrained``; TRL tokenises a small preference dataset with its own collator and
computes its loss + logged metrics on one batch. Our Flax copies of the same two folders
(``load_hf_model``) then compute per-sequence log-probs on exactly TRL's token ids and masks,
and our objective computes the loss and the TRL-named metrics. Everything must agree to 1e-4.

Label smoothing: in TRL 1.13 ``label_smoothing`` only enters the ``robust`` loss (and exo/aot);
its ``sigmoid`` loss ignores it. Our ``dpo`` base with ``label_smoothing=ε`` is conservative DPO
(cDPO: −(1−ε)·logσ(βh) − ε·logσ(−βh)), i.e. the sigmoid loss of TRL < 0.12; the test below
checks both facts so the difference stays documented by a test that can fail.

Precision: ``DPOConfig`` defaults to ``bf16=True`` (mixed precision), under which TRL's reference
forward runs in bfloat16 autocast even on the CPU and its log-probs move by ~1e-3; the test pins
``bf16=False`` so both sides compute in float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import jax.numpy as jnp  # noqa: E402

from alignshift.losses import make_objective, sequence_logps  # noqa: E402
from alignshift.models.hf import load_hf_model  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]
BETA = 0.3

ROWS = [
    {"prompt": "w1 w2 w3", "chosen": " w4 w5 w6 w7", "rejected": " w8 w9"},
    {"prompt": "w10 w11", "chosen": " w12 w13", "rejected": " w14 w15 w16 w17 w18"},
    {"prompt": "w20 w21 w22 w23 w24", "chosen": " w25", "rejected": " w26 w27 w28"},
    {"prompt": "w30", "chosen": " w31 w32 w33 w34 w35 w36", "rejected": " w37 w38 w39"},
]


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def _llama(seed, path):
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (1.0 if p.ndim == 1 else 0.0))
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tok = _tokenizer(root / "tok")
    pol = _llama(0, root / "policy")
    ref = _llama(1, root / "reference")
    return root, tok, pol, ref


def _trl_batch_and_metrics(setup, loss_type, label_smoothing):
    root, tok, pol, ref = setup
    args = trl.DPOConfig(output_dir=str(root / f"out_{loss_type}"), loss_type=[loss_type], beta=BETA,
                         label_smoothing=label_smoothing, per_device_train_batch_size=len(ROWS), report_to=[],
                         use_cpu=True, bf16=False, disable_dropout=True, max_length=None, seed=0, dataloader_drop_last=False)
    trainer = trl.DPOTrainer(model=pol, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(ROWS))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # TRL logs under "train" only when the model is in training mode
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {k: v.cpu().numpy() for k, v in batch.items()}, float(loss), metrics


def _ours(setup, batch, base, **base_kwargs):
    root = setup[0]
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    attn = jnp.asarray(batch["attention_mask"], jnp.int32)
    cmask = jnp.asarray(batch["completion_mask"], jnp.int32)
    out = {}
    for name in ("policy", "reference"):
        model = load_hf_model(str(root / name), dtype=jnp.float32)
        logits = model(ids, attention_mask=attn)
        s, n = sequence_logps(logits[:, :-1], ids[:, 1:], cmask[:, 1:] * attn[:, 1:])
        B = ids.shape[0] // 2
        out[f"{name}_chosen_logps"], out[f"{name}_rejected_logps"] = s[:B], s[B:]
        out["chosen_n_tokens"], out["rejected_n_tokens"] = n[:B], n[B:]
    obj = make_objective(base, "uniform", base_kwargs=dict(beta=BETA, **base_kwargs))
    loss, metrics = obj(out)
    return float(loss), {k: float(v) for k, v in metrics.items()}, out


@pytest.mark.parametrize("loss_type,base,smoothing", [
    ("sigmoid", "dpo", 0.0),
    ("ipo", "ipo", 0.0),
    ("hinge", "hinge", 0.0),
    ("robust", "robust", 0.2),
])
def test_loss_and_metrics_match_trl(setup, loss_type, base, smoothing):
    batch, trl_loss, trl_m = _trl_batch_and_metrics(setup, loss_type, smoothing)
    # TRL's collator really produced a padded, variable-length batch (else the test is weak).
    assert batch["input_ids"].shape[0] == 2 * len(ROWS)
    assert (batch["attention_mask"] == 0).any() and batch["completion_mask"].sum(1).std() > 0
    kw = {"label_smoothing": smoothing} if base == "robust" else {}
    loss, m, _ = _ours(setup, batch, base, **kw)
    assert abs(trl_loss - math.log(2)) > 1e-2  # policy != reference: a non-trivial loss
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-4, atol=1e-4)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(m[k], trl_m[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_label_smoothing_semantics_differ_for_sigmoid(setup):
    """TRL 1.13's sigmoid loss ignores ``label_smoothing``; our ``dpo`` applies cDPO smoothing."""
    eps = 0.2
    batch, trl_plain, _ = _trl_batch_and_metrics(setup, "sigmoid", 0.0)
    _, trl_smoothed, _ = _trl_batch_and_metrics(setup, "sigmoid", eps)
    assert trl_smoothed == pytest.approx(trl_plain, abs=1e-7)
    ours, _, inp = _ours(setup, batch, "dpo", label_smoothing=eps)
    h = np.float64(BETA) * ((np.asarray(inp["policy_chosen_logps"], np.float64) - inp["reference_chosen_logps"])
                            - (np.asarray(inp["policy_rejected_logps"], np.float64) - inp["reference_rejected_logps"]))
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    cdpo = np.mean(-(1 - eps) * logsig(h) - eps * logsig(-h))
    np.testing.assert_allclose(ours, cdpo, rtol=1e-5)
    assert abs(ours - trl_plain) > 1e-3
