"""Helpers shared by the notebooks: they read ONLY ``summary.json`` (and the per-seed
``seed_<s>/summary.json``) and ``metrics.jsonl``.

Results root: ``$ALIGNSHIFT_RESULTS`` or ``../results`` (the experiments' default ``--out``
parent) relative to this folder. A missing run is reported, not an error, so every notebook
runs whichever experiments you have produced.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless-safe: figures are shown as PNG images by show()
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent


def results_root() -> Path:
    return Path(os.environ.get("ALIGNSHIFT_RESULTS", HERE.parent / "results")).resolve()


def list_runs(root: Path | None = None) -> list[str]:
    root = root or results_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "summary.json").is_file())


def load_run(name: str, root: Path | None = None):
    """``(summary, records)`` of ``<root>/<name>``, or ``(None, [])`` (with a message) if absent."""
    d = (root or results_root()) / name
    s, m = d / "summary.json", d / "metrics.jsonl"
    if not s.is_file():
        print(f"no results at {d}: run the experiment first (see README), or set ALIGNSHIFT_RESULTS")
        return None, []
    with open(s) as f:
        summary = json.load(f)  # NaN is allowed in our files
    records = []
    if m.is_file():
        with open(m) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return summary, records


def load_seed_summaries(name: str, root: Path | None = None) -> list[dict]:
    """The per-seed ``<root>/<name>/seed_<s>/summary.json`` files, by seed (``[]`` if none)."""
    d = (root or results_root()) / name
    if not d.is_dir():
        return []
    out = []
    for p in d.glob("seed_*/summary.json"):
        with open(p) as f:
            out.append(json.load(f))
    return sorted(out, key=lambda s: s.get("seed", 0))


def _cell(m: dict, k: str, n: int, fmt: str = ".3f") -> str:
    v = m.get(k)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if n > 1 and f"{k}_sem" in m:
        return f"{v:{fmt}} ± {m[f'{k}_sem']:{fmt}}"
    return f"{v:{fmt}}"


def metric_names(summary: dict) -> list[str]:
    names: list[str] = []
    for m in summary["methods"].values():
        for k in m:
            if not k.endswith("_sem") and k not in names and "/" not in k:
                names.append(k)
    return names


def methods_table(summary: dict, metrics: list[str] | None = None, *, with_sem: bool = True) -> pd.DataFrame:
    """One row per method, ``mean ± s.e.`` strings (``—`` for missing/NaN)."""
    metrics = metrics or metric_names(summary)
    n = summary.get("n_seeds", 1)
    rows = {}
    for name, m in summary["methods"].items():
        row = {}
        for k in metrics:
            v = m.get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                row[k] = "—"
            elif with_sem and n > 1 and f"{k}_sem" in m:
                row[k] = f"{v:.3f} ± {m[f'{k}_sem']:.3f}"
            else:
                row[k] = f"{v:.3f}"
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _pref(records, method=None):
    return [r for r in records if r.get("phase") == "preference" and (method is None or r.get("method") == method)]


def methods_in(records) -> list[str]:
    return sorted({r["method"] for r in _pref(records)})


def curve(records, method: str, key: str):
    """``(steps, mean over seeds)`` of ``key`` for ``method`` (preference phase)."""
    rs = [r for r in _pref(records, method) if isinstance(r.get(key), (int, float))]
    steps = sorted({r["step"] for r in rs})
    return np.asarray(steps), np.asarray([np.mean([r[key] for r in rs if r["step"] == s]) for s in steps])


def plot_training(records, keys: list[str], *, log_y=("loss",)):
    keys = [k for k in keys if any(k in r for r in _pref(records))]
    if not keys:
        print("no training curves with these keys in metrics.jsonl")
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for m in methods_in(records):
            x, y = curve(records, m, k)
            if len(x):
                ax.plot(x, y, label=m, marker="o" if len(x) < 8 else None, ms=3)
        if k in log_y:
            ax.set_yscale("log")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_bars(summary: dict, metric: str, *, title: str | None = None):
    names = [n for n, m in summary["methods"].items() if isinstance(m.get(metric), (int, float))
             and not math.isnan(m[metric])]
    if not names:
        print(f"no method reports {metric!r}")
        return None
    vals = [summary["methods"][n][metric] for n in names]
    errs = [summary["methods"][n].get(f"{metric}_sem", 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 1), 3.4))
    ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    lo, hi = min(v - e for v, e in zip(vals, errs)), max(v + e for v, e in zip(vals, errs))
    pad = 0.1 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title or metric)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def weight_stats(records) -> pd.DataFrame:
    """Per method: the logged batch-weight statistics (min/max/ESS) over training."""
    rows = {}
    for m in methods_in(records):
        rs = [r for r in _pref(records, m) if "weights/max" in r]
        if not rs:
            continue
        mx = np.asarray([r["weights/max"] for r in rs], float)
        ess = np.asarray([r.get("weights/ess", np.nan) for r in rs], float)
        mn = np.asarray([r.get("weights/min", np.nan) for r in rs], float)
        rows[m] = {"logged steps": len(rs), "max w (median)": np.median(mx), "max w (max)": mx.max(),
                   "min w (median)": np.nanmedian(mn), "ESS/B (median)": np.nanmedian(ess)}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_weight_histograms(records, *, keys=("weights/max", "weights/ess")):
    """Histograms over logged steps of the per-batch weight statistics, one colour per method
    (uniform weighting shows a spike at 1)."""
    methods = [m for m in methods_in(records) if any("weights/max" in r for r in _pref(records, m))]
    if not methods:
        print("no weight statistics in metrics.jsonl")
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for m in methods:
            vals = [r[k] for r in _pref(records, m) if isinstance(r.get(k), (int, float))]
            if vals and np.ptp(vals) > 1e-9:
                ax.hist(vals, bins=20, alpha=0.5, label=m)
            elif vals:
                ax.axvline(vals[0], ls="--", lw=1, label=f"{m} (constant)")
        ax.set_title(f"{k} per logged batch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def calibration(records, *, bins: int = 8) -> pd.DataFrame:
    """Reliability of the implicit reward on the training batches: the Bradley-Terry
    probability the model assigns to the chosen response, ``σ(rewards/margins)`` (of the batch
    mean margin), against the observed fraction ranked correctly (``rewards/accuracies``),
    in equal-count bins over all logged batches of all methods. A batch-level proxy (σ of the
    mean margin, not the mean of σ): points above the diagonal mean an under-confident reward."""
    rs = [r for r in _pref(records) if isinstance(r.get("rewards/margins"), (int, float))
          and isinstance(r.get("rewards/accuracies"), (int, float))]
    if not rs:
        return pd.DataFrame()
    p = 1.0 / (1.0 + np.exp(-np.asarray([r["rewards/margins"] for r in rs], float)))
    a = np.asarray([r["rewards/accuracies"] for r in rs], float)
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, bins + 1)))  # equal-count bins
    bins = max(1, len(edges) - 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    rows = [{"predicted": p[idx == b].mean(), "observed": a[idx == b].mean(), "n": int((idx == b).sum())}
            for b in range(bins) if (idx == b).any()]
    return pd.DataFrame(rows)


def plot_calibration(records, *, bins: int = 8):
    df = calibration(records, bins=bins)
    if df.empty:
        print("no reward margins/accuracies in metrics.jsonl")
        return None
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    ax.plot(df["predicted"], df["observed"], "o-", label="logged batches")
    for _, r in df.iterrows():
        ax.annotate(str(int(r["n"])), (r["predicted"], r["observed"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_xlabel("σ(mean implicit-reward margin)")
    ax.set_ylabel("fraction of pairs ranked correctly")
    ax.set_title("calibration of the implicit reward")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_shift_curves(summary: dict):
    """Accuracy vs the evaluation mixing weight α (``summary["curves"]``), per mixing kind."""
    c = summary.get("curves")
    if not c:
        print("this summary has no alpha curves")
        return None
    alphas = np.asarray(c["alphas"], float)
    kinds = c.get("kinds", ["convex"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, m in c["methods"].items():
            y = np.asarray(m.get(f"acc/{kind}", []), float)
            if y.size == 0 or np.all(np.isnan(y)):
                continue
            e = np.asarray(m.get(f"acc/{kind}_sem", np.zeros_like(y)), float)
            ax.plot(alphas, y, marker="o", ms=3, label=name)
            ax.fill_between(alphas, y - e, y + e, alpha=0.15)
        data_cfg = summary.get("config", {}).get("data", {})
        a0 = data_cfg.get("scenario_kwargs", {}).get("alpha0", 0.1 if summary.get("scenario") == "preference_shift"
                                                     else None)
        if a0 is not None:  # the training mixture
            ax.axvline(a0, color="k", ls=":", lw=1)
        ax.set_title(f"{kind} mixing: preference accuracy vs α")
        ax.set_xlabel("evaluation α")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on relabelled test pairs")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def show(fig):
    """Display a figure in the notebook (inline PNG) and close it."""
    if fig is None:
        return
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


# ---------------------------------------------------------------------------- DoRA (dora.py)


def dora_classifier_table(summary: dict) -> pd.DataFrame:
    """``summary["diagnostics"]`` of a ``dora.py`` run: per source classifier (``pooled``, or one
    per synthetic source), its held-out accuracy / AUC / ECE / Brier / NLL / base rate (mean
    over seeds), next to the same classifier on the generator's own features (the
    ``oracle_feature_classifier``: how much source signal the hidden states lose)."""
    d = summary.get("diagnostics") or {}
    rows = {}
    for name, r in (d.get("classifier") or {}).items():
        row = {k: r.get(k, float("nan")) for k in ("accuracy", "auc", "ece", "brier", "nll", "base_rate")}
        o = (d.get("oracle_feature_classifier") or {}).get(name, {})
        row.update({f"oracle-feature {k}": o.get(k, float("nan")) for k in ("accuracy", "auc", "ece")})
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").round(3)


def dora_weight_table(summary: dict) -> pd.DataFrame:
    """Mean calibration weight h̃ per response and H per list, by true source (mean over seeds);
    the target source should get the largest weight."""
    d = summary.get("diagnostics") or {}
    h, H = d.get("mean_h_by_source") or {}, d.get("mean_H_by_source") or {}
    return pd.DataFrame({"mean h̃ (response)": h, "mean H (list)": H}).round(3)


def dora_weight_stats(summary: dict) -> dict:
    """Scalar weight diagnostics: ESS of H (fraction of lists), share of the total weight on
    target lists, the largest h̃."""
    d = summary.get("diagnostics") or {}
    return {k: round(float(d[k]), 4) for k in ("H_ess", "share_of_H_on_target", "h_max") if k in d}


def paired_table(summary: dict) -> pd.DataFrame:
    """``summary["paired"]`` (dora.py): DoRA minus each ablation, paired by seed: mean ± s.e. of
    the difference and the number of seeds where DoRA is higher."""
    n = summary.get("n_seeds", 1)
    rows = {}
    for name, r in (summary.get("paired") or {}).items():
        rows[name] = {k: f"{r[k]:+.4f} ± {r.get(k + '_sem', 0.0):.4f} ({r.get(k + '_n_positive', '?')}/{n} > 0)"
                      for k in ("target_pref_acc", "target_pref_acc_flat", "target_reward") if k in r}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_source_reliability(seed_summaries: list[dict]):
    """Reliability diagram of DoRA's source classifier on its held-out split, one line per seed
    (from ``seed_<s>/summary.json``: ``diagnostics.classifier.reports.<name>.bins``)."""
    reports = [(s.get("seed"), name, r) for s in seed_summaries
               for name, r in ((s.get("diagnostics") or {}).get("classifier") or {}).get("reports", {}).items()
               if r.get("bins")]
    if not reports:
        print("no classifier reliability bins in the per-seed summaries")
        return None
    names = sorted({name for _, name, _ in reports})
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
        for seed, n2, r in reports:
            if n2 != name:
                continue
            b = [x for x in r["bins"] if x.get("count", 0) > 0 and not math.isnan(x["mean_p"])]
            ax.plot([x["mean_p"] for x in b], [x["frac_pos"] for x in b], "o-", ms=3,
                    label=f"seed {seed} (ECE {r['ece']:.3f})")
        ax.set_title(f"source classifier `{name}`: P(target)")
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed fraction from the target source")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- FLR (flr.py)


def _rm_kind(name: str) -> tuple[str, str, str]:
    """``(reward, mode, aggregation)`` of a ``reward_models`` row name written by flr.py:
    ``FLR`` (= likelihood, difference), ``FLR <mode> <aggregation>``, ``Direct``, others."""
    parts = name.split()
    if name == "FLR":
        return "FLR", "likelihood", "difference"
    if parts[0] == "FLR" and len(parts) == 3:
        return "FLR", parts[1], parts[2]
    return name, "—", "—"


def reward_models_table(summary: dict, metrics=("pair_acc", "pearson", "spearman")) -> pd.DataFrame:
    """``summary["reward_models"]`` (flr.py): every FLR mode × aggregation, Direct and the
    length baseline, with pairwise accuracy on the ground-truth test pairs and Pearson /
    Spearman against the quality of the individual test responses (mean ± s.e.)."""
    rms = summary.get("reward_models") or {}
    n = summary.get("n_seeds", 1)
    rows = []
    for name, m in rms.items():
        reward, mode, agg = _rm_kind(name)
        rows.append({"reward model": name, "reward": reward, "mode": mode, "aggregation": agg,
                     **{k: _cell(m, k, n) for k in metrics if k in m}})
    return pd.DataFrame(rows).set_index("reward model") if rows else pd.DataFrame()


def flr_grid(summary: dict, metric: str = "pair_acc") -> pd.DataFrame:
    """``metric`` (mean over seeds) of FLR as a mode × aggregation grid, with Direct (and any
    other non-FLR reward) as extra rows for comparison."""
    rms = summary.get("reward_models") or {}
    grid: dict = {}
    for name, m in rms.items():
        reward, mode, agg = _rm_kind(name)
        if metric not in m:
            continue
        if reward == "FLR":
            grid.setdefault(f"FLR {mode}", {})[agg] = m[metric]
        else:
            grid.setdefault(reward, {})["(no aggregation)"] = m[metric]
    df = pd.DataFrame.from_dict(grid, orient="index").round(3)
    return df.astype(object).where(df.notna(), "—")


def mined_correlation_table(summary: dict) -> pd.DataFrame:
    """flr.py's ``mined_reward_correlation``: per seed, Spearman of each labeller's scores with
    the ground-truth quality of the sampled (mined) responses."""
    per_seed = summary.get("mined_reward_correlation") or []
    if isinstance(per_seed, dict):
        per_seed = [per_seed]
    seeds = summary.get("seeds") or list(range(len(per_seed)))
    return pd.DataFrame(per_seed, index=[f"seed {s}" for s in seeds[: len(per_seed)]]).round(3)


def rm_summary(summary: dict) -> dict:
    """``summary`` with ``methods`` = its reward models, for :func:`plot_bars` / :func:`methods_table`."""
    return {**summary, "methods": summary.get("reward_models") or {}}
