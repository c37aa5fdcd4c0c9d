"""What the three command lines (``qstar-train``, ``qstar-eval``, ``qstar-generate``) share: errors
in one line, and output paths checked before the work starts.

Every error ends the program with ONE line on stderr, ``<prog>: error: <message>``, and no
traceback:

* exit status 2: the input was refused. Bad flags (argparse), and every ``ValueError``,
  ``TypeError`` and ``OSError`` (a missing file, a directory that is not writable, a full disk):
  their messages name the argument or the file. The line is the message alone.
* exit status 1: anything else (a bug, or a failure that is not the input's fault, such as
  ``NonFiniteLossError``): the line is the exception's type and message.
* exit status 130: interrupted (Ctrl-C) outside the trainer's own signal handling.

With the environment variable ``QSTAR_DEBUG=1`` the full traceback is printed as well (before the
line). Warnings and log lines are not errors: they go to stderr as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ArgumentParser",
    "check_output_dir",
    "check_output_file",
    "debugging",
    "device_arg",
    "error_line",
    "run_cli",
]

#: the environment variable that shows tracebacks (any value but "", "0", "false", "no").
DEBUG_ENV = "QSTAR_DEBUG"
#: errors whose message is the whole story (the input was refused): exit status 2.
INPUT_ERRORS = (ValueError, TypeError, OSError)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``, exit status 2) without the
    usage block; ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error_line(prog: str, err: BaseException) -> tuple[str, int]:
    """The line printed for ``err`` and the exit status (see the module docstring)."""
    message = _one_line(err) or "(no message)"
    if isinstance(err, KeyboardInterrupt):
        return f"{prog}: interrupted", 130
    if isinstance(err, INPUT_ERRORS):
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        return f"{prog}: error: {message}", 2
    return f"{prog}: error: {type(err).__name__}: {message} ({DEBUG_ENV}=1 shows the traceback)", 1


def run_cli(prog: str, main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` (``argv`` None: ``sys.argv[1:]``) and return the exit status: 0 when it
    returns, the status of a ``SystemExit`` (argparse's 2 for a usage error, 0 for ``--help``), else
    the status of :func:`error_line` after printing its line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(argv)
    except SystemExit as exit_:  # argparse (--help, usage errors) and explicit exits keep their status
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(f"{prog}: error: {_one_line(exit_.code)}", file=sys.stderr, flush=True)
        return 2
    except (Exception, KeyboardInterrupt) as err:
        if debugging():
            traceback.print_exc()
        line, status = error_line(prog, err)
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        return status
    return 0


# --------------------------------------------------------------------------------------------------
# Output paths, checked before the work starts
# --------------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_dir(flag: str, path: str | os.PathLike) -> Path:
    """``path`` can be a directory we write into: it is one (writable), or it can be created under
    its nearest existing ancestor (a writable directory). Raises ``ValueError`` naming ``flag``."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: expected a directory, but it is a file")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: cannot create it, {str(base)!r} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: {str(base)!r} is not writable")
    return p


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` can be written: not a directory, in an existing, writable directory (the file itself
    writable if it exists). Raises ``ValueError`` naming ``flag``."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: expected a file name, but it is a directory")
    parent = p.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{flag} {str(path)!r}: not writable")
    return p


def device_arg(value: str | None, flag: str = "--device"):
    """``torch.device(value)`` (None: cuda if available, else cpu); a bad name, or cuda without a
    GPU, raises ``ValueError`` naming ``flag``."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{flag} {value!r}: not a device ({_one_line(err)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {value!r}: no CUDA device is available")
    return device
