"""Shared helpers of the run-safety tests (test_run_safety.py, test_fault_injection.py): the trainer in
a subprocess, and comparing what two runs left behind, bit for bit."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: a run of a few seconds: the tiny demo (1 CPU thread), 2 sequences of 16 tokens per step.
TINY = ["--preset", "tiny-demo", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "16",
        "--log-every", "1", "--no-progress", "--no-plot"]  # fmt: skip


def tiny_argv(out: Path, max_steps: int, save_every: int = 1, *extra: str) -> list[str]:
    return [*TINY, "--output-dir", str(out), "--max-steps", str(max_steps), "--save-every", str(save_every),
            *extra]  # fmt: skip


def spawn(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """``python -m qstar.train ARGV`` from this checkout; stdout and stderr are piped."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "qstar.train", *argv]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=pipe, stderr=pipe, text=True)


def wait_for_rows(csv_path: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll until ``metrics.csv`` holds ``n`` rows (its steps 1..n are done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv_path.is_file() and len(csv_path.read_bytes().splitlines()) > n:
            return
        if proc.poll() is not None:
            err = proc.stderr.read()
            raise AssertionError(f"the trainer ended (rc {proc.returncode}) before step {n}: {err}")
        time.sleep(0.01)
    raise AssertionError(f"no step {n} in {csv_path} after {timeout} s")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((checkpoint / "model").glob("*.safetensors"))
    assert files, f"no safetensors in {checkpoint / 'model'}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def metrics_bytes(out: Path) -> bytes:
    """``metrics.csv`` with the one column that measures time (``tokens_per_s``) blanked."""
    rows = list(csv.reader(io.StringIO((out / "metrics.csv").read_text(), newline="")))
    col = rows[0].index("tokens_per_s")
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([r[:col] + [""] + r[col + 1 :] if i else r for i, r in enumerate(rows)])
    return buf.getvalue().encode()


def bytes_lost(want: bytes, got: bytes) -> int:
    """How many bytes of ``want`` are not in ``got`` at their place (0 when ``got == want``)."""
    same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return len(want) - same


def compare_runs(want: Path, got: Path, step: int) -> int:
    """Assert that ``got`` ends as ``want`` did: ``checkpoint-<step>``'s weights bit for bit, every
    metrics row (but tokens_per_s) and every thoughts record; returns the bytes lost (0)."""
    lost = bytes_lost(metrics_bytes(want), metrics_bytes(got))
    lost += bytes_lost((want / "thoughts.txt").read_bytes(), (got / "thoughts.txt").read_bytes())
    assert metrics_bytes(got) == metrics_bytes(want), f"{got}/metrics.csv differs ({lost} bytes lost)"
    assert (got / "thoughts.txt").read_bytes() == (want / "thoughts.txt").read_bytes(), f"{got}/thoughts.txt"
    assert (got / "latest").read_text().strip() == f"checkpoint-{step}"
    a, b = weights(want / f"checkpoint-{step}"), weights(got / f"checkpoint-{step}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{got}: {k} differs"
    return lost
