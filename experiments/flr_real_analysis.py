"""Follow-up analysis of the FLR-on-real-pairs sweep (docs/results/flr_real.md).

    python experiments/flr_real_analysis.py --data PATH/hh_harmless_test_dev.jsonl \
        --runs run1.json:run1.npz [run2.json:run2.npz ...] \
        --model ~/.cache/alignshift/smollm2-135m-instruct [--out a.json]

Reads the per-row rewards that ``python -m alignshift.rewards.evaluate --sweep --save-scores``
wrote (first n rows: chosen responses, next n: rejected, for the sampled pairs) for one or more
runs on DISJOINT samples of the same file (``--sample-offset``), pools their pairs, and reports
(no model forward pass; only the tokenizer is loaded):

* every reward's pairwise accuracy on the pooled pairs, its bootstrap 95% interval, ties, and
  the paired-bootstrap difference to Direct (same resampling as ``rewards.evaluate``);

* the response-length baseline on ALL well-formed pairs of the file (not only the sample);
* how each reward's preference relates to length: Spearman of the chosen-minus-rejected reward
  difference with the token-length difference, and accuracy on the pairs whose chosen
  response is the shorter / the longer one;
* a refusal heuristic (keyword match, descriptive only): how often the chosen response is a
  refusal-like reply and the rejected one is not, and each reward's accuracy on those pairs;
* how often FLR (likelihood, all) and Direct agree.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from alignshift.rewards.evaluate import bootstrap_ci, load_bench, spearman

REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry,|i can'?t|i cannot|i won'?t|i will not|i'?d rather not|i do not want|"
    r"i don'?t want|i don'?t think (i|that|it|you|we)|not (appropriate|okay|ok|a good idea|legal)|illegal|"
    r"i'?m not (able|comfortable|going)|i am not (able|comfortable|going)|against the law|harmful|unethical)\b",
    re.I)


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text.replace("\u2019", "'")))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", required=True, nargs="+", help="RESULTS.json:SCORES.npz of each run")
    ap.add_argument("--model", required=True, help="HF folder (its tokenizer counts response tokens)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--scores-out", default=None,
                    help="also write the pooled per-pair rewards here (JSON: row index, chosen, rejected)")
    args = ap.parse_args(argv)
    from alignshift.models.hf import load_hf_tokenizer

    tok = load_hf_tokenizer(args.model)
    ntok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    _, _, rows = load_bench(args.data, "hh", skip_bad_rows=True)
    picked, diffs, runs = [], {}, []
    for spec in args.runs:
        rpath, spath = spec.split(":")
        res = json.load(open(rpath))
        (_, r), = res["results"].items()
        sc = np.load(spath)
        rows_r = r["sample"]["rows"] if "sample" in r else list(range(r["n"]))
        assert sc["rows"].tolist() == rows_r, spec
        if set(rows_r) & set(picked):
            raise SystemExit(f"{spec}: its rows overlap an earlier run's (use --sample-offset for disjoint runs)")
        n = len(rows_r)
        for key in sc.files:
            if key != "rows":
                diffs.setdefault(key.replace(".", "/"), []).append((sc[key][:n], sc[key][n:]))
        picked += rows_r
        seed, n_boot = res["seed"], res["n_boot"]
        runs.append({"results": rpath, "n": n, "seconds": res["seconds"], "scoring_seconds": r["seconds"],
                     "rows": rows_r})
    scores = {k: (np.concatenate([c for c, _ in v]), np.concatenate([j for _, j in v])) for k, v in diffs.items()}
    out: dict = {"n_file": len(rows), "n_pairs": len(picked), "runs": runs}
    base = (scores["direct"][0] > scores["direct"][1]).astype(float)
    pooled = {}
    for k, (c, j) in scores.items():
        ok = (c > j).astype(float)
        m = {"accuracy": float(ok.mean()), "accuracy_ci95": list(bootstrap_ci(ok, n_boot, seed)),
             "ties": float(np.mean(c == j))}
        if k != "direct":
            m["minus_direct"] = float(ok.mean() - base.mean())
            m["minus_direct_ci95"] = list(bootstrap_ci(ok, n_boot, seed, baseline=base))
        pooled[k] = m
    out["pooled"] = pooled

    # length baseline on all well-formed pairs of the file
    lc = np.array([ntok(c) for _, c, _ in rows], float)
    lr = np.array([ntok(j) for _, _, j in rows], float)
    ok = (lc > lr).astype(float)
    out["length_all_pairs"] = {"longer_wins": float(ok.mean()), "ci95": list(bootstrap_ci(ok, n_boot, seed)),
                               "ties": float(np.mean(lc == lr)), "shorter_wins": float(np.mean(lc < lr)),
                               "mean_tokens_chosen": float(lc.mean()), "mean_tokens_rejected": float(lr.mean())}
    ref_c = np.array([is_refusal(c) for _, c, _ in rows])
    ref_r = np.array([is_refusal(j) for _, _, j in rows])
    out["refusal_all_pairs"] = {"chosen_refusal_rejected_not": float(np.mean(ref_c & ~ref_r)),
                                "rejected_refusal_chosen_not": float(np.mean(ref_r & ~ref_c)),
                                "both": float(np.mean(ref_c & ref_r)), "neither": float(np.mean(~ref_c & ~ref_r))}

    dl = lc[picked] - lr[picked]
    rc, rr = ref_c[picked], ref_r[picked]
    groups = {"chosen_shorter": dl < 0, "chosen_longer": dl > 0,
              "chosen_refusal_rejected_not": rc & ~rr, "rejected_refusal_chosen_not": rr & ~rc,
              "no_refusal_contrast": rc == rr}
    out["sample_groups"] = {g: int(m.sum()) for g, m in groups.items()}
    per = {}
    for key, (c, j) in scores.items():
        d = c - j
        m = {"spearman_diff_vs_length_diff": spearman(d, dl) if np.std(d) > 0 else float("nan")}
        for g, mask in groups.items():
            m[f"acc_{g}"] = float(np.mean(d[mask] > 0)) if mask.any() else float("nan")
        per[key] = m
    out["per_method"] = per
    f, dr = scores["flr/likelihood/all"], scores["direct"]
    out["flr_all_direct_agree"] = float(np.mean(((f[0] - f[1]) > 0) == ((dr[0] - dr[1]) > 0)))
    if args.scores_out:
        with open(args.scores_out, "w") as fh:
            json.dump({"rows": picked, "note": "rows: 0-based indices among the well-formed rows of --data (file "
                       "order); per reward: [chosen, rejected] per pair, same order",
                       **{k: [[round(float(a), 5) for a in c], [round(float(b), 5) for b in j]]
                          for k, (c, j) in scores.items()}}, fh, separators=(",", ":"))
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
