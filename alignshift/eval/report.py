"""Results files: ``summary.json`` (design schema), seed aggregation, tables, plots.

``summary.json`` = ``{"scenario": str, "seed": int, "methods": {name: {metric: float}},
"config": {...}}``. The multi-seed summary keeps that schema (``seed`` = first seed, each
metric the mean over seeds) and adds ``<metric>_sem`` (standard error), ``n_seeds`` and
``seeds``; the experiment driver adds ``paired_vs_dpo`` (:func:`paired_differences`: each
method minus the DPO baseline, paired by seed, with a 95% t-interval). Files are written
atomically (temp file + rename).
"""

from __future__ import annotations

import json
import math

import numpy as np

from alignshift.io import atomic_path, atomic_write

__all__ = ["write_json_atomic", "save_figure_atomic", "aggregate_seeds", "format_table", "plot_training_curves",
           "read_jsonl", "t_interval", "paired_differences", "format_paired_differences"]


def write_json_atomic(path: str, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def aggregate_seeds(summaries: list[dict]) -> dict:
    """Mean and standard error (sd/√n; 0 for one seed) of every metric over seeds."""
    if not summaries:
        raise ValueError("no per-seed summaries to aggregate")
    methods: dict[str, dict] = {}
    for name in summaries[0]["methods"]:
        metrics = summaries[0]["methods"][name]
        agg = {}
        for k in metrics:
            vals = np.asarray([s["methods"][name][k] for s in summaries], dtype=np.float64)
            agg[k] = float(vals.mean())
            agg[f"{k}_sem"] = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        methods[name] = agg
    return {
        "scenario": summaries[0]["scenario"],
        "seed": summaries[0]["seed"],
        "methods": methods,
        "config": summaries[0]["config"],
        "n_seeds": len(summaries),
        "seeds": [s["seed"] for s in summaries],
    }


def t_interval(d, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)`` of the mean of ``d`` (paired differences, one per seed): the
    Student-t interval ``mean ± t_{(1+level)/2, n−1}·sd/√n``; ``low``/``high`` are None with fewer
    than two values (no interval from one seed)."""
    from scipy import stats

    d = np.asarray(d, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def paired_differences(summaries: list[dict], baseline: str, metrics, *, methods=None, level: float = 0.95) -> dict:
    """Every method minus ``baseline``, paired by seed, per metric: ``{"baseline", "level",
    "n_seeds", "seeds", "methods": {name: {metric: {"mean", "ci95": [low, high] | None, "sd",
    "n", "n_positive"}}}}`` (per-seed ``summaries`` as ``run_seed`` writes them; ``methods``:
    the rows to compare, default every row but the baseline). A metric missing or not finite
    for a method or the baseline in any seed is left out for that method."""
    if not summaries:
        raise ValueError("no per-seed summaries to compare")
    names = [n for n in (methods if methods is not None else summaries[0]["methods"]) if n != baseline]
    out = {"baseline": baseline, "level": level, "n_seeds": len(summaries), "seeds": [s["seed"] for s in summaries],
           "methods": {}}
    for name in names:
        row = {}
        for k in metrics:
            vals = []
            for s in summaries:
                a, b = s["methods"].get(name, {}).get(k), s["methods"].get(baseline, {}).get(k)
                if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                    break
                if not (math.isfinite(a) and math.isfinite(b)):
                    break
                vals.append(float(a) - float(b))
            else:
                d = np.asarray(vals, np.float64)
                mean, lo, hi = t_interval(d, level)
                row[k] = {"mean": mean, "ci95": None if lo is None else [lo, hi],
                          "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "n": int(len(d)),
                          "n_positive": int((d > 0).sum())}
        out["methods"][name] = row
    return out


def format_paired_differences(paired: dict, columns: list[tuple[str, str]]) -> str:
    """A Markdown table of :func:`paired_differences`: ``mean [low, high] (k/n > 0)`` per
    (metric key, header), one row per method."""
    pct = round(100 * paired.get("level", 0.95))
    head = (f"| {'method − ' + paired['baseline']} (paired over {paired['n_seeds']} seeds, {pct}% t-interval) | "
            + " | ".join(h for _, h in columns) + " |")
    rows = [head, "|---|" + "---|" * len(columns)]
    for name, r in paired["methods"].items():
        cells = []
        for k, _ in columns:
            c = r.get(k)
            if c is None:
                cells.append("—")
            elif c["ci95"] is None:
                cells.append(f"{c['mean']:+.3f} ({c['n_positive']}/{c['n']} > 0)")
            else:
                cells.append(f"{c['mean']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] ({c['n_positive']}/{c['n']} > 0)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_table(summary: dict, columns: list[tuple[str, str]]) -> str:
    """A Markdown table: one row per method, ``mean ± sem`` per (metric key, header)."""
    head = "| method | " + " | ".join(h for _, h in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    rows = [head, sep]
    for name, m in summary["methods"].items():
        cells = []
        for k, _ in columns:
            if k not in m or m[k] is None or (isinstance(m[k], float) and math.isnan(m[k])):
                cells.append("—")
            elif f"{k}_sem" in m and summary.get("n_seeds", 1) > 1:
                cells.append(f"{m[k]:.3f} ± {m[f'{k}_sem']:.3f}")
            else:
                cells.append(f"{m[k]:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def save_figure_atomic(fig, path: str, *, dpi: int = 110) -> None:
    """Save a matplotlib figure via a temp file + rename (never a half-written PNG), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def plot_training_curves(
    records: list[dict], path: str, *, panels: list[tuple[str, str]], log_scale: tuple[str, ...] = ("loss",)
) -> None:
    """One panel per (metric key, title); one line per method (mean over seeds). Panels whose
    key is in ``log_scale`` use a log y-axis (losses of different families differ by 10-100x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    axes = np.atleast_1d(axes)
    methods = sorted({r["method"] for r in records if r.get("phase") == "preference"})
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            rs = [r for r in records if r.get("method") == m and key in r and isinstance(r[key], (int, float))]
            steps = sorted({r["step"] for r in rs})
            if not steps:
                continue
            ys = [np.mean([r[key] for r in rs if r["step"] == s]) for s in steps]
            ax.plot(steps, ys, marker="o" if len(steps) < 8 else None, ms=3, label=m)
        if key in log_scale:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
