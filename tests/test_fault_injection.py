"""SIGKILL at random points of short runs, then resume: the end is an uninterrupted run's, bit for bit
(issue 15, item 11). The trainer kills itself at a named point through ``QSTAR_FAULT_INJECT``
(:mod:`qstar.faults`): while the loop saves a checkpoint, inside the save (the temporary directory
written, not yet renamed), between a step's metrics row and its thoughts record, while a log is cut
back on resume, and while an old checkpoint is deleted by a rollback resume.

Each case prints what it did: the kills survived and the bytes of the logs lost (0)."""

from __future__ import annotations

import random
import shutil
import signal

import pytest

pytest.importorskip("transformers")

from run_helpers import compare_runs, spawn, tiny_argv  # noqa: E402

import qstar.train as T  # noqa: E402
from qstar.checkpoint import verify_checkpoint  # noqa: E402
from qstar.faults import ENV  # noqa: E402

MAX_STEPS = 4
#: point -> how many times a 4-step run (a checkpoint every step) reaches it, at most.
POINTS = {"save": 4, "checkpoint-write": 4, "log-append": 4, "log-rewrite": 2}
SEEDS = range(4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    T.main(tiny_argv(out, MAX_STEPS))
    return out


def _attempt(out, point: str, n: int, *extra: str) -> bool:
    """The trainer in a subprocess with a SIGKILL at the n-th ``point``: True if it was killed
    (else it must have finished cleanly)."""
    if not extra:
        extra = ("--resume", "latest") if (out / "latest").is_file() else ("--overwrite",)
    proc = spawn(tiny_argv(out, MAX_STEPS, 1, *extra), {ENV: f"{point}:{n}"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return proc.returncode == -signal.SIGKILL


def _finish(out) -> None:
    """Resume (or, before the first checkpoint, start over) without faults, in this process."""
    extra = ("--resume", "latest") if (out / "latest").is_file() else ("--overwrite",)
    T.main(tiny_argv(out, MAX_STEPS, 1, *extra))


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[fault injection] {text}")


def test_sigkill_at_random_points_then_resume_is_bit_exact(reference, tmp_path, capsys):
    """Per seed: a kill at one point (the seed picks which time it is reached), then a kill in the
    next attempt (the seed picks the point; on a resume, cutting the logs back), then a clean resume.
    The final weights, metrics.csv (all but the tokens/s column) and thoughts.txt equal the
    uninterrupted run's."""
    kills, lost, tried = [], 0, []
    for seed in SEEDS:
        rng = random.Random(seed)
        out = tmp_path / f"seed-{seed}"
        first = list(POINTS)[seed % len(POINTS)]
        second = "log-rewrite" if seed % 2 == 0 else rng.choice(list(POINTS))
        for point in (first, second):
            n = rng.randint(1, POINTS[point])
            tried.append(f"{point}:{n}")
            if _attempt(out, point, n):
                kills.append(f"{point}:{n}")
        _finish(out)
        lost += compare_runs(reference, out, MAX_STEPS)
    _report(
        capsys,
        f"{len(kills)} SIGKILLs survived of {len(tried)} tried over seeds {list(SEEDS)} "
        f"({', '.join(kills)}); final weights and {MAX_STEPS} metric rows bit-exact; bytes lost {lost}",
    )
    assert len(kills) >= len(SEEDS), f"too few of {tried} killed the trainer"
    assert lost == 0


@pytest.mark.parametrize("resume_from", [2, 3])
def test_sigkill_while_a_rollback_deletes_an_old_checkpoint(reference, tmp_path, capsys, resume_from):
    """Resume a finished 4-step run from an older checkpoint in the same directory; SIGKILL while the
    old checkpoint of the next step is deleted to make room for the new one: from checkpoint-2 that
    is checkpoint-3 (the logs were cut to step 2; `latest` named checkpoint-4), from checkpoint-3 it is
    checkpoint-4, the one `latest` named. `latest` still names a complete checkpoint, and resuming
    from it ends as the uninterrupted run."""
    out = tmp_path / "rollback"
    shutil.copytree(reference, out)
    assert _attempt(out, "checkpoint-delete", 1, "--resume", str(out / f"checkpoint-{resume_from}"))
    latest = out / (out / "latest").read_text().strip()
    verify_checkpoint(latest)  # complete: every file of its manifest, sizes and sha256
    _finish(out)
    lost = compare_runs(reference, out, MAX_STEPS)
    deleted = f"checkpoint-{resume_from + 1}"
    _report(capsys, f"rollback to step {resume_from}: SIGKILL deleting the old {deleted}; bytes lost {lost}")
    assert lost == 0
