"""STaR's per-iteration report: ``report.csv``, ``report.json`` and ``accuracy.png``.

One row per iteration. Row 0 is the starting model (few-shot prompted, no fine-tuning): its held-out
accuracy is the few-shot baseline. Row ``n >= 1`` describes iteration ``n``: the training-set
accuracy of the model that sampled its rationales (the model of row ``n - 1``), what was kept, the
fine-tune, and the held-out accuracy of the model it produced. Every file is replaced atomically
(:func:`qstar.durable.write_atomic`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..durable import write_atomic

__all__ = ["FIELDS", "plot_report", "write_report"]

#: the report's columns, in order (``docs/star.md``, "Files, the report, resume" says what each one means).
FIELDS = (
    "iteration",
    "train_problems",
    "train_accuracy",
    "train_accuracy_with_rationalization",
    "train_sample_accuracy",
    "solved_by_rationale",
    "solved_by_rationalization",
    "unsolved",
    "kept_rationales",
    "kept_rationalizations",
    "duplicates",
    "hint_leaks",
    "unfinished",
    "dataset_size",
    "steps",
    "heldout_problems",
    "heldout_greedy",
    "heldout_majority",
    "majority_samples",
    "sample_seconds",
    "rationalize_seconds",
    "finetune_seconds",
    "eval_seconds",
    "seconds",
)


def write_report(out: Path, rows: list[dict], meta: dict, *, plot: bool = True) -> list[Path]:
    """Write ``report.csv`` and ``report.json`` (``meta`` and the rows) into ``out``, and the plot
    when asked; returns the paths written."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})
    write_atomic(out / "report.csv", buf.getvalue())
    write_atomic(out / "report.json", json.dumps({**meta, "iterations": rows}, indent=2) + "\n")
    paths = [out / "report.csv", out / "report.json"]
    if plot:
        png = plot_report(rows, out / "accuracy.png", title=meta.get("title", "STaR"))
        if png is not None:
            paths.append(png)
    return paths


def plot_report(rows: list[dict], path: Path, title: str = "STaR") -> Path | None:
    """Accuracy against iteration: held-out greedy and majority, training set with and without
    rationalization. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = (
        ("heldout_greedy", "held-out, greedy", "o-"),
        ("heldout_majority", "held-out, majority of k", "s-"),
        ("train_accuracy", "train, rationales alone (sampling model)", "^--"),
        ("train_accuracy_with_rationalization", "train, with rationalization", "v--"),
    )
    for key, label, style in series:
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xlabel("iteration (0: the starting model, few-shot)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks([r["iteration"] for r in rows])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path
