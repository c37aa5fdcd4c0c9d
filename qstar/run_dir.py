"""One run per output directory: the lock, and what a fresh run may find there.

    with claim_output_dir(run, dist, samples_file="thoughts.txt"):
        ...  # the whole run

* **The lock.** ``<output_dir>/train.lock`` holds the pid, host and start time of the trainer that
  owns the directory, and that process holds an exclusive ``flock`` on it while it runs. A second
  trainer stops with one line naming them. A lock nobody holds is stale (its process died: SIGKILL,
  a crash, a power cut): on the same host it is taken over with a log line; one written on another
  host is refused, since this host cannot tell whether that process still runs (delete the file if it
  does not). Under ``torchrun`` only rank 0 takes it; the other ranks stop with it.
* **No silent clobbering.** A fresh run (no ``--resume``) into a directory that already holds a
  run's outputs (a ``checkpoint-<step>``, ``latest``, ``metrics.csv`` or the samples file) refuses,
  unless ``--overwrite`` is given: then those outputs are removed first (``latest`` before anything
  else, so nothing ever names a half-deleted checkpoint; each checkpoint is renamed aside before it
  is deleted). Files the trainer does not write are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: the pid/host record alone
    fcntl = None

log = logging.getLogger("qstar.train")

__all__ = ["LOCK_NAME", "OutputDirError", "RunDirLock", "any_rank", "claim_output_dir", "previous_outputs"]

LOCK_NAME = "train.lock"
#: the trainer's checkpoint directories, complete or not: checkpoint-5 and its .tmp-, .old- and
#: .deleting- forms (a user's best-checkpoint-5 or copy is not the trainer's, and is left alone)
_CHECKPOINT = re.compile(r"(?:\.(?:tmp|old|deleting)-)?checkpoint-\d+")
#: what the trainer writes besides checkpoints (``--overwrite`` removes these too).
_OTHER_OUTPUTS = (
    "latest", ".latest.tmp", "metrics.csv", ".metrics.csv.tmp", "metrics.png", "tensorboard", "wandb",
)  # fmt: skip


class OutputDirError(ValueError):
    """The output directory is in use, or holds a previous run (a ValueError: a bad argument)."""


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunDirLock:
    """An exclusive lock on an output directory (``acquire`` / ``release``)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def _owner(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(self.path.read_text())
            if isinstance(owner, dict):
                return owner
        return {}

    def _in_use(self, owner: dict, why: str = "") -> OutputDirError:
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        if owner.get("started"):
            who += f", since {owner['started']}"
        return OutputDirError(
            f"--output-dir {str(self.path.parent)!r} is in use by another trainer ({who}; lock file "
            f"{str(self.path)!r}){why}"
        )

    def acquire(self) -> None:
        host = socket.gethostname()
        for _ in range(10):  # retried only if the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise self._in_use(self._owner()) from None
                    try:
                        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:  # the holder released (unlinked) it meanwhile
                        same = False
                    if not same:  # this inode is no longer the lock file: lock the current one
                        os.close(fd)
                        continue
                owner = self._owner()
                if owner:  # nobody holds the lock, but a record is left: a process that died
                    pid = owner.get("pid")
                    if owner.get("host") != host:
                        raise self._in_use(
                            owner,
                            ": it was written on another host, which this one cannot check; delete the "
                            "lock file if that trainer is no longer running",
                        )
                    if fcntl is None and isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
                        raise self._in_use(owner)
                    log.warning(
                        "taking over the stale lock %s of pid %s on %s (that trainer is no longer running)",
                        self.path, pid, host,
                    )  # fmt: skip
                record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            return
        raise OutputDirError(f"could not lock {str(self.path)!r}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # unlink while still holding the flock, then let it go
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------------------------------
# A previous run's outputs
# --------------------------------------------------------------------------------------------------


def previous_outputs(out: Path, samples_file: str | None = None) -> list[Path]:
    """What a previous run left in ``out`` that a fresh run would clobber (checkpoints, temporary
    ones included, ``latest``, the logs, TensorBoard and wandb folders), sorted by name."""
    if not Path(out).is_dir():
        return []
    names = set(_OTHER_OUTPUTS)
    if samples_file:
        names |= {samples_file, f".{samples_file}.tmp"}
    return sorted(p for p in Path(out).iterdir() if p.name in names or _CHECKPOINT.fullmatch(p.name))


def _blocks_a_fresh_run(path: Path) -> bool:
    """A checkpoint or ``latest``: a run that can be continued. Logs alone (a run stopped before its
    first checkpoint) do not: a fresh run cuts them back to nothing, as it would on resume."""
    return path.name.startswith("checkpoint-") or path.name == "latest"


def _inside(resume: str, out: Path) -> bool:
    """Whether ``--resume`` names ``out`` itself (``latest``, the directory) or one of its checkpoints."""
    if resume == "latest":
        return True
    path = Path(resume).resolve()
    return path == out.resolve() or path.parent == out.resolve()


def _clear(out: Path, outputs: list[Path]) -> None:
    """Remove a previous run's outputs: ``latest`` first, each checkpoint renamed aside first."""
    for name in ("latest", ".latest.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for p in outputs:
        if p.is_dir() and _CHECKPOINT.fullmatch(p.name):
            aside = p if p.name.startswith(".deleting-") else out / f".deleting-{p.name.lstrip('.')}"
            os.replace(p, aside)
            shutil.rmtree(aside)
        elif p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _check_and_clear(run, out: Path, samples_file: str | None) -> None:
    overwrite = getattr(run, "overwrite", False)
    if overwrite and run.resume:
        raise OutputDirError("--overwrite and --resume exclude each other: --overwrite starts afresh")
    outputs = previous_outputs(out, samples_file)
    if run.resume:
        found = [p.name for p in outputs if _blocks_a_fresh_run(p)]
        if found and not _inside(run.resume, out):  # two runs' histories would mix in one directory
            raise OutputDirError(
                f"--resume {run.resume!r} is a checkpoint of another directory, and --output-dir "
                f"{str(out)!r} already holds a run ({', '.join(found[:4])}): resume into an empty "
                "--output-dir, or resume that run from its own directory"
            )
        return
    if overwrite:
        if outputs:
            _clear(out, outputs)
            log.warning("--overwrite: removed %s from %s", ", ".join(p.name for p in outputs), out)
        return
    found = [p.name for p in outputs if _blocks_a_fresh_run(p)]
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise OutputDirError(
            f"--output-dir {str(out)!r} already holds a run ({shown}): continue it with --resume latest, "
            f"start afresh with --overwrite (removes them), or choose another --output-dir"
        )


# --------------------------------------------------------------------------------------------------
# Both, for a run
# --------------------------------------------------------------------------------------------------


def any_rank(dist, value: float) -> float:
    """The largest ``value`` over all ranks (a collective; ``value`` itself without processes)."""
    if dist.mode == "none":
        return value
    import torch

    t = torch.tensor([float(value)], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


@contextlib.contextmanager
def claim_output_dir(run, dist, samples_file: str | None = None):
    """Create and lock ``run.output_dir`` (rank 0) and apply the fresh-run rule, for the ``with``
    block; every rank raises :class:`OutputDirError` if rank 0 could not claim it."""
    out = Path(run.output_dir)
    lock = RunDirLock(out) if dist.is_main else None
    error = None
    if lock is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            _check_and_clear(run, out, samples_file)
        except (OSError, OutputDirError) as err:
            lock.release()
            error = err
    if any_rank(dist, error is not None):
        if error is not None:
            raise error
        raise OutputDirError(f"rank 0 could not claim --output-dir {str(out)!r} (its error says why)")
    try:
        yield out
    finally:
        if lock is not None:
            lock.release()
