"""SIGINT and SIGTERM during training: finish the step, save a checkpoint, exit with one line.

    with StopOnSignal(dist) as stop:
        while ... and not stopping:
            ...  # one step
            stopping = stop.requested()  # a collective under torchrun: all ranks stop together
            ...  # save when stopping
        if stopping:
            stop.exit(step, checkpoint)  # raises TrainingInterrupted

The first signal is noted (one log line) and the loop stops after the step it is in, saves a
checkpoint of that step and raises :class:`TrainingInterrupted`: a ``SystemExit`` with code
128 + the signal's number (130 for SIGINT, 143 for SIGTERM, the shell's convention), so the process
exits with that status and one line on stderr, no traceback. A second signal exits at once
(``os._exit``, same status) without saving: the last complete checkpoint stays, and the lock the
run leaves is taken over by the next run as stale. Handlers are installed only in the main thread
and the previous ones are restored on leaving the ``with`` block.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .run_dir import any_rank

log = logging.getLogger("qstar.train")

__all__ = ["SIGNALS", "StopOnSignal", "TrainingInterrupted"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """A signal stopped training after ``step``; ``checkpoint`` holds it (None if no step ran).
    Exit status 128 + ``signum``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopOnSignal:
    def __init__(self, dist):
        self.dist = dist
        self.signum = 0  # the first signal received (0: none)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:
            sys.stdout.flush()
            sys.stderr.write(f"qstar-train: second {name}: exiting now, without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        log.warning(
            "%s: finishing this step, then saving a checkpoint and exiting (again: exit at once)", name
        )

    def requested(self) -> bool:
        """Whether any rank received a signal (a collective under torchrun: call it on every rank)."""
        self.signum = int(any_rank(self.dist, self.signum)) or self.signum
        return bool(self.signum)

    def exit(self, step: int, checkpoint: Path | None, resumable: bool = True):
        """Say how the run stopped (rank 0, one line on stderr) and raise :class:`TrainingInterrupted`.
        ``resumable``: the output directory holds a checkpoint to continue from."""
        name = signal.Signals(self.signum).name
        if self.dist.is_main:
            saved = f"saved {checkpoint}" if checkpoint is not None else "no step ran, nothing new saved"
            hint = "continue with --resume latest" if resumable else "no checkpoint yet: start it again"
            sys.stderr.write(f"qstar-train: stopped by {name} after step {step}; {saved} ({hint})\n")
            sys.stderr.flush()
        raise TrainingInterrupted(self.signum, step, checkpoint)
