"""The evaluation report: ``eval.json``'s per-task sections and ``eval.png``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .cot import CotResult
from .direct import DirectResult
from .perplexity import PerplexityResult


def direct_report(res: DirectResult, source: str) -> dict:
    """The ``gsm8k`` / ``csqa`` section: both means, the allowed ids and every example."""
    return {
        "metric": "zero-shot direct: mean over examples of the product of the gold answer tokens' "
        "probabilities renormalised over the allowed set (the authors' eval_helpers.compute_metrics)",
        "data": source,
        "n": len(res.examples),
        "without_thoughts": res.without_thoughts,
        "with_thoughts": res.with_thoughts,
        "allowed_ids": asdict(res.answer_tokens),
        "n_truncated": res.n_truncated,
        "seconds": res.seconds,
        "examples": [asdict(e) for e in res.examples],
    }


def cot_report(source: str, votes: int, order: list[int], without: CotResult, with_: CotResult) -> dict:
    """The ``gsm8k-cot`` section: both accuracies and, per question (``order``: dataset indices),
    the votes, majorities and texts of both modes."""
    examples = []
    for i, a, b in zip(order, without.examples, with_.examples):
        row = {"dataset_index": i, "gold": a["gold"]}
        for suffix, ex in (("without", a), ("with", b)):
            row.update({f"{k}_{suffix}": ex[k] for k in ("majority", "correct", "votes", "texts")})
        examples.append(row)
    return {
        "metric": f"zero-shot CoT: the majority of {votes} samples equals the gold number "
        "(the authors' zero-shotcot-eval.py)",
        "data": source,
        "n": len(order),
        "votes": votes,
        "without_thoughts": without.accuracy,
        "with_thoughts": with_.accuracy,
        "seconds": {"without": without.seconds, "with": with_.seconds},
        "examples": examples,
    }


def perplexity_report(res: PerplexityResult, source: str) -> dict:
    """The ``perplexity`` section: both perplexities, the gain, the buckets and every window."""
    return {
        "metric": "per-token NLL without and with thoughts; gain = log p_with - log p_without",
        "data": source,
        "n_documents": res.n_documents,
        "n_windows": res.n_windows,
        "n_tokens": res.n_tokens,
        "nll_without": float(res.nll_without.mean()),
        "nll_with": float(res.nll_with.mean()),
        "perplexity_without": res.perplexity_without,
        "perplexity_with": res.perplexity_with,
        "mean_gain": res.mean_gain,
        "fraction_improved": res.fraction_improved,
        "mean_mixing_weight": res.mean_mixing_weight,
        "bucketing": f"{len(res.buckets)} equal-count quantile buckets of the no-thought NLL, easiest "
        "first (ties split by position)",
        "buckets": [asdict(b) for b in res.buckets],
        "seconds": res.seconds,
        "windows": res.windows,
    }


def plot_report(report: dict, png_path: Path) -> Path:
    """One panel per measure: bars without/with thoughts for the direct metrics, CoT and the
    perplexities; the mean gain from thinking per difficulty bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    pairs = []  # (title, [(label, without, with)])
    direct = [
        (t, tasks[t]["without_thoughts"], tasks[t]["with_thoughts"]) for t in ("gsm8k", "csqa") if t in tasks
    ]
    if direct:
        pairs.append(("zero-shot direct (expected accuracy)", direct))
    if "gsm8k-cot" in tasks:
        cot = tasks["gsm8k-cot"]
        pairs.append(
            (f"zero-shot CoT maj@{cot['votes']}", [("gsm8k", cot["without_thoughts"], cot["with_thoughts"])])
        )
    ppl = tasks.get("perplexity")
    if ppl is not None:
        pairs.append(
            ("perplexity", [(Path(str(ppl["data"])).name, ppl["perplexity_without"], ppl["perplexity_with"])])
        )
    n_panels = len(pairs) + (ppl is not None)
    fig, axes = plt.subplots(1, max(1, n_panels), figsize=(5 * max(1, n_panels), 4), squeeze=False)
    axes = list(axes[0])
    for ax, (title, rows) in zip(axes, pairs):
        x = list(range(len(rows)))
        for k, (offset, label, color) in enumerate(
            ((-0.2, "without thoughts", "tab:gray"), (0.2, "with thoughts", "tab:blue"))
        ):
            bars = ax.bar(
                [i + offset for i in x], [r[1 + k] for r in rows], width=0.4, label=label, color=color
            )
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(x, [r[0] for r in rows])
        ax.set_xlim(-0.8, len(rows) - 0.2)
        top = max(max(r[1], r[2]) for r in rows)
        ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if ppl is not None:
        ax = axes[-1]
        buckets = ppl["buckets"]
        gains = [b["mean_gain"] for b in buckets]
        ax.bar(range(len(gains)), gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
        ax.set_xticks(
            range(len(gains)),
            [f"{b['nll_low']:.2f}-{b['nll_high']:.2f}" for b in buckets],
            rotation=30,
            fontsize=8,
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title("gain from thinking by difficulty")
        ax.set_xlabel("no-thought NLL bucket (nats; equal-count quantiles)")
        ax.set_ylabel("mean log p_with - log p_without")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Quiet-STaR evaluation: {report['model']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
