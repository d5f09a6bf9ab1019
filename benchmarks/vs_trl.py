"""alignshift's jitted DPO step side by side with TRL's ``DPOTrainer`` step (PyTorch, CPU).

Same model (a tiny HF Llama saved with ``save_pretrained``; our Flax copy loaded from that folder
with identical weights), same data (TRL's own collated batches are fed to both sides), same
optimiser (AdamW, lr 1e-5, β = (0.9, 0.999), eps 1e-8, weight decay 0, grad-norm clip 1.0),
float32 on both sides (TRL's ``bf16`` default is switched off: it autocasts the CPU forward).

One TRL step = ``trainer.training_step`` (policy forward + backward, reference forward) +
``clip_grad_norm_`` + ``optimizer.step()`` + ``zero_grad`` — what its training loop does per
batch. One alignshift step = ``make_preference_step`` (jitted, state donated) + waiting for the
result. After warm-up (compilation on our side), steps alternate A B A B so that machine noise
hits both alike; the medians and their ratio are printed. Modes: the reference forward
inside the step, and precomputed reference log-probs (TRL: ``precompute_ref_log_probs=True``;
ours: log-probs in the batch). A ``+window`` mode runs ours with ``response_window`` (the
config's ``train.logits_on_responses``): the LM head and log-softmax on the completion positions
only (the longest completion in the data), the same loss; TRL 1.13 has no such option and
runs its default.

Needs the ``bench`` extra (``pip install -e .[bench]``: torch, accelerate, trl pinned).

    python benchmarks/vs_trl.py                          # 4 layers, d=256, vocab 8k, seq 256, 8 pairs
    python benchmarks/vs_trl.py --small                  # 2 layers, d=64, vocab 1k, seq 64, 8 pairs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256, help="prompt + completion tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--small", action="store_true", help="2 layers, d=64, vocab 1000, seq 64")
    p.add_argument("--rounds", type=int, default=10, help="timed A/B rounds per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default="in-step,precomputed,in-step+window,precomputed+window")
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's own (all cores)")
    a = p.parse_args(argv)
    if a.small:
        a.layers, a.hidden, a.heads, a.intermediate, a.vocab, a.seq_len = 2, 64, 4, 172, 1000, 64
    return a


def _dataset(a, n_rows: int, seed: int = 0):
    """Rows of random words: prompt ≈ half the sequence, completions fill the rest (minus EOS),
    lengths varying a little so padding is exercised."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, a.vocab - 3, k))  # noqa: E731
    half = a.seq_len // 2
    rows = []
    for _ in range(n_rows):
        p = half - int(rng.integers(0, max(1, half // 8)))
        rows.append({"prompt": words(p), "chosen": " " + words(a.seq_len - half - 1),
                     "rejected": " " + words(a.seq_len - half - 1 - int(rng.integers(0, max(1, half // 8))))})
    return rows


def _build_hf(a, root):
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(a.vocab - 3)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                               unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, max_position_embeddings=max(2048, a.seq_len + 8),
                                   pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg._attn_implementation = "sdpa"  # TRL users' default; our attention is plain einsum + softmax
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(os.path.join(root, "policy"))
    return tok, cfg


def _trl_trainer(a, root, tok, rows, precompute: bool):
    import torch
    import transformers
    import trl
    import datasets

    pol = transformers.LlamaForCausalLM.from_pretrained(os.path.join(root, "policy"), attn_implementation="sdpa")
    ref = transformers.LlamaForCausalLM.from_pretrained(os.path.join(root, "policy"), attn_implementation="sdpa")
    args = trl.DPOConfig(output_dir=os.path.join(root, "trl_out"), beta=0.1, loss_type=["sigmoid"],
                         learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                         lr_scheduler_type="constant", max_grad_norm=1.0, per_device_train_batch_size=a.batch,
                         precompute_ref_log_probs=precompute, precompute_ref_batch_size=a.batch,
                         report_to=[], use_cpu=True, bf16=False, disable_dropout=True, max_length=None,
                         dataloader_drop_last=True, seed=0, logging_steps=10**9)
    trainer = trl.DPOTrainer(model=pol, ref_model=None if precompute else ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop we bypass
    trainer.model.train()

    def step(batch):
        loss = trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        return float(loss)

    return trainer, step


def _ours(a, root, precompute: bool, window: int = 0):
    import jax
    import jax.numpy as jnp

    from alignshift.config import OptimConfig
    from alignshift.losses import make_objective
    from alignshift.models.hf import load_hf_model
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import precompute_reference_logps
    from alignshift.forward import make_logits_fn, split_model
    from alignshift.train.steps import init_state, make_preference_step

    model = load_hf_model(os.path.join(root, "policy"), dtype=jnp.float32)
    graphdef, params, rest = split_model(model)
    # warm-up-cosine over 1e6 steps: constant lr over the benchmark, like TRL's "constant" schedule
    tx = make_optimizer(OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
                        10**6)
    step = make_preference_step(graphdef, rest, tx, make_objective("dpo", base_kwargs={"beta": 0.1}),
                                response_window=window)
    ref = jax.tree_util.tree_map(jnp.copy, params)
    state = init_state(params, tx)
    logits_fn = make_logits_fn(graphdef, rest, response_window=window)

    def convert(tb, length):
        # right-pad to one fixed length (as our trainer does: data.max_*_len), so the jitted step
        # compiles once; TRL pads each batch to its own longest sequence
        ids, am, cm = (np.asarray(tb[k].numpy(), np.int32) for k in ("input_ids", "attention_mask", "completion_mask"))
        pad = ((0, 0), (0, length - ids.shape[1]))
        ids, am, cm = (np.pad(x, pad) for x in (ids, am, cm))
        B = ids.shape[0] // 2
        b = {}
        for g, sl in (("chosen", slice(0, B)), ("rejected", slice(B, None))):
            b[f"{g}_input_ids"], b[f"{g}_attention_mask"], b[f"{g}_loss_mask"] = ids[sl], am[sl], cm[sl] * am[sl]
        if precompute:
            b.update(precompute_reference_logps(logits_fn, ref, b, groups=("chosen", "rejected")))
        return b

    holder = {"state": state}

    def run(batch):
        holder["state"], m = step(holder["state"], batch, None if precompute else ref)
        return float(jax.block_until_ready(m["loss"]))

    return convert, run


def bench_mode(a, root, tok, rows, mode: str) -> tuple[float, float]:
    precompute = mode.startswith("precomputed")
    trainer, trl_step = _trl_trainer(a, root, tok, rows, precompute)
    batches = list(trainer.get_train_dataloader())
    # +window: the longest completion (TRL's completion_mask) over all batches, as
    # train.logits_on_responses uses data.max_completion_len
    window = max(int(b["completion_mask"].sum(1).max()) for b in batches) if mode.endswith("+window") else 0
    convert, our_step = _ours(a, root, precompute, window)
    length = max(b["input_ids"].shape[1] for b in batches)
    ours_b = [convert(b, length) for b in batches]  # conversion (and our precompute) outside the timing
    n = len(batches)
    for i in range(a.warmup):
        trl_step(batches[i % n])
        our_step(ours_b[i % n])
    t_trl, t_ours = [], []
    for r in range(a.rounds):
        i = (a.warmup + r) % n
        t = time.perf_counter()
        our_step(ours_b[i])
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        trl_step(batches[i])
        t_trl.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_trl)


def main(argv=None) -> None:
    a = parse_args(argv)
    import jax
    import torch
    import trl

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    with tempfile.TemporaryDirectory() as root:
        tok, _ = _build_hf(a, root)
        rows = _dataset(a, a.batch * (a.warmup + a.rounds))
        print(f"Llama {a.layers} layers, d={a.hidden}, {a.heads} heads, ffn {a.intermediate}, vocab {a.vocab}; "
              f"{a.batch} pairs x ~{a.seq_len} tokens; float32; jax {jax.__version__} ({jax.default_backend()}), "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), trl {trl.__version__}")
        print(f"{'mode':<12} {'alignshift ms':>14} {'TRL ms':>10} {'ratio ours/TRL':>15}")
        for mode in a.modes.split(","):
            ours, theirs = bench_mode(a, root, tok, rows, mode)
            print(f"{mode:<12} {ours * 1e3:14.1f} {theirs * 1e3:10.1f} {ours / theirs:15.2f}")


if __name__ == "__main__":
    main()
