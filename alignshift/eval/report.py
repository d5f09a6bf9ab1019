"""Results files: ``summary.json`` (design schema), seed aggregation, tables, plots.

``summary.json`` = ``{"scenario": str, "seed": int, "methods": {name: {metric: float}},
"config": {...}}``. The multi-seed summary keeps that schema (``seed`` = first seed, each
metric the mean over seeds) and adds ``<metric>_sem`` (standard error), ``n_seeds`` and
``seeds``. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import math

import numpy as np

from alignshift.io import atomic_path, atomic_write

__all__ = ["write_json_atomic", "save_figure_atomic", "aggregate_seeds", "format_table", "plot_training_curves", "read_jsonl"]


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
