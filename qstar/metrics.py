"""The trainer's records: ``metrics.csv`` (+ TensorBoard / wandb) and the plot of it.

    writer = MetricsWriter(out, start_step, ["tensorboard"], config, fields)
    writer.write({"step": 1, "lr": 1e-3, "loss": 2.3, ...}); writer.close()
    plot_metrics(out / "metrics.csv", out / "metrics.png", panels=objective.panels)

The columns are the objective's (``step``, ``lr``, its statistics, then ``grad_norm``,
``tokens_per_s``, ``skipped``, ``skipped_total``: :func:`csv_fields`).

Crash safety: ``metrics.csv`` and the samples file (``thoughts.txt``) are only ever appended to, a
whole record per write, flushed to disk (fsync) before the loop goes on. When a run starts (fresh or
resumed at step s) each is cut back to its records up to step s: the kept prefix is written to a
temporary file, fsynced and renamed over the old one (:func:`qstar.durable.write_atomic`), so a crash at any
moment leaves either the old file or the cut one, never a truncated one, and each file holds
exactly one record per logged step.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from .durable import append_durably, write_atomic
from .faults import fault_point

__all__ = ["MetricsWriter", "csv_fields", "plot_metrics", "read_metrics"]

#: a panel of the plot: (title, the columns drawn in it).
Panel = tuple[str, Sequence[str]]


def csv_fields(stat_names: Sequence[str]) -> list[str]:
    """The columns of ``metrics.csv`` for an objective logging ``stat_names``."""
    return ["step", "lr", *stat_names, "grad_norm", "tokens_per_s", "skipped", "skipped_total"]


class MetricsWriter:
    """``metrics.csv`` and the samples file (cut back to ``start_step``, then appended), TensorBoard,
    wandb."""

    def __init__(
        self,
        out: Path,
        start_step: int,
        report_to: list[str],
        config: dict,
        fields: list[str],
        samples_file: str | None = None,
    ):
        self.path = out / "metrics.csv"
        self.fields = list(fields)
        self.samples_path = out / samples_file if samples_file is not None else None
        _cut_csv(self.path, start_step, self.fields)
        if self.samples_path is not None:
            _cut_records(self.samples_path, start_step)
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("--report-to tensorboard, but tensorboard is not installed") from err
            # purge_step: TensorBoard drops the events a crashed run logged after the resumed step
            purge = start_step + 1 if start_step else None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--report-to wandb, but wandb is not installed") from err
            self.wandb = wandb.init(project="qstar", dir=str(out), config=config, resume="allow")

    def write(self, row: dict) -> None:
        append_durably(self.path, _csv_line(self.fields, {k: row.get(k, "") for k in self.fields}))
        fault_point("log-append")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def write_samples(self, step: int, samples: Sequence[str]) -> None:
        """One record of the samples file: a line ``step <step>``, then one line per sample."""
        if self.samples_path is None:
            return
        lines = [f"step {step}"] + [s.replace("\r", "\\r").replace("\n", "\\n") for s in samples]
        append_durably(self.samples_path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------------
# Durable appends and atomic cuts
# --------------------------------------------------------------------------------------------------


def _csv_line(fields: Sequence[str], row: dict) -> str:
    buf = io.StringIO(newline="")
    csv.DictWriter(buf, fieldnames=fields).writerow(row)
    return buf.getvalue()


def _cut(path: Path, data: bytes, keep: int) -> None:
    if keep != len(data) or not path.exists():
        write_atomic(path, data[:keep], fault="log-rewrite")


def _cut_csv(path: Path, step: int, fields: list[str]) -> None:
    """Cut ``metrics.csv`` back to its rows up to ``step`` (a new file: the header alone)."""
    header = _csv_line(fields, dict(zip(fields, fields))).encode()
    data = path.read_bytes() if path.is_file() else b""
    if not data.startswith(header):  # absent, or written with other columns: convert what is kept
        rows = []
        if data:
            reader = csv.DictReader(io.StringIO(data.decode(), newline=""))
            rows = [r for r in reader if _int(r.get("step")) is not None and _int(r["step"]) <= step]
        kept = header + b"".join(_csv_line(fields, {k: r.get(k, "") for k in fields}).encode() for r in rows)
        return write_atomic(path, kept, fault="log-rewrite")
    keep = len(header)
    for line in data[len(header) :].splitlines(keepends=True):
        n = _int(line.split(b",", 1)[0])
        if not line.endswith(b"\n") or n is None or n > step:  # a torn last line, or a later step
            break
        keep += len(line)
    _cut(path, data, keep)


def _cut_records(path: Path, step: int) -> None:
    """Cut the samples file back to its records (a line ``step N`` and what follows) up to ``step``."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = 0
    for line in data.splitlines(keepends=True):
        n = _int(line[5:]) if line.startswith(b"step ") else None
        if not line.endswith(b"\n") or (n is not None and n > step):
            break
        keep += len(line)
    _cut(path, data, keep)


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


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
