"""Token-length histograms of HH-RLHF pairs, for ``vs_trl.py --lengths hh``.

Reads an HH-RLHF JSONL file (the published ``chosen``/``rejected`` transcripts), maps each row
as :func:`alignshift.data.datasets.hh_rlhf.load_hh_rlhf` does (``format="chat"``: the shared
history as chat turns, the final assistant turns as the responses; malformed rows skipped and
counted), and tokenises it exactly as the real-model training path does
(:func:`alignshift.data.chat.tokenize_prompt_response`, SmolLM2-135M-Instruct's tokenizer and
chat template -- which adds its default system turn -- untruncated). Prints the prompt,
chosen and rejected token counts' summary (median, p90, max, mean) and a Python literal of
their histograms (``BIN`` tokens wide) to paste into ``benchmarks/vs_trl.py``.

    make real-model                                   # the tokenizer folder, once
    python benchmarks/count_hh_lengths.py /path/to/hh_harmless_test_dev.jsonl [--bin 16]

The benchmark never reads the data file: it only contains the numbers printed here.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def count(path: str, tokenizer) -> tuple[dict[str, np.ndarray], int]:
    from alignshift.data.chat import tokenize_prompt_response
    from alignshift.data.datasets.hh_rlhf import load_hh_rlhf
    from alignshift.data.schema import SkippedRows

    report = SkippedRows()
    pairs = load_hh_rlhf(path, split="test", format="chat", skip_bad_rows=True, report=report)
    out = {"prompt": [], "chosen": [], "rejected": []}
    for i, ex in enumerate(pairs):
        p, c = tokenize_prompt_response(tokenizer, ex, ex.chosen, i, mode="chat")
        _, r = tokenize_prompt_response(tokenizer, ex, ex.rejected, i, mode="chat")
        out["prompt"].append(len(p))
        out["chosen"].append(len(c))
        out["rejected"].append(len(r))
    return {k: np.asarray(v) for k, v in out.items()}, report.count


def histogram(x: np.ndarray, width: int) -> list[int]:
    """Counts of ``x`` in bins ``[j·width, (j+1)·width)``, j = 0 .. max // width."""
    return np.bincount(x // width, minlength=int(x.max()) // width + 1).tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="HH-RLHF JSONL (chosen/rejected transcripts)")
    p.add_argument("--bin", type=int, default=16, help="histogram bin width in tokens")
    p.add_argument("--tokenizer", default=None, help="HF folder with the tokenizer (default: the SmolLM2 cache "
                   "folder `make real-model` builds)")
    p.add_argument("--json", default=None, help="also write the per-row counts to this JSON file")
    a = p.parse_args(argv)
    import transformers

    from alignshift.models.convert import smollm2_folder

    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer or smollm2_folder())
    lengths, skipped = count(a.path, tok)
    n = len(lengths["prompt"])
    print(f"# {n} pairs of {a.path} ({skipped} malformed rows skipped); tokenizer "
          f"{getattr(tok, 'name_or_path', '?')}, chat template, untruncated")
    for k, x in lengths.items():
        print(f"# {k:<8} median {np.median(x):.0f}  p90 {np.percentile(x, 90):.0f}  max {x.max()}  "
              f"mean {x.mean():.1f}  min {x.min()}")
    pair = lengths["prompt"] * 2 + lengths["chosen"] + lengths["rejected"]
    shared = lengths["prompt"] + lengths["chosen"] + lengths["rejected"]
    print(f"# tokens per pair: two sequences mean {pair.mean():.1f}, shared prompt mean {shared.mean():.1f} "
          f"({shared.mean() / pair.mean():.3f}x)")
    print(f"HH_BIN = {a.bin}")
    print("HH_HIST = {")
    for k, x in lengths.items():
        print(f"    {k!r}: {histogram(x, a.bin)},")
    print("}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({k: v.tolist() for k, v in lengths.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
