"""qstar.metrics: the CSV columns, the resume rule of metrics.csv, the plot."""

from __future__ import annotations

from qstar.metrics import MetricsWriter, csv_fields, plot_metrics, read_metrics
from qstar.objective import QuietStarObjective

#: metrics.csv's header before the objective was a parameter: Quiet-STaR runs keep it.
QUIET_STAR_COLUMNS = [
    "step", "lr", "loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "reward_std",
    "reward_max", "advantage_mean", "advantage_positive", "mixing_weight_mean", "mixing_weight_std",
    "grad_norm", "tokens_per_s", "skipped", "skipped_total",
]  # fmt: skip


def test_quietstar_columns_are_unchanged():
    assert csv_fields(QuietStarObjective.stat_names) == QUIET_STAR_COLUMNS


def test_resume_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    fields = csv_fields(("loss",))
    w = MetricsWriter(tmp_path, 0, [], {}, fields)
    for step in (1, 2, 3):
        w.write({"step": step, "lr": 0.1, "loss": 1.0 / step})
    w.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(fields)
    w = MetricsWriter(tmp_path, 2, [], {}, fields)  # resumed at step 2: step 3 is written again
    w.write({"step": 3, "lr": 0.1, "loss": 0.25})
    w.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert "grad_norm" not in rows[0]  # empty cells are left out


def test_plot_draws_the_objectives_panels(tmp_path):
    fields = csv_fields(QuietStarObjective.stat_names)
    w = MetricsWriter(tmp_path, 0, [], {}, fields)
    for step in (1, 2):
        w.write({k: float(step) for k in fields})
    w.close()
    png = plot_metrics(tmp_path / "metrics.csv", tmp_path / "m.png", "t", QuietStarObjective.panels)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = plot_metrics(tmp_path / "metrics.csv", tmp_path / "loss.png")  # the default: the loss alone
    assert png.is_file()
