"""Run safety (issue 15, items 3-5): logs cut back atomically on resume, one run per output directory
(the lock, the fresh-run rule, --overwrite), and SIGINT/SIGTERM stopping after a saved step."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from run_helpers import compare_runs, spawn, tiny_argv, wait_for_rows  # noqa: E402

import qstar.durable as durable  # noqa: E402
import qstar.interrupt as interrupt  # noqa: E402
import qstar.metrics as metrics  # noqa: E402
import qstar.train as T  # noqa: E402
from qstar.distributed import Dist  # noqa: E402
from qstar.metrics import MetricsWriter, csv_fields  # noqa: E402
from qstar.run_dir import LOCK_NAME, OutputDirError, RunDirLock, claim_output_dir  # noqa: E402

CPU = Dist("none", 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run (a checkpoint every step), in this process."""
    out = tmp_path_factory.mktemp("reference")
    T.main(tiny_argv(out, 4))
    return out


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------


def test_resume_cuts_both_logs_back_to_one_record_per_step(reference, tmp_path):
    """Resumed at step 2 of a directory that ran to 4: metrics.csv and thoughts.txt hold steps 1-4
    once each, byte for byte as the straight run (thoughts.txt used to repeat steps 3 and 4)."""
    out = tmp_path / "run"
    T.main(tiny_argv(out, 4))
    T.main(tiny_argv(out, 4, 1, "--resume", str(out / "checkpoint-2")))
    assert [line for line in (out / "thoughts.txt").read_text().splitlines() if line.startswith("step ")] == [
        "step 1", "step 2", "step 3", "step 4",
    ]  # fmt: skip
    assert compare_runs(reference, out, 4) == 0


def _rows(fields, steps):
    return [{k: (s if k == "step" else 0.5) for k in fields} for s in steps]


def test_metrics_csv_is_never_opened_for_writing_in_place(tmp_path, monkeypatch):
    """The cut on resume writes a temporary file and renames it: metrics.csv is only ever opened to
    read or to append (it used to be truncated with open('w'), and a SIGKILL then emptied it)."""
    fields = csv_fields(("loss",))
    w = MetricsWriter(tmp_path, 0, [], {}, fields, "thoughts.txt")
    for row in _rows(fields, (1, 2, 3)):
        w.write(row)
        w.write_samples(row["step"], ["a sample"])
    modes, real_open = [], builtins.open

    def spy(file, mode="r", *args, **kwargs):
        if os.path.basename(str(file)) in ("metrics.csv", "thoughts.txt"):
            modes.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # pathlib's
    w = MetricsWriter(tmp_path, 1, [], {}, fields, "thoughts.txt")
    w.write(_rows(fields, (2,))[0])
    w.write_samples(2, ["again"])
    monkeypatch.undo()
    assert modes and all(m[0] in "ra" for m in modes), modes
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.csv")] == [1, 2]
    assert (tmp_path / "thoughts.txt").read_text() == "step 1\na sample\nstep 2\nagain\n"


def test_a_crash_during_the_cut_leaves_the_old_log_whole(tmp_path, monkeypatch):
    fields = csv_fields(("loss",))
    w = MetricsWriter(tmp_path, 0, [], {}, fields, "thoughts.txt")
    for row in _rows(fields, (1, 2, 3)):
        w.write(row)
        w.write_samples(row["step"], ["x"])
    before = (tmp_path / "metrics.csv").read_bytes()

    def crash(name):
        raise RuntimeError(f"crash at {name}")

    monkeypatch.setattr(durable, "fault_point", crash)
    with pytest.raises(RuntimeError, match="crash at log-rewrite"):
        MetricsWriter(tmp_path, 1, [], {}, fields, "thoughts.txt")
    assert (tmp_path / "metrics.csv").read_bytes() == before
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))  # the interrupted write left no temporary file
    MetricsWriter(tmp_path, 1, [], {}, fields, "thoughts.txt")  # the next start cuts it
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.csv")] == [1]
    assert (tmp_path / "thoughts.txt").read_text() == "step 1\nx\n"


def test_a_torn_last_row_is_dropped(tmp_path):
    fields = csv_fields(("loss",))
    w = MetricsWriter(tmp_path, 0, [], {}, fields)
    for row in _rows(fields, (1, 2)):
        w.write(row)
    with (tmp_path / "metrics.csv").open("ab") as f:
        f.write(b"3,0.5,0.")  # a power cut in the middle of a row
    MetricsWriter(tmp_path, 5, [], {}, fields)
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.csv")] == [1, 2]


# --------------------------------------------------------------------------------------------------
# One run per output directory
# --------------------------------------------------------------------------------------------------


def test_a_second_trainer_on_the_directory_stops_with_one_line(tmp_path):
    holder = RunDirLock(tmp_path)
    holder.acquire()  # held through a separate open file: exactly what another process holds
    try:
        with pytest.raises(OutputDirError) as err:
            T.main(tiny_argv(tmp_path, 1))
    finally:
        holder.release()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"is in use by another trainer (pid {os.getpid()} on host {socket.gethostname()}" in msg
    assert not (tmp_path / "metrics.csv").exists(), "the second trainer wrote into the directory"


def test_a_second_trainer_process_is_refused(tmp_path):
    """The same through two processes: a real trainer holds the directory while this one tries."""
    proc = spawn(tiny_argv(tmp_path, 50, 100))
    try:
        wait_for_rows(tmp_path / "metrics.csv", 1, proc)
        with pytest.raises(OutputDirError, match=rf"in use by another trainer \(pid {proc.pid} on host"):
            T.main(tiny_argv(tmp_path, 50, 100, "--resume", "latest"))
    finally:
        proc.kill()
        proc.communicate()


def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="qstar.train"):
        T.main(tiny_argv(tmp_path, 1))
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of pid {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists(), "the lock outlived the run"


def test_a_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(OutputDirError, match="pid 1 on host elsewhere.example.*written on another host"):
        T.main(tiny_argv(tmp_path, 1))


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ValueError, match="must be a multiple"):
        T.main(tiny_argv(tmp_path, 1, 1, "--batch-size", "3"))
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_rank_0_takes_the_lock(tmp_path):
    run = T.RunConfig(output_dir=str(tmp_path / "out"))
    with claim_output_dir(run, Dist("none", 1, 2, torch.device("cpu"))):
        assert not (tmp_path / "out").exists()
    with claim_output_dir(run, CPU):
        assert (tmp_path / "out" / LOCK_NAME).is_file()


def test_a_fresh_run_refuses_a_finished_directory_unless_overwrite(tmp_path):
    T.main(tiny_argv(tmp_path, 2))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"already holds a run \(checkpoint-1, checkpoint-2, latest"):
        T.main(tiny_argv(tmp_path, 1))
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2", "the refused run changed it"
    with pytest.raises(OutputDirError, match="--overwrite and --resume exclude each other"):
        T.main(tiny_argv(tmp_path, 1, 1, "--overwrite", "--resume", "latest"))

    T.main(tiny_argv(tmp_path, 1, 1, "--overwrite"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-1", "latest", "metrics.csv", "notes.txt", "thoughts.txt"], names
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.csv")] == [1]
    assert (tmp_path / "thoughts.txt").read_text().count("step ") == 1


def test_overwrite_leaves_a_users_own_checkpoint_copies_alone(tmp_path):
    T.main(tiny_argv(tmp_path, 1))
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "best-checkpoint-1")
    T.main(tiny_argv(tmp_path, 1, 1, "--overwrite"))
    assert (tmp_path / "best-checkpoint-1" / "manifest.json").is_file()


def test_logs_without_a_checkpoint_do_not_block_a_fresh_run(tmp_path):
    """A run stopped before its first checkpoint leaves logs only: nothing to resume, so a fresh run
    goes ahead and cuts them back."""
    fields = csv_fields(("loss",))
    w = MetricsWriter(tmp_path, 0, [], {}, fields, "thoughts.txt")
    w.write(_rows(fields, (1,))[0])
    w.close()
    T.main(tiny_argv(tmp_path, 1))
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.csv")] == [1]


def test_a_resume_from_another_directory_into_a_run_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    T.main(tiny_argv(a, 1))
    T.main(tiny_argv(b, 2))
    with pytest.raises(OutputDirError, match=r"is a checkpoint of another directory, and --output-dir"):
        T.main(tiny_argv(b, 2, 2, "--resume", str(a / "checkpoint-1")))
    assert (b / "latest").read_text().strip() == "checkpoint-2"
    T.main(tiny_argv(tmp_path / "c", 2, 2, "--resume", str(a / "checkpoint-1")))  # an empty one is fine


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_resume_ends_as_an_uninterrupted_run(reference, tmp_path, sig):
    """SIGTERM/SIGINT once step 1 is logged: the run finishes the step it is in, saves it, exits with
    128 + the signal and one line, no traceback; resuming then ends bit for bit as the straight run."""
    proc = spawn(tiny_argv(tmp_path, 4, 100))  # no checkpoint but the one the signal asks for
    wait_for_rows(tmp_path / "metrics.csv", 1, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    step = int((tmp_path / "latest").read_text().strip().removeprefix("checkpoint-"))
    assert 1 <= step < 4, stderr  # step 1 was logged: it stopped after the step it was in (1 to 3)
    assert last == (
        f"qstar-train: stopped by {sig.name} after step {step}; saved {tmp_path / f'checkpoint-{step}'} "
        "(continue with --resume latest)"
    )
    assert len(metrics.read_metrics(tmp_path / "metrics.csv")) == step

    T.main(tiny_argv(tmp_path, 4, 1, "--resume", "latest"))
    assert compare_runs(reference, tmp_path, 4) == 0


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []

    def fake_exit(code):
        exits.append(code)

    monkeypatch.setattr(interrupt.os, "_exit", fake_exit)
    with interrupt.StopOnSignal(CPU) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [143]
        with pytest.raises(interrupt.TrainingInterrupted) as err:
            stop.exit(3, None)
    assert err.value.code == 143 and err.value.step == 3
    assert signal.getsignal(signal.SIGTERM) is not stop._handle, "the handler outlived the run"
    assert "second SIGTERM: exiting now, without saving" in capsys.readouterr().err
