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

``--lengths hh`` draws every pair's prompt, chosen and rejected lengths from HH-RLHF
``harmless-base``'s measured token histograms (:data:`HH_HIST`: 1,152 test pairs counted with
the SmolLM2-135M-Instruct tokenizer and chat template by ``benchmarks/count_hh_lengths.py``;
the numbers live here, the data file is never read), truncated at ``--max-prompt`` /
``--max-completion`` (``data.max_prompt_len`` / ``max_completion_len``; both sides see the same
truncated pairs). TRL runs its default (each batch padded to its longest sequence; its
``padding_free`` is disabled in trl 1.13: it warns and falls back to padding, so it is not a
separate row). alignshift runs, on the same batches, A/B interleaved with TRL in every round:

* ``padded``: our batch padded to its longest sequence rounded up to 64 tokens (the trim of
  ``train.length_bucket: 64``, without its length sorting, so the pairs stay TRL's);
* ``padded+window``: the same + ``train.logits_on_responses`` (LM head on ``max_completion``
  positions per sequence);
* ``packed``, ``shared``, ``packed+shared``: ``train.packing`` / ``train.share_prompt`` through
  the training path (:func:`alignshift.train.phases.pack_kwargs` on the batch padded to
  ``max_prompt + max_completion``, :func:`alignshift.data.packing.pack_batch`, the step built
  from the config as :func:`alignshift.train.phases.run_preference` builds it); the LM head runs
  on the response slots only.

Time per pair is the total over the timed rounds divided by the pairs; tokens per pair are the
positions the model runs on (rows x row length / pairs), real tokens per pair the non-padding
ones among them (fewer with a shared prompt: the prompt once), and the LM-head positions per
pair (packed and shared-prompt batches: ``max_completion`` response slots per sequence).

Needs the ``bench`` extra (``pip install -e .[bench]``: torch, accelerate, trl pinned).

    python benchmarks/vs_trl.py                          # 4 layers, d=256, vocab 8k, seq 256, 8 pairs
    python benchmarks/vs_trl.py --small                  # 2 layers, d=64, vocab 1k, seq 64, 8 pairs
    python benchmarks/vs_trl.py --lengths hh             # HH-RLHF lengths, same model, 8 pairs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

# HH-RLHF harmless-base, test split, first 1,156 rows (1,152 well-formed pairs): tokens of the
# chat-rendered prompt (SmolLM2-135M-Instruct's template, with its default system turn), the
# chosen and the rejected response (+ end-of-turn), untruncated, in bins [16 j, 16 j + 16).
# Printed by `python benchmarks/count_hh_lengths.py <hh_harmless_test_dev.jsonl>`:
#   prompt   median 118  p90 298  max 880  mean 147.2  min 33
#   chosen   median 29   p90 90   max 260  mean 42.1   min 3
#   rejected median 38   p90 112  max 558  mean 53.0   min 3
HH_BIN = 16
HH_HIST = {
    'prompt': [0, 0, 254, 78, 57, 72, 86, 60, 85, 51, 59, 45, 56, 29, 30, 20, 19, 17, 28, 12, 15, 12, 8, 10, 6, 5, 8,
               1, 6, 4, 1, 4, 0, 1, 1, 0, 2, 1, 2, 1, 0, 0, 2, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1],
    'chosen': [275, 343, 182, 124, 74, 53, 28, 30, 9, 11, 9, 3, 4, 3, 2, 0, 2],
    'rejected': [218, 260, 201, 156, 91, 61, 47, 33, 18, 17, 15, 9, 4, 4, 3, 6, 6, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
                 0, 0, 0, 1, 0, 0, 1],
}
HH_MIN = {"prompt": 33, "chosen": 3, "rejected": 3}  # the smallest counts (the first non-empty bins' floor)


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
    p.add_argument("--lengths", choices=["hh"], default=None,
                   help="draw prompt/response lengths from HH-RLHF's token histograms (HH_HIST)")
    p.add_argument("--max-prompt", type=int, default=512, help="--lengths hh: prompt truncation (tokens)")
    p.add_argument("--max-completion", type=int, default=128, help="--lengths hh: response truncation (tokens)")
    p.add_argument("--variants", default="padded,padded+window,packed,shared,packed+shared",
                   help="--lengths hh: alignshift variants")
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


def _pairs_from_trl(tb, width: int) -> dict:
    """A TRL DPO batch (its chosen rows, then its rejected rows) as our pair arrays
    ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}``, right-padded to ``width``."""
    ids, am, cm = (np.asarray(tb[k].numpy(), np.int32) for k in ("input_ids", "attention_mask", "completion_mask"))
    pad = ((0, 0), (0, width - ids.shape[1]))
    ids, am, cm = (np.pad(x, pad) for x in (ids, am, cm))
    B = ids.shape[0] // 2
    b = {}
    for g, sl in (("chosen", slice(0, B)), ("rejected", slice(B, None))):
        b[f"{g}_input_ids"], b[f"{g}_attention_mask"], b[f"{g}_loss_mask"] = ids[sl], am[sl], cm[sl] * am[sl]
    return b


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
        b = _pairs_from_trl(tb, length)
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


# ------------------------------------------------------------------ --lengths hh
def hh_lengths(rng, n: int, max_prompt: int, max_completion: int) -> dict[str, np.ndarray]:
    """``n`` draws of prompt, chosen and rejected token counts from :data:`HH_HIST` (each
    independently: a bin by its count, then uniform within the bin), truncated."""
    out = {}
    for k, cap in (("prompt", max_prompt), ("chosen", max_completion), ("rejected", max_completion)):
        hist = np.asarray(HH_HIST[k], float)
        b = rng.choice(len(hist), size=n, p=hist / hist.sum())
        x = np.maximum(b * HH_BIN + rng.integers(0, HH_BIN, n), HH_MIN[k])
        out[k] = np.minimum(x, cap)
    return out


def _hh_dataset(a, n_rows: int, seed: int = 0):
    """Rows of random words with HH lengths: a prompt of ``prompt`` tokens, responses of
    ``chosen`` / ``rejected`` tokens including the EOS TRL appends (one word = one token)."""
    rng = np.random.default_rng(seed)
    n = hh_lengths(rng, n_rows, a.max_prompt, a.max_completion)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, a.vocab - 3, k))  # noqa: E731
    return [{"prompt": words(int(n["prompt"][j])), "chosen": " " + words(int(n["chosen"][j]) - 1),
             "rejected": " " + words(int(n["rejected"][j]) - 1)} for j in range(n_rows)]


def _hh_config(a, variant: str):
    """The experiment config of one alignshift variant: what ``run_preference`` reads."""
    from alignshift.config import ExperimentConfig, from_dict, validate

    cfg = from_dict(ExperimentConfig, {
        "data": {"max_prompt_len": a.max_prompt, "max_completion_len": a.max_completion},
        "train": {"batch_size": a.batch, "precompute_reference": False,
                  "optim": {"lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0},
                  "logits_on_responses": variant != "padded", "packing": variant.startswith("packed"),
                  "share_prompt": variant.endswith("shared")},
        "methods": [{"name": "dpo", "base": "dpo", "base_kwargs": {"beta": 0.1}}]})
    validate(cfg)
    return cfg


def _ours_hh(a, root, variant: str):
    """``(convert, run, cfg)`` of one variant: the step built from its config as
    :func:`alignshift.train.phases.run_preference` builds it (reference in the step)."""
    import jax
    import jax.numpy as jnp

    from alignshift.data.packing import pack_batch
    from alignshift.forward import split_model
    from alignshift.models.hf import load_hf_model
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import objective_for, pack_kwargs, response_window
    from alignshift.train.steps import init_state, make_preference_step

    cfg = _hh_config(a, variant)
    model = load_hf_model(os.path.join(root, "policy"), dtype=jnp.float32)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(cfg.train.optim, 10**6)  # warm-up 0, cosine over 1e6 steps: constant here
    step = make_preference_step(graphdef, rest, tx, objective_for(cfg.methods[0]),
                                logits_chunk=cfg.train.logits_chunk, response_window=response_window(cfg),
                                grad_accum_steps=cfg.train.grad_accum_steps,
                                weighting_scope=cfg.train.weighting_scope)
    ref = jax.tree_util.tree_map(jnp.copy, params)
    holder = {"state": init_state(params, tx)}
    packed = cfg.train.packing or cfg.train.share_prompt

    def convert(tb):
        # padded: the batch's longest rounded up to 64; packed: the encoder's full width P + C
        width = a.max_prompt + a.max_completion if packed else -(-tb["input_ids"].shape[1] // 64) * 64
        b = _pairs_from_trl(tb, width)
        B = b["chosen_input_ids"].shape[0]
        if packed:
            b = pack_batch(b, **pack_kwargs(cfg, b))
            rows, row_len = b["packed_input_ids"].shape
            head = sum(int(np.prod(b[f"{g}_target_index"].shape)) for g in ("chosen", "rejected"))
            real = int((b["packed_segment_ids"] != 0).sum())
        else:
            rows, row_len = 2 * B, width
            head = rows * (min(row_len, response_window(cfg)) if response_window(cfg) else row_len)
            real = int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())
        return b, {"tokens": rows * row_len / B, "head": head / B, "real": real / B, "shape": (rows, row_len)}

    def run(batch):
        holder["state"], m = step(holder["state"], batch, ref)
        return float(jax.block_until_ready(m["loss"]))

    return convert, run


def bench_hh(a, root, tok) -> None:
    """TRL's default vs the alignshift variants on HH-length pairs (module docstring)."""
    trainer, trl_step = _trl_trainer(a, root, tok, _hh_dataset(a, a.batch * (a.warmup + a.rounds)), False)
    batches = list(trainer.get_train_dataloader())
    n = len(batches)
    timed = [(a.warmup + r) % n for r in range(a.rounds)]
    real = [float(b["attention_mask"].sum()) / (b["input_ids"].shape[0] // 2) for b in batches]
    variants = [v for v in a.variants.split(",") if v]
    ours = {}
    for v in variants:
        convert, run = _ours_hh(a, root, v)
        conv = [convert(b) for b in batches]  # conversion and packing outside the timing
        seen = set()
        for i in list(range(a.warmup)) + timed:  # compile every shape the timed rounds will see
            if i < a.warmup or conv[i][1]["shape"] not in seen:
                run(conv[i][0])
                seen.add(conv[i][1]["shape"])
        ours[v] = (conv, run, len(seen))
    for i in range(a.warmup):
        trl_step(batches[i % n])
    t = {v: 0.0 for v in ["trl"] + variants}
    for r, i in enumerate(timed):
        order = ["trl"] + variants if r % 2 == 0 else variants + ["trl"]  # A/B, alternating who goes first
        for v in order:
            t0 = time.perf_counter()
            if v == "trl":
                trl_step(batches[i])
            else:
                ours[v][1](ours[v][0][i][0])
            t[v] += time.perf_counter() - t0
    pairs = a.batch * len(timed)
    trl_tok = float(np.mean([batches[i]["input_ids"].shape[1] * 2 for i in timed]))
    print(f"HH-RLHF lengths (prompt <= {a.max_prompt}, responses <= {a.max_completion} tokens): "
          f"{float(np.mean([real[i] for i in timed])):.0f} real tokens per pair as two sequences; "
          f"{a.rounds} timed rounds of {a.batch} pairs, in-step reference, A/B interleaved")
    print(f"{'run':<25} {'ms/pair':>8} {'x TRL':>6} {'tokens/pair':>12} {'real/pair':>10} {'head pos/pair':>14} "
          f"{'compiled':>9}")
    trl_real = float(np.mean([real[i] for i in timed]))
    print(f"{'TRL DPOTrainer':<25} {t['trl'] / pairs * 1e3:8.1f} {1.0:6.2f} {trl_tok:12.0f} {trl_real:10.0f} "
          f"{trl_tok:14.0f} {'-':>9}")
    for v in variants:
        conv, _, shapes = ours[v]
        mean = lambda key: float(np.mean([conv[i][1][key] for i in timed]))  # noqa: E731
        print(f"{'alignshift ' + v:<25} {t[v] / pairs * 1e3:8.1f} {t[v] / t['trl']:6.2f} {mean('tokens'):12.0f} "
              f"{mean('real'):10.0f} {mean('head'):14.0f} {shapes:9d}")
    print("TRL padding_free: not run (trl 1.13 disables it: it warns and falls back to padded batches)")


def main(argv=None) -> None:
    a = parse_args(argv)
    # torch's OpenMP threads busy-wait by default; on a machine whose cores other processes share
    # they then steal each other's time and TRL's step slowed 3-5x here (README), which is no
    # win of ours. Passive waiting gave TRL its idle-machine speed back (export another value
    # to override). Set before torch (libgomp) is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax
    import torch
    import trl

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    with tempfile.TemporaryDirectory() as root:
        tok, _ = _build_hf(a, root)
        if a.lengths == "hh":
            print(f"Llama {a.layers} layers, d={a.hidden}, {a.heads} heads, ffn {a.intermediate}, vocab {a.vocab}; "
                  f"float32; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
                  f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
                  f"trl {trl.__version__}")
            bench_hh(a, root, tok)
            return
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
