"""The trainer's records: ``metrics.csv`` (+ TensorBoard / wandb) and the plot of it.

    writer = MetricsWriter(out, start_step, ["tensorboard"], config, fields)
    writer.write({"step": 1, "lr": 1e-3, "loss": 2.3, ...}); writer.close()
    plot_metrics(out / "metrics.csv", out / "metrics.png", panels=objective.panels)

The columns are the objective's (``step``, ``lr``, its statistics, then ``grad_norm``,
``tokens_per_s``, ``skipped``, ``skipped_total``: :func:`csv_fields`); on resume the CSV keeps its
rows up to the resumed step, so it holds every step once.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MetricsWriter", "csv_fields", "plot_metrics", "read_metrics"]

#: a panel of the plot: (title, the columns drawn in it).
Panel = tuple[str, Sequence[str]]


def csv_fields(stat_names: Sequence[str]) -> list[str]:
    """The columns of ``metrics.csv`` for an objective logging ``stat_names``."""
    return ["step", "lr", *stat_names, "grad_norm", "tokens_per_s", "skipped", "skipped_total"]


class MetricsWriter:
    """``metrics.csv`` (rewritten up to the resume step, then appended), TensorBoard, wandb."""

    def __init__(self, out: Path, start_step: int, report_to: list[str], config: dict, fields: list[str]):
        self.path = out / "metrics.csv"
        self.fields = list(fields)
        rows = []
        if start_step > 0 and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("--report-to tensorboard, but tensorboard is not installed") from err
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--report-to wandb, but wandb is not installed") from err
            self.wandb = wandb.init(project="qstar", dir=str(out), config=config, resume="allow")

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k, "") for k in self.fields})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.csv``, as floats (empty cells left out)."""
    with Path(path).open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_metrics(
    csv_path: Path, png_path: Path, title: str = "", panels: Sequence[Panel] = (("loss", ("loss",)),)
) -> Path:
    """One panel per ``(title, columns)`` of ``panels``, each column over the optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.75 * len(panels), 4), squeeze=False)
    for ax, (panel_title, columns) in zip(axes[0], panels):
        for key in columns:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
        if len(columns) > 1:
            ax.legend()
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
